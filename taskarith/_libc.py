"""The few glibc calls that Python's standard library lacks, each a no-op where unavailable.

All of them are hints about memory or I/O: none changes a result.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


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


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing ``nbytes`` at ``offset`` of a file back to disk without waiting for it."""
    function = getattr(_libc, "sync_file_range", None) if _libc is not None else None
    if function is None or nbytes <= 0:
        return
    if function.argtypes is None:
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a failure (e.g. a pipe) only loses the hint
