"""A minimal end-to-end tour of taskarith on a toy regression problem (runs in seconds).

Pretrain a small MLP on one target function, fine-tune two copies on two other
targets, extract their task vectors, and show what adding, negating and
transferring them does to the error on each task.

    python examples/quickstart.py --help
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import taskarith as ta


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 1))


def train(model: nn.Module, target, steps: int, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.rand(256, 1, generator=gen) * 6 - 3
        loss = nn.functional.mse_loss(model(x), target(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def error(state: dict, target) -> float:
    model = make_model()
    model.load_state_dict(state)
    x = torch.linspace(-3, 3, 512).unsqueeze(1)
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), target(x)).item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per training run (default: 300)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    tasks = {"sin": torch.sin, "cos": torch.cos}
    pretrained = train(make_model(), lambda x: 0.5 * x, args.steps, args.seed)
    vectors = {}
    for i, (name, target) in enumerate(tasks.items()):
        tuned = make_model()
        tuned.load_state_dict(pretrained.state_dict())
        vectors[name] = ta.TaskVector.from_models(pretrained, train(tuned, target, args.steps, args.seed + i + 1))

    candidates = {
        "pretrained": pretrained.state_dict(),
        "+ τ_sin": vectors["sin"].apply_to(pretrained),
        "+ τ_cos": vectors["cos"].apply_to(pretrained),
        "+ 0.5 (τ_sin + τ_cos)": (0.5 * sum(vectors.values())).apply_to(pretrained),
        "+ τ_sin − τ_cos": (vectors["sin"] - vectors["cos"]).apply_to(pretrained),
    }
    print(f"cosine(τ_sin, τ_cos) = {vectors['sin'].cosine(vectors['cos']):+.3f}")
    print(f"{'model':<24}{'MSE sin':>10}{'MSE cos':>10}")
    results = {}
    for label, state in candidates.items():
        results[label] = {name: error(state, target) for name, target in tasks.items()}
        print(f"{label:<24}{results[label]['sin']:>10.4f}{results[label]['cos']:>10.4f}")
    return results


if __name__ == "__main__":
    main()
