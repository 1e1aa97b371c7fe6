"""Configs of several merges (mergekit-multi's): one YAML file of documents separated by ``---``, each a
mergekit merge config with a ``name:``; a model reference that is another document's name (``base_model:
a``, ``- model: a``, ``a+./adapter``) reads that document's output.

``taskarith merge multi.yml -o OUT`` writes each named merge to ``OUT/<name>``. One document may go
unnamed, as mergekit-multi's final merge: it is written to ``OUT`` and the named ones to
``--intermediate-dir DIR`` (``DIR/<name>``), which it then needs. Every document is validated, in an
order where each comes after those it reads, before the first merge: a merge not written yet stands in
with the layout its plan gives it (its reference model's tensors, in its output dtype, with its config
changes). Each merge is planned again on the written outputs just before it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import TaskArithError
from ..io import check_output, open_checkpoint
from ..io._paths import is_within
from . import _config, _mergekit_slices
from ._document import Document, show
from ._output import log

__all__ = ["Pending", "merge"]

_MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source", "path")
_MODEL_LISTS = ("models", "sources")


class Pending:
    """An earlier document's output before it is written: the layout its plan gives it, for validation."""

    def __init__(self, name: str, folder: Path, plan):
        self.name, self.path, self.paths = name, folder, [folder]
        self._reference = open_checkpoint(plan.base)
        self._dtype = plan.dtype
        self.config_json = {**_mergekit_slices._config(plan.base), **(plan.config or {})}
        self.metadata: dict[str, str] = {}

    def __str__(self) -> str:
        return f"{self.name} (merged by its document, into {self.path})"

    def names(self) -> list[str]:
        return self._reference.names()

    def __contains__(self, name: object) -> bool:
        return name in self._reference

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reference.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        dtype = self._reference.dtype(name)
        return self._dtype if self._dtype is not None and dtype.is_floating_point else dtype

    def tensor(self, name: str) -> torch.Tensor:
        raise TaskArithError(f"{self.name!r} is not merged yet")

    def prefetch(self, name: str, limit: int | None = None) -> None:
        pass


class _Merge:
    """One document: its name (None for the final, unnamed one), output, and the names it reads."""

    def __init__(self, index: int, parsed: tuple, config: str):
        data, lines, duplicates, text = parsed
        self.index, self.text, self.parsed = index, text, (data, lines, duplicates)
        self.name = data.get("name") if isinstance(data, dict) else None
        self.label = f"{config}, document {index + 1}" + (f" ({self.name!r})" if isinstance(self.name, str) else "")
        self.out: Path | None = None
        self.reads: set[str] = set()

    def document(self, outputs: dict) -> Document:
        doc = Document(self.text, self.label, parsed=self.parsed)
        doc.outputs = dict(outputs)
        return doc


def merge(args, parser, text: str, documents: list) -> None:
    """Validate every document, then run the merges in order (``taskarith merge`` of a multi-document config)."""
    from . import _merge

    config = str(args.config)
    merges = [_Merge(i, parsed, config) for i, parsed in enumerate(documents)]
    _check_names(config, merges)
    order = _order(config, merges)
    _place(args, parser, merges)
    plans = _validate(args, config, order)
    if args.dry_run:
        print(json.dumps([{"name": m.name, "output": str(m.out), **plans[m.index].describe()} for m in order],
                         indent=2))
        return
    done: dict[str, Path] = {}
    for k, m in enumerate(order):
        log(f"merge {k + 1} of {len(order)}: {m.name or 'the final merge'} -> {m.out}")
        plan = _config.plan_of(m.document(done), seed=args.seed, output=m.out, semantics=args.semantics)
        check_output(m.out, inputs=[args.config, *plan.paths()], overwrite=args.overwrite, folder=True,
                     flag="--overwrite")
        _merge.run(plan, m.out, args)
        if m.name is not None:
            done[m.name] = m.out


def _check_names(config: str, merges: list[_Merge]) -> None:
    problems, seen = [], set()
    for m in merges:
        if not isinstance(m.parsed[0], dict):
            continue  # reported with the document's other problems
        if "name" not in m.parsed[0]:
            m.name = None
            continue
        name = m.name
        if not isinstance(name, str) or not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
            problems.append(f"{m.label}: 'name' must be a folder name (text without '/'), got {show(name)}")
        elif name in seen:
            problems.append(f"{m.label}: another document is named {name!r}; each merge needs its own name")
        seen.add(name)
    unnamed = [m for m in merges if m.name is None and isinstance(m.parsed[0], dict)]
    if len(unnamed) > 1:
        problems.append(f"documents {', '.join(str(m.index + 1) for m in unnamed)} have no 'name': only one "
                        "(the final merge) may go without one")
    if problems:
        raise TaskArithError(f"{config}: {'; '.join(problems)}. See docs/cli.md (configs of several merges).")


def _order(config: str, merges: list[_Merge]) -> list[_Merge]:
    """The documents, each after those whose output it reads (else in the file's order); cycles refused."""
    names = {m.name: m for m in merges if m.name is not None}
    for m in merges:
        m.reads = {n for n in _references(m.parsed[0]) if n in names}
    order, state = [], {}

    def visit(m: _Merge, trail: list[str]) -> None:
        if state.get(m.index) == "done":
            return
        if state.get(m.index) == "open":
            cycle = trail[trail.index(m.name):] + [m.name]
            raise TaskArithError(f"{config}: the merges read each other in a circle: {' -> '.join(cycle)}; "
                                 "a merge can read only merges that do not read it")
        state[m.index] = "open"
        for name in sorted(m.reads, key=lambda n: names[n].index):
            visit(names[name], trail + [m.name])
        state[m.index] = "done"
        order.append(m)

    for m in merges:
        visit(m, [])
    return order


def _references(data, key=None, listed: bool = False) -> set[str]:
    """The model references of a document (the texts where mergekit reads a model), as names: the part
    before any '+' (a LoRA) and '@' (a revision)."""
    found = set()
    if isinstance(data, dict):
        for k, v in data.items():
            found |= _references(v, k, listed=False)
    elif isinstance(data, list):
        for item in data:
            found |= _references(item, key, listed=key in _MODEL_LISTS)
    elif isinstance(data, str) and (key in _MODEL_KEYS or listed):
        found.add(data.split("+")[0].split("@")[0])
    return found


def _place(args, parser, merges: list[_Merge]) -> None:
    """Each document's output: ``OUT/<name>``, or with an unnamed final merge ``OUT`` for it and
    ``--intermediate-dir``/<name> for the others."""
    out = Path(args.output)
    folder = getattr(args, "intermediate_dir", None)
    final = any(m.name is None and isinstance(m.parsed[0], dict) for m in merges)
    if out.suffix == ".safetensors":
        parser.error(f"merge: a config of several merges writes model folders: -o {out} must be a folder")
    if final and folder is None:
        parser.error("merge: the config's unnamed document (the final merge) is written to -o; give "
                     "--intermediate-dir DIR for the named ones (written to DIR/<name>), as mergekit-multi needs")
    if not final and folder is not None:
        parser.error("merge: every document is named, so each is written to -o's folder as OUT/<name>; "
                     "--intermediate-dir is for a config with an unnamed final merge")
    root = Path(folder) if final else out
    for m in merges:
        m.out = out if m.name is None else root / m.name
    if final:
        real_out = out.resolve()
        inside = [m.out for m in merges if m.name is not None and is_within(m.out.resolve(), real_out)]
        if inside:
            parser.error(f"merge: the intermediate merges {', '.join(map(str, inside))} would lie inside the final "
                         f"output {str(out)!r}, which replaces that folder: choose another --intermediate-dir")


def _validate(args, config: str, order: list[_Merge]) -> dict[int, object]:
    """Every document's plan, with the merges before it standing in by their layout; every problem of
    every document reported at once, and every output checked, before anything is written."""
    pending: dict[str, Pending] = {}
    plans, problems = {}, []
    for m in order:
        missing = sorted(n for n in m.reads if n not in pending)
        if missing:  # a merge it reads failed validation: report its own problems only
            problems.append(f"{m.label}: reads {', '.join(map(repr, missing))}, which cannot be merged (see above)")
            continue
        try:
            plan = _config.plan_of(m.document(pending), seed=args.seed, output=m.out, semantics=args.semantics)
        except TaskArithError as err:
            problems.append(str(err).removeprefix(f"{config}, ").removesuffix(" See docs/cli.md for the config "
                                                                             "format.").rstrip("."))
            continue
        if plan.kind != "models":
            problems.append(f"{m.label}: a config of several merges merges models (mergekit's format)")
            continue
        plans[m.index] = plan
        if m.name is not None:
            pending[m.name] = Pending(m.name, m.out, plan)
    if problems:
        raise TaskArithError(f"{config}: {len(problems)} of {len(order)} documents cannot be merged: "
                             f"{' | '.join(problems)}. Nothing was merged; see docs/cli.md for the config format.")
    outputs = {m.out for m in order}  # an earlier merge's output is an input only of the merges after it
    inputs = [args.config] + [p for plan in plans.values() for p in plan.paths() if Path(p) not in outputs]
    for m in order:
        check_output(m.out, inputs=inputs, overwrite=args.overwrite, folder=True, flag="--overwrite")
    return plans
