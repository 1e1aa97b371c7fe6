"""The element-wise kernels (sums, scaling, division, subtraction) and their non-temporal stores.

Non-temporal ("streaming") stores write whole cache lines without first reading them in: an
out-of-place result then costs its write only, not a read and a write. Results are computed into a
small block in cache and streamed out a cache line at a time from the first aligned entry on.
"""

import functools
import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._numba_kernels import _UNROLLED, _load, _put, _running_sum, _unrolled

_STREAM_BLOCK = 4096  # entries computed into a cache-resident block, then streamed out
_LINE = 64  # bytes of one streaming store (a cache line)


@intrinsic
def _stream_out(typingctx, block, out, j):
    """Copies ``block`` (a whole number of cache lines) to ``out[j:]``, whose address must be
    cache-line aligned, with non-temporal stores: they skip reading the lines in before writing them."""
    def codegen(context, builder, signature, args):
        source, target, index = args
        line = ir.VectorType(ir.IntType(32), _LINE // 4)
        itemsize = context.get_abi_sizeof(context.get_data_type(signature.args[1].dtype))
        block_ty = signature.args[0]
        source_array = context.make_array(block_ty)(context, builder, source)
        src = builder.bitcast(source_array.data, line.as_pointer())
        dst = builder.bitcast(builder.gep(context.make_array(signature.args[1])(context, builder, target).data,
                                          [index]), line.as_pointer())
        lines = builder.udiv(builder.mul(source_array.nitems, ir.Constant(ir.IntType(64), itemsize)),
                             ir.Constant(ir.IntType(64), _LINE))
        with cgutils.for_range(builder, lines) as loop:
            value = builder.load(builder.gep(src, [loop.index]), align=4)
            store = builder.store(value, builder.gep(dst, [loop.index]), align=_LINE)
            store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.none(block, out, types.int64), codegen


@intrinsic
def _store_fence(typingctx):
    """Orders the streaming stores before whatever the caller does next (they are weakly ordered)."""
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.none(), codegen


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _unaligned_head(out, start, stop):
    """How many entries from ``out[start]`` on precede the first cache-line aligned one (at most
    ``stop - start``)."""
    address = out.ctypes.data + start * out.itemsize
    return min((-address % _LINE) // out.itemsize, stop - start)


@njit(nogil=True, cache=True, boundscheck=False, inline="always", error_model="numpy")
def _elementwise_span(out, to, xs, at, n, s, code, like, count):
    """The body of :func:`elementwise` (``code`` picks the op, ``count`` whether NaN results are
    counted, both constants when compiled): ``n`` results from the inputs' position ``at`` on, written
    to ``out`` from position ``to`` on (a sum's partial sums rounded to ``like``'s dtype). Returns how
    many are NaN (0 unless counted); rounding to ``out``'s dtype neither makes nor removes one."""
    nans = 0
    for j in range(n):
        source = np.uint64(at + j)
        if code == _SCALE:
            value = _load(xs[0], source) * s[0]
        elif code == _QUOTIENT:
            value = _load(xs[0], source) / s[0]
        elif code == _DIFFERENCE:
            value = _load(xs[0], source) - _load(xs[-1], source)
        elif code == _WEIGHTED_FUSED:
            value = _weighted_fused(xs, s, source)
        elif code == _WEIGHTED:
            value = _weighted(xs, s, source)
        else:
            value = _running_sum(like, xs, source)
        if count:
            nans += math.isnan(value)
        _put(out, np.uint64(to + j), value)
    return nans


_SUM, _SCALE, _QUOTIENT, _DIFFERENCE, _WEIGHTED, _WEIGHTED_FUSED = range(6)
_OPS = {"sum": _SUM, "scale": _SCALE, "quotient": _QUOTIENT, "difference": _DIFFERENCE, "weighted": _WEIGHTED,
        "weighted_fused": _WEIGHTED_FUSED}


@intrinsic
def _fused_multiply_add(typingctx, a, b, c):
    """``a * b + c`` in float32 with one rounding (LLVM's fma)."""
    def codegen(context, builder, signature, args):
        single = ir.FloatType()
        function = builder.module.declare_intrinsic("llvm.fma", [single], ir.FunctionType(single, [single] * 3))
        return builder.call(function, args)
    return types.float32(types.float32, types.float32, types.float32), codegen


def _weighted(xs, ws, at):
    """``x0 * w0``, then ``+ w_i * x_i`` for each further input (the product rounded, then the sum)."""


def _weighted_fused(xs, ws, at):
    """As :func:`_weighted`, each ``+ w_i * x_i`` a fused multiply-add (one rounding)."""


def _weighted_source(fused: bool):
    def impl(xs, ws, at):
        lines = ["value = _load(xs[0], at) * ws[0]"]
        for i in range(1, len(xs)):
            step = (f"_fused_multiply_add(ws[{i}], _load(xs[{i}], at), value)" if fused
                    else f"value + ws[{i}] * _load(xs[{i}], at)")
            lines.append(f"value = {step}")
        return _unrolled("xs, ws, at", lines, "value", globals())
    return impl


overload(_weighted, **_UNROLLED)(_weighted_source(False))
overload(_weighted_fused, **_UNROLLED)(_weighted_source(True))


@functools.cache
def elementwise(op: str, stream: bool, count: bool = False):
    """The kernel ``kernel(out, xs, s, start, stop, like)`` of an element-wise op over ``[start,
    stop)`` of the tuple of arrays ``xs``, computed in float32 and rounded to ``out``'s dtype as
    torch computes it; it returns how many results are NaN where ``count`` (a merge's NaN check
    then costs no second pass over the result), else 0:

    - ``op="sum"``: ``((x0 + x1) + x2) + ...`` over all of ``xs``, each partial sum rounded to the
      dtype of ``like`` (``out`` itself: as ``torch.add`` then ``Tensor.add_`` compute it; a float32
      array: summed in float32 and rounded once into ``out``): one pass over memory where torch
      makes ``len(xs) - 1`` (``s`` unused);
    - ``op="scale"``: ``x0 * s`` with float32 ``s``, as ``torch.mul`` by a Python scalar;
    - ``op="quotient"``: ``x0 / s``, as ``torch.div`` of float32 entries by a Python scalar;
    - ``op="difference"``: ``x0 - x1``, as ``torch.sub``;
    - ``op="weighted"`` / ``"weighted_fused"``: ``x0 * w0``, then ``+ w_i * x_i`` per further input,
      with weights ``s`` (float32), as ``torch.mul`` then ``Tensor.add_(x, alpha=w)`` compute it on a
      torch build that rounds the product first / fuses it (``op="sum"`` rounds to ``like``, these
      stay in float32 until ``out``).

    ``s`` is a float32 array: the factor (``s[0]``) or the weights.

    With ``stream``, entries up to the first cache-line boundary are written plainly, then each
    block of results is computed in cache and written out with non-temporal stores
    (:func:`_stream_out`), then the tail plainly again.
    """
    code = _OPS[op]

    # error_model="numpy": a division by zero follows IEEE (as torch's) instead of testing every
    # divisor for Python's ZeroDivisionError, a branch that kept the loop from vectorising.
    @njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
    def kernel(out, xs, s, start, stop, like):
        nans = 0
        if stream:
            head = start + _unaligned_head(out, start, stop)
            nans += _elementwise_span(out, start, xs, start, head - start, s, code, like, count)
            block = np.empty(_STREAM_BLOCK, out.dtype)
            start = head
            for lo in range(head, stop - _STREAM_BLOCK + 1, _STREAM_BLOCK):
                nans += _elementwise_span(block, 0, xs, lo, _STREAM_BLOCK, s, code, like, count)
                _stream_out(block, out, lo)
                start = lo + _STREAM_BLOCK
            _store_fence()
        return nans + _elementwise_span(out, start, xs, start, stop - start, s, code, like, count)

    return kernel
