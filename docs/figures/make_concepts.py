"""Draw docs/figures/concepts.png: task vectors as arrows in weight space, and a TIES merge.

Run from the repository root: ``python docs/figures/make_concepts.py`` (needs matplotlib).
The right panel is computed with taskarith itself.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import taskarith as ta

OUT = Path(__file__).resolve().parent / "concepts.png"
BLUE, ORANGE, GREEN, RED, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#555555"


def arrow(ax, start, delta, color, label, offset=(0.0, 0.0), style="-"):
    ax.annotate("", xy=start + delta, xytext=start,
                arrowprops={"arrowstyle": "-|>", "color": color, "lw": 2, "linestyle": style, "shrinkA": 0, "shrinkB": 0})
    mid = start + delta / 2 + np.asarray(offset)
    ax.text(*mid, label, color=color, fontsize=11, ha="center", va="center")


def weight_space(ax):
    pre = np.array([0.0, 0.0])
    tau_a, tau_b = np.array([2.2, 0.5]), np.array([0.6, 1.9])
    arrow(ax, pre, tau_a, BLUE, r"$\tau_a$", (0.05, -0.3))
    arrow(ax, pre, tau_b, ORANGE, r"$\tau_b$", (-0.3, 0.05))
    arrow(ax, pre + tau_a, tau_b, ORANGE, "", style="--")
    arrow(ax, pre, -0.8 * tau_a, RED, r"$-0.8\,\tau_a$", (0.0, -0.3))
    arrow(ax, pre, 0.5 * (tau_a + tau_b), GREEN, "", style=":")
    points = {
        r"$\theta_{pre}$": (pre, GREY, (-0.3, 0.25)),
        r"$\theta_a = \theta_{pre} + \tau_a$": (pre + tau_a, BLUE, (0.35, -0.3)),
        r"$\theta_b$": (pre + tau_b, ORANGE, (0.0, 0.25)),
        r"$\theta_{pre} + \tau_a + \tau_b$" + "\n(both tasks)": (pre + tau_a + tau_b, GREEN, (-0.2, 0.42)),
        r"$\lambda = 0.5$": (pre + 0.5 * (tau_a + tau_b), GREEN, (0.5, 0.0)),
        "forget task a": (pre - 0.8 * tau_a, RED, (0.0, 0.3)),
    }
    for label, (p, color, off) in points.items():
        ax.plot(*p, "o", color=color, ms=7, zorder=3)
        ax.text(p[0] + off[0], p[1] + off[1], label, color=color, fontsize=10, ha="center", va="center")
    ax.set_xlim(-2.6, 3.8)
    ax.set_ylim(-1.2, 3.1)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("Editing a model in weight space")


def ties_panel(ax):
    a = ta.TaskVector({"w": torch.tensor([0.9, -0.2, 0.5, -0.7, 0.1, 0.6])})
    b = ta.TaskVector({"w": torch.tensor([0.7, 0.8, -0.1, 0.75, -0.6, 0.4])})
    merged = ta.merge([a, b], "ties", density=0.5)
    x = np.arange(6)
    width = 0.27
    ax.bar(x - width, a["w"].numpy(), width, color=BLUE, label=r"$\tau_a$")
    ax.bar(x, b["w"].numpy(), width, color=ORANGE, label=r"$\tau_b$")
    ax.bar(x + width, merged["w"].numpy(), width, color=GREEN, label='merge(…, "ties", density=0.5)')
    ax.axhline(0, color=GREY, lw=0.8)
    ax.set_xticks(x, [f"entry {i}" for i in x], fontsize=8)
    ax.set_ylim(-1.0, 1.25)
    ax.legend(fontsize=8, loc="upper right", frameon=False)
    ax.set_title("TIES: keep the largest entries, elect a sign, average")


def main():
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    weight_space(left)
    ties_panel(right)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
