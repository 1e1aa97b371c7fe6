"""Out-of-core merging: merge checkpoints tensor by tensor, straight from disk to disk.

Inputs are memory-mapped (their pages are file-backed and reclaimable, so they
do not count against ``max_memory``); only the deltas and results of the tensor
being merged are private memory, and tensors of element-wise methods are cut
into row blocks so that even those stay under the budget. Methods that begin
with a magnitude trim (TIES, magnitude pruning) get their exact thresholds —
per tensor or over the whole model — from a streaming radix selection that
reads the inputs once or twice more without holding them, then merge in a final
pass. The results equal :func:`taskarith.merge` on the same inputs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import _extract, _flat
from ..backends import _numba
from ..errors import NonFiniteError, ShapeMismatchError, TaskArithError, check_same_keys, raise_if_any
from ..io import Checkpoint, Lazy, check_output, open_checkpoint, parse_bytes, write_model, write_safetensors
from ..merging import _checks, _engine, _registry, linear
from ..merging._spec import promote
from ..merging._trim import trim_plans
from ..vector import TaskVector, file_metadata
from ._memory import progress_bar, return_freed_memory, trimming
from ._pieces import Pieces
from ._select import _SELECT_BYTES, plan_trims

__all__ = ["merge_files"]


def merge_files(
    base: str | os.PathLike | None,
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str = "ties",
    *,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    max_memory: str | int = "2GB",
    shard_size: str | int = "5GB",
    progress: bool | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    compute_dtype: torch.dtype | None = None,
    files: Mapping[str, str | bytes | None] | None = None,
    config: Mapping[str, object] | None = None,
    **options,
) -> Path:
    """Merge checkpoints on disk without loading them, writing the result atomically.

    With a ``base``, ``sources`` are fine-tuned models (files or Hugging Face
    directories, sharded or not) and ``out`` becomes a model directory: sharded
    safetensors with an index, integer buffers and non-weight files (config,
    tokenizer) copied from the base. With ``base=None``, ``sources`` are task
    vector files and ``out`` is a task vector file.

    Args:
        base: the pretrained model, or None to merge task vector files.
        sources: fine-tuned models (or vector files).
        out: output directory (or file with ``base=None``), written atomically. An existing one
            is replaced only if taskarith wrote it or ``overwrite=True``; one that is, holds or lies
            inside an input is refused (see :func:`taskarith.io.check_output`).
        method: a registered merge method; ``**options`` are its options.
        weights: one multiplier per source.
        dtype: output dtype (default: the base's, or the vectors').
        max_memory: budget for the private memory of the merge ("2GB", bytes, ...).
        shard_size: largest output shard.
        progress: show a progress bar (default: when stderr is a terminal and tqdm is installed).
        device: where to compute (``"cuda"``: each row block is copied from the memory-mapped
            files through pinned host memory, asynchronously, so reading the next input overlaps
            the copy of the previous one; results come back to the host to be written).
        overwrite: replace an existing ``out`` that taskarith did not write.
        compute_dtype: for methods of weights (``inputs="weights"``), the dtype the models' weights
            are converted to before the method runs (mergekit's ``dtype:``; default: as stored).
        files: files (name -> text or bytes) written into the output folder (a model card, a tokenizer;
            None: a file of the base of that name is not copied).
        config: top-level keys updated in the output's ``config.json``.

    Returns:
        the path written.
    """
    spec, resolved = _registry.lookup(method, options)
    budget = parse_bytes(max_memory, what="max_memory")
    shard_bytes = parse_bytes(shard_size, what="shard_size")
    if not sources:
        raise TaskArithError("merge_files needs at least one source")
    weights = _checks.validate_weights(weights, len(sources))
    _extract.check_float_dtype(dtype)
    paths = [p for s in [base, *sources] for p in getattr(s, "paths", [s])]  # views name the files behind them
    out = check_output(out, inputs=paths, overwrite=overwrite, folder=base is not None)
    _extract.check_float_dtype(compute_dtype)
    if spec.needs_base and base is None:
        raise TaskArithError(f"merge method {method!r} reads the pretrained weights: merge fine-tuned models onto "
                             f"a base (merge_files(base, models, ...)), not task vector files")
    pre = open_checkpoint(base) if base is not None else None
    inputs = [open_checkpoint(s) for s in sources]
    reference = pre or inputs[0]
    _check_inputs(reference, inputs, with_base=pre is not None)
    floats = [n for n in reference.names() if reference.dtype(n).is_floating_point]
    aliases = _common_aliases(inputs) if pre is None else {}
    _checks.check_scalars(spec, resolved, weights, {_extract.delta_dtype(reference.dtype(n), None) for n in floats})
    device = _extract.device_of(device)

    def input_rows(i: int, name: str, rows: slice) -> torch.Tensor:
        return _to_device(inputs[i].tensor(name)[rows] if inputs[i].shape(name) else inputs[i].tensor(name), device)

    def delta(i: int, name: str, rows: slice = slice(None), base: torch.Tensor | None = None) -> torch.Tensor:
        t = input_rows(i, name, rows)
        if pre is None:
            return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        return _extract.delta_of(base_rows(name, rows) if base is None else base, t, delta_dtypes(name)[i])

    def delta_dtypes(name: str, decide: bool = False) -> list[torch.dtype | None]:
        """Per input, the delta dtype of a half-precision tensor that some pass reads in several row
        blocks (or of any, with ``decide``): whether the float64 fallback applies is decided for the
        whole tensor, as in memory. None: read whole, :func:`_extract.delta_of` decides there."""
        known = dtypes_of.get(name)
        if known is not None and (known[0] is not None or not decide):
            return known
        split = len(row_blocks(name, None)) > 1 or (spec.trim and len(row_blocks(name, _SELECT_BYTES)) > 1)
        if pre is None or reference.dtype(name) not in _extract.HALF or not (split or decide):
            dtypes_of[name] = [None] * len(inputs)  # called per row block and input: remember it
        else:
            b = base_rows(name, slice(None))
            dtypes_of[name] = [torch.float32 if _extract.float32_round_trips(b, input_rows(i, name, slice(None)))
                               else torch.float64 for i in range(len(inputs))]
        return dtypes_of[name]

    dtypes_of: dict[str, list[torch.dtype | None]] = {}

    def wide_keys(names: list[str]) -> bool:
        """Whether some delta of these tensors is float64 (float64 weights, or the exact-round-trip
        fallback of half-precision ones): their selection then compares float64 bit patterns."""
        return (any(c.dtype(n) == torch.float64 for c in [*inputs, reference] for n in names)
                or any(torch.float64 in delta_dtypes(n, decide=True) for n in names))

    def base_rows(name: str, rows: slice) -> torch.Tensor:
        return _to_device(pre.tensor(name)[rows] if pre.shape(name) else pre.tensor(name), device)

    def row_blocks(name: str, bytes_per_entry: int | None) -> list[slice]:
        """Row slices of ``name`` whose working set fits the budget (None: the merge pass's)."""
        bytes_per_entry = merge_bytes if bytes_per_entry is None else bytes_per_entry
        shape = reference.shape(name)
        if not shape or spec.split == "tensor":
            return [slice(None)]
        row_bytes = bytes_per_entry * math.prod(shape[1:])
        rows = max(1, budget // max(row_bytes, 1))
        return [slice(r, min(r + rows, shape[0])) for r in range(0, shape[0], rows)]

    # Private bytes per entry of a row block: each input's delta plus the method's temporaries.
    merge_bytes = spec.memory * (len(inputs) + 1)
    trims: dict = {}
    pieces = Pieces()
    # Unweighted task arithmetic: the sum of the deltas, which a compiled kernel can do in one pass.
    varying = _engine.per_tensor(spec, resolved, weights, floats)
    density = _engine.trim_density(resolved, floats) if spec.trim else None
    plain_sum = spec.fast is linear.task_arithmetic_fast and not varying and all(w * resolved["scale"] == 1.0 for w in weights)
    on_weights = spec.inputs == "weights"
    if on_weights and pre is None:
        raise TaskArithError(f"merge method {method!r} merges model weights: give a base model folder (its config "
                             "and tokenizer are copied; the method reads it only if it needs a base), not vector files")

    def block_deltas(name: str, rows: slice, base: torch.Tensor | None) -> list[torch.Tensor]:
        parts = [delta(i, name, rows, base).contiguous() for i in range(len(inputs))]
        if not spec.trim:
            return parts
        if trims.get((0, name)) is None:  # merged whole: trimmed in memory by the one trim plan
            plans = trim_plans([TaskVector._wrap(name, p) for p in parts], density, "tensor")
            return [plan.trimmed(name) for plan in plans]
        return [trims[(i, name)](p) for i, p in enumerate(parts)]

    def run_method(name: str, deltas: list[torch.Tensor], base: torch.Tensor | None, start: int) -> torch.Tensor:
        return _engine.call(spec, name, deltas, weights, resolved, base=base if _engine.reads_base(spec, resolved) else None,
                            shape=tuple(reference.shape(name)), start=start, stats=stats)

    def merged(name: str, rows: slice) -> torch.Tensor:
        shape = reference.shape(name)
        start = (rows.start or 0) * math.prod(shape[1:]) if shape else 0
        if on_weights:  # the models' weights as stored; the method returns the merged weights
            b = base_rows(name, rows) if _engine.reads_base(spec, resolved) else None
            models = [input_rows(i, name, rows) for i in range(len(inputs))]
            if compute_dtype is not None:
                models = [m.to(compute_dtype) for m in models]
                b = None if b is None else b.to(compute_dtype)
            result = run_method(name, models, b, start)
            return result.to(dtype or pre.dtype(name))
        dtypes = delta_dtypes(name)
        if (pre is not None and device.type == "cpu" and not spec.trim and spec.elementwise and shape
                and all(d in (None, torch.float32) for d in dtypes)):
            out = pieces.merge(lambda deltas, b, at: run_method(name, deltas, b, at), base_rows(name, rows),
                               [input_rows(i, name, rows) for i in range(len(inputs))], dtype or pre.dtype(name),
                               start, checked=None in dtypes, plain_sum=plain_sum)
            if out is not None:
                return out
        b = base_rows(name, rows) if pre is not None else None
        parts = block_deltas(name, rows, b)
        result = run_method(name, parts, b, start)
        del parts
        if pre is None:
            return result.to(dtype or _promote_inputs(inputs, name))
        return _extract.apply_entry(b, result, 1.0, torch.empty(b.shape, dtype=dtype or b.dtype, device=b.device))

    names = [n for n in reference.names() if n not in aliases]
    stats = None

    def flat_deltas(name: str, lo: int, hi: int) -> list[torch.Tensor]:
        wide = delta_dtypes(name, decide=True)
        flats = [_to_device(c.tensor(name).reshape(-1)[lo:hi], device) for c in inputs]
        if pre is None:
            return [t.float() if t.dtype in _extract.HALF else t for t in flats]
        return [_extract.delta_of(flat_base(name, lo, hi), t, wide[i]) for i, t in enumerate(flats)]

    def flat_base(name: str, lo: int, hi: int) -> torch.Tensor | None:
        return None if pre is None else _to_device(pre.tensor(name).reshape(-1)[lo:hi], device)

    out_dtype = {n: (dtype or (reference.dtype(n) if pre else _promote_inputs(inputs, n))) if n in floats else reference.dtype(n)
                 for n in names}
    bar = progress_bar(progress, total=len(names), desc=f"merge ({method})")

    following = dict(itertools.pairwise(names))

    def _bytes(name: str) -> int:
        return math.prod(reference.shape(name)) * reference.dtype(name).itemsize

    checkpoints = [*inputs, *([pre] if pre is not None else [])]

    def blocks(name: str) -> Iterator[torch.Tensor]:
        # The next tensor's inputs, where they are not in the page cache yet, are read from disk by
        # another thread while this tensor is merged: it counts where reads wait on a device.
        if name in following and _bytes(following[name]) >= _PREFETCH_FROM:
            reader.submit(lambda: [c.prefetch(following[name], limit=budget) for c in checkpoints])
        if name in floats:
            for rows in row_blocks(name, None):
                yield merged(name, rows).cpu()
                return_freed_memory()  # after pieces too: DARE's masks come from its threads' heaps
        else:  # integer buffers come from the base
            yield reference.tensor(name)
        bar.update(1)  # here: the writer asks for a tensor's blocks only when it writes them

    chunks = [(n, Lazy(out_dtype[n], reference.shape(n), lambda n=n: blocks(n))) for n in names]

    _numba.prime()  # before the budget's baseline: its runtime's memory is not the merge's data
    # Cached buffers would count against the budget: keep none while merging.
    with _flat.cache_paused(), trimming(budget), ThreadPoolExecutor(1, thread_name_prefix="taskarith-read") as reader:
        try:
            if spec.plan is not None:
                stats = _engine.plan(spec, [n for n in names if n in floats], lambda n: tuple(reference.shape(n)),
                                     lambda n: [delta(i, n) for i in range(len(inputs))], resolved)
            if spec.statistic is not None:
                stats = _engine.statistic(spec, [n for n in names if n in floats], flat_deltas, flat_base,
                                          lambda n: tuple(reference.shape(n)), weights, resolved)
            if spec.trim:
                try:
                    trims.update(plan_trims(density, resolved["scope"], floats, len(inputs), reference, delta, delta_dtypes,
                                             row_blocks, budget, wide_keys))
                except NonFiniteError:  # a selection met a NaN: name every input tensor holding one
                    _checks.raise_nan([(i, n) for i in range(len(inputs)) for n in floats if any(
                        _checks.any_nan([delta(i, n, rows)]) for rows in row_blocks(n, _SELECT_BYTES))], method)
                    raise
            if pre is None:
                write_safetensors(out, chunks, _vector_metadata(inputs, names, aliases, method))
            else:
                write_model(out, chunks, shard_bytes=shard_bytes, like=pre.path, files=files, config=config)
        finally:
            bar.close()
    return out


_PREFETCH_FROM = 1 << 20  # bytes: smaller tensors are left to the kernel's readahead (a hint costs ~50 us)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a view of a memory-mapped file) on ``device``: through pinned memory, asynchronously."""
    if device.type == "cpu":
        return t
    return t.contiguous().pin_memory().to(device, non_blocking=True)


def _check_inputs(reference: Checkpoint, inputs: list[Checkpoint], *, with_base: bool) -> None:
    for ckpt in inputs:
        check_same_keys(reference.names(), ckpt.names(), what=f"{reference.path} vs {ckpt.path}",
                        fix="Every checkpoint must have the same architecture.")
    problems = []
    for ckpt in inputs:
        for name in reference.names():
            if reference.shape(name) != ckpt.shape(name):
                problems.append(f"{name!r}: {reference.shape(name)} in {reference.path.name} vs {ckpt.shape(name)} in {ckpt.path.name}")
            elif with_base and reference.dtype(name) != ckpt.dtype(name):
                problems.append(f"{name!r}: {reference.dtype(name)} in {reference.path.name} vs {ckpt.dtype(name)} in {ckpt.path.name}")
    raise_if_any(problems, error=ShapeMismatchError, header="checkpoints differ",
                 fix="Every checkpoint must have the same architecture and dtypes.")


def _common_aliases(inputs: list[Checkpoint]) -> dict[str, str]:
    """The tied names every input vector records alike (vectors that tie differently cannot be merged)."""
    recorded = [json.loads(c.metadata.get("taskarith.aliases", "{}")) for c in inputs]
    if any(r != recorded[0] for r in recorded):
        raise TaskArithError("the vector files record different tied names (taskarith.aliases): "
                             + "; ".join(f"{c.path.name}: {r}" for c, r in zip(inputs, recorded))
                             + ". Extract every vector from models that tie the same weights.")
    return recorded[0]


def _vector_metadata(inputs: list[Checkpoint], names: list[str], aliases: dict, method: str) -> dict[str, str]:
    """The merged vector's file metadata; it keeps the inputs' base fingerprint where they all share one."""
    prints = {c.metadata.get("taskarith.base_fingerprint") for c in inputs}
    common = prints.pop() if len(prints) == 1 else None
    return file_metadata(aliases, [*names, *aliases], common, merge=method)


def _promote_inputs(inputs: list[Checkpoint], name: str) -> torch.dtype:
    return promote([c.dtype(name) for c in inputs])
