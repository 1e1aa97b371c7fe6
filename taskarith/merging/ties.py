"""Trim-and-elect methods: magnitude pruning, TIES, DARE-TIES.

Their trim (keep the ``floor(density·n)`` largest magnitudes per tensor or over the whole vector)
is done by the engine, from :mod:`taskarith.merging._trim` in memory or a streamed selection out of
core; the whole-vector forms here fuse it into the merge.
"""

from __future__ import annotations

from ..backends import _fused
from ._spec import DENSITY, DROP, SCALE, SCOPE, SEED, SIGN, Method
from ._steps import dropped, elect_and_merge, region_of, total, weighted, wrap
from ._trim import trim, trim_plans


def magnitude_prune(vectors, weights, *, density, scope):
    """``Σ w_i · trim(τ_i)``: keep exactly ``floor(density·n)`` largest magnitudes of each vector, then sum."""
    return total(weighted([trim(v, density, scope) for v in vectors], weights), 1.0)


def ties(vectors, weights, *, density, scope, sign, scale):
    """TIES: trim each vector to its top ``density``, weight, elect a sign per entry, average the agreeing entries.

    ``sign="sum"`` elects the sign of Σ trimmed values; ``"count"`` the sign of
    #positive − #negative; a tie goes to +. The disjoint mean averages, per
    entry, the non-zero trimmed values whose sign is the elected one (0 where
    there are none). Result × ``scale``.
    """
    return elect_and_merge(trim_plans(vectors, density, scope), weights, sign, scale)


def dare_ties(vectors, weights, *, drop, seed, sign, scale, regions=None):
    """DARE-TIES: DARE's drop and rescale in place of TIES' trim, then TIES' election and disjoint mean."""
    return elect_and_merge([_fused.Trimmed(p) for p in dropped(vectors, drop, seed, regions)], weights, sign, scale)


def _magnitude_prune_block(block, *, density, scope):
    return total(weighted([{block.name: d} for d in block.deltas], block.weights), 1.0)[block.name]


def _ties_block(block, *, density, scope, sign, scale):
    return elect_and_merge([_fused.Trimmed({block.name: d}) for d in block.deltas], block.weights, sign, scale)[block.name]


def _dare_ties_block(block, *, drop, seed, sign, scale):
    return dare_ties(wrap(block), block.weights, drop=drop, seed=seed, sign=sign, scale=scale,
                     regions=region_of(block))[block.name]


for _block_fn, _whole in ((_magnitude_prune_block, magnitude_prune), (_ties_block, ties), (_dare_ties_block, dare_ties)):
    _block_fn.__doc__ = _whole.__doc__

# The trims' selection refuses NaN and their hardshrink and election keep it: the result shows
# every NaN input. DARE's drop may hide one: its inputs are checked.
METHODS = (
    Method("magnitude_prune", _magnitude_prune_block, "https://arxiv.org/abs/2306.01708",
           {"density": DENSITY, "scope": SCOPE}, split="elementwise", trim=True, propagates_nan=True,
           symmetric=True, identity={"density": 1.0}, fast=magnitude_prune),
    Method("ties", _ties_block, "https://arxiv.org/abs/2306.01708",
           {"density": DENSITY, "scope": SCOPE, "sign": SIGN, "scale": SCALE}, split="elementwise", trim=True,
           propagates_nan=True, symmetric=True, identity={"density": 1.0}, fast=ties),
    Method("dare_ties", _dare_ties_block, "https://arxiv.org/abs/2311.03099",
           {"drop": DROP, "seed": SEED, "sign": SIGN, "scale": SCALE}, split="elementwise", randomized=True,
           identity={"drop": 0.0}, fast=dare_ties),
)
