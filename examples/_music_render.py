"""The render step of examples/mnist_music.py: README.md's and docs/study.md's study numbers are
generated from runs' results.json, never typed in.

`python examples/mnist_music.py --render runs/<name>/results.json ...` replaces, in README.md and
docs/study.md, the text between the markers

    <!-- BEGIN generated: readme:<name> ... -->  ...  <!-- END generated: readme:<name> -->
    <!-- BEGIN generated: study:<name> ... -->   ...  <!-- END generated: study:<name> -->

(<name>: the run's folder name), and copies the run's figures to docs/figures/study/<name>-*.png.
A smoke test (--quick) is refused: the docs show full runs only.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from _music_names import label, lam_cell, pm, seq_name
from _music_report import (
    METRIC_HEADER,
    baseline_lines,
    control_lines,
    forgetting_table,
    headline_table,
    lambda_table,
    machine_line,
    metric_rows,
    setup_line,
    stage_table,
    table,
    transfer_table,
    verdict_lines,
)
from _music_sweep import sweep_answer, sweep_table, verdict_matrix
from _music_verdicts import NOT_JUDGED, pp

REPO = Path(__file__).resolve().parents[1]
TARGETS = (REPO / "README.md", REPO / "docs" / "study.md")
FIGURES = REPO / "docs" / "figures" / "study"
BEGIN = "<!-- BEGIN generated: {} (examples/mnist_music.py --render; do not edit by hand) -->"
END = "<!-- END generated: {} -->"


def run_line(results: dict) -> str:
    d = results["data"]
    sizes = d["sizes"]
    share = d.get("task_share")
    mix = (f" The task classes are {100 * share['evaluation']:.1f}% of the evaluation images "
           f"({100 * share['source']:.1f}% of the test split" + ("; the evaluation part is stratified to "
           "its class mix" if d["mode"] == "test-split" else "") + ")." if share else "")
    if d.get("split_seeds") and len(set(d["split_seeds"].values())) > 1:
        mix += " The data split varies with the seed (--vary-split)."
    return (f"{d['dataset']}, {d['mode']} mode: {sizes['pretrain']} pretraining, {sizes['val']} "
            f"validation, {sizes['task_per_class']} images per task class, {sizes['eval']} evaluation "
            f"images.{mix} " + setup_line(results) + " " + machine_line(results))


def readme_block(results: dict) -> str:
    """Accuracy per task of the main models, with λ, and each verdict with its deciding difference."""
    digits, per_task = results["config"]["digits"], results["summary"]["per_task"]
    seq = seq_name(results).removeprefix("seq:")
    names = ["pretrained", "joint_equal_steps", seq_name(results), "gradual:3", "task_arithmetic",
             "task_arithmetic@task", "ties@task", "ties_full", "dare@task", "consolidated@task",
             "consolidated_full", "mask_ties_full", "mask_random_full", f"replay:{seq}", "replay:joint",
             f"last:{seq}", "last:joint"]
    rows = [[label(n, results), lam_cell(results, n), pm(per_task[n]["overall"]), pm(per_task[n]["balanced"])]
            + [pm(per_task[n][str(d)]) for d in digits] + [pm(per_task[n]["other"])]
            for n in names if n in per_task]
    L = [f"`{results['command']}`", "", run_line(results), ""]
    L += table(["model", "λ", "all classes", "balanced"] + [f"on {d}" for d in digits] + ["other classes"],
               rows)
    cmps = results["summary"]["comparisons"]
    for v in results["verdicts"]:
        head = "NOT JUDGED" if v["verdict"] == NOT_JUDGED else v["verdict"].upper()
        why = f" ({pp(cmps[v['decided_by']])})" if v.get("decided_by") in cmps else ""
        L.append(f"- **{head}** — {v['claim']}{why}.")
    return "\n".join(L)


def study_block(name: str, results: dict) -> str:
    """One run's section of docs/study.md."""
    st = next(iter(results["seeds"].values()))["steps"]
    L = ["```bash", results["command"], "```", "", run_line(results),
         f"Optimizer steps: sequential {st['sequential']}, joint {st['joint']}, joint (same steps) "
         f"{st['joint_equal_steps']}.", ""]
    L += verdict_lines(results)
    L += ["Mean ± std over seeds, % on the evaluation split:", ""] + headline_table(results)
    L += ["Every stage, per task (accuracy on the evaluation images of each task class, the other "
          "classes, and all):", ""] + stage_table(results)
    L += ["Forgetting in the sequential runs (accuracy on a task right after its stage minus at "
          "the end; BWT = minus the mean forgetting of the first two tasks):", ""]
    L += forgetting_table(results)
    L += ["Baselines for the single-class collapse:", ""] + baseline_lines(results)
    L += ["The consolidated vector against a TIES mask and a random mask keeping as many entries:",
          ""] + control_lines(results)
    L += ["λ per seed under each rule:", ""] + lambda_table(results)
    tr = [f"transfer:{k}:{w}" for k in ("independent", "continued") for w in ("base", "base+tau", "finetuned")]
    L += ["Transfer (τ_joint from pt applied to θ_new):", ""]
    L += table(METRIC_HEADER, metric_rows(results, tr)) + transfer_table(results)
    captions = {"methods.png": "Every model on the evaluation split (mean ± std over seeds)",
                "gradual.png": "Gradual application per task, λ = 1 and the task-aware λ",
                "accuracy_curves.png": "Validation accuracy per epoch of every training run",
                "loss_curves.png": "Training and validation loss per epoch",
                "confusion_matrices.png": "Confusion matrices, summed over seeds, row-normalised",
                "per_class_stages.png": "Per-class accuracy across stages (mean over seeds)",
                "lambda_selection.png": "Choosing λ on the validation split (merges, negation)"}
    for fig in results["figures"]:
        L += [f"![{captions.get(fig, fig)}](figures/study/{name}-{fig})", ""]
    return "\n".join(L).rstrip()


def sweep_block(name: str, results: dict, figures: bool) -> str:
    """A sweep's section: the answer per setting, the table, every verdict per setting."""
    L = [f"`{results['command']}`", "", run_line(results), "", f"**{sweep_answer(results)}**", ""]
    L += sweep_table(results)
    if figures:
        L += [f"![Fine-tuning sweep](figures/study/{name}-sweep.png)", "",
              "Every verdict, per fine-tuning setting:", ""] + verdict_matrix(results)
    return "\n".join(L).rstrip()


def verdict_table(runs: list) -> str:
    """One row per claim, one column per run: the verdicts side by side."""
    claims = {}
    for _, results in runs:
        for v in results["verdicts"]:
            claims.setdefault(v["claim"].split(":")[0], {})
    head = ["claim"]
    for name, results in runs:
        ft = results["training"]["finetune"]
        head.append(f"{name} ({results['data']['dataset']}, fine-tuning {ft['optimizer']} lr {ft['lr']:g})")
        for v in results["verdicts"]:
            claims[v["claim"].split(":")[0]][name] = v["verdict"]
    rows = [[claim] + [by_run.get(name, "—") for name, _ in runs] for claim, by_run in claims.items()]
    return "\n".join(table(head, rows)).rstrip()


def replace_block(text: str, block_id: str, content: str) -> tuple[str, bool]:
    pattern = re.compile(re.escape(BEGIN.format(block_id)) + r"\n.*?" + re.escape(END.format(block_id)),
                         re.S)
    new = f"{BEGIN.format(block_id)}\n{content}\n{END.format(block_id)}"
    out, n = pattern.subn(lambda _: new, text)
    return out, n > 0


def render(paths, targets=TARGETS, figures=FIGURES) -> dict:
    """Write every generated block of these runs into `targets`; returns {target: [block ids]}."""
    blocks, runs = {}, []
    for path in map(Path, paths):
        path = path / "results.json" if path.is_dir() else path
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: --render {path}: {exc}") from None
        if results.get("smoke_test"):
            raise SystemExit(f"error: --render {path}: a smoke test (--quick); the docs show full "
                             f"runs only")
        name = path.parent.name
        Path(figures).mkdir(parents=True, exist_ok=True)
        for fig in results["figures"]:
            shutil.copyfile(path.parent / fig, Path(figures) / f"{name}-{fig}")
        if "sweep" in results:
            blocks[f"readme-sweep:{name}"] = sweep_block(name, results, figures=False)
            blocks[f"sweep:{name}"] = sweep_block(name, results, figures=True)
            continue
        blocks[f"readme:{name}"] = readme_block(results)
        blocks[f"study:{name}"] = study_block(name, results)
        runs.append((name, results))
    if runs:
        blocks["verdicts:" + "+".join(name for name, _ in runs)] = verdict_table(runs)
    done = {}
    for target in map(Path, targets):
        text = original = target.read_text()
        done[str(target)] = []
        for block_id, content in blocks.items():
            text, found = replace_block(text, block_id, content)
            if found:
                done[str(target)].append(block_id)
        if text != original:
            target.write_text(text)
        print(f"{target}: {', '.join(done[str(target)]) or 'no block of these runs (markers missing)'}")
    return done
