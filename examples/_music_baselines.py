"""Baselines for the single-class collapse of examples/mnist_music.py: replay and last-layer-only
fine-tuning, each sequential (in the --digits order, every stage kept) and joint.

A task set holds images of one class only, so plain fine-tuning learns "always answer that class".
Two standard remedies, run from the same pretrained model with the same fine-tuning setting:

* **replay**: each fine-tuning run's data plus a small fixed buffer (--replay-per-class images per
  class, drawn once per seed from the pretraining split) of every class that run's data lacks: a
  sequential stage on c adds the nine other classes, the joint run the seven non-task classes;
* **last layer only**: only the output layer (fc3, 650 of the MLP's 109,386 parameters) is trained;
  the features of the pretrained model stay as they are.

The joint run of each baseline takes exactly the optimizer steps of its sequential run (as the
headline's equal-step joint run does), so sequential − joint compares equal budgets.
"""

from __future__ import annotations

import copy

import torch
from _music_data import Split
from _music_train import derive_seed


def replay_buffer(pretrain: Split, per_class: int, seed: int) -> dict:
    """{class: Split of `per_class` images of it}, drawn from the pretraining split."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "replay buffer"))
    out = {}
    for c in range(10):
        idx = torch.nonzero(pretrain.y.cpu() == c).flatten()
        pick = idx[torch.randperm(len(idx), generator=gen)[:per_class]].to(pretrain.y.device)
        out[c] = Split(pretrain.x[pick], pretrain.y[pick])
    return out


def concat(splits) -> Split:
    splits = list(splits)
    return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))


def run_baselines(fit, pt, tasks: dict, pretrain: Split, args, seed: int) -> tuple[dict, dict]:
    """Train both baselines; returns ({model name: model}, {name: optimizer steps}).

    Model names: replay:3, replay:3>4, replay:3>4>7, replay:joint and the same with last:
    (for --digits 3 4 7)."""
    digits = list(args.digits)
    buffer = replay_buffer(pretrain, args.replay_per_class, seed) if args.replay_per_class else {}

    def replayed(classes) -> Split:
        return concat([tasks[c] for c in classes] + [b for c, b in buffer.items() if c not in classes])

    kinds = {"replay": dict(data=replayed, last_layer_only=False),
             "last": dict(data=lambda classes: concat(tasks[c] for c in classes), last_layer_only=True)}
    models, steps = {}, {}
    for kind, how in kinds.items():
        model, total = pt, 0
        for k in range(1, 4):
            name = f"{kind}:" + ">".join(map(str, digits[:k]))
            model = fit(copy.deepcopy(model), how["data"]([digits[k - 1]]), name, "finetune",
                        epochs=args.epochs, last_layer_only=how["last_layer_only"])
            models[name] = model
            total += fit.steps(name)
        models[f"{kind}:joint"] = fit(copy.deepcopy(pt), how["data"](digits), f"{kind}:joint",
                                      "finetune", steps=total, last_layer_only=how["last_layer_only"])
        steps[kind] = total
    return models, steps


def baseline_names(digits) -> dict:
    """{kind: [stage names..., joint name]} of the models run_baselines builds."""
    return {kind: [f"{kind}:" + ">".join(map(str, digits[:k])) for k in range(1, 4)] + [f"{kind}:joint"]
            for kind in ("replay", "last")}


BASELINE_TEXT = {"replay": "replay", "last": "last layer only"}
