"""The Numba kernel that adds a flat buffer of deltas to many separate base tensors at once
(``apply_to`` on a model of thousands of tensors), imported only when it is needed.

The base tensors arrive as a table of addresses, so one compiled loop walks all of them: per tensor,
a torch call costs microseconds of dispatch, which outweighed the arithmetic of small tensors (LoRA
factors) many times over.
"""

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from ._numba_kernels import _load, _put


@intrinsic
def _pointer_like(typingctx, address, like):
    """The integer ``address`` as a pointer to entries of ``like``'s dtype."""
    def codegen(context, builder, signature, args):
        element = context.get_data_type(signature.args[1].dtype)
        return builder.inttoptr(args[0], ir.PointerType(element))
    return types.CPointer(like.dtype)(types.int64, like), codegen


@njit(nogil=True, cache=True, boundscheck=False)
def add_to_bases(out, deltas, addresses, offsets, start, stop):
    """``out[j] = base[j - offsets[t]] + deltas[j]`` for ``j`` in ``[start, stop)``, where tensor ``t``
    (contiguous, ``out``'s dtype, at ``addresses[t]``) covers ``[offsets[t], offsets[t + 1])``;
    computed in float32 and rounded once to ``out``'s dtype (float32 deltas of bfloat16 weights
    too), as ``torch.add`` computes it."""
    t = np.searchsorted(offsets, start, side="right") - 1
    while start < stop:
        lo = offsets[t]
        hi = min(offsets[t + 1], stop)
        base = carray(_pointer_like(addresses[t], out), offsets[t + 1] - lo)[start - lo:]
        target = out[start:hi]
        source = deltas[start:hi]
        for j in range(hi - start):
            at = np.uint64(j)
            _put(target, at, _load(base, at) + _load(source, at))
        start = hi
        t += 1
