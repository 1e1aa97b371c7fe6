"""Pure tensor maths shared by merge methods: exact selection, trimming, sign election, dropout.

Every function here works on plain tensors (a flat buffer or one tensor) and
never sorts: selecting the k largest of n values uses an exact selection
algorithm (numpy's introselect on CPU, ``torch.kthvalue`` elsewhere), which is
linear in n. ``torch.quantile`` is avoided on purpose: it refuses large inputs
on older PyTorch and interpolates rather than selecting exactly.

Ties at the selection threshold are broken by position: among entries equal to
the k-th largest value, the ones with the lowest index are kept, so exactly k
entries survive on every run and every device.
"""

from __future__ import annotations

import contextvars
import hashlib
import math
from contextlib import contextmanager

import numpy as np
import torch

from .errors import TaskArithError

__all__ = [
    "dare_mask",
    "derive_seed",
    "disjoint_mean",
    "elect_sign",
    "kth_largest",
    "topk_mask",
]

_NUMPY_SELECT = (torch.float16, torch.float32, torch.float64)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor (k counted from 1), exactly, as a 0-d tensor.

    Example:
        >>> import torch
        >>> kth_largest(torch.tensor([0.5, 3.0, 1.0, 3.0]), 2)
        tensor(3.)
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise TaskArithError(f"k must be in [1, {n}] to select from {n} values, got {k}")
    if values.device.type == "cpu" and values.dtype in _NUMPY_SELECT:
        array = values.detach().numpy()
        return torch.tensor(np.partition(array, n - k)[n - k], dtype=values.dtype)
    return torch.kthvalue(values.detach().float(), n - k + 1).values.to(values.dtype)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask with exactly ``k`` True entries at the largest ``scores``.

    Ties at the threshold go to the lowest indices (of the flattened tensor).

    Example:
        >>> import torch
        >>> topk_mask(torch.tensor([1.0, 2.0, 2.0, 0.0, 2.0]), 2)
        tensor([False,  True,  True, False, False])
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    # One reduction usually settles it: the sum is NaN only with a NaN (or +inf and -inf) present.
    if math.isnan(float(flat.sum())) and bool(torch.isnan(flat).any()):
        raise TaskArithError("cannot select the largest entries of scores containing NaN")
    threshold, excess = _select(flat, k)
    threshold = threshold.to(flat.device)
    mask = flat >= threshold
    if excess:  # more entries equal the threshold than slots left: drop the last ones
        ties = torch.nonzero(flat == threshold).squeeze(1)
        mask[ties[ties.numel() - excess:]] = False
    return mask.view(scores.shape)


def _select(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The k-th largest value and how many more than k entries are >= it (ties past the k-th)."""
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype in _NUMPY_SELECT:
        part = np.partition(flat.detach().numpy(), n - k)
        threshold = part[n - k]
        # After partitioning, only the lower part can hold further copies of the threshold.
        return torch.tensor(threshold, dtype=flat.dtype), int(np.count_nonzero(part[: n - k] == threshold))
    threshold = kth_largest(flat, k)
    return threshold, int((flat >= threshold.to(flat.device)).sum()) - k


def elect_sign(trimmed: list[torch.Tensor], how: str) -> torch.Tensor:
    """The elected sign (+1 or -1, ties to +1) of each entry over several trimmed vectors.

    ``how="sum"``: sign of the sum of the values (PEFT calls this "total").
    ``how="count"``: sign of (#positive − #negative) (PEFT: "frequency").
    """
    total = torch.zeros_like(trimmed[0], dtype=torch.float64 if how == "sum" else torch.int32)
    for t in trimmed:
        if how == "sum":
            total += t
        else:
            total += torch.sign(t).to(torch.int32)
    return (total >= 0).to(torch.int8).mul_(2).sub_(1)


def disjoint_mean(trimmed: list[torch.Tensor], sign: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Mean over the vectors whose entry is non-zero and agrees with ``sign``; 0 where none do."""
    total = torch.zeros_like(out, dtype=torch.float64 if out.dtype == torch.float64 else torch.float32)
    count = torch.zeros_like(out, dtype=torch.int32)
    for t in trimmed:
        agree = torch.sign(t).to(torch.int8) == sign  # zeros never agree: sign(0) = 0
        total += torch.where(agree, t, 0)
        count += agree
    return out.copy_(total / count.clamp_min(1))


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``parts`` (e.g. vector index, tensor name).

    Per-(vector, tensor) streams make random merges independent of iteration
    order, threading and of which other tensors exist.
    """
    h = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


DARE_BLOCK = 1 << 20  # entries per independently seeded block of a DARE mask

# Where the tensors a method sees start inside their full tensors (flat offset, full size):
# out-of-core merges hand methods row blocks, and DARE must draw the same bits for them.
_region: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("taskarith_region", default=None)


@contextmanager
def region(offset: int, full_numel: int):
    """Declare that tensors passed to merge methods are the entries ``[offset, offset + n)`` of
    tensors with ``full_numel`` entries (used by out-of-core merging)."""
    token = _region.set((offset, full_numel))
    try:
        yield
    finally:
        _region.reset(token)


def dare_mask(shape: tuple[int, ...], keep: float, seed: int, *parts: object) -> torch.Tensor:
    """Bernoulli(keep) boolean mask, identical on every device and for any split of the tensor.

    The full tensor is cut into blocks of :data:`DARE_BLOCK` entries; block ``j``
    draws from a CPU generator seeded with ``derive_seed(seed, *parts, j)``. So
    the mask of a tensor depends only on ``seed``, ``parts`` (vector position,
    tensor name) and the tensor's size, never on which other tensors exist, the
    iteration order, threads, or how an out-of-core merge splits it.
    """
    numel = math.prod(shape)
    offset, full = _region.get() or (0, numel)
    stop = offset + numel
    mask = torch.empty(numel, dtype=torch.bool)
    for block in range(offset // DARE_BLOCK, -(-stop // DARE_BLOCK)):
        begin = block * DARE_BLOCK
        length = min(DARE_BLOCK, full - begin)
        generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, *parts, block))
        draws = torch.rand(length, generator=generator)
        lo, hi = max(offset - begin, 0), min(stop - begin, length)
        torch.lt(draws[lo:hi], keep, out=mask[begin + lo - offset:begin + hi - offset])
    return mask.view(shape)
