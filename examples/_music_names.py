"""Names and number formats shared by the figures, report.md and the rendered README/docs tables of
examples/mnist_music.py (presentation only: no numbers are made here)."""

from __future__ import annotations

import numpy as np

GROUPS = ("overall", "task", "other")
RULES = {"": "overall-rule λ", "@task": "task-aware λ", "_full": "λ = 1"}
MERGE_LABEL = {"task_arithmetic": "task arithmetic", "ties": "TIES", "dare": "DARE",
               "consolidated": "consolidated (IG)", "mask_ties": "control: TIES mask of the ctv's size",
               "mask_random": "control: random mask of the ctv's size"}
BASELINE_LABEL = {"replay": "replay", "last": "last layer only"}


def arrow(order: str) -> str:
    return order.replace(">", "→")


def label(name: str, results: dict) -> str:
    """Human name of a model key of results['summary']['methods']."""
    cfg, stand_in = results["config"], results["library"]["stand_in"]
    digits = cfg["digits"]
    fixed = {"pretrained": "pretrained (pt)", "joint": f"joint ({cfg['epochs']} epochs)",
             "joint_equal_steps": "joint (same steps as sequential)",
             "negation": f"negation pt − λτ{cfg['forget']}"}
    if name in fixed:
        return fixed[name]
    for merge, text in MERGE_LABEL.items():
        for suffix, rule in RULES.items():
            if name == merge + suffix:
                if merge == "task_arithmetic":
                    text = "task arithmetic pt + λ(" + " + ".join(f"τ{d}" for d in digits) + ")"
                text = f"{text}, {rule}"
                return text + (" [plain-sum stand-in]" if merge in stand_in else "")
    kind, _, rest = name.partition(":")
    if kind == "seq":
        return f"sequential {arrow(rest)}"
    if kind == "ft":
        return f"ft{rest}: fine-tuned on {rest} only (= pt + τ{rest})"
    if kind in ("gradual", "gradual_tuned", "gradual_task"):
        taus = " + ".join(f"τ{d}" for d in digits[:int(rest)])
        return {"gradual": f"pt + {taus}", "gradual_tuned": f"pt + λ({taus}), overall-rule λ",
                "gradual_task": f"pt + λ({taus}), task-aware λ"}[kind]
    if kind in BASELINE_LABEL:
        what = "joint (same steps)" if rest == "joint" else (
            f"sequential {arrow(rest)}" if ">" in rest else f"fine-tuned on {rest}")
        return f"{BASELINE_LABEL[kind]}: {what}"
    if kind == "transfer":
        base, _, what = rest.partition(":")
        return {"base": f"θ_new ({base})", "base+tau": f"θ_new ({base}) + τ_joint",
                "finetuned": f"θ_new ({base}) fine-tuned jointly"}[what]
    return name


def seq_name(results: dict) -> str:
    return "seq:" + ">".join(map(str, results["config"]["digits"]))


def headline_names(results: dict) -> list:
    names = ["pretrained", "joint", "joint_equal_steps", seq_name(results), "gradual:3"]
    for merge in MERGE_LABEL:
        names += [merge, merge + "@task"] + ([merge + "_full"] if merge != "task_arithmetic" else [])
    seq = seq_name(results).removeprefix("seq:")
    return names + ["negation"] + [f"{k}:{w}" for k in BASELINE_LABEL for w in (seq, "joint")]


def confusion_names(results: dict) -> list:
    """Candidate panels of the confusion-matrix figure, in order: the λ = 1 models included; the
    figure leaves out a model whose matrix equals one already shown (and says so in that title)."""
    seq = seq_name(results)
    return ["pretrained", "joint_equal_steps", seq, "gradual:3", "ties_full", "dare_full",
            "consolidated_full", "mask_ties_full", "task_arithmetic@task", "consolidated@task",
            f"replay:{seq.removeprefix('seq:')}", "replay:joint"]


def per_class_names(results: dict) -> list:
    """Rows of the per-class figure: the stages in the order a reader follows them."""
    digits = results["config"]["digits"]
    d = [str(x) for x in digits]
    seq = [f"seq:{'>'.join(d[:k])}" for k in (2, 3)]
    return (["pretrained"] + [f"ft:{x}" for x in d] + seq + ["joint_equal_steps", "gradual:2", "gradual:3",
            "task_arithmetic@task", "ties_full", "consolidated_full", "mask_ties_full", "mask_random_full",
            "consolidated@task"] + [f"{k}:{'>'.join(d[:i])}" for k in BASELINE_LABEL for i in (1, 2, 3)]
            + ["replay:joint", "last:joint", "negation"])


def stage_rows(results: dict) -> list:
    """(group, row label, model key) of the every-stage, per-task table."""
    digits = results["config"]["digits"]
    methods = results["summary"]["methods"]
    rows = [("start", "pretrained (pt)", "pretrained")]
    rows += [("fine-tuned on one task", label(f"ft:{d}", results), f"ft:{d}") for d in digits]
    for order, keys in results["summary"]["sequential_stages"].items():
        seq = order.removeprefix("seq:").split(">")
        for k, key in enumerate(keys, start=1):
            after = arrow(">".join(seq[:k]))
            rows.append((f"sequential {arrow(order.removeprefix('seq:'))}", f"after {after}"
                         + (f" (= ft{seq[0]})" if k == 1 else ""), key))
    rows += [("joint", label(n, results), n) for n in ("joint", "joint_equal_steps")]
    for prefix in ("gradual", "gradual_tuned", "gradual_task"):
        rows += [("gradual application", label(f"{prefix}:{k}", results), f"{prefix}:{k}")
                 for k in (1, 2, 3)]
    for merge in MERGE_LABEL:
        for suffix in RULES:
            if merge + suffix in methods:
                rows.append(("merges", label(merge + suffix, results), merge + suffix))
    rows.append(("negation", label("negation", results), "negation"))
    for kind, text in BASELINE_LABEL.items():
        rows += [(f"baseline: {text}", label(n, results), n) for n in methods if n.startswith(kind + ":")]
    return rows


def plot_order(results: dict) -> list:
    """Every evaluated model except the gradual-application steps, grouped for reading."""
    names = list(results["summary"]["methods"])
    first = ["pretrained", "joint", "joint_equal_steps"]
    groups = {"seq:": 1, "ft:": 2, "replay:": 4, "last:": 4, "transfer:": 5}  # merges, negation: 3

    def rank(n):
        if n in first:
            return (0, first.index(n))
        return (next((g for prefix, g in groups.items() if n.startswith(prefix)), 3), 0)

    return sorted((n for n in names if not n.startswith("gradual")), key=rank)  # stable sort


def pm(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def lam_cell(results: dict, name: str) -> str:
    """The λ column: '—' for models without one; the value when every seed has the same (a tuned
    λ of 0 says that the model is pt); otherwise the mean and the range over seeds."""
    lams = results["summary"]["lambdas"].get(name)
    if lams is None:
        return "—"
    tuned = not (name.endswith("_full") or name.startswith("gradual:"))
    if len(set(lams)) == 1:
        return f"{lams[0]:g}" + (" (= pt)" if tuned and lams[0] == 0 else "")
    return f"{np.mean(lams):.2f} ({min(lams):g}–{max(lams):g})"
