"""TaskVector: an immutable map from parameter names to deltas, with vector algebra."""

from __future__ import annotations

import functools
import itertools
import json
import math
import numbers
import os
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import _extract, _flat, _numba, _triton
from .errors import (
    BaseMismatchError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
    TaskArithError,
    check_same_keys,
    format_names,
    raise_if_any,
)
from .io import PICKLE_SUFFIXES, Source, check_output, load_state_dict, read_safetensors, write_safetensors
from .io._reader import FORMAT, FORMAT_VERSION

__all__ = ["TaskVector"]

_RESERVED = "taskarith."


@dataclass(frozen=True)
class _Info:
    """What a vector knows about where it came from (kept through algebra when unambiguous)."""

    skipped: tuple[str, ...] = ()
    base_fingerprint: str | None = None
    dtype_policy: str = "given"
    metadata: Mapping[str, str] = field(default_factory=dict)

    def combine(self, other: _Info) -> _Info:
        return _Info(
            skipped=tuple(sorted(set(self.skipped) | set(other.skipped))),
            base_fingerprint=self.base_fingerprint if self.base_fingerprint == other.base_fingerprint else None,
            dtype_policy=self.dtype_policy if self.dtype_policy == other.dtype_policy else "mixed",
        )


class TaskVector(Mapping[str, torch.Tensor]):
    """Deltas ``τ = θ_finetuned − θ_pretrained``, one per floating-point entry of a state_dict.

    A TaskVector is an immutable mapping ``name -> delta``; ``tv[name]`` is a view
    into one contiguous buffer per dtype (do not modify it in place; methods
    ending in ``_`` are the explicit in-place forms). Vectors support ``+``,
    ``-``, unary ``-``, multiplication and division by a scalar, Python's
    ``sum``, :meth:`dot`, :meth:`norm` and :meth:`cosine`; :meth:`apply_to`
    returns a new full state_dict ``base + scale * τ``. Scalars (scales,
    weights, ``alpha``) must be finite and within the range of the deltas'
    dtype, and divisors non-zero there: others raise a :class:`TaskArithError`
    naming them.

    Args:
        deltas: a mapping of names to floating-point tensors (all on one device).
        dtype: store the deltas in this dtype instead of their own.

    Example:
        >>> import torch, taskarith as ta
        >>> base = {"w": torch.tensor([1.0, 2.0])}
        >>> tuned = {"w": torch.tensor([1.5, 1.0])}
        >>> tv = ta.TaskVector.from_models(base, tuned)
        >>> tv["w"]
        tensor([ 0.5000, -1.0000])
        >>> (2 * tv).apply_to(base)["w"]
        tensor([2., 0.])
    """

    __slots__ = ("__weakref__", "_buffers", "_device", "_info", "_layout")

    def __init__(self, deltas: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None):
        if isinstance(deltas, TaskVector):
            source = deltas.to(dtype=dtype) if dtype is not None else deltas.clone()
            self._adopt(source._layout, source._buffers, source._info)
            return
        if not isinstance(deltas, Mapping):
            raise TaskArithError(
                f"TaskVector(...) takes a mapping of names to delta tensors, got {type(deltas).__name__}; "
                "to subtract two models use TaskVector.from_models(pretrained, finetuned)."
            )
        state = load_state_dict(deltas)
        not_float = [f"{k!r} ({v.dtype})" for k, v in state.items() if not v.is_floating_point()]
        raise_if_any(
            not_float, error=TaskArithError, header="task vector entries must be floating-point tensors",
            fix="Leave integer buffers out, or build the vector with TaskVector.from_models(...), which skips them.",
        )
        devices = {v.device for v in state.values()}
        if len(devices) > 1:
            raise TaskArithError(f"deltas are spread over devices {sorted(map(str, devices))}; move them to one device")
        device = devices.pop() if devices else torch.device("cpu")
        aliases = _extract.tied_groups(state, list(state))
        canonical = {n: v for n, v in state.items() if n not in aliases}
        layout = _flat.Layout.build(
            {n: tuple(v.shape) for n, v in canonical.items()},
            {n: dtype or v.dtype for n, v in canonical.items()},
            aliases,
            tuple(state),
        )
        self._adopt(layout, _flat.pack(canonical, layout, device), _Info())

    # ------------------------------------------------------------ construction

    @classmethod
    def from_models(
        cls,
        pretrained: Source,
        finetuned: Source,
        *,
        dtype: torch.dtype | None = None,
        check_finite: bool = False,
        allow_pickle: bool = False,
    ) -> TaskVector:
        """The task vector ``finetuned − pretrained``.

        Each model may be an ``nn.Module``, a state_dict, a ``.safetensors`` file
        or a directory holding ``model.safetensors`` or a sharded
        ``model.safetensors.index.json``. Only floating-point entries become
        deltas; integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are
        listed in :attr:`skipped` and come from the base on :meth:`apply_to`.
        Tied weights (names sharing memory) are stored once.

        Args:
            pretrained: the base model.
            finetuned: the fine-tuned model, same names, shapes and dtypes.
            dtype: store deltas in this dtype. By default half-precision weights
                get float32 deltas (float64 for the rare tensor float32 cannot
                round-trip), so ``from_models(b, f).apply_to(b)`` equals ``f``
                bit for bit; float32/float64 weights keep their dtype (see the
                docs for the float32 round-trip bound).
            check_finite: raise :class:`~taskarith.NonFiniteError` naming every
                tensor whose delta holds NaN or inf.
            allow_pickle: permit ``.pt``/``.bin`` checkpoints (read with
                ``torch.load(weights_only=True)``).

        Example:
            >>> import torch, taskarith as ta
            >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
            <torch._C.Generator object at ...>
            >>> pre = torch.nn.Linear(4, 2)
            >>> post = torch.nn.Linear(4, 2)
            >>> tv = ta.TaskVector.from_models(pre, post)
            >>> sorted(tv), tv.numel()
            (['bias', 'weight'], 10)
        """
        base = load_state_dict(pretrained, allow_pickle=allow_pickle)
        tuned = load_state_dict(finetuned, allow_pickle=allow_pickle)
        layout, buffers, skipped, policy = _extract.extract(base, tuned, dtype=dtype, check_finite=check_finite)
        info = _Info(
            skipped=tuple(skipped),
            base_fingerprint=_extract.fingerprint(base, list(layout.slots)),
            dtype_policy=policy,
        )
        return cls._make(layout, buffers, info)

    @classmethod
    def _make(cls, layout: _flat.Layout, buffers: dict[torch.dtype, torch.Tensor], info: _Info) -> TaskVector:
        tv = cls.__new__(cls)
        tv._adopt(layout, buffers, info)
        return tv

    @classmethod
    def _empty(cls, like: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype] | None = None) -> TaskVector:
        """An uninitialised vector with the names, shapes and dtypes (unless given) of ``like`` (one device)."""
        dtypes = {n: t.dtype for n, t in like.items()} if dtypes is None else dtypes
        layout = _flat.Layout.build({n: tuple(t.shape) for n, t in like.items()}, {n: dtypes[n] for n in like})
        device = next(iter(like.values())).device if like else torch.device("cpu")
        buffers = {dt: _flat.allocate(size, dt, device) for dt, size in layout.sizes.items()}
        return cls._make(layout, buffers, _Info())

    @classmethod
    def _wrap(cls, name: str, tensor: torch.Tensor) -> TaskVector:
        """A one-tensor vector sharing memory with ``tensor`` (which must be contiguous)."""
        layout = _flat.Layout.build({name: tuple(tensor.shape)}, {name: tensor.dtype})
        tv = cls.__new__(cls)
        tv._layout, tv._buffers, tv._info, tv._device = layout, {tensor.dtype: tensor.reshape(-1)}, _Info(), tensor.device
        return tv

    def _adopt(self, layout: _flat.Layout, buffers: dict[torch.dtype, torch.Tensor], info: _Info) -> None:
        self._layout = layout
        self._buffers = buffers
        self._info = info
        devices = {b.device for b in buffers.values()}
        self._device = devices.pop() if devices else torch.device("cpu")
        if any(b.device.type == "cpu" and b.nbytes >= (1 << 20) for b in buffers.values()):
            weakref.finalize(self, _flat.release, buffers)  # hand big buffers back to the cache when we die

    # ---------------------------------------------------------------- mapping

    def _views(self) -> dict[str, torch.Tensor]:
        """Every canonical name's tensor, cut from each buffer in one split (much cheaper than a
        narrow and a view per name when there are thousands of names)."""
        views: dict[str, torch.Tensor] = {}
        for dtype, buffer in self._buffers.items():
            slots = sorted(((n, s) for n, s in self._layout.slots.items() if s.dtype == dtype), key=lambda p: p[1].offset)
            sizes = [s.numel for _, s in slots]
            dense = all(s.offset == o for (_, s), o in zip(slots, itertools.accumulate([0, *sizes[:-1]])))
            if not dense or sum(sizes) != buffer.numel():
                views.update({n: self[n] for n, _ in slots})
                continue
            for (name, slot), part in zip(slots, buffer.split(sizes)):
                views[name] = part.view(slot.shape)
        return views

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            slot = self._layout.slot(name)
        except KeyError:
            raise KeyError(name) from None
        return _flat.view(self._buffers, slot)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout.names)

    def __len__(self) -> int:
        return len(self._layout.names)

    def __contains__(self, name: object) -> bool:
        return name in self._layout.slots or name in self._layout.aliases

    def numel(self) -> int:
        """Number of distinct entries (tied weights counted once)."""
        return self._layout.numel()

    @property
    def nbytes(self) -> int:
        """Bytes held by the deltas."""
        return sum(b.nbytes for b in self._buffers.values())

    @property
    def dtypes(self) -> dict[torch.dtype, int]:
        """Number of entries stored in each dtype."""
        return {dt: int(n) for dt, n in self._layout.sizes.items()}

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the deltas; raises if they are stored in several (see :attr:`dtypes`)."""
        if len(self._layout.sizes) == 1:
            return next(iter(self._layout.sizes))
        if not self._layout.sizes:
            return torch.get_default_dtype()
        raise TaskArithError(
            f"this vector stores deltas in several dtypes {self.dtypes}; "
            "see .dtypes, or convert with .to(dtype=...)."
        )

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def aliases(self) -> dict[str, str]:
        """Tied names: each alias maps to the name whose delta it shares."""
        return dict(self._layout.aliases)

    @property
    def skipped(self) -> tuple[str, ...]:
        """Non-floating-point entries of the source models that are not part of the vector."""
        return self._info.skipped

    @property
    def base_fingerprint(self) -> str | None:
        """Identity of the pretrained model this vector was extracted from, if known."""
        return self._info.base_fingerprint

    @property
    def metadata(self) -> dict[str, str]:
        """User metadata read from or to be written to a file."""
        return dict(self._info.metadata)

    def __repr__(self) -> str:
        dtypes = ", ".join(str(d).replace("torch.", "") for d in self._layout.sizes) or "empty"
        return f"TaskVector({len(self)} tensors, {self.numel():,} entries, {dtypes}, device={self._device})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TaskVector):
            raise TypeError("compare task vectors with .equal(other) or .allclose(other, rtol=..., atol=...)")
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def equal(self, other: TaskVector) -> bool:
        """True when both vectors hold the same names, shapes, dtypes and values (NaN != NaN)."""
        if not isinstance(other, TaskVector) or set(self) != set(other):
            return False
        return all(self[n].dtype == other[n].dtype and torch.equal(self[n], other[n]) for n in self)

    def allclose(self, other: TaskVector, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        """True when every delta is close to ``other``'s (same names and shapes required)."""
        self._check_compatible(other, "allclose")
        return all(torch.allclose(self[n], other[n].to(self[n].dtype), rtol=rtol, atol=atol) for n in self)

    # ------------------------------------------------------------- conversion

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TaskVector:
        """A copy on ``device`` and/or with every delta in ``dtype`` (self if nothing changes)."""
        device = _extract.device_of(device) if device is not None else self._device
        if dtype is not None and not dtype.is_floating_point:
            raise TaskArithError(f"task vectors hold floating-point deltas; cannot convert to {dtype}")
        layout = self._layout.with_dtypes({d: dtype or d for d in self._layout.sizes})
        if layout is self._layout and device == self._device:
            return self
        if layout is self._layout:
            buffers = {dt: buf.to(device) for dt, buf in self._buffers.items()}
        else:
            buffers = _flat.pack({n: self[n] for n in layout.slots}, layout, device)
        return TaskVector._make(layout, buffers, self._info)

    def clone(self) -> TaskVector:
        """A copy that shares no memory with this vector."""
        return self._map(lambda src, out: out.copy_(src))

    # ---------------------------------------------------------------- algebra

    def _map(self, kernel) -> TaskVector:
        buffers = {dt: _flat.allocate(buf.numel(), dt, buf.device) for dt, buf in self._buffers.items()}
        for dt, buf in self._buffers.items():
            kernel(buf, buffers[dt])
        return TaskVector._make(self._layout, buffers, self._info)

    def _zip(self, other: TaskVector, kernel, op: str) -> TaskVector:
        """Combine two vectors element-wise: one kernel per dtype when layouts agree."""
        if self._layout == other._layout and self._device == other._device:
            buffers = {dt: _flat.allocate(buf.numel(), dt, buf.device) for dt, buf in self._buffers.items()}
            for dt, buf in self._buffers.items():
                kernel(buf, other._buffers[dt], buffers[dt])
            return TaskVector._make(self._layout, buffers, self._info.combine(other._info))
        self._check_compatible(other, op)
        # Layouts differ (order, dtypes or ties): work tensor by tensor into the promoted dtype,
        # keeping only the ties both operands share.
        aliases = {a: c for a, c in self._layout.aliases.items() if other._layout.aliases.get(a) == c}
        names = [n for n in self._layout.names if n not in aliases]
        layout = _flat.Layout.build(
            {n: self._layout.shape(n) for n in names},
            {n: torch.promote_types(self[n].dtype, other[n].dtype) for n in names},
            aliases,
            self._layout.names,
        )
        buffers = {dt: _flat.allocate(size, dt, self._device) for dt, size in layout.sizes.items()}
        for name in names:
            kernel(self[name], other[name], _flat.view(buffers, layout.slots[name]))
        return TaskVector._make(layout, buffers, self._info.combine(other._info))

    def _check_compatible(self, other: object, op: str) -> TaskVector:
        if not isinstance(other, TaskVector):
            raise TaskArithError(f"{op} needs another TaskVector, got {type(other).__name__}")
        if self._layout == other._layout and self._device == other._device:
            return other  # same names, shapes and device: nothing to report (and no per-name Python loop)
        check_same_keys(self, other, what=f"{op} of two task vectors", fix="Both vectors must come from the same architecture.")
        problems = [
            f"{n!r}: {tuple(self[n].shape)} vs {tuple(other[n].shape)}"
            for n in self._layout.names
            if self._layout.shape(n) != other._layout.shape(n)
        ]
        raise_if_any(problems, error=ShapeMismatchError, header=f"shape mismatch in {op}", fix="Both vectors must come from the same architecture.")
        if self._device != other._device:
            raise ShapeMismatchError(
                f"{op} of vectors on different devices ({self._device} vs {other._device}); move one with .to(device)"
            )
        return other

    def __add__(self, other: object) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self._zip(other, lambda a, b, out: _numba.running_sum(out, [a, b]) or torch.add(a, b, out=out), "addition")

    def __radd__(self, other: object) -> TaskVector:
        if isinstance(other, numbers.Number) and other == 0:
            return self.clone()  # makes Python's sum() work; a copy, so in-place ops stay safe
        return NotImplemented

    def __sub__(self, other: object) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self._zip(other, lambda a, b, out: torch.sub(a, b, out=out), "subtraction")

    def __neg__(self) -> TaskVector:
        return self._map(lambda src, out: torch.neg(src, out=out))

    def __pos__(self) -> TaskVector:
        return self

    def __mul__(self, scalar: object) -> TaskVector:
        s = _scalar(scalar)
        if s is None:
            return NotImplemented
        _checked_scalar(s, "scalar", self._layout.sizes)
        compiled = _exact_in_float32(s)  # the kernel multiplies by float32(s), as torch does for these
        return self._map(lambda src, out: (compiled and _numba.scale(out, src, s)) or torch.mul(src, s, out=out))

    __rmul__ = __mul__

    def __truediv__(self, scalar: object) -> TaskVector:
        s = _scalar(scalar)
        if s is None:
            return NotImplemented
        _checked_scalar(s, "scalar", self._layout.sizes, divisor=True)
        return self._map(lambda src, out: torch.div(src, s, out=out))

    # In-place forms, for callers who own the vector (e.g. an accumulator they created).

    def add_(self, other: TaskVector, *, alpha: float = 1.0) -> TaskVector:
        """In place: ``self += alpha * other``. Returns self."""
        alpha = float(_checked_scalar(alpha, "alpha", self._layout.sizes))
        self._check_compatible(other, "add_")
        if self._layout == other._layout:
            for dt, buf in self._buffers.items():
                buf.add_(other._buffers[dt], alpha=alpha)
        else:
            self._check_ties_agree(other)
            for name in self._layout.slots:
                self[name].add_(other[name], alpha=alpha)
        return self

    def sub_(self, other: TaskVector) -> TaskVector:
        """In place: ``self -= other``. Returns self."""
        return self.add_(other, alpha=-1.0)

    def mul_(self, scalar: float | torch.Tensor) -> TaskVector:
        """In place: ``self *= scalar``. Returns self."""
        s = _checked_scalar(scalar, "scalar", self._layout.sizes)
        for buf in self._buffers.values():
            buf.mul_(s)
        return self

    def div_(self, scalar: float | torch.Tensor) -> TaskVector:
        """In place: ``self /= scalar``. Returns self."""
        s = _checked_scalar(scalar, "scalar", self._layout.sizes, divisor=True)
        for buf in self._buffers.values():
            buf.div_(s)
        return self

    def neg_(self) -> TaskVector:
        """In place: ``self = -self``. Returns self."""
        for buf in self._buffers.values():
            buf.neg_()
        return self

    def _check_ties_agree(self, other: TaskVector) -> None:
        # A tie in self is one storage; if other holds different deltas there, in-place would drop one.
        differ = [
            f"{a!r} and {c!r}"
            for a, c in self._layout.aliases.items()
            if other._layout.aliases.get(a) != c and not torch.equal(other[a], other[c])
        ]
        raise_if_any(differ, error=TaskArithError, header="tied in the target but different in the operand",
                     fix="Use the out-of-place form (a + b), which unties them.")

    @staticmethod
    def sum(vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
        """``Σ weights[i] * vectors[i]`` in one pass over memory (faster than Python's ``sum``).

        Example:
            >>> import torch, taskarith as ta
            >>> a = ta.TaskVector({"w": torch.ones(3)})
            >>> ta.TaskVector.sum([a, a, a], weights=[1.0, 2.0, 0.5])["w"]
            tensor([3.5000, 3.5000, 3.5000])
        """
        vectors = list(vectors)
        if not vectors:
            raise TaskArithError("TaskVector.sum needs at least one vector")
        bad = [f"#{i} ({type(v).__name__})" for i, v in enumerate(vectors) if not isinstance(v, TaskVector)]
        raise_if_any(bad, error=TaskArithError, header="TaskVector.sum takes task vectors only", fix="Pass a list of TaskVector.")
        if weights is None:
            weights = [1.0] * len(vectors)
        dtypes = {dt for v in vectors for dt in v._layout.sizes}
        weights = [float(_checked_scalar(w, f"weights[{i}]", dtypes)) for i, w in enumerate(weights)]
        if len(weights) != len(vectors):
            raise TaskArithError(f"got {len(weights)} weights for {len(vectors)} vectors; pass one weight per vector")
        first = vectors[0]
        for v in vectors[1:]:
            first._check_compatible(v, "TaskVector.sum")
        if any(v._layout != first._layout for v in vectors[1:]):
            total = first * weights[0]
            for v, w in zip(vectors[1:], weights[1:]):
                total = total + v * w
            return total
        info = first._info
        for v in vectors[1:]:
            info = info.combine(v._info)
        out = {dt: _flat.allocate(buf.numel(), dt, buf.device) for dt, buf in first._buffers.items()}
        # A weight below float32's smallest normal number is flushed to zero when it travels as a
        # kernel's float32 ``alpha``; multiplying by it as a Python scalar keeps it.
        subnormal = any(w != 0 and abs(w) < torch.finfo(torch.float32).tiny for w in weights)
        for dt, dst in out.items():
            srcs = [v._buffers[dt] for v in vectors]
            if not subnormal and _triton.usable([dst, *srcs], _triton.SUM_DTYPES):  # one pass on a GPU
                _triton.weighted_sum(dst, srcs, weights)
                continue
            # An unweighted sum in one compiled pass on the CPU (only there: with weights, torch's
            # result depends on whether its build fuses the multiply-add).
            if len(srcs) > 1 and all(w == 1.0 for w in weights) and _numba.running_sum(dst, srcs[:_numba.MAX_INPUTS]):
                for src in srcs[_numba.MAX_INPUTS:]:
                    dst.add_(src)
                continue
            # Whole-buffer kernels: blocking these passes to stay in cache measured slower here
            # (per-block thread start-up outweighs the saved memory traffic).
            if len(srcs) > 1 and _is_one(weights[0]) and not subnormal:
                torch.add(srcs[0], srcs[1], alpha=weights[1], out=dst)
                rest = zip(srcs[2:], weights[2:])
            else:
                torch.mul(srcs[0], weights[0], out=dst)
                rest = zip(srcs[1:], weights[1:])
            for src, w in rest:
                if subnormal:
                    dst.add_(torch.mul(src, w))
                else:
                    dst.add_(src, alpha=w)
        return TaskVector._make(first._layout, out, info)

    # ------------------------------------------------------------ reductions

    def dot(self, other: TaskVector) -> float:
        """Inner product, accumulated in float64 (tied weights counted once).

        Example:
            >>> import torch, taskarith as ta
            >>> ta.TaskVector({"w": torch.tensor([3.0, 4.0])}).dot(ta.TaskVector({"w": torch.tensor([1.0, 1.0])}))
            7.0
        """
        self._check_compatible(other, "dot")
        if self._layout == other._layout:
            pairs = [(buf, other._buffers[dt]) for dt, buf in self._buffers.items()]
        else:
            pairs = [(self[n].reshape(-1), other[n].reshape(-1)) for n in self._layout.slots]
        return math.fsum(_dot64(a, b) for a, b in pairs)

    def norm(self) -> float:
        """Euclidean norm, accumulated in float64."""
        return math.sqrt(math.fsum(_dot64(buf, buf) for buf in self._buffers.values()))

    def cosine(self, other: TaskVector) -> float:
        """Cosine similarity; 0.0 when either vector is zero (as ``torch.cosine_similarity``)."""
        denominator = self.norm() * other.norm()
        dot = self.dot(other)
        return 0.0 if denominator == 0 else max(-1.0, min(1.0, dot / denominator))

    # ----------------------------------------------------------------- apply

    def apply_to(
        self,
        base: Source,
        scale: float | torch.Tensor = 1.0,
        *,
        strict: bool = True,
        on_base_mismatch: str = "warn",
        check_finite: bool = False,
        allow_pickle: bool = False,
    ) -> dict[str, torch.Tensor]:
        """A new full state_dict: ``base + scale * τ`` on every entry of the vector.

        Entries outside the vector (integer buffers, and with ``strict=False``
        float entries the vector does not cover) are copied from the base.
        Applying to a different pretrained model of the same architecture (task
        transfer) is the same call; keys and shapes are validated either way.

        Args:
            base: ``nn.Module``, state_dict, ``.safetensors`` file or model directory.
            scale: λ, a Python number or 0-d tensor; NaN, inf and values beyond the deltas'
                dtype's range are refused (:class:`~taskarith.NonFiniteError`).
            strict: require the base's floating-point entries to be exactly the
                vector's names (a vector covering part of a model needs ``False``).
            on_base_mismatch: ``"warn"`` (default), ``"raise"`` or ``"ignore"``
                when the vector records a base fingerprint that differs from
                ``base`` (deliberate task transfer: pass ``"ignore"``).
            check_finite: raise :class:`~taskarith.NonFiniteError` naming every
                result tensor holding NaN or inf.
            allow_pickle: permit ``.pt``/``.bin`` checkpoints.

        Returns:
            ``dict[str, Tensor]`` in the base's order, dtypes and devices; tied
            names in the base stay tied.
        """
        if on_base_mismatch not in ("warn", "raise", "ignore"):
            raise TaskArithError(f"on_base_mismatch must be 'warn', 'raise' or 'ignore', got {on_base_mismatch!r}")
        alpha = float(_checked_scalar(scale, "scale", self._layout.sizes))
        state = load_state_dict(base, allow_pickle=allow_pickle)
        covered = self._validate_base(state, strict)
        self._check_fingerprint(state, covered, on_base_mismatch)
        out: dict[str, torch.Tensor] = {}
        made: dict[tuple, torch.Tensor] = {}  # (canonical, base storage) -> result, so ties stay tied
        edited: dict[tuple, torch.Tensor] = {}  # base storage -> result, for names tied to a covered one
        deltas = self._views()
        # Entries whose delta has the base's dtype and device go through one multi-tensor add (no
        # per-tensor Python work: with thousands of small tensors that work dominated); the others
        # (e.g. float32 deltas of bfloat16 weights) are computed wide and rounded once, one by one.
        keys, bases, same = [], [], []
        for name, b in state.items():
            if name in covered:
                key = (self._layout.canonical(name), b.data_ptr(), b.stride())
                if key in made:
                    continue
                delta = deltas[key[0]]
                if delta.dtype == b.dtype and delta.device == b.device:
                    made[key] = None  # filled below
                    keys.append(key)
                    bases.append(b)  # load_state_dict returned detached tensors
                    same.append(delta)
                else:
                    made[key] = _extract.apply_entry(b, delta, alpha, torch.empty_like(b))
        if bases:
            made.update(zip(keys, torch._foreach_add(bases, same, alpha=alpha)))
        uncovered = len(covered) < len(state)
        for name, b in state.items():
            if name in covered:
                result = made[(self._layout.canonical(name), b.data_ptr(), b.stride())]
                out[name] = result
                if uncovered:
                    edited[_storage_key(b)] = result
        for name, b in state.items():
            if name not in covered:
                # A name the vector does not cover but that shares memory with one it does (a tied
                # weight under another name) takes the edited tensor, so the tie survives.
                tied = edited.get(_storage_key(b)) if b.is_floating_point() else None
                out[name] = tied if tied is not None else b.detach().clone()
        out = {name: out[name] for name in state}
        if check_finite:
            bad = [f"{n!r}" for n in covered if not bool(torch.isfinite(out[n]).all())]
            raise_if_any(bad, error=_extract.NonFiniteError, header="non-finite values after apply_to",
                         fix="Lower the scale or check the vector with check_finite=True.")
        return out

    def _validate_base(self, state: Mapping[str, torch.Tensor], strict: bool) -> set[str]:
        """Names of ``state`` the vector applies to; raises listing every mismatch."""
        present = [n for n in self._layout.names if n in state]
        groups_present = {self._layout.canonical(n) for n in present}
        missing = [n for n in self._layout.names if n not in state and self._layout.canonical(n) not in groups_present]
        extra = [n for n, t in state.items() if t.is_floating_point() and n not in self] if strict else []
        if missing or extra:
            raise KeyMismatchError(
                "key mismatch (task vector vs base model): "
                + (f"missing from the base {len(missing)}: {format_names(missing)}; " if missing else "")
                + (f"base entries the vector does not cover {len(extra)}: {format_names(extra)}; " if extra else "")
                + "apply the vector to a model of the architecture it was extracted from"
                + (" (or pass strict=False to copy uncovered entries unchanged)." if extra else "."),
                missing=missing, extra=extra,
            )
        problems = []
        for n in present:
            b, shape = state[n], self._layout.shape(n)
            if tuple(b.shape) != shape:
                problems.append(f"{n!r}: vector {shape} vs base {tuple(b.shape)}")
            elif not b.is_floating_point():
                problems.append(f"{n!r}: base entry is {b.dtype}, the vector holds a float delta")
        raise_if_any(problems, error=ShapeMismatchError, header="the base does not match the vector",
                     fix="Apply the vector to a model of the architecture it was extracted from.")
        return set(present)

    def _check_fingerprint(self, state: Mapping[str, torch.Tensor], covered: set[str], policy: str) -> None:
        if policy == "ignore" or self.base_fingerprint is None:
            return
        probe: dict[str, torch.Tensor] = {}
        for name in covered:  # one tensor per tied group, whichever of its names the base has
            probe.setdefault(self._layout.canonical(name), state[name])
        if _extract.fingerprint(probe, list(probe)) != self.base_fingerprint:
            message = (
                "this task vector was extracted from a different base model than the one it is applied to. "
                "That is fine for deliberate task transfer (pass on_base_mismatch='ignore'); "
                "otherwise check that you load the right pretrained weights."
            )
            if policy == "raise":
                raise BaseMismatchError(message)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------- I/O

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None, *,
             overwrite: bool = False) -> None:
        """Write the vector to a ``.safetensors`` file, atomically.

        The file records a format version, the dtype policy, the skipped integer
        entries, tied names and the base fingerprint; ``metadata`` adds your own
        string pairs (keys must not start with ``taskarith.``). Any ordinary
        safetensors reader can load the deltas. An existing ``path`` is replaced
        only if taskarith wrote it, or with ``overwrite=True``.
        """
        check_output(path, overwrite=overwrite, folder=False)
        user = dict(self._info.metadata)
        user.update(metadata or {})
        bad = [f"{k!r}" for k, v in user.items() if not isinstance(k, str) or not isinstance(v, str) or k.startswith(_RESERVED)]
        raise_if_any(bad, error=TaskArithError, header="invalid metadata keys",
                     fix=f"Metadata is str -> str and keys starting with {_RESERVED!r} are reserved.")
        ours = file_metadata(self._layout.aliases, self._layout.names, self._info.base_fingerprint,
                             dtype_policy=self._info.dtype_policy, skipped=self._info.skipped)
        header = {**user, **ours}
        chunks = [(name, self[name]) for name in self._layout.slots]
        write_safetensors(path, chunks, header)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> TaskVector:
        """Read a vector written by :meth:`save` (or any safetensors file of float deltas).

        Example:
            >>> import tempfile, os, torch, taskarith as ta
            >>> tv = ta.TaskVector({"w": torch.arange(3.0)})
            >>> path = os.path.join(tempfile.mkdtemp(), "tv.safetensors")
            >>> tv.save(path, metadata={"task": "demo"})
            >>> loaded = ta.TaskVector.load(path)
            >>> loaded.equal(tv), loaded.metadata
            (True, {'task': 'demo'})
        """
        if Path(path).suffix in PICKLE_SUFFIXES:
            raise TaskArithError(f"refusing to unpickle {str(path)!r}: task vectors are stored as .safetensors")
        tensors, header = read_safetensors(path, device=str(device))  # the reader checked the format version
        aliases = json.loads(header.get(_RESERVED + "aliases", "{}"))
        tensors.update({a: tensors[c] for a, c in aliases.items()})
        order = json.loads(header.get(_RESERVED + "names", "[]"))
        if sorted(order) == sorted(tensors):
            tensors = {n: tensors[n] for n in order}
        vector = cls(tensors)
        info = _Info(
            skipped=tuple(json.loads(header.get(_RESERVED + "skipped", "[]"))),
            base_fingerprint=header.get(_RESERVED + "base_fingerprint"),
            dtype_policy=header.get(_RESERVED + "dtype_policy", "given"),
            metadata={k: v for k, v in header.items() if not k.startswith(_RESERVED)},
        )
        vector._info = info
        return vector

    def with_metadata(self, **metadata: str) -> TaskVector:
        """The same vector (sharing memory) carrying extra user metadata for :meth:`save`."""
        # Views of their own: the buffer cache takes a dead vector's buffer back only when no other tensor
        # uses its storage, and a second vector holding the very same tensor objects would not count.
        buffers = {dtype: buf.view(buf.shape) for dtype, buf in self._buffers.items()}
        return TaskVector._make(self._layout, buffers, replace(self._info, metadata={**self._info.metadata, **metadata}))


def file_metadata(aliases: Mapping[str, str], names: Sequence[str], base_fingerprint: str | None, *,
                  dtype_policy: str | None = None, skipped: Sequence[str] | None = None,
                  **more: str) -> dict[str, str]:
    """The ``taskarith.*`` metadata of a task vector file, for every writer of one: the format and its
    version, tied names, every name in order (safetensors readers sort names), and what is known."""
    ours = {"format": FORMAT, "format_version": FORMAT_VERSION}
    if dtype_policy is not None:
        ours["dtype_policy"] = dtype_policy
    if skipped is not None:
        ours["skipped"] = json.dumps(list(skipped))
    ours.update(aliases=json.dumps(dict(aliases)), names=json.dumps(list(names)), **more)
    if base_fingerprint:
        ours["base_fingerprint"] = base_fingerprint
    return {_RESERVED + k: v for k, v in ours.items()}


def _scalar(value: object):
    """A Python number or 0-d real tensor usable as a multiplier, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        return value.detach()
    return None


def _exact_in_float32(value) -> bool:
    """Whether ``value`` is a float, or an int that float32 holds exactly (a larger int would round
    twice on its way there through a float)."""
    return isinstance(value, float) or (isinstance(value, int) and abs(value) <= 1 << 24)


def _is_one(value) -> bool:
    return isinstance(value, numbers.Number) and value == 1


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), t.stride(), tuple(t.shape), t.dtype)


def _require_scalar(value: object, what: str = "the scalar"):
    s = _scalar(value)
    if s is None:
        raise TaskArithError(
            f"{what} must be a real Python number or a 0-d tensor, got {type(value).__name__} {value!r:.60}"
        )
    return s


class DivisionByZeroError(TaskArithError, ZeroDivisionError):
    """A task vector divided by zero (or by a number that is zero in its dtype)."""


def _checked_scalar(value: object, what: str, dtypes, *, divisor: bool = False):
    """``value`` (a Python number or 0-d tensor, returned as given) once it is finite and, cast to
    each of ``dtypes`` (the dtypes it multiplies or divides), neither inf nor, for a ``divisor``,
    zero; otherwise raise an error naming ``what``, the value and the fix."""
    s = _require_scalar(value, what)
    try:
        x = float(s)
    except OverflowError:
        raise NonFiniteError(f"{what} (an int of {len(str(abs(s)))} digits) overflows float64: pass a smaller "
                             f"value as {what}.") from None
    if not math.isfinite(x):
        raise NonFiniteError(f"{what}={x} is not a finite number: pass a finite number as {what}.")
    for dtype in dtypes or [torch.float64]:  # none (an empty vector): still no zero divisor
        largest, smallest = _range_of(dtype)
        if abs(x) > largest:
            wider = " (or convert the vector with .to(dtype=torch.float64))" if dtype != torch.float64 else ""
            raise NonFiniteError(
                f"{what}={s!r:.60} overflows {dtype} (largest finite value {largest!r}), so the deltas would "
                f"become inf: pass a smaller value as {what}{wider}."
            )
        if divisor and abs(x) < smallest:
            raise DivisionByZeroError(
                f"cannot divide a task vector by {what}={s!r:.60}: it is zero in {dtype} (smallest positive "
                f"value {smallest!r}). Divide by a non-zero number, or multiply by 0 to zero the vector."
            )
    return s


@functools.cache
def _range_of(dtype: torch.dtype) -> tuple[float, float]:
    """The largest finite value of ``dtype`` and its smallest positive (subnormal) one."""
    info = torch.finfo(dtype)
    return info.max, info.tiny * info.eps


_DOT_CHUNK = 1 << 16
_NUMPY_EXACT = (torch.float16, torch.float32, torch.float64)


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a·b with float64 products and accumulation (exact products for fp32 and narrower)."""
    if a.device.type == "cpu" and a.dtype in _NUMPY_EXACT and b.dtype in _NUMPY_EXACT:
        # numpy's einsum casts block by block inside its loop: no float64 copy of the inputs.
        return float(np.einsum("i,i->", a.numpy(), b.numpy(), dtype=np.float64))
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), _DOT_CHUNK):
        x = a[start:start + _DOT_CHUNK].double()
        y = x if b is a else b[start:start + _DOT_CHUNK].double()
        total += torch.dot(x, y)
    return float(total)
