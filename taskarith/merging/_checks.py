"""Checks every driver runs before a merge: inputs, weights, scalars, and the NaN policy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .. import _extract
from ..backends.kernels import has_nan
from ..errors import NonFiniteError, TaskArithError, raise_if_any
from ..vector import TaskVector, _checked_scalar
from ._spec import Method
from ._varying import varies


def validate_vectors(vectors, method: str) -> list[TaskVector]:
    vectors = list(vectors)
    if not vectors:
        raise TaskArithError(f"merge({method!r}) needs at least one task vector")
    bad = [f"#{i} ({type(v).__name__})" for i, v in enumerate(vectors) if not isinstance(v, TaskVector)]
    raise_if_any(bad, error=TaskArithError, header="merge takes TaskVector inputs",
                 fix="Build them with TaskVector.from_models(...) or TaskVector(mapping).")
    for v in vectors[1:]:
        vectors[0]._check_compatible(v, f"merge({method!r})")
    return vectors


def validate_weights(weights, n: int) -> list[float]:
    """One finite float per vector (1.0 each by default)."""
    if weights is None:
        return [1.0] * n
    weights = [w if varies(w) else float(_checked_scalar(w, f"weights[{i}]", ())) for i, w in enumerate(weights)]
    if len(weights) != n:
        raise TaskArithError(f"got {len(weights)} weights for {n} vectors; pass one weight per vector")
    return weights


def check_scalars(spec: Method, options: Mapping[str, object], weights: Sequence[float], dtypes) -> None:
    """Refuse weights and multiplying options (``scale``, ``lambda_``) that overflow ``dtypes``, the
    dtypes the merge computes in (float32 for half-precision deltas): cast there they would be inf."""
    for i, w in enumerate(weights):
        if not varies(w):
            _checked_scalar(w, f"weights[{i}]", dtypes)
    for key, opt in spec.options.items():
        if opt.multiplies and options.get(key) is not None and not varies(options[key]):
            _checked_scalar(options[key], key, dtypes)


def refuse_nan(vectors: Sequence[TaskVector], method: str) -> None:
    """Raise :class:`~taskarith.NonFiniteError` naming each vector (position) and tensor of ``vectors``
    holding a NaN; return if none does."""
    raise_nan([(i, name) for i, v in enumerate(vectors) if any_nan(v._buffers.values())
               for name in v._layout.slots if any_nan([v[name]])], method)


def raise_nan(found: Sequence[tuple[int, str]], method: str) -> None:
    """Raise :class:`~taskarith.NonFiniteError` naming each (vector position, tensor) of ``found``, the
    NaN-holding inputs of a merge (in memory or out of core); return if there are none."""
    raise_if_any([f"vector #{i} {name!r}" for i, name in found], error=NonFiniteError,
                 header=f"NaN in the task vectors merged by {method!r}",
                 fix="A merge refuses NaN deltas: find where they come from (TaskVector.from_models(..., "
                     "check_finite=True) names them) or leave that vector out.")


def any_nan(tensors) -> bool:
    return any(has_nan(t) for t in tensors)


def compute_dtype(v: TaskVector) -> torch.dtype | None:
    if any(dt in _extract.HALF for dt in v.dtypes):
        return torch.float32 if torch.float64 not in v.dtypes else torch.float64
    return None


def compute_dtypes(v: TaskVector) -> list[torch.dtype]:
    """The dtypes ``v`` is merged in."""
    compute = compute_dtype(v)
    return [compute] if compute is not None else list(v.dtypes)
