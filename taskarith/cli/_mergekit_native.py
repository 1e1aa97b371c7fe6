"""mergekit configs run with taskarith's exact semantics (``--semantics taskarith``): task_arithmetic, ties and
dare_ties translated to taskarith's own methods where they compute the same, refused otherwise."""

from __future__ import annotations

import math
from pathlib import Path

from ._document import Document, exists, got, show
from ._plan import Plan

__all__ = ["MERGEKIT_KEYS", "MERGEKIT_METHODS", "plan"]

MERGEKIT_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "seed")
MERGEKIT_METHODS = ("task_arithmetic", "ties", "dare_ties")


def plan(doc: Document, data: dict, seed: int | None) -> Plan | None:
    """The plan of a mergekit config, or None where its problems (recorded in ``doc``) leave none."""
    doc.top_level(data, MERGEKIT_KEYS)
    if data.get("merge_method") not in MERGEKIT_METHODS:  # that alone: the rest would be about another method
        doc.problem(("merge_method",), _unsupported(data.get("merge_method")))
        return None
    method, base_text, base = _header(doc, data)
    defaults, flags = _parameters(doc, data)
    sources, weights, densities = _models(doc, data, base_text, defaults)
    if not sources or method not in MERGEKIT_METHODS or None in weights or None in defaults.values() \
            or any(d is None for d, _ in densities):
        return None
    return _map_mergekit(doc, method, base, sources, weights, densities, defaults, flags, data, seed)


def _header(doc: Document, data: dict) -> tuple:
    """The method, and the base model as written and as a checked path."""
    method = data.get("merge_method")
    source = data.get("tokenizer_source")
    if source not in (None, "base"):
        doc.problem(("tokenizer_source",), f"tokenizer_source {show(source)} is not supported: the output takes the "
                    "base model's tokenizer (remove the key or write 'base')")
    base_text = data.get("base_model")
    base = None
    if base_text is None:
        doc.problem(("base_model",), "missing 'base_model': task arithmetic, TIES and DARE need the pretrained model")
    else:
        base = doc.checkpoint(("base_model",), base_text)
    return method, base_text, base


_EQUIVALENT = {"linear": "mean", "breadcrumbs": "breadcrumbs (top = gamma)"}


def _unsupported(method) -> str:
    same = _EQUIVALENT.get(method) if isinstance(method, str) else None
    hint = f"; taskarith's own '{same}' computes the same in its config format" if same else ""
    return (f"mergekit method {show(method)} has no exact translation to taskarith's methods (those are "
            f"{', '.join(MERGEKIT_METHODS)}){hint}; without --semantics taskarith it runs with mergekit's semantics")


def _parameters(doc: Document, data: dict) -> tuple[dict, dict]:
    """The top-level 'parameters': the numeric defaults of every model, and the boolean flags."""
    top = doc.mapping(("parameters",), data.get("parameters"),
                      ("weight", "density", "normalize", "int8_mask", "rescale", "lambda"))
    defaults = {k: _scalar(doc, ("parameters", k), top[k]) for k in ("weight", "density", "lambda") if k in top}
    flags = {}
    for key in ("normalize", "int8_mask", "rescale"):
        if key in top and not isinstance(top[key], bool):
            doc.problem(("parameters", key), f"expected true or false, got {got(top[key])}")
        flags[key] = top.get(key)
    return defaults, flags


def _models(doc: Document, data: dict, base_text, defaults: dict) -> tuple[list, list, list]:
    """The models to merge (the base skipped), their weights, and their densities with where each was set."""
    models = data.get("models")
    if not isinstance(models, list) or not models:
        doc.problem(("models",), "expected a non-empty list of '- model: PATH' entries with 'parameters'")
        models = []
    sources, weights, densities = [], [], []
    for i, entry in enumerate(models):
        model = _model(doc, ("models", i), entry, base_text, defaults)
        if model is not None:
            sources.append(model[0])
            weights.append(model[1])
            densities.append(model[2])
    if not sources and models:
        doc.problem(("models",), "no model to merge besides the base model: list the fine-tuned models")
    return sources, weights, densities


def _model(doc: Document, path: tuple, entry, base_text, defaults: dict) -> tuple | None:
    """One '- model: PATH' entry: its path, weight and (density, where); None where it is skipped."""
    entry = doc.mapping(path, entry if isinstance(entry, dict) else {"model": entry}, ("model", "parameters"))
    name = entry.get("model")
    if isinstance(name, dict):
        doc.problem(path + ("model",), "nested model references (LoRA, overrides) are not supported; give a path")
        return None
    if name is not None and base_text is not None and _same_path(name, base_text):
        return None  # mergekit lists the base among the models and skips it
    if isinstance(name, str) and "+" in name and not exists(name):
        doc.problem(path + ("model",), "'model+lora' references are read with mergekit's semantics only (drop "
                    "--semantics taskarith), or merge the adapter into the model first and give its folder")
        return None
    source = doc.checkpoint(path + ("model",), name)
    params = doc.mapping(path + ("parameters",), entry.get("parameters"), ("weight", "density"))
    values = {k: _scalar(doc, path + ("parameters", k), params[k]) for k in params if k in ("weight", "density")}
    weight = values.get("weight", defaults.get("weight"))
    if weight is None and "weight" not in params:
        doc.problem(path + ("parameters",), "missing 'weight' (mergekit requires one per model, or a default "
                    "under the top-level 'parameters')")
    return source, weight, (values.get("density", defaults.get("density", 1.0)), path + ("parameters", "density"))


def _scalar(doc: Document, path: tuple, value):
    if isinstance(value, list):
        doc.problem(path, "per-layer gradients (lists) are not supported; give one number")
        return None
    if isinstance(value, dict):
        doc.problem(path, "per-tensor filters are not supported; give one number")
        return None
    return doc.number(path, value)


def _same_path(a, b) -> bool:
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    try:
        return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, an unknown ~user: checkpoint() reports it
        return False



# ------------------------------------------------------------ translation


def _map_mergekit(doc, method, base, sources, weights, densities, defaults, flags, data, seed) -> Plan:
    """Translate mergekit's semantics to taskarith's, refusing what does not translate exactly."""
    normalize = flags["normalize"] if flags["normalize"] is not None else method == "ties"
    rescale = flags["rescale"] if flags["rescale"] is not None else method == "dare_ties"
    options: dict = {"scale": defaults.get("lambda", 1.0)}
    if method == "task_arithmetic":
        weights = _task_arithmetic_weights(doc, weights, densities, normalize)
    else:
        options.update(_trim_options(doc, method, densities, rescale, data, seed))
        weights = _consensus_weights(doc, method, weights, normalize)
    options = doc.method_options(("merge_method",), ("parameters",), method, options)
    dtype = doc.dtype(("out_dtype",), data["out_dtype"]) if "out_dtype" in data else doc.dtype(("dtype",), data.get("dtype"))
    return Plan(method, "models", base, sources, weights, options, dtype, dialect="mergekit")


def _task_arithmetic_weights(doc: Document, weights: list[float], densities: list, normalize: bool) -> list[float]:
    """task_arithmetic keeps every entry; with normalize, mergekit divides by the sum of the weights."""
    for d, path in densities:
        if d != 1.0:
            doc.problem(path, "task_arithmetic does not sparsify: remove 'density' or use ties / dare_ties")
    if not normalize:
        return weights
    total = sum(weights)
    if not math.isfinite(total):
        doc.problem(("models",), f"the weights {show(weights)} sum to {total}: use smaller weights")
    total = 1.0 if abs(total) < 1e-8 else total
    return [w / total for w in weights]


def _trim_options(doc: Document, method: str, densities: list, rescale: bool, data: dict, seed) -> dict:
    """The options of taskarith's ties or dare_ties that trim as mergekit's do: one density for all models."""
    values = sorted({d for d, _ in densities})
    if len(values) > 1:
        doc.problem(densities[0][1], f"the models have different densities {values}; taskarith trims every "
                    "vector to one density: use one value")
    density = values[0]
    if method == "ties":
        if rescale:
            doc.problem(("parameters", "rescale"), "rescale: true (norm-preserving trim) has no taskarith "
                        "equivalent for ties; remove it")
        return {"density": density, "scope": "tensor", "sign": "sum"}
    if not rescale:
        doc.problem(("parameters", "rescale"), "rescale: false is not supported: taskarith's DARE always "
                    "rescales the kept entries by 1/density")
    return {"drop": 1.0 - density, "sign": "sum", "seed": _seed(doc, data, seed)}


def _seed(doc: Document, data: dict, seed) -> int:
    """DARE's seed: ``--seed``, else the config's; required, since taskarith makes random merges reproducible."""
    chosen = seed if seed is not None else data.get("seed")
    if chosen is not None and (isinstance(chosen, bool) or not isinstance(chosen, int)):
        doc.problem(("seed",), f"expected an integer seed, got {got(chosen)}")
        chosen = 0
    if chosen is None:
        doc.problem(("merge_method",), "dare_ties is random: add 'seed: N' to the config or pass --seed N "
                    "(taskarith makes random merges reproducible)")
    return 0 if chosen is None else chosen


def _consensus_weights(doc: Document, method: str, weights: list[float], normalize: bool) -> list[float] | None:
    """mergekit: Σ w_i τ_i m_i / (Σ w_i m_i if normalize else 1); taskarith: Σ w_i τ_i m_i / Σ m_i."""
    if normalize and len(set(weights)) == 1 and weights[0] > 0:
        return None  # a common positive weight cancels in mergekit's weighted mean
    if not normalize and len(weights) == 1:
        return weights
    where = ("parameters", "normalize")
    if normalize:
        doc.problem(where, f"with normalize: true and weights {weights}, mergekit's {method} takes the weighted "
                    f"mean of the agreeing entries; taskarith's averages them by count, which agrees only when "
                    "all weights are equal and positive: make them equal")
    else:
        doc.problem(where, f"with normalize: false (mergekit's default for {method}) mergekit sums the agreeing "
                    f"entries; taskarith's {method} averages them, which agrees only for one model: set "
                    "'normalize: true' with equal weights")
    return weights
