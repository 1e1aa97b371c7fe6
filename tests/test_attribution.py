"""Integrated-gradient attributions over parameters, consolidation, and scale tuning.

Completeness is checked as the relative gap |Σ IG − gain| / |gain| on small
fine-tuned models. Tolerances (see TOLERANCE): with a smooth activation (GELU)
1e-4 for "gausslegendre" (8 steps) and "riemann_middle" / "riemann_trapezoid"
(16 steps); with ReLU, whose kinks along the path cost the rules their order,
5e-3; 1e-2 for the first-order "riemann_left" / "riemann_right" (64 steps)
with either. The BatchNorm CNN (ReLU) is held to 1e-3 at 8 steps.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import taskarith as ta
from strategies import FLOAT_DTYPES, layouts, vectors

captum = pytest.importorskip("captum")
from taskarith.attribution import METHODS, Attribution, CompletenessWarning, integrated_gradients

TOLERANCE = {
    "GELU": {"gausslegendre": 1e-4, "riemann_middle": 1e-4, "riemann_trapezoid": 1e-4,
             "riemann_left": 1e-2, "riemann_right": 1e-2},
    "ReLU": {"gausslegendre": 5e-3, "riemann_middle": 5e-3, "riemann_trapezoid": 5e-3,
             "riemann_left": 1e-2, "riemann_right": 1e-2},
}
STEPS = {"gausslegendre": 8, "riemann_middle": 16, "riemann_trapezoid": 16, "riemann_left": 64, "riemann_right": 64}


# ------------------------------------------------------------------ fixtures


def mlp(act=nn.ReLU) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), act(), nn.Linear(16, 8), act(), nn.Linear(8, 3))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def finetune(model: nn.Module, x, y, steps=20, lr=0.1) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def pair(make, x, y, seed=0, steps=20):
    """(pretrained, fine-tuned copy) of ``make()``."""
    torch.manual_seed(seed)
    pre = make()
    pre.train()
    with torch.no_grad():
        pre(x)  # BatchNorm running statistics away from their initial values
    tuned = make()
    tuned.load_state_dict(pre.state_dict())
    return pre, finetune(tuned, x, y, steps=steps)


def make_mlp_case(act):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 6, generator=gen), torch.randint(0, 3, (48,), generator=gen)
    pre, tuned = pair(lambda: mlp(act), x, y)
    return pre, ta.TaskVector.from_models(pre, tuned), x, y


@pytest.fixture(scope="module")
def mlp_case():
    return make_mlp_case(nn.ReLU)


@pytest.fixture(scope="module", params=["GELU", "ReLU"])
def mlp_cases(request):
    return request.param, make_mlp_case(getattr(nn, request.param))


@pytest.fixture(scope="module")
def cnn_case():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    pre, tuned = pair(cnn, x, y)
    return pre, ta.TaskVector.from_models(pre, tuned), x, y


def total(attribution) -> float:
    return math.fsum(float(attribution[n].double().sum()) for n in attribution._layout.slots)


def objective_at(model, state, x, y) -> float:
    """F in eval mode at the given parameters (buffers from the model)."""
    params = dict(model.named_parameters())
    params.update({n: t for n, t in state.items() if n in params})
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(-nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y))
    finally:
        model.train(was)


# ------------------------------------------------------------- completeness


@pytest.mark.parametrize("method", METHODS)
def test_completeness_mlp_every_method(mlp_cases, method):
    act, (pre, tv, x, y) = mlp_cases
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompletenessWarning)
        ig = integrated_gradients(pre, pre, tv, (x, y), n_steps=STEPS[method], method=method, points_per_forward=16)
    assert isinstance(ig, Attribution) and set(ig) == set(tv)
    theta1 = {n: p.detach() + tv[n] for n, p in pre.named_parameters()}
    gain = objective_at(pre, theta1, x, y) - objective_at(pre, {}, x, y)
    assert ig.gain == pytest.approx(gain, rel=1e-5)
    assert abs(total(ig) - ig.gain) <= TOLERANCE[act][method] * abs(ig.gain), f"{act} {method}: {ig.relative_gap:.2e}"
    assert ig.delta == pytest.approx(total(ig) - ig.gain, abs=1e-9)


def test_completeness_cnn_batchnorm_in_train_mode(cnn_case):
    pre, tv, x, y = cnn_case
    assert pre.training and any("running_mean" in n for n in tv)
    before = {n: t.clone() for n, t in pre.state_dict().items()}
    ig = integrated_gradients(pre, pre, tv, (x, y), n_steps=8, batch_size=16)
    assert ig.relative_gap < 1e-3
    # Buffers stay at θ0 and get zero attribution; the model is left as it was.
    assert pre.training and all(m.training for m in pre.modules())
    assert all(torch.equal(before[n], t) for n, t in pre.state_dict().items())
    for name in tv:
        if "running" in name:
            assert not ig[name].any(), name
    # The gain is F(θ0 + τ) − F(θ0) in eval mode with θ0's buffers, summed over the two batches.
    theta1 = {n: p.detach() + tv[n] for n, p in pre.named_parameters()}
    halves = [(x[:16], y[:16]), (x[16:], y[16:])]
    gain = sum(objective_at(pre, theta1, a, b) - objective_at(pre, {}, a, b) for a, b in halves)
    assert ig.gain == pytest.approx(gain, rel=1e-5)


def test_vectorised_equals_looped(cnn_case):
    pre, tv, x, y = cnn_case
    looped = integrated_gradients(pre, pre, tv, (x, y), n_steps=4)
    for points in (3, None):
        vectorised = integrated_gradients(pre, pre, tv, (x, y), n_steps=4, points_per_forward=points)
        assert vectorised.allclose(looped, rtol=1e-4, atol=1e-7), points


# ------------------------------------------------------ against a hand loop


def gradient_at(model, theta0, tv, alpha, x, y):
    """∂F/∂θ at θ0 + α·τ, by autograd, no Captum."""
    point = {n: (theta0[n] + alpha * tv[n]).requires_grad_() for n in theta0}
    model.eval()
    out = torch.func.functional_call(model, point, (x,))
    value = -nn.functional.cross_entropy(out, y)
    grads = torch.autograd.grad(value, list(point.values()))
    return dict(zip(point, grads))


def hand_ig(model, tv, x, y, alphas, weights):
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = {n: torch.zeros_like(t) for n, t in theta0.items()}
    for alpha, weight in zip(alphas, weights):
        for n, g in gradient_at(model, theta0, tv, float(alpha), x, y).items():
            result[n] += float(weight) * g
    return {n: r * tv[n] for n, r in result.items()}


@pytest.mark.parametrize("method,n_steps", [("gausslegendre", 5), ("riemann_trapezoid", 6), ("riemann_middle", 4)])
def test_matches_hand_written_path_loop(mlp_case, method, n_steps):
    pre, tv, x, y = mlp_case
    if method == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(n_steps)
        alphas, weights = (nodes + 1) / 2, w / 2
    elif method == "riemann_trapezoid":  # the textbook rule: weights 1/(n-1), halved at both ends
        alphas = np.linspace(0, 1, n_steps)
        weights = np.full(n_steps, 1 / (n_steps - 1))
        weights[[0, -1]] /= 2
    else:
        alphas, weights = (np.arange(n_steps) + 0.5) / n_steps, np.full(n_steps, 1 / n_steps)
    expected = hand_ig(pre, tv, x, y, alphas, weights)
    ig = integrated_gradients(pre, pre, tv, (x, y), n_steps=n_steps, method=method, check_completeness=False)
    for n, e in expected.items():
        torch.testing.assert_close(ig[n], e, rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"{method} {n}: {m}")


def test_one_step_is_midpoint_gradient_times_tau(mlp_case):
    pre, tv, x, y = mlp_case
    theta0 = {n: p.detach().clone() for n, p in pre.named_parameters()}
    grads = gradient_at(pre, theta0, tv, 0.5, x, y)
    pre.train()
    ig = integrated_gradients(pre, pre, tv, (x, y), n_steps=1, check_completeness=False)
    for n, g in grads.items():
        torch.testing.assert_close(ig[n], g * tv[n], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------- data handling


@pytest.mark.slow
def test_batches_add_up_and_sources_agree(mlp_case):
    pre, tv, x, y = mlp_case
    whole_pair = integrated_gradients(pre, pre, tv, (x, y), batch_size=20)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    from_loader = integrated_gradients(pre, pre, tv, loader)
    parts = [integrated_gradients(pre, pre, tv, (x[i:i + 20], y[i:i + 20])) for i in range(0, 48, 20)]
    assert from_loader.allclose(whole_pair, rtol=0, atol=0)
    summed = sum(parts[1:], parts[0] * 1.0)
    assert whole_pair.allclose(summed, rtol=1e-5, atol=1e-8)
    assert whole_pair.gain == pytest.approx(sum(p.gain for p in parts), rel=1e-6)
    generator = ((x[i:i + 20], y[i:i + 20]) for i in range(0, 48, 20))
    assert integrated_gradients(pre, pre, tv, generator).allclose(whole_pair, rtol=0, atol=0)


def test_custom_objective_and_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 1), nn.Linear(2, 1)

        def forward(self, u, v):
            return torch.tanh(self.a(u) + self.b(v)).squeeze(-1)

    torch.manual_seed(0)
    pre, tuned = Two(), Two()
    tv = ta.TaskVector.from_models(pre, tuned)
    u, v, t = torch.randn(10, 3), torch.randn(10, 2), torch.randn(10)
    ig = integrated_gradients(pre, pre.state_dict(), tv, ((u, v), t),
                              objective=lambda out, tgt: -((out - tgt) ** 2).mean())
    assert ig.relative_gap < 1e-3


@pytest.mark.slow
def test_bfloat16_model_is_interpolated_in_float32():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(48, 6, generator=gen).to(torch.bfloat16), torch.randint(0, 3, (48,), generator=gen)
    pre, tuned = (copy.deepcopy(m).to(torch.bfloat16) for m in pair(lambda: mlp(nn.GELU), x.float(), y))
    tv = ta.TaskVector.from_models(pre, tuned)
    ig = integrated_gradients(pre, pre, tv, (x, y))
    assert ig.dtype == torch.float32 and ig.relative_gap < 1e-4
    # The same (bfloat16-valued) weights held in float32 give the same attributions.
    pre32, tuned32 = (copy.deepcopy(m).float() for m in (pre, tuned))
    ig32 = integrated_gradients(pre32, pre32, ta.TaskVector.from_models(pre32, tuned32), (x.float(), y))
    assert ig.allclose(ig32, rtol=1e-5, atol=1e-8)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


def test_tied_weights_are_attributed_once():
    torch.manual_seed(0)
    pre, tuned = Tied(), Tied()
    tokens, labels = torch.randint(0, 7, (20,)), torch.randint(0, 7, (20,))
    tv = ta.TaskVector.from_models(pre, tuned)
    assert tv.aliases == {"head.weight": "embed.weight"}
    ig = integrated_gradients(pre, pre, tv, (tokens, labels))
    assert ig.aliases == tv.aliases and ig.numel() == 28
    assert ig["head.weight"].data_ptr() == ig["embed.weight"].data_ptr()
    assert ig.relative_gap < 1e-3


# ------------------------------------------------------------------ errors


def test_bad_inputs_raise_task_arith_error(mlp_case):
    pre, tv, x, y = mlp_case
    data = (x, y)
    extra = ta.TaskVector({**{n: tv[n] for n in tv}, "head.bias": torch.zeros(3)})
    with pytest.raises(ta.KeyMismatchError, match="head.bias"):
        integrated_gradients(pre, pre, extra, data)
    wrong = ta.TaskVector({n: (torch.zeros(2) if n == "0.bias" else tv[n]) for n in tv})
    with pytest.raises(ta.ShapeMismatchError, match="0.bias"):
        integrated_gradients(pre, pre, wrong, data)
    missing = {n: t for n, t in pre.state_dict().items() if n != "4.bias"}
    with pytest.raises(ta.KeyMismatchError, match="4.bias"):
        integrated_gradients(pre, missing, tv, data)
    with pytest.raises(ta.TaskArithError, match=r"shape \(48,\)"):
        integrated_gradients(pre, pre, tv, data,
                             objective=lambda out, t: -nn.functional.cross_entropy(out, t, reduction="none"))
    with pytest.raises(ta.TaskArithError, match="0-d tensor"):
        integrated_gradients(pre, pre, tv, data, objective=lambda out, t: float(out.detach().mean()))
    with pytest.raises(ta.TaskArithError, match="differentiabl"):
        integrated_gradients(pre, pre, tv, data, objective=lambda out, t: (out.argmax(1) == t).float().mean())
    for empty in [(x[:0], y[:0]), [], torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]))]:
        with pytest.raises(ta.TaskArithError, match="no (batches|examples)"):
            integrated_gradients(pre, pre, tv, empty)
    bad_options = [
        dict(method="riemann"), dict(n_steps=0), dict(n_steps=2.5), dict(method="riemann_left", n_steps=1),
        dict(batch_size=0), dict(points_per_forward=0), dict(rtol=0), dict(objective="nll"),
        dict(check_completeness="yes"),
    ]
    for options in bad_options:
        with pytest.raises(ta.TaskArithError):
            integrated_gradients(pre, pre, tv, data, **options)
    with pytest.raises(ta.TaskArithError, match="gausslegendre"):
        integrated_gradients(pre, pre, tv, data, method="trapezoid")
    with pytest.raises(ta.TaskArithError, match="single tensor"):
        integrated_gradients(pre, pre, tv, x)
    with pytest.raises(ta.TaskArithError, match="batch_size"):
        integrated_gradients(pre, pre, tv, [(x, y)], batch_size=4)
    with pytest.raises(ta.TaskArithError, match="batch #0"):
        integrated_gradients(pre, pre, tv, [x])
    with pytest.raises(ta.TaskArithError, match="first"):
        integrated_gradients(pre, pre, tv, (x, y[:5]))
    with pytest.raises(ta.TaskArithError, match="nn.Module"):
        integrated_gradients(pre.state_dict(), pre, tv, data)


def test_completeness_warning(mlp_case):
    pre, tv, x, y = mlp_case
    big = tv * 40.0  # a long path through many ReLU kinks: one midpoint cannot integrate it
    with pytest.warns(CompletenessWarning, match="n_steps"):
        integrated_gradients(pre, pre, big, (x, y), n_steps=1, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompletenessWarning)
        integrated_gradients(pre, pre, big, (x, y), n_steps=1, check_completeness=False)


def test_import_taskarith_does_not_import_captum():
    code = (
        "import sys, taskarith as ta; ta.consolidate; ta.attribution.tune_scale; ta.attribution.integrated_gradients; "
        "from taskarith import consolidate; from taskarith.attribution import tune_scale; "
        "assert 'captum' not in sys.modules, 'captum imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------- consolidate


@st.composite
def integer_vectors(draw, n_vectors, dtypes=(torch.float32, torch.float64), nonzero=False):
    """Vectors (and score maps) of integer values, so every sum is exact and order cannot matter."""
    layout = draw(layouts(list(dtypes)))
    lo = 1 if nonzero else 0
    out = []
    for _ in range(n_vectors):
        state = {}
        for name, (shape, dtype) in layout.items():
            size = math.prod(shape)
            mags = draw(st.lists(st.integers(lo, 50), min_size=size, max_size=size))
            signs = draw(st.lists(st.sampled_from([-1, 1]), min_size=size, max_size=size))
            state[name] = torch.tensor([m * s for m, s in zip(mags, signs)], dtype=dtype).reshape(shape)
        out.append(ta.TaskVector(state))
    return out


def random_scores(draw, vs):
    return [{n: v[n].clone().apply_(lambda _: draw(st.integers(-20, 20))).float() for n in v} for v in vs]


def ties_reference(vs, density, scope):
    """TIES written out plainly: trim to floor(density*n) by |τ| (ties to the lowest index, the
    tensors in sorted name order), elect the sign of the sum (ties to +), average the values that
    agree with it."""
    names = sorted(vs[0]._layout.slots)

    def trim(v):
        if scope == "tensor":
            chunks = [v[n].reshape(-1).double() for n in names]
        else:
            chunks = [torch.cat([v[n].reshape(-1).double() for n in names])] if names else []
        kept = []
        for flat in chunks:
            k = math.floor(density * flat.numel())
            order = torch.sort(-flat.abs(), stable=True).indices[:k]
            t = torch.zeros_like(flat)
            t[order] = flat[order]
            kept.append(t)
        flat = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.float64)
        out, start = {}, 0
        for n in names:
            out[n] = flat[start:start + v[n].numel()].view(v[n].shape)
            start += v[n].numel()
        return out

    trimmed = [trim(v) for v in vs]
    merged = {}
    for n in names:
        stack = torch.stack([t[n] for t in trimmed])
        sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(stack) == sign) & (stack != 0)
        merged[n] = torch.where(agree, stack, 0).sum(0) / agree.sum(0).clamp_min(1)
    return merged


@given(vs=integer_vectors(3), density=st.sampled_from([0.1, 0.2, 0.25, 0.5, 0.9, 1.0]),
       scope=st.sampled_from(["global", "tensor"]))
def test_magnitude_consolidation_is_ties(vs, density, scope):
    got = ta.consolidate(vs, None, density=density, scope=scope, select="abs", resolve="sign_sum",
                         merge="disjoint_mean")
    expected = ties_reference(vs, density, scope)
    for n, e in expected.items():
        torch.testing.assert_close(got[n].double(), e, rtol=1e-6, atol=0, msg=lambda m, n=n: f"{n} ({scope}): {m}")
    # With magnitude scores, "attribution" elects the same sign as "sign_sum" (integer values: no rounding).
    same = ta.consolidate(vs, density=density, scope=scope, select="positive", resolve="attribution")
    assert same.equal(got)


@given(vs=vectors(n=3, dtypes=[torch.float32, torch.float64, torch.bfloat16], max_abs=1e3),
       density=st.sampled_from([0.1, 0.2, 0.5, 1.0]), scope=st.sampled_from(["global", "tensor"]))
def test_magnitude_consolidation_equals_merge_ties(vs, density, scope):
    """consolidate(scores=None, "abs", "sign_sum", "disjoint_mean") is taskarith.merge's TIES (scale 1)."""
    merging = pytest.importorskip("taskarith.merging")
    if "ties" not in merging.methods():
        pytest.skip("no 'ties' merge method registered")
    got = ta.consolidate(vs, density=density, scope=scope, select="abs", resolve="sign_sum", merge="disjoint_mean")
    expected = ta.merge(vs, "ties", density=density, scope=scope, sign="sum", scale=1.0)
    assert got.equal(expected), f"density={density} scope={scope}"


def test_ties_at_the_threshold_go_to_the_lowest_index():
    a = ta.TaskVector({"w": torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5])})
    for scope in ("global", "tensor"):
        got = ta.consolidate([a], density=0.4, scope=scope, select="abs", resolve="sign_sum")
        assert got["w"].tolist() == [0.0, -2.0, 2.0, 0.0, 0.0]


@given(vs=integer_vectors(1, dtypes=FLOAT_DTYPES, nonzero=True), density=st.floats(0.01, 1.0),
       scope=st.sampled_from(["global", "tensor"]), data=st.data())
def test_exactly_k_entries_kept_per_vector(vs, density, scope, data):
    (v,) = vs
    names = list(v._layout.slots)
    sizes = [v.numel()] if scope == "global" else [v[n].numel() for n in names]
    k = sum(math.floor(density * s) for s in sizes)
    by_magnitude = ta.consolidate([v], density=density, scope=scope, select="abs")
    assert sum(int(by_magnitude[n].count_nonzero()) for n in names) == k
    scores = random_scores(data.draw, [v])
    by_abs = ta.consolidate([v], scores, density=density, scope=scope, select="abs", resolve="max")
    assert sum(int(by_abs[n].count_nonzero()) for n in names) == k
    positive = ta.consolidate([v], scores, density=density, scope=scope, select="positive")
    if scope == "global":
        expected = min(k, sum(int((scores[0][n] > 0).sum()) for n in names))
    else:
        expected = sum(min(math.floor(density * v[n].numel()), int((scores[0][n] > 0).sum())) for n in names)
    assert sum(int(positive[n].count_nonzero()) for n in names) == expected
    for n in names:  # only positive scores are ever kept, and kept values are the vector's own
        kept = positive[n] != 0
        assert bool((scores[0][n][kept] > 0).all())
        assert torch.equal(positive[n][kept], v[n][kept])


@given(vs=vectors(n=1, max_abs=1e3), select=st.sampled_from(["positive", "abs"]),
       resolve=st.sampled_from(["attribution", "sign_sum", "max"]), merge=st.sampled_from(["disjoint_mean", "sum"]))
def test_density_one_single_vector_is_identity(vs, select, resolve, merge):
    (v,) = vs
    got = ta.consolidate([v], density=1.0, select=select, resolve=resolve, merge=merge)
    assert list(got) == list(v) and got.dtypes == v.dtypes
    assert got.equal(v)


@given(vs=integer_vectors(3), data=st.data(), density=st.sampled_from([0.2, 0.5, 1.0]),
       resolve=st.sampled_from(["attribution", "sign_sum"]), merge=st.sampled_from(["disjoint_mean", "sum"]),
       select=st.sampled_from(["positive", "abs"]), with_scores=st.booleans())
def test_order_of_vectors_does_not_matter(vs, data, density, resolve, merge, select, with_scores):
    scores = random_scores(data.draw, vs) if with_scores else None
    order = data.draw(st.permutations(range(3)))
    options = dict(density=density, resolve=resolve, merge=merge, select=select)
    a = ta.consolidate(vs, scores, **options)
    b = ta.consolidate([vs[i] for i in order], None if scores is None else [scores[i] for i in order], **options)
    assert a.equal(b)


@given(vs=integer_vectors(3), data=st.data())
def test_max_keeps_the_best_scored_value(vs, data):
    scores = random_scores(data.draw, vs)
    got = ta.consolidate(vs, scores, density=1.0, select="abs", resolve="max")
    for n in vs[0]._layout.slots:
        ranked = torch.stack([s[n].abs() for s in scores])
        winner = ranked.argmax(0)
        expected = torch.stack([v[n] for v in vs]).gather(0, winner.unsqueeze(0)).squeeze(0)
        assert torch.equal(got[n], expected)


def test_attribution_resolve_and_merge_by_hand():
    a = ta.TaskVector({"w": torch.tensor([1.5, 1.0, -3.0])})
    b = ta.TaskVector({"w": torch.tensor([-1.0, 3.0, 1.0])})
    c = ta.TaskVector({"w": torch.tensor([-1.0, 1.0, 4.0])})
    scores = [{"w": torch.tensor([5.0, 1.0, 1.0])}, {"w": torch.tensor([1.0, 1.0, 2.0])},
              {"w": torch.tensor([1.0, 1.0, 2.0])}]
    # entry 0: "+" carries score 5, "-" 1 + 1 = 2, so "+" wins, though 1.5 - 1 - 1 < 0 elects "-" by sum;
    # entry 1: every sign agrees; entry 2: "+" carries 2 + 2 = 4 against 1 for "-".
    mean = ta.consolidate([a, b, c], scores, density=1.0, resolve="attribution")
    assert mean["w"].tolist() == pytest.approx([1.5, 5.0 / 3.0, 2.5])
    total = ta.consolidate([a, b, c], scores, density=1.0, resolve="attribution", merge="sum")
    assert total["w"].tolist() == [1.5, 5.0, 5.0]
    by_sum = ta.consolidate([a, b, c], scores, density=1.0, resolve="sign_sum")
    assert by_sum["w"].tolist() == pytest.approx([-1.0, 5.0 / 3.0, 2.5])
    best = ta.consolidate([a, b, c], scores, density=1.0, resolve="max")
    assert best["w"].tolist() == [1.5, 1.0, 1.0]  # score ties go to the earliest vector
    negative = [{"w": -s["w"]} for s in scores]
    assert not ta.consolidate([a, b, c], negative, density=1.0)["w"].any()  # nothing positive: nothing kept
    assert ta.consolidate([a, b, c], negative, density=1.0, select="abs").equal(mean)


def test_consolidate_keeps_tied_names_and_provenance():
    torch.manual_seed(0)
    pre, t1, t2 = Tied(), Tied(), Tied()
    vs = [ta.TaskVector.from_models(pre, t) for t in (t1, t2)]
    got = ta.consolidate(vs, density=0.5)
    assert got.aliases == vs[0].aliases and got.numel() == 28
    assert got.base_fingerprint == vs[0].base_fingerprint
    assert set(got.apply_to(pre)) == set(pre.state_dict())


def test_consolidate_bad_inputs():
    a = ta.TaskVector({"w": torch.ones(4), "b": torch.ones(2)})
    b = ta.TaskVector({"w": torch.ones(4), "b": torch.ones(2)})
    good = {"w": torch.ones(4), "b": torch.ones(2)}
    for options, valid in [(dict(scope="layer"), "'global', 'tensor'"), (dict(select="neg"), "'positive', 'abs'"),
                           (dict(resolve="vote"), "'attribution', 'sign_sum', 'max'"),
                           (dict(merge="mean"), "'disjoint_mean', 'sum'")]:
        with pytest.raises(ta.TaskArithError, match=valid):
            ta.consolidate([a, b], **options)
    for density in (0, 1.5, -0.1, True, "0.2", float("nan")):
        with pytest.raises(ta.TaskArithError, match="density"):
            ta.consolidate([a, b], density=density)
    with pytest.raises(ta.TaskArithError, match="at least one"):
        ta.consolidate([])
    with pytest.raises(ta.TaskArithError, match="list of TaskVector"):
        ta.consolidate(a)
    with pytest.raises(ta.TaskArithError, match="task vectors only"):
        ta.consolidate([a, good])
    with pytest.raises(ta.KeyMismatchError):
        ta.consolidate([a, ta.TaskVector({"w": torch.ones(4)})])
    with pytest.raises(ta.TaskArithError, match="one per vector"):
        ta.consolidate([a, b], [good])
    with pytest.raises(ta.KeyMismatchError, match="'b'"):
        ta.consolidate([a, b], [good, {"w": torch.ones(4)}])
    with pytest.raises(ta.ShapeMismatchError, match="'w'"):
        ta.consolidate([a, b], [good, {"w": torch.ones(5), "b": torch.ones(2)}])
    with pytest.raises(ta.ShapeMismatchError, match="NaN"):
        ta.consolidate([a, b], [good, {"w": torch.full((4,), float("nan")), "b": torch.ones(2)}])
    with pytest.raises(ta.TaskArithError, match="one mapping per vector"):
        ta.consolidate([a, b], good)


# -------------------------------------------------------------- tune_scale


def test_tune_scale_picks_the_best_and_the_first_of_ties():
    tv = ta.TaskVector({"w": torch.tensor([1.0])})
    base = {"w": torch.tensor([0.0])}
    assert ta.attribution.tune_scale(base, tv, lambda s: -abs(s["w"].item() - 1.5)) == 1.5
    assert ta.attribution.tune_scale(base, tv, lambda s: 1.0, grid=[0.7, 0.2]) == 0.7
    assert ta.attribution.tune_scale(base, tv, lambda s: torch.tensor(-(s["w"].item() - 0.3) ** 2), grid=[0.1, 0.3]) == 0.3
    for grid in ([], [float("inf")], "0.5", [True]):
        with pytest.raises(ta.TaskArithError, match="grid"):
            ta.attribution.tune_scale(base, tv, lambda s: 0.0, grid=grid)
    with pytest.raises(ta.TaskArithError, match="real number"):
        ta.attribution.tune_scale(base, tv, lambda s: float("nan"))
    with pytest.raises(ta.TaskArithError, match="callable"):
        ta.attribution.tune_scale(base, tv, "accuracy")
    with pytest.raises(ta.TaskArithError, match="TaskVector"):
        ta.attribution.tune_scale(base, {"w": torch.ones(1)}, lambda s: 0.0)
