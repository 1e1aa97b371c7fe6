"""Work split across threads: every entry once, in balanced contiguous shares, in forked children too."""

import itertools
import os
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskarith as ta
from taskarith import _parallel


@given(st.lists(st.integers(0, 3_000_000), min_size=1, max_size=12), st.integers(1, 5), st.booleans())
def test_shares_cover_every_entry_once_in_balanced_contiguous_ranges(sizes, count, split):
    shares = _parallel.shares(sizes, count, split=split)
    assert len(shares) == count
    pieces = [p for share in shares for p in share]
    for job, size in enumerate(sizes):
        ranges = [(lo, hi) for j, lo, hi in pieces if j == job]
        assert ranges, f"job {job} is never run"
        assert ranges[0][0] == 0 and ranges[-1][1] == size, f"job {job}: {ranges}"
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), f"job {job}: ranges not contiguous"
        if not split or size < _parallel.MIN_SHARE:
            assert len(ranges) == 1, f"job {job} was split"
    assert [p[0] for p in pieces] == sorted(p[0] for p in pieces), "jobs out of order"
    share = -(-sum(sizes) // count)
    largest = max(sizes)
    for entries in (sum(hi - lo for _, lo, hi in s) for s in shares):
        assert entries <= share + (largest if not split else _parallel.MIN_SHARE), "unbalanced shares"



def _sum_in_shares(queue):
    totals = []
    _parallel.run([3_000_000], lambda job, lo, hi: totals.append(hi - lo))
    queue.put(sum(totals))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_work_on_threads_of_its_own():
    """The parent's pool threads do not exist in a forked child: its work must not wait for them."""
    import multiprocessing

    with mock.patch.object(_parallel, "threads", lambda: 2):
        _sum_in_shares(multiprocessing.get_context("fork").Queue())  # the parent's pool exists now
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_sum_in_shares, args=(queue,))
        child.start()
        child.join(60)
        alive = child.is_alive()
        if alive:
            child.kill()
    assert not alive, "the child hung on the parent's thread pool"
    assert queue.get(timeout=5) == 3_000_000


def test_the_backend_switch_is_validated_and_honours_the_older_one(monkeypatch):
    from taskarith.backends import _switch as _backend

    monkeypatch.delenv("TASKARITH_BACKEND", raising=False)
    monkeypatch.delenv("TASKARITH_NUMBA", raising=False)
    assert _backend.selected() == "auto" and _backend.allows("numba") and _backend.allows("triton")
    monkeypatch.setenv("TASKARITH_NUMBA", "0")  # the older switch: Numba off, Triton still allowed
    assert not _backend.allows("numba") and _backend.allows("triton")
    for choice, numba, triton in [("torch", False, False), ("numba", True, False), ("triton", False, True),
                                  (" AUTO ", True, True)]:
        monkeypatch.setenv("TASKARITH_BACKEND", choice)
        assert (_backend.allows("numba"), _backend.allows("triton")) == (numba, triton), choice
    monkeypatch.setenv("TASKARITH_BACKEND", "cuda")
    with pytest.raises(ta.TaskArithError, match="TASKARITH_BACKEND='cuda' is not a backend"):
        ta.merge([ta.TaskVector({"w": torch.randn(1000)})] * 2, "ties", density=0.5)
