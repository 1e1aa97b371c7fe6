"""report.md of examples/mnist_music.py, and the tables that the README/docs render step reuses
(presentation only: every number comes from the `results` dict that mnist_music.main() builds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _music_names import GROUPS, MERGE_LABEL, headline_names, label, lam_cell, plot_order, pm, stage_rows
from _music_verdicts import MIN_SEEDS, NOT_JUDGED


def table(header: list, rows: list) -> list:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(str, r)) + " |" for r in rows] + [""])


METRIC_HEADER = ["model", "λ", "accuracy, all", "accuracy, task classes", "accuracy, other classes",
                 "macro precision", "macro recall", "macro F1"]


def metric_rows(results: dict, names: list) -> list:
    methods = results["summary"]["methods"]
    return [[label(n, results), lam_cell(results, n)] + [pm(methods[n][g]["accuracy"]) for g in GROUPS]
            + [pm(methods[n]["overall"][k]) for k in ("precision", "recall", "f1")] for n in names]


def headline_table(results: dict, names=None) -> list:
    """Overall / balanced / task / other accuracy and macro F1 with the λ column."""
    methods = results["summary"]["methods"]
    rows = [[label(n, results), lam_cell(results, n), pm(methods[n]["overall"]["accuracy"]),
             pm(methods[n]["overall"]["recall"])]
            + [pm(methods[n][g]["accuracy"]) for g in GROUPS[1:]] + [pm(methods[n]["overall"]["f1"])]
            for n in names or headline_names(results)]
    return table(["model", "λ", "accuracy, all", "balanced accuracy", "accuracy, task classes",
                  "accuracy, other classes", "macro F1"], rows)


def per_task_table(results: dict, names: list) -> list:
    """Accuracy on each task class, the other classes, all, and balanced, with λ."""
    digits, per_task = results["config"]["digits"], results["summary"]["per_task"]
    rows = [[label(n, results), lam_cell(results, n)]
            + [pm(per_task[n][k]) for k in [str(d) for d in digits] + ["other", "overall", "balanced"]]
            for n in names if n in per_task]
    return table(["model", "λ"] + [f"on {d}" for d in digits] + ["other classes", "all", "balanced"], rows)


CONTROL_NAMES = [m + s for s in ("_full", "@task", "") for m in ("consolidated", "mask_ties", "mask_random")]


def control_lines(results: dict) -> list:
    """The ctv against a TIES mask and a random mask keeping as many entries, and the IG figures."""
    seeds = list(results["seeds"].values())
    ig = [g for s in seeds for g in s["consolidation"].get("ig", [])]
    kept = [k for s in seeds for k in s["consolidation"].get("kept", [])]
    L = per_task_table(results, CONTROL_NAMES)
    if ig:
        steps = sorted({g["steps"] for g in ig})
        L += [f"Integrated gradients: {', '.join(map(str, steps))} integration points (doubled from "
              f"--ig-steps {results['config']['ig_steps']} until the completeness gap |Σ IG − gain| / "
              f"|gain| is ≤ {results['config']['ig_rtol']:g}, at most --ig-max-steps "
              f"{results['config']['ig_max_steps']}); largest gap over seeds and tasks "
              f"{max(g['relative_gap'] for g in ig):.2g}"
              + (" — ABOVE the tolerance" if max(g['relative_gap'] for g in ig) > results['config']['ig_rtol']
                 else "") + f". Entries kept per task vector: {100 * min(kept):.1f}–{100 * max(kept):.1f}% "
              f"(--ctv-density {results['config']['ctv_density']:g}; fewer only where fewer "
              "attributions are positive); both controls keep exactly as many.", ""]
    keys = [k for k in results["summary"]["comparisons"] if k.startswith("ctv − ")
            and ("mask" in k)]
    return L + comparison_rows(results, keys)


def baseline_lines(results: dict) -> list:
    digits = results["config"]["digits"]
    d = ">".join(map(str, digits))
    names = ["pretrained", f"seq:{d}", "joint_equal_steps"] + [
        f"{k}:{'>'.join(map(str, digits[:i]))}" for k in ("replay", "last") for i in (1, 2, 3)] + [
        "replay:joint", "last:joint"]
    st = next(iter(results["seeds"].values()))["steps"].get("baselines", {})
    L = [f"Replay: each fine-tuning run's data plus {results['config']['replay_per_class']} "
         "pretraining images of every class that run's data lacks (one fixed buffer per seed). Last "
         "layer only: fc3 trained, the rest frozen. Same optimizer, lr and epochs as the plain "
         "fine-tuning; each joint run takes its sequential run's step count ("
         + ", ".join(f"{k} {v}" for k, v in st.items()) + " steps).", ""]
    L += per_task_table(results, names)
    keys = [k for k in results["summary"]["comparisons"] if k.startswith(("replay", "last layer"))]
    return L + comparison_rows(results, keys)


def stage_table(results: dict) -> list:
    """Every stage, per task: accuracy on each task class, on the other classes and on all."""
    digits, per_task = results["config"]["digits"], results["summary"]["per_task"]
    rows, last = [], None
    for group, text, key in stage_rows(results):
        t = per_task[key]
        rows.append([f"**{group}**" if group != last else "", text, lam_cell(results, key)]
                    + [pm(t[str(d)]) for d in digits] + [pm(t["other"]), pm(t["overall"])])
        last = group
    return table(["stage", "model", "λ"] + [f"on {d}" for d in digits] + ["on other classes", "all"],
                 rows)


def forgetting_table(results: dict) -> list:
    """Per order: forgetting of each task at the end of the sequence, and the BWT."""
    digits, forg = results["config"]["digits"], results["summary"]["forgetting"]
    rows = []
    for order, f in forg.items():
        rows.append([order.removeprefix("seq:").replace(">", "→")]
                    + [pm(f["per_task"][str(d)]) if str(d) in f["per_task"] else "— (last)" for d in digits]
                    + [pm(f["bwt"])])
    return table(["order"] + [f"forgetting of {d} (pp)" for d in digits] + ["BWT (pp)"], rows)


def lambda_table(results: dict) -> list:
    """λ per seed under both rules (and negation's)."""
    seeds = list(results["seeds"].values())
    rows = []
    for name in seeds[0]["lambda_task"]:
        for key, rule in (("lambda", "overall accuracy"), ("lambda_task", "task-aware")):
            rows.append([MERGE_LABEL.get(name, name), rule] + [f"{s[key][name]:g}" for s in seeds])
    rows.append([label("negation", results), "forget, keep others"]
                + [f"{s['lambda']['negation']:g}" for s in seeds])
    return table(["vector", "rule"] + [f"seed {s}" for s in results["seeds"]], rows)


def comparison_rows(results: dict, keys=None) -> list:
    cmps = results["summary"]["comparisons"]
    rows = []
    for k in keys or cmps:
        c = cmps[k]
        if "by_construction" in c:
            rows.append([k, c["by_construction"], "", "", "", ""])
            continue
        note = (f" (λ = 0 in {c['lambda_zero_seeds']}/{c['n']})" if c.get("lambda_zero_seeds") else "")
        rows.append([k, f"{100 * c['mean']:+.2f}{note}",
                     f"[{100 * c['ci'][0]:+.2f}, {100 * c['ci'][1]:+.2f}]", f"{c['wins']}/{c['n']}",
                     f"{c['sign_p']:.3g}" + (f" ({c['ties']} ties)" if c["ties"] else ""),
                     " ".join(f"{100 * d:+.1f}" for d in c["diffs"])])
    return table(["comparison", "mean diff (pp)", "95% bootstrap CI", "seeds > 0", "sign test p",
                  "per seed"], rows)


def verdict_lines(results: dict) -> list:
    note = results.get("verdicts_note")
    lines = [f"**{note}**: each claim is listed with its numbers, without a verdict.", ""] if note else []
    for v in results["verdicts"]:
        head = v["verdict"].upper() if v["verdict"] != NOT_JUDGED else "NOT JUDGED"
        lines.append(f"- **{head}** — {v['claim']}. {v['evidence']}")
    return lines + [""]


def rules_text(results: dict) -> str:
    m = 100 * results["config"]["equivalence_margin"]
    return (f"Rules (fixed in advance; verdicts only with ≥ {MIN_SEEDS} seeds and never in the --quick "
            "smoke test): every comparison is paired by seed; its 95% percentile-bootstrap CI of the "
            "mean difference decides. 'A beats B' is *confirmed* when the CI lies above 0 and *refuted* "
            f"when below. Per task, 'degrades' (H0 initial, part 1) is *confirmed* when the CI of "
            f"accuracy on the task class minus the fine-tuned model's lies below −{m:.0f} pp and "
            f"*refuted* when it lies above −{m:.0f} pp; 'performs well' (part 2) is the opposite. "
            f"Transfer is *confirmed* when the CI of the gap lies within ±{m:.0f} pp and *refuted* "
            "when entirely outside. Anything else is *inconclusive*. Beside each CI: the exact "
            "two-sided sign test of the per-seed differences (ties, i.e. equal accuracies, dropped; "
            "with 5 seeds p ≥ 0.0625). λ is chosen on the validation split only; accuracies are on "
            "the evaluation split; accuracy 'on c' is over the evaluation images of class c.")


def setup_line(results: dict) -> str:
    tr, cfg = results["training"], results["config"]
    ft = tr["finetune"]
    how = (f"{ft['optimizer']} lr {ft['lr']:g}" if "sweep" not in ft else
           "SGD (momentum 0.9) and Adam at lr " + ", ".join(sorted({f"{s['lr']:g}" for s in ft["sweep"]},
                                                                   key=float, reverse=True)))
    return (f"Pretraining {tr['pretrain']['optimizer']} lr {tr['pretrain']['lr']:g}, "
            f"{tr['pretrain']['epochs']} epochs; fine-tuning {how}, {ft['epochs']} epochs per task; "
            f"batch {tr['batch_size']}; seeds {cfg['seeds']}.")


def machine_line(results: dict) -> str:
    mach, v = results.get("machine", {}), results["versions"]
    load = mach.get("load_average_at_start")
    return (f"{results['seconds']['total']:.0f} s on {results['device']}, {mach.get('cpu_count', '?')} "
            f"CPU cores ({mach.get('platform', v['platform'])}"
            + (f", load average {load[0]:g} at start" if load else "") + f"); started "
            f"{results['started']}; Python {v['python']}, torch {v['torch']}, numpy {v['numpy']}, "
            f"taskarith {v['taskarith']}.")


def write_report(results: dict, out: Path) -> None:
    cfg, data, summ = results["config"], results["data"], results["summary"]
    methods = summ["methods"]
    seeds = list(results["seeds"].values())
    digits, names = cfg["digits"], data["class_names"]
    task_names = ", ".join(f"{d} ({names[d]})" if names[d] != str(d) else str(d) for d in digits)
    L = [f"# MUSIC study: {data['dataset']}, task classes {task_names}", ""]
    if results.get("smoke_test"):
        L += ["> **Smoke test (--quick)**: 2 seeds and small settings, to check that everything runs. "
              "It gives no verdicts; its numbers say nothing about the claims.", ""]
    if data["note"]:
        L += [f"> **{data['note']}**", ""]
    L += [f"Command: `{results['command']}`  ", setup_line(results) + "  ", machine_line(results), ""]
    for key, why in results["library"]["stand_in"].items():
        L.append(f"- **{MERGE_LABEL.get(key, key)}: {why}.** Its rows show the plain sum τ1+τ2+τ3 "
                 f"(with its own λ), not the method.")
    if results["library"]["stand_in"]:
        L.append("")

    L += ["## Verdicts" if not results.get("verdicts_note") else "## Claims (no verdicts)", ""]
    L += verdict_lines(results) + [rules_text(results), ""]

    L += ["## Headline (mean ± std over seeds, %)", ""]
    L += ["λ: the scaling coefficient of a merged model (overall-accuracy rule, task-aware rule, or "
          "1 = applied whole); '(= pt)' marks a tuned λ of 0 in every seed, where the model is the "
          "pretrained model.", ""]
    L += headline_table(results) + ["![methods](methods.png)", ""]

    L += ["## Every stage, per task (mean ± std over seeds, %)", ""]
    L += ["Accuracy on the evaluation images of each task class, of the other classes and of all "
          "classes, for every model the protocol builds (sequential: after each stage of every "
          "order).", ""]
    L += stage_table(results)
    L += ["Forgetting (backward transfer) of the sequential runs: accuracy on a task right after "
          "its stage minus its accuracy after the last stage (> 0: forgotten); BWT is minus the mean "
          "forgetting of the first two tasks.", ""]
    L += forgetting_table(results)

    L += ["## Sequential vs joint fine-tuning", ""]
    st = seeds[0]["steps"]
    L += [f"Optimizer steps per run: sequential {st['sequential']}, joint ({cfg['epochs']} epochs) "
          f"{st['joint']}, joint (same steps) {st['joint_equal_steps']}"
          + (" — here the epoch-matched joint run already takes the sequential run's step count, so "
             "the two joint rows are the same run." if st["joint"] == st["sequential"] else ".")
          + " Each run starts from the same pretrained model with a fresh optimizer.", ""]
    L += ["Paired comparisons (percentage points; per seed in the last column; a comparison that "
          "is 0 by construction says so instead):", ""]
    L += comparison_rows(results)
    orders = [n for n in methods if n.startswith("seq:") and n.count(">") == 2]
    L += ["All six orders:", ""] + table(METRIC_HEADER, metric_rows(results, orders + ["joint",
                                                                                      "joint_equal_steps"]))

    L += ["## Baselines for the single-class collapse: replay and last layer only", ""]
    L += baseline_lines(results)

    L += ["## Task vectors and λ", ""]
    norms = {d: np.mean([s["tau_norm"][str(d)] for s in seeds]) for d in digits}
    L += ["‖τ‖: " + ", ".join(f"τ{d} {v:.2f}" for d, v in norms.items()) + ". Cosines: "
          + ", ".join(f"τ{k.replace(',', '·τ')} {np.mean([s['tau_cosine'][k] for s in seeds]):.3f}"
                      for k in seeds[0]["tau_cosine"]) + ".", ""]
    L += [f"λ chosen on validation, per seed, by two rules: *overall* — best accuracy on all ten "
          f"classes (ties: the smallest λ); *task-aware* — best accuracy on the task classes "
          f"{digits} among the λ whose accuracy on the other classes stays ≥ "
          f"{100 * cfg['control_threshold']:.0f}% of the pretrained model's (λ = 0 always "
          f"qualifies).", ""]
    L += lambda_table(results) + ["![lambda](lambda_selection.png)", ""]

    L += ["## Gradual application", ""]
    grad = ["pretrained"] + [f"{p}:{k}" for p in ("gradual", "gradual_tuned", "gradual_task")
                             for k in (1, 2, 3)]
    L += table(METRIC_HEADER, metric_rows(results, grad)) + ["![gradual](gradual.png)", ""]

    L += ["## The consolidated vector against its controls (mean ± std over seeds, %)", ""]
    L += ["Each control keeps from every task vector as many entries as the ctv keeps: the largest "
          "magnitudes (TIES mask) or a uniformly random set (random mask), then elects signs by the "
          "sum and averages what agrees; at λ = 1 and at both tuned λ.", ""]
    L += control_lines(results)

    f = cfg["forget"]
    L += [f"## Task negation: forget {f}", ""]
    others = [c for c in range(10) if c != f]

    def neg(n):  # forgotten class, all classes, mean of the kept classes
        kept = np.mean([[s["metrics"][n]["per_class"]["recall"][c] for c in others] for s in seeds])
        return [label(n, results), lam_cell(results, n), pm(summ["per_task"][n][str(f)]),
                pm(methods[n]["overall"]["accuracy"]), f"{100 * kept:.1f}"]

    L += [(f"λ chosen on validation: lowest accuracy on {f} while the other classes keep ≥ "
           f"{100 * cfg['control_threshold']:.0f}% of the pretrained model's accuracy."), ""]
    L += table(["model", "λ", f"accuracy on {f} (forget)", "accuracy, all",
                f"mean accuracy of the classes other than {f} (keep)"], [neg("pretrained"), neg("negation")])

    L += ["## Transfer to a second pretrained model", ""]
    tr = [f"transfer:{k}:{w}" for k in ("independent", "continued") for w in ("base", "base+tau", "finetuned")]
    L += table(METRIC_HEADER, metric_rows(results, tr))
    L += [("Parameter space: cosine(τ_joint, τ_new) where τ_new is θ_new's own joint fine-tune; "
           "‖(θ_new + τ_joint) − θ_new,ft‖ / ‖τ_new‖; share of evaluation images on which θ_new + "
           "τ_joint and θ_new,ft predict the same class (means over seeds)."), ""]
    L += transfer_table(results)

    L += ["## Per-class results (mean over seeds, %)", ""]
    for metric in ("precision", "recall", "f1"):
        L += [f"{metric.capitalize()} per class:", ""]
        L += table(["model", "λ"] + names, [[label(n, results), lam_cell(results, n)]
                                            + [f"{100 * v:.1f}" for v in summ["per_class"][n][metric]]
                                            for n in headline_names(results)])
    L += ["![per-class accuracy](per_class_stages.png)", "", "![confusion](confusion_matrices.png)", ""]

    L += ["## All models (mean ± std over seeds, %)", ""]
    L += [("Task classes: accuracy over the images of the task classes; macro precision/recall/F1 "
           "average the per-class scores, where a class's precision counts every prediction of it."), ""]
    for g in GROUPS:
        L += [f"On {g} classes:" if g != "overall" else "Overall:", ""]
        L += table(["model", "λ", "accuracy", "macro precision", "macro recall", "macro F1"],
                   [[label(n, results), lam_cell(results, n)]
                    + [pm(methods[n][g][k]) for k in ("accuracy", "precision", "recall", "f1")]
                    for n in plot_order(results)])

    L += ["## Training curves", "", "![loss](loss_curves.png)", "", "![accuracy](accuracy_curves.png)",
          "", "## Data", ""]
    L += [f"- {p}" for p in data["provenance"]]
    L += [f"- split sizes: {data['sizes']} (split seed {cfg['split_seed']})",
          f"- evaluation images per class: {data['eval_class_counts']}; the task classes are "
          f"{100 * data['task_share']['evaluation']:.1f}% of them ({100 * data['task_share']['source']:.1f}% "
          f"of the test split; in test-split mode the evaluation part is drawn first, stratified to "
          f"the test split's class mix). Balanced accuracy: the mean of the ten per-class accuracies "
          f"(macro recall), which does not depend on the mix",
          f"- split seed per study seed: {data.get('split_seeds')}"
          + (" (--vary-split)" if cfg.get("vary_split") else " (fixed: seeds vary initialisation and "
                                                             "shuffling only)"),
          "- pixels scaled to [-1, 1] (x/127.5 − 1, the same as ToTensor + Normalize(0.5, 0.5))", ""]
    (out / "report.md").write_text("\n".join(L))


def transfer_table(results: dict) -> list:
    seeds = list(results["seeds"].values())
    rows = [[k] + [f"{np.mean([s['transfer'][k][m] for s in seeds]):.3f}"
                   for m in ("cosine_tau_joint_vs_tau_new", "relative_distance", "prediction_agreement")]
            for k in ("independent", "continued")]
    return table(["second model", "cosine", "relative distance", "prediction agreement"], rows)

