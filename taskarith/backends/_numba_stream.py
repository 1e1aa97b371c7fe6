"""Non-temporal ("streaming") stores for the element-wise kernels of :mod:`._numba_kernels`.

Such stores write whole cache lines without first reading them in: an out-of-place result then
costs its write only, not a read and a write. Results are computed into a small block in cache and
streamed out a cache line at a time from the first aligned entry on.
"""

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

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
