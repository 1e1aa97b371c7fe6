"""The output policy: no user file is lost, through the API or the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import taskarith as ta
from taskarith import cli, hf


def run(*argv):
    return cli.main([str(a) for a in argv])


def snapshot(folder):
    """Every file below ``folder`` with its bytes, to prove nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def models(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text('{"model_type": "toy", "torch_dtype": "float32"}')
    fts = []
    for i in range(2):
        save_file({n: t + 0.1 * (i + 1) for n, t in base.items()}, tmp_path / f"ft{i}.safetensors")
        fts.append(tmp_path / f"ft{i}.safetensors")
    vectors = []
    for i, ft in enumerate(fts):
        ta.TaskVector.from_models(tmp_path / "base", ft).save(tmp_path / f"v{i}.safetensors")
        vectors.append(tmp_path / f"v{i}.safetensors")
    config = tmp_path / "merge.yaml"
    config.write_text(f"method: task_arithmetic\nbase: {tmp_path / 'base'}\nmodels: [{fts[0]}, {fts[1]}]\n")
    return tmp_path, fts, vectors, config


def test_an_unrelated_folder_is_never_replaced(models, capsys):
    root, fts, _, config = models
    docs = root / "mydocs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("four years of work")
    before = snapshot(docs)
    with pytest.raises(ta.TaskArithError, match="not written by taskarith"):
        ta.merge_files(root / "base", fts, docs, "task_arithmetic")
    with pytest.raises(ta.TaskArithError, match="overwrite=True"):
        hf.save_model({"w": torch.ones(2)}, docs)
    assert run("merge", config, "-o", docs) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err
    assert snapshot(docs) == before
    assert run("merge", config, "-o", docs, "--overwrite") == 0  # the user said so
    assert not (docs / "thesis.txt").exists() and (docs / "model.safetensors").is_file()


def test_a_previous_output_is_replaced_without_asking(models):
    root, fts, _, config = models
    assert run("merge", config, "-o", root / "merged") == 0
    assert (root / "merged" / ta.io.MARKER).is_file()
    assert run("merge", config, "-o", root / "merged") == 0
    ta.merge_files(root / "base", fts, root / "merged", "ties", density=0.5)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temporaries left
    empty = root / "empty"
    empty.mkdir()
    ta.merge_files(root / "base", fts, empty, "task_arithmetic")  # an empty folder holds nothing to lose


def test_a_previous_output_holding_a_file_the_user_added_is_not_replaced_silently(models, capsys):
    root, fts, _, config = models
    assert run("merge", config, "-o", root / "merged") == 0
    (root / "merged" / "notes.txt").write_text("my evaluation results")
    assert run("merge", config, "-o", root / "merged") == 1
    assert "'notes.txt'" in capsys.readouterr().err
    with pytest.raises(ta.TaskArithError, match="'notes.txt', which taskarith did not write"):
        hf.save_model({"w": torch.ones(2)}, root / "merged")
    assert (root / "merged" / "notes.txt").read_text() == "my evaluation results"
    assert run("merge", config, "-o", root / "merged", "--overwrite") == 0
    assert not (root / "merged" / "notes.txt").exists()


def test_a_file_is_never_turned_into_a_folder(models, capsys):
    root, fts, _, config = models
    (root / "results.txt").write_text("numbers")
    for overwrite in (False, True):
        with pytest.raises(ta.TaskArithError, match="is an existing file"):
            ta.merge_files(root / "base", fts, root / "results.txt", "task_arithmetic", overwrite=overwrite)
    assert run("merge", config, "-o", root / "results.txt", "--overwrite") == 1
    assert (root / "results.txt").read_text() == "numbers"
    (root / "folder.safetensors").mkdir()
    with pytest.raises(ta.TaskArithError, match="is an existing folder"):
        ta.TaskVector({"w": torch.ones(2)}).save(root / "folder.safetensors", overwrite=True)


@pytest.mark.parametrize("target", ["base", "base/inner", "ft0", "v0", "config", "root"])
def test_an_output_on_an_input_is_refused_before_any_work(models, target, capsys):
    root, fts, vectors, config = models
    out = {"base": root / "base", "base/inner": root / "base" / "inner", "ft0": fts[0], "v0": vectors[0],
           "config": config, "root": root}[target]
    before = snapshot(root)
    # Each command whose inputs include ``out`` refuses it, even with --overwrite, naming the relation.
    if target != "v0":
        assert run("merge", config, "-o", out, "--overwrite") == 1
    if target in ("base", "base/inner", "v0", "root"):
        assert run("apply", root / "base", vectors[0], vectors[1], "-o", out, "--overwrite") == 1
    if target in ("base", "base/inner", "ft0", "root"):
        code = run("extract", root / "base", fts[0], "-o", out, "--overwrite")
        assert code == (1 if out.suffix == ".safetensors" else 2)  # 2: extract writes .safetensors files only
    if target in ("v0", "root"):
        vector_config = root / "vectors.yaml"
        vector_config.write_text(f"method: mean\nvectors: [{vectors[0]}, {vectors[1]}]\n")
        assert run("merge", vector_config, "-o", out, "--overwrite") == 1
        vector_config.unlink()
        with pytest.raises(ta.TaskArithError, match="the input"):
            ta.merge_files(None, vectors, out, "mean", overwrite=True)
    errors = capsys.readouterr().err
    assert any(word in errors for word in ("is the input", "contains the input", "lies inside the input")), errors
    if target not in ("v0", "config"):
        with pytest.raises(ta.TaskArithError, match="the input"):
            ta.merge_files(root / "base", fts, out, "task_arithmetic", overwrite=True)
    assert snapshot(root) == before


def test_apply_onto_its_own_vector_file_is_refused(models, capsys):
    root, _, vectors, _ = models
    before = vectors[0].read_bytes()
    assert run("apply", root / "base", vectors[0], "-o", vectors[0], "--overwrite") == 1
    assert "is the input" in capsys.readouterr().err
    assert vectors[0].read_bytes() == before


def test_a_symlinked_output_naming_an_input_is_refused(models):
    root, fts, _, _ = models
    os.symlink(root / "base", root / "alias")
    with pytest.raises(ta.TaskArithError, match="is the input"):
        ta.merge_files(root / "base", fts, root / "alias", "task_arithmetic", overwrite=True)


def test_saving_a_vector_over_a_file_taskarith_did_not_write_needs_overwrite(tmp_path):
    path = tmp_path / "notes.safetensors"
    save_file({"x": torch.ones(1)}, path)
    tv = ta.TaskVector({"w": torch.ones(2)})
    with pytest.raises(ta.TaskArithError, match="overwrite=True"):
        tv.save(path)
    assert ta.io.load_state_dict(path).keys() == {"x"}
    tv.save(path, overwrite=True)
    tv.save(path)  # now it is taskarith's own file
    assert ta.load(path).equal(tv)


def test_extract_onto_an_existing_file_needs_overwrite(models, capsys):
    root, fts, _, _ = models
    (root / "keep.safetensors").write_bytes(b"precious")
    assert run("extract", root / "base", fts[0], "-o", root / "keep.safetensors") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (root / "keep.safetensors").read_bytes() == b"precious"
    assert run("extract", root / "base", fts[0], "-o", root / "keep.safetensors", "--overwrite") == 0


def test_reserved_names_and_oversized_metadata_are_refused_before_writing(tmp_path):
    ta.TaskVector({"w": torch.ones(2)}).save(tmp_path / "v.safetensors")
    before = (tmp_path / "v.safetensors").read_bytes()
    with pytest.raises(ta.TaskArithError, match="reserved by the format"):
        ta.TaskVector({"__metadata__": torch.ones(2)}).save(tmp_path / "v.safetensors")
    with pytest.raises(ta.TaskArithError, match="over the format's limit"):
        ta.TaskVector({"w": torch.ones(2)}).save(tmp_path / "v.safetensors", metadata={"big": "x" * 100_000_001})
    with pytest.raises(ta.TaskArithError, match="reserved by the format"):
        hf.save_model({"__metadata__": torch.ones(2)}, tmp_path / "model")
    assert (tmp_path / "v.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    """A merge killed with SIGKILL leaves its temporary folder; the next write to that output removes
    it, and a previous output moved aside is restored. A running process's temporary is kept."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.taskarith-tmp-{pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(bytes(1000))
    moved = tmp_path / f".out.taskarith-tmp-{pid}-def.old"
    moved.mkdir()
    (moved / ta.io.MARKER).write_text("")
    (moved / "model.safetensors").write_bytes(b"previous")
    live = tmp_path / f".out.taskarith-tmp-{os.getppid()}-ghi"
    live.mkdir()
    ta.io.remove_stale(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"previous"


def test_sigterm_cleans_up_like_ctrl_c(models):
    root, _, _, config = models
    script = textwrap.dedent(f"""
        import os, signal, sys
        from taskarith import cli
        from taskarith.io import _writer
        real = _writer._write_tensor
        def write_then_terminate(writer, tensor):
            real(writer, tensor)
            os.kill(os.getpid(), signal.SIGTERM)
        _writer._write_tensor = write_then_terminate
        sys.exit(cli.main(["merge", {str(config)!r}, "-o", {str(root / "merged")!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 143, proc.stderr
    assert "terminated" in proc.stderr
    assert sorted(p.name for p in root.iterdir() if "merged" in p.name) == []


# ------------------------------------------------------------------ the writer's conventions


def test_model_folders_follow_hugging_face_conventions(tmp_path):
    like = tmp_path / "like"
    (like / "sub").mkdir(parents=True)
    state = {f"layer{i}.weight": torch.randn(32, 32) for i in range(4)}
    save_file(state, like / "model.safetensors")
    (like / "config.json").write_text(json.dumps({"torch_dtype": "float32", "text_config": {"dtype": "float32"}}))
    (like / "tokenizer.json").write_text("{}")
    (like / "sub" / "preprocessor.json").write_text("{}")
    for stale in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "pytorch_model.bin.index.json"):
        (like / stale).write_bytes(b"old weights")
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", like / "linked.txt")
    os.symlink(like / "tokenizer.json", like / "tokenizer_link.json")
    old_mask = os.umask(0o027)
    try:
        with pytest.warns(UserWarning, match="symlink leading out"):
            out = hf.save_model({n: t.bfloat16() for n, t in state.items()}, tmp_path / "out", like=like,
                                shard_size="3KB")
    finally:
        os.umask(old_mask)
    names = sorted(p.name for p in out.iterdir())
    assert names == [".taskarith-output", "config.json", "model-00001-of-00004.safetensors",
                     "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors",
                     "model-00004-of-00004.safetensors", "model.safetensors.index.json", "sub", "tokenizer.json",
                     "tokenizer_link.json"]
    assert not (out / "tokenizer_link.json").is_symlink()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in state.values())
    config = json.loads((out / "config.json").read_text())
    assert config == {"torch_dtype": "bfloat16", "text_config": {"dtype": "bfloat16"}}
    for file in out.glob("*.safetensors"):
        assert file.stat().st_mode & 0o777 == 0o640, file
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata()["format"] == "pt"
    assert out.stat().st_mode & 0o777 == 0o750
    assert (out / "sub" / "preprocessor.json").is_file()


def test_sizes_are_decimal_like_hugging_face():
    assert ta.io.parse_bytes("5GB") == 5 * 10**9 and ta.io.parse_bytes("2MiB") == 2 * 2**20
    for bad in ("0", "-1GB", "lots", "1e400GB", True):
        with pytest.raises(ta.TaskArithError):
            ta.io.parse_bytes(bad)


def test_command_line_errors_name_flags_not_python_keywords(models, capsys):
    root, _, _, _ = models
    ta.TaskVector({"w": torch.ones(6, 4)}).save(root / "partial.safetensors")
    assert run("apply", root / "base", root / "partial.safetensors", "-o", root / "edited") == 1
    err = capsys.readouterr().err
    assert "--partial" in err and "strict=False" not in err
    assert run("apply", root / "base", root / "partial.safetensors", "-o", root / "edited", "--partial",
               "--shard-size", "0") == 1
    err = capsys.readouterr().err
    assert "--shard-size" in err and "shard_size" not in err


def test_a_hugging_face_cache_snapshot_is_a_valid_like_folder(tmp_path):
    """Hub snapshots link every file into the repository's blobs: those links are followed (copied as
    files, no warning), and the weights read through them."""
    import warnings

    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({"w": torch.ones(3, 2)}, repo / "blobs" / "weights")
    (repo / "blobs" / "config").write_text('{"torch_dtype": "float32"}')
    os.symlink("../../blobs/weights", snapshot / "model.safetensors")
    os.symlink("../../blobs/config", snapshot / "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = hf.save_model({"w": torch.zeros(3, 2, dtype=torch.bfloat16)}, tmp_path / "out", like=snapshot)
    assert (out / "config.json").is_file() and not (out / "config.json").is_symlink()
    assert json.loads((out / "config.json").read_text()) == {"torch_dtype": "bfloat16"}  # the copy, not the blob
    assert (repo / "blobs" / "config").read_text() == '{"torch_dtype": "float32"}'
