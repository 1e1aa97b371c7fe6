"""Low-rank extraction (TaskVector.to_lora, taskarith extract-lora) against PEFT and from_lora, on tiny models."""

from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch

import taskarith as ta
from taskarith import cli
from taskarith.lora import from_lora
from taskarith.lora import EXACT_SVD_MAX, to_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 B @ A against the float32 delta: a few ulps of the weights
LOW_RANK = 2  # the rank of the low-rank part of each perturbation


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, tie_word_embeddings=False)).eval()


def _gpt2():  # ties wte and lm_head; Conv1D layers store their weight (in, out)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)).eval()


ARCH = {
    "llama": (_llama, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                       "model.layers.0.mlp.down_proj", "model.embed_tokens", "lm_head"],
              ["model.layers.0.input_layernorm.weight", "model.norm.weight"]),
    "gpt2": (_gpt2, ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.0.mlp.c_fc",
                     "transformer.wte"],
             ["transformer.h.0.attn.c_attn.bias", "transformer.ln_f.weight", "transformer.ln_f.bias"]),
}


def _make(arch: str, tmp_path, *, full_rank: bool = False):
    """(base folder, finetuned folder): the finetuned model adds a rank-2 delta (a random one with
    ``full_rank``) to some weights and a dense delta to some biases and norms."""
    build, layers, dense = ARCH[arch]
    torch.manual_seed(0)
    model = build()
    model.save_pretrained(tmp_path / f"{arch}-base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in layers:
            w = model.get_submodule(module).weight
            if full_rank:
                w.add_(0.1 * torch.randn(w.shape, generator=gen))
            else:
                w.add_(0.1 * torch.randn(w.shape[0], LOW_RANK, generator=gen) @ torch.randn(LOW_RANK, w.shape[1], generator=gen))
        for name in dense:
            model.get_parameter(name).add_(0.1 * torch.randn(model.get_parameter(name).shape, generator=gen))
    model.save_pretrained(tmp_path / f"{arch}-tuned")
    return tmp_path / f"{arch}-base", tmp_path / f"{arch}-tuned"


def _load(folder):
    cls = transformers.GPT2LMHeadModel if "gpt2" in folder.name else transformers.LlamaForCausalLM
    return cls.from_pretrained(folder).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("base_as", ["module", "folder"])
def test_full_rank_round_trip_through_from_lora_gives_tau(tmp_path, arch, base_as):
    base_dir, tuned_dir = _make(arch, tmp_path, full_rank=True)
    base = _load(base_dir) if base_as == "module" else base_dir
    tv = ta.TaskVector.from_models(base, _load(tuned_dir) if base_as == "module" else tuned_dir)
    extraction = tv.to_lora(40, base=base)  # 40 >= every matrix's rank (32 at most): exact, factors zero-padded
    lora = [e for e in extraction.report.values() if e.how == "lora"]
    assert len(lora) == len(ARCH[arch][1]) and all(e.error < 1e-5 and e.svd == "exact" for e in lora)
    assert all(e.how == "full" and e.error < 1e-6 for e in extraction.report.values() if e.how != "lora")
    assert extraction.config["r"] == extraction.config["lora_alpha"] == 40
    assert extraction.config["fan_in_fan_out"] is (arch == "gpt2")
    folder = extraction.save(tmp_path / "adapter")
    back = from_lora(folder, base=_load(base_dir) if base_as == "module" else base_dir, full=True)
    assert sorted(back) == sorted(tv)
    for name in tv:
        torch.testing.assert_close(back[name], tv[name], **TOL, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_loads_the_adapter_and_its_merge_is_base_plus_tau(tmp_path, arch):
    base_dir, tuned_dir = _make(arch, tmp_path)
    tv = ta.TaskVector.from_models(_load(base_dir), _load(tuned_dir))
    extraction = tv.to_lora(4, base=_load(base_dir))  # rank 4 > the deltas' rank 2, well below full rank
    assert max(e.error for e in extraction.report.values()) < 1e-5
    assert {e.rank for e in extraction.report.values() if e.how == "lora"} == {4}
    folder = extraction.save(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [".taskarith-output", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = peft.PeftModel.from_pretrained(_load(base_dir), folder).merge_and_unload()
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    expected = tv.apply_to(_load(base_dir).state_dict())
    got = merged.state_dict()
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, **TOL, msg=name)
    if arch == "gpt2":  # the LoRA on the tied wte reached lm_head through the merge, as τ does
        assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()


def test_errors_are_per_layer_decrease_with_rank_and_are_the_svd_tails(tmp_path):
    base_dir, tuned_dir = _make("llama", tmp_path, full_rank=True)
    tv = ta.TaskVector.from_models(base_dir, tuned_dir)
    errors = {r: {n: e.error for n, e in tv.to_lora(r, base=base_dir).report.items() if e.how == "lora"}
              for r in (1, 2, 4, 8, 16, 32)}
    names = list(errors[1])
    assert len(names) == 5 and all(n in errors[r] for r in errors for n in names)
    for name in names:
        seq = [errors[r][name] for r in sorted(errors)]
        assert all(a > b or a < 1e-5 > b for a, b in itertools.pairwise(seq)), (name, seq)  # exact from min(shape) on
        s = torch.linalg.svdvals(tv[name].double())
        for r in (1, 4, 16):  # Eckart–Young: the optimal error is the tail of the singular values
            assert errors[r][name] == pytest.approx(float(s[r:].norm() / s.norm()), rel=1e-4, abs=1e-5)
        assert errors[32][name] < 1e-5


def test_rest_target_and_refusals_are_reported(tmp_path):
    base_dir, tuned_dir = _make("gpt2", tmp_path)
    tv = ta.TaskVector.from_models(base_dir, tuned_dir)
    with pytest.raises(ta.TaskArithError, match="cannot tell whether"):
        tv.to_lora(4, base=_load(base_dir).state_dict())  # a state_dict gives no types: wte, c_attn ambiguous
    plain = ta.TaskVector({"proj.weight": torch.ones(3, 2), "proj.bias": torch.ones(3)})
    with pytest.raises(ta.TaskArithError, match="pass base=.*rest='drop'"):
        plain.to_lora(1)  # the bias is stored as base + delta
    assert plain.to_lora(1, rest="drop").report["proj.bias"].how == "dropped"
    assert plain.to_lora(1, base={"proj.weight": torch.zeros(3, 2), "proj.bias": torch.zeros(3)}).report[
        "proj.bias"].how == "full"
    dropped = tv.to_lora(4, base=base_dir, rest="drop")
    assert {n for n, e in dropped.report.items() if e.how == "dropped"} == set(ARCH["gpt2"][2])
    assert dropped.worst.error == 1.0 and not dropped.config["modules_to_save"]
    partial = tv.to_lora(4, base=base_dir, target=["c_attn"])
    how = {n: e.how for n, e in partial.report.items()}
    assert how["transformer.h.0.attn.c_attn.weight"] == "lora" and how["transformer.wte.weight"] == "dropped"
    assert how["transformer.h.0.attn.c_attn.bias"] == "full" and partial.config["bias"] == "all"
    assert partial.config["target_modules"] == ["transformer.h.0.attn.c_attn"]
    assert partial.config["modules_to_save"] == ["transformer.ln_f"]
    with pytest.raises(ta.TaskArithError, match="matches none"):
        tv.to_lora(4, base=base_dir, target="nothing.*")
    with pytest.raises(ta.TaskArithError) as err:
        tv.to_lora(0, base=base_dir, niter=-1, rest="some", target="(")
    assert all(s in str(err.value) for s in ("rank=0", "niter=-1", "rest='some'", "target='('"))
    with pytest.raises(ta.KeyMismatchError):
        tv.to_lora(4, base={"other.weight": torch.zeros(2, 2)})


def test_plain_vector_without_base_and_the_randomized_svd_is_reproducible():
    gen = torch.Generator().manual_seed(0)
    spectrum = torch.logspace(0, -3, 150, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(200, 150, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(150, 150, generator=gen, dtype=torch.float64))
    big = torch.randn(EXACT_SVD_MAX + 6, 3, generator=gen) @ torch.randn(3, EXACT_SVD_MAX + 6, generator=gen)
    tv = ta.TaskVector({"a.weight": ((u * spectrum) @ v.T).float(), "b.weight": big})
    first, again = to_lora(tv, 8, randomized=True, seed=3), to_lora(tv, 8, randomized=True, seed=3)
    assert first.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    alone = to_lora(ta.TaskVector({"a.weight": tv["a.weight"]}), 8, randomized=True, seed=3)  # other layers: no effect
    assert all(torch.equal(alone.tensors[k], first.tensors[k]) for k in alone.tensors)
    other = to_lora(tv, 8, randomized=True, seed=4)
    assert not torch.equal(other.tensors["base_model.model.a.lora_A.weight"], first.tensors["base_model.model.a.lora_A.weight"])
    exact = to_lora(tv, 8, randomized=False).report["a.weight"]
    assert first.report["a.weight"].svd == "randomized" and exact.svd == "exact"
    assert exact.error <= first.report["a.weight"].error < 1.05 * exact.error
    auto = to_lora(tv, 8).report  # by size: exact at 200 × 150, randomized above EXACT_SVD_MAX
    assert auto["a.weight"].svd == "exact" and auto["b.weight"].svd == "randomized"
    assert auto["b.weight"].error < 1e-5 and auto["b.weight"].rank == 8
    assert tv.to_lora(8, dtype=torch.bfloat16).tensors["base_model.model.a.lora_B.weight"].dtype == torch.bfloat16


# ------------------------------------------------------------------ the command line


def run(*argv):
    return cli.main([str(a) for a in argv])


def test_cli_writes_the_adapter_and_refuses_bad_outputs_and_ranks(tmp_path, capsys):
    base_dir, tuned_dir = _make("llama", tmp_path, full_rank=True)
    out = tmp_path / "adapter"
    capsys.readouterr()
    assert run("extract-lora", base_dir, tuned_dir, "--rank", "32", "-o", out, "--json") == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["adapter"] == str(out) and report["worst"]["error"] < 1e-5
    line = captured.err.strip()
    assert line.count("\n") == 0 and line.startswith(f"taskarith: wrote {out} (") and "worst relative error" in line
    tv = ta.TaskVector.from_models(base_dir, tuned_dir)
    back = from_lora(out, base=base_dir, full=True)
    for name in tv:
        torch.testing.assert_close(back[name], tv[name], **TOL, msg=name)
    assert run("extract-lora", base_dir, tuned_dir, "-r", "2", "-o", out) == 0  # its own output: replaced
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    for bad_out, words in ((base_dir / "adapter", "lies inside"), (base_dir, " is the input"),
                           (tmp_path, "contains")):
        capsys.readouterr()
        assert run("extract-lora", base_dir, tuned_dir, "--rank", "2", "-o", bad_out) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("taskarith: error: ") and words in err
    assert not (base_dir / "adapter").exists()
    for rank in ("0", "-3", "two"):
        assert run("extract-lora", base_dir, tuned_dir, "--rank", rank, "-o", tmp_path / "x") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--rank must be a positive integer" in err and repr(rank) in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert run("extract-lora", base_dir, tuned_dir, "--rank", "2", "-o", foreign) == 1
    assert "--overwrite" in capsys.readouterr().err and (foreign / "notes.txt").exists()
    assert run("extract-lora", base_dir, tuned_dir, "--rank", "2", "-o", foreign, "--overwrite") == 0
    assert not (foreign / "notes.txt").exists()


def test_entries_peft_cannot_store_are_refused_with_the_reason():
    def vector_and_base(names):
        base = {n: torch.zeros(4, 4) if n.endswith("weight") else torch.zeros(4) for n in names}
        return ta.TaskVector({n: torch.ones_like(t) for n, t in base.items()}), base

    tv, base = vector_and_base(["model.norm.bias", "model.vision_model.norm.bias", "model.vision_model.proj.weight"])
    with pytest.raises(ta.TaskArithError, match="'model.norm': PEFT matches modules_to_save by suffix"):
        tv.to_lora(2, base=base)  # PEFT would also wrap model.vision_model.norm
    tv, base = vector_and_base(["block.scale", "block.proj.weight"])
    with pytest.raises(ta.TaskArithError, match="'block': it holds LoRA layers"):
        tv.to_lora(2, base=base)
    assert tv.to_lora(2, base=base, rest="drop").report["block.scale"].how == "dropped"
    nan = ta.TaskVector({"proj.weight": torch.tensor([[1.0, float("nan")]])})
    with pytest.raises(ta.NonFiniteError, match="proj.weight"):
        nan.to_lora(1)
    with pytest.raises(ta.TaskArithError, match="every delta of the vector is zero"):
        ta.TaskVector({"proj.weight": torch.zeros(2, 2)}).to_lora(1)
