#!/usr/bin/env python
"""The MUSIC reference study: sequential vs joint fine-tuning and task vectors on MNIST.

MUSIC ("Make Unification Simple In Image Classification") is a student study that made three claims
about a small MLP on MNIST, with digits 3, 4 and 7 as three fine-tuning tasks T1, T2, T3:

* H0 (new): fine-tuning step by step on T1, T2, T3 beats fine-tuning once on their combined data
  (the authors report 91.70% before fine-tuning, 70% after joint and 88% after sequential).
* H0 (initial): applying tau1, tau2, tau3 one after another to the pretrained model degrades
  performance on tasks T1, T2, T3 relative to the fine-tuned models, while a consolidated task
  vector (ctv) performs well on all three tasks.
* Transfer: theta_new_ft = theta_new_pt + tau for a new pretrained model.

This script tests those claims; it does not try to reproduce the authors' numbers. Every task-vector
step goes through taskarith's public API. Each seed runs the whole protocol; the report shows
mean +- std over seeds, accuracy on each task class at every stage, paired bootstrap confidence
intervals with an exact sign test, and gives each claim a verdict (confirmed / refuted /
inconclusive) by rules fixed in advance (_music_verdicts.py) when there are at least 5 seeds.
--quick is a smoke test: it gives no verdicts.

    python examples/mnist_music.py --data-dir ../shared/data/mnist-t10k     # MNIST test split only
    python examples/mnist_music.py --dataset fashion-mnist                   # Debian's dataset-fashion-mnist
    python examples/mnist_music.py --quick --data-dir ../shared/data/mnist-t10k   # smoke test, < 1 minute
    python examples/mnist_music.py --sweep --data-dir ../shared/data/mnist-t10k   # SGD/Adam × 4 lr, ~10 min
    python examples/mnist_music.py --render runs/mnist-t10k runs/mnist-t10k-sweep  # tables into README/docs

Writes results.json, report.md and PNG figures to --out (default runs/<timestamp>). The modules
beside it: _music_data (files, splits), _music_train (model, training, merges, the ctv's controls,
λ rules), _music_baselines (replay, last layer only), _music_stats (summaries, comparisons),
_music_verdicts, _music_sweep (--sweep), _music_figures, _music_report (report.md) and
_music_render (the README/docs tables, generated from results.json).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import taskarith as ta

# Sibling modules (examples/ is on sys.path when the script runs; tests put it there).
import _music_figures  # isort: skip
import _music_render  # isort: skip
import _music_report  # isort: skip
from _music_cli import QUICK, build_parser, parse_args  # isort: skip
from _music_data import (CLASS_NAMES, DataUnavailable, Split, check_md5, load_data,  # isort: skip
                         locate_files, read_arrays, read_idx, seed_split, split_data, to_split)
from _music_stats import MERGES, summarize  # isort: skip
from _music_train import (HAS_CAPTUM, HAS_CONSOLIDATE, HAS_MERGE, confusion, derive_seed,  # isort: skip
                          evaluate, lambda_sweep, merged_vectors, model_from_state, new_model, scores,
                          train, tune_lambda, tune_lambda_task, tune_negation)
from _music_verdicts import not_judged_reason, verdicts  # isort: skip
from _music_baselines import run_baselines  # isort: skip
from _music_sweep import SETTINGS, fig_sweep, setting_args, sweep_answer, sweep_results, write_sweep_report  # isort: skip

# What the tests and a reader use from here (the study's API lives in the sibling modules).
__all__ = ["QUICK", "DataUnavailable", "build_parser", "check_md5", "load_data", "locate_files", "main",
           "parse_args", "read_idx", "run_seed", "to_split"]


# ---------------------------------------------------------------------------------------------
# One seed of the study
# ---------------------------------------------------------------------------------------------

def run_seed(seed: int, data: dict, args, device, log, cache: dict | None = None) -> dict:
    """The whole protocol for one seed. `cache` (a dict) keeps the pretrained models per seed, so
    that the settings of a sweep share them: pretraining does not depend on fine-tuning."""
    digits, val, ev = args.digits, data["val"], data["eval"]
    tasks = data["tasks"]
    models, curves, extra = {}, {}, {}
    setting = {"pretrain": (args.optimizer, args.pretrain_lr), "finetune": (args.ft_optimizer, args.ft_lr)}

    def fit(model, split, name, role, stream=None, **budget):
        """Train and log one run; `role` (pretrain / finetune) picks the optimizer and lr;
        `stream` names the shuffle order (default: the run's name)."""
        t0 = time.perf_counter()
        optimizer, lr = setting[role]
        curves[name] = train(model, split, optimizer=optimizer, lr=lr, batch_size=args.batch_size,
                             seed=derive_seed(seed, "shuffle", stream or name),
                             val=val, task_classes=digits, **budget)
        log(f"  {name:<28} {curves[name]['step'][-1]:>5} steps  val acc "
            f"{curves[name]['val_acc'][-1]:.3f}  ({time.perf_counter() - t0:.1f}s)")
        return model

    fit.steps = lambda name: curves[name]["step"][-1]

    # Pretraining: the main model, an independently seeded one, and one that continued from pt
    # (a fresh optimizer, more epochs on the same data): the two second models for transfer.
    pre = ("pretrain", "pretrain (independent)", "pretrain (continued)")
    if cache is not None and seed in cache:
        pt, pt_ind, pt_cont = (model_from_state(copy.deepcopy(st), device) for st in cache[seed]["states"])
        curves.update(copy.deepcopy(cache[seed]["curves"]))
    else:
        pt = fit(new_model(seed, "pretrained", device), data["pretrain"], pre[0], "pretrain",
                 epochs=args.pretrain_epochs)
        pt_ind = fit(new_model(seed, "independent", device), data["pretrain"], pre[1], "pretrain",
                     epochs=args.pretrain_epochs)
        pt_cont = fit(copy.deepcopy(pt), data["pretrain"], pre[2], "pretrain",
                      epochs=args.continue_epochs)
        if cache is not None:
            cache[seed] = dict(states=[copy.deepcopy(m.state_dict()) for m in (pt, pt_ind, pt_cont)],
                               curves=copy.deepcopy({k: curves[k] for k in pre}))
    models["pretrained"] = pt

    # Fine-tuning along every order of the three tasks. A prefix (e.g. 3>4) is trained once:
    # the model fine-tuned on 3 alone is both tau_3's model and stage 1 of 3>4>7 and 3>7>4.
    # Every stage is kept: seq:a>b and seq:a>b>c (stage 1 is ft:a).
    stages = {}
    orders = [(a, b, c) for a in digits for b in digits for c in digits if len({a, b, c}) == 3]
    for order in orders:
        for k in range(1, 4):
            prefix = order[:k]
            if prefix not in stages:
                start = pt if k == 1 else stages[prefix[:-1]]
                stages[prefix] = fit(copy.deepcopy(start), tasks[prefix[-1]],
                                     "finetune " + ">".join(map(str, prefix)), "finetune",
                                     epochs=args.epochs)
        for k in (2, 3):
            models.setdefault("seq:" + ">".join(map(str, order[:k])), stages[order[:k]])
    for c in digits:
        models[f"ft:{c}"] = stages[(c,)]

    # Joint fine-tuning on the combined task data, for --epochs and for the sequential step count.
    joint_data = Split(torch.cat([tasks[c].x for c in digits]), torch.cat([tasks[c].y for c in digits]))
    seq_steps = sum(curves["finetune " + ">".join(map(str, tuple(digits)[:k]))]["step"][-1]
                    for k in range(1, 4))
    models["joint"] = fit(copy.deepcopy(pt), joint_data, "joint", "finetune", epochs=args.epochs)
    # Same shuffle order as "joint": the two differ only in their step budget.
    models["joint_equal_steps"] = fit(copy.deepcopy(pt), joint_data, "joint (equal steps)",
                                      "finetune", stream="joint", steps=seq_steps)
    extra["steps"] = dict(sequential=seq_steps, joint=curves["joint"]["step"][-1],
                          joint_equal_steps=seq_steps)

    # Baselines for the single-class collapse: replay and last-layer-only fine-tuning.
    baselines, extra["steps"]["baselines"] = run_baselines(fit, pt, tasks, data["pretrain"], args, seed)
    models.update(baselines)

    # Task vectors, all through taskarith.
    taus = {c: ta.TaskVector.from_models(pt, stages[(c,)]) for c in digits}
    vectors = [taus[c] for c in digits]
    extra["tau_norm"] = {str(c): taus[c].norm() for c in digits}
    extra["tau_cosine"] = {f"{a},{b}": taus[a].cosine(taus[b])
                           for i, a in enumerate(digits) for b in digits[i + 1:]}

    # Task arithmetic, TIES, DARE, consolidation: lambda chosen on validation only, by two rules:
    # overall accuracy, and task-aware (best task-class accuracy while the other classes keep >=
    # --control-threshold of pt's). The merges are also applied whole (lambda 1).
    candidates = {"task_arithmetic": ta.TaskVector.sum(vectors)}
    merged, extra["stand_in"], extra["consolidation"] = merged_vectors(vectors, pt, val, args, seed)
    candidates.update(merged)
    pt_conf = confusion(pt, val)
    pt_other_tasks = scores(pt_conf, [c for c in range(10) if c not in digits])["accuracy"]
    for key in ("lambda", "lambda_curve", "lambda_task", "lambda_task_curve"):
        extra[key] = {}
    for name, vec in candidates.items():
        confs = lambda_sweep(vec, pt, val, args, device)
        extra["lambda"][name], extra["lambda_curve"][name] = tune_lambda(confs, args)
        extra["lambda_task"][name], extra["lambda_task_curve"][name] = tune_lambda_task(
            confs, args, pt_other_tasks)
        models[name] = model_from_state(vec.apply_to(pt, scale=extra["lambda"][name]), device)
        models[f"{name}@task"] = model_from_state(
            vec.apply_to(pt, scale=extra["lambda_task"][name]), device)
        if name != "task_arithmetic":  # task arithmetic at lambda 1 is gradual:3
            models[f"{name}_full"] = model_from_state(vec.apply_to(pt, scale=1.0), device)

    # Gradual application: pt, pt+tau1, pt+tau1+tau2, pt+tau1+tau2+tau3 (lambda 1 and both tuned).
    partial = None
    for k, c in enumerate(digits, start=1):
        partial = taus[c] if partial is None else partial + taus[c]
        models[f"gradual:{k}"] = model_from_state(partial.apply_to(pt, scale=1.0), device)
        models[f"gradual_tuned:{k}"] = model_from_state(
            partial.apply_to(pt, scale=extra["lambda"]["task_arithmetic"]), device)
        models[f"gradual_task:{k}"] = model_from_state(
            partial.apply_to(pt, scale=extra["lambda_task"]["task_arithmetic"]), device)

    # Task negation: pt - lambda * tau_forget (forget one class, keep the rest).
    pt_other_val = scores(pt_conf, [c for c in range(10) if c != args.forget])["accuracy"]
    forget_tau = taus[args.forget]
    lam, rows = tune_negation(lambda_sweep(forget_tau, pt, val, args, device, sign=-1.0), args,
                              pt_other_val)
    extra["lambda"]["negation"], extra["negation_curve"] = lam, rows
    models["negation"] = model_from_state((-forget_tau).apply_to(pt, scale=lam), device)

    # Transfer: theta_new + tau_joint versus fine-tuning theta_new itself on the joint data.
    tau_joint = ta.TaskVector.from_models(pt, models["joint"])
    extra["transfer"] = {}
    for kind, base in (("independent", pt_ind), ("continued", pt_cont)):
        ft_new = fit(copy.deepcopy(base), joint_data, f"joint ({kind} base)", "finetune",
                     epochs=args.epochs)
        # A deliberate transfer: tau comes from another base, so silence the library's warning.
        transferred = tau_joint.apply_to(base, scale=1.0, on_base_mismatch="ignore")
        tau_new = ta.TaskVector.from_models(base, ft_new)
        models[f"transfer:{kind}:base"] = base
        models[f"transfer:{kind}:base+tau"] = model_from_state(transferred, device)
        models[f"transfer:{kind}:finetuned"] = ft_new
        with torch.no_grad():
            agree = (models[f"transfer:{kind}:base+tau"](ev.x).argmax(1)
                     == ft_new(ev.x).argmax(1)).float().mean()
        extra["transfer"][kind] = dict(
            cosine_tau_joint_vs_tau_new=tau_joint.cosine(tau_new),
            # distance of base+tau from the real fine-tune, relative to the real fine-tune's move
            relative_distance=ta.TaskVector.from_models(ft_new, transferred).norm() / tau_new.norm(),
            prediction_agreement=float(agree))

    return dict(metrics={name: evaluate(m, ev, digits) for name, m in models.items()},
                curves=curves, **extra)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def versions() -> dict:
    import matplotlib
    import seaborn
    out = dict(python=platform.python_version(), platform=platform.platform(),
               torch=torch.__version__, numpy=np.__version__, matplotlib=matplotlib.__version__,
               seaborn=seaborn.__version__, taskarith=getattr(ta, "__version__", "unknown"))
    try:
        import torchvision
        out["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return out


def machine(device) -> dict:
    out = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
               cpu_count=os.cpu_count(), device=str(device))
    try:
        out["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def on_device(data: dict, device) -> dict:
    out = dict(data, tasks={c: s.to(device) for c, s in data["tasks"].items()})
    for key in ("pretrain", "val", "eval"):
        out[key] = data[key].to(device)
    return out


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.render:
        _music_render.render(args.render)
        return None
    started, started_at = time.perf_counter(), dt.datetime.now().isoformat(timespec="seconds")

    def log(msg):  # one line per stage, with the elapsed time
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but CUDA is not available here; use --device cpu or auto",
              file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    out = args.out or Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")

    try:  # every split is made before any training, so a data problem stops the run at once
        arrays, provenance = read_arrays(args)
        split_seeds = list(dict.fromkeys(seed_split(args, s) for s in args.seeds))
        data = {s: split_data(arrays, args, s) for s in split_seeds[:1]}
        for s in split_seeds[1:]:
            split_data(arrays, args, s)
    except DataUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    first = data[split_seeds[0]]
    torch.set_num_threads(args.threads or 1)
    no_verdicts = not_judged_reason(args)
    if args.quick:
        log("SMOKE TEST (--quick): small settings to check that everything runs; no verdicts")
    for line in provenance + ([first["note"]] if first["note"] else []):
        log(line)
    settings = SETTINGS if args.sweep else [(args.ft_optimizer, args.ft_lr)]
    log(f"device {device}; splits {first['sizes']} (split seed "
        + (f"--split-seed + seed: {split_seeds}" if args.vary_split else str(args.split_seed))
        + f"); pretraining {args.optimizer} lr {args.pretrain_lr:g}; fine-tuning "
        + ", ".join(f"{o} lr {lr:g}" for o, lr in settings) + "; taskarith merge: "
        f"{'yes' if HAS_MERGE else 'no (plain sum stands in)'}, consolidate: "
        f"{'yes' if HAS_CONSOLIDATE and HAS_CAPTUM else 'no (plain sum stands in)'}")

    per_setting, cache = {s: [] for s in settings}, {}
    for i, seed in enumerate(args.seeds, start=1):
        split_seed = seed_split(args, seed)
        if split_seed not in data:  # one split in memory at a time
            data = {split_seed: split_data(arrays, args, split_seed)}
        seed_data = on_device(data[split_seed], device)
        for opt, lr in settings:
            log(f"seed {seed} ({i}/{len(args.seeds)})" + (f", fine-tuning {opt} lr {lr:g}" if args.sweep else ""))
            per_setting[(opt, lr)].append(run_seed(seed, seed_data, setting_args(args, opt, lr), device,
                                                   (lambda msg: None) if args.sweep else log, cache))
        cache.pop(seed, None)

    stand_in = per_setting[settings[0]][0]["stand_in"]
    momentum = dict(sgd=0.9)
    results = dict(
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        command=shlex.join(["python", *(sys.argv if argv is None
                                         else ["examples/mnist_music.py", *argv])]),
        smoke_test=bool(args.quick), verdicts_note=no_verdicts,
        training=dict(
            pretrain=dict(optimizer=args.optimizer, lr=args.pretrain_lr, epochs=args.pretrain_epochs,
                          momentum=momentum.get(args.optimizer)),
            finetune=dict(optimizer=args.ft_optimizer, lr=args.ft_lr, epochs=args.epochs,
                          momentum=momentum.get(args.ft_optimizer)),
            batch_size=args.batch_size),
        versions=versions(), device=str(device), machine=machine(device), started=started_at,
        data=dict(dataset=args.dataset, mode="full" if first["full"] else "test-split",
                  note=first["note"], provenance=provenance, sizes=first["sizes"],
                  split_seeds={str(s): seed_split(args, s) for s in args.seeds},
                  task_share=first["task_share"], eval_class_counts=first["eval_class_counts"],
                  class_names=CLASS_NAMES[args.dataset]),
        library=dict(merge=HAS_MERGE, consolidate=HAS_CONSOLIDATE, captum=HAS_CAPTUM,
                     stand_in=stand_in, merges=list(MERGES)))
    if args.sweep:
        results["training"]["finetune"] = dict(sweep=[dict(optimizer=o, lr=lr, momentum=momentum.get(o))
                                                       for o, lr in settings], epochs=args.epochs)
        results["sweep"] = sweep_results(per_setting, args)
    else:
        per_seed = per_setting[settings[0]]
        summary = summarize(per_seed, args)
        results.update(seeds={str(s): r for s, r in zip(args.seeds, per_seed)}, summary=summary,
                       verdicts=verdicts(summary, args, stand_in))
    results["seconds"] = dict(study=time.perf_counter() - started)

    out.mkdir(parents=True, exist_ok=True)
    log("writing figures and report")
    if args.sweep:
        results["figures"] = [fig_sweep(results, out)]
        results["seconds"]["total"] = time.perf_counter() - started
        (out / "results.json").write_text(json.dumps(results, indent=1))
        write_sweep_report(results, out)
        log(sweep_answer(results))
    else:
        results["figures"] = _music_figures.write_figures(results, out)
        results["seconds"]["total"] = time.perf_counter() - started
        (out / "results.json").write_text(json.dumps(results, indent=1))
        _music_report.write_report(results, out)
        if no_verdicts:
            log(f"{no_verdicts} (claims and their numbers are in report.md)")
        else:
            for v in results["verdicts"]:
                log(f"{v['verdict'].upper():<12} {v['claim']}")
    log(f"done: {out / 'report.md'}")
    return results


if __name__ == "__main__":
    main()
