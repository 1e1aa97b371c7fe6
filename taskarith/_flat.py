"""The fast core: tensors packed into one contiguous buffer per dtype.

A :class:`Layout` maps every name to a slot (dtype, offset, shape) inside the
buffer of its dtype. Element-wise algebra over two vectors with equal layouts is
then one kernel per dtype over the whole buffer instead of one per tensor, and
the per-name tensors a user sees are views into the buffer.

Result buffers come from :func:`allocate`. On this class of machine the page
faults of a fresh multi-hundred-megabyte allocation cost more than the
arithmetic itself. So large CPU buffers ask the kernel for transparent huge pages
(``madvise``; one fault per 2 MiB), and buffers of vectors
that died are kept in a small cache and handed out again, much like PyTorch's
CUDA caching allocator. A cached buffer is only reused when no view of it is
alive anywhere (its storage's reference count proves it), so reuse can never
overwrite data a caller still holds.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch

from . import _libc
from .errors import TaskArithError

__all__ = ["Layout", "Slot", "allocate", "cache_info", "empty_cache", "release"]


class Slot(NamedTuple):
    """Where one tensor lives: ``buffers[dtype][offset:offset + numel].view(shape)``.

    A named tuple, not a dataclass: layouts of tens of thousands of tensors build them by the
    thousand, and a frozen dataclass's constructor cost several times more."""

    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Layout:
    """An ordered, immutable name -> :class:`Slot` map plus tied-name aliases.

    ``slots`` holds each distinct tensor once (its canonical name); ``aliases``
    maps every other name of a tied tensor to its canonical name. ``names``
    lists all names in their original order.
    """

    __slots__ = ("_key", "_splits", "aliases", "names", "sizes", "slots")

    def __init__(self, slots: dict[str, Slot], aliases: dict[str, str], names: tuple[str, ...]):
        self.slots = slots
        self.aliases = aliases
        self.names = names
        sizes: dict[torch.dtype, int] = {}
        for slot in slots.values():
            sizes[slot.dtype] = max(sizes.get(slot.dtype, 0), slot.offset + slot.numel)
        self.sizes = sizes
        self._splits: dict[torch.dtype, tuple | None] = {}
        # Plain tuples of names, dtypes, ints and shapes: comparing layouts stays in C (Slot.__eq__
        # is Python-level and cost more than a GPU kernel on a 300-tensor layout).
        self._key = (
            tuple((n, s.dtype, s.offset, s.shape) for n, s in slots.items()),
            tuple(sorted(aliases.items())),
            names,
        )

    @classmethod
    def build(
        cls,
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, torch.dtype],
        aliases: Mapping[str, str] | None = None,
        names: tuple[str, ...] | None = None,
    ) -> Layout:
        """Pack canonical names densely, in order, into one buffer per dtype."""
        offsets: dict[torch.dtype, int] = {}
        slots = {}
        for name, shape in shapes.items():
            dtype = dtypes[name]
            start = offsets.get(dtype, 0)
            slots[name] = Slot(dtype, start, tuple(shape))
            offsets[dtype] = start + math.prod(shape)
        aliases = dict(aliases or {})
        return cls(slots, aliases, names if names is not None else tuple(shapes) + tuple(aliases))

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Layout) and self._key == other._key)

    def __hash__(self) -> int:
        return hash(self._key)

    def split_plan(self, dtype: torch.dtype) -> tuple[list[str], list[int], list[tuple[int, ...]]] | None:
        """The canonical names of ``dtype``'s buffer in offset order, their sizes and shapes, when
        they fill it densely from offset 0 (one ``buffer.split(sizes)`` then cuts every tensor);
        else None. Computed once per layout: thousands of names made this a per-call cost."""
        if dtype not in self._splits:
            slots = sorted(((n, s) for n, s in self.slots.items() if s.dtype == dtype), key=lambda p: p[1].offset)
            offset, dense = 0, True
            for _, slot in slots:
                dense = dense and slot.offset == offset
                offset += slot.numel
            dense = dense and offset == self.sizes.get(dtype, 0)
            plan = ([n for n, _ in slots], [s.numel for _, s in slots], [s.shape for _, s in slots])
            self._splits[dtype] = plan if dense else None
        return self._splits[dtype]

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def slot(self, name: str) -> Slot:
        return self.slots[self.aliases.get(name, name)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.slot(name).shape

    def numel(self) -> int:
        return sum(slot.numel for slot in self.slots.values())

    def with_dtypes(self, dtype_of: Mapping[torch.dtype, torch.dtype]) -> Layout:
        """The same names and shapes, repacked with each dtype mapped through ``dtype_of``."""
        shapes = {n: s.shape for n, s in self.slots.items()}
        dtypes = {n: dtype_of[s.dtype] for n, s in self.slots.items()}
        if all(dtype_of[d] == d for d in self.sizes):
            return self
        return Layout.build(shapes, dtypes, self.aliases, self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)


def view(buffers: Mapping[torch.dtype, torch.Tensor], slot: Slot) -> torch.Tensor:
    """The tensor of ``slot`` as a view of its buffer."""
    return buffers[slot.dtype].narrow(0, slot.offset, slot.numel).view(slot.shape)


# ---------------------------------------------------------------- allocation

_MIN_CACHED_BYTES = 1 << 20  # small buffers are cheap to allocate; don't cache them
_cache: list[torch.Tensor] = []
_cache_lock = threading.Lock()
_paused = 0  # > 0 while a memory-budgeted operation runs: nothing is kept


@contextmanager
def cache_paused():
    """Neither keep nor reuse buffers inside the block (and drop what is cached on entry)."""
    global _paused
    with _cache_lock:
        _paused += 1
        _cache.clear()
    try:
        yield
    finally:
        with _cache_lock:
            _paused -= 1


def _cache_limit() -> int:
    """Bytes the buffer cache may hold: TASKARITH_CACHE_BYTES, else 1/8 of RAM (<= 4 GiB)."""
    configured = os.environ.get("TASKARITH_CACHE_BYTES")
    if configured is not None:
        return int(configured)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return min(ram // 8, 4 << 30)


def allocate(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised 1-D buffer, reused from the cache when one fits exactly."""
    device = torch.device(device)
    nbytes = numel * _itemsize(dtype)
    if device.type != "cpu" or nbytes < _MIN_CACHED_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)
    with _cache_lock:
        for i, buf in enumerate(() if _paused else _cache):
            if buf.dtype == dtype and buf.numel() == numel and _unshared(buf):
                return _cache.pop(i)
    buffer = torch.empty(numel, dtype=dtype)
    _libc.advise_huge_pages(buffer.data_ptr(), nbytes)
    return buffer


def release(buffers: Mapping[torch.dtype, torch.Tensor]) -> None:
    """Offer the buffers of a dead vector to the cache (called by a finalizer)."""
    limit = _cache_limit()
    with _cache_lock:
        if _paused:
            return
        for buf in buffers.values():
            if _unshared(buf):
                _keep(buf, limit)


def recycle(buffer: torch.Tensor) -> None:
    """Put ``buffer`` in the cache now, while views of it may still be alive elsewhere (a state_dict
    returned to a caller): :func:`allocate` hands it out only once none is."""
    limit = _cache_limit()
    with _cache_lock:
        if not _paused:
            _keep(buffer, limit)


def _keep(buf: torch.Tensor, limit: int) -> None:
    """Add ``buf`` to the cache (lock held), evicting the oldest buffers to stay within ``limit``."""
    if buf.device.type != "cpu" or buf.nbytes < _MIN_CACHED_BYTES:
        return
    held = sum(b.nbytes for b in _cache)
    while _cache and held + buf.nbytes > limit:
        held -= _cache.pop(0).nbytes  # evict the oldest
    if held + buf.nbytes <= limit:
        _cache.append(buf)


def empty_cache() -> None:
    """Free every buffer held by taskarith's CPU buffer cache.

    Example:
        >>> import taskarith as ta
        >>> ta.runtime.empty_cache()
    """
    with _cache_lock:
        _cache.clear()


def cache_info() -> dict[str, int]:
    """How many buffers and bytes the CPU buffer cache holds now, and its limit."""
    with _cache_lock:
        return {"buffers": len(_cache), "bytes": sum(b.nbytes for b in _cache), "limit": _cache_limit()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _unshared(buf: torch.Tensor) -> bool:
    """True when no tensor but ``buf`` itself references its storage.

    Relies on a private PyTorch counter; where it is missing, nothing is ever
    reused (correct, just slower).
    """
    if _use_count is None:
        return False
    # Two references: ``buf`` and the temporary storage object made to ask.
    return _use_count(buf.untyped_storage()._cdata) == 2


def pack(
    tensors: Mapping[str, torch.Tensor],
    layout: Layout,
    device: torch.device,
) -> dict[torch.dtype, torch.Tensor]:
    """Copy ``tensors`` (canonical names of ``layout``) into fresh buffers."""
    buffers = {dtype: allocate(size, dtype, device) for dtype, size in layout.sizes.items()}
    for name, slot in layout.slots.items():
        src = tensors[name]
        if src.shape != slot.shape:
            raise TaskArithError(f"internal: shape of {name!r} changed while packing")
        view(buffers, slot).copy_(src)
    return buffers
