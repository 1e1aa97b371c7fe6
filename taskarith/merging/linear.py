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
from ._checks import any_nan, compute_dtype
from ._spec import DROP, SCALE, SEED, Method
from ._steps import dropped, region_of, total, weighted, wrap


def task_arithmetic(vectors, weights, *, scale):
    """Task arithmetic: ``scale · Σ w_i τ_i``, the weighted sum of the vectors."""
    return weighted_sum(vectors, [w * scale for w in weights])


def mean(vectors, weights):
    """Weighted average ``Σ w_i τ_i / Σ w_i`` (model soup of the fine-tuned models)."""
    return weighted_sum(vectors, _averaging(weights))


def _averaging(weights) -> list[float]:
    norm = sum(weights)
    if norm == 0:
        raise TaskArithError("the weights of 'mean' sum to zero; a weighted average is undefined")
    return [w / norm for w in weights]


# The whole-vector forms also say whether the result holds a NaN: the compiled sums count NaN
# results as they write them, so the merge's NaN check needs no second pass over the result.
def task_arithmetic_fast(vectors, weights, *, scale):
    return checked_sum(vectors, [w * scale for w in weights])


def mean_fast(vectors, weights):
    return checked_sum(vectors, _averaging(weights))


_BLOCK = 1 << 18  # entries per block of a half-precision sum: its float32 scratch stays in cache


def weighted_sum(vectors: list[TaskVector], coefficients: list[float]) -> TaskVector:
    """``Σ c_i τ_i`` computed in float32 for half-precision deltas (float64 stays float64), rounded
    once to the deltas' dtype.

    Half-precision buffers are summed a cache-sized block at a time: each block widened into
    float32 scratch, summed there as :meth:`TaskVector.sum` sums float32 buffers, and rounded into
    the result: converting whole vectors to float32 first moves three times the bytes.
    """
    return checked_sum(vectors, coefficients, check_nan=False)[0]


def checked_sum(vectors: list[TaskVector], coefficients: list[float], *,
                check_nan: bool = True) -> tuple[TaskVector, bool | None]:
    """:func:`weighted_sum` and, with ``check_nan``, whether the result holds a NaN (else None)."""
    first = vectors[0]
    if (torch.float64 in first.dtypes or first.device.type != "cpu"
            or any(v._layout != first._layout for v in vectors[1:])):
        result = TaskVector.sum([v.to(dtype=compute_dtype(v)) for v in vectors], coefficients)
        return result, (any_nan(result._buffers.values()) if check_nan else None)
    for i, c in enumerate(coefficients):
        _checked_scalar(c, f"the coefficient of vector #{i}", (torch.float32,))
    # The inputs' layout (no per-name views: with thousands of tensors they cost more than the sum).
    result = TaskVector._make(first._layout, {dt: _flat.allocate(buf.numel(), dt, buf.device)
                                              for dt, buf in first._buffers.items()}, Info())
    nan = False
    for dtype, dst in result._buffers.items():
        counted = _sum_buffer(dst, [v._buffers[dtype] for v in vectors], coefficients, check_nan)
        if check_nan and not nan:
            nan = counted > 0 if counted is not None else any_nan([dst])
    return result, (nan if check_nan else None)


def _sum_buffer(dst: torch.Tensor, srcs: list[torch.Tensor], coefficients: list[float], count_nan: bool) -> int | None:
    """One dtype's buffer of :func:`checked_sum`; the number of NaN results if a kernel counted them."""
    if dst.dtype not in _extract.HALF:
        return sum_into(dst, srcs, coefficients, count_nan=count_nan)
    counted = None
    if all(c == 1.0 for c in coefficients):  # the same bits in one pass
        counted = _numba.wide_sum(dst, srcs, count_nan=count_nan)
    if counted is None:  # likewise, weighted
        counted = _numba.weighted_sum(dst, srcs, coefficients, count_nan=count_nan)
    if counted is not None:
        return counted if count_nan else None
    scratch = torch.empty(len(srcs) + 1, min(_BLOCK, dst.numel()), dtype=torch.float32)
    for start in range(0, dst.numel(), _BLOCK):
        stop = min(start + _BLOCK, dst.numel())
        wide = [scratch[i, :stop - start].copy_(src[start:stop]) for i, src in enumerate(srcs)]
        sum_into(scratch[-1, :stop - start], wide, coefficients)
        dst[start:stop].copy_(scratch[-1, :stop - start])
    return None


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
           split="elementwise", propagates_nan=True, symmetric=True, identity={}, fast=task_arithmetic_fast,
           fast_widens=True, fast_checks_nan=True),
    Method("mean", _mean_block, "https://arxiv.org/abs/2203.05482", split="elementwise", propagates_nan=True,
           symmetric=True, identity={}, fast=mean_fast, fast_widens=True, fast_checks_nan=True),
    Method("dare", _dare_block, "https://arxiv.org/abs/2311.03099", {"drop": DROP, "seed": SEED, "scale": SCALE},
           split="elementwise", randomized=True, identity={"drop": 0.0}, fast=dare),
)
