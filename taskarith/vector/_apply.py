"""Applying a task vector to a base model: ``base + scale · τ``, validated first."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from .. import _extract, _flat
from ..backends import _numba
from ..errors import BaseMismatchError, KeyMismatchError, ShapeMismatchError, TaskArithError, format_names, raise_if_any
from ..io import Source, load_state_dict
from ._scalars import _checked_scalar


class Applying:
    """Mixin of :class:`~taskarith.TaskVector`: :meth:`apply_to` and its checks."""

    __slots__ = ()

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
        out = self._apply_in_one_pass(state, alpha)
        if out is not None:
            return self._checked_finite(out, covered) if check_finite else out
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
            made.update(zip(keys, _add_into_one_buffer(bases, same, alpha)))
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
        return self._checked_finite(out, covered) if check_finite else out

    @staticmethod
    def _checked_finite(out: dict[str, torch.Tensor], covered: set[str]) -> dict[str, torch.Tensor]:
        bad = [f"{n!r}" for n in covered if not bool(torch.isfinite(out[n]).all())]
        raise_if_any(bad, error=_extract.NonFiniteError, header="non-finite values after apply_to",
                     fix="Lower the scale or check the vector with check_finite=True.")
        return out

    def _apply_in_one_pass(self, state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor] | None:
        """The common case without per-tensor work: the base holds exactly the vector's names, untied,
        one dtype per buffer of deltas (theirs or another: float32 deltas of bfloat16 weights),
        and ``alpha`` is 1 (torch's own rounding of other factors differs between its kernels): one
        compiled pass per buffer adds the deltas to all the bases at once, rounding once. None where
        it does not apply (nothing is written then)."""
        if alpha != 1.0 or self._device.type != "cpu" or self._layout.aliases or len(state) != len(self._layout.slots):
            return None
        plans = {dtype: self._layout.split_plan(dtype) for dtype in self._buffers}
        if any(plan is None for plan in plans.values()):
            return None
        results: dict[str, torch.Tensor] = {}
        for dtype, buffer in self._buffers.items():
            names, sizes, shapes = plans[dtype]
            bases = [state[n] for n in names]
            out = _flat.allocate(buffer.numel(), bases[0].dtype if bases else dtype, buffer.device)
            if not _numba.add_to_bases(out, buffer, bases):
                return None
            _flat.recycle(out)  # reused once the caller drops the result: fresh pages fault slowly
            results.update(zip(names, (part.view(shape) for part, shape in zip(out.split(sizes), shapes))))
        return {name: results[name] for name in state}

    def _validate_base(self, state: Mapping[str, torch.Tensor], strict: bool) -> set[str]:
        """Names of ``state`` the vector applies to; raises listing every mismatch."""
        present = [n for n in self._layout.names if n in state]
        missing = []
        if len(present) < len(self._layout.names):
            groups_present = {self._layout.canonical(n) for n in present}
            missing = [n for n in self._layout.names if n not in state and self._layout.canonical(n) not in groups_present]
        # Names first: a dict lookup costs less than asking a tensor its dtype (thousands of tensors).
        extra = [n for n, t in state.items() if n not in self and t.is_floating_point()] if strict else []
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
        slot = self._layout.slot
        for n in present:
            b, shape = state[n], slot(n).shape
            if b.shape != shape:  # a torch.Size equals the tuple of its sizes
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


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), t.stride(), tuple(t.shape), t.dtype)


_MANY, _SMALL = 512, 1 << 16  # this many tensors, of fewer entries than this on average: one foreach add


def _add_into_one_buffer(bases: list[torch.Tensor], deltas: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """``base + alpha · delta`` per pair, written into views of one fresh buffer per dtype and device.

    One large allocation (through the buffer cache) instead of one per tensor, and plain per-tensor
    adds: ``torch._foreach_add`` ran many times slower whenever another process kept a core busy.
    Thousands of small tensors still go through it: there, the per-tensor dispatch of plain adds
    costs more.
    """
    if len(bases) >= _MANY and sum(b.numel() for b in bases) < _SMALL * len(bases):
        return torch._foreach_add(bases, deltas, alpha=alpha)
    outs: list[torch.Tensor | None] = [None] * len(bases)
    groups: dict[tuple, list[int]] = {}
    for i, b in enumerate(bases):
        groups.setdefault((b.dtype, b.device), []).append(i)
    for (dtype, device), members in groups.items():
        buffer = _flat.allocate(sum(bases[i].numel() for i in members), dtype, device)
        _flat.recycle(buffer)  # reused once the caller drops the result: fresh pages fault slowly
        for i, part in zip(members, buffer.split([bases[i].numel() for i in members])):
            outs[i] = torch.add(bases[i], deltas[i], alpha=alpha, out=part.view(bases[i].shape))
    return outs
