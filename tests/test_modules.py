"""Task vectors of real nn.Modules: BatchNorm buffers, tied weights, transfer, memory reuse."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import DEVICES
from torch import nn

import taskarith as ta


class TinyLM(nn.Module):
    """An embedding tied to the output head, with a BatchNorm'd hidden layer."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        return self.head(torch.relu(self.norm(self.hidden(self.embed(tokens)))))


def finetune(model: nn.Module, steps=5, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    tuned = TinyLM()
    tuned.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(tuned.parameters(), lr=0.5)
    for _ in range(steps):
        tokens = torch.randint(0, 11, (16,))
        loss = nn.functional.cross_entropy(tuned(tokens), (tokens + 1) % 11)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tuned


@pytest.fixture
def models():
    torch.manual_seed(1)
    base = TinyLM()
    return base, finetune(base)


def test_batchnorm_counters_are_skipped_and_tied_weights_stored_once(models):
    base, tuned = models
    tv = ta.TaskVector.from_models(base, tuned)
    assert tv.skipped == ("norm.num_batches_tracked",)
    assert "norm.num_batches_tracked" not in tv
    assert tv.aliases == {"head.weight": "embed.weight"}
    assert "running_mean" in " ".join(tv)  # float buffers are part of τ
    distinct = sum(p.numel() for p in base.parameters()) + 2 * 6  # running mean and var
    assert tv.numel() == distinct
    assert tv["head.weight"].data_ptr() == tv["embed.weight"].data_ptr()


def test_applied_state_dict_loads_and_keeps_ties(models):
    base, tuned = models
    tv = ta.TaskVector.from_models(base, tuned, dtype=torch.float64)
    state = tv.apply_to(base)
    assert state["head.weight"] is state["embed.weight"]
    assert torch.equal(state["norm.num_batches_tracked"], base.state_dict()["norm.num_batches_tracked"])
    rebuilt = TinyLM()
    rebuilt.load_state_dict(state)
    assert rebuilt.head.weight is rebuilt.embed.weight
    for name, value in tuned.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(rebuilt.state_dict()[name], value), name
    rebuilt.eval(), tuned.eval()
    tokens = torch.arange(11)
    assert torch.equal(rebuilt(tokens), tuned(tokens))


def test_a_vector_transfers_to_an_independently_initialised_model(models):
    base, tuned = models
    torch.manual_seed(7)
    other = TinyLM()
    tv = ta.TaskVector.from_models(base, tuned)
    state = tv.apply_to(other, 0.5, on_base_mismatch="ignore")
    for name, value in other.state_dict().items():
        if name in tv:
            assert torch.allclose(state[name], value + 0.5 * tv[name]), name
        else:
            assert torch.equal(state[name], value), name


def test_forgetting_by_negation_moves_away_from_the_fine_tuned_model(models):
    base, tuned = models
    tv = ta.TaskVector.from_models(base, tuned)
    forgot = (-tv).apply_to(base)
    learned = tv.apply_to(base)
    for name in tv:
        assert torch.allclose(learned[name] - base.state_dict()[name], base.state_dict()[name] - forgot[name], atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_follow_the_device_of_the_data(device, models):
    device = torch.device(device)
    base, tuned = (m.to(device) for m in models)
    tv = ta.TaskVector.from_models(base, tuned)
    assert tv.device.type == device.type
    total = ta.TaskVector.sum([tv, 2 * tv, -tv])
    assert total.device.type == device.type
    assert total.allclose(2 * tv, atol=1e-6)
    assert abs(tv.cosine(total) - 1.0) < 1e-6
    state = tv.apply_to(base)
    assert all(v.device.type == device.type for v in state.values())
    moved = tv.to("cpu")
    assert moved.device.type == "cpu" and moved.allclose(tv.to("cpu"))


def test_mapping_interface_and_conversion(models):
    base, tuned = models
    tv = ta.TaskVector.from_models(base, tuned)
    assert list(tv) == [n for n, t in tuned.state_dict().items() if t.is_floating_point()]
    assert len(tv) == len(list(tv)) and "embed.weight" in tv and "nope" not in tv
    with pytest.raises(KeyError):
        tv["nope"]
    assert tv.dtype == torch.float32 and tv.dtypes == {torch.float32: tv.numel()}
    half = tv.to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.aliases == tv.aliases
    assert half.to(dtype=torch.bfloat16) is half
    assert "TaskVector(" in repr(tv) and "float32" in repr(tv)
    mixed = ta.TaskVector({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(ta.TaskArithError, match="several dtypes"):
        mixed.dtype


def test_vectors_with_different_layouts_still_combine_by_name():
    a = ta.TaskVector({"x": torch.ones(2), "y": torch.full((3,), 2.0)})
    b = ta.TaskVector({"y": torch.ones(3, dtype=torch.float64), "x": torch.ones(2)})
    total = a + b
    assert list(total) == ["x", "y"]
    assert total["y"].dtype == torch.float64 and total["y"].tolist() == [3.0] * 3
    assert a.add_(b)["x"].tolist() == [2.0, 2.0]


def test_reused_buffers_never_overwrite_a_view_still_held():
    n = 1 << 20  # large enough to go through the buffer cache
    a = ta.TaskVector({"w": torch.ones(n)})
    kept = (a + a)["w"]  # the vector dies here; its buffer is still referenced by this view
    gc.collect()
    for _ in range(3):
        _ = a * 5.0  # would reuse a cached buffer of the same size
    assert bool((kept == 2.0).all())


def test_buffers_of_dead_vectors_are_reused_and_can_be_freed():
    ta.runtime.empty_cache()
    a = ta.TaskVector({"w": torch.ones(1 << 20)})
    first = a + a
    address = first["w"].data_ptr()
    del first
    gc.collect()
    assert ta.runtime.cache_info()["buffers"] == 1
    second = a + a
    assert second["w"].data_ptr() == address
    assert bool((second["w"] == 2.0).all())
    del second
    ta.runtime.empty_cache()
    assert ta.runtime.cache_info()["buffers"] == 0


def test_a_partial_vector_edits_both_names_of_a_tied_weight():
    """strict=False with a vector covering one name of a tied pair: the other name follows and stays tied."""
    shared = torch.zeros(3)
    base = {"embed.weight": shared, "head.weight": shared, "norm": torch.ones(2)}
    out = ta.TaskVector({"embed.weight": torch.ones(3)}).apply_to(base, strict=False)
    assert torch.equal(out["head.weight"], torch.ones(3)), "the tied name kept the old value"
    assert out["head.weight"].data_ptr() == out["embed.weight"].data_ptr(), "the tie was lost"
    assert torch.equal(out["norm"], torch.ones(2)) and out["norm"].data_ptr() != base["norm"].data_ptr()
    assert list(out) == list(base)
