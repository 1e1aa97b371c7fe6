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


NAN, INF = float("nan"), float("inf")
RANK, ALPHA = "expected a positive integer rank", "expected a positive finite number"
# adapter_config.json entries (over r=2, lora_alpha=2) -> the text naming the key, the value and what was expected
INVALID_CONFIGS = {
    "r_zero": ({"r": 0}, f"r=0: {RANK}"),
    "r_negative": ({"r": -4}, f"r=-4: {RANK}"),
    "r_fraction": ({"r": 2.5}, f"r=2.5: {RANK}"),
    "r_bool": ({"r": True}, f"r=True: {RANK}"),
    "r_string": ({"r": "8"}, f"r='8': {RANK}"),
    "r_null": ({"r": None}, f"r=None: {RANK}"),
    "alpha_zero": ({"lora_alpha": 0}, f"lora_alpha=0: {ALPHA}"),
    "alpha_negative": ({"lora_alpha": -16}, f"lora_alpha=-16: {ALPHA}"),
    "alpha_nan": ({"lora_alpha": NAN}, f"lora_alpha=nan: {ALPHA}"),
    "alpha_inf": ({"lora_alpha": INF}, f"lora_alpha=inf: {ALPHA}"),
    "alpha_past_float_range": ({"lora_alpha": 10**400}, "lora_alpha=1000"),
    "alpha_bool": ({"lora_alpha": False}, f"lora_alpha=False: {ALPHA}"),
    "alpha_string": ({"lora_alpha": "16"}, f"lora_alpha='16': {ALPHA}"),
    "rank_pattern_zero": ({"rank_pattern": {"q": 0}}, f"rank_pattern['q']=0: {RANK}"),
    "rank_pattern_negative": ({"rank_pattern": {"q": -2}}, f"rank_pattern['q']=-2: {RANK}"),
    "rank_pattern_fraction": ({"rank_pattern": {"q": 1.5}}, f"rank_pattern['q']=1.5: {RANK}"),
    "rank_pattern_bool": ({"rank_pattern": {"q": True}}, f"rank_pattern['q']=True: {RANK}"),
    "rank_pattern_string": ({"rank_pattern": {"q": "4"}}, f"rank_pattern['q']='4': {RANK}"),
    "rank_pattern_list": ({"rank_pattern": {"q": [4]}}, f"rank_pattern['q']=[4]: {RANK}"),
    "rank_pattern_null": ({"rank_pattern": {"q": None}}, f"rank_pattern['q']=None: {RANK}"),
    "rank_pattern_nan": ({"rank_pattern": {"q": NAN}}, f"rank_pattern['q']=nan: {RANK}"),
    "alpha_pattern_zero": ({"alpha_pattern": {"v": 0}}, f"alpha_pattern['v']=0: {ALPHA}"),
    "alpha_pattern_negative": ({"alpha_pattern": {"v": -1.5}}, f"alpha_pattern['v']=-1.5: {ALPHA}"),
    "alpha_pattern_nan": ({"alpha_pattern": {"v": NAN}}, f"alpha_pattern['v']=nan: {ALPHA}"),
    "alpha_pattern_inf": ({"alpha_pattern": {"v": -INF}}, f"alpha_pattern['v']=-inf: {ALPHA}"),
    "alpha_pattern_bool": ({"alpha_pattern": {"v": True}}, f"alpha_pattern['v']=True: {ALPHA}"),
    "alpha_pattern_string": ({"alpha_pattern": {"v": "16"}}, f"alpha_pattern['v']='16': {ALPHA}"),
    "alpha_pattern_list": ({"alpha_pattern": {"v": [16]}}, f"alpha_pattern['v']=[16]: {ALPHA}"),
    "alpha_pattern_object": ({"alpha_pattern": {"v": {"x": 1}}}, f"alpha_pattern['v']={{'x': 1}}: {ALPHA}"),
    "bad_regex_key": ({"rank_pattern": {"q[": 2}}, "rank_pattern key 'q[': not a valid regular expression"),
    # compiles inside PEFT's "(.*\.)?(KEY)$" and then matches any module starting with "q": refused too
    "unbalanced_regex_key": ({"alpha_pattern": {"q)|(v": 2}}, "alpha_pattern key 'q)|(v': not a valid regular"),
    "pattern_list": ({"rank_pattern": [["q", 2]]}, "rank_pattern=[['q', 2]]: expected an object of module-name"),
    "pattern_string": ({"alpha_pattern": "q=2"}, "alpha_pattern='q=2': expected an object of module-name"),
    "pattern_number": ({"rank_pattern": 4}, "rank_pattern=4: expected an object of module-name"),
    "modules_to_save_string": ({"modules_to_save": "head"}, "modules_to_save='head': expected a list of module"),
}


@pytest.mark.parametrize("case", sorted(INVALID_CONFIGS))
def test_invalid_ranks_alphas_and_patterns_are_refused_before_reading_tensors(tmp_path, case):
    entries, expected = INVALID_CONFIGS[case]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **entries}))
    # No weights file: reading tensors first would fail with "no adapter_model.safetensors" instead.
    with pytest.raises(ta.TaskArithError) as info:
        from_lora(adapter)
    message = str(info.value)
    assert f"invalid LoRA adapter config {str(adapter / 'adapter_config.json')!r} (1): " in message
    assert expected in message
    assert "Correct them in adapter_config.json to the values the adapter was trained with" in message


def test_every_invalid_config_value_is_listed_at_once(tmp_path):
    tensors, _ = _factors(2, 2)
    config = {"r": 0, "lora_alpha": NAN, "rank_pattern": {"q": -1, "v[": 2}, "alpha_pattern": ["v"], "use_dora": True}
    adapter = _write_adapter(tmp_path / "adapter", config, tensors)
    with pytest.raises(ta.TaskArithError) as info:
        from_lora(adapter)  # r=0 used to divide by zero
    message = str(info.value)
    for part in ["(6)", "r=0", "lora_alpha=nan", "rank_pattern['q']=-1", "rank_pattern key 'v['",
                 "alpha_pattern=['v']", "use_dora=True: DoRA", "Correct them in", "merge_and_unload()"]:
        assert part in message, part


def test_a_rank_pattern_that_disagrees_with_the_factors_is_refused(tmp_path):
    tensors, _ = _factors(2, 2)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 2, "lora_alpha": 2, "rank_pattern": {"v": 3}}, tensors)
    with pytest.raises(ta.TaskArithError) as info:
        from_lora(adapter)
    message = str(info.value)
    assert f"{str(adapter / 'adapter_config.json')!r} does not match the saved factors (1)" in message
    assert "'enc.v': A (2, 4) and B (6, 2) have rank 2 and 2, the config says r=3 (rank_pattern['v'])" in message


def test_factors_of_different_ranks_or_shapes_are_refused(tmp_path):
    gen = torch.Generator().manual_seed(0)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 2, "lora_alpha": 2, "lora_bias": True}, {
        "base_model.model.q.lora_A.weight": torch.randn(2, 4, generator=gen),
        "base_model.model.q.lora_B.weight": torch.randn(6, 3, generator=gen),  # rank 3 against A's 2
        "base_model.model.v.lora_A.weight": torch.randn(2, 4, generator=gen),
        "base_model.model.v.lora_B.weight": torch.randn(6, 2, generator=gen),
        "base_model.model.v.lora_B.bias": torch.randn(5, generator=gen),  # B has 6 rows
    })
    with pytest.raises(ta.TaskArithError) as info:
        from_lora(adapter)
    assert "'q': A (2, 4) and B (6, 3) have rank 2 and 3, the config says r=2" in str(info.value)
    assert "'v': lora_B's bias has shape (5,), lora_B (6, 2)" in str(info.value)
    flat = _write_adapter(tmp_path / "flat", {"r": 2}, {"base_model.model.emb.lora_embedding_A": torch.ones(2),
                                                        "base_model.model.emb.lora_embedding_B": torch.ones(3, 2)})
    with pytest.raises(ta.TaskArithError, match=r"'emb': factors of shapes \(2,\) and \(3, 2\) \(LoRA factors are"):
        from_lora(flat)


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


def _tied_base() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    shared = torch.randn(5, 3, generator=gen)  # (vocab, dim): the input embedding and the output head
    return {"emb.weight": shared, "q.weight": torch.randn(3, 3, generator=gen), "head.weight": shared}


def test_a_modules_to_save_copy_of_a_tied_weight_is_untied_as_peft_merges_it(tmp_path):
    base, gen = _tied_base(), torch.Generator().manual_seed(5)
    trained = torch.randn(5, 3, generator=gen)
    a, b = torch.randn(1, 3, generator=gen), torch.randn(3, 1, generator=gen)
    adapter = _write_adapter(tmp_path / "adapter", {"r": 1, "lora_alpha": 1, "modules_to_save": ["head"]}, {
        "base_model.model.head.weight": trained,
        "base_model.model.q.lora_A.weight": a, "base_model.model.q.lora_B.weight": b,
    })
    for full in (False, True):
        tv = from_lora(adapter, base=base, full=full)
        # emb keeps a delta of its own, else apply_to would carry head's change over the base's tie
        assert list(tv) == ["emb.weight", "q.weight", "head.weight"] and tv.aliases == {}
        assert not tv["emb.weight"].any()
        merged = tv.apply_to(base)
        assert torch.equal(merged["emb.weight"], base["emb.weight"])
        torch.testing.assert_close(merged["head.weight"], trained, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged["q.weight"], base["q.weight"] + b @ a)
    # A folder that ties the word embeddings stores one of them and cannot hold the untied pair.
    folder = tmp_path / "base"
    folder.mkdir()
    save_file({k: v.clone() for k, v in base.items() if k != "head.weight"}, str(folder / "model.safetensors"))
    for config in ({"tie_word_embeddings": True, "vocab_size": 5}, {"text_config": {"vocab_size": 5}}):
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ta.TaskArithError) as info:
            from_lora(adapter, base=folder)
        for part in ["own copy of 'head.weight'", repr(str(folder)), "tie_word_embeddings=true",
                     "merge_and_unload unties", "from_pretrained(folder)", "tie_word_embeddings=False"]:
            assert part in str(info.value), part
    # An untied folder stores both names: nothing to untie.
    save_file({k: v.clone() for k, v in base.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"tie_word_embeddings": False, "vocab_size": 5}))
    torch.testing.assert_close(from_lora(adapter, base=folder).apply_to(folder, strict=False)["head.weight"], trained,
                               rtol=0, atol=1e-6)


def test_ensure_weight_tying_copies_stay_tied(tmp_path):
    base, trained = _tied_base(), torch.randn(5, 3, generator=torch.Generator().manual_seed(6))
    config = {"r": 1, "lora_alpha": 1, "modules_to_save": ["emb"], "ensure_weight_tying": True}
    # PEFT saves the one trained copy under both tied names
    adapter = _write_adapter(tmp_path / "a", config, {"base_model.model.emb.weight": trained,
                                                      "base_model.model.head.weight": trained.clone()})
    tv = from_lora(adapter, base=base)
    assert tv.aliases == {"head.weight": "emb.weight"}
    merged = tv.apply_to(base, strict=False)
    torch.testing.assert_close(merged["head.weight"], trained, rtol=0, atol=1e-6)
    assert merged["head.weight"].data_ptr() == merged["emb.weight"].data_ptr()
    differ = _write_adapter(tmp_path / "b", config, {"base_model.model.emb.weight": trained,
                                                     "base_model.model.head.weight": trained + 1})
    with pytest.raises(ta.TaskArithError, match=r"several names of one tied weight \(1\): \['emb.weight', 'head"):
        from_lora(differ, base=base)


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
    from taskarith.lora._config import _rank_and_scale

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


def test_a_deeply_nested_or_huge_adapter_config_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ta.TaskArithError, match="not valid JSON"):
        ta.lora.from_lora(tmp_path)
    (tmp_path / "adapter_config.json").write_text(" " * 10_000_001)
    with pytest.raises(ta.TaskArithError, match="a few kB"):
        ta.lora.from_lora(tmp_path)
