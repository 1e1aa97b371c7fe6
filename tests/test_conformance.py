"""Conformance of every registered merge method, built-in or registered here through the public API.

For each method: in memory (``ta.merge``) equals out of core (``ta.merge_files``) bit for bit at
tiny and large memory budgets and one or two threads, with and without a base model; the
whole-vector form of a built-in equals its per-block form; the invariants a method declares
(order of inputs, identity on one vector) hold; CPU equals CUDA where a GPU is present.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from safetensors.torch import save_file

import taskarith as ta
from taskarith.backends import draws
from taskarith.merging import DENSITY, SCOPE, SEED, Option, _engine, _registry

SHAPES = {"embed.weight": (41, 7), "layer.0.weight": (13, 11), "layer.0.bias": (11,), "conv.weight": (4, 3, 5),
          "head.weight": (3, 13)}
SVD_BASED = {"tsv", "iso_c"}


# ------------------------------------------------- methods registered through the public API


def keep_larger(block):
    """Element-wise: per entry, the weighted delta of largest magnitude (first on ties)."""
    stacked = torch.stack([w * d for d, w in zip(block.deltas, block.weights)])
    return stacked.gather(0, stacked.abs().argmax(0, keepdim=True))[0]


def random_keep(block, *, seed, keep):
    """Randomized: keep each weighted delta with probability ``keep``, rescaled, then sum."""
    out = torch.zeros_like(block.deltas[0])
    for i, (d, w) in enumerate(zip(block.deltas, block.weights)):
        out += torch.where(block.random(i) < keep, d * w / keep, 0)
    return out


def relative(block, *, eps):
    """Base-using, by rows: the weighted sum, damped where the pretrained weights are large."""
    total = sum(w * d for d, w in zip(block.deltas, block.weights))
    return total / (1 + block.base.float().abs() / eps)


def norm_balanced(block):
    """Global statistics: each delta scaled to the mean RMS of all inputs over the whole model."""
    sq, count = block.stats[:-1], block.stats[-1]
    rms = (sq / count).sqrt()
    target = rms.mean()
    return sum(w * d * (target / r if r > 0 else 0.0) for d, w, r in zip(block.deltas, block.weights, rms.tolist()))


def squares(block):
    """Per input, the sum of squares of the chunk (float64), and the chunk's entry count last."""
    return torch.tensor([float(d.double().square().sum()) for d in block.deltas] + [block.deltas[0].numel()],
                        dtype=torch.float64)


def trimmed_sum(block, *, density, scope):
    """A user method with ``trim=True``: the weighted sum of the engine-trimmed deltas."""
    return sum(w * d for d, w in zip(block.deltas, block.weights))


CUSTOM = {
    "conf_keep_larger": {"fn": keep_larger, "split": "elementwise", "symmetric": False, "identity": {}},
    "conf_random_keep": {"fn": random_keep, "split": "elementwise", "randomized": True,
                             "options": {"seed": SEED, "keep": Option(0.5, lambda x: 0 < x <= 1, "(0, 1]")},
                             "identity": {"keep": 1.0}},
    "conf_relative": {"fn": relative, "split": "rows", "needs_base": True,
                          "options": {"eps": Option(1.0, lambda x: x > 0, "> 0")}},
    "conf_norm_balanced": {"fn": norm_balanced, "split": "elementwise", "statistic": squares},
    "conf_trimmed_sum": {"fn": trimmed_sum, "split": "elementwise", "trim": True, "symmetric": True,
                             "options": {"density": DENSITY, "scope": SCOPE}, "identity": {"density": 1.0}},
}


@pytest.fixture(scope="module", autouse=True)
def custom_methods():
    for name, spec in CUSTOM.items():
        ta.register(name, spec["fn"], paper="n/a", **{k: v for k, v in spec.items() if k != "fn"})
    yield
    for name in CUSTOM:
        ta.merging.unregister(name)


def _names() -> list[str]:
    return sorted(set(ta.methods()) | set(CUSTOM))


ONE_MODEL = {"slerp", "nearswap", "arcee_fusion", "passthrough"}  # the base and one model
TWO_MODELS = {"nuslerp"}


def _count(name: str) -> int:
    """How many models the method merges in these checks."""
    return 1 if name in ONE_MODEL else 2 if name in TWO_MODELS else 3


def _on_weights(name: str) -> bool:
    spec = ta.methods().get(name)
    return spec is not None and spec.inputs == "weights"


def _options(name: str, scope: str = "tensor") -> dict:
    spec = ta.methods()[name]
    options = {}
    if "t" in spec.options:
        options["t"] = 0.3
    if "density" in spec.options and _on_weights(name):
        options["density"] = (0.5, 0.4, 0.7)[:_count(name)]
    if spec.randomized:
        options["seed"] = 11
    if spec.trim:
        options.update(density=0.3, scope=scope)
    if "drop" in spec.options:
        options["drop"] = 0.4
    if "top" in spec.options:
        options.update(top=0.1, density=0.5)
    if "k" in spec.options:
        options["k"] = 2
    if "scores" in spec.options:  # consolidation by the deltas' magnitudes
        options.update(select="abs", resolve="sign_sum")
    return options


def _state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in SHAPES.items()}


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _save_models(root, base: dict, tuned: list[dict]) -> list:
    """``base.safetensors`` and ``ft<i>.safetensors`` in ``root``; the fine-tuned files' paths."""
    save_file(base, root / "base.safetensors")
    paths = [root / f"ft{i}.safetensors" for i in range(len(tuned))]
    for path, state in zip(paths, tuned):
        save_file(state, path)
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base model and three fine-tuned ones (float32), as files and as task vectors."""
    root = tmp_path_factory.mktemp("conformance")
    base = _state(0)
    tuned = [{n: t + 0.1 * (i + 1) * torch.randn(t.shape, generator=torch.Generator().manual_seed(10 + i))
              for n, t in base.items()} for i in range(3)]
    paths = _save_models(root, base, tuned)
    # In memory the tensors keep SHAPES' order; the files hold them sorted by name (safetensors'
    # order): a global trim, statistic or plan must not depend on either.
    vectors = [ta.TaskVector.from_models(base, state) for state in tuned]
    vector_paths = []
    for i, v in enumerate(vectors):
        vector_paths.append(root / f"tv{i}.safetensors")
        v.save(vector_paths[-1])
    return root, base, paths, vectors, vector_paths


# ----------------------------------------------------------------------------- the checks


def _merged_weights(name: str, root, paths, weights, options) -> dict[str, torch.Tensor]:
    """A method of weights run on the stored weights, tensor by tensor: what merge_files must write."""
    spec, options = _registry.lookup(name, options)
    base = ta.io.load_state_dict(root / "base.safetensors")
    models = [ta.io.load_state_dict(p) for p in paths]
    return {n: _engine.call(spec, n, [m[n] for m in models], weights, options,
                            base=base[n] if _engine.reads_base(spec, options) else None).to(base[n].dtype)
            for n in SHAPES}


@pytest.mark.parametrize("name", _names())
@pytest.mark.parametrize("budget", [1, 3000, "1GB"], ids=["row-by-row", "small", "large"])
@pytest.mark.parametrize("threads", [1, 2])
def test_out_of_core_equals_in_memory(models, tmp_path, name, budget, threads):
    root, base, paths, vectors, vector_paths = models
    n = _count(name)
    weights, paths, vectors, vector_paths = [0.7, 1.3, -0.4][:n], paths[:n], vectors[:n], vector_paths[:n]
    options = _options(name)
    spec = ta.methods()[name]
    if _on_weights(name):  # the stored weights in, bit for bit; in memory, weights rebuilt as base + delta
        with _threads(threads):
            out = ta.merge_files(root / "base.safetensors", paths, tmp_path / "m", name, weights=weights,
                                 max_memory=budget, **options)
        merged, expected = ta.io.load_state_dict(out), _merged_weights(name, root, paths, weights, options)
        assert all(torch.equal(merged[t], expected[t]) for t in SHAPES), name
        rebuilt = ta.merge(vectors, name, weights=weights, base=base, **options).apply_to(base)
        assert all(torch.allclose(rebuilt[t], expected[t], atol=1e-4) for t in SHAPES), name
        return
    expected = ta.merge(vectors, name, weights=weights, base=base if spec.needs_base else None, **options)
    with _threads(threads):
        if name in SVD_BASED:  # LAPACK's SVD bits depend on its thread count: compare at the same count
            expected = ta.merge(vectors, name, weights=weights, **options)
        if not spec.needs_base:
            out = ta.merge_files(None, vector_paths, tmp_path / "v.safetensors", name, weights=weights,
                                 max_memory=budget, **options)
            got = ta.load(out)
            assert all(torch.equal(got[n], expected[n]) for n in SHAPES), name
        out = ta.merge_files(root / "base.safetensors", paths, tmp_path / "m", name, weights=weights,
                             max_memory=budget, **options)
    applied = expected.apply_to(base)
    merged = ta.io.load_state_dict(out)
    bad = [n for n in SHAPES if not torch.equal(merged[n], applied[n])]
    assert not bad, f"{name}: out of core differs from in memory in {bad}"


@pytest.fixture(scope="module")
def half_models(tmp_path_factory):
    """A bfloat16 base and three fine-tuned models, whose deltas tie often at a trim's threshold; in
    memory the tensors keep SHAPES' order, the files hold them sorted by name."""
    root = tmp_path_factory.mktemp("conformance-bf16")
    base = _state(0, torch.bfloat16)
    tuned = [{n: (t.float() + 0.05 * torch.randint(-2, 3, t.shape, generator=torch.Generator().manual_seed(20 + i))
                  * t.float().abs()).bfloat16() for n, t in base.items()} for i in range(3)]
    paths = _save_models(root, base, tuned)
    return root, base, paths, [ta.TaskVector.from_models(base, state) for state in tuned]


@pytest.mark.parametrize("name", _names())
@pytest.mark.parametrize("budget", [1, "1GB"], ids=["row-by-row", "large"])
def test_bfloat16_models_merge_the_same_in_memory_and_out_of_core(half_models, tmp_path, name, budget):
    # Every method, of deltas or of weights: from bfloat16 models the rebuilt weights are the stored
    # ones, so the two drivers agree bit for bit.
    root, base, paths, vectors = half_models
    n = _count(name)
    weights, paths, vectors = [0.7, 1.3, -0.4][:n], paths[:n], vectors[:n]
    options = _options(name, scope="global")
    spec = ta.methods()[name]
    with_base = spec.needs_base or _on_weights(name)
    expected = ta.merge(vectors, name, weights=weights, base=base if with_base else None, **options).apply_to(base)
    out = ta.merge_files(root / "base.safetensors", paths, tmp_path / "m", name, weights=weights,
                         max_memory=budget, **options)
    merged = ta.io.load_state_dict(out)
    bad = [t for t in SHAPES if not torch.equal(merged[t], expected[t])]
    assert not bad, f"{name}: out of core differs from in memory in {bad}"


@pytest.mark.parametrize("name", _names())
def test_small_random_and_statistic_chunks_still_agree(models, tmp_path, monkeypatch, name):
    """Chunks of 37 entries cut tensors and row blocks at odd places: draws and statistics still agree."""
    monkeypatch.setattr(draws, "RANDOM_CHUNK", 37)
    monkeypatch.setattr(_engine, "STAT_CHUNK", 37)
    root, base, paths, vectors, _ = models
    paths, vectors = paths[:_count(name)], vectors[:_count(name)]
    options = _options(name, scope="global")
    spec = ta.methods()[name]
    out = ta.merge_files(root / "base.safetensors", paths, tmp_path / "m", name, max_memory=700, **options)
    merged = ta.io.load_state_dict(out)
    if _on_weights(name):
        expected = _merged_weights(name, root, paths, [1.0] * len(paths), options)
    else:
        expected = ta.merge(vectors, name, base=base if spec.needs_base else None, **options).apply_to(base)
    assert all(torch.equal(merged[n], expected[n]) for n in SHAPES), name


@pytest.mark.parametrize("name", [n for n in sorted(ta.methods()) if ta.methods()[n].fast is not None])
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_vector_forms_equal_the_per_block_forms(models, name, scope, dtype):
    vectors = [v.to(dtype=dtype) for v in models[3]]
    options = _options(name, scope)
    fast = ta.merge(vectors, name, weights=[0.5, 2.0, 1.0], **options)
    by_block = _engine.merge_by_tensor(vectors, name, weights=[0.5, 2.0, 1.0], **options)
    assert fast.equal(by_block)


def _dyadic(seed: int) -> ta.TaskVector:
    """Multiples of 1/8 below 16 in magnitude: sums of a few of them are exact in float32."""
    g = torch.Generator().manual_seed(seed)
    return ta.TaskVector({n: torch.randint(-127, 128, s, generator=g).float() / 8 for n, s in SHAPES.items()})


@pytest.mark.parametrize("name", [n for n in _names() if ta.methods().get(n) is None or ta.methods()[n].symmetric]
                         + [n for n, c in CUSTOM.items() if c.get("symmetric")])
def test_declared_symmetric_methods_ignore_input_order(name):
    spec = ta.methods()[name]
    if not spec.symmetric:
        pytest.skip(f"{name} declares no symmetry")
    vectors, weights = [_dyadic(s) for s in (1, 2, 3)], [1.0, 2.0, 1.0]  # mean's w / Σw stay exact
    options = _options(name)
    base = _zero_base(name)
    forward = ta.merge(vectors, name, weights=weights, base=base, **options)
    backward = ta.merge(vectors[::-1], name, weights=weights[::-1], base=base, **options)
    if _on_weights(name) and "density" in options:  # per-model options move with their models
        options["density"] = options["density"][::-1]
        backward = ta.merge(vectors[::-1], name, weights=weights[::-1], base=base, **options)
    assert forward.equal(backward)


def _zero_base(name: str) -> dict | None:
    """A zero base for methods that read one: their weights are then the dyadic deltas themselves."""
    spec = ta.methods().get(name)
    if spec is None or not (spec.needs_base or spec.inputs == "weights"):
        return None
    return {n: torch.zeros(s) for n, s in SHAPES.items()}


@pytest.mark.parametrize("name", _names())
def test_declared_identity_returns_a_single_vector(name):
    spec = ta.methods()[name]
    if spec.identity is None:
        pytest.skip(f"{name} declares no identity")
    v = _dyadic(4)
    options = _options(name)
    if _on_weights(name):  # the identity holds at the defaults: no trim
        options.pop("density", None)
    options.update(spec.identity)
    assert ta.merge([v], name, base=_zero_base(name), **options).equal(v)


def test_every_builtin_declares_its_invariants_honestly():
    """Every built-in but the SVD-based TSV and the random DARE forms declares order-independence."""
    declared = {n for n, s in ta.methods().items() if s.symmetric}
    assert {"task_arithmetic", "mean", "ties", "magnitude_prune", "breadcrumbs", "consensus", "iso_c"} <= declared
    assert not ({"dare", "dare_ties", "tsv"} & declared)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", _names())
def test_cuda_equals_cpu(models, name):
    _root, base, _paths, vectors, _ = models
    spec = ta.methods()[name]
    if name in SVD_BASED:
        pytest.skip("SVDs differ between devices")
    options = _options(name)
    vectors = vectors[:_count(name)]
    reads = spec.needs_base or spec.inputs == "weights"
    cpu = ta.merge(vectors, name, base=base if reads else None, **options)
    gpu = ta.merge([v.to("cuda") for v in vectors], name,
                   base={n: t.cuda() for n, t in base.items()} if reads else None, **options)
    assert cpu.equal(gpu.to("cpu"))


# ---------------------------------------------------------------------- the contract's edges


def test_a_method_that_needs_the_base_is_refused_without_one(models, tmp_path):
    _, _, _, vectors, vector_paths = models
    with pytest.raises(ta.TaskArithError, match="reads the pretrained weights"):
        ta.merge(vectors, "conf_relative")
    with pytest.raises(ta.TaskArithError, match="reads the pretrained weights"):
        ta.merge_files(None, vector_paths, tmp_path / "x.safetensors", "conf_relative")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_method_returning_the_wrong_shape_is_named():
    ta.register("conf_bad_shape", lambda block: block.deltas[0].reshape(-1)[:1], paper="n/a")
    try:
        with pytest.raises(ta.TaskArithError, match=r"'conf_bad_shape' returned .* for 'layer.0.bias'"):
            ta.merge([ta.TaskVector({"layer.0.bias": torch.ones(3)})], "conf_bad_shape")
    finally:
        ta.merging.unregister("conf_bad_shape")


def test_consolidation_by_scores_equals_in_memory_out_of_core(models, tmp_path):
    root, base, paths, vectors, _ = models
    scores = [_state(100 + i) for i in range(3)]
    expected = ta.consolidate(vectors, scores, density=0.3).apply_to(base)
    out = ta.merge_files(root / "base.safetensors", paths, tmp_path / "m", "consolidate", scores=scores, density=0.3,
                         max_memory=500)
    merged = ta.io.load_state_dict(out)
    assert all(torch.equal(merged[n], expected[n]) for n in SHAPES)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"split": "diagonal"}, "split='diagonal'"),
    ({"trim": True}, "trim=True needs 'density' and 'scope'"),
    ({"randomized": True}, "randomized=True needs a 'seed'"),
])
def test_registration_refuses_declarations_no_driver_can_honour(kwargs, match):
    with pytest.raises(ta.TaskArithError, match=match):
        ta.register("conf_refused", keep_larger, paper="n/a", **kwargs)
    assert "conf_refused" not in ta.methods()


def test_a_user_trim_method_equals_the_builtin_magnitude_prune():
    vectors = [_dyadic(s) for s in (5, 6)]
    for scope in ("tensor", "global"):
        ours = ta.merge(vectors, "conf_trimmed_sum", density=0.25, scope=scope)
        assert ours.equal(ta.merge(vectors, "magnitude_prune", density=0.25, scope=scope))


def test_random_draws_are_keyed_by_seed_input_and_name():
    block = ta.merging.Block("w", (torch.zeros(50), torch.zeros(50)), (1.0, 1.0), shape=(50,), seed=1)
    other = ta.merging.Block("v", (torch.zeros(50),), (1.0,), shape=(50,), seed=1)
    reseeded = ta.merging.Block("w", (torch.zeros(50),), (1.0,), shape=(50,), seed=2)
    draws = block.random(0)
    assert not torch.equal(draws, block.random(1))
    assert not torch.equal(draws, other.random(0))
    assert not torch.equal(draws, reseeded.random(0))
    assert torch.equal(draws, block.random(0))
    assert 0 <= float(draws.min()) and float(draws.max()) < 1 and math.isclose(float(draws.mean()), 0.5, abs_tol=0.15)
