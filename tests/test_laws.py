"""The vector-space laws of TaskVector algebra, one test per law."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICES
from hypothesis import given
from hypothesis import strategies as st
from strategies import eps, scalars, tiny, vectors

import taskarith as ta


def on(device, vs):
    return [v.to(device) for v in vs]


def assert_same(x: ta.TaskVector, y: ta.TaskVector, op: str) -> None:
    """Value-for-value equality (−0.0 equals +0.0), same names, shapes and dtypes."""
    assert set(x) == set(y), f"{op}: names differ"
    for name in x:
        a, b = x[name], y[name]
        assert a.shape == b.shape and a.dtype == b.dtype, f"{op}: {name!r} {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        assert torch.equal(a, b), f"{op}: {name!r} shape {tuple(a.shape)} {a.dtype} differs: {a} vs {b}"


def assert_within(x: ta.TaskVector, y: ta.TaskVector, bound: dict[str, torch.Tensor], op: str) -> None:
    """|x − y| <= bound element-wise (bound given per name, in float64)."""
    assert set(x) == set(y), f"{op}: names differ"
    for name in x:
        gap = (x[name].double() - y[name].double()).abs().cpu()
        allowed = bound[name].cpu()
        worst = (gap - allowed).max().item() if gap.numel() else 0.0
        assert worst <= 0, f"{op}: {name!r} shape {tuple(x[name].shape)} {x[name].dtype} off by {worst:g} beyond its bound"


def magnitude(*vs, name, scale=1.0):
    return sum(v[name].double().abs() for v in vs) * abs(scale)


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=2))
def test_addition_is_commutative(device, vs):
    a, b = on(device, vs)
    assert_same(a + b, b + a, "a + b == b + a")


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=3))
def test_addition_is_associative_within_rounding(device, vs):
    a, b, c = on(device, vs)
    left, right = (a + b) + c, a + (b + c)
    # Each side rounds twice; the two results differ by at most 2 eps of the summed magnitudes.
    bound = {n: 2 * eps(a[n].dtype) * magnitude(a, b, c, name=n) + tiny(a[n].dtype) for n in a}
    assert_within(left, right, bound, "(a + b) + c == a + (b + c)")


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=1))
def test_zero_is_the_additive_identity(device, vs):
    (a,) = on(device, vs)
    zero = 0 * a
    assert_same(a + zero, a, "a + 0 == a")
    assert_same(sum([a]), a, "sum([a]) == a")


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=1))
def test_negation_is_the_additive_inverse(device, vs):
    (a,) = on(device, vs)
    assert_same(a + (-a), 0 * a, "a + (-a) == 0")
    assert_same(a - a, 0 * a, "a - a == 0")


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=2), s=scalars)
def test_scalar_multiplication_distributes_over_vector_addition(device, vs, s):
    a, b = on(device, vs)
    bound = {n: 3 * eps(a[n].dtype) * magnitude(a, b, name=n, scale=s) + 2 * tiny(a[n].dtype) for n in a}
    assert_within(s * (a + b), s * a + s * b, bound, "s * (a + b) == s*a + s*b")


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=1), s=scalars, t=scalars)
def test_scalar_addition_distributes_over_a_vector(device, vs, s, t):
    (a,) = on(device, vs)
    bound = {n: 3 * eps(a[n].dtype) * magnitude(a, name=n, scale=abs(s) + abs(t)) + 2 * tiny(a[n].dtype) for n in a}
    assert_within((s + t) * a, s * a + t * a, bound, "(s + t) * a == s*a + t*a")


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=1))
def test_minus_one_times_a_is_negation(device, vs):
    (a,) = on(device, vs)
    assert_same((-1) * a, -a, "(-1) * a == -a")
    assert_same(a * torch.tensor(-1.0), -a, "a * tensor(-1) == -a")


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=2))
def test_subtraction_is_adding_the_negation(device, vs):
    a, b = on(device, vs)
    assert_same(a - b, a + (-b), "a - b == a + (-b)")


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=1), s=scalars.filter(lambda v: abs(v) >= 1e-3))
def test_division_matches_torch_division(device, vs, s):
    (a,) = on(device, vs)
    out = a / s
    for n in a:
        assert torch.equal(out[n], a[n] / s), f"a / s: {n!r} {tuple(a[n].shape)}"


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=3))
def test_python_sum_and_one_pass_sum_agree_with_pairwise_addition(device, vs):
    a, b, c = on(device, vs)
    assert_same(sum([a, b, c]), (a + b) + c, "sum([a, b, c]) == (a + b) + c")
    assert_same(ta.TaskVector.sum([a, b, c]), (a + b) + c, "TaskVector.sum([a, b, c]) == (a + b) + c")


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=3), w=st.lists(scalars, min_size=3, max_size=3))
def test_weighted_sum_matches_scaled_addition(device, vs, w):
    a, b, c = on(device, vs)
    got = ta.TaskVector.sum([a, b, c], weights=w)
    want = w[0] * a + w[1] * b + w[2] * c
    bound = {
        n: 4 * eps(a[n].dtype) * (abs(w[0]) * a[n].double().abs() + abs(w[1]) * b[n].double().abs() + abs(w[2]) * c[n].double().abs())
        + 4 * tiny(a[n].dtype)
        for n in a
    }
    assert_within(got, want, bound, "TaskVector.sum(weights) == Σ w_i * v_i")


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=2), s=scalars)
def test_in_place_forms_equal_out_of_place_forms(device, vs, s):
    a, b = on(device, vs)
    assert_same(a.clone().add_(b), a + b, "a.add_(b) == a + b")
    assert_same(a.clone().sub_(b), a - b, "a.sub_(b) == a - b")
    assert_same(a.clone().mul_(s), a * s, "a.mul_(s) == a * s")
    assert_same(a.clone().neg_(), -a, "a.neg_() == -a")


def _reference(vs):
    return [np.concatenate([v[n].double().cpu().numpy().ravel() for n in v._layout.slots] or [np.zeros(0)]) for v in vs]


@pytest.mark.parametrize("device", DEVICES)
@given(vs=vectors(n=2, max_abs=1e15))
def test_dot_norm_cosine_match_a_float64_reference(device, vs):
    a, b = on(device, vs)
    x, y = _reference([a, b])
    slack = 1e-12 * float(np.abs(x * y).sum()) + 1e-300
    assert abs(a.dot(b) - float(np.dot(x, y))) <= slack, "dot vs float64 reference"
    assert abs(a.norm() - float(np.linalg.norm(x))) <= 1e-12 * float(np.linalg.norm(x)) + 1e-300, "norm vs float64 reference"
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    want = 0.0 if nx == 0 or ny == 0 else float(np.dot(x, y) / (nx * ny))
    assert abs(a.cosine(b) - want) <= 1e-9, "cosine vs float64 reference"
    assert abs(a.dot(b) - b.dot(a)) <= slack, "dot is symmetric"


def test_tied_entries_count_once_in_reductions():
    w = torch.tensor([3.0, 4.0])
    tv = ta.TaskVector({"embed": w, "head": w})
    assert tv.aliases == {"head": "embed"}
    assert tv.numel() == 2 and len(tv) == 2
    assert tv.norm() == 5.0


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_sum_keeps_weights_below_the_smallest_float32_normal(device):
    """A weight like 2e-41 must not be flushed to zero on its way into a kernel."""
    a = ta.TaskVector({"x": torch.tensor([3e38, 5.0], dtype=torch.bfloat16, device=device)})
    w = [0.0, 0.0, 2.1514135322778916e-41]
    got = ta.TaskVector.sum([a, a, a], weights=w)
    want = w[0] * a + w[1] * a + w[2] * a
    assert float(want["x"][0]) != 0, "the reference itself lost the weight"
    assert_same(got, want, "TaskVector.sum with a subnormal weight")
