"""Linear methods: task arithmetic, weighted mean (model soup), DARE."""

from __future__ import annotations

from ..errors import TaskArithError
from ..vector import TaskVector
from ._spec import DROP, SCALE, SEED, Method
from ._steps import dropped, region_of, total, weighted, wrap


def task_arithmetic(vectors, weights, *, scale):
    """Task arithmetic: ``scale · Σ w_i τ_i``, the weighted sum of the vectors."""
    return TaskVector.sum(vectors, [w * scale for w in weights])


def mean(vectors, weights):
    """Weighted average ``Σ w_i τ_i / Σ w_i`` (model soup of the fine-tuned models)."""
    norm = sum(weights)
    if norm == 0:
        raise TaskArithError("the weights of 'mean' sum to zero; a weighted average is undefined")
    return TaskVector.sum(vectors, [w / norm for w in weights])


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
           split="elementwise", propagates_nan=True, symmetric=True, identity={}, fast=task_arithmetic),
    Method("mean", _mean_block, "https://arxiv.org/abs/2203.05482", split="elementwise", propagates_nan=True,
           symmetric=True, identity={}, fast=mean),
    Method("dare", _dare_block, "https://arxiv.org/abs/2311.03099", {"drop": DROP, "seed": SEED, "scale": SCALE},
           split="elementwise", randomized=True, identity={"drop": 0.0}, fast=dare),
)
