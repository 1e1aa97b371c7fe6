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
           f"({100 * share['source']:.1f}% of the test split)." if share else "")
    return (f"{d['dataset']}, {d['mode']} mode: {sizes['pretrain']} pretraining, {sizes['val']} "
            f"validation, {sizes['task_per_class']} images per task class, {sizes['eval']} evaluation "
            f"images.{mix} " + setup_line(results) + " " + machine_line(results))


def readme_block(results: dict) -> str:
    """Accuracy per task of the main models, with λ, and each verdict with its deciding difference."""
    digits, per_task = results["config"]["digits"], results["summary"]["per_task"]
    names = ["pretrained", "joint_equal_steps", seq_name(results), "gradual:3", "task_arithmetic",
             "task_arithmetic@task", "ties@task", "ties_full", "dare@task", "consolidated@task",
             "consolidated_full"]
    rows = [[label(n, results), lam_cell(results, n), pm(per_task[n]["overall"])]
            + [pm(per_task[n][str(d)]) for d in digits] + [pm(per_task[n]["other"])] for n in names]
    L = [f"`{results['command']}`", "", run_line(results), ""]
    L += table(["model", "λ", "all classes"] + [f"on {d}" for d in digits] + ["other classes"], rows)
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
    L += ["λ per seed under each rule:", ""] + lambda_table(results)
    tr = [f"transfer:{k}:{w}" for k in ("independent", "continued") for w in ("base", "base+tau", "finetuned")]
    L += ["Transfer (τ_joint from pt applied to θ_new):", ""]
    L += table(METRIC_HEADER, metric_rows(results, tr)) + transfer_table(results)
    captions = {"methods.png": "Every model on the evaluation split (mean ± std over seeds)",
                "gradual.png": "Gradual application per task, λ = 1 and the task-aware λ",
                "accuracy_curves.png": "Validation accuracy per epoch of every training run",
                "loss_curves.png": "Training and validation loss per epoch",
                "confusion_matrices.png": "Confusion matrices, summed over seeds, row-normalised",
                "lambda_selection.png": "Choosing λ on the validation split (merges, negation)"}
    for fig in results["figures"]:
        L += [f"![{captions.get(fig, fig)}](figures/study/{name}-{fig})", ""]
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
