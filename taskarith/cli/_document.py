"""A merge config being validated: its values, the line of every key, and every problem found so far.

Both dialects (``_config`` for taskarith's own format, ``_mergekit`` for mergekit's) check their values
through :class:`Document`, which records a problem and carries on, so that one message lists them all.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch

from .. import merging
from ..errors import TaskArithError
from ..io import SHARD_INDEX, SINGLE_FILE
from ..merging._registry import lookup
from . import _hub, _yaml
from ._plan import DTYPES

__all__ = ["Document", "exists", "got", "locate", "show"]

_SHOWN = 20  # problems listed in one message; values are shown up to _SHORT characters
_SHORT = 80
# Keys of either dialect that ask for what taskarith does not do, and why.
_REFUSED = {
    "slices": "per-layer 'slices' (layer stacking) have no taskarith equivalent; merge whole models",
    "tokenizer": "'tokenizer' blocks are not supported: the output takes the base model's tokenizer files",
    "chat_template": "'chat_template' is not supported: the output takes the base model's files",
}


def exists(value: str) -> bool:
    """Whether ``value`` names an existing path (False for text no path can be: a NUL byte, ...)."""
    try:
        return Path(value).exists()
    except (OSError, ValueError):
        return False


def got(value) -> str:
    """``value`` for a message, with its YAML/JSON type: "a list [1, 2]", "text 'x'", "nothing"."""
    kinds = {bool: "a boolean", int: "the number", float: "the number", str: "text", list: "a list",
             dict: "a mapping", tuple: "a list"}
    if value is None or isinstance(value, _yaml.OutOfRange):
        return "nothing" if value is None else f"{value!r}, out of range"
    return f"{kinds.get(type(value), type(value).__name__)} {show(value)}"


def show(value, form=repr) -> str:
    """``form(value)`` cut to a readable length: a hostile config must not make a megabyte message."""
    text = form(value)
    return text if len(text) <= _SHORT else text[:_SHORT - 12] + "…" + text[-10:]


class Document:
    """Parsed config data plus the line of every key, and the problems found so far."""

    def __init__(self, text: str, name: str, parsed: tuple | None = None):
        self.name, self.problems, self.warnings, self.text = name, [], [], text
        self.data, self.lines, duplicates = parsed if parsed is not None else _yaml.load(text, name)
        # mergekit-multi: earlier documents' outputs, by name (model references name them instead of a path)
        self.outputs: dict[str, object] = {}
        for path in duplicates:
            self.problem(path, "duplicate key (the later value would silently win); keep one")

    def warn(self, message: str) -> None:
        """Something the merge goes on without (an unused parameter): a warning, once."""
        if message not in self.warnings:
            self.warnings.append(message)
            warnings.warn(f"{self.name}: {message}", stacklevel=2)

    def problem(self, path: tuple, message: str) -> None:
        self.problems.append((path, message if len(message) <= 8 * _SHORT else message[:8 * _SHORT] + "…"))

    def where(self, path: tuple) -> str:
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{show(p, str)}" for p in path).lstrip(".")
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

    def top_level(self, data: dict, allowed: tuple) -> None:
        """Check a dialect's top-level keys: unknown ones, and those naming what taskarith does not do."""
        self.mapping((), data, allowed, refused=tuple(_REFUSED))
        for key, why in _REFUSED.items():
            if key in data:
                self.problem((key,), why)

    # value checks: return the value, or None after recording a problem

    def number(self, path: tuple, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        hint = ""
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
            hint = " (YAML 1.1 reads an exponent as a number only with a dot and a sign: write e.g. 1.0e-3, 1.0e+3)"
        shown = got(value) if isinstance(value, _yaml.OutOfRange) else show(value)
        self.problem(path, f"expected a finite number, got {shown}{hint}")
        return None

    def mapping(self, path: tuple, value, allowed: tuple, *, refused: tuple = ()) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"expected a mapping of {', '.join(allowed)}, got {got(value)}")
            return {}
        for key in value:
            if key not in allowed and key not in refused:
                self.problem(path + (key,), f"unknown key {show(key)}; valid keys: {', '.join(allowed)}")
        return value

    def located(self, path: tuple, value: str, probe, *, noun: str, **options) -> tuple[Path, object] | None:
        """``(where, probe(where))`` for the path or Hub id ``value`` (:func:`locate` with ``options``),
        or None after recording why it cannot be used: a Hub id neither cached nor downloaded, or text
        no path can be (a NUL byte, an unknown ``~user``, a name too long)."""
        try:
            where = locate(value, **options)
            return where, probe(where)
        except TaskArithError as err:
            self.problem(path, str(err))
        except (OSError, ValueError, RuntimeError) as err:
            self.problem(path, f"cannot use {noun} {show(value)}: {getattr(err, 'strerror', None) or err}")
        return None

    def checkpoint(self, path: tuple, value, *, vector: bool = False) -> Path | None:
        if not isinstance(value, str) or not value:
            self.problem(path, f"expected a path (text), got {got(value)}")
            return None
        if not vector and _hub.split_revision(value)[0] in self.outputs:
            return self.outputs[_hub.split_revision(value)[0]]  # an earlier document's merge, by its name
        shown = show(value)
        # Relative paths are relative to the current directory, as in mergekit.
        found = self.located(path, value, _model_probe, noun="the path", vector=vector)
        if found is None:
            return None
        p, (exists, is_file, is_model) = found
        if not exists:
            self.problem(path, f"no such file {shown}")
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
            self.problem(path, f"unknown dtype {show(value)}; valid: {', '.join(DTYPES)}")
            return None
        return DTYPES[value]

    def method_options(self, method_path: tuple, options_path: tuple, method, options: dict) -> dict:
        if not isinstance(method, str) or method not in merging.methods():
            self.problem(method_path, f"unknown merge method {show(method)}; valid: "
                         f"{', '.join(sorted(merging.methods()))}")
            return options
        try:
            return lookup(method, options)[1]
        except TaskArithError as err:
            self.problem(options_path, str(err))
            return options


def _model_probe(p: Path) -> tuple[bool, bool, bool]:
    """Whether ``p`` exists, is a file, and is a file or a model folder (one file or a shard index)."""
    is_file = p.is_file()
    return p.exists(), is_file, is_file or (p / SINGLE_FILE).is_file() or (p / SHARD_INDEX).is_file()


def locate(value: str, *, vector: bool = False, what: str = "model") -> Path:
    """The local path ``value`` names: itself where it exists; else, for a model (or an adapter: ``what``),
    ``PATH@REVISION`` of an existing local path (the revision ignored, as mergekit does) or a Hub id
    (``org/name[@revision]``) from the Hugging Face cache, downloaded there unless offline."""
    p = Path(value).expanduser()
    if vector or p.exists():
        return p
    name, revision = _hub.split_revision(value)
    if revision is not None and Path(name).expanduser().exists():
        return Path(name).expanduser()
    if _hub.is_repo_id(name):
        return _hub.snapshot(name, revision, what=what)
    return p
