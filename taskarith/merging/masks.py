"""Masking methods over whole tensors: Model Breadcrumbs, consensus (TALL masks)."""

from __future__ import annotations

import math

import torch

from ..backends import kernels
from ._spec import SCALE, Method, Option, finite, fraction, integer
from ._steps import total, weighted


def breadcrumbs(block, *, density, top, scale):
    """Model Breadcrumbs: per tensor, drop the largest ``top`` fraction and keep the next ``density``, then sum."""
    parts = []
    for t in block.deltas:
        n = t.numel()
        k_top = math.floor(top * n)
        k_end = min(n, k_top + math.floor(density * n))
        magnitude = t.abs()
        # Selections are nested (same total order), so this keeps exactly k_end - k_top entries.
        mask = kernels.topk_mask(magnitude, k_end) & ~kernels.topk_mask(magnitude, k_top)
        parts.append({block.name: torch.where(mask, t, 0)})  # a dropped entry is 0 (t * mask made inf·0 = NaN)
    return total(weighted(parts, block.weights), scale)[block.name]


def consensus(block, *, k, lambda_, scale):
    """Consensus merging (TALL masks): keep the entries of ``Σ w_i τ_i`` that at least ``k`` tasks deem important.

    Task t deems entry j important when ``|w_t τ_t,j| >= lambda_ · |τ_MTL,j − w_t τ_t,j|``
    with ``τ_MTL = Σ w_i τ_i``.
    """
    parts = [d * w for d, w in zip(block.deltas, block.weights)]
    summed = sum(parts)
    votes = sum(((p.abs() >= lambda_ * (summed - p).abs()) for p in parts), torch.zeros_like(summed, dtype=torch.int32))
    return torch.where(votes >= k, summed, 0) * scale


# Their masks hide NaN: inputs are checked.
METHODS = (
    Method("breadcrumbs", breadcrumbs, "https://arxiv.org/abs/2312.06795",
           {"density": Option(0.9, fraction(0.0, 1.0, lo_open=True), "a number in (0, 1]"),
            "top": Option(0.01, fraction(0.0, 1.0, hi_open=True), "a number in [0, 1)"), "scale": SCALE},
           symmetric=True, identity={"density": 1.0, "top": 0.0}),
    Method("consensus", consensus, "https://arxiv.org/abs/2405.07813",
           {"k": Option(2, lambda x: integer(x) and x >= 1, "an int >= 1"),
            "lambda_": Option(0.5, lambda x: finite(x) and x >= 0, "a finite number >= 0", multiplies=True),
            "scale": SCALE},
           split="elementwise", symmetric=True, identity={"k": 1}),
)
