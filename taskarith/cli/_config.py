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
from . import _mergekit, _yaml
from ._document import Document, got
from ._plan import Plan

__all__ = ["Plan", "load", "parse"]

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
    doc = Document(text, name)
    data = doc.data
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
    kind, sources, weights = _sources(doc, data)
    base = doc.checkpoint(("base",), data["base"]) if data.get("base") is not None else None
    if kind == "models" and "base" not in data:
        doc.problem(("base",), "merging fine-tuned models needs 'base: PATH' (the pretrained model)")
    options = _options(doc, data, method, seed)
    dtype = doc.dtype(("dtype",), data.get("dtype"))
    return Plan(method, kind, base, sources, weights, options, dtype)


def _sources(doc: Document, data: dict) -> tuple[str, list, list | None]:
    """What to merge: "models" or "vectors", their paths, and their weights (None where no entry has one)."""
    kinds = [k for k in ("models", "vectors") if k in data]
    if len(kinds) != 1:
        doc.problem((kinds[1],) if kinds else (), "give exactly one of 'models' (fine-tuned checkpoints, with "
                    "'base') or 'vectors' (task vector files)")
    kind = kinds[0] if kinds else "models"
    entries = data.get(kind)
    if not isinstance(entries, list) or not entries:
        doc.problem((kind,), f"expected a non-empty list of paths or {{{kind[:-1]}: PATH, weight: W}} entries")
        entries = []
    pairs = [pair for pair in (_entry(doc, kind, i, e) for i, e in enumerate(entries)) if pair is not None]
    explicit = any(isinstance(e, dict) and "weight" in e for e in entries)
    return kind, [s for s, _ in pairs], ([w for _, w in pairs] if explicit else None)


def _entry(doc: Document, kind: str, i: int, entry) -> tuple | None:
    """One entry of ``kind``, a path or ``{model: PATH, weight: W}`` (``vector:`` for vectors): its path and
    weight, each None where invalid; None where a mapping names no path."""
    key = kind[:-1]  # "model" or "vector"
    path, weight = (kind, i), 1.0
    if isinstance(entry, dict):
        doc.mapping(path, entry, (key, "weight"))
        if "weight" in entry:
            weight = doc.number(path + ("weight",), entry["weight"])
        if key not in entry:
            doc.problem(path, f"missing '{key}: PATH'")
            return None
        entry, path = entry[key], path + (key,)
    return doc.checkpoint(path, entry, vector=kind == "vectors"), weight


def _options(doc: Document, data: dict, method, seed: int | None) -> dict:
    """The method's options, with ``--seed`` for a randomized method; checked by the method's own rules."""
    valid = _method_options(method)
    options = data.get("options") or {}
    if not isinstance(options, dict):
        doc.problem(("options",), f"expected a mapping of option: value, got {type(options).__name__}")
        options = {}
    elif valid is not None:  # unknown keys get their own line; lookup checks the values
        doc.mapping(("options",), options, tuple(valid) or ("none: this method takes no options",))
        options = {k: v for k, v in options.items() if k in valid}
    if seed is not None and valid is not None and merging.methods()[method].randomized:
        options["seed"] = seed
    return doc.method_options(("method",), ("options",), method, options)


def _method_options(method) -> list[str] | None:
    spec = merging.methods().get(method) if isinstance(method, str) else None
    return list(spec.options) if spec else None
