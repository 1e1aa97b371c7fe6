"""Process-wide runtime state, in one place: the buffer cache, the worker threads, the backend
switch and the allocator hint.

Nothing here changes during a merge: per-call state (a merge's memory budget, a tensor's place
in its whole for random draws) travels with the call, so merges may run in several threads.

* **Buffer cache** — freed CPU buffers of 1 MiB and more are kept for reuse (allocating fresh
  memory costs a page fault per page): :func:`cache_info`, :func:`empty_cache`; its size is
  ``TASKARITH_CACHE_BYTES`` (default 1/8 of RAM, at most 4 GiB). Out-of-core merges keep none.
* **Threads** — one pool per process for work that releases the GIL (compiled kernels, numpy's
  selection, DARE's draws), sized by ``torch.get_num_threads()``: :func:`threads`.
* **Backend** — ``TASKARITH_BACKEND=auto|torch|numba|triton`` picks the kernels; every backend
  computes the same bits: :func:`backend`.
* **Allocator** — :func:`hold_freed_memory` lets glibc keep freed blocks (process-wide, so only
  for processes that only merge, such as the command line).

Example:
    >>> import taskarith as ta
    >>> sorted(ta.runtime.cache_info())
    ['buffers', 'bytes', 'limit']
    >>> ta.runtime.backend() in ("auto", "torch", "numba", "triton")
    True
"""

from __future__ import annotations

from . import _flat, _libc, _parallel
from .backends import _switch

__all__ = ["backend", "cache_info", "empty_cache", "hold_freed_memory", "threads"]

cache_info = _flat.cache_info
empty_cache = _flat.empty_cache
threads = _parallel.threads
backend = _switch.selected


def hold_freed_memory() -> None:
    """Let glibc keep freed blocks for reuse rather than hand them back to the OS at once
    (process-wide; a budgeted out-of-core merge still returns memory past half its budget)."""
    _libc.hold_freed_memory()
