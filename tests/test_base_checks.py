"""Vectors merged onto a base were extracted from it: the command line checks their fingerprints as
``apply`` does, and merged vectors keep the fingerprint in memory and out of core."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

import taskarith as ta
from taskarith import _extract, cli


@pytest.fixture
def setup(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g)}
    other = {n: torch.randn(t.shape, generator=g) for n, t in base.items()}
    for name, state in (("base", base), ("other", other)):
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
    vectors = []
    for i in range(2):
        tuned = {n: t + 0.1 * (i + 1) * torch.randn(t.shape, generator=g) for n, t in base.items()}
        path = tmp_path / f"v{i}.safetensors"
        ta.TaskVector.from_models(base, tuned).save(path)
        vectors.append(path)
    return tmp_path, vectors


def config(root, base, vectors, method="ties"):
    path = root / f"{method}-{base}.yaml"
    path.write_text(f"method: {method}\nbase: {root / base}\nvectors: [{', '.join(map(str, vectors))}]\n")
    return path


@pytest.mark.parametrize("memory", [[], ["--device", "cpu"]])
def test_merging_vectors_onto_another_base_warns_and_strict_refuses(setup, memory, capsys):
    root, vectors = setup
    wrong = config(root, "other", vectors)
    with pytest.warns(UserWarning, match="different base model"):
        assert cli.main(["merge", str(wrong), "-o", str(root / "merged"), *memory]) == 0
    assert cli.main(["merge", str(wrong), "-o", str(root / "strict"), "--strict", *memory]) == 1
    err = capsys.readouterr().err
    assert "different base model" in err and "v0.safetensors" in err and "drop --strict" in err
    assert not (root / "strict").exists()
    right = config(root, "base", vectors)
    assert cli.main(["merge", str(right), "-o", str(root / "right"), "--strict", *memory]) == 0


def test_merged_vector_files_keep_the_common_fingerprint(setup):
    root, vectors = setup
    expected = ta.load(vectors[0]).base_fingerprint
    for method, options in [("ties", {"density": 0.5}), ("mean", {}), ("dare", {"drop": 0.3, "seed": 1})]:
        out = ta.merge_files(None, vectors, root / f"{method}.safetensors", method, **options)
        assert ta.load(out).base_fingerprint == expected
        assert ta.merge([ta.load(v) for v in vectors], method, **options).base_fingerprint == expected
    ta.TaskVector({"w": torch.ones(8, 4), "b": torch.ones(4)}).save(root / "plain.safetensors")
    out = ta.merge_files(None, [vectors[0], root / "plain.safetensors"], root / "mixed.safetensors", "mean")
    assert ta.load(out).base_fingerprint is None


def test_fingerprints_sampled_by_numpy_equal_those_sampled_by_torch():
    """The fingerprint's fast CPU sampling hashes the same bytes as the torch indexing it replaces
    (so vectors saved before keep matching their base): every float dtype, odd sizes, an empty and a
    non-contiguous tensor."""
    g = torch.Generator().manual_seed(3)
    sizes = [(5, torch.float32), (100, torch.bfloat16), (1 << 20, torch.float16), (17, torch.float64),
             (0, torch.float32), (3001, torch.bfloat16), ((1 << 24) + 3, torch.bfloat16)]
    state = {f"t{i}": torch.randn(n, generator=g).to(dt) for i, (n, dt) in enumerate(sizes)}
    state["transposed"] = torch.randn(30, 40, generator=g).t()
    fast = _extract.fingerprint(state, list(state))
    with mock.patch.object(_extract, "_cpu_sample", lambda t: None):
        assert _extract.fingerprint(state, list(state)) == fast
