"""Entry selection between fine-tuned and base weights, as mergekit 0.1.5 computes it: NearSwap,
Arcee Fusion, RAM and RAM+ (tensor-local).

Every method here takes the models' weights and the base's (``inputs="weights"``) and returns
merged weights, repeating mergekit's sequence of torch operations so that, in the same dtype and
on the same torch build, the result has the same bits (and the same dtype: where mergekit's
arithmetic promotes half-precision inputs to float32, so does this; the driver casts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import TaskArithError
from ._spec import Method, Option, finite, integer

_NEARSWAP_FLOOR = 1e-6  # |base − model| below this counts as this
_FUSION_EPS = 1e-8  # added to both softmaxes before the KL divergence
_FUSION_SAMPLE = 1_000_000  # above this many entries, quantiles come from a sample of this size
_FUSION_QUANTILES = (0.25, 0.5, 0.75)


def _pair(block, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(block.models) != 1:
        raise TaskArithError(f"{method} merges the base with exactly one model; got {len(block.models)} models for "
                             f"tensor {block.name!r}")
    return _base(block, method), block.models[0]


def _base(block, method: str) -> torch.Tensor:
    if block.base is None:
        raise TaskArithError(f"{method} reads the base weights, but none were handed for tensor {block.name!r}")
    return block.base


# ----------------------------------------------------------------- NearSwap


def nearswap(block, *, t):
    """NearSwap: take the model's value where it lies near the base's, keep the base's where they differ much.

    ``w = clamp(t / max(|a − b|, 1e-6), 0, 1)`` per entry (a: base, b: model), and the result
    ``w·b + (1 − w)·a``: entries within ``t`` of the base become the model's, farther ones move
    toward it by ``t / |a − b|``. Computed in the inputs' dtype.

    Reference: https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001 (mergekit ``nearswap``).
    mergekit parameters: ``t`` (required). Takes the base and exactly one model; weights are unused.
    """
    a, b = _pair(block, "nearswap")
    w = (t / torch.abs(a - b).clamp(min=_NEARSWAP_FLOOR)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


# ----------------------------------------------------------------- Arcee Fusion


def _fusion_scores(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|model − base|`` times the KL divergence of the last axis' softmaxes (one per row)."""
    p = F.softmax(model, dim=-1) + _FUSION_EPS
    q = F.softmax(base, dim=-1) + _FUSION_EPS
    return (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _fusion_threshold(scores: torch.Tensor, seed: int) -> torch.Tensor:
    """Median + 1.5 × interquartile range, from the sorted scores (a sample of them for large tensors)."""
    flat = scores.reshape(-1)
    if flat.numel() > _FUSION_SAMPLE:
        # mergekit draws these indices from the device's global generator; here, a CPU generator
        # seeded per tensor (the same indices as mergekit's when its CPU generator is in that state).
        picks = torch.randint(flat.numel(), (_FUSION_SAMPLE,), generator=torch.Generator().manual_seed(seed))
        flat = flat[picks.to(flat.device)]
    ordered = torch.sort(flat)[0]
    at = (torch.tensor(_FUSION_QUANTILES).to(ordered.device) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(block, *, seed):
    """Arcee Fusion: keep the model's change only where its importance is an upper outlier.

    Importance ``s = |b − a| · KL(softmax(b) + 1e-8 ‖ softmax(a) + 1e-8)`` (softmax and KL over the
    last axis, a: base, b: model); threshold ``τ = Q₂ + 1.5·(Q₃ − Q₁)`` of ``s`` (quartiles read
    at index ``floor(q·(n−1))`` of the sorted scores; tensors above 10⁶ entries use 10⁶ draws
    with replacement, from a CPU generator seeded with ``seed``); result ``a + (b − a)·[s >= τ]``.
    Half-precision inputs give a float32 result, as in mergekit (its mask is float32).

    Reference: https://arcee.ai (mergekit ``arcee_fusion``).
    mergekit parameters: none (its large-tensor sample uses the global generator: ``seed`` here).
    Takes the base and exactly one model; weights are unused.
    """
    a, b = _pair(block, "arcee_fusion")
    scores = _fusion_scores(b, a)
    keep = (scores >= _fusion_threshold(scores, seed)).float()
    return a + (b - a) * keep


# ----------------------------------------------------------------- RAM, RAM+


def _ram_parts(block, epsilon: float, method: str):
    """Task vectors (one row each), which entries count (``|τ| > epsilon``), and per entry how many count."""
    base = _base(block, method)
    rows = torch.stack([m - base for m in block.models], dim=0).view(len(block.models), -1)
    counts = rows.abs() > epsilon
    contributors = counts.sum(dim=0, keepdim=True)
    return base, rows, counts, contributors, contributors > 1, contributors == 1


def ram(block, *, epsilon):
    """RAM: entries changed by one model keep its change; entries changed by several get their mean.

    Per entry, with ``τ_i = x_i − base`` and ``c`` the number of models with ``|τ_i| > epsilon``:
    ``base + Σ_i [|τ_i| > epsilon] · τ_i · (1 if c = 1 else 1/c)``. Computed in the inputs' dtype.

    Reference: https://arxiv.org/abs/2601.13572 (mergekit ``ram``).
    mergekit parameters: ``epsilon`` (1e-5). Weights are unused.
    """
    base, rows, counts, contributors, shared, unique = _ram_parts(block, epsilon, "ram")
    kept = rows * counts
    merged = ((kept * unique) + (kept * shared / contributors.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(block, *, r, alpha, epsilon):
    """RAM+ (tensor-local): RAM with each model's unique entries boosted by how much of it is shared.

    As :func:`ram`, but the entries only model i changes are scaled by
    ``λ_i = 1 + r · clamp(ρ_i, 0, alpha)``, where ``ρ_i`` is the number of model i's counted entries
    that other models change too over the number only it changes (at least ``epsilon``), within
    the tensor. Half-precision inputs give a float32 result, as in mergekit (λ is float32).

    Reference: https://arxiv.org/abs/2601.13572 (mergekit ``ramplus_tl``).
    mergekit parameters: ``r`` (0.1), ``alpha`` (0.2), ``epsilon`` (1e-5). Weights are unused.
    """
    base, rows, counts, contributors, shared, unique = _ram_parts(block, epsilon, "ramplus_tl")
    ratio = (counts & shared).sum(dim=1) / (counts & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * ratio.clamp(min=0, max=alpha)
    kept = rows * counts
    merged = ((kept * unique * boost.unsqueeze(-1)) + (kept * shared / contributors.clamp(min=1))).sum(
        dim=0, keepdim=True)
    return base + merged.reshape_as(base)


_EPSILON = Option(1e-5, lambda x: finite(x) and x >= 0, "a finite number >= 0")

METHODS = (
    Method("nearswap", nearswap, "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
           {"t": Option(None, lambda x: finite(x) and x >= 0, "a finite number >= 0", required=True)}, split="elementwise", needs_base=True, inputs="weights"),
    Method("arcee_fusion", arcee_fusion, "https://arcee.ai",
           {"seed": Option(0, lambda x: integer(x) and 0 <= x < 2 ** 63, "an int in [0, 2^63)")},
           needs_base=True, inputs="weights"),
    Method("ram", ram, "https://arxiv.org/abs/2601.13572", {"epsilon": _EPSILON},
           split="elementwise", needs_base=True, inputs="weights"),
    Method("ramplus_tl", ramplus_tl, "https://arxiv.org/abs/2601.13572",
           {"r": Option(0.1, lambda x: finite(x) and x >= 0, "a finite number >= 0"),
            "alpha": Option(0.2, lambda x: finite(x) and x >= 0, "a finite number >= 0"),
            "epsilon": Option(1e-5, lambda x: finite(x) and x > 0, "a finite number > 0")},
           needs_base=True, inputs="weights"),
)
