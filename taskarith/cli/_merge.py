"""``taskarith merge``: run the merge a config describes, out of core (default) or in memory (``--device``)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import _extract, merging, outofcore, runtime
from ..errors import BaseMismatchError, TaskArithError
from ..io import Checkpoint, load_state_dict, open_checkpoint, scratch_folder
from ..vector import TaskVector
from . import _config, _mergekit_multi, _yaml
from ._document import Document
from ._output import check_output, log, save_model

__all__ = ["applied", "merge", "run"]


def merge(args, parser) -> None:
    if args.device is not None and args.max_memory is not None:
        parser.error("merge: --max-memory limits the out-of-core merge; --device merges in memory. Pick one.")
    if (args.output is None) == (args.positional_output is None):
        parser.error("merge: give the output once: -o OUT, or OUT after the config (as mergekit-yaml takes it)")
    args.output = args.output or args.positional_output
    text = _yaml.read(Path(args.config))
    # empty documents (a trailing '---', a comment) are no merges
    documents = [d for d in _yaml.load_all(text, str(args.config)) if d[0] is not None] or [(None, {}, [], text)]
    if len(documents) > 1:  # mergekit-multi: several merges, later ones reading earlier ones' outputs
        _mergekit_multi.merge(args, parser, text, documents)
        return
    if getattr(args, "intermediate_dir", None) is not None:
        parser.error("merge: --intermediate-dir is for configs of several documents (mergekit-multi's)")
    out = Path(args.output)
    doc = Document(text, str(args.config), parsed=documents[0][:3])
    plan = _config.plan_of(doc, seed=args.seed, output=out, semantics=args.semantics)
    check_output(args, args.config, *plan.paths(), folder=out.suffix != ".safetensors")
    if plan.kind == "vectors" and plan.base is not None:
        _check_vector_bases(plan, strict=args.strict)
    if args.dry_run:
        print(json.dumps(plan.describe(), indent=2))
        return
    run(plan, out, args)


def run(plan, out: Path, args) -> None:
    """Merge as ``plan`` says into ``out`` (checked before), with the command line's settings."""
    if merging.methods()[plan.method].inputs == "weights":
        _merge_weights(plan, out, args)
    elif args.device is not None:
        _merge_in_memory(plan, out, _extract.device_of(args.device), args.shard_size)
    else:
        _merge_out_of_core(plan, out, args.max_memory or "2GB", args.shard_size, args.progress)
    log(f"wrote {out} ({plan.method} of {len(plan.sources)} {plan.kind})")
    for note in plan.notes:
        log(note)


def _merge_weights(plan, out: Path, args) -> None:
    """A merge of model weights (mergekit's methods): streamed from disk, on ``--cuda``/``--device`` if given."""
    runtime.hold_freed_memory()
    shard = args.shard_size
    if args.out_shard_size is not None:  # mergekit counts parameters
        shard = args.out_shard_size * (plan.dtype or _widest(plan.base)).itemsize
    common = dict(weights=plan.weights, dtype=plan.dtype, compute_dtype=plan.compute_dtype,
                  max_memory=args.max_memory or "2GB", progress=args.progress, overwrite=True,
                  device=args.compute_device or args.device or "cpu", **plan.options)
    _merge_models(plan, out, shard, {"files": plan.files, "config": plan.config}, **common)


def _merge_models(plan, out: Path, shard_size, folder_only: dict, **kwargs) -> None:
    """Models merged out of core into a model folder (with ``folder_only``'s arguments: the files written
    beside the weights), or, where ``out`` is a .safetensors path, into that one file."""
    if out.suffix != ".safetensors":
        outofcore.merge_files(plan.base, plan.sources, out, plan.method, shard_size=shard_size, **folder_only,
                              **kwargs)
        return
    with scratch_folder(out) as tmp:  # merge into an unsharded folder, keep its weights
        folder = outofcore.merge_files(plan.base, plan.sources, tmp / "model", plan.method, shard_size=1 << 62,
                                       **kwargs)
        os.replace(folder / "model.safetensors", out)


def _widest(reference) -> torch.dtype:
    ckpt = open_checkpoint(reference)
    floats = [ckpt.dtype(n) for n in ckpt.names() if ckpt.dtype(n).is_floating_point]
    return max(floats, key=lambda d: d.itemsize, default=torch.float32)


def _check_vector_bases(plan, *, strict: bool) -> None:
    """Vectors merged onto a base were extracted from it: their recorded fingerprints must match it,
    as ``apply`` checks (a warning by default, an error with ``--strict``)."""
    base = Checkpoint(plan.base)
    others = []
    for source in plan.sources:
        vector = Checkpoint(source)
        recorded = vector.metadata.get("taskarith.base_fingerprint")
        if recorded is None:
            continue
        probe = _base_probe(base, vector)
        if probe is not None and _extract.fingerprint(probe, list(probe)) != recorded:
            others.append(str(source))
    if others:
        message = (f"{len(others)} vector file(s) were extracted from a different base model than "
                   f"{str(plan.base)!r}: {', '.join(map(repr, others))}. That is fine for deliberate task transfer; "
                   "otherwise check the config's base")
        if strict:
            raise BaseMismatchError(message + " (or drop --strict to merge anyway).")
        warnings.warn(message + " (--strict refuses such a merge).", stacklevel=2)


def _base_probe(base: Checkpoint, vector: Checkpoint) -> dict[str, torch.Tensor] | None:
    """The base's tensor for each name the vector stores (under a tied name of it where the base keeps
    only that one), as its fingerprint was taken; None where the base lacks one (apply reports that)."""
    aliases = json.loads(vector.metadata.get("taskarith.aliases", "{}"))
    probe = {}
    for name in vector.names():
        found = next((n for n in (name, *(a for a, c in aliases.items() if c == name)) if n in base), None)
        if found is None:
            return None
        probe[name] = base.tensor(found)
    return probe


def _merge_out_of_core(plan, out: Path, max_memory, shard_size, progress) -> None:
    runtime.hold_freed_memory()  # this process only merges: reuse freed memory, fewer page faults
    common = dict(weights=plan.weights, max_memory=max_memory, progress=progress, overwrite=True, **plan.options)
    if plan.kind == "models":
        _merge_models(plan, out, shard_size, {}, dtype=plan.dtype, **common)
        return
    if plan.base is None:
        outofcore.merge_files(None, plan.sources, out, plan.method, dtype=plan.dtype, **common)
        return
    with scratch_folder(out) as tmp:  # vectors onto a base: merge the vectors out of core, then apply
        merged = outofcore.merge_files(None, plan.sources, tmp / "merged.safetensors", plan.method, **common)
        vector = TaskVector.load(merged)
        save_model(applied(load_state_dict(plan.base), vector, plan.dtype), out, like=plan.base,
                   shard_size=shard_size)


def _merge_in_memory(plan, out: Path, device: torch.device, shard_size) -> None:
    base = load_state_dict(plan.base) if plan.base is not None else None
    if plan.kind == "models":
        vectors = [TaskVector.from_models(base, s).to(device) for s in plan.sources]
    else:
        vectors = [TaskVector.load(s, device=device) for s in plan.sources]
    merged = merging.merge(vectors, plan.method, weights=plan.weights,
                           dtype=plan.dtype if base is None else None, **plan.options).to("cpu")
    del vectors
    if base is None:
        merged.save(out, overwrite=True)  # the output was checked before the merge
        return
    save_model(applied(base, merged, plan.dtype), out, like=plan.base, shard_size=shard_size)


def applied(base: Mapping[str, torch.Tensor], vector: TaskVector, dtype: torch.dtype | None) -> dict:
    """``base + vector`` rounded once into ``dtype`` (default: each base entry's), as out-of-core merges do."""
    if dtype is None:
        return vector.apply_to(base, on_base_mismatch="ignore")
    missing = [n for n in vector if n not in base]
    if missing:
        raise TaskArithError(f"the base lacks {len(missing)} tensor(s) of the merged vector: {missing[:10]}")
    out = {}
    for name, b in base.items():
        if name in vector and b.is_floating_point():
            out[name] = _extract.apply_entry(b, vector[name], 1.0, torch.empty(b.shape, dtype=dtype))
        else:
            out[name] = b
    return out
