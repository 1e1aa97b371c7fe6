"""Compiled CPU kernels through Numba (a dependency of taskarith; the torch path serves where it is missing).

Each kernel does in one loop over memory what the torch path does in several passes (TIES' trim,
election and mean; a bfloat16 delta and its round-trip check; sums, weighted or not; reductions in
float64), for any number of inputs up to :data:`MAX_INPUTS`. Numba brings its own compiler and caches
what it compiles on disk (``torch.compile`` needs a C++ toolchain at run time). The measurements
behind these choices are in docs/design.md.

The kernels compute exactly what the torch path computes, operation for operation and in the same
order, so results never depend on which path ran; the tests compare both bit for bit. Every entry
point here returns None (nothing written) where its kernel does not take the tensors: without
Numba, under ``TASKARITH_BACKEND=torch`` (or ``triton``), off the CPU, not contiguous,
float16/float64, inputs of mixed dtypes. Callers then use their torch path.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from .. import _parallel
from . import _switch

# Inputs of one of these dtypes (all alike), outputs of one of these too.
DTYPES = (torch.float32, torch.bfloat16)

# Inputs of one kernel call. Each count compiles (and caches) a kernel of its own, its steps written
# out input by input, so compile time grows with the count; above this, callers use torch.
MAX_INPUTS = 64


def enabled() -> bool:
    """Whether the Numba kernels are used: Numba imports and the backend switch allows them
    (:mod:`taskarith.backends`)."""
    return _switch.allows("numba") and _kernels() is not None


def usable(out: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> bool:
    """Whether these flat tensors can go through the kernels: CPU, contiguous, outputs of one of
    :data:`DTYPES`, inputs all of one of them."""
    if not inputs or not out:
        return False
    dtype = inputs[0].dtype
    if dtype not in DTYPES or any(t.dtype != dtype for t in inputs) or any(t.dtype not in DTYPES for t in out):
        return False
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in (*out, *inputs)):
        return False
    return enabled()


@functools.cache
def _kernels():
    try:
        from . import _numba_kernels
    except ImportError:
        return None
    return _numba_kernels


def dot64(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """``Σ a·b`` of two flat CPU tensors of one of :data:`DTYPES` (each alike), products and sums in
    float64, in fixed chunks (the same value on any thread count); None if the kernels do not take
    them."""
    sums = _chunked(a, b, gram=False)
    return None if sums is None else math.fsum(sums)


def gram64(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float] | None:
    """``(Σ a·a, Σ b·b, Σ a·b)`` in one pass, each equal to what :func:`dot64` returns for it; None if
    the kernels do not take these tensors."""
    sums = _chunked(a, b, gram=True)
    return None if sums is None else (math.fsum(sums[0]), math.fsum(sums[1]), math.fsum(sums[2]))


def has_nan(x: torch.Tensor) -> bool | None:
    """Whether flat ``x`` (a CPU tensor of one of :data:`DTYPES`) holds a NaN, in one pass at memory
    speed; None if the kernels do not take it."""
    if x.dim() != 1 or not usable([x], [x]):
        return None
    from . import _numba_reduce

    bits = _array(x)
    if bits.dtype == np.float32:
        arrays = [bits.view(np.int32), np.int32(0x7FFFFFFF), np.int32(0x7F800000)]
    else:
        arrays = [bits, np.uint16(0x7FFF), np.uint16(0x7F80)]
    return _failures(_numba_reduce.count_nan, arrays, x.numel()) > 0


def _chunked(a: torch.Tensor, b: torch.Tensor, *, gram: bool) -> np.ndarray | None:
    if a.shape != b.shape or not usable([a], [a, b]):
        return None
    from . import _numba_reduce

    chunks = -(-a.numel() // _numba_reduce.CHUNK)
    partials = np.zeros((3, chunks) if gram else chunks, np.float64)
    xa, xb = _array(a), _array(b)
    size = _numba_reduce.CHUNK

    def share(job: int, lo: int, hi: int) -> None:
        # Threads share out whole chunks: chunk c goes to the share holding its first entry.
        first, last = -(-lo // size), -(-hi // size)
        if gram:
            _numba_reduce.gram_chunks(xa, xb, partials, first, last)
        else:
            _numba_reduce.dot_chunks(xa, xb, partials, first, last, a is b)

    _parallel.run([chunks * size], share)
    return partials


def _elementwise(op: str, stream: bool, count: bool = False):
    """The element-wise kernel of ``op`` (:mod:`taskarith.backends._numba_elementwise`), counting
    NaN results with ``count``; only once :func:`enabled`."""
    from . import _numba_elementwise

    return _numba_elementwise.elementwise(op, stream, count)


@functools.cache
def _selection():
    """The selection kernels (:mod:`taskarith.backends._numba_select`); only once :func:`enabled`."""
    from . import _numba_select

    return _numba_select


def _array(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a CPU tensor (bfloat16 as its uint16 bits)."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def _arrays(inputs: Sequence[torch.Tensor]) -> tuple[np.ndarray, ...]:
    """The kernels' inputs: one tuple of flat arrays, built once per call (the kernel compiled for
    its length and dtype)."""
    return tuple(_array(x) for x in inputs)


def ties_merge(out: torch.Tensor, inputs: Sequence[torch.Tensor],
               slots: Sequence[tuple[int, int, Sequence[float | None], Sequence[tuple[int, float] | None]]],
               weights: Sequence[float], sign: str, scale: float) -> None:
    """TIES' trim → elect → disjoint mean of flat ``inputs`` into flat ``out``, slot by slot:
    ``slots`` lists ``(offset, numel, λs, cuts)`` in offset order, and input ``i``'s entries of
    that slot are trimmed by hardshrink ``λs[i]`` (None: untrimmed), or from ``cuts[i] = (index,
    λ_after)`` on (an index within the slot) by ``λ_after``. Entries outside every slot are left
    alone. One kernel call per thread covers all slots; any number of inputs up to :data:`MAX_INPUTS`."""
    k = len(weights)
    bounds, lam, cut, after, spans = [], [], [], [], []
    for offset, numel, lambdas, cuts in slots:
        lams = [-1.0 if x is None else x for x in lambdas]  # -1: hardshrink zeroes nothing
        cuts = [None if x is None else c for x, c in zip(lambdas, cuts)]  # untrimmed: no cut either
        bounds.append(offset)
        lam.append(lams)
        cut.append([offset + (numel if c is None else c[0]) for c in cuts])
        after.append([lams[i] if c is None else c[1] for i, c in enumerate(cuts)])
        spans.append((offset, offset + numel))
    if not spans:
        return
    bounds.append(spans[-1][1])
    rows = (len(spans), k)  # one row per slot, one column per input
    arguments = (_array(out), _arrays(inputs), np.array(bounds, np.int64), np.array(lam, np.float32).reshape(rows),
                 np.array(cut, np.int64).reshape(rows), np.array(after, np.float32).reshape(rows),
                 np.array(weights, np.float32), np.float32(scale))
    kernel = _kernels().ties(sign == "count")
    # Between slots that do not touch (gaps hold other dtypes' or tied entries), a share runs per slot.
    gapless = all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    if gapless:
        _parallel.run([spans[-1][1] - spans[0][0]], lambda job, lo, hi: kernel(*arguments, spans[0][0] + lo, spans[0][0] + hi))
    else:
        _parallel.run([b - a for a, b in spans], lambda job, lo, hi: kernel(*arguments, spans[job][0] + lo, spans[job][0] + hi))


def running_sum(out: torch.Tensor, inputs: Sequence[torch.Tensor], *, count_nan: bool = False) -> int | None:
    """``out = ((x0 + x1) + x2) + ...``, rounded to the dtype after each addition, for 2 to
    :data:`MAX_INPUTS` flat ``inputs`` of ``out``'s dtype; None (nothing written) if the kernels
    do not take them, else True, or with ``count_nan`` the number of NaN results (counted as they
    are written: no second pass)."""
    k = len(inputs)
    if not 2 <= k <= MAX_INPUTS or any(x.dtype != out.dtype or x.shape != out.shape for x in inputs):
        return None
    stream = _streams(out)
    # One torch kernel adds two float32 arrays in one pass already: this one gains only by streaming
    # (torch's bfloat16 add converts in several steps). Below ELEMENTWISE_FROM entries torch's
    # kernels, on all threads, are as fast as one pass of ours.
    if ((k == 2 and not stream and out.dtype == torch.float32) or out.numel() < ELEMENTWISE_FROM
            or not usable([out], inputs)):
        return None
    return _run_elementwise(_elementwise("sum", stream, count_nan), out, inputs, _ONE, count_nan)


def scale(out: torch.Tensor, x: torch.Tensor, s: float) -> bool | None:
    """``out = x * s`` (flat, one dtype) as ``torch.mul(x, s, out=out)`` computes it for a Python
    number ``s``, with streaming stores; None (nothing written) if the kernels do not take them or
    ``out`` is too small to stream (torch's own kernel is one pass too)."""
    return _streamed("scale", out, [x], s)


def divide(out: torch.Tensor, x: torch.Tensor, s: float) -> bool | None:
    """``out = x / s`` (flat float32) as ``torch.div(x, s, out=out)`` computes it for a Python number
    ``s`` exact in float32, with streaming stores; None (nothing written) where :func:`scale` gives
    None, or for bfloat16 (whose torch kernel divides in other steps)."""
    return None if x.dtype != torch.float32 else _streamed("quotient", out, [x], s)


def subtract(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool | None:
    """``out = a - b`` (flat, one dtype) as ``torch.sub(a, b, out=out)``, with streaming stores; None
    (nothing written) where :func:`scale` gives None."""
    return None if b.shape != a.shape or b.dtype != a.dtype else _streamed("difference", out, [a, b], 1.0)


def _streamed(op: str, out: torch.Tensor, inputs: Sequence[torch.Tensor], s: float) -> bool | None:
    x = inputs[0]
    if x.dtype != out.dtype or x.shape != out.shape or not _streams(out) or not usable([out], inputs):
        return None
    with np.errstate(over="ignore"):  # a factor beyond float32 becomes inf, as in torch
        factor = np.array([s], np.float32)
    return _run_elementwise(_elementwise(op, True), out, inputs, factor)


def _run_elementwise(kernel, out: torch.Tensor, inputs: Sequence[torch.Tensor], s: np.ndarray,
                     count_nan: bool = False, *, wide: bool = False) -> int | bool:
    """Runs ``kernel`` over ``out`` on the threads; True, or with ``count_nan`` the number of NaN results."""
    target, xs = _array(out), _arrays(inputs)
    like = np.empty(1, np.float32) if wide else target
    counts: list[int] = []
    _parallel.run([out.numel()], lambda job, lo, hi: counts.append(kernel(target, xs, s, lo, hi, like)))
    return sum(counts) if count_nan else True


def wide_sum(out: torch.Tensor, inputs: Sequence[torch.Tensor], *, count_nan: bool = False) -> int | None:
    """``out = ((x0 + x1) + x2) + ...`` summed in float32 and rounded once into ``out`` (flat, same
    length; half-precision inputs widen exactly), as a float32 sum copied into ``out`` computes it,
    in one pass; None (nothing written) if the kernels do not take them, else as :func:`running_sum`."""
    if not 2 <= len(inputs) <= MAX_INPUTS or any(x.shape != out.shape for x in inputs) or not usable([out], inputs):
        return None
    return _run_elementwise(_elementwise("sum", _streams(out), count_nan), out, inputs, _ONE, count_nan, wide=True)


def weighted_sum(out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float], *,
                 count_nan: bool = False) -> int | None:
    """``out = x0 * w0``, then ``out += w_i * x_i`` for each further input, in float32 and rounded once
    into ``out`` (half-precision inputs widen exactly), as ``torch.mul`` then ``Tensor.add_(x,
    alpha=w)`` on float32 compute it: products rounded or fused as this torch build does
    (:func:`torch_fuses_alpha`). None (nothing written) where that is unsettled, for weights float32
    cannot hold as normal numbers or zero, or where the kernels do not take these tensors; else as
    :func:`running_sum`."""
    k = len(inputs)
    fused = torch_fuses_alpha()
    if (fused is None or not 2 <= k <= MAX_INPUTS or len(weights) != k or out.numel() < ELEMENTWISE_FROM
            or any(x.shape != out.shape for x in inputs) or not usable([out], inputs)):
        return None
    with np.errstate(over="ignore", under="ignore"):
        ws = np.array(weights, np.float32)
    tiny = np.finfo(np.float32).tiny
    if not np.isfinite(ws).all() or any(w != 0 and abs(w) < tiny for w in weights):
        return None
    wide = out.dtype != torch.float32 or inputs[0].dtype != torch.float32
    kernel = _elementwise("weighted_fused" if fused else "weighted", _streams(out), count_nan)
    return _run_elementwise(kernel, out, inputs, ws, count_nan, wide=wide)


@functools.cache
def torch_fuses_alpha() -> bool | None:
    """Whether this torch build computes ``x.add_(y, alpha=w)`` on float32 as one fused multiply-add
    (True) or rounds ``w * y`` first (False), the same in its vectorised loops and their tails; None
    when it mixes them. (Builds differ: the result of a weighted sum depends on it.)"""
    w = float(np.float32(1 / 3))  # w * 3 rounds to 1 in float32, so the unfused sum is 0
    probe = torch.full((1031,), -1.0)  # a vectorised body and a scalar tail
    probe.add_(torch.full((1031,), 3.0), alpha=w)
    fused_value = float(np.float32(np.float64(np.float32(w)) * 3.0 - 1.0))
    if bool((probe == fused_value).all()):
        return True
    return False if bool((probe == 0.0).all()) else None


_ONE = np.ones(1, np.float32)

# 1M float32 entries: torch 27-42 GB/s on two threads, one pass of ours on one thread 22-23 GB/s.
ELEMENTWISE_FROM = 2 * _parallel.MIN_SHARE

# Outputs from this size on are written with non-temporal stores, which do not read each cache line
# in before overwriting it: out-of-place ops on 100M float32 entries ran at 39 GB/s instead of 25 on
# the 2-core VM of ``benchmarks/``. Smaller outputs may still be in cache when they are next read,
# which such stores would forgo.
STREAM_FROM = 64 << 20


def _streams(out: torch.Tensor) -> bool:
    # Element-aligned, so that whole elements lead up to the first cache-line boundary.
    return out.numel() * out.element_size() >= STREAM_FROM and out.data_ptr() % out.element_size() == 0


def pack_magnitudes(x: np.ndarray, lo: int, out: np.ndarray) -> int:
    """Packs the magnitudes of float32 ``x`` that are at least the magnitude whose bits are ``lo``,
    as int32 bits and in order, into ``out[:m]``; returns ``m``. ``out``: int32, as long as ``x``."""
    kernel = _selection().pack_magnitudes(_wide_stores())
    return int(kernel(x.view(np.int32), np.int32(lo), out))


def bracket_scan(x: np.ndarray, lo: int, hi: int, out: np.ndarray, start: int, stop: int) -> tuple[int, int, int, bool]:
    """Over float32 ``x[start:stop]``: how many magnitudes exceed the one whose bits are ``hi``, how
    many entries are NaN, and how many magnitudes in ``[lo, hi]`` (as bits) were packed in order into
    int32 ``out``, and whether all of them were (False: ``out`` ran out of room)."""
    kernel = _selection().bracket_scan(_wide_stores())
    above, nan, packed, complete = kernel(x.view(np.int32), np.int32(lo), np.int32(hi), out, start, stop)
    return int(above), int(nan), int(packed), bool(complete)


@functools.cache
def _wide_stores() -> bool:
    """Whether the packing kernels use AVX-512 compressing stores: where this CPU has them."""
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get("avx512f"))


def _failures(kernel, arrays: Sequence, n: int) -> int:
    """``kernel(*arrays, lo, hi)`` over ``[0, n)`` on the threads, its returned counts summed."""
    counts: list[int] = []
    _parallel.run([n], lambda job, lo, hi: counts.append(kernel(*arrays, lo, hi)))
    return sum(counts)


def _pair_usable(finetuned: torch.Tensor, pretrained: torch.Tensor, out: torch.Tensor | None = None) -> bool:
    """Whether a bfloat16 pair (and a float32 ``out`` of its shape) can go through the kernels."""
    outputs = [] if out is None else [out]
    return (finetuned.dtype == torch.bfloat16 and all(o.dtype == torch.float32 for o in outputs)
            and all(t.shape == finetuned.shape for t in (pretrained, *outputs))
            and usable(outputs or [finetuned], [finetuned, pretrained]))


def subtract_checked(out: torch.Tensor, finetuned: torch.Tensor, pretrained: torch.Tensor) -> bool | None:
    """``out = finetuned - pretrained`` (bfloat16 pair, float32 ``out``) and whether ``pretrained +
    out == finetuned`` holds in float32 for every entry, in one pass; None if the kernel does not
    take these tensors. False means *unsettled*: the caller runs its exact check."""
    if not _pair_usable(finetuned, pretrained, out):
        return None
    arrays = [_array(out), _array(finetuned), _array(pretrained)]
    return not _failures(_kernels().subtract_checked, arrays, out.numel())


def delta_fits(finetuned: torch.Tensor, pretrained: torch.Tensor) -> bool | None:
    """Whether ``pretrained + (finetuned - pretrained) == finetuned`` in float32 for every entry of a
    bfloat16 pair, without storing the delta; None if the kernel does not take these tensors."""
    if not _pair_usable(finetuned, pretrained):
        return None
    return not _failures(_kernels().delta_fails, [_array(finetuned), _array(pretrained)], finetuned.numel())


def add_deltas(out: torch.Tensor, base: torch.Tensor, finetuned: Sequence[torch.Tensor], *, checked: bool) -> bool | None:
    """``out = base + Σ (finetuned_i - base)`` (flat, same length): float32 deltas summed in order,
    rounded once into ``out``. With ``checked``, False when some half-precision delta's float32
    sum check fails (the caller's exact check then decides); None if the kernel does not take
    these tensors, or more than :data:`MAX_INPUTS` (then ``out`` is untouched)."""
    if not finetuned or len(finetuned) > MAX_INPUTS or not usable([out], [base, *finetuned]):
        return None
    checked = checked and base.dtype != torch.float32  # float32 deltas are never checked
    arrays = [_array(out), _array(base), _arrays(finetuned)]
    return not _failures(_kernels().add_deltas(checked), arrays, out.numel())


def nth_tie(values: torch.Tensor, threshold: float, n: int, *, backward: bool) -> tuple[int | None, int] | None:
    """In flat ``values``, the index of the ``n``-th entry of magnitude ``threshold`` (counting from
    the end with ``backward``) and ``n``, or ``(None, count)`` when only ``count < n`` entries tie;
    None if the kernel does not take ``values``."""
    if not (values.dtype in DTYPES and values.device.type == "cpu" and values.is_contiguous() and enabled()):
        return None
    if float(np.float32(threshold)) != threshold:  # no float32 (or bfloat16) entry equals it
        return None, 0
    index, count = _selection().nth_tie(_array(values), np.float32(threshold), n, backward)
    return (None if index < 0 else int(index)), int(count)


def prime() -> None:
    """Load Numba and its compiler runtime now (about 30 MB of private memory, once per process), so
    that a budgeted merge counts its data against the budget from after that, not the runtime."""
    if enabled():
        _selection().nth_tie(np.zeros(1, np.float32), np.float32(1.0), 1, False)


def add_to_bases(out: torch.Tensor, deltas: torch.Tensor, bases: Sequence[torch.Tensor]) -> bool | None:
    """``out = cat(bases) + deltas`` (flat ``out`` and ``deltas``; ``bases`` in order, each contiguous,
    of ``out``'s dtype, together as long) computed in float32 and rounded once into ``out``, without
    gathering the bases: one pass; None (nothing written) if the kernels do not take them."""
    if deltas.shape != out.shape or not bases or not usable([out], [deltas]) or not usable([out], bases):
        return None
    if bases[0].dtype != out.dtype:
        return None
    offsets = np.zeros(len(bases) + 1, np.int64)
    np.cumsum([b.numel() for b in bases], out=offsets[1:])
    if offsets[-1] != out.numel():
        return None
    addresses = np.array([b.data_ptr() for b in bases], np.int64)
    from . import _numba_scatter

    target, source = _array(out), _array(deltas)
    _parallel.run([out.numel()], lambda job, lo, hi: _numba_scatter.add_to_bases(target, source, addresses, offsets, lo, hi))
    return True
