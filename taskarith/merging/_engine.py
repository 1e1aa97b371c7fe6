"""The merge engine: validate, plan, and call a method on blocks; :func:`merge` is its in-memory driver.

Both drivers — :func:`merge` here and :func:`taskarith.merge_files` out of core — validate the
same way, trim with the same plan, gather a method's statistic over the same fixed chunks and
call the method through :func:`call`, which applies the NaN policy. So they agree bit for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from .. import _extract
from ..errors import NonFiniteError, TaskArithError
from ..vector import TaskVector, _Info
from ._checks import (
    any_nan,
    check_scalars,
    compute_dtype,
    compute_dtypes,
    raise_nan,
    refuse_nan,
    validate_vectors,
    validate_weights,
)
from ._registry import at_tensor, check_every_tensor, lookup
from ._spec import Block, Method, promote
from ._trim import trim_plans
from ._varying import resolve, varies

STAT_CHUNK = 1 << 20  # entries per chunk a statistic sees: fixed, so both drivers sum the same partials


def merge(
    vectors: Sequence[TaskVector],
    method: str = "ties",
    *,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
    **options,
) -> TaskVector:
    """Merge task vectors with a registered method.

    Args:
        vectors: task vectors with the same names and shapes.
        method: a name from :func:`methods` (``"task_arithmetic"``, ``"ties"``, ``"dare"``, ...).
        weights: one multiplier per vector (default 1.0 each).
        dtype: dtype of the result (default: each tensor's input dtype).
        base: the pretrained state dict, for methods that read it (``needs_base``).
        **options: the method's options; see ``docs/merging.md``.

    Example:
        >>> import torch, taskarith as ta
        >>> a = ta.TaskVector({"w": torch.tensor([1.0, -2.0, 0.5])})
        >>> b = ta.TaskVector({"w": torch.tensor([3.0, 1.0, -0.1])})
        >>> ta.merge([a, b], "ties", density=2 / 3)["w"]  # trim to 2 of 3, elect, disjoint mean
        tensor([ 2., -2.,  0.])
    """
    return _merge(vectors, method, weights, dtype, base, options, by_tensor=False)


def merge_by_tensor(vectors, method="ties", *, weights=None, dtype=None, base=None, **options) -> TaskVector:
    """:func:`merge` calling the method tensor by tensor even where it has a whole-vector form
    (what the conformance tests hold the whole-vector forms to)."""
    return _merge(vectors, method, weights, dtype, base, options, by_tensor=True)


def _merge(vectors, method, weights, dtype, base, options, *, by_tensor: bool) -> TaskVector:
    spec, resolved = lookup(method, options)
    vectors = validate_vectors(vectors, method)
    weights = validate_weights(weights, len(vectors))
    check_scalars(spec, resolved, weights, {d for v in vectors for d in compute_dtypes(v)})
    _extract.check_float_dtype(dtype)
    base = _check_base(spec, base, vectors[0])
    # What the inputs know of their origin (the base fingerprint they share, if they all do): set
    # here, once, on whatever the method returns.
    info = functools.reduce(_Info.combine, (v._info for v in vectors))
    vectors = _common_ties(vectors)
    first = vectors[0]
    # Slot dtypes, not tensor views: with thousands of small tensors, per-name views cost more
    # than the merge itself. Inputs of one layout keep its dtypes: no per-name work at all.
    same_layout = dtype is None and all(v._layout == first._layout for v in vectors[1:])
    if same_layout:
        out_dtypes = {n: s.dtype for n, s in first._layout.slots.items()}
    else:
        out_dtypes = {n: dtype or promote([v._layout.slot(n).dtype for v in vectors]) for n in first._layout.slots}
    varying = per_tensor(spec, resolved, weights, list(first._layout.slots))  # refusals do not depend on the path
    fast = spec.fast is not None and not by_tensor and not varying
    compute = vectors if fast and spec.fast_widens else [v.to(dtype=compute_dtype(v)) for v in vectors]
    if fast:
        merged = _run_fast(spec, compute, weights, resolved)
    else:
        merged = _run_by_tensor(spec, compute, weights, resolved, base)
    fresh = isinstance(merged, TaskVector) and all(merged is not v for v in [*vectors, *compute])
    if not (fresh and merged._layout == first._layout and (same_layout or all(
        merged._layout.slots[n].dtype == out_dtypes[n] for n in first._layout.slots
    ))):  # else already packed in the right layout: skip a copy
        result = {n: merged[n].to(out_dtypes[n]) for n in first._layout.slots}
        merged = TaskVector({n: result[first._layout.canonical(n)] for n in first._layout.names})
    merged._info = info  # ours alone: fresh, or just built
    return merged


def per_tensor(spec: Method, options: Mapping, weights: Sequence, names: Sequence[str]) -> bool:
    """Whether some option or weight varies by tensor; refused where the method decides over the whole
    model (a statistic, a plan, a global trim), else checked for each of ``names`` before any work.
    A tensor-scope trim may take a density per tensor."""
    varying = any(varies(v) for v in options.values()) or varies(tuple(weights))
    if varying and (spec.statistic is not None or spec.plan is not None):
        raise TaskArithError(f"merge method {spec.name!r} decides over the whole model (statistic or plan): "
                             "its options and weights cannot vary by tensor; give one value each")
    if spec.trim and varies(options["scope"]):
        raise TaskArithError(f"merge method {spec.name!r}: scope cannot vary by tensor; give 'tensor' or 'global'")
    if spec.trim and options["scope"] == "global" and varies(options["density"]):
        raise TaskArithError(f"merge method {spec.name!r} with scope='global' keeps one fraction of the whole "
                             "model: its density cannot vary by tensor. Give one density, or scope='tensor' "
                             "to trim each tensor to its own density")
    if varying:
        check_every_tensor(spec, options, weights, names)
    return varying


def trim_density(options: Mapping, names: Sequence[str]) -> float | dict[str, float]:
    """The trim's density: one value, or one per tensor (a tensor-scope trim whose density varies,
    checked by :func:`per_tensor`)."""
    density = options["density"]
    return {name: resolve(density, name) for name in names} if varies(density) else density


def _run_fast(spec: Method, vectors: list[TaskVector], weights: list[float], options: dict):
    """The method's whole-vector form under the NaN policy (see :func:`call`)."""
    if not spec.propagates_nan or vectors[0].device.type != "cpu":
        refuse_nan(vectors, spec.name)
        return _fast(spec, vectors, weights, options)[0]
    try:
        merged, nan = _fast(spec, vectors, weights, options)
    except NonFiniteError:  # a trim's selection met a NaN: say where it is
        refuse_nan(vectors, spec.name)
        raise
    if nan is None:
        nan = any_nan(merged._buffers.values() if isinstance(merged, TaskVector) else merged.values())
    if nan:
        refuse_nan(vectors, spec.name)
    return merged


def _fast(spec: Method, vectors: list[TaskVector], weights: list[float], options: dict) -> tuple[object, bool | None]:
    """``spec.fast``'s result and whether it holds a NaN (None: unknown, the result must be scanned)."""
    result = spec.fast(vectors, weights, **options)
    return result if spec.fast_checks_nan else (result, None)


def _run_by_tensor(spec: Method, vectors: list[TaskVector], weights: list[float], options: dict,
                   base: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    names = list(vectors[0]._layout.slots)
    if spec.trim:
        try:
            plans = trim_plans(vectors, trim_density(options, names), options["scope"])
        except NonFiniteError:
            refuse_nan(vectors, spec.name)
            raise
        deltas_of = lambda name: [p.trimmed(name) for p in plans]
    else:
        deltas_of = lambda name: [v[name] for v in vectors]
    base_of = (lambda name: base[name].to(vectors[0].device)) if base is not None else (lambda name: None)
    if spec.inputs == "weights":
        return {name: _on_weights(spec, name, deltas_of(name), weights, options, base_of(name)) for name in names}
    stats = None
    if spec.plan is not None:
        stats = plan(spec, names, lambda name: tuple(vectors[0]._layout.slots[name].shape),
                     lambda name: [v[name] for v in vectors], options)
    if spec.statistic is not None:
        stats = statistic(spec, names, lambda name, lo, hi: [v[name].reshape(-1)[lo:hi] for v in vectors],
                          lambda name, lo, hi: None if base is None else base_of(name).reshape(-1)[lo:hi],
                          lambda name: tuple(vectors[0]._layout.slots[name].shape), weights, options)
    return {name: call(spec, name, deltas_of(name), weights, options, base=base_of(name), stats=stats)
            for name in names}


def _on_weights(spec: Method, name: str, deltas: list[torch.Tensor], weights, options, base: torch.Tensor):
    """A method of weights run on task vectors: each model's weights rebuilt as ``base + delta`` in the
    base's dtype (for vectors extracted from half-precision models, the stored weights bit for bit)
    and merged in that dtype, as :func:`taskarith.merge_files` merges the stored weights; the result
    made a delta again."""
    dtype = deltas[0].dtype
    wide = base.to(dtype)
    models = [(wide + d).to(base.dtype) for d in deltas]
    merged = call(spec, name, models, weights, options, base=base if reads_base(spec, options) else None)
    return merged.to(base.dtype).to(dtype) - wide


def reads_base(spec: Method, options: Mapping) -> bool:
    """Whether the method is handed the base: it needs one, or (methods of weights) its ``use_base`` option asks."""
    return spec.needs_base or (spec.inputs == "weights" and bool(options.get("use_base")))


def call(spec: Method, name: str, deltas: Sequence[torch.Tensor], weights: Sequence[float], options: Mapping,
         *, base: torch.Tensor | None = None, shape: tuple[int, ...] | None = None, start: int = 0,
         stats: object = None) -> torch.Tensor:
    """``spec.fn`` on one block under the NaN policy: a NaN in any input raises
    :class:`~taskarith.NonFiniteError` naming the input (position) and tensor.

    Options and weights that vary by tensor (:class:`~taskarith.merging.Varying`) are resolved
    here, for ``name``.

    Inputs are checked first, unless the method propagates NaN and runs on the CPU: then its result
    is (a NaN there sends the check to the inputs, to name them; one made from infinities is IEEE's
    and stays). On accelerators inputs are always checked: a reduction costs little there.
    """
    shape = tuple(deltas[0].shape) if shape is None else shape
    options, weights = at_tensor(spec, options, weights, name)
    block = Block(name, tuple(deltas), tuple(weights), base, shape, start, options.get("seed"), stats)
    if not spec.propagates_nan or deltas[0].device.type != "cpu":
        raise_nan([(i, name) for i, d in enumerate(deltas) if any_nan([d])], spec.name)
        return _checked(spec, block, spec.fn(block, **options))
    result = _checked(spec, block, spec.fn(block, **options))
    if any_nan([result]):
        raise_nan([(i, name) for i, d in enumerate(deltas) if any_nan([d])], spec.name)
    return result


def _checked(spec: Method, block: Block, result: object) -> torch.Tensor:
    like = block.deltas[0]
    if not isinstance(result, torch.Tensor) or tuple(result.shape) != tuple(like.shape) or not result.is_floating_point():
        got = f"a {result.dtype} tensor of shape {tuple(result.shape)}" if isinstance(result, torch.Tensor) else type(result).__name__
        raise TaskArithError(f"merge method {spec.name!r} returned {got} for {block.name!r}; it must return a "
                             f"floating-point tensor of the block's shape {tuple(like.shape)}")
    return result


def plan(spec: Method, names: Sequence[str], shape_of: Callable, deltas: Callable, options: Mapping) -> object:
    """The method's plan, handed the tensors' shapes in sorted name order: the same plan whatever
    order the inputs list them in (a state dict's, a file's). ``deltas(name)``: every input's delta."""
    return spec.plan({name: shape_of(name) for name in sorted(names)}, deltas, **options)


def statistic(spec: Method, names: Sequence[str], deltas: Callable, base: Callable, shape_of: Callable,
              weights: Sequence[float], options: Mapping) -> object:
    """The method's statistic summed over fixed chunks of every tensor, the tensors in sorted name
    order: the same sum whatever order the inputs list them in (a state dict's, a file's).

    ``deltas(name, lo, hi)`` and ``base(name, lo, hi)`` give the flat entries ``[lo, hi)``."""
    acc = None
    for name in sorted(names):
        shape = shape_of(name)
        for lo, hi in chunks(math.prod(shape)):
            block = Block(name, tuple(deltas(name, lo, hi)), tuple(weights), base(name, lo, hi), shape, lo,
                          options.get("seed"))
            part = spec.statistic(block, **options)
            acc = part if acc is None else acc + part
    return acc


def chunks(numel: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, numel, STAT_CHUNK):
        yield lo, min(lo + STAT_CHUNK, numel)


def _check_base(spec: Method, base, first: TaskVector) -> Mapping[str, torch.Tensor] | None:
    if not spec.needs_base and spec.inputs != "weights":
        return None
    if base is None:
        reads = "reads the pretrained weights" if spec.needs_base else "merges weights, rebuilt as base + delta"
        raise TaskArithError(f"merge method {spec.name!r} {reads}: pass base=<state dict> "
                             f"(merge_files and the CLI pass the base model)")
    if isinstance(base, torch.nn.Module):
        base = base.state_dict()
    problems = []
    for name in first._layout.slots:
        want = tuple(first._layout.slots[name].shape)
        if name not in base:
            problems.append(f"{name!r} missing")
        elif tuple(base[name].shape) != want:
            problems.append(f"{name!r}: shape {tuple(base[name].shape)} in base vs {want} in the vectors")
    if problems:
        raise TaskArithError(f"the base given to {spec.name!r} does not match the vectors: " + "; ".join(problems[:20])
                             + ". Pass the pretrained state dict the vectors were extracted from.")
    return base


def _common_ties(vectors: list[TaskVector]) -> list[TaskVector]:
    """Keep the tied names every vector shares; untie (copy) the others so each is merged on its own."""
    shared = {a: c for a, c in vectors[0]._layout.aliases.items() if all(v._layout.aliases.get(a) == c for v in vectors)}
    if all(v._layout.aliases == shared for v in vectors):
        return vectors
    return [
        TaskVector({n: v[n].clone() if n in v._layout.aliases and n not in shared else v[n] for n in v._layout.names})
        for v in vectors
    ]
