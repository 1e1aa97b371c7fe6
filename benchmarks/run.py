#!/usr/bin/env python
"""The benchmark suite: one entry point that runs a matrix of the benchmark scripts and writes RESULTS.md.

Each measurement is one of the scripts (``bench_vector_ops.py``, ``bench_merge.py``, ``bench_goals.py``) started as
its own process, so that every run has its own peak RSS; their JSON files are collected into
``benchmarks/results/suite-<host>-<device>/`` together with ``suite.json`` (what ran, how long, what was
skipped and why), then ``benchmarks/RESULTS.md`` and the plots in ``benchmarks/figures/`` are written
from those files.

    python benchmarks/run.py                       # the full matrix (see --dry-run), CPU
    python -m benchmarks --quick                   # 1M and 10M only, 1 repeat: a smoke run
    python benchmarks/run.py --device cuda         # vector ops on the GPU (merges run on the CPU only)
    python benchmarks/run.py --only merge --max-params 10000000
    python benchmarks/run.py --dry-run             # print the plan and its estimated time, run nothing
    python benchmarks/run.py --report-only benchmarks/results/suite-myhost-cpu   # re-render, no measuring

The matrix:

* vector ops (``bench_vector_ops.py``): 1M, 10M, 100M and 300M parameters per vector (300M only when
  ``--max-params`` allows it and free memory holds the script's peak of about fifteen vectors) x float32
  and bfloat16 x transformer-like shapes (a few large tensors) and LoRA-like shapes (thousands of small
  A/B matrices);
* merges (``bench_merge.py``, float32, PEFT included when importable): 10M and 100M transformer-like,
  10M LoRA-like;
* the speed goals (``bench_goals.py``): one run, at 100M parameters per vector (``--quick``: its tiny sizes).

RESULTS.md holds the tables, the issue's goals evaluated from the measured numbers, the goals table of
``bench_goals.py``, a GPU section from
the GPU result files found in ``benchmarks/results/`` (``vector_ops-*.json`` measured with ``--device
cuda``, and ``bench_gpu.py``'s ``gpu-*.json`` or any file with ``timings_s`` and ``copy_GBps``), and links
to the plots.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `python -m benchmarks` runs with the repository root as sys.path[0]
    sys.path.insert(0, str(HERE))

import _common as bench  # sibling file: the scaffolding, importable once HERE is on sys.path
from _common import ROOT, fmt_duration, fmt_ms, fmt_x, gib, md_table, now_utc, size_label

M = bench.M
VECTOR_SIZES = (1 * M, 10 * M, 100 * M, 300 * M)
QUICK_VECTOR_SIZES = (1 * M, 10 * M)
VECTOR_DTYPES = ("float32", "bfloat16")
SHAPES = ("transformer", "lora")
MERGE_RUNS = ((10 * M, "transformer"), (100 * M, "transformer"), (10 * M, "lora"))
QUICK_MERGE_RUNS = ((1 * M, "transformer"), (10 * M, "transformer"), (1 * M, "lora"), (10 * M, "lora"))
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
VECTOR_PEAK_VECTORS = 15  # bench_vector_ops holds about fifteen vectors at its peak (README)
MERGE_PEAK_VECTORS = 12  # bench_merge: the largest child (inputs + TIES temporaries) or the checking parent
PROCESS_OVERHEAD = 600 * 2**20  # Python + torch + taskarith in one process
MEMORY_HEADROOM = 0.85  # use at most this fraction of the available memory
GOALS_PARAMS, GOALS_QUICK_PARAMS = 100 * M, 200_000  # bench_goals.py's goal 1 size (its own default) and --quick's
# bench_goals: a, b, c, base, a's copy, two results, the probe's buffers (2.7) and taskarith's buffer cache;
# 7.1 GiB peak RSS at 100M float32 (2026-12-07)
GOALS_PEAK_VECTORS = 17
# 100M on the 2-core VM: goal 1 ~160 s, goal 2 ~25 s, goal 3 at 2,000 tensors ~15 s (3.5 min in all), so
# ~100 s at its default 10,000 (extrapolated); --quick: 15-60 s
GOALS_QUICK_SECONDS, GOALS_FIXED_SECONDS, GOALS_SECONDS_PER_M = 40, 125, 1.6

# Goals of the issue, evaluated from the measured numbers (never from these constants alone)
GOAL_ALGEBRA_RATIO = 0.8  # add, scale, sum, task arithmetic: >= 0.8 x the copy probe's GB/s
GOAL_TIES_SPEEDUP = 10.0  # TIES, 3 x 100M fp32: >= 10 x PEFT's merge_utils.ties
GOAL_TIES_RATIO = 0.25  # ... and >= 0.25 x the copy probe's GB/s
GOAL_TIES_PARAMS = 100 * M

# (op, taskarith impl) rows of bench_vector_ops shown in the tables; the dict baseline's impl is "dict"
VECTOR_ROWS = (
    ("a + b", "taskarith", "a + b"),
    ("s * a", "taskarith", "s * a"),
    ("sum of 3", "taskarith TaskVector.sum", "TaskVector.sum([a, b, c])"),
    ("sum of 3", "taskarith Python sum()", "sum([a, b, c])"),
    ("a.add_(b)", "taskarith", "a.add_(b)"),
    ("a.mul_(s)", "taskarith", "a.mul_(s)"),
    ("apply_to", "taskarith", "a.apply_to(base, 0.5)"),
)
FIGURE_NAMES = {"a + b": "add", "s * a": "scale", "TaskVector.sum([a, b, c])": "sum3", "sum([a, b, c])": "python_sum3",
                "a.add_(b)": "add_inplace", "a.mul_(s)": "mul_inplace", "a.apply_to(base, 0.5)": "apply_to"}
GOAL_ALGEBRA_ROWS = (("a + b", "taskarith"), ("s * a", "taskarith"), ("sum of 3", "taskarith TaskVector.sum"))
# Reported beside the goal, not part of it: the goal names add, scale, sum and task arithmetic.
INFO_ROWS = (("apply_to", "taskarith"),)
MERGE_OPS = ("ties_tensor", "ties_global", "dare", "task_arithmetic")
MERGE_LABELS = {"ties_tensor": "TIES tensor", "ties_global": "TIES global", "dare": "DARE",
                "task_arithmetic": "task arithmetic"}
# gpu probe files: bytes moved per op, in vectors of the probe's size (3 inputs of 100M float32)
GPU_PROBE_VECTORS = {"task_arithmetic": 4, "ties-tensor": 4, "ties-global": 4, "dare": 4, "dare_ties": 4,
                     "a+b": 3, "2*a": 2, "sum3": 4, "add_": 3, "raw add_": 3, "raw add out": 3}
GPU_PROBE_PARAMS = 100 * M  # the probe script's size; used when a file does not record its own


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the benchmark matrix (each script in its own process) and write RESULTS.md and plots.",
    )
    p.add_argument("--quick", action="store_true", help="1M and 10M parameters only, 1 repeat: a smoke run")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="device of the vector ops (default cpu); merges run on the CPU only and are skipped "
                        "with --device cuda")
    p.add_argument("--only", choices=["vector_ops", "merge", "goals"], default=None, help="run one part of the matrix")
    p.add_argument("--max-params", type=int, default=300 * M,
                   help="largest parameters per vector to run (default 300M; 300M also needs the free memory)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement (default: each script's own; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="passed to every script as --threads")
    p.add_argument("--skip-peft", action="store_true", help="passed to bench_merge.py")
    p.add_argument("--out", type=Path, default=None,
                   help="directory of the JSON results (default benchmarks/results/suite-<host>-<device>/)")
    p.add_argument("--report", type=Path, default=HERE / "RESULTS.md", help="report path (default benchmarks/RESULTS.md)")
    p.add_argument("--figures", type=Path, default=HERE / "figures",
                   help="directory of the plots (default benchmarks/figures/)")
    p.add_argument("--gpu-results", type=Path, default=HERE / "results",
                   help="where to look for GPU result files for the GPU section (default benchmarks/results/)")
    p.add_argument("--report-only", nargs="+", type=Path, default=None, metavar="PATH",
                   help="measure nothing: regenerate the report and plots from these result directories "
                        "and/or JSON files")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time, run nothing")
    args = p.parse_args(argv)
    if args.max_params < 1000:
        p.error("--max-params must be at least 1000")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be positive")
    if args.repeats is None and args.quick:
        args.repeats = 1
    if args.out is None:
        args.out = bench.RESULTS / f"suite-{bench.host()}-{args.device}"
    return args


def command_line(argv: list[str] | None, prog: str | None) -> str:
    """The command as a user would type it from the repository root."""
    args = sys.argv[1:] if argv is None else argv
    return f"{prog or 'python benchmarks/run.py'} {shlex.join(args)}".strip()


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def cuda_free_memory() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    except Exception:  # noqa: BLE001 - unknown means: do not skip on memory grounds
        return None
    return None


def estimate_seconds(kind: str, params: int, dtype: str, shapes: str, repeats: int | None, device: str) -> float:
    """Rough wall time of one script run, from runs on a 2-core, 20 GB/s machine (CPU).

    Vector ops: start-up, building three vectors, ~16 timed measurements of (1 + repeats) calls.
    Merges: ~12 child processes (each builds the inputs, then 1 + repeats calls), then the checks.
    Goals: goals 2 and 3 take about the same at any size; goal 1 grows with the parameters.
    """
    mparams = params / M
    if kind == "goals":  # goal 1 over 4 blocks of 17 ops, then TIES (8 x 20M) and 4 x 10,000 small tensors
        return GOALS_QUICK_SECONDS if params <= GOALS_QUICK_PARAMS else GOALS_FIXED_SECONDS + GOALS_SECONDS_PER_M * mparams
    if kind == "vector_ops":
        reps = 7 if repeats is None else repeats
        per_call = 0.0006 * mparams * ITEMSIZE[dtype] / 4 * (1.6 if dtype == "bfloat16" else 1.0)
        build = 0.05 * mparams
        per_tensor = 0.0  # dict baseline: ~5 us per tensor and op
        if shapes == "lora":
            per_tensor = 16 * (1 + reps) * 5e-6 * 2100 * mparams / 10
        seconds = 4 + build + 16 * (1 + reps) * per_call + per_tensor
        return seconds / (10 if device == "cuda" else 1) + (4 if device == "cuda" else 0)
    reps = 3 if repeats is None else repeats
    # at 100M transformer, 3 repeats: children 16-67 s (sum ~340 s), checks ~60 s
    scale = (1 + reps) / 4
    seconds = 12 * 3 + mparams * (3.4 * scale + 0.6) + (0.02 * mparams * 10 if shapes == "lora" else 0)
    return seconds


def build_plan(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The runs to make and the runs left out (with the reason)."""
    runs: list[dict] = []
    skipped: list[dict] = []
    free = {"cpu": bench.available_memory(), "cuda": cuda_free_memory() if args.device == "cuda" else None}

    def add(kind: str, name: str, script: str, options: list[str], params: int, dtype: str, shapes: str,
            device: str, peak_vectors: float, quick: bool = False) -> None:
        if params > args.max_params and not quick:
            skipped.append({"name": name, "reason": f"above --max-params {size_label(args.max_params)}"})
            return
        peak = int(peak_vectors * params * ITEMSIZE[dtype]) + PROCESS_OVERHEAD
        room = free[device]
        if room is not None and peak > MEMORY_HEADROOM * room:
            where = "GPU memory" if device == "cuda" else "RAM"
            skipped.append({"name": name, "reason": f"estimated peak {peak / 2**30:.1f} GiB exceeds "
                            f"{MEMORY_HEADROOM:.0%} of the {room / 2**30:.1f} GiB of {where} available now"})
            return
        cmd = [sys.executable, str(HERE / script), *options, "--out", str(args.out / f"{name}.json")]
        cmd += ["--repeats", str(args.repeats)] if args.repeats is not None else []
        cmd += ["--threads", str(args.threads)] if args.threads is not None else []
        runs.append({"name": name, "kind": kind, "params": params, "dtype": dtype, "shapes": shapes, "device": device,
                     "cmd": cmd, "json": f"{name}.json", "estimated_peak_bytes": peak,
                     "estimated_s": estimate_seconds(kind, params, dtype, shapes, args.repeats, device)})

    if args.only in (None, "vector_ops"):
        for shapes in SHAPES:
            for dtype in VECTOR_DTYPES:
                for params in QUICK_VECTOR_SIZES if args.quick else VECTOR_SIZES:
                    add("vector_ops", f"vector_ops-{shapes}-{dtype}-{size_label(params)}", "bench_vector_ops.py",
                        ["--params", str(params), "--dtype", dtype, "--shapes", shapes, "--device", args.device],
                        params, dtype, shapes, args.device, VECTOR_PEAK_VECTORS)

    if args.only in (None, "merge"):
        for params, shapes in QUICK_MERGE_RUNS if args.quick else MERGE_RUNS:
            name = f"merge-{shapes}-float32-{size_label(params)}"
            if args.device == "cuda":
                skipped.append({"name": name, "reason": "bench_merge.py measures on the CPU only; run the suite "
                                                        "without --device cuda for the merges"})
                continue
            add("merge", name, "bench_merge.py", ["--params", str(params), "--shapes", shapes]
                + (["--skip-peft"] if args.skip_peft else []), params, "float32", shapes, "cpu", MERGE_PEAK_VECTORS)

    if args.only in (None, "goals"):  # one run: goal 1 at 100M (tiny with --quick), goals 2 and 3 at their sizes
        params = GOALS_QUICK_PARAMS if args.quick else GOALS_PARAMS
        add("goals", f"goals-{'quick' if args.quick else size_label(params)}", "bench_goals.py",
            (["--quick"] if args.quick else ["--params", str(params)]) + ["--device", args.device],
            params, "float32", "both", args.device, GOALS_PEAK_VECTORS, quick=args.quick)
    return runs, skipped


def measure(args: argparse.Namespace, command: str) -> tuple[int, dict]:
    runs, skipped = build_plan(args)
    total = sum(r["estimated_s"] for r in runs)
    print(f"suite: {len(runs)} run(s), estimated {fmt_duration(total)} on a 2-core machine; results in {args.out}")
    for r in runs:
        print(f"  {r['name']:<40} ~{fmt_duration(r['estimated_s']):>7}  peak ~{r['estimated_peak_bytes'] / 2**30:.1f} GiB")
    for s in skipped:
        print(f"  skipped {s['name']}: {s['reason']}")
    notes = []
    if args.device == "cuda" and args.only != "vector_ops":
        notes.append("merges are measured on the CPU only (bench_merge.py has no --device); none ran with --device cuda")
    manifest = {
        "suite": "benchmarks/run.py",
        "command": command,
        "started_utc": now_utc(),
        "finished_utc": None,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                      if k not in ("report_only", "dry_run")},
        "device": args.device,
        "quick": args.quick,
        "runs": [],
        "skipped": skipped,
        "notes": notes,
        "estimated_s": total,
    }
    if args.dry_run:
        return 0, manifest
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for i, r in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {r['name']}: {shlex.join(r['cmd'][1:])}", flush=True)
        (args.out / r["json"]).unlink(missing_ok=True)
        code, wall = bench.tee(r["cmd"], args.out / f"{r['name']}.log")
        ok = code == 0 and (args.out / r["json"]).exists()
        if not ok:
            status = 1
            print(f"!!! {r['name']} exited with status {code}", file=sys.stderr, flush=True)
        entry = {k: v for k, v in r.items() if k != "cmd"}
        entry.update({"command": shlex.join(["python", *[os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c
                                                           for c in r["cmd"][1:]]]),
                      "returncode": code, "wall_s": wall, "log": f"{r['name']}.log"})
        manifest["runs"].append(entry)
        bench.write_json(args.out / "suite.json", manifest)
    manifest["finished_utc"] = now_utc()
    bench.write_json(args.out / "suite.json", manifest)
    return status, manifest


# ---------------------------------------------------------------------------------------------
# Loading results
# ---------------------------------------------------------------------------------------------


def is_gpu_probe(data: object) -> bool:
    return isinstance(data, dict) and "timings_s" in data and "copy_GBps" in data


def load_results(paths: list[Path], gpu_dir: Path | None) -> dict:
    """Every result JSON under ``paths`` (directories: their *.json files; or files), classified."""
    found: dict = {"vector_ops": [], "merge": [], "goals": [], "gpu_probe": [], "suites": [], "other": [],
                   "unreadable": []}
    seen: set[Path] = set()

    def add(path: Path, gpu_only: bool = False) -> None:
        path = path.resolve()
        if path in seen or not path.is_file():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            if not gpu_only:
                found["unreadable"].append(f"{path}: {exc}")
            return
        if not isinstance(data, dict):
            return
        kind = data.get("benchmark")
        if gpu_only:  # from the scan of benchmarks/results/: GPU files only
            is_cuda = kind == "vector_ops" and str(data.get("config", {}).get("device", "")).startswith("cuda")
            if not (is_cuda or is_gpu_probe(data)):
                return
        seen.add(path)
        data["_path"] = str(path)
        if path.name == "suite.json" and data.get("suite"):
            found["suites"].append(data)
        elif kind in ("vector_ops", "merge", "goals"):
            found[kind].append(data)
        elif is_gpu_probe(data):
            found["gpu_probe"].append(data)
        else:
            found["other"].append(str(path))

    for p in paths:
        if p.is_dir():
            for f in sorted(p.glob("*.json")):
                add(f)
        elif p.is_file():
            add(p)
        else:
            found["unreadable"].append(f"{p}: no such file or directory")
    if gpu_dir is not None and gpu_dir.is_dir():
        for f in sorted(gpu_dir.glob("*.json")):
            add(f, gpu_only=True)
    return found


def cfg(data: dict, key: str, default=None):
    return data.get("config", {}).get(key, default)


def shapes_of(data: dict) -> str:
    return cfg(data, "shapes") or "transformer"  # files from before --shapes are transformer-like


def device_of(data: dict) -> str:
    return "cuda" if str(cfg(data, "device", "cpu")).startswith("cuda") else "cpu"


def size_of(data: dict) -> int:
    return int(cfg(data, "params_requested") or cfg(data, "params") or 0)


def find_row(data: dict, op: str, impl: str) -> dict | None:
    return next((r for r in data.get("results", []) if r.get("op") == op and r.get("impl") == impl
                 and "error" not in r), None)


def probe_for(vector_runs: list[dict], params: int, shapes: str, dtype: str = "float32",
              device: str = "cpu") -> dict | None:
    """The copy probe of the vector-ops run of this size, shapes and dtype (the merges have none of their own)."""
    matches = [v for v in vector_runs if size_of(v) == params and shapes_of(v) == shapes
               and cfg(v, "dtype") == dtype and device_of(v) == device and v.get("probe")]
    if not matches and shapes != "transformer":  # the probe is a flat buffer: shapes do not matter to it
        matches = [v for v in vector_runs if size_of(v) == params and cfg(v, "dtype") == dtype
                   and device_of(v) == device and v.get("probe")]
    return max(matches, key=lambda v: v.get("timestamp_utc", "")) if matches else None


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def show_path(path: str | Path) -> str:
    """A path relative to the repository root when it lies inside it, else as it is."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def vector_check(data: dict, op: str, impl: str) -> str:
    details = data.get("checks", {}).get("details", [])
    c = next((c for c in details if c.get("op") == op and c.get("impl") == impl), None)
    if c is None:
        return "–"
    if not c.get("ok"):
        return "**MISMATCH**"
    if c.get("exact_equal"):
        return "bit-equal"
    return f"allclose (max diff {c.get('max_abs_diff') or 0:.2g})"


def merge_check(data: dict, op: str, impl: str) -> str:
    details = [c for c in data.get("checks", {}).get("details", []) if c.get("op") == op]
    parts = []
    for c in details:
        if c.get("kind") == "missing output":
            if impl in c.get("impls", []):
                parts.append("**missing output**")
            continue
        if c.get("impl") != impl:
            continue
        flag = "" if c.get("ok") else "**FAILED** "
        kind = c.get("kind", "")
        if kind.startswith("bitwise vs"):
            other = c.get("other")
            if c.get("identical"):
                parts.append(f"{flag}= {other}")
            else:
                parts.append(f"{flag}{c.get('differing_entries', 0):,} differ from {other} "
                             f"({c.get('differences_at_a_trim_tie', 0):,} at trim ties)")
        elif kind == "vs plain":
            parts.append(f"{flag}= plain" if c.get("identical") else f"{flag}{c.get('max_ulps', 0):.1f} ulp vs plain")
        elif kind == "statistics":
            parts.append(f"{flag}masks ok (z {', '.join(f'{z:+.1f}' for z in c.get('kept_fraction_z', []))})"
                         if c.get("ok") else f"{flag}mask statistics")
    return "; ".join(parts) if parts else "–"


def vector_sort_key(v: dict) -> tuple:
    dtype = cfg(v, "dtype", "")
    return (SHAPES.index(shapes_of(v)) if shapes_of(v) in SHAPES else 9,
            VECTOR_DTYPES.index(dtype) if dtype in VECTOR_DTYPES else 9, dtype, size_of(v))


def vector_table(vector_runs: list[dict]) -> list[str]:
    rows = []
    for v in sorted(vector_runs, key=vector_sort_key):
        probe = v.get("probe", {}).get("gbps")
        shapes = f"{shapes_of(v)} ({cfg(v, 'tensors', '?'):,})" if isinstance(cfg(v, "tensors"), int) else shapes_of(v)
        for op, impl, label in VECTOR_ROWS:
            r = find_row(v, op, impl)
            if r is None:
                continue
            d = find_row(v, op, "dict")
            rows.append([size_label(size_of(v)), cfg(v, "dtype", "?"), shapes, f"`{label}`", f"{r['gbps']:.1f}",
                         fmt_x(r.get("ratio_to_copy")), fmt_x(d.get("ratio_to_copy") if d else None),
                         f"{probe:.1f}" if probe else "–", gib(v.get("peak_rss_bytes")),
                         vector_check(v, op, impl)])
    return md_table(["size", "dtype", "shapes (tensors)", "op", "taskarith GB/s", "vs copy", "dict vs copy",
                     "copy GB/s", "peak RSS GiB", "output"], rows, "llllrrrrrl")


def merge_rows(merge_runs: list[dict], vector_runs: list[dict]) -> list[list[str]]:
    rows = []
    for m in sorted(merge_runs, key=lambda m: (shapes_of(m) != "transformer", size_of(m))):
        probe = probe_for(vector_runs, size_of(m), shapes_of(m))
        probe_gbps = probe["probe"]["gbps"] if probe else None
        shapes = f"{shapes_of(m)} ({cfg(m, 'tensors'):,})" if isinstance(cfg(m, "tensors"), int) else shapes_of(m)
        for op in MERGE_OPS:
            peft = find_row(m, op, "peft")
            plain = find_row(m, op, "plain")
            impls = ["taskarith", "taskarith_sum"] if op == "task_arithmetic" else ["taskarith"]
            for impl in impls:
                r = find_row(m, op, impl)
                failed = next((x for x in m.get("results", []) if x.get("op") == op and x.get("impl") == impl
                               and "error" in x), None)
                if r is None and failed is None:
                    continue
                label = MERGE_LABELS[op] + (" (`TaskVector.sum`)" if impl == "taskarith_sum" else "")
                if r is None:
                    rows.append([label, size_label(size_of(m)), shapes, "**failed**"] + ["–"] * 7)
                    continue
                speedup = peft["median_ms"] / r["median_ms"] if peft else None
                rows.append([label, size_label(size_of(m)), shapes, fmt_ms(r["median_ms"]),
                             fmt_ms(peft["median_ms"] if peft else None), fmt_ms(plain["median_ms"] if plain else None),
                             fmt_x(speedup), f"{r['gbps']:.2f}",
                             fmt_x(r["gbps"] / probe_gbps if probe_gbps else None), gib(r.get("peak_rss_bytes")),
                             merge_check(m, op, impl)])
    return rows


def algebra_goal(vector_runs: list[dict], merge_runs: list[dict], device: str) -> list[str]:
    runs = [v for v in vector_runs if device_of(v) == device]
    if not runs:
        return []
    largest = max(size_of(v) for v in runs)
    items = []  # (ratio, description)
    for v in runs:
        if size_of(v) != largest:
            continue
        for op, impl in GOAL_ALGEBRA_ROWS:
            r = find_row(v, op, impl)
            if r is not None and r.get("ratio_to_copy") is not None:
                label = next(lab for o, i, lab in VECTOR_ROWS if o == op and i == impl)
                items.append((r["ratio_to_copy"], f"`{label}` {cfg(v, 'dtype')} {shapes_of(v)}"))
    if device == "cpu":
        for m in merge_runs:
            if size_of(m) != largest:
                continue
            probe = probe_for(vector_runs, largest, shapes_of(m))
            r = find_row(m, "task_arithmetic", "taskarith")
            if probe and r:
                items.append((r["gbps"] / probe["probe"]["gbps"],
                              f"`ta.merge(vs, 'task_arithmetic')` float32 {shapes_of(m)}"))
    if not items:
        return []
    worst_ratio, worst = min(items)
    met = worst_ratio >= GOAL_ALGEBRA_RATIO
    lines = [(f"- **add / scale / sum / task arithmetic >= {GOAL_ALGEBRA_RATIO}x the copy probe ({device.upper()}): "
              f"{'met' if met else 'not met'}** — worst ratio {worst_ratio:.2f}x ({worst}), over "
              f"{len(items)} measurements at {size_label(largest)} parameters per vector "
              f"(the largest size measured on the {'GPU' if device == 'cuda' else 'CPU'}); best {max(items)[0]:.2f}x.")]
    if largest < 100 * M and device == "cpu":
        lines.append(f"  Note: at {size_label(largest)} the vectors may sit partly in the CPU caches; the goal is "
                     "meant for sizes of 100M and more, so this verdict is indicative only.")
    by_op: dict[str, float] = {}
    for ratio, desc in items:
        key = desc.split("`")[1]
        by_op[key] = min(ratio, by_op.get(key, math.inf))
    lines.append("  Worst per operation: " + ", ".join(f"`{k}` {v:.2f}x" for k, v in by_op.items()) + ".")
    extra = []
    for v in runs:
        if size_of(v) != largest:
            continue
        for op, impl in INFO_ROWS:
            r = find_row(v, op, impl)
            if r is not None and r.get("ratio_to_copy") is not None:
                extra.append(r["ratio_to_copy"])
    if extra:
        lines.append(f"  Not part of the goal: `apply_to` ranges {min(extra):.2f}x-{max(extra):.2f}x at "
                     f"{size_label(largest)} (it allocates one output tensor per entry, as a state_dict needs).")
    return lines


def ties_goals(merge_runs: list[dict], vector_runs: list[dict]) -> list[str]:
    goal_speed = f"TIES (3 x {size_label(GOAL_TIES_PARAMS)} float32) >= {GOAL_TIES_SPEEDUP:.0f}x PEFT"
    goal_bw = f"TIES (3 x {size_label(GOAL_TIES_PARAMS)} float32) >= {GOAL_TIES_RATIO}x the copy probe"
    candidates = [m for m in merge_runs if shapes_of(m) == "transformer" and cfg(m, "vectors", 3) == 3
                  and find_row(m, "ties_tensor", "taskarith")]
    at_goal = [m for m in candidates if size_of(m) == GOAL_TIES_PARAMS]
    lines = []
    if not candidates:
        return [f"- **{goal_speed}: not measured** — no TIES merge results.",
                f"- **{goal_bw}: not measured** — no TIES merge results."]
    m = max(at_goal or candidates, key=lambda m: m.get("timestamp_utc", ""))
    size = size_label(size_of(m))
    indicative = "" if at_goal else (f" not measured at 3 x {size_label(GOAL_TIES_PARAMS)}; the largest run, "
                                     f"3 x {size}, gives:")
    ours = find_row(m, "ties_tensor", "taskarith")
    peft = find_row(m, "ties_tensor", "peft")
    if peft is None:
        why = m.get("peft_note") or "PEFT's rows are missing"
        lines.append(f"- **{goal_speed}: not measured** — {why}.")
    else:
        speedup = peft["median_ms"] / ours["median_ms"]
        verdict = ("met" if speedup >= GOAL_TIES_SPEEDUP else "not met") if at_goal else "not measured"
        lines.append(f"- **{goal_speed}: {verdict}** —{indicative} taskarith {fmt_ms(ours['median_ms'])} vs PEFT "
                     f"{fmt_ms(peft['median_ms'])}: {speedup:.2f}x (output: {merge_check(m, 'ties_tensor', 'taskarith')}).")
    probe = probe_for(vector_runs, size_of(m), "transformer")
    if probe is None:
        lines.append(f"- **{goal_bw}: not measured** — no float32 copy probe at {size} (the vector-ops part of the "
                     "suite measures it).")
    else:
        pg = probe["probe"]["gbps"]
        ratio = ours["gbps"] / pg
        verdict = ("met" if ratio >= GOAL_TIES_RATIO else "not met") if at_goal else "not measured"
        glob = find_row(m, "ties_global", "taskarith")
        extra = f"; TIES global scope {glob['gbps'] / pg:.2f}x" if glob else ""
        lines.append(f"- **{goal_bw}: {verdict}** —{indicative} TIES (tensor scope) {ours['gbps']:.2f} GB/s "
                     f"(4 vectors' bytes / median time) vs copy probe {pg:.2f} GB/s: {ratio:.2f}x{extra}.")
    return lines


def goals_section(data: dict) -> list[str]:
    """The table of a ``bench_goals.py`` file: every goal with its measured value, ratio and verdict."""
    c, summary = data.get("config", {}), data.get("summary", {})
    lines = [f"## Speed goals (`bench_goals.py`, {c.get('device', 'cpu').upper()}, `{show_path(data['_path'])}`)", "",
             (f"Goal 1 at {size_label(c.get('params_requested'))} parameters per vector: each op's bytes/s (the bytes "
              "it must read and write / median time) over the best `x.add_(y)` probe of the run moving the same "
              "bytes; goal 2: TIES time per vector at k = 8 over k = 3; goal 3: `merge_files` wall time over the "
              f"same merge in memory. {summary.get('met', '?')} of {summary.get('goals', '?')} goals met."), ""]
    rows = [[g["name"], g["measured"], f"{g['value']:.2f}x", f"{g['comparison']} {g['target']}x",
             "met" if g["passed"] else "**not met**"] for g in data.get("goals", [])]
    return lines + md_table(["goal", "measured", "ratio", "target", "verdict"], rows, "llrrl") + [""]


def gpu_probe_section(p: dict) -> list[str]:
    params = int(p.get("params", GPU_PROBE_PARAMS))
    nbytes = params * 4
    copy = p.get("copy_GBps")
    lines = [f"#### {p.get('device', 'GPU')} (`{show_path(p['_path'])}`)", "",
             f"torch {p.get('torch', '?')}; 3 task vectors of {size_label(params)} float32 entries"
             + ("" if "params" in p else " (the probe script's size; the file does not record it)")
             + (f"; copy probe {copy:.0f} GB/s." if copy else "."), ""]
    rows = []
    for op, seconds in p.get("timings_s", {}).items():
        k = GPU_PROBE_VECTORS.get(op)
        gbps = k * nbytes / seconds / 1e9 if k and seconds else None
        rows.append([f"`{op}`", fmt_ms(seconds * 1e3), f"{gbps:.0f}" if gbps else "–",
                     fmt_x(gbps / copy if gbps and copy else None)])
    lines += md_table(["op", "median time", "GB/s (min bytes)", "vs copy"], rows, "lrrr")
    lines.append("")
    mism = p.get("cpu_vs_cuda_ties_bitwise_mismatches")
    if mism is not None:
        lines.append("- CPU vs CUDA TIES/DARE-TIES, bit for bit: "
                     + ("all identical" if not mism else f"**{len(mism)} mismatch(es)**: {mism}"))
    if p.get("sum_max_abs_diff") is not None:
        lines.append(f"- CPU vs CUDA weighted sum: max |diff| {p['sum_max_abs_diff']:.3g}")
    ties = p.get("timings_s", {}).get("ties-tensor")
    if p.get("peft_ties_s") is not None:
        speed = p["peft_ties_s"] / ties if ties else None
        lines.append(f"- PEFT `merge_utils.ties` on the GPU: {fmt_ms(p['peft_ties_s'] * 1e3)}"
                     + (f"; taskarith TIES (tensor scope) is {speed:.1f}x faster" if speed else "")
                     + (f"; {p['peft_ties_entries_differing']:,} entries differ"
                        if p.get("peft_ties_entries_differing") is not None else ""))
    if p.get("peft_error"):
        lines.append(f"- PEFT not measured: {p['peft_error']}")
    lines.append("")
    return lines


def make_figures(vector_runs: list[dict], figures: Path) -> tuple[list[tuple[str, Path]], str | None]:
    """GB/s against size, one figure per (device, op): a line per dtype/shapes, taskarith solid, dict dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return [], f"plots skipped: matplotlib is not importable ({exc})"
    made = []
    figures.mkdir(parents=True, exist_ok=True)
    for device in ("cpu", "cuda"):
        runs = [v for v in vector_runs if device_of(v) == device]
        if not runs:
            continue
        for op, impl, label in VECTOR_ROWS:
            series = {}
            for v in runs:
                key = (cfg(v, "dtype", "?"), shapes_of(v))
                for which, name in (("taskarith", impl), ("dict", "dict")):
                    r = find_row(v, op, name)
                    if r is not None:
                        series.setdefault((key, which), []).append((size_of(v), r["gbps"]))
            if not any(w == "taskarith" for (_, w) in series):
                continue
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            colors = {}
            for ((dtype, shapes), which), points in sorted(series.items()):
                points.sort()
                color = colors.setdefault((dtype, shapes), f"C{len(colors)}")
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if which == "taskarith" else "x",
                        linestyle="-" if which == "taskarith" else "--", color=color,
                        label=f"{'taskarith' if which == 'taskarith' else 'dict'} {dtype} {shapes}")
            ax.set_xscale("log")
            ax.set_xlabel("parameters per vector")
            ax.set_ylabel("effective GB/s (minimum bytes / median time)")
            ax.set_title(f"{label} ({device.upper()})")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
            fig.tight_layout()
            slug = FIGURE_NAMES.get(label) or re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
            path = figures / f"vector_ops-{device}-{slug}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            made.append((f"{label} ({device.upper()})", path))
    return made, None


def write_report(paths: list[Path], report: Path, figures: Path, gpu_dir: Path | None,
                 report_command: str | None) -> dict:
    """Write RESULTS.md and the plots from the result files; returns what the report found (for callers)."""
    found = load_results(paths, gpu_dir)
    vectors = found["vector_ops"]
    cpu_vectors = [v for v in vectors if device_of(v) == "cpu"]
    gpu_vectors = [v for v in vectors if device_of(v) == "cuda"]
    merges = found["merge"]
    measured = vectors + merges + found["goals"]

    def rel(path: Path) -> str:  # links relative to the report
        return os.path.relpath(path, report.parent)

    lines = ["# Benchmark results", "",
             ("> Generated by `benchmarks/run.py` from the JSON result files listed below; do not edit by hand. "
              "Re-measure with `python benchmarks/run.py`, or re-render without measuring with "
              "`python benchmarks/run.py --report-only DIR`."), ""]

    machines = {}
    for d in measured:
        mach = d.get("machine") or {}
        machines.setdefault(mach.get("hostname"), mach)
    for host, mach in machines.items():
        lines.append(f"- **Machine** `{host}`: {bench.describe(mach)}")
    # taskarith's Numba kernels, as the result files that record it saw them (merges use them; the
    # vector ops measured here never do).
    numba = sorted({(d.get("machine") or {}).get("numba") or "off"
                    for d in measured if "numba" in (d.get("machine") or {})})
    if numba:
        lines.append(f"- **Numba kernels** (`taskarith[fast]`) in the runs that record them: {', '.join(numba)}")
    starts = sorted(d.get("timestamp_utc") for d in measured if d.get("timestamp_utc"))
    ends = sorted(d.get("finished_utc") for d in measured if d.get("finished_utc"))
    if starts:
        lines.append(f"- **Measured** {starts[0]} to {ends[-1] if ends else '?'} (UTC); report generated {now_utc()}")
    torches = sorted({d.get("torch_version") for d in measured if d.get("torch_version")})
    versions = sorted({d.get("taskarith_version") for d in measured if d.get("taskarith_version")})
    pefts = sorted({d.get("peft_version") or "not installed" for d in merges})
    lines.append(f"- **torch** {', '.join(torches) or '?'}; **taskarith** {', '.join(versions) or '?'}"
                 + (f"; **PEFT** {', '.join(pefts)}" if pefts else ""))
    for s in found["suites"]:
        lines.append(f"- **Command** `{s.get('command')}` (started {s.get('started_utc')}, "
                     f"finished {s.get('finished_utc') or 'unfinished'})")
    if report_command:
        lines.append(f"- **Report** `{report_command}`")
    lines.append("- **Files** " + ", ".join(f"`{show_path(d['_path'])}`" for d in measured + found["gpu_probe"]))
    lines.append("")

    # goals -------------------------------------------------------------------------------------
    lines += ["## Goals", "",
              "Evaluated from the numbers below each time this file is generated.", ""]
    goal_lines = algebra_goal(vectors, merges, "cpu") + ties_goals(merges, vectors)
    if gpu_vectors:
        goal_lines += algebra_goal(vectors, merges, "cuda")
    if not cpu_vectors:
        goal_lines.insert(0, f"- **add / scale / sum / task arithmetic >= {GOAL_ALGEBRA_RATIO}x the copy probe "
                             "(CPU): not measured** — no CPU vector-ops results.")
    lines += goal_lines + [""]

    # vector ops ----------------------------------------------------------------------------------
    lines += ["## Vector ops (CPU)", ""]
    if cpu_vectors:
        lines += [("`bench_vector_ops.py`: GB/s = the minimum bytes an op must move (2, 3 or 4 vectors) / median "
                   "time; `vs copy` = that / the same run's `dst.copy_(src)` probe; `dict vs copy` = the same for the "
                   "dict-of-tensors baseline (`{k: a[k] + b[k] for k in a}`, ...); peak RSS of the whole run; output "
                   "compared with the dict baseline."), ""]
        lines += vector_table(cpu_vectors) + [""]
    else:
        lines += ["No CPU vector-ops results.", ""]

    # merges --------------------------------------------------------------------------------------
    lines += ["## Merges (CPU, float32, 3 vectors)", ""]
    rows = merge_rows(merges, vectors)
    if rows:
        lines += [("`bench_merge.py`: median times (one process per measurement); `x PEFT` = PEFT's median / "
                   "taskarith's; GB/s = 4 vectors' bytes / median time; `vs copy` = that / the float32 copy probe "
                   "of the vector-ops run of the same size (when there is one); peak RSS of taskarith's process; "
                   "output checks as the script made them."), ""]
        lines += md_table(["op", "size", "shapes (tensors)", "taskarith", "PEFT", "plain torch", "x PEFT", "GB/s",
                           "vs copy", "peak RSS GiB", "output"], rows, "lllrrrrrrrl")
        notes = sorted({m.get("peft_note") for m in merges if m.get("peft_note")})
        lines += [""] + [f"Note: {n}." for n in notes] + ([""] if notes else [])
    else:
        lines += ["No merge results.", ""]

    # bench_goals.py ------------------------------------------------------------------------------
    for g in found["goals"]:
        lines += goals_section(g)

    # GPU -----------------------------------------------------------------------------------------
    if gpu_vectors or found["gpu_probe"]:
        lines += ["## GPU", ""]
        if gpu_vectors:
            names = sorted({(v.get("machine") or {}).get("cuda", {}).get("name", "CUDA") if (v.get("machine") or {}).get("cuda")
                            else "CUDA" for v in gpu_vectors})
            lines += [f"### Vector ops on {', '.join(names)}", ""]
            lines += vector_table(gpu_vectors) + [""]
        if found["gpu_probe"]:
            lines += ["### GPU probe files", ""]
            for p in found["gpu_probe"]:
                lines += gpu_probe_section(p)

    # figures -------------------------------------------------------------------------------------
    made, why_not = make_figures(vectors, figures)
    if made or why_not:
        lines += ["## Plots", ""]
        if why_not:
            lines += [why_not, ""]
        for title, path in made:
            lines += [f"![{title}]({rel(path)})", ""]

    # the runs ------------------------------------------------------------------------------------
    if found["suites"]:
        lines += ["## Runs", ""]
        for s in found["suites"]:
            rows = [[f"`{r['name']}`", f"{r.get('wall_s', 0):.0f} s", f"~{fmt_duration(r.get('estimated_s', 0))}",
                     "ok" if r.get("returncode") == 0 else f"**status {r.get('returncode')}**"]
                    for r in s.get("runs", [])]
            if rows:
                total = sum(r.get("wall_s", 0) for r in s.get("runs", []))
                lines += md_table(["run", "wall time", "estimate", "status"], rows, "lrrl")
                lines += ["", f"Total {fmt_duration(total)}.", ""]
            for sk in s.get("skipped", []):
                lines.append(f"- skipped `{sk['name']}`: {sk['reason']}")
            for n in s.get("notes", []):
                lines.append(f"- note: {n}")
            lines.append("")
    for u in found["unreadable"]:
        lines.append(f"- unreadable: {u}")

    report.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines).rstrip() + "\n"
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, report)
    return {"found": found, "figures": [p for _, p in made], "goals": goal_lines}


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    command = command_line(argv, prog)
    if args.report_only:
        result = write_report(args.report_only, args.report, args.figures, args.gpu_results, command)
        found = result["found"]
        print(f"wrote {args.report} from {len(found['vector_ops'])} vector-ops, {len(found['merge'])} merge, "
              f"{len(found['goals'])} goals and {len(found['gpu_probe'])} GPU probe file(s); "
              f"{len(result['figures'])} plot(s) in {args.figures}")
        for line in result["goals"]:
            print(line)
        return 0 if found["vector_ops"] or found["merge"] or found["goals"] or found["gpu_probe"] else 1
    if args.device == "cuda" and not args.dry_run and args.only != "merge":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available to torch", file=sys.stderr)
            return 2
    status, _manifest = measure(args, command)
    if args.dry_run:
        return 0
    result = write_report([args.out], args.report, args.figures, args.gpu_results, None)
    print(f"wrote {args.report} and {len(result['figures'])} plot(s) in {args.figures}")
    for line in result["goals"]:
        print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
