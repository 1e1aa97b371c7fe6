"""Exact selection: the k-th largest value, top-k masks, trim thresholds (the torch/numpy reference).

Every function here works on plain tensors (a flat buffer or one tensor).
Selecting the k largest of n values is exact: on the CPU numpy's selection,
linear in n, or numpy's SIMD sort for arrays with few distinct values (where
the selection degrades, see :func:`_numpy_select`); on accelerators a device
sort. ``torch.quantile`` is avoided on purpose: it refuses large inputs on
older PyTorch and interpolates rather than selecting exactly.

Ties at the selection threshold are broken by position: among entries equal to
the k-th largest value, the ones with the lowest index are kept, so exactly k
entries survive on every run and every device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import NonFiniteError, TaskArithError
from . import _numba

__all__ = ["has_nan", "kth_largest", "topk_mask"]

_NUMPY_SELECT = (torch.float16, torch.float32, torch.float64)
_INF_BITS = {np.dtype(kind): int(np.array(np.inf, dtype=kind).view(f"i{np.dtype(kind).itemsize}"))
             for kind in (np.float16, np.float32, np.float64)}
_NAN = "cannot select the largest entries of scores containing NaN"


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor (k counted from 1), exactly, as a 0-d tensor.

    Example:
        >>> import torch
        >>> kth_largest(torch.tensor([0.5, 3.0, 1.0, 3.0]), 2)
        tensor(3.)
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise TaskArithError(f"k must be in [1, {n}] to select from {n} values, got {k}")
    if values.device.type == "cpu" and values.dtype in _NUMPY_SELECT:
        return torch.tensor(_numpy_select(values.detach().numpy(), k, inplace=False)[0], dtype=values.dtype)
    return torch.kthvalue(values.detach().float(), n - k + 1).values.to(values.dtype)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask with exactly ``k`` True entries at the largest ``scores``.

    Ties at the threshold go to the lowest indices (of the flattened tensor).

    Example:
        >>> import torch
        >>> topk_mask(torch.tensor([1.0, 2.0, 2.0, 0.0, 2.0]), 2)
        tensor([False,  True,  True, False, False])
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if has_nan(flat):
        raise NonFiniteError(_NAN)
    threshold, excess = _select(flat, k)
    threshold = threshold.to(flat.device)
    mask = flat >= threshold
    if excess:  # more entries equal the threshold than slots left: drop the last ones
        ties = torch.nonzero(flat == threshold).squeeze(1)
        mask[ties[ties.numel() - excess:]] = False
    return mask.view(scores.shape)


def has_nan(values: torch.Tensor) -> bool:
    """Whether ``values`` holds a NaN: a compiled scan of the bits where one takes the tensor, else one
    reduction (``amax`` propagates NaN; ``isnan().any()`` would write a mask first).

    Example:
        >>> import torch
        >>> has_nan(torch.tensor([1.0, float("inf")])), has_nan(torch.tensor([float("nan")]))
        (False, True)
    """
    if not values.numel():
        return False
    compiled = _numba.has_nan(values.view(-1)) if values.is_contiguous() else None
    return compiled if compiled is not None else math.isnan(float(values.amax()))


_BITS = {torch.float16: np.int16, torch.float32: np.int32, torch.float64: np.int64}


def _select(flat: torch.Tensor, k: int, *, inplace: bool = False, magnitudes: bool = False) -> tuple[torch.Tensor, int]:
    """The k-th largest value and how many more than k entries are >= it (ties past the k-th).

    ``inplace=True`` lets a CPU selection reorder ``flat`` instead of copying it.
    ``magnitudes=True`` promises values >= 0: their IEEE bit patterns then sort
    like the values, and selecting on integers is faster (on the CPU, a NaN
    among them raises :class:`NonFiniteError`).
    """
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype in _NUMPY_SELECT:
        array = flat.detach().numpy()
        if magnitudes:
            threshold, excess = _select_magnitude_array(array if inplace else array.copy(), k)
        else:
            threshold, excess = _numpy_select(array, k, inplace=inplace)
        return torch.tensor(threshold, dtype=flat.dtype), excess
    if flat.device.type != "cpu":
        # A device radix sort beats torch.kthvalue, whose single-slice select runs in one thread block.
        threshold = torch.sort(flat.detach()).values[n - k]
    else:
        threshold = kth_largest(flat, k)
    return threshold, int(torch.count_nonzero(flat >= threshold.to(flat.device))) - k


# numpy's selection (a SIMD quickselect on x86) degrades to a full scalar sort on some arrays with
# few distinct values (deltas of bfloat16 fine-tunes), which sorting handles well; on distinct values
# selecting is faster. So a strided sample decides (docs/design.md, "Measurements").
_SAMPLE = 1024
_SORT_BELOW_DISTINCT = 0.5
_SORT_FROM = 1 << 16  # smaller arrays: either way is fast


def _numpy_select(array: np.ndarray, k: int, *, inplace: bool) -> tuple[np.generic, int]:
    """The k-th largest entry of a 1-D array (NaN-free) and how many more than k entries reach it."""
    n = array.size
    cut = n - k
    if n >= _SORT_FROM and _few_distinct(array):
        ordered = array if inplace else array.copy()
        ordered.sort()
        threshold = ordered[cut]
        return threshold, cut - int(np.searchsorted(ordered, threshold, side="left"))
    if inplace:
        array.partition(cut)
        part = array
    else:
        part = np.partition(array, cut)
    threshold = part[cut]
    # After partitioning, only the lower part can hold further copies of the threshold.
    lower = part[:cut]
    # A max (no temporary) settles the common case of no tie before counting.
    excess = int(np.count_nonzero(lower == threshold)) if cut and lower.max() == threshold else 0
    return threshold, excess


def _few_distinct(array: np.ndarray) -> bool:
    sample = np.sort(array[:: max(1, array.size // _SAMPLE)][:_SAMPLE])
    # Sorted, distinct values are where neighbours differ (cheaper than np.unique).
    distinct = 1 + int(np.count_nonzero(sample[1:] != sample[:-1]))
    return distinct < _SORT_BELOW_DISTINCT * sample.size


def _sampled_magnitudes(parts: list[np.ndarray], count: int) -> np.ndarray:
    """The magnitudes, as sorted int32 bits, of ``min(count, n)`` entries at :func:`_spread_positions`
    of the concatenation of the 1-D float32 arrays ``parts`` (``n`` entries in all)."""
    starts = np.cumsum([0, *(part.size for part in parts)])
    positions = np.sort(_spread_positions(int(starts[-1]), min(count, int(starts[-1]))))
    bounds = np.searchsorted(positions, starts)  # each part's positions lie between two of these
    bits = np.concatenate([part.view(np.int32)[positions[lo:hi] - start]
                           for part, start, lo, hi in zip(parts, starts, bounds, bounds[1:])])
    return np.sort(bits & 0x7FFFFFFF)


def _spread_positions(n: int, count: int) -> np.ndarray:
    """``count`` distinct positions in ``range(n)`` (``count <= n``), spread by golden-ratio steps
    rather than a stride, which can fall in step with the rows of a matrix and see a few columns."""
    step = round(n * 0.6180339887498949)
    while math.gcd(step, n) != 1:  # coprime: no position repeats within n steps
        step += 1
    return np.arange(count, dtype=np.int64) * step % n


def _select_magnitude_array(magnitudes: np.ndarray, k: int) -> tuple[float, int]:
    """:func:`select_magnitudes` of a non-negative array (reordered in place), for 0 < k <= n."""
    bits = magnitudes.view(f"i{magnitudes.itemsize}")  # non-negative: IEEE bit patterns sort like the values
    threshold, excess = _numpy_select(bits, k, inplace=True)
    # NaN's bit patterns exceed every number's, so a NaN is among the k largest, which the selection
    # left at the end: checking them costs a fraction of a pass over all n.
    if bits[bits.size - k:].max() > _INF_BITS[magnitudes.dtype]:
        raise NonFiniteError(_NAN)
    return float(threshold.view(magnitudes.dtype)), excess
