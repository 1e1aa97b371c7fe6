"""The one checkpoint reader on crafted and damaged files: every path (in-memory loading, out-of-core
merging, vector files) refuses them alike with a TaskArithError naming the file and key."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import taskarith as ta
from taskarith.io import Checkpoint


def raw_file(path, header: dict, data: bytes, *, length: int | None = None) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 8, 16)}

CRAFTED = {
    "negative offsets": ({"a": entry("F32", [2], -8, 0), "b": entry("F32", [2], 8, 16)}, 16, "data_offsets"),
    "overlapping": ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, 16, "overlaps"),
    "gap": ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}, 20, "belong to no tensor"),
    "past the end": (GOOD, 12, "truncated"),
    "trailing bytes": (GOOD, 24, "at the end belong to no tensor"),
    "span differs from shape": ({"a": entry("F32", [3], 0, 8), "b": entry("F32", [2], 8, 16)}, 16, "needs 12"),
    "fp8": ({"a": entry("F8_E4M3", [8], 0, 8), "b": entry("F32", [2], 8, 16)}, 16, "'a' has dtype 'F8_E4M3'"),
    "uint16": ({"a": entry("U16", [4], 0, 8), "b": entry("F32", [2], 8, 16)}, 16, "'U16'"),
    "uint32": ({"a": entry("U32", [2], 0, 8), "b": entry("F32", [2], 8, 16)}, 16, "'U32'"),
    "uint64": ({"a": entry("U64", [1], 0, 8), "b": entry("F32", [2], 8, 16)}, 16, "'U64'"),
    "complex": ({"a": entry("C64", [1], 0, 8), "b": entry("F32", [2], 8, 16)}, 16, "'C64'"),
    "shape not a list": ({"a": entry("F32", 2, 0, 8), "b": entry("F32", [2], 8, 16)}, 16, "shape"),
    "negative dimension": ({"a": entry("F32", [-2], 0, 8), "b": entry("F32", [2], 8, 16)}, 16, "shape"),
    "float offsets": ({"a": entry("F32", [2], 0.0, 8), "b": entry("F32", [2], 8, 16)}, 16, "data_offsets"),
    "missing field": ({"a": {"dtype": "F32", "shape": [2]}, "b": entry("F32", [2], 8, 16)}, 16, "exactly"),
    "entry not an object": ({"a": [1, 2], "b": entry("F32", [2], 8, 16)}, 16, "exactly"),
    "metadata not strings": ({"__metadata__": {"k": 1}, **GOOD}, 16, "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_headers_are_refused_by_every_reader(tmp_path, case):
    header, data_bytes, needle = CRAFTED[case]
    path = tmp_path / "bad.safetensors"
    raw_file(path, header, bytes(data_bytes))
    for read in (Checkpoint, ta.io.load_state_dict, ta.TaskVector.load, ta.load,
                 lambda p: ta.merge_files(None, [p], tmp_path / "out.safetensors", "mean")):
        with pytest.raises(ta.TaskArithError, match="bad.safetensors") as err:
            read(path)
        assert needle in str(err.value), (case, str(err.value))
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("length,data,needle", [
    (2**63, b"{}", "header of"),
    (100_000_001, b"{}" + b" " * 10, "header of"),
    (None, b"not json", "not valid JSON"),
    (None, b"[1, 2]", "not an object"),
    (None, b'{"a": 1, "a": 2}', "given twice"),
    (None, b"\xff\xfe{}", "not valid JSON"),
])
def test_broken_headers_are_refused(tmp_path, length, data, needle):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(data) if length is None else length) + data)
    with pytest.raises(ta.TaskArithError, match=needle):
        ta.io.load_state_dict(path)
    path.write_bytes(b"abc")
    with pytest.raises(ta.TaskArithError, match="too short"):
        ta.io.load_state_dict(path)


def test_all_problems_of_a_file_are_listed_at_once(tmp_path):
    path = tmp_path / "bad.safetensors"
    raw_file(path, {"a": entry("U16", [4], 0, 8), "b": entry("F32", [3], 8, 16)}, bytes(16))
    with pytest.raises(ta.TaskArithError) as err:
        Checkpoint(path)
    assert "'a' has dtype 'U16'" in str(err.value) and "'b' spans 8 bytes" in str(err.value)


def test_a_valid_file_reads_the_same_through_both_paths(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(5, 3, generator=g).bfloat16(), "b": torch.randn(3, generator=g),
             "n": torch.tensor(7), "empty": torch.zeros(0, 4)}
    save_file(state, tmp_path / "m.safetensors")
    loaded = ta.io.load_state_dict(tmp_path / "m.safetensors")
    ckpt = Checkpoint(tmp_path / "m.safetensors")
    assert sorted(loaded) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor) and torch.equal(ckpt.tensor(name), tensor)
        assert loaded[name].dtype == tensor.dtype
    before = (tmp_path / "m.safetensors").read_bytes()
    loaded["b"].add_(1)  # a copy-on-write view: the file and every other view are untouched
    first = ckpt.load("w")
    first.zero_()
    assert torch.equal(ckpt.tensor("b"), state["b"]) and torch.equal(ckpt.tensor("w"), state["w"])
    assert torch.equal(ckpt.load("w"), state["w"])  # a second load does not alias the first
    assert (tmp_path / "m.safetensors").read_bytes() == before


# ------------------------------------------------------------------ sharded folders


def sharded(tmp_path, weight_map: dict, shards: dict[str, dict[str, torch.Tensor]]):
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    for file, tensors in shards.items():
        save_file(tensors, folder / file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_a_valid_sharded_folder_is_read_in_index_order(tmp_path):
    folder = sharded(tmp_path, {"b": "s2.safetensors", "a": "s1.safetensors"},
                     {"s1.safetensors": {"a": torch.ones(2)}, "s2.safetensors": {"b": torch.zeros(3)}})
    assert list(ta.io.load_state_dict(folder)) == ["b", "a"] == Checkpoint(folder).names()


@pytest.mark.parametrize("shard,needle", [
    ("../outside.safetensors", "not a plain file name"),
    ("/etc/passwd", "not a plain file name"),
    ("sub/inner.safetensors", "not a plain file name"),
    ("..", "not a plain file name"),
    ("missing.safetensors", "is missing"),
])
def test_index_entries_must_be_plain_files_in_the_folder(tmp_path, shard, needle):
    save_file({"x": torch.ones(2)}, tmp_path / "outside.safetensors")
    folder = sharded(tmp_path, {"a": "s1.safetensors", "x": shard}, {"s1.safetensors": {"a": torch.ones(2)}})
    for read in (Checkpoint, ta.io.load_state_dict):
        with pytest.raises(ta.TaskArithError, match=needle):
            read(folder)


def test_a_symlink_leading_out_of_the_folder_is_refused(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "elsewhere.safetensors")
    folder = sharded(tmp_path, {"a": "s1.safetensors", "x": "s2.safetensors"}, {"s1.safetensors": {"a": torch.ones(2)}})
    os.symlink(tmp_path / "elsewhere.safetensors", folder / "s2.safetensors")
    with pytest.raises(ta.TaskArithError, match="symlink leading out"):
        ta.io.load_state_dict(folder)


def test_a_hugging_face_cache_snapshot_links_into_its_blobs(tmp_path):
    """The Hub cache stores files in <repo>/blobs and links them from <repo>/snapshots/<revision>."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({"w": torch.arange(4.0)}, repo / "blobs" / "0f3e")
    os.symlink("../../blobs/0f3e", snapshot / "model.safetensors")
    assert torch.equal(ta.io.load_state_dict(snapshot)["w"], torch.arange(4.0))


@pytest.mark.parametrize("case", ["two shards", "not in its shard", "unlisted", "elsewhere"])
def test_shard_contents_must_agree_with_the_index(tmp_path, case):
    a, b = {"a": torch.ones(2)}, {"b": torch.zeros(2)}
    if case == "two shards":  # the same key in two shards: the readers used to disagree on which one wins
        weight_map, shards, needle = {"a": "s1.safetensors", "b": "s2.safetensors"}, \
            {"s1.safetensors": a, "s2.safetensors": {**b, "a": torch.full((2,), 9.0)}}, "stored in two shards"
    elif case == "not in its shard":
        weight_map, shards, needle = {"a": "s1.safetensors", "b": "s1.safetensors"}, \
            {"s1.safetensors": a}, "does not hold: 'b'"
    elif case == "unlisted":
        weight_map, shards, needle = {"a": "s1.safetensors"}, {"s1.safetensors": {**a, **b}}, "in no shard"
    else:
        weight_map, shards, needle = {"a": "s1.safetensors", "b": "s1.safetensors"}, \
            {"s1.safetensors": a, "s2.safetensors": b}, "does not hold"
    folder = sharded(tmp_path, weight_map, shards)
    for read in (Checkpoint, ta.io.load_state_dict,
                 lambda f: ta.merge_files(f, [f], tmp_path / "merged", "task_arithmetic")):
        with pytest.raises(ta.TaskArithError, match=needle):
            read(folder)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("index,needle", [
    ("{", "not a valid shard index"),
    ("[]", "weight_map"),
    ('{"weight_map": ["a"]}', "weight_map"),
    ('{"weight_map": {"a": 3}}', "weight_map"),
    ('{"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}}', "given twice"),
])
def test_broken_indexes_are_refused(tmp_path, index, needle):
    folder = sharded(tmp_path, {}, {"s1.safetensors": {"a": torch.ones(2)}})
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ta.TaskArithError, match=needle):
        ta.io.load_state_dict(folder)


# ------------------------------------------------------------------ vector files


@pytest.mark.parametrize("key,value,needle", [
    ("taskarith.format_version", "2", "format 2"),
    ("taskarith.aliases", "{not json", "taskarith.aliases must be"),
    ("taskarith.aliases", '{"w": "w"}', "map names absent"),
    ("taskarith.aliases", '{"tied": "nowhere"}', "map names absent"),
    ("taskarith.names", '["w", "other"]', "taskarith.names does not list"),
    ("taskarith.names", '"w"', "taskarith.names must be"),
    ("taskarith.skipped", '{"a": 1}', "taskarith.skipped must be"),
])
def test_vector_metadata_is_validated(tmp_path, key, value, needle):
    path = tmp_path / "v.safetensors"
    ta.TaskVector({"w": torch.ones(3)}).save(path)
    tensors, metadata = ta.io.read_safetensors(path)
    save_file(tensors, path, metadata={**metadata, key: value})
    for read in (ta.TaskVector.load, lambda p: ta.merge_files(None, [p, p], tmp_path / "m.safetensors", "mean")):
        with pytest.raises(ta.TaskArithError, match=needle):
            read(path)


def test_bad_paths_and_devices_are_task_arith_errors(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    with pytest.raises(ta.TaskArithError, match="not a int"):
        Checkpoint(5)
    with pytest.raises(ta.TaskArithError, match="is not a device"):
        ta.io.load_state_dict(tmp_path / "m.safetensors", device="nonsense")
    with pytest.raises(ta.TaskArithError, match="is not a device"):
        ta.merge_files(tmp_path / "m.safetensors", [tmp_path / "m.safetensors"], tmp_path / "out", "mean",
                       device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ta.TaskArithError, match="not available on this machine"):
            ta.TaskVector({"w": torch.ones(2)}).to("cuda")


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       st.one_of(st.none(), st.integers(0, 10**6)))
def test_damaged_files_give_a_clear_error_or_readable_tensors(tmp_path_factory, flips, cut):
    """Any damage (bytes changed anywhere in the header or its length, the file cut short) ends in a
    TaskArithError, or in a checkpoint whose every tensor reads: never another exception."""
    path = tmp_path_factory.mktemp("damaged") / "m.safetensors"
    save_file({"a": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "c": torch.tensor([1, 2])}, path,
              metadata={"k": "v"})
    data = bytearray(path.read_bytes())
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    for position, value in flips:
        data[position % header_end] = value
    path.write_bytes(bytes(data if cut is None else data[:cut % (len(data) + 1)]))
    try:
        checkpoint = Checkpoint(path)
    except ta.TaskArithError:
        return
    for name in checkpoint.names():
        assert checkpoint.load(name).shape == checkpoint.shape(name)
        assert checkpoint.tensor(name).dtype == checkpoint.dtype(name)
