"""mergekit's generalized task arithmetic and related methods: hand-computed cases, invariants,
reproducible random masks and option checks, calling each method's ``fn`` on a :class:`Block`."""

from __future__ import annotations

import pytest
import torch

import taskarith as ta
from taskarith.merging import Block
from taskarith.merging._registry import lookup

GTA = ["mergekit_task_arithmetic", "mergekit_ties", "mergekit_dare_ties", "dare_linear", "mergekit_breadcrumbs",
       "breadcrumbs_ties", "della", "della_linear"]
RANDOM = ["mergekit_dare_ties", "dare_linear", "della", "della_linear"]
OTHERS = ["linear", "passthrough", "model_stock", "sce"]

BASE = torch.tensor([1.0, 2.0, 3.0, 4.0])
T1 = torch.tensor([1.0, -2.0, 0.0, 4.0])
T2 = torch.tensor([3.0, 2.0, -1.0, -2.0])


def run(name, models, weights=None, base=None, seed=None, block_name="w", **options):
    """The method's ``fn`` on one block, with options validated and defaulted as the registry does."""
    spec = ta.methods()[name]
    if spec.randomized and "seed" not in options:
        options["seed"] = 0 if seed is None else seed
    _, resolved = lookup(name, options)
    models = tuple(models)
    weights = tuple(weights) if weights is not None else (1.0,) * len(models)
    block = Block(block_name, models, weights, base if spec.needs_base else None, tuple(models[0].shape),
                  seed=resolved.get("seed"))
    return spec.fn(block, **resolved)


def dyadic(seed, shape=(6, 5)):
    """Multiples of 1/8 below 16 in magnitude: sums and differences of a few are exact in float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, shape, generator=g).float() / 8


# ----------------------------------------------------------------------------- registration


def test_the_methods_are_registered_with_mergekit_s_parameters_and_defaults():
    methods = ta.methods()
    defaults = {"mergekit_task_arithmetic": (False, False), "mergekit_ties": (True, False),
                "mergekit_dare_ties": (False, True), "dare_linear": (False, True),
                "mergekit_breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
                "della": (True, True), "della_linear": (False, True)}
    for name, (normalize, rescale) in defaults.items():
        spec = methods[name]
        assert spec.inputs == "weights" and spec.needs_base and spec.split == "tensor"
        assert spec.randomized == (name in RANDOM)
        opts = {k: o.default for k, o in spec.options.items()}
        assert opts["normalize"] is normalize and opts["rescale"] is rescale
        assert opts["lambda_"] == 1.0 and opts["int8_mask"] is False and opts["density"] == 1.0
        assert ("gamma" in opts) == ("breadcrumbs" in name) and ("epsilon" in opts) == name.startswith("della")
        assert opts.get("gamma", 0.01) == 0.01 and opts.get("epsilon", 0.15) == 0.15
    assert {k: o.default for k, o in methods["linear"].options.items()} == {"normalize": True}
    assert {k: o.default for k, o in methods["passthrough"].options.items()} == {"scale": None}
    assert {k: o.default for k, o in methods["model_stock"].options.items()} == {"filter_wise": False}
    assert {k: o.default for k, o in methods["sce"].options.items()} == {"select_topk": 1.0, "int8_mask": False}
    assert not methods["linear"].needs_base and not methods["passthrough"].needs_base
    assert methods["model_stock"].needs_base and methods["sce"].needs_base


@pytest.mark.parametrize("name", GTA + OTHERS)
def test_every_docstring_has_a_summary_a_formula_a_link_and_the_parameters(name):
    doc = ta.methods()[name].doc
    assert doc.splitlines()[0].strip().endswith(".")
    assert "θ" in doc and "Paper:" in doc and "mergekit parameters:" in doc


def test_the_native_methods_keep_their_names():
    methods = ta.methods()
    for name in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs"):
        assert methods[name].inputs == "deltas"
        assert methods[f"mergekit_{name}"].inputs == "weights"


# ----------------------------------------------------------------------------- hand-computed


def test_task_arithmetic_by_hand_with_lambda_and_normalize():
    models = (BASE + T1, BASE + T2)
    out = run("mergekit_task_arithmetic", models, (0.5, 2.0), BASE, lambda_=0.5)
    assert torch.equal(out, BASE + torch.tensor([3.25, 1.5, -1.0, -1.0]))
    out = run("mergekit_task_arithmetic", models, (0.5, 2.0), BASE, normalize=True)
    assert torch.allclose(out, BASE + torch.tensor([6.5, 3.0, -2.0, -2.0]) / 2.5)


def test_ties_with_unequal_weights_normalized_or_not():
    # δ1 = [.5, -1, 0, 2], δ2 = [6, 4, -2, -4]; elected signs +, +, −, −: δ1 agrees only at entry 0.
    models = (BASE + T1, BASE + T2)
    out = run("mergekit_ties", models, (0.5, 2.0), BASE)
    assert torch.equal(out, BASE + torch.tensor([6.5 / 2.5, 2.0, -1.0, -2.0]))
    out = run("mergekit_ties", models, (0.5, 2.0), BASE, normalize=False)
    assert torch.equal(out, BASE + torch.tensor([6.5, 4.0, -2.0, -4.0]))
    out = run("mergekit_ties", models, (0.5, 2.0), BASE, normalize=False, lambda_=0.25)
    assert torch.equal(out, BASE + torch.tensor([6.5, 4.0, -2.0, -4.0]) * 0.25)


def test_ties_density_per_model_and_rescale():
    models = (BASE + T1, BASE + T2)
    # density .5 keeps 4 and −2 of τ1; .25 keeps 3 of τ2; the elected sign of 0 is +, τ1's 0 disagrees.
    out = run("mergekit_ties", models, (1.0, 1.0), BASE, density=[0.5, 0.25])
    assert torch.equal(out, BASE + torch.tensor([3.0, -2.0, 0.0, 4.0]))
    # L1 rescale: τ1's kept part × 7/6, τ2's × 8/3.
    out = run("mergekit_ties", models, (1.0, 1.0), BASE, density=(0.5, 0.25), rescale=True, normalize=False)
    assert torch.allclose(out, BASE + torch.tensor([8.0, -7 / 3, 0.0, 14 / 3]))


def test_magnitude_keeps_at_least_one_entry():
    out = run("mergekit_ties", (BASE + T1,), (1.0,), BASE, density=0.01)
    assert torch.equal(out, BASE + torch.tensor([0.0, 0.0, 0.0, 4.0]))
    assert torch.equal(run("mergekit_ties", (BASE + T1,), (1.0,), BASE, density=0.0), BASE)


def test_breadcrumbs_drops_the_largest_gamma_and_the_smallest():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    base = torch.zeros(10)
    # n = 10: keep int(.5·10) = 5 after dropping int(.2·10) = 2 largest: magnitudes 4 to 8.
    out = run("mergekit_breadcrumbs", (tau,), (1.0,), base, density=0.5, gamma=0.2)
    assert torch.equal(out, torch.where((tau.abs() >= 4) & (tau.abs() <= 8), tau, 0))
    # density .9 leaves room to drop only the largest one.
    out = run("mergekit_breadcrumbs", (tau,), (1.0,), base, density=0.9, gamma=0.2)
    assert torch.equal(out, torch.where(tau.abs() <= 9, tau, 0))
    # Per model gammas, weights, and TIES' election over the two breadcrumbs.
    out = run("breadcrumbs_ties", (tau, -tau), (2.0, 1.0), base, density=0.5, gamma=[0.2, 0.0])
    first = torch.where((tau.abs() >= 4) & (tau.abs() <= 8), 2 * tau, 0)
    second = torch.where(tau.abs() >= 6, -tau, 0)
    total = first + second
    elected = torch.where(total >= 0, 1.0, -1.0)
    expected = torch.where(first.sign() == elected, first, 0) + torch.where(second.sign() == elected, second, 0)
    assert torch.equal(out, expected)


def test_linear_weighted_average_and_sum():
    a, b = dyadic(1), dyadic(2)
    assert torch.equal(run("linear", (a, b), (1.0, 3.0)), (a + 3 * b) / 4)
    assert torch.equal(run("linear", (a, b), (1.0, 3.0), normalize=False), a + 3 * b)
    assert run("linear", (a.bfloat16(), b.bfloat16()), (0.5, 0.5)).dtype == torch.bfloat16


def test_model_stock_interpolates_by_the_mean_cosine():
    base = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    # Whole tensor: offsets (1, 0, 0, 0) and (0, 1, 0, 0) are orthogonal: t = 0, the base.
    m1, m2 = base + torch.tensor([[1.0, 0.0], [0.0, 0.0]]), base + torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert torch.equal(run("model_stock", (m1, m2), None, base), base)
    # Equal offsets: cos = 1, t = 2 / 2 = 1, the models' average.
    assert torch.equal(run("model_stock", (m1, m1), None, base), m1)
    # Per row: row 0 orthogonal (base), row 1 opposite (1 + cos = 0: singular, base), row 2 parallel.
    base = torch.zeros(3, 2)
    m1 = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    m2 = torch.tensor([[0.0, 1.0], [-1.0, -1.0], [4.0, 0.0]])
    out = run("model_stock", (m1, m2), None, base, filter_wise=True)
    assert torch.equal(out, torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]]))


def test_sce_weights_by_energy_and_elects_signs():
    base = torch.tensor([1.0, -1.0])
    t1, t2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    # Energies 2.5 and 5: weights 1/3, 2/3. Σ τ = (4, 1): +, +; τ2's −1 disagrees.
    out = run("sce", (base + t1, base + t2), None, base)
    assert torch.allclose(out, base + torch.tensor([7 / 3, 2.0]))
    # select_topk .5: of the two entries of non-zero variance, keep the one of larger variance (entry 1).
    out = run("sce", (base + t1, base + t2), None, base, select_topk=0.5)
    assert torch.allclose(out, base + torch.tensor([0.0, 2.0]))


def test_passthrough_returns_its_one_model_or_scales_it():
    m = dyadic(3)
    assert torch.equal(run("passthrough", (m,)), m)
    assert torch.equal(run("passthrough", (m,), scale=0.5), m * 0.5)
    assert torch.equal(run("passthrough", (m,), scale=[2.0]), m * 2)


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", GTA + ["sce"])
def test_one_model_of_weight_one_at_density_one_is_returned(name):
    base, m = dyadic(4), dyadic(5)
    assert torch.equal(run(name, (m,), (1.0,), base), m)
    assert torch.equal(run(name, (m.bfloat16(),), (1.0,), base.bfloat16()), m.bfloat16())


@pytest.mark.parametrize("name", ["mergekit_task_arithmetic", "mergekit_ties", "mergekit_breadcrumbs",
                                  "breadcrumbs_ties", "linear"])
def test_deterministic_methods_ignore_the_order_of_models(name):
    base, models, weights = dyadic(6), [dyadic(s) for s in (7, 8, 9)], [1.0, 2.0, 1.0]
    options = {"density": 0.5} if name != "linear" else {}
    forward = run(name, models, weights, base, **options)
    assert torch.equal(forward, run(name, models[::-1], weights[::-1], base, **options))


def test_linear_of_identical_models_is_the_model():
    m = dyadic(10)
    assert torch.equal(run("linear", (m, m, m), (1.0, 2.0, 1.0)), m)
    assert torch.allclose(run("linear", (m, m), (0.3, 0.7)), m)


def test_int8_mask_changes_nothing():
    base, models = dyadic(11), [dyadic(s) for s in (12, 13)]
    for name in ("mergekit_ties", "breadcrumbs_ties", "sce"):
        options = {"select_topk": 0.5} if name == "sce" else {"density": 0.6}
        plain = run(name, models, (0.7, 1.2), base, **options)
        assert torch.equal(plain, run(name, models, (0.7, 1.2), base, int8_mask=True, **options))


def test_results_keep_the_inputs_dtype_and_shape():
    base, models = dyadic(14).bfloat16(), [dyadic(s).bfloat16() for s in (15, 16)]
    for name in GTA + ["model_stock", "sce", "linear"]:
        out = run(name, models, (0.5, 0.5), base, density=0.5) if name in GTA else run(name, models, (0.5, 0.5), base)
        assert out.dtype == torch.bfloat16 and out.shape == base.shape, name


def test_models_and_base_of_different_dtypes_are_merged_in_the_promoted_dtype():
    base, m = dyadic(17), dyadic(18)
    out = run("mergekit_ties", (m.bfloat16(),), (1.0,), base)
    assert out.dtype == torch.float32 and torch.equal(out, m.bfloat16().float())


# ----------------------------------------------------------------------------- random masks


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_are_reproducible_for_a_seed(name):
    base, models = dyadic(19, (20, 30)), [dyadic(s, (20, 30)) for s in (20, 21)]
    first = run(name, models, (0.6, 0.9), base, seed=5, density=0.4)
    assert torch.equal(first, run(name, models, (0.6, 0.9), base, seed=5, density=0.4))
    assert not torch.equal(first, run(name, models, (0.6, 0.9), base, seed=6, density=0.4))


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
def test_random_drops_keep_about_density_and_the_l1_norm_with_rescale(name):
    g = torch.Generator().manual_seed(0)
    base, tau = torch.zeros(100, 100), torch.randn(100, 100, generator=g)
    out = run(name, (tau,), (1.0,), base, density=0.3, seed=1)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.03
    assert torch.allclose(out.abs().sum(), tau.abs().sum(), rtol=1e-4)
    plain = run(name, (tau,), (1.0,), base, density=0.3, seed=1, rescale=False)
    assert torch.equal(plain != 0, out != 0) and torch.equal(plain[plain != 0], tau[plain != 0])


def test_dare_with_rescale_preserves_the_task_vector_in_expectation():
    g = torch.Generator().manual_seed(1)
    base, tau = torch.zeros(64), torch.randn(64, generator=g)
    mean = sum(run("dare_linear", (tau,), (1.0,), base, density=0.5, seed=s) for s in range(300)) / 300
    # Per entry the standard error is |τ|/√300 (≈ 0.06|τ|): 5 of them.
    assert torch.all((mean - tau).abs() <= 0.3 * tau.abs() + 1e-3)


def test_della_keeps_large_magnitudes_more_often():
    base, tau = torch.zeros(1, 2000), torch.linspace(0.01, 1.0, 2000).unsqueeze(0)
    out = run("della_linear", (tau,), (1.0,), base, density=0.5, epsilon=0.4, seed=3)
    kept = out[0] != 0
    # Keep probabilities rise linearly from .1 to .9 with the rank.
    assert abs(kept[:500].float().mean().item() - 0.2) < 0.06
    assert abs(kept[-500:].float().mean().item() - 0.8) < 0.06


def test_random_masks_differ_between_models_and_tensors():
    base, models = torch.zeros(50, 40), [torch.ones(50, 40), torch.ones(50, 40)]
    block = Block("a", tuple(models), (1.0, 1.0), base, (50, 40), seed=2)
    spec = ta.methods()["dare_linear"]
    _, options = lookup("dare_linear", {"seed": 2, "density": 0.5, "rescale": False})
    out = spec.fn(block, **options)
    assert set(out.unique().tolist()) <= {0.0, 1.0, 2.0} and (out == 1).any()  # masks disagree somewhere
    other = spec.fn(Block("b", tuple(models), (1.0, 1.0), base, (50, 40), seed=2), **options)
    assert not torch.equal(out, other)


# ----------------------------------------------------------------------------- option errors


@pytest.mark.parametrize(("name", "options", "match"), [
    ("mergekit_ties", {"density": 1.5}, "density"),
    ("mergekit_ties", {"density": [0.5, -0.1]}, "density"),
    ("mergekit_ties", {"normalize": "yes"}, "normalize"),
    ("mergekit_ties", {"lambda_": float("nan")}, "lambda_"),
    ("mergekit_ties", {"lambda": 0.5}, "unknown option"),
    ("mergekit_ties", {"gamma": 0.1}, "unknown option"),
    ("mergekit_breadcrumbs", {"gamma": 2.0}, "gamma"),
    ("della", {"epsilon": 0.6, "seed": 1}, "epsilon"),
    ("mergekit_dare_ties", {}, "seed is required"),
    ("linear", {"normalize": 1}, "normalize"),
    ("passthrough", {"scale": "big"}, "scale"),
    ("model_stock", {"filter_wise": None}, "filter_wise"),
    ("sce", {"select_topk": 1.2}, "select_topk"),
])
def test_bad_options_are_refused_by_name(name, options, match):
    with pytest.raises(ta.TaskArithError, match=match):
        lookup(name, options)


def test_errors_raised_while_merging_say_what_to_change():
    base, models = dyadic(22), (dyadic(23), dyadic(24))
    with pytest.raises(ta.TaskArithError, match="2 per-model values .* for 1 models"):
        run("mergekit_ties", models[:1], (1.0,), base, density=[0.5, 0.5])
    with pytest.raises(ta.TaskArithError, match=r"density ± epsilon"):
        run("della", models, (1.0, 1.0), base, density=0.1, epsilon=0.15)
    with pytest.raises(ta.TaskArithError, match="sum to zero"):
        run("linear", models, (1.0, -1.0))
    with pytest.raises(ta.TaskArithError, match="exactly one model"):
        run("passthrough", models)
    with pytest.raises(ta.TaskArithError, match="at least two"):
        run("model_stock", models[:1], None, base)


def test_della_keeps_single_entry_rows_with_probability_density():
    """A column (one entry per row) has no magnitude rank; mergekit's bernoulli fails on its 0/0."""
    kept = run("della", (torch.ones(4000, 1),), (1.0,), torch.zeros(4000, 1), density=0.5, rescale=False, seed=3)
    assert 0.45 < float(kept.mean()) < 0.55
