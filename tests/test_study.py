"""The MUSIC reference study (examples/mnist_music.py): structure and sanity, not outcomes.

The quick study runs once on the real MNIST test split in ../shared/data/mnist-t10k. Without that
folder the study tests skip, except on CI (CI=true), where missing data is a failure.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DATA = ROOT.parent / "shared" / "data" / "mnist-t10k"
FIGURES = ["confusion_matrices.png", "loss_curves.png", "accuracy_curves.png", "gradual.png",
           "methods.png", "lambda_selection.png"]
VERDICTS = {"confirmed", "refuted", "inconclusive"}


@pytest.fixture(scope="module")
def study():
    """The example script imported as a module (its sibling _music_report needs examples/ on
    sys.path, as when the script is run directly)."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("seaborn")
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location("mnist_music", EXAMPLES / "mnist_music.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def quick_run(study, tmp_path_factory):
    if not (DATA / "t10k-images-idx3-ubyte.gz").is_file():
        message = f"the MNIST test split is not in {DATA}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (required on CI)")
        pytest.skip(message)
    out = tmp_path_factory.mktemp("music")
    threads = study.torch.get_num_threads()  # main() sets its own; give the other tests theirs back
    try:
        results = study.main(["--quick", "--data-dir", str(DATA), "--out", str(out), "--no-download"])
    finally:
        study.torch.set_num_threads(threads)
    return results, out


def _numbers(tree, path=""):
    """Every (path, value) of the metric dicts: accuracy/precision/recall/f1 and per-class lists."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key != "confusion":
                yield from _numbers(value, f"{path}/{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _numbers(value, f"{path}[{i}]")
    else:
        yield path, tree


def test_quick_study_writes_every_output(quick_run):
    results, out = quick_run
    for name in FIGURES + ["results.json", "report.md"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} not written"
    assert sorted(results["figures"]) == sorted(FIGURES)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"]["comparisons"].keys() == results["summary"]["comparisons"].keys()
    for key in ("config", "versions", "device", "data", "seeds", "summary", "verdicts"):
        assert key in on_disk, f"results.json lacks {key!r}"
    assert on_disk["data"]["mode"] == "test-split"
    report = (out / "report.md").read_text()
    assert "Test-split mode" in report.split("## Verdicts")[0], "the mode must be said at the top"
    for figure in FIGURES:
        assert f"]({figure})" in report, f"report.md does not show {figure}"


def test_quick_study_numbers_are_sane(quick_run):
    results, _ = quick_run
    seeds = results["seeds"]
    assert list(seeds) == ["0", "1"]
    for seed, run in seeds.items():
        # Well above the 10% of chance: the pretraining worked.
        assert run["metrics"]["pretrained"]["overall"]["accuracy"] > 0.5, seed
        for model, metrics in run["metrics"].items():
            for path, value in _numbers({k: metrics[k] for k in ("overall", "task", "other",
                                                                  "per_class")}):
                assert 0.0 <= value <= 1.0, f"seed {seed}, {model}{path} = {value}"
            conf = np.asarray(metrics["confusion"])
            assert conf.shape == (10, 10) and conf.sum() == results["data"]["sizes"]["eval"]
        for name, lam in run["lambda"].items():
            assert lam in results["config"]["lambdas"], name
    for name, groups in results["summary"]["methods"].items():
        for path, value in _numbers(groups):
            if path.endswith("std"):
                assert value >= 0.0, f"{name}{path}"
            else:
                assert 0.0 <= value <= 1.0, f"{name}{path} = {value}"
    for name, cmp in results["summary"]["comparisons"].items():
        lo, hi = cmp["ci"]
        assert -1.0 <= lo <= cmp["mean"] + 1e-12 and cmp["mean"] - 1e-12 <= hi <= 1.0, name
    assert len(results["verdicts"]) == 5
    for verdict in results["verdicts"]:
        assert verdict["verdict"] in VERDICTS and verdict["evidence"], verdict


def test_quick_study_is_deterministic(study, quick_run):
    """The same seed gives the same numbers when the study runs again."""
    results, _ = quick_run
    args = study.parse_args(["--quick", "--data-dir", str(DATA), "--no-download"])
    data = study.load_data(args)
    again = study.run_seed(0, data, args, study.torch.device("cpu"), log=lambda msg: None)
    first = results["seeds"]["0"]["metrics"]
    for model in ("pretrained", "joint", "seq:3>4>7", "task_arithmetic", "negation"):
        assert again["metrics"][model] == first[model], model


def test_help_explains_every_flag(study):
    parser = study.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0


def test_missing_data_is_a_clear_error(study, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--data-dir", str(tmp_path), "--no-download", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "t10k" in err
    with pytest.raises(SystemExit):
        study.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--no-download"])
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(study, tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28))
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    _write_idx(path, images, compress)
    assert np.array_equal(study.read_idx(path), images)
    path.write_bytes(path.read_bytes()[:-1] if not compress else b"not an idx file")
    with pytest.raises(study.DataUnavailable):
        study.read_idx(path)


def test_checksum_mismatch_is_refused(study, tmp_path):
    """A file under a known name whose md5 differs is rejected unless --no-verify."""
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    _write_idx(path, np.zeros(10), compress=True)
    with pytest.raises(study.DataUnavailable, match="--no-verify"):
        study.check_md5(path, "mnist", verify=True)
    assert study.check_md5(path, "mnist", verify=False).startswith("MISMATCH")
    assert study.check_md5(tmp_path / "unknown", "mnist", verify=True).startswith("unverified")
    if (DATA / path.name).is_file():
        assert study.check_md5(DATA / path.name, "mnist", verify=True).startswith("verified")


def test_normalisation_matches_torchvision(study):
    """x/127.5 - 1 is ToTensor() then Normalize(0.5, 0.5), as the script says."""
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    split = study.to_split(images, np.zeros(1))
    expected = (images.astype(np.float64) / 255 - 0.5) / 0.5
    assert np.allclose(split.x.numpy().reshape(1, 16, 16), expected, atol=1e-6)
    assert math.isclose(float(split.x.min()), -1.0) and math.isclose(float(split.x.max()), 1.0)
