"""Spectral methods over 2-D weights: Task Singular Vectors (TSV-Merge), Iso-C."""

from __future__ import annotations

import math

import torch

from ..errors import NonFiniteError
from ._spec import SCALE, Method, Option, fraction


def tsv(block, *, rank_fraction, scale):
    """Task Singular Vectors (TSV-Merge): per 2-D weight, keep each task's top singular vectors,
    decorrelate the concatenated bases, and recombine; other tensors are averaged.

    Each of T tasks keeps ``max(1, floor(rank_fraction · min(m, n)))`` singular
    triplets of ``w_t ΔW_t`` (default fraction ``1/T``); the stacked left and
    right bases are replaced by their closest orthogonal matrices (``P Qᵀ`` of
    their SVDs). Result × ``scale``. The result does not depend on the order of
    the vectors when the stacked bases have full rank (vectors in general
    position); for rank-deficient stacks the orthogonalisation is not unique.
    """
    count = len(block.deltas)
    fraction_ = rank_fraction if rank_fraction is not None else 1.0 / count
    tensors = [d * w for d, w in zip(block.deltas, block.weights)]
    if tensors[0].dim() != 2 or min(tensors[0].shape) == 0:
        return sum(tensors) / count * scale
    r = max(1, math.floor(fraction_ * min(tensors[0].shape)))
    us, ss, vs = [], [], []
    for i, t in enumerate(tensors):
        _require_finite(t, "tsv", f"vector #{i} {block.name!r} (times its weight)")
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        # Directions of (numerically) zero singular values are arbitrary and add nothing to the
        # sum; leaving them out keeps the orthogonalisation well defined.
        keep = s[:r] > s[:1].clamp_min(torch.finfo(s.dtype).tiny) * torch.finfo(s.dtype).eps * max(t.shape)
        us.append(u[:, :r][:, keep]), ss.append(s[:r][keep]), vs.append(vh[:r].T[:, keep])
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    if s_cat.numel() == 0:
        return torch.zeros_like(tensors[0])
    return (_closest_orthogonal(u_cat) * s_cat) @ _closest_orthogonal(v_cat).T * scale


def iso_c(block, *, scale):
    """Iso-C: per 2-D weight, the SVD of ``Σ w_i ΔW_i`` with every singular value replaced by their mean;
    other tensors are summed (task arithmetic). Result × ``scale``.
    """
    summed = sum(d * w for d, w in zip(block.deltas, block.weights))
    if summed.dim() == 2 and min(summed.shape) > 0:
        _require_finite(summed, "iso_c", f"the weighted sum of {block.name!r}")
        u, s, vh = torch.linalg.svd(summed, full_matrices=False)
        summed = s.mean() * (u @ vh)
    return summed * scale


def _require_finite(matrix: torch.Tensor, method: str, what: str) -> None:
    """An SVD needs finite values: refuse inf (NaN inputs were refused before the method ran)."""
    if not bool(torch.isfinite(matrix).all()):
        raise NonFiniteError(f"{method} takes the SVD of {what}, which is not finite (an infinite delta, or a "
                             f"value beyond the dtype's range): SVD needs finite values. Leave that vector out, or "
                             f"lower its weight.")


def _closest_orthogonal(m: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


# SVDs fail on NaN: inputs are checked.
METHODS = (
    Method("tsv", tsv, "https://arxiv.org/abs/2412.00081",
           {"rank_fraction": Option(None, lambda x: x is None or fraction(0.0, 1.0, lo_open=True)(x),
                                    "None (1/#tasks) or a number in (0, 1]"), "scale": SCALE}),
    Method("iso_c", iso_c, "https://arxiv.org/abs/2502.04959", {"scale": SCALE}, symmetric=True),
)
