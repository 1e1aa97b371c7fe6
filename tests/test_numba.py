"""The Numba kernels compute, bit for bit, what the torch path computes.

Each test runs the same public call with the kernels on and off
(``TASKARITH_BACKEND``) and compares the bytes of the results, over inputs drawn
to hit the edges: ties at trim thresholds, zeros of both signs, infinities,
halfway cases of bfloat16 rounding, deltas whose float32 round trip fails.
"""

import contextlib
import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import save_file

pytest.importorskip("numba", reason="the compiled kernels need Numba: pip install 'taskarith[fast]'")

from helpers import kernels
from numba import njit

import taskarith as ta
from taskarith.backends import _numba, thresholds
from taskarith.backends import kernels as kernels_module
from taskarith.backends._numba import _kernels
from taskarith.backends._numba_kernels import _load, _put
from taskarith.merging import _trim


@contextlib.contextmanager
def recording(module, name: str):
    """Patches ``module.name`` to record what each call returns (in the yielded list)."""
    results = []
    original = getattr(module, name)

    def record(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    with mock.patch.object(module, name, record):
        yield results


def bits(t: torch.Tensor) -> list[int]:
    """The IEEE bit patterns of a float tensor (so -0.0 differs from 0.0)."""
    flat = t.detach().reshape(-1).contiguous()
    return flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]).tolist()


def test_the_environment_switches_the_kernels_off():
    with kernels(False):
        assert not _numba.enabled()
    with kernels(True):
        assert _numba.enabled()


# Values with many ties (small integers), signed zeros and infinities next to ordinary floats.
_ENTRY = st.one_of(
    st.integers(-3, 3).map(float),
    st.sampled_from([0.0, -0.0, math.inf, -math.inf]),
    st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False),
)


@st.composite
def ties_cases(draw):
    k = draw(st.integers(1, 6))  # tests/test_many_inputs.py takes the counts further
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    shapes = draw(st.lists(st.sampled_from([(1,), (7,), (3, 4), (40,)]), min_size=1, max_size=3))
    vectors = []
    for _ in range(k):
        state = {f"t{i}": torch.tensor(draw(hnp.arrays(np.float64, shape, elements=_ENTRY))).to(dtype)
                 for i, shape in enumerate(shapes)}
        vectors.append(ta.TaskVector(state))
    weights = draw(st.one_of(st.none(), st.lists(st.sampled_from([1.0, 0.5, -2.0, 3.25]), min_size=k, max_size=k)))
    options = {"density": draw(st.sampled_from([0.1, 0.3, 0.5, 1.0])), "scope": draw(st.sampled_from(["tensor", "global"])),
               "sign": draw(st.sampled_from(["sum", "count"])), "scale": draw(st.sampled_from([1.0, 0.7]))}
    return vectors, weights, options


@given(ties_cases())
def test_ties_kernel_matches_the_torch_path(case):
    vectors, weights, options = case
    with kernels(False):
        want = ta.merge(vectors, "ties", weights=weights, **options)
    with kernels(True), mock.patch.object(_numba, "ties_merge", wraps=_numba.ties_merge) as spy:
        got = ta.merge(vectors, "ties", weights=weights, **options)
    assert spy.called, "the kernel takes any number of inputs"
    for name, tensor in want.items():
        assert bits(got[name]) == bits(tensor), f"ties {options}, {len(vectors)} vectors: {name!r} differs"


def test_ties_kernel_breaks_ties_at_the_cut_as_the_torch_path():
    """Many entries tie at the threshold, so trims carry a cut: kept before it, dropped from it on."""
    g = torch.Generator().manual_seed(0)
    vectors = [ta.TaskVector({"w": torch.randint(-2, 3, (3_000_000,), generator=g).float(),
                              "b": torch.randint(-2, 3, (501,), generator=g).float()}) for _ in range(3)]
    plan = _trim.trim_plan(vectors[0], 0.3, "tensor")
    assert plan.cuts, "the premise: a tie cut"
    for scope in ["tensor", "global"]:
        with kernels(False):
            want = ta.merge(vectors, "ties", density=0.3, scope=scope)
        with kernels(True):
            got = ta.merge(vectors, "ties", density=0.3, scope=scope)
        for name, tensor in want.items():
            assert bits(got[name]) == bits(tensor), f"{scope}: {name!r} differs"


@st.composite
def sum_cases(draw):
    k = draw(st.integers(1, 6))  # 1: nothing to add
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    shapes = draw(st.lists(st.sampled_from([(1,), (9,), (5, 7), (70,)]), min_size=1, max_size=3))
    # bfloat16 steps of 1, 2^-8 and 2^-9 around 1 make partial sums land halfway between neighbours.
    entries = st.one_of(_ENTRY, st.sampled_from([math.nan, 1.0 + 2**-7, 2**-8, 2**-9, -(2**-8), 3e38]))
    vectors = [ta.TaskVector({f"t{i}": torch.tensor(draw(hnp.arrays(np.float64, shape, elements=entries))).to(dtype)
                              for i, shape in enumerate(shapes)}) for _ in range(k)]
    weights = draw(st.one_of(st.none(), st.just([1.0] * k), st.lists(st.sampled_from([1.0, 0.5, -2.0]), min_size=k, max_size=k)))
    return vectors, weights


@given(sum_cases())
def test_sum_kernel_matches_the_torch_path(case):
    vectors, weights = case
    with kernels(False):
        want = ta.TaskVector.sum(vectors, weights)
    with kernels(True), mock.patch.object(_numba, "ELEMENTWISE_FROM", 0), recording(_numba, "running_sum") as ran:
        got = ta.TaskVector.sum(vectors, weights)
    unweighted = weights is None or all(w == 1.0 for w in weights)
    # Two float32 vectors go through it only with streaming stores, which outputs this small do not
    # take; two bfloat16 ones always (torch's bfloat16 add converts in several steps).
    pairs = len(vectors) > 2 or (len(vectors) == 2 and vectors[0].dtype == torch.bfloat16)
    assert any(ran) == (unweighted and pairs), "the kernel runs exactly for unweighted sums"
    for name, tensor in want.items():
        nan = torch.isnan(tensor)
        assert torch.equal(torch.isnan(got[name]), nan), f"{name!r}: NaN elsewhere"
        # torch's own NaN bits differ between its vector and scalar code: any NaN will do.
        assert bits(got[name][~nan]) == bits(tensor[~nan]), f"{len(vectors)} vectors, weights {weights}: {name!r} differs"


@given(hnp.arrays(np.float32, st.integers(0, 5000), elements=st.sampled_from([0.0, -1.0, 1.0, 2.0, -2.5])),
       st.sampled_from([1.0, 2.0, 2.5, 1.1]), st.integers(1, 3000), st.booleans(),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_tie_scans_find_the_nth_tie_across_blocks(values, threshold, n, backward, dtype):
    ties = np.flatnonzero(np.abs(values) == threshold)
    order = ties[::-1] if backward else ties
    want = (int(order[n - 1]), n) if n <= ties.size else (None, int(ties.size))
    with kernels(True):
        got = _numba.nth_tie(torch.from_numpy(values).to(dtype), threshold, n, backward=backward)
    assert got == want


@njit
def _round_trip(values, out, widened):
    for j in range(values.size):
        _put(out, j, values[j])
        widened[j] = _load(out, j)


@given(hnp.arrays(np.uint32, st.integers(1, 64), elements=st.one_of(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**16 - 1).map(lambda hi: (hi << 16) | 0x8000),  # exactly halfway: ties to even
    st.integers(0, 2**16 - 1).map(lambda hi: hi << 16))))
def test_bfloat16_rounding_and_widening_match_torch(patterns):
    values = patterns.view(np.float32)
    out = np.empty(values.size, np.uint16)
    widened = np.empty(values.size, np.float32)
    _round_trip(values, out, widened)
    want = torch.from_numpy(values.copy()).to(torch.bfloat16)
    nan = np.isnan(values)
    # torch's own NaN bits differ between its vector and scalar code: any NaN will do.
    assert np.array_equal(out[~nan], want.view(torch.int16).numpy().view(np.uint16)[~nan])
    assert np.isnan(widened[nan]).all()
    assert np.array_equal(widened[~nan].view(np.uint32), want.float().numpy()[~nan].view(np.uint32))


@st.composite
def bfloat16_pairs(draw):
    n = draw(st.integers(1, 50))
    scale = draw(st.sampled_from([1.0, 1e-8, 1e8]))
    base = torch.tensor(draw(hnp.arrays(np.float64, n, elements=st.floats(-4, 4, allow_nan=False)))).to(torch.bfloat16)
    step = torch.tensor(draw(hnp.arrays(np.float64, n, elements=st.floats(-4, 4, allow_nan=False)))) * scale
    return base, (base.double() + step).to(torch.bfloat16)


@given(bfloat16_pairs())
def test_checked_subtraction_matches_torch(pair):
    base, tuned = pair
    wide_b, wide_f = base.float(), tuned.float()
    delta = wide_f - wide_b
    fits = bool(((wide_b + delta) == wide_f).all())
    out = torch.empty(base.shape)
    with kernels(True):
        assert _numba.subtract_checked(out, tuned, base) == fits
        assert _numba.delta_fits(tuned, base) == fits
    assert bits(out) == bits(delta)


@given(st.lists(bfloat16_pairs(), min_size=1, max_size=6).filter(lambda ps: len({p[0].numel() for p in ps}) == 1),
       st.sampled_from([torch.bfloat16, torch.float32]), st.booleans())
def test_add_deltas_matches_the_torch_formula(pairs, out_dtype, checked):
    base = pairs[0][0]
    tuned = [p[1] for p in pairs]
    wide_b = base.float()
    total = tuned[0].float() - wide_b
    for t in tuned[1:]:
        total += t.float() - wide_b
    want = (wide_b + total).to(out_dtype)
    fits = all(bool(((wide_b + (t.float() - wide_b)) == t.float()).all()) for t in tuned)
    out = torch.empty(base.shape, dtype=out_dtype)
    with kernels(True):
        done = _numba.add_deltas(out, base, tuned, checked=checked)
    assert done == (fits or not checked)
    if done:
        assert bits(out) == bits(want)


@pytest.mark.parametrize("max_memory", [3000, "1GB"], ids=["row-blocks", "whole"])
@pytest.mark.parametrize("method,options", [("task_arithmetic", {}), ("ties", {"density": 0.3, "scope": "tensor"}),
                                            ("ties", {"density": 0.3, "sign": "count"})])
def test_file_merges_write_the_same_bytes_with_and_without_the_kernels(tmp_path, max_memory, method, options):
    """bfloat16 models, one entry whose float32 delta cannot round-trip (its float64 fallback)."""
    g = torch.Generator().manual_seed(3)
    base = {"a.weight": torch.randn(40, 30, generator=g), "b.bias": torch.randn(9, generator=g)}
    base = {n: t.to(torch.bfloat16) for n, t in base.items()}
    base["a.weight"][5, 6] = 1.0
    sources = []
    for i in range(3):
        tuned = {n: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in base.items()}
        tuned["a.weight"][5, 6] = 2.0 ** -30 if i == 1 else 1.0
        save_file(tuned, tmp_path / f"ft{i}.safetensors")
        sources.append(tmp_path / f"ft{i}.safetensors")
    save_file(base, tmp_path / "base.safetensors")
    outputs = {}
    for on in (False, True):
        with kernels(on):
            out = ta.merge_files(tmp_path / "base.safetensors", sources, tmp_path / f"m{on}", method,
                                 max_memory=max_memory, **options)
        outputs[on] = ta.io.load_state_dict(out)
    for name, want in outputs[False].items():
        assert bits(outputs[True][name]) == bits(want), f"{method}: {name!r} differs"


@pytest.mark.parametrize("wide", [True, False], ids=["compressing-store", "scalar"])
@given(hnp.arrays(np.float32, st.integers(0, 100), elements=st.one_of(
    st.floats(-4, 4, width=32), st.sampled_from([0.0, -0.0, 1.5, -1.5, math.inf, -math.inf, math.nan]))),
       st.sampled_from([0.0, 1.0, 1.5, 3.0, math.inf]))
def test_packed_magnitudes_are_those_at_least_the_floor_in_order(wide, values, floor):
    if wide and not _numba._wide_stores():
        pytest.skip("this CPU has no AVX-512 compressing store")
    lo = int(np.float32(floor).view(np.int32))
    magnitudes = values.view(np.int32) & 0x7FFFFFFF
    want = magnitudes[magnitudes >= lo]  # NaN's bits exceed every number's: NaN is kept
    out = np.full(values.size, -1, np.int32)
    kept = _numba._selection().pack_magnitudes(wide)(values.view(np.int32), np.int32(lo), out)
    assert kept == want.size
    assert np.array_equal(out[:kept], want)


@st.composite
def prefilter_cases(draw):
    n = draw(st.integers(40, 400))
    values = draw(hnp.arrays(np.float32, n, elements=st.one_of(
        st.integers(-3, 3).map(float), st.floats(-1e3, 1e3, width=32, allow_nan=False), st.sampled_from([-0.0, math.inf]))))
    return torch.from_numpy(values), draw(st.integers(1, n - 1))


@given(prefilter_cases())
def test_prefiltered_trim_thresholds_equal_the_full_selection(case):
    values, k = case
    with kernels(False):
        want = thresholds.trim_threshold(values, k)
    # Small enough that drawn arrays take the prefilter; with a sample of 24 and a floor raised by a
    # negative margin, it lies above the k-th largest often enough that the fallback runs too.
    with kernels(True), mock.patch.object(thresholds, "_PREFILTER_FROM", 32), \
            mock.patch.object(thresholds, "_PREFILTER_SAMPLE", 24), mock.patch.object(thresholds, "_PREFILTER_MARGIN", -10):
        got = thresholds.trim_threshold(values, k, scratch=torch.empty(values.numel() + 3))
    assert got == want


def test_a_prefilter_floor_above_the_kth_largest_falls_back_to_the_full_selection():
    n = thresholds._PREFILTER_FROM
    k = n // 5
    values = torch.full((n,), 1e-3)
    values[::7] = -2e-3
    values[kernels_module._spread_positions(n, thresholds._PREFILTER_SAMPLE)] = 1.0  # the sample sees only these
    others = torch.nonzero(values != 1.0).squeeze(1)
    values[others[: k - 1 - int((values == 1.0).sum())]] = 1.0  # k - 1 entries pass the floor: one short
    with kernels(False):
        want = thresholds.trim_threshold(values, k)
    with kernels(True), mock.patch.object(_numba, "pack_magnitudes", wraps=_numba.pack_magnitudes) as spy:
        got = thresholds.trim_threshold(values, k)
    assert spy.called, "the premise: the prefilter ran"
    assert got == want


def test_prefiltered_selection_refuses_nan():
    values = torch.randn(1 << 17)
    values[12345] = math.nan
    with kernels(True), mock.patch.object(_numba, "pack_magnitudes", wraps=_numba.pack_magnitudes) as spy, \
            pytest.raises(ta.TaskArithError, match="NaN"):
        thresholds.trim_threshold(values, 1000)
    assert spy.called


@pytest.mark.parametrize("wide", [True, False], ids=["compressing-store", "scalar"])
@given(hnp.arrays(np.float32, st.integers(0, 200), elements=st.one_of(
    st.integers(-3, 3).map(float), st.sampled_from([-0.0, 1.5, math.inf, -math.inf, math.nan]))),
       st.sampled_from([0.0, 1.0, 1.5]), st.sampled_from([1.0, 2.0, 3.0, math.inf]), st.integers(0, 250),
       st.data())
def test_bracket_scan_counts_and_packs_as_numpy(wide, values, lo, hi, room, data):
    if wide and not _numba._wide_stores():
        pytest.skip("this CPU has no AVX-512 compressing store")
    start = data.draw(st.integers(0, values.size))
    stop = data.draw(st.integers(start, values.size))
    bits = values.view(np.int32)[start:stop] & 0x7FFFFFFF
    lo_bits, hi_bits = (int(np.float32(v).view(np.int32)) for v in (lo, hi))
    inside = bits[(bits >= lo_bits) & (bits <= hi_bits)]
    out = np.full(room, -1, np.int32)
    with mock.patch.object(_numba, "_wide_stores", lambda: wide):
        above, nans, packed, complete = _numba.bracket_scan(values, lo_bits, hi_bits, out, start, stop)
    assert above == int(np.count_nonzero(bits > hi_bits))  # NaN counts as above: its bits exceed inf's
    assert nans == int(np.isnan(values[start:stop]).sum())
    assert np.array_equal(out[:packed], inside[:packed])
    # Packing stops once the room is full, so an exact fit may still report incomplete.
    if inside.size < room:
        assert complete
    if complete:
        assert packed == inside.size
    else:
        assert inside.size >= room and packed <= room


# Scales that are not finite or overflow the dtype are refused before either path (tests/test_values.py);
# the largest ones accepted still make products overflow.
@given(st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 300) | st.integers(4096, 9000),
       st.sampled_from([0.7, -2.0, 3, 1 << 24, (1 << 24) + 1, 1e-40, 3e38, -3.3e38, -0.0, 1 / 3]))
def test_scale_and_add_kernels_match_torch(dtype, n, s):
    g = torch.Generator().manual_seed(n)
    a = ta.TaskVector({"w": (torch.randn(n, generator=g) * 1e3).to(dtype), "b": torch.randn(7, generator=g).to(dtype)})
    b = ta.TaskVector({"w": torch.randn(n, generator=g).to(dtype), "b": torch.tensor([math.inf, -math.inf, 0.0, -0.0, 1.0, 2**-9, 1.0 + 2**-7]).to(dtype)})
    divides = s != 0
    with kernels(False):
        want = [s * a, a + b, a - b, -a] + ([a / s] if divides else [])
    # Every output takes the non-temporal stores: their blocks, and the heads and tails around them.
    with kernels(True), mock.patch.object(_numba, "STREAM_FROM", 0), mock.patch.object(_numba, "ELEMENTWISE_FROM", 0), \
            recording(_numba, "scale") as scaled, recording(_numba, "running_sum") as added, \
            recording(_numba, "subtract") as subtracted, recording(_numba, "divide") as divided:
        got = [s * a, a + b, a - b, -a] + ([a / s] if divides else [])
    # An int float32 cannot hold exactly stays with torch, which converts it without rounding twice.
    exact = isinstance(s, float) or abs(s) <= 1 << 24
    assert scaled == ([True] if exact else []) + [True] and added == [True] and subtracted == [True]
    assert divided == ([True if dtype == torch.float32 else None] if divides and exact else [])
    for w, g_ in zip(want, got):
        for name in w:
            nan = torch.isnan(w[name])
            assert torch.equal(torch.isnan(g_[name]), nan)
            assert bits(g_[name][~nan]) == bits(w[name][~nan]), f"{name!r} differs (s={s}, {dtype})"


def test_kernel_closures_hold_only_constants_so_that_numba_caches_them():
    """Numba keys a cached closure by its pickled cell contents: a compiled function among them
    pickles differently in every process, and the kernel was compiled anew each time (~1 s)."""
    factories = [_kernels().ties(False), _kernels().add_deltas(True), _numba._elementwise("sum", True),
                 _numba._elementwise("scale", True), _numba._selection().pack_magnitudes(True),
                 _numba._selection().bracket_scan(False)]
    for kernel in factories:
        cells = [c.cell_contents for c in kernel.py_func.__closure__ or ()]
        assert cells and all(type(c) in (int, bool) for c in cells), f"{kernel.py_func.__qualname__}: {cells}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(st.integers(0, 31), st.integers(0, 9000), st.integers(2, 6))
def test_streaming_stores_start_at_any_alignment(dtype, skip, n, k):
    """Outputs that begin off a cache-line boundary: entries up to the first boundary are written
    plainly, whole blocks from there on stream, and the tail is plain again."""
    g = torch.Generator().manual_seed(n)
    inputs = [torch.randn(n, generator=g).to(dtype) for _ in range(k)]
    want_sum, want_scaled = inputs[0] + inputs[1], inputs[0] * 0.3
    for x in inputs[2:]:
        want_sum.add_(x)
    room = torch.full((n + skip,), math.nan, dtype=dtype)
    out = room[skip:]  # skip entries past the buffer's aligned start
    with kernels(True), mock.patch.object(_numba, "STREAM_FROM", 0), mock.patch.object(_numba, "ELEMENTWISE_FROM", 0):
        assert _numba.running_sum(out, inputs)
        assert bits(out) == bits(want_sum)
        assert _numba.scale(out, inputs[0], 0.3)
        assert bits(out) == bits(want_scaled)
    assert torch.isnan(room[:skip]).all(), "nothing written before the output"


@pytest.mark.parametrize(("dtype", "delta_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=12), st.integers(0, 2**31 - 1))
def test_apply_to_in_one_pass_matches_the_torch_path(dtype, delta_dtype, sizes, seed):
    """Many separate base tensors (empty ones too) plus one buffer of deltas, in one compiled pass,
    rounded once to the base's dtype (float32 deltas of bfloat16 weights: the exact round trip)."""
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": (torch.randn(n, generator=g) * 10).to(dtype).reshape(-1, 1) for i, n in enumerate(sizes)}
    base["t0"].view(-1)[:3] = torch.tensor([math.inf, -0.0, math.nan]).to(dtype)[: base["t0"].numel()]
    # Deltas small against the weights too: their sum rounds (halfway cases included) into bfloat16.
    tv = ta.TaskVector({k: (torch.randn(v.shape, generator=g) * 2.0 ** -torch.randint(0, 12, v.shape, generator=g))
                        .to(delta_dtype) for k, v in base.items()})
    with kernels(False):
        want = tv.apply_to(base)
    with kernels(True), mock.patch.object(_numba, "ELEMENTWISE_FROM", 0), recording(_numba, "add_to_bases") as calls:
        got = tv.apply_to(base)
    assert calls == [True]
    assert list(got) == list(want)
    for name in want:
        nan = torch.isnan(want[name])  # a NaN's payload is not part of the result
        assert got[name].shape == want[name].shape and torch.equal(torch.isnan(got[name]), nan), name
        assert bits(got[name][~nan]) == bits(want[name][~nan]), name


def test_apply_to_with_a_scale_or_a_non_contiguous_base_takes_the_torch_path():
    base = {"a": torch.randn(4, 6).t(), "b": torch.randn(5)}  # "a" is a transposed view
    tv = ta.TaskVector({k: torch.ones(v.shape) for k, v in base.items()})
    with kernels(True), recording(_numba, "add_to_bases") as calls:
        out = tv.apply_to(base)
        scaled = tv.apply_to({k: v.contiguous() for k, v in base.items()}, 0.5)
    assert calls == [None]  # the transposed base; a scale other than 1 never asks
    assert torch.equal(out["a"], base["a"] + 1) and torch.equal(scaled["b"], base["b"] + 0.5)


def test_results_of_apply_to_are_never_handed_out_again_while_alive():
    """apply_to's buffer goes into the cache at once; it is reused only after the caller drops it."""
    ta.runtime.empty_cache()
    base = {"w": torch.zeros(1 << 20)}
    tv = ta.TaskVector({"w": torch.ones(1 << 20)})
    twice, thrice = 2 * tv, 3 * tv  # made first: they would take a free buffer of the same size too
    first = tv.apply_to(base)
    second = twice.apply_to(base)
    assert bool((first["w"] == 1).all()) and bool((second["w"] == 2).all())
    address = first["w"].data_ptr()
    del first
    third = thrice.apply_to(base)
    assert third["w"].data_ptr() == address, "the dropped result's buffer was reused"
    assert bool((second["w"] == 2).all()) and bool((third["w"] == 3).all())
    ta.runtime.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(st.integers(0, 3 * (1 << 20)), st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, 0.0]))
def test_the_nan_scan_finds_a_nan_anywhere_and_only_a_nan(dtype, where, value):
    x = torch.zeros(3 * (1 << 20) + 1, dtype=dtype)
    x[where] = value
    with kernels(True):
        assert _numba.has_nan(x) is math.isnan(value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_cosine_equals_its_dot_and_norms_on_any_thread_count(dtype):
    g = torch.Generator().manual_seed(11)
    a, b = (ta.TaskVector({"w": torch.randn(3_000_017, generator=g).to(dtype), "v": torch.randn(33, generator=g).to(dtype)})
            for _ in range(2))
    before = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with kernels(True):
                got.append((a.cosine(b), a.dot(b), a.norm(), b.norm()))
    finally:
        torch.set_num_threads(before)
    assert got[0] == got[1]
    cosine, dot, na, nb = got[0]
    assert cosine == dot / (na * nb)
    x, y = (torch.cat([v["w"], v["v"]]).double() for v in (a, b))
    assert abs(cosine - float(x @ y / (x.norm() * y.norm()))) <= 1e-12


def test_cosine_on_the_torch_path_equals_its_dot_and_norms():
    """Without the kernels, bfloat16 reductions run as chunked float64 dot products, a cosine in one pass."""
    g = torch.Generator().manual_seed(12)
    a, b = (ta.TaskVector({"w": torch.randn(200_003, generator=g).bfloat16()}) for _ in range(2))
    with kernels(False):
        cosine, dot, na, nb = a.cosine(b), a.dot(b), a.norm(), b.norm()
    assert cosine == dot / (na * nb)
    x, y = a["w"].double(), b["w"].double()
    assert abs(cosine - float(x @ y / (x.norm() * y.norm()))) <= 1e-12


WEIGHTS = st.sampled_from([1.0, 0.3, -2.5, 1 / 3, 0.7, 1e-3, 3e38, 0.0, 1e-40, 2.0 ** -126])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stream", [False, True])
@given(st.lists(WEIGHTS, min_size=2, max_size=5), st.integers(0, 9000), st.floats(0.01, 4.0))
def test_weighted_sums_match_the_torch_path(dtype, stream, weights, n, scale):
    """Task arithmetic with weights and a scale: float32 sums (bfloat16 widened, rounded once) in one
    pass, products rounded or fused as this torch build does; subnormal weights stay with torch."""
    g = torch.Generator().manual_seed(n)
    vs = [ta.TaskVector({"w": (torch.randn(n, generator=g) * 2.0 ** -torch.randint(0, 30, (n,), generator=g)).to(dtype),
                         "b": torch.tensor([math.inf, -0.0, 1.0, 2**-9]).to(dtype)}) for _ in weights]
    coefficients = [w * scale for w in weights]
    if any(abs(c) > torch.finfo(torch.float32).max for c in coefficients):
        for on in (False, True):  # beyond float32: refused on both paths alike
            with kernels(on), pytest.raises(ta.NonFiniteError):
                ta.merge(vs, "task_arithmetic", weights=weights, scale=scale)
        return
    with kernels(False):
        want = ta.merge(vs, "task_arithmetic", weights=weights, scale=scale)
    with kernels(True), mock.patch.object(_numba, "ELEMENTWISE_FROM", 0), \
            mock.patch.object(_numba, "STREAM_FROM", 0 if stream else 1 << 62), \
            recording(_numba, "weighted_sum") as calls:
        got = ta.merge(vs, "task_arithmetic", weights=weights, scale=scale)
    subnormal = any(c != 0 and abs(c) < torch.finfo(torch.float32).tiny for c in coefficients)
    taken = any(c is not None for c in calls)  # the merge asks for NaN counts: ints, not True
    assert taken == (not subnormal and not all(c == 1.0 for c in coefficients))
    for name in want:
        nan = torch.isnan(want[name])
        assert torch.equal(torch.isnan(got[name]), nan)
        assert bits(got[name][~nan]) == bits(want[name][~nan]), name


def test_an_unsettled_torch_rounding_keeps_weighted_sums_on_the_torch_path():
    vs = [ta.TaskVector({"w": torch.randn(1000)}) for _ in range(3)]
    with kernels(True), mock.patch.object(_numba, "ELEMENTWISE_FROM", 0), \
            mock.patch.object(_numba, "torch_fuses_alpha", lambda: None), recording(_numba, "weighted_sum") as calls:
        ta.merge(vs, "task_arithmetic", scale=0.3)
    assert calls == [None]
    assert _numba.torch_fuses_alpha() in (True, False)


SPECIALS = st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -3e38, 1.0, 0.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stream", [False, True])
@given(st.integers(0, 31), st.integers(0, 9000), st.lists(WEIGHTS, min_size=2, max_size=5),
       st.lists(st.tuples(st.integers(0, 4), st.integers(0, 8999), SPECIALS), max_size=12))
def test_sum_kernels_count_the_nan_results_they_write(dtype, stream, skip, n, weights, specials):
    """The merge's sums count NaN results as they write them (NaN inputs, inf - inf, overflow to inf
    then -inf), at any alignment and thread share: the count is that of the output's NaN."""
    g = torch.Generator().manual_seed(n)
    inputs = [torch.randn(n, generator=g).to(dtype) for _ in weights]
    for i, at, value in specials:
        if i < len(inputs) and at < n:
            inputs[i][at] = value
    out = torch.empty(n + skip, dtype=dtype)[skip:]
    with kernels(True), mock.patch.object(_numba, "STREAM_FROM", 0 if stream else 1 << 62), \
            mock.patch.object(_numba, "ELEMENTWISE_FROM", 0):
        runs = [lambda: _numba.running_sum(out, inputs, count_nan=True),
                lambda: _numba.wide_sum(out, inputs, count_nan=True),
                lambda: _numba.weighted_sum(out, inputs, weights, count_nan=True)]
        for run in runs:
            out.fill_(0.0)
            counted = run()
            if counted is not None:  # weighted: not taken for subnormal weights
                assert counted is not True and counted == int(torch.isnan(out).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_merge_counts_nan_in_one_pass_and_still_names_the_inputs(dtype):
    """The NaN policy on the counted sums: a NaN input is named; a NaN made by inf - inf stays."""
    n = 3000
    a, b, c = (torch.randn(n, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(3))
    b[17] = math.nan
    vs = [ta.TaskVector({"w": x}) for x in (a, b, c)]
    with kernels(True), mock.patch.object(_numba, "ELEMENTWISE_FROM", 0), \
            mock.patch.object(_numba, "STREAM_FROM", 0), recording(_numba, "running_sum") as plain, \
            recording(_numba, "wide_sum") as wide:
        with pytest.raises(ta.NonFiniteError, match=r"#1.*'w'"):
            ta.merge(vs, "task_arithmetic")
        assert [x for x in plain + wide if x is not None] == [1]  # counted by the kernel, then named
        b[17], a[5], c[5] = 1.0, math.inf, -math.inf
        merged = ta.merge([ta.TaskVector({"w": x}) for x in (a, b, c)], "task_arithmetic")
    assert torch.isnan(merged["w"]).tolist() == [i == 5 for i in range(n)]
