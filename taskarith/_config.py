"""Merge configs for ``taskarith merge``: taskarith's own format and mergekit's common subset.

A config is parsed and validated as a whole before any tensor is read: every
problem (unknown key, missing path, invalid option, a mergekit feature with no
taskarith equivalent) is reported at once with its line number and key.
See ``docs/cli.md`` for both formats and the mergekit mapping table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _yaml, merging
from .merging._registry import lookup
from .errors import TaskArithError
from .io import SHARD_INDEX, SINGLE_FILE

__all__ = ["Plan", "load", "parse"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}
NATIVE_KEYS = ("method", "base", "models", "vectors", "options", "dtype")
MERGEKIT_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "seed")
MERGEKIT_METHODS = ("task_arithmetic", "ties", "dare_ties")
_SHOWN = 20  # problems listed in one message; values are shown up to _SHORT characters
_SHORT = 80
_REFUSED = {
    "slices": "per-layer 'slices' (layer stacking) have no taskarith equivalent; merge whole models",
    "tokenizer": "'tokenizer' blocks are not supported: the output takes the base model's tokenizer files",
    "chat_template": "'chat_template' is not supported: the output takes the base model's files",
}


@dataclass
class Plan:
    """A validated merge: what :func:`taskarith.merge_files` (or :func:`taskarith.merge`) will run."""

    method: str
    kind: str  # "models" (fine-tuned checkpoints) or "vectors" (task vector files)
    base: Path | None
    sources: list[Path]
    weights: list[float] | None
    options: dict = field(default_factory=dict)
    dtype: torch.dtype | None = None
    dialect: str = "taskarith"

    def describe(self) -> dict:
        return {"dialect": self.dialect, "method": self.method, "base": str(self.base) if self.base else None,
                self.kind: [str(s) for s in self.sources], "weights": self.weights, "options": self.options,
                "dtype": str(self.dtype).replace("torch.", "") if self.dtype else None}


def load(path, *, seed: int | None = None, output=None) -> Plan:
    """Read and validate the config file at ``path``: YAML or JSON text, UTF-8 (or UTF-16/32 with a BOM)."""
    path = Path(path)
    return parse(_yaml.read(path), name=str(path), seed=seed, output=output)


def parse(text: str, *, name: str = "<config>", seed: int | None = None, output=None) -> Plan:
    """Validate a config given as text; raises one :class:`TaskArithError` listing every problem.

    Example:
        >>> plan = parse("method: ties\\nvectors: [a.safetensors]\\noptions: {density: 0.5}", name="c.yaml")
        Traceback (most recent call last):
        ...
        taskarith.errors.TaskArithError: c.yaml: 1 problem: line 2, vectors[0]: no such file 'a.safetensors'. ...
    """
    doc = _Doc(text, name)
    data = doc.data
    if not isinstance(data, dict):
        got = "nothing (the file is empty or only comments)" if data is None else _got(data)
        raise TaskArithError(f"{name}: a merge config is a mapping of keys (method: ..., models: ... or "
                             f"merge_method: ..., base_model: ...), got {got}; see docs/cli.md")
    if "merge_method" in data or "base_model" in data:
        plan = _mergekit(doc, data, seed)
    else:
        plan = _native(doc, data, seed)
    vector_out = plan is not None and plan.kind == "vectors" and plan.base is None
    if output is not None and vector_out and Path(output).suffix != ".safetensors":
        doc.problem((), f"merging task vectors without a base writes a task vector: the output must be a "
                        f".safetensors file, got {str(output)!r} (or add 'base:' to get a model)")
    doc.raise_problems()
    return plan


def _got(value) -> str:
    """``value`` for a message, with its YAML/JSON type: "a list [1, 2]", "text 'x'", "nothing"."""
    kinds = {bool: "a boolean", int: "the number", float: "the number", str: "text", list: "a list",
             dict: "a mapping", tuple: "a list"}
    if value is None or isinstance(value, _yaml.OutOfRange):
        return "nothing" if value is None else f"{value!r}, out of range"
    return f"{kinds.get(type(value), type(value).__name__)} {_show(value)}"


def _show(value, form=repr) -> str:
    """``form(value)`` cut to a readable length: a hostile config must not make a megabyte message."""
    text = form(value)
    return text if len(text) <= _SHORT else text[:_SHORT - 12] + "…" + text[-10:]


# ------------------------------------------------------------------ document


class _Doc:
    """Parsed config data plus the line of every key, and the problems found so far."""

    def __init__(self, text: str, name: str):
        self.name, self.problems = name, []
        self.data, self.lines, duplicates = _yaml.load(text, name)
        for path in duplicates:
            self.problem(path, "duplicate key (the later value would silently win); keep one")

    def problem(self, path: tuple, message: str) -> None:
        self.problems.append((path, message if len(message) <= 8 * _SHORT else message[:8 * _SHORT] + "…"))

    def where(self, path: tuple) -> str:
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{_show(p, str)}" for p in path).lstrip(".")
        line = next((self.lines[path[:k]] for k in range(len(path), 0, -1) if path[:k] in self.lines), None)
        parts = [f"line {line}" if line else "", dotted]
        return ", ".join(p for p in parts if p)

    def raise_problems(self) -> None:
        if not self.problems:
            return
        order = sorted(self.problems, key=lambda pm: self.lines.get(pm[0], 0))
        count = len(order)
        shown = "; ".join(f"{self.where(p)}: {m.rstrip('.')}" if self.where(p) else m.rstrip(".")
                          for p, m in order[:_SHOWN])
        if count > _SHOWN:
            shown += f"; ... ({count - _SHOWN} more)"
        raise TaskArithError(f"{self.name}: {count} problem{'s' * (count != 1)}: {shown}. "
                             "See docs/cli.md for the config format.")

    # value checks: return the value, or None after recording a problem

    def number(self, path: tuple, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        hint = ""
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
            hint = " (YAML 1.1 reads an exponent as a number only with a dot and a sign: write e.g. 1.0e-3, 1.0e+3)"
        got = _got(value) if isinstance(value, _yaml.OutOfRange) else _show(value)
        self.problem(path, f"expected a finite number, got {got}{hint}")
        return None

    def mapping(self, path: tuple, value, allowed: tuple, *, refused: tuple = ()) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"expected a mapping of {', '.join(allowed)}, got {_got(value)}")
            return {}
        for key in value:
            if key not in allowed and key not in refused:
                self.problem(path + (key,), f"unknown key {_show(key)}; valid keys: {', '.join(allowed)}")
        return value

    def checkpoint(self, path: tuple, value, *, vector: bool = False) -> Path | None:
        if not isinstance(value, str) or not value:
            self.problem(path, f"expected a path (text), got {_got(value)}")
            return None
        shown = _show(value)
        try:  # relative paths are relative to the current directory, as in mergekit
            p = Path(value).expanduser()
            exists, is_file = p.exists(), p.is_file()
            is_model = is_file or (p / SINGLE_FILE).is_file() or (p / SHARD_INDEX).is_file()
        except (OSError, ValueError, RuntimeError) as err:  # a NUL byte, an unknown ~user, a name too long
            self.problem(path, f"cannot use the path {shown}: {getattr(err, 'strerror', None) or err}")
            return None
        if not exists:
            hint = ""
            if re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not vector:
                hint = (" (taskarith reads local checkpoints only: download it first, e.g. "
                        f"`huggingface-cli download {value} --local-dir DIR`, and give DIR)")
            self.problem(path, f"no such file {shown}{hint}")
            return None
        if vector or is_file:
            if p.suffix != ".safetensors" or not is_file:
                self.problem(path, f"{shown} is not a .safetensors file" + ("" if vector else " or a model folder"))
                return None
        elif not is_model:
            self.problem(path, f"folder {shown} holds neither {SINGLE_FILE} nor {SHARD_INDEX}")
            return None
        return p

    def dtype(self, path: tuple, value) -> torch.dtype | None:
        if value is None:
            return None
        if not isinstance(value, str) or value not in DTYPES:
            self.problem(path, f"unknown dtype {_show(value)}; valid: {', '.join(DTYPES)}")
            return None
        return DTYPES[value]

    def method_options(self, method_path: tuple, options_path: tuple, method, options: dict) -> dict:
        if not isinstance(method, str) or method not in merging.methods():
            self.problem(method_path, f"unknown merge method {_show(method)}; valid: "
                         f"{', '.join(sorted(merging.methods()))}")
            return options
        try:
            return lookup(method, options)[1]
        except TaskArithError as err:
            self.problem(options_path, str(err))
            return options


# ------------------------------------------------------------------ native


def _native(doc: _Doc, data: dict, seed: int | None) -> Plan | None:
    doc.mapping((), data, NATIVE_KEYS, refused=tuple(_REFUSED))
    for key, why in _REFUSED.items():
        if key in data:
            doc.problem((key,), why)
    method = data.get("method")
    if method is None:
        doc.problem(("method",), f"missing 'method'; one of {', '.join(sorted(merging.methods()))}")
    kinds = [k for k in ("models", "vectors") if k in data]
    if len(kinds) != 1:
        doc.problem((kinds[1],) if kinds else (), "give exactly one of 'models' (fine-tuned checkpoints, with "
                    "'base') or 'vectors' (task vector files)")
    kind = kinds[0] if kinds else "models"
    entries = data.get(kind)
    key = kind[:-1]  # "model" or "vector"
    sources, weights = [], []
    if not isinstance(entries, list) or not entries:
        doc.problem((kind,), f"expected a non-empty list of paths or {{{key}: PATH, weight: W}} entries")
        entries = []
    for i, entry in enumerate(entries):
        path, weight = (kind, i), 1.0
        if isinstance(entry, dict):
            doc.mapping(path, entry, (key, "weight"))
            if "weight" in entry:
                weight = doc.number(path + ("weight",), entry["weight"])
            if key not in entry:
                doc.problem(path, f"missing '{key}: PATH'")
                continue
            entry, path = entry[key], path + (key,)
        sources.append(doc.checkpoint(path, entry, vector=kind == "vectors"))
        weights.append(weight)
    explicit = any(isinstance(e, dict) and "weight" in e for e in entries)
    base = doc.checkpoint(("base",), data["base"]) if data.get("base") is not None else None
    if kind == "models" and "base" not in data:
        doc.problem(("base",), "merging fine-tuned models needs 'base: PATH' (the pretrained model)")
    valid = _method_options(method)
    options = data.get("options") or {}
    if not isinstance(options, dict):
        doc.problem(("options",), f"expected a mapping of option: value, got {type(options).__name__}")
        options = {}
    elif valid is not None:  # unknown keys get their own line; lookup checks the values
        doc.mapping(("options",), options, tuple(valid) or ("none: this method takes no options",))
        options = {k: v for k, v in options.items() if k in valid}
    if seed is not None and _method_options(method) is not None and merging.methods()[method].randomized:
        options["seed"] = seed
    options = doc.method_options(("method",), ("options",), method, options)
    dtype = doc.dtype(("dtype",), data.get("dtype"))
    return Plan(method, kind, base, sources, weights if explicit else None, options, dtype)


def _method_options(method) -> list[str] | None:
    spec = merging.methods().get(method) if isinstance(method, str) else None
    return list(spec.options) if spec else None


# ---------------------------------------------------------------- mergekit


def _mergekit(doc: _Doc, data: dict, seed: int | None) -> Plan | None:
    doc.mapping((), data, MERGEKIT_KEYS, refused=tuple(_REFUSED))
    for key, why in _REFUSED.items():
        if key in data:
            doc.problem((key,), why)
    method = data.get("merge_method")
    if method not in MERGEKIT_METHODS:
        doc.problem(("merge_method",), f"mergekit method {_show(method)} is not supported; supported: "
                    f"{', '.join(MERGEKIT_METHODS)} (taskarith's other methods are available in its own config "
                    "format, see docs/cli.md)")
    source = data.get("tokenizer_source")
    if source not in (None, "base"):
        doc.problem(("tokenizer_source",), f"tokenizer_source {_show(source)} is not supported: the output takes the "
                    "base model's tokenizer (remove the key or write 'base')")
    base_text = data.get("base_model")
    base = None
    if base_text is None:
        doc.problem(("base_model",), "missing 'base_model': task arithmetic, TIES and DARE need the pretrained model")
    else:
        base = doc.checkpoint(("base_model",), base_text)
    top = doc.mapping(("parameters",), data.get("parameters"),
                      ("weight", "density", "normalize", "int8_mask", "rescale", "lambda"))
    defaults = {k: _scalar(doc, ("parameters", k), top[k]) for k in ("weight", "density", "lambda") if k in top}
    flags = {}
    for key in ("normalize", "int8_mask", "rescale"):
        if key in top and not isinstance(top[key], bool):
            doc.problem(("parameters", key), f"expected true or false, got {_got(top[key])}")
        flags[key] = top.get(key)

    models = data.get("models")
    if not isinstance(models, list) or not models:
        doc.problem(("models",), "expected a non-empty list of '- model: PATH' entries with 'parameters'")
        models = []
    sources, weights, densities = [], [], []
    for i, entry in enumerate(models):
        path = ("models", i)
        entry = doc.mapping(path, entry if isinstance(entry, dict) else {"model": entry}, ("model", "parameters"))
        name = entry.get("model")
        if isinstance(name, dict):
            doc.problem(path + ("model",), "nested model references (LoRA, overrides) are not supported; give a path")
            continue
        if name is not None and base_text is not None and _same_path(name, base_text):
            continue  # mergekit lists the base among the models and skips it
        if isinstance(name, str) and "+" in name and not _exists(name):
            doc.problem(path + ("model",), "'model+lora' references are not supported: merge the adapter into "
                        "the model first and give its folder")
            continue
        sources.append(doc.checkpoint(path + ("model",), name))
        params = doc.mapping(path + ("parameters",), entry.get("parameters"), ("weight", "density"))
        values = {k: _scalar(doc, path + ("parameters", k), params[k]) for k in params if k in ("weight", "density")}
        weight = values.get("weight", defaults.get("weight"))
        if weight is None and "weight" not in params:
            doc.problem(path + ("parameters",), "missing 'weight' (mergekit requires one per model, or a default "
                        "under the top-level 'parameters')")
        weights.append(weight)
        densities.append((values.get("density", defaults.get("density", 1.0)), path + ("parameters", "density")))
    if not sources and models:
        doc.problem(("models",), "no model to merge besides the base model: list the fine-tuned models")
    if not sources or method not in MERGEKIT_METHODS or None in weights or None in defaults.values() \
            or any(d is None for d, _ in densities):
        return None
    return _map_mergekit(doc, method, base, sources, weights, densities, defaults, flags, data, seed)


def _scalar(doc: _Doc, path: tuple, value):
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


def _exists(value: str) -> bool:
    try:
        return Path(value).exists()
    except (OSError, ValueError):
        return False


def _map_mergekit(doc, method, base, sources, weights, densities, defaults, flags, data, seed) -> Plan:
    """Translate mergekit's semantics to taskarith's, refusing what does not translate exactly."""
    scale = defaults.get("lambda", 1.0)
    normalize = flags["normalize"] if flags["normalize"] is not None else method == "ties"
    rescale = flags["rescale"] if flags["rescale"] is not None else method == "dare_ties"
    options: dict = {"scale": scale}
    values = sorted({d for d, _ in densities})
    if method == "task_arithmetic":
        for d, path in densities:
            if d != 1.0:
                doc.problem(path, "task_arithmetic does not sparsify: remove 'density' or use ties / dare_ties")
        if normalize:
            total = sum(weights)
            if not math.isfinite(total):
                doc.problem(("models",), f"the weights {_show(weights)} sum to {total}: use smaller weights")
            total = 1.0 if abs(total) < 1e-8 else total
            weights = [w / total for w in weights]
    else:
        if len(values) > 1:
            doc.problem(densities[0][1], f"the models have different densities {values}; taskarith trims every "
                        "vector to one density: use one value")
        density = values[0]
        if method == "ties":
            if rescale:
                doc.problem(("parameters", "rescale"), "rescale: true (norm-preserving trim) has no taskarith "
                            "equivalent for ties; remove it")
            options.update(density=density, scope="tensor", sign="sum")
        else:
            if not rescale:
                doc.problem(("parameters", "rescale"), "rescale: false is not supported: taskarith's DARE always "
                            "rescales the kept entries by 1/density")
            options.update(drop=1.0 - density, sign="sum")
            chosen = seed if seed is not None else data.get("seed")
            if chosen is not None and (isinstance(chosen, bool) or not isinstance(chosen, int)):
                doc.problem(("seed",), f"expected an integer seed, got {_got(chosen)}")
                chosen = 0
            if chosen is None:
                doc.problem(("merge_method",), "dare_ties is random: add 'seed: N' to the config or pass --seed N "
                            "(taskarith makes random merges reproducible)")
            options["seed"] = 0 if chosen is None else chosen
        weights = _consensus_weights(doc, method, weights, normalize)
    options = doc.method_options(("merge_method",), ("parameters",), method, options)
    dtype = doc.dtype(("out_dtype",), data["out_dtype"]) if "out_dtype" in data else doc.dtype(("dtype",), data.get("dtype"))
    return Plan(method, "models", base, sources, weights, options, dtype, dialect="mergekit")


def _consensus_weights(doc: _Doc, method: str, weights: list[float], normalize: bool) -> list[float] | None:
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
