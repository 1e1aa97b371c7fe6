"""Exact top-k thresholds of deltas too large to hold: streamed radix selection, and the trims they make.

The out-of-core side of the one trim plan (:mod:`taskarith.merging._trim`): the same thresholds and
the same tie-break (ties at the threshold kept first in each tensor's flat order and, over the whole
vector, in the tensors' sorted name order, whatever order the files hold them in), found without
holding the deltas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from ..backends import _fused, kernels, thresholds
from ..errors import NonFiniteError, TaskArithError
from ..merging._trim import by_tensor
from ._memory import return_freed_memory

_COLLECT = 1 << 22  # at most this many candidates are selected among in memory (less under a small budget)
_SELECT_BYTES = 96  # private bytes per entry while histogramming a block (delta, keys, digits)


def stream_threshold(
    chunks: Callable[[], Iterator[torch.Tensor]], k: int, collect: int | None = None, *, wide: bool = True
) -> tuple[float, int, int]:
    """Exact k-th largest of the magnitudes produced by ``chunks()`` (re-iterable), by radix passes.

    Returns ``(threshold, above, tied)``: the value, how many entries are strictly
    larger and how many equal it. Magnitudes are compared as IEEE bit patterns, which order like the
    values for non-negative floats: float64 patterns, or float32 ones when
    ``wide=False`` (every chunk is float32 or narrower; half the memory and
    work). Each pass histograms the next 16 bits of the patterns that share the
    digits chosen so far, until few enough candidates remain to select among in
    memory.
    """
    collect = _COLLECT if collect is None else min(collect, _COLLECT)
    key_dtype, float_dtype, bits = (torch.int64, torch.float64, 64) if wide else (torch.int32, torch.float32, 32)

    def keys_of(magnitudes: torch.Tensor) -> torch.Tensor:
        flat = magnitudes.reshape(-1)
        if math.isnan(float(flat.sum())):  # magnitudes are >= 0: only NaN makes the sum NaN (inf stays inf)
            raise NonFiniteError("cannot select the largest entries of deltas containing NaN")
        if not wide and flat.dtype == torch.float64:
            raise TaskArithError("internal: a float64 block in a float32 selection")
        return flat.to(float_dtype).view(key_dtype)

    prefix, shift, above, remaining = 0, bits, 0, k
    while True:
        shift -= 16
        counts = torch.zeros(1 << 16, dtype=torch.int64)
        for magnitudes in chunks():
            keys = keys_of(magnitudes)
            del magnitudes
            if shift < bits - 16:
                keys = keys[keys.bitwise_right_shift(shift + 16) == prefix]
            # Out of place: keys may share memory with the caller's tensor (float32 input, float32 keys).
            counts += torch.bincount(keys.bitwise_right_shift(shift).bitwise_and_(0xFFFF), minlength=1 << 16).cpu()
            del keys
            return_freed_memory()
        from_top = torch.flip(counts, [0]).cumsum(0)
        digit = (1 << 16) - 1 - int(torch.searchsorted(from_top, remaining))
        above += int(counts[digit + 1:].sum())
        remaining = k - above
        prefix = (prefix << 16) | digit
        if int(counts[digit]) <= collect or shift == 0:
            break
    pieces = []
    for magnitudes in chunks():
        keys = keys_of(magnitudes)
        del magnitudes
        pieces.append(keys[keys.bitwise_right_shift(shift) == prefix])
        del keys
        return_freed_memory()
    candidates = (torch.cat([p.cpu() for p in pieces]) if pieces else torch.zeros(0, dtype=key_dtype)).view(float_dtype)
    del pieces
    value = kernels.kth_largest(candidates, remaining).item()
    above += int(torch.count_nonzero(candidates > value))
    return value, above, int(torch.count_nonzero(candidates == value))


class Trim:
    """Keeps, in stream order, every entry above ``threshold`` and the first ``ties`` of the ``tied``
    entries at it (the others are dropped)."""

    def __init__(self, threshold: float, ties: int, tied: int):
        self.threshold, self.ties_left, self.tied = threshold, ties, tied

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        """Zero ``delta``'s trimmed entries in place (the caller owns it) and return it."""
        if self.threshold <= 0:  # keep everything (dropping zeros changes nothing)
            return delta
        flat = delta.view(-1)
        keep_ties = _fused.shrink_threshold(self.threshold, delta.dtype)  # keeps |x| >= threshold
        drop_ties = _fused.floor_threshold(self.threshold, delta.dtype)  # keeps |x| > threshold
        if self.ties_left <= 0 or keep_ties == drop_ties:  # no tie kept, or none possible in this dtype
            torch.hardshrink(flat, drop_ties, out=flat)
            return delta
        # The first ties_left ties stay: the cut is at the next one, if this block holds it.
        cut, count = thresholds.tie_after(flat, self.threshold, self.ties_left)
        self.ties_left -= count
        if cut is None:
            torch.hardshrink(flat, keep_ties, out=flat)
            return delta
        torch.hardshrink(flat[:cut], keep_ties, out=flat[:cut])
        torch.hardshrink(flat[cut:], drop_ties, out=flat[cut:])
        return delta


def plan_trims(density, scope, floats, count, reference, delta, delta_dtypes, row_blocks, budget, wide_keys) -> dict:
    """Exact trims per (vector, tensor): None where the merge pass sees the tensor whole (it trims
    in memory), else a threshold from one in-memory selection or, past the budget, streaming passes.
    ``density``: one value, or (``scope="tensor"``) a mapping of each tensor's."""
    density_of = by_tensor(density)
    trims: dict = {}
    for i in range(count):
        if scope == "global":
            total = sum(math.prod(reference.shape(n)) for n in floats)
            k = math.floor(density * total)
            chunks = lambda i=i: (delta(i, n, rows).abs() for n in floats for rows in row_blocks(n, _SELECT_BYTES))
            wide = wide_keys(floats)
            if 0 < k < total and total * (8 if wide else 4) <= budget // 2:
                shared = _select_in_memory(chunks, k, total, torch.float64 if wide else torch.float32)
            else:
                shared = _make_trim(lambda c=chunks: _batched(c(), _batch_entries(budget)), k, total, budget, wide)
            by_name = _by_name(shared, floats, lambda n, i=i: (delta(i, n, rows) for rows in row_blocks(n, _SELECT_BYTES)))
            trims.update({(i, n): t for n, t in by_name.items()})
            continue
        for n in floats:
            numel = math.prod(reference.shape(n))
            if len(row_blocks(n, None)) == 1:
                trims[(i, n)] = None
                continue
            k = math.floor(density_of(n) * numel)
            chunks = lambda i=i, n=n: (delta(i, n, rows).abs() for rows in row_blocks(n, _SELECT_BYTES))
            itemsize = 8 if delta_dtypes(n)[i] == torch.float64 or reference.dtype(n) == torch.float64 else 4
            if 0 < k < numel and numel * itemsize <= budget // 2:
                trims[(i, n)] = _select_in_memory(chunks, k, numel, torch.float64 if itemsize == 8 else torch.float32)
            else:
                trims[(i, n)] = _make_trim(chunks, k, numel, budget, wide_keys([n]))
    return trims


def _select_in_memory(chunks, k: int, numel: int, dtype: torch.dtype) -> Trim:
    """The trim of one tensor whose magnitudes fit the budget though its merge does not: the
    magnitudes are gathered block by block into one buffer and selected among in place."""
    magnitudes = torch.empty(numel, dtype=dtype)
    start = 0
    for block in chunks():
        flat = block.reshape(-1)
        magnitudes[start:start + flat.numel()].copy_(flat)
        start += flat.numel()
        del block, flat
    threshold, _ = thresholds.select_magnitudes(magnitudes, k)
    above = int(torch.count_nonzero(magnitudes > threshold))  # several times faster than a bool sum
    tied = int(torch.count_nonzero(magnitudes == threshold))
    del magnitudes
    return_freed_memory()
    return Trim(threshold, k - above, tied)


def _batch_entries(budget: int) -> int:
    """Entries per histogram pass: many small tensors are gathered into one call (a 2^16-bin
    histogram per small tensor cost more than the counting), within the budget."""
    return min(1 << 20, max(1024, budget // _SELECT_BYTES))


def _batched(chunks: Iterator[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """``chunks`` flattened and joined into pieces of at least ``size`` entries (the last may be smaller)."""
    pending, count = [], 0
    for chunk in chunks:
        flat = chunk.reshape(-1)
        if not pending and flat.numel() >= size:
            yield flat
            continue
        pending.append(flat)
        count += flat.numel()
        if count >= size:
            yield torch.cat(pending)
            pending, count = [], 0
    if pending:
        yield torch.cat(pending)


def _make_trim(chunks, k: int, n: int, budget: int, wide: bool) -> Trim:
    if k <= 0:
        return Trim(math.inf, 0, 0)
    if k >= n:
        return Trim(-1.0, 0, 0)
    threshold, above, tied = stream_threshold(chunks, k, collect=max(1024, budget // 48), wide=wide)
    return Trim(threshold, k - above, tied)


def _by_name(trim: Trim, names: list[str], deltas: Callable[[str], Iterator[torch.Tensor]]) -> dict[str, Trim]:
    """A global trim as one trim per tensor, its kept ties given to the tensors in sorted name order
    (each keeps its first ones), as in memory: the files may hold the tensors in any order. Ties are
    counted in one more pass over the deltas, only where some but not all of them are kept."""
    if trim.threshold <= 0 or trim.ties_left <= 0 or trim.ties_left >= trim.tied:
        return dict.fromkeys(names, trim)  # all ties kept, or none: any order keeps the same ones
    left, trims = trim.ties_left, {}
    for name in sorted(names):
        count = sum(thresholds.tie_after(d.reshape(-1), trim.threshold, d.numel())[1] for d in deltas(name))
        trims[name] = Trim(trim.threshold, min(count, left), count)
        left -= trims[name].ties_left
    return trims
