#!/usr/bin/env python
"""Merges on a CUDA GPU: the same results as on the CPU, and how fast, against PEFT on the same GPU.

1. Correctness across devices: three seeded task vectors (~2M float32 entries, transformer-shaped,
   plus a tensor of small integers full of ties) are merged on the CPU and on the GPU with TIES
   (both scopes, both sign rules, with and without weights) and DARE-TIES; the results must be
   equal bit for bit. ``TaskVector.sum`` may round differently (fused multiply-add): its largest
   difference is reported.
2. Speed: three vectors of ``--params`` float32 entries (default 100M) on the GPU; median time of
   ``ta.merge`` for task arithmetic, TIES (tensor and global scope), DARE and DARE-TIES, of the
   vector ops, of a device-to-device copy of one vector (the bandwidth probe), and of PEFT's
   ``merge_utils.ties`` called tensor by tensor as PEFT does (if PEFT is installed), whose output
   is compared with ours.

    python benchmarks/bench_gpu.py                 # writes benchmarks/results/gpu-<host>.json

Timings are measurements, not tests: nothing here asserts on them.
"""

from __future__ import annotations

import json
import statistics
import sys

import _common as bench  # sibling file: the scaffolding
import torch

import taskarith as ta


def small_vector(seed: int, params: int) -> ta.TaskVector:
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(s, generator=g) for k, s in bench.transformer_shapes(params, 60).items()}
    tensors["ties"] = torch.randint(-3, 4, (30000,), generator=g).float()  # many equal magnitudes
    return ta.TaskVector(tensors)


def cross_device_check(device: str) -> dict:
    cpu = [small_vector(i, 2_000_000) for i in range(3)]
    gpu = [v.to(device) for v in cpu]
    mismatches = []
    for scope in ["tensor", "global"]:
        for sign in ["sum", "count"]:
            for weights in [None, [0.5, -1.0, 2.0]]:
                options = {"density": 0.2, "scope": scope, "sign": sign, "weights": weights, "scale": 0.7}
                a = ta.merge(cpu, "ties", **options)
                b = ta.merge(gpu, "ties", **options).to("cpu")
                if not all(torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)) for n in a):
                    mismatches.append(f"ties {scope} {sign} weights={weights}")
    a, b = ta.merge(cpu, "dare_ties", drop=0.5, seed=1), ta.merge(gpu, "dare_ties", drop=0.5, seed=1).to("cpu")
    if not all(torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)) for n in a):
        mismatches.append("dare_ties")
    s1, s2 = ta.TaskVector.sum(cpu, [0.5, 1.5, 2.5]), ta.TaskVector.sum(gpu, [0.5, 1.5, 2.5]).to("cpu")
    return {"cpu_vs_cuda_ties_bitwise_mismatches": mismatches,
            "sum_max_abs_diff": max(float((s1[n] - s2[n]).abs().max()) for n in s1)}


def median_time(fn, repeats: int) -> float:
    """The median (upper, for an even count) of ``repeats`` timed calls after one warm-up, in seconds."""
    return statistics.median_high(bench.Timer(repeats, "cuda", keep=False).run(fn)[2])


def main(argv: list[str] | None = None) -> int:
    args = bench.Parser(__doc__, out="gpu-{host}", params=(100 * bench.M,), params_help="entries per vector",
                        repeats=(5,), threads=False).parse(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 1
    device = "cuda"
    machine, started = bench.begin()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "taskarith": ta.__version__,
              "params": args.params}
    result.update(cross_device_check(device))
    print(json.dumps({k: result[k] for k in ("device", "cpu_vs_cuda_ties_bitwise_mismatches", "sum_max_abs_diff")}))

    shapes = bench.transformer_shapes(args.params, 300)

    def vector(seed: int) -> ta.TaskVector:
        g = torch.Generator(device=device).manual_seed(seed)
        return ta.TaskVector({k: torch.randn(s, generator=g, device=device) for k, s in shapes.items()})

    vs = [vector(i) for i in range(3)]
    n = vs[0].numel()
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    copy = median_time(lambda: dst.copy_(src), 4 * args.repeats)
    result["copy_GBps"] = 2 * 4 * n / copy / 1e9
    timings = {}
    for key, method, options in [
        ("task_arithmetic", "task_arithmetic", {}),
        ("ties-tensor", "ties", {"density": 0.2, "scope": "tensor"}),
        ("ties-global", "ties", {"density": 0.2, "scope": "global"}),
        ("dare", "dare", {"drop": 0.9, "seed": 0}),
        ("dare_ties", "dare_ties", {"drop": 0.9, "seed": 0}),
    ]:
        timings[key] = median_time(lambda m=method, o=options: ta.merge(vs, m, **o), 3)
        print(f"{key:16s} {timings[key] * 1e3:9.2f} ms", flush=True)
    a, b = vs[0], vs[1]
    w = a.clone()
    timings["a+b"] = median_time(lambda: a + b, args.repeats)
    timings["2*a"] = median_time(lambda: 2 * a, args.repeats)
    timings["sum3"] = median_time(lambda: ta.TaskVector.sum(vs), args.repeats)
    timings["add_"] = median_time(lambda: w.add_(b), args.repeats)
    timings["raw add_"] = median_time(lambda: dst.add_(src), args.repeats)
    timings["raw add out"] = median_time(lambda: torch.add(src, dst, out=torch.empty_like(src)), args.repeats)
    result["timings_s"] = timings
    # The least bytes a merge of 3 vectors must move: read 3 vectors, write 1.
    result["ties_tensor_ratio_to_copy"] = (4 * 4 * n / timings["ties-tensor"] / 1e9) / result["copy_GBps"]
    try:
        from peft.utils import merge_utils
    except ImportError:
        result["peft_error"] = "peft is not installed"
    else:
        names = list(vs[0])
        ones = torch.ones(3, device=device)

        def peft_ties():
            return {name: merge_utils.ties([v[name] for v in vs], ones, 0.2, "total") for name in names}

        result["peft_ties_s"] = median_time(peft_ties, 3)
        ours, theirs = ta.merge(vs, "ties", density=0.2, scope="tensor"), peft_ties()
        result["peft_ties_entries_differing"] = sum(int((theirs[k] != ours[k]).sum()) for k in names)
        result["ties_tensor_speedup_vs_peft"] = result["peft_ties_s"] / timings["ties-tensor"]
    print(json.dumps(result, indent=1, default=str))
    bench.save(args.out, bench.result("gpu", machine, started, **result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
