"""Private memory of an out-of-core merge: give freed heap back under a budget; progress bars."""

from __future__ import annotations

import contextvars
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .. import _libc


def return_freed_memory() -> None:
    """Ask glibc to hand freed heap memory back to the OS once the process holds more than it needs.

    Blocks freed by PyTorch below glibc's (adaptive) mmap threshold otherwise
    stay in the process and count as private memory of the merge (several times
    the working set of a selection). Trimming costs page faults on the next
    allocations, so it only happens when private memory has grown past half
    the budget.
    """
    limit = _trim_above.get()
    if not _libc.available() or limit is None:
        return
    # Reading /proc costs ~0.1 ms: at most once per interval (work that frees much takes longer).
    now = time.monotonic()
    if now - _last_check.get() < _CHECK_INTERVAL:
        return
    _last_check.set(now)
    if _private_bytes() > limit:
        _libc.malloc_trim()


def _private_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE  # resident minus shared (file-backed) pages
    except (OSError, IndexError, ValueError):
        return 1 << 62  # unknown: always trim


_CHECK_INTERVAL = 0.01  # seconds
_last_check: contextvars.ContextVar[float] = contextvars.ContextVar("taskarith_last_trim_check", default=0.0)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# Per merge (a context variable, not a global), so that merges running in several threads each keep
# their own budget.
_trim_above: contextvars.ContextVar[int | None] = contextvars.ContextVar("taskarith_trim_above", default=None)


@contextmanager
def trimming(budget: int) -> Iterator[None]:
    """Trim freed memory whenever private memory exceeds the baseline plus half of ``budget``."""
    token = _trim_above.set(_private_bytes() + budget // 2)
    try:
        yield
    finally:
        _trim_above.reset(token)


def progress_bar(enabled: bool | None, total: int, desc: str):
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
