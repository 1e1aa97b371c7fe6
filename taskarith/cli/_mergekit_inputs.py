"""The models a mergekit config names: a path, a Hugging Face Hub id (``_hub``), an earlier merge of a
multi-document config (``_mergekit_multi``), and ``MODEL+LORA``: a model with a PEFT LoRA adapter merged in.

mergekit merges such an adapter with PEFT's ``merge_and_unload`` into a full copy of the model, then
merges that copy. taskarith writes no copy: :class:`LoraView` reads the model and, for each weight the
adapter changes, returns what that merge gives (the adapter's ``s · B @ A`` added in float32, or in the
model's dtype where wider, rounded once into the model's dtype; ``modules_to_save`` weights replaced),
computed when the merge reads that tensor.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ..errors import TaskArithError
from ..io import open_checkpoint
from ..lora._adapter import _merge_terms
from ._document import Document, exists, got, show

__all__ = ["LoraView", "folder_of", "open_checkpoint", "reference", "same"]

_ADAPTER_CONFIG = "adapter_config.json"


def reference(doc: Document, where: tuple, value):
    """The model ``value`` names at ``where``: a checked path, a :class:`LoraView`, an earlier document's
    output, or None after recording the problem. ``value`` is a path or Hub id, ``MODEL+LORA``, or
    mergekit's mapping ``{model: MODEL, lora: LORA}`` (either one also ``{path: P, revision: R}``)."""
    if isinstance(value, dict):
        entry = doc.mapping(where, value, ("model", "lora", "override_architecture"))
        if entry.get("override_architecture") is not None:
            doc.warn(f"{doc.where(where + ('override_architecture',))}: ignored: taskarith reads the tensors by "
                     "name, whatever the architecture")
        model = _text(doc, where + ("model",), entry.get("model"))
        lora = _text(doc, where + ("lora",), entry["lora"]) if entry.get("lora") is not None else None
        model_at, lora_at = where + ("model",), where + ("lora",)
    elif isinstance(value, str) and "+" in value and not exists(value):
        parts = value.split("+")
        if len(parts) != 2 or not all(parts):
            doc.problem(where, f"expected MODEL+LORA (one '+' between the model and its adapter), got {show(value)}")
            return None
        model, lora = parts
        model_at = lora_at = where
    else:
        return doc.checkpoint(where, value)
    if model is None:
        return None
    base = doc.checkpoint(model_at, model)
    if lora is None:
        return base
    adapter = _adapter(doc, lora_at, lora)
    if base is None or adapter is None:
        return None
    try:
        return LoraView(base, adapter, f"{model}+{lora}")
    except TaskArithError as err:
        doc.problem(lora_at, f"the adapter {show(lora)} does not apply to {show(model)}: {err}")
        return None


def _text(doc: Document, where: tuple, value) -> str | None:
    """A model path as text: mergekit also writes one as ``{path: P, revision: R}``."""
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        doc.mapping(where, value, ("path", "revision"))
        revision = value.get("revision")
        return value["path"] + (f"@{revision}" if isinstance(revision, str) and revision else "")
    if not isinstance(value, str) or not value:
        doc.problem(where, f"expected a path (text), got {got(value)}")
        return None
    return value


def _adapter(doc: Document, where: tuple, text: str) -> Path | None:
    """The folder of a LoRA adapter: local, or a Hub id from the cache (downloaded unless offline)."""
    found = doc.located(where, text, lambda p: (p / _ADAPTER_CONFIG).is_file(), noun="the adapter path", what="adapter")
    if found is None:
        return None
    folder, is_adapter = found
    if not is_adapter:
        what = "no such adapter folder" if not folder.exists() else "not a PEFT adapter folder (no adapter_config.json)"
        doc.problem(where, f"{what}: {show(text)}")
        return None
    return folder


def folder_of(source) -> Path:
    """The path whose ``config.json`` and other files describe ``source`` (a view's underlying model)."""
    while not isinstance(source, (str, os.PathLike)):
        source = source.path
    return Path(source)


def same(a, b) -> bool:
    """Whether two model references name the same model (mergekit compares them so, to find the base)."""
    if isinstance(a, Path) and isinstance(b, Path):
        try:
            return a == b or a.expanduser().resolve() == b.expanduser().resolve()
        except (OSError, RuntimeError):
            return False
    return a is b or (not isinstance(a, Path) and not isinstance(b, Path) and a == b)


class LoraView:
    """A model with a LoRA adapter merged in, as PEFT's ``merge_and_unload`` merges it, read tensor by tensor.

    Names, shapes and dtypes are the model's. A tensor the adapter changes is computed when read:
    ``W + s · B @ A`` (and ``b + s · b_B`` for a LoRA bias; a ``modules_to_save`` copy instead of ``W``),
    added in float32 (in the model's dtype where that is wider), rounded into the model's dtype. The last
    tensor computed is kept, for the row blocks of one tensor read one after the other.
    """

    def __init__(self, model, adapter: Path, text: str):
        self._model, self._base = model, open_checkpoint(model)
        self.adapter, self.text = adapter, text
        base = self._base
        meta = {n: torch.empty(base.shape(n), dtype=base.dtype(n), device="meta") for n in base.names()}
        self._replaced, self._deltas = _merge_terms(adapter, meta, base=folder_of(model))
        self.path = folder_of(model)  # its config and tokenizer files are the model's, as in mergekit's copy
        self.paths = [*getattr(model, "paths", [model]), adapter]
        self.metadata: dict[str, str] = {}
        self._lock = threading.Lock()
        self._last: tuple[str | None, torch.Tensor | None] = (None, None)

    def __str__(self) -> str:
        return self.text

    def __eq__(self, other) -> bool:
        return isinstance(other, LoraView) and same(self._model, other._model) and same(self.adapter, other.adapter)

    def __hash__(self) -> int:
        return hash(os.path.realpath(self.adapter))

    @property
    def config_json(self) -> dict | None:
        """The model's ``config.json`` where the model is an earlier merge not written yet."""
        return getattr(self._model, "config_json", None)

    def names(self) -> list[str]:
        return self._base.names()

    def __contains__(self, name: object) -> bool:
        return name in self._base

    def dtype(self, name: str) -> torch.dtype:
        return self._base.dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._base.shape(name)

    def prefetch(self, name: str, limit: int | None = None) -> None:
        self._base.prefetch(name, limit=limit)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._replaced and name not in self._deltas:
            return self._base.tensor(name)
        with self._lock:
            if self._last[0] == name:
                return self._last[1]
            value = self._merged(name)
            self._last = (name, value)
            return value

    def _merged(self, name: str) -> torch.Tensor:
        dtype = self._base.dtype(name)
        value = self._replaced[name].to(dtype) if name in self._replaced else self._base.tensor(name)
        deltas = self._deltas.get(name, [])
        if not deltas:
            return value.clone()
        wide = torch.promote_types(dtype, torch.float32)  # PEFT upcasts 16-bit adapters to float32
        out = value.to(wide, copy=True)
        for delta in deltas:
            out += delta(wide)
        return out.to(dtype)
