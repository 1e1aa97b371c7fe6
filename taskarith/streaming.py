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

import contextvars
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from . import _extract, _flat, _fused, _libc, _numba, kernels
from .errors import NonFiniteError, ShapeMismatchError, TaskArithError, check_same_keys, raise_if_any
from .io import Checkpoint, Lazy, check_output, parse_bytes, write_model, write_safetensors
from .merging import _checks, _engine, _registry, linear
from .merging._spec import promote
from .merging._trim import trim_plan
from .vector import TaskVector, file_metadata

__all__ = ["merge_files"]

_COLLECT = 1 << 22  # at most this many candidates are selected among in memory (less under a small budget)
_SELECT_BYTES = 96  # private bytes per entry while histogramming a block (delta, keys, digits)


# ------------------------------------------------------------------ selection


def stream_threshold(
    chunks: Callable[[], Iterator[torch.Tensor]], k: int, collect: int | None = None, *, wide: bool = True
) -> tuple[float, int]:
    """Exact k-th largest of the magnitudes produced by ``chunks()`` (re-iterable), by radix passes.

    Returns ``(threshold, above)``: the value and how many entries are strictly
    larger. Magnitudes are compared as IEEE bit patterns, which order like the
    values for non-negative floats: float64 patterns, or float32 ones when
    ``wide=False`` (every chunk is float32 or narrower; half the memory and
    work). Each pass histograms the next 16 bits of the patterns that share the
    digits chosen so far, until few enough candidates remain to select among in
    memory.
    """
    collect = _COLLECT if collect is None else min(collect, _COLLECT)
    key_dtype, float_dtype, bits = (torch.int64, torch.float64, 64) if wide else (torch.int32, torch.float32, 32)

    def keys_of(magnitudes: torch.Tensor) -> torch.Tensor:
        flat = magnitudes.reshape(-1)
        if math.isnan(float(flat.sum())):  # magnitudes are >= 0: only NaN makes the sum NaN (inf stays inf)
            raise NonFiniteError("cannot select the largest entries of deltas containing NaN")
        if not wide and flat.dtype == torch.float64:
            raise TaskArithError("internal: a float64 block in a float32 selection")
        return flat.to(float_dtype).view(key_dtype)

    prefix, shift, above, remaining = 0, bits, 0, k
    while True:
        shift -= 16
        counts = torch.zeros(1 << 16, dtype=torch.int64)
        for magnitudes in chunks():
            keys = keys_of(magnitudes)
            del magnitudes
            if shift < bits - 16:
                keys = keys[keys.bitwise_right_shift(shift + 16) == prefix]
            # Out of place: keys may share memory with the caller's tensor (float32 input, float32 keys).
            counts += torch.bincount(keys.bitwise_right_shift(shift).bitwise_and_(0xFFFF), minlength=1 << 16).cpu()
            del keys
            _return_freed_memory()
        from_top = torch.flip(counts, [0]).cumsum(0)
        digit = (1 << 16) - 1 - int(torch.searchsorted(from_top, remaining))
        above += int(counts[digit + 1:].sum())
        remaining = k - above
        prefix = (prefix << 16) | digit
        if int(counts[digit]) <= collect or shift == 0:
            break
    pieces = []
    for magnitudes in chunks():
        keys = keys_of(magnitudes)
        del magnitudes
        pieces.append(keys[keys.bitwise_right_shift(shift) == prefix])
        del keys
        _return_freed_memory()
    candidates = (torch.cat([p.cpu() for p in pieces]) if pieces else torch.zeros(0, dtype=key_dtype)).view(float_dtype)
    del pieces
    value = kernels.kth_largest(candidates, remaining).item()
    above += int(torch.count_nonzero(candidates > value))
    return value, above


class _Trim:
    """Keeps exactly k entries in stream order: all above the threshold, then the first ties."""

    def __init__(self, threshold: float, above: int, k: int):
        self.threshold, self.ties_left = threshold, k - above

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        """Zero ``delta``'s trimmed entries in place (the caller owns it) and return it."""
        if self.threshold <= 0:  # keep everything (dropping zeros changes nothing)
            return delta
        flat = delta.view(-1)
        keep_ties = _fused.shrink_threshold(self.threshold, delta.dtype)  # keeps |x| >= threshold
        drop_ties = _fused.floor_threshold(self.threshold, delta.dtype)  # keeps |x| > threshold
        if self.ties_left <= 0 or keep_ties == drop_ties:  # no tie kept, or none possible in this dtype
            torch.hardshrink(flat, drop_ties, out=flat)
            return delta
        # The first ties_left ties stay: the cut is at the next one, if this block holds it.
        cut, count = kernels.tie_after(flat, self.threshold, self.ties_left)
        self.ties_left -= count
        if cut is None:
            torch.hardshrink(flat, keep_ties, out=flat)
            return delta
        torch.hardshrink(flat[:cut], keep_ties, out=flat[:cut])
        torch.hardshrink(flat[cut:], drop_ties, out=flat[cut:])
        return delta


# ---------------------------------------------------------------------- merge


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
    out = check_output(out, inputs=[base, *sources], overwrite=overwrite, folder=base is not None)
    if spec.needs_base and base is None:
        raise TaskArithError(f"merge method {method!r} reads the pretrained weights: merge fine-tuned models onto "
                             f"a base (merge_files(base, models, ...)), not task vector files")
    pre = Checkpoint(base) if base is not None else None
    inputs = [Checkpoint(s) for s in sources]
    reference = pre or inputs[0]
    _check_inputs(reference, inputs, with_base=pre is not None)
    floats = [n for n in reference.names() if reference.dtype(n).is_floating_point]
    aliases = _common_aliases(inputs) if pre is None else {}
    _checks.check_scalars(spec, resolved, weights, {_extract.delta_dtype(reference.dtype(n), None) for n in floats})
    device = _extract.device_of(device)

    def input_rows(i: int, name: str, rows: slice) -> torch.Tensor:
        return _to_device(inputs[i].tensor(name)[rows] if inputs[i].shape(name) else inputs[i].tensor(name), device)

    def delta(i: int, name: str, rows: slice = slice(None)) -> torch.Tensor:
        t = input_rows(i, name, rows)
        if pre is None:
            return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        return _extract.delta_of(base_rows(name, rows), t, delta_dtypes(name)[i])

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
    pieces = _Pieces()
    # Unweighted task arithmetic: the sum of the deltas, which a compiled kernel can do in one pass.
    plain_sum = spec.fast is linear.task_arithmetic and all(w * resolved["scale"] == 1.0 for w in weights)

    def block_deltas(name: str, rows: slice) -> list[torch.Tensor]:
        parts = [delta(i, name, rows).contiguous() for i in range(len(inputs))]
        if not spec.trim:
            return parts
        if trims.get((0, name)) is None:  # merged whole: trimmed in memory by the one trim plan
            return [trim_plan(TaskVector._wrap(name, p), resolved["density"], "tensor").trimmed(name) for p in parts]
        return [trims[(i, name)](p) for i, p in enumerate(parts)]

    def run_method(name: str, deltas: list[torch.Tensor], base: torch.Tensor | None, start: int) -> torch.Tensor:
        return _engine.call(spec, name, deltas, weights, resolved, base=base if spec.needs_base else None,
                            shape=tuple(reference.shape(name)), start=start, stats=stats)

    def merged(name: str, rows: slice) -> torch.Tensor:
        shape = reference.shape(name)
        start = (rows.start or 0) * math.prod(shape[1:]) if shape else 0
        dtypes = delta_dtypes(name)
        if (pre is not None and device.type == "cpu" and not spec.trim and spec.elementwise and shape
                and all(d in (None, torch.float32) for d in dtypes)):
            out = pieces.merge(lambda deltas, b, at: run_method(name, deltas, b, at), base_rows(name, rows),
                               [input_rows(i, name, rows) for i in range(len(inputs))], dtype or pre.dtype(name),
                               start, checked=None in dtypes, plain_sum=plain_sum)
            if out is not None:
                return out
        parts = block_deltas(name, rows)
        result = run_method(name, parts, base_rows(name, rows) if pre is not None else None, start)
        del parts
        if pre is None:
            return result.to(dtype or _promote_inputs(inputs, name))
        b = base_rows(name, rows)
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
    bar = _progress(progress, total=len(names), desc=f"merge ({method})")

    following = dict(itertools.pairwise(names))
    checkpoints = [*inputs, *([pre] if pre is not None else [])]

    def blocks(name: str) -> Iterator[torch.Tensor]:
        # The next tensor's inputs, where they are not in the page cache yet, are read from disk by
        # another thread while this tensor is merged. (On the 2-core VM of benchmarks/, whose virtual
        # disk reads 3 GB in ~3 s, the gain was within the noise; it counts where reads wait on a device.)
        if name in following:
            reader.submit(lambda: [c.prefetch(following[name], limit=budget) for c in checkpoints])
        if name in floats:
            for rows in row_blocks(name, None):
                yield merged(name, rows).cpu()
                _return_freed_memory()  # after pieces too: DARE's masks come from its threads' heaps
        else:  # integer buffers come from the base
            yield reference.tensor(name)
        bar.update(1)  # here: the writer asks for a tensor's blocks only when it writes them

    chunks = [(n, Lazy(out_dtype[n], reference.shape(n), lambda n=n: blocks(n))) for n in names]

    _numba.prime()  # before the budget's baseline: its runtime's memory is not the merge's data
    # Cached buffers would count against the budget: keep none while merging.
    with _flat.cache_paused(), _trimming(budget), ThreadPoolExecutor(1, thread_name_prefix="taskarith-read") as reader:
        try:
            if spec.statistic is not None:
                stats = _engine.statistic(spec, [n for n in names if n in floats], flat_deltas, flat_base,
                                          lambda n: tuple(reference.shape(n)), weights, resolved)
            if spec.trim:
                try:
                    trims.update(_plan_trims(resolved, floats, len(inputs), reference, delta, delta_dtypes,
                                             row_blocks, budget, wide_keys))
                except NonFiniteError:  # a selection met a NaN: name every input tensor holding one
                    _checks.raise_nan([(i, n) for i in range(len(inputs)) for n in floats if any(
                        _checks.any_nan([delta(i, n, rows)]) for rows in row_blocks(n, _SELECT_BYTES))], method)
                    raise
            if pre is None:
                write_safetensors(out, chunks, _vector_metadata(inputs, names, aliases, method))
            else:
                write_model(out, chunks, shard_bytes=shard_bytes, like=pre.path)  # a file base: no extras
        finally:
            bar.close()
    return out


# Entries per piece of :meth:`_Pieces.merge`: its dozen float32 scratch rows (1 MB each) stay in
# cache. Measured on a 374M-entry bfloat16 task-arithmetic merge (2 cores): 2^16 3.5 s, 2^18 2.3 s,
# 2^20 2.4 s, against 4.7 s for the same work on whole tensors (fresh memory for every temporary).
_PIECE = 1 << 18
_KEPT_OUTPUTS = 3  # output buffers a merge keeps for reuse: one written, one filled, one spare


class _Pieces:
    """Element-wise merges of row blocks a cache-sized piece at a time, in buffers kept across the
    tensors of one merge.

    Memory touched for the first time costs a page fault per page: on the
    2-core VM of ``benchmarks/``, filling 1 GB of fresh memory took 0.25-0.8 s
    against 0.06 s for memory already touched. So the scratch rows are
    allocated once per merge, and each output is written into a kept buffer
    that the writer no longer holds.
    """

    def __init__(self):
        self.scratch: dict[str, torch.Tensor] = {}
        self.outputs: list[torch.Tensor] = []

    def _rows(self, key: str, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.scratch.get(key)
        if buf is None or buf.dtype != dtype or buf.shape[0] < rows or buf.shape[1] < width:
            buf = self.scratch[key] = torch.empty(rows, max(width, buf.shape[1] if buf is not None else 0), dtype=dtype)
        return buf

    def output(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """``n`` entries of a kept buffer no one else references (the writer lets go of a block once
        it is written), else of a new one, kept in place of the smallest free one."""
        free = [b for b in self.outputs if _flat._unshared(b)]
        for buf in sorted(free, key=torch.Tensor.numel):
            if buf.dtype == dtype and buf.numel() >= n:
                return buf[:n]
        buf = torch.empty(n, dtype=dtype)
        if len(self.outputs) >= _KEPT_OUTPUTS and free:
            smallest = min(free, key=torch.Tensor.numel)
            self.outputs = [b for b in self.outputs if b is not smallest]
        if len(self.outputs) < _KEPT_OUTPUTS:
            self.outputs.append(buf)
        return buf[:n]  # a view: the kept tensor itself is never handed out, so its use count tells

    def merge(self, fn, base: torch.Tensor, finetuned: list[torch.Tensor], out_dtype: torch.dtype,
              offset: int, *, checked: bool = True, plain_sum: bool = False) -> torch.Tensor | None:
        """``base + fn(deltas, base, start)`` of an element-wise method for one row block, ``fn`` called
        on flat pieces (``start``: a piece's first entry in the whole tensor).

        Computes exactly what the whole-block path computes (the deltas of
        :func:`_extract.delta_of`, ``fn`` on them, ``base + result`` rounded
        once), without its full-size temporaries. With ``checked``, returns None
        when a half-precision delta does not round-trip in float32: the
        whole-block path then decides the float64 fallback for the tensor, as
        :func:`taskarith.extract` does. ``checked=False``: float32 deltas were
        already decided for this tensor. The result is a view of a kept buffer,
        which is only reused once no view of it is left. ``plain_sum``: ``fn``
        is the unweighted sum of the deltas, which :func:`_numba.add_deltas` does
        in one pass where it can (its float32 check failing, the pieces below
        redo the block with the exact check).
        """
        b = base.reshape(-1)
        fts = [f.reshape(-1) for f in finetuned]
        n, count = b.numel(), len(fts)
        wide = _extract.delta_dtype(b.dtype, None)
        half = b.dtype != wide
        out = self.output(n, out_dtype)
        # A NaN in the one-pass sum sends the block to the pieces, whose method names the input holding it.
        if plain_sum and _numba.add_deltas(out, b, fts, checked=checked) and not _checks.any_nan([out]):
            return out.view(base.shape)
        width = min(n, _PIECE)
        base_wide = self._rows("base", 1, width, wide)[0] if half else None
        fts_wide = self._rows("finetuned", count, width, wide) if half else None
        deltas = self._rows("deltas", count, width, wide)
        gaps = self._rows("gaps", count, width, wide) if half and checked else None
        # Pieces start at multiples of _PIECE of the whole tensor, so a DARE mask block is drawn once.
        starts = [0, *range((-offset) % _PIECE or _PIECE, n, _PIECE)]
        for s, e in zip(starts, [*starts[1:], n]):
            m = e - s
            if half:
                wb = base_wide[:m].copy_(b[s:e])
                for i, f in enumerate(fts):
                    fts_wide[i, :m].copy_(f[s:e])
                d = torch.sub(fts_wide[:, :m], wb, out=deltas[:, :m])
                # Every input's round trip at once; an exact check per input only where that fails.
                if checked and not _extract.sums_equal(wb, d, fts_wide[:, :m], gaps[:, :m]) and not all(
                        _extract.round_trips(b[s:e], f[s:e], deltas[i, :m]) for i, f in enumerate(fts)):
                    return None
            else:
                wb = b[s:e]
                for i, f in enumerate(fts):
                    torch.sub(f[s:e], wb, out=deltas[i, :m])
            result = fn([deltas[i, :m] for i in range(count)], b[s:e], offset + s).reshape(-1)
            total = torch.promote_types(wb.dtype, result.dtype)
            if total == out_dtype:
                torch.add(wb if wb.dtype == total else wb.to(total), result, out=out[s:e])
            else:
                result_wide = self._rows("result", 1, width, total)[0]
                out[s:e].copy_(torch.add(wb if wb.dtype == total else wb.to(total), result, out=result_wide[:m]))
        return out.view(base.shape)


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


def _plan_trims(resolved, floats, count, reference, delta, delta_dtypes, row_blocks, budget, wide_keys) -> dict:
    """Exact trims per (vector, tensor): None where the merge pass sees the tensor whole (it trims
    in memory), else a threshold from one in-memory selection or, past the budget, streaming passes."""
    density, scope = resolved["density"], resolved["scope"]
    trims: dict = {}
    for i in range(count):
        if scope == "global":
            total = sum(math.prod(reference.shape(n)) for n in floats)
            chunks = lambda i=i: (delta(i, n, rows).abs() for n in floats for rows in row_blocks(n, _SELECT_BYTES))
            shared = _make_trim(chunks, math.floor(density * total), total, budget, wide_keys(floats))
            trims.update({(i, n): shared for n in floats})
            continue
        for n in floats:
            numel = math.prod(reference.shape(n))
            if len(row_blocks(n, None)) == 1:
                trims[(i, n)] = None
                continue
            k = math.floor(density * numel)
            chunks = lambda i=i, n=n: (delta(i, n, rows).abs() for rows in row_blocks(n, _SELECT_BYTES))
            itemsize = 8 if delta_dtypes(n)[i] == torch.float64 or reference.dtype(n) == torch.float64 else 4
            if 0 < k < numel and numel * itemsize <= budget // 2:
                trims[(i, n)] = _select_in_memory(chunks, k, numel, torch.float64 if itemsize == 8 else torch.float32)
            else:
                trims[(i, n)] = _make_trim(chunks, k, numel, budget, wide_keys([n]))
    return trims


def _select_in_memory(chunks, k: int, numel: int, dtype: torch.dtype) -> _Trim:
    """The trim of one tensor whose magnitudes fit the budget though its merge does not: the
    magnitudes are gathered block by block into one buffer and selected among in place."""
    magnitudes = torch.empty(numel, dtype=dtype)
    start = 0
    for block in chunks():
        flat = block.reshape(-1)
        magnitudes[start:start + flat.numel()].copy_(flat)
        start += flat.numel()
        del block, flat
    threshold, _ = kernels.select_magnitudes(magnitudes, k)
    above = int(torch.count_nonzero(magnitudes > threshold))  # several times faster than a bool sum
    del magnitudes
    _return_freed_memory()
    return _Trim(threshold, above, k)


def _make_trim(chunks, k: int, n: int, budget: int, wide: bool) -> _Trim:
    if k <= 0:
        return _Trim(math.inf, 0, 0)
    if k >= n:
        return _Trim(-1.0, 0, 0)
    threshold, above = stream_threshold(chunks, k, collect=max(1024, budget // 48), wide=wide)
    return _Trim(threshold, above, k)


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


def _return_freed_memory() -> None:
    """Ask glibc to hand freed heap memory back to the OS once the process holds more than it needs.

    Blocks freed by PyTorch below glibc's (adaptive) mmap threshold otherwise
    stay in the process and count as private memory of the merge: measured on a
    32M-entry tensor, selection peaked at 172 MB without trimming and 36 MB with
    it. Trimming costs page faults on the next allocations, so it only happens
    when private memory has grown past half the budget.
    """
    limit = _trim_above.get()
    if not _libc.available() or limit is None:
        return
    if _private_bytes() > limit:
        _libc.malloc_trim()


def _private_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE  # resident minus shared (file-backed) pages
    except (OSError, IndexError, ValueError):
        return 1 << 62  # unknown: always trim


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# Per merge (a context variable, not a global), so that merges running in several threads each keep
# their own budget.
_trim_above: contextvars.ContextVar[int | None] = contextvars.ContextVar("taskarith_trim_above", default=None)


@contextmanager
def _trimming(budget: int) -> Iterator[None]:
    """Trim freed memory whenever private memory exceeds the baseline plus half of ``budget``."""
    token = _trim_above.set(_private_bytes() + budget // 2)
    try:
        yield
    finally:
        _trim_above.reset(token)


def _progress(enabled: bool | None, total: int, desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="tensor")
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
