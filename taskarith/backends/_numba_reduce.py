"""The Numba kernels of float64-accumulated inner products (``dot``, ``norm``, ``cosine``), imported
only when one is needed.

The sum is cut into fixed chunks of :data:`CHUNK` entries; threads only share out the chunks. Within
a chunk, :data:`LANES` float64 partial sums run side by side as one explicit LLVM vector, then meet
in a fixed tree, then the tail is added in order. The additions are written out in the IR, not left
to the compiler (which may only reorder them with fast-math flags, and then by the CPU's vector
width): so the result depends neither on the thread count nor on the machine. Products of float32
or bfloat16 entries are exact in float64, so a fused multiply-add changes nothing either.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._numba_kernels import _load

CHUNK = 1 << 16
LANES = 32  # partial sums per chunk: enough independent additions to keep a core at memory speed


def _widened(builder, pointer, index, element):
    """``LANES`` entries from ``pointer[index]`` on, as a float64 vector (bfloat16: uint16 bits)."""
    bits = 16 if element == types.uint16 else 32
    source = ir.VectorType(ir.IntType(bits), LANES)
    vector = builder.load(builder.bitcast(builder.gep(pointer, [index]), source.as_pointer()), align=bits // 8)
    if bits == 16:  # bfloat16 bits are the high half of a float32's
        wide = builder.zext(vector, ir.VectorType(ir.IntType(32), LANES))
        vector = builder.shl(wide, ir.Constant(wide.type, [16] * LANES))
    single = builder.bitcast(vector, ir.VectorType(ir.FloatType(), LANES))
    return builder.fpext(single, ir.VectorType(ir.DoubleType(), LANES))


def _tree_sum(builder, vector):
    """The lanes of a float64 vector added in a fixed tree: halves, then quarters, ..."""
    width = LANES
    while width > 1:
        width //= 2
        low = builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(ir.IntType(32), width), list(range(width))))
        high = builder.shuffle_vector(vector, vector,
                                      ir.Constant(ir.VectorType(ir.IntType(32), width), list(range(width, 2 * width))))
        vector = builder.fadd(low, high)
    return builder.extract_element(vector, ir.Constant(ir.IntType(32), 0))


def _lane_sums(pairs):
    """An intrinsic ``(a, b, start, blocks)`` -> the float64 sums of ``x·y`` for each ``(x, y)`` of
    ``pairs`` (0: ``a``, 1: ``b``) over ``blocks * LANES`` entries from ``start`` on."""
    def typer(typingctx, a, b, start, blocks):
        result = types.float64 if len(pairs) == 1 else types.UniTuple(types.float64, len(pairs))

        def codegen(context, builder, signature, args):
            data = [context.make_array(ty)(context, builder, value).data
                    for ty, value in zip(signature.args[:2], args[:2])]
            vector = ir.VectorType(ir.DoubleType(), LANES)
            sums = [cgutils.alloca_once_value(builder, ir.Constant(vector, [0.0] * LANES)) for _ in pairs]
            with cgutils.for_range(builder, args[3]) as loop:
                at = builder.add(args[2], builder.mul(loop.index, ir.Constant(ir.IntType(64), LANES)))
                used = {i for pair in pairs for i in pair}  # a norm reads (and widens) one array
                loaded = {i: _widened(builder, data[i], at, signature.args[i].dtype) for i in sorted(used)}
                # One fused multiply-add per lane: the float64 product of two float32 values is exact,
                # so it rounds as the separate multiply and add do, in fewer instructions.
                fma = builder.module.declare_intrinsic(f"llvm.fma.v{LANES}f64", fnty=ir.FunctionType(vector, [vector] * 3))
                for acc, (x, y) in zip(sums, pairs):
                    builder.store(builder.call(fma, [loaded[x], loaded[y], builder.load(acc)]), acc)
            totals = [_tree_sum(builder, builder.load(acc)) for acc in sums]
            if len(totals) == 1:
                return totals[0]
            return context.make_tuple(builder, signature.return_type, totals)
        return result(a, b, types.int64, types.int64), codegen
    return intrinsic(typer)


_dot_lanes = _lane_sums([(0, 1)])
_square_lanes = _lane_sums([(0, 0)])
_gram_lanes = _lane_sums([(0, 0), (1, 1), (0, 1)])


@njit(nogil=True, cache=True, boundscheck=False)
def dot_chunks(a, b, partials, first, last, square):
    """``partials[c]`` = the float64 sum of ``a·b`` over chunk ``c``, for chunks ``[first, last)``;
    with ``square``, of ``a·a`` (``b`` unused), reading ``a`` once: the compiler cannot tell that two
    arrays are one, and would load and widen it twice."""
    n = a.size
    for c in range(first, last):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        blocks = (hi - lo) // LANES
        total = _square_lanes(a, b, lo, blocks) if square else _dot_lanes(a, b, lo, blocks)
        for j in range(lo + blocks * LANES, hi):
            x = np.float64(_load(a, np.uint64(j)))
            total += x * (x if square else np.float64(_load(b, np.uint64(j))))
        partials[c] = total


@njit(nogil=True, cache=True, boundscheck=False)
def gram_chunks(a, b, partials, first, last):
    """``partials[:, c]`` = the float64 sums of ``a·a``, ``b·b`` and ``a·b`` over chunk ``c`` (each as
    :func:`dot_chunks` computes it), for chunks ``[first, last)``: a cosine in one pass."""
    n = a.size
    for c in range(first, last):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        blocks = (hi - lo) // LANES
        aa, bb, ab = _gram_lanes(a, b, lo, blocks)
        for j in range(lo + blocks * LANES, hi):
            x = np.float64(_load(a, np.uint64(j)))
            y = np.float64(_load(b, np.uint64(j)))
            aa += x * x
            bb += y * y
            ab += x * y
        partials[0, c] = aa
        partials[1, c] = bb
        partials[2, c] = ab


@njit(nogil=True, cache=True, boundscheck=False)
def count_nan(x, magnitude, infinity, start, stop):
    """How many entries of ``x[start:stop]`` are NaN, on their IEEE bits (``x``: float32 as int32,
    bfloat16 as uint16; ``magnitude`` masks the sign off, ``infinity`` is the bits of +inf, both of
    ``x``'s dtype), so the loop vectorises like any integer count."""
    part = x[start:stop]
    count = 0
    for j in range(part.size):
        count += (part[np.uint64(j)] & magnitude) > infinity
    return count
