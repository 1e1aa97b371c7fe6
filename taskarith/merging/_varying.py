"""Option values and weights that vary by tensor: per-layer gradients and name filters.

A merge takes one value per option (and per weight), or a :class:`Varying` that gives the value
for each tensor by name. The engine resolves them tensor by tensor, just before the method runs,
in memory and out of core alike, so a gradient over layers needs no support from the method.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from ..errors import TaskArithError

__all__ = ["Varying", "filtered", "gradient", "layer_position", "resolve"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")


class Varying:
    """A value chosen per tensor: ``rule(name)`` gives the value for the tensor ``name``.

    Build them with :func:`gradient` and :func:`filtered` (or directly from any function).

    Example:
        >>> v = Varying(lambda name: 0.1 if "bias" in name else 0.5, "0.1 for biases, else 0.5")
        >>> v.at("fc.bias"), v.at("fc.weight")
        (0.1, 0.5)
    """

    def __init__(self, rule: Callable[[str], object], text: str = "a value per tensor"):
        if not callable(rule):
            raise TaskArithError(f"Varying needs a function of the tensor name, got {type(rule).__name__}")
        self._rule = rule
        self._text = text

    def at(self, name: str) -> object:
        """The value for the tensor ``name`` (itself resolved, if it is a :class:`Varying` too)."""
        return resolve(self._rule(name), name)

    def __repr__(self) -> str:
        return f"Varying({self._text})"


def resolve(value: object, name: str) -> object:
    """``value`` for tensor ``name``: a :class:`Varying` evaluated there, lists and tuples element by element.

    Example:
        >>> resolve((0.5, gradient([0.0, 1.0], layers=3)), "model.layers.1.mlp.weight")
        (0.5, 0.5)
    """
    if isinstance(value, Varying):
        return value.at(name)
    if isinstance(value, (list, tuple)) and any(varies(v) for v in value):
        return type(value)(resolve(v, name) for v in value)
    return value


def varies(value: object) -> bool:
    """Whether ``value`` holds a :class:`Varying` (at any depth of lists and tuples)."""
    if isinstance(value, Varying):
        return True
    return isinstance(value, (list, tuple)) and any(varies(v) for v in value)


def layer_position(name: str, layers: int) -> float:
    """Where the tensor ``name`` sits among ``layers`` decoder layers, in [0, 1]: ``i / (layers - 1)``
    for layer ``i`` (found as ``layers.i.``, ``h.i.``, ``blocks.i.`` in the name), 0 for tensors
    outside the layers (embeddings, final norm, head) and 1 for a single-layer model.

    Example:
        >>> layer_position("model.layers.2.self_attn.q_proj.weight", 5), layer_position("lm_head.weight", 5)
        (0.5, 0.0)
    """
    found = _LAYER.search(name)
    if found is None:
        return 0.0
    return int(found.group(1)) / (layers - 1) if layers > 1 else 1.0


def interpolate(values: Sequence[float], t: float) -> float:
    """Piecewise-linear interpolation of ``values`` spread evenly over [0, 1], at ``t``."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def gradient(values: Sequence[float], *, layers: int | None = None,
             position: Callable[[str], float] | None = None) -> Varying:
    """A value interpolated over the layers: ``values`` spread evenly from the first layer to the last.

    ``position(name)`` gives a tensor's place in [0, 1]; by default :func:`layer_position` with
    ``layers`` (the model's number of layers, e.g. ``config.num_hidden_layers``).

    Example:
        >>> t = gradient([0.0, 0.5, 1.0], layers=5)
        >>> [t.at(f"model.layers.{i}.mlp.weight") for i in range(5)]
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    values = list(values)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                             for v in values):
        raise TaskArithError(f"a gradient needs a non-empty list of finite numbers, got {values!r}")
    if position is None:
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise TaskArithError(f"gradient(...) needs layers=<number of layers> (an int >= 1), got {layers!r}")
        position = lambda name: layer_position(name, layers)
    return Varying(lambda name: interpolate(values, position(name)), f"gradient {values}")


def filtered(cases: Sequence[tuple[str | None, object]]) -> Varying:
    """The value of the first case whose filter occurs in the tensor's name (``None`` or ``"*"``
    matches every tensor); a tensor no case matches raises, naming it.

    Example:
        >>> v = filtered([("self_attn", 0.3), ("mlp", 0.7), (None, 0.5)])
        >>> v.at("model.layers.0.mlp.up_proj.weight"), v.at("model.norm.weight")
        (0.7, 0.5)
    """
    cases = [(f, v) for f, v in cases]

    def rule(name: str) -> object:
        for pattern, value in cases:
            if pattern is None or pattern == "*" or pattern in name:
                return value
        raise TaskArithError(f"no filter matches tensor {name!r} (filters: {[f for f, _ in cases]}): add a last "
                             "case without a filter as the default")

    return Varying(rule, f"filters {[f for f, _ in cases]}")
