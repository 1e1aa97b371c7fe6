"""Steps that several methods share: weighting, summing, DARE's drop, TIES' election."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .. import _parallel
from ..backends import _fused, draws
from ..vector import TaskVector
from ._spec import Block, promote


def wrap(block: Block) -> list[TaskVector]:
    """The block's deltas as one-tensor task vectors (for the whole-vector forms of built-ins)."""
    return [TaskVector._wrap(block.name, d) for d in block.deltas]


def weighted(parts: list[dict[str, torch.Tensor]], weights: Sequence[float]) -> list[dict[str, torch.Tensor]]:
    return [p if w == 1.0 else {n: t * w for n, t in p.items()} for p, w in zip(parts, weights)]


def total(parts: list[Mapping[str, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    """``scale · Σ parts`` per name, added in input order."""
    out = {}
    for name in parts[0]:
        acc = parts[0][name].to(promote([p[name].dtype for p in parts]), copy=True)
        for p in parts[1:]:
            acc += p[name]
        out[name] = acc.mul_(scale) if scale != 1.0 else acc
    return out


def elect_and_merge(inputs: list[_fused.Trimmed], weights: Sequence[float], sign: str, scale: float) -> TaskVector:
    """Weighting, sign election and disjoint mean in one blocked pass, into one packed result."""
    names = list(inputs[0].tensors)
    # An entry whose delta is wider in one vector (a float64 fallback) is merged at that width.
    dtypes = {n: promote([inp.tensors[n].dtype for inp in inputs]) for n in names}
    result = TaskVector._empty({n: inputs[0].tensors[n] for n in names}, dtypes)
    layout = result._layout
    segments = [
        (buffer, sorted(((n, s.offset) for n, s in layout.slots.items() if s.dtype == dtype), key=lambda p: p[1]))
        for dtype, buffer in result._buffers.items()
    ]
    _fused.elect_and_merge(result, inputs, weights, sign, scale, segments)
    return result


def dropped(vectors: list[TaskVector], drop: float, seed: int,
            regions: Mapping[str, tuple[int, int]] | None = None) -> list[dict[str, torch.Tensor]]:
    """DARE's drop and rescale of each vector: each entry kept with probability ``1 - drop`` (masks
    keyed by seed, input position and name; ``regions[name] = (start, full)`` places a block in its
    whole tensor), survivors divided by ``1 - drop``."""
    keep = 1.0 - drop
    regions = regions or {}

    def masks(i: int, v: TaskVector) -> dict[str, torch.Tensor]:
        # Each mask draws from its own CPU generator, a serial stream: drawing several at once on
        # the worker threads (torch releases the GIL) is what makes DARE fast with more than one core.
        names = list(v._layout.slots)
        drawn: list[torch.Tensor | None] = [None] * len(names)

        def draw(job: int, lo: int, hi: int) -> None:
            name = names[job]
            start, full = regions.get(name, (0, None))
            drawn[job] = draws.dare_mask(tuple(v._layout.slots[name].shape), keep, seed, i, name,
                                           start=start, full=full)

        _parallel.run([v._layout.slots[n].numel for n in names], draw, split=False)
        return dict(zip(names, drawn))

    out = []
    for i, v in enumerate(vectors):
        # Survivors are divided by (1 - p) in the delta's dtype (one rounding, no reciprocal).
        out.append({name: torch.where(mask.to(v.device), v[name] / keep, 0) for name, mask in masks(i, v).items()})
    return out


def region_of(block: Block) -> dict[str, tuple[int, int]]:
    """Where the block lies in its whole tensor, as :func:`dropped` takes it."""
    return {block.name: (block.start, math.prod(block.shape))}
