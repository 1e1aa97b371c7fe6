"""Statistics of examples/mnist_music.py: summaries over seeds, per-task tables, forgetting and the
paired comparisons (bootstrap CI and exact sign test) behind the verdicts.

Model keys (results['seeds'][seed]['metrics']): pretrained, joint, joint_equal_steps; ft:<c>
(fine-tuned on c alone, = pt + τc); seq:<a>>b> and seq:<a>>b>c> (the stages of each sequential
order; its first stage is ft:<a>); gradual:<k> (pt + the first k task vectors, λ = 1),
gradual_tuned:<k> / gradual_task:<k> (the same with task arithmetic's λ of the overall / the
task-aware rule); task_arithmetic, ties, dare, consolidated (λ of the overall rule), the same with
"@task" (task-aware rule) and ties_full, dare_full, consolidated_full (λ = 1); mask_ties and
mask_random (the ctv's controls, with the same suffixes); replay:<stages> / replay:joint and
last:<stages> / last:joint (the collapse baselines); negation; transfer:*.
"""

from __future__ import annotations

import math

import numpy as np

MERGES = ("task_arithmetic", "ties", "dare", "consolidated", "mask_ties", "mask_random")
MERGE_TEXT = dict(task_arithmetic="task arithmetic", ties="TIES", dare="DARE", consolidated="ctv",
                  mask_ties="TIES mask", mask_random="random mask")
CONTROLS = ("mask_ties", "mask_random")  # the ctv's controls: same kept count, another mask
TIE = 1e-12  # |difference| at or below this is a tie (accuracies are ratios of counts)


def mean_std(values) -> dict:
    """Mean and sample std (ddof 1; 0 with one value) over seeds: the one convention used."""
    v = np.asarray(values, dtype=float)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                values=v.tolist())


def sign_test(diffs) -> dict:
    """Exact two-sided sign test of paired differences against 0.

    Ties (|d| <= 1e-12) are dropped; with n non-tied differences of which k are positive,
    p = min(1, 2 * P(X <= min(k, n - k))) for X ~ Binomial(n, 1/2), and p = 1 when n = 0.
    With 5 seeds the smallest possible p is 2/32 = 0.0625.
    """
    d = [float(x) for x in diffs if abs(float(x)) > TIE]
    n, k = len(d), sum(x > 0 for x in d)
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return dict(p=min(1.0, 2 * tail) if n else 1.0, n=n, positive=k, ties=len(diffs) - n)


def paired(a, b, n_boot: int, lambdas=None) -> dict:
    """Mean of the per-seed differences a - b with a percentile bootstrap 95% CI (fixed
    resampling seed) and the exact sign test. `lambdas`: per-seed λ of a tuned model compared
    with the pretrained model; where λ = 0 the difference is 0 by construction, and when that holds
    in every seed the comparison says so instead of reporting a difference."""
    d = np.asarray(a, float) - np.asarray(b, float)
    rng = np.random.default_rng(20240607)  # fixed: the CI must not change between reruns
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    sign = sign_test(d)
    out = dict(mean=float(d.mean()), ci=[float(lo), float(hi)], diffs=d.tolist(),
               wins=int((d > TIE).sum()), n=len(d), sign_p=sign["p"], ties=sign["ties"])
    if lambdas is not None:
        zero = sum(lam == 0 for lam in lambdas)
        out["lambda_zero_seeds"] = zero
        if zero == len(d):
            out["by_construction"] = ("λ = 0 in every seed: the tuned model is the pretrained "
                                      "model, so the difference is 0 by construction")
    return out


def model_lambdas(run: dict) -> dict:
    """λ of every model that has one, for one seed's results (None for the others)."""
    lam, lam_task = run["lambda"], run["lambda_task"]
    out = {}
    for name in run["metrics"]:
        kind = name.partition(":")[0]
        if name in lam:
            out[name] = lam[name]
        elif name.endswith("@task"):
            out[name] = lam_task[name.removesuffix("@task")]
        elif name.endswith("_full") or kind == "gradual":
            out[name] = 1.0
        elif kind == "gradual_tuned":
            out[name] = lam["task_arithmetic"]
        elif kind == "gradual_task":
            out[name] = lam_task["task_arithmetic"]
    return out


def full_orders(names) -> list:
    return [n for n in names if n.startswith("seq:") and n.count(">") == 2]


def summarize(per_seed: list, args) -> dict:
    """mean/std over seeds of every metric, per-task accuracies of every stage, forgetting, and
    the paired comparisons behind the verdicts."""
    names = list(per_seed[0]["metrics"])
    digits, B = list(args.digits), args.bootstrap

    def get(name, group, metric):
        return [s["metrics"][name][group][metric] for s in per_seed]

    def acc(name, group="overall"):
        return get(name, group, "accuracy")

    def on(name, c, metric="recall"):  # accuracy on the images of class c is c's recall
        return [s["metrics"][name]["per_class"][metric][c] for s in per_seed]

    lams = [model_lambdas(s) for s in per_seed]

    def lam(name):
        return [x[name] for x in lams] if name in lams[0] else None

    methods = {n: {g: {m: mean_std(get(n, g, m)) for m in ("accuracy", "precision", "recall", "f1")}
                   for g in ("overall", "task", "other")} for n in names}
    per_class = {n: {k: np.mean([s["metrics"][n]["per_class"][k] for s in per_seed], 0).tolist()
                     for k in ("precision", "recall", "f1")} for n in names}
    confusions = {n: np.sum([s["metrics"][n]["confusion"] for s in per_seed], 0).tolist()
                  for n in names}
    # balanced: the mean of the ten per-class accuracies (macro recall), whatever the class mix
    per_task = {n: dict({str(c): mean_std(on(n, c)) for c in digits}, other=mean_std(acc(n, "other")),
                        overall=mean_std(acc(n)), balanced=mean_std(get(n, "overall", "recall")),
                        **{"lambda": lam(n)}) for n in names}

    # Sequential stages and forgetting: for task t learned at stage i of an order, forgetting is
    # its accuracy right after stage i minus its accuracy at the end (> 0: forgotten); backward
    # transfer (BWT) is minus the mean forgetting of the first two tasks.
    orders = full_orders(names)
    stages, forgetting = {}, {}
    for o in orders:
        seq = o.removeprefix("seq:").split(">")
        keys = [f"ft:{seq[0]}", f"seq:{seq[0]}>{seq[1]}", o]
        stages[o] = keys
        forg = {t: np.asarray(on(keys[i], int(t))) - np.asarray(on(o, int(t)))
                for i, t in enumerate(seq[:2])}
        forgetting[o] = dict(per_task={t: mean_std(v) for t, v in forg.items()},
                             after_second_stage={seq[0]: mean_std(np.asarray(on(keys[0], int(seq[0])))
                                                                  - np.asarray(on(keys[1], int(seq[0]))))},
                             bwt=mean_std(-np.mean(list(forg.values()), 0)))

    seq = "seq:" + ">".join(map(str, digits))
    order_mean = np.mean([acc(n) for n in orders], 0)
    cmp = {}
    cmp["sequential − joint (equal steps)"] = paired(acc(seq), acc("joint_equal_steps"), B)
    cmp["sequential − joint"] = paired(acc(seq), acc("joint"), B)
    cmp["mean of six orders − joint (equal steps)"] = paired(order_mean, acc("joint_equal_steps"), B)
    cmp["pt+τ1+τ2+τ3 (λ 1) − pretrained"] = paired(acc("gradual:3"), acc("pretrained"), B)
    for i, c in enumerate(digits):  # H0 (initial), per task and step, against the fine-tuned model
        for k in range(max(i + 1, 2), 4):  # step 1 for the first task is ft itself: not compared
            cmp[gradual_key(k, c)] = paired(on(f"gradual:{k}", c), on(f"ft:{c}", c), B)
    for c in digits:  # the ctv on each task, against the fine-tuned model
        cmp[ctv_key("consolidated_full", c)] = paired(on("consolidated_full", c), on(f"ft:{c}", c), B)
        cmp[ctv_key("consolidated@task", c)] = paired(on("consolidated@task", c), on(f"ft:{c}", c), B)
        cmp[f"ctv (λ 1) − pretrained, F1 of class {c}"] = paired(
            on("consolidated_full", c, "f1"), on("pretrained", c, "f1"), B)
    cmp["ctv (λ 1) − pt+τ1+τ2+τ3 (λ 1)"] = paired(acc("consolidated_full"), acc("gradual:3"), B)
    for ctrl in CONTROLS:  # the ctv against a mask of the same size chosen otherwise
        text = MERGE_TEXT[ctrl]
        for suffix, rule in (("_full", "λ 1"), ("@task", "task-aware λ"), ("", "overall-rule λ")):
            both = (None if suffix == "_full" else  # λ = 0 for both: both are pt
                    [max(a, b) for a, b in zip(lam("consolidated" + suffix), lam(ctrl + suffix))])
            for group, what in (("task", "the task classes"), ("overall", "all classes")):
                c = cmp[f"ctv − {text} ({rule}), accuracy on {what}"] = paired(
                    acc("consolidated" + suffix, group), acc(ctrl + suffix, group), B, both)
                if "by_construction" in c:
                    c["by_construction"] = ("λ = 0 for both in every seed: both are the pretrained "
                                            "model, so the difference is 0 by construction")
    for kind, text in (("replay", "replay"), ("last", "last layer only")):  # collapse baselines
        if f"{kind}:joint" in names:
            cmp[f"{text}: sequential − joint (equal steps)"] = paired(
                acc(f"{kind}:{'>'.join(map(str, digits))}"), acc(f"{kind}:joint"), B)
            cmp[f"{text} sequential − plain sequential"] = paired(
                acc(f"{kind}:{'>'.join(map(str, digits))}"), acc(seq), B)
    for m in MERGES:
        text = MERGE_TEXT[m]
        cmp[f"{text} (overall-rule λ) − pretrained"] = paired(acc(m), acc("pretrained"), B, lam(m))
        cmp[f"{text} (task-aware λ) − pretrained, accuracy on the task classes"] = paired(
            acc(f"{m}@task", "task"), acc("pretrained", "task"), B, lam(f"{m}@task"))
    for kind in ("independent", "continued"):
        cmp[f"transfer {kind}: base+tau − finetuned"] = paired(
            acc(f"transfer:{kind}:base+tau"), acc(f"transfer:{kind}:finetuned"), B)
        cmp[f"transfer {kind}: base+tau − base"] = paired(
            acc(f"transfer:{kind}:base+tau"), acc(f"transfer:{kind}:base"), B)
    return dict(methods=methods, per_class=per_class, confusion=confusions, per_task=per_task,
                sequential_stages=stages, forgetting=forgetting, comparisons=cmp,
                lambdas={n: lam(n) for n in names if lam(n) is not None})


def gradual_key(k: int, c: int) -> str:
    return f"gradual step {k} − ft{c}, accuracy on {c}"


def ctv_key(model: str, c: int) -> str:
    rule = "λ 1" if model.endswith("_full") else "task-aware λ"
    return f"ctv ({rule}) − ft{c}, accuracy on {c}"
