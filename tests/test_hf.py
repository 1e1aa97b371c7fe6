"""Writing Hugging Face model folders: Transformers loads them, ties survive, shards, atomicity."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import taskarith as ta
from taskarith import hf
from taskarith.io import _writer as writer


def _tiny_llama(tie: bool, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _finetune(model, seed: int = 1):
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():  # tied parameters are listed once, so they stay tied
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return tuned


def _stored_names(folder: Path) -> set[str]:
    names = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
            assert f.metadata()["format"] == "pt", file  # Transformers needs it
    return names


def _base_folder(tmp_path: Path, tie: bool):
    base = _tiny_llama(tie)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    (base_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    (base_dir / "tokenizer_config.json").write_text("{}")
    (base_dir / "extra").mkdir()
    (base_dir / "extra" / "notes.txt").write_text("kept")
    (base_dir / "extra" / "old.bin").write_bytes(b"stale")
    (base_dir / ".cache").mkdir()
    (base_dir / "pytorch_model.bin.index.json").write_text("{}")
    return base, base_dir


@pytest.mark.parametrize("tie", [True, False])
def test_edited_folder_loads_in_transformers_with_every_parameter_and_the_forward_pass(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    base, base_dir = _base_folder(tmp_path, tie)
    tuned = _finetune(base)
    tuned_dir = tmp_path / "tuned"
    tuned.save_pretrained(tuned_dir)

    tv = ta.TaskVector.from_models(base_dir, tuned_dir)
    merged = tv.apply_to(base_dir)
    out = hf.save_model(merged, tmp_path / "out", like=base_dir)

    assert _stored_names(out) == _stored_names(base_dir)
    assert {p.name for p in out.iterdir()} == {
        ".taskarith-output", "model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "extra",
    }
    assert [p.name for p in (out / "extra").iterdir()] == ["notes.txt"]
    assert (out / "config.json").read_text() == (base_dir / "config.json").read_text()

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    params = dict(loaded.named_parameters(remove_duplicate=False))
    expected = dict(tuned.named_parameters(remove_duplicate=False))
    assert params.keys() == expected.keys()
    for name, value in params.items():
        # The file holds base + (tuned - base) in float32: equal to the tuned weights up to one rounding each way.
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
        if name in merged:
            assert torch.equal(value, merged[name]), name  # and bit-identical to what was written
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-5)


def test_module_state_dicts_with_tied_names_are_written_as_the_base_folder_stores_them(tmp_path):
    transformers = pytest.importorskip("transformers")
    base, base_dir = _base_folder(tmp_path, tie=True)
    tuned = _finetune(base)
    merged = ta.TaskVector.from_models(base, tuned).apply_to(base, scale=0.5)
    assert merged["lm_head.weight"].data_ptr() == merged["model.embed_tokens.weight"].data_ptr()

    out = hf.save_model(merged, tmp_path / "out", like=base_dir)
    assert "lm_head.weight" not in _stored_names(out)  # as transformers' own save_pretrained leaves it out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, merged[name]), name


def test_without_like_every_tied_name_gets_its_own_copy_and_transformers_ties_them_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    base = _tiny_llama(tie=True)
    out = hf.save_model(base.state_dict(), tmp_path / "out")
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= _stored_names(out)
    assert ta.io.load_state_dict(out).keys() == base.state_dict().keys()  # loads into plain torch too
    base.config.save_pretrained(out)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_half_precision_folder_round_trips_bit_exactly(tmp_path):
    transformers = pytest.importorskip("transformers")
    base = _tiny_llama(tie=False).to(torch.bfloat16)
    tuned = _finetune(base)
    base.save_pretrained(tmp_path / "base")
    merged = ta.TaskVector.from_models(base, tuned).apply_to(tmp_path / "base")
    out = hf.save_model(merged, tmp_path / "out", like=tmp_path / "base")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)  # float32 or bfloat16 by version: both exact
    for name, value in loaded.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16), tuned.state_dict()[name]), name


def test_sharded_output_has_an_index_and_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    base, base_dir = _base_folder(tmp_path, tie=False)
    state = base.state_dict()
    out = hf.save_model(state, tmp_path / "out", like=base_dir, shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == list(state)
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:  # at most 40 kB of tensors each, unless a single tensor is larger
        with safe_open(str(shard), framework="pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]  # noqa: SIM118 (safe_open is not iterable)
        assert len(sizes) == 1 or sum(sizes) <= 40_000, shard.name

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    back = ta.io.load_state_dict(out)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_a_failure_mid_write_leaves_no_folder_and_keeps_the_previous_one(tmp_path, monkeypatch):
    state = {f"layer{i}.weight": torch.randn(64, 64) for i in range(4)}
    calls = []
    real = writer.write_safetensors

    def failing(path, chunks, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real(path, chunks, metadata)

    monkeypatch.setattr(writer, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        hf.save_model(state, tmp_path / "out", shard_size="16KB")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one

    previous = {"w": torch.ones(3)}
    hf.save_model(previous, tmp_path / "out")  # a previous output of taskarith, which a new write may replace
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        hf.save_model(state, tmp_path / "out", shard_size="16KB")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before

    monkeypatch.setattr(writer, "write_safetensors", real)
    hf.save_model(state, tmp_path / "out", shard_size="16KB")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert ta.io.load_state_dict(tmp_path / "out").keys() == state.keys()


def test_names_and_shapes_must_match_the_like_folder(tmp_path):
    like = tmp_path / "like"
    hf.save_model({"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4), "c.bias": torch.zeros(1)}, like)
    bad = {"a.weight": torch.zeros(3, 2), "b.weight": torch.zeros(4), "d.weight": torch.zeros(1)}
    with pytest.raises(ta.KeyMismatchError) as info:
        hf.save_model(bad, tmp_path / "out", like=like)
    message = str(info.value)
    for part in ["missing 1: 'c.bias'", "not in like 1: 'd.weight'", "'a.weight': (3, 2) here vs (2, 3)", "strict=False"]:
        assert part in message
    assert info.value.missing == ["c.bias"] and info.value.extra == ["d.weight"]
    assert not (tmp_path / "out").exists()

    with pytest.raises(ta.ShapeMismatchError, match="'a.weight': \\(3, 2\\) here vs \\(2, 3\\)"):
        hf.save_model({"a.weight": torch.zeros(3, 2), "b.weight": torch.zeros(4), "c.bias": torch.zeros(1)},
                      tmp_path / "out", like=like)
    hf.save_model(bad, tmp_path / "out", like=like, strict=False)
    assert _stored_names(tmp_path / "out") == {"a.weight", "b.weight", "d.weight"}


def test_bad_arguments_are_reported(tmp_path):
    with pytest.raises(ta.TaskArithError, match="not a folder"):
        hf.save_model({"w": torch.zeros(1)}, tmp_path / "out", like=tmp_path / "missing")
    with pytest.raises(ta.TaskArithError, match="positive"):
        hf.save_model({"w": torch.zeros(1)}, tmp_path / "out", shard_size=0)
    with pytest.raises(ta.TaskArithError, match="size"):
        hf.save_model({"w": torch.zeros(1)}, tmp_path / "out", shard_size="lots")
    with pytest.raises(ta.TaskArithError, match="empty"):
        hf.save_model({}, tmp_path / "out")
    with pytest.raises(ta.TaskArithError, match="not tensors"):
        hf.save_model({"w": [1.0]}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_config_only_like_folder_is_copied_without_name_checks(tmp_path):
    like = tmp_path / "like"
    like.mkdir()
    (like / "config.json").write_text("{}")
    out = hf.save_model({"w": torch.ones(2)}, tmp_path / "out", like=like)
    assert sorted(p.name for p in out.iterdir()) == [".taskarith-output", "config.json", "model.safetensors"]
