"""TaskVector: an immutable map from parameter names to deltas, on the flat core."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch

from .. import _extract, _flat
from ..errors import TaskArithError, raise_if_any
from ..io import Source, load_state_dict
from ._algebra import Algebra
from ._apply import Applying
from ._files import Files
from ._info import Info

if TYPE_CHECKING:
    from ..lora import LoraExtraction


class TaskVector(Algebra, Applying, Files, Mapping[str, torch.Tensor]):
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
        self._adopt(layout, _flat.pack(canonical, layout, device), Info())

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
        info = Info(
            skipped=tuple(skipped),
            base_fingerprint=_extract.fingerprint(base, list(layout.slots)),
            dtype_policy=policy,
        )
        return cls._make(layout, buffers, info)

    @classmethod
    def _make(cls, layout: _flat.Layout, buffers: dict[torch.dtype, torch.Tensor], info: Info) -> TaskVector:
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
        return cls._make(layout, buffers, Info())

    @classmethod
    def _wrap(cls, name: str, tensor: torch.Tensor) -> TaskVector:
        """A one-tensor vector sharing memory with ``tensor`` (which must be contiguous)."""
        layout = _flat.Layout.build({name: tuple(tensor.shape)}, {name: tensor.dtype})
        tv = cls.__new__(cls)
        tv._layout, tv._buffers, tv._info, tv._device = layout, {tensor.dtype: tensor.reshape(-1)}, Info(), tensor.device
        return tv

    def _adopt(self, layout: _flat.Layout, buffers: dict[torch.dtype, torch.Tensor], info: Info) -> None:
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
            plan = self._layout.split_plan(dtype)
            if plan is None or buffer.numel() != self._layout.sizes[dtype]:
                views.update({n: self[n] for n, s in self._layout.slots.items() if s.dtype == dtype})
                continue
            names, sizes, shapes = plan
            views.update(zip(names, (part.view(shape) for part, shape in zip(buffer.split(sizes), shapes))))
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

    def to_lora(self, rank: int, *, base: Source | None = None, **options) -> LoraExtraction:
        """This vector as a PEFT LoRA adapter of rank ``rank`` (truncated SVD per layer), with a per-layer
        error report; ``.save(folder)`` writes it. See :func:`taskarith.lora.to_lora` for the options."""
        from ..lora import to_lora

        return to_lora(self, rank, base=base, **options)
