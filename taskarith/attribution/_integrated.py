"""Integrated gradients along a task vector, computed with Captum (see :mod:`taskarith.attribution`)."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import KeyMismatchError, ShapeMismatchError, TaskArithError, format_names, raise_if_any
from ..io import Source, load_state_dict
from ..vector import TaskVector, _Info
from ._data import batches as _batches
from ._data import check_objective as _check_objective
from ._data import prepare as _prepare

__all__ = ["METHODS", "Attribution", "CompletenessWarning", "integrated_gradients"]

#: Quadrature rules accepted by :func:`integrated_gradients`.
METHODS = ("gausslegendre", "riemann_middle", "riemann_trapezoid", "riemann_left", "riemann_right")


class CompletenessWarning(UserWarning):
    """The attributions do not add up to the objective's change within the tolerance."""


class Attribution(TaskVector):
    """Integrated-gradient attributions shaped like a task vector, plus completeness figures.

    A :class:`~taskarith.TaskVector` (same names, shapes and tied names as the
    vector it explains) whose entries are attributions, as returned by
    :func:`integrated_gradients`. Algebra on it returns plain task vectors.

    Attributes:
        gain: ``F(θ0 + τ) − F(θ0)``, summed over the batches.
        delta: the completeness gap ``Σ_i IG_i − gain``.
        n_steps: path points of the quadrature.
        method: the quadrature rule.
    """

    __slots__ = ("delta", "gain", "method", "n_steps")

    @property
    def relative_gap(self) -> float:
        """``|delta| / |gain|`` (0.0 when both are 0, inf when only the gain is)."""
        if self.gain == 0:
            return 0.0 if self.delta == 0 else math.inf
        return abs(self.delta) / abs(self.gain)

    def __repr__(self) -> str:
        gain, delta = getattr(self, "gain", math.nan), getattr(self, "delta", math.nan)
        return (
            f"Attribution({len(self)} tensors, {self.numel():,} entries, gain={gain:.6g}, delta={delta:.3g}, "
            f"n_steps={getattr(self, 'n_steps', None)}, method={getattr(self, 'method', None)!r})"
        )


def _mean_log_prob(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of the true labels: ``-cross_entropy(output, target)``."""
    return -nn.functional.cross_entropy(output, target)


def integrated_gradients(
    model: nn.Module,
    pretrained: Source,
    vector: TaskVector,
    data,
    *,
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    n_steps: int = 8,
    method: str = "gausslegendre",
    batch_size: int | None = None,
    points_per_forward: int | None = 1,
    check_completeness: bool = True,
    rtol: float = 0.01,
) -> Attribution:
    """Attribute a task's objective gain to the entries of its task vector.

    The straight path ``θ0 → θ0 + τ`` is integrated with Captum's
    ``IntegratedGradients``, the parameters being the attributed inputs and
    ``θ0`` the baseline. The model is evaluated with
    ``torch.func.functional_call`` in eval mode (its training flags are
    restored afterwards), so dropout is off and BatchNorm uses running
    statistics. Buffers stay at ``θ0``: a vector's float buffers (BatchNorm
    running statistics) get zero attribution and ``gain`` is measured with
    ``θ0``'s buffers. Integer buffers are never part of a vector; tied weights
    are attributed once. Half-precision models are evaluated in float32 (weights,
    buffers and floating inputs), so the path is not rounded to bfloat16.

    Attributions over several batches add up; so do their gains, so with the
    default objective ``gain`` is a sum of per-batch mean log-probabilities.

    Args:
        model: the architecture (an ``nn.Module``; its own weights are not used).
        pretrained: ``θ0``: a module (``model`` itself is fine), state_dict or file.
        vector: the task vector ``τ``; every name must be an entry of ``model``.
        data: a pair of tensors ``(inputs, targets)``, a ``DataLoader``, or an
            iterable of ``(inputs, targets)`` batches. ``inputs`` may be a tuple of
            tensors passed to the model as positional arguments.
        objective: ``objective(output, targets) -> 0-d tensor``, higher is better;
            default: mean log-probability of the true labels (classification).
            With ``points_per_forward > 1`` it runs under ``torch.func.vmap``.
        n_steps: path points. ``n_steps=1`` with ``"gausslegendre"`` is the
            gradient at the midpoint ``θ0 + τ/2`` times ``τ``.
        method: quadrature rule, one of :data:`METHODS`. Captum 0.9's trapezoid
            weights sum to ``(n-1)/n``; they are rescaled here to sum to 1. The
            Riemann rules need ``n_steps >= 2``.
        batch_size: split a tensor pair into batches of this many examples
            (``None``: one batch). DataLoaders and iterables keep their batches.
        points_per_forward: path points per forward pass: 1 (default) holds one
            extra copy of the parameters; ``k > 1`` evaluates ``k`` at once with
            ``vmap`` (faster on small models, ``k`` copies); ``None``: all.
        check_completeness: warn (:class:`CompletenessWarning`) when
            ``|Σ IG − gain| > rtol·|gain|`` plus a rounding allowance.
        rtol: the relative tolerance of that check.

    Returns:
        An :class:`Attribution` with the vector's names, carrying ``gain`` and ``delta``.

    Example:
        >>> import pytest; _ = pytest.importorskip("captum")
        >>> import torch, taskarith as ta
        >>> from taskarith.attribution import integrated_gradients
        >>> _ = torch.manual_seed(0)
        >>> model, tuned = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> tv = ta.TaskVector.from_models(model, tuned)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> ig = integrated_gradients(model, model, tv, (x, y))
        >>> total = sum(float(ig[n].sum()) for n in ig)
        >>> abs(total - ig.gain) < 1e-3 * abs(ig.gain)
        True
    """
    _check_options(model, objective, n_steps, method, batch_size, points_per_forward, check_completeness, rtol)
    if isinstance(vector, Mapping) and not isinstance(vector, TaskVector):
        vector = TaskVector(vector)
    if not isinstance(vector, TaskVector):
        raise TaskArithError(f"vector must be a TaskVector, got {type(vector).__name__}")
    state0 = load_state_dict(pretrained)
    path_names, held = _check_model(model, state0, vector)
    batches = _batches(data, batch_size)
    try:
        first_batch = next(batches)
    except StopIteration:
        raise TaskArithError("data holds no batches; pass (inputs, targets) with at least one example") from None
    try:
        from captum.attr import IntegratedGradients
    except ImportError as exc:
        raise ImportError("integrated_gradients needs captum: pip install 'taskarith[attribution]'") from exc

    entries = path_names
    floats = [t for t in state0.values() if t.is_floating_point()]
    compute = torch.float64 if any(t.dtype == torch.float64 for t in floats) else torch.float32
    device = floats[0].device if floats else vector.device
    aliases = _path_aliases(model, vector, entries)
    fixed = {n: (t.detach().to(device, compute) if t.is_floating_point() else t.detach().to(device))
             for n, t in state0.items() if n not in entries and n not in aliases}
    theta0 = {n: state0[n].detach().to(device, compute) for n in entries}
    theta1 = {n: theta0[n] + vector[n].to(device, compute) for n in entries}
    objective = objective or _mean_log_prob

    def value(params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        inputs, target = batch
        full = dict(params)
        full.update({a: params[c] for a, c in aliases.items()})
        return objective(torch.func.functional_call(model, (full, fixed), inputs), target)

    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        batch = _prepare(first_batch, 0, device, compute)
        if entries:  # one forward with gradients on, so a non-differentiable objective fails here, not in Captum
            probe = value({n: t.detach().requires_grad_() for n, t in theta0.items()}, batch)
            _check_objective(probe)
            if not probe.requires_grad:
                raise TaskArithError(
                    "the objective does not depend differentiably on the model's output (argmax or accuracy?); "
                    "use a smooth objective such as the mean log-probability of the true labels")
            del probe
        totals = {n: torch.zeros_like(theta0[n]) for n in entries}
        gain = allowance = 0.0
        index = 0
        while batch is not None:
            with torch.no_grad():
                v0 = value(theta0, batch)
                _check_objective(v0, index)
                f0, f1 = float(v0), float(value(theta1, batch))
            gain += f1 - f0
            allowance += 8 * torch.finfo(compute).eps * (abs(f0) + abs(f1))
            if entries:
                attributions = _attribute(IntegratedGradients, value, batch, entries, theta0, theta1,
                                          n_steps, method, points_per_forward)
                for n, a in zip(entries, attributions):
                    totals[n] += a[0]
            index += 1
            raw = next(batches, None)
            batch = None if raw is None else _prepare(raw, index, device, compute)
    finally:
        for m, training in flags:
            m.training = training

    layout = vector._layout.with_dtypes({d: compute for d in vector._layout.sizes})
    buffers = {dt: torch.zeros(size, dtype=dt, device=device) for dt, size in layout.sizes.items()}
    result = Attribution._make(layout, buffers, _Info())
    for n in entries:
        result[n].copy_(totals[n])
    total = math.fsum(float(totals[n].double().sum()) for n in entries)
    result.gain, result.delta, result.n_steps, result.method = gain, total - gain, n_steps, method
    if check_completeness and abs(result.delta) > rtol * abs(gain) + allowance:
        warnings.warn(
            f"attributions sum to {total:.6g} but the objective changed by {gain:.6g} "
            f"(relative gap {result.relative_gap:.3g} > rtol={rtol}); raise n_steps (now {n_steps})"
            + ("" if method == "gausslegendre" else " or use method='gausslegendre'")
            + (f"; held at θ0 with zero attribution: {format_names(held)}." if held else "."),
            CompletenessWarning, stacklevel=2,
        )
    return result


def _attribute(ig_class, value, batch, entries, theta0, theta1, n_steps, method, points_per_forward):
    """Captum's integrated gradients of ``value(·, batch)`` over the parameters ``entries``."""

    def forward(*points: torch.Tensor) -> torch.Tensor:
        # Each tensor holds k path points stacked on dim 0; the data is closed over, not
        # passed as additional_forward_args (Captum would repeat it once per point).
        if points[0].shape[0] == 1:
            return value(dict(zip(entries, (p[0] for p in points))), batch).reshape(1)
        return torch.func.vmap(lambda *p: value(dict(zip(entries, p)), batch))(*points)

    inputs = tuple(theta1[n].unsqueeze(0) for n in entries)
    baselines = tuple(theta0[n].unsqueeze(0) for n in entries)  # Captum's default baseline is 0
    attributions = ig_class(forward).attribute(
        inputs, baselines=baselines, n_steps=n_steps, method=method,
        internal_batch_size=points_per_forward,
    )
    if method == "riemann_trapezoid":  # Captum's trapezoid weights sum to (n-1)/n, not 1
        attributions = tuple(a * (n_steps / (n_steps - 1)) for a in attributions)
    return attributions


def _check_options(model, objective, n_steps, method, batch_size, points_per_forward, check_completeness, rtol):
    if not isinstance(model, nn.Module):
        raise TaskArithError(f"model must be an nn.Module (the architecture), got {type(model).__name__}")
    if method not in METHODS:
        raise TaskArithError(f"method={method!r} is not one of {', '.join(map(repr, METHODS))}")
    if not _is_int(n_steps) or n_steps < 1:
        raise TaskArithError(f"n_steps must be a positive integer, got {n_steps!r}")
    if method.startswith("riemann") and n_steps < 2:
        raise TaskArithError(f"method={method!r} needs n_steps >= 2; for n_steps=1 (the midpoint) use 'gausslegendre'")
    if objective is not None and not callable(objective):
        raise TaskArithError(
            f"objective must be a callable (output, targets) -> 0-d tensor, got {type(objective).__name__}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise TaskArithError(f"batch_size must be None or a positive integer, got {batch_size!r}")
    if points_per_forward is not None and (not _is_int(points_per_forward) or points_per_forward < 1):
        raise TaskArithError(f"points_per_forward must be None or a positive integer, got {points_per_forward!r}")
    if not isinstance(check_completeness, bool):
        raise TaskArithError(f"check_completeness must be True or False, got {check_completeness!r}")
    if not isinstance(rtol, numbers.Real) or isinstance(rtol, bool) or not rtol > 0:
        raise TaskArithError(f"rtol must be a positive number, got {rtol!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_model(model: nn.Module, state0: dict[str, torch.Tensor], vector: TaskVector) -> tuple[list[str], list[str]]:
    """(vector names that are parameters: the path, vector names held at θ0), after validation."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    known = {**params, **buffers}
    unknown = [n for n in vector if n not in known]
    if unknown:
        raise KeyMismatchError(
            f"the task vector has {len(unknown)} names the model does not: {format_names(unknown)}; "
            "attribute a vector extracted from this architecture.", extra=unknown)
    first_name: dict[int, str] = {}
    for n, p in params.items():
        first_name.setdefault(id(p), n)
    missing = [n for n in known if n not in state0 and not (n in params and first_name[id(params[n])] in state0)]
    if missing:
        raise KeyMismatchError(
            f"the pretrained weights lack {len(missing)} entries of the model: {format_names(missing)}; "
            "pass the model's own pretrained weights as `pretrained`.", missing=missing)
    for n, p in params.items():  # tied in the model: the state_dict may hold one name only
        state0.setdefault(n, state0[first_name[id(p)]])
    problems = [f"{n!r}: model {tuple(known[n].shape)} vs pretrained {tuple(state0[n].shape)}"
                for n in known if tuple(state0[n].shape) != tuple(known[n].shape)]
    problems += [f"{n!r}: model {tuple(known[n].shape)} vs vector {tuple(vector[n].shape)}"
                 for n in vector if tuple(vector[n].shape) != tuple(known[n].shape)]
    problems += [f"{n!r}: the model's entry is {state0[n].dtype}, the vector holds a float delta"
                 for n in vector if not state0[n].is_floating_point()]
    raise_if_any(problems, error=ShapeMismatchError, header="the model, its pretrained weights and the vector disagree",
                 fix="Use the architecture the vector was extracted from.")
    canonical = [n for n in vector._layout.slots if n in params]
    groups: dict[int, list[str]] = {}
    for n in canonical:
        groups.setdefault(id(params[n]), []).append(n)
    untied = [" and ".join(map(repr, g)) for g in groups.values() if len(g) > 1]
    raise_if_any(untied, error=TaskArithError, header="tied in the model but separate in the vector",
                 fix="Extract the vector with TaskVector.from_models from models that tie the same weights.")
    held = [n for n in vector._layout.slots if n in buffers and n not in params]
    return canonical, held


def _path_aliases(model: nn.Module, vector: TaskVector, entries: list[str]) -> dict[str, str]:
    """Other names of the path's tensors: tied in the vector, or tied in the model."""
    owner = {id(p): n for n, p in model.named_parameters(remove_duplicate=False) if n in entries}
    aliases = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if n in entries:
            continue
        if vector.aliases.get(n) in entries:
            aliases[n] = vector.aliases[n]
        elif id(p) in owner:
            aliases[n] = owner[id(p)]
    return aliases
