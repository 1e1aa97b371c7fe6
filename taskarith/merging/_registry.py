"""The one registry of merge methods: built-ins listed explicitly, user methods added by :func:`register`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from ..errors import TaskArithError, raise_if_any
from . import consolidation, interpolation, linear, masks, mergekit_gta, selection, spectral, ties
from ._spec import Method, Option, check_declarations
from ._varying import resolve, varies

_REGISTRY: dict[str, Method] = {m.name: m for m in (*linear.METHODS, *ties.METHODS, *masks.METHODS, *spectral.METHODS,
                                                     *consolidation.METHODS, *mergekit_gta.METHODS,
                                                     *interpolation.METHODS, *selection.METHODS)}


def register(name: str, fn: Callable[..., torch.Tensor], *, paper: str, options: Mapping[str, Option] | None = None,
             split: str = "tensor", trim: bool = False, statistic: Callable[..., torch.Tensor] | None = None,
             plan: Callable[..., object] | None = None,
             needs_base: bool = False, randomized: bool = False, memory: int = 16,
             propagates_nan: bool = False, symmetric: bool = False,
             identity: Mapping[str, object] | None = None, inputs: str = "deltas") -> Method:
    """Add a merge method: ``fn(block, **options)`` returns the merged delta of one :class:`Block`.

    The method then runs everywhere the built-ins do: :func:`taskarith.merge` in memory,
    :func:`taskarith.merge_files` out of core at any memory budget, and the command line. The
    declarations (see :class:`Method`) say how the drivers may split its work; whatever they
    choose, the result is the same bits. Registering an existing name raises.

    Example:
        >>> import torch, taskarith as ta
        >>> def keep_larger(block):
        ...     "Per entry, the delta of largest magnitude (weighted)."
        ...     stacked = torch.stack([w * d for w, d in zip(block.weights, block.deltas)])
        ...     return stacked.gather(0, stacked.abs().argmax(0, keepdim=True))[0]
        >>> m = ta.register("keep_larger_demo", keep_larger, paper="n/a", split="elementwise")
        >>> a, b = ta.TaskVector({"w": torch.tensor([1.0, -3.0])}), ta.TaskVector({"w": torch.tensor([-2.0, 1.0])})
        >>> ta.merge([a, b], "keep_larger_demo")["w"]
        tensor([-2., -3.])
        >>> ta.merging.unregister("keep_larger_demo")
    """
    if not isinstance(name, str) or not name:
        raise TaskArithError(f"a merge method needs a non-empty string name, got {name!r}")
    if name in _REGISTRY:
        raise TaskArithError(f"a merge method named {name!r} is already registered")
    if not callable(fn):
        raise TaskArithError(f"merge method {name!r}: fn must be callable, got {type(fn).__name__}")
    options = dict(options or {})
    check_declarations(name, options, split, trim, randomized, statistic, plan, inputs)
    method = Method(name, fn, paper, options, split=split, trim=trim, statistic=statistic, plan=plan,
                    needs_base=needs_base,
                    randomized=randomized, memory=int(memory), propagates_nan=propagates_nan, symmetric=symmetric,
                    identity=None if identity is None else dict(identity), inputs=inputs)
    _REGISTRY[name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method added with :func:`register`."""
    _REGISTRY.pop(name, None)


def methods() -> dict[str, Method]:
    """The registered merge methods by name (each with its paper, options, declarations and docstring).

    Example:
        >>> import taskarith as ta
        >>> "ties" in ta.methods()
        True
    """
    return dict(_REGISTRY)


def lookup(method: str, options: Mapping[str, object]) -> tuple[Method, dict[str, object]]:
    """The registered method and its validated options (defaults filled in)."""
    spec = _REGISTRY.get(method) if isinstance(method, str) else None
    if spec is None:
        raise TaskArithError(f"unknown merge method {method!r}; valid: {', '.join(sorted(_REGISTRY))}")
    return spec, _resolve_options(spec, options)


def _resolve_options(spec: Method, options: Mapping[str, object]) -> dict[str, object]:
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(f"{k} ({o.valid})" for k, o in spec.options.items()) or "none"
        raise TaskArithError(f"unknown option(s) {unknown} for merge method {spec.name!r}; valid options: {valid}")
    resolved, problems = {}, []
    for key, opt in spec.options.items():
        if key not in options:
            if opt.required:
                problems.append(f"{key} is required ({opt.valid})")
                continue
            resolved[key] = opt.default
            continue
        value = options[key]
        if not varies(value):  # a value per tensor is checked where it is resolved
            problems.extend(option_problems(spec, key, value))
        resolved[key] = value
    raise_if_any(problems, error=TaskArithError, header=f"bad options for merge method {spec.name!r}",
                 fix=f"See taskarith.methods()[{spec.name!r}] or docs/merging.md.")
    return resolved


def option_problems(spec: Method, key: str, value: object) -> list[str]:
    opt = spec.options[key]
    try:
        ok = opt.check(value)
    except (TypeError, ValueError, OverflowError):
        ok = False
    return [] if ok else [f"{key}={value!r:.60} is invalid: expected {opt.valid}"]


def at_tensor(spec: Method, options: Mapping[str, object], weights, name: str) -> tuple[dict, tuple]:
    """Options and weights for the tensor ``name``: values that vary by tensor resolved and checked."""
    if not any(varies(v) for v in options.values()) and not varies(tuple(weights)):
        return options, weights
    resolved, weights, problems = _at(spec, options, weights, name)
    raise_if_any(problems, error=TaskArithError, header=f"bad values for tensor {name!r} in merge method {spec.name!r}",
                 fix="Fix the gradient or filter that gives them.")
    return resolved, tuple(float(w) for w in weights)


def check_every_tensor(spec: Method, options: Mapping[str, object], weights, names) -> None:
    """Values that vary by tensor resolved and checked for every tensor before any work, all bad ones
    listed at once (else a bad value for the last tensor would surface after all the others merged)."""
    problems = [f"{name!r}: {p}" for name in names for p in _at(spec, options, weights, name)[2]]
    raise_if_any(problems, error=TaskArithError, header=f"bad values per tensor in merge method {spec.name!r}",
                 fix="Fix the gradient or filter that gives them.")


def _at(spec: Method, options: Mapping[str, object], weights, name: str) -> tuple[dict, tuple, list[str]]:
    resolved = {k: resolve(v, name) for k, v in options.items()}
    problems = [p for k, v in options.items() if varies(v) for p in option_problems(spec, k, resolved[k])]
    weights = resolve(tuple(weights), name)
    problems += [f"weights[{i}]={w!r} is not a finite number" for i, w in enumerate(weights)
                 if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    return resolved, weights, problems
