#!/usr/bin/env python
"""Does an integrated-gradient consolidated task vector beat magnitude-based merging? (MNIST, 3 tasks)

Protocol, repeated for every seed (the seed draws the split, the initialisation and the batch order):

* data: the real MNIST test split (10,000 digits), cut into disjoint parts: an evaluation set
  (--eval-size, all digits), a validation set (--val-size, all digits), one task set per task digit
  (3, 4 and 7: --task-size images of the digit plus --replay images of the other seven digits,
  which pretraining never sees), and a pretraining set (every remaining image of the other digits,
  and only --pretrain-task-size images of each task digit, so the pretrained model is weak on them);
* model: MLP 784-128-64-10 with ReLU, pretrained with Adam; each task fine-tunes its own copy of
  the pretrained model on its task set, giving τ_3, τ_4, τ_7;
* attributions: integrated gradients of the mean log-probability of the true labels over each
  task's own fine-tuning set, along θ0 -> θ0 + τ_t (taskarith.attribution, Captum inside);
* methods: the pretrained model; task arithmetic (θ0 + λ Σ τ_t); TIES (taskarith.merge's "ties" at
  scale 1, which equals consolidate with magnitude scores, select="abs", resolve="sign_sum");
  consolidate with magnitude scores and resolve="max";
  consolidate with IG scores in four select/resolve variants; and a control that trims at random
  (uniform random scores, otherwise TIES). Every method's λ is tuned on the validation set with
  taskarith.tune_scale, once for overall accuracy and once for the balanced score;
* reported on the evaluation set: accuracy overall, on the task digits, on the other digits, and
  the balanced score (mean of the last two), mean ± std over seeds, plus paired differences.

    python examples/ig_consolidation.py                       # 5 seeds, a few minutes on 2 cores
    python examples/ig_consolidation.py --quick               # 2 seeds, well under a minute
    python examples/ig_consolidation.py --seeds 0 1 2 3 4 5 6 7 8 9 --out runs/ig10.json

Writes a JSON file (--out) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import platform
import statistics
import struct
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import taskarith as ta
from taskarith.attribution import integrated_gradients

ROOT = Path(__file__).resolve().parents[1]
TASKS = (3, 4, 7)
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist-t10k"
QUICK = dict(seeds=[0, 1], pretrain_epochs=3, finetune_epochs=3, eval_size=2000)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                   help="folder holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one full run per seed")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ig_consolidation.json", help="results JSON")
    p.add_argument("--eval-size", type=int, default=3000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--task-size", type=int, default=300, help="images of the task digit per task set")
    p.add_argument("--replay", type=int, default=300, help="images of other digits added to each task set")
    p.add_argument("--pretrain-task-size", type=int, default=30, help="images of each task digit in pretraining")
    p.add_argument("--pretrain-epochs", type=int, default=5)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (pretraining and fine-tuning)")
    p.add_argument("--density", type=float, default=0.2, help="fraction of each τ kept by consolidate/TIES")
    p.add_argument("--n-steps", type=int, default=8, help="integrated-gradient path points")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format), from a .gz or a plain file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist_t10k(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    found = {}
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        candidates = [folder / (stem + ".gz"), folder / stem]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            sys.exit(f"error: {stem}(.gz) not found in {folder}; pass --data-dir with the MNIST test split")
        found[stem] = read_idx(path)
    images = torch.from_numpy(found["t10k-images-idx3-ubyte"].reshape(-1, 784).astype(np.float32) / 255.0)
    images = (images - 0.1307) / 0.3081
    return images, torch.from_numpy(found["t10k-labels-idx1-ubyte"].astype(np.int64))


def split(labels: torch.Tensor, seed: int, args) -> dict[str, torch.Tensor]:
    """Disjoint index sets: eval, val, one task set per task digit, pretrain."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    order = torch.randperm(len(labels), generator=gen)
    parts = {"eval": order[:args.eval_size], "val": order[args.eval_size:args.eval_size + args.val_size]}
    rest = order[args.eval_size + args.val_size:]
    task_digit = torch.isin(labels[rest], torch.tensor(TASKS))
    others = rest[~task_digit]
    pretrain, replay_pool = [], others[:len(others) - len(TASKS) * args.replay]
    replay = others[len(others) - len(TASKS) * args.replay:]
    for i, digit in enumerate(TASKS):
        mine = rest[labels[rest] == digit]
        if len(mine) < args.task_size + args.pretrain_task_size:
            sys.exit(f"error: only {len(mine)} images of {digit} left for its task set and pretraining")
        parts[f"task{digit}"] = torch.cat([mine[:args.task_size], replay[i * args.replay:(i + 1) * args.replay]])
        pretrain.append(mine[args.task_size:args.task_size + args.pretrain_task_size])
    parts["pretrain"] = torch.cat([replay_pool, *pretrain])
    return parts


# ---------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def train(model: nn.Module, x, y, *, epochs: int, lr: float, batch: int, gen: torch.Generator) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class Scorer:
    """Accuracies of a state_dict on one labelled set: overall, task digits, other digits, balanced."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.task = torch.isin(y, torch.tensor(TASKS))
        self.model = make_model().eval()

    def __call__(self, state) -> dict[str, float]:
        self.model.load_state_dict(state)
        with torch.no_grad():
            right = self.model(self.x).argmax(1) == self.y
        task, other = right[self.task].float().mean().item(), right[~self.task].float().mean().item()
        per_task = {str(d): right[self.y == d].float().mean().item() for d in TASKS}
        return {"overall": right.float().mean().item(), "task": task, "other": other,
                "balanced": (task + other) / 2, "per_task": per_task}


# ---------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------

METHODS = {
    # name: (score source, consolidate options)
    "task arithmetic": ("sum", None),
    "TIES": ("ties", None),
    "magnitude, max": ("magnitude", dict(select="abs", resolve="max")),
    "IG, positive, attribution": ("ig", dict(select="positive", resolve="attribution")),
    "IG, abs, attribution": ("ig", dict(select="abs", resolve="attribution")),
    "IG, positive, sign_sum": ("ig", dict(select="positive", resolve="sign_sum")),
    "IG, positive, max": ("ig", dict(select="positive", resolve="max")),
    "random trim (control)": ("random", dict(select="abs", resolve="sign_sum")),
}
CRITERIA = ("overall", "balanced")
# taskarith's default grid (0.1 ... 3) plus 0 and 0.05, so a method whose vector hurts can fall back.
GRID = (0.0, 0.05) + ta.attribution.DEFAULT_GRID


def ties(vectors, density: float) -> ta.TaskVector:
    """TIES without its scale: taskarith.merge's where it exists, else consolidate's identical configuration."""
    if "ties" in getattr(ta, "methods", dict)():
        return ta.merge(vectors, "ties", density=density, sign="sum", scale=1.0)
    return ta.consolidate(vectors, density=density, select="abs", resolve="sign_sum", merge="disjoint_mean")


def output_row_conflicts(vectors, attributions) -> dict:
    """Who wins sign conflicts in the output-layer rows of the task digits, by attribution vs by sum.

    At every entry of class c's output row (weights and bias) where the task vectors disagree in
    sign, does the elected sign agree with task c's own move? A diagnostic of the mechanism.
    """
    won = {"attribution": 0, "sign_sum": 0}
    total = 0
    for name in ("4.weight", "4.bias"):
        for i, digit in enumerate(TASKS):
            taus = torch.stack([v[name][digit] for v in vectors])
            scores = torch.stack([a[name][digit].abs() for a in attributions])
            own = torch.sign(taus[i])
            conflict = (torch.sign(taus) != own).any(0) & (own != 0)
            by_sum = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
            plus, minus = torch.where(taus > 0, scores, 0).sum(0), torch.where(taus < 0, scores, 0).sum(0)
            by_attribution = torch.where(plus >= minus, 1.0, -1.0)
            won["attribution"] += int((by_attribution == own)[conflict].sum())
            won["sign_sum"] += int((by_sum == own)[conflict].sum())
            total += int(conflict.sum())
    return {"conflicts": total, **{k: v / max(total, 1) for k, v in won.items()}}


def run_seed(seed: int, images, labels, args) -> dict:
    t0 = time.perf_counter()
    parts = split(labels, seed, args)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xs = {k: images[v] for k, v in parts.items()}
    ys = {k: labels[v] for k, v in parts.items()}
    pre = train(make_model(), xs["pretrain"], ys["pretrain"], epochs=args.pretrain_epochs, lr=args.lr,
                batch=64, gen=gen)
    vectors, attributions, gaps = [], [], {}
    for digit in TASKS:
        tuned = make_model()
        tuned.load_state_dict(pre.state_dict())
        train(tuned, xs[f"task{digit}"], ys[f"task{digit}"], epochs=args.finetune_epochs, lr=args.lr,
              batch=32, gen=gen)
        tv = ta.TaskVector.from_models(pre, tuned)
        vectors.append(tv)
        ig = integrated_gradients(pre, pre, tv, (xs[f"task{digit}"], ys[f"task{digit}"]), n_steps=args.n_steps)
        attributions.append(ig)
        gaps[str(digit)] = {"gain": ig.gain, "delta": ig.delta, "relative_gap": ig.relative_gap,
                            "positive_fraction": float(sum(int((ig[n] > 0).sum()) for n in ig)) / ig.numel()}
    t_models = time.perf_counter() - t0
    rand = torch.Generator().manual_seed(20_000 + seed)
    random_scores = [{n: torch.rand(v[n].shape, generator=rand) for n in v} for v in vectors]
    val, test = Scorer(xs["val"], ys["val"]), Scorer(xs["eval"], ys["eval"])
    results = {"pretrained": {c: {"lambda": 0.0, **test(pre.state_dict())} for c in CRITERIA}}
    for name, (source, options) in METHODS.items():
        if source == "sum":
            merged = ta.TaskVector.sum(vectors)
        elif source == "ties":
            merged = ties(vectors, args.density)
        else:
            scores = {"magnitude": None, "ig": attributions, "random": random_scores}[source]
            merged = ta.consolidate(vectors, scores, density=args.density, **options)
        results[name] = {}
        for criterion in CRITERIA:
            lam = ta.attribution.tune_scale(pre, merged, lambda s, c=criterion: val(s)[c], grid=GRID)
            results[name][criterion] = {"lambda": lam, **test(merged.apply_to(pre, lam))}
    return {"seed": seed, "completeness": gaps, "results": results,
            "own_task_wins": output_row_conflicts(vectors, attributions),
            "seconds": {"models_and_attributions": t_models, "total": time.perf_counter() - t0}}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def mean_std(values) -> str:
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * sd:.2f}"


def table(runs: list[dict], criterion: str) -> str:
    methods = list(runs[0]["results"])
    lines = [f"λ tuned for validation **{criterion}** accuracy"
             + (" (mean of task-digit and other-digit accuracy)" if criterion == "balanced" else "") + "; "
             f"evaluation-set accuracy in %, mean ± std over {len(runs)} seeds", "",
             "| method | overall | task digits 3/4/7 | other digits | balanced | λ (median) |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        rows = [r["results"][m][criterion] for r in runs]
        cells = [mean_std(row[k] for row in rows) for k in ("overall", "task", "other", "balanced")]
        lam = statistics.median(row["lambda"] for row in rows)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {lam:g} |")
    return "\n".join(lines)


def paired(runs: list[dict], criterion: str, references=("TIES", "task arithmetic", "random trim (control)")) -> str:
    """Per-seed differences of the criterion's own metric against each reference method."""
    lines = [(f"Paired differences in evaluation **{criterion}** accuracy (λ tuned for it), percentage points: "
              "mean ± std over seeds, and seeds where the method is ahead"), "",
             "| method | " + " | ".join(f"Δ vs {r} | ahead" for r in references) + " |",
             "|---|" + "---|---|" * len(references)]
    for m in runs[0]["results"]:
        if m == "pretrained":
            continue
        cells = []
        for ref in references:
            if ref == m:
                cells += ["", ""]
                continue
            d = [r["results"][m][criterion][criterion] - r["results"][ref][criterion][criterion] for r in runs]
            cells += [mean_std(d), f"{sum(x > 0 for x in d)}/{len(d)}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == build_parser().get_default(key):
                setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels = load_mnist_t10k(args.data_dir)
    started = time.perf_counter()
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ta.attribution.CompletenessWarning)  # never report broken attributions
        for seed in args.seeds:
            runs.append(run_seed(seed, images, labels, args))
            r = runs[-1]["results"]
            print(f"seed {seed}: {runs[-1]['seconds']['total']:.1f}s; overall-tuned accuracy "
                  + ", ".join(f"{m.split(' (')[0]} {100 * r[m]['overall']['overall']:.1f}"
                              for m in ("pretrained", "task arithmetic", "TIES", "IG, positive, attribution")),
                  flush=True)
    report = "\n\n".join([table(runs, "overall"), table(runs, "balanced"),
                          paired(runs, "overall"), paired(runs, "balanced")])
    gaps = [g["relative_gap"] for r in runs for g in r["completeness"].values()]
    report += (f"\n\nIG completeness over {len(gaps)} attributions ({args.n_steps} Gauss-Legendre steps): "
               f"relative gap median {statistics.median(gaps):.1e}, max {max(gaps):.1e}.")
    wins = [r["own_task_wins"] for r in runs]
    report += (f"\nSign conflicts in the output rows of the task digits ({statistics.median(w['conflicts'] for w in wins):g} "
               f"entries per seed, median): the digit's own task wins the attribution election in "
               f"{mean_std(w['attribution'] for w in wins)} % of them, the sign-of-sum election in "
               f"{mean_std(w['sign_sum'] for w in wins)} %.")
    print("\n" + report)
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "threads": torch.get_num_threads()},
        "seconds": time.perf_counter() - started,
        "runs": runs,
        "report": report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out} ({out['seconds']:.0f}s)")
    return out


if __name__ == "__main__":
    main()
