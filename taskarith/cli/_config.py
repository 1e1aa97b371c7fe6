"""Merge configs for ``taskarith merge``: reading one, and taskarith's own format.

A config is parsed and validated as a whole before any tensor is read: every
problem (unknown key, missing path, invalid option, a mergekit feature with no
taskarith equivalent) is reported at once with its line number and key.
See ``docs/cli.md`` for both formats and the mergekit mapping table; mergekit's
format is read by ``_mergekit``, the checks both share live in ``_document``.
"""

from __future__ import annotations

from pathlib import Path

from .. import merging
from ..errors import TaskArithError
from ..io import Checkpoint
from ..merging._registry import lookup
from . import _mergekit, _yaml
from ._document import Document, got
from ._mergekit_params import Resolver, check_setting
from ._mergekit_slices import layer_count
from ._plan import Plan

__all__ = ["Plan", "load", "parse", "plan_of"]

NATIVE_KEYS = ("method", "base", "models", "vectors", "options", "dtype")


def load(path, *, seed: int | None = None, output=None, semantics: str = "mergekit") -> Plan:
    """Read and validate the config file at ``path``: YAML or JSON text, UTF-8 (or UTF-16/32 with a BOM)."""
    path = Path(path)
    return parse(_yaml.read(path), name=str(path), seed=seed, output=output, semantics=semantics)


def parse(text: str, *, name: str = "<config>", seed: int | None = None, output=None,
          semantics: str = "mergekit") -> Plan:
    """Validate a config given as text; raises one :class:`TaskArithError` listing every problem.

    Example:
        >>> plan = parse("method: ties\\nvectors: [a.safetensors]\\noptions: {density: 0.5}", name="c.yaml")
        Traceback (most recent call last):
        ...
        taskarith.errors.TaskArithError: c.yaml: 1 problem: line 2, vectors[0]: no such file 'a.safetensors'. ...
    """
    return plan_of(Document(text, name), seed=seed, output=output, semantics=semantics)


def plan_of(doc: Document, *, seed: int | None = None, output=None, semantics: str = "mergekit") -> Plan:
    """The plan of a parsed config (one document of a multi-document one, too); raises its problems."""
    data, name = doc.data, doc.name
    if not isinstance(data, dict):
        shown = "nothing (the file is empty or only comments)" if data is None else got(data)
        raise TaskArithError(f"{name}: a merge config is a mapping of keys (method: ..., models: ... or "
                             f"merge_method: ..., base_model: ...), got {shown}; see docs/cli.md")
    if "merge_method" in data or "base_model" in data:
        plan = _mergekit.plan(doc, data, seed, semantics=semantics)
    else:
        plan = _native(doc, data, seed)
    vector_out = plan is not None and plan.kind == "vectors" and plan.base is None
    if output is not None and vector_out and Path(output).suffix != ".safetensors":
        doc.problem((), f"merging task vectors without a base writes a task vector: the output must be a "
                        f".safetensors file, got {str(output)!r} (or add 'base:' to get a model)")
    doc.raise_problems()
    return plan


# ------------------------------------------------------------------ native


def _native(doc: Document, data: dict, seed: int | None) -> Plan | None:
    doc.top_level(data, NATIVE_KEYS)
    method = data.get("method")
    if method is None:
        doc.problem(("method",), f"missing 'method'; one of {', '.join(sorted(merging.methods()))}")
    kind, sources, weights, per_model = _sources(doc, data, method)
    base = doc.checkpoint(("base",), data["base"]) if data.get("base") is not None else None
    if kind == "models" and "base" not in data:
        doc.problem(("base",), "merging fine-tuned models needs 'base: PATH' (the pretrained model)")
    options, varying = _options(doc, data, method, seed, per_model)
    dtype = doc.dtype(("dtype",), data.get("dtype"))
    settings = [w for w in weights or []] + [v for t in per_model.values() for v in t]
    if (varying or any(_is_setting(x) for x in settings)) and not doc.problems:
        weights, options = _per_tensor(doc, base or sources[0], weights, options, varying)
    return Plan(method, kind, base, sources, weights, options, dtype)


def _per_tensor(doc: Document, reference, weights, options: dict, varying: dict) -> tuple:
    """Gradients (lists) and filters (``filter``/``value`` entries) resolved for every tensor, as in mergekit."""
    try:
        names = Checkpoint(reference).names()
    except TaskArithError as err:
        doc.problem((), str(err))
        return weights, options
    resolver = Resolver.for_layers(names, layer_count(reference, names))
    weights = [resolver.value("weight", [w], 1.0) if isinstance(w, (list, dict)) else w for w in weights or []]
    for key, value in varying.items():
        options[key] = resolver.value(key, [value], None)
    for key, value in options.items():
        if isinstance(value, tuple) and any(_is_setting(v) for v in value):  # per-model, from the entries
            options[key] = tuple(resolver.value(key, [v], None) if _is_setting(v) else v for v in value)
    try:
        lookup(doc.data["method"], options)  # the plain values checked; the varying ones per tensor, as merged
    except TaskArithError as err:
        doc.problem(("options",), str(err))
    return weights or None, options


def _sources(doc: Document, data: dict, method) -> tuple[str, list, list | None, dict]:
    """What to merge: "models" or "vectors", their paths, their weights (None where no entry has one), and
    the method's per-model options given in the entries (option -> one value per entry)."""
    kinds = [k for k in ("models", "vectors") if k in data]
    if len(kinds) != 1:
        doc.problem((kinds[1],) if kinds else (), "give exactly one of 'models' (fine-tuned checkpoints, with "
                    "'base') or 'vectors' (task vector files)")
    kind = kinds[0] if kinds else "models"
    entries = data.get(kind)
    if not isinstance(entries, list) or not entries:
        doc.problem((kind,), f"expected a non-empty list of paths or {{{kind[:-1]}: PATH, weight: W}} entries")
        entries = []
    extra = tuple(_method_options(method) or ())
    parsed = [p for p in (_entry(doc, kind, i, e, extra) for i, e in enumerate(entries)) if p is not None]
    explicit = any(isinstance(e, dict) and "weight" in e for e in entries)
    named = {k for _, _, own in parsed for k in own}
    spec = merging.methods().get(method) if isinstance(method, str) else None
    per_model = {k: tuple(own.get(k, spec.options[k].default) for _, _, own in parsed) for k in named}
    return kind, [s for s, _, _ in parsed], ([w for _, w, _ in parsed] if explicit else None), per_model


def _entry(doc: Document, kind: str, i: int, entry, extra: tuple = ()) -> tuple | None:
    """One entry of ``kind``, a path or ``{model: PATH, weight: W, OPTION: V}`` (``vector:`` for vectors): its
    path, weight (a number, or a gradient or filters) and per-model options; None where it names no path."""
    key = kind[:-1]  # "model" or "vector"
    path, weight, own = (kind, i), 1.0, {}
    if isinstance(entry, dict):
        doc.mapping(path, entry, (key, "weight", *extra))
        if "weight" in entry:
            weight = entry["weight"] if isinstance(entry["weight"], (list, dict)) else doc.number(
                path + ("weight",), entry["weight"])
            if isinstance(weight, (list, dict)) and not check_setting(doc, path + ("weight",), "weight", weight):
                weight = None
        own = {k: v for k, v in entry.items() if k in extra and k != "seed"
               and (not _is_setting(v) or check_setting(doc, path + (k,), k, v))}
        if key not in entry:
            doc.problem(path, f"missing '{key}: PATH'")
            return None
        entry, path = entry[key], path + (key,)
    return doc.checkpoint(path, entry, vector=kind == "vectors"), weight, own


def _options(doc: Document, data: dict, method, seed: int | None, per_model: dict) -> tuple[dict, dict]:
    """The method's options, with ``--seed`` for a randomized method and the entries' per-model values;
    checked by the method's own rules. Options given as gradients or filters are returned apart."""
    valid = _method_options(method)
    options = data.get("options") or {}
    if not isinstance(options, dict):
        doc.problem(("options",), f"expected a mapping of option: value, got {type(options).__name__}")
        options = {}
    elif valid is not None:  # unknown keys get their own line; lookup checks the values
        doc.mapping(("options",), options, tuple(valid) or ("none: this method takes no options",))
        options = {k: v for k, v in options.items() if k in valid}
    varying = {k: v for k, v in options.items() if _is_setting(v) and check_setting(doc, ("options", k), k, v)}
    options = {k: v for k, v in options.items() if not _is_setting(v)} | per_model
    if seed is not None and valid is not None and merging.methods()[method].randomized:
        options["seed"] = seed
    if varying:
        return options, varying  # checked once resolved
    return doc.method_options(("method",), ("options",), method, options), varying


def _is_setting(value) -> bool:
    """A gradient (a list of numbers) or filters (``{filter, value}`` entries), rather than one value."""
    return isinstance(value, dict) or (isinstance(value, list) and bool(value)
                                       and all(isinstance(v, (int, float, dict)) for v in value))


def _method_options(method) -> list[str] | None:
    spec = merging.methods().get(method) if isinstance(method, str) else None
    return list(spec.options) if spec else None
