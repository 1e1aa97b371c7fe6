"""Model, training, metrics, merges and the λ rules of examples/mnist_music.py."""

from __future__ import annotations

import hashlib
import importlib.util
import math

import numpy as np
import torch
import torch.nn.functional as F
from _music_data import Split
from torch import nn

import taskarith as ta

# ---------------------------------------------------------------------------------------------
# Model
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


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

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
    """Overall / task-class / other-class metrics, per-class P/R/F1 and the confusion matrix.
    The accuracy on the images of one class (a task, per task) is that class's recall."""
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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """A fresh optimizer: Adam, or SGD with momentum 0.9."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}")


def train(model, data: Split, *, optimizer: str, lr: float, batch_size: int, seed: int, val: Split,
          task_classes, epochs=None, steps=None, last_layer_only=False) -> dict:
    """Train `model` in place for `epochs` epochs or exactly `steps` optimizer steps (only the
    output layer with `last_layer_only`: the others are frozen).

    Shuffles come from a generator seeded with `seed` (the same role as a DataLoader's
    generator; indexing in-memory tensors is much faster than a DataLoader for this MLP).
    Returns the curve: per epoch, mean training loss and validation loss/accuracies; epoch 0 is
    the model before training.
    """
    for name, p in model.named_parameters():
        p.requires_grad_(not last_layer_only or name.startswith("fc3."))
    opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr)
    gen = torch.Generator().manual_seed(seed)
    n, bs = len(data), batch_size
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
    for p in model.parameters():
        p.requires_grad_(True)
    return curve


# ---------------------------------------------------------------------------------------------
# Merging with the library (with honest stand-ins while a feature is missing)
# ---------------------------------------------------------------------------------------------

HAS_MERGE = hasattr(ta, "merge")
HAS_CONSOLIDATE = hasattr(ta, "consolidate")
HAS_CAPTUM = importlib.util.find_spec("captum") is not None  # integrated gradients need it


def merged_vectors(vectors, pretrained, val: Split, args, seed) -> tuple[dict, dict, dict]:
    """TIES, DARE, the IG-consolidated vector and its two controls (scale 1; lambda is tuned when
    applying). Returns (vectors, stand-in notes, consolidation details).

    The controls keep, from each task vector, exactly as many entries as the ctv keeps from it
    (⌊density·n⌋, fewer where fewer attributions are positive): `mask_ties` the largest
    magnitudes, `mask_random` a uniformly random set; both elect signs by the sum (TIES) and
    average what agrees, as the ctv does. Where taskarith (or captum) lacks a feature, the plain
    sum stands in and the note says so."""
    plain = ta.TaskVector.sum(vectors)
    out, notes, info = {}, {}, {}
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
        attributions = []
        info["ig"] = []
        for c, tau in zip(args.digits, vectors):
            attr, steps = ig_until_complete(pretrained, tau, val.x[val.y == c], val.y[val.y == c], args)
            attributions.append(attr)
            info["ig"].append(dict(task=c, steps=steps, relative_gap=attr.relative_gap, gain=attr.gain))
        out["consolidated"] = ta.consolidate(vectors, attributions, density=args.ctv_density)
        kept = [min(math.floor(args.ctv_density * tau.numel()),
                    sum(int((a > 0).sum()) for _, a in attr.items()))
                for tau, attr in zip(vectors, attributions)]
        info["kept"] = [k / tau.numel() for k, tau in zip(kept, vectors)]
        gen = torch.Generator().manual_seed(derive_seed(seed, "random mask"))
        for name, score in (("mask_ties", lambda t: t.abs()),
                            ("mask_random", lambda t: torch.rand(t.shape, generator=gen))):
            scores = [{n: v.to(tau.device) for n, v in top_entries(
                          {n: score(t.detach().cpu().float()) for n, t in tau.items()}, k).items()}
                      for tau, k in zip(vectors, kept)]
            out[name] = ta.consolidate(vectors, scores, density=args.ctv_density, select="positive",
                                       resolve="sign_sum", merge="disjoint_mean")
    else:
        for name in ("consolidated", "mask_ties", "mask_random"):
            out[name] = plain
            notes[name] = ("taskarith.consolidate is not available" if not HAS_CONSOLIDATE
                           else "captum is not installed") + ": plain sum stands in"
    return out, notes, info


def ig_until_complete(pretrained, tau, x, y, args):
    """Integrated gradients with --ig-steps points, doubled until the relative completeness gap is
    at most --ig-rtol or --ig-max-steps is reached (the gap is reported either way)."""
    steps = args.ig_steps
    while True:
        attr = ta.attribution.integrated_gradients(pretrained, pretrained, tau, (x, y), n_steps=steps,
                                                   check_completeness=False)
        if attr.relative_gap <= args.ig_rtol or steps * 2 > args.ig_max_steps:
            return attr, steps
        steps *= 2


def top_entries(scores: dict, k: int) -> dict:
    """Scores with exactly the k largest entries (over the whole vector) positive, the rest -1."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = torch.full_like(flat, -1.0)
    idx = torch.topk(flat, k).indices
    keep[idx] = 1.0 + torch.arange(k, 0, -1, dtype=flat.dtype)  # positive, ranked
    out, at = {}, 0
    for n, s in scores.items():
        out[n] = keep[at:at + s.numel()].reshape(s.shape)
        at += s.numel()
    return out


# ---------------------------------------------------------------------------------------------
# Choosing lambda on the validation split
# ---------------------------------------------------------------------------------------------

def lambda_sweep(vector, base, val: Split, args, device, sign: float = 1.0) -> list:
    """Validation confusion matrix of base + sign * lambda * vector for every --lambdas value."""
    vec = vector if sign > 0 else -vector
    return [confusion(model_from_state(vec.apply_to(base, scale=lam), device), val)
            for lam in args.lambdas]


def tune_lambda(confs: list, args) -> tuple[float, list]:
    """Overall rule: the lambda with the best validation accuracy (ties: the smallest)."""
    curve = [scores(conf, range(10))["accuracy"] for conf in confs]
    return args.lambdas[int(np.argmax(curve))], curve


def tune_lambda_task(confs: list, args, pt_other_acc: float) -> tuple[float, list]:
    """Task-aware rule: the best validation accuracy on the task classes among the lambdas that
    keep the other classes' accuracy >= --control-threshold * pt's (ties: the smallest lambda;
    lambda = 0 always qualifies). Returns lambda and the rows (task accuracy, other accuracy)."""
    others = [c for c in range(10) if c not in args.digits]
    rows = [(scores(conf, args.digits)["accuracy"], scores(conf, others)["accuracy"]) for conf in confs]
    ok = [i for i, (_, other) in enumerate(rows) if other >= args.control_threshold * pt_other_acc]
    best = max(ok, key=lambda i: (rows[i][0], -args.lambdas[i])) if ok else 0
    return args.lambdas[best], rows


def tune_negation(confs: list, args, pt_other_acc: float) -> tuple[float, list]:
    """Forgetting: the lambda of base - lambda * vector with the lowest validation accuracy on
    the forgotten class among those keeping the other classes' accuracy >= threshold * pt's."""
    others = [c for c in range(10) if c != args.forget]
    rows = [(scores(conf, [args.forget])["accuracy"], scores(conf, others)["accuracy"])
            for conf in confs]
    ok = [i for i, (_, ctrl) in enumerate(rows) if ctrl >= args.control_threshold * pt_other_acc]
    best = min(ok, key=lambda i: (rows[i][0], args.lambdas[i])) if ok else 0  # lambda 0 qualifies
    return args.lambdas[best], rows
