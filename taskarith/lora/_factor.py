"""The truncated SVD behind :func:`taskarith.lora.to_lora`: one delta as LoRA factors ``B @ A``.

Exact (``torch.linalg.svd``) while ``min(rows, cols) <= EXACT_SVD_MAX``; above, randomized by
torch.svd_lowrank's range finder with its random matrix drawn on the CPU from a generator seeded by
``(seed, name)``, so the same adapter comes out on every run and device.
"""

from __future__ import annotations

import hashlib

import torch

EXACT_SVD_MAX = 1024  # the exact SVD up to this min(rows, cols); randomized above
OVERSAMPLE = 10  # extra columns of the randomized range finder
_ROWS = 8192  # rows per chunk when measuring a residual


def seed_of(seed: int, name: str) -> int:
    """The seed of one layer's draws: a hash of the user's seed and the layer's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def factor(delta, layer, rank, randomized, niter, seed, dtype):
    """(B, A, rank kept, relative error, "exact"/"randomized") with ``B @ A ≈ delta`` (its transpose for
    Conv1D and embeddings), factors zero-padded to ``rank`` and cast to ``dtype``."""
    compute = torch.float64 if delta.dtype == torch.float64 else torch.float32
    m = delta.to(compute)
    m = m if layer == "linear" else m.T
    rows, cols = m.shape
    k = min(rank, rows, cols)
    q = min(k + OVERSAMPLE, rows, cols)
    if randomized is None:
        randomized = min(rows, cols) > EXACT_SVD_MAX and 2 * q <= min(rows, cols)
    u, s, vh = _randomized_svd(m, q, niter, seed) if randomized else torch.linalg.svd(m, full_matrices=False)
    root = s[:k].clamp(min=0).sqrt()
    out = dtype or delta.dtype
    b = torch.zeros(rows, rank, dtype=out, device=m.device)
    a = torch.zeros(rank, cols, dtype=out, device=m.device)
    b[:, :k], a[:k] = u[:, :k] * root, root[:, None] * vh[:k]
    b_c, a_c = b[:, :k].to(compute), a[:k].to(compute)
    residual = sum(float((m[i:i + _ROWS] - b_c[i:i + _ROWS] @ a_c).square().sum()) for i in range(0, rows, _ROWS))
    error = (residual / float(m.square().sum())) ** 0.5
    return b, a, k, error, "randomized" if randomized else "exact"


def _randomized_svd(m: torch.Tensor, q: int, niter: int, seed: int):
    """The rank-``q`` SVD of ``m`` by torch.svd_lowrank's algorithm, its draws from a seeded CPU generator."""
    draws = torch.randn(m.shape[1], q, generator=torch.Generator().manual_seed(seed), dtype=m.dtype).to(m.device)
    basis = torch.linalg.qr(m @ draws).Q
    for _ in range(niter):
        basis = torch.linalg.qr(m.mT @ basis).Q
        basis = torch.linalg.qr(m @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mT @ m, full_matrices=False)
    return basis @ u, s, vh
