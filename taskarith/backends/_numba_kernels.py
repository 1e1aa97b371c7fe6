"""The Numba kernels behind :mod:`taskarith.backends._numba` (imported only when a kernel is needed).

Each kernel is one loop over its entries doing every step of an operation per
entry, for every input at once. bfloat16 arrays arrive as their ``uint16``
bits: widening is a shift, narrowing a round to nearest even, both exact.

The inputs of a kernel arrive as one tuple of arrays, and the steps per input
are written out input by input (:func:`_unrolled`) for the tuple's length, which
Numba knows when it compiles: each number of inputs compiles (and caches) a
kernel of its own, whose loop LLVM vectorises like one written for that number
by hand (TIES at 3 and 4 inputs ran as fast as the kernels of four fixed input
slots before). A loop over the tuple (``for i in range(len(xs))``) vectorised
only while LLVM chose to unroll it: TIES ran at 0.3 ns per entry and input up
to 8 inputs, at 6 ns at 16. The written-out steps are helpers that LLVM must
inline (``forceinline``): inlined by Numba instead, compiling took 4-6 s at 16
inputs (~1.7 s so); left to LLVM's judgement, they were called at 16 inputs
(~3 ns per entry and input).

Loops index arrays with unsigned positions (``np.uint64``), or run over slices
``x[start:stop]`` from index 0, never with a signed ``range(start, stop)``
index into whole arrays: an index LLVM cannot prove non-negative keeps Numba's
negative-index wraparound, and the vectorised loop then gathers and scatters
(TIES 2.3 -> 1.3 ns per entry, bfloat16 task arithmetic 3.0 -> 1.4).
"""

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload


@intrinsic
def _as_float32(typingctx, bits):
    """The float32 whose IEEE bits are the uint32 ``bits``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of(typingctx, value):
    """The IEEE bits of the float32 ``value``, as a uint32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


def _load(x, j):
    """``x[j]`` as a float32 (``x``: float32, or bfloat16 bits as uint16)."""


@overload(_load, inline="always")
def _load_impl(x, j):
    if x.dtype == types.uint16:
        return lambda x, j: _as_float32(np.uint32(x[j]) << np.uint32(16))
    return lambda x, j: x[j]


def _put(out, j, value):
    """``out[j] = value`` rounded to ``out``'s dtype (float32, or bfloat16 bits as uint16)."""


@overload(_put, inline="always")
def _put_impl(out, j, value):
    if out.dtype == types.uint16:
        def store_bits(out, j, value):
            out[j] = np.uint16(_bfloat16_bits(value))
        return store_bits

    def store(out, j, value):
        out[j] = value
    return store


def _bfloat16_bits(value):
    """The bits of float32 ``value`` rounded to bfloat16 (in the low half of a uint32)."""


# An overload, so that Numba inlines it into the other overloads: as an njit function it was either
# called (not inlined: bfloat16 sums 3.5x slower) or, with inline="always", warned of its own IR.
@overload(_bfloat16_bits, inline="always")
def _bfloat16_bits_impl(value):
    return _round_bits


def _round_bits(value):
    b = _bits_of(value)
    # Round to nearest, ties to even, on the bits, as torch rounds; NaN becomes torch's 0x7FC0.
    rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.uint32(0x7FC0) if nan else rounded


def _rounded(like, value):
    """float32 ``value`` rounded to the dtype of array ``like`` (float32, or bfloat16 bits), as a float32."""


@overload(_rounded, inline="always")
def _rounded_impl(like, value):
    if like.dtype == types.uint16:
        return lambda like, value: _as_float32(_bfloat16_bits(value) << np.uint32(16))
    return lambda like, value: value


def _unrolled(parameters: str, lines: list[str], result: str, scope: dict | None = None):
    """The function ``def unrolled(parameters): lines; return result`` (Python source): the body of
    an overload, whose lines repeat one step per input of a tuple, with constant indices; the names
    it uses are those of ``scope`` (default: this module's globals)."""
    source = f"def unrolled({parameters}):\n" + "".join(f"    {line}\n" for line in lines) + f"    return {result}\n"
    namespace: dict = {}
    exec(source, globals() if scope is None else scope, namespace)  # noqa: S102  (our own source)
    return namespace["unrolled"]


def _tuple(items: list[str]) -> str:
    """The source of a tuple of ``items``, joined from displays of up to 16: Python builds longer
    displays through a list, which Numba does not compile."""
    parts = ["(" + "".join(f"{item}, " for item in items[i:i + 16]) + ")" for i in range(0, len(items), 16)]
    return " + ".join(parts) or "()"


# LLVM inlines these whatever their size, so that the loop calling them vectorises.
_UNROLLED = {"jit_options": {"forceinline": True}}


def _items(row, like):
    """``(row[0], ..., row[k - 1])`` for a tuple ``like`` of ``k`` items."""


@overload(_items, **_UNROLLED)
def _items_impl(row, like):
    return _unrolled("row, like", [], _tuple([f"row[{i}]" for i in range(len(like))]))


def _running_sum(like, xs, at):
    """``((x0 + x1) + x2) + ...`` at position ``at``, each partial sum rounded to ``like``'s dtype."""


@overload(_running_sum, **_UNROLLED)
def _running_sum_impl(like, xs, at):
    lines = ["value = _load(xs[0], at)"]
    for i in range(1, len(xs)):
        lines.append(f"value = {'value' if i == 1 else '_rounded(like, value)'} + _load(xs[{i}], at)")
    return _unrolled("like, xs, at", lines, "value")


def _trims(xs, lams, ws, at):
    """``(t_0, ..., t_k-1)``: entry ``at`` of each input trimmed by its λ and weighted."""


@overload(_trims, **_UNROLLED)
def _trims_impl(xs, lams, ws, at):
    items = [f"_trimmed(_load(xs[{i}], at), lams[{i}], ws[{i}])" for i in range(len(xs))]
    return _unrolled("xs, lams, ws, at", [], _tuple(items))


def _sign_sum(ts):
    """``Σ t_i`` in float64, in order."""


@overload(_sign_sum, **_UNROLLED)
def _sign_sum_impl(ts):
    return _unrolled("ts", ["total = np.float64(ts[0])", *(f"total += np.float64(ts[{i}])" for i in range(1, len(ts)))],
                     "total")


def _sign_votes(ts):
    """``#{t_i > 0} - #{t_i < 0}`` as a float32, counted in order."""


@overload(_sign_votes, **_UNROLLED)
def _sign_votes_impl(ts):
    return _unrolled("ts", ["votes = _vote(ts[0])", *(f"votes += _vote(ts[{i}])" for i in range(1, len(ts)))], "votes")


def _agreeing(ts, e):
    """The sum of the ``t_i`` of sign ``e`` (as magnitudes) and how many there are, in order."""


@overload(_agreeing, **_UNROLLED)
def _agreeing_impl(ts, e):
    lines = ["one, zero = np.float32(1.0), np.float32(0.0)"]
    for i in range(len(ts)):
        first = i == 0
        lines += [f"a = _agree(ts[{i}], e)", "kept = a" if first else "kept += a",
                  ("count = " if first else "count += ") + "one if a > 0 else zero"]
    return _unrolled("ts, e", lines, "kept, count")


def _lambdas(lam, cut, after, at, like):
    """Each input's λ at position ``at``: ``lam[i]`` before its cut ``cut[i]``, ``after[i]`` from it on."""


@overload(_lambdas, **_UNROLLED)
def _lambdas_impl(lam, cut, after, at, like):
    items = [f"lam[{i}] if at < cut[{i}] else after[{i}]" for i in range(len(like))]
    return _unrolled("lam, cut, after, at, like", [], _tuple(items))


def _delta_sum(fs, at, b):
    """``Σ (f_i - b)`` at position ``at`` in float32, in order, and how many ``b + (f_i - b)`` miss ``f_i``."""


@overload(_delta_sum, **_UNROLLED)
def _delta_sum_impl(fs, at, b):
    lines = ["total, bad = _delta(fs[0], at, b)"]
    for i in range(1, len(fs)):
        lines += [f"d, more = _delta(fs[{i}], at, b)", "total += d", "bad += more"]
    return _unrolled("fs, at, b", lines, "total, bad")


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _trimmed(v, lam, w):
    return (np.float32(0.0) if abs(v) <= lam else v) * w  # hardshrink (NaN passes), weighted


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _agree(t, e):
    p = t * e
    return np.float32(0.0) if p < 0 else p  # clamp_min(0): -0.0 and NaN pass, as in torch


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _vote(t):
    return np.float32((t > 0) - (t < 0))


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _ties_span(out, xs, lams, ws, scale, start, stop, by_count):
    """TIES over ``[start, stop)`` with one λ per input (the body of :func:`ties`)."""
    one = np.float32(1.0)
    for j in range(start, stop):
        at = np.uint64(j)
        ts = _trims(xs, lams, ws, at)
        positive = _sign_votes(ts) >= 0 if by_count else _sign_sum(ts) >= 0
        e = one if positive else -one
        kept, count = _agreeing(ts, e)
        _put(out, at, (kept * e) / max(count, one) * scale)


@functools.cache
def ties(by_count: bool):
    """The kernel merging the tuple of arrays ``xs``, sign elected by count or by sum:
    ``kernel(out, xs, bounds, lam, cut, after, weight, scale, start, stop)`` writes TIES' trim →
    elect → disjoint mean of ``xs`` into ``out[start:stop]``.

    The arrays hold consecutive slots (tensors), slot ``s`` at ``[bounds[s], bounds[s + 1])`` with
    its own row of ``lam``, ``cut`` and ``after`` (``[slots, len(xs)]``): entry ``j`` of input
    ``i`` is zeroed where ``-λ <= x <= λ`` (hardshrink), with ``λ = lam[s, i]`` before index
    ``cut[s, i]`` and ``after[s, i]`` from it on, then multiplied by ``weight[i]``. One call
    covers any number of slots: thousands of small LoRA factors cost one call, not one each.
    Every step is the float32 (float64 for the sign sum) operation of the torch path in
    :mod:`taskarith.backends._fused`, in the same order, so both give the same bits. Measured per 100M
    float32 entries of 3 inputs, one thread: this loop 0.11 s. Slower designs, measured when
    the loop took 0.21 s: blocked through cache-resident copies of the inputs 0.35 s; with
    ``by_count`` as a run-time argument 0.48 s (a constant of this closure, it compiles away;
    Numba caches each variant on its own). A loop over the inputs per block of entries, each
    pass vectorised, ran 2-3x slower than this one at 3-16 inputs.
    """

    @njit(nogil=True, cache=True, boundscheck=False)
    def kernel(out, xs, bounds, lam, cut, after, weight, scale, start, stop):
        # Parameters in locals (tuples): read from their arrays inside the loop, they would be
        # reloaded per entry (out might alias them) and the loop would not vectorise (5x slower).
        ws = _items(weight, xs)
        s = np.searchsorted(bounds, start, side="right") - 1
        while start < stop:
            end = min(bounds[s + 1], stop)
            # The slot runs in spans between the inputs' tie cuts, each span with one λ per input:
            # choosing λ per entry by index cost ~25% of the loop.
            lo = start
            while lo < end:
                hi = end
                for c in cut[s]:
                    if lo < c < hi:
                        hi = c
                _ties_span(out, xs, _lambdas(lam[s], cut[s], after[s], lo, xs), ws, scale, lo, hi, by_count)
                lo = hi
            start = end
            s += 1

    return kernel


@njit(nogil=True, cache=True, boundscheck=False)
def subtract_checked(out, finetuned, base, start, stop):
    """``out = finetuned - base`` in float32 over ``[start, stop)``; returns how many entries fail
    ``base + out == finetuned`` in float32 (the check of :func:`taskarith._extract.sums_equal`)."""
    failed = 0
    out, finetuned, base = out[start:stop], finetuned[start:stop], base[start:stop]
    for j in range(stop - start):
        b = _load(base, j)
        f = _load(finetuned, j)
        d = f - b
        out[j] = d
        failed += (b + d) != f
    return failed


@njit(nogil=True, cache=True, boundscheck=False)
def delta_fails(finetuned, base, start, stop):
    """How many entries of ``[start, stop)`` fail ``base + (finetuned - base) == finetuned`` in float32."""
    failed = 0
    finetuned, base = finetuned[start:stop], base[start:stop]
    for j in range(stop - start):
        b = _load(base, j)
        f = _load(finetuned, j)
        failed += (b + (f - b)) != f
    return failed


@functools.cache
def add_deltas(checked: bool):
    """The kernel of an unweighted task-arithmetic merge of the models of the tuple ``fs``:
    ``kernel(out, base, fs, start, stop)`` writes ``base + Σ (f_i - base)`` over ``[start, stop)``
    (float32 deltas summed in order, one rounding into ``out``), as the torch path computes it.
    With ``checked``, returns how many (entry, input) pairs fail ``base + (f_i - base) == f_i``
    in float32, else 0."""

    @njit(nogil=True, cache=True, boundscheck=False)
    def kernel(out, base, fs, start, stop):
        failed = 0
        for j in range(start, stop):
            at = np.uint64(j)
            b = _load(base, at)
            total, bad = _delta_sum(fs, at, b)
            if checked:
                failed += bad
            _put(out, at, b + total)
        return failed

    return kernel


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _delta(finetuned, j, b):
    """Entry ``j``'s float32 delta from ``b`` and 1 if ``b + delta`` misses the fine-tuned value, else 0."""
    v = _load(finetuned, j)
    d = v - b
    return d, np.int64((b + d) != v)
