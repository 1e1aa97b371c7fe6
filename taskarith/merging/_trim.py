"""The one trim plan: keep exactly the ``floor(density·n)`` largest magnitudes, per tensor or over
the whole vector. Ties at the threshold keep the earliest entries of a tensor (flat order) and,
over the whole vector, those of the tensors first in sorted name order: the same entries however
the inputs order their tensors (a state dict, a file, the shards of a folder).

A plan is per tensor a ``hardshrink`` threshold and, where ties at the threshold must lose some
entries, the index from which they are dropped (:class:`taskarith.backends._fused.Trimmed`). Out of core,
the same thresholds come from a streamed selection (:mod:`taskarith.outofcore._select`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping

import torch

from .. import _flat, _parallel
from ..backends import _fused, _numba, thresholds
from ..vector import TaskVector


def trim(vector: TaskVector, density: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep exactly ``floor(density * n)`` largest-magnitude entries, zero the rest.

    ``n`` is each tensor's size (``scope="tensor"``) or the whole vector's
    (``scope="global"``). Ties at the threshold keep the earliest entries of each
    tensor, and over the whole vector those of the tensors first in sorted name order.
    """
    plan = trim_plan(vector, density, scope)
    return {name: plan.trimmed(name) for name in plan.tensors}


def by_tensor(density: float | Mapping[str, float]) -> Callable[[str], float]:
    """A tensor's density from one value for all, or from a mapping by name."""
    return density.__getitem__ if isinstance(density, Mapping) else lambda name: density


def trim_plan(vector: TaskVector, density: float, scope: str) -> _fused.Trimmed:
    """How to trim ``vector``: per tensor, a ``hardshrink`` threshold and, where ties at the
    threshold must lose some entries, the index from which they are dropped."""
    return trim_plans([vector], density, scope)[0]


def trim_plans(vectors: list[TaskVector], density: float | Mapping[str, float], scope: str) -> list[_fused.Trimmed]:
    """:func:`trim_plan` of each vector; tensor-scope selections of all of them share the threads.

    With ``scope="tensor"``, ``density`` may give each tensor its own (a mapping by name)."""
    if not isinstance(density, Mapping) and density >= 1:
        return [_fused.Trimmed({n: v[n] for n in v._layout.slots}, source=v) for v in vectors]
    if scope != "tensor":
        return [_global_trim_plan(v, density) for v in vectors]
    density_of = by_tensor(density)
    plans, jobs = [], []
    for vector in vectors:
        tensors = {n: vector[n] for n in vector._layout.slots}
        lambdas, cuts = {}, {}
        grouped = _selected_together(vector, tensors)
        if grouped:
            _segment_trims(vector, tensors, grouped, density_of, lambdas, cuts, segmented=vector.device.type != "cpu")
        together = set(grouped)
        # A density of 1 keeps the whole tensor: no threshold (as no trim at all).
        jobs += [(tensors[n], lambdas, cuts, n) for n in tensors if n not in together and density_of(n) < 1]
        plans.append((tensors, lambdas, cuts, vector))
    largest: dict[tuple, int] = {}
    for x, *_ in jobs:
        key = (x.dtype, x.device)
        largest[key] = max(largest.get(key, 0), x.numel())
    scratches: dict[tuple, torch.Tensor] = {}  # per thread, dtype and device: reused across tensors

    def select(job: int, lo: int, hi: int) -> None:
        x, lambdas, cuts, name = jobs[job]
        key = (threading.get_ident(), x.dtype, x.device)
        if key not in scratches:
            scratches[key] = torch.empty(largest[key[1:]], dtype=x.dtype, device=x.device)
        x = x.reshape(-1)
        threshold, cut = thresholds.trim_threshold(x, math.floor(density_of(name) * x.numel()), scratch=scratches[key])
        lambdas[name] = _fused.shrink_threshold(threshold, _compute_of(x.dtype))
        if cut is not None:
            cuts[name] = (cut, _fused.floor_threshold(threshold, _compute_of(x.dtype)))

    sizes = [x.numel() for x, *_ in jobs]
    # On the CPU the selection is numpy calls, which release the GIL, and the tie scans Numba's:
    # several threads. (The torch tie scan from several threads starts an OpenMP team in each and
    # made a bfloat16 TIES file merge 40% slower.)
    if all(x.device.type == "cpu" for x, *_ in jobs) and _numba.enabled():
        _parallel.run(sizes, select, split=False)
    else:
        for job, size in enumerate(sizes):
            select(job, 0, size)
    return [_fused.Trimmed(*plan) for plan in plans]


def _global_trim_plan(vector: TaskVector, density: float) -> _fused.Trimmed:
    names = list(vector._layout.slots)
    tensors = {n: vector[n] for n in names}
    # Global scope: one selection over every entry, in storage order (the threshold does not depend
    # on the order; only which ties are kept does, and that follows the sorted names below).
    wide = torch.float64 if torch.float64 in vector.dtypes else torch.float32
    if len(vector._buffers) == 1:  # storage order (the names' order for every packed vector)
        order = sorted(((n, s.offset) for n, s in vector._layout.slots.items()), key=lambda p: p[1])
    else:
        starts = [0]
        for n in names[:-1]:
            starts.append(starts[-1] + tensors[n].numel())
        order = list(zip(names, starts))
    total = vector.numel()
    k = math.floor(density * total)
    found = None
    if vector.device.type == "cpu" and vector.dtypes.keys() == {torch.float32}:
        found = thresholds.bracket_select([tensors[n].reshape(-1) for n, _ in order], k)
    if found is not None:
        threshold, excess = found
    else:
        # Magnitudes go into a reused buffer and are reordered in place by the selection: no copies.
        magnitudes = _flat.allocate(total, wide, vector.device)
        buffer = next(iter(vector._buffers.values()))
        if len(vector._buffers) == 1 and buffer.dtype == wide:
            torch.abs(buffer, out=magnitudes)
        else:
            for name, start in order:
                flat = tensors[name].reshape(-1)
                magnitudes[start:start + flat.numel()].copy_(flat).abs_()
        threshold, excess = thresholds.select_magnitudes(magnitudes, k)
        _flat.release({wide: magnitudes})
        del magnitudes
    lambdas = {name: _fused.shrink_threshold(threshold, _compute_of(tensors[name].dtype)) for name in names}
    cuts = {}
    if excess and threshold != 0:  # more entries tie at the threshold than k allows: drop the last ones
        by_name = sorted(names)
        part, index = thresholds.tie_cut([tensors[n].reshape(-1) for n in by_name], threshold, excess)
        for j, name in enumerate(by_name[part:], part):
            cuts[name] = (index if j == part else 0, _fused.floor_threshold(threshold, _compute_of(tensors[name].dtype)))
    return _fused.Trimmed(tensors, lambdas, cuts, source=vector)


# Tensor-scope trims of float32 tensors smaller than this, when a vector holds at least _MANY_SMALL of
# them (LoRA factors: thousands of [16, d] matrices), are selected together on the CPU: equal-sized
# tensors stacked as the rows of one matrix and partitioned in one numpy call, since the fixed cost
# of a selection per tensor outweighs the work.
_SMALL_TENSOR = 1 << 16
_MANY_SMALL = 64


def _selected_together(vector: TaskVector, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The tensors whose tensor-scope thresholds are found together: on an accelerator every tensor of
    a float32 vector, by one segmented sort (900 selections, each synchronising, cost more than the
    merge); on the CPU the small float32 ones, when there are many."""
    if vector.device.type != "cpu":
        return list(tensors) if vector.dtypes.keys() == {torch.float32} else []
    small = [n for n, t in tensors.items() if t.dtype == torch.float32 and t.numel() < _SMALL_TENSOR]
    return small if len(small) >= _MANY_SMALL else []


def _segment_trims(vector: TaskVector, tensors: dict[str, torch.Tensor], group: list[str],
                   density_of: Callable[[str], float], lambdas: dict, cuts: dict, *, segmented: bool) -> None:
    """Tensor-scope trims of the float32 tensors ``group``, their thresholds found together: by one
    segmented sort (``segmented``, for accelerators) or, on the CPU, equal-sized tensors as rows."""
    found: dict[str, tuple[float, int]] = {}
    group = [name for name in group if density_of(name) < 1]  # the others stay whole
    if not group:
        return
    if not segmented:
        by_size: dict[tuple[int, int], list[str]] = {}
        for name in group:
            size = tensors[name].numel()
            by_size.setdefault((size, math.floor(density_of(name) * size)), []).append(name)
        for (_, k), names in by_size.items():
            rows = torch.stack([tensors[n].reshape(-1) for n in names])
            found.update(zip(names, thresholds.row_thresholds(rows, k)))
    else:
        if len(group) == len(vector._layout.slots) and len(vector._buffers) == 1:  # the buffer, in offset order
            group = sorted(group, key=lambda n: vector._layout.slots[n].offset)
            flat = vector._buffers[torch.float32]
        else:
            flat = torch.cat([tensors[n].reshape(-1) for n in group])
        thresholds.check_no_nan(flat)  # the sort does not refuse NaN itself
        sizes = [tensors[n].numel() for n in group]
        found.update(zip(group, thresholds.segment_thresholds(flat, sizes, [math.floor(density_of(n) * size)
                                                                             for n, size in zip(group, sizes)])))
    for name in group:
        threshold, excess = found[name]
        if excess and threshold != 0:  # ties past k: find where the dropped ones begin
            _, cut = thresholds.tie_cut([tensors[name].reshape(-1)], threshold, excess)
            cuts[name] = (cut, _fused.floor_threshold(threshold, torch.float32))
        lambdas[name] = _fused.shrink_threshold(threshold, torch.float32)


def _compute_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
