"""Figures of examples/mnist_music.py (presentation only: no numbers are made here).

Every function takes the `results` dict that mnist_music.main() builds and writes a PNG into the
run directory; what it shows is aggregated over seeds (mean, with the sample std over seeds as
error bars or bands).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; works without a display
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from _music_names import GROUPS, MERGE_LABEL, arrow, confusion_names, label, lam_cell, per_class_names, plot_order

COLORS = dict(overall="#333333", task="#d62728", other="#1f77b4")


def _sd(a: np.ndarray) -> np.ndarray:
    """Sample std over seeds (axis 0, ddof 1; 0 with one seed): the tables' convention too."""
    a = np.asarray(a, dtype=float)
    return a.std(0, ddof=1) if len(a) > 1 else np.zeros_like(a[0])


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
    return np.asarray(epochs), runs.mean(0), _sd(runs)


def _band(ax, x, mean, std, **kw):
    line, = ax.plot(x, mean, marker="o", markersize=2.5, **kw)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)


def _training_runs(results: dict) -> dict:
    """Panels of training runs to plot: title -> {legend label: [stage names, stitched]}."""
    digits = results["config"]["digits"]

    def stages(order):
        return ["finetune " + ">".join(map(str, order[:k])) for k in range(1, 4)]

    orders = [(a, b, c) for a in digits for b in digits for c in digits if len({a, b, c}) == 3]
    main = arrow(">".join(map(str, digits)))
    return {
        "pretraining": {"pt": ["pretrain"], "independent": ["pretrain (independent)"],
                        "pt, continued": ["pretrain", "pretrain (continued)"]},
        "fine-tuning on one task (τ)": {f"task {d}": [f"finetune {d}"] for d in digits},
        "joint fine-tuning": {"joint": ["joint"], "joint (same steps)": ["joint (equal steps)"],
                              "independent base": ["joint (independent base)"],
                              "continued base": ["joint (continued base)"]},
        f"sequential {main}": {main: stages(digits)},
        "sequential, all six orders (first curve only)": {arrow(">".join(map(str, o))): stages(o)
                                                          for o in orders},
    }


CURVE_NAMES = dict(train_loss="training loss", val_loss="validation loss",
                   val_acc="all classes", val_task_acc="task classes",
                   val_other_acc="other classes")


def fig_curves(results: dict, out: Path, keys: list, ylabel: str, fname: str) -> str:
    panels = _training_runs(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2))
    for ax, (title, runs) in zip(axes, panels.items()):
        for i, (lab, names) in enumerate(runs.items()):
            for key, style in list(zip(keys, ("-", "--", ":")))[:1 if "first curve" in title else None]:
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
    fig.savefig(out / fname, dpi=90)
    plt.close(fig)
    return fname


def fig_confusions(results: dict, out: Path) -> str:
    """Eight distinct models (a model whose summed matrix equals a shown one is left out and named
    in that panel's title), row-normalised, readable at full width."""
    classes = results["data"]["class_names"]
    shown = {}  # name -> (matrix, [same as])
    for name in confusion_names(results):
        if name not in results["summary"]["confusion"]:
            continue
        conf = np.asarray(results["summary"]["confusion"][name], dtype=float)
        same = next((k for k, (c, _) in shown.items() if np.array_equal(c, conf)), None)
        if same is not None:
            shown[same][1].append(name)
        elif len(shown) < 8:
            shown[name] = (conf, [])
    fig, axes = plt.subplots(2, 4, figsize=(20, 10.5))
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, (name, (conf, same)) in zip(axes.flat, shown.items()):
        conf = conf / conf.sum(1, keepdims=True).clip(min=1)
        sns.heatmap(100 * conf, ax=ax, annot=True, fmt=".0f", cmap="Blues", vmin=0, vmax=100,
                    cbar=False, annot_kws={"fontsize": 9}, xticklabels=classes,
                    yticklabels=classes, square=True)
        title = label(name, results) + _tuned_lambda(results, name, "\nλ = ")
        if same:
            title += "\n(= " + "; ".join(label(n, results) for n in same) + ")"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("predicted", fontsize=10)
        ax.set_ylabel("true", fontsize=10)
        ax.tick_params(labelsize=9)
    fig.suptitle("Confusion matrices on the evaluation split, summed over seeds "
                 "(row-normalised, % of each true class)", fontsize=13)
    fig.tight_layout(h_pad=3.0, rect=(0, 0, 1, 0.965))
    fig.savefig(out / "confusion_matrices.png", dpi=110)
    plt.close(fig)
    return "confusion_matrices.png"


def _tuned_lambda(results: dict, name: str, before: str, after: str = "") -> str:
    """The λ of a tuned model (its label names the rule, not the value); '' for the others."""
    lam = lam_cell(results, name)
    return "" if lam == "—" or name.endswith("_full") or name.startswith("gradual:") else before + lam + after


def fig_per_class(results: dict, out: Path) -> str:
    """Accuracy on every class (recall, mean over seeds) of every stage: a row per model."""
    classes, digits = results["data"]["class_names"], results["config"]["digits"]
    methods = results["summary"]["methods"]
    names = [n for n in per_class_names(results) if n in methods]
    grid = np.asarray([results["summary"]["per_class"][n]["recall"] for n in names]) * 100
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(names) + 1.8))
    sns.heatmap(grid, ax=ax, annot=True, fmt=".0f", cmap="viridis", vmin=0, vmax=100,
                annot_kws={"fontsize": 8.5}, xticklabels=classes,
                yticklabels=[label(n, results) + _tuned_lambda(results, n, "  [λ ", "]") for n in names],
                cbar_kws={"label": "accuracy on the class's evaluation images (%)", "shrink": 0.6})
    for i in range(len(classes)):
        if i in digits:
            ax.get_xticklabels()[i].set_fontweight("bold")
    ax.tick_params(labelsize=9)
    ax.set(xlabel="class (bold: task classes)",
           title="Per-class accuracy across stages (evaluation split, mean over seeds)")
    fig.savefig(out / "per_class_stages.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "per_class_stages.png"


def fig_gradual(results: dict, out: Path) -> str:
    """Accuracy on each task class, the other classes and all, along pt, pt+τ1, pt+τ1+τ2,
    pt+τ1+τ2+τ3, at λ = 1 and at task arithmetic's task-aware λ; dotted: ft_c on class c."""
    per_task, digits = results["summary"]["per_task"], results["config"]["digits"]
    ticks = ["pt"] + [f"+τ{d}" for d in digits]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    chosen = lam_cell(results, "gradual_task:3")
    for ax, (prefix, title) in zip(axes, (("gradual", "λ = 1"), ("gradual_task", f"task-aware λ = {chosen}"))):
        names = ["pretrained"] + [f"{prefix}:{k}" for k in (1, 2, 3)]
        lines = [(str(d), f"class {d}", f"C{i + 2}") for i, d in enumerate(digits)]
        lines += [("other", "other classes", COLORS["other"]), ("overall", "all classes", COLORS["overall"])]
        for key, text, color in lines:
            m = [per_task[n][key]["mean"] for n in names]
            s = [per_task[n][key]["std"] for n in names]
            ax.errorbar(range(4), m, yerr=s, marker="o", capsize=3, color=color, label=text,
                        lw=2 if key == "overall" else 1.2)
            if key in map(str, digits):
                ax.axhline(per_task[f"ft:{key}"][key]["mean"], color=color, ls=":", lw=1)
        ax.set_xticks(range(4), ticks)
        ax.set(ylim=(0, 1.02), title=f"Gradual application, {title}")
    axes[0].set_ylabel("accuracy (evaluation split)")
    axes[1].legend(fontsize=8, title="dotted: ft_c on class c", title_fontsize=8,
                   loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Accuracy per task class along the gradual application (mean ± std over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "gradual.png", dpi=100, bbox_inches="tight")
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
    """Validation curves behind each λ rule, each seed's chosen λ marked on the mean curve."""
    lambdas, seeds = results["config"]["lambdas"], list(results["seeds"].values())
    forget = results["config"]["forget"]
    fig, (a, t, b) = plt.subplots(1, 3, figsize=(17, 4.6))

    def mark(ax, mean, chosen, color, marker):
        idx = [lambdas.index(x) for x in chosen]
        ax.scatter([lambdas[i] for i in idx], [mean[i] for i in idx], s=70, marker=marker,
                   facecolor="none", edgecolor=color, linewidth=1.6, zorder=5)

    for i, name in enumerate(seeds[0]["lambda_curve"]):
        curves = np.asarray([s["lambda_curve"][name] for s in seeds])
        _band(a, lambdas, curves.mean(0), _sd(curves), color=f"C{i}", label=MERGE_LABEL.get(name, name))
        mark(a, curves.mean(0), [s["lambda"][name] for s in seeds], f"C{i}", "v")
        task = np.asarray([[row[0] for row in s["lambda_task_curve"][name]] for s in seeds])
        _band(t, lambdas, task.mean(0), _sd(task), color=f"C{i}")
        mark(t, task.mean(0), [s["lambda_task"][name] for s in seeds], f"C{i}", "o")
    a.set(xlabel="λ", ylabel="validation accuracy, all classes",
          title="Overall rule: pt + λτ (▽: chosen λ, one per seed)")
    a.legend(fontsize=7)
    t.set(xlabel="λ", ylabel="validation accuracy, task classes",
          title="Task-aware rule (○: chosen λ, other classes ≥ "
                f"{100 * results['config']['control_threshold']:.0f}% of pt's)")
    rows = np.asarray([s["negation_curve"] for s in seeds])  # [seed, lambda, (target, control)]
    _band(b, lambdas, rows[..., 0].mean(0), _sd(rows[..., 0]), color=COLORS["task"],
          label=f"class {forget} (forget)")
    _band(b, lambdas, rows[..., 1].mean(0), _sd(rows[..., 1]), color=COLORS["other"],
          label="other classes (keep)")
    mark(b, rows[..., 0].mean(0), [s["lambda"]["negation"] for s in seeds], COLORS["task"], "v")
    b.set(xlabel="λ", ylabel="validation accuracy", title=f"Negation pt − λτ{forget} (▽: chosen λ)")
    b.legend(fontsize=7)
    fig.suptitle("Choosing λ on the validation split (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "lambda_selection.png", dpi=90)
    plt.close(fig)
    return "lambda_selection.png"


def write_figures(results: dict, out: Path) -> list:
    sns.set_theme(style="whitegrid", context="paper")
    return [
        fig_confusions(results, out),
        fig_per_class(results, out),
        fig_curves(results, out, ["train_loss", "val_loss"], "loss", "loss_curves.png"),
        fig_curves(results, out, ["val_acc", "val_task_acc", "val_other_acc"],
                   "validation accuracy", "accuracy_curves.png"),
        fig_gradual(results, out),
        fig_methods(results, out),
        fig_lambda(results, out),
    ]
