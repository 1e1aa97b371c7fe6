"""Turning a (pretrained, finetuned) pair into packed deltas, and applying them back.

Dtype policy (the default, ``dtype=None``):

* float32 and float64 weights get deltas of their own dtype;
* bfloat16 and float16 weights get float32 deltas, so that ``base + delta``
  rounds back to the fine-tuned weights. Where it would not (an entry whose
  fine-tuned value is over ~2^14 times smaller than its base value, so float32
  cannot hold the difference finely enough), that tensor's delta is kept in
  float64 instead. The round trip is then bit-exact for every float16 pair and
  for every bfloat16 pair whose magnitudes are within 2^40 of each other.

Passing ``dtype`` stores every delta in that dtype on purpose, with no fallback.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from . import _flat
from .backends import _numba
from .errors import NonFiniteError, ShapeMismatchError, TaskArithError, check_same_keys, raise_if_any

HALF = (torch.float16, torch.bfloat16)
POLICY_AUTO = "auto: float32 deltas for half-precision weights (float64 where needed for an exact round trip), else the weights' dtype"


def check_float_dtype(dtype: object) -> None:
    """Raise unless ``dtype`` is None or a floating-point torch.dtype."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TaskArithError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def device_of(device: object) -> torch.device:
    """``device`` as a ``torch.device`` that this machine has, else a TaskArithError saying which it has.

    Example:
        >>> device_of("cpu")
        device(type='cpu')
    """
    try:
        result = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise TaskArithError(f"{device!r} is not a device: pass 'cpu', 'cuda', 'cuda:1', ...") from None
    module = getattr(torch, result.type, None)
    if result.type != "cpu" and hasattr(module, "is_available") and not module.is_available():
        raise TaskArithError(f"device {str(result)!r} is not available on this machine (torch "
                             f"{torch.__version__}{'' if torch.cuda.is_available() else ', no CUDA'}): use 'cpu'")
    return result


def delta_dtype(weight_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    return torch.float32 if weight_dtype in HALF else weight_dtype


# Entries per block of the CPU paths that mix a half-precision tensor with a float32 one: mixed-dtype
# kernels are many times slower than same-dtype ones on the CPU, so the narrow operand is widened a
# block at a time into scratch that stays in cache (docs/design.md, "Measurements").
_BLOCK = 1 << 20


def _blocks(n: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each block of ``n`` entries."""
    for start in range(0, n, _BLOCK):
        yield start, min(start + _BLOCK, n)


def sums_equal(wide_base: torch.Tensor, delta: torch.Tensor, wide_finetuned: torch.Tensor, scratch: torch.Tensor) -> bool:
    """Whether ``wide_base + delta == wide_finetuned`` everywhere (NaN fails), using ``scratch``.

    Computed as one min/max reduction of ``(base + delta) - finetuned``, which
    is all zeros exactly when the sums equal: several times faster to read than
    an element-wise comparison.
    """
    low, high = torch.aminmax(torch.add(wide_base, delta, out=scratch).sub_(wide_finetuned))
    return low.item() == 0 and high.item() == 0


def _mixed_on_cpu(*tensors: torch.Tensor) -> bool:
    """Whether these CPU tensors differ in dtype (GPUs cast inside one kernel at full speed)."""
    return tensors[0].device.type == "cpu" and len({t.dtype for t in tensors}) > 1


def apply_entry(base: torch.Tensor, delta: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``out = base + scale * delta`` computed in the wider dtype, rounded once into ``out``."""
    if delta.device != base.device:
        delta = delta.to(base.device, non_blocking=True)
    if not _mixed_on_cpu(base, delta, out) or base.shape != out.shape or delta.shape != out.shape:
        return torch.add(base, delta, alpha=scale, out=out)
    wide = torch.promote_types(base.dtype, delta.dtype)
    b, d, o = base.reshape(-1), delta.reshape(-1), out.view(-1)
    scratch_b = torch.empty(min(o.numel(), _BLOCK), dtype=wide)
    scratch_d = torch.empty_like(scratch_b) if delta.dtype != wide else None
    scratch_o = torch.empty_like(scratch_b) if out.dtype != wide else None
    for s, e in _blocks(o.numel()):
        wb = b[s:e] if base.dtype == wide else scratch_b[: e - s].copy_(b[s:e])
        wd = d[s:e] if scratch_d is None else scratch_d[: e - s].copy_(d[s:e])
        if scratch_o is None:
            torch.add(wb, wd, alpha=scale, out=o[s:e])
        else:
            o[s:e].copy_(torch.add(wb, wd, alpha=scale, out=scratch_o[: e - s]))
    return out


def subtract_into(out: torch.Tensor, finetuned: torch.Tensor, pretrained: torch.Tensor) -> None:
    """``out = finetuned - pretrained`` with a single rounding into ``out``'s dtype."""
    if torch.promote_types(out.dtype, finetuned.dtype) == finetuned.dtype:
        torch.sub(finetuned, pretrained, out=out)  # computed in the weights' dtype, cast on write
        return
    if not _mixed_on_cpu(out, finetuned):
        out.copy_(finetuned)  # widening copy is exact; the subtraction then runs in out's dtype
        out.sub_(pretrained)
        return
    o, f, p = out.view(-1), finetuned.reshape(-1), pretrained.reshape(-1)
    scratch = torch.empty(min(o.numel(), _BLOCK), dtype=out.dtype)
    for s, e in _blocks(o.numel()):
        o[s:e].copy_(f[s:e]).sub_(scratch[: e - s].copy_(p[s:e]))


def round_trips(pretrained: torch.Tensor, finetuned: torch.Tensor, delta: torch.Tensor) -> bool:
    """Whether ``apply_entry(pretrained, delta, 1)`` reproduces ``finetuned`` value for value."""
    if _mixed_on_cpu(finetuned, delta) and pretrained.dtype == finetuned.dtype:
        return _round_trips_blocked(pretrained.reshape(-1), finetuned.reshape(-1), delta.reshape(-1))
    return _round_trips_exact(pretrained, finetuned, delta)


def _round_trips_exact(pretrained: torch.Tensor, finetuned: torch.Tensor, delta: torch.Tensor) -> bool:
    rebuilt = apply_entry(pretrained, delta, 1.0, torch.empty_like(finetuned))
    same = rebuilt == finetuned
    if not bool(same.all()):
        return bool((same | (rebuilt.isnan() & finetuned.isnan())).all())
    return True


def _round_trips_blocked(pretrained: torch.Tensor, finetuned: torch.Tensor, delta: torch.Tensor | None,
                         out: torch.Tensor | None = None) -> bool:
    """:func:`round_trips` in the delta's (wider) dtype, block by block (``delta=None``: the float32
    delta :func:`subtract_into` would compute, formed block by block in scratch, or in ``out`` so
    that one pass both computes and checks it; ``out`` is incomplete when this returns False).

    ``pretrained + delta == finetuned`` in the wide dtype implies the round trip
    (``finetuned`` is representable, so rounding the sum gives it back), and it
    holds for every block whose subtraction was exact: nearly all of them. A
    block where it fails gets the exact check in the narrow dtype.
    """
    n = finetuned.numel()
    wide = torch.float32 if delta is None else delta.dtype
    scratch_b = torch.empty(min(n, _BLOCK), dtype=wide)
    scratch_f, rebuilt = torch.empty_like(scratch_b), torch.empty_like(scratch_b)
    scratch_d = torch.empty_like(scratch_b) if delta is None and out is None else None
    for s, e in _blocks(n):
        wide_b, wide_f = scratch_b[: e - s].copy_(pretrained[s:e]), scratch_f[: e - s].copy_(finetuned[s:e])
        if delta is not None:
            d = delta[s:e]
        else:
            d = torch.sub(wide_f, wide_b, out=scratch_d[: e - s] if out is None else out[s:e])
        if not sums_equal(wide_b, d, wide_f, rebuilt[: e - s]) and not _round_trips_exact(pretrained[s:e], finetuned[s:e], d):
            return False
    return True


def float32_round_trips(pretrained: torch.Tensor, finetuned: torch.Tensor) -> bool:
    """Whether :func:`delta_of` keeps this half-precision pair's delta in float32 (no float64 fallback),
    decided without materialising the delta."""
    if _numba.delta_fits(finetuned, pretrained):  # else unsettled or not taken: the checks below decide
        return True
    if finetuned.device.type != "cpu":
        delta = torch.empty(finetuned.shape, dtype=torch.float32, device=finetuned.device)
        subtract_into(delta, finetuned, pretrained)
        return round_trips(pretrained, finetuned, delta)
    return _round_trips_blocked(pretrained.reshape(-1), finetuned.reshape(-1), None)


def delta_of(pretrained: torch.Tensor, finetuned: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor's delta under the same dtype policy as :func:`extract` (float64 fallback included)."""
    delta = torch.empty(finetuned.shape, dtype=delta_dtype(finetuned.dtype, dtype), device=finetuned.device)
    if dtype is None and finetuned.dtype in HALF:
        if not subtract_checked(delta, finetuned, pretrained):
            delta = finetuned.double() - pretrained.double()
    else:
        subtract_into(delta, finetuned, pretrained)
    return delta


def subtract_checked(out: torch.Tensor, finetuned: torch.Tensor, pretrained: torch.Tensor) -> bool:
    """:func:`subtract_into`, then whether ``pretrained + out`` rounds back to ``finetuned`` everywhere
    (:func:`round_trips`); on the CPU one blocked pass does both, widening each block once."""
    if _numba.subtract_checked(out, finetuned, pretrained):  # else unsettled or not taken: as below
        return True
    if out.dtype == torch.float32 and _mixed_on_cpu(finetuned, out) and pretrained.dtype == finetuned.dtype:
        return _round_trips_blocked(pretrained.reshape(-1), finetuned.reshape(-1), None, out=out.view(-1))
    subtract_into(out, finetuned, pretrained)
    return round_trips(pretrained, finetuned, out)


def tied_groups(state: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, str]:
    """alias -> canonical name for names whose tensors share memory (tied weights)."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name in names:
        t = state[name]
        if t.numel() == 0:
            continue
        key = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


_NUMPY_SAMPLED = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _cpu_sample(t: torch.Tensor) -> np.ndarray | None:
    """The sampled values of a contiguous CPU tensor as float64, gathered by numpy (a torch index per
    tensor cost several times more on models of thousands of tensors); None for other tensors."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.requires_grad:
        return None
    positions = _sample_positions_array(t.numel())
    if t.dtype == torch.bfloat16:  # bfloat16 bits are the high half of a float32's: exact
        bits = t.view(torch.int16).numpy().reshape(-1)[positions].astype(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    if t.dtype not in _NUMPY_SAMPLED:
        return None
    return t.numpy().reshape(-1)[positions].astype(np.float64)


@functools.lru_cache(maxsize=4096)  # models repeat a few sizes across thousands of tensors
def _sample_positions_array(n: int) -> np.ndarray:
    return _sample_positions(n).numpy()


@functools.lru_cache(maxsize=4096)
def _sample_positions(n: int) -> torch.Tensor:
    """16 evenly spread positions in ``range(n)`` (all of them when fewer).

    Up to 2^24 entries these are the positions float32 ``linspace`` gives, so the
    fingerprints of vectors saved by earlier releases still match; above, float32
    cannot hold ``n - 1`` (it rounds up to ``n``, past the end), so float64 spreads them.
    """
    steps = min(n, 16)
    wide = n - 1 > 1 << 24
    return torch.linspace(0, n - 1, steps=steps, dtype=torch.float64 if wide else torch.float32).long()


def fingerprint(state: Mapping[str, torch.Tensor], names: list[str]) -> str:
    """A cheap identity of a base model: names, dtypes, shapes and a few sampled values.

    Sampling (not hashing every byte) keeps this O(#tensors) for huge models,
    while any two independently trained or differently fine-tuned models differ
    in the sampled values.
    """
    names = sorted(names)
    host: dict[str, np.ndarray] = {}
    elsewhere: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name in names:
        t = state[name]
        if not t.numel():
            continue
        sample = _cpu_sample(t)
        if sample is None:
            flat = t.detach().reshape(-1)
            sample = flat[_sample_positions(flat.numel()).to(flat.device)].double()
            elsewhere.setdefault(sample.device, []).append((name, sample))
        else:
            host[name] = sample
    # One transfer per device for all samples: a copy to the host per tensor would synchronise a GPU each time.
    for pairs in elsewhere.values():
        joined = torch.cat([sample for _, sample in pairs]).cpu().numpy()
        start = 0
        for name, sample in pairs:
            host[name] = joined[start:start + sample.numel()]
            start += sample.numel()
    parts = []  # hashed in one call: the same digest as one update per part
    for name in names:
        t = state[name]
        parts.append(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if name in host:
            parts.append(host[name].tobytes())
    return "sha256:" + hashlib.sha256(b"".join(parts)).hexdigest()[:32]


def extract(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None,
    check_finite: bool,
) -> tuple[_flat.Layout, dict[torch.dtype, torch.Tensor], list[str], str]:
    """Deltas of every floating-point entry; returns layout, buffers, skipped names, policy."""
    check_float_dtype(dtype)
    check_same_keys(
        pretrained, finetuned, what="pretrained vs finetuned",
        fix="Both models must have the same architecture and parameter names.",
    )
    problems = []
    for name, f in finetuned.items():
        b = pretrained[name]
        if b.shape != f.shape:
            problems.append(f"{name!r}: pretrained {tuple(b.shape)} vs finetuned {tuple(f.shape)}")
        elif b.dtype != f.dtype:
            problems.append(f"{name!r}: pretrained {b.dtype} vs finetuned {f.dtype}")
        elif b.device != f.device:
            problems.append(f"{name!r}: pretrained on {b.device} vs finetuned on {f.device}")
        elif f.is_complex():
            problems.append(f"{name!r}: complex dtype {f.dtype} is not supported")
    raise_if_any(
        problems, error=ShapeMismatchError, header="pretrained and finetuned tensors differ",
        fix="Load both models with the same architecture, dtype and device (e.g. model.to(dtype)).",
    )
    names = [n for n, t in finetuned.items() if t.is_floating_point()]
    skipped = [n for n, t in finetuned.items() if not t.is_floating_point()]
    devices = {finetuned[n].device for n in names}
    if len(devices) > 1:
        raise TaskArithError(f"the model's tensors are spread over devices {sorted(map(str, devices))}; move it to one device first")
    device = devices.pop() if devices else torch.device("cpu")

    aliases = tied_groups(finetuned, names)
    untied = [f"{a!r} and {c!r}" for a, c in aliases.items() if not _same(pretrained[a], pretrained[c])]
    raise_if_any(
        untied, error=TaskArithError, header="tied in finetuned but different in pretrained",
        fix="Tie the same weights in both models (or untie them in both).",
    )
    canonical = [n for n in names if n not in aliases]
    dtypes = {n: delta_dtype(finetuned[n].dtype, dtype) for n in canonical}
    shapes = {n: tuple(finetuned[n].shape) for n in canonical}
    layout = _flat.Layout.build(shapes, dtypes, aliases, tuple(names))
    buffers = {dt: _flat.allocate(size, dt, device) for dt, size in layout.sizes.items()}
    widen = []
    for name in canonical:
        out = _flat.view(buffers, layout.slots[name])
        if dtype is None and finetuned[name].dtype in HALF:
            if not subtract_checked(out, finetuned[name], pretrained[name]):
                widen.append(name)
        else:
            subtract_into(out, finetuned[name], pretrained[name])
    if widen:  # rare: repack with float64 deltas for the tensors float32 cannot round-trip
        deltas = {n: _flat.view(buffers, layout.slots[n]) for n in canonical}
        for name in widen:
            deltas[name] = finetuned[name].double() - pretrained[name].double()
            dtypes[name] = torch.float64
        layout = _flat.Layout.build(shapes, dtypes, aliases, tuple(names))
        buffers = _flat.pack(deltas, layout, device)
    if check_finite:
        check_all_finite(layout, buffers, what="delta")
    return layout, buffers, skipped, (POLICY_AUTO if dtype is None else f"explicit: {dtype}")


def check_all_finite(layout: _flat.Layout, buffers: Mapping[torch.dtype, torch.Tensor], *, what: str) -> None:
    """Raise NonFiniteError naming every tensor that holds NaN or inf."""
    if all(bool(torch.isfinite(buf).all()) for buf in buffers.values()):
        return
    bad = []
    for name, slot in layout.slots.items():
        t = _flat.view(buffers, slot)
        n_bad = int((~torch.isfinite(t)).sum())
        if n_bad:
            bad.append(f"{name!r} ({n_bad} of {t.numel()} entries)")
    raise_if_any(bad, error=NonFiniteError, header=f"non-finite {what} values", fix="Check the models for NaN/inf weights or overflow.")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride():
        return True
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
