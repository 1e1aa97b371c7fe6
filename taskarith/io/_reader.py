"""The one checkpoint reader: a ``.safetensors`` file, a model folder, or a sharded index.

Every header, offset, dtype and shard path is validated before the first tensor
is read, and all problems of a checkpoint are reported at once. Tensors are then
served as zero-copy views of the memory-mapped files: shared ones for
out-of-core merging (:meth:`Checkpoint.tensor`), private copy-on-write ones for
in-memory use (:meth:`Checkpoint.load`).

The rules are those of the safetensors format: an 8-byte little-endian header
length, a JSON object header, and per tensor a known dtype, a shape and
``data_offsets`` that tile the data section in order, without gaps or overlaps,
each spanning exactly ``dtype size x numel`` bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import TaskArithError, raise_if_any
from ._paths import contained_link_target

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
FORMAT = "taskarith.task_vector"  # a task vector file's taskarith.format, in the version this release reads
FORMAT_VERSION = "1"
_MAX_INDEX_BYTES = 100_000_000

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}
_LISTED = 20


class Checkpoint:
    """Read-only access to a validated ``.safetensors`` file or (sharded) model folder.

    Args:
        path: a ``.safetensors`` file, or a folder holding ``model.safetensors`` or
            ``model.safetensors.index.json`` (symlinks into a Hugging Face cache's
            ``blobs`` folder are followed; other links out of the folder are refused).

    Raises:
        TaskArithError: listing every problem of the checkpoint, before any tensor is read.

    Example:
        >>> import os, tempfile, torch, taskarith as ta
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> ta.io.write_safetensors(path, [("w", torch.ones(2, 3))])
        >>> ckpt = ta.io.Checkpoint(path)
        >>> ckpt.names(), ckpt.shape("w"), ckpt.load("w").sum().item()
        (['w'], (2, 3), 6.0)
    """

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)):
            raise TaskArithError(f"a checkpoint is a path to a .safetensors file or a model folder, not a "
                                 f"{type(path).__name__}")
        self.path = Path(path)
        files, owner = _locate(self.path)
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], Path, int, int]] = {}
        self.metadata: dict[str, str] = {}
        self._maps: dict[Path, np.ndarray] = {}  # views for tensor()
        self._private_maps: dict[Path, np.ndarray] = {}  # views for load(), which may be written to
        self._loaded: set[str] = set()
        problems: list[str] = []
        seen: dict[str, str] = {}  # name -> the file holding it
        read: set[str | None] = set()
        for shard, file in files.items():
            header, data_start, file_problems = _read_header(file)
            problems += file_problems
            if header is None:
                continue
            read.add(shard)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, (dtype, shape, begin, end) in header.items():
                if name in seen:
                    problems.append(f"{name!r} is stored in two shards, {seen[name]} and {file.name}")
                    continue
                seen[name] = file.name
                if owner is not None and owner.get(name) != shard:
                    problems.append(f"{file.name} holds {name!r}, which the index places "
                                    + (f"in {owner[name]}" if name in owner else "in no shard"))
                    continue
                self.entries[name] = (DTYPES[dtype], shape, file, data_start + begin, data_start + end)
        if owner is not None:
            lost = [n for n, shard in owner.items() if shard in read and n not in seen]
            if lost:
                problems.append(f"the index lists {len(lost)} tensor(s) their shard does not hold: "
                                + ", ".join(repr(n) for n in lost[:_LISTED]))
        raise_if_any(problems, error=TaskArithError,
                     header=f"{str(self.path)!r} is not a valid safetensors checkpoint",
                     fix="Re-save the model with safetensors (e.g. save_pretrained) or point at an intact copy.")
        _check_taskarith_metadata(self.path, self.metadata, self.entries)
        # The order names are served in (and selections break ties by): a vector's recorded
        # order, else the shard index's, else sorted, as safetensors lists a file's names.
        recorded = [n for n in json.loads(self.metadata.get("taskarith.names", "[]")) if n in self.entries]
        if len(recorded) == len(self.entries):
            self.order = recorded
        else:
            self.order = list(owner) if owner is not None else sorted(self.entries)

    def names(self) -> list[str]:
        """Every tensor name, in the checkpoint's order."""
        return list(self.order)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a view of the memory-mapped file (copied only if misaligned): its pages are
        file-backed, read when touched and reclaimable, which is what out-of-core merging needs."""
        return self._view(name, self._maps)

    def load(self, name: str, device: str | torch.device | None = None) -> torch.Tensor:
        """The tensor for in-memory use (on ``device``, default CPU), sharing memory with nothing else.

        On the CPU it is a copy-on-write view of the file, as safetensors' own reader gives: no
        copy is made up front, and writing to the tensor never changes the file. A name loaded a
        second time from the same checkpoint is copied, so two loads never alias.
        """
        if device is not None and torch.device(device).type != "cpu":
            return self.tensor(name).to(device)
        if name in self._loaded:
            return self.tensor(name).clone()
        self._loaded.add(name)
        return self._view(name, self._private_maps)

    def _view(self, name: str, maps: dict[Path, np.ndarray]) -> torch.Tensor:
        dtype, shape, file, begin, end = self.entries[name]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        if file not in maps:
            # Copy-on-write: never writes the file. Sliced as a plain array (which keeps the map
            # alive): a memmap slice runs Python code, ~80 us per tensor.
            maps[file] = np.memmap(file, dtype=np.uint8, mode="c").view(np.ndarray)
        raw = torch.from_numpy(maps[file][begin:end])
        if begin % dtype.itemsize:
            raw = raw.clone()
        return raw.view(dtype).view(shape)

    def state_dict(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """Every tensor (see :meth:`load`), in the checkpoint's order."""
        return {name: self.load(name, device) for name in self.order}

    def prefetch(self, name: str, limit: int | None = None) -> None:
        """Start reading the bytes of ``name`` (at most ``limit`` of them) into the page cache in the
        background, so that disk reads overlap work on other tensors. A no-op where the OS offers no
        ``posix_fadvise``."""
        if not hasattr(os, "posix_fadvise"):
            return
        _, _, file, begin, end = self.entries[name]
        length = end - begin if limit is None else min(end - begin, limit)
        if length <= 0:
            return
        try:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, begin, length, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass  # only a hint


def open_checkpoint(source) -> Checkpoint:
    """A :class:`Checkpoint` of a path; an object that already reads like one (a view assembling the
    tensors of several checkpoints) is returned as it is."""
    return source if hasattr(source, "names") and hasattr(source, "tensor") else Checkpoint(source)


def _locate(path: Path) -> tuple[dict[str | None, Path], dict[str, str] | None]:
    """The weight files of ``path`` (shard name -> file) and, for a sharded folder, the weight map."""
    if path.is_dir():
        single, index = path / SINGLE_FILE, path / SHARD_INDEX
        if single.is_file():
            return {None: _inside(path, SINGLE_FILE)}, None
        if index.is_file():
            weight_map = _read_index(_inside(path, SHARD_INDEX))
            return {shard: _inside(path, shard) for shard in sorted(set(weight_map.values()))}, weight_map
        raise TaskArithError(f"folder {str(path)!r} holds neither {SINGLE_FILE} nor {SHARD_INDEX}; point at the "
                             ".safetensors file itself, or save the model with safetensors (save_pretrained does).")
    if not path.exists():
        raise TaskArithError(f"no such file or folder: {str(path)!r}")
    if path.suffix != ".safetensors" or not path.is_file():
        raise TaskArithError(f"{str(path)!r} is not a .safetensors file or a model folder")
    return {None: path}, None


def _inside(folder: Path, name: str) -> Path:
    """``folder / name`` for a plain file name whose file (or link target) lies in the folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or os.path.isabs(name) or "\0" in name:
        raise TaskArithError(f"the shard index of {str(folder)!r} names {name!r}, which is not a plain file "
                             "name in the model folder; shard files must sit beside the index.")
    file = folder / name
    if not file.is_file():
        raise TaskArithError(f"{str(file)!r} is missing: the shard index of {str(folder)!r} lists it "
                             "(download or copy every shard)")
    if file.is_symlink() and contained_link_target(folder, file) is None:
        raise TaskArithError(f"{str(file)!r} is a symlink leading out of the model folder (to "
                             f"{os.path.realpath(file)!r}); copy the file into the folder instead.")
    return file


def _read_index(index: Path) -> dict[str, str]:
    try:
        if index.stat().st_size > _MAX_INDEX_BYTES:
            raise ValueError(f"{index.stat().st_size:,} bytes (a shard index is far smaller)")
        data = json.loads(index.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise TaskArithError(f"{str(index)!r} is not a valid shard index: {err}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise TaskArithError(f"{str(index)!r} is not a valid shard index: it needs a 'weight_map' object "
                             "mapping tensor names to shard file names")
    return weight_map


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"key(s) given twice: {', '.join(map(repr, twice[:_LISTED]))}")
    return dict(pairs)


def _read_header(file: Path) -> tuple[dict | None, int, list[str]]:
    """The validated header of one file (name -> (dtype, shape, begin, end), plus ``__metadata__``),
    the offset of its data section, and its problems (the header is None when it cannot be used)."""
    where = file.name
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return None, 0, [f"{where} is {size} bytes, too short for a safetensors header"]
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            return None, 0, [(f"{where} declares a header of {length:,} bytes in a file of {size:,} bytes "
                              f"(at most {MAX_HEADER_BYTES:,}): the file is truncated or not safetensors")]
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        return None, 0, [f"{where}: the header is not valid JSON ({err})"]
    if not isinstance(header, dict):
        return None, 0, [f"{where}: the header is a JSON {type(header).__name__}, not an object"]
    problems: list[str] = []
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        problems.append(f"{where}: __metadata__ must map strings to strings")
        metadata = None
    entries = {}
    for name, info in header.items():
        entry = _entry(name, info)
        if isinstance(entry, str):
            problems.append(f"{where}: {entry}")
        else:
            entries[name] = entry
    data_bytes = size - 8 - length
    problems += [f"{where}: {p}" for p in _tiling_problems(entries, data_bytes)]
    if problems:
        return None, 0, problems
    return {"__metadata__": metadata, **entries}, 8 + length, []


def _entry(name: str, info: object) -> tuple | str:
    """(dtype, shape, begin, end) of a header entry, or what is wrong with it."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        return f"{name!r} needs exactly 'dtype', 'shape' and 'data_offsets', got {_short(info)}"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPES:
        return (f"{name!r} has dtype {_short(dtype)}, which taskarith does not support (it reads "
                f"{', '.join(DTYPES)}); convert the checkpoint to one of them, e.g. BF16 or F32")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        return f"{name!r} has shape {_short(shape)}; a shape is a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        return f"{name!r} has data_offsets {_short(offsets)}; they are [begin, end], 0 <= begin <= end"
    expected = math.prod(shape) * _ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        return (f"{name!r} spans {offsets[1] - offsets[0]:,} bytes but {dtype} x {tuple(shape)} "
                f"needs {expected:,}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _tiling_problems(entries: dict[str, tuple], data_bytes: int) -> list[str]:
    """The byte ranges must tile the data section in order: no gap, no overlap, none past the end."""
    problems, position, previous = [], 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin < position:
            problems.append(f"{name!r} (bytes {begin:,}-{end:,}) overlaps {previous!r}")
        elif begin > position:
            problems.append(f"{position:,} bytes before {name!r} belong to no tensor")
        position, previous = max(position, end), name
    if position > data_bytes:
        problems.append(f"the tensors need {position:,} bytes of data but the file holds {data_bytes:,} "
                        "(truncated?)")
    elif position < data_bytes:
        problems.append(f"{data_bytes - position:,} bytes at the end belong to no tensor")
    return problems


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_taskarith_metadata(path: Path, metadata: dict[str, str], entries: dict) -> None:
    """A task vector file's own metadata: a readable format version, aliases, names and skipped lists."""
    ours = {k[len("taskarith."):]: v for k, v in metadata.items() if k.startswith("taskarith.")}
    if not ours:
        return
    problems = []
    version = ours.get("format_version")
    if version is not None and version != FORMAT_VERSION:
        raise TaskArithError(f"{str(path)!r} uses task vector format {version}; this taskarith reads format "
                             f"{FORMAT_VERSION}. Upgrade taskarith to read it.")
    parsed = {}
    for key, kind in (("aliases", dict), ("names", list), ("skipped", list)):
        if key not in ours:
            continue
        try:
            value = json.loads(ours[key])
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, kind) and all(isinstance(x, str) for x in _strings_of(value)):
            parsed[key] = value
        else:
            problems.append(f"taskarith.{key} must be a JSON {kind.__name__} of strings")
    aliases = parsed.get("aliases") or {}
    bad = [f"{a!r} -> {c!r}" for a, c in aliases.items() if a in entries or c not in entries]
    if bad:
        problems.append(f"taskarith.aliases must map names absent from the file to stored names: {', '.join(bad[:_LISTED])}")
    names = parsed.get("names")
    if names is not None and sorted(names) != sorted([*entries, *aliases]):
        problems.append("taskarith.names does not list exactly the stored names and their aliases")
    raise_if_any(problems, error=TaskArithError, header=f"{str(path)!r} carries invalid task vector metadata",
                 fix="The file was edited or damaged; extract the vector again.")


def _strings_of(value: dict | list) -> list:
    """Every item of a list, or every key and value of a dict."""
    return [x for pair in value.items() for x in pair] if isinstance(value, dict) else value
