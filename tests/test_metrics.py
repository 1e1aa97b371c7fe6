"""Metrics: hand-computed examples, brute-force references and hypothesis invariants."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import vectors

import taskarith as ta
from taskarith import merging
from taskarith.metrics import cosine_matrix, sign_conflict_rate, sparsity, weight_disentanglement

EXACT = [torch.float32, torch.float64]


def tv(**tensors):
    return ta.TaskVector({k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()})


# ------------------------------------------------------------ hand-computed


def test_cosine_matrix_by_hand():
    a, b, c = tv(w=[3.0, 4.0]), tv(w=[4.0, -3.0]), tv(w=[-6.0, -8.0])
    m = cosine_matrix([a, b, c])
    expected = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    assert m.dtype == torch.float64 and torch.allclose(m, expected, atol=1e-15)


def test_cosine_matrix_zero_vector_row_is_zero():
    a, z = tv(w=[1.0, 2.0]), tv(w=[0.0, 0.0])
    m = cosine_matrix([a, z, z])
    assert m.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert cosine_matrix([z]).tolist() == [[0.0]]


def test_sign_conflict_rate_by_hand():
    a = tv(w=[1.0, -2.0, 0.0, 3.0], x=[1.0])
    b = tv(w=[2.0, 1.0, 5.0, -0.1], x=[0.0])
    c = tv(w=[0.0, -1.0, -1.0, 0.0], x=[-1.0])
    # shared (>= 2 non-zero): w0 (a,b +,+), w1 (a -, b +, c -), w2 (b +, c -), w3 (a +, b -), x0 (a +, c -)
    # conflicting: w1, w2, w3, x0 -> 4 of 5
    assert sign_conflict_rate([a, b, c]) == pytest.approx(4 / 5)
    assert sign_conflict_rate([a]) == 0.0
    assert sign_conflict_rate([a, a, a]) == 0.0
    # density 0.4 over 5 entries keeps 2 per vector: a {w3, w1}, b {w2, w0}, c {w1, w2} (ties at 1:
    # w1, w2, x0 -> the first tensor by name, "w", then its earliest entries)
    # shared: w1 (a -, c -) and w2 (b +, c -) -> 1 conflict of 2
    assert sign_conflict_rate([a, b, c], density=0.4) == pytest.approx(1 / 2)


def test_sign_conflict_rate_tensor_scope():
    a = tv(w=[1.0, -2.0, 0.5, 3.0], b=[1.0, 1.0])
    b = tv(w=[2.0, 1.0, 5.0, -0.1], b=[-1.0, 1.0])
    # per tensor, density 0.5: w keeps 2 of 4, b keeps 1 of 2
    # a: w {3 (idx3), -2 (idx1)}, b {idx0}; b: w {5 (idx2), 2 (idx0)}, b {idx0 (tie, earliest)}
    # shared: b0 only (a +, b -) -> conflict
    assert sign_conflict_rate([a, b], density=0.5, scope="tensor") == 1.0
    assert sign_conflict_rate([a, b], density=0.5, scope="global") == _reference_rate([a, b], 0.5, "global")


def test_sparsity_by_hand():
    v = tv(w=[0.0, -0.0, 1e-3, 2.0], b=[0.0])
    assert sparsity(v) == 3 / 5
    assert sparsity(v, atol=1e-3) == 4 / 5
    assert sparsity(torch.tensor([float("nan"), 0.0])) == 0.5
    assert sparsity(ta.TaskVector({})) == 0.0


def test_tied_weights_are_counted_once():
    w = torch.tensor([0.0, 1.0, 2.0])
    tied = ta.TaskVector({"a": w, "b": w, "c": torch.tensor([0.0])})
    assert tied.numel() == 4
    assert sparsity(tied) == 0.5


def test_invalid_arguments_raise_taskarith_errors():
    a = tv(w=[1.0, 2.0])
    with pytest.raises(ta.TaskArithError, match="at least one"):
        cosine_matrix([])
    with pytest.raises(ta.TaskArithError, match="TaskVector inputs"):
        cosine_matrix([a, {"w": torch.ones(2)}])
    with pytest.raises(ta.KeyMismatchError):
        sign_conflict_rate([a, tv(v=[1.0, 2.0])])
    with pytest.raises(ta.ShapeMismatchError):
        cosine_matrix([a, tv(w=[1.0])])
    with pytest.raises(ta.TaskArithError, match="density"):
        sign_conflict_rate([a, a], density=0)
    with pytest.raises(ta.TaskArithError, match="scope"):
        sign_conflict_rate([a, a], density=0.5, scope="row")
    with pytest.raises(ta.TaskArithError, match="atol"):
        sparsity(a, atol=-1)


# ------------------------------------------------------------ properties


def _reference_rate(vs, density, scope):
    """Brute force: trim with merging.trim, then count signs entry by entry."""
    names = list(vs[0]._layout.slots)
    if density is not None:
        trimmed = [merging.trim(v, density, scope) for v in vs]
    else:
        trimmed = [{n: v[n] for n in names} for v in vs]
    flat = [np.concatenate([t[n].double().reshape(-1).numpy() for n in names]) if names else np.zeros(0) for t in trimmed]
    stacked = np.stack(flat)
    positive, negative = (stacked > 0).sum(0), (stacked < 0).sum(0)
    shared = int(((positive + negative) >= 2).sum())
    return int(((positive > 0) & (negative > 0)).sum()) / shared if shared else 0.0


@given(vectors(n=3), st.sampled_from([None, 0.1, 0.5, 1.0]), st.sampled_from(["global", "tensor"]))
def test_sign_conflict_rate_matches_brute_force(vs, density, scope):
    got = sign_conflict_rate(vs, density=density, scope=scope)
    assert got == _reference_rate(vs, density, scope), f"sign_conflict_rate density={density} scope={scope}"
    assert 0.0 <= got <= 1.0


@given(vectors(n=3), st.sampled_from([None, 0.3, 0.7]))
def test_sign_conflict_rate_is_permutation_invariant_and_zero_for_identical(vs, density):
    rate = sign_conflict_rate(vs, density=density)
    for perm in itertools.permutations(vs):
        assert sign_conflict_rate(list(perm), density=density) == rate
    assert sign_conflict_rate([vs[0], vs[0].clone()], density=density) == 0.0


@given(vectors(n=4, dtypes=EXACT, max_abs=1e6), st.lists(st.sampled_from([1.0, 2.0, 4.0]), min_size=4, max_size=4))
def test_cosine_matrix_laws(vs, scales):
    m = cosine_matrix(vs)
    n = len(vs)
    assert m.shape == (n, n) and m.dtype == torch.float64
    assert torch.equal(m, m.T), "cosine_matrix is not symmetric"
    assert bool(((m >= -1) & (m <= 1)).all()), "cosine_matrix out of [-1, 1]"
    for i, v in enumerate(vs):
        assert m[i, i] == (1.0 if v.norm() > 0 else 0.0)
        for j, w in enumerate(vs):
            assert m[i, j].item() == pytest.approx(v.cosine(w), abs=1e-9), f"cosine_matrix[{i},{j}] vs TaskVector.cosine"
    scaled = cosine_matrix([v * s for v, s in zip(vs, scales)])  # exact: powers of two
    assert torch.allclose(scaled, m, atol=1e-12), "cosine_matrix is not scale invariant"


@given(vectors(n=1), st.sampled_from([0.0, 1e-3, 1.0, 100.0]))
def test_sparsity_matches_reference(vs, atol):
    v = vs[0]
    total = sum(v[n].numel() for n in v._layout.slots)
    # atol in each tensor's dtype, as torch compares a tensor with a Python number (see sparsity).
    small = sum(int((v[n].abs() <= torch.tensor(atol, dtype=v[n].dtype).double()).sum()) for n in v._layout.slots)
    assert sparsity(v, atol=atol) == (small / total if total else 0.0)


# ------------------------------------------------------ weight disentanglement


def _identity_model(state, t):
    return torch.cat([x.double().reshape(-1) for x in state.values()])


def _squared(a, b):
    return float(((a - b) ** 2).sum())


@given(vectors(n=2, dtypes=[torch.float64], max_abs=100.0), st.lists(st.floats(-3, 3), min_size=1, max_size=3))
def test_disentanglement_of_a_model_linear_in_its_weights(vs, scales):
    # f(θ) = θ, dist = ‖·‖²: ξ(α1, α2) = α2²‖τ2‖² + α1²‖τ1‖² (each task sees the other's vector)
    base = {n: torch.zeros(vs[0][n].shape, dtype=torch.float64) for n in vs[0]}
    grid = weight_disentanglement(base, vs, _identity_model, scales=scales, distance=_squared)
    n1, n2 = vs[0].norm() ** 2, vs[1].norm() ** 2
    for i, a1 in enumerate(scales):
        for j, a2 in enumerate(scales):
            expected = a2 * a2 * n2 + a1 * a1 * n1
            assert grid[i, j].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_disentangled_vectors_have_zero_error():
    # Task t reads only the parameters its own vector changes: perfectly disentangled.
    torch.manual_seed(0)
    base = {"a": torch.randn(3, 4), "b": torch.randn(3, 4)}
    t0 = ta.TaskVector({"a": torch.randn(3, 4), "b": torch.zeros(3, 4)})
    t1 = ta.TaskVector({"a": torch.zeros(3, 4), "b": torch.randn(3, 4)})
    x = torch.randn(16, 4)

    def evaluate(state, t):
        return x @ state["ab"[t]].T

    scales = torch.linspace(-2, 2, 5)
    assert torch.equal(weight_disentanglement(base, [t0, t1], evaluate, scales=scales), torch.zeros(5, 5))
    per = weight_disentanglement(base, [t0, t1], evaluate, scales=scales, per_task=True)
    assert per.shape == (2, 5, 5) and not per.any()


def test_entangled_vectors_grid_structure_and_caching():
    torch.manual_seed(1)
    base = {"w": torch.randn(5, 4)}
    vs = [ta.TaskVector({"w": torch.randn(5, 4)}) for _ in range(2)]
    data = [torch.randn(32, 4), torch.randn(32, 4)]
    calls = []

    def evaluate(state, t):
        calls.append(t)
        return data[t] @ state["w"].T

    scales = [-1.0, 0.0, 1.0, 2.0]
    grid = weight_disentanglement(base, vs, evaluate, scales=scales)
    assert len(calls) == 2 * 4 + 2 * 16  # single-task outputs are cached
    assert grid.shape == (4, 4) and grid[1, 1] == 0.0  # ξ(0, 0): both models are θ0
    assert bool(((grid >= 0) & (grid <= 2)).all()) and grid.max() > 0
    per = weight_disentanglement(base, vs, evaluate, scales=scales, per_task=True)
    assert torch.equal(per.sum(0), grid)
    assert not per[0, :, 1].any() and not per[1, 1, :].any()  # α of the other task 0: no interference
    swapped = weight_disentanglement(base, vs[::-1], lambda s, t: evaluate(s, 1 - t), scales=scales)
    assert torch.allclose(swapped, grid.T)
    diag = weight_disentanglement(base, vs, evaluate, scales=scales, diagonal=True)
    assert torch.equal(diag, grid.diagonal())


def test_disentanglement_diagonal_over_three_tasks():
    base = {"w": torch.zeros(3)}
    vs = [ta.TaskVector({"w": torch.eye(3)[i]}) for i in range(3)]
    got = weight_disentanglement(base, vs, _identity_model, scales=[0.0, 1.0, 2.0], distance=_squared, diagonal=True)
    # each task sees the two other vectors scaled by α: 2·α² per task, 3 tasks
    assert got.tolist() == [0.0, 6.0, 24.0]
    with pytest.raises(ta.TaskArithError, match="diagonal=True"):
        weight_disentanglement(base, vs, _identity_model, scales=[1.0])
    with pytest.raises(ta.TaskArithError, match="scales"):
        weight_disentanglement(base, vs, _identity_model, scales=[math.nan], diagonal=True)
    with pytest.raises(ta.TaskArithError, match="shape"):
        ragged = lambda s, t: torch.zeros(int(s["w"].abs().sum()) + 1, dtype=torch.long)
        weight_disentanglement(base, vs[:2], ragged, scales=[1.0])
