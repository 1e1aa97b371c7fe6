"""Merge methods: combine several task vectors into one.

One registry maps a method name to a pure function over task vectors plus the
paper it implements and its validated options. Methods that share an
algorithm share code: TIES and DARE-TIES are a sparsify step followed by the
same sign election and disjoint mean.

Conventions shared by every method:

* ``weights`` (one per vector, default 1) multiply each vector *after* its
  sparsification and *before* sign election (as mergekit does; PEFT elects the
  sign before weighting).
* half-precision deltas are merged in float32 and returned in their own dtype
  unless ``dtype=`` says otherwise.
* every option is validated, and unknown names are listed, before any tensor
  is touched.
* a NaN in any input raises :class:`~taskarith.NonFiniteError` naming the
  vector and tensor (:meth:`Method.run`); infinities follow IEEE arithmetic.
* the result carries the inputs' common base fingerprint.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import _extract, _flat, _fused, _numba, _parallel, kernels
from .errors import NonFiniteError, TaskArithError, raise_if_any
from .vector import TaskVector, _checked_scalar, _Info

__all__ = ["Method", "Option", "merge", "methods", "register", "trim"]

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Option:
    """One keyword option of a method: default, check and a phrase describing valid values."""

    default: object
    check: Callable[[object], bool]
    valid: str
    required: bool = False
    multiplies: bool = False  # the value multiplies deltas: refused where it overflows the merge's dtype


@dataclass(frozen=True)
class Method:
    """A registered merge method."""

    name: str
    fn: Callable[..., Mapping[str, torch.Tensor]]
    paper: str
    options: Mapping[str, Option] = field(default_factory=dict)
    randomized: bool = False
    # How out-of-core merging may split the work: ``trims`` methods start with a magnitude trim
    # driven by their ``density``/``scope`` options (done by streaming selection instead), and
    # ``elementwise`` methods treat entries independently after that, so tensors can be chunked.
    trims: bool = False
    elementwise: bool = False
    # Every NaN of an input reaches the result (or makes ``fn`` raise NonFiniteError itself): the
    # NaN policy then checks the result, smaller than the inputs, instead of the inputs.
    propagates_nan: bool = False

    @property
    def doc(self) -> str:
        return self.fn.__doc__ or ""

    def run(self, vectors: Sequence[TaskVector], weights: Sequence[float], **options) -> Mapping[str, torch.Tensor]:
        """``fn(vectors, weights, **options)`` under the NaN policy: a NaN in any input raises
        :class:`~taskarith.NonFiniteError` naming its vector (position) and tensor.

        The inputs are checked first, unless the method propagates NaN and runs on the CPU: then
        its result is (a NaN there sends the check to the inputs, to name them; one made from
        infinities is IEEE's and stays). On accelerators the inputs are always checked: a
        reduction costs little there, and the Triton TIES kernel zeroes NaN where the CPU keeps it.
        """
        if not self.propagates_nan or vectors[0].device.type != "cpu":
            refuse_nan(vectors, self.name)
            return self.fn(vectors, weights, **options)
        try:
            merged = self.fn(vectors, weights, **options)
        except NonFiniteError:  # a trim's selection met a NaN: say where it is
            refuse_nan(vectors, self.name)
            raise
        if _any_nan(merged._buffers.values() if isinstance(merged, TaskVector) else merged.values()):
            refuse_nan(vectors, self.name)
        return merged


_REGISTRY: dict[str, Method] = {}


def register(name: str, fn: Callable[..., Mapping[str, torch.Tensor]], *, paper: str,
             options: Mapping[str, Option] | None = None, randomized: bool = False,
             trims: bool = False, elementwise: bool = False, propagates_nan: bool = False) -> Method:
    """Add a merge method. ``fn(vectors, weights, **options)`` returns ``name -> merged delta``.

    ``vectors`` arrive validated (same names and shapes) in their compute dtype,
    NaN-free unless ``propagates_nan`` (see :meth:`Method.run`); ``weights`` is a
    list of finite floats. Registering an existing name raises.

    Example:
        >>> import torch, taskarith as ta
        >>> def first(vectors, weights):
        ...     "Keep the first vector."
        ...     return vectors[0]
        >>> m = ta.merging.register("first_demo", first, paper="n/a")
        >>> a, b = ta.TaskVector({"w": torch.ones(2)}), ta.TaskVector({"w": torch.zeros(2)})
        >>> ta.merge([a, b], "first_demo")["w"]
        tensor([1., 1.])
        >>> ta.merging.unregister("first_demo")
    """
    if name in _REGISTRY:
        raise TaskArithError(f"a merge method named {name!r} is already registered")
    if trims and not {"density", "scope"} <= set(options or {}):
        raise TaskArithError(f"method {name!r} declares trims=True but has no 'density' and 'scope' options")
    method = Method(name, fn, paper, dict(options or {}), randomized, trims, elementwise, propagates_nan)
    _REGISTRY[name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method added with :func:`register`."""
    _REGISTRY.pop(name, None)


def methods() -> dict[str, Method]:
    """The registered merge methods by name (each with its paper, options and docstring).

    Example:
        >>> import taskarith as ta
        >>> "ties" in ta.methods()
        True
    """
    return dict(_REGISTRY)


def merge(
    vectors: Sequence[TaskVector],
    method: str = "ties",
    *,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    **options,
) -> TaskVector:
    """Merge task vectors with a registered method.

    Args:
        vectors: task vectors with the same names and shapes.
        method: a name from :func:`methods` (``"task_arithmetic"``, ``"ties"``, ``"dare"``, ...).
        weights: one multiplier per vector (default 1.0 each).
        dtype: dtype of the result (default: each tensor's input dtype).
        **options: the method's options; see ``docs/merging.md``.

    Example:
        >>> import torch, taskarith as ta
        >>> a = ta.TaskVector({"w": torch.tensor([1.0, -2.0, 0.5])})
        >>> b = ta.TaskVector({"w": torch.tensor([3.0, 1.0, -0.1])})
        >>> ta.merge([a, b], "ties", density=2 / 3)["w"]  # trim to 2 of 3, elect, disjoint mean
        tensor([ 2., -2.,  0.])
    """
    spec, resolved = lookup(method, options)
    vectors = _validate_vectors(vectors, method)
    weights = _validate_weights(weights, len(vectors))
    check_scalars(spec, resolved, weights, {d for v in vectors for d in _compute_dtypes(v)})
    _extract.check_float_dtype(dtype)
    # What the inputs know of their origin (the base fingerprint they share, if they all do): set
    # here, once, on whatever the method returns.
    info = functools.reduce(_Info.combine, (v._info for v in vectors))
    vectors = _common_ties(vectors)
    first = vectors[0]
    # Slot dtypes, not tensor views: with thousands of small tensors, per-name views cost more
    # than the merge itself.
    out_dtypes = {n: dtype or promote(v._layout.slot(n).dtype for v in vectors) for n in first._layout.slots}
    compute = [v.to(dtype=_compute_dtype(v)) for v in vectors]
    merged = spec.run(compute, weights, **resolved)
    fresh = isinstance(merged, TaskVector) and all(merged is not v for v in [*vectors, *compute])
    if not (fresh and merged._layout == first._layout and all(
        merged._layout.slots[n].dtype == out_dtypes[n] for n in first._layout.slots
    )):  # else already packed in the right layout: skip a copy
        result = {n: merged[n].to(out_dtypes[n]) for n in first._layout.slots}
        merged = TaskVector({n: result[first._layout.canonical(n)] for n in first._layout.names})
    merged._info = info  # ours alone: fresh, or just built
    return merged


def _common_ties(vectors: list[TaskVector]) -> list[TaskVector]:
    """Keep the tied names every vector shares; untie (copy) the others so each is merged on its own."""
    shared = {a: c for a, c in vectors[0]._layout.aliases.items() if all(v._layout.aliases.get(a) == c for v in vectors)}
    if all(v._layout.aliases == shared for v in vectors):
        return vectors
    return [
        TaskVector({n: v[n].clone() if n in v._layout.aliases and n not in shared else v[n] for n in v._layout.names})
        for v in vectors
    ]


# ----------------------------------------------------------------- validation


def lookup(method: str, options: Mapping[str, object]) -> tuple[Method, dict[str, object]]:
    """The registered method and its validated options (defaults filled in)."""
    spec = _REGISTRY.get(method) if isinstance(method, str) else None
    if spec is None:
        raise TaskArithError(f"unknown merge method {method!r}; valid: {', '.join(sorted(_REGISTRY))}")
    return spec, _resolve_options(spec, options)


def _resolve_options(spec: Method, options: Mapping[str, object]) -> dict[str, object]:
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(f"{k} ({o.valid})" for k, o in spec.options.items()) or "none"
        raise TaskArithError(f"unknown option(s) {unknown} for merge method {spec.name!r}; valid options: {valid}")
    resolved, problems = {}, []
    for key, opt in spec.options.items():
        if key not in options:
            if opt.required:
                problems.append(f"{key} is required ({opt.valid})")
                continue
            resolved[key] = opt.default
            continue
        value = options[key]
        try:
            ok = opt.check(value)
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            problems.append(f"{key}={value!r:.60} is invalid: expected {opt.valid}")
        resolved[key] = value
    raise_if_any(problems, error=TaskArithError, header=f"bad options for merge method {spec.name!r}",
                 fix=f"See taskarith.methods()[{spec.name!r}] or docs/merging.md.")
    return resolved


def _validate_vectors(vectors, method: str) -> list[TaskVector]:
    vectors = list(vectors)
    if not vectors:
        raise TaskArithError(f"merge({method!r}) needs at least one task vector")
    bad = [f"#{i} ({type(v).__name__})" for i, v in enumerate(vectors) if not isinstance(v, TaskVector)]
    raise_if_any(bad, error=TaskArithError, header="merge takes TaskVector inputs",
                 fix="Build them with TaskVector.from_models(...) or TaskVector(mapping).")
    for v in vectors[1:]:
        vectors[0]._check_compatible(v, f"merge({method!r})")
    return vectors


def _validate_weights(weights, n: int) -> list[float]:
    """One finite float per vector (1.0 each by default)."""
    if weights is None:
        return [1.0] * n
    weights = [float(_checked_scalar(w, f"weights[{i}]", ())) for i, w in enumerate(weights)]
    if len(weights) != n:
        raise TaskArithError(f"got {len(weights)} weights for {n} vectors; pass one weight per vector")
    return weights


def check_scalars(spec: Method, options: Mapping[str, object], weights: Sequence[float], dtypes) -> None:
    """Refuse weights and multiplying options (``scale``, ``lambda_``) that overflow ``dtypes``, the
    dtypes the merge computes in (float32 for half-precision deltas): cast there they would be inf."""
    for i, w in enumerate(weights):
        _checked_scalar(w, f"weights[{i}]", dtypes)
    for key, opt in spec.options.items():
        if opt.multiplies and options.get(key) is not None:
            _checked_scalar(options[key], key, dtypes)


def refuse_nan(vectors: Sequence[TaskVector], method: str) -> None:
    """Raise :class:`~taskarith.NonFiniteError` naming each vector (position) and tensor of ``vectors``
    holding a NaN; return if none does."""
    raise_nan([(i, name) for i, v in enumerate(vectors) if _any_nan(v._buffers.values())
               for name in v._layout.slots if _any_nan([v[name]])], method)


def raise_nan(found: Sequence[tuple[int, str]], method: str) -> None:
    """Raise :class:`~taskarith.NonFiniteError` naming each (vector position, tensor) of ``found``, the
    NaN-holding inputs of a merge (in memory or out of core); return if there are none."""
    raise_if_any([f"vector #{i} {name!r}" for i, name in found], error=NonFiniteError,
                 header=f"NaN in the task vectors merged by {method!r}",
                 fix="A merge refuses NaN deltas: find where they come from (TaskVector.from_models(..., "
                     "check_finite=True) names them) or leave that vector out.")


def _any_nan(tensors) -> bool:
    # amax propagates NaN: one read-only pass, no temporary (isnan().any() wrote a mask and ran 10x slower).
    return any(t.numel() and math.isnan(float(t.amax())) for t in tensors)


def promote(dtypes) -> torch.dtype:
    """The dtype torch promotes a mix of ``dtypes`` to."""
    dtypes = list(dtypes)
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _compute_dtype(v: TaskVector) -> torch.dtype | None:
    if any(dt in _HALF for dt in v.dtypes):
        return torch.float32 if torch.float64 not in v.dtypes else torch.float64
    return None


def _compute_dtypes(v: TaskVector) -> list[torch.dtype]:
    """The dtypes ``v`` is merged in."""
    compute = _compute_dtype(v)
    return [compute] if compute is not None else list(v.dtypes)


def _fraction(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[object], bool]:
    def check(x):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return False
        return (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)
    return check


def _finite(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


SCALE = Option(1.0, _finite, "a finite number", multiplies=True)
DENSITY = Option(0.2, _fraction(0.0, 1.0, lo_open=True), "a number in (0, 1]")
SCOPE = Option("global", lambda x: x in ("global", "tensor"), "'global' or 'tensor'")
SIGN = Option("sum", lambda x: x in ("sum", "count"), "'sum' or 'count'")
DROP = Option(0.9, _fraction(0.0, 1.0, hi_open=True), "a number in [0, 1)")
SEED = Option(None, _integer, "an int", required=True)


# -------------------------------------------------------------------- steps


def trim(vector: TaskVector, density: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep exactly ``floor(density * n)`` largest-magnitude entries, zero the rest.

    ``n`` is each tensor's size (``scope="tensor"``) or the whole vector's
    (``scope="global"``). Ties at the threshold keep the earliest entries in the
    vector's storage order.
    """
    plan = _trim_plan(vector, density, scope)
    return {name: plan.trimmed(name) for name in plan.tensors}


def _trim_plan(vector: TaskVector, density: float, scope: str) -> _fused.Trimmed:
    """How to trim ``vector``: per tensor, a ``hardshrink`` threshold and, where ties at the
    threshold must lose some entries, the index from which they are dropped."""
    return _trim_plans([vector], density, scope)[0]


def _trim_plans(vectors: list[TaskVector], density: float, scope: str) -> list[_fused.Trimmed]:
    """:func:`_trim_plan` of each vector; tensor-scope selections of all of them share the threads."""
    if density >= 1:
        return [_fused.Trimmed({n: v[n] for n in v._layout.slots}, source=v) for v in vectors]
    if scope != "tensor":
        return [_global_trim_plan(v, density) for v in vectors]
    plans, jobs = [], []
    for vector in vectors:
        tensors = {n: vector[n] for n in vector._layout.slots}
        lambdas, cuts = {}, {}
        grouped = _selected_together(vector, tensors)
        if grouped:
            _segment_trims(vector, tensors, grouped, density, lambdas, cuts)
        together = set(grouped)
        jobs += [(tensors[n], lambdas, cuts, n) for n in tensors if n not in together]
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
        threshold, cut = kernels.trim_threshold(x, math.floor(density * x.numel()), scratch=scratches[key])
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
    # Global scope: one selection over every entry, in the vector's name order (which is also the
    # order streaming merges see), so ties at the threshold resolve identically in and out of core.
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
        found = kernels.bracket_select([tensors[n].reshape(-1) for n, _ in order], k)
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
        threshold, excess = kernels.select_magnitudes(magnitudes, k)
        _flat.release({wide: magnitudes})
        del magnitudes
    lambdas = {name: _fused.shrink_threshold(threshold, _compute_of(tensors[name].dtype)) for name in names}
    cuts = {}
    if excess and threshold != 0:  # more entries tie at the threshold than k allows: drop the last ones
        part, index = kernels.tie_cut([tensors[n].reshape(-1) for n, _ in order], threshold, excess)
        for j, (name, _) in enumerate(order[part:], part):
            cuts[name] = (index if j == part else 0, _fused.floor_threshold(threshold, _compute_of(tensors[name].dtype)))
    return _fused.Trimmed(tensors, lambdas, cuts, source=vector)


# Tensor-scope trims of float32 tensors smaller than this, when a vector holds at least _MANY_SMALL of
# them (LoRA factors: thousands of [16, d] matrices), are selected together on the CPU: equal-sized
# tensors stacked as the rows of one matrix and partitioned in one numpy call. On 10M entries in 2,094
# tensors a selection per tensor cost ~70 us each, 0.45 s for three vectors.
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


def _segment_trims(vector: TaskVector, tensors: dict[str, torch.Tensor], group: list[str], density: float,
                   lambdas: dict, cuts: dict) -> None:
    """Tensor-scope trims of the float32 tensors ``group``, their thresholds found together."""
    found: dict[str, tuple[float, int]] = {}
    if vector.device.type == "cpu":
        by_size: dict[int, list[str]] = {}
        for name in group:
            by_size.setdefault(tensors[name].numel(), []).append(name)
        for size, names in by_size.items():
            rows = torch.stack([tensors[n].reshape(-1) for n in names])
            found.update(zip(names, kernels.row_thresholds(rows, math.floor(density * size))))
    else:
        if len(group) == len(vector._layout.slots) and len(vector._buffers) == 1:  # the buffer, in offset order
            group = sorted(group, key=lambda n: vector._layout.slots[n].offset)
            flat = vector._buffers[torch.float32]
        else:
            flat = torch.cat([tensors[n].reshape(-1) for n in group])
        kernels.check_no_nan(flat)  # the sort does not refuse NaN itself
        sizes = [tensors[n].numel() for n in group]
        found.update(zip(group, kernels.segment_thresholds(flat, sizes, [math.floor(density * n) for n in sizes])))
    for name in group:
        threshold, excess = found[name]
        if excess and threshold != 0:  # ties past k: find where the dropped ones begin
            _, cut = kernels.tie_cut([tensors[name].reshape(-1)], threshold, excess)
            cuts[name] = (cut, _fused.floor_threshold(threshold, torch.float32))
        lambdas[name] = _fused.shrink_threshold(threshold, torch.float32)


def _compute_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weighted(parts: list[dict[str, torch.Tensor]], weights: list[float]) -> list[dict[str, torch.Tensor]]:
    return [p if w == 1.0 else {n: t * w for n, t in p.items()} for p, w in zip(parts, weights)]


def _sum(parts: list[Mapping[str, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    out = {}
    for name in parts[0]:
        total = parts[0][name].to(promote(p[name].dtype for p in parts), copy=True)
        for p in parts[1:]:
            total += p[name]
        out[name] = total.mul_(scale) if scale != 1.0 else total
    return out


def _elect_and_merge(inputs: list[_fused.Trimmed], weights: list[float], sign: str, scale: float) -> TaskVector:
    """Weighting, sign election and disjoint mean in one blocked pass, into one packed result."""
    names = list(inputs[0].tensors)
    # An entry whose delta is wider in one vector (a float64 fallback) is merged at that width.
    dtypes = {n: promote(inp.tensors[n].dtype for inp in inputs) for n in names}
    result = TaskVector._empty({n: inputs[0].tensors[n] for n in names}, dtypes)
    layout = result._layout
    segments = [
        (buffer, sorted(((n, s.offset) for n, s in layout.slots.items() if s.dtype == dtype), key=lambda p: p[1]))
        for dtype, buffer in result._buffers.items()
    ]
    _fused.elect_and_merge(result, inputs, weights, sign, scale, segments)
    return result


def _dare(vectors: list[TaskVector], drop: float, seed: int) -> list[dict[str, torch.Tensor]]:
    keep = 1.0 - drop

    def masks(i: int, v: TaskVector) -> dict[str, torch.Tensor]:
        # Each mask draws from its own CPU generator, a serial stream: drawing several at once on
        # the worker threads (torch releases the GIL) is what makes DARE fast with more than one core.
        names = list(v._layout.slots)
        drawn: list[torch.Tensor | None] = [None] * len(names)

        def draw(job: int, lo: int, hi: int) -> None:
            drawn[job] = kernels.dare_mask(tuple(v._layout.slots[names[job]].shape), keep, seed, i, names[job])

        _parallel.run([v._layout.slots[n].numel for n in names], draw, split=False)
        return dict(zip(names, drawn))

    out = []
    for i, v in enumerate(vectors):
        parts = {}
        for name, mask in masks(i, v).items():
            # Survivors are divided by (1 - p) in the delta's dtype (one rounding, no reciprocal).
            parts[name] = torch.where(mask.to(v.device), v[name] / keep, 0)
        out.append(parts)
    return out


# ------------------------------------------------------------------ methods


def _task_arithmetic(vectors, weights, *, scale):
    """Task arithmetic: ``scale · Σ w_i τ_i``, the weighted sum of the vectors."""
    return TaskVector.sum(vectors, [w * scale for w in weights])


def _mean(vectors, weights):
    """Weighted average ``Σ w_i τ_i / Σ w_i`` (model soup of the fine-tuned models)."""
    total = sum(weights)
    if total == 0:
        raise TaskArithError("the weights of 'mean' sum to zero; a weighted average is undefined")
    return TaskVector.sum(vectors, [w / total for w in weights])


def _magnitude_prune(vectors, weights, *, density, scope):
    """``Σ w_i · trim(τ_i)``: keep exactly ``floor(density·n)`` largest magnitudes of each vector, then sum."""
    return _sum(_weighted([trim(v, density, scope) for v in vectors], weights), 1.0)


def _ties(vectors, weights, *, density, scope, sign, scale):
    """TIES: trim each vector to its top ``density``, weight, elect a sign per entry, average the agreeing entries.

    ``sign="sum"`` elects the sign of Σ trimmed values; ``"count"`` the sign of
    #positive − #negative; a tie goes to +. The disjoint mean averages, per
    entry, the non-zero trimmed values whose sign is the elected one (0 where
    there are none). Result × ``scale``.
    """
    return _elect_and_merge(_trim_plans(vectors, density, scope), weights, sign, scale)


def _dare_linear(vectors, weights, *, drop, seed, scale):
    """DARE: drop each entry with probability ``drop``, rescale survivors by ``1/(1-drop)``, then ``scale · Σ w_i``."""
    return _sum(_weighted(_dare(vectors, drop, seed), weights), scale)


def _dare_ties(vectors, weights, *, drop, seed, sign, scale):
    """DARE-TIES: DARE's drop and rescale in place of TIES' trim, then TIES' election and disjoint mean."""
    return _elect_and_merge([_fused.Trimmed(p) for p in _dare(vectors, drop, seed)], weights, sign, scale)


def _breadcrumbs(vectors, weights, *, density, top, scale):
    """Model Breadcrumbs: per tensor, drop the largest ``top`` fraction and keep the next ``density``, then sum."""
    parts = []
    for v in vectors:
        kept = {}
        for name in v._layout.slots:
            t, n = v[name], v[name].numel()
            k_top = math.floor(top * n)
            k_end = min(n, k_top + math.floor(density * n))
            magnitude = t.abs()
            # Selections are nested (same total order), so this keeps exactly k_end - k_top entries.
            mask = kernels.topk_mask(magnitude, k_end) & ~kernels.topk_mask(magnitude, k_top)
            kept[name] = torch.where(mask, t, 0)  # a dropped entry is 0 (t * mask made inf·0 = NaN)
        parts.append(kept)
    return _sum(_weighted(parts, weights), scale)


def _consensus(vectors, weights, *, k, lambda_, scale):
    """Consensus merging (TALL masks): keep the entries of ``Σ w_i τ_i`` that at least ``k`` tasks deem important.

    Task t deems entry j important when ``|w_t τ_t,j| >= lambda_ · |τ_MTL,j − w_t τ_t,j|``
    with ``τ_MTL = Σ w_i τ_i``.
    """
    weighted = [{n: v[n] * w for n in v._layout.slots} for v, w in zip(vectors, weights)]
    out = {}
    for name in weighted[0]:
        total = sum(p[name] for p in weighted)
        votes = sum(((p[name].abs() >= lambda_ * (total - p[name]).abs()) for p in weighted), torch.zeros_like(total, dtype=torch.int32))
        out[name] = torch.where(votes >= k, total, 0) * scale
    return out


def _tsv(vectors, weights, *, rank_fraction, scale):
    """Task Singular Vectors (TSV-Merge): per 2-D weight, keep each task's top singular vectors,
    decorrelate the concatenated bases, and recombine; other tensors are averaged.

    Each of T tasks keeps ``max(1, floor(rank_fraction · min(m, n)))`` singular
    triplets of ``w_t ΔW_t`` (default fraction ``1/T``); the stacked left and
    right bases are replaced by their closest orthogonal matrices (``P Qᵀ`` of
    their SVDs). Result × ``scale``. The result does not depend on the order of
    the vectors when the stacked bases have full rank (vectors in general
    position); for rank-deficient stacks the orthogonalisation is not unique.
    """
    count = len(vectors)
    fraction = rank_fraction if rank_fraction is not None else 1.0 / count
    out = {}
    for name in vectors[0]._layout.slots:
        tensors = [v[name] * w for v, w in zip(vectors, weights)]
        if tensors[0].dim() != 2 or min(tensors[0].shape) == 0:
            out[name] = sum(tensors) / count * scale
            continue
        r = max(1, math.floor(fraction * min(tensors[0].shape)))
        us, ss, vs = [], [], []
        for i, t in enumerate(tensors):
            _require_finite(t, "tsv", f"vector #{i} {name!r} (times its weight)")
            u, s, vh = torch.linalg.svd(t, full_matrices=False)
            # Directions of (numerically) zero singular values are arbitrary and add nothing to
            # the sum; leaving them out keeps the orthogonalisation well defined.
            keep = s[:r] > s[:1].clamp_min(torch.finfo(s.dtype).tiny) * torch.finfo(s.dtype).eps * max(t.shape)
            us.append(u[:, :r][:, keep]), ss.append(s[:r][keep]), vs.append(vh[:r].T[:, keep])
        u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
        if s_cat.numel() == 0:
            out[name] = torch.zeros_like(tensors[0])
            continue
        u_orth = _closest_orthogonal(u_cat)
        v_orth = _closest_orthogonal(v_cat)
        out[name] = (u_orth * s_cat) @ v_orth.T * scale
    return out


def _require_finite(matrix: torch.Tensor, method: str, what: str) -> None:
    """An SVD needs finite values: refuse inf (NaN inputs were refused before the method ran)."""
    if not bool(torch.isfinite(matrix).all()):
        raise NonFiniteError(f"{method} takes the SVD of {what}, which is not finite (an infinite delta, or a "
                             f"value beyond the dtype's range): SVD needs finite values. Leave that vector out, or "
                             f"lower its weight.")


def _closest_orthogonal(m: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def _iso_c(vectors, weights, *, scale):
    """Iso-C: per 2-D weight, the SVD of ``Σ w_i ΔW_i`` with every singular value replaced by their mean;
    other tensors are summed (task arithmetic). Result × ``scale``.
    """
    out = {}
    for name in vectors[0]._layout.slots:
        total = sum(v[name] * w for v, w in zip(vectors, weights))
        if total.dim() == 2 and min(total.shape) > 0:
            _require_finite(total, "iso_c", f"the weighted sum of {name!r}")
            u, s, vh = torch.linalg.svd(total, full_matrices=False)
            total = s.mean() * (u @ vh)
        out[name] = total * scale
    return out


# NaN: the linear methods carry a NaN input to the result (0 · NaN is NaN); so do the trims, whose
# selection refuses NaN (NonFiniteError) and whose hardshrink and CPU election keep it. DARE's drop,
# breadcrumbs' and consensus' masks hide NaN, and SVDs fail on it: those have their inputs checked.
register("task_arithmetic", _task_arithmetic, paper="https://arxiv.org/abs/2212.04089", options={"scale": SCALE},
         elementwise=True, propagates_nan=True)
register("mean", _mean, paper="https://arxiv.org/abs/2203.05482", elementwise=True, propagates_nan=True)
register("magnitude_prune", _magnitude_prune, paper="https://arxiv.org/abs/2306.01708",
         options={"density": DENSITY, "scope": SCOPE}, trims=True, elementwise=True, propagates_nan=True)
register("ties", _ties, paper="https://arxiv.org/abs/2306.01708",
         options={"density": DENSITY, "scope": SCOPE, "sign": SIGN, "scale": SCALE}, trims=True, elementwise=True,
         propagates_nan=True)
register("dare", _dare_linear, paper="https://arxiv.org/abs/2311.03099", randomized=True,
         options={"drop": DROP, "seed": SEED, "scale": SCALE}, elementwise=True)
register("dare_ties", _dare_ties, paper="https://arxiv.org/abs/2311.03099", randomized=True,
         options={"drop": DROP, "seed": SEED, "sign": SIGN, "scale": SCALE}, elementwise=True)
register("breadcrumbs", _breadcrumbs, paper="https://arxiv.org/abs/2312.06795",
         options={"density": Option(0.9, _fraction(0.0, 1.0, lo_open=True), "a number in (0, 1]"),
                  "top": Option(0.01, _fraction(0.0, 1.0, hi_open=True), "a number in [0, 1)"), "scale": SCALE})
register("consensus", _consensus, paper="https://arxiv.org/abs/2405.07813",
         options={"k": Option(2, lambda x: _integer(x) and x >= 1, "an int >= 1"),
                  "lambda_": Option(0.5, lambda x: _finite(x) and x >= 0, "a finite number >= 0", multiplies=True),
                  "scale": SCALE},
         elementwise=True)
register("tsv", _tsv, paper="https://arxiv.org/abs/2412.00081",
         options={"rank_fraction": Option(None, lambda x: x is None or _fraction(0.0, 1.0, lo_open=True)(x), "None (1/#tasks) or a number in (0, 1]"),
                  "scale": SCALE})
register("iso_c", _iso_c, paper="https://arxiv.org/abs/2502.04959", options={"scale": SCALE})
