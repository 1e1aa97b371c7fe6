"""The MUSIC reference study (examples/mnist_music.py and its examples/_music_*.py modules):
structure and sanity, not outcomes.

The quick study (a smoke test) runs once on the real MNIST test split in ../shared/data/mnist-t10k,
and once more with SGD fine-tuning of the Adam-pretrained model. Without that folder those tests
skip, except on CI (CI=true), where missing data is a failure. The data-handling tests need no data.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import importlib.util
import io
import itertools
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
FIGURES = ["confusion_matrices.png", "per_class_stages.png", "loss_curves.png", "accuracy_curves.png",
           "gradual.png", "methods.png", "lambda_selection.png"]
DIGITS = [3, 4, 7]
ORDERS = [">".join(map(str, o)) for o in itertools.permutations(DIGITS)]


@pytest.fixture(scope="module")
def study():
    """The example script imported as a module (its sibling _music_* modules need examples/ on
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
def music(study):
    """The sibling modules: music.data, music.stats, music.verdicts, music.render."""
    class Modules:
        data = importlib.import_module("_music_data")
        stats = importlib.import_module("_music_stats")
        verdicts = importlib.import_module("_music_verdicts")
        render = importlib.import_module("_music_render")
        train = importlib.import_module("_music_train")
        sweep = importlib.import_module("_music_sweep")
    return Modules


def _need_data():
    if not (DATA / "t10k-images-idx3-ubyte.gz").is_file():
        message = f"the MNIST test split is not in {DATA}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (required on CI)")
        pytest.skip(message)


def _run(study, argv):
    """main(argv) with its stdout captured; torch's thread count restored afterwards."""
    threads = study.torch.get_num_threads()  # main() sets its own; give the other tests theirs back
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            results = study.main(argv)
    finally:
        study.torch.set_num_threads(threads)
    return results, out.getvalue()


@pytest.fixture(scope="module")
def quick_run(study, tmp_path_factory):
    _need_data()
    out = tmp_path_factory.mktemp("music")
    results, stdout = _run(study, ["--quick", "--data-dir", str(DATA), "--out", str(out), "--no-download"])
    return results, out, stdout


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


# ---------------------------------------------------------------------------------------------
# The quick study (a smoke test)
# ---------------------------------------------------------------------------------------------

def test_quick_study_writes_every_output(quick_run):
    results, out, _ = quick_run
    for name in FIGURES + ["results.json", "report.md"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} not written"
    assert sorted(results["figures"]) == sorted(FIGURES)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"]["comparisons"].keys() == results["summary"]["comparisons"].keys()
    for key in ("config", "versions", "device", "machine", "data", "seeds", "summary", "verdicts",
                "training", "smoke_test"):
        assert key in on_disk, f"results.json lacks {key!r}"
    assert on_disk["data"]["mode"] == "test-split"
    report = (out / "report.md").read_text()
    assert "Test-split mode" in report.split("## Claims")[0], "the mode must be said at the top"
    for figure in FIGURES:
        assert f"]({figure})" in report, f"report.md does not show {figure}"


def test_quick_is_a_smoke_test_without_verdicts(quick_run):
    results, out, stdout = quick_run
    assert results["smoke_test"] is True and "smoke test" in results["verdicts_note"]
    assert "SMOKE TEST" in stdout and "smoke test (--quick): no verdicts" in stdout
    report = (out / "report.md").read_text()
    assert "Smoke test (--quick)" in report.split("## Claims")[0]
    assert len(results["verdicts"]) == 10  # H0 new; part 1 per task + overall; part 2 per task; 2 transfers
    for verdict in results["verdicts"]:
        assert verdict["verdict"] == "not judged" and verdict["evidence"], verdict
    for text in (stdout, report):
        assert "CONFIRMED" not in text and "REFUTED" not in text and "INCONCLUSIVE" not in text


def test_quick_study_numbers_are_sane(quick_run):
    results, _, _ = quick_run
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
        for key in ("lambda", "lambda_task"):
            for name, lam in run[key].items():
                assert lam in results["config"]["lambdas"], (key, name)
    for name, groups in results["summary"]["methods"].items():
        for path, value in _numbers(groups):
            if path.endswith("std"):
                assert value >= 0.0, f"{name}{path}"
            else:
                assert 0.0 <= value <= 1.0, f"{name}{path} = {value}"
    for name, cmp in results["summary"]["comparisons"].items():
        lo, hi = cmp["ci"]
        assert -1.0 <= lo <= cmp["mean"] + 1e-12 and cmp["mean"] - 1e-12 <= hi <= 1.0, name
        assert 0.0 < cmp["sign_p"] <= 1.0, name


def test_every_stage_is_reported_per_task(quick_run):
    """Deliverable 1: accuracy on 3, 4, 7 and the other classes for every stage and merge."""
    results, out, _ = quick_run
    per_task, summary = results["summary"]["per_task"], results["summary"]
    stages = (["pretrained", "joint", "joint_equal_steps", "negation"]
              + [f"ft:{d}" for d in DIGITS] + [f"seq:{o}" for o in ORDERS] + [f"seq:{o[:3]}" for o in ORDERS]
              + [f"{p}:{k}" for p in ("gradual", "gradual_tuned", "gradual_task") for k in (1, 2, 3)]
              + [m + s for m in ("task_arithmetic", "ties", "dare", "consolidated") for s in ("", "@task")]
              + ["ties_full", "dare_full", "consolidated_full"])
    for name in stages:
        assert set(per_task[name]) >= {"3", "4", "7", "other", "overall", "lambda"}, name
        seed0 = results["seeds"]["0"]["metrics"][name]
        assert per_task[name]["3"]["values"][0] == seed0["per_class"]["recall"][3], name
        assert per_task[name]["other"]["values"][0] == seed0["other"]["accuracy"], name
    for o in ORDERS:
        a, b, _ = o.split(">")
        assert summary["sequential_stages"][f"seq:{o}"] == [f"ft:{a}", f"seq:{a}>{b}", f"seq:{o}"]
        forg = summary["forgetting"][f"seq:{o}"]
        assert set(forg["per_task"]) == {a, b}
        expected = per_task[f"ft:{a}"][a]["mean"] - per_task[f"seq:{o}"][a]["mean"]
        assert math.isclose(forg["per_task"][a]["mean"], expected, abs_tol=1e-12)
        bwt = -(forg["per_task"][a]["mean"] + forg["per_task"][b]["mean"]) / 2
        assert math.isclose(forg["bwt"]["mean"], bwt, abs_tol=1e-12)
    report = (out / "report.md").read_text()
    assert "## Every stage, per task" in report and "after 3→4" in report and "BWT" in report


def test_lambda_rules_and_no_comparison_zero_by_construction(quick_run):
    """Deliverable 5: both λ rules reported, a λ column, and no difference that is 0 by
    construction reported as a finding."""
    results, out, _ = quick_run
    lambdas = results["summary"]["lambdas"]
    for m in ("task_arithmetic", "ties", "dare", "consolidated"):
        assert lambdas[m] == [s["lambda"][m] for s in results["seeds"].values()]
        assert lambdas[m + "@task"] == [s["lambda_task"][m] for s in results["seeds"].values()]
    assert lambdas["gradual:3"] == [1.0, 1.0] and lambdas["consolidated_full"] == [1.0, 1.0]
    for name, cmp in results["summary"]["comparisons"].items():
        if cmp.get("lambda_zero_seeds") == cmp["n"]:
            assert "by construction" in cmp["by_construction"], name
        # pt + τ_first at λ = 1 is ft_first itself: never compared with it
        assert name != "gradual step 1 − ft3, accuracy on 3"
    report = (out / "report.md").read_text()
    assert "| model | λ |" in report and "task-aware" in report
    head = report.split("## Headline")[1].split("##")[0]
    for m, s in zip(("task_arithmetic", "dare"), ("task arithmetic", "DARE")):
        if set(lambdas[m]) == {0.0}:
            assert "0 (= pt)" in head and f"{s} (overall-rule λ) − pretrained | λ = 0 in every seed" in report


def test_controls_baselines_and_balanced_accuracy(quick_run):
    """The ctv's controls (TIES and random mask of its size, λ 1 and tuned), the collapse
    baselines (replay, last layer only; sequential stages and joint), balanced accuracy, IG gaps."""
    results, out, _ = quick_run
    per_task, cmps = results["summary"]["per_task"], results["summary"]["comparisons"]
    for ctrl in ("mask_ties", "mask_random"):
        for suffix in ("", "@task", "_full"):
            assert ctrl + suffix in per_task
        text = "TIES" if ctrl == "mask_ties" else "random"
        for rule in ("λ 1", "task-aware λ"):
            assert f"ctv − {text} mask ({rule}), accuracy on the task classes" in cmps
    for kind in ("replay", "last"):
        for name in (f"{kind}:3", f"{kind}:3>4", f"{kind}:3>4>7", f"{kind}:joint"):
            assert name in per_task, name
    assert "replay: sequential − joint (equal steps)" in cmps
    assert "last layer only: sequential − joint (equal steps)" in cmps
    steps = results["seeds"]["0"]["steps"]["baselines"]
    curves = results["seeds"]["0"]["curves"]
    assert curves["replay:joint"]["step"][-1] == steps["replay"]
    assert steps["replay"] == sum(curves[f"replay:{s}"]["step"][-1] for s in ("3", "3>4", "3>4>7"))
    seed0 = results["seeds"]["0"]["metrics"]["joint"]
    assert per_task["joint"]["balanced"]["values"][0] == pytest.approx(np.mean(seed0["per_class"]["recall"]))
    for seed in results["seeds"].values():
        info = seed["consolidation"]
        assert len(info["ig"]) == 3 and len(info["kept"]) == 3
        cfg = results["config"]
        for g in info["ig"]:
            assert g["relative_gap"] <= cfg["ig_rtol"] or g["steps"] * 2 > cfg["ig_max_steps"]
    report = (out / "report.md").read_text()
    for heading in ("## Baselines for the single-class collapse", "## The consolidated vector against its controls"):
        assert heading in report
    assert "balanced accuracy" in report and "Integrated gradients:" in report


def test_evaluation_split_is_stratified_and_can_vary_with_the_seed(study, music):
    _need_data()
    args = study.parse_args(["--data-dir", str(DATA), "--no-download"])
    arrays, _ = music.data.read_arrays(args)
    a, b = (music.data.split_data(arrays, args, s) for s in (0, 1))
    source = np.bincount(arrays["test_labels"], minlength=10) / len(arrays["test_labels"])
    for d in (a, b):
        counts = np.asarray(d["eval_class_counts"])
        assert counts.sum() == 3000 and np.all(np.abs(counts - 3000 * source) <= 1)
        assert abs(d["task_share"]["evaluation"] - d["task_share"]["source"]) < 0.001
        assert d["sizes"] == dict(pretrain=5100, val=1000, eval=3000, task_per_class=300)
    assert not study.torch.equal(a["tasks"][3].x, b["tasks"][3].x)
    assert music.data.seed_split(args, 3) == 0
    varied = study.parse_args(["--vary-split", "--split-seed", "10"])
    assert [music.data.seed_split(varied, s) for s in (0, 3)] == [10, 13]


def test_last_layer_only_training_changes_only_the_output_layer(music):
    torch = music.train.torch
    model = music.train.new_model(0, "x", "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    split = music.data.Split(torch.randn(64, 784), torch.full((64,), 3))
    music.train.train(model, split, optimizer="adam", lr=1e-2, batch_size=16, seed=0, val=split,
                      task_classes=[3, 4, 7], epochs=1, last_layer_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) != k.startswith("fc3."), k
    assert all(p.requires_grad for p in model.parameters())


def test_control_masks_keep_exactly_k_entries(music):
    torch = music.train.torch
    scores = {"a": torch.tensor([[0.5, -2.0], [3.0, 0.1]]), "b": torch.tensor([1.0, 0.2, -0.3])}
    kept = music.train.top_entries({n: s.abs() for n, s in scores.items()}, 3)
    positive = {n: (v > 0).nonzero().flatten().tolist() for n, v in
                {n: t.flatten() for n, t in kept.items()}.items()}
    assert positive == {"a": [1, 2], "b": [0]}  # |−2|, 3 and 1: the three largest magnitudes


def test_sweep_smoke_reports_every_setting_without_verdicts(study, music, tmp_path):
    _need_data()
    results, stdout = _run(study, ["--quick", "--sweep", "--seeds", "0", "--epochs", "1", "--pretrain-epochs", "1",
                                   "--data-dir", str(DATA), "--out", str(tmp_path), "--no-download"])
    settings = results["sweep"]["settings"]
    assert [(s["optimizer"], s["lr"]) for s in settings] == music.sweep.SETTINGS
    assert len(settings) == 8 and not results["sweep"]["judged"]
    pre = [s["summary"]["per_task"]["pretrained"]["overall"]["mean"] for s in settings]
    assert len(set(pre)) == 1, "pretraining must not depend on the fine-tuning setting"
    for s in settings:
        assert s["h0_new"] == s["summary"]["comparisons"]["sequential − joint (equal steps)"]
        assert all(v["verdict"] == "not judged" for v in s["verdicts"])
    report = (tmp_path / "report.md").read_text()
    assert "NOT JUDGED" in report and "SGD lr 1e-2" in report and "Adam lr 1e-5" in report
    assert (tmp_path / "sweep.png").is_file() and "CONFIRMED" not in stdout and "REFUTED" not in stdout
    assert study.parse_args(["--sweep"]).seeds == list(range(10)) and study.parse_args([]).seeds == [0, 1, 2, 3, 4]


def test_sweep_readings(music):
    r = music.sweep.reading
    assert [r(dict(ci=[-0.05, -0.03]), 0.02), r(dict(ci=[-0.01, 0.01]), 0.02), r(dict(ci=[-0.03, 0.01]), 0.02),
            r(dict(ci=[0.001, 0.01]), 0.02), r(dict(ci=[0.01, 0.05]), 0.02)] == \
        ["refuted", "tie", "inconclusive", "confirmed, by less than the margin", "confirmed"]


def test_sgd_finetuning_of_an_adam_pretrained_model(study, quick_run, tmp_path):
    """--ft-optimizer / --ft-lr change the fine-tuning runs only: pretraining stays the same."""
    results, _, _ = quick_run
    sgd, _ = _run(study, ["--quick", "--seeds", "0", "--ft-optimizer", "sgd", "--ft-lr", "0.01",
                          "--data-dir", str(DATA), "--out", str(tmp_path), "--no-download"])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["training"]["pretrain"]["optimizer"] == "adam"
    assert on_disk["training"]["finetune"] == dict(optimizer="sgd", lr=0.01, epochs=2, momentum=0.9)
    assert on_disk["config"]["ft_optimizer"] == "sgd" and on_disk["config"]["optimizer"] == "adam"
    adam0, sgd0 = results["seeds"]["0"]["metrics"], sgd["seeds"]["0"]["metrics"]
    for model in ("pretrained", "transfer:independent:base", "transfer:continued:base"):
        assert sgd0[model] == adam0[model], model
    assert sgd0["ft:3"] != adam0["ft:3"] and sgd0["joint"] != adam0["joint"]
    assert results["training"]["finetune"]["optimizer"] == "adam"  # the default keeps today's


def test_default_options_keep_todays_training(study):
    args = study.parse_args([])
    assert (args.optimizer, args.ft_optimizer, args.ft_lr, args.pretrain_lr) == ("adam", "adam", 1e-3, 1e-3)
    assert study.parse_args(["--lr", "1e-4"]).ft_lr == 1e-4  # the older name still works
    assert study.parse_args(["--optimizer", "sgd"]).ft_optimizer == "sgd"


def test_quick_study_is_deterministic(study, quick_run):
    """The same seed gives the same numbers when the study runs again."""
    results, _, _ = quick_run
    args = study.parse_args(["--quick", "--data-dir", str(DATA), "--no-download"])
    data = study.load_data(args)
    threads = study.torch.get_num_threads()
    study.torch.set_num_threads(1)  # as main() does: float sums depend on the thread count
    try:
        again = study.run_seed(0, data, args, study.torch.device("cpu"), log=lambda msg: None)
    finally:
        study.torch.set_num_threads(threads)
    first = results["seeds"]["0"]["metrics"]
    for model in ("pretrained", "joint", "seq:3>4>7", "seq:3>4", "task_arithmetic", "ties@task",
                  "negation"):
        assert again["metrics"][model] == first[model], model


def test_render_writes_generated_blocks_and_refuses_smoke_tests(music, quick_run, tmp_path):
    _, out, _ = quick_run
    with pytest.raises(SystemExit, match="smoke test"):
        music.render.render([out / "results.json"], targets=[], figures=tmp_path / "figs")
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    results = json.loads((out / "results.json").read_text())
    results["smoke_test"] = False
    (run / "results.json").write_text(json.dumps(results))
    for fig in FIGURES:
        (run / fig).write_bytes((out / fig).read_bytes())
    doc = tmp_path / "doc.md"
    marker = music.render.BEGIN.format("study:demo") + "\nold\n" + music.render.END.format("study:demo")
    doc.write_text(f"intro\n\n{marker}\n\noutro\n")
    done = music.render.render([run / "results.json"], targets=[doc], figures=tmp_path / "figs")
    assert done[str(doc)] == ["study:demo"]
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "\nold\n" not in text
    assert "| stage | model | λ | on 3 | on 4 | on 7 |" in text and "BWT" in text
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(f"demo-{f}" for f in FIGURES)
    once = doc.read_text()
    music.render.render([run], targets=[doc], figures=tmp_path / "figs")  # idempotent
    assert doc.read_text() == once


def test_help_explains_every_flag(study):
    parser = study.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0


# ---------------------------------------------------------------------------------------------
# Statistics and verdict rules
# ---------------------------------------------------------------------------------------------

def _brute_sign_p(k: int, n: int) -> float:
    """Two-sided p by enumerating every sign pattern: those at least as far from n/2 as k."""
    if n == 0:
        return 1.0
    far = sum(1 for signs in itertools.product((0, 1), repeat=n) if abs(sum(signs) - n / 2) >= abs(k - n / 2))
    return far / 2 ** n


def test_sign_test_is_exact(music):
    sign_test = music.stats.sign_test
    assert sign_test([0.1] * 5)["p"] == 0.0625  # 5/5 seeds: the smallest p five seeds allow
    assert sign_test([0.1] * 9 + [-0.1])["p"] == pytest.approx(22 / 1024)
    assert sign_test([0.1, -0.1])["p"] == 1.0
    assert sign_test([])["p"] == 1.0
    tied = sign_test([0.0, 0.0, 0.2, 0.3, -0.1])  # ties are dropped: 2 of 3 positive
    assert (tied["n"], tied["positive"], tied["ties"]) == (3, 2, 2) and tied["p"] == 1.0
    for n in range(0, 11):
        for k in range(n + 1):
            p = sign_test([1.0] * k + [-1.0] * (n - k))["p"]
            assert p == pytest.approx(_brute_sign_p(k, n)), (k, n)


def test_comparison_of_a_model_tuned_to_lambda_zero_says_so(music):
    same = music.stats.paired([0.9, 0.8], [0.9, 0.8], 100, lambdas=[0.0, 0.0])
    assert "by construction" in same["by_construction"] and same["mean"] == 0.0
    part = music.stats.paired([0.9, 0.85], [0.9, 0.8], 100, lambdas=[0.0, 0.1])
    assert "by_construction" not in part and part["lambda_zero_seeds"] == 1
    assert "λ = 0 (the pretrained model) in 1/2 seeds" in music.verdicts.pp(part)


def test_verdict_rules(music):
    v = music.verdicts

    def c(lo, hi):
        return dict(ci=[lo, hi])

    assert [v.beats(c(0.01, 0.02)), v.beats(c(-0.02, -0.01)), v.beats(c(-0.01, 0.01))] == \
        ["confirmed", "refuted", "inconclusive"]
    m = 0.02
    assert [v.drops(c(-0.1, -0.03), m), v.drops(c(-0.01, 0.0), m), v.drops(c(-0.03, -0.01), m)] == \
        ["confirmed", "refuted", "inconclusive"]
    assert [v.holds_up(c(-0.1, -0.03), m), v.holds_up(c(-0.01, 0.0), m)] == ["refuted", "confirmed"]
    assert [v.equals(c(-0.01, 0.01), m), v.equals(c(0.03, 0.05), m), v.equals(c(0.0, 0.03), m)] == \
        ["confirmed", "refuted", "inconclusive"]


def test_verdicts_need_five_seeds_and_no_smoke_test(study, music):
    reason = music.verdicts.not_judged_reason
    assert "smoke test" in reason(study.parse_args(["--quick", "--seeds", "0", "1", "2", "3", "4"]))
    assert "at least 5" in reason(study.parse_args(["--seeds", "0", "1", "2", "3"]))
    assert reason(study.parse_args([])) is None


# ---------------------------------------------------------------------------------------------
# Data handling (deliverable 10): no data needed
# ---------------------------------------------------------------------------------------------

def _listing(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def no_network(music, monkeypatch):
    """Fail the test if anything probes the network or downloads."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the study tried the network")
    monkeypatch.setattr(music.data, "reachable", forbidden)
    monkeypatch.setattr(music.data, "torchvision_download", forbidden)


def _main_error(study, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _run(study, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, f"not one line: {err!r}"
    return err


def test_a_wrong_data_dir_fails_at_once_and_writes_nothing(study, no_network, tmp_path, capsys):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "notes.txt").write_text("not MNIST")
    before = _listing(tmp_path)
    err = _main_error(study, ["--data-dir", str(wrong), "--out", str(tmp_path / "o")], capsys)
    assert f"--data-dir {wrong}" in err and "t10k-images-idx3-ubyte" in err and "t10k-labels-idx1-ubyte" in err
    if (ROOT.parent / "shared" / "data" / "mnist-t10k").is_dir():
        assert "shared/data/mnist-t10k/" in err, "the message names where the real test split is"
    assert _listing(tmp_path) == before, "the study wrote into the wrong --data-dir (or --out)"
    assert not (wrong / "MNIST").exists()

    missing = tmp_path / "missing"
    err = _main_error(study, ["--data-dir", str(missing)], capsys)
    assert "does not exist" in err and not missing.exists()
    err = _main_error(study, ["--dataset", "fashion-mnist", "--data-dir", str(wrong)], capsys)
    assert "dataset-fashion-mnist" in err and _listing(tmp_path) == before


def test_half_a_test_split_is_named(study, no_network, tmp_path, capsys):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    err = _main_error(study, ["--data-dir", str(tmp_path)], capsys)
    assert "found only t10k-images-idx3-ubyte.gz" in err


def test_offline_without_data_dir_is_one_line_and_leaves_nothing(study, music, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(music.data, "reachable", lambda urls, timeout=5.0: None)  # offline
    monkeypatch.setattr(music.data, "torchvision_download",
                        lambda *a: pytest.fail("downloaded although the host is unreachable"))
    err = _main_error(study, [], capsys)
    assert "cannot be reached" in err and "data/mnist" in err
    assert _listing(tmp_path) == [], "no partial folders"
    err = _main_error(study, ["--no-download"], capsys)
    assert "--no-download" in err and _listing(tmp_path) == []


def test_a_failed_download_removes_what_it_wrote(study, music, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(music.data, "reachable", lambda urls, timeout=5.0: "example.org")

    def failing(root, dataset):
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
        print("Downloading ... Failed to download (trying next):")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...,\ngot nothing")

    monkeypatch.setattr(music.data, "torchvision_download", failing)
    err = _main_error(study, [], capsys)
    assert "download" in err and "RuntimeError" in err
    assert _listing(tmp_path) == [], "the failed download left files or folders"
    (tmp_path / "data" / "mnist").mkdir(parents=True)  # a folder of the user's is kept
    (tmp_path / "data" / "mnist" / "mine.txt").write_text("keep")
    _main_error(study, [], capsys)
    assert _listing(tmp_path) == ["data", "data/mnist", "data/mnist/mine.txt"]


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------

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


def test_modules_stay_small():
    for path in [EXAMPLES / "mnist_music.py", *EXAMPLES.glob("_music_*.py")]:
        assert len(path.read_text().splitlines()) <= 400, f"{path.name} grew past 400 lines"

