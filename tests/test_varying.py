"""Options and weights that vary by tensor (:class:`taskarith.merging.Varying`: mergekit's gradients
and filters): resolved for each tensor by the engine, in memory and out of core alike, checked for
every tensor before any work, and refused where a method decides over the whole model."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taskarith as ta
from taskarith.backends import _fused
from taskarith.merging import Varying, _trim, _varying


def test_varying_values_resolve_per_tensor_in_memory_and_out_of_core(tmp_path):
    base = {f"model.layers.{i}.w": torch.randn(5, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    vectors = [ta.TaskVector({n: torch.full_like(t, float(k + 1)) for n, t in base.items()}) for k in range(2)]
    weight = _varying.gradient([0.0, 1.0], layers=3)
    merged = ta.merge(vectors, "task_arithmetic", weights=[weight, 1.0])
    for i, w in enumerate([0.0, 0.5, 1.0]):
        assert torch.equal(merged[f"model.layers.{i}.w"], torch.full((5, 3), w * 1 + 2.0))
    vector_files = []
    for k, v in enumerate(vectors):
        vector_files.append(tmp_path / f"v{k}.safetensors")
        v.save(vector_files[-1])
    out = ta.merge_files(None, vector_files, tmp_path / "m.safetensors", "task_arithmetic", weights=[weight, 1.0])
    assert ta.load(out).equal(merged)


def _models(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, count: int = 3):
    g = torch.Generator().manual_seed(7)
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    # Rounded steps: half-precision deltas tie at the thresholds, as real ones do.
    tuned = [{n: (t.float() + torch.randint(-4, 5, t.shape, generator=g) / 8).to(dtype) for n, t in base.items()}
             for _ in range(count)]
    return base, tuned


# Many small float32 tensors (selected together, as LoRA factors are), a few larger ones, and bfloat16.
_CASES = {
    "small-many": ({f"layers.{i}.lora_A": (4, 16) for i in range(70)}, torch.float32),
    "mixed": ({"embed": (40, 8), "layers.0.w": (12, 12), "layers.1.w": (12, 12), "norm": (12,)}, torch.float32),
    "bfloat16": ({"embed": (40, 8), "layers.0.w": (12, 12), "layers.1.w": (12, 12), "norm": (12,)}, torch.bfloat16),
}


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
@pytest.mark.parametrize("case", sorted(_CASES))
def test_a_tensor_scope_trim_takes_a_density_per_tensor(method, case, tmp_path):
    """Each tensor is trimmed to its own density: the merge equals, tensor by tensor, the merge of
    that tensor alone at its density; out of core at any budget equals it bit for bit."""
    shapes, dtype = _CASES[case]
    base, tuned = _models(shapes, dtype)
    vectors = [ta.TaskVector.from_models(base, t) for t in tuned]
    rule = lambda name: 1.0 if name == "norm" else (0.25 if "embed" in name else 0.3 + 0.05 * (len(name) % 5))
    density = Varying(rule, "per name")
    weights = [Varying(lambda name: 0.5 if "layers.1" in name else 1.0, "halved in layer 1"), 1.0, 0.75]
    merged = ta.merge(vectors, method, density=density, scope="tensor", weights=weights)
    for name in shapes:
        alone = ta.merge([ta.TaskVector({name: v[name]}) for v in vectors], method, density=rule(name),
                         scope="tensor", weights=[_varying.resolve(w, name) for w in weights])
        assert torch.equal(merged[name], alone[name]), name
    files = []
    for i, t in enumerate(tuned):
        files.append(tmp_path / f"ft{i}.safetensors")
        ta.io.write_safetensors(files[-1], t.items())
    ta.io.write_safetensors(tmp_path / "base.safetensors", base.items())
    for budget in (1, 1 << 30):
        out = ta.merge_files(tmp_path / "base.safetensors", files, tmp_path / f"out{budget}", method,
                             density=density, scope="tensor", weights=weights, max_memory=budget)
        got = ta.io.Checkpoint(out)
        want = merged.apply_to(base)
        for name in shapes:
            assert torch.equal(got.tensor(name), want[name]), (budget, name)


def test_a_global_trim_refuses_a_density_per_tensor_and_says_what_to_do():
    v = ta.TaskVector({"model.layers.0.w": torch.ones(4)})
    with pytest.raises(ta.TaskArithError, match="scope='global'.*cannot vary by tensor.*scope='tensor'"):
        ta.merge([v, v], "ties", density=_varying.gradient([0.2, 0.8], layers=2))
    with pytest.raises(ta.TaskArithError, match="scope cannot vary"):
        ta.merge([v, v], "ties", scope=Varying(lambda name: "tensor", "always tensor"))


def test_a_method_with_a_plan_refuses_values_per_tensor():
    v = ta.TaskVector({"model.layers.0.w": torch.ones(4)})
    with pytest.raises(ta.TaskArithError, match="statistic or plan.*cannot vary by tensor"):
        ta.merge([v, v], "consolidate", weights=[_varying.gradient([0.2, 0.8], layers=2), 1.0],
                 scores=[{"model.layers.0.w": torch.ones(4)}] * 2)


def test_bad_densities_are_listed_for_every_tensor_before_any_output(tmp_path):
    names = ["model.layers.0.w", "model.layers.1.w", "model.norm"]
    v = ta.TaskVector({n: torch.ones(4) for n in names})
    bad = Varying(lambda name: {"model.layers.0.w": 0.5, "model.layers.1.w": 1.5}.get(name, 0.0), "bad")
    with pytest.raises(ta.TaskArithError, match=r"model\.layers\.1\.w.*1\.5.*model\.norm.*density=0\.0") as error:
        ta.merge([v, v], "ties", density=bad, scope="tensor")
    assert "model.layers.0.w" not in str(error.value)
    v.save(tmp_path / "v.safetensors")
    with pytest.raises(ta.TaskArithError, match=r"model\.layers\.1\.w.*model\.norm"):
        ta.merge_files(None, [tmp_path / "v.safetensors"] * 2, tmp_path / "out.safetensors", "ties", density=bad,
                       scope="tensor")
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_weights_per_tensor_are_listed_for_every_tensor_before_any_output(tmp_path):
    """A weight gradient that is bad for several tensors: every one is named, in memory and out of core,
    before anything is merged (not the first bad tensor only, once the others are done)."""
    names = [f"model.layers.{i}.w" for i in range(4)]
    v = ta.TaskVector({n: torch.ones(4) for n in names})
    bad = Varying(lambda name: math.nan if name.endswith(("2.w", "3.w")) else 1.0, "NaN in layers 2 and 3")
    with pytest.raises(ta.TaskArithError, match=r"layers\.2\.w.*weights\[0\]=nan.*layers\.3\.w") as error:
        ta.merge([v, v], "task_arithmetic", weights=[bad, 1.0])
    assert "layers.1.w" not in str(error.value)
    v.save(tmp_path / "v.safetensors")
    with pytest.raises(ta.TaskArithError, match=r"layers\.2\.w.*layers\.3\.w"):
        ta.merge_files(None, [tmp_path / "v.safetensors"] * 2, tmp_path / "out.safetensors", "task_arithmetic",
                       weights=[bad, 1.0])
    assert not (tmp_path / "out.safetensors").exists()


def test_a_bad_value_from_a_gradient_names_the_tensor():
    v = ta.TaskVector({"model.layers.0.w": torch.ones(4), "model.layers.1.w": torch.ones(4)})
    with pytest.raises(ta.TaskArithError, match=r"model\.layers\.1\.w"):
        ta.merge([v], "breadcrumbs", density=_varying.gradient([0.5, 2.0], layers=2))


@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.lists(st.sampled_from([0.1, 0.25, 0.5, 0.9, 1.0]),
                                                                        min_size=12, max_size=12),
       st.integers(0, 2**31 - 1))
def test_the_segmented_selection_of_accelerators_trims_each_tensor_to_its_own_density(sizes, densities, seed):
    """The accelerators' one segmented sort and the CPU's row-wise selection give every tensor the same
    threshold and tie cut at its own density (the segmented path checked on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    # Few distinct values: ties at the thresholds, as in half-precision deltas.
    vector = ta.TaskVector({f"t{i}": torch.randint(-3, 4, (n,), generator=g).float() / 2 for i, n in enumerate(sizes)})
    tensors = {n: vector[n] for n in vector._layout.slots}
    density_of = {n: densities[i] for i, n in enumerate(tensors)}.__getitem__
    found = []
    for segmented in (False, True):
        lambdas, cuts = {}, {}
        _trim._segment_trims(vector, tensors, list(tensors), density_of, lambdas, cuts, segmented=segmented)
        found.append((lambdas, cuts))
    assert found[0] == found[1]
    for name, x in tensors.items():  # and each keeps exactly floor(density * n) entries
        plan = _fused.Trimmed(tensors, *found[1])
        kept = int((plan.trimmed(name) != 0).sum())
        want = math.floor(density_of(name) * x.numel())
        assert kept == (int((x != 0).sum()) if density_of(name) >= 1 else min(want, int((x != 0).sum()))), name
