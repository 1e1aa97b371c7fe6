"""Non-finite values: scalar arguments refused at every entry point, one NaN policy for every merge
method, infinities through IEEE arithmetic, and the base fingerprint carried through every merge."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import DEVICES
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import taskarith as ta
from taskarith import merging
from taskarith.merging import _engine

METHODS = sorted(ta.methods())  # every registered method, whatever is added later
SHAPES = {"a.weight": (3, 4), "a.bias": (7,), "b": (40,), "c": (1,)}

# Option values that reach each method's edges: trims keeping nothing (k = 0 on small tensors),
# everything or a part; a weight of 0 and a scale of 0 (0 · NaN must still be NaN).
OPTION_VALUES = {
    "density": [0.01, 0.3, 1.0],
    "scope": ["global", "tensor"],
    "sign": ["sum", "count"],
    "scale": [1.0, 0.0, -0.5],
    "drop": [0.0, 0.5, 0.9],
    "seed": [0, 7],
    "top": [0.0, 0.3],
    "k": [1, 2],
    "lambda_": [0.0, 0.5],
    "rank_fraction": [None, 1.0],
}


def required(method: str) -> dict:
    """Values for a method's required options (the seed of the randomized ones)."""
    return {k: 0 for k, o in ta.methods()[method].options.items() if o.required}


ONE_MODEL = {"slerp", "nearswap", "arcee_fusion", "passthrough"}  # methods of weights: the base and one model
TWO_OR_MORE = {"nuslerp": 2, "model_stock": 2}


def fitted(method: str, vectors: list, weights):
    """The inputs a method takes: methods of weights get a base and the number of models they merge;
    the others get the inputs as they are, and no base."""
    spec = ta.methods()[method]
    if spec.inputs != "weights":
        return vectors, weights, None
    want = 1 if method in ONE_MODEL else TWO_OR_MORE.get(method)
    if want is not None:
        vectors = (vectors * want)[:want] if method != "nuslerp" else (vectors * 2)[:2]
        weights = None if weights is None else (weights * want)[:want]
    if method == "model_stock" and len(vectors) < 2:
        vectors, weights = vectors * 2, None if weights is None else weights * 2
    g = torch.Generator().manual_seed(0)  # a generic base: models in general position, not all zero
    base = {n: (10 * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in vectors[0].items()}
    return vectors, weights, base


def option_strategy(method: str):
    spec = ta.methods()[method]
    drawn = {k: st.sampled_from(OPTION_VALUES[k]) for k in spec.options if k in OPTION_VALUES}
    if "epsilon" in spec.options and "density" in drawn:  # DELLA: density ± epsilon (0.15) inside (0, 1)
        drawn["density"] = st.sampled_from([0.3, 1.0])
    return st.fixed_dictionaries(drawn).map(lambda o: {**required(method), **o})


@st.composite
def merge_inputs(draw, dtypes=(torch.float32, torch.bfloat16, torch.float64)):
    """Vectors (one layout) with finite values of moderate size, and weights (0 included)."""
    count = draw(st.integers(1, 5))  # 5: more inputs than the compiled kernels take
    dtype = draw(st.sampled_from(dtypes))
    values = st.floats(-100, 100, allow_nan=False, allow_subnormal=False)
    vectors = [ta.TaskVector({n: torch.tensor(draw(hnp.arrays(np.float64, s, elements=values))).to(dtype)
                              for n, s in SHAPES.items()}) for _ in range(count)]
    weights = draw(st.none() | st.lists(st.sampled_from([1.0, 0.0, 0.5, -2.0]), min_size=count, max_size=count))
    return vectors, weights


def with_value(vector: ta.TaskVector, name: str, index: int, value: float) -> ta.TaskVector:
    tensors = {n: vector[n].clone() for n in vector}
    tensors[name].view(-1)[index % tensors[name].numel()] = value
    return ta.TaskVector(tensors)


# ------------------------------------------------------------------ NaN policy


@pytest.mark.parametrize("method", METHODS)
@given(case=merge_inputs(), data=st.data(), compiled=st.booleans())
def test_a_nan_in_any_input_raises_naming_its_vector_and_tensor(method, case, data, compiled):
    vectors, weights, base = fitted(method, *case)
    if method in ("mean", "linear", "multislerp") and weights is not None and sum(weights) == 0:
        weights = None  # 'mean' refuses weights summing to zero before looking at values
    options = data.draw(option_strategy(method))
    at = data.draw(st.integers(0, len(vectors) - 1))
    name = data.draw(st.sampled_from(sorted(SHAPES)))
    vectors = list(vectors)
    vectors[at] = with_value(vectors[at], name, data.draw(st.integers(0, 100)), math.nan)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TASKARITH_BACKEND", "numba" if compiled else "torch")
        with pytest.raises(ta.NonFiniteError, match="NaN") as raised:
            ta.merge(vectors, method, weights=weights, base=base, **options)
    message = str(raised.value)
    assert f"vector #{at} {name!r}" in message, message
    others = [f"vector #{i} {n!r}" for i in range(len(vectors)) for n in SHAPES if (i, n) != (at, name)]
    assert not any(o in message for o in others), f"names a NaN-free tensor: {message}"


@pytest.mark.parametrize("method", METHODS)
@given(case=merge_inputs(), data=st.data())
def test_finite_inputs_never_trip_the_nan_check_and_give_finite_results(method, case, data):
    vectors, weights, base = fitted(method, *case)
    if method in ("mean", "linear", "multislerp") and weights is not None and sum(weights) == 0:
        weights = None
    try:
        merged = ta.merge(vectors, method, weights=weights, base=base, **data.draw(option_strategy(method)))
    except ta.TaskArithError as err:  # a method of weights may refuse degenerate geometry, never with NaN
        assert base is not None and not isinstance(err, ta.NonFiniteError), err
        return
    for name in merged:
        assert bool(torch.isfinite(merged[name]).all()), f"{method}: {name!r} is not finite"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_checks_nan_on_each_device(method, device):
    vectors = [ta.TaskVector({"w": torch.randn(6, 5), "b": torch.randn(5)}).to(device) for _ in range(3)]
    vectors, weights, base = fitted(method, vectors, [1.0, 1.0, 0.0])
    last = len(vectors) - 1
    vectors[last] = with_value(vectors[last], "b", 4, math.nan)
    with pytest.raises(ta.NonFiniteError, match=rf"vector #{last} 'b'"):
        ta.merge(vectors, method, weights=weights, base=base, **required(method))


@pytest.mark.parametrize("method", [m for m, spec in ta.methods().items() if spec.trim])
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("many", [False, True], ids=["large", "many-small"])
def test_trims_name_a_nan_found_by_their_selection(method, scope, many):
    """Large float32 tensors go through the sampled selections, many small ones through the
    row-stacked one: each refuses NaN itself; the error still names the vector and tensor."""
    g = torch.Generator().manual_seed(0)
    shapes = {f"lora.{i}": (16,) for i in range(80)} if many else {"big": (1 << 17,), "small": (3,)}
    vectors = [ta.TaskVector({n: torch.randn(s, generator=g) for n, s in shapes.items()}) for _ in range(2)]
    target = "lora.41" if many else "big"
    vectors[1] = with_value(vectors[1], target, 12345, math.nan)
    with pytest.raises(ta.NonFiniteError, match=rf"vector #1 {target!r}"):
        ta.merge(vectors, method, density=0.3, scope=scope)


def test_the_engine_applies_the_policy_to_row_blocks_as_out_of_core_calls_it():
    """The out-of-core driver merges row blocks through the engine's call: same policy, same names."""
    blocks = [torch.randn(4, 8), torch.randn(4, 8)]
    blocks[0][2, 3] = math.nan
    for method in METHODS:
        spec = ta.methods()[method]
        options = {k: o.default for k, o in spec.options.items()} | required(method)
        with pytest.raises(ta.NonFiniteError, match=r"vector #0 'layer.w'"):
            _engine.call(spec, "layer.w", blocks, [1.0, 1.0], options, shape=(8, 8), start=8)


def test_registered_methods_have_their_inputs_checked_unless_they_propagate_nan():
    calls = []

    def hides(block):
        "Zeros: hides any NaN of its inputs."
        calls.append(1)
        return torch.zeros_like(block.deltas[0])

    def honest(block):
        "The first vector: keeps its NaN."
        calls.append(1)
        return block.deltas[0]

    nan = ta.TaskVector({"w": torch.tensor([1.0, math.nan])})
    ta.merging.register("hides_demo", hides, paper="n/a")
    ta.merging.register("honest_demo", honest, paper="n/a", propagates_nan=True)
    try:
        with pytest.raises(ta.NonFiniteError, match="vector #0 'w'"):
            ta.merge([nan], "hides_demo")
        assert calls == [], "the inputs of a method that may hide NaN are checked before it runs"
        with pytest.raises(ta.NonFiniteError, match="vector #0 'w'"):
            ta.merge([nan], "honest_demo")
        assert calls == [1], "a method that propagates NaN runs, and its result is checked"
    finally:
        ta.merging.unregister("hides_demo")
        ta.merging.unregister("honest_demo")


# -------------------------------------------------------------------- infinity


LINEAR = ["task_arithmetic", "mean"]


@pytest.mark.parametrize("method", LINEAR)
@given(case=merge_inputs(dtypes=(torch.float32, torch.float64)), data=st.data(), sign=st.sampled_from([1.0, -1.0]))
def test_linear_merges_follow_ieee_arithmetic_on_infinities(method, case, data, sign):
    vectors, _ = case
    weights = data.draw(st.lists(st.sampled_from([1.0, 0.0, 0.5, -2.0]), min_size=len(vectors), max_size=len(vectors))
                        .filter(lambda w: sum(w) != 0))
    at, index = data.draw(st.integers(0, len(vectors) - 1)), data.draw(st.integers(0, 39))
    vectors[at] = with_value(vectors[at], "b", index, sign * math.inf)
    merged = ta.merge(vectors, method, weights=weights)  # no error: NaN made from inf is IEEE's
    factor = weights[at] / (sum(weights) if method == "mean" else 1.0)
    want = sign * math.inf * factor if factor != 0 else math.nan  # 0 · inf is NaN
    got = float(merged["b"][index])
    assert (math.isnan(got) and math.isnan(want)) or got == want, f"{method}: {got} instead of {want}"


def test_an_infinite_entry_a_method_drops_becomes_zero():
    """Breadcrumbs drops the largest magnitudes (an inf among them) and DARE drops at random: dropped
    entries are 0, as everywhere else, not inf · 0 = NaN."""
    w = torch.linspace(1, 2, 100)
    w[10] = math.inf
    tv = ta.TaskVector({"w": w})
    crumbs = ta.merge([tv], "breadcrumbs", density=0.5, top=0.05)
    assert crumbs["w"][10] == 0 and bool(torch.isfinite(crumbs["w"]).all())
    dropped = ta.merge([tv], "dare", drop=0.5, seed=1)["w"]
    assert bool(torch.isfinite(dropped[torch.arange(100) != 10]).all())
    assert float(dropped[10]) in (0.0, math.inf)  # dropped: 0; kept: inf / (1 - p)


def test_a_trim_keeps_an_infinite_entry_first():
    w = torch.tensor([1.0, -math.inf, 0.5, 2.0])
    merged = ta.merge([ta.TaskVector({"w": w})], "ties", density=0.5)
    assert merged["w"].tolist() == [0.0, -math.inf, 0.0, 2.0]


@pytest.mark.parametrize("method", ["tsv", "iso_c"])
def test_svd_methods_refuse_infinite_matrices_by_name(method):
    vectors = [ta.TaskVector({"w": torch.randn(5, 4), "b": torch.randn(4)}) for _ in range(2)]
    vectors[1] = with_value(vectors[1], "w", 7, math.inf)
    with pytest.raises(ta.NonFiniteError, match=r"SVD of .*'w'.* not finite"):
        ta.merge(vectors, method)


# ---------------------------------------------------------- base fingerprint


def _extracted(base: dict, seed: int) -> ta.TaskVector:
    g = torch.Generator().manual_seed(seed)
    return ta.TaskVector.from_models(base, {n: t + torch.randn(t.shape, generator=g) for n, t in base.items()})


BASE = {"w": torch.ones(6, 5), "b": torch.zeros(5)}
OTHER = {"w": torch.full((6, 5), 2.0), "b": torch.zeros(5)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["own-dtype", "dtype=float64"])
def test_every_merge_carries_the_common_base_fingerprint(method, dtype):
    vectors = [_extracted(BASE, i) for i in range(3)]
    fingerprint = vectors[0].base_fingerprint
    assert fingerprint is not None and all(v.base_fingerprint == fingerprint for v in vectors)
    assert _merged(vectors, method, dtype=dtype).base_fingerprint == fingerprint
    if method not in ONE_MODEL:  # a method of one model takes the first vector only: nothing to mix
        mixed = [_extracted(OTHER, 2), *vectors[:2]]
        assert _merged(mixed, method, dtype=dtype).base_fingerprint is None
    unknown = [ta.TaskVector(dict(vectors[2])), *vectors[:2]]  # built from tensors: no fingerprint
    assert unknown[0].base_fingerprint is None
    assert _merged(unknown, method, dtype=dtype).base_fingerprint is None


def _merged(vectors, method, **kwargs):
    """``ta.merge`` of the vectors a method takes (methods of weights: the first ones, onto a base)."""
    vectors, _, base = fitted(method, vectors, None)
    return ta.merge(vectors, method, base=base, **required(method), **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_the_fingerprint_survives_untying_names_only_some_inputs_tie(method):
    """Names tied in some inputs only are untied (copied) before the method runs: the fingerprint
    comes from the inputs as given."""
    base = {"emb": torch.ones(4, 3), "head": torch.ones(4, 3)}
    tied = {"emb": torch.ones(4, 3) * 2}
    tied["head"] = tied["emb"]
    a = ta.TaskVector.from_models(base, tied)
    b = ta.TaskVector.from_models(base, {"emb": torch.ones(4, 3) * 3, "head": torch.ones(4, 3) * 4})
    # A fingerprint covers a vector's distinct tensors, so these two differ; say they share one
    # (as vectors saved from one base and loaded with their ties would).
    b._info = replace(b._info, base_fingerprint=a.base_fingerprint)
    assert a.aliases and not b.aliases and a.base_fingerprint is not None
    assert _merged([a, b], method).base_fingerprint == a.base_fingerprint


# ------------------------------------------------------------- scalar arguments


def _vector(dtype=torch.float32) -> ta.TaskVector:
    return ta.TaskVector({"w": torch.tensor([1.0, -2.0, 0.5], dtype=dtype), "b": torch.tensor([0.25], dtype=dtype)})


# Each entry point: (how it is called with the value, the name its error gives the value).
ENTRY_POINTS = {
    "apply_to(scale=)": (lambda tv, s: tv.apply_to({n: torch.zeros_like(t) for n, t in tv.items()}, scale=s), "scale"),
    "tv * s": (lambda tv, s: tv * s, "scalar"),
    "s * tv": (lambda tv, s: s * tv, "scalar"),
    "tv / s": (lambda tv, s: tv / s, "scalar"),
    "mul_": (lambda tv, s: tv.mul_(s), "scalar"),
    "div_": (lambda tv, s: tv.div_(s), "scalar"),
    "add_(alpha=)": (lambda tv, s: tv.add_(tv.clone(), alpha=s), "alpha"),
    "TaskVector.sum(weights)": (lambda tv, s: ta.TaskVector.sum([tv, tv], weights=[1.0, s]), "weights[1]"),
    "merge(weights=)": (lambda tv, s: ta.merge([tv, tv], "ties", weights=[1.0, s]), "weights[1]"),
    **{f"merge({m}, {k}=)": (lambda tv, s, m=m, k=k: ta.merge([tv, tv], m, **{k: s}, **required(m)), k)
       for m, spec in ta.methods().items() for k, o in spec.options.items() if o.multiplies},
}
NON_FINITE = [math.nan, math.inf, -math.inf, torch.tensor(math.nan), torch.tensor(-math.inf, dtype=torch.float64)]
OVERFLOWING = [1e39, -1e39, torch.tensor(1e39, dtype=torch.float64), 10**400]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("value", NON_FINITE + OVERFLOWING, ids=repr)
def test_non_finite_and_overflowing_scalars_are_refused_everywhere(entry, value):
    call, what = ENTRY_POINTS[entry]
    tv = _vector()
    before = {n: t.clone() for n, t in tv.items()}
    with pytest.raises(ta.TaskArithError) as raised:
        call(tv, value)
    message = str(raised.value)
    assert what in message, f"{entry}: the error does not name {what!r}: {message}"
    if any(value is v for v in NON_FINITE):
        assert str(float(value)) in message and "finite" in message, message
    elif "overflows torch.float32" in message:
        assert repr(torch.finfo(torch.float32).max) in message, message  # the largest it could be
    else:  # too large for float64, or a 0-d tensor where a merge option takes a Python number
        assert "overflows float64" in message or "expected a finite number" in message, message
    assert all(torch.equal(tv[n], t) for n, t in before.items()), f"{entry} changed the vector before refusing"


@pytest.mark.parametrize("entry", ["tv / s", "div_"])
@pytest.mark.parametrize("zero", [0, 0.0, -0.0, torch.tensor(0.0), 1e-46], ids=repr)
def test_division_by_zero_is_a_clear_error(entry, zero):
    call, _ = ENTRY_POINTS[entry]
    with pytest.raises(ta.TaskArithError, match=r"cannot divide a task vector by scalar=.*zero in torch.float32") as raised:
        call(_vector(), zero)
    assert isinstance(raised.value, ZeroDivisionError)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@given(s=st.floats(allow_nan=False, allow_infinity=False))
def test_a_multiplier_is_refused_exactly_when_it_overflows_the_vectors_dtype(dtype, s):
    tv = _vector(dtype)
    largest = torch.finfo(dtype).max
    if abs(s) > largest:
        with pytest.raises(ta.NonFiniteError, match=re.escape(f"largest finite value {largest!r}")):
            tv * s
        return
    got = tv * s
    for name in tv:
        assert torch.equal(got[name], torch.mul(tv[name], s)), f"{name!r}: {s} * tv is not torch's product"


@pytest.mark.parametrize("dtype", DTYPES)
@given(s=st.floats(allow_nan=False, allow_infinity=False))
def test_a_divisor_is_refused_exactly_when_it_is_zero_or_overflows_in_the_vectors_dtype(dtype, s):
    tv = _vector(dtype)
    info = torch.finfo(dtype)
    if abs(s) < info.tiny * info.eps:  # below the smallest subnormal
        with pytest.raises(ZeroDivisionError, match="zero in"):
            tv / s
    elif abs(s) > info.max:
        with pytest.raises(ta.NonFiniteError, match="overflows"):
            tv / s
    else:
        got = tv / s
        assert all(torch.equal(got[n], torch.div(tv[n], s)) for n in tv)


def test_the_largest_finite_value_itself_is_accepted():
    for dtype in DTYPES:
        largest = torch.finfo(dtype).max
        assert (_vector(dtype) * largest).dtype == dtype
        with np.errstate(over="ignore"):
            above = float(np.nextafter(largest, math.inf))  # float64: inf
        with pytest.raises(ta.NonFiniteError):
            _vector(dtype) * above


def test_merges_check_scalars_against_the_dtype_they_compute_in():
    """Half-precision vectors are merged in float32: a weight float16 cannot hold is fine there,
    while multiplying the float16 vector itself by it is refused."""
    half = _vector(torch.float16)
    merged = ta.merge([half, half], "task_arithmetic", weights=[1e5, -1e5])
    assert merged["w"].dtype == torch.float16 and merged["w"].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ta.NonFiniteError, match="overflows torch.float16 .largest finite value 65504.0."):
        half * 1e5
    with pytest.raises(ta.NonFiniteError, match="weights\\[0\\]=1e\\+39 overflows torch.float32"):
        ta.merge([half], "ties", weights=[1e39])


def test_scalars_are_validated_before_a_method_runs():
    calls = []

    def spy(block, *, scale):
        "Spy: records that it ran."
        calls.append(1)
        return block.deltas[0]

    ta.merging.register("scale_spy_demo", spy, paper="n/a", options={"scale": merging.SCALE})
    try:
        for bad in ({"scale": 1e39}, {"scale": math.nan}, {"weights": [math.inf]}, {"weights": [torch.tensor(1e39)]}):
            with pytest.raises(ta.TaskArithError):
                ta.merge([_vector()], "scale_spy_demo", **bad)
        assert calls == []
    finally:
        ta.merging.unregister("scale_spy_demo")


OUT_OF_CORE_OPTIONS = {"density": 0.3, "drop": 0.5, "seed": 1, "top": 0.3, "k": 1, "t": 0.5}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", ["1GB", "2KB"], ids=["whole-tensors", "row-blocks"])
def test_out_of_core_merges_name_a_nan_like_merge_does(tmp_path, method, budget):
    """merge_files drives the same methods on row blocks (and streamed trims): a NaN in a fine-tuned
    checkpoint raises NonFiniteError naming its position and tensor, and nothing is written."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    for i in range(2):
        tuned = {n: t + torch.randn(t.shape, generator=g) for n, t in base.items()}
        if i == 1:
            tuned["w"][40, 3] = float("nan")
        save_file(tuned, tmp_path / f"ft{i}.safetensors")
    spec = ta.methods()[method]
    options = {k: v for k, v in OUT_OF_CORE_OPTIONS.items() if k in spec.options}
    sources = [tmp_path / "ft0.safetensors", tmp_path / "ft1.safetensors"][int(method in ONE_MODEL):]
    at = len(sources) - 1
    with pytest.raises(ta.NonFiniteError, match=rf"vector #{at} 'w'") as err:
        ta.merge_files(tmp_path / "base.safetensors", sources, tmp_path / "out", method, max_memory=budget, **options)
    assert "'b'" not in str(err.value) and (at == 0 or "#0" not in str(err.value))
    assert not (tmp_path / "out").exists()
