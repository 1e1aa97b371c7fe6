"""Extracting a vector and applying it back: exactness by dtype, composition, transfer."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import DEVICES
from hypothesis import given
from hypothesis import strategies as st
from strategies import HALF_DTYPES, eps, model_pairs, scalars, tiny

import taskarith as ta


def to(state, device):
    return {k: v.to(device) for k, v in state.items()}


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Gap from |x| to the next larger representable value of x's dtype."""
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, float("inf"))) - x


@pytest.mark.parametrize("device", DEVICES)
@given(pair=model_pairs(HALF_DTYPES, min_abs=1e-6, max_abs=1e6))
def test_half_precision_round_trip_is_bit_exact(device, pair):
    base, tuned = (to(s, device) for s in pair)
    rebuilt = ta.TaskVector.from_models(base, tuned).apply_to(base)
    assert list(rebuilt) == list(tuned)
    for name, want in tuned.items():
        got = rebuilt[name]
        if not want.is_floating_point():  # integer buffers are not part of τ: they come from the base
            want = base[name]
        assert got.dtype == want.dtype, f"{name!r}: dtype {got.dtype} vs {want.dtype}"
        assert torch.equal(got, want), f"{name!r} {tuple(want.shape)} {want.dtype}: {got} vs {want}"


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_round_trip_of_independent_random_models(dtype):
    # Independent weights put tiny fine-tuned values next to large base values, which a
    # float32 delta cannot round-trip; those tensors must fall back to float64 deltas.
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(512, 512, generator=g).to(dtype), "b": torch.randn(7, generator=g).to(dtype)}
    tuned = {"w": torch.randn(512, 512, generator=g).to(dtype), "b": base["b"] + 1}
    tv = ta.TaskVector.from_models(base, tuned)
    assert tv["b"].dtype == torch.float32
    rebuilt = tv.apply_to(base)
    assert all(torch.equal(rebuilt[k], tuned[k]) for k in tuned)


@pytest.mark.parametrize("device", DEVICES)
@given(pair=model_pairs([torch.float32]))
def test_float32_round_trip_is_within_one_ulp(device, pair):
    base, tuned = (to(s, device) for s in pair)
    rebuilt = ta.TaskVector.from_models(base, tuned).apply_to(base)
    for name, want in tuned.items():
        if not want.is_floating_point():
            assert torch.equal(rebuilt[name], base[name]), f"{name!r}: integer entries come from the base"
            continue
        bound = ulp(torch.maximum(base[name].abs(), want.abs()))
        gap = (rebuilt[name] - want).abs()
        assert bool((gap <= bound).all()), f"{name!r} {tuple(want.shape)}: error {gap.max()} above 1 ulp"


@given(pair=model_pairs([torch.float32], min_abs=1e-4, max_abs=1e4))
def test_float64_deltas_make_the_float32_round_trip_exact(pair):
    base, tuned = pair
    rebuilt = ta.TaskVector.from_models(base, tuned, dtype=torch.float64).apply_to(base)
    for name, want in tuned.items():
        if want.is_floating_point():
            assert torch.equal(rebuilt[name], want), f"{name!r} {tuple(want.shape)}"


@given(pair=model_pairs(), data=st.data())
def test_explicit_dtype_stores_every_delta_in_that_dtype(pair, data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    tv = ta.TaskVector.from_models(*pair, dtype=dtype)
    assert set(tv.dtypes) <= {dtype}
    assert all(tv[n].dtype == dtype for n in tv)


@pytest.mark.parametrize("device", DEVICES)
@given(pair=model_pairs([torch.float32, torch.float64, torch.bfloat16], max_abs=1e6), s=scalars, t=scalars)
def test_applying_twice_equals_applying_the_sum(device, pair, s, t):
    base, tuned = (to(x, device) for x in pair)
    a = ta.TaskVector.from_models(base, tuned)
    c = -0.5 * a
    twice = a.apply_to(c.apply_to(base, t, on_base_mismatch="ignore"), s, on_base_mismatch="ignore")
    once = (s * a + t * c).apply_to(base)
    for name, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(twice[name], once[name])
            continue
        size = b.double().abs() + (abs(s) + abs(t)) * a[name].double().abs()
        bound = 6 * eps(b.dtype) * size + 4 * tiny(b.dtype)
        gap = (twice[name].double() - once[name].double()).abs()
        assert bool((gap <= bound).all()), f"{name!r} {tuple(b.shape)} {b.dtype}: gap {gap.max()}"


@given(pair=model_pairs([torch.float32]))
def test_scale_zero_returns_the_base_and_integer_entries_are_copied(pair):
    base, tuned = pair
    tv = ta.TaskVector.from_models(base, tuned)
    out = tv.apply_to(base, 0.0)
    assert list(out) == list(base)
    for name, b in base.items():
        assert torch.equal(out[name], b), name
        if b.numel():
            assert out[name].data_ptr() != b.data_ptr(), f"{name!r}: apply_to must return new tensors"
    assert set(tv.skipped) == {n for n, t in base.items() if not t.is_floating_point()}


def test_task_transfer_to_a_new_pretrained_model_warns_unless_told():
    torch.manual_seed(0)
    pre, post, other = (torch.nn.Linear(5, 3) for _ in range(3))
    tv = ta.TaskVector.from_models(pre, post)
    with pytest.warns(UserWarning, match="different base model"):
        moved = tv.apply_to(other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = tv.apply_to(other, on_base_mismatch="ignore")
        tv.apply_to(pre)  # its own base: no warning
    for name, w in other.state_dict().items():
        assert torch.allclose(moved[name], w + tv[name])
        assert torch.equal(moved[name], same[name])
    with pytest.raises(ta.BaseMismatchError):
        tv.apply_to(other, on_base_mismatch="raise")


def test_apply_to_keeps_the_base_dtype_and_accepts_a_tensor_scale():
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    tuned = {"w": torch.tensor([2.0, 4.0], dtype=torch.bfloat16)}
    out = ta.TaskVector.from_models(base, tuned).apply_to(base, torch.tensor(0.5))
    assert out["w"].dtype == torch.bfloat16
    assert out["w"].tolist() == [1.5, 3.0]


@given(bits=st.lists(st.tuples(st.integers(-(1 << 15), (1 << 15) - 1), st.integers(-(1 << 15), (1 << 15) - 1)),
                     min_size=1, max_size=40),
       dtype=st.sampled_from(HALF_DTYPES), scale=st.sampled_from([1.0, 0.3, -2.5]), block=st.integers(1, 7))
def test_blocked_half_precision_kernels_equal_the_mixed_dtype_ones(bits, dtype, scale, block):
    """The CPU paths that widen a block at a time into float32 scratch give the mixed-dtype kernels' bits,
    NaN, inf, subnormals and signed zeros included (any bit pattern of the half dtype)."""
    from taskarith import _extract

    pattern = torch.tensor(bits, dtype=torch.int16)
    pretrained, finetuned = pattern[:, 0].view(dtype), pattern[:, 1].view(dtype)
    want_delta = torch.empty(len(bits)).copy_(finetuned).sub_(pretrained)
    want_sum = torch.add(pretrained, want_delta, alpha=scale, out=torch.empty_like(pretrained))
    want_trip = _extract._round_trips_exact(pretrained, finetuned, want_delta)
    saved, _extract._BLOCK = _extract._BLOCK, block
    try:
        delta = torch.empty(len(bits))
        _extract.subtract_into(delta, finetuned, pretrained)
        got_sum = _extract.apply_entry(pretrained, want_delta, scale, torch.empty_like(pretrained))
        trips = _extract.round_trips(pretrained, finetuned, want_delta)
        trips_unformed = _extract.float32_round_trips(pretrained, finetuned)
    finally:
        _extract._BLOCK = saved
    torch.testing.assert_close(delta, want_delta, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got_sum, want_sum, rtol=0, atol=0, equal_nan=True)
    assert trips == trips_unformed == want_trip
