"""--sweep of examples/mnist_music.py: the protocol once per fine-tuning setting, SGD (momentum 0.9)
and Adam at lr 1e-2, 1e-3, 1e-4 and 1e-5; pretraining is unchanged and shared by the settings.

Per setting, results.json keeps the summary over seeds (every model per task, the paired
comparisons, forgetting, λ) and every verdict; report.md gives sequential − joint (equal steps) as a
function of the setting with its CI, the H0 (new) reading per setting ("refuted at …, tie at …,
confirmed at …"), the baselines' sequential − joint, every verdict side by side and per-task tables.
A *tie* is a setting where H0 (new) is neither confirmed nor refuted and the 95% CI of
sequential − joint lies within ±--equivalence-margin.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _music_names import BASELINE_LABEL, arrow, label, pm
from _music_report import machine_line, table
from _music_stats import summarize
from _music_verdicts import MIN_SEEDS, NOT_JUDGED, beats, verdicts

SETTINGS = [(opt, lr) for opt in ("sgd", "adam") for lr in (1e-2, 1e-3, 1e-4, 1e-5)]
H0_NEW = "sequential − joint (equal steps)"
SMALL = ", by less than the margin"
READINGS = ("refuted", "refuted" + SMALL, "tie", "inconclusive", "confirmed" + SMALL, "confirmed")


def setting_args(args, optimizer: str, lr: float) -> argparse.Namespace:
    return argparse.Namespace(**dict(vars(args), ft_optimizer=optimizer, ft_lr=lr))


def setting_name(optimizer: str, lr: float) -> str:
    return f"{'SGD' if optimizer == 'sgd' else 'Adam'} lr {lr:.0e}".replace("e-0", "e-")


def reading(c: dict, margin: float) -> str:
    """H0 (new)'s verdict rule; a CI inside ±margin makes an inconclusive verdict a 'tie' and
    qualifies a confirmed or refuted one (a difference that is real but smaller than the margin)."""
    verdict = beats(c)
    lo, hi = c["ci"]
    if -margin <= lo and hi <= margin:
        return "tie" if verdict == "inconclusive" else verdict + SMALL
    return verdict


def sweep_results(per_setting: dict, args) -> dict:
    """Summaries and verdicts per setting (no per-seed metrics: the comparisons keep per-seed
    differences)."""
    out = []
    for (opt, lr), per_seed in per_setting.items():
        a = setting_args(args, opt, lr)
        summ = summarize(per_seed, a)
        vs = verdicts(summ, a, per_seed[0]["stand_in"])
        c = summ["comparisons"][H0_NEW]
        out.append(dict(
            optimizer=opt, lr=lr, name=setting_name(opt, lr), h0_new=c,
            reading=reading(c, args.equivalence_margin), verdicts=vs, steps=per_seed[0]["steps"],
            consolidation=[s["consolidation"] for s in per_seed],
            summary={k: summ[k] for k in ("per_task", "comparisons", "forgetting", "lambdas",
                                          "sequential_stages")}))
    return dict(settings=out, h0_new=H0_NEW, margin=args.equivalence_margin,
                judged=out[0]["verdicts"][0]["verdict"] != NOT_JUDGED)


def sweep_answer(results: dict) -> str:
    """'H0 (new) … refuted at …; tie at …; confirmed at …' from the per-setting readings."""
    sw = results["sweep"]
    by = {r: [s["name"] for s in sw["settings"] if s["reading"] == r] for r in READINGS}
    m = 100 * sw["margin"]
    parts = [f"{r.replace('the margin', f'{m:.0f} pp') if r != 'tie' else f'tie (95% CI within ±{m:.0f} pp)'} "
             f"at {', '.join(names)}" for r, names in by.items() if names]
    text = ("H0 (new), sequential beats joint fine-tuning (overall accuracy, equal steps): "
            + "; ".join(parts) + ".")
    if not sw["judged"]:
        return (f"H0 (new) NOT JUDGED in any setting ({results.get('verdicts_note') or MIN_SEEDS}): "
                "sequential − joint per setting is listed without a verdict.")
    return text


def sweep_table(results: dict) -> list:
    """One row per setting: steps, accuracies, sequential − joint with CI and sign test, reading,
    and the baselines' sequential − joint."""
    digits = results["config"]["digits"]
    seq = "seq:" + ">".join(map(str, digits))
    rows = []
    for s in results["sweep"]["settings"]:
        t, c, cmp = s["summary"]["per_task"], s["h0_new"], s["summary"]["comparisons"]
        base = [(f"{100 * cmp[k]['mean']:+.1f} [{100 * cmp[k]['ci'][0]:+.1f}, {100 * cmp[k]['ci'][1]:+.1f}]"
                 if k in cmp else "—") for k in (f"{text}: sequential − joint (equal steps)"
                                                 for text in BASELINE_LABEL.values())]
        rows.append([s["name"], s["steps"]["sequential"], pm(t["pretrained"]["overall"]),
                     pm(t[seq]["overall"]), pm(t["joint_equal_steps"]["overall"]),
                     f"{100 * c['mean']:+.1f} [{100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}]",
                     f"{c['wins']}/{c['n']}", f"{c['sign_p']:.3g}",
                     f"**{s['reading']}**" if results["sweep"]["judged"] else NOT_JUDGED]
                    + base)
    return table(["fine-tuning", "steps (seq.)", "pretrained", f"sequential {arrow(seq[4:])}",
                  "joint (same steps)", "seq. − joint, pp [95% CI]", "seeds > 0", "sign test p",
                  "H0 (new)"] + [f"{t}: seq. − joint, pp [95% CI]" for t in BASELINE_LABEL.values()],
                 rows)


def verdict_matrix(results: dict) -> list:
    """Every claim's verdict, one column per setting."""
    settings = results["sweep"]["settings"]
    claims = [v["claim"].split(":")[0] for v in settings[0]["verdicts"]]
    rows = [[claim] + [s["verdicts"][i]["verdict"] for s in settings] for i, claim in enumerate(claims)]
    return table(["claim"] + [s["name"] for s in settings], rows)


def per_task_table(results: dict, s: dict) -> list:
    digits = results["config"]["digits"]
    d = ">".join(map(str, digits))
    names = (["pretrained"] + [f"ft:{c}" for c in digits] + [f"seq:{d}", "joint_equal_steps", "gradual:3",
             "consolidated_full", "consolidated@task"] + [f"{k}:{w}" for k in BASELINE_LABEL for w in (d, "joint")])
    t, lams = s["summary"]["per_task"], s["summary"]["lambdas"]
    rows = [[label(n, results), "—" if n not in lams else
             (f"{lams[n][0]:g}" if len(set(lams[n])) == 1 else f"{np.mean(lams[n]):.2f}")]
            + [pm(t[n][k]) for k in [str(c) for c in digits] + ["other", "overall", "balanced"]] for n in names]
    return table(["model", "λ"] + [f"on {c}" for c in digits] + ["other classes", "all", "balanced"], rows)


def write_sweep_report(results: dict, out: Path) -> None:
    cfg, data, sw = results["config"], results["data"], results["sweep"]
    L = [f"# MUSIC study, fine-tuning sweep: {data['dataset']}, task classes {cfg['digits']}", ""]
    if results.get("smoke_test"):
        L += ["> **Smoke test (--quick)**: small settings to check that everything runs; no verdicts.", ""]
    if data["note"]:
        L += [f"> **{data['note']}**", ""]
    tr = results["training"]
    L += [f"Command: `{results['command']}`  ",
          f"Pretraining {tr['pretrain']['optimizer']} lr {tr['pretrain']['lr']:g}, {tr['pretrain']['epochs']} "
          f"epochs (the same pretrained models for every setting); fine-tuning {cfg['epochs']} epochs per "
          f"task, SGD with momentum 0.9 or Adam, at each learning rate; seeds {cfg['seeds']}.  ",
          machine_line(results), "", "## How H0 (new) depends on the fine-tuning setting", "",
          sweep_answer(results), ""]
    L += ["Overall accuracy on the evaluation split (mean ± std over seeds, %); sequential − joint "
          "(same steps) paired by seed with a 95% percentile-bootstrap CI and the exact sign test. "
          "Verdict rule: confirmed when the CI lies above 0, refuted below 0; *tie*: neither, with the "
          f"CI within ±{100 * sw['margin']:.0f} pp; otherwise inconclusive; a confirmed or refuted "
          f"verdict whose CI lies within ±{100 * sw['margin']:.0f} pp says so ('by less than the "
          "margin'). The baselines' columns give "
          "the same difference for replay and last-layer-only fine-tuning.", ""]
    L += sweep_table(results) + ["![sweep](sweep.png)", "", "## Every verdict, per setting", ""]
    L += verdict_matrix(results)
    for s in sw["settings"]:
        gaps = [g["relative_gap"] for seed in s["consolidation"] for g in seed.get("ig", [])]
        L += [f"## {s['name']}", "", f"Optimizer steps: {s['steps']}."
              + (f" IG completeness gap ≤ {max(gaps):.3g} (relative)." if gaps else ""), ""]
        L += per_task_table(results, s)
        L += [f"- **{v['verdict'].upper()}** — {v['claim']}. {v['evidence']}" for v in s["verdicts"]] + [""]
    (out / "report.md").write_text("\n".join(L))


def fig_sweep(results: dict, out: Path) -> str:
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="paper")
    settings, digits = results["sweep"]["settings"], results["config"]["digits"]
    seq = "seq:" + ">".join(map(str, digits))
    m = results["sweep"]["margin"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, opt in zip(axes[:2], ("sgd", "adam")):
        rows = [s for s in settings if s["optimizer"] == opt]
        lrs = [s["lr"] for s in rows]
        for key, text, color in (("pretrained", "pretrained", "grey"), (seq, f"sequential {arrow(seq[4:])}", "C3"),
                                 ("joint_equal_steps", "joint (same steps)", "C0"),
                                 (f"replay:{seq[4:]}", "replay, sequential", "C1"),
                                 ("replay:joint", "replay, joint", "C2")):
            mean = [s["summary"]["per_task"][key]["overall"]["mean"] for s in rows]
            std = [s["summary"]["per_task"][key]["overall"]["std"] for s in rows]
            ax.errorbar(lrs, mean, yerr=std, marker="o", capsize=3, label=text, color=color,
                        ls="--" if key.startswith("replay") else "-")
        ax.set(xscale="log", ylim=(0, 1), xlabel="fine-tuning learning rate",
               ylabel="accuracy, all classes (evaluation)",
               title=f"Fine-tuning with {'SGD (momentum 0.9)' if opt == 'sgd' else 'Adam'}")
        ax.legend(fontsize=8)
    ax = axes[2]
    for i, opt in enumerate(("sgd", "adam")):
        rows = [s for s in settings if s["optimizer"] == opt]
        lrs = np.asarray([s["lr"] for s in rows]) * (1.08 if i else 1 / 1.08)  # side by side
        mean = np.asarray([100 * s["h0_new"]["mean"] for s in rows])
        ci = np.asarray([[100 * s["h0_new"]["ci"][0] for s in rows], [100 * s["h0_new"]["ci"][1] for s in rows]])
        ax.errorbar(lrs, mean, yerr=[mean - ci[0], ci[1] - mean], marker="o", capsize=4,
                    label="SGD" if opt == "sgd" else "Adam", color=f"C{4 + i}")
    ax.axhspan(-100 * m, 100 * m, color="grey", alpha=0.2, label=f"±{100 * m:.0f} pp (tie)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xscale="log", xlabel="fine-tuning learning rate", ylabel="pp",
           title="sequential − joint (same steps), 95% CI")
    ax.legend(fontsize=8)
    fig.suptitle("Fine-tuning sweep (left, middle: mean ± std over seeds; right: mean and 95% "
                 "bootstrap CI of the paired differences)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)
    return "sweep.png"
