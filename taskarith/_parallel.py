"""Work split across threads for code whose heavy parts release the GIL (Numba kernels, numpy's
selection, torch kernels, DARE's mask draws): one pool per process, sized by torch's thread count."""

from __future__ import annotations

import contextvars
import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

MIN_SHARE = 1 << 20  # entries below which one thread does all the work: a hand-off costs ~50 us


def threads() -> int:
    """Threads to use: torch's intra-op count, so that ``torch.set_num_threads`` governs ours too."""
    return max(1, torch.get_num_threads())


def _pool(count: int) -> ThreadPoolExecutor:
    # Per process: a forked child inherits the parent's executor but none of its threads, and work
    # submitted there would wait forever.
    return _pool_of(count, os.getpid())


@functools.cache
def _pool_of(count: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(count, thread_name_prefix="taskarith-worker")


def shares(sizes: Sequence[int], count: int, *, split: bool) -> list[list[tuple[int, int, int]]]:
    """``count`` contiguous shares of jobs of ``sizes`` entries, about equal in entries: per share,
    ``(job, lo, hi)`` ranges. With ``split``, a job of at least :data:`MIN_SHARE` entries may be cut
    between shares; otherwise each job stays whole in one share.

    Example:
        >>> shares([10, 30], 2, split=False)
        [[(0, 0, 10), (1, 0, 30)], []]
        >>> shares([4_000_000], 2, split=True)
        [[(0, 0, 2000000)], [(0, 2000000, 4000000)]]
    """
    total = sum(sizes)
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(count)]
    share = -(-total // count)
    t, room = 0, share
    for job, size in enumerate(sizes):
        if size == 0:  # still called: the caller may record something per job
            out[t].append((job, 0, 0))
        lo = 0
        while lo < size:
            take = min(size - lo, room) if split and size >= MIN_SHARE else size - lo
            out[t].append((job, lo, lo + take))
            lo += take
            room -= take
            if room <= 0 and t < count - 1:
                t, room = t + 1, share
    return out


def run(sizes: Sequence[int], call: Callable[[int, int, int], None], *, split: bool = True) -> None:
    """``call(job, lo, hi)`` over every job's entries, the shares of :func:`shares` on
    :func:`threads` threads (the calling one among them); exceptions propagate."""
    count = threads()
    if count == 1 or sum(sizes) < MIN_SHARE or getattr(_state, "inside", False):
        # Nested inside another run: its threads are busy already (and waiting on the pool from a
        # pool thread could deadlock).
        for job, size in enumerate(sizes):
            call(job, 0, size)
        return
    parts = shares(sizes, count, split=split)
    # Worker threads do not inherit context variables: each share runs in a copy of the caller's, so
    # that per-call state (an out-of-core merge's memory budget) reaches work done there.
    done = [_pool(count).submit(contextvars.copy_context().run, _run_share, call, part) for part in parts[1:] if part]
    try:
        _run_share(call, parts[0])
    finally:
        for f in done:
            f.result()


_state = threading.local()


def _run_share(call: Callable[[int, int, int], None], part: list[tuple[int, int, int]]) -> None:
    _state.inside = True
    try:
        for piece in part:
            call(*piece)
    finally:
        _state.inside = False
