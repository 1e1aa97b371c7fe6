#!/usr/bin/env python
"""How close taskarith's vector algebra runs to the memory bandwidth of the machine.

Builds three random "task vectors" of about 100M parameters spread over about 300 tensors shaped
like a transformer's (a few big embedding matrices, many medium weight matrices, small biases and
norms, one scalar), then times, in one run:

* a memory-bandwidth probe: ``dst.copy_(src)`` over one flat, preallocated buffer of the size of one
  vector (measured at the start and at the end of the run);
* taskarith's public API: ``a + b``, ``s * a``, ``ta.TaskVector.sum([a, b, c])``, Python's
  ``sum([a, b, c])``, in-place ``a.add_(b)`` and ``a.mul_(s)``, and ``a.apply_to(base, scale=0.5)``;
* the plain dict-of-tensors way of doing the same (``{k: a[k] + b[k] for k in a}``, ...);
* for reference, the same arithmetic as single torch kernels over flat buffers into a preallocated
  output (no allocation at all: an upper bound for what a library can reach).

Each timing is one warm-up call, then ``--repeats`` timed calls written as a user's loop
(``c = a + b``): the previous result stays alive until the new one is assigned, so memory is
allocated and released as it would be in real code. Reported: median and best time, effective
bandwidth (minimum bytes an op must move / median time) and its ratio to the copy probe's.
Outputs of every implementation are checked against the dict baseline; a mismatch exits non-zero.

    python benchmarks/bench_vector_ops.py                  # 100M fp32 parameters, 7 repeats
    python benchmarks/bench_vector_ops.py --quick          # 10M parameters, 3 repeats
    python benchmarks/bench_vector_ops.py --dtype bfloat16 --threads 8
    python benchmarks/bench_vector_ops.py --device cuda
    python benchmarks/bench_vector_ops.py --shapes lora    # thousands of small LoRA A/B matrices

Results go to ``benchmarks/results/vector_ops-<hostname>-<device>.json`` (see ``--out``).
Timings are measurements, not tests: nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

import taskarith as ta
from _machine import describe, machine_info  # sibling file

try:
    import resource
except ImportError:  # not on Windows
    resource = None

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCALE = 0.3  # the scalar s of ``s * a`` and ``a.mul_(s)``: a typical task-arithmetic lambda
# allclose tolerances for sum of 3, where the order of the additions may differ between implementations
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-4), torch.bfloat16: (1.6e-2, 1e-3)}
APPLY_SCALE = 0.5  # the lambda of ``tv.apply_to(base, scale=...)``
LORA_RANK = 16
SHAPES = ("transformer", "lora")
HEADLINE_ROWS = [("a + b", "taskarith"), ("s * a", "taskarith"), ("sum of 3", "taskarith TaskVector.sum")]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time taskarith's vector algebra against a copy-bandwidth probe and a dict-of-tensors baseline.",
    )
    p.add_argument("--params", type=int, default=None,
                   help="parameters per vector (default 100_000_000; 10M with --quick)")
    p.add_argument("--tensors", type=int, default=300,
                   help="approximate number of tensors per vector (default 300; transformer shapes only)")
    p.add_argument("--shapes", choices=SHAPES, default="transformer",
                   help="transformer: ~--tensors tensors shaped like a decoder transformer (a few large ones); "
                        f"lora: pairs of rank-{LORA_RANK} LoRA A [r, d] / B [d, r] matrices (thousands of small "
                        "tensors at 10M) (default transformer)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the vectors (default float32)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 7; 3 with --quick)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of the vectors (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) before measuring (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random values (default 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results path (default benchmarks/results/vector_ops-<hostname>-<device>.json)")
    p.add_argument("--quick", action="store_true", help="a short run: 10M parameters, 3 repeats (explicit flags win)")
    args = p.parse_args(argv)
    if args.params is None:
        args.params = 10_000_000 if args.quick else 100_000_000
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.params < 1000:
        p.error("--params must be at least 1000")
    if args.tensors < 1:
        p.error("--tensors must be positive")
    if args.repeats < 1:
        p.error("--repeats must be positive")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch")
    if args.out is None:
        host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "unknown"
        args.out = HERE / "results" / f"vector_ops-{host}-{args.device}.json"
    return args


# ---------------------------------------------------------------------------------------------
# The model: transformer-like shapes
# ---------------------------------------------------------------------------------------------


def transformer_shapes(params: int, tensors: int) -> dict[str, tuple[int, ...]]:
    """About ``params`` entries in about ``tensors`` tensors, named and shaped like a decoder transformer.

    Per layer: two norms (weight, bias), q/k/v/out projections (d x d + bias) and an MLP (4d x d, d x 4d,
    + biases): 16 tensors, 12 d^2 + 13 d entries. Around them: token and position embeddings, a final
    norm, an untied output head and a scalar (like CLIP's ``logit_scale``). The width d is chosen so the
    layers hold ~80% of the entries; the vocabulary size absorbs the rest. Left-over tensor slots become
    tiny per-head gates.
    """
    layers = max(1, (tensors - 6) // 16)
    width = math.sqrt(0.8 * params / (12 * layers))
    step = 64 if width >= 128 else 16
    d = max(16, int(width) // step * step)
    heads = max(1, d // 64)
    positions = min(1024, max(16, params // (200 * d)))
    extra = max(0, tensors - 16 * layers - 6)

    body: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"layers.{i}."
        body[p + "norm1.weight"] = (d,)
        body[p + "norm1.bias"] = (d,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            body[p + f"attn.{proj}.weight"] = (d, d)
            body[p + f"attn.{proj}.bias"] = (d,)
        body[p + "norm2.weight"] = (d,)
        body[p + "norm2.bias"] = (d,)
        body[p + "mlp.fc1.weight"] = (4 * d, d)
        body[p + "mlp.fc1.bias"] = (4 * d,)
        body[p + "mlp.fc2.weight"] = (d, 4 * d)
        body[p + "mlp.fc2.bias"] = (d,)
    for j in range(extra):
        body[f"layers.{j % layers}.attn.head_gate.{j // layers}"] = (heads,)
    tail = {"final_norm.weight": (d,), "final_norm.bias": (d,)}
    fixed = sum(math.prod(s) for s in (*body.values(), *tail.values())) + positions * d + 1
    vocab = max(1, (params - fixed) // (2 * d))  # token embedding and output head
    return {
        "embed.tokens.weight": (vocab, d),
        "embed.positions.weight": (positions, d),
        **body,
        **tail,
        "lm_head.weight": (vocab, d),
        "logit_scale": (),
    }


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_WIDTHS = (128, 256, 512)


def lora_shapes(params: int, rank: int = LORA_RANK) -> dict[str, tuple[int, ...]]:
    """About ``params`` entries in pairs of LoRA matrices ``A [rank, d]`` and ``B [d, rank]``.

    The pairs cycle over the widths ``LORA_WIDTHS`` and are named like PEFT's adapters
    (``layers.{i}.{module}.lora_A.weight``, seven modules per layer); a last, narrower pair takes up
    the remainder. A pair holds ``2 * rank * d`` entries, so 10M entries make about 2,000 tensors
    of a few thousand entries each: the many-small-tensors case.
    """
    if params < 1 or rank < 1:
        raise ValueError("params and rank must be positive")
    shapes: dict[str, tuple[int, ...]] = {}
    total = j = 0

    def add(d: int) -> None:
        nonlocal total, j
        prefix = f"layers.{j // len(LORA_MODULES)}.{LORA_MODULES[j % len(LORA_MODULES)]}."
        shapes[prefix + "lora_A.weight"] = (rank, d)
        shapes[prefix + "lora_B.weight"] = (d, rank)
        total += 2 * rank * d
        j += 1

    while True:
        d = LORA_WIDTHS[j % len(LORA_WIDTHS)]
        if total + 2 * rank * d > params:
            break
        add(d)
    rest = (params - total) // (2 * rank)
    if rest >= 1:
        add(rest)
    if not shapes:  # fewer than 2 * rank entries asked for: one pair of rank 1
        shapes["layers.0.q_proj.lora_A.weight"] = (1, params // 2 or 1)
        shapes["layers.0.q_proj.lora_B.weight"] = (params // 2 or 1, 1)
    return shapes


def model_shapes(kind: str, params: int, tensors: int) -> dict[str, tuple[int, ...]]:
    """The shapes of ``--shapes kind``: ``transformer_shapes(params, tensors)`` or ``lora_shapes(params)``."""
    if kind == "transformer":
        return transformer_shapes(params, tensors)
    if kind == "lora":
        return lora_shapes(params)
    raise ValueError(f"unknown shapes {kind!r}; choose from {', '.join(SHAPES)}")


def make_state(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Independently allocated tensors (as a state_dict holds them) of small random deltas."""
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=generator, dtype=dtype)
        t.mul_(0.01)
        out[name] = t.to(device)
    return out


def flat(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in state.values()])


def flat_views(buffer: torch.Tensor, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    views, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        views[name] = buffer[offset:offset + n].view(shape)
        offset += n
    return views


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device: torch.device, repeats: int):
        self.cuda = device.type == "cuda"
        self.repeats = repeats

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fn: Callable[[], object]) -> tuple[object, float, list[float]]:
        """Warm up once, then time ``repeats`` calls; returns (last result, warm-up s, times s)."""
        gc.collect()
        self.sync()
        t0 = time.perf_counter()
        result = fn()
        self.sync()
        warmup = time.perf_counter() - t0
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            result = fn()  # the previous result lives until this assignment, as in a user's loop
            self.sync()
            times.append(time.perf_counter() - t0)
        return result, warmup, times


def summarize(op: str, impl: str, expr: str, min_bytes: int, warmup: float, times: list[float]) -> dict:
    median = statistics.median(times)
    return {
        "op": op,
        "impl": impl,
        "expr": expr,
        "min_bytes": min_bytes,
        "warmup_ms": warmup * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "median_ms": median * 1e3,
        "best_ms": min(times) * 1e3,
        "gbps": min_bytes / median / 1e9,
        "gbps_best": min_bytes / min(times) / 1e9,
    }


# ---------------------------------------------------------------------------------------------
# Checking outputs
# ---------------------------------------------------------------------------------------------


def compare(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], exact: bool) -> dict:
    """Compare two name -> tensor maps; returns {"ok", "exact_equal", "bad", "max_abs_diff"}."""
    rtol, atol = TOLERANCES[next(iter(want.values())).dtype]
    bad, equal, worst = [], True, 0.0
    if set(got) != set(want):
        return {"ok": False, "exact_equal": False, "bad": ["<names differ>"], "max_abs_diff": None}
    for name, w in want.items():
        g = got[name]
        if g.shape != w.shape or g.dtype != w.dtype:
            bad.append(f"{name} (shape/dtype {tuple(g.shape)} {g.dtype} vs {tuple(w.shape)} {w.dtype})")
            equal = False
            continue
        if torch.equal(g, w):
            continue
        equal = False
        diff = (g.double() - w.double()).abs().max().item() if g.numel() else 0.0
        worst = max(worst, diff)
        if exact or not torch.allclose(g.float(), w.float(), rtol=rtol, atol=atol):
            bad.append(f"{name} (max |diff| {diff:.3g})")
    return {"ok": not bad, "exact_equal": equal, "bad": bad, "max_abs_diff": worst}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    machine = machine_info()
    started = dt.datetime.now(dt.timezone.utc)

    shapes = model_shapes(args.shapes, args.params, args.tensors)
    numel = sum(math.prod(s) for s in shapes.values())
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    print(f"machine: {describe(machine)}")
    print(f"vectors: {numel:,} {args.dtype} entries in {len(shapes)} {args.shapes}-like tensors = "
          f"{nbytes / 1e6:,.0f} MB each, "
          f"on {device}; {args.repeats} repeats (median and best after one warm-up); "
          f"load average at start {machine['load_average']}")
    busy = machine["load_average"] is not None and machine["load_average"][0] > 0.25 * (machine["usable_cores"] or 1)
    last_level = max(machine["cpu_caches_bytes"].values(), default=0)
    if device.type == "cpu" and 3 * nbytes <= last_level:
        print(f"note: three vectors ({3 * nbytes / 2**20:,.0f} MiB) fit in the CPU's last-level cache "
              f"({last_level / 2**20:,.0f} MiB): this measures cache, not memory, bandwidth; raise --params")
    if busy:
        print("note: the machine is not idle (1-minute load average above a quarter of its cores); "
              "timings will be noisy")

    generator = torch.Generator().manual_seed(args.seed)
    A, B, C = (make_state(shapes, dtype, device, generator) for _ in range(3))
    a, b, c = ta.TaskVector(A), ta.TaskVector(B), ta.TaskVector(C)
    if a.numel() != numel or a.nbytes != nbytes:
        raise RuntimeError(f"unexpected vector size: {a.numel()} entries, {a.nbytes} bytes")
    X, Y, Z = flat(A), flat(B), flat(C)  # flat copies for the probe and the reference kernels
    out_flat = torch.empty_like(X)
    out_flat.copy_(X)  # fault the pages in now
    s = SCALE
    timer = Timer(device, args.repeats)
    rows: list[dict] = []
    checks: list[dict] = []

    def record(op: str, impl: str, expr: str, k: int, fn: Callable[[], object]) -> object:
        result, warmup, times = timer.run(fn)
        row = summarize(op, impl, expr, k * nbytes, warmup, times)
        rows.append(row)
        print(f"  {op:<10} {impl:<28} median {row['median_ms']:9.2f} ms  best {row['best_ms']:9.2f} ms  "
              f"{row['gbps']:7.2f} GB/s", flush=True)
        return result

    def check(op: str, impl: str, got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor],
              exact: bool) -> None:
        verdict = compare(got, want, exact)
        checks.append({"op": op, "impl": impl, "mode": "torch.equal" if exact else "allclose", **verdict})
        if not verdict["ok"]:
            print(f"!!! MISMATCH: {op} [{impl}] differs from the dict baseline in {len(verdict['bad'])} tensors: "
                  f"{', '.join(verdict['bad'][:5])}{' ...' if len(verdict['bad']) > 5 else ''}",
                  file=sys.stderr, flush=True)

    def copy_probe() -> None:
        record("copy", "probe: dst.copy_(src)", "dst.copy_(src)  # one flat preallocated buffer", 2,
               lambda: out_flat.copy_(X))

    print("measuring (progress; the table follows):")
    copy_probe()

    # a + b --------------------------------------------------------------------------------------
    want = record("a + b", "dict", "{k: a[k] + b[k] for k in a}", 3, lambda: {k: A[k] + B[k] for k in A})
    got = record("a + b", "taskarith", "a + b", 3, lambda: a + b)
    check("a + b", "taskarith", got, want, exact=True)
    del got
    record("a + b", "ref: flat torch, out=", "torch.add(x, y, out=z)", 3, lambda: torch.add(X, Y, out=out_flat))
    check("a + b", "ref: flat torch, out=", flat_views(out_flat, shapes), want, exact=True)
    del want

    # s * a --------------------------------------------------------------------------------------
    want = record("s * a", "dict", "{k: s * a[k] for k in a}", 2, lambda: {k: s * A[k] for k in A})
    got = record("s * a", "taskarith", "s * a", 2, lambda: s * a)
    check("s * a", "taskarith", got, want, exact=True)
    del got
    record("s * a", "ref: flat torch, out=", "torch.mul(x, s, out=z)", 2, lambda: torch.mul(X, s, out=out_flat))
    check("s * a", "ref: flat torch, out=", flat_views(out_flat, shapes), want, exact=True)
    del want

    # sum of 3 -----------------------------------------------------------------------------------
    want = record("sum of 3", "dict", "{k: a[k] + b[k] + c[k] for k in a}", 4,
                  lambda: {k: A[k] + B[k] + C[k] for k in A})
    got = record("sum of 3", "taskarith TaskVector.sum", "ta.TaskVector.sum([a, b, c])", 4,
                 lambda: ta.TaskVector.sum([a, b, c]))
    check("sum of 3", "taskarith TaskVector.sum", got, want, exact=False)
    del got
    got = record("sum of 3", "taskarith Python sum()", "sum([a, b, c])", 4, lambda: sum([a, b, c]))
    check("sum of 3", "taskarith Python sum()", got, want, exact=False)
    del got
    record("sum of 3", "ref: flat torch, 2 passes", "torch.add(x, y, out=z).add_(w)", 4,
           lambda: torch.add(X, Y, out=out_flat).add_(Z))
    check("sum of 3", "ref: flat torch, 2 passes", flat_views(out_flat, shapes), want, exact=False)
    del want

    # in place: every implementation gets the same number of calls on its own copy of a ---------
    w_dict = {k: v.clone() for k, v in A.items()}
    w_ta = ta.TaskVector(A)

    def dict_add_():
        for k in w_dict:
            w_dict[k].add_(B[k])
        return w_dict

    def dict_mul_():
        for k in w_dict:
            w_dict[k].mul_(s)
        return w_dict

    record("a.add_(b)", "dict", "for k in a: a[k].add_(b[k])", 3, dict_add_)
    record("a.add_(b)", "taskarith", "a.add_(b)", 3, lambda: w_ta.add_(b))
    check("a.add_(b)", "taskarith", w_ta, w_dict, exact=True)
    record("a.mul_(s)", "dict", "for k in a: a[k].mul_(s)", 2, dict_mul_)
    record("a.mul_(s)", "taskarith", "a.mul_(s)", 2, lambda: w_ta.mul_(s))
    check("a.mul_(s)", "taskarith", w_ta, w_dict, exact=True)
    del w_dict, w_ta

    # base + scale * a: a new state_dict from a base (C plays the base) -----------------------
    t = APPLY_SCALE
    want = record("apply_to", "dict", f"{{k: base[k] + {t} * a[k] for k in base}}", 3,
                  lambda: {k: C[k] + t * A[k] for k in C})
    got = record("apply_to", "taskarith", f"a.apply_to(base, scale={t})", 3, lambda: a.apply_to(C, scale=t))
    check("apply_to", "taskarith", got, want, exact=False)
    del got, want

    copy_probe()

    # -------------------------------------------------------------------------------- summary
    probes = [r for r in rows if r["op"] == "copy"]
    probe_times = [t for r in probes for t in r["times_ms"]]
    probe_gbps = 2 * nbytes / (statistics.median(probe_times) / 1e3) / 1e9
    for r in rows:
        r["ratio_to_copy"] = r["gbps"] / probe_gbps
    results = [r for r in rows if r["op"] != "copy"]

    def ratio_of(op: str, impl: str) -> float:
        return next(r["ratio_to_copy"] for r in results if r["op"] == op and r["impl"] == impl)

    headline = {op: ratio_of(op, impl) for op, impl in HEADLINE_ROWS}
    worst_op = min(headline, key=headline.get)
    dict_headline = {op: ratio_of(op, "dict") for op, _ in HEADLINE_ROWS}

    print()
    print(f"copy probe: {probe_gbps:.2f} GB/s (2 x {nbytes / 1e6:,.0f} MB per copy; median of "
          f"{len(probe_times)} runs: medians {probes[0]['median_ms']:.2f} ms at the start, "
          f"{probes[-1]['median_ms']:.2f} ms at the end)")
    drift = abs(probes[-1]["median_ms"] - probes[0]["median_ms"]) / min(probes[0]["median_ms"], probes[-1]["median_ms"])
    if drift > 0.2:
        print(f"note: the copy probe changed by {drift:.0%} between the start and the end of the run; "
              "the machine's bandwidth was not steady, so read the ratios with care")
    print()
    header = f"{'op':<10} {'implementation':<28} {'median ms':>10} {'best ms':>10} {'GB/s':>8} {'vs copy':>8}"
    print(header)
    print("-" * len(header))
    previous = None
    for r in rows:
        if previous is not None and r["op"] != previous:
            print()
        previous = r["op"]
        print(f"{r['op']:<10} {r['impl']:<28} {r['median_ms']:10.2f} {r['best_ms']:10.2f} "
              f"{r['gbps']:8.2f} {r['ratio_to_copy']:8.2f}")
    print()
    print("GB/s = minimum bytes the op must move / median time (copy, s*a, mul_: 2x; a+b, add_, apply_to: 3x; "
          "sum of 3: 4x one vector's bytes)")
    print(f"headline: public API ops vs in-place copy = {headline[worst_op]:.2f} "
          f"(worst of a + b {headline['a + b']:.2f}, s * a {headline['s * a']:.2f}, "
          f"TaskVector.sum {headline['sum of 3']:.2f}); dict baseline: {min(dict_headline.values()):.2f}")

    peak_rss = None
    if resource is not None:
        rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_rss = rusage if sys.platform == "darwin" else rusage * 1024  # bytes on macOS, KiB on Linux
    rss_text = f"{peak_rss / 2**30:.2f} GiB" if peak_rss is not None else "unknown"
    print(f"peak RSS: {rss_text}; taskarith buffer cache now: {ta.cache_info()}")
    cuda_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    if cuda_peak is not None:
        print(f"peak CUDA memory allocated: {cuda_peak / 2**30:.2f} GiB")

    failed = [c for c in checks if not c["ok"]]
    if failed:
        print(f"!!! {len(failed)} OUTPUT MISMATCH(ES) against the dict baseline: "
              + "; ".join(f"{c['op']} [{c['impl']}]" for c in failed), file=sys.stderr)
    else:
        inexact = [f"{c['op']} [{c['impl']}] (max |diff| {c['max_abs_diff']:.3g})"
                   for c in checks if not c["exact_equal"]]
        detail = f" (within tolerance, not bit-equal: {'; '.join(inexact)})" if inexact else " (bit for bit)"
        print("outputs agree with the dict baseline" + detail)

    by_dim: dict[str, int] = {}
    for shape in shapes.values():
        by_dim[f"{len(shape)}-D"] = by_dim.get(f"{len(shape)}-D", 0) + 1
    report = {
        "benchmark": "vector_ops",
        "timestamp_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "torch_version": torch.__version__,
        "taskarith_version": ta.__version__,
        "config": {
            "params_requested": args.params,
            "params": numel,
            "tensors_requested": args.tensors,
            "shapes": args.shapes,
            "lora_rank": LORA_RANK if args.shapes == "lora" else None,
            "tensors": len(shapes),
            "tensors_by_rank": by_dim,
            "largest_tensor": max(math.prod(s) for s in shapes.values()),
            "dtype": args.dtype,
            "bytes_per_vector": nbytes,
            "repeats": args.repeats,
            "warmup_calls": 1,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "threads_requested": args.threads,
            "seed": args.seed,
            "quick": args.quick,
            "scale": SCALE,
            "apply_scale": APPLY_SCALE,
            "taskarith_cache_limit": ta.cache_info()["limit"],
            "taskarith_cache_bytes_env": os.environ.get("TASKARITH_CACHE_BYTES"),
            "timing": "time.perf_counter around 'result = op()' (previous result alive until reassigned)"
                      + ("; torch.cuda.synchronize() before stopping the clock" if device.type == "cuda" else ""),
        },
        "probe": {
            "op": "dst.copy_(src)",
            "gbps": probe_gbps,
            "median_ms": statistics.median(probe_times),
            "median_ms_start": probes[0]["median_ms"],
            "median_ms_end": probes[-1]["median_ms"],
            "drift": drift,
        },
        "results": results,
        "headline": {
            "description": "public API ops vs in-place copy: min over a + b, s * a and TaskVector.sum of 3 "
                           "of (effective GB/s / copy probe GB/s)",
            "ratio": headline[worst_op],
            "worst_op": worst_op,
            "ratios": headline,
            "dict_baseline_ratio": min(dict_headline.values()),
            "dict_baseline_ratios": dict_headline,
        },
        "checks": {"outputs_agree": not failed, "details": checks},
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "peak_rss_bytes": peak_rss,
        "cuda_peak_allocated_bytes": cuda_peak,
        "taskarith_cache_after": ta.cache_info(),
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
