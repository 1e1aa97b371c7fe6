"""Out-of-core merging equals in-memory merging; streaming selection is exact; writes are atomic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DEVICES
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import taskarith as ta
from taskarith import io
from taskarith.backends import draws, kernels
from taskarith.outofcore import _driver, _pieces, _select

CASES = [
    ("task_arithmetic", {"scale": 0.7}),
    ("mean", {}),
    ("magnitude_prune", {"density": 0.3}),
    ("magnitude_prune", {"density": 0.3, "scope": "tensor"}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.4, "scope": "tensor", "sign": "count"}),
    ("dare", {"drop": 0.5, "seed": 7}),
    ("dare_ties", {"drop": 0.5, "seed": 7}),
    ("breadcrumbs", {"density": 0.5, "top": 0.1}),
    ("consensus", {"k": 2}),
    ("tsv", {}),
    ("iso_c", {"scale": 0.5}),
]


def write_sharded(directory, state, shards=2):
    """A Hugging Face style sharded checkpoint with an index, plus a config file."""
    directory.mkdir(parents=True)
    names = list(state)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, directory / file)
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text('{"model_type": "toy"}')
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    g = torch.Generator().manual_seed(0)
    base = {
        "embed.weight": torch.randn(40, 16, generator=g),
        "layer.weight": torch.randn(16, 16, generator=g),
        "layer.bias": torch.randn(16, generator=g),
        "norm.running_mean": torch.randn(16, generator=g),
        "norm.num_batches_tracked": torch.tensor(12),
        "scalar": torch.tensor(0.5),
    }
    sources = []
    for i in range(3):
        tuned = {n: t + 0.05 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t + i for n, t in base.items()}
        save_file(tuned, root / f"ft{i}.safetensors")
        sources.append(root / f"ft{i}.safetensors")
    write_sharded(root / "base", base)
    return root, base, sources


def in_memory(base_dir, sources, method, options):
    base = ta.io.load_state_dict(base_dir)
    vectors = [ta.TaskVector.from_models(base, ta.io.load_state_dict(s)) for s in sources]
    return ta.merge(vectors, method, **options).apply_to(base)


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_merge_files_equals_in_memory_merge(checkpoints, tmp_path, method, options):
    root, base, sources = checkpoints
    # A tiny memory budget forces row blocks; a tiny shard size forces several shards.
    out = ta.merge_files(root / "base", sources, tmp_path / "merged", method, max_memory=4096, shard_size=2048, **options)
    got = ta.io.load_state_dict(out)
    want = in_memory(root / "base", sources, method, options)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), f"{method}: {name!r} differs"
    assert torch.equal(got["norm.num_batches_tracked"], base["norm.num_batches_tracked"])
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'
    assert (out / "model.safetensors.index.json").exists()


def test_each_tensor_prefetches_the_next_and_the_bar_follows_the_writes(checkpoints, tmp_path, monkeypatch):
    """While tensor i is merged, every checkpoint is asked to read tensor i + 1 ahead (here: every
    tensor, the threshold lowered; small ones are left to the kernel's readahead); the progress bar
    advances as tensors are written, not when the plan is made."""
    root, _, sources = checkpoints
    monkeypatch.setattr(_driver, "_PREFETCH_FROM", 0)
    asked, events = [], []
    real_prefetch = ta.io.Checkpoint.prefetch

    def recording_prefetch(self, name, limit=None):
        asked.append((self.path, name))
        real_prefetch(self, name, limit)  # the real hint runs too: it must not fail on real files

    class Bar:
        def update(self, n):
            events.append(("bar", n))

        def close(self):
            pass

    real_write = ta.io.Lazy.__init__
    monkeypatch.setattr(ta.io.Checkpoint, "prefetch", recording_prefetch)
    monkeypatch.setattr(_driver, "progress_bar", lambda *a, **k: Bar())
    monkeypatch.setattr(ta.io.Lazy, "__init__", lambda self, *a: (events.append(("plan", None)), real_write(self, *a))[1])
    ta.merge_files(root / "base", sources, tmp_path / "m", "task_arithmetic")
    names = ta.io.Checkpoint(root / "base").names()
    paths = [Path(s) for s in sources] + [root / "base"]
    assert sorted(asked, key=str) == sorted(((p, n) for n in names[1:] for p in paths), key=str)
    assert events.index(("bar", 1)) > max(i for i, e in enumerate(events) if e[0] == "plan"), "bar moved before writing"
    assert events.count(("bar", 1)) == len(names)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method,options", [("ties", {"density": 0.3, "scope": "global"}),
                                            ("ties", {"density": 0.3, "scope": "tensor"}),
                                            ("dare_ties", {"drop": 0.5, "seed": 3})])
def test_merge_files_on_a_device_equals_the_in_memory_merge(checkpoints, tmp_path, device, method, options):
    """device= moves every row block to the device (through pinned memory on CUDA), same bits."""
    root, base, sources = checkpoints
    out = ta.merge_files(root / "base", sources, tmp_path / "merged", method, max_memory=4096, device=device, **options)
    got = ta.io.load_state_dict(out)
    want = in_memory(root / "base", sources, method, options)
    for name, tensor in want.items():
        assert got[name].device.type == "cpu" and torch.equal(got[name], tensor), f"{method} on {device}: {name!r}"


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_merge_files_of_half_precision_task_vector_files_in_row_blocks(tmp_path, scope):
    """bfloat16 vector files merged under a budget that splits their tensors (nothing to fall back on:
    there is no base) equal the in-memory merge."""
    g = torch.Generator().manual_seed(2)
    vectors = []
    for i in range(3):
        v = ta.TaskVector({"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g)}).to(dtype=torch.bfloat16)
        v.save(tmp_path / f"v{i}.safetensors")
        vectors.append(ta.load(tmp_path / f"v{i}.safetensors"))
    files = [tmp_path / f"v{i}.safetensors" for i in range(3)]
    out = ta.merge_files(None, files, tmp_path / "m.safetensors", "ties", density=0.3, scope=scope, max_memory=20000)
    assert ta.load(out).equal(ta.merge(vectors, "ties", density=0.3, scope=scope))


def test_merge_files_of_task_vector_files(tmp_path):
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(6, 3, generator=g)
    vectors = []
    for i in range(3):
        w = torch.randn(6, 3, generator=g)
        v = ta.TaskVector({"emb": w, "head": w, "b": torch.randn(3, generator=g, dtype=torch.float64) + shared[0, 0]})
        v.save(tmp_path / f"v{i}.safetensors")
        vectors.append(ta.load(tmp_path / f"v{i}.safetensors"))
    files = [tmp_path / f"v{i}.safetensors" for i in range(3)]
    out = ta.merge_files(None, files, tmp_path / "merged.safetensors", "ties", density=0.5)
    merged = ta.load(out)
    want = ta.merge(vectors, "ties", density=0.5)
    assert merged.equal(want)
    assert merged.aliases == {"head": "emb"}


@pytest.mark.parametrize("max_memory", [300, 600, "2GB"], ids=["streamed-select", "in-memory-select", "whole"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_at_the_threshold_resolve_as_in_memory(tmp_path, scope, max_memory, monkeypatch):
    # Integer-valued deltas: many equal magnitudes at every threshold. A collect limit of 1
    # forces every radix pass; small budgets cut tensors into row blocks (one row each at 300
    # bytes), whose trims keep the first ties in stream order block after block.
    monkeypatch.setattr(_select, "_COLLECT", 1)
    g = torch.Generator().manual_seed(3)
    base = {f"t{i}": torch.zeros(5, 7) for i in range(4)}
    save_file(base, tmp_path / "base.safetensors")
    sources = []
    for j in range(2):
        tuned = {n: torch.randint(-3, 4, (5, 7), generator=g).float() for n in base}
        save_file(tuned, tmp_path / f"ft{j}.safetensors")
        sources.append(tmp_path / f"ft{j}.safetensors")
    out = ta.merge_files(tmp_path / "base.safetensors", sources, tmp_path / "m", "magnitude_prune", density=0.37,
                         scope=scope, max_memory=max_memory)
    got = ta.io.load_state_dict(out)
    want = in_memory(tmp_path / "base.safetensors", sources, "magnitude_prune", {"density": 0.37, "scope": scope})
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("max_memory", [200, 2000, "2GB"], ids=["streamed-select", "in-memory-select", "whole"])
def test_global_ties_resolve_as_in_memory_whatever_order_the_files_hold(tmp_path, max_memory, monkeypatch):
    # bfloat16 weights, deltas of a few steps of their grid: many equal magnitudes at the threshold.
    # The state dicts list the tensors in one order, the sharded base folder in the reverse one,
    # and safetensors writes the fine-tuned files sorted by name.
    g = torch.Generator().manual_seed(5)
    shapes = {"z.weight": (6, 5), "m.bias": (7,), "a.weight": (4, 6), "k": (3, 3)}
    base = {n: torch.randn(s, generator=g).bfloat16() for n, s in shapes.items()}
    tuned = [{n: (b.float() + 0.01 * torch.randint(-2, 3, b.shape, generator=g)).bfloat16() for n, b in base.items()}
             for _ in range(3)]
    ta.io.write_model(tmp_path / "base", list(base.items())[::-1], shard_bytes=100)
    sources = []
    for j, t in enumerate(tuned):
        save_file(t, tmp_path / f"ft{j}.safetensors")
        sources.append(tmp_path / f"ft{j}.safetensors")
    monkeypatch.setattr(_select, "_COLLECT", 1)  # every radix pass
    out = ta.merge_files(tmp_path / "base", sources, tmp_path / "m", "ties", density=0.3, scope="global",
                         max_memory=max_memory)
    got = ta.io.load_state_dict(out)
    vectors = [ta.TaskVector.from_models(base, t) for t in tuned]
    want = ta.merge(vectors, "ties", density=0.3, scope="global").apply_to(base)
    assert all(torch.equal(got[n], want[n]) for n in base)


@given(values=st.lists(st.floats(0, 1e6, allow_nan=False, width=32), min_size=1, max_size=200),
       fraction=st.floats(0.0, 1.0), pieces=st.integers(1, 5), collect=st.sampled_from([1, 7, 1 << 22]),
       wide=st.booleans())
def test_streaming_threshold_is_the_exact_kth_largest(values, fraction, pieces, collect, wide):
    data = torch.tensor(values, dtype=torch.float32)
    k = max(1, math.ceil(fraction * len(values)))
    chunks = lambda: iter(data.tensor_split(pieces))
    old = _select._COLLECT
    _select._COLLECT = collect
    try:
        threshold, above, tied = _select.stream_threshold(chunks, k, wide=wide)
    finally:
        _select._COLLECT = old
    assert threshold == kernels.kth_largest(data, k).item()
    assert above == int((data > threshold).sum())
    assert tied == int((data == threshold).sum())


def test_a_failed_merge_leaves_no_output_and_keeps_the_previous_one(checkpoints, tmp_path):
    root, _, sources = checkpoints
    out = ta.merge_files(root / "base", sources, tmp_path / "merged", "task_arithmetic")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def explode(block):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return block.deltas[0]

    ta.register("explode_demo", explode, paper="n/a", split="elementwise")
    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            ta.merge_files(root / "base", sources, tmp_path / "merged", "explode_demo")
    finally:
        ta.merging.unregister("explode_demo")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_bad_inputs_are_refused_before_any_work(checkpoints, tmp_path):
    root, base, sources = checkpoints
    odd = dict(base)
    odd["layer.weight"] = torch.zeros(3, 3)
    del odd["scalar"]
    save_file(odd, tmp_path / "odd.safetensors")
    with pytest.raises(ta.KeyMismatchError, match="'scalar'"):
        ta.merge_files(root / "base", [sources[0], tmp_path / "odd.safetensors"], tmp_path / "m", "ties")
    with pytest.raises(ta.TaskArithError, match="valid: arcee_fusion, breadcrumbs"):
        ta.merge_files(root / "base", sources, tmp_path / "m", "tie")
    with pytest.raises(ta.TaskArithError, match="density=2"):
        ta.merge_files(root / "base", sources, tmp_path / "m", "ties", density=2)
    with pytest.raises(ta.TaskArithError, match="as a size"):
        ta.merge_files(root / "base", sources, tmp_path / "m", "ties", max_memory="lots")
    nan = {n: t.clone() for n, t in base.items()}
    nan["layer.bias"][3] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors")
    with pytest.raises(ta.TaskArithError, match="NaN"):
        ta.merge_files(root / "base", [sources[0], tmp_path / "nan.safetensors"], tmp_path / "m", "ties", density=0.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ta.TaskArithError, match="neither"):
        ta.merge_files(tmp_path / "empty", sources, tmp_path / "m", "ties")
    assert not (tmp_path / "m").exists()


def test_sizes_parse_in_decimal_and_binary_units():
    assert io.parse_bytes("2GB") == 2_000_000_000
    assert io.parse_bytes("512MiB") == 512 * 2**20
    assert io.parse_bytes("1.5k") == 1500
    assert io.parse_bytes(1234) == 1234


@given(rows=st.integers(1, 9), cols=st.integers(1, 6), cut=st.integers(0, 9), block=st.integers(1, 8))
def test_dare_masks_do_not_depend_on_how_a_tensor_is_split(rows, cols, cut, block):
    old = draws.RANDOM_CHUNK
    draws.RANDOM_CHUNK = block
    try:
        whole = draws.dare_mask((rows, cols), 0.5, 3, 0, "w")
        cut = min(cut, rows)
        top = draws.dare_mask((cut, cols), 0.5, 3, 0, "w", start=0, full=rows * cols)
        bottom = draws.dare_mask((rows - cut, cols), 0.5, 3, 0, "w", start=cut * cols, full=rows * cols)
    finally:
        draws.RANDOM_CHUNK = old
    assert torch.equal(torch.cat([top, bottom]), whole)


def test_out_of_core_dare_with_small_mask_blocks_equals_in_memory(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(draws, "RANDOM_CHUNK", 37)  # blocks that straddle the merge's row blocks
    root, _, sources = checkpoints
    out = ta.merge_files(root / "base", sources, tmp_path / "m", "dare_ties", drop=0.3, seed=1, max_memory=3000)
    got = ta.io.load_state_dict(out)
    want = in_memory(root / "base", sources, "dare_ties", {"drop": 0.3, "seed": 1})
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16])
def half_checkpoints(request, tmp_path_factory):
    """Half-precision models. In bfloat16, a tensor split into row blocks and one merged whole each hold an
    entry whose float32 delta cannot round-trip (fine-tuned 2^-30, base 1: the float64 fallback); float16
    deltas always fit float32."""
    dtype = request.param
    root = tmp_path_factory.mktemp(f"half-{dtype}".replace("torch.", ""))
    g = torch.Generator().manual_seed(1)
    base = {"big.weight": torch.randn(30, 20, generator=g), "needs64.weight": torch.randn(30, 20, generator=g),
            "small.weight": torch.randn(6, 5, generator=g), "small64.bias": torch.randn(7, generator=g)}
    base = {n: t.to(dtype) for n, t in base.items()}
    base["needs64.weight"][3, 4] = base["small64.bias"][2] = 1.0
    sources = []
    for i in range(3):
        tuned = {n: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in base.items()}
        tuned["big.weight"][0, :5] = base["big.weight"][0, :5]  # zero deltas
        # One fine-tune only moves that entry, so the fallback applies to one input of the tensor and
        # plain task arithmetic lands exactly on 2^-30 there (0 with a rounded float32 delta).
        tuned["needs64.weight"][3, 4] = tuned["small64.bias"][2] = 2.0 ** -30 if i == 1 else 1.0
        save_file(tuned, root / f"ft{i}.safetensors")
        sources.append(root / f"ft{i}.safetensors")
    write_sharded(root / "base", base)
    return root, sources


# 45000 bytes: the 30 x 20 tensors are merged whole but read in two row blocks to select their
# thresholds (96 bytes per entry there, 64 in the merge), so the fallback must be decided per tensor.
@pytest.mark.parametrize("max_memory", [1500, 45000, "1GB"], ids=["row-blocks", "split-for-selection", "whole"])
@pytest.mark.parametrize("method,options", [("task_arithmetic", {}), ("task_arithmetic", {"scale": 0.7}), ("mean", {}),
                                            ("dare", {"drop": 0.4, "seed": 2}), ("dare_ties", {"drop": 0.5, "seed": 7}),
                                            ("consensus", {"k": 2}), ("ties", {"density": 0.3, "scope": "tensor"}),
                                            ("ties", {"density": 0.3})])
def test_half_precision_merge_files_equals_in_memory_merge(half_checkpoints, tmp_path, monkeypatch, max_memory,
                                                           method, options):
    """Pieces smaller than a row block, row blocks smaller than a tensor, float64 fallbacks: same bits."""
    from taskarith import _extract

    monkeypatch.setattr(_pieces, "_PIECE", 7, raising=False)
    monkeypatch.setattr(_extract, "_BLOCK", 5, raising=False)
    monkeypatch.setattr(draws, "RANDOM_CHUNK", 11)
    root, sources = half_checkpoints
    out = ta.merge_files(root / "base", sources, tmp_path / "m", method, max_memory=max_memory, **options)
    got = ta.io.load_state_dict(out)
    want = in_memory(root / "base", sources, method, options)
    vector = ta.TaskVector.from_models(ta.io.load_state_dict(root / "base"), ta.io.load_state_dict(sources[1]))
    wide = torch.float64 if vector["big.weight"].dtype == torch.float32 and base_dtype(root) == torch.bfloat16 else torch.float32
    assert vector["needs64.weight"].dtype == vector["small64.bias"].dtype == wide  # the fixture's premise
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), f"{method}: {name!r} differs"


def base_dtype(root):
    return ta.io.load_state_dict(root / "base")["big.weight"].dtype


def test_piece_outputs_are_reused_only_once_let_go():
    pieces = _pieces.Pieces()
    first = pieces.output(10, torch.float32)
    second = pieces.output(10, torch.float32)
    assert first.data_ptr() != second.data_ptr()  # the first is still referenced
    address = first.data_ptr()
    del first
    again = pieces.output(8, torch.float32)
    assert again.data_ptr() == address and again.numel() == 8
    other = pieces.output(4, torch.float64)  # no float32 buffer serves another dtype
    assert other.dtype == torch.float64 and len(pieces.outputs) == _pieces._KEPT_OUTPUTS
    del again, second, other
    large = pieces.output(100, torch.float32)  # the smallest free buffer makes room
    assert [(b.numel(), b.dtype) for b in pieces.outputs] == [(10, torch.float32), (10, torch.float32),
                                                             (100, torch.float32)]
    held = [pieces.output(100, torch.float32) for _ in range(3)]  # all kept ones busy: new, not kept
    assert len({t.data_ptr() for t in [large, *held]}) == 4 and len(pieces.outputs) == _pieces._KEPT_OUTPUTS


def test_slow_writes_never_see_a_reused_output(half_checkpoints, tmp_path, monkeypatch):
    """Each output block is written by a thread while the next is computed: a buffer is only reused
    once its write has finished."""
    import time

    from taskarith import io

    write = io._writer._Pipeline.write

    def slow_write(self, data):
        write(self, data)
        self.pool.submit(time.sleep, 0.01)  # the next write waits for this one too

    monkeypatch.setattr(io._writer._Pipeline, "write", slow_write)
    monkeypatch.setattr(_pieces, "_PIECE", 16, raising=False)
    monkeypatch.setattr(_pieces, "_KEPT_OUTPUTS", 2, raising=False)
    root, sources = half_checkpoints
    out = ta.merge_files(root / "base", sources, tmp_path / "m", "task_arithmetic", scale=0.7, max_memory=1500)
    got = ta.io.load_state_dict(out)
    want = in_memory(root / "base", sources, "task_arithmetic", {"scale": 0.7})
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_merges_in_several_threads_equal_the_same_merges_in_turn(checkpoints, tmp_path):
    """No merge state lives at module level: merges running side by side in threads, under different
    budgets and methods, give the bytes each gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    root, _, sources = checkpoints
    jobs = [("ties", {"density": 0.4, "scope": "global"}, "20KB"), ("dare", {"drop": 0.3, "seed": 2}, "8KB"),
            ("task_arithmetic", {}, "1GB"), ("ties", {"density": 0.2}, "12KB")]

    def run(i, where):
        method, options, budget = jobs[i]
        out = ta.merge_files(root / "base", sources, tmp_path / where / str(i), method, max_memory=budget, **options)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    alone = [run(i, "alone") for i in range(len(jobs))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda i: run(i, "threads"), range(len(jobs))))
    assert together == alone
