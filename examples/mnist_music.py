#!/usr/bin/env python
"""The MUSIC reference study: sequential vs joint fine-tuning and task vectors on MNIST.

MUSIC ("Make Unification Simple In Image Classification") is a student study that made three claims
about a small MLP on MNIST, with digits 3, 4 and 7 as three fine-tuning tasks T1, T2, T3:

* H0 (new): fine-tuning step by step on T1, T2, T3 beats fine-tuning once on their combined data
  (the authors report 91.70% before fine-tuning, 70% after joint and 88% after sequential).
* H0 (initial): applying tau1, tau2, tau3 one after another to the pretrained model degrades it,
  while a consolidated task vector (ctv) performs well on all three tasks.
* Transfer: theta_new_ft = theta_new_pt + tau for a new pretrained model.

This script tests those claims; it does not try to reproduce the authors' numbers. Every task-vector
step goes through taskarith's public API. Each seed runs the whole protocol; the report shows
mean +- std over seeds and paired bootstrap confidence intervals, and gives each claim a verdict
(confirmed / refuted / inconclusive) by rules fixed in advance (see `verdicts`).

    python examples/mnist_music.py --data-dir ../shared/data/mnist-t10k     # MNIST test split only
    python examples/mnist_music.py --dataset fashion-mnist                   # Debian's dataset-fashion-mnist
    python examples/mnist_music.py --quick --data-dir ../shared/data/mnist-t10k   # < 1 minute

Writes results.json, report.md and PNG figures to --out (default runs/<timestamp>).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gzip
import hashlib
import importlib.util
import json
import math
import platform
import shlex
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import taskarith as ta

import _music_report  # figures and report.md only (sibling file), so this one stays about the study

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

# --quick shrinks the study to a CI-sized smoke run; explicit flags still win over these values.
QUICK = dict(seeds=[0, 1], pretrain_epochs=2, continue_epochs=1, epochs=2, task_samples=100,
             val_size=500, eval_size=1000, lambdas=[round(0.1 * i, 2) for i in range(11)],
             bootstrap=1000)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except the empty ones (None, False) whose help text says what happens."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="MUSIC reference study: sequential vs joint fine-tuning, task arithmetic,\n"
                    "TIES/DARE merging, task negation and transfer, over several seeds.\n"
                    "Writes results.json, report.md and PNG figures to --out.",
        epilog="examples:\n"
               "  python examples/mnist_music.py --data-dir ../shared/data/mnist-t10k\n"
               "  python examples/mnist_music.py --dataset fashion-mnist\n"
               "  python examples/mnist_music.py --quick --data-dir ../shared/data/mnist-t10k",
        formatter_class=_HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist",
                   help="Which IDX data set to study; fashion-mnist uses class indices as 'digits'.")
    d.add_argument("--data-dir", type=Path, default=None,
                   help="Folder with the IDX files (train-/t10k-images-idx3-ubyte, "
                        "train-/t10k-labels-idx1-ubyte, gzipped or not). With only the t10k files "
                        "the study splits the test set (test-split mode). Default: ./data/<dataset>, "
                        "and /usr/share/datasets/fashion-mnist for fashion-mnist.")
    d.add_argument("--no-download", action="store_true",
                   help="Never try torchvision's download when no IDX files are found.")
    d.add_argument("--no-verify", action="store_true",
                   help="Use files whose md5 does not match the known checksum (not recommended).")
    d.add_argument("--split-seed", type=int, default=0,
                   help="Seed of the data split (task sets, validation, evaluation); fixed across "
                        "--seeds so that seeds vary only initialisation and shuffling.")
    d.add_argument("--digits", type=int, nargs=3, default=[3, 4, 7], metavar="D",
                   help="The three task classes T1 T2 T3, in the sequential order.")
    d.add_argument("--task-samples", type=int, default=None,
                   help="Samples per task class set aside for fine-tuning "
                        "(default 1000; 300 in test-split mode).")
    d.add_argument("--val-size", type=int, default=None,
                   help="Validation samples (choose lambda, calibrate) taken from the pretraining "
                        "pool (default 5000; 1000 in test-split mode).")
    d.add_argument("--eval-size", type=int, default=3000,
                   help="Evaluation samples carved from the test split in test-split mode "
                        "(the full test split evaluates otherwise).")
    t = p.add_argument_group("training")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="Seeds; each runs the whole protocol (model init and shuffles).")
    t.add_argument("--pretrain-epochs", type=int, default=5, help="Epochs of pretraining.")
    t.add_argument("--continue-epochs", type=int, default=2,
                   help="Extra pretraining epochs that make the 'continued' second pretrained model.")
    t.add_argument("--epochs", type=int, default=10, help="Fine-tuning epochs per task (and joint).")
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="Optimizer for every run; a fresh one per run (sgd uses momentum 0.9).")
    t.add_argument("--pretrain-lr", type=float, default=1e-3, help="Pretraining learning rate.")
    t.add_argument("--lr", type=float, default=1e-3, help="Fine-tuning learning rate.")
    t.add_argument("--batch-size", type=int, default=64, help="Mini-batch size of every run.")
    m = p.add_argument_group("task vectors")
    m.add_argument("--lambdas", type=float, nargs="+",
                   default=[round(0.05 * i, 2) for i in range(21)],
                   help="Scaling coefficients tried on the validation split.")
    m.add_argument("--ties-density", type=float, default=0.2,
                   help="TIES: fraction of each task vector's entries kept.")
    m.add_argument("--dare-drop", type=float, default=0.9,
                   help="DARE: fraction of each task vector's entries dropped.")
    m.add_argument("--ctv-density", type=float, default=0.2,
                   help="Consolidation: fraction of each task vector's entries kept, ranked by "
                        "integrated-gradient attribution.")
    m.add_argument("--ig-steps", type=int, default=8,
                   help="Consolidation: integration points of the integrated gradients.")
    m.add_argument("--forget", type=int, default=None,
                   help="Task class to forget by negation, one of --digits (default: the last).")
    m.add_argument("--control-threshold", type=float, default=0.95,
                   help="Negation: keep validation accuracy on the other classes at least this "
                        "fraction of the pretrained model's.")
    s = p.add_argument_group("statistics")
    s.add_argument("--bootstrap", type=int, default=10000, help="Bootstrap resamples for CIs.")
    s.add_argument("--equivalence-margin", type=float, default=0.02,
                   help="Transfer: |accuracy gap| within which theta_new+tau counts as equal to "
                        "fine-tuning theta_new.")
    r = p.add_argument_group("run")
    r.add_argument("--out", type=Path, default=None,
                   help="Run directory (default runs/<timestamp>).")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="Where to train; auto picks cuda when available.")
    r.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1: this MLP gains nothing from more, and "
                        "one thread does not stall when other work shares the cores).")
    r.add_argument("--quick", action="store_true",
                   help="CI-sized run (2 seeds, 2 epochs, 100 task samples): well under a minute.")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # re-parse so that flags given explicitly override the quick preset
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.forget is None:
        args.forget = args.digits[-1]
    if len(set(args.digits)) != 3 or not all(0 <= c <= 9 for c in args.digits):
        parser.error("--digits needs three distinct classes in 0..9")
    if args.forget not in args.digits:
        parser.error("--forget must be one of --digits (its task vector is what gets negated)")
    return args


# ---------------------------------------------------------------------------------------------
# Data: IDX files, checksums, splits
# ---------------------------------------------------------------------------------------------

FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}

# md5 of each file as stored. The .gz sums are torchvision's (the files its download fetches),
# plus those of Debian's dataset-fashion-mnist package (recompressed, same pixels). The sums of
# uncompressed files are of the decompressed content of verified archives; MNIST's train files
# have no uncompressed sum here, so such files are only checked for shape.
KNOWN_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": {"f68b3c2dcbeaaa9fbdd348bbdeb94873"},
        "train-labels-idx1-ubyte.gz": {"d53e105ee54ea40749a09fcbcd1e9432"},
        "t10k-images-idx3-ubyte.gz": {"9fb629c4189551a2d022fa330f9573f3"},
        "t10k-labels-idx1-ubyte.gz": {"ec29112dd5afa0611ce80d1b7f02629c"},
        "t10k-images-idx3-ubyte": {"2646ac647ad5339dbf082846283269ea"},
        "t10k-labels-idx1-ubyte": {"27ae3e4e09519cfbb04c329615203637"},
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": {"8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                       "cf8536b0aa1a6ac5fa3f23001093305c"},
        "train-labels-idx1-ubyte.gz": {"25c81989df183df01b3e8a0aad5dffbe",
                                       "10bea18fdb374794d4bb42e356e600c9"},
        "t10k-images-idx3-ubyte.gz": {"bef4ecab320f06d8554ea6380940ec79",
                                      "f78720b4224f21cce2f2ccf2d7a94c9a"},
        "t10k-labels-idx1-ubyte.gz": {"bb300cfdad3c16e7a12a480ee83cd310",
                                      "0d30e22e447f3c33dab9ed536400ac01"},
        "train-images-idx3-ubyte": {"f4a8712d7a061bf5bd6d2ca38dc4d50a"},
        "train-labels-idx1-ubyte": {"9018921c3c673c538a1fc5bad174d6f9"},
        "t10k-images-idx3-ubyte": {"8181f5470baa50b63fa0f6fddb340f0a"},
        "t10k-labels-idx1-ubyte": {"15d484375f8d13e6eb1aabb0c3f46965"},
    },
}
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Boot"],
}
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


class DataUnavailable(Exception):
    """No usable IDX files; main() turns this into exit code 2 with the message."""


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or raw) of unsigned bytes into an array of its declared shape."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # a truncated or corrupt download, for instance
        raise DataUnavailable(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataUnavailable(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise DataUnavailable(f"{path}: header says {dims}, found {data.size} bytes")
    return data.reshape(dims)


def find_idx(folder: Path, stem: str, dataset: str) -> Path | None:
    """The file `stem` (or `stem.gz`) in `folder` or torchvision's `<Folder>/raw` layout."""
    for base in (folder, folder / TORCHVISION_FOLDER[dataset] / "raw"):
        for name in (stem + ".gz", stem):
            if (base / name).is_file():
                return base / name
    return None


def check_md5(path: Path, dataset: str, verify: bool) -> str:
    known = KNOWN_MD5[dataset].get(path.name)
    if known is None:
        return "unverified (no known md5 for this file)"
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest in known:
        return f"verified md5 {digest}"
    if verify:
        raise DataUnavailable(f"{path}: md5 {digest} matches none of the known checksums "
                              f"{sorted(known)}; the file may be corrupt. Replace it, or pass "
                              f"--no-verify to use it anyway.")
    return f"MISMATCH md5 {digest} (used because of --no-verify)"


def locate_files(args) -> tuple[dict[str, Path], list[str]]:
    """Find the IDX files: --data-dir (or the defaults), then torchvision's download."""
    if args.data_dir is not None:
        folders = [args.data_dir]
    else:
        folders = [Path("data") / args.dataset]
        if args.dataset == "fashion-mnist":
            folders.append(Path("/usr/share/datasets/fashion-mnist"))
    tried = []
    for folder in folders:
        found = {k: find_idx(folder, stem, args.dataset) for k, stem in FILES.items()}
        if found["test_images"] and found["test_labels"]:
            return {k: v for k, v in found.items() if v}, [f"read from {folder}"]
        tried.append(str(folder))
    if not args.no_download:
        root = folders[0]
        try:  # torchvision keeps the .gz files in <root>/<Folder>/raw, which find_idx reads
            import torchvision.datasets as tvd
            cls = tvd.MNIST if args.dataset == "mnist" else tvd.FashionMNIST
            for train in (True, False):
                cls(str(root), train=train, download=True)
            found = {k: find_idx(root, stem, args.dataset) for k, stem in FILES.items()}
            return found, [f"downloaded by torchvision into {root}"]
        except (ImportError, OSError, RuntimeError) as exc:  # no torchvision, no network, ...
            tried.append(f"torchvision download into {root} failed: {type(exc).__name__}: {exc}")
    hint = ("install Debian's package: apt-get install -y dataset-fashion-mnist "
            "(files land in /usr/share/datasets/fashion-mnist)" if args.dataset == "fashion-mnist"
            else "put the four MNIST IDX files in a folder and pass --data-dir; the test split "
                 "alone (t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) is enough")
    raise DataUnavailable(f"no {args.dataset} IDX files found (tried: {'; '.join(tried)}). "
                          f"To supply them, {hint}.")


@dataclass
class Split:
    x: torch.Tensor  # float32 [n, 784], pixels scaled to [-1, 1]
    y: torch.Tensor  # int64 [n]

    def __len__(self):
        return len(self.y)

    def to(self, device):
        return Split(self.x.to(device), self.y.to(device))


def to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    # x / 127.5 - 1 is exactly ToTensor() (x / 255) followed by Normalize(mean=0.5, std=0.5).
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0)
    return Split(x, torch.from_numpy(labels.astype(np.int64)))


def load_data(args) -> dict:
    """Load IDX files and split them: pretrain / validation / three task sets / evaluation."""
    paths, provenance = locate_files(args)
    provenance += [f"{p}: {check_md5(p, args.dataset, not args.no_verify)}" for p in paths.values()]
    arrays = {k: read_idx(p) for k, p in paths.items()}
    rng = np.random.default_rng(args.split_seed)
    full = "train_images" in arrays and "train_labels" in arrays
    if full:  # the training split feeds pretraining, validation and tasks; the test split evaluates
        pool_x, pool_y = arrays["train_images"], arrays["train_labels"]
        eval_x, eval_y = arrays["test_images"], arrays["test_labels"]
    else:  # test-split mode: carve every part out of the 10,000 test images, disjointly
        pool_x, pool_y = arrays["test_images"], arrays["test_labels"]
    task_n = args.task_samples or (1000 if full else 300)
    val_n = args.val_size or (5000 if full else 1000)

    # Task sets first (exclusive), then shuffle what is left into evaluation / validation / pretrain.
    taken = np.zeros(len(pool_y), dtype=bool)
    tasks = {}
    for c in args.digits:
        candidates = np.flatnonzero(pool_y == c)
        if len(candidates) < task_n:
            raise DataUnavailable(f"only {len(candidates)} samples of class {c}; "
                                  f"lower --task-samples (asked for {task_n})")
        idx = rng.choice(candidates, size=task_n, replace=False)
        taken[idx] = True
        tasks[c] = to_split(pool_x[idx], pool_y[idx])
    rest = rng.permutation(np.flatnonzero(~taken))
    if not full:
        eval_idx, rest = rest[:args.eval_size], rest[args.eval_size:]
        eval_x, eval_y = pool_x[eval_idx], pool_y[eval_idx]
    val_idx, pre_idx = rest[:val_n], rest[val_n:]
    if len(pre_idx) < 1000:
        raise DataUnavailable(f"only {len(pre_idx)} samples left for pretraining; "
                              f"lower --val-size / --eval-size / --task-samples")
    note = None if full else (
        f"Test-split mode: only the {len(pool_y)}-image test split was found, so it is split "
        f"disjointly into pretraining ({len(pre_idx)}), validation ({len(val_idx)}), task sets "
        f"({task_n} per class, fewer than the study's 1000) and evaluation ({len(eval_y)}) parts.")
    return dict(full=full, note=note, provenance=provenance, task_samples=task_n,
                pretrain=to_split(pool_x[pre_idx], pool_y[pre_idx]),
                val=to_split(pool_x[val_idx], pool_y[val_idx]),
                eval=to_split(eval_x, eval_y), tasks=tasks,
                sizes=dict(pretrain=len(pre_idx), val=len(val_idx), eval=len(eval_y),
                           task_per_class=task_n))


# ---------------------------------------------------------------------------------------------
# Model, training, metrics
# ---------------------------------------------------------------------------------------------

class SimpleNN(nn.Module):
    """The study's MLP: 784-128-64-10 with ReLU."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def derive_seed(seed: int, *parts) -> int:
    """A stable seed per (seed, run name): a run's result does not depend on which runs came
    before it, so shared prefixes (fine-tune on 3, then 3>4) can be computed once and reused."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % 2**63


def new_model(seed: int, name: str, device) -> SimpleNN:
    torch.manual_seed(derive_seed(seed, "init", name))
    return SimpleNN().to(device)  # initialised on the CPU, so identical on every device


def model_from_state(state: dict, device) -> SimpleNN:
    model = SimpleNN().to(device)
    model.load_state_dict(state)
    return model


@torch.no_grad()
def confusion(model: nn.Module, split: Split) -> torch.Tensor:
    """10x10 confusion matrix, rows = true class, columns = predicted class."""
    model.eval()
    pred = model(split.x).argmax(1)
    return torch.bincount(split.y * 10 + pred, minlength=100).reshape(10, 10).cpu()


def scores(conf, classes) -> dict:
    """Accuracy and macro precision/recall/F1 over `classes`, from a full confusion matrix.

    Accuracy counts the samples whose true class is in `classes`; precision of a class counts
    every prediction of it, whichever the true class (so a model that calls everything 7 has a
    poor precision on 7). A class never predicted has precision 0 (sklearn's zero_division=0).
    """
    conf = conf.double()
    tp = conf.diag()
    precision = torch.where(conf.sum(0) > 0, tp / conf.sum(0).clamp(min=1), 0.0)
    recall = torch.where(conf.sum(1) > 0, tp / conf.sum(1).clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    c = list(classes)
    return dict(accuracy=float(tp[c].sum() / conf[c].sum()), precision=float(precision[c].mean()),
                recall=float(recall[c].mean()), f1=float(f1[c].mean()))


def evaluate(model: nn.Module, split: Split, task_classes) -> dict:
    """Overall / task-class / other-class metrics, per-class P/R/F1 and the confusion matrix."""
    conf = confusion(model, split)
    others = [c for c in range(10) if c not in task_classes]
    per_class = [scores(conf, [c]) for c in range(10)]
    return dict(overall=scores(conf, range(10)), task=scores(conf, task_classes),
                other=scores(conf, others),
                per_class={k: [pc[k] for pc in per_class] for k in ("precision", "recall", "f1")},
                confusion=conf.tolist())


@torch.no_grad()
def quick_eval(model, split: Split, task_classes) -> dict:
    """Cheap per-epoch numbers for the training curves (validation split)."""
    model.eval()
    logits = model(split.x)
    conf = torch.bincount(split.y * 10 + logits.argmax(1), minlength=100).reshape(10, 10).cpu()
    others = [c for c in range(10) if c not in task_classes]
    return dict(val_loss=float(F.cross_entropy(logits, split.y)),
                val_acc=scores(conf, range(10))["accuracy"],
                val_task_acc=scores(conf, task_classes)["accuracy"],
                val_other_acc=scores(conf, others)["accuracy"])


def train(model, data: Split, *, lr, args, seed, val: Split, task_classes,
          epochs=None, steps=None) -> dict:
    """Train `model` in place for `epochs` epochs or exactly `steps` optimizer steps.

    Shuffles come from a generator seeded with `seed` (the same role as a DataLoader's
    generator; indexing in-memory tensors is much faster than a DataLoader for this MLP).
    Returns the curve: per epoch, mean training loss and validation loss/accuracies; epoch 0 is
    the model before training.
    """
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if args.optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    gen = torch.Generator().manual_seed(seed)
    n, bs = len(data), args.batch_size
    total = steps if steps is not None else epochs * math.ceil(n / bs)
    curve = {k: [] for k in ("epoch", "step", "train_loss", "val_loss", "val_acc",
                             "val_task_acc", "val_other_acc")}
    # Epoch 0: the starting model (loss on the whole training data), so curves show the jump.
    model.eval()
    with torch.no_grad():
        start_loss = float(F.cross_entropy(model(data.x), data.y))
    for k, v in dict(epoch=0.0, step=0, train_loss=start_loss,
                     **quick_eval(model, val, task_classes)).items():
        curve[k].append(v)
    done = 0
    while done < total:
        model.train()
        perm = torch.randperm(n, generator=gen).to(data.x.device)
        loss_sum, batches = torch.zeros((), device=data.x.device), 0
        for start in range(0, n, bs):
            if done == total:
                break
            idx = perm[start:start + bs]
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
            done += 1
        curve["epoch"].append(done / math.ceil(n / bs))  # fractional for a last partial epoch
        curve["step"].append(done)
        curve["train_loss"].append(float(loss_sum) / batches)
        for k, v in quick_eval(model, val, task_classes).items():
            curve[k].append(v)
    return curve


# ---------------------------------------------------------------------------------------------
# Merging with the library (with honest stand-ins while a feature is missing)
# ---------------------------------------------------------------------------------------------

HAS_MERGE = hasattr(ta, "merge")
HAS_CONSOLIDATE = hasattr(ta, "consolidate")
HAS_CAPTUM = importlib.util.find_spec("captum") is not None  # integrated gradients need it


def merged_vectors(vectors, pretrained, val: Split, args, seed) -> tuple[dict, dict]:
    """TIES, DARE and IG-consolidated vectors (scale 1; lambda is tuned when applying).

    Where taskarith (or captum) lacks a feature, the plain sum stands in and the note says so.
    """
    plain = ta.TaskVector.sum(vectors)
    out, notes = {}, {}
    if HAS_MERGE:
        out["ties"] = ta.merge(vectors, method="ties", density=args.ties_density, scale=1.0)
        out["dare"] = ta.merge(vectors, method="dare", drop=args.dare_drop,
                               seed=derive_seed(seed, "dare"), scale=1.0)
    else:
        out["ties"] = out["dare"] = plain
        notes["ties"] = notes["dare"] = "taskarith.merge is not available: plain sum stands in"
    if HAS_CONSOLIDATE and HAS_CAPTUM:
        # Score each entry of tau_c by integrated gradients of task c's log-likelihood along
        # pt -> pt + tau_c, on the validation images of class c (never seen in fine-tuning);
        # keep each vector's best-scoring entries and merge them.
        scores = [ta.attribution.integrated_gradients(
                      pretrained, pretrained, tau, (val.x[val.y == c], val.y[val.y == c]),
                      n_steps=args.ig_steps)
                  for c, tau in zip(args.digits, vectors)]
        out["consolidated"] = ta.consolidate(vectors, scores, density=args.ctv_density)
    else:
        out["consolidated"] = plain
        notes["consolidated"] = ("taskarith.consolidate is not available" if not HAS_CONSOLIDATE
                                 else "captum is not installed") + ": plain sum stands in"
    return out, notes


def tune_lambda(vector, base, val: Split, args, device) -> tuple[float, list]:
    """The lambda of base + lambda * vector with the best validation accuracy (ties: smallest)."""
    curve = []
    for lam in args.lambdas:
        model = model_from_state(vector.apply_to(base, scale=lam), device)
        curve.append(scores(confusion(model, val), range(10))["accuracy"])
    return args.lambdas[int(np.argmax(curve))], curve


def tune_negation(vector, base, val: Split, args, device, pt_other_acc) -> tuple[float, list]:
    """Forgetting: the lambda of base - lambda * vector with the lowest validation accuracy on
    the forgotten class among those keeping the other classes' accuracy >= threshold * pt's."""
    others = [c for c in range(10) if c != args.forget]
    rows = []
    for lam in args.lambdas:
        conf = confusion(model_from_state((-vector).apply_to(base, scale=lam), device), val)
        rows.append((scores(conf, [args.forget])["accuracy"], scores(conf, others)["accuracy"]))
    ok = [i for i, (_, ctrl) in enumerate(rows) if ctrl >= args.control_threshold * pt_other_acc]
    best = min(ok, key=lambda i: (rows[i][0], args.lambdas[i]))  # lambda = 0 always qualifies
    return args.lambdas[best], rows


# ---------------------------------------------------------------------------------------------
# One seed of the study
# ---------------------------------------------------------------------------------------------

def run_seed(seed: int, data: dict, args, device, log) -> dict:
    digits, val, ev = args.digits, data["val"], data["eval"]
    tasks = data["tasks"]
    models, curves, extra = {}, {}, {}

    def fit(model, split, name, lr, stream=None, **budget):
        """Train and log one run; `stream` names the shuffle order (default: the run's name)."""
        t0 = time.perf_counter()
        curves[name] = train(model, split, lr=lr, args=args,
                             seed=derive_seed(seed, "shuffle", stream or name),
                             val=val, task_classes=digits, **budget)
        log(f"  {name:<28} {curves[name]['step'][-1]:>5} steps  val acc "
            f"{curves[name]['val_acc'][-1]:.3f}  ({time.perf_counter() - t0:.1f}s)")
        return model

    # Pretraining: the main model, an independently seeded one, and one that continued from pt
    # (a fresh optimizer, more epochs on the same data): the two second models for transfer.
    pt = fit(new_model(seed, "pretrained", device), data["pretrain"], "pretrain", args.pretrain_lr,
             epochs=args.pretrain_epochs)
    pt_ind = fit(new_model(seed, "independent", device), data["pretrain"],
                 "pretrain (independent)", args.pretrain_lr, epochs=args.pretrain_epochs)
    pt_cont = fit(copy.deepcopy(pt), data["pretrain"], "pretrain (continued)", args.pretrain_lr,
                  epochs=args.continue_epochs)
    models["pretrained"] = pt

    # Fine-tuning along every order of the three tasks. A prefix (e.g. 3>4) is trained once:
    # the model fine-tuned on 3 alone is both tau_3's model and stage 1 of 3>4>7 and 3>7>4.
    stages = {}
    orders = [(a, b, c) for a in digits for b in digits for c in digits if len({a, b, c}) == 3]
    for order in orders:
        for k in range(1, 4):
            prefix = order[:k]
            if prefix not in stages:
                start = pt if k == 1 else stages[prefix[:-1]]
                stages[prefix] = fit(copy.deepcopy(start), tasks[prefix[-1]],
                                     "finetune " + ">".join(map(str, prefix)), args.lr,
                                     epochs=args.epochs)
        models["seq:" + ">".join(map(str, order))] = stages[order]
    for c in digits:
        models[f"ft:{c}"] = stages[(c,)]

    # Joint fine-tuning on the combined task data, for --epochs and for the sequential step count.
    joint_data = Split(torch.cat([tasks[c].x for c in digits]), torch.cat([tasks[c].y for c in digits]))
    seq_steps = sum(curves["finetune " + ">".join(map(str, tuple(digits)[:k]))]["step"][-1]
                    for k in range(1, 4))
    models["joint"] = fit(copy.deepcopy(pt), joint_data, "joint", args.lr, epochs=args.epochs)
    # Same shuffle order as "joint": the two differ only in their step budget.
    models["joint_equal_steps"] = fit(copy.deepcopy(pt), joint_data, "joint (equal steps)", args.lr,
                                      stream="joint", steps=seq_steps)
    extra["steps"] = dict(sequential=seq_steps, joint=curves["joint"]["step"][-1],
                          joint_equal_steps=seq_steps)

    # Task vectors, all through taskarith.
    taus = {c: ta.TaskVector.from_models(pt, stages[(c,)]) for c in digits}
    vectors = [taus[c] for c in digits]
    extra["tau_norm"] = {str(c): taus[c].norm() for c in digits}
    extra["tau_cosine"] = {f"{a},{b}": taus[a].cosine(taus[b])
                           for i, a in enumerate(digits) for b in digits[i + 1:]}

    # Task arithmetic, TIES, DARE, consolidation: lambda chosen on validation only.
    candidates = {"task_arithmetic": ta.TaskVector.sum(vectors)}
    merged, extra["stand_in"] = merged_vectors(vectors, pt, val, args, seed)
    candidates.update(merged)
    extra["lambda"], extra["lambda_curve"] = {}, {}
    for name, vec in candidates.items():
        lam, curve = tune_lambda(vec, pt, val, args, device)
        extra["lambda"][name], extra["lambda_curve"][name] = lam, curve
        models[name] = model_from_state(vec.apply_to(pt, scale=lam), device)
    # The claim's ctv is applied whole; lambda = 1 shows it next to pt + tau1 + tau2 + tau3.
    models["consolidated_full"] = model_from_state(
        candidates["consolidated"].apply_to(pt, scale=1.0), device)

    # Gradual application: pt, pt+tau1, pt+tau1+tau2, pt+tau1+tau2+tau3 (lambda 1 and tuned).
    partial = None
    for k, c in enumerate(digits, start=1):
        partial = taus[c] if partial is None else partial + taus[c]
        models[f"gradual:{k}"] = model_from_state(partial.apply_to(pt, scale=1.0), device)
        models[f"gradual_tuned:{k}"] = model_from_state(
            partial.apply_to(pt, scale=extra["lambda"]["task_arithmetic"]), device)

    # Task negation: pt - lambda * tau_forget (forget one class, keep the rest).
    pt_other_val = scores(confusion(pt, val), [c for c in range(10) if c != args.forget])["accuracy"]
    forget_tau = taus[args.forget]
    lam, rows = tune_negation(forget_tau, pt, val, args, device, pt_other_val)
    extra["lambda"]["negation"], extra["negation_curve"] = lam, rows
    models["negation"] = model_from_state((-forget_tau).apply_to(pt, scale=lam), device)

    # Transfer: theta_new + tau_joint versus fine-tuning theta_new itself on the joint data.
    tau_joint = ta.TaskVector.from_models(pt, models["joint"])
    extra["transfer"] = {}
    for kind, base in (("independent", pt_ind), ("continued", pt_cont)):
        ft_new = fit(copy.deepcopy(base), joint_data, f"joint ({kind} base)", args.lr,
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
# Statistics and verdicts
# ---------------------------------------------------------------------------------------------

def mean_std(values) -> dict:
    v = np.asarray(values, dtype=float)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                values=v.tolist())


def paired(a, b, n_boot: int) -> dict:
    """Mean of the per-seed differences a - b with a percentile bootstrap 95% CI."""
    d = np.asarray(a, float) - np.asarray(b, float)
    rng = np.random.default_rng(20240607)  # fixed: the CI must not change between reruns
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return dict(mean=float(d.mean()), ci=[float(lo), float(hi)], diffs=d.tolist(),
                wins=int((d > 0).sum()), n=len(d))


def sign_verdict(cmp: dict) -> str:
    """confirmed if the CI is above 0, refuted if below, inconclusive otherwise or with 1 seed."""
    if cmp["n"] < 2:
        return "inconclusive"
    lo, hi = cmp["ci"]
    return "confirmed" if lo > 0 else "refuted" if hi < 0 else "inconclusive"


def summarize(per_seed: list, args) -> dict:
    """mean/std over seeds of every metric, and the paired comparisons behind the verdicts."""
    names = per_seed[0]["metrics"].keys()

    def get(name, group, metric):
        return [s["metrics"][name][group][metric] for s in per_seed]

    def acc(name, group="overall"):
        return get(name, group, "accuracy")

    def f1(name, c):
        return [s["metrics"][name]["per_class"]["f1"][c] for s in per_seed]

    methods = {n: {g: {m: mean_std(get(n, g, m)) for m in ("accuracy", "precision", "recall", "f1")}
                   for g in ("overall", "task", "other")} for n in names}
    per_class = {n: {k: np.mean([s["metrics"][n]["per_class"][k] for s in per_seed], 0).tolist()
                     for k in ("precision", "recall", "f1")} for n in names}
    confusions = {n: np.sum([s["metrics"][n]["confusion"] for s in per_seed], 0).tolist()
                  for n in names}
    seq = "seq:" + ">".join(map(str, args.digits))
    orders = [n for n in names if n.startswith("seq:")]
    order_mean = np.mean([acc(n) for n in orders], 0)
    B = args.bootstrap
    comparisons = {
        "sequential - joint (equal steps)": paired(acc(seq), acc("joint_equal_steps"), B),
        "sequential - joint": paired(acc(seq), acc("joint"), B),
        "mean of six orders - joint (equal steps)": paired(order_mean, acc("joint_equal_steps"), B),
        "gradual (tau1+tau2+tau3, lambda 1) - pretrained": paired(acc("gradual:3"),
                                                                  acc("pretrained"), B),
        "task arithmetic - pretrained": paired(acc("task_arithmetic"), acc("pretrained"), B),
        "ties - pretrained": paired(acc("ties"), acc("pretrained"), B),
        "dare - pretrained": paired(acc("dare"), acc("pretrained"), B),
        "consolidated - gradual (lambda 1)": paired(acc("consolidated"), acc("gradual:3"), B),
    }
    for c in args.digits:  # ctv vs pretrained on each task class (F1 punishes 'predict c always')
        comparisons[f"consolidated - pretrained, F1 of class {c}"] = paired(
            f1("consolidated", c), f1("pretrained", c), B)
    for kind in ("independent", "continued"):
        comparisons[f"transfer {kind}: base+tau - finetuned"] = paired(
            acc(f"transfer:{kind}:base+tau"), acc(f"transfer:{kind}:finetuned"), B)
        comparisons[f"transfer {kind}: base+tau - base"] = paired(
            acc(f"transfer:{kind}:base+tau"), acc(f"transfer:{kind}:base"), B)
    return dict(methods=methods, per_class=per_class, confusion=confusions,
                comparisons=comparisons)


def verdicts(summary: dict, args, stand_in: dict) -> list:
    """One verdict per claim, by rules fixed before looking at any result."""
    cmp, meth = summary["comparisons"], summary["methods"]

    def ms(n, g="overall"):  # "mean% ± std" of an accuracy
        a = meth[n][g]["accuracy"]
        return f"{100 * a['mean']:.1f}% ± {100 * a['std']:.1f}"

    def pp(c):  # a paired difference in percentage points, with its CI
        return (f"{100 * c['mean']:+.1f} pp [95% CI {100 * c['ci'][0]:+.1f}, "
                f"{100 * c['ci'][1]:+.1f}], {c['wins']}/{c['n']} seeds > 0")

    order = "→".join(map(str, args.digits))
    out = []

    c = cmp["sequential - joint (equal steps)"]
    out.append(dict(claim="H0 (new): sequential fine-tuning beats joint fine-tuning",
                    verdict=sign_verdict(c),
                    evidence=f"overall accuracy: pretrained {ms('pretrained')}, sequential {order} "
                             f"{ms('seq:' + '>'.join(map(str, args.digits)))}, joint (same steps) "
                             f"{ms('joint_equal_steps')}, joint ({args.epochs} epochs) {ms('joint')}; "
                             f"sequential − joint (same steps) {pp(c)}. "
                             f"Authors: 91.70% → joint 70%, sequential 88%."))

    c = cmp["gradual (tau1+tau2+tau3, lambda 1) - pretrained"]
    v = {"confirmed": "refuted", "refuted": "confirmed"}.get(sign_verdict(c), "inconclusive")
    out.append(dict(claim="H0 (initial), part 1: applying τ1, τ2, τ3 one after another degrades "
                          "the pretrained model", verdict=v,
                    evidence=f"overall accuracy pretrained {ms('pretrained')} → pt+τ1 "
                             f"{ms('gradual:1')} → pt+τ1+τ2 {ms('gradual:2')} → pt+τ1+τ2+τ3 "
                             f"{ms('gradual:3')}; end − pretrained {pp(c)}."))

    f1s = [cmp[f"consolidated - pretrained, F1 of class {d}"] for d in args.digits]
    if "consolidated" in stand_in:
        v, why = "inconclusive", (f"not tested: {stand_in['consolidated']}. The stand-in scores "
                                  f"{ms('consolidated')} overall.")
    else:
        signs = [sign_verdict(f) for f in f1s]
        v = ("refuted" if "refuted" in signs else
             "confirmed" if all(s == "confirmed" for s in signs) else "inconclusive")
        why = (f"consolidated model overall accuracy {ms('consolidated')} at the validation's λ, "
               f"{ms('consolidated_full')} at λ = 1 (pt + τ1+τ2+τ3: {ms('gradual:3')}).")
    out.append(dict(claim="H0 (initial), part 2: a consolidated task vector performs well on all "
                          "three tasks (F1 of each task class above the pretrained model's)",
                    verdict=v, evidence=why + " F1 change vs pretrained per task class: " +
                    "; ".join(f"{d}: {pp(f)}" for d, f in zip(args.digits, f1s)) + "."))

    m = args.equivalence_margin
    for kind in ("independent", "continued"):
        c = cmp[f"transfer {kind}: base+tau - finetuned"]
        lo, hi = c["ci"]
        v = ("inconclusive" if c["n"] < 2 else "confirmed" if -m <= lo and hi <= m else
             "refuted" if lo > m or hi < -m else "inconclusive")
        out.append(dict(claim=f"Transfer to a new pretrained model ({kind}): θ_new + τ equals "
                              f"fine-tuning θ_new (overall accuracy within ±{100 * m:.0f} pp)",
                        verdict=v,
                        evidence=f"θ_new {ms(f'transfer:{kind}:base')}, θ_new + τ_joint "
                                 f"{ms(f'transfer:{kind}:base+tau')}, θ_new fine-tuned "
                                 f"{ms(f'transfer:{kind}:finetuned')}; gap {pp(c)}."))
    return out


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


def main(argv=None) -> dict:
    args = parse_args(argv)
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

    try:
        data = load_data(args)
    except DataUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    torch.set_num_threads(args.threads or 1)
    for line in data["provenance"] + ([data["note"]] if data["note"] else []):
        log(line)
    for key in ("pretrain", "val", "eval"):
        data[key] = data[key].to(device)
    data["tasks"] = {c: s.to(device) for c, s in data["tasks"].items()}
    log(f"device {device}; splits {data['sizes']}; taskarith merge: "
        f"{'yes' if HAS_MERGE else 'no (plain sum stands in)'}, consolidate: "
        f"{'yes' if HAS_CONSOLIDATE and HAS_CAPTUM else 'no (plain sum stands in)'}")

    per_seed = []
    for i, seed in enumerate(args.seeds, start=1):
        log(f"seed {seed} ({i}/{len(args.seeds)})")
        per_seed.append(run_seed(seed, data, args, device, log))

    summary = summarize(per_seed, args)
    stand_in = per_seed[0]["stand_in"]
    results = dict(
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        command=shlex.join(["python", *(sys.argv if argv is None
                                         else ["examples/mnist_music.py", *argv])]),
        versions=versions(), device=str(device), started=started_at,
        data=dict(dataset=args.dataset, mode="full" if data["full"] else "test-split",
                  note=data["note"], provenance=data["provenance"], sizes=data["sizes"],
                  class_names=CLASS_NAMES[args.dataset]),
        library=dict(merge=HAS_MERGE, consolidate=HAS_CONSOLIDATE, captum=HAS_CAPTUM,
                     stand_in=stand_in),
        seeds={str(s): r for s, r in zip(args.seeds, per_seed)},
        summary=summary, verdicts=verdicts(summary, args, stand_in))
    results["seconds"] = dict(study=time.perf_counter() - started)

    out.mkdir(parents=True, exist_ok=True)
    log("writing figures and report")
    results["figures"] = _music_report.write_figures(results, out)
    results["seconds"]["total"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _music_report.write_report(results, out)
    for v in results["verdicts"]:
        log(f"{v['verdict'].upper():<12} {v['claim']}")
    log(f"done: {out / 'report.md'}")
    return results


if __name__ == "__main__":
    main()
