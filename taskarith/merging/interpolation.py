"""Spherical interpolation of weights, as mergekit 0.1.5 computes it: SLERP, NuSLERP, Multi-SLERP, Karcher mean.

Every method here takes the models' weights (``inputs="weights"``) and returns merged weights,
repeating mergekit's sequence of torch operations so that, in the same dtype and on the same
torch build, the result has the same bits. mergekit makes the base of NuSLERP, Multi-SLERP and
the Karcher mean optional; here the ``use_base`` option says whether to use it (it then has to
be handed in ``block.base``).
"""

from __future__ import annotations

import torch

from ..errors import TaskArithError
from ._spec import Method, Option, finite, fraction, integer

# mergekit's SLERP reduces a tensor's entries in runs of 2^20 (its scratch bound, for one tensor
# at a time): the norms and the dot product are sums of per-run parts, so the runs fix the bits.
_SLERP_RUN = 1 << 20
_SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this: the pair is treated as colinear
_TINY_NORM = 1e-8
_NUSLERP_NORM_FLOOR = 1e-7
_NUSLERP_COLINEAR = 1e-8


def _flag(default: bool) -> Option:
    return Option(default, lambda x: isinstance(x, bool), "true or false")


USE_BASE = _flag(False)


def _count(block, method: str, lo: int, hi: int | None = None) -> None:
    n = len(block.models)
    if n < lo or (hi is not None and n > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        raise TaskArithError(f"{method} merges {want} model(s) besides the base; got {n} for tensor {block.name!r}")


def _base(block, method: str, use_base: bool) -> torch.Tensor | None:
    if not use_base:
        return None
    if block.base is None:
        raise TaskArithError(f"{method} with use_base=True interpolates relative to the base weights, but none were "
                             f"handed for tensor {block.name!r}")
    return block.base


def _wide(x: torch.Tensor) -> torch.dtype:
    """The dtype mergekit widens to for its reductions: float64 stays, anything else goes to float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------- SLERP


def slerp(block, *, t):
    """SLERP: the great-circle path from the base's weights to the model's, at fraction ``t``.

    ``θ = arccos(⟨a/|a|, b/|b|⟩)`` over the whole flattened tensor (a: base, b: model), then
    ``sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b``; where ``|cos θ| > 0.9995`` it falls back to
    ``(1−t)·a + t·b``. Norms of at most 1e-8 count as 1. Computed in float32 (float64 stays float64)
    and rounded once to the inputs' dtype.

    Reference: https://en.wikipedia.org/wiki/Slerp (mergekit ``slerp``).
    mergekit parameters: ``t`` (required). Takes the base and exactly one model; weights are unused.
    """
    _count(block, "slerp", 1, 1)
    if block.base is None:
        raise TaskArithError(f"slerp interpolates from the base weights, but none were handed for {block.name!r}")
    a = block.base.reshape(1, -1)
    b = block.models[0].reshape(1, -1)
    wide = _wide(block.base)
    frac = torch.tensor([[t]], dtype=wide, device=a.device)
    n = a.shape[1]
    if n == 0:
        return ((1 - frac) * a + frac * b).reshape(block.base.shape).to(block.base.dtype)
    runs = [(lo, min(lo + _SLERP_RUN, n)) for lo in range(0, n, _SLERP_RUN)]

    def run(x, lo, hi):
        return x[:, lo:hi].to(wide)

    # The norm of the per-run norms, each floored to 1 when tiny.
    norm_a = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(run(a, lo, hi), dim=1, keepdim=True) for lo, hi in runs]), dim=0)
    norm_b = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(run(b, lo, hi), dim=1, keepdim=True) for lo, hi in runs]), dim=0)
    norm_a = torch.where(norm_a > _TINY_NORM, norm_a, 1)
    norm_b = torch.where(norm_b > _TINY_NORM, norm_b, 1)
    # Each run is normalised before the product, then the per-run sums are added.
    cos = torch.stack([((run(a, lo, hi) / norm_a) * (run(b, lo, hi) / norm_b)).sum(dim=1, keepdim=True)
                       for lo, hi in runs]).sum(dim=0).clamp(-1, 1)
    straight = cos.abs() > _SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(straight, 0, cos))
    sin_theta = torch.sin(theta)
    ca = torch.where(straight, 1 - frac, torch.sin((1 - frac) * theta) / sin_theta)
    cb = torch.where(straight, frac, torch.sin(frac * theta) / sin_theta)
    out = torch.empty_like(a)
    for lo, hi in runs:
        out[:, lo:hi] = ca * run(a, lo, hi) + cb * run(b, lo, hi)
    return out.reshape(block.base.shape)


# ----------------------------------------------------------------- NuSLERP


def _nuslerp_pair(t: float, x: torch.Tensor, y: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    shape = x.shape
    if flatten:
        x, y = x.reshape(-1), y.reshape(-1)
    elif row_wise:
        x, y = x.transpose(0, -1), y.transpose(0, -1)
    ux = x / torch.norm(x, dim=-1, keepdim=True).clamp(min=_NUSLERP_NORM_FLOOR)
    uy = y / torch.norm(y, dim=-1, keepdim=True).clamp(min=_NUSLERP_NORM_FLOOR)
    cos = torch.sum(ux * uy, dim=-1, keepdim=True).clamp(-1, 1)
    straight = (1 - cos.square()) <= _NUSLERP_COLINEAR ** 2
    theta = torch.acos(torch.where(straight, 0, cos))
    curved = (torch.sin((1 - t) * theta) * x + torch.sin(t * theta) * y) / torch.sin(theta)
    out = torch.where(straight, (1 - t) * x + t * y, curved)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(block, *, nuslerp_row_wise, nuslerp_flatten, use_base):
    """NuSLERP: SLERP between two models at ``t = w₂ / (w₁ + w₂)`` (0.5 when the weights sum to ~0).

    With ``x, y`` the two models (their task vectors ``x − base, y − base`` when ``use_base``):
    ``(sin((1−t)θ)·x + sin(tθ)·y) / sin θ`` with ``cos θ = ⟨x/|x|, y/|y|⟩`` (norms floored at 1e-7),
    and ``(1−t)·x + t·y`` where ``1 − cos²θ <= 1e-16``; ``base +`` that result when ``use_base``.
    θ is taken over the whole flattened tensor (``nuslerp_flatten``, the default), else per
    row (the last axis) or, with ``nuslerp_row_wise``, per column (the first axis). Computed
    in the inputs' dtype.

    Reference: mergekit's ``nuslerp`` (https://github.com/arcee-ai/mergekit).
    mergekit parameters: ``weight`` (per model: the merge's weights), ``nuslerp_row_wise`` (false),
    ``nuslerp_flatten`` (true). mergekit uses the base when the config names one: ``use_base``.
    """
    _count(block, "nuslerp", 2, 2)
    base = _base(block, "nuslerp", use_base)
    total = sum(block.weights)
    t = 0.5 if abs(total) < 1e-6 else block.weights[1] / total
    x, y = block.models
    if base is None:
        return _nuslerp_pair(t, x, y, nuslerp_row_wise, nuslerp_flatten)
    return base + _nuslerp_pair(t, x - base, y - base, nuslerp_row_wise, nuslerp_flatten)


# ----------------------------------------------------------------- Multi-SLERP


def multislerp(block, *, normalize_weights, eps, use_base):
    """Multi-SLERP: a weighted barycentre of several models on the hypersphere, through its tangent space.

    With ``u_i = x_i / (|x_i| + eps)`` (``x_i`` the models, or their task vectors when ``use_base``)
    and weights ``w`` (divided by their sum when ``normalize_weights``): ``m = Σ w_i u_i / |Σ w_i u_i|``,
    tangent ``v = Σ w_i (u_i − ⟨u_i, m⟩ m)``, ``s = |v| + eps``, and the result
    ``(cos s · m + sin s / s · v) · Σ w_i |x_i|`` (plus the base when ``use_base``). When
    ``|Σ w_i u_i| < eps`` two models are averaged linearly and more are refused. One model is
    returned as is. Computed in the inputs' dtype (the weights too).

    Reference: https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (mergekit ``multislerp``).
    mergekit parameters: ``weight`` (per model: the merge's weights), ``normalize_weights`` (true),
    ``eps`` (1e-8). mergekit uses the base when the config names one: ``use_base``.
    """
    _count(block, "multislerp", 1)
    base = _base(block, "multislerp", use_base)
    if len(block.models) == 1:
        return block.models[0]
    points = torch.stack(block.models, dim=0)
    if base is not None:
        points -= base
    flat = points.view(points.shape[0], -1)
    w = torch.tensor(block.weights, dtype=points.dtype, device=points.device)
    if normalize_weights:
        if float(w.sum()) == 0:  # 0/0: mergekit's result would be NaN
            raise TaskArithError(f"multislerp: the weights {list(block.weights)} sum to zero and normalize_weights "
                                 f"divides by their sum (tensor {block.name!r}); change the weights")
        w = w / w.sum()
    column = w.view(-1, 1)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    centre = (units * column).sum(0)
    centre_norm = torch.norm(centre)
    if centre_norm < eps:
        if points.shape[0] != 2:
            raise TaskArithError(
                f"multislerp: the weighted sum of the unit directions of tensor {block.name!r} vanishes (opposite "
                "models whose weights cancel); change the weights")
        out = (points[0] * w[0] + points[1] * w[1]).view(points.shape[1:])
        return out if base is None else out + base
    centre = centre / centre_norm
    along = (units * centre).sum(-1, keepdim=True)
    tangent = ((units - along * centre) * column).sum(0)
    length = torch.norm(tangent) + eps
    out = centre * torch.cos(length) + tangent * (torch.sin(length) / length)
    out = (out * (norms.squeeze(-1) * w).sum()).view(points.shape[1:])
    return out if base is None else out + base


# ----------------------------------------------------------------- Karcher mean


def _karcher(points: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    if len(points) == 1:
        return points[0]
    alphas = [1.0 / len(points)] * len(points)
    wide = _wide(points[0])
    norms, units = [], []
    for p in points:
        norm = torch.linalg.vector_norm(p.to(wide))
        norms.append(norm)
        units.append(torch.zeros_like(p) if norm.item() == 0.0 else (p / norm).to(p.dtype))
    kept = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not kept:
        return sum(p * 0 for p in points)
    total = sum(alphas[i] for i in kept)
    coeffs = [alphas[i] / total for i in kept]
    dirs = [units[i] for i in kept]
    mean = torch.zeros_like(dirs[0])
    for c, u in zip(coeffs, dirs):
        mean += c * u
    length = torch.linalg.vector_norm(mean.to(wide))
    mean = dirs[0].clone() if length.item() < tol else (mean / length).to(mean.dtype)
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for c, u in zip(coeffs, dirs):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            angle = torch.arccos(cos)
            if angle.item() < tol:
                continue
            step += c * (angle / torch.sin(angle)) * (u - cos * mean)
        size = torch.linalg.vector_norm(step.to(wide))
        if size.item() < tol:
            break
        mean = (torch.cos(size) * mean + torch.sin(size) * (step / size)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.to(wide))
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def karcher(block, *, max_iter, tol, use_base):
    """Karcher mean: the equal-weight Riemannian centre of the models' directions, scaled by their mean norm.

    Directions ``u_i = x_i/|x_i|`` (those with ``|x_i| <= tol`` are left out of the centre);
    starting from the normalised average, up to ``max_iter`` steps along the average log map
    ``Σ (θ_i / sin θ_i)(u_i − cos θ_i · m) / k`` (``cos θ_i = ⟨m, u_i⟩``), stopping once the
    step's norm is below ``tol``; the result is ``(Σ |x_i| / n) · m``. Norms are taken in
    float32 (float64 stays float64); everything else in the inputs' dtype. The merge's
    weights are unused: every input counts ``1/n``, as in mergekit.

    Reference: https://arxiv.org/abs/2603.04972 (mergekit ``karcher``).
    mergekit parameters: ``max_iter`` (10), ``tol`` (1e-5). mergekit averages the base too when
    the config names one (as the last input when it is not among the models): ``use_base``
    appends ``block.base`` to the models.
    """
    _count(block, "karcher", 1)
    base = _base(block, "karcher", use_base)
    points = list(block.models) + ([] if base is None else [base])
    return _karcher(points, max_iter, tol)


METHODS = (
    Method("slerp", slerp, "https://en.wikipedia.org/wiki/Slerp",
           {"t": Option(None, fraction(0.0, 1.0), "a number in [0, 1]", required=True)},
           needs_base=True, inputs="weights"),
    Method("nuslerp", nuslerp, "https://github.com/arcee-ai/mergekit",
           {"nuslerp_row_wise": _flag(False), "nuslerp_flatten": _flag(True), "use_base": USE_BASE},
           inputs="weights"),
    Method("multislerp", multislerp, "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
           {"normalize_weights": _flag(True),
            "eps": Option(1e-8, lambda x: finite(x) and x > 0, "a finite number > 0"), "use_base": USE_BASE},
           inputs="weights", identity={}),
    Method("karcher", karcher, "https://arxiv.org/abs/2603.04972",
           {"max_iter": Option(10, lambda x: integer(x) and x >= 0, "an int >= 0"),
            "tol": Option(1e-5, lambda x: finite(x) and x >= 0, "a finite number >= 0"), "use_base": USE_BASE},
           inputs="weights", identity={}),
)
