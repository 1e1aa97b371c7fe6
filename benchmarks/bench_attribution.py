#!/usr/bin/env python
"""What integrated-gradient attributions over parameters cost, next to one fine-tuning epoch.

For each model (the study's MLP 784-128-64-10, and a wider 784-W-W-10 where parameter copies
matter), on the same data (MNIST test-split images if found, else random ones) and with the same
batches, the script times and measures the peak memory of:

* one fine-tuning epoch (Adam, forward + backward + step per batch): the reference;
* ``taskarith.attribution.integrated_gradients`` for n_steps 1, 8 and 32, **looped** (one path
  point per forward, ``points_per_forward=1``, the default) and **vmapped** (all path points in
  one ``torch.func.vmap`` forward, ``points_per_forward=None``).

Each measurement is one warm-up call, then ``--repeats`` timed calls; the table shows the median
time, its ratio to the epoch's, and the peak resident memory above the memory in use before the
call (CPU: Linux's VmHWM after resetting it through /proc/self/clear_refs; CUDA: the allocator's
peak). Attribution costs about n_steps forward-backward passes over the data, so the ratio to an
epoch is near n_steps when the per-batch work dominates.

    python benchmarks/bench_attribution.py                # both models, 3 repeats
    python benchmarks/bench_attribution.py --quick        # small model, 1 repeat
    python benchmarks/bench_attribution.py --device cuda

Results go to ``benchmarks/results/attribution-<hostname>-<device>.json`` (see ``--out``).
Timings are measurements, not tests: nothing here asserts on them.
"""

from __future__ import annotations

import gzip
import statistics
import sys
from pathlib import Path

import _common as bench  # sibling file: the scaffolding
import numpy as np
import torch
from torch import nn

import taskarith as ta

MNIST = bench.ROOT.parent / "shared" / "data" / "mnist-t10k" / "t10k-images-idx3-ubyte.gz"
STEPS = (1, 8, 32)


def parse_args(argv=None):
    p = bench.Parser(__doc__, out="attribution-{host}-{device}", repeats=(3,), device=True,
                     quick="only the small model, 512 examples, 1 repeat")
    p.add_argument("--widths", type=int, nargs="+", default=[128, 1024],
                   help="hidden width of each model: 128 is the study's 784-128-64-10, W>128 is 784-W-W-10")
    p.add_argument("--examples", type=int, default=2048, help="examples in the data (default 2048)")
    p.add_argument("--batch", type=int, default=256, help="batch size of the epoch and of the attribution")
    args = p.parse(argv)
    if args.quick:
        args.widths, args.examples, args.repeats = [128], 512, 1
    return args


def make_model(width: int) -> nn.Module:
    if width == 128:
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def load_data(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    gen = torch.Generator().manual_seed(0)
    if MNIST.exists():
        with gzip.open(MNIST, "rb") as f:
            raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 784)
        with gzip.open(MNIST.with_name("t10k-labels-idx1-ubyte.gz"), "rb") as f:
            labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
        x = torch.from_numpy(raw[:n].astype(np.float32) / 255.0)
        y = torch.from_numpy(labels[:n].astype(np.int64))
        source = "MNIST t10k"
    else:
        x, y = torch.rand(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen)
        source = "random"
    return x.to(device), y.to(device), source


# ------------------------------------------------------------------------------------ memory


def measure(fn, repeats: int, device: str) -> dict:
    """One warm-up call (lazy initialisation, allocator growth, vmap tracing), then ``repeats`` timed calls,
    each with the peak memory above the memory in use before it (CUDA: the allocator's peak; CPU: VmHWM,
    reset through /proc/self/clear_refs)."""
    peaks, before = [], {}

    def reset() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before["bytes"] = torch.cuda.memory_allocated()
        else:
            before["bytes"] = bench.reset_peak_rss()

    def peak(_) -> None:
        if "bytes" not in before:  # the warm-up call
            return
        start = before.pop("bytes")
        top = torch.cuda.max_memory_allocated() if device == "cuda" else bench.proc_bytes("VmHWM")
        if start is not None and top is not None:
            peaks.append(max(0, top - start))

    _, _, times = bench.Timer(repeats, device).run(fn, before=reset, after=peak)
    return {"median_s": statistics.median(times), "best_s": min(times), "times_s": times,
            "peak_extra_bytes": max(peaks) if peaks else None}


# -------------------------------------------------------------------------------------- main


def run_model(width: int, x, y, args) -> list[dict]:
    torch.manual_seed(0)
    pre = make_model(width).to(args.device)
    tuned = make_model(width).to(args.device)
    tuned.load_state_dict(pre.state_dict())
    opt = torch.optim.Adam(tuned.parameters(), lr=1e-3)

    def epoch():
        tuned.train()
        for i in range(0, len(y), args.batch):
            loss = nn.functional.cross_entropy(tuned(x[i:i + args.batch]), y[i:i + args.batch])
            opt.zero_grad()
            loss.backward()
            opt.step()

    epoch()  # a real fine-tuning step, so the vector below is not zero
    tv = ta.TaskVector.from_models(pre, tuned)
    params = tv.numel()
    rows = [{"model": width, "params": params, "what": "fine-tuning epoch", "n_steps": None,
             "mode": "Adam", **measure(epoch, args.repeats, args.device)}]
    ref = rows[0]["median_s"]
    for n_steps in STEPS:
        for mode, points in (("looped", 1), ("vmapped", None)):
            def attribute(n_steps=n_steps, points=points):
                return ta.attribution.integrated_gradients(
                    pre, pre, tv, (x, y), n_steps=n_steps, batch_size=args.batch,
                    points_per_forward=points, check_completeness=False)
            ig = attribute()
            row = {"model": width, "params": params, "what": "integrated gradients", "n_steps": n_steps,
                   "mode": mode, **measure(attribute, args.repeats, args.device),
                   "relative_gap": ig.relative_gap}
            row["vs_epoch"] = row["median_s"] / ref
            rows.append(row)
            print(format_row(row), flush=True)
    rows[0]["vs_epoch"] = 1.0
    return rows


def format_row(r: dict) -> str:
    mib = "n/a" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.1f}"
    steps = "" if r["n_steps"] is None else str(r["n_steps"])
    gap = "" if r.get("relative_gap") is None else f"{r['relative_gap']:.1e}"
    return (f"| {r['model']} ({r['params'] / 1e6:.2f}M) | {r['what']} | {steps} | {r['mode']} | "
            f"{r['median_s'] * 1e3:.0f} | {r.get('vs_epoch', 1.0):.1f}x | {mib} | {gap} |")


HEADER = ("| model (params) | what | n_steps | mode | median ms | vs epoch | peak extra MiB | completeness gap |\n"
          "|---|---|---|---|---|---|---|---|")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import captum  # noqa: F401  (imported up front so that its import time is not measured)

    machine, started = bench.begin()
    x, y, source = load_data(args.examples, args.device)
    print(f"data: {args.examples} examples ({source}), batches of {args.batch}; {args.repeats} repeats\n")
    print(HEADER)
    rows = []
    for width in args.widths:
        model_rows = run_model(width, x, y, args)
        print(format_row(model_rows[0]), flush=True)
        rows += model_rows
    print("\n" + HEADER)
    for r in rows:
        print(format_row(r))
    out = bench.result("attribution", machine, started, argv=sys.argv[1:] if argv is None else argv,
                       args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                       data=source, rows=rows)
    bench.save(args.out, out)
    return out


if __name__ == "__main__":
    main()
