"""mergekit's tokenizer settings: ``tokenizer_source``, the ``tokenizer:`` block and ``chat_template``.

With ``tokenizer_source`` (``base``, ``union`` or a model) or a ``tokenizer:`` block, the output gets a
tokenizer of its own, built with Transformers as mergekit builds it: the base model's (the first model's
without a base), every model's tokens added to the base's (``union``: plain tokens first, then added
tokens, model by model in the order of the config, each model's in the order of its ids), or the named
model's; then the ``tokens:`` the block lists that it lacks. Every vocabulary tensor of every input
(input embeddings, the head where it is not tied to them; each token's row) is re-indexed to the output
vocabulary before the merge; a row for a token the input lacks is filled by the block's setting for the
token, else by the base model's row, else by the one model that has the token, else by the mean of the
rows of the models that do (zero where none does). ``pad_to_multiple_of`` appends rows, each the mean
of the vocabulary's rows. ``config.json``'s ``vocab_size`` follows. See ``docs/cli.md``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TaskArithError
from ..io import open_checkpoint
from ._document import Document, got, show
from ._mergekit_align import Aligned, Aligner, model_key, origins
from ._mergekit_inputs import folder_of, reference
from ._mergekit_slices import _config
from ._mergekit_templates import NAMED

__all__ = ["Settings", "apply", "parse"]

# Tokenizer files a folder may hold: those of the reference model the new tokenizer does not write are dropped.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                    "chat_template.json")


@dataclass(frozen=True)
class TokenSource:
    """Where the row of a token listed under ``tokenizer: tokens:`` comes from."""

    kind: str | None  # "model" (its row of the token), "model_token" (its row of another token), "zero", None
    where: tuple
    model: object = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass
class Settings:
    source: object  # "base", "union", a model reference, or None (only a chat template)
    where: tuple
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad: int | None = None
    template: str | None = None  # "auto" or Jinja text


def parse(doc: Document, data: dict) -> Settings | None:
    """The tokenizer settings of a config, checked; None where it has none."""
    source, block, template = data.get("tokenizer_source"), data.get("tokenizer"), data.get("chat_template")
    if source and block:
        doc.problem(("tokenizer",), "give 'tokenizer_source' or a 'tokenizer:' block, not both (mergekit refuses both)")
        return None
    settings = None
    if block is not None:
        block = doc.mapping(("tokenizer",), block, ("source", "tokens", "pad_to_multiple_of"))
        where = ("tokenizer", "source")
        settings = Settings(_source(doc, where, block.get("source", "union")), where)
        settings.tokens = _tokens(doc, block.get("tokens"))
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 0):
            doc.problem(("tokenizer", "pad_to_multiple_of"), f"expected a positive whole number, got {got(pad)}")
        settings.pad = pad or None
    elif source is not None:
        settings = Settings(_source(doc, ("tokenizer_source",), source), ("tokenizer_source",))
    if template:
        settings = settings or Settings(None, ("chat_template",))
        settings.template = _template(doc, template)
    return settings


def _source(doc: Document, where: tuple, value):
    if value in ("base", "union"):
        return value
    if isinstance(value, str) and value.startswith("model:") and not _is_dir(value):
        value = value[len("model:"):]  # the form of early mergekit versions
    if isinstance(value, str) and _is_dir(value):
        return Path(value).expanduser()  # a folder with the tokenizer (weights not needed)
    found = reference(doc, where, value)
    return found if found is not None else "base"


def _tokens(doc: Document, tokens) -> dict[str, TokenSource]:
    where = ("tokenizer", "tokens")
    if tokens is None:
        return {}
    if not isinstance(tokens, dict):
        doc.problem(where, f"expected a mapping of token: {{source: ..., force: ...}}, got {got(tokens)}")
        return {}
    out = {}
    for token, spec in tokens.items():
        at = where + (token,)
        if not isinstance(token, str) or not token:
            doc.problem(at, f"a token is text, got {got(token)} (quote it)")
            continue
        spec = doc.mapping(at, spec if spec is not None else {}, ("source", "force"))
        force = spec.get("force", False)
        if not isinstance(force, bool):
            doc.problem(at + ("force",), f"expected true or false, got {got(force)}")
        source = spec.get("source")
        if source is None:
            if force is True:
                doc.problem(at + ("force",), "'force: true' needs a 'source' (the row every model takes)")
            out[token] = TokenSource(None, at)
        elif isinstance(source, dict) and source.get("kind") == "zero":
            doc.mapping(at + ("source",), source, ("kind",))
            out[token] = TokenSource("zero", at, force=force is True)
        elif isinstance(source, dict) and source.get("kind") == "model_token":
            s = doc.mapping(at + ("source",), source, ("kind", "model", "token", "token_id"))
            name, index = s.get("token"), s.get("token_id")
            if (name is None) == (index is None):
                doc.problem(at + ("source",), "give one of 'token' (a token of the model) and 'token_id' (a row)")
            elif name is not None and not isinstance(name, str):
                doc.problem(at + ("source", "token"), f"expected a token (text), got {got(name)}")
            elif index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
                doc.problem(at + ("source", "token_id"), f"expected a row number (0 or more), got {got(index)}")
            model = reference(doc, at + ("source", "model"), s.get("model"))
            out[token] = TokenSource("model_token", at, model, name, index, force is True)
        elif isinstance(source, dict) and "kind" in source:
            doc.problem(at + ("source", "kind"), f"unknown kind {show(source['kind'])}; valid: model_token, zero")
        else:
            out[token] = TokenSource("model", at, reference(doc, at + ("source",), source), force=force is True)
    return out


def _template(doc: Document, value) -> str | None:
    """mergekit's reading of ``chat_template``: ``auto``, a name it ships, else Jinja text."""
    if not isinstance(value, str):
        doc.problem(("chat_template",), f"expected a template name or Jinja text, got {got(value)}")
        return None
    if value == "auto":
        return value
    if len(value) < 256 and "\n" not in value and "{" not in value and value in NAMED:
        return NAMED[value]
    if len(value) < 20 or "{" not in value:
        doc.problem(("chat_template",), f"unknown chat template {show(value)}: give one of auto, "
                    f"{', '.join(sorted(NAMED))} or a Jinja template")
        return None
    return value


def apply(doc: Document, settings: Settings | None, *, base, reference, sources: list, compute_dtype,
          files: dict, config: dict | None, notes: list) -> tuple:
    """``(reference, sources, config)`` with the inputs' vocabulary tensors aligned to the output tokenizer,
    whose files are added to ``files`` (the reference's stale tokenizer files set to None)."""
    if settings is None or doc.problems:
        return reference, sources, config
    members = [*sources, reference]
    inner = [open_checkpoint(m) for m in members]
    models = _models(base, inner)
    named = [settings.source, *(spec.model for spec in settings.tokens.values())]
    if not all(folder_of(m).exists() for m in [*models.values(), *(m for m in named if m is not None
                                                                    and not isinstance(m, str))]):
        return reference, sources, config  # an earlier merge not written yet: planned again once it is
    try:
        tf = _transformers()
        if settings.source is None:  # only a chat template: the reference's tokenizer, saved again
            tokenizer = _load(tf, folder_of(reference))
            if tokenizer is None:
                raise TaskArithError(f"{folder_of(reference)} has no tokenizer to give the chat template")
            _set_template(tf, tokenizer, settings.template, models)
            files.update(_files(tokenizer, folder_of(reference)))
            return reference, sources, config
        vocab = _Vocabulary(tf, settings, base, reference, models)
    except TaskArithError as err:
        doc.problem(settings.where, str(err))
        return reference, sources, config
    files.update(_files(vocab.tokenizer, folder_of(reference)))
    config = {**(config or {}), "vocab_size": vocab.size}
    source = settings.source if isinstance(settings.source, str) else str(folder_of(settings.source))
    rows = f", {vocab.size} rows" if vocab.size != len(vocab.tokens) else ""
    notes.append(f"output vocabulary: {len(vocab.tokens)} tokens ({source}){rows}")
    aligner = Aligner(vocab, settings, inner, base, compute_dtype)
    for where, problem in aligner.problems():
        doc.problem(where, problem)
    unknown = aligner.unknown()
    if unknown:
        doc.warn(f"{len(unknown)} token(s) of the output vocabulary are in none of the models a vocabulary tensor "
                 f"is merged from (their rows are zero, as in mergekit): {', '.join(map(repr, unknown[:8]))}")
    wrapped = [Aligned(m, aligner) for m in inner]
    return wrapped[-1], wrapped[:-1], config


def _models(base, inner: list) -> dict:
    """Every model the merge reads (the base first), by key."""
    found = {} if base is None else {model_key(open_checkpoint(base)): open_checkpoint(base)}
    for member in inner:
        for name in member.names():
            ckpt = origins(member, name)[0]
            found.setdefault(model_key(ckpt), ckpt)
    return found


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise TaskArithError("building the output's tokenizer needs the 'transformers' package "
                             "(pip install transformers)") from err
    return transformers


def _load(tf, folder: Path, **kwargs):
    """The model's tokenizer, or None where it has none Transformers can read."""
    try:
        return tf.AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except Exception:  # noqa: BLE001 (as mergekit: a model without a readable tokenizer has none)
        return None


def _rows(model, vocab: dict) -> int:
    """A model's vocabulary size: ``config.json`` says, else its tokenizer."""
    config = _config(model)
    for found in (config.get("vocab_size"), (config.get("text_config") or {}).get("vocab_size")):
        if isinstance(found, int) and not isinstance(found, bool):
            return found
    return len(vocab)


class _Vocabulary:
    """The output tokenizer and, per model, the row of each output token (-1: the model lacks it)."""

    def __init__(self, tf, settings: Settings, base, reference, models: dict):
        first = open_checkpoint(base if base is not None else reference)
        if base is None:  # mergekit takes one of the models; taskarith the reference (the first model)
            first = origins(first, first.names()[0])[0]
        base_key = model_key(first)
        base_model = models.get(base_key, first)
        base_tok = _load(tf, folder_of(base_model), use_fast=True)
        if base_tok is None:
            raise TaskArithError(f"the base model {folder_of(base_model)} has no tokenizer to build the output's from")
        self.vocabs, limits = {}, {}
        for key, model in models.items():
            tok = base_tok if key == base_key else _load(tf, folder_of(model))
            if tok is not None:
                self.vocabs[key] = (tok.get_vocab(), tok)
            limits[key] = _rows(model, tok.get_vocab() if tok is not None else base_tok.get_vocab())
        base_vocab = self.vocabs[base_key][0]
        if any(i >= limits[base_key] for i in base_vocab.values()):
            raise TaskArithError(f"the tokenizer of {folder_of(base_model)} has ids past its vocab_size "
                                 f"{limits[base_key]}; taskarith does not strip such tokens as mergekit does")
        if settings.source == "base":
            out = _load(tf, folder_of(base_model), use_fast=True)
        elif settings.source == "union":
            out = self._union(tf, base_tok, [(self.vocabs[k][1], limits[k]) for k in models if k in self.vocabs])
        else:
            out = _load(tf, folder_of(settings.source))
            if out is None:
                raise TaskArithError(f"{folder_of(settings.source)} has no tokenizer Transformers can read")
        have = set(out.get_vocab())
        for token in settings.tokens:
            if token not in have:
                out.add_tokens(token)
                have.add(token)
        _set_template(tf, out, settings.template, models)
        self.tokenizer, self.tokens = out, out.get_vocab()
        self.names = {i: token for token, i in self.tokens.items()}
        self.size = len(self.tokens)
        if settings.pad and self.size % settings.pad:
            self.size += settings.pad - self.size % settings.pad
        self.maps, self.limits = {}, limits
        for key, model in models.items():
            if key not in self.vocabs and limits[key] != limits[base_key]:
                raise TaskArithError(f"{folder_of(model)} has no tokenizer and a vocabulary of {limits[key]} "
                                     f"rows, the base's has {limits[base_key]}: which token is each row? (add its "
                                     "tokenizer files)")
            own = self.vocabs.get(key, self.vocabs[base_key])[0]
            rows = torch.full((len(self.tokens),), -1, dtype=torch.long)
            for token, i in self.tokens.items():
                if own.get(token, limits[key]) < limits[key]:
                    rows[i] = own[token]
            self.maps[key] = rows

    @staticmethod
    def _union(tf, base_tok, tokenizers: list):
        plain, added = {}, {}
        for tok, limit in tokenizers:
            vocab = tok.get_vocab()
            for text in sorted(vocab, key=vocab.__getitem__):
                if vocab[text] < limit:
                    plain.setdefault(text, None)
            for i, info in sorted(tok.added_tokens_decoder.items()):
                if i < limit:
                    added.setdefault(info.content, info)
        with tempfile.TemporaryDirectory() as copy:  # a fresh copy of the base's, through its files
            base_tok.save_pretrained(copy, legacy_format=False)
            out = tf.AutoTokenizer.from_pretrained(copy, use_fast=True)
        known = base_tok.get_vocab()
        for text in plain:
            if text not in added and text not in known:
                out.add_tokens(text)
        for info in added.values():
            out.add_tokens(info)
        return out


def _set_template(tf, tokenizer, template: str | None, models: dict) -> None:
    if template == "auto":  # the template most of the models' tokenizers carry (the first of a tie)
        seen = []
        for model in models.values():
            tok = _load(tf, folder_of(model))
            found = getattr(tok, "chat_template", None)
            found = found.get("default") if isinstance(found, dict) else found
            if found:
                seen.append(found.strip())
        template = max(seen, key=seen.count) if seen else None
    if template:
        tokenizer.chat_template = template


def _files(tokenizer, reference: Path) -> dict:
    """The tokenizer's files as ``save_pretrained`` writes them; the reference's other tokenizer files: None."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        written = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
    stale = {name: None for name in _TOKENIZER_FILES if name not in written and (reference / name).exists()}
    return {**stale, **written}


def _is_dir(value: str) -> bool:
    try:
        return Path(value).expanduser().is_dir()
    except (OSError, ValueError):
        return False
