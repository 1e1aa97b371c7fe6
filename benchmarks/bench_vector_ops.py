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

import math
import os
import statistics
import sys
from collections.abc import Callable, Mapping

import _common as bench  # sibling file: the scaffolding
import torch

import taskarith as ta

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCALE = 0.3  # the scalar s of ``s * a`` and ``a.mul_(s)``: a typical task-arithmetic lambda
# allclose tolerances for sum of 3, where the order of the additions may differ between implementations
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-4), torch.bfloat16: (1.6e-2, 1e-3)}
APPLY_SCALE = 0.5  # the lambda of ``tv.apply_to(base, scale=...)``
HEADLINE_ROWS = [("a + b", "taskarith"), ("s * a", "taskarith"), ("sum of 3", "taskarith TaskVector.sum")]


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


def main(argv: list[str] | None = None) -> int:
    args = bench.Parser(__doc__, out="vector_ops-{host}-{device}", params=(100 * bench.M, 10 * bench.M),
                        repeats=(7, 3), quick="a short run: 10M parameters, 3 repeats (explicit flags win)",
                        device=True, seed=True, shapes=True, dtypes=DTYPES).parse(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    machine, started = bench.begin()
    shapes = bench.model_shapes(args.shapes, args.params, args.tensors)
    numel = sum(math.prod(s) for s in shapes.values())
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    print(f"vectors: {numel:,} {args.dtype} entries in {len(shapes)} {args.shapes}-like tensors = "
          f"{nbytes / 1e6:,.0f} MB each, on {device}; {args.repeats} repeats (median and best after one warm-up)")
    if device.type == "cpu":
        bench.cache_note(machine, 3 * nbytes, "three vectors")

    generator = torch.Generator().manual_seed(args.seed)
    A, B, C = (bench.make_state(shapes, dtype, device, generator) for _ in range(3))
    a, b, c = ta.TaskVector(A), ta.TaskVector(B), ta.TaskVector(C)
    if a.numel() != numel or a.nbytes != nbytes:
        raise RuntimeError(f"unexpected vector size: {a.numel()} entries, {a.nbytes} bytes")
    X, Y, Z = bench.flat(A), bench.flat(B), bench.flat(C)  # flat copies for the probe and the reference kernels
    out_flat = torch.empty_like(X)
    probe = bench.BandwidthProbe("copy", out_flat, X)
    s = SCALE
    timer = bench.Timer(args.repeats, device)
    rows: list[dict] = []
    checks: list[dict] = []

    def show(row: dict) -> None:
        print(f"  {row['op']:<10} {row['impl']:<28} median {row['median_ms']:9.2f} ms  best {row['best_ms']:9.2f} ms  "
              f"{row['gbps']:7.2f} GB/s", flush=True)

    def record(op: str, impl: str, expr: str, k: int, fn: Callable[[], object]) -> object:
        result, warmup, times = timer.run(fn)
        rows.append(bench.timing_row(op, impl, expr, k * nbytes, warmup, times))
        show(rows[-1])
        return result

    def check(op: str, impl: str, got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor],
              exact: bool) -> None:
        verdict = compare(got, want, exact)
        checks.append({"op": op, "impl": impl, "mode": "torch.equal" if exact else "allclose", **verdict})
        if not verdict["ok"]:
            print(f"!!! MISMATCH: {op} [{impl}] differs from the dict baseline in {len(verdict['bad'])} tensors: "
                  f"{', '.join(verdict['bad'][:5])}{' ...' if len(verdict['bad']) > 5 else ''}",
                  file=sys.stderr, flush=True)

    def measure_probe() -> None:
        rows.append(probe.measure(timer))
        show(rows[-1])

    print("measuring (progress; the table follows):")
    measure_probe()

    # a + b, s * a, sum of 3: dict baseline, taskarith, and one flat torch kernel into a preallocated output
    for op, passes, exact, dict_expr, dict_fn, impls, ref_expr, ref_fn in [
        ("a + b", 3, True, "{k: a[k] + b[k] for k in a}", lambda: {k: A[k] + B[k] for k in A},
         [("taskarith", "a + b", lambda: a + b)],
         "torch.add(x, y, out=z)", lambda: torch.add(X, Y, out=out_flat)),
        ("s * a", 2, True, "{k: s * a[k] for k in a}", lambda: {k: s * A[k] for k in A},
         [("taskarith", "s * a", lambda: s * a)],
         "torch.mul(x, s, out=z)", lambda: torch.mul(X, s, out=out_flat)),
        ("sum of 3", 4, False, "{k: a[k] + b[k] + c[k] for k in a}", lambda: {k: A[k] + B[k] + C[k] for k in A},
         [("taskarith TaskVector.sum", "ta.TaskVector.sum([a, b, c])", lambda: ta.TaskVector.sum([a, b, c])),
          ("taskarith Python sum()", "sum([a, b, c])", lambda: sum([a, b, c]))],
         "torch.add(x, y, out=z).add_(w)", lambda: torch.add(X, Y, out=out_flat).add_(Z)),
    ]:
        want = record(op, "dict", dict_expr, passes, dict_fn)
        for impl, expr, fn in impls:
            got = record(op, impl, expr, passes, fn)
            check(op, impl, got, want, exact)
            del got
        ref = "ref: flat torch, out=" if op != "sum of 3" else "ref: flat torch, 2 passes"
        record(op, ref, ref_expr, passes, ref_fn)
        check(op, ref, bench.flat_views(out_flat, shapes), want, exact)
        del want

    # in place: every implementation gets the same number of calls on its own copy of a ---------
    w_dict = {k: v.clone() for k, v in A.items()}
    w_ta = ta.TaskVector(A)

    def dict_add_():
        for k, t in w_dict.items():
            t.add_(B[k])
        return w_dict

    def dict_mul_():
        for t in w_dict.values():
            t.mul_(s)
        return w_dict

    record("a.add_(b)", "dict", "for k in a: a[k].add_(b[k])", 3, dict_add_)
    record("a.add_(b)", "taskarith", "a.add_(b)", 3, lambda: w_ta.add_(b))
    check("a.add_(b)", "taskarith", w_ta, w_dict, exact=True)
    record("a.mul_(s)", "dict", "for k in a: a[k].mul_(s)", 2, dict_mul_)
    record("a.mul_(s)", "taskarith", "a.mul_(s)", 2, lambda: w_ta.mul_(s))
    check("a.mul_(s)", "taskarith", w_ta, w_dict, exact=True)
    w_dict.clear()
    w_ta = None

    # base + scale * a: a new state_dict from a base (c plays the base) -----------------------
    t = APPLY_SCALE
    want = record("apply_to", "dict", f"{{k: base[k] + {t} * a[k] for k in base}}", 3,
                  lambda: {k: C[k] + t * A[k] for k in C})
    got = record("apply_to", "taskarith", f"a.apply_to(base, scale={t})", 3, lambda: a.apply_to(C, scale=t))
    check("apply_to", "taskarith", got, want, exact=False)
    del got, want

    measure_probe()

    # -------------------------------------------------------------------------------- summary
    probe_gbps = probe.pooled_gbps
    probes = probe.rows
    for r in rows:
        r["ratio_to_copy"] = r["gbps"] / probe_gbps
    results = [r for r in rows if r["op"] != "copy"]

    def ratio_of(op: str, impl: str) -> float:
        return next(r["ratio_to_copy"] for r in results if r["op"] == op and r["impl"] == impl)

    headline = {op: ratio_of(op, impl) for op, impl in HEADLINE_ROWS}
    worst_op = min(headline, key=headline.get)
    dict_headline = {op: ratio_of(op, "dict") for op, _ in HEADLINE_ROWS}
    probe_times = [t for r in probes for t in r["times_ms"]]

    print(f"\ncopy probe: {probe_gbps:.2f} GB/s (2 x {nbytes / 1e6:,.0f} MB per copy; median of "
          f"{len(probe_times)} runs: medians {probes[0]['median_ms']:.2f} ms at the start, "
          f"{probes[-1]['median_ms']:.2f} ms at the end)")
    drift = abs(probes[-1]["median_ms"] - probes[0]["median_ms"]) / min(probes[0]["median_ms"], probes[-1]["median_ms"])
    if drift > 0.2:
        print(f"note: the copy probe changed by {drift:.0%} between the start and the end of the run; "
              "the machine's bandwidth was not steady, so read the ratios with care")
    print()
    print(bench.table(["op", "implementation", "median ms", "best ms", "GB/s", "vs copy"],
                  [[r["op"], r["impl"], f"{r['median_ms']:.2f}", f"{r['best_ms']:.2f}", f"{r['gbps']:.2f}",
                    f"{r['ratio_to_copy']:.2f}"] for r in rows], "llrrrr", group=0))
    print("\nGB/s = minimum bytes the op must move / median time (copy, s*a, mul_: 2x; a+b, add_, apply_to: 3x; "
          "sum of 3: 4x one vector's bytes)")
    print(f"headline: public API ops vs in-place copy = {headline[worst_op]:.2f} "
          f"(worst of a + b {headline['a + b']:.2f}, s * a {headline['s * a']:.2f}, "
          f"TaskVector.sum {headline['sum of 3']:.2f}); dict baseline: {min(dict_headline.values()):.2f}")

    peak_rss = bench.peak_rss()
    print(f"peak RSS: {bench.gib(peak_rss, 'unknown')} GiB; taskarith buffer cache now: {bench.cache_info()}")
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

    bench.save(args.out, bench.result(
        "vector_ops", machine, started,
        config={
            "params_requested": args.params, "params": numel, "tensors_requested": args.tensors,
            "shapes": args.shapes, "lora_rank": bench.LORA_RANK if args.shapes == "lora" else None,
            **bench.shapes_config(shapes), "dtype": args.dtype, "bytes_per_vector": nbytes,
            "repeats": args.repeats, "warmup_calls": 1, "device": str(device), "threads": torch.get_num_threads(),
            "threads_requested": args.threads, "seed": args.seed, "quick": args.quick, "scale": SCALE,
            "apply_scale": APPLY_SCALE, "taskarith_cache_limit": (bench.cache_info() or {}).get("limit"),
            "taskarith_cache_bytes_env": os.environ.get("TASKARITH_CACHE_BYTES"),
            "timing": "time.perf_counter around 'result = op()' (previous result alive until reassigned)"
                      + ("; torch.cuda.synchronize() before stopping the clock" if device.type == "cuda" else ""),
        },
        probe={"op": "dst.copy_(src)", "gbps": probe_gbps, "median_ms": statistics.median(probe_times),
               "median_ms_start": probes[0]["median_ms"], "median_ms_end": probes[-1]["median_ms"], "drift": drift},
        results=results,
        headline={
            "description": "public API ops vs in-place copy: min over a + b, s * a and TaskVector.sum of 3 "
                           "of (effective GB/s / copy probe GB/s)",
            "ratio": headline[worst_op], "worst_op": worst_op, "ratios": headline,
            "dict_baseline_ratio": min(dict_headline.values()), "dict_baseline_ratios": dict_headline,
        },
        checks={"outputs_agree": not failed, "details": checks},
        peak_rss_bytes=peak_rss, cuda_peak_allocated_bytes=cuda_peak, taskarith_cache_after=bench.cache_info()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
