"""The Numba kernels of the selections behind :mod:`taskarith.backends.kernels` (through :mod:`taskarith.backends._numba`,
imported only when one is needed): finding the n-th tie at a threshold, and packing the magnitudes
of a range into a buffer for a selection to run over.

float32 arrays arrive as their int32 bits where the kernels compare magnitudes as integers (for
non-negative floats, the order of the bits is the order of the values; NaN's bits exceed infinity's).
"""

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._numba_kernels import _load

_TIE_BLOCK = 1024  # entries counted per vectorised step of a tie scan


@njit(nogil=True, cache=True, boundscheck=False)
def _ties_in(x, threshold, lo, hi):
    count = 0
    x = x[lo:hi]
    for j in range(hi - lo):
        count += abs(_load(x, j)) == threshold
    return count


@njit(nogil=True, cache=True, boundscheck=False)
def nth_tie(x, threshold, n, backward):
    """The index of the ``n``-th entry (from 1) with ``|x| == threshold``, counting from the end with
    ``backward``, and ``n``; or ``(-1, count)`` when only ``count < n`` entries tie. Blocks are
    counted first (a vectorised loop) and only the block holding the answer is walked."""
    size = x.size
    seen = 0
    for b in range(0, size, _TIE_BLOCK):
        lo, hi = (max(size - b - _TIE_BLOCK, 0), size - b) if backward else (b, min(b + _TIE_BLOCK, size))
        count = _ties_in(x, threshold, lo, hi)
        if seen + count >= n:
            for i in range(hi - lo):
                j = hi - 1 - i if backward else lo + i
                if abs(_load(x, j)) == threshold:
                    seen += 1
                    if seen == n:
                        return j, seen
        seen += count
    return -1, seen


_LANES = 16  # int32 lanes of one AVX-512 register


@intrinsic
def _compress_magnitudes(typingctx, x, j, lo, hi, out, m):
    """Stores the magnitude bits ``x & 0x7FFFFFFF`` of ``x[j:j + 16]`` (int32) that lie in ``[lo,
    hi]`` contiguously at ``out[m:]`` (one AVX-512 compressing store) and returns how many."""
    def codegen(context, builder, signature, args):
        source, index, floor, ceiling, target, at = args
        i32 = ir.IntType(32)
        lanes = ir.VectorType(i32, _LANES)
        x_data = context.make_array(signature.args[0])(context, builder, source).data
        out_data = context.make_array(signature.args[4])(context, builder, target).data
        values = builder.load(builder.bitcast(builder.gep(x_data, [index]), lanes.as_pointer()), align=4)
        magnitudes = builder.and_(values, ir.Constant(lanes, [0x7FFFFFFF] * _LANES))

        def splat(value):
            one = builder.insert_element(ir.Constant(lanes, ir.Undefined), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(lanes, ir.Undefined), ir.Constant(lanes, [0] * _LANES))

        keep = builder.and_(builder.icmp_signed(">=", magnitudes, splat(floor)),
                            builder.icmp_signed("<=", magnitudes, splat(ceiling)))
        destination = builder.gep(out_data, [at])
        store = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [lanes, destination.type, keep.type]), f"llvm.masked.compressstore.v{_LANES}i32")
        builder.call(store, [magnitudes, destination, keep])
        mask = ir.IntType(_LANES)
        popcount = cgutils.get_or_insert_function(builder.module, ir.FunctionType(mask, [mask]), f"llvm.ctpop.i{_LANES}")
        return builder.zext(builder.call(popcount, [builder.bitcast(keep, mask)]), ir.IntType(64))
    return types.int64(x, types.int64, types.int32, types.int32, out, types.int64), codegen


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _pack_range(x, lo, hi, out, wide):
    """``x``'s magnitude bits in ``[lo, hi]``, packed in order into ``out`` while it has room:
    ``(packed, entries of x read)``."""
    m = 0
    j = 0
    if wide:
        while j + _LANES <= x.size and m + _LANES <= out.size:
            m += _compress_magnitudes(x, j, lo, hi, out, m)
            j += _LANES
    while j < x.size and m < out.size:
        b = x[j] & 0x7FFFFFFF
        out[m] = b  # always stored, kept by advancing m: no branch
        m += (b >= lo) & (b <= hi)
        j += 1
    return m, j


@functools.cache
def pack_magnitudes(wide: bool):
    """The kernel ``kernel(x, lo, out) -> m``: the magnitude bits of the float32 entries of ``x``
    (given as int32 bits) that are at least ``lo`` (int32), packed in order into ``out[:m]``
    (``out`` at least as long as ``x``). With ``wide``, 16 entries per AVX-512 compressing store
    (0.21 ns per entry in cache, against 0.41 for the branch-free scalar loop; a branch mispredicts on
    a quarter of the entries, 2.7 ns); other CPUs take the scalar loop only, as LLVM would expand
    the store into per-lane branches there."""

    @njit(nogil=True, cache=True, boundscheck=False)
    def kernel(x, lo, out):
        return _pack_range(x, lo, np.int32(0x7FFFFFFF), out, wide)[0]

    return kernel


_SCAN_CHUNK = 1 << 16  # entries counted, then packed, while they are in cache


@functools.cache
def bracket_scan(wide: bool):
    """The kernel ``kernel(x, lo, hi, out, start, stop) -> (above, nan, packed, complete)`` over the
    float32 entries ``x[start:stop]`` (int32 bits): how many magnitudes exceed ``hi``, how many are
    NaN, and the magnitude bits in ``[lo, hi]`` packed into ``out[:packed]``; ``complete`` is False
    when ``out`` ran out of room (the counts are whole either way)."""

    @njit(nogil=True, cache=True, boundscheck=False)
    def kernel(x, lo, hi, out, start, stop):
        x = x[start:stop]
        above = 0
        nan = 0
        packed = 0
        complete = True
        for c in range(0, x.size, _SCAN_CHUNK):
            chunk = x[c:c + _SCAN_CHUNK]
            for i in range(chunk.size):
                b = chunk[i] & 0x7FFFFFFF
                above += b > hi
                nan += b > 0x7F800000  # NaN's bit patterns exceed infinity's
            if complete:
                m, read = _pack_range(chunk, lo, hi, out[packed:], wide)
                packed += m
                complete = read == chunk.size
        return above, nan, packed, complete

    return kernel
