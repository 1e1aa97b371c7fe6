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
import datetime as dt
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import machine_info

METHODS = [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.2, "scope": "global"}),
    ("ties", {"density": 0.2, "scope": "tensor"}),
    ("dare", {"drop": 0.9, "seed": 0}),
]


def llama_shapes(params: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a small Llama-like model with about ``params`` parameters."""
    dim = 1024
    vocab = 32000
    hidden = int(dim * 8 / 3) // 64 * 64
    per_layer = 4 * dim * dim + 3 * dim * hidden + 2 * dim
    layers = max(1, (params - 2 * vocab * dim) // per_layer)
    shapes = {"model.embed_tokens.weight": (vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (dim, dim),
            p + "self_attn.v_proj.weight": (dim, dim), p + "self_attn.o_proj.weight": (dim, dim),
            p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
            p + "mlp.down_proj.weight": (dim, hidden),
            p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
        })
    shapes.update({"model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)})
    return shapes


def write_checkpoint(directory: Path, shapes, dtype, seed: int, base: dict | None, shard_bytes: int) -> dict:
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if base is None:
            state[name] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        else:
            state[name] = (base[name].float() + torch.randn(shape, generator=g) * 1e-3).to(dtype)
    weight_map, size = {}, 0
    names = list(state)
    groups, current = [], []
    for n in names:
        nbytes = state[n].numel() * state[n].element_size()
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes
    groups.append(current)
    for index, group in enumerate(groups, 1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: state[n] for n in group}, directory / file)
        weight_map.update({n: file for n in group})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 1024}))
    return state


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    """Run one merge and print a JSON line with time and peak private memory."""
    import taskarith as ta

    torch.set_num_threads(args.threads or torch.get_num_threads())
    options = json.loads(args.options)
    sources = [Path(args.workdir) / f"ft{i}" for i in range(args.sources)]
    baseline = rss_anon()
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    ta.merge_files(Path(args.workdir) / "base", sources, Path(args.workdir) / "out", args.method,
                   max_memory=args.budget, progress=False, device=args.device, **options)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], rss_anon())
    print(json.dumps({"seconds": seconds, "baseline_anon": baseline, "peak_anon": peak[0]}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=None, help="parameters per checkpoint (default 200M; 20M with --quick)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="checkpoint dtype")
    p.add_argument("--sources", type=int, default=3, help="fine-tuned checkpoints to merge (default 3)")
    p.add_argument("--budget-fraction", type=float, default=0.25, help="max_memory as a fraction of one checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="20M parameters")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/merge_files-<host>.json)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help="where merge_files computes (cpu, cuda; default cpu)")
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--options", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    params = args.params or (20_000_000 if args.quick else 200_000_000)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    shapes = llama_shapes(params)
    itemsize = torch.empty((), dtype=dtype).element_size()
    ckpt_bytes = sum(math.prod(s) for s in shapes.values()) * itemsize
    budget = int(ckpt_bytes * args.budget_fraction)
    largest = max(math.prod(s) for s in shapes.values()) * 4  # float32 deltas
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="taskarith-bench-"))
    print(f"writing base + {args.sources} checkpoints of {ckpt_bytes / 1e9:.2f} GB ({args.dtype}) to {workdir} ...")
    start = time.perf_counter()
    base = write_checkpoint(workdir / "base", shapes, dtype, 0, None, 1 << 30)
    for i in range(args.sources):
        write_checkpoint(workdir / f"ft{i}", shapes, dtype, i + 1, base, 1 << 30)
    del base
    print(f"  done in {time.perf_counter() - start:.1f} s; max_memory = {budget / 1e6:.0f} MB")

    rows = []
    header = f"{'method':<34}{'time s':>9}{'in GB/s':>9}{'peak private MB':>17}{'budget MB':>11}{'peak/budget':>13}"
    print(header)
    print("-" * len(header))
    for method, options in METHODS:
        cmd = [sys.executable, __file__, "--child", "--workdir", str(workdir), "--method", method,
               "--options", json.dumps(options), "--budget", str(budget), "--sources", str(args.sources),
               "--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        if done.returncode:
            print(done.stderr)
            return 1
        result = json.loads(done.stdout.strip().splitlines()[-1])
        private = result["peak_anon"] - result["baseline_anon"]
        read = ckpt_bytes * (args.sources + 1)
        label = method + ("" if not options else " " + ",".join(f"{k}={v}" for k, v in options.items() if k != "seed"))
        row = {"method": method, "options": options, "seconds": result["seconds"], "input_gb_per_s": read / result["seconds"] / 1e9,
               "peak_private_bytes": private, "baseline_private_bytes": result["baseline_anon"], "budget_bytes": budget,
               "largest_tensor_bytes": largest, "peak_over_budget": private / budget}
        rows.append(row)
        print(f"{label:<34}{row['seconds']:>9.2f}{row['input_gb_per_s']:>9.2f}{private / 1e6:>17.0f}{budget / 1e6:>11.0f}{row['peak_over_budget']:>13.2f}")
    print(f"\nlargest tensor (float32 delta): {largest / 1e6:.0f} MB; checkpoint: {ckpt_bytes / 1e6:.0f} MB")

    out = Path(args.out or HERE / "results" / f"merge_files-{socket.gethostname()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "merge_files", "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": machine_info(), "torch": torch.__version__,
        "config": {"params": params, "dtype": args.dtype, "sources": args.sources, "checkpoint_bytes": ckpt_bytes,
                   "device": args.device,
                   "budget_bytes": budget},
        "rows": rows,
    }, indent=2))
    print(f"wrote {out}")
    if not args.workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
