"""TIES' sign election and disjoint mean over trimmed tensors (the torch reference)."""

from __future__ import annotations

import torch

__all__ = ["disjoint_mean", "elect_sign"]


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
