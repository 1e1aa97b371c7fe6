"""The sparsifiers of mergekit 0.1.5's generalized task arithmetic, op for op.

Each takes one task vector tensor (a fine-tuned model's weights minus the base's, in the merge's
dtype) and returns it with entries zeroed, optionally rescaled so that its L1 norm is unchanged.
The torch operations, their order and their dtypes follow mergekit's, so that on the same torch
build a deterministic sparsifier gives the same bits. The random ones draw their masks from
:meth:`Block.random <taskarith.merging.Block.random>` (reproducible for a seed) where mergekit
calls ``torch.bernoulli``: they match mergekit in distribution, not in bits.

Used by :mod:`taskarith.merging.mergekit_gta`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import TaskArithError

L1_EPS = 1e-7  # below this norm (before or after masking) the masked tensor is not rescaled


def _on_cpu_float32(t: torch.Tensor) -> torch.Tensor:
    """What mergekit ranks magnitudes in: float32 on the CPU (its sort there), the tensor's dtype elsewhere."""
    return t.float() if t.device.type == "cpu" else t


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype mergekit draws Bernoulli masks in: float32 on the CPU unless bfloat16, else the tensor's."""
    return t.dtype if t.device.type != "cpu" or t.dtype == torch.bfloat16 else torch.float32


def apply_mask(t: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``t · mask``; with ``rescale``, multiplied by ``‖t‖₁ / ‖t · mask‖₁`` unless either norm is below 1e-7."""
    kept = t * mask
    if not rescale:
        return kept
    before = t.abs().sum()
    after = kept.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return kept
    return kept * (before / after)


def keep_largest(t: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the ``max(1, int(density·n))`` entries of largest magnitude (all of them for ``density >= 1``).

    The order of a descending, unstable argsort decides ties, as in mergekit.
    """
    if density >= 1:
        return t
    if density <= 0 or t.numel() == 0:
        return torch.zeros_like(t)
    k = max(1, int(density * t.numel()))
    order = torch.argsort(_on_cpu_float32(t.abs().reshape(-1)), descending=True)
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[order[:k]] = 1
    return apply_mask(t, mask.reshape_as(t), rescale)


def keep_middle(t: torch.Tensor, density: float, rescale: bool, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask: drop the ``int(gamma·n)`` largest magnitudes and the smallest, keeping ``int(density·n)``.

    Fewer of the largest are dropped where ``density`` leaves no room for all of them. Entries
    are ranked by an ascending sort of their magnitudes (float32 on the CPU).
    """
    if density >= 1:
        return t
    n = t.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(_on_cpu_float32(t.abs().reshape(-1)), descending=False).indices
    mask = torch.zeros(n, dtype=t.dtype, device=t.device)
    mask[order[bottom:bottom + keep]] = 1
    return apply_mask(t, mask.reshape_as(t), rescale)


def keep_random(t: torch.Tensor, density: float, rescale: bool, draws: Callable[[], torch.Tensor]) -> torch.Tensor:
    """DARE's mask: keep each entry with probability ``density`` (``draws() < density``), computed in
    mergekit's work dtype and returned in ``t``'s."""
    if density >= 1:
        return t
    work = _work_dtype(t)
    p = float(torch.tensor(density, dtype=work))  # mergekit's probability is density rounded to the work dtype
    mask = (draws() < p).to(work)
    return apply_mask(t.to(work), mask, rescale).to(t.dtype)


def keep_by_rank(t: torch.Tensor, density: float, epsilon: float, rescale: bool,
                 draws: Callable[[], torch.Tensor], name: str = "") -> torch.Tensor:
    """DELLA's MagPrune: keep entry j with probability ``density − ε + 2ε·r_j``, r_j its normalized magnitude rank.

    Ranks run along dimension 1 (a vector is one row): ``r = (rank − min) / (max − min)`` in
    [0, 1], ranks from 1 by ascending magnitude. A row of one entry has no normalized rank
    (0/0, where mergekit's ``torch.bernoulli`` fails): it is kept with probability ``density``.
    """
    if density >= 1:
        return t
    if density <= 0:
        return torch.zeros_like(t)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise TaskArithError(f"della: density ± epsilon must lie in (0, 1), got density={density}, "
                             f"epsilon={epsilon} (tensor {name!r}): lower epsilon, or move density away from 0 and 1")
    shape = t.shape
    work = _work_dtype(t)
    rows = t.unsqueeze(0) if t.dim() < 2 else t
    if rows.numel() == 0:
        return t
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    ranks = order.argsort(dim=1).to(work) + 1
    lowest = ranks.min(dim=1, keepdim=True).values
    highest = ranks.max(dim=1, keepdim=True).values
    if rows.shape[1] < 2:  # one entry per row: no rank to spread, keep with probability density
        spread = torch.full_like(ranks, 0.5)
    else:
        spread = ((ranks - lowest) / (highest - lowest)).clamp(0, 1)
    p = (density - epsilon) + spread * 2 * epsilon
    mask = (draws().view(rows.shape) < p).to(work)
    return apply_mask(rows.to(work), mask, rescale).to(t.dtype).reshape(shape)
