"""The inputs of a merge with a new vocabulary (``_mergekit_vocab``): each vocabulary tensor read re-indexed
to the output's tokens, as mergekit's ``PermutedVocabulary`` gives it to the merge method.

A tensor is a vocabulary tensor when its name is an input embedding's, an output head's or its bias's
(``embed_tokens``, ``wte``, ``word_embeddings``, ``lm_head``, ``embed_out``, ...) outside the layers; a
tied head is not stored, so only the embedding is re-indexed. Per tensor, the models read for it (the
inputs, the base among them where the method reads it; for slices, the first slice's sources for the
embeddings and the last's for the head) make its group. Each model's row of a token it has is its own;
the row of a token it lacks (or of a forced one) comes from the config's setting for the token, else the
base's row, else the one model of the group with the token, else the mean of the rows of those with it
(summed in the models' order, then divided), else zero. Rows past the vocabulary (``pad_to_multiple_of``)
are the mean of the vocabulary's rows. Rows are computed in the config's ``dtype`` (else the group's
widest dtype), from the models' tensors converted to it, as mergekit does.
"""

from __future__ import annotations

import os
import re
import threading

import torch

from ..errors import TaskArithError
from ..io import Checkpoint, open_checkpoint
from ._document import show
from ._mergekit_inputs import folder_of
from ._mergekit_slices import _LAYER

__all__ = ["Aligned", "Aligner", "model_key", "origins"]

# Tensors indexed by token id on their first axis: input embeddings, output heads and their biases.
_VOCAB = re.compile(r"(?:^|\.)(?:embed_tokens|tok_embeddings|wte|embed_in|word_embeddings|embeddings|shared|"
                    r"lm_head|embed_out|output|output_layer|vocab_projector)(?:\.decoder|\.linear)?\.(?:weight|bias)$"
                    r"|(?:^|\.)cls\.predictions\.(?:bias|decoder\.weight)$")


def model_key(model) -> tuple:
    """One model, however it is read (``MODEL+LORA`` is another model than ``MODEL``)."""
    adapter = getattr(model, "adapter", None)
    return os.path.realpath(folder_of(model)), os.path.realpath(adapter) if adapter is not None else None


def origins(member, name: str) -> tuple:
    """The checkpoint and name that ``member`` reads for ``name``."""
    return member.source(name) if hasattr(member, "source") else (member, name)


class Aligner:
    """Re-indexes each input's vocabulary tensors; rows a model lacks are filled as mergekit fills them."""

    def __init__(self, vocab, settings, inner: list, base, compute_dtype):
        self.vocab, self.settings, self.compute = vocab, settings, compute_dtype
        self.base = model_key(open_checkpoint(base)) if base is not None else None
        reference = inner[-1]
        self.names = [n for n in reference.names() if _VOCAB.search(n) and not _LAYER.match(n)
                      and len(reference.shape(n)) >= 1]
        self.groups = {}
        for name in self.names:
            group = {}
            for member in inner:
                ckpt, at = origins(member, name)
                group.setdefault(model_key(ckpt), (ckpt, at))
            self.groups[name] = group
        self._fills: dict[str, dict] = {}
        self._lock = threading.Lock()

    def unknown(self) -> list[str]:
        """Tokens of the output vocabulary that no model has (nor the config fills): their rows are zero."""
        found = set()
        for group in self.groups.values():
            having = torch.stack([self.vocab.maps[k] >= 0 for k in group]).any(dim=0)
            found |= {self.vocab.names[i] for i in (~having).nonzero().flatten().tolist()}
        return sorted(t for t in found if getattr(self.settings.tokens.get(t), "kind", None) is None)

    def problems(self) -> list[tuple[tuple, str]]:
        """(where, what) for each configured source whose row is read (the token is forced, or a model lacks
        it) but which is not a merged model or lacks what it is asked for (mergekit fails there mid-merge)."""
        found = []
        for token, spec in self.settings.tokens.items():
            needed = [name for name, group in self.groups.items() if self._needed(token, group)]
            if spec.kind not in ("model", "model_token") or not needed:
                continue
            key, model = model_key(open_checkpoint(spec.model)), folder_of(spec.model)
            where = spec.where + ("source",)
            if any(key not in self.groups[name] for name in needed):
                what = f"{model} is not among the models merged (for {needed[0]}): a token's row comes from one"
                found.append((where, what))
            elif spec.kind == "model_token" and spec.token is not None \
                    and spec.token not in self.vocab.vocabs.get(key, ({},))[0]:
                found.append((where + ("token",), f"{model} has no token {show(spec.token)}"))
            elif spec.kind == "model_token" and spec.token_id is not None:
                rows = {self.groups[name][key][0].shape(self.groups[name][key][1])[0] for name in needed}
                if spec.token_id >= min(rows):
                    found.append((where + ("token_id",), f"{model} has {min(rows)} rows, no row {spec.token_id}"))
            elif spec.kind == "model" and self.vocab.maps[key][self.vocab.tokens[token]] < 0:
                what = f"{model} has no token {show(token)} (take another token's row with kind: model_token)"
                found.append((where, what))
        return found

    def _lacking(self, group: dict) -> list[int]:
        """The output ids some model of ``group`` lacks, and the forced ones: the rows not simply copied."""
        have = torch.stack([self.vocab.maps[k] >= 0 for k in group]).all(dim=0)
        forced = [self.vocab.tokens[t] for t, spec in self.settings.tokens.items() if spec.force]
        return sorted(set((~have).nonzero().flatten().tolist()) | set(forced))

    def _needed(self, token: str, group: dict) -> bool:
        """Whether a token's configured row is read: it is forced, or a model lacks the token."""
        spec = self.settings.tokens.get(token)
        i = self.vocab.tokens[token]
        return (spec is not None and spec.force) or any(self.vocab.maps[k][i] < 0 for k in group)

    def dtype(self, name: str) -> torch.dtype:
        if self.compute is not None:
            return self.compute
        dtypes = [c.dtype(at) for c, at in self.groups[name].values()]
        out = dtypes[0]
        for d in dtypes[1:]:
            out = torch.promote_types(out, d)
        return out

    def shape(self, name: str, own: tuple) -> tuple:
        return (self.vocab.size, *own[1:])

    def _raw(self, name: str, key) -> torch.Tensor:
        ckpt, at = self.groups[name][key]
        t = ckpt.tensor(at)
        if t.shape[0] < self.vocab.limits[key]:
            raise TaskArithError(f"{name} of {folder_of(ckpt)} has {t.shape[0]} rows, fewer than its vocab_size "
                                 f"{self.vocab.limits[key]}")
        return t.to(self.compute) if self.compute is not None else t

    def _fill(self, name: str) -> dict:
        """The rows of the tokens some model lacks (or forced ones), by output id (None: left zero)."""
        with self._lock:
            if name in self._fills:
                return self._fills[name]
            group, maps, dtype = self.groups[name], self.vocab.maps, self.dtype(name)
            raw = {}

            def row(key, i):
                if key not in raw:
                    raw[key] = self._raw(name, key)
                return raw[key][i]

            fills = {}
            for i in self._lacking(group):
                token = self.vocab.names[i]
                spec = self.settings.tokens.get(token)
                having = [k for k in group if maps[k][i] >= 0]
                if spec is not None and spec.kind is not None:
                    key = model_key(open_checkpoint(spec.model)) if spec.model is not None else None
                    if spec.kind == "zero":
                        fills[i] = None
                    elif spec.kind == "model":
                        fills[i] = row(key, int(maps[key][i]))
                    else:
                        index = spec.token_id if spec.token is None else self.vocab.vocabs[key][0][spec.token]
                        if index >= self._raw(name, key).shape[0]:
                            raise TaskArithError(f"token {show(token)}: row {index} is past the "
                                                 f"{self._raw(name, key).shape[0]} rows of {name}")
                        fills[i] = row(key, index)
                elif len(having) == 1:
                    fills[i] = row(having[0], int(maps[having[0]][i]))
                elif not having:
                    fills[i] = None
                elif self.base in having:
                    fills[i] = row(self.base, int(maps[self.base][i]))
                else:  # the mean of the rows of the models that have it, summed in the models' order
                    first = row(having[0], int(maps[having[0]][i]))
                    total = torch.zeros(first.shape, dtype=dtype)
                    for k in having:
                        total = total + row(k, int(maps[k][i]))
                    total /= len(having)
                    fills[i] = total
            self._fills[name] = fills
            return fills

    def tensor(self, name: str, ckpt) -> torch.Tensor:
        key = model_key(ckpt)
        own, rows = self._raw(name, key), self.vocab.maps[key]
        fills = self._fill(name)
        count = len(self.vocab.tokens)
        out = torch.zeros((self.vocab.size, *own.shape[1:]), dtype=self.dtype(name))
        present = rows >= 0
        forced = [i for t, i in self.vocab.tokens.items() if (s := self.settings.tokens.get(t)) and s.force]
        present[forced] = False
        out[:count][present] = own[rows[present]].to(out.dtype)
        for i, value in fills.items():
            if not present[i] and value is not None:
                out[i] = value
        if self.vocab.size > count:
            out[count:] = torch.mean(out[:count], dim=0)
        return out


class Aligned:
    """A merge input whose vocabulary tensors read re-indexed to the output vocabulary (the last one kept,
    for the row blocks of one tensor read one after the other); other tensors read as they are."""

    def __init__(self, inner, aligner: Aligner):
        self._inner, self._aligner = inner, aligner
        self._vocab = set(aligner.names)
        self.path = inner.path
        self.paths = list(getattr(inner, "paths", [inner.path]))
        self.metadata = getattr(inner, "metadata", {})
        self.config_json = getattr(inner, "config_json", None)
        self._last: tuple = (None, None)
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return str(self._inner.path if isinstance(self._inner, Checkpoint) else self._inner)

    def names(self) -> list[str]:
        return self._inner.names()

    def __contains__(self, name: object) -> bool:
        return name in self._inner

    def source(self, name: str) -> tuple:
        return origins(self._inner, name)

    def dtype(self, name: str) -> torch.dtype:
        return self._aligner.dtype(name) if name in self._vocab else self._inner.dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        own = tuple(self._inner.shape(name))
        return self._aligner.shape(name, own) if name in self._vocab else own

    def prefetch(self, name: str, limit: int | None = None) -> None:
        self._inner.prefetch(name, limit=limit)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._vocab:
            return self._inner.tensor(name)
        with self._lock:
            if self._last[0] != name:
                self._last = (None, None)  # the previous one is freed before the next is built
                self._last = (name, self._aligner.tensor(name, origins(self._inner, name)[0]))
            return self._last[1]
