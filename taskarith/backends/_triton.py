"""Single-pass Triton kernels for CUDA tensors: weighted sums and TIES' trim → elect → merge.

On a GPU, element-wise work is bound by memory bandwidth, so the number of
passes decides speed. ``TaskVector.sum`` of three vectors written with torch
kernels is two passes (read 2 + write 1, then read 2 + write 1: 6 vector-sized
transfers for a result that needs 4), and TIES as torch kernels is a dozen. Each
kernel here reads every input once and writes the output once.

They compute exactly what the torch code they replace computes, operation for
operation and in the same order (float64 sign sums, a correctly rounded
division), so results do not depend on which path ran; tests check this on the
CPU through Triton's interpreter (``TRITON_INTERPRET=1``). Each kernel takes any
number of inputs, as a tuple. Triton is optional: without it (or with one older
than 3.2, which takes no tuples), for dtypes other than float32, or for TIES of
more than :data:`MAX_INPUTS` inputs, callers use their torch path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from . import _switch

# Inputs of one kernel launch. Each count compiles a kernel of its own, its per-input steps written
# out once per input, and the launch's arguments grow with it (CUDA passes at most 4 KB of them):
# TIES of more inputs takes the torch path, and sums fold their running total into the next launch.
MAX_INPUTS = 64
_BLOCK = 1024


def usable(tensors: Sequence[torch.Tensor], dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Whether these tensors can go through the Triton kernels (CUDA, or the interpreter): all of
    one dtype among ``dtypes``, contiguous."""
    if not tensors or tensors[0].dtype not in dtypes:
        return False
    on_device = all(t.is_cuda for t in tensors) or (
        os.environ.get("TRITON_INTERPRET") == "1" and all(t.device.type == "cpu" for t in tensors)
    )
    if not (on_device and all(t.dtype == tensors[0].dtype and t.is_contiguous() for t in tensors)):
        return False
    return _switch.allows("triton") and _kernels() is not None


@functools.cache
def _kernels():
    try:
        from . import _triton_kernels
    except ImportError:  # Triton ships with CUDA builds of PyTorch only
        return None
    return _triton_kernels


# float32 only: for bfloat16/float16 a single rounding at the store would differ from the
# documented law ``TaskVector.sum([a, b, c]) == (a + b) + c`` (two roundings), and measured no
# faster through the public API on an H100 (0.56x vs 0.53x of a copy at 100M entries).
SUM_DTYPES = (torch.float32,)


def weighted_sum(out: torch.Tensor, sources: Sequence[torch.Tensor], weights: Sequence[float]) -> bool | None:
    """``out = Σ weights[i] · sources[i]`` (flat tensors of one of :data:`SUM_DTYPES`), one pass per
    :data:`MAX_INPUTS` sources; None (nothing written) where the kernels do not take them. The
    total is float32 throughout, so a running total folded into the next pass as its first input
    (weight 1) gives the bits one pass would."""
    if not usable([out, *sources], SUM_DTYPES):
        return None
    first = 0
    while first < len(sources):
        chunk = list(sources[first:first + MAX_INPUTS])
        ws = [float(w) for w in weights[first:first + MAX_INPUTS]]
        if first:  # fold the running total in as the first input
            chunk, ws = [out, *chunk[:MAX_INPUTS - 1]], [1.0, *ws[:MAX_INPUTS - 1]]
        taken = len(chunk) - (1 if first else 0)
        for part in _aligned_parts(out.numel()):
            n = part.stop - part.start
            _kernels()._sum_kernel[(-(-n // _BLOCK),)](out[part], tuple(t[part] for t in chunk), tuple(ws), n,
                                                      K=len(chunk), BLOCK=_BLOCK)
        first += taken
    return True


def ties_merge(
    out: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    lambdas: Sequence[float | None],
    weights: Sequence[float],
    sign: str,
    scale: float,
) -> None:
    """TIES' trim (``hardshrink`` by ``λ``; None keeps all), weighting, election and disjoint mean
    of up to :data:`MAX_INPUTS` flat float32 ``inputs`` into ``out``, in one pass (see
    ``_fused.elect_and_merge``)."""
    k = len(inputs)
    lams = tuple(-1.0 if lam is None else float(lam) for lam in lambdas)
    ws = tuple(float(w) for w in weights)
    block = _ties_block(k)
    for part in _aligned_parts(out.numel()):
        n = part.stop - part.start
        _kernels()._ties_kernel[(-(-n // block),)](
            out[part], tuple(t[part] for t in inputs), lams, ws, n, float(scale), K=k, COUNT=sign == "count",
            BLOCK=block, **_NO_FMA,
        )


def _ties_block(k: int) -> int:
    """Entries per program of a TIES launch over ``k`` inputs. The kernel holds all ``k`` trimmed
    blocks in registers at once: compiled for sm_90 (ptxas, 4 warps), blocks of 1024 took 158
    registers per thread at 16 inputs and spilled from 32 on; halving the block as ``k`` doubles
    past 16 keeps them in registers (225 at 64 inputs, blocks of 256). Not timed on a GPU."""
    return _BLOCK >> max(0, (k - 1).bit_length() - 4)


def _aligned_parts(n: int) -> list[slice]:
    """Split ``[0, n)`` into a head whose length is a multiple of 16 and a short tail.

    Triton specialises a kernel on whether its integer arguments divide by 16; only then can it
    prove the bounds mask constant over a vector and load 16 bytes at a time. Without that, 2-byte
    loads of bfloat16 ran at ~0.65x of a copy on an H100; with it, at ~1.05x.
    """
    head = n - n % 16
    return [s for s in (slice(0, head), slice(head, n)) if s.stop > s.start]


# Contracting a multiply and an add into one FMA rounds once instead of twice: the torch path
# rounds twice, so results would differ in the last bit. (The interpreter takes no such option.)
_NO_FMA = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"enable_fp_fusion": False}
