"""The one writer: safetensors files and Hugging Face model folders, atomically.

A tensor to write is a ``torch.Tensor`` or a stand-in with ``dtype``, ``shape``,
``numel()``, ``element_size()`` and ``blocks()`` (an iterator over its bytes in
order, produced while writing: the out-of-core merge computes each block as the
writer asks for it). Everything is checked before the first byte is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import IO, Any

import torch

from .. import _libc
from ..errors import TaskArithError
from ._paths import atomic_file, atomic_folder, contained_link_target
from ._reader import DTYPE_NAMES, MAX_HEADER_BYTES, SHARD_INDEX, SINGLE_FILE

_WRITEBACK_BYTES = 32 << 20  # see _Pipeline
# Weight files of any framework and their indexes: never copied from a source folder (stale next to
# the new weights), like hidden entries (.git, .cache, taskarith's marker).
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|msgpack|h5|gguf|onnx)$|.*\.index\.json$")
# Metadata of every model file written: Transformers expects "format"; the second key marks the file
# as a taskarith output, which a later run may replace.
MODEL_METADATA = {"format": "pt", "taskarith.output": "model"}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([KMGT]?)(i?)B?\s*", re.IGNORECASE)


def parse_bytes(size: str | int, *, what: str = "size") -> int:
    """``"2GB"`` (decimal, as Hugging Face counts), ``"512MiB"``, ``10**9`` -> a positive number of bytes.

    Example:
        >>> parse_bytes("5GB"), parse_bytes("1.5MiB")
        (5000000000, 1572864)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.fullmatch(str(size))
        if not match:
            raise TaskArithError(f"cannot read {what} {size!r} as a size; write e.g. '2GB', '512MiB' or a number "
                                 "of bytes")
        number, unit, binary = match.groups()
        value = int(float(number) * (1024 if binary else 1000) ** "_KMGT".index(unit.upper() or "_"))
    if value <= 0:
        raise TaskArithError(f"{what} must be positive, got {size!r}")
    return value


def header_of(chunks: list[tuple[str, Any]], metadata: Mapping[str, str] | None) -> bytes:
    """The encoded, padded safetensors header of ``chunks``; refuses what no reader could load back."""
    problems = []
    header: dict[str, Any] = {}
    if metadata:
        bad = [repr(k) for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            problems.append(f"metadata must map strings to strings: {', '.join(bad[:20])}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tensor in chunks:
        if not isinstance(name, str) or name == "__metadata__" or name in header:
            problems.append(f"tensor name {name!r} is " + ("reserved by the format" if name == "__metadata__"
                                                          else "given twice" if name in header else "not a string"))
            continue
        if tensor.dtype not in DTYPE_NAMES:
            problems.append(f"{name!r} has dtype {tensor.dtype}, which safetensors files here do not hold")
            continue
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if len(encoded) > MAX_HEADER_BYTES:
        problems.append(f"the header would take {len(encoded):,} bytes, over the format's limit of "
                        f"{MAX_HEADER_BYTES:,} (shorten the metadata)")
    if problems:
        raise TaskArithError(f"cannot write a safetensors file: {'; '.join(problems)}. Nothing was written.")
    return encoded + b" " * (-len(encoded) % 8)  # the format aligns the data section to 8 bytes


def write_safetensors(path: str | os.PathLike, chunks: Iterable[tuple[str, Any]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write named tensors to ``path`` in the safetensors format, atomically.

    Unlike ``safetensors.torch.save_file`` this streams each tensor's bytes
    straight from memory (no second copy of the model is built), which matters
    for vectors of billions of entries. Tensors are copied to the CPU and made
    contiguous one at a time where needed. The caller decides whether ``path``
    may be replaced (see :func:`taskarith.io.check_output`).
    """
    chunks = list(chunks)
    encoded = header_of(chunks, metadata)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        with _Pipeline(f) as writer:
            for _, tensor in chunks:
                _write_tensor(writer, tensor)


def write_model(out: str | os.PathLike, chunks: list[tuple[str, Any]], *, shard_bytes: int,
                like: str | os.PathLike | None = None, files: Mapping[str, str | bytes | None] | None = None,
                config: Mapping[str, Any] | None = None) -> Path:
    """Write a Hugging Face model folder, atomically: ``model.safetensors``, or shards
    ``model-0000k-of-0000n.safetensors`` of at most ``shard_bytes`` (a larger tensor gets a shard of its
    own) and ``model.safetensors.index.json`` (``total_size``: the bytes of tensor data). The
    non-weight files of ``like`` (config, tokenizer, subfolders) are copied, and ``config.json``'s
    dtype follows the written weights. ``files`` (name -> text or bytes) are written beside them (a
    model card, the config a merge ran, a new tokenizer; None: a copied file of that name is left out),
    and ``config`` updates top-level keys of ``config.json`` (a layer count changed by slicing)."""
    out = Path(out)
    shards = _plan_shards(chunks, shard_bytes)
    for _, shard in shards:
        header_of(shard, MODEL_METADATA)  # every shard's header is checked before anything is written
    with atomic_folder(out) as tmp:
        for file, shard in shards:
            write_safetensors(tmp / file, shard, MODEL_METADATA)
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for _, t in chunks)
            weight_map = {name: file for file, shard in shards for name, _ in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if like is not None and Path(like).is_dir():
            copy_extras(Path(like), tmp)
            _update_config_dtype(tmp / "config.json", chunks)
            if config:
                _update_config(tmp / "config.json", config)
        for name, content in (files or {}).items():
            if content is None:
                (tmp / name).unlink(missing_ok=True)
            elif isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
    return out


def _update_config(path: Path, updates: Mapping[str, Any]) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _plan_shards(chunks: list[tuple[str, Any]], shard_bytes: int) -> list[tuple[str, list]]:
    """Consecutive tensors packed greedily into shards of at most ``shard_bytes``, with their file names."""
    shards: list[list] = [[]]
    size = 0
    for name, tensor in chunks:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    n = len(shards)
    return [(SINGLE_FILE if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors", shard)
            for k, shard in enumerate(shards, 1)]


def copy_extras(source: Path, dest: Path, root: Path | None = None) -> None:
    """Copy the non-weight files of ``source`` (config, tokenizer, subfolders) into ``dest``.

    Hidden entries and weight files of any format are skipped; symlinks are
    followed only to files inside the source folder (or its Hugging Face cache's
    blobs), others are skipped with a warning.
    """
    root = source if root is None else root
    for entry in sorted(source.iterdir()):
        if entry.name.startswith(".") or _WEIGHT_FILE.match(entry.name):
            continue
        if entry.is_symlink() and contained_link_target(root, entry) is None:
            warnings.warn(f"not copying {str(entry)!r}: it is a symlink leading out of {str(root)!r}", stacklevel=3)
            continue
        if entry.is_dir():
            (dest / entry.name).mkdir()
            copy_extras(entry, dest / entry.name, root)
        elif entry.is_file():
            shutil.copy2(entry, dest / entry.name)


def _update_config_dtype(config: Path, chunks: list[tuple[str, Any]]) -> None:
    """Set ``config.json``'s ``torch_dtype``/``dtype`` to the weights' float dtype when they all share one."""
    floats = {t.dtype for _, t in chunks if t.dtype.is_floating_point}
    if len(floats) != 1 or not config.is_file():
        return
    try:
        data = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return  # not ours to fix: copied as it was
    name = str(next(iter(floats))).removeprefix("torch.")

    def update(node) -> bool:
        changed = False
        if isinstance(node, dict):
            for key in ("torch_dtype", "dtype"):
                if isinstance(node.get(key), str) and node[key] != name:
                    node[key], changed = name, True
            for value in node.values():  # every nested config, not just the first that changes
                changed = update(value) or changed
        return changed

    try:
        changed = update(data)
    except RecursionError:
        return
    if changed:
        mode = config.stat().st_mode
        config.write_text(json.dumps(data, indent=2) + "\n")
        os.chmod(config, mode)


class _Pipeline:
    """Writes each block in a background thread while the caller produces the next one.

    Copying a block into the page cache releases the GIL, so an out-of-core
    merge computes block i + 1 while block i is written. One write at a time is
    in flight, so the bytes land in order and at most one extra block is held.
    Every ``_WRITEBACK_BYTES`` written, the thread asks the kernel to start
    writing them to disk, so dirty pages do not pile up until the kernel
    throttles the writer (docs/design.md has the measurements).
    """

    def __init__(self, f: IO[bytes]):
        self.f, self.pending = f, None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskarith-write")
        self.position = self.written_back = f.tell()

    def write(self, data: memoryview) -> None:
        self.wait()
        self.pending = self.pool.submit(self._write, data)  # the future keeps ``data`` alive

    def _write(self, data: memoryview) -> None:
        self.f.write(data)
        self.position += data.nbytes
        if self.position - self.written_back >= _WRITEBACK_BYTES:
            self.f.flush()
            _libc.start_writeback(self.f.fileno(), self.written_back, self.position - self.written_back)
            self.written_back = self.position

    def flush(self) -> None:
        self.wait()
        self.f.flush()

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # re-raises a failed write here

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                self.wait()
            elif self.pending is not None:
                futures_wait([self.pending])  # the caller's error wins; just let the write finish
        finally:
            self.pool.shutdown(wait=True)


def _write_tensor(writer: _Pipeline, tensor) -> None:
    """Write one tensor's bytes; a stand-in with ``blocks()`` streams them block by block."""
    expected = tensor.numel() * tensor.element_size()
    written = 0
    for block in tensor.blocks() if hasattr(tensor, "blocks") else [tensor]:
        if block.dtype != tensor.dtype:
            raise TaskArithError(f"internal: a block of dtype {block.dtype} streamed into a {tensor.dtype} tensor")
        flat = block.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        if flat.device.type != "cpu":
            flat = flat.cpu()
        if not flat.is_contiguous():
            flat = flat.contiguous()
        # Viewing as bytes gives numpy an array type for every dtype (bf16 included).
        writer.write(memoryview(flat.view(torch.uint8).numpy()))
        written += flat.numel() * flat.element_size()
    if written != expected:
        raise TaskArithError(f"internal: wrote {written} bytes for a tensor of {expected} bytes")


class Lazy:
    """Stands in for a tensor in the writer: its bytes come from ``blocks()`` while writing."""

    def __init__(self, dtype: torch.dtype, shape, blocks):
        self.dtype, self.shape, self.blocks = dtype, torch.Size(shape), blocks

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize
