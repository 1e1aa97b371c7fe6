"""The command line end to end on tiny checkpoints: outputs equal the Python API's, errors are one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import taskarith as ta
from taskarith import cli
from taskarith.cli._vectors import apply_scales
from taskarith.metrics import cosine_matrix, sign_conflict_rate, sparsity


def run(*argv):
    return cli.main([str(a) for a in argv])


def load_model(path):
    return ta.io.load_state_dict(path)


def assert_same(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b), f"names differ: {sorted(a)} vs {sorted(b)}"
    for name in a:
        assert a[name].dtype == b[name].dtype, f"{name}: {a[name].dtype} vs {b[name].dtype}"
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base model as a folder (with config) and a file, and three fine-tuned models as files/folders."""
    root = tmp_path_factory.mktemp("models")
    g = torch.Generator().manual_seed(0)
    base = {
        "embed.weight": torch.randn(12, 8, generator=g),
        "layer.weight": torch.randn(8, 8, generator=g),
        "layer.bias": torch.randn(8, generator=g),
        "norm.num_batches_tracked": torch.tensor(3),
    }
    (root / "base").mkdir()
    save_file(base, root / "base" / "model.safetensors")
    (root / "base" / "config.json").write_text('{"model_type": "toy"}')
    save_file(base, root / "base.safetensors")
    tuned = []
    for i in range(3):
        ft = {n: t + 0.1 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t for n, t in base.items()}
        if i == 2:
            (root / "ft2").mkdir()
            save_file(ft, root / "ft2" / "model.safetensors")
            tuned.append(root / "ft2")
        else:
            save_file(ft, root / f"ft{i}.safetensors")
            tuned.append(root / f"ft{i}.safetensors")
    vectors = []
    for i, ft in enumerate(tuned):
        vectors.append(root / f"tv{i}.safetensors")
        ta.TaskVector.from_models(base, load_model(ft)).save(vectors[-1])
    return root, base, tuned, vectors


def write(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# ------------------------------------------------------------- extract / apply


def test_extract_from_folder_and_file(models, tmp_path):
    root, base, tuned, _ = models
    for i, b in enumerate([root / "base", root / "base.safetensors"]):
        out = tmp_path / f"v{i}.safetensors"
        assert run("extract", b, tuned[2], "-o", out) == 0
        assert ta.TaskVector.load(out).equal(ta.TaskVector.from_models(base, load_model(tuned[2])))
    assert run("extract", root / "base", tuned[0], "-o", tmp_path / "h.safetensors", "--dtype", "bfloat16") == 0
    assert ta.TaskVector.load(tmp_path / "h.safetensors").dtype == torch.bfloat16


def test_apply_scales_to_file_and_folder(models, tmp_path):
    root, base, _, vectors = models
    tv = [ta.TaskVector.load(v) for v in vectors]
    expected = ta.TaskVector.sum(tv[:2], [0.3, 0.5]).apply_to(base)
    assert run("apply", root / "base", f"{vectors[0]}:0.3", vectors[1], "--scale", "0.5", "-o", tmp_path / "m.safetensors") == 0
    assert_same(load_file(tmp_path / "m.safetensors"), expected)
    assert run("apply", root / "base", vectors[0], vectors[1], "--scale", "0.3", "--scale", "0.5", "-o", tmp_path / "m") == 0
    assert_same(load_model(tmp_path / "m"), expected)
    assert (tmp_path / "m" / "config.json").read_text() == '{"model_type": "toy"}'
    assert run("apply", root / "base", vectors[0], "-o", tmp_path / "one.safetensors", "--dtype", "float64") == 0
    out = load_file(tmp_path / "one.safetensors")
    assert out["layer.weight"].dtype == torch.float64 and out["norm.num_batches_tracked"].dtype == torch.int64


def test_apply_scale_forms():
    assert apply_scales(["a:0.3", "b"], None) == [("a", 0.3), ("b", 1.0)]
    assert apply_scales(["a", "b:-1"], [2.0]) == [("a", 2.0), ("b", -1.0)]
    with pytest.raises(ta.TaskArithError, match="one per vector"):
        apply_scales(["a", "b", "c"], [1.0, 2.0])
    with pytest.raises(ta.TaskArithError, match="one form"):
        apply_scales(["a:1", "b"], [1.0, 2.0])


# ------------------------------------------------------------------- merge


def test_native_config_equals_merge_files_and_in_memory(models, tmp_path):
    root, _, tuned, _ = models
    config = write(tmp_path / "merge.yaml", f"""
        method: ties
        base: {root / 'base'}
        models:
          - {tuned[0]}
          - model: {tuned[1]}
            weight: 0.5
          - {{model: {tuned[2]}, weight: 2}}
        options: {{density: 0.4, scope: tensor}}
        dtype: float32
    """)
    assert run("merge", config, "-o", tmp_path / "out", "--max-memory", "4KB", "--shard-size", "300") == 0
    expected = ta.merge_files(root / "base", tuned, tmp_path / "ref", "ties", weights=[1, 0.5, 2], density=0.4,
                              scope="tensor", dtype=torch.float32)
    assert_same(load_model(tmp_path / "out"), load_model(expected))
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # sharded
    assert run("merge", config, "-o", tmp_path / "mem", "--device", "cpu") == 0
    assert_same(load_model(tmp_path / "mem"), load_model(expected))
    assert run("merge", config, "-o", tmp_path / "one.safetensors") == 0
    assert_same(load_file(tmp_path / "one.safetensors"), load_model(expected))


def test_native_config_with_vectors(models, tmp_path):
    root, base, _, vectors = models
    tv = [ta.TaskVector.load(v) for v in vectors]
    config = write(tmp_path / "v.json", json.dumps(
        {"method": "dare", "vectors": [str(v) for v in vectors], "options": {"drop": 0.5}}))
    assert run("merge", config, "-o", tmp_path / "v.safetensors", "--seed", "4") == 0
    expected = ta.merge(tv, "dare", drop=0.5, seed=4)
    assert ta.TaskVector.load(tmp_path / "v.safetensors").allclose(expected, rtol=0, atol=0)
    assert run("merge", config, "-o", tmp_path / "v2.safetensors", "--seed", "4", "--device", "cpu") == 0
    assert ta.TaskVector.load(tmp_path / "v2.safetensors").equal(ta.TaskVector.load(tmp_path / "v.safetensors"))
    with_base = write(tmp_path / "b.yaml", f"""
        method: task_arithmetic
        base: {root / 'base'}
        vectors: [{vectors[0]}, {{vector: {vectors[1]}, weight: -1}}]
        options: {{scale: 0.5}}
    """)
    assert run("merge", with_base, "-o", tmp_path / "bm") == 0
    assert_same(load_model(tmp_path / "bm"), ta.merge(tv[:2], "task_arithmetic", weights=[1, -1], scale=0.5).apply_to(base))


MERGEKIT = {
    "ties": ("""
        models:
          - model: {base}
          - model: {ft0}
            parameters: {{weight: 0.7, density: 0.5}}
          - model: {ft1}
            parameters: {{weight: 0.7, density: 0.5}}
        merge_method: ties
        base_model: {base}
        parameters:
          normalize: true
          int8_mask: true
        dtype: float32
    """, "ties", None, {"density": 0.5, "scope": "tensor"}),
    "dare_ties": ("""
        models:
          - model: {ft0}
          - model: {ft1}
        merge_method: dare_ties
        base_model: {base}
        parameters: {{weight: 1.0, density: 0.6, normalize: true, lambda: 0.9}}
        seed: 11
    """, "dare_ties", None, {"drop": 0.4, "seed": 11, "scale": 0.9}),
    "task_arithmetic": ("""
        models:
          - model: {ft0}
            parameters: {{weight: 0.3}}
          - model: {ft1}
            parameters: {{weight: -0.6}}
        merge_method: task_arithmetic
        base_model: {base}
        parameters: {{lambda: 2.0}}
    """, "task_arithmetic", [0.3, -0.6], {"scale": 2.0}),
    "task_arithmetic_normalized": ("""
        models:
          - model: {ft0}
            parameters: {{weight: 1.0}}
          - model: {ft1}
            parameters: {{weight: 3.0}}
        merge_method: task_arithmetic
        base_model: {base}
        parameters: {{normalize: true}}
    """, "task_arithmetic", [0.25, 0.75], {}),
}


@pytest.mark.parametrize("case", list(MERGEKIT))
def test_mergekit_config_equals_api(models, tmp_path, case):
    root, base, tuned, _ = models
    text, method, weights, options = MERGEKIT[case]
    config = write(tmp_path / "mk.yml", text.format(base=root / "base", ft0=tuned[0], ft1=tuned[1]))
    assert run("merge", config, "-o", tmp_path / "out", "--semantics", "taskarith") == 0
    vectors = [ta.TaskVector.from_models(base, load_model(t)) for t in tuned[:2]]
    assert_same(load_model(tmp_path / "out"), ta.merge(vectors, method, weights=weights, **options).apply_to(base))


def test_dry_run_prints_the_resolved_merge(models, tmp_path, capsys):
    root, _, tuned, _ = models
    text = MERGEKIT["dare_ties"][0].format(base=root / "base", ft0=tuned[0], ft1=tuned[1])
    assert run("merge", write(tmp_path / "mk.yml", text), "-o", tmp_path / "x", "--dry-run", "--seed", "5",
               "--semantics", "taskarith") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"] == "dare_ties" and plan["dialect"] == "mergekit" and plan["weights"] is None
    assert plan["options"] == {"drop": pytest.approx(0.4), "seed": 5, "sign": "sum", "scale": 0.9}
    assert not (tmp_path / "x").exists()


def error_of(capsys, *argv):
    code = run(*argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("taskarith: error: ") and err.count("\n") == 1, err
    return err


def test_config_errors_name_every_line_and_key(models, tmp_path, capsys):
    root, _, tuned, _ = models
    config = write(tmp_path / "bad.yaml", f"""
        method: tie
        base: {root / 'base'}
        models:
          - {tuned[0]}
          - model: {root / 'missing'}
            weight: heavy
          - model: {tuned[1]}
            weight: 1e-3
        options: {{density: 2}}
        colour: blue
    """)
    err = error_of(capsys, "merge", config, "-o", tmp_path / "out")
    assert "bad.yaml: 5 problems" in err
    assert "line 1, method: unknown merge method 'tie'" in err and "ties" in err
    assert "line 5, models[1].model: no such file" in err
    assert "line 6, models[1].weight: expected a finite number, got 'heavy'" in err
    assert "line 8, models[2].weight" in err and "1.0e-3" in err
    assert "line 10, colour: unknown key 'colour'" in err
    assert not (tmp_path / "out").exists()


def test_option_errors_point_at_options(models, tmp_path, capsys):
    root, _, tuned, _ = models
    config = write(tmp_path / "opt.yaml", f"""
        method: ties
        base: {root / 'base'}
        models: [{tuned[0]}, {tuned[1]}]
        options:
          density: 2
          scope: row
    """)
    err = error_of(capsys, "merge", config, "-o", tmp_path / "out")
    assert "line 4, options" in err and "density=2 is invalid" in err and "scope='row' is invalid" in err


MERGEKIT_REFUSED = [
    ("merge_method: ties\nparameters: {normalize: false}", "line 2, parameters.normalize", "sums the agreeing"),
    ("merge_method: ties\nparameters: {normalize: true}", "line 2, parameters.normalize", "weighted mean"),
    ("merge_method: slerp", "line 1, merge_method", "no exact translation"),
    ("merge_method: ties\nslices: []", "line 2, slices", "slices"),
    ("merge_method: dare_ties\nparameters: {normalize: true, rescale: false}", "line 2, parameters.rescale", "1/density"),
    ("merge_method: dare_ties\nparameters: {normalize: true}", "line 1, merge_method", "seed"),
]


@pytest.mark.parametrize("head,key,phrase", MERGEKIT_REFUSED)
def test_mergekit_features_without_exact_equivalent_are_refused_with_taskarith_semantics(models, tmp_path, capsys, head, key, phrase):
    root, _, tuned, _ = models
    text = head + f"\nbase_model: {root / 'base'}\nmodels:\n  - model: {tuned[0]}\n    parameters: {{weight: 0.5}}\n" \
                  f"  - model: {tuned[1]}\n    parameters: {{weight: 1.0}}\n"
    if "normalize: true" in head and "dare" in head:
        text = text.replace("0.5}", "1.0}")
    err = error_of(capsys, "merge", write(tmp_path / "mk.yaml", text), "-o", tmp_path / "out", "--semantics", "taskarith")
    assert f"{key}: " in err and phrase in err, err


def test_mergekit_per_model_features_are_refused_with_taskarith_semantics(models, tmp_path, capsys):
    root, _, tuned, _ = models
    config = write(tmp_path / "mk.yaml", f"""
        merge_method: ties
        base_model: {root / 'base'}
        models:
          - model: {tuned[0]}
            parameters:
              weight: [0.1, 0.5, 1.0]
              density: 0.5
          - model: {tuned[1]}
            parameters: {{weight: 0.5, density: 0.7, gamma: 0.1}}
          - model: org/some-model
            parameters: {{weight: 0.5}}
    """)
    err = error_of(capsys, "merge", config, "-o", tmp_path / "out", "--semantics", "taskarith")
    assert "line 6, models[0].parameters.weight: per-layer gradients" in err
    assert "line 9, models[1].parameters.gamma: unknown key" in err
    assert ("line 10, models[2].model: 'org/some-model' is not a local path, and the model is not in the Hugging "
            "Face cache") in err


# ------------------------------------------------------------------ inspect


def test_inspect_json_and_table(models, capsys):
    _, _, _, vectors = models
    assert run("inspect", *vectors, "--json", "--density", "0.5") == 0
    report = json.loads(capsys.readouterr().out)
    tv = [ta.TaskVector.load(v) for v in vectors]
    assert [d["entries"] for d in report["vectors"]] == [v.numel() for v in tv]
    assert report["vectors"][0]["dtypes"] == {"float32": tv[0].numel()}
    assert report["vectors"][1]["norm"] == pytest.approx(tv[1].norm())
    assert report["vectors"][1]["sparsity"] == sparsity(tv[1])
    assert report["cosine"] == cosine_matrix(tv).tolist()
    assert report["sign_conflict_rate"] == sign_conflict_rate(tv)
    assert report["sign_conflict_rate_at_density"] == sign_conflict_rate(tv, density=0.5)
    assert run("inspect", *vectors) == 0
    table = capsys.readouterr().out
    assert "cosine similarity" in table and "sign conflict rate" in table and str(vectors[2]) in table
    assert run("inspect", vectors[0]) == 0
    assert "cosine" not in capsys.readouterr().out


# ------------------------------------------------------- exit codes, help


def test_exit_codes_and_one_line_errors(models, tmp_path, capsys):
    _, _, _, vectors = models
    assert run("inspect", tmp_path / "nope.safetensors") == 1
    assert capsys.readouterr().err == f"taskarith: error: no such vector file(s): '{tmp_path / 'nope.safetensors'}'\n"
    assert run("apply", "base") == 2  # missing VECTOR and -o: usage error
    assert "usage: taskarith apply" in capsys.readouterr().err
    assert run("extract", "a", "b", "-o", "v.pt") == 2
    assert run("frobnicate") == 2
    assert run("merge", "c.yaml", "-o", "x", "--device", "cpu", "--max-memory", "1GB") == 2
    assert run("inspect", vectors[0], "--density", "3") == 2
    capsys.readouterr()
    with pytest.raises(ta.TaskArithError):
        run("--debug", "inspect", tmp_path / "nope.safetensors")
    with pytest.raises(ta.TaskArithError):
        run("inspect", tmp_path / "nope.safetensors", "--debug")


@pytest.mark.parametrize("command", [[], ["extract"], ["apply"], ["merge"], ["inspect"]])
def test_help_everywhere(command, capsys):
    assert run(*command, "--help") == 0
    assert "usage: taskarith" in capsys.readouterr().out


def test_python_dash_m(tmp_path):
    done = subprocess.run([sys.executable, "-m", "taskarith", "inspect", str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1 and done.stderr.startswith("taskarith: error: no such vector file")
    assert "Traceback" not in done.stderr
