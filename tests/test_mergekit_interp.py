"""mergekit's interpolation and selection methods (slerp, nuslerp, multislerp, karcher, nearswap,
arcee_fusion, ram, ramplus_tl) on small cases checked by hand.

Bit parity with mergekit 0.1.5 itself is checked outside the suite (mergekit is not a dependency).
"""

from __future__ import annotations

import math

import pytest
import torch

import taskarith as ta
from taskarith.errors import TaskArithError
from taskarith.merging import Block

NAMES = ("slerp", "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl")
R = math.sqrt(0.5)


def run(name, models, base=None, weights=None, **options):
    """Call the method's fn on one block, its options' defaults filled in."""
    spec = ta.methods()[name]
    models = tuple(torch.as_tensor(m, dtype=torch.float32) if not torch.is_tensor(m) else m for m in models)
    if base is not None and not torch.is_tensor(base):
        base = torch.tensor(base, dtype=torch.float32)
    weights = tuple(weights or (1.0,) * len(models))
    filled = {k: o.default for k, o in spec.options.items() if not o.required}
    filled.update(options)
    return spec.fn(Block("w", models, weights, base, tuple(models[0].shape)), **filled)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_all_registered_as_weight_methods():
    methods = ta.methods()
    for name in NAMES:
        spec = methods[name]
        assert spec.inputs == "weights"
        assert spec.paper.startswith("https://")
        assert "mergekit parameters" in spec.doc
    assert {n for n in NAMES if methods[n].needs_base} == {"slerp", "nearswap", "arcee_fusion", "ram", "ramplus_tl"}


# ----------------------------------------------------------------- slerp


def test_slerp_endpoints_are_exact():
    base, model = rand(6, 5, seed=1), rand(6, 5, seed=2)
    assert torch.equal(run("slerp", [model], base, t=0.0), base)
    assert torch.equal(run("slerp", [model], base, t=1.0), model)


def test_slerp_midpoint_of_orthogonal_unit_vectors_stays_on_the_circle():
    out = run("slerp", [[0.0, 1.0]], [1.0, 0.0], t=0.5)
    assert torch.allclose(out, torch.tensor([R, R]))
    assert torch.linalg.vector_norm(out).item() == pytest.approx(1.0, abs=1e-6)
    third = run("slerp", [[0.0, 1.0]], [1.0, 0.0], t=1 / 3)
    assert torch.allclose(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_slerp_colinear_vectors_interpolate_linearly():
    base = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(run("slerp", [2 * base], base, t=0.25), 1.25 * base)
    # antipodal too: the straight line through the origin
    assert torch.equal(run("slerp", [-base], base, t=0.5), torch.zeros(3))


def test_slerp_angle_is_over_the_whole_tensor():
    # rows are orthogonal pairs, but the flattened tensors are what is interpolated
    base, model = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert torch.allclose(run("slerp", [model], base, t=0.5), torch.full((2, 2), R))


def test_slerp_half_precision_is_computed_in_float32_and_rounded_once():
    base, model = rand(4, 7, seed=3, dtype=torch.bfloat16), rand(4, 7, seed=4, dtype=torch.bfloat16)
    out = run("slerp", [model], base, t=0.3)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, run("slerp", [model.float()], base.float(), t=0.3).to(torch.bfloat16))


def test_slerp_needs_the_base_and_one_model():
    with pytest.raises(TaskArithError, match="exactly 1"):
        run("slerp", [[1.0], [2.0]], [0.0], t=0.5)
    with pytest.raises(TaskArithError, match="base"):
        run("slerp", [[1.0]], None, t=0.5)


# ----------------------------------------------------------------- nuslerp


def test_nuslerp_of_identical_models_returns_it():
    x = torch.tensor([[0.5, -1.25], [2.0, 0.125]])
    assert torch.equal(run("nuslerp", [x, x.clone()]), x)
    base = torch.tensor([[0.25, 1.0], [-0.5, 0.0]])
    assert torch.equal(run("nuslerp", [x, x.clone()], base, use_base=True), x)


def test_nuslerp_fraction_comes_from_the_weights():
    out = run("nuslerp", [[1.0, 0.0], [0.0, 1.0]], weights=(1.0, 3.0))  # t = 3 / 4
    assert torch.allclose(out, torch.tensor([math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)]))
    # weights summing to zero: t = 1/2
    assert torch.allclose(run("nuslerp", [[1.0, 0.0], [0.0, 1.0]], weights=(1.0, -1.0)), torch.tensor([R, R]))


def test_nuslerp_rows_and_columns():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    rows = run("nuslerp", [x, y], nuslerp_flatten=False)
    assert torch.allclose(rows[0], torch.tensor([R, R]))  # orthogonal row: on the circle
    assert torch.equal(rows[1], torch.tensor([1.5, 0.0]))  # colinear row: linear
    cols = run("nuslerp", [x, y], nuslerp_flatten=False, nuslerp_row_wise=True)
    assert torch.allclose(cols[:, 1], torch.tensor([R, 0.0]))  # x's column is zero: taken as orthogonal
    flat = run("nuslerp", [x, y])
    assert not torch.allclose(flat, rows)


def test_nuslerp_relative_to_the_base():
    base = torch.tensor([3.0, -2.0])
    out = run("nuslerp", [base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 1.0])], base, use_base=True)
    assert torch.allclose(out, base + torch.tensor([R, R]))


def test_nuslerp_needs_two_models_and_the_base_when_asked():
    with pytest.raises(TaskArithError, match="exactly 2"):
        run("nuslerp", [[1.0]])
    with pytest.raises(TaskArithError, match="use_base=True"):
        run("nuslerp", [[1.0], [2.0]], None, use_base=True)


# ----------------------------------------------------------------- multislerp


def test_multislerp_one_model_is_returned_as_is():
    x = rand(3, 4, seed=5)
    assert run("multislerp", [x]) is x


def test_multislerp_of_identical_models_returns_it():
    x = rand(3, 4, seed=6)
    out = run("multislerp", [x, x.clone(), x.clone()], weights=(1.0, 2.0, 0.5))
    assert torch.allclose(out, x, rtol=1e-6, atol=1e-6)


def test_multislerp_of_two_orthogonal_vectors_is_the_scaled_midpoint():
    out = run("multislerp", [[2.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(out, torch.tensor([2 * R, 2 * R]))
    base = torch.tensor([1.0, 1.0])
    rel = run("multislerp", [[3.0, 1.0], [1.0, 3.0]], base, use_base=True)
    assert torch.allclose(rel, base + torch.tensor([2 * R, 2 * R]))


def test_multislerp_cancelling_directions():
    x = torch.tensor([1.0, -2.0, 0.5])
    assert torch.equal(run("multislerp", [x, -x]), torch.zeros(3))  # two: linear fallback
    with pytest.raises(TaskArithError, match="weights"):
        run("multislerp", [x, -x, torch.zeros(3)])


def test_multislerp_weights_normalised_or_not():
    x, y = [1.0, 0.0], [0.0, 1.0]
    assert torch.allclose(run("multislerp", [x, y], weights=(2.0, 2.0)), torch.tensor([R, R]))
    # unnormalised weights scale the mean norm by their sum
    raw = run("multislerp", [x, y], weights=(2.0, 2.0), normalize_weights=False)
    assert torch.allclose(raw / torch.linalg.vector_norm(raw), torch.tensor([R, R]))


# ----------------------------------------------------------------- karcher


def test_karcher_of_identical_models_returns_it():
    x = rand(5, 3, seed=7)
    assert torch.allclose(run("karcher", [x, x.clone(), x.clone()]), x, rtol=1e-6, atol=1e-6)
    assert run("karcher", [x]) is x


def test_karcher_of_orthogonal_unit_vectors_is_the_normalised_midpoint():
    out = run("karcher", [[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(out, torch.tensor([R, R]))
    # scaled by the mean norm; the weights do not count
    out = run("karcher", [[3.0, 0.0], [0.0, 1.0]], weights=(1.0, 5.0))
    assert torch.allclose(out / torch.linalg.vector_norm(out), torch.tensor([R, R]), atol=1e-5)
    assert torch.linalg.vector_norm(out).item() == pytest.approx(2.0)


def test_karcher_zero_models_and_base():
    assert torch.equal(run("karcher", [[0.0, 0.0], [0.0, 0.0]]), torch.zeros(2))
    x = torch.tensor([0.0, 2.0])
    # use_base adds the base as one more point
    out = run("karcher", [[2.0, 0.0]], x, use_base=True)
    assert torch.allclose(out, torch.tensor([2 * R, 2 * R]))


# ----------------------------------------------------------------- nearswap


def test_nearswap_threshold():
    base = torch.zeros(4)
    model = torch.tensor([0.05, 0.2, -1.0, 0.0])
    out = run("nearswap", [model], base, t=0.1)
    assert torch.allclose(out, torch.tensor([0.05, 0.1, -0.1, 0.0]))
    assert out[0] == model[0]  # within t: the model's value
    assert torch.equal(run("nearswap", [model], base, t=0.0), base)
    assert torch.equal(run("nearswap", [model], base, t=1.0), model)


# ----------------------------------------------------------------- arcee_fusion


def test_arcee_fusion_keeps_only_outlying_changes():
    # One row: every entry's importance is |change| times the same KL divergence, so the
    # threshold is KL · (Q2 + 1.5 (Q3 − Q1)) of the sorted changes 1..8, 100: 5 + 1.5 · 4 = 11.
    base = torch.zeros(9)
    model = torch.tensor([3.0, 100.0, 1.0, 5.0, 2.0, 8.0, 4.0, 7.0, 6.0])
    out = run("arcee_fusion", [model], base)
    assert torch.equal(out, torch.tensor([0.0, 100.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    # unchanged entries have importance 0: with most entries unchanged the threshold is 0 and all are kept
    sparse = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 2.0])
    assert torch.equal(run("arcee_fusion", [sparse], base), sparse)
    assert torch.equal(run("arcee_fusion", [base.clone()], base), base)


def test_arcee_fusion_half_precision_gives_float32_like_mergekit():
    base, model = rand(4, 6, seed=9, dtype=torch.bfloat16), rand(4, 6, seed=10, dtype=torch.bfloat16)
    out = run("arcee_fusion", [model], base)
    assert out.dtype == torch.float32
    # the change is rounded to bfloat16, then added to the base in float32
    changed = base.float() + (model - base).float()
    assert bool(((out == changed) | (out == base.float())).all())
    assert bool((out == changed).any())


# ----------------------------------------------------------------- ram, ramplus_tl


def test_ram_unique_changes_kept_shared_ones_averaged():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    m1 = base + torch.tensor([1.0, 0.0, 2.0, 1e-6])
    m2 = base + torch.tensor([3.0, 0.0, 0.0, 0.0])
    assert torch.equal(run("ram", [m1, m2], base), torch.tensor([3.0, 1.0, 3.0, 1.0]))
    assert torch.equal(run("ram", [m1, m2], base, epsilon=0.0), torch.tensor([3.0, 1.0, 3.0, 1.0 + 1e-6]))


def test_ramplus_tl_boosts_unique_changes():
    base = torch.zeros(4)
    m1 = torch.tensor([1.0, 0.0, 2.0, 0.0])  # one shared, one unique: rho 1, clamped to alpha
    m2 = torch.tensor([3.0, 0.0, 0.0, 0.0])
    out = run("ramplus_tl", [m1, m2], base)
    assert torch.allclose(out, torch.tensor([2.0, 0.0, 2.0 * (1 + 0.1 * 0.2), 0.0]))
    out = run("ramplus_tl", [m1, m2], base, r=0.5, alpha=2.0)
    assert torch.allclose(out, torch.tensor([2.0, 0.0, 2.0 * 1.5, 0.0]))
    assert torch.equal(run("ramplus_tl", [m1, m2], base, r=0.0), run("ram", [m1, m2], base))


# ----------------------------------------------------------------- options


@pytest.mark.parametrize("name, options, fragment", [
    ("slerp", {"t": 1.5}, "[0, 1]"),
    ("slerp", {}, "t is required"),
    ("nuslerp", {"nuslerp_flatten": "yes"}, "true or false"),
    ("multislerp", {"eps": 0.0}, "> 0"),
    ("karcher", {"max_iter": -1}, "int >= 0"),
    ("karcher", {"tol": float("nan")}, ">= 0"),
    ("nearswap", {"t": -0.1}, ">= 0"),
    ("arcee_fusion", {"seed": 1.5}, "an int"),
    ("ram", {"epsilon": -1.0}, ">= 0"),
    ("ramplus_tl", {"epsilon": 0.0}, "> 0"),
    ("ramplus_tl", {"lambda_": 1.0}, "unknown option"),
])
def test_bad_options_are_refused(name, options, fragment):
    base = {"w": torch.zeros(3)}
    v = ta.TaskVector({"w": torch.ones(3)})
    with pytest.raises(TaskArithError) as err:
        ta.merge([v, v] if name == "nuslerp" else [v], name, base=base, **options)
    assert fragment in str(err.value)


def test_slerp_through_merge():
    base = {"w": torch.tensor([1.0, 0.0])}
    v = ta.TaskVector({"w": torch.tensor([-1.0, 1.0])})
    merged = ta.merge([v], "slerp", base=base, t=0.5)
    assert torch.allclose(merged["w"] + base["w"], torch.tensor([R, R]))
