"""Merge methods: hand-computed examples, hypothesis invariants, validation before compute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import scalars, vectors

import taskarith as ta
from taskarith.backends import _fused, _numba, kernels, thresholds
from taskarith.merging import _trim

DETERMINISTIC = ["task_arithmetic", "mean", "magnitude_prune", "ties", "breadcrumbs", "consensus", "iso_c"]
WITH_SCALE = ["task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs", "consensus", "tsv", "iso_c"]
SEEDED = {"dare": {"seed": 3}, "dare_ties": {"seed": 3}}


def tv(**tensors):
    return ta.TaskVector({k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()})


A = tv(w=[1.0, -2.0, 0.5, 0.0], b=[0.25])
B = tv(w=[3.0, 1.0, -0.1, -4.0], b=[-1.0])
C = tv(w=[-1.0, -1.0, 2.0, 1.0], b=[0.5])


# ------------------------------------------------------------ hand-computed


def test_task_arithmetic_and_mean_by_hand():
    out = ta.merge([A, B], "task_arithmetic", weights=[1.0, 0.5], scale=2.0)
    assert out["w"].tolist() == pytest.approx([5.0, -3.0, 0.9, -4.0], rel=1e-6)
    assert out["b"].tolist() == [-0.5]
    out = ta.merge([A, B], "mean", weights=[1.0, 3.0])
    assert out["w"].tolist() == pytest.approx([2.5, 0.25, 0.05, -3.0])


def test_magnitude_prune_by_hand():
    # global scope over 5 entries, density 0.4 -> keep 2 per vector
    out = ta.merge([A, B], "magnitude_prune", density=0.4, scope="global")
    # A keeps -2 and 1; B keeps -4 and 3
    assert out["w"].tolist() == [4.0, -2.0, 0.0, -4.0] and out["b"].tolist() == [0.0]
    # tensor scope: w keeps floor(0.4*4)=1, b keeps floor(0.4*1)=0
    out = ta.merge([A, B], "magnitude_prune", density=0.4, scope="tensor")
    assert out["w"].tolist() == [0.0, -2.0, 0.0, -4.0] and out["b"].tolist() == [0.0]


def test_ties_by_hand_with_sum_and_count_election():
    # density 0.6 global over 5 entries -> keep 3 per vector; ties at the threshold go to the
    # tensors first in name order ("b" before "w"), then to the lowest indices
    # A: w -2, 1, 0.5                 (b = 0.25 trimmed)
    # B: w -4, 3, and b = -1          (w[1] = 1 ties with b and loses: "b" comes first)
    # C: w 2, -1(idx0), -1(idx1)      (ties at 1: w idx0, 1, 3 -> lowest indices; b = 0.5 trimmed)
    out = ta.merge([A, B, C], "ties", density=0.6, scope="global", sign="sum")
    # entry0: A 1, B 3, C -1 -> sum 3 (+) -> mean(1, 3) = 2
    # entry1: A -2, B 0, C -1 -> - -> mean(-2, -1) = -1.5
    # entry2: A 0.5, B 0, C 2 -> + -> 1.25
    # entry3: A 0, B -4, C 0 -> - -> -4 ; b: B alone -> -1
    assert out["w"].tolist() == [2.0, -1.5, 1.25, -4.0] and out["b"].tolist() == [-1.0]
    counted = ta.merge([A, B, C], "ties", density=0.6, scope="global", sign="count")
    # entry0: +,+,- -> + ; entry1: -,+,- -> - ; same as above here
    assert counted["w"].tolist() == [2.0, -1.5, 1.25, -4.0]
    # a sign tie goes to +: entry1 of A and B alone: -2 and +1 with "count" -> tie -> + -> mean(1) = 1
    pair = ta.merge([A, B], "ties", density=1.0, scope="global", sign="count")
    assert pair["w"][1].item() == 1.0


def test_ties_weights_apply_after_trimming_and_before_election():
    # Weighted B dominates entry1's election: -2 vs 1*3 -> +
    out = ta.merge([A, B], "ties", density=1.0, weights=[1.0, 3.0])
    assert out["w"][1].item() == 3.0
    assert out["w"][0].item() == (1.0 + 9.0) / 2


def test_dare_drops_and_rescales_exactly_and_is_reproducible():
    big = ta.TaskVector({"w": torch.linspace(-1, 1, 10_000)})
    out = ta.merge([big], "dare", drop=0.75, seed=11)
    kept = out["w"] != 0
    assert torch.equal(out["w"][kept], big["w"][kept] / 0.25)
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert ta.merge([big], "dare", drop=0.75, seed=11).equal(out)
    assert not ta.merge([big], "dare", drop=0.75, seed=12).equal(out)
    assert ta.merge([A, B], "dare", drop=0.0, seed=0).allclose(A + B, rtol=0, atol=0)


def test_dare_masks_do_not_depend_on_other_tensors_or_their_order():
    g = torch.Generator().manual_seed(0)
    w, v = torch.randn(50, generator=g), torch.randn(7, generator=g)
    alone = ta.merge([ta.TaskVector({"w": w})], "dare", drop=0.5, seed=5)
    with_other = ta.merge([ta.TaskVector({"v": v, "w": w})], "dare", drop=0.5, seed=5)
    assert torch.equal(alone["w"], with_other["w"])


def test_dare_ties_elects_over_dropped_and_rescaled_vectors():
    out = ta.merge([A, B], "dare_ties", drop=0.0, seed=1)
    assert out.allclose(ta.merge([A, B], "ties", density=1.0), rtol=0, atol=0)


def test_breadcrumbs_by_hand():
    x = ta.TaskVector({"w": torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.01])})
    out = ta.merge([x], "breadcrumbs", top=0.1, density=0.5)
    # drop the single largest (5), keep the next 5: -4, 3, -2, 1, 0.5
    assert out["w"].tolist() == [0.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]


def test_consensus_by_hand():
    out = ta.merge([A, B, C], "consensus", k=2, lambda_=1.0)
    total = (A + B + C)["w"]  # [3, -2, 2.4, -3]
    # entry0: |1|>=|2|? no; |3|>=|0|? yes; |-1|>=|4|? no -> 1 vote -> dropped
    # entry3: |0|>=|-3|? no; |-4|>=|1| yes; |1|>=|-4| no -> 1 vote -> dropped
    # entry1: |-2|>=|0| yes; |1|>=|-3| no; |-1|>=|-1| yes -> 2 votes -> kept
    # entry2: |0.5|>=|1.9| no; |-0.1|>=|2.5| no; |2|>=|0.4| yes -> 1 vote -> dropped
    assert out["w"].tolist() == [0.0, total[1].item(), 0.0, 0.0]


def test_iso_c_flattens_the_spectrum_of_the_sum():
    g = torch.Generator().manual_seed(0)
    a, b = (ta.TaskVector({"m": torch.randn(6, 4, generator=g), "bias": torch.randn(3, generator=g)}) for _ in range(2))
    out = ta.merge([a, b], "iso_c", scale=1.0)
    s_sum = torch.linalg.svdvals((a + b)["m"])
    s_out = torch.linalg.svdvals(out["m"])
    assert torch.allclose(s_out, s_sum.mean().expand(4), rtol=1e-5)
    assert torch.allclose(out["bias"], (a + b)["bias"])


def test_tsv_of_one_task_at_full_rank_is_the_identity():
    g = torch.Generator().manual_seed(0)
    a = ta.TaskVector({"m": torch.randn(5, 3, generator=g), "bias": torch.randn(3, generator=g)})
    out = ta.merge([a], "tsv", rank_fraction=1.0)
    assert out.allclose(a, rtol=1e-5, atol=1e-5)


def test_tsv_keeps_the_requested_rank():
    g = torch.Generator().manual_seed(1)
    vs = [ta.TaskVector({"m": torch.randn(8, 8, generator=g)}) for _ in range(4)]
    out = ta.merge(vs, "tsv")  # default: 1/4 of rank 8 -> 2 per task -> rank 8
    assert torch.linalg.matrix_rank(out["m"]).item() == 8
    out = ta.merge(vs, "tsv", rank_fraction=0.125)  # 1 per task -> rank 4
    assert torch.linalg.matrix_rank(out["m"]).item() == 4


@pytest.mark.parametrize("seed", range(5))
def test_tsv_does_not_depend_on_input_order_in_general_position(seed):
    g = torch.Generator().manual_seed(seed)
    vs = [ta.TaskVector({"m": torch.randn(7, 5, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)})
          for _ in range(3)]
    out = ta.merge(vs, "tsv", weights=[1.0, 0.5, 2.0])
    shuffled = ta.merge([vs[2], vs[0], vs[1]], "tsv", weights=[2.0, 1.0, 0.5])
    assert out.allclose(shuffled, rtol=1e-9, atol=1e-9)


def test_half_precision_inputs_merge_in_float32_and_return_their_dtype():
    a16, b16 = A.to(dtype=torch.bfloat16), B.to(dtype=torch.bfloat16)
    out = ta.merge([a16, b16], "ties", density=0.6)
    assert out.dtype == torch.bfloat16
    reference = ta.merge([a16.to(dtype=torch.float32), b16.to(dtype=torch.float32)], "ties", density=0.6)
    assert out.equal(reference.to(dtype=torch.bfloat16))
    assert ta.merge([a16, b16], "ties", density=0.6, dtype=torch.float32).equal(reference)


@pytest.mark.parametrize("method,options", [("ties", {"density": 0.5}), ("ties", {"density": 0.5, "scope": "tensor"}),
                                            ("magnitude_prune", {"density": 0.5}), ("task_arithmetic", {})])
def test_a_tensor_wider_in_one_vector_is_merged_at_that_width(method, options):
    """A float64 fallback delta in one vector (others float32) merges as if every vector held float64 there
    (weights are powers of two, so weighting each vector in its own dtype is exact)."""
    g = torch.Generator().manual_seed(0)
    vectors = [ta.TaskVector({"a": torch.randn(40, generator=g),
                              "w": torch.randn(50, generator=g).to(torch.float64 if i == 1 else torch.float32)})
               for i in range(3)]
    wide = [ta.TaskVector({"a": v["a"], "w": v["w"].double()}) for v in vectors]
    got = ta.merge(vectors, method, weights=[1.0, 0.5, 2.0], **options)["w"]
    want = ta.merge(wide, method, weights=[1.0, 0.5, 2.0], **options)["w"]
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_tied_names_stay_tied_through_a_merge():
    w1, w2 = torch.randn(4), torch.randn(4)
    a = ta.TaskVector({"embed": w1, "head": w1})
    b = ta.TaskVector({"embed": w2, "head": w2})
    out = ta.merge([a, b], "ties", density=0.5)
    assert out.aliases == {"head": "embed"}
    untied = ta.TaskVector({"embed": w2, "head": w2 * 2})
    mixed = ta.merge([a, untied], "task_arithmetic")
    assert mixed.aliases == {}
    assert torch.equal(mixed["head"], w1 + 2 * w2) and torch.equal(mixed["embed"], w1 + w2)


# ----------------------------------------------------------- selection


def _reference_topk(values: np.ndarray, k: int) -> np.ndarray:
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))  # largest first, ties by index
    mask = np.zeros(len(values), dtype=bool)
    mask[order[:k]] = True
    return mask


@given(values=hnp.arrays(np.float32, st.integers(0, 60), elements=st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 3.5])),
       fraction=st.floats(0, 1))
def test_topk_keeps_exactly_k_with_lowest_index_tie_break(values, fraction):
    k = math.floor(fraction * len(values))
    mask = kernels.topk_mask(torch.from_numpy(values), k)
    assert int(mask.sum()) == k, f"topk_mask kept {int(mask.sum())} of {len(values)} for k={k}"
    assert np.array_equal(mask.numpy(), _reference_topk(values, k)), "topk_mask differs from the sorted reference"


@given(segments=st.lists(hnp.arrays(np.float32, st.integers(0, 40),
                                     elements=st.sampled_from([0.0, -0.5, 0.5, 1.0, -1.0, 2.0, -3.5, 1e-30])),
                          min_size=1, max_size=6),
       fractions=st.lists(st.floats(0, 1), min_size=6, max_size=6))
def test_segment_thresholds_match_one_selection_per_segment(segments, fractions):
    """The accelerator path (one sort for all tensors) finds the same threshold and tie excess."""
    sizes = [len(s) for s in segments]
    ks = [math.floor(f * n) for f, n in zip(fractions, sizes)]
    flat = torch.from_numpy(np.concatenate(segments)) if sum(sizes) else torch.zeros(0)
    got = thresholds.segment_thresholds(flat, sizes, ks)
    start = 0
    for i, (n, k) in enumerate(zip(sizes, ks)):
        values = flat[start:start + n]
        threshold, cut = thresholds.trim_threshold(values, k)
        excess = 0 if cut is None else int((values[cut:].abs() == threshold).sum())
        assert got[i][0] == threshold, f"segment {i} (n={n}, k={k}): threshold {got[i][0]} vs {threshold}"
        if threshold != 0 and not math.isinf(threshold):
            assert got[i][1] == excess, f"segment {i} (n={n}, k={k}): excess {got[i][1]} vs {excess}"
        start += n


@given(vs=vectors(n=3), density=st.floats(0.0, 1.0, exclude_min=True), sign=st.sampled_from(["sum", "count"]),
       small=st.sampled_from([2, 1 << 16]), integers=st.booleans())
def test_segmented_trim_plan_gives_the_same_ties_merge(vs, density, sign, small, integers):
    """The one-sort tensor-scope trim (all tensors on accelerators; many small float32 ones on the CPU,
    here any below ``small`` entries) merges exactly like a selection per tensor; integer values put
    ties at the thresholds."""
    if integers:
        vs = [ta.TaskVector({n: v[n].round() for n in v._layout.slots}) for v in vs]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_trim, "_MANY_SMALL", 10**9)  # never: one selection per tensor
        want = ta.merge(vs, "ties", density=density, scope="tensor", sign=sign)
        patch.setattr(_trim, "_MANY_SMALL", 1)
        patch.setattr(_trim, "_SMALL_TENSOR", small)
        got = ta.merge(vs, "ties", density=density, scope="tensor", sign=sign)
    assert all(torch.equal(got[n], want[n]) for n in want._layout.slots), "segmented trim changed the merge"


@given(t=st.floats(min_value=0, exclude_min=True, allow_infinity=False), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_hardshrink_thresholds_are_the_neighbours_of_t_in_the_compute_dtype(t, dtype):
    """shrink_threshold: the largest value below t (hardshrink keeps |x| >= t); floor_threshold: the
    largest value not above t (keeps |x| > t), in float32 or float64."""
    kind = np.float32 if dtype == torch.float32 else np.float64
    up = lambda x: float(np.nextafter(kind(x), kind(np.inf)))
    below, floor = _fused.shrink_threshold(t, dtype), _fused.floor_threshold(t, dtype)
    assert float(kind(below)) == below and float(kind(floor)) == floor, "not a value of the dtype"
    with np.errstate(over="ignore"):
        assert below < t <= up(below), f"shrink_threshold({t!r}) = {below!r}"
        assert floor <= t < up(floor), f"floor_threshold({t!r}) = {floor!r}"


# Few distinct values: ties at every threshold, and sums that float32 holds exactly.
FEW = st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 3.5, -3.5])


@given(values=hnp.arrays(np.float32, st.integers(1, 300), elements=FEW), fraction=st.floats(0, 1),
       sort=st.booleans(), magnitudes=st.booleans())
def test_selection_by_sort_and_by_partition_agree_with_a_sorted_reference(values, fraction, sort, magnitudes):
    """Both selection strategies (sorting arrays with few distinct values, partitioning others) give
    the k-th largest and the count of ties past it."""
    if magnitudes:
        values = np.abs(values)
    k = max(1, math.floor(fraction * len(values)))
    ordered = np.sort(values)
    want = (ordered[len(values) - k], int(np.count_nonzero(values >= ordered[len(values) - k])) - k)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "_SORT_FROM", 0)
        patch.setattr(kernels, "_SORT_BELOW_DISTINCT", 2.0 if sort else 0.0)
        threshold, excess = kernels._select(torch.from_numpy(values.copy()), k, magnitudes=magnitudes)
    assert (float(threshold), excess) == (float(want[0]), want[1]), f"k={k}, sort={sort}: {threshold, excess} vs {want}"


@given(parts=st.lists(hnp.arrays(np.float32, st.integers(0, 30), elements=FEW), min_size=1, max_size=4),
       threshold=st.sampled_from([0.5, 1.0, 2.0, 3.5]), pick=st.floats(0, 1), block=st.integers(1, 8),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), compiled=st.booleans())
def test_tie_cut_finds_where_the_last_ties_begin(parts, threshold, pick, block, dtype, compiled):
    flat = np.concatenate(parts)
    ties = np.flatnonzero(np.abs(flat) == threshold)
    if not ties.size:
        return
    excess = 1 + math.floor(pick * (ties.size - 1))
    first_dropped = ties[ties.size - excess]
    starts = np.cumsum([0] + [len(p) for p in parts])
    part = int(np.searchsorted(starts, first_dropped, side="right")) - 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(thresholds, "_TIE_BLOCK", block)  # cut points fall inside and between blocks
        patch.setenv("TASKARITH_BACKEND", "numba" if compiled else "torch")  # the Numba kernel, where installed
        got = thresholds.tie_cut([torch.from_numpy(p).to(dtype) for p in parts], threshold, excess)
    assert got == (part, int(first_dropped - starts[part])), f"excess={excess}"


@given(values=hnp.arrays(np.float32, st.integers(0, 40), elements=FEW), threshold=st.sampled_from([0.5, 1.0, 2.0]),
       kept=st.integers(0, 45), block=st.integers(1, 8), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       compiled=st.booleans())
def test_tie_after_finds_the_first_tie_past_those_kept(values, threshold, kept, block, dtype, compiled):
    ties = np.flatnonzero(np.abs(values) == threshold)
    want = (int(ties[kept]), kept) if kept < ties.size else (None, int(ties.size))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(thresholds, "_TIE_BLOCK", block)  # the tie falls inside and between blocks
        patch.setenv("TASKARITH_BACKEND", "numba" if compiled else "torch")  # the Numba kernel, where installed
        got = thresholds.tie_after(torch.from_numpy(values).to(dtype), threshold, kept)
    assert got == want


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "partitioned"])
@given(start=st.integers(0, 99), count=st.integers(1, 100), density=st.floats(0.01, 0.99))
def test_trims_refuse_nan_wherever_it_is(scope, sort, start, count, density):
    """The selection finds a NaN among the k largest bit patterns it leaves at the end: any number
    of NaNs anywhere is refused, whichever selection ran."""
    w = torch.linspace(-1, 1, 100)
    w[start:start + count] = float("nan")
    vs = [ta.TaskVector({"w": w, "b": torch.ones(3)}), ta.TaskVector({"w": torch.ones(100), "b": torch.ones(3)})]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "_SORT_FROM", 0)
        patch.setattr(kernels, "_SORT_BELOW_DISTINCT", 2.0 if sort else 0.0)
        with pytest.raises(ta.TaskArithError, match="NaN"):
            ta.merge(vs, "ties", density=density, scope=scope)


def _reference_trim(values: list[np.ndarray], density: float, scope: str) -> list[np.ndarray]:
    """Keep floor(density * n) largest magnitudes, ties to the lowest (storage-order) index."""
    if scope == "tensor":
        return [np.where(_reference_topk(np.abs(v), math.floor(density * v.size)), v, 0) for v in values]
    flat = np.concatenate(values)
    kept = np.where(_reference_topk(np.abs(flat), math.floor(density * flat.size)), flat, 0)
    return np.split(kept, np.cumsum([v.size for v in values])[:-1])


@given(data=st.data(), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), density=st.floats(0.05, 0.95),
       scope=st.sampled_from(["global", "tensor"]), sign=st.sampled_from(["sum", "count"]), block=st.integers(1, 16))
def test_ties_with_many_equal_magnitudes_equals_a_reference(data, sizes, density, scope, sign, block):
    """TIES and magnitude pruning on values with ties at every threshold, against a numpy reference
    (trim by sorting, elect, disjoint mean); small fused blocks put the tie cuts inside and between
    blocks."""
    arrays = [[data.draw(hnp.arrays(np.float32, size, elements=FEW)) for size in sizes] for _ in range(3)]
    vs = [ta.TaskVector({f"t{i}": torch.from_numpy(a) for i, a in enumerate(arrs)}) for arrs in arrays]
    trimmed = [_reference_trim(arrs, density, scope) for arrs in arrays]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fused, "BLOCK", block)
        got = ta.merge(vs, "ties", density=density, scope=scope, sign=sign)
        pruned = ta.merge(vs, "magnitude_prune", density=density, scope=scope)
    for i in range(len(sizes)):
        t = np.stack([trimmed[j][i] for j in range(3)])  # float32, sums of these values are exact
        votes = t.sum(0) if sign == "sum" else np.sign(t).sum(0)
        elected = np.where(votes >= 0, 1.0, -1.0).astype(np.float32)
        agree = (np.sign(t) == elected) & (t != 0)
        count = agree.sum(0)
        mean = np.where(count > 0, np.where(agree, t, 0).sum(0) / np.maximum(count, 1).astype(np.float32), 0)
        assert np.array_equal(got[f"t{i}"].numpy(), mean.astype(np.float32)), f"ties t{i} ({scope}, {sign})"
        assert np.array_equal(pruned[f"t{i}"].numpy(), t.sum(0)), f"magnitude_prune t{i} ({scope})"


@given(vs=vectors(n=1, dtypes=[torch.float32, torch.float64]), density=st.floats(0.01, 1.0), scope=st.sampled_from(["global", "tensor"]))
def test_trim_keeps_exactly_floor_density_n_entries(vs, density, scope):
    (v,) = vs
    v = ta.TaskVector({n: torch.arange(1, v[n].numel() + 1, dtype=v[n].dtype).view(v[n].shape) * (v[n] + 0.5).sign().where(v[n] != -0.5, 1) for n in v})  # non-zero entries
    trimmed = ta.merging.trim(v, density, scope)
    kept = sum(int((t != 0).sum()) for t in trimmed.values())
    if scope == "global":
        expected = math.floor(density * v.numel())
    else:
        expected = sum(math.floor(density * v[n].numel()) for n in v._layout.slots)
    assert kept == expected, f"trim({scope}) kept {kept}, expected {expected}"


@given(values=st.lists(st.integers(-3, 3), min_size=12, max_size=40), order=st.randoms(use_true_random=False),
       density=st.floats(0.05, 0.95), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_global_trim_keeps_the_same_ties_whatever_the_order_of_the_tensors(values, order, density, dtype):
    # Few distinct magnitudes: many ties at the threshold, which sorted names break the same way
    # for a state dict in any order (a file's, a module's, a folder's shards).
    cut = len(values) // 3
    tensors = {"b.weight": values[:cut], "a.bias": values[cut:2 * cut], "c": values[2 * cut:]}
    state = {n: torch.tensor(v, dtype=dtype) for n, v in tensors.items()}
    names = list(state)
    order.shuffle(names)
    one = ta.merging.trim(ta.TaskVector(state), density, "global")
    other = ta.merging.trim(ta.TaskVector({n: state[n] for n in names}), density, "global")
    assert all(torch.equal(one[n], other[n]) for n in state)
    # The kept ties are the first ones in sorted name order, then in each tensor's order.
    flat = torch.cat([state[n].float() for n in sorted(state)])
    k = math.floor(density * flat.numel())
    keep = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))[:k]
    want = torch.zeros_like(flat)
    want[keep] = flat[keep]
    assert torch.equal(torch.cat([one[n].float() for n in sorted(state)]), want)


# ---------------------------------------------------------- invariants


@given(vs=vectors(n=1, dtypes=[torch.float32, torch.float64]), scope=st.sampled_from(["global", "tensor"]),
       sign=st.sampled_from(["sum", "count"]))
def test_ties_of_one_vector_at_full_density_is_the_identity(vs, scope, sign):
    (v,) = vs
    assert ta.merge([v], "ties", density=1.0, scope=scope, sign=sign).equal(v)


@given(vs=vectors(n=2, dtypes=[torch.float32, torch.float64], max_abs=1e6), s=scalars, t=scalars, c=scalars)
def test_task_arithmetic_is_linear(vs, s, t, c):
    a, b = vs
    got = ta.merge([a, b], "task_arithmetic", weights=[s, t], scale=c)
    want = (c * s) * a + (c * t) * b
    for n in a:
        bound = 4 * torch.finfo(a[n].dtype).eps * abs(c) * (abs(s) * a[n].abs() + abs(t) * b[n].abs()).double() + 1e-30
        assert bool(((got[n].double() - want[n].double()).abs() <= bound).all()), f"task_arithmetic {n!r}"


@pytest.mark.parametrize("method", DETERMINISTIC)
@given(vs=vectors(n=3, dtypes=[torch.float64], max_abs=1e3), w=st.lists(st.floats(0.1, 2.0), min_size=3, max_size=3),
       perm=st.permutations([0, 1, 2]))
def test_deterministic_merges_do_not_depend_on_input_order(method, vs, w, perm):
    out = ta.merge(vs, method, weights=w)
    shuffled = ta.merge([vs[i] for i in perm], method, weights=[w[i] for i in perm])
    assert out.allclose(shuffled, rtol=1e-9, atol=1e-9), f"{method}: result depends on the order of the vectors"


@pytest.mark.parametrize("method", WITH_SCALE)
@given(vs=vectors(n=2, dtypes=[torch.float64], max_abs=1e3), s=scalars)
def test_scale_is_equivariant(method, vs, s):
    options = SEEDED.get(method, {})
    plain = ta.merge(vs, method, **options)
    scaled = ta.merge(vs, method, scale=s, **options)
    assert scaled.allclose(s * plain, rtol=1e-9, atol=1e-9), f"{method}: scale={s} is not a plain multiplier"


def test_dare_is_unbiased():
    # E[mask / (1 - p)] = 1, so the mean over seeds tends to τ. With p = 0.5 each draw is 0 or 2τ; over
    # N = 4000 seeds the mean has standard deviation |τ|/sqrt(N) ≈ 0.016|τ|: allow 5 of them.
    tau = ta.TaskVector({"w": torch.linspace(-2, 2, 64, dtype=torch.float64)})
    n = 4000
    mean = sum(ta.merge([tau], "dare", drop=0.5, seed=s)["w"] for s in range(n)) / n
    assert bool(((mean - tau["w"]).abs() <= 5 * tau["w"].abs() / math.sqrt(n) + 1e-12).all())


# ------------------------------------------------------------- validation


def test_unknown_methods_and_options_list_the_valid_ones():
    with pytest.raises(ta.TaskArithError, match="valid: arcee_fusion, breadcrumbs, breadcrumbs_ties, consensus"):
        ta.merge([A], "tie")
    with pytest.raises(ta.TaskArithError, match=r"unknown option\(s\) \['densty'\].*density \(a number in \(0, 1\]\)"):
        ta.merge([A], "ties", densty=0.3)
    with pytest.raises(ta.TaskArithError, match=r"density=1.5 is invalid.*scope='layer' is invalid"):
        ta.merge([A], "ties", density=1.5, scope="layer")
    with pytest.raises(ta.TaskArithError, match="seed is required"):
        ta.merge([A], "dare")
    with pytest.raises(ta.TaskArithError, match="drop=1.0 is invalid"):
        ta.merge([A], "dare", drop=1.0, seed=0)


def test_options_are_validated_before_any_computation():
    calls = []

    def spy(block, *, level):
        calls.append(1)
        return block.deltas[0]

    ta.merging.register("spy_demo", spy, paper="n/a",
                        options={"level": ta.merging.Option(1, lambda x: x in (1, 2), "1 or 2")})
    try:
        with pytest.raises(ta.TaskArithError, match="level=3"):
            ta.merge([A, B], "spy_demo", level=3)
        with pytest.raises(ta.KeyMismatchError):
            ta.merge([A, tv(w=[1.0, 2.0, 3.0, 4.0])], "spy_demo")
        assert calls == []
        with pytest.raises(ta.TaskArithError, match="already registered"):
            ta.merging.register("spy_demo", spy, paper="n/a")
    finally:
        ta.merging.unregister("spy_demo")


def test_bad_vector_lists_and_weights_are_refused():
    with pytest.raises(ta.TaskArithError, match="at least one"):
        ta.merge([], "ties")
    with pytest.raises(ta.TaskArithError, match="#1"):
        ta.merge([A, {"w": torch.zeros(4)}], "ties")
    with pytest.raises(ta.ShapeMismatchError, match="'w'"):
        ta.merge([A, tv(w=[1.0], b=[0.0])], "ties")
    with pytest.raises(ta.TaskArithError, match="2 weights for 3"):
        ta.merge([A, B, C], "ties", weights=[1.0, 2.0])
    with pytest.raises(ta.TaskArithError, match="sum to zero"):
        ta.merge([A, B], "mean", weights=[1.0, -1.0])
    with pytest.raises(ta.TaskArithError, match="floating-point"):
        ta.merge([A, B], "ties", dtype=torch.int8)


def test_every_method_documents_its_formula_and_paper():
    for name, method in ta.methods().items():
        assert method.paper.startswith("https://"), name  # a paper, or the reference a method without one has
        assert len(method.doc) > 40, f"{name} needs a docstring with its formula"


@given(parts=st.lists(hnp.arrays(np.float32, st.integers(0, 120), elements=st.one_of(FEW, st.floats(-9, 9, width=32))),
                      min_size=1, max_size=4),
       fraction=st.floats(0, 1), sample=st.integers(1, 64), margin=st.sampled_from([0, 16]), chunk=st.integers(1, 9),
       nan_at=st.none() | st.integers(0, 500), compiled=st.booleans(), wide=st.booleans(), room=st.sampled_from([0, 1024]))
def test_bracketed_selection_equals_the_full_selection_or_declines(parts, fraction, sample, margin, chunk, nan_at,
                                                                   compiled, wide, room):
    """Tiny samples and chunks, shares split across threads, brackets narrow enough to miss: whenever
    the bracket answers, it is the exact k-th largest magnitude with the same tie count as a
    selection over all magnitudes. Both scans: numpy's and the compiled one (whose packing room
    runs out on wide brackets: it declines then)."""
    flat = np.concatenate(parts)
    if nan_at is not None and flat.size:
        flat[nan_at % flat.size] = np.nan
        at = 0
        for p in parts:  # the same NaN in the parts
            if at <= nan_at % flat.size < at + p.size:
                p[nan_at % flat.size - at] = np.nan
            at += p.size
    k = math.floor(fraction * flat.size)
    tensors = [torch.from_numpy(p.copy()) for p in parts]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(thresholds, "_BRACKET_SAMPLE", sample)
        patch.setattr(thresholds, "_BRACKET_CHUNK", chunk)
        patch.setattr(thresholds, "_BRACKET_MAX_FRACTION", 1.0)
        patch.setattr(thresholds, "_BRACKET_MARGIN", margin)
        patch.setattr(ta._parallel, "MIN_SHARE", 1)  # several threads, ranges cut inside tensors
        patch.setenv("TASKARITH_BACKEND", "numba" if compiled else "torch")  # the Numba kernel, where installed
        patch.setattr(thresholds, "_BRACKET_ROOM", room)
        if compiled and _numba.enabled():  # the scalar packing loop too, as on CPUs without AVX-512
            host = _numba._wide_stores()
            patch.setattr(_numba, "_wide_stores", lambda: wide and host)
        if np.isnan(flat).any() and 0 < k < flat.size:
            with pytest.raises(ta.TaskArithError, match="NaN"):
                thresholds.bracket_select(tensors, k)
            return
        got = thresholds.bracket_select(tensors, k)
    if got is None:
        return
    assert 0 < k < flat.size, "answered outside 0 < k < n"
    want = thresholds.select_magnitudes(torch.from_numpy(np.abs(flat)), k)
    assert got == want, f"k={k}: {got} vs {want}"


@given(rows=hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 40)),
                       elements=st.integers(-3, 3).map(float) | st.floats(-9, 9, width=32)),
       fraction=st.floats(0, 1))
def test_row_thresholds_match_a_selection_per_row(rows, fraction):
    """Every row's threshold and tie count (small integers: ties at the threshold are common) as a
    selection of that row alone gives them."""
    k = math.floor(fraction * rows.shape[1])
    got = thresholds.row_thresholds(torch.from_numpy(rows.copy()), k)
    for row, (threshold, excess) in zip(rows, got):
        want = thresholds.select_magnitudes(torch.from_numpy(np.abs(row)), k)
        assert (threshold, excess) == want, f"row {row.tolist()}, k={k}"
