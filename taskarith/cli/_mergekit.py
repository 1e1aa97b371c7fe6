"""mergekit's merge configs, run with mergekit's semantics: every method of mergekit 0.1.5, per-model
parameters, per-layer gradients and ``filter:`` lists, ``slices``, the base model's role.

The config is checked as a whole, every tensor's parameters resolved, before a tensor is read; the
merge then runs on taskarith's engine. ``--semantics taskarith`` instead translates task_arithmetic,
ties and dare_ties to taskarith's own methods (``_mergekit_native``). See ``docs/cli.md``.
"""

from __future__ import annotations

import math
import secrets

from .. import merging
from ..errors import TaskArithError
from ..io import open_checkpoint
from . import _mergekit_card, _mergekit_inputs, _mergekit_native, _mergekit_slices, _mergekit_vocab
from ._document import Document, got, show
from ._mergekit_inputs import same
from ._mergekit_methods import REQUIRED, TABLE, MergekitMethod, option_name
from ._mergekit_params import _UNSET, Resolver, check_setting
from ._plan import Plan

__all__ = ["KEYS", "plan"]

KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
        "tokenizer", "chat_template", "seed", "name", "modules")
_NATIVE = {"linear": "mean"}


def plan(doc: Document, data: dict, seed: int | None, *, semantics: str = "mergekit") -> Plan | None:
    """The plan of a mergekit config, or None where its problems (recorded in ``doc``) leave none."""
    if semantics == "taskarith":
        return _mergekit_native.plan(doc, data, seed)
    doc.mapping((), data, KEYS)
    name = data.get("merge_method")
    spec = TABLE.get(name) if isinstance(name, str) else None
    if spec is None:
        hint = f" (taskarith's own '{_NATIVE[name]}' is the same)" if isinstance(name, str) and name in _NATIVE else ""
        doc.problem(("merge_method",), f"unknown mergekit method {show(name)}{hint}; mergekit's methods: "
                    f"{', '.join(sorted(TABLE))}")
        return None
    _refuse(doc, data)
    vocabulary = _mergekit_vocab.parse(doc, data)  # tokenizer_source, tokenizer:, chat_template
    base_text = data.get("base_model")
    base = _mergekit_inputs.reference(doc, ("base_model",), base_text) if base_text is not None else None
    if "slices" in data and "models" in data:
        doc.problem(("slices",), "give either 'models' (whole models) or 'slices' (layer ranges), not both")
        return None
    top = _parameters(doc, ("parameters",), data.get("parameters"), spec, name)
    if "slices" in data:
        found = _sliced(doc, spec, name, data, base_text, base, top)
    else:
        found = _whole(doc, spec, name, data, base_text, base, top)
    if found is None or doc.problems:
        return None
    reference, sources, weights, options, base_used, extra = found
    method = merging.methods()[spec.method]
    if spec.base == "optional":
        options["use_base"] = base_used
    notes = []
    if method.randomized:
        options["seed"], note = _seed(doc, data, seed)
        notes += [note] if note else []
    options = doc.method_options(("merge_method",), ("parameters",), spec.method, options)
    compute = doc.dtype(("dtype",), data.get("dtype"))
    out = doc.dtype(("out_dtype",), data["out_dtype"]) if "out_dtype" in data else compute
    files = _mergekit_card.files(doc, data, name, spec.method)
    reference, sources, extra = _mergekit_vocab.apply(doc, vocabulary, base=base, reference=reference, sources=sources,
                                                      compute_dtype=compute, files=files, config=extra, notes=notes)
    return Plan(spec.method, "models", reference, sources, weights, options, out, dialect="mergekit",
                compute_dtype=compute, base_used=base_used, notes=notes, config=extra, files=files)


def _whole(doc, spec, name, data, base_text, base, top) -> tuple | None:
    """A ``models:`` config: the models' paths, weights and options resolved per tensor."""
    inputs, base_used = _inputs(doc, spec, name, _entries(doc, data), base_text, base)
    if not inputs:
        return None
    reference = base if base is not None else inputs[0][1]
    names = _names(doc, reference)
    if names is None:
        return None
    resolver = Resolver.for_layers(names, _mergekit_slices.layer_count(reference, names))
    own = [_parameters(doc, where + ("parameters",), params, spec, name) for where, _, params in inputs]

    def resolve(key, default, index):
        chain = [top.get(key, _UNSET)] if index is None else [own[index].get(key, _UNSET), top.get(key, _UNSET)]
        return resolver.value(key, chain, default)

    weights, options = _values(doc, spec, name, resolve, [w for w, _, _ in inputs])
    _check_sum(doc, options, weights)
    return reference, [p for _, p, _ in inputs], weights, options, base_used, None


def _names(doc: Document, reference) -> list[str] | None:
    """The reference model's tensor names (every parameter is resolved for each before the merge)."""
    if doc.problems:
        return None
    try:
        return open_checkpoint(reference).names()
    except TaskArithError as err:
        doc.problem(("base_model",), str(err))
        return None


def _sliced(doc, spec, name, data, base_text, base, top) -> tuple | None:
    """A ``slices:`` config: views assembling each input's layers, and per-tensor parameters."""
    layout = _mergekit_slices.parse(doc, data)
    if layout is None:
        return None
    roles, base_used = [], False
    for sl in layout.slices:
        sl.sources = [(w, text, path, _parameters(doc, w + ("parameters",), params, spec, name), span)
                      for w, text, path, params, span in sl.sources]
        sl.params = _parameters(doc, sl.where + ("parameters",), sl.params, spec, name)
        paths = [src[2] for src in sl.sources]
        fake = [(src[0], src[1], src[2], src[3]) for src in sl.sources]
        own_text, own = (sl.base_text, sl.base) if sl.base_text is not None else (base_text, base)
        inputs, base_used = _inputs(doc, spec, name, fake, own_text, own, appended=False)
        if not inputs:
            return None
        order = [paths.index(p) for _, p, _ in inputs]
        if base_used:  # the slice's base_model, else the config's, read from this slice's sources
            order.append(next(i for i, p in enumerate(paths) if same(p, own)))
        roles.append(order)
    if len({len(r) for r in roles}) > 1:
        doc.problem(("slices",), f"every slice must give {name} the same number of models, got "
                    f"{[len(r) for r in roles]}")
        return None
    reference = base if base is not None else layout.slices[0].sources[0][2]
    views = layout.assemble(reference, roles)
    count = len(roles[0]) - int(base_used)

    def resolve(key, default, index):
        return layout.value(key, top, default, index, roles)

    weights, options = _values(doc, spec, name, resolve, [("slices",)] * count)
    layout_ref = views[-1] if base_used else views[0]
    return layout_ref, views[:count], weights, options, base_used, layout.config_updates(reference)


def _refuse(doc: Document, data: dict) -> None:
    """What taskarith cannot do yet for a mergekit config: one line each."""
    if "modules" in data:
        doc.problem(("modules",), "'modules' (several modules of one model, as in vision-language models) is not "
                    "supported; merge each module's checkpoint on its own")


def _entries(doc: Document, data: dict) -> list[tuple]:
    """``models:`` as (path in the config, text as written, checked path, parameters)."""
    models = data.get("models")
    if not isinstance(models, list) or not models:
        doc.problem(("models",), "expected a non-empty list of '- model: PATH' entries (or 'slices')")
        return []
    entries = []
    for i, entry in enumerate(models):
        where = ("models", i)
        entry = doc.mapping(where, entry if isinstance(entry, dict) else {"model": entry}, ("model", "parameters"))
        text = entry.get("model")
        path = _mergekit_inputs.reference(doc, where + ("model",), text)  # a path, MODEL+LORA, a Hub id
        params = entry.get("parameters")
        if params is not None and not isinstance(params, dict):
            doc.problem(where + ("parameters",), f"expected a mapping of parameter: value, got {got(params)}")
            params = None
        entries.append((where, text, path, params or {}))
    return entries


def _inputs(doc: Document, spec: MergekitMethod, name: str, entries: list, base_text, base, *,
            appended: bool = True) -> tuple[list, bool]:
    """The method's input models (path in the config, checked path, parameters), in order, and whether
    the base model is read as the base. A base listed among the models is not one more input, except
    where the method ignores the base's role (linear, karcher, passthrough), as in mergekit."""
    if spec.base == "required" and base_text is None:
        doc.problem(("base_model",), f"{name} needs 'base_model' (the model the others are compared with)")
    listed = [(w, p, params) for w, t, p, params in entries]
    if base is None or spec.base == "ignored":
        inputs = listed
        if appended and base is not None and not any(p is not None and same(p, base) for _, p, _ in listed):
            inputs = listed + [(("base_model",), base, {})]
        base_used = False
    else:
        inputs = [(w, p, params) for w, p, params in listed if p is None or not same(p, base)]
        base_used = True
        if listed and not inputs:
            doc.problem(("models",), "no model to merge besides the base model: list the fine-tuned models")
            return [], True
        if not appended and len(inputs) == len(listed):
            doc.problem(listed[0][0][:2], f"{name} reads the base model: list {base_text!r} among each slice's sources")
            return [], True
    count = len(inputs) + int(base_used)
    problems = []
    if count < spec.min_inputs or (spec.max_inputs is not None and count > spec.max_inputs):
        want = spec.min_inputs if spec.max_inputs == spec.min_inputs else f"{spec.min_inputs} to {spec.max_inputs or 'any'}"
        problems.append(f"{name} takes {want} models (the base counted), got {count}")
    if spec.min_non_base is not None and not (spec.min_non_base <= len(inputs) <= (spec.max_non_base or len(inputs))):
        want = spec.min_non_base if spec.max_non_base == spec.min_non_base else f"at least {spec.min_non_base}"
        problems.append(f"{name} takes {want} models besides the base, got {len(inputs)}")
    for p in problems:
        doc.problem(("models",), p)
    return ([] if problems else [i for i in inputs if i[1] is not None]), base_used


def _parameters(doc: Document, path: tuple, params, spec: MergekitMethod, name: str) -> dict:
    """A ``parameters:`` mapping with every setting checked; parameters the method does not take are
    left out with a warning (mergekit ignores them too)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        doc.problem(path, f"expected a mapping of parameter: value, got {got(params)}")
        return {}
    known = {**spec.shared, **spec.per_model}
    kept = {}
    for key, setting in params.items():
        if key not in known:
            doc.warn(f"{doc.where(path + (key,))}: {name} takes no parameter {show(key)} "
                     f"(it takes: {', '.join(known) or 'none'}); ignored, as mergekit does")
            continue
        if check_setting(doc, path + (key,), key, setting):
            kept[key] = setting
    return kept


def _values(doc: Document, spec: MergekitMethod, name: str, resolve, wheres: list) -> tuple[list | None, dict]:
    """The engine's weights and options: ``resolve(key, default, input index or None)`` per parameter."""
    options = {}
    for key, default in spec.shared.items():
        value = resolve(key, default, None)
        if value is REQUIRED:
            doc.problem(("parameters", key), f"{name} needs '{key}' (under 'parameters')")
        options[option_name(key)] = value
    weights = None
    for key, default in spec.per_model.items():
        values = []
        for index, where in enumerate(wheres):
            value = resolve(key, default, index)
            if value is REQUIRED:
                doc.problem(where, f"{name} needs '{key}' for every model (under its 'parameters', or a default "
                            "under the top-level 'parameters')")
            values.append(value)
        if key == "weight":
            weights = values
        else:
            options[option_name(key)] = tuple(values)
    return weights, options


def _check_sum(doc: Document, options: dict, weights: list | None) -> None:
    """Normalized weights are divided by their sum: it must be finite."""
    plain = [w for w in weights or [] if isinstance(w, float)]
    if options.get("normalize") is True and len(plain) == len(weights or []) and not math.isfinite(sum(plain)):
        doc.problem(("models",), f"the weights {show(plain)} sum to {sum(plain)}: use smaller weights")


def _seed(doc: Document, data: dict, seed) -> tuple[int, str | None]:
    """A random method's seed: ``--seed``, else the config's ``seed``, else a fresh one (reported)."""
    chosen = seed if seed is not None else data.get("seed")
    if chosen is not None and (isinstance(chosen, bool) or not isinstance(chosen, int)):
        doc.problem(("seed",), f"expected an integer seed, got {got(chosen)}")
        return 0, None
    if chosen is None:
        chosen = secrets.randbelow(2**31)
        return chosen, f"random seed {chosen} (pass --seed {chosen} to repeat this merge)"
    return chosen, None
