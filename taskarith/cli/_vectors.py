"""``taskarith extract`` (a model pair -> a task vector) and ``taskarith apply`` (task vectors -> a model)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import _extract
from ..errors import TaskArithError
from ..io import load_state_dict
from ..vector import TaskVector, _checked_scalar
from ._output import check_output, log, safetensors_output, save_model
from ._plan import DTYPES

__all__ = ["apply", "apply_scales", "extract"]


def extract(args, parser) -> None:
    out = safetensors_output(parser, args)
    check_output(args, args.base, args.finetuned, folder=False)
    tv = TaskVector.from_models(args.base, args.finetuned, dtype=DTYPES.get(args.dtype),
                                check_finite=args.check_finite, allow_pickle=args.allow_pickle)
    tv.save(out, overwrite=True)  # checked above
    log(f"wrote {out} ({len(tv)} tensors, {tv.numel():,} entries, norm {tv.norm():.6g})")


def apply(args, parser) -> None:
    pairs = apply_scales(args.vectors, args.scale)
    missing = [p for p, _ in pairs if not Path(p).is_file()]
    if missing:
        raise TaskArithError(f"no such vector file(s): {', '.join(map(repr, missing))}")
    check_output(args, args.base, *(p for p, _ in pairs), folder=Path(args.output).suffix != ".safetensors")
    vectors = [TaskVector.load(p) for p, _ in pairs]
    for (path, scale), vector in zip(pairs, vectors):
        _checked_scalar(scale, f"the scale of {path!r}", list(vector.dtypes))
    total = TaskVector.sum(vectors, [s for _, s in pairs]) if len(vectors) > 1 or pairs[0][1] != 1.0 else vectors[0]
    state = load_state_dict(args.base)
    edited = total.apply_to(state, strict=not args.partial, on_base_mismatch=args.on_base_mismatch)
    if args.dtype:
        edited = _rounded_once(state, total, edited, DTYPES[args.dtype])
    written = save_model(edited, args.output, like=args.base, shard_size=args.shard_size)
    log(f"wrote {written} (base + {' + '.join(f'{s:g}·{Path(p).name}' for p, s in pairs)})")


def _rounded_once(state, total: TaskVector, edited: dict, dtype: torch.dtype) -> dict:
    """The edited entries recomputed from ``state`` rounded once into ``dtype`` (casting ``edited`` would
    round twice); the entries ``total`` does not touch are kept as they are."""
    return {n: _extract.apply_entry(state[n], total[n], 1.0, torch.empty(t.shape, dtype=dtype))
            if n in total and t.is_floating_point() else t for n, t in edited.items()}


def apply_scales(vectors: Sequence[str], scales: Sequence[float] | None) -> list[tuple[str, float]]:
    """Resolve ``PATH[:λ]`` arguments and ``--scale`` flags to (path, λ) pairs.

    One ``--scale`` is the default for vectors without their own ``:λ``; one
    ``--scale`` per vector gives the scales in order (no ``:λ`` allowed then).

    Example:
        >>> apply_scales(["a.safetensors:0.3", "b.safetensors"], [0.5])
        [('a.safetensors', 0.3), ('b.safetensors', 0.5)]
        >>> apply_scales(["a.safetensors", "b.safetensors"], [0.1, 0.2])
        [('a.safetensors', 0.1), ('b.safetensors', 0.2)]
    """
    pairs = [_split_scale(v) for v in vectors]
    scales = list(scales or [])
    if len(scales) > 1:
        if len(scales) != len(pairs):
            raise TaskArithError(f"got {len(scales)} --scale values for {len(pairs)} vectors; give one --scale "
                                 "for all, one per vector, or write PATH:SCALE")
        own = [v for v, (_, s) in zip(vectors, pairs) if s is not None]
        if own:
            raise TaskArithError(f"{own[0]!r} carries its own scale and --scale is given per vector; use one form")
        return [(p, s) for (p, _), s in zip(pairs, scales)]
    default = scales[0] if scales else 1.0
    return [(p, default if s is None else s) for p, s in pairs]


def _split_scale(text: str) -> tuple[str, float | None]:
    """``PATH:λ`` -> (PATH, λ); a path that exists as written is never split."""
    path, sep, suffix = text.rpartition(":")
    if not sep or os.path.exists(text):
        return text, None
    try:
        value = float(suffix)
    except ValueError:
        return text, None
    if not math.isfinite(value):
        raise TaskArithError(f"the scale of {text!r} must be finite")
    return path, value
