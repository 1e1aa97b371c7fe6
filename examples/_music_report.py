"""Figures and report.md for examples/mnist_music.py (presentation only: no numbers are made here).

Every function takes the `results` dict that mnist_music.main() builds and writes into the run
directory; what it shows is aggregated over seeds (mean, with std as error bars or bands).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; works without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

GROUPS = ("overall", "task", "other")
COLORS = dict(overall="#333333", task="#d62728", other="#1f77b4")


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

def arrow(order: str) -> str:
    return order.replace(">", "→")


def label(name: str, results: dict) -> str:
    """Human name of a model key of results['summary']['methods']."""
    cfg, stand_in = results["config"], results["library"]["stand_in"]
    digits = cfg["digits"]
    fixed = {
        "pretrained": "pretrained (pt)",
        "joint": f"joint ({cfg['epochs']} epochs)",
        "joint_equal_steps": "joint (same steps as sequential)",
        "task_arithmetic": "task arithmetic pt + λ(τ1+τ2+τ3)",
        "ties": "TIES", "dare": "DARE", "consolidated": "consolidated (IG)",
        "consolidated_full": "consolidated (IG), λ = 1",
        "negation": f"negation pt − λτ{cfg['forget']}",
    }
    if name in fixed:
        text = fixed[name]
        if name.removesuffix("_full") in stand_in:
            text += " [plain-sum stand-in]"
        return text
    kind, _, rest = name.partition(":")
    if kind == "seq":
        return f"sequential {arrow(rest)}"
    if kind == "ft":
        return f"fine-tuned on {rest} only (pt + τ{rest})"
    if kind in ("gradual", "gradual_tuned"):
        taus = " + ".join(f"τ{d}" for d in digits[:int(rest)])
        return f"pt + {taus}" if kind == "gradual" else f"pt + λ({taus})"
    if kind == "transfer":
        base, _, what = rest.partition(":")
        return {"base": f"θ_new ({base})", "base+tau": f"θ_new ({base}) + τ_joint",
                "finetuned": f"θ_new ({base}) fine-tuned jointly"}[what]
    return name


def headline_names(results: dict) -> list:
    seq = "seq:" + ">".join(map(str, results["config"]["digits"]))
    return ["pretrained", "joint", "joint_equal_steps", seq, "task_arithmetic", "ties", "dare",
            "consolidated", "consolidated_full", "negation"]


def plot_order(results: dict) -> list:
    """Every evaluated model except the gradual-application steps, grouped for reading."""
    names = list(results["summary"]["methods"])
    first = ["pretrained", "joint", "joint_equal_steps"]
    groups = {"seq:": 1, "ft:": 2, "transfer:": 4}  # everything else (merges, negation): 3

    def rank(n):
        if n in first:
            return (0, first.index(n))
        return (next((g for prefix, g in groups.items() if n.startswith(prefix)), 3), 0)

    return sorted((n for n in names if not n.startswith("gradual")), key=rank)  # stable sort


def pm(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def _curve_stats(results: dict, names: list, key: str):
    """Stitch the named training runs (stages) and return epochs, mean and std over seeds."""
    runs = []
    for seed in results["seeds"].values():
        epochs, values, offset = [], [], 0.0
        for name in names:
            c = seed["curves"][name]
            epochs += [offset + e for e in c["epoch"]]
            values += c[key]
            offset += c["epoch"][-1]
        runs.append(values)
    runs = np.asarray(runs)
    return np.asarray(epochs), runs.mean(0), runs.std(0)


def _band(ax, x, mean, std, **kw):
    line, = ax.plot(x, mean, marker="o", markersize=2.5, **kw)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)


def _training_runs(results: dict) -> dict:
    """Panels of training runs to plot: title -> {legend label: [stage names, stitched]}."""
    digits = results["config"]["digits"]

    def stages(order):
        return ["finetune " + ">".join(map(str, order[:k])) for k in range(1, 4)]

    orders = [(a, b, c) for a in digits for b in digits for c in digits if len({a, b, c}) == 3]
    return {
        "pretraining": {"pt": ["pretrain"], "independent": ["pretrain (independent)"],
                        "pt, continued": ["pretrain", "pretrain (continued)"]},
        "fine-tuning on one task (τ)": {f"task {d}": [f"finetune {d}"] for d in digits},
        "joint fine-tuning": {"joint": ["joint"], "joint (same steps)": ["joint (equal steps)"],
                              "independent base": ["joint (independent base)"],
                              "continued base": ["joint (continued base)"]},
        "sequential, all six orders": {arrow(">".join(map(str, o))): stages(o) for o in orders},
    }


CURVE_NAMES = dict(train_loss="training loss", val_loss="validation loss",
                   val_acc="all classes", val_task_acc="task classes",
                   val_other_acc="other classes")


def fig_curves(results: dict, out: Path, keys: list, ylabel: str, fname: str) -> str:
    panels = _training_runs(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4.2))
    for ax, (title, runs) in zip(axes, panels.items()):
        for i, (lab, names) in enumerate(runs.items()):
            for key, style in zip(keys, ("-", "--", ":")):
                x, m, s = _curve_stats(results, names, key)
                _band(ax, x, m, s, linestyle=style, color=f"C{i}",
                      label=lab if style == "-" else None)
        if title.startswith("sequential"):  # stage boundaries
            for b in (1, 2):
                ax.axvline(b * results["config"]["epochs"], color="grey", lw=0.6, ls=":")
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.legend(fontsize=7)
    styles = ", ".join(f"{st}: {CURVE_NAMES[k]}" for k, st in zip(keys, ("solid", "dashed", "dotted")))
    fig.suptitle(f"{ylabel.capitalize()} per epoch, mean ± std over seeds ({styles})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / fname, dpi=80)
    plt.close(fig)
    return fname


def fig_confusions(results: dict, out: Path) -> str:
    names = headline_names(results)[:8]
    classes = results["data"]["class_names"]
    fig, axes = plt.subplots(2, 4, figsize=(17, 8.5))
    for ax, name in zip(axes.flat, names):
        conf = np.asarray(results["summary"]["confusion"][name], dtype=float)
        conf = conf / conf.sum(1, keepdims=True).clip(min=1)
        sns.heatmap(100 * conf, ax=ax, annot=True, fmt=".0f", cmap="Blues", vmin=0, vmax=100,
                    cbar=False, annot_kws={"fontsize": 6.5}, xticklabels=classes,
                    yticklabels=classes, square=True)
        ax.set_title(label(name, results), fontsize=9)
        ax.set(xlabel="predicted", ylabel="true")
        ax.tick_params(labelsize=7)
    fig.suptitle("Confusion matrices on the evaluation split, summed over seeds "
                 "(row-normalised, % of each true class)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "confusion_matrices.png", dpi=70)
    plt.close(fig)
    return "confusion_matrices.png"


def fig_gradual(results: dict, out: Path) -> str:
    methods, digits = results["summary"]["methods"], results["config"]["digits"]
    ticks = ["pt"] + [f"+τ{d}" for d in digits]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for prefix, style, lam in (("gradual", "-", "λ = 1"), ("gradual_tuned", "--", "λ = λ*")):
        names = ["pretrained"] + [f"{prefix}:{k}" for k in (1, 2, 3)]
        for g in GROUPS:
            m = [methods[n][g]["accuracy"]["mean"] for n in names]
            s = [methods[n][g]["accuracy"]["std"] for n in names]
            ax.errorbar(range(4), m, yerr=s, ls=style, marker="o", capsize=3, color=COLORS[g],
                        label=f"{g} classes, {lam}" if g != "overall" else f"overall, {lam}")
    ax.set_xticks(range(4), ticks)
    ax.set(ylim=(0, 1.02), ylabel="accuracy (evaluation split)",
           title="Gradual application of task vectors")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gradual.png", dpi=90)
    plt.close(fig)
    return "gradual.png"


def fig_methods(results: dict, out: Path) -> str:
    methods = results["summary"]["methods"]
    names = plot_order(results)
    fig, ax = plt.subplots(figsize=(9, 0.34 * len(names) + 1.2))
    y = np.arange(len(names))
    for i, g in enumerate(GROUPS):
        m = [methods[n][g]["accuracy"]["mean"] for n in names]
        s = [methods[n][g]["accuracy"]["std"] for n in names]
        ax.barh(y + (i - 1) * 0.27, m, height=0.27, xerr=s, color=COLORS[g], capsize=2,
                label=f"{g} classes" if g != "overall" else "overall", error_kw={"lw": 0.8})
    ax.set_yticks(y, [label(n, results) for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="accuracy on the evaluation split (mean ± std over seeds)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.savefig(out / "methods.png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "methods.png"


def fig_lambda(results: dict, out: Path) -> str:
    lambdas, seeds = results["config"]["lambdas"], list(results["seeds"].values())
    forget = results["config"]["forget"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(seeds[0]["lambda_curve"]):
        curves = np.asarray([s["lambda_curve"][name] for s in seeds])
        _band(a, lambdas, curves.mean(0), curves.std(0), color=f"C{i}", label=label(name, results))
    a.set(xlabel="λ", ylabel="validation accuracy", title="Choosing λ for pt + λτ (validation)")
    a.legend(fontsize=7)
    rows = np.asarray([s["negation_curve"] for s in seeds])  # [seed, lambda, (target, control)]
    _band(b, lambdas, rows[..., 0].mean(0), rows[..., 0].std(0), color=COLORS["task"],
          label=f"class {forget} (forget)")
    _band(b, lambdas, rows[..., 1].mean(0), rows[..., 1].std(0), color=COLORS["other"],
          label="other classes (keep)")
    b.set(xlabel="λ", ylabel="validation accuracy", title=f"Negation pt − λτ{forget}")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lambda_selection.png", dpi=80)
    plt.close(fig)
    return "lambda_selection.png"


def write_figures(results: dict, out: Path) -> list:
    sns.set_theme(style="whitegrid", context="paper")
    return [
        fig_confusions(results, out),
        fig_curves(results, out, ["train_loss", "val_loss"], "loss", "loss_curves.png"),
        fig_curves(results, out, ["val_acc", "val_task_acc", "val_other_acc"],
                   "validation accuracy", "accuracy_curves.png"),
        fig_gradual(results, out),
        fig_methods(results, out),
        fig_lambda(results, out),
    ]


# ---------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------

def _table(header: list, rows: list) -> list:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(str, r)) + " |" for r in rows] + [""])


def _metric_rows(results: dict, names: list) -> list:
    methods = results["summary"]["methods"]
    return [[label(n, results)] + [pm(methods[n][g]["accuracy"]) for g in GROUPS]
            + [pm(methods[n]["overall"][k]) for k in ("precision", "recall", "f1")]
            for n in names]


METRIC_HEADER = ["model", "accuracy, all", "accuracy, task classes", "accuracy, other classes",
                 "macro precision", "macro recall", "macro F1"]


def write_report(results: dict, out: Path) -> None:
    cfg, data, summ = results["config"], results["data"], results["summary"]
    methods, cmps = summ["methods"], summ["comparisons"]
    seeds = list(results["seeds"].values())
    digits, names = cfg["digits"], data["class_names"]
    task_names = ", ".join(f"{d} ({names[d]})" if names[d] != str(d) else str(d) for d in digits)
    L = [f"# MUSIC study: {data['dataset']}, task classes {task_names}", ""]
    if data["note"]:
        L += [f"> **{data['note']}**", ""]
    L += [f"Command: `{results['command']}`  ",
          (f"Seeds {cfg['seeds']}; device {results['device']}; {results['seconds']['total']:.0f} s; "
           f"started {results['started']}; taskarith {results['versions']['taskarith']}, "
           f"torch {results['versions']['torch']}."), ""]
    lib = results["library"]
    for key, why in lib["stand_in"].items():
        L.append(f"- **{label(key, results).split(' [')[0]}: {why}.** Its rows show the plain sum "
                 f"τ1+τ2+τ3 (with its own λ), not the method.")
    if lib["stand_in"]:
        L.append("")

    L += ["## Verdicts", ""]
    for v in results["verdicts"]:
        L.append(f"- **{v['verdict'].upper()}** — {v['claim']}. {v['evidence']}")
    L += ["", ("Rules (fixed in advance): a claim that one model beats another is *confirmed* when "
               "the 95% bootstrap CI of the paired per-seed difference lies above 0, *refuted* when it "
               "lies below 0, *inconclusive* otherwise (always with a single seed). Transfer is "
               f"*confirmed* when the CI of the accuracy gap lies within "
               f"±{100 * cfg['equivalence_margin']:.0f} pp, *refuted* when it lies entirely outside. "
               "All accuracies are on the evaluation split; λ is chosen on the validation split only."),
          ""]

    L += ["## Headline (mean ± std over seeds, %)", ""]
    L += _table(METRIC_HEADER, _metric_rows(results, headline_names(results)))
    L += ["![methods](methods.png)", ""]

    L += ["## Sequential vs joint fine-tuning", ""]
    st = seeds[0]["steps"]
    L += [f"Optimizer steps per run: sequential {st['sequential']}, joint ({cfg['epochs']} epochs) "
          f"{st['joint']}, joint (same steps) {st['joint_equal_steps']}"
          + (" — here the epoch-matched joint run already takes the sequential run's step count, so "
             "the two joint rows are the same run." if st["joint"] == st["sequential"] else ".")
          + " Each run starts from the same pretrained model with a fresh optimizer.", ""]
    rows = [[k, f"{100 * c['mean']:+.2f}", f"[{100 * c['ci'][0]:+.2f}, {100 * c['ci'][1]:+.2f}]",
             f"{c['wins']}/{c['n']}", " ".join(f"{100 * d:+.1f}" for d in c["diffs"])]
            for k, c in cmps.items()]
    L += ["Paired comparisons of overall accuracy (percentage points; per seed in the last column):", ""]
    L += _table(["comparison", "mean diff", "95% bootstrap CI", "seeds > 0", "per seed"], rows)
    orders = [n for n in methods if n.startswith("seq:")] + ["joint", "joint_equal_steps"]
    L += ["All six orders:", ""] + _table(METRIC_HEADER, _metric_rows(results, orders))

    L += ["## Task vectors", ""]
    norms = {d: np.mean([s["tau_norm"][str(d)] for s in seeds]) for d in digits}
    L += ["‖τ‖: " + ", ".join(f"τ{d} {v:.2f}" for d, v in norms.items()) + ". Cosines: "
          + ", ".join(f"τ{k.replace(',', '·τ')} {np.mean([s['tau_cosine'][k] for s in seeds]):.3f}"
                      for k in seeds[0]["tau_cosine"]) + ".", ""]
    lam_rows = [[label(k, results)] + [f"{s['lambda'][k]:.2f}" for s in seeds]
                for k in seeds[0]["lambda"]]
    L += ["λ chosen on validation, per seed:", ""]
    L += _table(["vector"] + [f"seed {s}" for s in results["seeds"]], lam_rows)
    L += ["![lambda](lambda_selection.png)", ""]

    L += ["## Gradual application", ""]
    grad = ["pretrained"] + [f"gradual:{k}" for k in (1, 2, 3)] + [f"gradual_tuned:{k}" for k in (1, 2, 3)]
    L += _table(METRIC_HEADER, _metric_rows(results, grad))
    L += ["![gradual](gradual.png)", ""]

    f = cfg["forget"]
    L += [f"## Task negation: forget {f}", ""]
    def recall_of(n, c):  # mean ± std over seeds of the accuracy on images of class c
        v = [s["metrics"][n]["per_class"]["recall"][c] for s in seeds]
        return pm(dict(mean=np.mean(v), std=np.std(v, ddof=1) if len(v) > 1 else 0.0))

    others = [c for c in range(10) if c != f]

    def neg(n):  # forgotten class, all classes, mean of the kept classes
        kept = np.mean([[s["metrics"][n]["per_class"]["recall"][c] for c in others] for s in seeds])
        return [label(n, results), recall_of(n, f), pm(methods[n]["overall"]["accuracy"]),
                f"{100 * kept:.1f}"]

    L += [(f"λ chosen on validation: lowest accuracy on {f} while the other classes keep ≥ "
           f"{100 * cfg['control_threshold']:.0f}% of the pretrained model's accuracy."), ""]
    L += _table(["model", f"accuracy on {f} (forget)", "accuracy, all",
                 f"mean accuracy of the classes other than {f} (keep)"],
                [neg("pretrained"), neg("negation")])

    L += ["## Transfer to a second pretrained model", ""]
    tr = [f"transfer:{k}:{w}" for k in ("independent", "continued")
          for w in ("base", "base+tau", "finetuned")]
    L += _table(METRIC_HEADER, _metric_rows(results, tr))
    rows = [[k] + [f"{np.mean([s['transfer'][k][m] for s in seeds]):.3f}"
                   for m in ("cosine_tau_joint_vs_tau_new", "relative_distance",
                             "prediction_agreement")] for k in ("independent", "continued")]
    L += [("Parameter space: cosine(τ_joint, τ_new) where τ_new is θ_new's own joint fine-tune; "
           "‖(θ_new + τ_joint) − θ_new,ft‖ / ‖τ_new‖; share of evaluation images on which θ_new + "
           "τ_joint and θ_new,ft predict the same class (means over seeds)."), ""]
    L += _table(["second model", "cosine", "relative distance", "prediction agreement"], rows)

    L += ["## Per-class results (mean over seeds, %)", ""]
    keys = headline_names(results)
    for metric in ("precision", "recall", "f1"):
        L += [f"{metric.capitalize()} per class:", ""]
        L += _table(["model"] + names, [[label(n, results)] + [f"{100 * v:.1f}" for v in
                                         summ["per_class"][n][metric]] for n in keys])
    L += ["![confusion](confusion_matrices.png)", ""]

    L += ["## All models (mean ± std over seeds, %)", ""]
    L += [("Task classes: accuracy over the images of the task classes; macro precision/recall/F1 "
           "average the per-class scores, where a class's precision counts every prediction of it."), ""]
    for g in GROUPS:
        L += [f"On {g} classes:" if g != "overall" else "Overall:", ""]
        L += _table(["model", "accuracy", "macro precision", "macro recall", "macro F1"],
                    [[label(n, results)] + [pm(methods[n][g][k]) for k in
                                            ("accuracy", "precision", "recall", "f1")]
                     for n in plot_order(results)])

    L += ["## Training curves", "", "![loss](loss_curves.png)", "", "![accuracy](accuracy_curves.png)",
          "", "## Data", ""]
    L += [f"- {p}" for p in data["provenance"]]
    L += [f"- split sizes: {data['sizes']} (split seed {cfg['split_seed']})",
          "- pixels scaled to [-1, 1] (x/127.5 − 1, the same as ToTensor + Normalize(0.5, 0.5))", ""]
    (out / "report.md").write_text("\n".join(L))
