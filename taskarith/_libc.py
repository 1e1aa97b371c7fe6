"""The few glibc calls that Python's standard library lacks, each a no-op where unavailable.

All of them are hints about memory or I/O: none changes a result.
"""

from __future__ import annotations

import ctypes
import functools
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
_MADV_HUGEPAGE = 14  # asm-generic/mman-common.h
_HUGE_PAGE = 1 << 21


def _load():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load()


def available() -> bool:
    return _libc is not None


def malloc_trim() -> None:
    """Hand freed heap memory back to the operating system."""
    if _libc is not None:
        _libc.malloc_trim(0)


def hold_freed_memory() -> None:
    """Let malloc keep freed blocks (up to 1 GiB each) for reuse instead of returning them at once."""
    if _libc is None or not hasattr(_libc, "mallopt"):
        return
    _libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)  # such blocks come from the heap, reusable when freed
    _libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # and freed memory at the heap's top stays there


def advise_huge_pages(address: int, nbytes: int) -> None:
    """Ask the kernel to back the whole 2 MiB pages inside ``[address, address + nbytes)`` with huge
    pages (where transparent huge pages are enabled on request): one page fault per 2 MiB instead of
    per 4 KiB when the memory is first written. Call it before the memory is touched."""
    function = _function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    stop = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if function is not None and stop > start:
        function(start, stop - start, _MADV_HUGEPAGE)  # a refusal only loses the hint


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing ``nbytes`` at ``offset`` of a file back to disk without waiting for it."""
    function = _function("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))
    if function is not None and nbytes > 0:
        function(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a failure (e.g. a pipe) only loses the hint


@functools.cache
def _function(name: str, argtypes: tuple):
    """glibc's function ``name`` with its argument types set, or None where it is unavailable."""
    function = getattr(_libc, name, None) if _libc is not None else None
    if function is not None:
        function.argtypes = list(argtypes)
    return function
