"""The Triton kernels (used for CUDA tensors) compute what the torch path computes.

CI has no GPU, so the kernels run here through Triton's interpreter
(``TRITON_INTERPRET=1``, which executes them on CPU tensors) in a child process:
the environment variable must be set before Triton compiles anything. Each count
of inputs compiles a kernel of its own: they run at 1 to 17 inputs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton ships with CUDA builds of PyTorch only")

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch
import taskarith as ta
from taskarith.backends import _triton

def vector(seed):
    g = torch.Generator().manual_seed(seed)
    d = {"a": torch.randn(700, 4, generator=g), "b": torch.randn(100, generator=g), "t": torch.randn(3, generator=g),
         "q": torch.randint(-3, 4, (900,), generator=g).float(), "z": torch.zeros(50)}
    return ta.TaskVector(d)

calls = {"ties": 0, "sum": 0}

def counted(name, kernel):
    def count(*args, **kwargs):
        taken = kernel(*args, **kwargs)
        calls[name] += name == "ties" or taken is not None  # a sum returns None where it declines
        return taken
    return count

_triton.ties_merge, _triton.weighted_sum = counted("ties", _triton.ties_merge), counted("sum", _triton.weighted_sum)

def bits(r):
    return {n: r[n].reshape(-1).view(torch.int32).tolist() for n in r}

out = {}
for k in [1, 2, 3, 4, 5, 8, 16, 17]:
    vs = [vector(i) for i in range(k)]
    assert _triton.usable([vs[0]._buffers[torch.float32]]) == (sys.argv[1] == "triton")
    before = dict(calls)
    for scope in ["tensor", "global"]:
        for sign in ["sum", "count"]:
            for weights in [None, [(-1.0) ** i * (i + 0.5) for i in range(k)]]:
                r = ta.merge(vs, "ties", density=0.3, scope=scope, sign=sign, weights=weights, scale=0.7)
                out[f"ties {k} {scope} {sign} {weights}"] = {n: r[n].reshape(-1).view(torch.int32).tolist() for n in r}
    r = ta.merge(vs, "dare_ties", drop=0.5, seed=1)
    out[f"dare_ties {k}"] = {n: r[n].reshape(-1).view(torch.int32).tolist() for n in r}
    weights = [0.5 + i for i in range(k)]
    r = ta.TaskVector.sum(vs, weights)
    out[f"sum {k}"] = {n: r[n].reshape(-1).tolist() for n in r}
    out[f"weighted bits {k}"] = bits(r)
    # The kernel's float32 arithmetic step by step: each product and sum rounded (no fused multiply-add).
    step = {n: vs[0][n] * weights[0] for n in vs[0]}
    for v, w in zip(vs[1:], weights[1:]):
        step = {n: step[n] + v[n] * w for n in step}
    out[f"stepwise {k}"] = bits(step)
    # How far a sum may stray where the two round differently: k roundings, each of at most
    # 2^-24 of the largest partial sum, itself at most sum |w_i x_i|.
    magnitude = {n: sum(abs(w) * v[n].abs() for v, w in zip(vs, weights)) for n in vs[0]}
    out[f"bound {k}"] = {n: [k * 2.0**-24 * float(m.max())] for n, m in magnitude.items()}
    out[f"unweighted {k}"] = bits(ta.TaskVector.sum(vs))
    r = ta.TaskVector.sum([v.to(dtype=torch.bfloat16) for v in vs], [1.0] * k)
    out[f"bf16sum {k}"] = {n: r[n].float().reshape(-1).tolist() for n in r}
    out[f"calls {k}"] = {name: calls[name] - before[name] for name in calls}
json.dump(out, sys.stdout)
"""


def _run(mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    env["TASKARITH_BACKEND"] = mode  # CPU tensors would take the Numba kernels under auto
    if mode == "triton":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_triton_kernels_match_the_torch_path():
    eager, triton = _run("torch"), _run("triton")
    assert eager.keys() == triton.keys()
    for case, tensors in eager.items():
        if case.startswith("calls"):  # every count of inputs ran the kernels (and only under triton)
            assert triton[case]["ties"] >= 8 and triton[case]["sum"] >= 2 and not any(tensors.values()), case
            continue
        if case.startswith("weighted bits"):  # the interpreter rounds each step, as the stepwise sum does
            assert triton[case] == eager[case.replace("weighted bits", "stepwise")], f"{case}: differs step by step"
            continue
        for name, values in tensors.items():
            if case.startswith("sum"):
                # torch's weighted sum may fuse a multiply-add where the kernel rounds twice.
                got = triton[case][name]
                worst = max(abs(a - b) for a, b in zip(values, got))
                bound = eager[case.replace("sum", "bound")][name][0]
                assert worst <= bound, f"{case} {name}: Triton and torch sums differ by {worst} (bound {bound})"
            elif case.startswith("bf16sum"):  # half sums stay on the torch path: pairwise, bit for bit
                assert triton[case][name] == values, f"{case}: {name} differs"
            else:  # TIES: the same operations in the same order, so the same bits
                assert triton[case][name] == values, f"{case}: {name} differs between Triton and torch"
