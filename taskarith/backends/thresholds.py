"""Thresholds over many tensors and the ties at them: bracketed and segmented selections, tie cuts.

Ties at a threshold are broken by position: the entries with the lowest index are kept, so exactly
k entries survive on every run and every device.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import numpy as np
import torch

from .. import _parallel
from ..errors import NonFiniteError, TaskArithError
from . import _numba
from .kernels import (
    _BITS,
    _INF_BITS,
    _NAN,
    _NUMPY_SELECT,
    _sampled_magnitudes,
    _select,
    _select_magnitude_array,
    has_nan,
)

__all__ = ["bracket_select", "check_no_nan", "row_thresholds", "segment_thresholds", "select_magnitudes",
           "tie_after", "tie_cut", "trim_threshold"]


def trim_threshold(
    values: torch.Tensor, k: int, *, scratch: torch.Tensor | None = None,
) -> tuple[float, int | None]:
    """How to keep exactly the ``k`` largest magnitudes of a 1-D tensor.

    Returns the k-th largest magnitude ``t`` (keep ``|x| >= t``) and, when more
    than ``k`` entries reach ``t``, the *tie cut*: the index from which entries
    with ``|x| == t`` are dropped too (ties go to the lowest indices), else
    None. ``k = 0`` gives ``t = inf``. ``scratch`` (1-D, at least as long as
    ``values``) holds the magnitudes, saving an allocation per call. Raises
    :class:`NonFiniteError` if ``values`` holds NaN.

    Example:
        >>> trim_threshold(torch.tensor([1.0, -2.0, 2.0, 0.5]), 1)
        (2.0, 2)
    """
    n = values.numel()
    if 0 < k < n and values.device.type == "cpu" and values.dtype in _NUMPY_SELECT and (
            scratch is None or scratch.dtype == values.dtype):
        # numpy calls only: they release the GIL, so that several tensors are selected on several
        # threads at once (torch calls there start an OpenMP team per thread: no faster than one).
        x = values.detach().reshape(-1).numpy()
        out = None if scratch is None else scratch.detach().reshape(-1)[: x.size].numpy()
        found = _prefiltered_select(x, k, out)
        threshold, excess = found if found is not None else _select_magnitude_array(np.abs(x, out=out), k)
    else:
        magnitudes = values.abs() if scratch is None else torch.abs(values, out=scratch[:n])
        threshold, excess = select_magnitudes(magnitudes, k)  # our own copy: reordered freely
    if not excess or threshold == 0:  # dropping tied zeros changes nothing
        return threshold, None
    _, cut = tie_cut([values], threshold, excess)
    return threshold, cut


# A float32 selection from this many entries on, with the compiled kernels, first packs the entries
# that can be among the k largest: those at least a floor read off a sample, a little below the
# sample's k-th largest. Only about a quarter of the entries (density 0.2) are then partitioned, and
# no separate pass forms the magnitudes.
_PREFILTER_FROM = 1 << 16
_PREFILTER_SAMPLE = 1024
_PREFILTER_MARGIN = 16  # sample positions the floor lies below four standard deviations under the rank
_PREFILTER_MAX_KEPT = 0.5  # a floor expected to keep more than this share: no gain, select as usual


def _prefiltered_select(x: np.ndarray, k: int, scratch: np.ndarray | None) -> tuple[float, int] | None:
    """:func:`select_magnitudes` of ``|x|`` for a float32 array, through the entries at least a
    sampled floor; None where that does not apply or the floor turns out above the k-th largest
    (then fewer than k entries pass it: select as usual)."""
    n = x.size
    if x.dtype != np.float32 or n < _PREFILTER_FROM or not _numba.enabled():
        return None
    ns = _PREFILTER_SAMPLE
    sample = _sampled_magnitudes([x], ns)
    p = k / n
    at = math.floor(ns * (1 - p) - 4 * math.sqrt(ns * p * (1 - p)) - _PREFILTER_MARGIN)
    if not 0 < at < ns or 1 - at / ns > _PREFILTER_MAX_KEPT:
        return None
    out = np.empty(n, np.int32) if scratch is None else scratch.view(np.int32)
    kept = _numba.pack_magnitudes(x, int(sample[at]), out)
    if kept < k:
        return None
    return _select_magnitude_array(out[:kept].view(np.float32), k)




def tie_cut(parts: list[torch.Tensor], threshold: float, excess: int) -> tuple[int, int]:
    """Where the last ``excess`` entries with magnitude ``threshold`` begin, over the concatenation of
    the flat tensors ``parts``: ``(part, index in that part)``.

    Counts backwards from the end, so that it stops as soon as it has seen
    ``excess`` ties. A part whose dtype cannot hold ``threshold`` has no ties.

    Example:
        >>> tie_cut([torch.tensor([2.0, 1.0]), torch.tensor([-2.0, 2.0])], 2.0, 2)
        (1, 0)
    """
    remaining = excess
    for p in range(len(parts) - 1, -1, -1):
        found = _numba.nth_tie(parts[p].reshape(-1), threshold, remaining, backward=True)
        if found is not None:
            index, count = found
            if index is not None:
                return p, index
            remaining -= count
            continue
        for start, tied, count in _tied_blocks(parts[p].reshape(-1), threshold):
            if count >= remaining:
                return p, start + int(torch.nonzero(tied).squeeze(1)[count - remaining])
            remaining -= count
    raise TaskArithError(f"internal: fewer than {excess} entries tie at the threshold {threshold!r}")


def tie_after(values: torch.Tensor, threshold: float, kept: int) -> tuple[int | None, int]:
    """Where the tie after the first ``kept`` ones stands in flat ``values`` (ties: entries of magnitude
    ``threshold``), scanning forward and stopping there: ``(index, kept)``, or ``(None, count)``
    when there are only ``count <= kept`` ties.

    Example:
        >>> tie_after(torch.tensor([2.0, 1.0, -2.0, 2.0]), 2.0, 1)
        (2, 1)
        >>> tie_after(torch.tensor([2.0, 1.0]), 2.0, 1)
        (None, 1)
    """
    found = _numba.nth_tie(values.reshape(-1), threshold, kept + 1, backward=False)
    if found is not None:
        index, count = found
        return (index, kept) if index is not None else (None, count)
    seen = 0
    for start, tied, count in _tied_blocks(values.reshape(-1), threshold, forward=True):
        if seen + count > kept:
            return start + int(torch.nonzero(tied).squeeze(1)[kept - seen]), kept
        seen += count
    return None, seen


_TIE_BLOCK = 1 << 18  # entries per step of a tie count on the CPU: its temporaries stay in cache


def _tied_blocks(values: torch.Tensor, threshold: float, *, forward: bool = False) -> Iterator[tuple[int, torch.Tensor, int]]:
    """From the end of flat ``values`` backwards (or from the start with ``forward``): ``(start, mask
    of |x| == threshold, its count)`` per block (one block on accelerators, where each step would
    synchronise)."""
    n = values.numel()
    if n == 0 or float(values.new_tensor(threshold).item()) != threshold:
        return
    width = n if values.device.type != "cpu" else min(n, _TIE_BLOCK)
    magnitude = torch.empty(width, dtype=values.dtype, device=values.device)
    equal = torch.empty(width, dtype=torch.bool, device=values.device)
    starts = range(0, n, width) if forward else range(((n - 1) // width) * width, -1, -width)
    for start in starts:
        stop = min(start + width, n)
        tied = torch.eq(torch.abs(values[start:stop], out=magnitude[: stop - start]), threshold,
                        out=equal[: stop - start])
        yield start, tied, int(torch.count_nonzero(tied))  # several times faster than a bool sum


# Bracketed selection over many float32 tensors at once (a global-scope trim): a sample of this many
# magnitudes (at _spread_positions) brackets the k-th largest; one pass then counts the entries above
# the bracket and gathers those inside it (about 1% of them), and only those are partitioned: no copy
# of every magnitude, no partition of all of them.
_BRACKET_SAMPLE = 1 << 16
_BRACKET_CHUNK = 1 << 18  # entries per step of the pass: its temporaries stay in cache
_BRACKET_MAX_FRACTION = 1 / 8  # a wider bracket (density near 0 or 1, a tiny vector): select as usual
_BRACKET_MARGIN = 16  # sample positions added on each side of four standard deviations
_BRACKET_ROOM = 1024  # entries of packing room beyond twice a share's expected bracket entries


def bracket_select(parts: list[torch.Tensor], k: int) -> tuple[float, int] | None:
    """:func:`select_magnitudes` of ``|x|`` over the concatenation of flat float32 CPU tensors ``parts``,
    without a copy of all magnitudes: ``(threshold, excess)``, or None where the sample's bracket
    misses the k-th largest or would hold too many entries (select the usual way then). Raises
    :class:`NonFiniteError` if any entry is NaN.

    Example:
        >>> bracket_select([torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.5])], 1) is None  # too small
        True
    """
    sizes = [p.numel() for p in parts]
    total = sum(sizes)
    if not 0 < k < total:
        return None
    sample = _sampled_magnitudes([p.detach().numpy() for p in parts], _BRACKET_SAMPLE)
    ns = sample.size
    spread = 4 * math.sqrt(ns * (k / total) * (1 - k / total)) + _BRACKET_MARGIN
    rank = ns - k * ns / total  # where the k-th largest sits among the sorted sample
    lo_at, hi_at = math.floor(rank - spread), math.ceil(rank + spread)
    if (min(hi_at, ns) - max(lo_at, 0)) / ns > _BRACKET_MAX_FRACTION:
        return None
    inf = _INF_BITS[np.dtype(np.float32)]
    lo = int(sample[lo_at]) if lo_at > 0 else 0
    hi = int(sample[hi_at]) if hi_at < ns else inf
    found: list[tuple[int, bool, np.ndarray | None]] = []
    scratch: dict[int, np.ndarray] = {}
    share = (min(hi_at, ns) - max(lo_at, 0)) / ns  # of the entries, expected in the bracket

    def scan(job: int, start: int, stop: int) -> None:
        x = parts[job].detach().numpy()
        if _numba.enabled():  # one compiled pass: counts, and the bracket's entries packed
            # Room for twice the expected share; a bracket holding more declines (None below).
            out = np.empty(math.ceil(2 * share * (stop - start)) + _BRACKET_ROOM, np.int32)
            above, nans, packed, complete = _numba.bracket_scan(x, lo, hi, out, start, stop)
            found.append((above, nans > 0, out[:packed] if complete else None))
            return
        buf = scratch.setdefault(threading.get_ident(), np.empty(_BRACKET_CHUNK, np.float32))
        above, nan, kept = 0, False, []
        for a in range(start, stop, _BRACKET_CHUNK):
            m = min(stop, a + _BRACKET_CHUNK) - a
            bits = np.abs(x[a:a + m], out=buf[:m]).view(np.int32)
            nan = nan or int(bits.max()) > inf  # NaN's bit patterns exceed every number's
            above += int(np.count_nonzero(bits > hi))
            kept.append(bits[(bits >= lo) & (bits <= hi)])  # a copy: the buffer is reused
        found.append((above, nan, np.concatenate(kept) if kept else np.empty(0, np.int32)))

    _parallel.run(sizes, scan)
    if any(nan for _, nan, _ in found):
        raise NonFiniteError(_NAN)
    if any(c is None for _, _, c in found):
        return None
    above = sum(a for a, _, _ in found)
    candidates = np.concatenate([c for _, _, c in found])
    need = k - above  # the k-th largest is the need-th largest candidate, if the bracket holds it
    if not 0 < need <= candidates.size:
        return None
    cut = candidates.size - need
    candidates.partition(cut)
    threshold = candidates[cut]
    excess = above + int(np.count_nonzero(candidates >= threshold)) - k
    return float(threshold.view(np.float32)), excess


def select_magnitudes(magnitudes: torch.Tensor, k: int) -> tuple[float, int]:
    """The k-th largest of non-negative ``magnitudes`` (reordered in place) and how many more
    entries than k reach it; ``(inf, 0)`` for k <= 0 and ``(0.0, 0)`` for k >= n. Raises
    :class:`NonFiniteError` if any is NaN.

    Example:
        >>> select_magnitudes(torch.tensor([1.0, 2.0, 2.0, 0.5]), 1)
        (2.0, 1)
    """
    n = magnitudes.numel()
    on_numpy = magnitudes.device.type == "cpu" and magnitudes.dtype in _NUMPY_SELECT
    if not 0 < k < n or not on_numpy:
        check_no_nan(magnitudes)
    if k <= 0:
        return math.inf, 0
    if k >= n:
        return 0.0, 0
    threshold, excess = _select(magnitudes, k, inplace=True, magnitudes=True)  # on numpy: refuses NaN
    return float(threshold), excess


def segment_thresholds(flat: torch.Tensor, sizes: list[int], ks: list[int]) -> list[tuple[float, int]]:
    """For consecutive segments of a float32 tensor, each one's k-th largest magnitude and how many
    entries past k tie with it: ``[(threshold, excess), ...]``, as :func:`trim_threshold` would give.

    One sort of ``(segment, |x| bits)`` keys serves every segment, instead of one selection and one
    device synchronisation per tensor (on a GPU, 900 small selections cost more than the merge).

    Example:
        >>> segment_thresholds(torch.tensor([3.0, -1.0, 2.0, 5.0, 5.0]), [3, 2], [2, 1])
        [(2.0, 0), (5.0, 1)]
    """
    out: list[tuple[float, int]] = []
    device = flat.device
    start, group = 0, []
    groups = []
    # Groups bound the sort's memory (16 bytes per entry while keys are built): ~2^27 entries on an
    # accelerator, 2^24 (256 MB) on the CPU, where smaller sorts are also faster.
    limit = 1 << (24 if device.type == "cpu" else 27)
    grouped = 0
    for size, k in zip(sizes, ks):
        group.append((start, size, k))
        start += size
        grouped += size
        if grouped >= limit:
            groups.append(group)
            group, grouped = [], 0
    if group:
        groups.append(group)
    for group in groups:
        lo, hi = group[0][0], group[-1][0] + group[-1][1]
        size_t = torch.tensor([g[1] for g in group], device=device)
        k_t = torch.tensor([g[2] for g in group], device=device).clamp(1, None).minimum(size_t.clamp(1, None))
        segment = torch.repeat_interleave(torch.arange(len(group), device=device), size_t)
        # |x| >= 0, so its float32 bit pattern orders like the value; the segment goes in the high bits.
        keys = (segment << 32) | flat[lo:hi].abs().view(torch.int32).to(torch.int64)
        del segment
        if keys.device.type == "cpu":
            keys.numpy().sort()  # numpy's SIMD sort, in place; torch's CPU sort ran several times slower
        else:
            keys = torch.sort(keys).values
        ends = torch.cumsum(size_t, 0)
        picked = keys[(ends - k_t).clamp(0, max(keys.numel() - 1, 0))] if keys.numel() else ends
        first_at_or_above = torch.searchsorted(keys, picked)
        excess = (ends - first_at_or_above - k_t).tolist()
        bits = (picked & 0xFFFFFFFF).to(torch.int32).view(torch.float32).tolist()
        for (_, size, k), threshold, extra in zip(group, bits, excess):
            if k <= 0:
                out.append((math.inf, 0))
            elif k >= size:
                out.append((0.0, 0))
            else:
                out.append((threshold, extra))
    return out


def row_thresholds(rows: torch.Tensor, k: int) -> list[tuple[float, int]]:
    """For each row of a 2-D CPU tensor, its k-th largest magnitude and how many entries past k tie with
    it: ``[(threshold, excess), ...]``, as :func:`trim_threshold` would give row by row, from one
    numpy partition along the rows (many equal-sized small tensors: LoRA factors).

    Example:
        >>> row_thresholds(torch.tensor([[3.0, -1.0, 2.0], [5.0, -5.0, 1.0]]), 1)
        [(3.0, 0), (5.0, 1)]
    """
    count, n = rows.shape
    if k <= 0 or k >= n:
        check_no_nan(rows)
        return [(math.inf, 0) if k <= 0 else (0.0, 0)] * count
    magnitudes = rows.abs()
    bits = magnitudes.numpy().view(_BITS[magnitudes.dtype])
    bits.partition(n - k, axis=1)
    top = magnitudes[:, n - k:]
    if math.isnan(float(top.max())):  # NaN's bit patterns exceed every number's: among the k largest
        raise NonFiniteError(_NAN)
    thresholds = bits[:, n - k]
    lower = bits[:, : n - k]
    # Ties below the k-th largest are rare in real deltas: a row's maximum settles it for most rows,
    # far cheaper than a compare-and-count over every row.
    excess = np.zeros(count, np.int64)
    tied = np.flatnonzero(lower.max(axis=1) == thresholds)
    if tied.size:
        excess[tied] = np.count_nonzero(lower[tied] == thresholds[tied, None], axis=1)
    return list(zip(magnitudes[:, n - k].tolist(), excess.tolist()))


def check_no_nan(values: torch.Tensor) -> None:
    """Raise if ``values`` holds a NaN (one fast reduction; the exact scan only when it is NaN)."""
    if has_nan(values):
        raise NonFiniteError(_NAN)


