"""The vector algebra of :class:`~taskarith.TaskVector`: operators, in-place forms, sums, reductions."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import _flat
from ..backends import _numba, _triton
from ..errors import ShapeMismatchError, TaskArithError, check_same_keys, raise_if_any
from ._scalars import _checked_scalar, _exact_in_float32, _is_one, _scalar

if TYPE_CHECKING:
    from ._core import TaskVector


class Algebra:
    """Mixin of :class:`~taskarith.TaskVector`: everything that combines vectors and scalars."""

    __slots__ = ()

    def _map(self, kernel) -> TaskVector:
        buffers = {dt: _flat.allocate(buf.numel(), dt, buf.device) for dt, buf in self._buffers.items()}
        for dt, buf in self._buffers.items():
            kernel(buf, buffers[dt])
        return type(self)._make(self._layout, buffers, self._info)

    def _zip(self, other: TaskVector, kernel, op: str) -> TaskVector:
        """Combine two vectors element-wise: one kernel per dtype when layouts agree."""
        if self._layout == other._layout and self._device == other._device:
            buffers = {dt: _flat.allocate(buf.numel(), dt, buf.device) for dt, buf in self._buffers.items()}
            for dt, buf in self._buffers.items():
                kernel(buf, other._buffers[dt], buffers[dt])
            return type(self)._make(self._layout, buffers, self._info.combine(other._info))
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
        return type(self)._make(layout, buffers, self._info.combine(other._info))

    def _check_compatible(self, other: object, op: str) -> TaskVector:
        if not isinstance(other, Algebra):
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
        if not isinstance(other, Algebra):
            return NotImplemented
        return self._zip(other, lambda a, b, out: _numba.running_sum(out, [a, b]) or torch.add(a, b, out=out), "addition")

    def __radd__(self, other: object) -> TaskVector:
        if isinstance(other, numbers.Number) and other == 0:
            return self.clone()  # makes Python's sum() work; a copy, so in-place ops stay safe
        return NotImplemented

    def __sub__(self, other: object) -> TaskVector:
        if not isinstance(other, Algebra):
            return NotImplemented
        return self._zip(other, lambda a, b, out: _numba.subtract(out, a, b) or torch.sub(a, b, out=out), "subtraction")

    def __neg__(self) -> TaskVector:
        # x * -1 is -x exactly (zeros and infinities included), so negation streams like a scaling.
        return self._map(lambda src, out: _numba.scale(out, src, -1.0) or torch.neg(src, out=out))

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
        compiled = _exact_in_float32(s)
        return self._map(lambda src, out: (compiled and _numba.divide(out, src, s)) or torch.div(src, s, out=out))

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
        bad = [f"#{i} ({type(v).__name__})" for i, v in enumerate(vectors) if not isinstance(v, Algebra)]
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
        for dt, dst in out.items():
            sum_into(dst, [v._buffers[dt] for v in vectors], weights)
        return type(first)._make(first._layout, out, info)

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
        self._check_compatible(other, "cosine")
        if self._layout == other._layout:  # one pass over both vectors
            sums = [_gram64(buf, other._buffers[dt]) for dt, buf in self._buffers.items()]
            dot = math.fsum(s[2] for s in sums)
            denominator = math.sqrt(math.fsum(s[0] for s in sums)) * math.sqrt(math.fsum(s[1] for s in sums))
        else:
            denominator = self.norm() * other.norm()
            dot = self.dot(other)
        return 0.0 if denominator == 0 else max(-1.0, min(1.0, dot / denominator))


_NUMPY_EXACT = (torch.float16, torch.float32, torch.float64)


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a·b with float64 products and accumulation (exact products for fp32 and narrower)."""
    compiled = _numba.dot64(a, b)
    if compiled is not None:
        return compiled
    if a.device.type == "cpu" and a.dtype in _NUMPY_EXACT and b.dtype in _NUMPY_EXACT:
        # numpy's einsum casts block by block inside its loop: no float64 copy of the inputs.
        return float(np.einsum("i,i->", a.numpy(), b.numpy(), dtype=np.float64))
    return float(_chunked_sums(a, b, gram=False)[0])


def _gram64(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """``(Σ a·a, Σ b·b, Σ a·b)``, each as :func:`_dot64` computes it, in one pass where compiled or on
    an accelerator."""
    compiled = _numba.gram64(a, b)
    if compiled is not None:
        return compiled
    if a.device.type == "cpu" and a.dtype in _NUMPY_EXACT and b.dtype in _NUMPY_EXACT:
        return _dot64(a, a), _dot64(b, b), _dot64(a, b)
    aa, bb, ab = _chunked_sums(a, b, gram=True).tolist()
    return aa, bb, ab


def _chunked_sums(a: torch.Tensor, b: torch.Tensor, *, gram: bool) -> torch.Tensor:
    """``[Σ a·b]`` (or ``[Σ a·a, Σ b·b, Σ a·b]``) by float64 dot products over fixed chunks: small
    on the CPU (the float64 copies stay in cache), large on accelerators (one launch per 4M entries,
    not per 64K)."""
    chunk = 1 << 16 if a.device.type == "cpu" else 1 << 22
    total = torch.zeros(3 if gram else 1, dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), chunk):
        x = a[start:start + chunk].double()
        y = x if b is a else b[start:start + chunk].double()
        total += torch.stack([torch.dot(x, x), torch.dot(y, y), torch.dot(x, y)]) if gram else torch.dot(x, y)
    return total


def sum_into(dst: torch.Tensor, srcs: Sequence[torch.Tensor], weights: Sequence[float], *,
             count_nan: bool = False) -> int | None:
    """``dst = Σ weights[i] · srcs[i]`` over flat tensors of ``dst``'s dtype and device, with the
    same operations, in the same order, whatever the path (so results never depend on it).

    With ``count_nan``, returns how many results are NaN where one compiled pass counted them as it
    wrote them; None where they were not counted (the caller scans ``dst`` if it must know)."""
    # A weight below float32's smallest normal number is flushed to zero when it travels as a
    # kernel's float32 ``alpha``; multiplying by it as a Python scalar keeps it.
    subnormal = any(w != 0 and abs(w) < torch.finfo(torch.float32).tiny for w in weights)
    if not subnormal and _triton.weighted_sum(dst, srcs, weights):  # one pass on a GPU
        return None
    # An unweighted sum in one compiled pass on the CPU (only there: with weights, torch's
    # result depends on whether its build fuses the multiply-add).
    if len(srcs) > 1 and all(w == 1.0 for w in weights):
        counted = _numba.running_sum(dst, srcs[:_numba.MAX_INPUTS], count_nan=count_nan)
        if counted is not None:
            for src in srcs[_numba.MAX_INPUTS:]:
                dst.add_(src)
            return counted if count_nan and len(srcs) <= _numba.MAX_INPUTS else None
    # A weighted float32 sum in one pass, where the kernel can round as this torch build does (it
    # leaves subnormal weights to the path below).
    if dst.dtype == torch.float32:
        counted = _numba.weighted_sum(dst, srcs, weights, count_nan=count_nan)
        if counted is not None:
            return counted if count_nan else None
    # Whole-buffer kernels: per-block thread start-up outweighs the memory traffic blocking saves.
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
    return None
