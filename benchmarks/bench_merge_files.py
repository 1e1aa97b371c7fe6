#!/usr/bin/env python
"""Out-of-core merging: time and private memory of ``ta.merge_files`` on checkpoints larger than its budget.

Writes a synthetic transformer-shaped base checkpoint and ``--sources`` fine-tuned copies as sharded
Hugging Face directories, then merges them with ``max_memory`` set to a quarter of one checkpoint's
size (``--budget-fraction``), one method per child process. A sampling thread in the child reads
``RssAnon`` from ``/proc/self/status`` every few milliseconds: anonymous (private) memory is what the
budget promises to bound; memory-mapped input pages are file-backed and reclaimable, so they are not
counted. Reported per method: wall time, input throughput (bytes of all checkpoints / time), peak
private memory above the process's baseline, the budget, and the largest single tensor (the budget's
allowance of "plus one tensor").

    python benchmarks/bench_merge_files.py                 # 200M fp32 parameters per checkpoint
    python benchmarks/bench_merge_files.py --quick         # 20M
    python benchmarks/bench_merge_files.py --dtype bfloat16 --params 400_000_000

Nothing here asserts on timings; results go to ``benchmarks/results/merge_files-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as bench  # sibling file: the scaffolding
import torch

METHODS = [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.2, "scope": "global"}),
    ("ties", {"density": 0.2, "scope": "tensor"}),
    ("dare", {"drop": 0.9, "seed": 0}),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DIM, VOCAB = 1024, 32000
HIDDEN = int(DIM * 8 / 3) // 64 * 64


def llama_shapes(params: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a small Llama-like model with about ``params`` parameters."""
    layers = max(1, (params - 2 * VOCAB * DIM) // bench.llama_layer_params(DIM, HIDDEN))
    return bench.llama_shapes(layers, DIM, HIDDEN, VOCAB)


def write_checkpoints(workdir: Path, shapes: dict, dtype: torch.dtype, sources: int) -> None:
    """A base (seed 0) and ``sources`` fine-tunes (seeds 1, 2, ...: base + 1e-3 noise), 1 GiB shards."""
    base: dict[str, torch.Tensor] = {}
    itemsize = torch.empty((), dtype=dtype).element_size()
    for seed in range(sources + 1):
        g = torch.Generator().manual_seed(seed)

        def make(_, name, shape, g=g, seed=seed):
            if seed == 0:
                base[name] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
                return base[name]
            return (base[name].float() + torch.randn(shape, generator=g) * 1e-3).to(dtype)

        bench.write_checkpoint(workdir / ("base" if seed == 0 else f"ft{seed - 1}"), shapes, make,
                               shard_bytes=1 << 30, itemsize=itemsize,
                               config={"model_type": "llama", "hidden_size": DIM})


def child(args) -> None:
    """Run one merge and print a JSON line with time and peak private memory."""
    import taskarith as ta

    sources = [Path(args.workdir) / f"ft{i}" for i in range(args.sources)]
    sampler = bench.PeakSampler("self", ("RssAnon",), 0.002).start()
    start = time.perf_counter()
    ta.merge_files(Path(args.workdir) / "base", sources, Path(args.workdir) / "out", args.method,
                   max_memory=args.budget, progress=False, device=args.device, **json.loads(args.options))
    seconds = time.perf_counter() - start
    sampler.stop()
    print(json.dumps({"seconds": seconds, "baseline_anon": sampler.baseline["RssAnon"],
                      "peak_anon": sampler.peak["RssAnon"]}))


def main(argv=None) -> int:
    p = bench.Parser(__doc__, out="merge_files-{host}", params=(200 * bench.M, 20 * bench.M),
                     params_help="parameters per checkpoint", quick="20M parameters", device=True, dtypes=DTYPES,
                     full_doc=True)
    p.add_argument("--sources", type=int, default=3, help="fine-tuned checkpoints to merge (default 3)")
    p.add_argument("--budget-fraction", type=float, default=0.25, help="max_memory as a fraction of one checkpoint")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--options", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = p.parse(argv)
    if args.child:
        child(args)
        return 0

    machine, started = bench.begin()
    dtype = DTYPES[args.dtype]
    shapes = llama_shapes(args.params)
    ckpt_bytes = sum(math.prod(s) for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()
    budget = int(ckpt_bytes * args.budget_fraction)
    largest = max(math.prod(s) for s in shapes.values()) * 4  # float32 deltas
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="taskarith-bench-"))
    print(f"writing base + {args.sources} checkpoints of {ckpt_bytes / 1e9:.2f} GB ({args.dtype}) to {workdir} ...")
    start = time.perf_counter()
    write_checkpoints(workdir, shapes, dtype, args.sources)
    print(f"  done in {time.perf_counter() - start:.1f} s; max_memory = {budget / 1e6:.0f} MB")

    rows = []
    for method, options in METHODS:
        cmd = [sys.executable, __file__, "--child", "--workdir", str(workdir), "--method", method,
               "--options", json.dumps(options), "--budget", str(budget), "--sources", str(args.sources),
               "--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        result = bench.json_child(cmd)
        private = result["peak_anon"] - result["baseline_anon"]
        read = ckpt_bytes * (args.sources + 1)
        rows.append({"method": method, "options": options, "seconds": result["seconds"],
                     "input_gb_per_s": read / result["seconds"] / 1e9, "peak_private_bytes": private,
                     "baseline_private_bytes": result["baseline_anon"], "budget_bytes": budget,
                     "largest_tensor_bytes": largest, "peak_over_budget": private / budget})
        r = rows[-1]
        print(f"  {method} {options}: {r['seconds']:.2f} s, peak private {private / 1e6:.0f} MB", flush=True)
    print()
    print(bench.table(
        ["method", "time s", "in GB/s", "peak private MB", "budget MB", "peak/budget"],
        [[r["method"] + ("" if not r["options"] else " " + ",".join(f"{k}={v}" for k, v in r["options"].items()
                                                                    if k != "seed")),
          f"{r['seconds']:.2f}", f"{r['input_gb_per_s']:.2f}", f"{r['peak_private_bytes'] / 1e6:.0f}",
          f"{budget / 1e6:.0f}", f"{r['peak_over_budget']:.2f}"] for r in rows]))
    print(f"\nlargest tensor (float32 delta): {largest / 1e6:.0f} MB; checkpoint: {ckpt_bytes / 1e6:.0f} MB")
    bench.save(args.out, bench.result(
        "merge_files", machine, started, torch=torch.__version__,
        config={"params": args.params, "dtype": args.dtype, "sources": args.sources, "checkpoint_bytes": ckpt_bytes,
                "device": args.device, "budget_bytes": budget},
        rows=rows))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
