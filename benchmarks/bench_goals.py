#!/usr/bin/env python
"""The speed goals of taskarith, each measured as a ratio in one run, with pass/fail.

1. **Vector ops at the speed of memory** (``--params``, default 100M entries per vector; transformer-like
   and LoRA-like shapes; float32 and bfloat16): every public op of ``ta.TaskVector`` -- ``a + b``, ``a - b``,
   ``-a``, ``s * a``, ``a / s``, ``sum([a, b, c])``, ``ta.TaskVector.sum([a, b, c])``,
   ``ta.merge([a, b, c], "task_arithmetic")``, the in-place ``a.add_(b)``, ``a.sub_(b)``, ``a.mul_(s)``,
   ``a.div_(s)``, ``a.neg_()``, ``a.apply_to(base)``, and the reductions ``a.dot(b)``, ``a.norm()``,
   ``a.cosine(b)``. (``a += b`` is ``a = a + b``: a TaskVector has no ``__iadd__``.) Goal: each at least
   0.8x the bandwidth probe.
2. **TIES costs the same per vector at k = 8 as at k = 3**: ``ta.merge(vs, "ties", density=0.2)`` over
   k float32 vectors of ``--ties-params`` entries (default 20M); time / k at k = 8 within 1.2x of k = 3.
3. **Out of core costs little more than in memory** over many small tensors: a base and three
   fine-tuned checkpoints of ``--files-tensors`` tensors of ``--files-side`` squared entries (default
   10,000 of 64 x 64, float32) in a temporary folder; ``ta.merge_files(base, [ft1, ft2, ft3], out, "ties",
   density=0.2)`` against the same work in memory (``ta.io.load_state_dict`` of the four,
   ``ta.TaskVector.from_models``, ``ta.merge``, ``apply_to``, ``ta.io.write_model``): within 3x its wall time;
   ``--files-repeats`` rounds of both (default ``--repeats``), alternating which goes first, medians compared.

**Ratio to the probe** (goal 1): an op that must read and write ``B`` bytes (for a vector of ``N`` bytes:
``a + b`` reads 2N and writes N, so B = 3N; ``s * a`` 2N; the sums and the task-arithmetic merge of three
4N; ``apply_to`` 3N; ``dot`` 2N, ``norm`` N, ``cosine`` 2N: the least any implementation must move) runs at
``B / median time``. The probe is ``x.add_(y)`` over two flat, preallocated float32 buffers of ``B / 3``
bytes each (an in-place add moves 3 x its buffer: the same ``B``), timed like the ops at the start and
at the end of every shapes/dtype block; the ratio divides the op's bytes/s by the **best** probe of the
run with the same ``B`` (the highest bytes / median time among those measurements). Every timing is one
warm-up call, then ``--repeats`` calls written as a user's loop (``c = a + b``); medians are reported.
Each op is then timed once more in alternation with the probe of its bytes (``paired_ratio``: median
probe time / median op time): the memory bandwidth of a shared machine can change between blocks of a
run, and the paired ratio compares the two under the same conditions. The goal is judged on the first.

    python benchmarks/bench_goals.py                 # the goals at their sizes
    python benchmarks/bench_goals.py --quick         # tiny sizes, 1 repeat: checks that it runs
    python benchmarks/bench_goals.py --parts ops --params 10_000_000 --shapes lora

Results go to ``benchmarks/results/goals-<hostname>-<device>.json``. Timings are measurements, not tests:
the script exits 0 whether or not a goal is met (1 only if the merged files disagree).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import _common as bench  # sibling file: the scaffolding
import torch

import taskarith as ta

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PARTS = ("ops", "ties", "files")
S = 0.3  # the scalar of s * a, a / s, mul_, div_
DENSITY = 0.2
GOAL_OPS, GOAL_TIES, GOAL_FILES = 0.8, 1.2, 3.0
QUICK = {"params": 200_000, "ties_params": 200_000, "files_tensors": 200, "files_side": 16, "repeats": 1}

# (op, bytes it must move in vectors: reads + writes, the call on the block's vectors v)
OPS = [
    ("a + b", 3, lambda v: v.a + v.b),
    ("a - b", 3, lambda v: v.a - v.b),
    ("-a", 2, lambda v: -v.a),
    ("s * a", 2, lambda v: S * v.a),
    ("a / s", 2, lambda v: v.a / S),
    ("sum([a, b, c])", 4, lambda v: sum([v.a, v.b, v.c])),
    ("TaskVector.sum([a, b, c])", 4, lambda v: ta.TaskVector.sum([v.a, v.b, v.c])),
    ("ta.merge([a, b, c], 'task_arithmetic')", 4, lambda v: ta.merge([v.a, v.b, v.c], "task_arithmetic")),
    ("a.add_(b)", 3, lambda v: v.w.add_(v.b)),
    ("a.sub_(b)", 3, lambda v: v.w.sub_(v.b)),
    ("a.mul_(s)", 2, lambda v: v.w.mul_(S)),
    ("a.div_(s)", 2, lambda v: v.w.div_(S)),
    ("a.neg_()", 2, lambda v: v.w.neg_()),
    ("a.apply_to(base)", 3, lambda v: v.a.apply_to(v.base)),
    ("a.dot(b)", 2, lambda v: v.a.dot(v.b)),
    ("a.norm()", 1, lambda v: v.a.norm()),
    ("a.cosine(b)", 2, lambda v: v.a.cosine(v.b)),
]


def parse_args(argv):
    p = bench.Parser(__doc__, out="goals-{host}-{device}", params=(100 * bench.M, QUICK["params"]),
                     repeats=(3, QUICK["repeats"]), device=True, seed=True,
                     quick="tiny sizes and 1 repeat: checks that the script runs (explicit flags win)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--shapes", default="transformer,lora", help="goal 1: transformer, lora or both (default)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="goal 1: float32, bfloat16 or both (default)")
    p.add_argument("--tensors", type=int, default=300, help="tensors per transformer-like vector (default 300)")
    p.add_argument("--ties-params", type=int, default=None, help="goal 2: entries per vector (default 20M)")
    p.add_argument("--files-tensors", type=int, default=None, help="goal 3: tensors per checkpoint (default 10,000)")
    p.add_argument("--files-side", type=int, default=None, help="goal 3: tensors of side x side (default 64)")
    p.add_argument("--files-repeats", type=int, default=None,
                   help="goal 3: rounds of both calls, alternating which goes first (default: --repeats)")
    args = p.parse(argv)
    args.files_repeats = args.repeats if args.files_repeats is None else args.files_repeats
    for name, full in (("ties_params", 20 * bench.M), ("files_tensors", 10_000), ("files_side", 64)):
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else full)
    if min(args.ties_params, args.files_tensors, args.files_side, args.files_repeats) < 1:
        p.error("--ties-params, --files-tensors, --files-side and --files-repeats must be positive")
    args.parts, args.shapes, args.dtypes = (v.split(",") for v in (args.parts, args.shapes, args.dtypes))
    for name, valid in (("parts", PARTS), ("shapes", bench.SHAPES), ("dtypes", DTYPES)):
        if not set(getattr(args, name)) <= set(valid):
            p.error(f"--{name}: choose from {', '.join(valid)}")
    return args


def goal(group: str, name: str, measured: str, value: float, target: float, at_least: bool) -> dict:
    """One line of the goals table: ``value`` (a ratio) against ``target``, at least or at most."""
    comparison = ">=" if at_least else "<="
    return {"group": group, "name": name, "goal": f"{name} {comparison} {target}x", "measured": measured,
            "value": value, "target": target, "comparison": comparison,
            "passed": value >= target if at_least else value <= target}


# ---------------------------------------------------------------------------------------------
# Goal 1: vector ops against the probe
# ---------------------------------------------------------------------------------------------


class Probes:
    """``x.add_(y)`` probes of every byte count the run asks for, on views of one pair of flat buffers."""

    def __init__(self, max_bytes: int, device):
        self.pair = bench.BandwidthProbe.alloc("add", -(-max_bytes // 12), torch.float32, device)
        self.by_bytes: dict[int, bench.BandwidthProbe] = {}

    def measure(self, sizes: set[int], timer: bench.Timer) -> None:
        for nbytes in sorted(sizes):
            if nbytes not in self.by_bytes:
                n = nbytes // 12  # two float32 buffers of B / 3 bytes
                self.by_bytes[nbytes] = bench.BandwidthProbe("add", self.pair.a[:n], self.pair.b[:n])
            self.by_bytes[nbytes].measure(timer)

    def call(self, nbytes: int):
        """The probe of ``nbytes`` as a call (for :func:`paired`)."""
        probe = self.by_bytes[nbytes]
        return lambda: probe.a.add_(probe.b)

    def best(self, nbytes: int) -> float:
        return self.by_bytes[nbytes].best_gbps

    def to_json(self) -> dict:
        return {str(b): {"probe_bytes": p.bytes, "best_gbps": p.best_gbps,
                         "measurements": [{k: r[k] for k in ("median_ms", "best_ms", "gbps", "times_ms")}
                                          for r in p.rows]} for b, p in sorted(self.by_bytes.items())}


def vector_ops(args, timer: bench.Timer) -> tuple[list[dict], Probes]:
    blocks = [(kind, bench.model_shapes(kind, args.params, args.tensors), d) for kind in args.shapes
              for d in args.dtypes]
    most = max(sum(math.prod(s) for s in shapes.values()) * DTYPES[d].itemsize for _, shapes, d in blocks)
    probes = Probes(4 * most, args.device)
    rows = []
    for shapes_kind, shapes, dtype_name in blocks:
        dtype = DTYPES[dtype_name]
        numel = sum(math.prod(s) for s in shapes.values())
        nbytes = numel * dtype.itemsize
        print(f"goal 1: {numel:,} {dtype_name} entries in {len(shapes)} {shapes_kind}-like tensors "
              f"({nbytes / 1e6:,.0f} MB per vector)", flush=True)
        g = torch.Generator().manual_seed(args.seed)
        v = SimpleNamespace(**{k: ta.TaskVector(bench.make_state(shapes, dtype, args.device, g)) for k in "abc"})
        v.base = bench.make_state(shapes, dtype, args.device, g)
        v.w = v.a.clone()  # the in-place ops' own copy of a
        sizes = {k * nbytes for _, k, _ in OPS}
        probes.measure(sizes, timer)
        for op, k, fn in OPS:
            _, warmup, times = timer.run(lambda fn=fn, v=v: fn(v))
            row = bench.timing_row(op, "taskarith", op, k * nbytes, warmup, times)
            row.update(shapes=shapes_kind, dtype=dtype_name, params=numel, tensors=len(shapes),
                       bytes_per_vector=nbytes, vectors_moved=k)
            row.update(paired(lambda fn=fn, v=v: fn(v), probes.call(k * nbytes), timer))
            rows.append(row)
            print(f"  {op:<40} median {row['median_ms']:9.2f} ms  {row['gbps']:7.2f} GB/s  "
                  f"paired {row['paired_ratio']:.2f}", flush=True)
        probes.measure(sizes, timer)
        v = None  # free this block's vectors before the next block's are built
    for row in rows:
        row["probe_gbps"] = probes.best(row["min_bytes"])
        row["ratio"] = row["gbps"] / row["probe_gbps"]
    return rows, probes


def paired(op, probe, timer: bench.Timer) -> dict:
    """The op and the probe of its bytes timed in alternation, ``timer.repeats`` times each (after one
    warm-up call of each): both sample the same state of the machine, whose memory bandwidth may
    change between blocks of a run. ``paired_ratio`` = median probe time / median op time."""
    op(), probe()
    times: dict[str, list[float]] = {"op": [], "probe": []}
    result = None
    for _ in range(timer.repeats):
        for name, fn in (("probe", probe), ("op", op)):
            bench.sync(timer.device)
            t0 = time.perf_counter()
            if name == "op":
                result = fn()  # the previous result lives until this assignment, as in a user's loop
            else:
                fn()
            bench.sync(timer.device)
            times[name].append(time.perf_counter() - t0)
    del result
    return {"paired_op_ms": [t * 1e3 for t in times["op"]], "paired_probe_ms": [t * 1e3 for t in times["probe"]],
            "paired_ratio": statistics.median(times["probe"]) / statistics.median(times["op"])}


# ---------------------------------------------------------------------------------------------
# Goal 2: TIES per vector, k = 8 against k = 3
# ---------------------------------------------------------------------------------------------


def ties_per_vector(args, timer: bench.Timer) -> dict:
    shapes = bench.transformer_shapes(args.ties_params, args.tensors)
    numel = sum(math.prod(s) for s in shapes.values())
    print(f"goal 2: TIES over 3 and 8 float32 vectors of {numel:,} entries in {len(shapes)} tensors", flush=True)
    g = torch.Generator().manual_seed(args.seed)
    vectors = [ta.TaskVector(bench.make_state(shapes, torch.float32, args.device, g)) for _ in range(8)]
    out = {"params": numel, "tensors": len(shapes), "density": DENSITY,
           "call": f"ta.merge(vs, 'ties', density={DENSITY})"}
    for k in (3, 8):
        _, warmup, times = timer.run(lambda k=k: ta.merge(vectors[:k], "ties", density=DENSITY))
        row = bench.timing_row("ties", "taskarith", out["call"], (k + 1) * numel * 4, warmup, times)
        row["per_vector_ms"] = row["median_ms"] / k
        out[f"k{k}"] = row
        print(f"  k={k}: median {row['median_ms']:.1f} ms, {row['per_vector_ms']:.1f} ms per vector", flush=True)
    out["ratio"] = out["k8"]["per_vector_ms"] / out["k3"]["per_vector_ms"]
    return out


# ---------------------------------------------------------------------------------------------
# Goal 3: merge_files against the same merge in memory
# ---------------------------------------------------------------------------------------------


def write_output(out: Path, state: dict) -> None:
    """The merged model folder, as merge_files writes it (``ta.io.write_model``: atomic, fsynced)."""
    if hasattr(ta.io, "write_model"):
        ta.io.write_model(out, list(state.items()), shard_bytes=5 * 10**9)
        return
    from safetensors.torch import save_file  # an io without the folder writer: the same file, fsynced

    out.mkdir()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with open(out / "model.safetensors", "rb") as f:
        os.fsync(f.fileno())


def files(args) -> dict:
    n, side = args.files_tensors, args.files_side
    shapes = {f"layers.{i}.weight": (side, side) for i in range(n)}
    work = Path(tempfile.mkdtemp(prefix="bench_goals-"))
    try:
        print(f"goal 3: writing a base and 3 fine-tunes of {n:,} float32 tensors of {side} x {side} to {work}",
              flush=True)
        base = {}
        for i, name in enumerate(["base", "ft1", "ft2", "ft3"]):
            g = torch.Generator().manual_seed(args.seed * 10 + i)

            def make(_, key, shape, g=g, i=i):
                if i == 0:
                    base[key] = torch.randn(shape, generator=g).mul_(0.02)
                    return base[key]
                return base[key] + torch.randn(shape, generator=g).mul_(1e-3)

            bench.write_checkpoint(work / name, shapes, make, shard_bytes=1 << 40, itemsize=4)
        base.clear()
        sources = [work / f"ft{i}" for i in (1, 2, 3)]

        def out_of_core(out: Path) -> None:
            ta.merge_files(work / "base", sources, out, "ties", density=DENSITY, progress=False)

        def in_memory(out: Path) -> None:
            pretrained = ta.io.load_state_dict(work / "base")
            vs = [ta.TaskVector.from_models(pretrained, ta.io.load_state_dict(s)) for s in sources]
            write_output(out, ta.merge(vs, "ties", density=DENSITY).apply_to(pretrained))

        calls = {"merge_files": out_of_core, "in_memory": in_memory}
        times: dict[str, list[float]] = {k: [] for k in calls}
        for r in range(args.files_repeats):  # the files were just written: both read them from the page cache
            for which in list(calls) if r % 2 == 0 else list(calls)[::-1]:
                out = work / f"out-{which}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                calls[which](out)
                times[which].append(time.perf_counter() - t0)
        got, want = (ta.io.load_state_dict(work / f"out-{w}") for w in calls)
        equal = set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        medians = {k: statistics.median(t) for k, t in times.items()}
        for k, t in times.items():
            print(f"  {k}: median {medians[k]:.2f} s ({', '.join(f'{x:.2f}' for x in t)})", flush=True)
        return {"tensors": n, "shape": [side, side], "dtype": "float32", "sources": 3, "density": DENSITY,
                "checkpoint_bytes": n * side * side * 4,
                "merge_files_call": "ta.merge_files(base, [ft1, ft2, ft3], out, 'ties', density=0.2)",
                "in_memory_calls": "ta.io.load_state_dict x 4, ta.TaskVector.from_models x 3, ta.merge(vs, 'ties', "
                                   "density=0.2), apply_to(base), ta.io.write_model",
                "times_s": times, "median_s": medians, "ratio": medians["merge_files"] / medians["in_memory"],
                "outputs_equal": equal}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine, started = bench.begin()
    timer = bench.Timer(args.repeats, args.device)
    goals, report = [], {}
    if "ops" in args.parts:
        rows, probes = vector_ops(args, timer)
        report["vector_ops"] = rows
        report["probe"] = {"op": "x.add_(y)", "dtype": "float32", "by_bytes": probes.to_json(),
                           "definition": "flat float32 buffers x, y of B/3 bytes each (an in-place add moves 3x "
                                         "its buffer: B); best bytes / median time among the run's measurements "
                                         "with the same B"}
        del probes
        goals += [goal("vector_ops", f"{r['op']}, {r['shapes']} {r['dtype']}",
                       f"{r['gbps']:.2f} GB/s vs probe {r['probe_gbps']:.2f} GB/s", r["ratio"], GOAL_OPS, True)
                  for r in rows]
    if "ties" in args.parts:
        ties = report["ties"] = ties_per_vector(args, timer)
        goals.append(goal("ties", "TIES time per vector, k=8 vs k=3",
                          f"k=3 {ties['k3']['per_vector_ms']:.1f} ms/vector, k=8 {ties['k8']['per_vector_ms']:.1f}",
                          ties["ratio"], GOAL_TIES, False))
    if "files" in args.parts:
        f = report["files"] = files(args)
        goals.append(goal("files", f"merge_files vs in memory, {f['tensors']:,} tensors",
                          f"{f['median_s']['merge_files']:.2f} s vs {f['median_s']['in_memory']:.2f} s",
                          f["ratio"], GOAL_FILES, False))

    print()
    print(bench.table(["goal", "measured", "ratio", "goal", "met"],
                      [[g["name"], g["measured"], f"{g['value']:.2f}",
                        f"{g['comparison']} {g['target']:.2f}", "yes" if g["passed"] else "NO"] for g in goals],
                      "llrrl"))
    failed = [g["goal"] for g in goals if not g["passed"]]
    print(f"\n{len(goals) - len(failed)} of {len(goals)} goals met")
    for group in dict.fromkeys(g["group"] for g in goals):
        mine = [g for g in goals if g["group"] == group]
        worst = min(mine, key=lambda g: g["value"] if g["comparison"] == ">=" else -g["value"])
        print(f"  {group}: {sum(g['passed'] for g in mine)} of {len(mine)} met; worst {worst['name']} "
              f"{worst['value']:.2f}x (goal {worst['comparison']} {worst['target']}x)")
    problems = []
    if not report.get("files", {}).get("outputs_equal", True):
        problems.append("merge_files and the in-memory merge wrote different tensors")
    for p in problems:
        print(f"!!! {p}", file=sys.stderr)
    bench.save(args.out, bench.result(
        "goals", machine, started,
        config={"params_requested": args.params, "parts": args.parts, "shapes": args.shapes, "dtypes": args.dtypes,
                "tensors_requested": args.tensors, "repeats": args.repeats, "warmup_calls": 1,
                "device": args.device, "threads": torch.get_num_threads(), "threads_requested": args.threads,
                "seed": args.seed, "quick": args.quick, "scale": S, "ties_params_requested": args.ties_params,
                "files_tensors": args.files_tensors, "files_side": args.files_side,
                "files_repeats": args.files_repeats,
                "goals": {"vector_ops_min_ratio": GOAL_OPS, "ties_k8_over_k3_max": GOAL_TIES,
                          "files_over_memory_max": GOAL_FILES}},
        **report, goals=goals, summary={"goals": len(goals), "met": len(goals) - len(failed), "not_met": failed},
        problems=problems, peak_rss_bytes=bench.peak_rss()))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
