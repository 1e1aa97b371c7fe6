"""The models a mergekit config can name besides a local folder: ``MODEL+LORA`` (a PEFT adapter merged
into the model as it is read), Hugging Face Hub ids (from the cache; never the network here), and the
outputs of earlier documents of a multi-document config (mergekit-multi's).

``MODEL+LORA`` is compared with mergekit itself (the oracle of ``test_mergekit_parity``, found the same
way: skipped without it, required when ``CI=true``): float32 merges must be equal, bfloat16 ones too.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from mergekit_models import build_family, load_tensors

from taskarith import cli

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def assert_same_tensors(expected: Path, actual: Path) -> None:
    e, a = load_tensors(expected), load_tensors(actual)
    assert sorted(e) == sorted(a)
    for name in e:
        assert e[name].dtype == a[name].dtype, name
        assert torch.equal(e[name], a[name]), f"{name}: max |diff| {(e[name].float() - a[name].float()).abs().max()}"


def make_adapter(base: Path, out: Path, *, seed: int, **settings) -> Path:
    """A PEFT LoRA adapter of ``base`` with random, non-zero factors (and trained ``modules_to_save`` copies)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.01)
    wrapped.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Tiny Llama models (float32 and bfloat16), two fine-tuned variants each, and LoRA adapters."""
    root = tmp_path_factory.mktemp("inputs")
    f32 = build_family(root / "f32", "llama", n_finetuned=2, num_layers=2, seed=11)
    bf16 = build_family(root / "bf16", "llama", n_finetuned=1, num_layers=2, seed=12, dtype=torch.bfloat16)
    adapters = {
        "plain": make_adapter(f32.base, root / "lora_plain", seed=1, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "down_proj"]),
        "rich": make_adapter(f32.base, root / "lora_rich", seed=2, r=4, lora_alpha=16, use_rslora=True,
                             target_modules=["k_proj", "o_proj", "gate_proj", "embed_tokens"],
                             rank_pattern={"o_proj": 2}, alpha_pattern={"gate_proj": 3.0},
                             modules_to_save=["lm_head"]),
        "bf16": make_adapter(bf16.base, root / "lora_bf16", seed=3, r=8, lora_alpha=16,
                             target_modules=["q_proj", "up_proj"]),
    }
    return {"root": root, "f32": f32, "bf16": bf16, "adapters": adapters}


# ------------------------------------------------------------------ parity with mergekit


def _cases(z) -> dict[str, dict]:
    f, b, a = z["f32"], z["bf16"], z["adapters"]
    lora = f"{f.base}+{a['plain']}"
    return {
        "linear_lora": {"merge_method": "linear", "dtype": "float32",
                        "models": [{"model": lora, "parameters": {"weight": 0.6}},
                                   {"model": str(f.finetuned[0]), "parameters": {"weight": 0.4}}]},
        "task_arithmetic_two_loras": {
            "merge_method": "task_arithmetic", "base_model": str(f.base), "dtype": "float32",
            "models": [{"model": lora, "parameters": {"weight": 1.0}},
                       {"model": {"model": str(f.base), "lora": str(a["rich"])}, "parameters": {"weight": 0.5}},
                       {"model": str(f.finetuned[1]), "parameters": {"weight": 0.3}}]},
        "ties_lora_base": {  # the base itself with an adapter merged in
            "merge_method": "ties", "base_model": f"{f.base}+{a['rich']}", "dtype": "float32",
            "parameters": {"density": 0.5},
            "models": [{"model": str(f.finetuned[0]), "parameters": {"weight": 0.7}},
                       {"model": lora, "parameters": {"weight": 0.5}}]},
        "slices_lora": {"merge_method": "passthrough", "dtype": "float32",
                        "slices": [{"sources": [{"model": lora, "layer_range": [0, 2]}]},
                                   {"sources": [{"model": str(f.finetuned[0]), "layer_range": [1, 2]}]}]},
        "linear_lora_bf16": {"merge_method": "linear", "dtype": "bfloat16",
                             "models": [{"model": f"{b.base}+{a['bf16']}", "parameters": {"weight": 0.5}},
                                        {"model": str(b.finetuned[0]), "parameters": {"weight": 0.5}}]},
    }


@pytest.fixture(scope="module")
def oracle(zoo):
    from test_mergekit_parity import MERGEKIT_FLAGS, _interpreter, _locate_mergekit, _run_batch

    exe, reason = _locate_mergekit()
    if exe is None:
        if os.environ.get("CI") == "true" or os.environ.get("TASKARITH_MERGEKIT"):
            pytest.fail(f"the mergekit oracle is required (CI=true or TASKARITH_MERGEKIT set): {reason}")
        pytest.skip(reason)
    python = _interpreter(exe)
    if python is None:
        pytest.skip(f"no Python interpreter found for {exe}")
    work = zoo["root"] / "mergekit"
    work.mkdir()
    jobs = []
    for name, config in _cases(zoo).items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        jobs.append({"name": name, "config": str(path), "out": str(work / "out" / name),
                     "flags": [*MERGEKIT_FLAGS, "--lora-merge-cache", str(work / "lora_cache")]})
    results = _run_batch(python, jobs, work)
    return {job["name"]: (Path(job["config"]), Path(job["out"]), results["jobs"][job["name"]]) for job in jobs}


@pytest.mark.mergekit
@pytest.mark.parametrize("case", ["linear_lora", "task_arithmetic_two_loras", "ties_lora_base", "slices_lora",
                                  "linear_lora_bf16"])
def test_model_plus_lora_matches_mergekit(oracle, zoo, case, tmp_path):
    config, expected, result = oracle[case]
    if not result["ok"]:
        pytest.fail(f"mergekit failed on {case}:\n{result['error']}")
    out = tmp_path / "out"
    assert run("merge", config, "-o", out) == 0
    assert_same_tensors(expected, out)
    assert not [p for p in tmp_path.iterdir() if p.name != "out"], "no scratch copy is left beside the output"


def test_lora_view_equals_peft_merge_and_unload(zoo, tmp_path):
    """Without the oracle: MODEL+LORA alone (passthrough) is PEFT's merge_and_unload."""
    f, a = zoo["f32"], zoo["adapters"]
    for label in ("plain", "rich"):
        config = write(tmp_path / f"{label}.yaml", f"""
            merge_method: passthrough
            dtype: float32
            models:
              - model: {f.base}+{a[label]}
        """)
        out = tmp_path / f"out_{label}"
        assert run("merge", config, "-o", out) == 0
        model = transformers.AutoModelForCausalLM.from_pretrained(f.base)
        merged = peft.PeftModel.from_pretrained(model, a[label]).merge_and_unload()
        reference = tmp_path / f"peft_{label}"
        merged.save_pretrained(reference)
        assert_same_tensors(reference, out)


def test_lora_reference_problems_are_reported_with_their_line(zoo, tmp_path, capsys):
    f = zoo["f32"]
    wrong_rank = shutil.copytree(zoo["adapters"]["plain"], tmp_path / "wrong_rank")
    settings = json.loads((wrong_rank / "adapter_config.json").read_text())
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**settings, "r": 2}))
    config = write(tmp_path / "bad.yaml", f"""
        merge_method: linear
        models:
          - model: {f.base}+{tmp_path / 'no-adapter'}
          - model: {f.base}+{f.finetuned[0]}
          - model: a+b+c
          - model: {{model: {f.base}, lora: {wrong_rank}}}
    """)
    assert run("merge", config, "-o", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "line 3, models[0].model: no such adapter folder" in err
    assert "line 4, models[1].model: not a PEFT adapter folder (no adapter_config.json)" in err
    assert "line 5, models[2].model: expected MODEL+LORA (one '+' between the model and its adapter)" in err
    assert "line 6, models[3].model.lora: the adapter" in err and "does not apply to" in err


# ------------------------------------------------------------------ Hugging Face Hub ids


def _cache_model(cache: Path, repo_id: str, source: Path, commit: str = COMMIT, refs=("main",)) -> Path:
    """``source``'s files in a Hugging Face cache layout: ``models--org--name/snapshots/<commit>/`` (the
    files as links into ``blobs/``, as huggingface_hub writes them) and ``refs/<branch>``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for i, file in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{commit[:8]}{i:04d}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(zoo, tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    f = zoo["f32"]
    _cache_model(cache, "org/tiny-base", f.base)
    _cache_model(cache, "org/tiny-base", f.finetuned[1], commit=OTHER_COMMIT, refs=("v2",))
    _cache_model(cache, "org/tiny-lora", zoo["adapters"]["plain"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache


def test_hub_ids_resolve_through_the_cache(zoo, hub, tmp_path):
    f, a = zoo["f32"], zoo["adapters"]
    by_id = write(tmp_path / "hub.yaml", f"""
        merge_method: task_arithmetic
        base_model: org/tiny-base
        dtype: float32
        models:
          - model: org/tiny-base+org/tiny-lora
            parameters: {{weight: 0.5}}
          - model: org/tiny-base@v2
            parameters: {{weight: 0.3}}
          - model: org/tiny-base@{OTHER_COMMIT}
            parameters: {{weight: 0.2}}
    """)
    by_path = write(tmp_path / "local.yaml", f"""
        merge_method: task_arithmetic
        base_model: {f.base}
        dtype: float32
        models:
          - model: {f.base}+{a['plain']}
            parameters: {{weight: 0.5}}
          - model: {f.finetuned[1]}
            parameters: {{weight: 0.3}}
          - model: {f.finetuned[1]}
            parameters: {{weight: 0.2}}
    """)
    assert run("merge", by_id, "-o", tmp_path / "hub_out") == 0
    assert run("merge", by_path, "-o", tmp_path / "local_out") == 0
    assert_same_tensors(tmp_path / "local_out", tmp_path / "hub_out")
    assert (tmp_path / "hub_out" / "tokenizer.json").is_file()  # the files beside the weights come along too


def test_hf_home_locates_the_cache(zoo, hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    home = tmp_path / "hf_home"
    home.mkdir()
    (home / "hub").symlink_to(hub)
    monkeypatch.setenv("HF_HOME", str(home))
    config = write(tmp_path / "c.yaml", "merge_method: passthrough\ndtype: float32\nmodels: [{model: org/tiny-base}]\n")
    assert run("merge", config, "-o", tmp_path / "out") == 0
    assert_same_tensors(zoo["f32"].base, tmp_path / "out")


def test_a_model_missing_from_the_cache_offline_is_one_clear_line(hub, tmp_path, capsys):
    config = write(tmp_path / "c.yaml", """
        merge_method: linear
        models:
          - model: org/not-cached@v3
          - model: org/tiny-base@no-such-branch
          - model: org/tiny-base+org/no-lora
    """)
    assert run("merge", config, "-o", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert ("line 3, models[0].model: 'org/not-cached@v3' is not a local path, and the model is not in the Hugging "
            f"Face cache ({hub}) while HF_HUB_OFFLINE=1 forbids downloading it: fetch it first with "
            "`hf download org/not-cached --revision v3`") in err
    assert "line 4, models[1].model: 'org/tiny-base@no-such-branch' is not a local path" in err
    assert "line 5, models[2].model: 'org/no-lora' is not a local path, and the adapter is not in" in err


def test_a_failed_download_is_one_clear_line(hub, tmp_path, capsys, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known\n(more detail)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)  # never the network
    monkeypatch.delenv("HF_HUB_OFFLINE")
    config = write(tmp_path / "c.yaml", "merge_method: passthrough\nmodels: [{model: org/elsewhere@v1}]\n")
    assert run("merge", config, "-o", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert ("line 2, models[0].model: 'org/elsewhere@v1' is not a local path, and downloading the model from the "
            "Hugging Face Hub failed (OSError: Name or service not known)") in err
    assert "`hf download org/elsewhere --revision v1`" in err


def test_a_local_path_ignores_a_revision_and_a_trailing_separator(zoo, tmp_path):
    base = zoo["f32"].base
    config = tmp_path / "c.yaml"
    config.write_text(f"merge_method: passthrough\ndtype: float32\nmodels: [{{model: '{base}@main'}}]\n---\n")
    assert run("merge", config, "-o", tmp_path / "out") == 0
    assert_same_tensors(base, tmp_path / "out")


# ------------------------------------------------------------------ several documents (mergekit-multi)


def _two_merges(f, a, first: str) -> tuple[str, str]:
    """Document texts: 'soup' (a linear merge with a LoRA), and 'final', which reads 'soup' by its name."""
    soup = textwrap.dedent(f"""
        name: soup
        merge_method: linear
        dtype: float32
        models:
          - model: {f.finetuned[0]}
            parameters: {{weight: 0.5}}
          - model: {f.base}+{a['plain']}
            parameters: {{weight: 0.5}}
    """).strip()
    final = textwrap.dedent(f"""
        name: final
        merge_method: task_arithmetic
        base_model: {f.base}
        dtype: float32
        models:
          - model: {first}
            parameters: {{weight: 0.7}}
          - model: {f.finetuned[1]}
            parameters: {{weight: 0.3}}
    """).strip()
    return soup, final


def test_multi_document_config_equals_the_merges_run_by_hand(zoo, tmp_path):
    f, a = zoo["f32"], zoo["adapters"]
    soup, final = _two_merges(f, a, "soup")
    multi = tmp_path / "multi.yml"
    multi.write_text(f"{final}\n---\n{soup}\n")  # the order of the file does not matter: 'final' reads 'soup'
    assert run("merge", multi, "-o", tmp_path / "out") == 0
    by_hand_soup, by_hand_final = _two_merges(f, a, str(tmp_path / "soup_by_hand"))
    assert run("merge", write(tmp_path / "soup.yml", by_hand_soup), "-o", tmp_path / "soup_by_hand") == 0
    assert run("merge", write(tmp_path / "final.yml", by_hand_final), "-o", tmp_path / "final_by_hand") == 0
    assert_same_tensors(tmp_path / "soup_by_hand", tmp_path / "out" / "soup")
    assert_same_tensors(tmp_path / "final_by_hand", tmp_path / "out" / "final")
    assert "name: final" in (tmp_path / "out" / "final" / "mergekit_config.yml").read_text()


def test_multi_document_unnamed_final_merge_goes_to_the_output(zoo, tmp_path, capsys):
    f, a = zoo["f32"], zoo["adapters"]
    soup, final = _two_merges(f, a, "soup+" + str(a["rich"]))
    final = final.replace("name: final\n", "")
    multi = tmp_path / "multi.yml"
    multi.write_text(f"{soup}\n---\n{final}\n")
    assert run("merge", multi, "-o", tmp_path / "final") == 2  # the named merges need --intermediate-dir
    assert "--intermediate-dir" in capsys.readouterr().err
    assert run("merge", multi, "-o", tmp_path / "final", "--intermediate-dir", tmp_path / "steps") == 0
    assert (tmp_path / "steps" / "soup" / "model.safetensors").is_file()
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_multi_document_configs_are_validated_before_the_first_merge(zoo, tmp_path, capsys):
    f, a = zoo["f32"], zoo["adapters"]
    soup, final = _two_merges(f, a, "soup")
    multi = tmp_path / "multi.yml"
    multi.write_text(f"{soup}\n---\n{final.replace('task_arithmetic', 'task_arithmetc')}\n---\n"
                     f"name: loop_a\nmerge_method: linear\nmodels: [loop_b]\n---\n"
                     f"name: loop_b\nmerge_method: linear\nmodels: [loop_a]\n")
    assert run("merge", multi, "-o", tmp_path / "out") == 1
    assert "read each other in a circle: loop_a -> loop_b -> loop_a" in capsys.readouterr().err
    multi.write_text(f"{soup}\n---\n{final.replace('task_arithmetic', 'task_arithmetc')}\n")
    assert run("merge", multi, "-o", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "multi.yml: 1 of 2 documents cannot be merged: document 2 ('final'): 1 problem: line 11, " \
           "merge_method: unknown mergekit method 'task_arithmetc'" in err
    assert not (tmp_path / "out").exists(), "nothing is merged when a document is invalid"
    multi.write_text(f"{soup}\n---\n{soup}\n")
    assert run("merge", multi, "-o", tmp_path / "out") == 1
    assert "another document is named 'soup'" in capsys.readouterr().err


def test_multi_document_dry_run_describes_every_merge(zoo, tmp_path, capsys):
    f, a = zoo["f32"], zoo["adapters"]
    soup, final = _two_merges(f, a, "soup")
    multi = tmp_path / "multi.yml"
    multi.write_text(f"{soup}\n---\n{final}\n")
    assert run("merge", multi, "-o", tmp_path / "out", "--dry-run") == 0
    described = yaml.safe_load(capsys.readouterr().out)
    assert [d["name"] for d in described] == ["soup", "final"]
    assert described[1]["output"] == str(tmp_path / "out" / "final")
    assert not (tmp_path / "out").exists()
