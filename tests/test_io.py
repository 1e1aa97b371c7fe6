"""Saving and loading: exact round trips, metadata, atomic writes, model sources."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file, save_file
from strategies import model_pairs, vectors

import taskarith as ta


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pair=model_pairs())
def test_save_load_round_trip_is_bit_exact_with_metadata(tmp_path, pair):
    tv = ta.TaskVector.from_models(*pair)
    path = tmp_path / "tv.safetensors"
    tv.save(path, metadata={"task": "mnist-3", "λ": "0.4"})
    back = ta.TaskVector.load(path)
    assert list(back) == list(tv)
    for name in tv:
        assert back[name].dtype == tv[name].dtype and back[name].shape == tv[name].shape, name
        assert torch.equal(back[name].view(-1).view(torch.uint8), tv[name].view(-1).view(torch.uint8)), name
    assert back.metadata == {"task": "mnist-3", "λ": "0.4"}
    assert back.skipped == tv.skipped
    assert back.base_fingerprint == tv.base_fingerprint
    assert back.aliases == tv.aliases


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vs=vectors(n=1))
def test_saved_files_are_plain_safetensors(tmp_path, vs):
    (tv,) = vs
    path = tmp_path / "tv.safetensors"
    tv.save(path)
    plain = load_file(path)
    assert set(plain) == set(tv._layout.slots)
    assert all(torch.equal(plain[n], tv[n]) for n in plain)


def test_tied_names_survive_a_save_load_round_trip(tmp_path):
    w = torch.randn(4, 3)
    tv = ta.TaskVector({"embed.weight": w, "head.weight": w, "bias": torch.zeros(3)})
    tv.save(tmp_path / "tv.safetensors")
    back = ta.load(tmp_path / "tv.safetensors")
    assert back.aliases == {"head.weight": "embed.weight"}
    assert list(back) == ["embed.weight", "head.weight", "bias"]
    assert torch.equal(back["head.weight"], w)


def test_interrupted_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "tv.safetensors"
    old = ta.TaskVector({"w": torch.ones(1000)})
    old.save(path)
    before = path.read_bytes()
    # A process killed (SIGKILL, no cleanup) in the middle of writing a new vector to the same path.
    script = textwrap.dedent(f"""
        import os, signal, torch, taskarith as ta, taskarith.io as tio
        real = tio._writer._write_tensor
        def dying(f, t):
            real(f, t)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        tio._writer._write_tensor = dying
        ta.TaskVector({{"w": torch.zeros(1000), "v": torch.zeros(1000)}}).save({str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert ta.load(path).equal(old)
    # The killed process left its temporary file; the next write to the same output removes it.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tv.safetensors.taskarith-tmp-")]
    old.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv.safetensors"]


def test_failed_save_removes_its_temporary_file(tmp_path, monkeypatch):
    import taskarith.io as tio

    path = tmp_path / "tv.safetensors"
    ta.TaskVector({"w": torch.ones(3)}).save(path)

    def broken(f, t):
        raise OSError("disk full")

    monkeypatch.setattr(tio._writer, "_write_tensor", broken)
    with pytest.raises(OSError, match="disk full"):
        ta.TaskVector({"w": torch.zeros(3)}).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv.safetensors"]
    assert torch.equal(ta.load(path)["w"], torch.ones(3))


def test_a_write_failing_in_the_background_fails_the_save(tmp_path, monkeypatch):
    """Blocks are written by a background thread: its error (here the third write) reaches the
    caller, and neither the new file nor its temporary file is left."""
    import taskarith.io as tio

    class FailingFile:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                raise OSError("no space left on device")
            return self.f.write(data)

        def flush(self):
            self.f.flush()

        def tell(self):
            return self.f.tell()

        def fileno(self):
            return self.f.fileno()

    real_init = tio._writer._Pipeline.__init__
    monkeypatch.setattr(tio._writer._Pipeline, "__init__", lambda self, f: real_init(self, FailingFile(f)))
    path = tmp_path / "tv.safetensors"
    with pytest.raises(OSError, match="no space left"):
        ta.TaskVector({f"w{i}": torch.full((100,), float(i)) for i in range(5)}).save(path)
    assert list(tmp_path.iterdir()) == []


def test_written_bytes_are_handed_to_writeback_in_order(tmp_path, monkeypatch):
    """Every _WRITEBACK_BYTES, the writer thread starts writing back exactly the bytes since the last
    time (after the header), and the file is whole."""
    import taskarith.io as tio

    ranges = []
    real = tio._writer._libc.start_writeback
    monkeypatch.setattr(tio._writer._libc, "start_writeback", lambda fd, offset, n: (ranges.append((offset, n)), real(fd, offset, n)))
    monkeypatch.setattr(tio._writer, "_WRITEBACK_BYTES", 1000)
    vector = ta.TaskVector({f"w{i}": torch.arange(100 * (i + 1), dtype=torch.float32) for i in range(6)})
    path = tmp_path / "tv.safetensors"
    vector.save(path)
    assert ta.load(path).equal(vector)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert ranges and ranges[0][0] == header
    assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))  # contiguous, in order
    assert all(n >= 1000 for _, n in ranges) and sum(n for _, n in ranges) <= path.stat().st_size - header


def _two_models():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)


def test_models_read_from_files_directories_and_shards(tmp_path):
    pre, post = _two_models()
    expected = ta.TaskVector.from_models(pre, post)
    # single file
    save_file(pre.state_dict(), tmp_path / "pre.safetensors")
    # directory with model.safetensors
    (tmp_path / "post").mkdir()
    save_file(post.state_dict(), tmp_path / "post" / "model.safetensors")
    # sharded directory with an index
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    sd = post.state_dict()
    save_file({"weight": sd["weight"]}, shard_dir / "model-00001-of-00002.safetensors")
    save_file({"bias": sd["bias"]}, shard_dir / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"weight": "model-00001-of-00002.safetensors", "bias": "model-00002-of-00002.safetensors"}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))

    for finetuned in (tmp_path / "post", shard_dir, str(shard_dir)):
        tv = ta.TaskVector.from_models(tmp_path / "pre.safetensors", finetuned)
        assert tv.allclose(expected, rtol=0, atol=0)
    from_file = expected.apply_to(tmp_path / "pre.safetensors")
    from_module = expected.apply_to(pre)
    assert all(torch.equal(from_file[k], from_module[k]) for k in from_module)


def test_pickle_checkpoints_need_explicit_opt_in(tmp_path):
    pre, post = _two_models()
    torch.save(pre.state_dict(), tmp_path / "pre.pt")
    with pytest.raises(ta.TaskArithError, match="allow_pickle=True"):
        ta.TaskVector.from_models(tmp_path / "pre.pt", post)
    tv = ta.TaskVector.from_models(tmp_path / "pre.pt", post, allow_pickle=True)
    assert tv.allclose(ta.TaskVector.from_models(pre, post), rtol=0, atol=0)
    with pytest.raises(ta.TaskArithError, match="allow_pickle=True"):
        tv.apply_to(tmp_path / "pre.pt")
    with pytest.raises(ta.TaskArithError, match="unpickle"):
        ta.load(tmp_path / "pre.pt")


def test_reading_bad_paths_names_the_path(tmp_path):
    with pytest.raises(ta.TaskArithError, match="no such file"):
        ta.io.load_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(ta.TaskArithError, match="neither model.safetensors"):
        ta.io.load_state_dict(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ta.TaskArithError, match="junk.safetensors"):
        ta.load(tmp_path / "junk.safetensors")
    (tmp_path / "w.npy").write_bytes(b"")
    with pytest.raises(ta.TaskArithError, match="unknown weight file type"):
        ta.io.load_state_dict(tmp_path / "w.npy")


def test_reserved_or_non_string_metadata_is_refused_before_writing(tmp_path):
    tv = ta.TaskVector({"w": torch.ones(2)})
    for bad in ({"taskarith.format": "x"}, {"n": 3}):
        with pytest.raises(ta.TaskArithError, match="metadata"):
            tv.save(tmp_path / "tv.safetensors", metadata=bad)
    assert not any(Path(tmp_path).iterdir())


def test_a_newer_format_version_is_refused(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "v9.safetensors", metadata={"taskarith.format_version": "9"})
    with pytest.raises(ta.TaskArithError, match="format 9"):
        ta.load(tmp_path / "v9.safetensors")


def test_a_vector_with_metadata_keeps_its_memory_when_the_original_dies():
    """with_metadata shares the original's buffers: when the original is collected, its buffers must not
    go back to the cache while the new vector still uses them."""
    import gc

    ta.runtime.empty_cache()
    a = ta.TaskVector({"w": torch.ones(1 << 20)}) * 2  # large enough for the buffer cache
    b = a.with_metadata(task="x")
    del a
    gc.collect()
    c = ta.TaskVector({"w": torch.ones(1 << 20)}) * 5  # would reuse a freed buffer of the same size
    assert torch.equal(b["w"], torch.full((1 << 20,), 2.0)) and torch.equal(c["w"], torch.full((1 << 20,), 5.0))
