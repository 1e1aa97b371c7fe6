"""Consolidation: each vector keeps its highest-scoring entries (integrated-gradient attributions, or
magnitudes), signs are settled entry by entry, and what agrees is merged.

The selection is decided once per merge from the scores alone (:func:`plan`), so any block of any
tensor is merged the same way in memory and out of core. :func:`taskarith.consolidate` validates
the scores and calls this method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..backends.election import disjoint_mean, elect_sign
from ..backends.kernels import topk_mask
from ..errors import TaskArithError
from ._spec import Method, Option, fraction

SCOPES = ("global", "tensor")
SELECTS = ("positive", "abs")
RESOLVES = ("attribution", "sign_sum", "max")
MERGES = ("disjoint_mean", "sum")


def plan(shapes: Mapping[str, tuple[int, ...]], deltas, *, scores, density, scope, select, resolve, merge):
    """Per vector, ``(eligible scores, kept-entry masks)`` by name: the ``floor(density·n)`` entries
    with the largest eligible score, ``n`` the vector's (``scope="global"``) or each tensor's size.
    Without ``scores`` the scores are the magnitudes of the deltas."""
    names = list(shapes)
    if scores is None:
        per_name = {n: deltas(n) for n in names}
        scores = [{n: per_name[n][i].abs() for n in names} for i in range(len(next(iter(per_name.values()), [])))]
    eligible = [{n: s[n].abs() if select == "abs" else s[n] for n in names} for s in scores]
    return [(e, _select(e, names, density, scope, select)) for e in eligible]


def consolidate(block, *, scores, density, scope, select, resolve, merge):
    """Consolidation: per vector keep the top-``density`` entries by score, settle signs
    (``resolve``: ``"attribution"``, ``"sign_sum"`` or ``"max"``), merge what agrees (``merge``:
    ``"disjoint_mean"`` or ``"sum"``). See :func:`taskarith.consolidate`."""
    if len(block.stats) != len(block.deltas):
        raise TaskArithError(f"consolidate got {len(block.stats)} score maps for {len(block.deltas)} vectors; "
                             f"pass one per vector, in order")
    stop = block.start + block.deltas[0].numel()
    shape = block.deltas[0].shape
    cut = [(e[block.name].reshape(-1)[block.start:stop].view(shape), m[block.name].reshape(-1)[block.start:stop].view(shape))
           for e, m in block.stats]
    values = list(block.deltas)
    kept = [m for _, m in cut]
    out = torch.empty(shape, dtype=values[0].dtype, device=values[0].device)
    trimmed = [torch.where(m, v, 0) for m, v in zip(kept, values)]
    if resolve == "max":
        ranked = torch.stack([torch.where(m, e, -math.inf) for e, m in cut])
        winner = ranked.argmax(0)  # first maximum: ties go to the earliest vector
        out.zero_()
        for i, (m, v) in enumerate(zip(kept, values)):
            out.add_(torch.where(m & (winner == i), v, 0))
        return out
    if resolve == "sign_sum":
        sign = elect_sign(trimmed, "sum")
    else:
        plus = torch.zeros(shape, dtype=torch.float64, device=out.device)
        minus = torch.zeros_like(plus)
        for (e, m), v in zip(cut, values):
            plus += torch.where(m & (v > 0), e, 0)
            minus += torch.where(m & (v < 0), e, 0)
        sign = torch.where(plus >= minus, 1, -1).to(torch.int8)
    if merge == "disjoint_mean":
        return disjoint_mean(trimmed, sign, out)
    total = torch.zeros(shape, dtype=torch.float64 if out.dtype == torch.float64 else torch.float32, device=out.device)
    for t in trimmed:
        total += torch.where(torch.sign(t).to(torch.int8) == sign, t, 0)  # zeros never agree
    return out.copy_(total)


def _select(eligible: dict[str, torch.Tensor], names: list[str], density: float, scope: str, select: str):
    """name -> boolean mask of the kept entries of one vector."""

    def top(e: torch.Tensor, k: int) -> torch.Tensor:
        if select == "abs":
            return topk_mask(e, k)
        positive = e > 0
        return topk_mask(torch.where(positive, e, -math.inf), k) & positive

    if scope == "tensor":
        return {n: top(eligible[n], math.floor(density * eligible[n].numel())) for n in names}
    flat = torch.cat([eligible[n].reshape(-1) for n in names]) if names else torch.zeros(0)
    mask = top(flat, math.floor(density * flat.numel()))
    out, start = {}, 0
    for n in names:
        size = eligible[n].numel()
        out[n] = mask[start:start + size].view(eligible[n].shape)
        start += size
    return out


def _score_maps(x) -> bool:
    return (isinstance(x, Sequence) and not isinstance(x, (str, bytes, Mapping))
            and all(isinstance(s, Mapping) for s in x))


METHODS = (
    Method("consolidate", consolidate, "https://arxiv.org/abs/2306.01708",
           {"scores": Option(None, lambda x: x is None or _score_maps(x),
                             "None (the deltas' magnitudes) or one mapping name -> score tensor per vector"),
            "density": Option(0.2, fraction(0.0, 1.0, lo_open=True), "a number in (0, 1]"),
            "scope": Option("global", lambda x: x in SCOPES, "'global' or 'tensor'"),
            "select": Option("positive", lambda x: x in SELECTS, "'positive' or 'abs'"),
            "resolve": Option("attribution", lambda x: x in RESOLVES, "'attribution', 'sign_sum' or 'max'"),
            "merge": Option("disjoint_mean", lambda x: x in MERGES, "'disjoint_mean' or 'sum'")},
           split="elementwise", plan=plan),
)
