"""LoRA adapters as task vectors: hand-built adapters, PEFT's own merge, and every refusal."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import taskarith as ta
from taskarith.lora import from_lora

# PEFT merges with the same float32 operations (B @ A, times the scaling, added to W), but the matmul
# may sum in another order (another kernel for a transposed or differently strided operand), so results
# may differ by a few float32 ulps of the weights (~1e-7 relative), far below any real difference.
TOL = {"rtol": 1e-5, "atol": 1e-6}

# Transformers' deprecation notes, raised inside PEFT's get_peft_model.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def _write_adapter(folder: Path, config: dict, tensors: dict, *, pickle: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    if pickle:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _base_state(transposed: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (4, 6) if transposed else (6, 4)  # (in, out) for fan_in_fan_out layers, else (out, in)
    return {
        "enc.q.weight": torch.randn(shape, generator=gen),
        "enc.q.bias": torch.randn(6, generator=gen),
        "enc.v.weight": torch.randn(shape, generator=gen),
        "head.weight": torch.randn(3, 6, generator=gen),
        "steps": torch.tensor(7),
    }


def _factors(rank_q: int, rank_v: int, *, adapter_name: str = ""):
    gen = torch.Generator().manual_seed(1)
    infix = f".{adapter_name}" if adapter_name else ""
    a_q, b_q = torch.randn(rank_q, 4, generator=gen), torch.randn(6, rank_q, generator=gen)
    a_v, b_v = torch.randn(rank_v, 4, generator=gen), torch.randn(6, rank_v, generator=gen)
    tensors = {
        f"base_model.model.enc.q.lora_A{infix}.weight": a_q, f"base_model.model.enc.q.lora_B{infix}.weight": b_q,
        f"base_model.model.enc.v.lora_A{infix}.weight": a_v, f"base_model.model.enc.v.lora_B{infix}.weight": b_v,
    }
    return tensors, {"enc.q": b_q.double() @ a_q.double(), "enc.v": b_v.double() @ a_v.double()}


# scaling of q and v for each config
CASES = {
    "plain": ({"r": 2, "lora_alpha": 4}, (2, 2), (4 / 2, 4 / 2)),
    "patterns": ({"r": 2, "lora_alpha": 4, "rank_pattern": {"v": 3}, "alpha_pattern": {"^enc.q": 1}}, (2, 3), (1 / 2, 4 / 3)),
    "first_pattern_wins": ({"r": 2, "lora_alpha": 4, "alpha_pattern": {"q": 2, "enc.q": 8, "nc.v": 9}}, (2, 2), (2 / 2, 4 / 2)),
    "rslora": ({"r": 4, "lora_alpha": 3, "use_rslora": True}, (4, 4), (3 / 2, 3 / 2)),
    "rslora_patterns": ({"r": 4, "lora_alpha": 3, "use_rslora": True, "rank_pattern": {"enc.v": 9}}, (4, 9), (3 / 2, 1.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("with_base", [False, True])
def test_hand_built_adapter_applies_as_s_times_b_at_a(tmp_path, case, with_base):
    config, (rank_q, rank_v), (s_q, s_v) = CASES[case]
    tensors, products = _factors(rank_q, rank_v)
    adapter = _write_adapter(tmp_path / "adapter", config, tensors)
    base = _base_state()
    tv = from_lora(adapter, base=base if with_base else None)
    assert list(tv) == ["enc.q.weight", "enc.v.weight"] and tv.dtype == torch.float32
    merged = tv.apply_to(base, strict=False)
    expected = dict(base)
    expected["enc.q.weight"] = (base["enc.q.weight"].double() + s_q * products["enc.q"]).float()
    expected["enc.v.weight"] = (base["enc.v.weight"].double() + s_v * products["enc.v"]).float()
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("with_base", [False, True])
def test_fan_in_fan_out_layers_get_the_transposed_delta(tmp_path, with_base):
    tensors, products = _factors(2, 2, adapter_name="default")  # keys that keep PEFT's adapter name
    adapter = _write_adapter(tmp_path / "adapter", {"r": 2, "lora_alpha": 2, "fan_in_fan_out": True}, tensors)
    base = _base_state(transposed=True)
    merged = from_lora(adapter, base=base if with_base else None).apply_to(base, strict=False)
    for module in ("enc.q", "enc.v"):
        expected = (base[f"{module}.weight"].double() + products[module].T).float()
        torch.testing.assert_close(merged[f"{module}.weight"], expected, rtol=1e-6, atol=1e-6)


def test_the_base_shape_decides_the_layout_when_the_flag_disagrees(tmp_path):
    tensors, products = _factors(2, 2)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 2, "lora_alpha": 2, "fan_in_fan_out": False}, tensors)
    base = _base_state(transposed=True)  # (in, out) weights, as PEFT finds them on Conv1D layers
    tv = from_lora(adapter, base=base)
    torch.testing.assert_close(tv["enc.q.weight"].double(), products["enc.q"].T)
    with pytest.raises(ta.ShapeMismatchError, match="'enc.q.weight'"):  # without the base, the flag decides
        from_lora(adapter).apply_to(base, strict=False)


def test_embedding_factors_and_lora_bias(tmp_path):
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 10, generator=gen), torch.randn(5, 3, generator=gen)
    a_l, b_l, bias = torch.randn(3, 5, generator=gen), torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 3, "lora_alpha": 6, "lora_bias": True}, {
        "base_model.model.emb.lora_embedding_A": a, "base_model.model.emb.lora_embedding_B": b,
        "base_model.model.out.lora_A.weight": a_l, "base_model.model.out.lora_B.weight": b_l,
        "base_model.model.out.lora_B.bias": bias,
    })
    tv = from_lora(adapter)
    assert sorted(tv) == ["emb.weight", "out.bias", "out.weight"]
    torch.testing.assert_close(tv["emb.weight"], 2 * (b @ a).T)  # (vocab, dim), the nn.Embedding layout
    torch.testing.assert_close(tv["out.weight"], 2 * b_l @ a_l)
    torch.testing.assert_close(tv["out.bias"], 2 * bias)


def test_bf16_factors_are_multiplied_in_the_requested_dtype(tmp_path):
    tensors, _ = _factors(2, 2)
    adapter = _write_adapter(tmp_path / "a", {"r": 2, "lora_alpha": 2}, {k: v.bfloat16() for k, v in tensors.items()})
    tv = from_lora(adapter, dtype=torch.float64)
    assert tv.dtype == torch.float64
    a, b = tensors["base_model.model.enc.q.lora_A.weight"], tensors["base_model.model.enc.q.lora_B.weight"]
    assert torch.equal(tv["enc.q.weight"], b.bfloat16().double() @ a.bfloat16().double())


def test_pickled_adapters_need_allow_pickle(tmp_path):
    tensors, _ = _factors(2, 2)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 2, "lora_alpha": 2}, tensors, pickle=True)
    with pytest.raises(ta.TaskArithError, match="allow_pickle=True"):
        from_lora(adapter)
    assert sorted(from_lora(adapter, allow_pickle=True)) == ["enc.q.weight", "enc.v.weight"]


def test_names_follow_the_base_across_a_wrapper_prefix(tmp_path):
    tensors, _ = _factors(2, 2)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 2, "lora_alpha": 2}, tensors)
    base = _base_state()
    wrapped = {f"model.{k}": v for k, v in base.items()}
    assert list(from_lora(adapter, base=wrapped)) == ["model.enc.q.weight", "model.enc.v.weight"]
    inner = {k.removeprefix("enc."): v for k, v in base.items()}
    assert list(from_lora(adapter, base=inner)) == ["q.weight", "v.weight"]


def test_full_vectors_cover_the_base_and_record_its_fingerprint(tmp_path):
    tensors, _ = _factors(2, 2)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 2, "lora_alpha": 2}, tensors)
    base = _base_state()
    tv = from_lora(adapter, base=base, full=True)
    assert list(tv) == ["enc.q.weight", "enc.q.bias", "enc.v.weight", "head.weight"]
    assert not tv["head.weight"].any()
    merged = tv.apply_to(base)  # strict: every float entry is covered
    assert torch.equal(merged["head.weight"], base["head.weight"]) and torch.equal(merged["steps"], base["steps"])
    other = {k: v + 1 if v.is_floating_point() else v for k, v in base.items()}
    with pytest.warns(UserWarning, match="different base"):
        tv.apply_to(other)
    with pytest.raises(ta.TaskArithError, match="full=True needs the base"):
        from_lora(adapter, full=True)


# ----------------------------------------------------------------------------- errors


def test_dora_and_other_variants_are_refused_naming_each_option(tmp_path):
    tensors, _ = _factors(2, 2)
    config = {"r": 2, "lora_alpha": 2, "use_dora": True, "layer_replication": [[0, 1]],
              "init_lora_weights": "pissa_niter_4", "enable_lora": [True, False]}
    adapter = _write_adapter(tmp_path / "adapter", config, tensors)
    with pytest.raises(ta.TaskArithError) as info:
        from_lora(adapter)
    message = str(info.value)
    for part in ["(4)", "use_dora=True: DoRA", "layer_replication", "init_lora_weights='pissa_niter_4'",
                 "path_initial_model_for_weight_conversion", "enable_lora", "merge_and_unload()", "from_models"]:
        assert part in message


@pytest.mark.parametrize("peft_type", ["LOHA", "LOKR", "IA3", "ADALORA"])
def test_other_peft_methods_are_refused(tmp_path, peft_type):
    tensors, _ = _factors(2, 2)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 2}, tensors)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 2}))
    with pytest.raises(ta.TaskArithError, match=f"'{peft_type}' adapter; only peft_type 'LORA'"):
        from_lora(adapter)


def test_missing_and_malformed_files_are_reported(tmp_path):
    with pytest.raises(ta.TaskArithError, match="not a folder"):
        from_lora(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ta.TaskArithError, match="no adapter_config.json"):
        from_lora(tmp_path / "empty")
    tensors, _ = _factors(2, 2)
    _write_adapter(tmp_path / "multi" / "second", {"r": 2}, tensors)
    with pytest.raises(ta.TaskArithError, match=r"subfolders \['second'\]"):
        from_lora(tmp_path / "multi")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ta.TaskArithError, match="no adapter_model.safetensors"):
        from_lora(tmp_path / "noweights")
    (tmp_path / "noweights" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ta.TaskArithError, match="not valid JSON"):
        from_lora(tmp_path / "noweights")


def test_factor_problems_are_all_listed(tmp_path):
    gen = torch.Generator().manual_seed(0)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 2, "lora_alpha": 2}, {
        "base_model.model.a.lora_A.weight": torch.randn(2, 4, generator=gen),  # no B
        "base_model.model.c.lora_A.weight": torch.randn(2, 3, 3, 3, generator=gen),
        "base_model.model.c.lora_B.weight": torch.randn(5, 2, 1, 1, generator=gen),
    })
    with pytest.raises(ta.TaskArithError) as info:
        from_lora(adapter)
    assert "'a': only ['A.weight'] found" in str(info.value) and "convolution LoRA is not supported" in str(info.value)
    magnitude = _write_adapter(tmp_path / "dora", {"r": 2}, {"base_model.model.a.lora_magnitude_vector": torch.ones(3)})
    with pytest.raises(ta.TaskArithError, match="lora_magnitude_vector"):
        from_lora(magnitude)


def test_a_rank_that_disagrees_with_the_config_is_refused(tmp_path):
    tensors, _ = _factors(2, 3)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 2, "lora_alpha": 2}, tensors)
    with pytest.raises(ta.TaskArithError, match=r"'enc.v': A \(3, 4\) and B \(6, 3\) have rank 3 and 3, the config says r=2"):
        from_lora(adapter)


def test_keys_missing_from_the_base_and_shape_mismatches_are_listed(tmp_path):
    tensors, _ = _factors(2, 2)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 2, "lora_alpha": 2}, tensors)
    base = _base_state()
    with pytest.raises(ta.KeyMismatchError) as info:
        from_lora(adapter, base={k: v for k, v in base.items() if k != "enc.v.weight"})
    assert info.value.missing == ["enc.v.weight"]
    assert "does not have: 'enc.v.weight'" in str(info.value) and "trained on" in str(info.value)
    with pytest.raises(ta.ShapeMismatchError) as info:
        from_lora(adapter, base={**base, "enc.q.weight": torch.zeros(6, 5)})
    assert "'enc.q.weight': the adapter makes a delta of shape (6, 4), the base entry is (6, 5)" in str(info.value)


def test_full_weights_in_the_adapter_need_the_base(tmp_path):
    tensors, _ = _factors(2, 2)
    tensors["base_model.model.head.weight"] = torch.ones(3, 6)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 2, "lora_alpha": 2, "modules_to_save": ["head"]}, tensors)
    with pytest.raises(ta.TaskArithError, match="stores 1 full weights \\('head.weight'\\).*pass base="):
        from_lora(adapter)
    base = _base_state()
    tv = from_lora(adapter, base=base)
    torch.testing.assert_close(tv.apply_to(base, strict=False)["head.weight"], torch.ones(3, 6))


# ------------------------------------------------------------------- against PEFT itself


def _tiny_llama(tie: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _peft_round_trip(model, config, tmp_path, *, perturb=()):
    """(base copy, adapter folder, PEFT's merged state_dict) for ``model`` wrapped with ``config``."""
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(model)
    wrapped = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if any(part in name for part in perturb):
                p.add_(torch.randn(p.shape, generator=gen))
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = wrapped.merge_and_unload().state_dict()
    return base, tmp_path / "adapter", merged


def _assert_matches_peft(ours: dict, merged: dict, base: torch.nn.Module):
    assert ours.keys() == merged.keys()
    changed = 0
    for name, value in merged.items():
        torch.testing.assert_close(ours[name], value, **TOL, msg=name)
        changed += not torch.equal(value, base.state_dict()[name])
    assert changed  # the adapter did something


LLAMA_CASES = {
    "plain": {},
    "rank_and_alpha_patterns": {"rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
                                "alpha_pattern": {"layers.1.self_attn.v_proj": 16, "^model.layers.0.mlp.up_proj": 3}},
    "rslora": {"use_rslora": True},
    "rslora_with_patterns": {"use_rslora": True, "rank_pattern": {"v_proj": 8}, "alpha_pattern": {"down_proj": 2}},
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_matches_peft_merge_and_unload_on_llama(tmp_path, case):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **LLAMA_CASES[case],
                             target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    base, adapter, merged = _peft_round_trip(_tiny_llama(tie=False), config, tmp_path)
    _assert_matches_peft(from_lora(adapter).apply_to(base, strict=False), merged, base)
    _assert_matches_peft(from_lora(adapter, base=base, full=True).apply_to(base), merged, base)


@pytest.mark.parametrize("tie", [False, True])
def test_matches_peft_on_an_embedding_lora(tmp_path, tie):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["embed_tokens", "q_proj"])
    with pytest.warns(UserWarning):  # PEFT's own notes on saving (and tying) embedding layers
        base, adapter, merged = _peft_round_trip(_tiny_llama(tie=tie), config, tmp_path)
    tv = from_lora(adapter, base=base)
    if tie:
        assert tv.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    ours = tv.apply_to(base, strict=False)
    _assert_matches_peft(ours, merged, base)
    if tie:
        assert ours["lm_head.weight"].data_ptr() == ours["model.embed_tokens.weight"].data_ptr()


@pytest.mark.parametrize("with_base", [False, True])
def test_matches_peft_on_gpt2_conv1d_layers(tmp_path, with_base):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128,
                                                                 n_positions=64)).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=True,
                             target_modules=["c_attn", "c_proj", "c_fc"])
    base, adapter, merged = _peft_round_trip(model, config, tmp_path)
    tv = from_lora(adapter, base=base if with_base else None)
    _assert_matches_peft(tv.apply_to(base, strict=False), merged, base)


@pytest.mark.filterwarnings("ignore:Adapter .default.:UserWarning")
def test_matches_peft_with_modules_to_save_and_trained_biases(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5), torch.nn.Linear(5, 3))
    config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["0", "2"],
                             bias="lora_only", lora_bias=True, modules_to_save=["3"])
    base, adapter, merged = _peft_round_trip(model, config, tmp_path, perturb=("bias", "modules_to_save"))
    with pytest.raises(ta.TaskArithError, match="pass base="):
        from_lora(adapter)
    _assert_matches_peft(from_lora(adapter, base=base).apply_to(base, strict=False), merged, base)


def test_peft_dora_adapters_are_refused(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj"])
    _, adapter, _ = _peft_round_trip(_tiny_llama(tie=False), config, tmp_path)
    with pytest.raises(ta.TaskArithError, match="use_dora=True: DoRA rescales"):
        from_lora(adapter)


def test_scaling_formula_constants():
    from taskarith.lora import _rank_and_scale

    assert _rank_and_scale("m.q", {"r": 16, "lora_alpha": 32}) == (16, 2.0)
    assert _rank_and_scale("m.q", {"r": 16, "lora_alpha": 32, "use_rslora": True}) == (16, 32 / math.sqrt(16))
    assert _rank_and_scale("m.xq", {"r": 16, "lora_alpha": 32, "rank_pattern": {"q": 4}})[0] == 16
    assert _rank_and_scale("q", {"r": 16, "lora_alpha": 32, "rank_pattern": {"q": 4}})[0] == 4


def test_two_adapters_merge_into_a_folder_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from taskarith import hf

    model = _tiny_llama(tie=False)
    model.save_pretrained(tmp_path / "base")
    vectors = []
    for i, targets in enumerate([["q_proj", "v_proj"], ["up_proj", "down_proj"]]):
        config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
        peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(tmp_path / f"adapter{i}")
        vectors.append(from_lora(tmp_path / f"adapter{i}", base=tmp_path / "base", full=True))
    merged = ta.merge(vectors, "ties", density=0.5)
    out = hf.save_model(merged.apply_to(tmp_path / "base"), tmp_path / "out", like=tmp_path / "base")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = merged.apply_to(model)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
