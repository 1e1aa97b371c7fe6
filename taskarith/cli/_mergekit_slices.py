"""mergekit's ``slices``: output layers assembled from layer ranges of the input models (frankenmerges,
and merges of matching ranges).

Each output slice lists sources with the same number of layers; the output's layers are the slices'
layers in order. Output tensor ``layers.L.x`` of input ``i`` reads ``layers.(start + k).x`` of the
slice's ``i``-th source. Tensors outside the layers (embeddings, final norm, head) come from the first
slice's sources when they sit before the layers (embeddings) and from the last slice's otherwise. A
gradient's position ``t`` runs from 0 to 1 over each slice's layers and is 0 outside the layers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import Checkpoint, open_checkpoint
from ._document import Document, got
from ._mergekit_inputs import folder_of, reference
from ._mergekit_params import _UNSET, collapse, first

__all__ = ["SliceLayout", "View", "layer_count", "parse"]

_LAYER = re.compile(r"^(?P<pre>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<i>\d+)\.(?P<rest>.+)$")
_EARLY = ("embed", "wte", "wpe")  # tensors before the layers
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count(model: Path, names: list[str]) -> int:
    """Decoder layers of a model: its ``config.json`` says, else the highest layer index in the names, plus one."""
    config = _config(model)
    for key in _LAYER_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    found = [int(m.group("i")) for n in names if (m := _LAYER.match(n))]
    return max(found) + 1 if found else 1


def _config(model) -> dict:
    given = getattr(model, "config_json", None)  # an earlier merge of a multi-document config, not written yet
    if given is not None:
        return given
    model = folder_of(model)
    path = model / "config.json" if model.is_dir() else model.parent / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class View:
    """A checkpoint assembled from others: each output name reads a tensor of some checkpoint."""

    def __init__(self, sources: dict[str, tuple[Checkpoint, str]], reference):
        self._sources = sources
        self.path = folder_of(reference)
        self.config_json = getattr(reference, "config_json", None)
        self.paths = sorted({str(p) for c, _ in sources.values() for p in getattr(c, "paths", [c.path])})
        self.metadata: dict[str, str] = {}

    def __str__(self) -> str:
        return f"layers of {', '.join(self.paths)}"

    def names(self) -> list[str]:
        return list(self._sources)

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def source(self, name: str) -> tuple:
        """The checkpoint and the name in it that output tensor ``name`` reads."""
        return self._sources[name]

    def dtype(self, name: str) -> torch.dtype:
        ckpt, inner = self._sources[name]
        return ckpt.dtype(inner)

    def shape(self, name: str) -> tuple[int, ...]:
        ckpt, inner = self._sources[name]
        return ckpt.shape(inner)

    def tensor(self, name: str) -> torch.Tensor:
        ckpt, inner = self._sources[name]
        return ckpt.tensor(inner)

    def prefetch(self, name: str, limit: int | None = None) -> None:
        ckpt, inner = self._sources[name]
        ckpt.prefetch(inner, limit=limit)


@dataclass
class Slice:
    sources: list  # (where, text, path, params, (start, end))
    params: dict
    where: tuple
    base_text: str | None = None  # the slice's own base_model, where it names one
    base: Path | None = None


@dataclass
class SliceLayout:
    slices: list[Slice]
    entries: list = field(default_factory=list)  # every source, for the input checks
    places: dict = field(default_factory=dict)  # output name -> (slice index, position t, {source index: name})

    @property
    def layers(self) -> int:
        return sum(s.sources[0][4][1] - s.sources[0][4][0] for s in self.slices)

    def assemble(self, reference, roles: list[list[int]]) -> list[View]:
        """Views of the inputs: ``roles[s][i]`` is the source of slice ``s`` read as input ``i``.

        Also records, per output tensor, its slice, its position ``t`` and each input's source name."""
        ckpts = {}

        def ckpt(path) -> Checkpoint:
            if path not in ckpts:
                ckpts[path] = open_checkpoint(path)
            return ckpts[path]

        first = ckpt(self.slices[0].sources[0][2])
        early = [n for n in first.names() if not _LAYER.match(n) and any(e in n for e in _EARLY)]
        late = [n for n in first.names() if not _LAYER.match(n) and n not in early]
        per_layer = [(m.group("pre"), m.group("rest")) for n in first.names()
                     if (m := _LAYER.match(n)) and m.group("i") == "0"]
        order: list[tuple[str, int, float, tuple | None]] = [(n, 0, 0.0, None) for n in early]
        out_layer = 0
        for s, sl in enumerate(self.slices):
            start, end = sl.sources[0][4]
            for k in range(end - start):
                t = k / (end - start - 1) if end - start > 1 else 1.0
                order += [(f"{pre}.{out_layer}.{rest}", s, t, (pre, k, rest)) for pre, rest in per_layer]
                out_layer += 1
        order += [(n, len(self.slices) - 1, 0.0, None) for n in late]
        views = []
        for i in range(len(roles[0])):
            sources = {}
            for name, s, t, layer in order:
                src = self.slices[s].sources[roles[s][i]]
                inner = name if layer is None else f"{layer[0]}.{src[4][0] + layer[1]}.{layer[2]}"
                sources[name] = (ckpt(src[2]), inner)
                self.places.setdefault(name, (s, t, {}))[2][i] = inner
            views.append(View(sources, reference))
        return views

    def value(self, key: str, top: dict, default, index: int | None, roles: list[list[int]]):
        """Parameter ``key`` per output tensor: input ``index``'s own setting in its slice (None: shared
        parameters), then the slice's, then the config's."""
        values = {}
        for name, (s, t, inner) in self.places.items():
            sl = self.slices[s]
            own = sl.sources[roles[s][index]][3].get(key, _UNSET) if index is not None else _UNSET
            tensor = inner[index] if index is not None else name
            values[name] = first((own, sl.params.get(key, _UNSET), top.get(key, _UNSET)), key, tensor, t, default)
        return collapse(values, key, default)

    def config_updates(self, reference) -> dict:
        """``config.json`` keys that follow the output's layer count."""
        config = _config(reference)
        updates = {key: self.layers for key in _LAYER_KEYS if isinstance(config.get(key), int)}
        types = config.get("layer_types")
        if isinstance(types, list):
            updates["layer_types"] = [types[min(start + k, len(types) - 1)] for sl in self.slices
                                      for start, end in [sl.sources[0][4]] for k in range(end - start)]
        return updates


def parse(doc: Document, data: dict) -> SliceLayout | None:
    """The ``slices`` of a config, checked: every source a model with a valid ``layer_range``, the
    sources of a slice of equal length."""
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        doc.problem(("slices",), "expected a non-empty list of '- sources: [...]' entries")
        return None
    parsed = []
    for s, entry in enumerate(slices):
        where = ("slices", s)
        entry = doc.mapping(where, entry, ("sources", "parameters", "base_model", "residual_weight"))
        if entry.get("residual_weight") is not None:
            doc.warn(f"{doc.where(where + ('residual_weight',))}: residual_weight has no effect (mergekit 0.1.5 "
                     "reads it nowhere); ignored")
        base_text = entry.get("base_model")
        base = doc.checkpoint(where + ("base_model",), base_text) if base_text is not None else None
        sources = entry.get("sources")
        if not isinstance(sources, list) or not sources:
            doc.problem(where + ("sources",), "expected a non-empty list of '- model: PATH, layer_range: [A, B]'")
            continue
        checked = [c for i, src in enumerate(sources) if (c := _source(doc, where + ("sources", i), src))]
        lengths = {c[4][1] - c[4][0] for c in checked}
        if len(lengths) > 1:
            doc.problem(where + ("sources",), f"the sources of a slice must have the same number of layers, "
                        f"got {sorted(lengths)}")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            doc.problem(where + ("parameters",), f"expected a mapping of parameter: value, got {got(params)}")
            params = {}
        if len(checked) == len(sources):
            parsed.append(Slice(checked, params, where, base_text, base))
    if len(parsed) != len(slices):
        return None
    layout = SliceLayout(parsed)
    layout.entries = [(src[0], src[1], src[2], src[3]) for sl in parsed for src in sl.sources]
    return layout


def _source(doc: Document, where: tuple, src) -> tuple | None:
    src = doc.mapping(where, src, ("model", "layer_range", "parameters"))
    path = reference(doc, where + ("model",), src.get("model"))
    span = src.get("layer_range")
    if not (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in span) and 0 <= span[0] < span[1]):
        doc.problem(where + ("layer_range",), f"expected [START, END] with 0 <= START < END, got {got(span)}")
        return None
    if path is not None:
        total = layer_count(path, open_checkpoint(path).names())
        if span[1] > total:
            doc.problem(where + ("layer_range",), f"{src.get('model')!r} has {total} layers; the range "
                        f"{span} runs past them")
            return None
    params = src.get("parameters") or {}
    if path is None or not isinstance(params, dict):
        if not isinstance(params, dict):
            doc.problem(where + ("parameters",), f"expected a mapping of parameter: value, got {got(params)}")
        return None
    return (where, src.get("model"), path, params, (span[0], span[1]))
