"""Linear methods: task arithmetic, weighted mean (model soup), DARE."""

from __future__ import annotations

import torch

from .. import _extract, _flat
from ..backends import _numba
from ..errors import TaskArithError
from ..vector import TaskVector
from ..vector._algebra import sum_into
from ..vector._info import Info
from ..vector._scalars import _checked_scalar
from ._checks import compute_dtype
from ._spec import DROP, SCALE, SEED, Method
from ._steps import dropped, region_of, total, weighted, wrap


def task_arithmetic(vectors, weights, *, scale):
    """Task arithmetic: ``scale · Σ w_i τ_i``, the weighted sum of the vectors."""
    return weighted_sum(vectors, [w * scale for w in weights])


def mean(vectors, weights):
    """Weighted average ``Σ w_i τ_i / Σ w_i`` (model soup of the fine-tuned models)."""
    norm = sum(weights)
    if norm == 0:
        raise TaskArithError("the weights of 'mean' sum to zero; a weighted average is undefined")
    return weighted_sum(vectors, [w / norm for w in weights])


_BLOCK = 1 << 18  # entries per block of a half-precision sum: its float32 scratch stays in cache


def weighted_sum(vectors: list[TaskVector], coefficients: list[float]) -> TaskVector:
    """``Σ c_i τ_i`` computed in float32 for half-precision deltas (float64 stays float64), rounded
    once to the deltas' dtype.

    Half-precision buffers are summed a cache-sized block at a time: each block widened into
    float32 scratch, summed there as :meth:`TaskVector.sum` sums float32 buffers, and rounded into
    the result: converting whole vectors to float32 first moves three times the bytes.
    """
    first = vectors[0]
    if (not any(dt in _extract.HALF for dt in first.dtypes) or torch.float64 in first.dtypes
            or first.device.type != "cpu" or any(v._layout != first._layout for v in vectors[1:])):
        return TaskVector.sum([v.to(dtype=compute_dtype(v)) for v in vectors], coefficients)
    for i, c in enumerate(coefficients):
        _checked_scalar(c, f"the coefficient of vector #{i}", (torch.float32,))
    # The inputs' layout (no per-name views: with thousands of tensors they cost more than the sum).
    result = TaskVector._make(first._layout, {dt: _flat.allocate(buf.numel(), dt, buf.device)
                                              for dt, buf in first._buffers.items()}, Info())
    for dtype, dst in result._buffers.items():
        srcs = [v._buffers[dtype] for v in vectors]
        if dtype not in _extract.HALF:
            sum_into(dst, srcs, coefficients)
            continue
        if all(c == 1.0 for c in coefficients) and _numba.wide_sum(dst, srcs):  # the same bits in one pass
            continue
        if _numba.weighted_sum(dst, srcs, coefficients):  # likewise, weighted
            continue
        scratch = torch.empty(len(srcs) + 1, min(_BLOCK, dst.numel()), dtype=torch.float32)
        for start in range(0, dst.numel(), _BLOCK):
            stop = min(start + _BLOCK, dst.numel())
            wide = [scratch[i, :stop - start].copy_(src[start:stop]) for i, src in enumerate(srcs)]
            sum_into(scratch[-1, :stop - start], wide, coefficients)
            dst[start:stop].copy_(scratch[-1, :stop - start])
    return result


def dare(vectors, weights, *, drop, seed, scale, regions=None):
    """DARE: drop each entry with probability ``drop``, rescale survivors by ``1/(1-drop)``, then ``scale · Σ w_i``."""
    return total(weighted(dropped(vectors, drop, seed, regions), weights), scale)


def _task_arithmetic_block(block, *, scale):
    return task_arithmetic(wrap(block), block.weights, scale=scale)[block.name]


def _mean_block(block):
    return mean(wrap(block), block.weights)[block.name]


def _dare_block(block, *, drop, seed, scale):
    return dare(wrap(block), block.weights, drop=drop, seed=seed, scale=scale, regions=region_of(block))[block.name]


for _block_fn, _whole in ((_task_arithmetic_block, task_arithmetic), (_mean_block, mean), (_dare_block, dare)):
    _block_fn.__doc__ = _whole.__doc__

# The sums carry a NaN input to the result (0 · NaN is NaN); DARE's drop may hide one, so its
# inputs are checked.
METHODS = (
    Method("task_arithmetic", _task_arithmetic_block, "https://arxiv.org/abs/2212.04089", {"scale": SCALE},
           split="elementwise", propagates_nan=True, symmetric=True, identity={}, fast=task_arithmetic,
           fast_widens=True),
    Method("mean", _mean_block, "https://arxiv.org/abs/2203.05482", split="elementwise", propagates_nan=True,
           symmetric=True, identity={}, fast=mean, fast_widens=True),
    Method("dare", _dare_block, "https://arxiv.org/abs/2311.03099", {"drop": DROP, "seed": SEED, "scale": SCALE},
           split="elementwise", randomized=True, identity={"drop": 0.0}, fast=dare),
)
