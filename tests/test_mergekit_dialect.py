"""mergekit's config dialect in taskarith: parameters that vary by tensor (gradients, filters), slices,
the base model's role, the files written beside the weights, mergekit-yaml's flags, and refusals.

Equality with mergekit itself is checked by ``test_mergekit_parity.py`` (mergekit as the oracle);
these tests pin the semantics on small models without it.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import taskarith as ta
from taskarith.cli import _config, main
from taskarith.cli._mergekit_params import evaluate

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A tiny Llama with 4 layers and two fine-tuned copies (seeded noise), saved with save_pretrained."""
    root = tmp_path_factory.mktemp("llamas")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    for i in range(2):
        tuned = transformers.LlamaForCausalLM(config)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.02 * torch.randn_like(p))
        tuned.save_pretrained(root / f"ft{i}")
    return root


def _merge(tmp_path, text: str, *flags) -> tuple[int, dict]:
    config = tmp_path / "config.yml"
    config.write_text(textwrap.dedent(text))
    code = main(["merge", str(config), "-o", str(tmp_path / "out"), *flags])
    out = tmp_path / "out" / "model.safetensors"
    return code, (load_file(out) if out.exists() else {})


def _weights(root, name: str) -> dict:
    return load_file(root / name / "model.safetensors")


# ------------------------------------------------------------------ settings


def test_gradients_interpolate_over_the_layers_and_filters_pick_the_first_match():
    assert [evaluate([0.0, 1.0], "t", f"model.layers.{i}.mlp.up_proj.weight", i / 3) for i in range(4)] == \
        pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert evaluate([0.0, 0.5, 1.0], "t", "x", 0.25) == pytest.approx(0.25)
    setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]
    assert evaluate(setting, "t", "model.layers.3.self_attn.q_proj.weight", 1.0) == 1.0
    assert evaluate(setting, "t", "model.layers.3.mlp.up_proj.weight", 1.0) == 0.7
    assert evaluate(setting, "t", "model.norm.weight", 0.0) == 0.5
    assert evaluate([True, False], "normalize", "x", 0.9) is True  # booleans are picked, not interpolated


# ------------------------------------------------------------------ merges


def test_per_model_densities_gradients_and_filters_reach_the_method(llamas, tmp_path):
    code, merged = _merge(tmp_path, f"""
        models:
          - model: {llamas / 'ft0'}
            parameters: {{weight: [0.0, 1.0]}}
          - model: {llamas / 'ft1'}
            parameters:
              weight: [{{filter: self_attn, value: 0.0}}, {{value: 1.0}}]
        merge_method: task_arithmetic
        base_model: {llamas / 'base'}
        dtype: float32
    """)
    assert code == 0
    base, ft0, ft1 = (_weights(llamas, n) for n in ("base", "ft0", "ft1"))
    # layer 0: ft0 has weight 0, so attention is the base's and the MLP moves by ft1's delta only
    q, up = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[q], base[q])
    assert torch.equal(merged[up], base[up] + (ft1[up] - base[up]))
    # the last layer: ft0 has weight 1, ft1 only outside attention
    q3 = "model.layers.3.self_attn.q_proj.weight"
    assert torch.equal(merged[q3], base[q3] + (ft0[q3] - base[q3]))


def test_linear_needs_no_base_and_takes_the_first_models_files(llamas, tmp_path):
    code, merged = _merge(tmp_path, f"""
        models:
          - model: {llamas / 'ft0'}
            parameters: {{weight: 1.0}}
          - model: {llamas / 'ft1'}
            parameters: {{weight: 3.0}}
        merge_method: linear
    """)
    assert code == 0
    ft0, ft1 = _weights(llamas, "ft0"), _weights(llamas, "ft1")
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(merged[name], (ft0[name] + 3 * ft1[name]) / 4, atol=1e-7)
    assert (tmp_path / "out" / "config.json").is_file()


def test_slices_stack_layers_and_rewrite_the_layer_count(llamas, tmp_path):
    code, merged = _merge(tmp_path, f"""
        slices:
          - sources:
              - model: {llamas / 'ft0'}
                layer_range: [0, 3]
          - sources:
              - model: {llamas / 'ft1'}
                layer_range: [1, 4]
        merge_method: passthrough
        dtype: float32
    """)
    assert code == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    ft0, ft1 = _weights(llamas, "ft0"), _weights(llamas, "ft1")
    suffix = "self_attn.o_proj.weight"
    for out_layer, (source, layer) in enumerate([(ft0, 0), (ft0, 1), (ft0, 2), (ft1, 1), (ft1, 2), (ft1, 3)]):
        assert torch.equal(merged[f"model.layers.{out_layer}.{suffix}"], source[f"model.layers.{layer}.{suffix}"])
    assert torch.equal(merged["model.embed_tokens.weight"], ft0["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], ft1["model.norm.weight"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 6


def test_slerp_over_slices_with_a_gradient(llamas, tmp_path):
    code, merged = _merge(tmp_path, f"""
        slices:
          - sources:
              - model: {llamas / 'base'}
                layer_range: [0, 4]
              - model: {llamas / 'ft0'}
                layer_range: [0, 4]
        merge_method: slerp
        base_model: {llamas / 'base'}
        parameters:
          t: [0.0, 1.0]
        dtype: float32
    """)
    assert code == 0
    base, ft0 = _weights(llamas, "base"), _weights(llamas, "ft0")
    first, last = "model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(merged[first], base[first])  # t = 0 on the first layer
    assert torch.allclose(merged[last], ft0[last], atol=1e-6)  # t = 1 on the last


def test_the_output_holds_a_model_card_and_the_config_as_run(llamas, tmp_path):
    text = f"""
        models:
          - model: {llamas / 'ft0'}
            parameters: {{weight: 0.5, density: 0.5}}
          - model: {llamas / 'ft1'}
            parameters: {{weight: 0.5, density: 0.5}}
        merge_method: ties
        base_model: {llamas / 'base'}
    """
    code, _ = _merge(tmp_path, text)
    assert code == 0
    assert (tmp_path / "out" / "mergekit_config.yml").read_text().strip() == textwrap.dedent(text).strip()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "ties" in card and str(llamas / "ft1") in card and "```yaml" in card


def test_a_random_method_without_a_seed_draws_one_and_says_it(llamas, tmp_path, capsys):
    code, _ = _merge(tmp_path, f"""
        models:
          - model: {llamas / 'ft0'}
            parameters: {{weight: 1.0, density: 0.5}}
        merge_method: dare_ties
        base_model: {llamas / 'base'}
    """, "--out-shard-size", "2K", "--lazy-unpickle", "--allow-crimes", "--copy-tokenizer")
    assert code == 0
    err = capsys.readouterr().err
    assert "random seed" in err and "--seed" in err
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # 2K parameters of float32 per shard


# ------------------------------------------------------------------ refusals


REFUSED = {
    "unknown method": ("merge_method: model_soup", "unknown mergekit method 'model_soup'"),
    "missing weight": ("merge_method: ties", "ties needs 'weight' for every model"),
    "slerp without t": ("merge_method: slerp", "slerp needs 't'"),
    "union without tokenizers": ("merge_method: ties\ntokenizer_source: union", "has no tokenizer to build"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_are_one_line_about_the_problem_only(llamas, tmp_path, capsys, case):
    head, phrase = REFUSED[case]
    config = tmp_path / "c.yml"
    weight = "" if case == "missing weight" else "\n    parameters: {weight: 1.0}"
    config.write_text(f"{head}\nbase_model: {llamas / 'base'}\nmodels:\n  - model: {llamas / 'ft0'}{weight}\n")
    assert main(["merge", str(config), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and phrase in err and "1 problem" in err, err
    assert not (tmp_path / "out").exists()


def test_unused_parameters_warn_as_mergekit_ignores_them(llamas, tmp_path):
    text = (f"merge_method: slerp\nbase_model: {llamas / 'base'}\nparameters: {{t: 0.5, density: 0.3}}\n"
            f"models:\n  - model: {llamas / 'base'}\n  - model: {llamas / 'ft0'}\n")
    with pytest.warns(UserWarning, match="slerp takes no parameter 'density'"):
        plan = _config.parse(text, name="c.yml")
    assert plan.options["t"] == 0.5 and "density" not in plan.options


# ------------------------------------------------------------------ taskarith's own format


def test_taskarith_configs_take_gradients_filters_and_per_model_options(llamas, tmp_path):
    """The same per-tensor values in taskarith's format: weights as gradients, options as filters, and a
    method's per-model options in the model entries."""
    config = tmp_path / "native.yml"
    config.write_text(textwrap.dedent(f"""
        method: mergekit_ties
        base: {llamas / 'base'}
        models:
          - model: {llamas / 'ft0'}
            weight: [0.0, 1.0]
            density: 0.5
          - model: {llamas / 'ft1'}
            weight: 1.0
            density: [{{filter: self_attn, value: 0.3}}, {{value: 0.8}}]
        options:
          lambda_: [{{filter: mlp, value: 0.5}}, {{value: 1.0}}]
    """))
    assert main(["merge", str(config), "-o", str(tmp_path / "out")]) == 0
    merged = load_file(tmp_path / "out" / "model.safetensors")
    plain = tmp_path / "plain.yml"  # the last layer and one MLP tensor, with their values written out
    for name, (w0, d1, lam) in {"model.layers.3.self_attn.q_proj.weight": (1.0, 0.3, 1.0),
                                "model.layers.0.mlp.up_proj.weight": (0.0, 0.8, 0.5)}.items():
        plain.write_text(textwrap.dedent(f"""
            method: mergekit_ties
            base: {llamas / 'base'}
            models:
              - {{model: {llamas / 'ft0'}, weight: {w0}, density: 0.5}}
              - {{model: {llamas / 'ft1'}, weight: 1.0, density: {d1}}}
            options: {{lambda_: {lam}}}
        """))
        out = tmp_path / f"plain-{name}"
        assert main(["merge", str(plain), "-o", str(out)]) == 0
        assert torch.equal(merged[name], load_file(out / "model.safetensors")[name]), name


def test_taskarith_ties_takes_a_density_gradient_with_tensor_scope(llamas, tmp_path, capsys):
    """taskarith's own ties with a density per layer: each tensor trimmed to its own density (the same
    merge as one config per density); with the global scope, refused with the fix."""
    text = f"""
        method: ties
        base: {llamas / 'base'}
        models: [{llamas / 'ft0'}, {llamas / 'ft1'}]
        options: {{density: [0.2, 0.8], scope: SCOPE}}
    """
    code, merged = _merge(tmp_path, text.replace("SCOPE", "tensor"))
    assert code == 0
    for layer, density in ((0, 0.2), (3, 0.8)):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        plain = tmp_path / f"plain{layer}.yml"
        plain.write_text(textwrap.dedent(text.replace("[0.2, 0.8]", str(density)).replace("SCOPE", "tensor")))
        assert main(["merge", str(plain), "-o", str(tmp_path / f"plain{layer}")]) == 0
        assert torch.equal(merged[name], _weights(tmp_path, f"plain{layer}")[name]), name
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"],
                           _weights(tmp_path, "plain3")["model.layers.0.mlp.up_proj.weight"])
    (tmp_path / "global").mkdir()
    code, written = _merge(tmp_path / "global", text.replace("SCOPE", "global"))
    assert code != 0 and not written
    assert "scope='tensor'" in capsys.readouterr().err


def test_the_output_may_follow_the_config_as_in_mergekit_yaml(llamas, tmp_path, capsys):
    config = tmp_path / "c.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {llamas / 'ft0'}\n    parameters: {{weight: 1.0}}\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--copy-tokenizer"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["merge", str(config)]) == 2  # no output at all
    assert main(["merge", str(config), str(tmp_path / "a"), "-o", str(tmp_path / "b")]) == 2  # two
    assert "give the output once" in capsys.readouterr().err
