"""mergekit 0.1.5's merge methods, reproduced bit for bit: generalized task arithmetic and its kin.

Every method here takes the models' weights (``inputs="weights"``) and repeats mergekit's torch
operations in the same order and dtypes, so that on the same torch build a float32 or bfloat16
merge gives mergekit's bits. Random masks come from :meth:`Block.random
<taskarith.merging.Block.random>` (reproducible for a seed) where mergekit calls
``torch.bernoulli``: those methods match mergekit in distribution.

The generalized task arithmetic family computes, with ``τ_i = θ_i − θ_base`` in the inputs' dtype::

    δ_i = w_i · sparsify(τ_i)                   (w_i rounded to that dtype)
    m   = Σ_i c_i δ_i,   d = Σ_i c_i w_i        (c_i = 1, or, with sign consensus,
                                                 c_i = [sign δ_i = elected sign], elected sign
                                                 = + where Σ_i δ_i >= 0, else −)
    θ   = θ_base + λ · (m / d if normalize else m)

where ``d`` is replaced by 1 where it is 0 (consensus) or below 1e-8 in magnitude (no consensus).
Its members differ in the sparsifier (:mod:`.mergekit_sparsify`), the consensus step and the
defaults of ``normalize`` and ``rescale``. Their parameters are mergekit's, ``lambda`` spelled
``lambda_``; per-model ones (``density``, ``gamma``, ``epsilon``) take one number or a list of one
per model. The methods that share a name with a taskarith built-in of other semantics
(``task_arithmetic``, ``ties``, ``dare_ties``, ``breadcrumbs``) are registered as ``mergekit_<name>``.
"""

from __future__ import annotations

import torch

from ..errors import TaskArithError
from . import mergekit_sparsify as sp
from ._spec import SEED, Method, Option, each, finite, fraction, per_model, promote


def _aligned(tensors) -> list[torch.Tensor]:
    """The tensors in their promoted dtype, as mergekit aligns a group (a no-op where they agree)."""
    dtype = promote([t.dtype for t in tensors])
    return [t.to(dtype) for t in tensors]


def _elected(deltas: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """Where each input's sign is the elected one: the sign of the sum over inputs, + on a tie."""
    signs = deltas.sign().to(mask_dtype)
    elected = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return signs == elected


def _sparsified(block, i: int, delta: torch.Tensor, kind: str | None, rescale: bool, density: float,
                gamma: float | None, epsilon: float | None) -> torch.Tensor:
    if kind is None:
        return delta
    if kind == "magnitude":
        return sp.keep_largest(delta, density, rescale)
    if kind == "outliers":
        return sp.keep_middle(delta, density, rescale, gamma)
    if kind == "random":
        return sp.keep_random(delta, density, rescale, lambda: block.random(i))
    return sp.keep_by_rank(delta, density, epsilon, rescale, lambda: block.random(i), block.name)


def _gta(block, *, kind, consensus, normalize, rescale, lambda_, int8_mask, density, gamma=None, epsilon=None):
    """The family's shared computation (see the module's docstring)."""
    base, *models = _aligned((block.base, *block.models))
    n = len(models)
    if n == 0:
        return base
    densities = per_model(density, n)
    gammas = per_model(gamma, n)
    epsilons = per_model(epsilon, n)
    deltas = torch.stack([_sparsified(block, i, m - base, kind, rescale, densities[i], gammas[i], epsilons[i])
                          for i, m in enumerate(models)])
    weights = torch.tensor(list(block.weights), dtype=deltas.dtype, device=deltas.device)
    weights = weights.view(n, *(1,) * base.dim())
    deltas.mul_(weights)
    if consensus:
        agree = _elected(deltas, torch.int8 if int8_mask else base.dtype)
        mixed = (deltas * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


_COMMON_DOC = """
    mergekit parameters: ``weight`` (per model: the merge's weights), ``density`` (per model,
    default 1.0), {extra}``normalize`` (default {normalize}), ``rescale`` (default {rescale}),
    ``lambda`` (here ``lambda_``, default 1.0), ``int8_mask`` (default false: the consensus mask's
    dtype, which does not change the result){seed}.
"""


def task_arithmetic(block, *, normalize, rescale, lambda_, int8_mask, density):
    """mergekit's task arithmetic: the base plus the weighted sum of the task vectors.

    ``θ = θ_base + λ · Σ_i w_i τ_i`` (divided by ``Σ_i w_i`` with ``normalize``); ``τ_i = θ_i − θ_base``.
    No sparsification: ``density`` and ``rescale`` are accepted and unused, as in mergekit.
    Paper: https://arxiv.org/abs/2212.04089
    """
    return _gta(block, kind=None, consensus=False, normalize=normalize, rescale=rescale, lambda_=lambda_,
                int8_mask=int8_mask, density=density)


def ties(block, *, normalize, rescale, lambda_, int8_mask, density):
    """mergekit's TIES: keep each task vector's largest magnitudes, elect a sign per entry, average the agreeing.

    ``δ_i = w_i · top_k(τ_i)`` with ``k = max(1, int(density·n))`` (ties broken by torch's argsort);
    ``θ = θ_base + λ · Σ_i c_i δ_i / Σ_i c_i w_i`` with ``c_i`` = 1 where ``sign δ_i`` is the sign of
    ``Σ_i δ_i`` (+ for 0). With ``rescale``, each trimmed ``τ_i`` keeps its L1 norm.
    Paper: https://arxiv.org/abs/2306.01708
    """
    return _gta(block, kind="magnitude", consensus=True, normalize=normalize, rescale=rescale, lambda_=lambda_,
                int8_mask=int8_mask, density=density)


def dare_ties(block, *, normalize, rescale, lambda_, int8_mask, density, seed):
    """mergekit's DARE-TIES: keep each entry of each task vector with probability ``density``, then TIES' election.

    ``δ_i = w_i · (τ_i ⊙ b_i) · ‖τ_i‖₁ / ‖τ_i ⊙ b_i‖₁`` (the factor only with ``rescale``),
    ``b_i ~ Bernoulli(density)``; then as :func:`ties`: ``θ = θ_base + λ · Σ c_i δ_i (/ Σ c_i w_i)``.
    Paper: https://arxiv.org/abs/2311.03099
    """
    return _gta(block, kind="random", consensus=True, normalize=normalize, rescale=rescale, lambda_=lambda_,
                int8_mask=int8_mask, density=density)


def dare_linear(block, *, normalize, rescale, lambda_, int8_mask, density, seed):
    """mergekit's linear DARE: keep each entry with probability ``density``, then sum the weighted task vectors.

    ``θ = θ_base + λ · Σ_i w_i · (τ_i ⊙ b_i) · ‖τ_i‖₁ / ‖τ_i ⊙ b_i‖₁`` (the factor only with
    ``rescale``; divided by ``Σ_i w_i`` with ``normalize``), ``b_i ~ Bernoulli(density)``.
    Paper: https://arxiv.org/abs/2311.03099
    """
    return _gta(block, kind="random", consensus=False, normalize=normalize, rescale=rescale, lambda_=lambda_,
                int8_mask=int8_mask, density=density)


def breadcrumbs(block, *, normalize, rescale, lambda_, int8_mask, density, gamma):
    """mergekit's Model Breadcrumbs: drop each task vector's largest and smallest magnitudes, then sum.

    Per tensor of n entries, drop the ``int(gamma·n)`` largest magnitudes and the smallest so that
    ``int(density·n)`` remain (fewer of the largest where both do not fit); then
    ``θ = θ_base + λ · Σ_i w_i δ_i`` (divided by ``Σ_i w_i`` with ``normalize``).
    Paper: https://arxiv.org/abs/2312.06795
    """
    return _gta(block, kind="outliers", consensus=False, normalize=normalize, rescale=rescale, lambda_=lambda_,
                int8_mask=int8_mask, density=density, gamma=gamma)


def breadcrumbs_ties(block, *, normalize, rescale, lambda_, int8_mask, density, gamma):
    """mergekit's Model Breadcrumbs with TIES: the breadcrumbs mask, then TIES' sign election.

    Mask as :func:`breadcrumbs`; ``θ = θ_base + λ · Σ_i c_i δ_i`` (divided by ``Σ_i c_i w_i`` with
    ``normalize``), ``c_i`` as in :func:`ties`.
    Paper: https://arxiv.org/abs/2312.06795
    """
    return _gta(block, kind="outliers", consensus=True, normalize=normalize, rescale=rescale, lambda_=lambda_,
                int8_mask=int8_mask, density=density, gamma=gamma)


def della(block, *, normalize, rescale, lambda_, int8_mask, density, epsilon, seed):
    """mergekit's DELLA: drop entries with a probability falling with their magnitude rank, then TIES' election.

    Entry j of row r (dimension 1; a vector is one row) is kept with probability
    ``p_j = density − ε + 2ε · (rank_j − min rank) / (max rank − min rank)``; the kept values
    are rescaled to the task vector's L1 norm with ``rescale``; then ``θ = θ_base + λ · Σ c_i δ_i``
    (divided by ``Σ c_i w_i`` with ``normalize``), ``c_i`` as in :func:`ties`.
    ``density ± epsilon`` must lie in (0, 1) where ``density < 1``.
    Paper: https://arxiv.org/abs/2406.11617
    """
    return _gta(block, kind="rank", consensus=True, normalize=normalize, rescale=rescale, lambda_=lambda_,
                int8_mask=int8_mask, density=density, epsilon=epsilon)


def della_linear(block, *, normalize, rescale, lambda_, int8_mask, density, epsilon, seed):
    """mergekit's linear DELLA: DELLA's rank-based random drop, then the weighted sum of the task vectors.

    Mask as :func:`della`; ``θ = θ_base + λ · Σ_i w_i δ_i`` (divided by ``Σ_i w_i`` with ``normalize``).
    ``density ± epsilon`` must lie in (0, 1) where ``density < 1``.
    Paper: https://arxiv.org/abs/2406.11617
    """
    return _gta(block, kind="rank", consensus=False, normalize=normalize, rescale=rescale, lambda_=lambda_,
                int8_mask=int8_mask, density=density, epsilon=epsilon)


def linear(block, *, normalize):
    """mergekit's linear merge (model soup): the weighted average of the models' weights.

    ``θ = Σ_i w_i θ_i / Σ_i w_i`` (without the division when ``normalize`` is false), accumulated
    in float32 (float64 for float64 weights) with the weights rounded there, and returned in the
    models' dtype. Only the fine-tuned models are averaged: no base model is needed.
    Paper: https://arxiv.org/abs/2203.05482
    mergekit parameters: ``weight`` (per model: the merge's weights), ``normalize`` (default true).
    """
    first, *rest = _aligned(block.models)
    models = (first, *rest)
    wide = torch.float64 if first.dtype == torch.float64 else torch.float32
    coefficients = torch.tensor([list(block.weights)], dtype=wide, device=first.device)  # (1, n)
    shape = (1,) * (first.dim() + 1)
    if normalize:
        denominator = coefficients.sum(dim=1).reshape(shape)
        if float(denominator) == 0:
            raise TaskArithError(f"linear: the weights {list(block.weights)} sum to zero, so their average is "
                                 f"undefined (tensor {block.name!r}): change a weight or pass normalize=False")
    out = torch.zeros((1, *first.shape), dtype=wide, device=first.device)
    for model, c in zip(models, coefficients.unbind(1)):
        out.addcmul_(model.unsqueeze(0), c.reshape(shape))
    if normalize:
        out.div_(denominator)
    return out.to(first.dtype)[0]


def passthrough(block, *, scale):
    """mergekit's passthrough: the one model's weights, unchanged or multiplied by ``scale``.

    ``θ = θ_1`` (``scale · θ_1`` where ``scale`` is given). Merges exactly one model.
    Paper: none (mergekit's method for stacking layers of one model).
    mergekit parameters: ``scale`` (per model, default none).
    """
    if len(block.models) != 1:
        raise TaskArithError(f"passthrough takes exactly one model, got {len(block.models)} (tensor {block.name!r})")
    (factor,) = per_model(scale, 1)
    model = block.models[0]
    return model if factor is None else model * factor


def model_stock(block, *, filter_wise):
    """mergekit's Model Stock: move from the base toward the models' average by their mean cosine.

    With ``τ_i = θ_i − θ_base`` and ``cos`` the mean over pairs i < j of
    ``⟨τ_i, τ_j⟩ / max(‖τ_i‖‖τ_j‖, 1e-6)`` (clamped to [−1, 1]; per whole tensor, or per row
    with ``filter_wise``), ``t = N·cos / (1 + (N − 1)·cos)`` (0 where the denominator is below
    1e-6 in magnitude) and ``θ = t · mean_i θ_i + (1 − t) · θ_base``. Needs at least two models;
    the weights are not used.
    Paper: https://arxiv.org/abs/2403.19522
    mergekit parameters: ``filter_wise`` (default false).
    """
    if len(block.models) < 2:
        raise TaskArithError(f"model_stock needs at least two fine-tuned models, got {len(block.models)} "
                             f"(tensor {block.name!r})")
    w0, *ws = _aligned((block.base, *block.models))
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (count * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(shape)


def sce(block, *, select_topk, int8_mask):
    """mergekit's SCE: select high-variance entries, weight task vectors by their energy, elect signs, average.

    With ``τ_i = θ_i − θ_base``: where ``select_topk < 1``, keep only the ``int(select_topk·nz)``
    entries of largest variance across models (nz: entries of non-zero variance); weights
    ``e_i = mean(τ_i²) / Σ_j mean(τ_j²)`` (1/N each where that sum is below 1e-6); ``c_i`` as in
    :func:`ties`; ``θ = θ_base + Σ_i c_i e_i τ_i / max(Σ_i c_i e_i, 1e-6)``. The merge's weights
    are not used.
    Paper: https://arxiv.org/abs/2408.07990
    mergekit parameters: ``select_topk`` (default 1.0), ``int8_mask`` (default false).
    """
    base, *models = _aligned((block.base, *block.models))
    mask_dtype = torch.int8 if int8_mask else base.dtype
    vectors = torch.stack([m - base for m in models], dim=0)
    if select_topk < 1:
        vectors = vectors * _high_variance(vectors, select_topk, mask_dtype).unsqueeze(0)
    agree = _elected(vectors, mask_dtype)
    energy = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    energy = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    energy = energy.view(-1, *(1,) * (vectors.dim() - 1))
    kept = energy * agree
    return base + (vectors * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)


def _high_variance(vectors: torch.Tensor, fraction_kept: float, mask_dtype: torch.dtype) -> torch.Tensor:
    """1 at the ``int(fraction_kept · nz)`` entries of largest variance across inputs, else 0."""
    if fraction_kept <= 0:
        return torch.zeros_like(vectors[0], dtype=mask_dtype)
    variance = torch.var(vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * fraction_kept)
    mask = torch.zeros_like(variance, dtype=mask_dtype)
    if k == 0:
        return mask
    _, top = torch.topk(variance.abs().view(-1), k=k, largest=True)
    mask.view(-1)[top] = 1
    return mask


# ------------------------------------------------------------------------------ registration


def _flag(default: bool) -> Option:
    return Option(default, lambda x: isinstance(x, bool), "true or false")


def _per_model(default: float, check, valid: str) -> Option:
    return Option(default, each(check), f"{valid}, or a list of one per model")


_LAMBDA = Option(1.0, finite, "a finite number", multiplies=True)
_DENSITY = _per_model(1.0, fraction(0.0, 1.0), "a number in [0, 1]")
_GAMMA = _per_model(0.01, fraction(0.0, 1.0), "a number in [0, 1]")
_EPSILON = _per_model(0.15, fraction(0.0, 0.5, hi_open=True), "a number in [0, 0.5)")


def _family(name, fn, paper, *, normalize, rescale, extra=(), random=False, symmetric=True):
    options = {"normalize": _flag(normalize), "rescale": _flag(rescale), "lambda_": _LAMBDA,
               "int8_mask": _flag(False), "density": _DENSITY, **dict(extra)}
    if random:
        options["seed"] = SEED
    per = "".join(f"``{k}`` (per model, default {options[k].default}), " for k, _ in extra)
    fn.__doc__ += _COMMON_DOC.format(extra=per, normalize=str(normalize).lower(), rescale=str(rescale).lower(),
                                     seed=", ``seed`` (the random masks' seed, required)" if random else "")
    # Declared symmetric where only float rounding of the sums depends on the order; the random
    # masks are drawn per input position, so those methods are not.
    return Method(name, fn, paper, options, split="tensor", needs_base=True, randomized=random, memory=40,
                  symmetric=symmetric and not random, identity={}, inputs="weights")


METHODS = (
    _family("mergekit_task_arithmetic", task_arithmetic, "https://arxiv.org/abs/2212.04089",
            normalize=False, rescale=False),
    _family("mergekit_ties", ties, "https://arxiv.org/abs/2306.01708", normalize=True, rescale=False),
    _family("mergekit_dare_ties", dare_ties, "https://arxiv.org/abs/2311.03099", normalize=False, rescale=True,
            random=True),
    _family("dare_linear", dare_linear, "https://arxiv.org/abs/2311.03099", normalize=False, rescale=True,
            random=True),
    _family("mergekit_breadcrumbs", breadcrumbs, "https://arxiv.org/abs/2312.06795", normalize=False,
            rescale=False, extra=(("gamma", _GAMMA),)),
    _family("breadcrumbs_ties", breadcrumbs_ties, "https://arxiv.org/abs/2312.06795", normalize=False,
            rescale=False, extra=(("gamma", _GAMMA),)),
    _family("della", della, "https://arxiv.org/abs/2406.11617", normalize=True, rescale=True,
            extra=(("epsilon", _EPSILON),), random=True),
    _family("della_linear", della_linear, "https://arxiv.org/abs/2406.11617", normalize=False, rescale=True,
            extra=(("epsilon", _EPSILON),), random=True),
    Method("linear", linear, "https://arxiv.org/abs/2203.05482", {"normalize": _flag(True)}, split="tensor",
           symmetric=True, identity={}, inputs="weights"),
    Method("passthrough", passthrough, "https://github.com/arcee-ai/mergekit",
           {"scale": Option(None, each(lambda x: x is None or finite(x)), "a finite number or none, or a list of one")},
           split="elementwise", identity={}, inputs="weights"),
    # Not declared symmetric: their cosines and energies are sums whose rounding follows input order.
    Method("model_stock", model_stock, "https://arxiv.org/abs/2403.19522", {"filter_wise": _flag(False)},
           split="tensor", needs_base=True, memory=24, inputs="weights"),
    Method("sce", sce, "https://arxiv.org/abs/2408.07990",
           {"select_topk": Option(1.0, fraction(0.0, 1.0), "a number in [0, 1]"), "int8_mask": _flag(False)},
           split="tensor", needs_base=True, memory=40, identity={}, inputs="weights"),
)
