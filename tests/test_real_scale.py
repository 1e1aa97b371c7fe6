"""Real scale: every entry point on tensors above 2^24 entries (the embeddings of GPT-2, Qwen and Llama)
and a sharded checkpoint above 1 GB merged out of core and in memory with equal results.

These tests take a few GB of memory and disk and about a minute or two; deselect them locally with
``-m "not realscale"``. CI runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

import pytest
import torch
from safetensors.torch import save_file

import taskarith as ta
from taskarith import cli


def _available_gb() -> tuple[float, float]:
    """Memory available now and free space in the temporary folder, in GB."""
    try:
        with open("/proc/meminfo") as f:
            memory = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        memory = 1 << 62  # unknown: try
    return memory / 1e9, shutil.disk_usage(tempfile.gettempdir()).free / 1e9


_MEMORY, _DISK = _available_gb()
pytestmark = [
    pytest.mark.realscale,
    # CI must run this tier; a smaller machine skips it rather than swap or fill its disk.
    pytest.mark.skipif(os.environ.get("CI") != "true" and (_MEMORY < 10 or _DISK < 8),
                       reason=f"the real-scale tier needs ~10 GB of free memory and ~8 GB of disk "
                              f"({_MEMORY:.0f} GB and {_DISK:.0f} GB available)"),
]

# Embedding shapes of real models: every one is above 2^24 entries.
SHAPES = {"gpt2": (50257, 768), "qwen2-0.5b": (151936, 896), "llama-7b": (32000, 4096)}


def finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in base.items()}


def model(shape, dtype=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed_tokens.weight": torch.randn(shape, generator=g).to(dtype),
            "norm.weight": torch.ones(shape[1], dtype=dtype)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_extract_and_apply_are_exact_on_llm_embeddings(name):
    assert SHAPES[name][0] * SHAPES[name][1] > 2**24
    base = model(SHAPES[name])
    tuned = finetune(base, 1)
    tv = ta.TaskVector.from_models(base, tuned)
    assert tv.base_fingerprint is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fingerprint of the same base must match
        edited = tv.apply_to(base, on_base_mismatch="raise")
    assert all(torch.equal(edited[n], tuned[n]) for n in base), "bf16 round trip not bit-exact"
    other = model(SHAPES[name], seed=5)
    with pytest.raises(ta.BaseMismatchError):
        tv.apply_to(other, on_base_mismatch="raise")


def test_merges_in_memory_and_out_of_core_agree_on_a_gpt2_embedding(tmp_path):
    # An untied output layer too, and the tensors in memory in the reverse of the files' (sorted)
    # order: bfloat16 deltas tie across tensors at a global trim's threshold, and both drivers must
    # keep the same ones.
    base = model(SHAPES["gpt2"])
    base["lm_head.weight"] = model(SHAPES["gpt2"], seed=1)["embed_tokens.weight"]
    base = dict(reversed(base.items()))
    tuned = [finetune(base, seed) for seed in (1, 2)]
    save_file(base, tmp_path / "base.safetensors")
    for i, t in enumerate(tuned):
        save_file(t, tmp_path / f"ft{i}.safetensors")
    vectors = [ta.TaskVector.from_models(base, t) for t in tuned]
    # A density per tensor: each 38.6M-entry matrix trimmed to its own, streamed out of core.
    per_tensor = {"density": ta.merging.filtered([("lm_head", 0.4), (None, 0.15)]), "scope": "tensor"}
    for label, method, options in [("task_arithmetic", "task_arithmetic", {}), ("ties", "ties", {"density": 0.2}),
                                   ("ties-per-tensor", "ties", per_tensor), ("dare", "dare", {"drop": 0.5, "seed": 3}),
                                   ("model_stock", "model_stock", {})]:
        # model_stock merges weights: rebuilt in bfloat16, they are the stored ones
        merged = ta.merge(vectors, method, base=base if method == "model_stock" else None, **options)
        assert merged.base_fingerprint == vectors[0].base_fingerprint
        expected = merged.apply_to(base)
        out = ta.merge_files(tmp_path / "base.safetensors", [tmp_path / "ft0.safetensors", tmp_path / "ft1.safetensors"],
                             tmp_path / label, method, max_memory="256MB", **options)
        got = ta.io.load_state_dict(out)
        assert all(torch.equal(got[n], expected[n]) for n in base), label


def test_cli_extract_apply_and_merge_on_a_llama_embedding(tmp_path):
    base = model(SHAPES["llama-7b"])
    tuned = finetune(base, 1)
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    save_file(tuned, tmp_path / "ft.safetensors")
    assert cli.main(["extract", str(tmp_path / "base"), str(tmp_path / "ft.safetensors"),
                     "-o", str(tmp_path / "tv.safetensors")]) == 0
    tv = ta.load(tmp_path / "tv.safetensors")
    assert tv.equal(ta.TaskVector.from_models(base, tuned))
    del tv
    assert cli.main(["apply", str(tmp_path / "base"), str(tmp_path / "tv.safetensors"), "-o",
                     str(tmp_path / "edited"), "--on-base-mismatch", "raise"]) == 0
    edited = ta.io.load_state_dict(tmp_path / "edited")
    assert all(torch.equal(edited[n], tuned[n]) for n in base)
    del edited
    config = tmp_path / "merge.yaml"
    config.write_text(f"method: task_arithmetic\nbase: {tmp_path / 'base'}\nvectors: [{tmp_path / 'tv.safetensors'}]\n")
    assert cli.main(["merge", str(config), "-o", str(tmp_path / "merged"), "--strict"]) == 0
    merged = ta.io.load_state_dict(tmp_path / "merged")
    assert all(torch.equal(merged[n], tuned[n]) for n in base)


def test_from_lora_on_a_gpt2_sized_embedding_matches_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_embd=768, n_layer=1, n_head=12, n_positions=64,
                                     tie_word_embeddings=False)
    base_model = transformers.GPT2LMHeadModel(config).eval()
    assert base_model.transformer.wte.weight.numel() > 2**24
    base_model.save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(base_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["wte", "c_attn"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    lora.save_pretrained(tmp_path / "adapter")
    expected = lora.merge_and_unload().state_dict()
    tv = ta.lora.from_lora(tmp_path / "adapter", base=tmp_path / "base")
    assert tv.base_fingerprint is not None
    merged = tv.apply_to(tmp_path / "base", strict=False, on_base_mismatch="raise")
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"):
        assert torch.allclose(merged[name], expected[name], atol=1e-6), name
    assert not torch.equal(merged["transformer.wte.weight"], ta.io.load_state_dict(tmp_path / "base")["transformer.wte.weight"])


def test_a_sharded_checkpoint_above_1gb_merges_alike_out_of_core_and_in_memory(tmp_path):
    """4 float32 tensors of 67M entries (1.07 GB) in 4 shards, two fine-tunes; TIES out of core under a
    512 MB budget (row blocks and streamed thresholds), in memory, and through the command line."""
    shape = (4100, 16384)
    names = [f"layers.{i}.weight" for i in range(4)]
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(shape, generator=g) for n in names}
    assert sum(t.numel() * 4 for t in base.values()) > 10**9
    ta.hf.save_model(base, tmp_path / "base", shard_size="300MB")
    assert len(json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())["weight_map"]) == 4
    for seed in (1, 2):
        ta.hf.save_model(finetune(base, seed, 0.1), tmp_path / f"ft{seed}", shard_size="600MB")
    del base
    sources = [tmp_path / "ft1", tmp_path / "ft2"]
    ta.merge_files(tmp_path / "base", sources, tmp_path / "out_of_core", "ties", density=0.3, max_memory="512MB")
    config = tmp_path / "ties.yaml"
    config.write_text(f"method: ties\nbase: {tmp_path / 'base'}\nmodels: [{sources[0]}, {sources[1]}]\n"
                      "options: {density: 0.3}\n")
    assert cli.main(["merge", str(config), "-o", str(tmp_path / "cli"), "--max-memory", "1GB"]) == 0
    vectors = [ta.TaskVector.from_models(tmp_path / "base", s) for s in sources]
    expected = ta.merge(vectors, "ties", density=0.3).apply_to(tmp_path / "base")
    del vectors
    for out in ("out_of_core", "cli"):
        checkpoint = ta.io.Checkpoint(tmp_path / out)
        assert checkpoint.names() == names
        for n in names:
            assert torch.equal(checkpoint.tensor(n), expected[n]), (out, n)


@pytest.mark.parametrize("method,parameters", [
    ("ties", "models:\n  - model: {ft0}\n    parameters: {{weight: 0.7, density: 0.3}}\n"
             "  - model: {ft1}\n    parameters: {{weight: 1.0, density: 0.6}}\n"),
    ("slerp", "parameters: {{t: 0.4}}\nmodels:\n  - model: {base}\n  - model: {ft0}\n"),
])
def test_mergekit_configs_merge_a_gpt2_embedding_as_the_method_computes_it(tmp_path, method, parameters):
    """mergekit's methods of weights (argsort trims, SLERP norms over the whole tensor) on a tensor above
    2^24 entries, streamed from disk: the same bits as the method on the stored weights in memory."""
    base = model(SHAPES["gpt2"])
    tuned = [finetune(base, seed) for seed in (1, 2)]
    paths = {"base": tmp_path / "base.safetensors", "ft0": tmp_path / "ft0.safetensors",
             "ft1": tmp_path / "ft1.safetensors"}
    for state, path in zip([base, *tuned], paths.values()):
        save_file(state, path)
    config = tmp_path / "mergekit.yml"
    config.write_text(f"merge_method: {method}\nbase_model: {paths['base']}\ndtype: bfloat16\n"
                      + parameters.format(**paths))
    assert cli.main(["merge", str(config), "-o", str(tmp_path / "out.safetensors")]) == 0
    got = ta.io.load_state_dict(tmp_path / "out.safetensors")
    spec_name, options, models, weights = {
        "ties": ("mergekit_ties", {"density": (0.3, 0.6)}, tuned, [0.7, 1.0]),
        "slerp": ("slerp", {"t": 0.4}, tuned[:1], [1.0]),
    }[method]
    spec, resolved = ta.merging._registry.lookup(spec_name, options)
    for name in base:
        expected = ta.merging._engine.call(spec, name, [m[name] for m in models], weights, resolved, base=base[name])
        assert torch.equal(got[name], expected.to(base[name].dtype)), name
