"""mergekit's parameter settings: numbers, per-layer gradients and ``filter:`` lists, resolved per tensor.

A setting is a scalar, a list of scalars (a gradient: numbers interpolate over the layers, other
values are picked), a ``{filter: TEXT, value: SETTING}`` mapping, or a list of them (the first whose
filter occurs in the tensor's name applies; no filter, or ``*``, matches every tensor). A setting
that matches nothing leaves the parameter to the next, less specific place: the model's own
``parameters``, then its slice's, then the config's, then the method's default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..merging._varying import Varying, interpolate, layer_position
from ._document import Document, got
from ._mergekit_methods import REQUIRED

__all__ = ["Resolver", "check_setting"]

BOOLEAN = {"int8_mask", "normalize", "rescale", "nuslerp_row_wise", "nuslerp_flatten", "normalize_weights",
           "filter_wise"}
INTEGER = {"max_iter"}
_UNSET = object()


def check_setting(doc: Document, path: tuple, name: str, setting, depth: int = 0) -> bool:
    """Whether ``setting`` is well formed for parameter ``name``; records the problems it finds."""
    if isinstance(setting, dict):
        return _check_condition(doc, path, name, setting, depth)
    if isinstance(setting, list):
        if not setting:
            doc.problem(path, "expected a value or a non-empty list, got an empty list")
            return False
        if all(isinstance(e, dict) for e in setting):
            checked = [_check_condition(doc, path + (i,), name, e, depth) for i, e in enumerate(setting)]
        else:
            checked = [_check_scalar(doc, path + (i,), name, e) for i, e in enumerate(setting)]
        return all(checked)  # every entry checked, so that each problem is reported
    return _check_scalar(doc, path, name, setting)


def _check_condition(doc: Document, path: tuple, name: str, entry: dict, depth: int) -> bool:
    doc.mapping(path, entry, ("filter", "value"))
    ok = set(entry) <= {"filter", "value"}
    if "value" not in entry:
        doc.problem(path, "a filtered setting needs 'value:' (and 'filter: TEXT', matched in tensor names)")
        return False
    if entry.get("filter") is not None and not isinstance(entry["filter"], str):
        doc.problem(path + ("filter",), f"expected text matched in tensor names, got {got(entry['filter'])}")
        ok = False
    if depth > 4:
        doc.problem(path, "filters nested too deep")
        return False
    return check_setting(doc, path + ("value",), name, entry["value"], depth + 1) and ok


def _check_scalar(doc: Document, path: tuple, name: str, value) -> bool:
    if name in BOOLEAN:
        if isinstance(value, bool):
            return True
        doc.problem(path, f"expected true or false, got {got(value)}")
        return False
    if name in INTEGER:
        if isinstance(value, int) and not isinstance(value, bool):
            return True
        doc.problem(path, f"expected an integer, got {got(value)}")
        return False
    return doc.number(path, value) is not None


def evaluate(setting, name: str, tensor: str, t: float):
    """The value of a well-formed ``setting`` for ``tensor`` at layer position ``t``, or ``_UNSET``."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if all(isinstance(e, dict) for e in setting):
            for cond in setting:
                pattern = cond.get("filter")
                if pattern is None or pattern == "*" or pattern in tensor:
                    return evaluate(cond["value"], name, tensor, t)
            return _UNSET
        if name in BOOLEAN or name in INTEGER:
            return setting[int(t * (len(setting) - 1))]
        return float(interpolate([float(v) for v in setting], t))
    return _typed(name, setting)


def _typed(name: str, value):
    if name in BOOLEAN or name in INTEGER:
        return value
    return float(value)


class Resolver:
    """Per-tensor values of mergekit parameters over the precedence chain of settings.

    ``position(tensor)`` is the tensor's place among the layers, in [0, 1] (mergekit's ``t``).
    """

    def __init__(self, tensors: Sequence[str], position: Callable[[str], float]):
        self.tensors = list(tensors)
        self.position = position

    @classmethod
    def for_layers(cls, tensors: Sequence[str], layers: int) -> Resolver:
        return cls(tensors, lambda name: layer_position(name, layers))

    def value(self, name: str, chain: Sequence, default):
        """The parameter ``name`` from the settings in ``chain`` (most specific first): a plain value
        when it is the same everywhere, a :class:`Varying` otherwise; ``REQUIRED`` where some tensor
        gets no value and the parameter has no default (the caller reports it)."""
        present = [s for s in chain if s is not _UNSET]
        if not present:
            return default if default is not REQUIRED else REQUIRED
        if not isinstance(present[0], (list, dict)):
            return _typed(name, present[0])

        def rule(tensor: str):
            return first(present, name, tensor, self.position(tensor), default)

        return collapse({tensor: rule(tensor) for tensor in self.tensors}, name, default, fallback=rule)


def first(chain: Sequence, name: str, tensor: str, t: float, default):
    """The value of the first setting in ``chain`` (most specific first) that gives one for ``tensor``."""
    for setting in chain:
        if setting is not _UNSET:
            value = evaluate(setting, name, tensor, t)
            if value is not _UNSET:
                return value
    return default


def collapse(values: dict, name: str, default, *, fallback: Callable[[str], object] | None = None):
    """Per-tensor values as one option value: ``REQUIRED`` where a tensor has none, the value itself
    where all agree, else a :class:`Varying` (``fallback`` gives the value of a tensor not listed)."""
    if any(v is REQUIRED for v in values.values()):
        return REQUIRED
    if len(set(map(repr, values.values()))) <= 1:
        return next(iter(values.values()), default)

    def rule(tensor: str):
        return values[tensor] if tensor in values or fallback is None else fallback(tensor)

    return Varying(rule, f"mergekit setting of {name!r}")
