"""Random draws keyed by (seed, input, name, chunk): the same for an entry however a tensor is split."""

from __future__ import annotations

import hashlib
import math

import torch

__all__ = ["RANDOM_CHUNK", "dare_mask", "derive_seed", "uniform"]


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``parts`` (e.g. vector index, tensor name).

    Per-(vector, tensor) streams make random merges independent of iteration
    order, threading and of which other tensors exist.
    """
    h = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


RANDOM_CHUNK = 1 << 20  # entries per independently seeded chunk of a tensor's random draws


def uniform(count: int, start: int, full: int, seed: int, *parts: object) -> torch.Tensor:
    """``count`` uniform [0, 1) float32 draws for entries ``[start, start + count)`` of a tensor of
    ``full`` entries: the same value for an entry however the tensor is split.

    The whole tensor is cut into chunks of :data:`RANDOM_CHUNK` entries; chunk ``j``
    draws from a CPU generator seeded with ``derive_seed(seed, *parts, j)``. So the
    draws depend only on ``seed``, ``parts`` (input position, tensor name) and the
    tensor's size, never on which other tensors exist, the order, threads, or how an
    out-of-core merge splits the tensor.

    Example:
        >>> whole = uniform(10, 0, 10, 7, 0, "w")
        >>> torch.equal(whole[4:], uniform(6, 4, 10, 7, 0, "w"))
        True
    """
    stop = start + count
    out = torch.empty(count, dtype=torch.float32)
    for chunk in range(start // RANDOM_CHUNK, -(-stop // RANDOM_CHUNK)):
        begin = chunk * RANDOM_CHUNK
        length = min(RANDOM_CHUNK, full - begin)
        generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, *parts, chunk))
        lo, hi = max(start - begin, 0), min(stop - begin, length)
        # Draw i of a chunk is the generator's i-th whatever the count asked for, so a block ending
        # inside this chunk draws only up to its end.
        out[begin + lo - start:begin + hi - start] = torch.rand(hi, generator=generator)[lo:hi]
    return out


def dare_mask(shape: tuple[int, ...], keep: float, seed: int, *parts: object,
              start: int = 0, full: int | None = None) -> torch.Tensor:
    """Bernoulli(keep) boolean mask of the entries ``[start, start + n)`` of a tensor of ``full``
    entries (default: the whole tensor of ``shape``), drawn with :func:`uniform`."""
    numel = math.prod(shape)
    return torch.lt(uniform(numel, start, numel if full is None else full, seed, *parts), keep).view(shape)
