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
from _music_names import GROUPS, arrow, confusion_names, label, plot_order

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
    names = confusion_names(results)
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
    """Accuracy on each task class, the other classes and all, along pt, pt+τ1, pt+τ1+τ2,
    pt+τ1+τ2+τ3, at λ = 1 and at task arithmetic's task-aware λ; dotted: ft_c on class c."""
    per_task, digits = results["summary"]["per_task"], results["config"]["digits"]
    ticks = ["pt"] + [f"+τ{d}" for d in digits]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (prefix, title) in zip(axes, (("gradual", "λ = 1"), ("gradual_task", "task-aware λ"))):
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
    axes[0].legend(fontsize=7, title="dotted: ft_c on class c", title_fontsize=7)
    fig.suptitle("Mean ± std over seeds", fontsize=9)
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
        _band(a, lambdas, curves.mean(0), _sd(curves), color=f"C{i}", label=label(name, results))
    a.set(xlabel="λ", ylabel="validation accuracy", title="Choosing λ for pt + λτ (validation)")
    a.legend(fontsize=7)
    rows = np.asarray([s["negation_curve"] for s in seeds])  # [seed, lambda, (target, control)]
    _band(b, lambdas, rows[..., 0].mean(0), _sd(rows[..., 0]), color=COLORS["task"],
          label=f"class {forget} (forget)")
    _band(b, lambdas, rows[..., 1].mean(0), _sd(rows[..., 1]), color=COLORS["other"],
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
