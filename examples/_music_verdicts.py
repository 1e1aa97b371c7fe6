"""The claims of examples/mnist_music.py and their verdicts, by rules fixed in advance.

A verdict is given only when the study has at least MIN_SEEDS seeds and is not the --quick smoke
test; otherwise every claim is listed with its numbers and the verdict "not judged". Each verdict
rests on the 95% bootstrap CI of paired per-seed differences; the exact sign test's p-value stands
beside it (with 5 seeds it cannot go below 0.0625, so it tells how much five seeds can say).
"""

from __future__ import annotations

from _music_stats import ctv_key, gradual_key

MIN_SEEDS = 5
NOT_JUDGED = "not judged"


def not_judged_reason(args) -> str | None:
    if args.quick:
        return "smoke test (--quick): no verdicts"
    if len(args.seeds) < MIN_SEEDS:
        return f"{len(args.seeds)} seed(s): verdicts need at least {MIN_SEEDS}"
    return None


def beats(c: dict) -> str:
    """A beats B: CI of A − B above 0 confirms, below 0 refutes."""
    lo, hi = c["ci"]
    return "confirmed" if lo > 0 else "refuted" if hi < 0 else "inconclusive"


def drops(c: dict, m: float) -> str:
    """A is worse than B by more than m: CI of A − B below −m confirms, above −m refutes."""
    lo, hi = c["ci"]
    return "confirmed" if hi < -m else "refuted" if lo > -m else "inconclusive"


def holds_up(c: dict, m: float) -> str:
    """A is no more than m worse than B (non-inferiority): the opposite of `drops`."""
    return {"confirmed": "refuted", "refuted": "confirmed"}.get(drops(c, m), "inconclusive")


def equals(c: dict, m: float) -> str:
    """|A − B| within m: CI inside ±m confirms, entirely outside refutes."""
    lo, hi = c["ci"]
    return ("confirmed" if -m <= lo and hi <= m else "refuted" if lo > m or hi < -m
            else "inconclusive")


def pp(c: dict) -> str:
    """A paired difference in percentage points, with its CI, seed count and sign test."""
    if "by_construction" in c:
        return c["by_construction"]
    text = (f"{100 * c['mean']:+.1f} pp [95% CI {100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}], "
            f"{c['wins']}/{c['n']} seeds > 0, sign test p = {c['sign_p']:.3g}")
    if c.get("ties"):
        text += f" ({c['ties']} tie(s) dropped)"
    if c.get("lambda_zero_seeds"):
        text += f"; λ = 0 (the pretrained model) in {c['lambda_zero_seeds']}/{c['n']} seeds"
    return text


def lam_text(lams) -> str:
    """Per-seed λ values, compactly."""
    if len(set(lams)) == 1:
        return f"λ = {lams[0]:g} in every seed"
    return "λ per seed " + ", ".join(f"{x:g}" for x in lams)


def verdicts(summary: dict, args, stand_in: dict) -> list:
    """One verdict per claim (per task where the claim is about tasks)."""
    cmp, meth, task = summary["comparisons"], summary["methods"], summary["per_task"]
    m = args.equivalence_margin
    reason = not_judged_reason(args)
    digits = list(args.digits)
    taus = [f"τ{d}" for d in digits]

    def ms(n, g="overall"):  # "mean% ± std" of an accuracy
        a = meth[n][g]["accuracy"]
        return f"{100 * a['mean']:.1f}% ± {100 * a['std']:.1f}"

    def on(n, c):  # accuracy on the images of class c
        a = task[n][str(c)]
        return f"{100 * a['mean']:.1f}% ± {100 * a['std']:.1f}"

    out = []

    def add(claim, verdict, evidence, decided_by=None):
        out.append(dict(claim=claim, verdict=NOT_JUDGED if reason else verdict, evidence=evidence,
                        decided_by=decided_by))

    order = "→".join(map(str, digits))
    c = cmp["sequential − joint (equal steps)"]
    add("H0 (new): sequential fine-tuning beats joint fine-tuning", beats(c),
        f"overall accuracy: pretrained {ms('pretrained')}, sequential {order} "
        f"{ms('seq:' + '>'.join(map(str, digits)))}, joint (same steps) {ms('joint_equal_steps')}, "
        f"joint ({args.epochs} epochs) {ms('joint')}; sequential − joint (same steps) {pp(c)}. "
        f"Authors: 91.70% → joint 70%, sequential 88%.", "sequential − joint (equal steps)")

    steps = ["pretrained"] + [f"gradual:{k}" for k in (1, 2, 3)]
    step_names = ["pt"] + ["pt+" + "+".join(taus[:k]) for k in (1, 2, 3)]
    for i, d in enumerate(digits):
        path = " → ".join(f"{s} {on(n, d)}" for s, n in zip(step_names, steps))
        diffs = "; ".join(f"step {k} − ft{d} {pp(cmp[gradual_key(k, d)])}"
                          for k in range(max(i + 1, 2), 4))
        same = f" (step 1, pt+{taus[0]}, is ft{d} itself)" if i == 0 else ""
        add(f"H0 (initial), part 1, task {d}: applying {', '.join(taus)} one after another degrades "
            f"accuracy on {d} relative to the model fine-tuned on {d} (a drop of more than "
            f"{100 * m:.0f} pp at the last step)", drops(cmp[gradual_key(3, d)], m),
            f"accuracy on {d}: ft{d} {on(f'ft:{d}', d)}; {path}. {diffs}{same}.", gradual_key(3, d))

    c = cmp["pt+τ1+τ2+τ3 (λ 1) − pretrained"]
    add("H0 (initial), part 1, overall reading (all ten classes): pt+" + "+".join(taus) + " is below "
        "the pretrained model", drops(c, 0.0),
        f"overall accuracy {' → '.join(f'{s} {ms(n)}' for s, n in zip(step_names, steps))}; "
        f"end − pretrained {pp(c)}.", "pt+τ1+τ2+τ3 (λ 1) − pretrained")

    for d in digits:
        full, tuned = cmp[ctv_key("consolidated_full", d)], cmp[ctv_key("consolidated@task", d)]
        lams = summary["lambdas"]["consolidated@task"]
        claim = (f"H0 (initial), part 2, task {d}: the consolidated task vector (applied whole, λ = 1) "
                 f"performs well on {d}: accuracy on {d} no more than {100 * m:.0f} pp below ft{d}")
        if "consolidated" in stand_in:
            add(claim, "inconclusive", f"not tested: {stand_in['consolidated']}.")
            continue
        add(claim, holds_up(full, m),
            f"accuracy on {d}: ft{d} {on(f'ft:{d}', d)}, ctv (λ 1) {on('consolidated_full', d)}, "
            f"pt+{'+'.join(taus)} (λ 1) {on('gradual:3', d)}, ctv at the task-aware λ "
            f"{on('consolidated@task', d)} ({lam_text(lams)}); ctv (λ 1) − ft{d} {pp(full)}; "
            f"ctv (task-aware λ) − ft{d} {pp(tuned)}. What λ 1 costs: ctv (λ 1) other classes "
            f"{ms('consolidated_full', 'other')}, F1 of class {d} − pt's "
            f"{pp(cmp[f'ctv (λ 1) − pretrained, F1 of class {d}'])}.", ctv_key("consolidated_full", d))

    for kind in ("independent", "continued"):
        c = cmp[f"transfer {kind}: base+tau − finetuned"]
        add(f"Transfer to a new pretrained model ({kind}): θ_new + τ equals fine-tuning θ_new "
            f"(overall accuracy within ±{100 * m:.0f} pp)", equals(c, m),
            f"θ_new {ms(f'transfer:{kind}:base')}, θ_new + τ_joint {ms(f'transfer:{kind}:base+tau')}, "
            f"θ_new fine-tuned {ms(f'transfer:{kind}:finetuned')}; gap {pp(c)}.",
            f"transfer {kind}: base+tau − finetuned")
    return out
