#!/usr/bin/env python
"""How fast taskarith merges task vectors, against PEFT's merge functions and plain torch.

Builds three seeded task vectors of about 100M float32 parameters in about 300 tensors shaped like a
transformer's, then times, on the same inputs:

* TIES with ``scope="tensor"`` and ``scope="global"`` (density 0.2, sign elected by the sum),
  DARE (drop 0.9) and task arithmetic (a plain sum), each through
* taskarith's public API (``ta.merge(vectors, "ties", density=0.2, scope=...)``, ...);
* PEFT's ``peft.utils.merge_utils`` functions (``ties``, ``dare_linear``, ``task_arithmetic``), called
  tensor by tensor the way PEFT calls them (PEFT has no global-scope TIES);
* a plain torch dict-of-tensors loop written in this file with taskarith's documented semantics.

Every (op, implementation) runs in a fresh child process of this script, so that its peak RSS
(``ru_maxrss``, a high-water mark) belongs to that measurement alone. Each child builds the inputs,
makes one untimed warm-up call and ``--repeats`` timed calls, and writes its last output to a
scratch directory; the parent then checks the outputs against each other and against the inputs:
bit-for-bit where the semantics agree, by statistics for DARE (random masks differ between libraries).

    python benchmarks/bench_merge.py                  # 100M fp32 parameters per vector, 3 repeats
    python benchmarks/bench_merge.py --quick          # 10M parameters
    python benchmarks/bench_merge.py --skip-peft --threads 8
    python benchmarks/bench_merge.py --shapes lora    # thousands of small LoRA A/B matrices
    python benchmarks/bench_merge.py --rounds 3       # a busy machine: interleave and pool 3 rounds

Results go to ``benchmarks/results/merge-<hostname>-cpu.json`` (see ``--out``).
Timings are measurements, not tests: nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import _common as bench  # sibling file: the scaffolding
import numpy as np
import torch

import taskarith as ta

VECTORS = 3
DENSITY = 0.2  # TIES: fraction of entries each vector keeps
DROP = 0.9  # DARE: probability of dropping an entry
DARE_SEED = 0
DELTA_STD = 1e-3  # typical size of a fine-tuning delta

OPS = {
    "ties_tensor": "TIES, scope='tensor', sign='sum', density 0.2",
    "ties_global": "TIES, scope='global', sign='sum', density 0.2",
    "dare": "DARE (linear), drop 0.9",
    "task_arithmetic": "task arithmetic (sum of the vectors)",
}
OP_LABELS = {"ties_tensor": "TIES tensor", "ties_global": "TIES global", "dare": "DARE",
             "task_arithmetic": "task arith"}
IMPLS = {
    "taskarith": "taskarith ta.merge",
    "taskarith_sum": "taskarith TaskVector.sum",
    "peft": "PEFT merge_utils",
    "plain": "plain torch dict loop",
}
EXPRESSIONS = {
    ("ties_tensor", "taskarith"): "ta.merge(vs, 'ties', density=0.2, scope='tensor', sign='sum')",
    ("ties_global", "taskarith"): "ta.merge(vs, 'ties', density=0.2, scope='global', sign='sum')",
    ("dare", "taskarith"): "ta.merge(vs, 'dare', drop=0.9, seed=0)",
    ("task_arithmetic", "taskarith"): "ta.merge(vs, 'task_arithmetic')",
    ("task_arithmetic", "taskarith_sum"): "ta.TaskVector.sum(vs)",
    ("ties_tensor", "peft"): "{k: merge_utils.ties([a[k], b[k], c[k]], ones(3), 0.2, 'total') for k in a}",
    ("dare", "peft"): "torch.manual_seed(0); {k: merge_utils.dare_linear([a[k], b[k], c[k]], ones(3), 0.1) for k in a}",
    ("task_arithmetic", "peft"): "{k: merge_utils.task_arithmetic([a[k], b[k], c[k]], ones(3)) for k in a}",
    ("ties_tensor", "plain"): "plain_ties(states, 0.2, 'tensor')  # in this file",
    ("ties_global", "plain"): "plain_ties(states, 0.2, 'global')  # in this file",
    ("dare", "plain"): "plain_dare(states, 0.9, seed=0)  # in this file",
    ("task_arithmetic", "plain"): "{k: a[k] + b[k] + c[k] for k in a}",
}
HEADLINE = ("ties_tensor", "taskarith", "peft")
GOAL_SPEEDUP = 10.0


def implementations(op: str, with_peft: bool) -> list[str]:
    impls = ["taskarith"]
    if op == "task_arithmetic":
        impls.append("taskarith_sum")
    if with_peft and op != "ties_global":  # PEFT's ties trims each tensor on its own: no global scope
        impls.append("peft")
    impls.append("plain")
    return impls


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench.Parser(__doc__, out="merge-{host}-cpu", params=(100 * bench.M, 10 * bench.M), repeats=(3,),
                     quick="a short run: 10M parameters (explicit --params wins)", seed=True, shapes=True)
    p.add_argument("--vectors", type=int, default=VECTORS, help=f"task vectors to merge (default {VECTORS})")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every measurement this many times, in alternating order, and pool the timed calls "
                        "(default 1; more evens out a machine whose load changes)")
    p.add_argument("--skip-peft", action="store_true", help="do not time PEFT's merge functions")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)} (default: all)")
    p.add_argument("--keep-outputs", type=Path, default=None,
                   help="write the merged outputs (raw float32) into this directory and keep them")
    # internal: run one (op, implementation) measurement and write its result into a directory
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse(argv)
    if args.vectors < 2:
        p.error("--vectors must be at least 2")
    if args.rounds < 1:
        p.error("--rounds must be positive")
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in args.ops if o not in OPS]
    if unknown or not args.ops:
        p.error(f"--ops: unknown {unknown}; choose from {', '.join(OPS)}")
    return args


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_vector(shapes: Mapping[str, tuple[int, ...]], seed: int, index: int) -> dict[str, torch.Tensor]:
    """Task vector ``index``: independently allocated float32 tensors (as a state_dict holds them).

    Entries are ``DELTA_STD * s_t * r_row * (0.6 z_shared + 0.8 z_own)``: unit variance before
    scaling, a log-normal scale ``s_t`` per tensor and ``r_row`` per row of a matrix (both shared
    by all vectors, like a property of the model), and a component ``z_shared`` common to every
    vector so that the tasks agree in sign more often than chance (correlation 0.36), as
    fine-tunings of one base model do. The shared stream is replayed for every vector, so vectors
    can be built one at a time and every process gets the same bits.
    """
    shared = torch.Generator().manual_seed(_stream(seed, "shared"))
    own = torch.Generator().manual_seed(_stream(seed, "own", index))
    out = {}
    for name, shape in shapes.items():
        scale = DELTA_STD * math.exp(0.5 * float(torch.randn((), generator=shared)))
        t = torch.randn(shape, generator=shared).mul_(0.6)
        t.add_(torch.randn(shape, generator=own), alpha=0.8)
        if len(shape) >= 2:
            rows = torch.randn(shape[0], generator=shared).mul_(0.3).exp_()
            t.mul_(rows.view(-1, *([1] * (len(shape) - 1))))
        out[name] = t.mul_(scale)
    return out


def _stream(seed: int, *parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr((seed, *parts)).encode()).digest()[:8], "little") >> 1


def digest(tensors: Mapping[str, torch.Tensor], names: list[str]) -> str:
    """A hash of the raw bytes of the tensors, in ``names`` order."""
    h = hashlib.blake2b(digest_size=16)
    for name in names:
        t = tensors[name].detach().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(memoryview(t.cpu().reshape(-1).numpy()).cast("B"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Plain torch: a dict-of-tensors loop with taskarith's documented semantics
# ---------------------------------------------------------------------------------------------


def plain_keep_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of a 1-D tensor; at equal values the lower index wins."""
    n = magnitude.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    threshold = magnitude.kthvalue(n - k + 1).values  # the k-th largest
    keep = magnitude > threshold
    short = k - int(keep.sum())
    if short > 0:
        keep[(magnitude == threshold).nonzero().squeeze(1)[:short]] = True
    return keep


def plain_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    keep = plain_keep_mask(t.reshape(-1).abs(), math.floor(density * t.numel()))
    return t * keep.view(t.shape)


def plain_trim_global(state: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    magnitude = torch.cat([t.reshape(-1).abs() for t in state.values()])
    keep = plain_keep_mask(magnitude, math.floor(density * magnitude.numel()))
    del magnitude
    sizes = [t.numel() for t in state.values()]
    return {name: t * m.view(t.shape) for (name, t), m in zip(state.items(), torch.split(keep, sizes))}


def plain_ties(states: list[dict[str, torch.Tensor]], density: float, scope: str) -> dict[str, torch.Tensor]:
    """Trim each vector to its ``density`` largest magnitudes, elect the sign of the sum per entry,
    and average the kept entries that carry the elected sign (0 where none does). Weights are 1."""
    if scope == "global":
        trimmed_states = [plain_trim_global(s, density) for s in states]
    out = {}
    for name in states[0]:
        if scope == "global":
            trimmed = [s[name] for s in trimmed_states]
        else:
            trimmed = [plain_trim(s[name], density) for s in states]
        total = torch.zeros(trimmed[0].shape, dtype=torch.float64)  # float64: the sign of the exact sum
        for t in trimmed:
            total += t
        elected = torch.where(total >= 0, 1.0, -1.0)  # a zero sum elects +
        kept_sum = torch.zeros_like(trimmed[0])
        kept_count = torch.zeros_like(trimmed[0])
        for t in trimmed:
            agrees = torch.sign(t) == elected  # sign(0) = 0 never agrees
            kept_sum += torch.where(agrees, t, 0.0)
            kept_count += agrees
        out[name] = kept_sum / kept_count.clamp(min=1)
    return out


def plain_dare(states: list[dict[str, torch.Tensor]], drop: float, seed: int) -> dict[str, torch.Tensor]:
    """Drop each entry with probability ``drop``, divide the survivors by ``1 - drop``, sum the vectors."""
    keep = 1.0 - drop
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in states[0]:
        total = torch.zeros_like(states[0][name])
        for s in states:
            t = s[name]
            survives = torch.rand(t.shape, generator=generator) < keep
            total += torch.where(survives, t / keep, 0.0)
        out[name] = total
    return out


def plain_sum(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for name in states[0]:
        total = states[0][name] + states[1][name]
        for s in states[2:]:
            total += s[name]
        out[name] = total
    return out


# ---------------------------------------------------------------------------------------------
# PEFT
# ---------------------------------------------------------------------------------------------


def peft_version() -> str | None:
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def load_peft_merge_utils():
    """PEFT's ``peft/utils/merge_utils.py``, loaded on its own.

    That file needs only torch; importing it through the ``peft`` package would also import
    transformers and accelerate, whose memory would then count in the measurement's peak RSS.
    The functions are PEFT's own code either way.
    """
    spec = importlib.util.find_spec("peft")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("peft is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "merge_utils.py"
    module_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# One measurement (runs in a child process)
# ---------------------------------------------------------------------------------------------


def build_call(op: str, impl: str, args: argparse.Namespace,
               names: list[str]) -> tuple[Callable[[], Mapping], list[Mapping[str, torch.Tensor]]]:
    """Build the inputs the implementation takes; return the call to time and the inputs."""
    shapes = bench.model_shapes(args.shapes, args.params, args.tensors)
    if impl.startswith("taskarith"):
        vectors = []
        for i in range(args.vectors):  # one dict at a time, so setup does not set the peak
            state = make_vector(shapes, args.seed, i)
            vectors.append(ta.TaskVector(state))
            del state
        if impl == "taskarith_sum":
            return (lambda: ta.TaskVector.sum(vectors)), vectors
        if op in ("ties_tensor", "ties_global"):
            scope = op.split("_")[1]
            return (lambda: ta.merge(vectors, "ties", density=DENSITY, scope=scope, sign="sum")), vectors
        if op == "dare":
            return (lambda: ta.merge(vectors, "dare", drop=DROP, seed=DARE_SEED)), vectors
        return (lambda: ta.merge(vectors, "task_arithmetic")), vectors

    states = [make_vector(shapes, args.seed, i) for i in range(args.vectors)]
    if impl == "plain":
        if op in ("ties_tensor", "ties_global"):
            scope = op.split("_")[1]
            return (lambda: plain_ties(states, DENSITY, scope)), states
        if op == "dare":
            return (lambda: plain_dare(states, DROP, DARE_SEED)), states
        return (lambda: plain_sum(states)), states

    merge_utils = load_peft_merge_utils()
    weights = torch.ones(args.vectors)  # PEFT takes the weights as a tensor, one per task

    if op == "ties_tensor":
        def call():
            return {n: merge_utils.ties([s[n] for s in states], weights, DENSITY, majority_sign_method="total")
                    for n in names}
    elif op == "dare":
        def call():
            torch.manual_seed(DARE_SEED)  # PEFT draws from the global generator
            return {n: merge_utils.dare_linear([s[n] for s in states], weights, 1.0 - DROP) for n in names}
    elif op == "task_arithmetic":
        def call():
            return {n: merge_utils.task_arithmetic([s[n] for s in states], weights) for n in names}
    else:
        raise ValueError(f"PEFT has no implementation of {op}")
    return call, states


def child_main(args: argparse.Namespace) -> int:
    op, impl = args.child.split(":")
    shapes = bench.model_shapes(args.shapes, args.params, args.tensors)
    names = list(shapes)
    t0 = time.perf_counter()
    call, inputs = build_call(op, impl, args, names)
    setup_s = time.perf_counter() - t0
    inputs = [digest(v, names) for v in inputs]  # proves every process merged the same bits
    rss_inputs = bench.proc_bytes("VmRSS")
    digests: list[str] = []
    result, warmup, times = bench.Timer(args.repeats).run(call, after=lambda r: digests.append(digest(r, names)))
    peak = bench.peak_rss()

    problems = [f"{n!r}: {tuple(result[n].shape)} {result[n].dtype}, expected {shape} torch.float32"
                for n, shape in shapes.items()
                if tuple(result[n].shape) != tuple(shape) or result[n].dtype != torch.float32]
    with open(args.workdir / f"{op}-{impl}.bin", "wb") as f:
        f.writelines(memoryview(result[n].detach().contiguous().reshape(-1).numpy()).cast("B") for n in names)
    report = {
        "op": op,
        "impl": impl,
        "expr": EXPRESSIONS[(op, impl)],
        "setup_s": setup_s,
        "warmup_ms": warmup * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "rss_inputs_bytes": rss_inputs,
        "peak_rss_bytes": peak,
        "threads": torch.get_num_threads(),
        "input_digests": inputs,
        "output_digests": digests,
        "deterministic": len(set(digests)) == 1,
        "output_problems": problems,
    }
    print(json.dumps(report))  # one JSON line for the parent (bench.json_child)
    return 0


# ---------------------------------------------------------------------------------------------
# Checks (in the parent, on the outputs the children wrote)
# ---------------------------------------------------------------------------------------------


class Inputs:
    """The input vectors as flat float32 arrays, plus each tensor's offset."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], seed: int, count: int):
        self.offsets, offset = {}, 0
        for name, shape in shapes.items():
            self.offsets[name] = (offset, math.prod(shape))
            offset += math.prod(shape)
        self.numel = offset
        self.flat = []
        self.digests = []  # as the measurement processes hash their inputs
        for i in range(count):
            buf = np.empty(offset, dtype=np.float32)
            state = make_vector(shapes, seed, i)
            self.digests.append(digest(state, list(shapes)))
            for name, t in state.items():
                start, n = self.offsets[name]
                buf[start:start + n] = t.reshape(-1).numpy()
            del state
            self.flat.append(buf)

    def tensor(self, i: int, name: str) -> np.ndarray:
        start, n = self.offsets[name]
        return self.flat[i][start:start + n]


def read_output(workdir: Path, op: str, impl: str, numel: int) -> np.ndarray | None:
    path = workdir / f"{op}-{impl}.bin"
    if not path.exists() or path.stat().st_size != 4 * numel:
        return None
    return np.memmap(path, dtype=np.float32, mode="r", shape=(numel,))


def _kth_largest(values: np.ndarray, k: int) -> float | None:
    n = values.size
    if not 1 <= k < n:
        return None  # everything or nothing is kept: no threshold to tie at
    return float(np.partition(values, n - k)[n - k])


def trim_thresholds(inputs: Inputs, scope: str) -> list[dict[str, float | None]]:
    """Per vector and tensor, the magnitude at which TIES' trim cuts (``None`` where all or none are kept)."""
    out = []
    for i in range(len(inputs.flat)):
        if scope == "global":
            mags = np.abs(inputs.flat[i])
            thr = _kth_largest(mags, math.floor(DENSITY * mags.size))
            del mags
            out.append({name: thr for name in inputs.offsets})
        else:
            out.append({name: _kth_largest(np.abs(inputs.tensor(i, name)), math.floor(DENSITY * n))
                        for name, (_, n) in inputs.offsets.items()})
    return out


def compare_ties(got: np.ndarray, want: np.ndarray, inputs: Inputs, thresholds) -> dict:
    """Entries that differ, the largest difference, and how many differences sit where some
    vector's magnitude equals its trim threshold (where implementations may break the tie differently)."""
    differing = explained = 0
    worst = 0.0
    tensors_with_diffs = []
    for name, (start, n) in inputs.offsets.items():
        a, b = got[start:start + n], want[start:start + n]
        idx = np.flatnonzero(a != b)  # -0.0 == 0.0
        if idx.size == 0:
            continue
        differing += idx.size
        worst = max(worst, float(np.max(np.abs(a[idx].astype(np.float64) - b[idx]))))
        at_threshold = np.zeros(idx.size, dtype=bool)
        for i in range(len(inputs.flat)):
            thr = thresholds[i][name]
            if thr is not None:
                at_threshold |= np.abs(inputs.tensor(i, name)[idx]) == np.float32(thr)
        explained += int(at_threshold.sum())
        tensors_with_diffs.append(name)
    return {
        "identical": differing == 0,
        "differing_entries": differing,
        "differing_fraction": differing / got.size,
        "max_abs_diff": worst,
        "differences_at_a_trim_tie": explained,
        "differences_elsewhere": differing - explained,
        "tensors_with_differences": len(tensors_with_diffs),
        "first_tensors_with_differences": tensors_with_diffs[:5],
    }


def threshold_ties(inputs: Inputs, thresholds, scope: str) -> dict:
    """How many trims have more entries at their threshold than slots left for them (where the
    rule that breaks ties decides which entries survive), and how many entries sit at those thresholds."""
    ambiguous, tied = 0, 0
    for i in range(len(inputs.flat)):
        if scope == "global":
            units = [(inputs.flat[i], next(iter(thresholds[i].values())))]
        else:
            units = [(inputs.tensor(i, name), thresholds[i][name]) for name in inputs.offsets]
        for values, thr in units:
            if thr is None:
                continue
            mags = np.abs(values)
            k = math.floor(DENSITY * mags.size)
            above = int(np.count_nonzero(mags > np.float32(thr)))
            equal = int(np.count_nonzero(mags == np.float32(thr)))
            if above + equal > k:
                ambiguous += 1
                tied += equal
    return {"trims_with_tied_threshold": ambiguous, "entries_at_tied_thresholds": tied}


def compare_sum(got: np.ndarray, want: np.ndarray, chunk: int = 1 << 22) -> dict:
    """Differences between two outputs that should agree to rounding, in absolute terms and in ulps."""
    differing, worst, worst_ulps = 0, 0.0, 0.0
    for start in range(0, got.size, chunk):
        a, b = np.asarray(got[start:start + chunk]), np.asarray(want[start:start + chunk])
        idx = np.flatnonzero(a != b)
        if idx.size == 0:
            continue
        differing += idx.size
        diff = np.abs(a[idx].astype(np.float64) - b[idx])
        worst = max(worst, float(diff.max()))
        worst_ulps = max(worst_ulps, float((diff / np.spacing(np.abs(b[idx]))).max()))
    return {"identical": differing == 0, "differing_entries": differing, "differing_fraction": differing / got.size,
            "max_abs_diff": worst, "max_ulps": worst_ulps}


def check_dare(out: np.ndarray, inputs: Inputs, chunk: int = 1 << 21) -> dict:
    """Explain every output entry as ``Σ_{i in S} x_i / keep`` for some subset S of the vectors.

    The subset nearest the output is taken as the entry's survivors. Reported: the fraction of
    entries each vector kept (expected ``keep = 1 - drop``, with its z-score), entries no subset
    explains to within 4 ulps, entries two subsets explain equally well, and, where exactly one
    vector survived (so the output is that survivor alone), whether the survivor equals
    ``x / keep`` bit for bit (float32 division by keep rounded to float32) and, separately, the
    correctly rounded ``x / (1 - drop)`` computed in float64.
    """
    count = len(inputs.flat)
    keep = 1.0 - DROP
    keep32 = np.float32(keep)
    kept = np.zeros(count, dtype=np.int64)
    unexplained = ambiguous = singles = singles_exact32 = singles_exact64 = 0
    worst_single_ulps = 0.0
    for start in range(0, inputs.numel, chunk):
        y = np.asarray(out[start:start + chunk]).astype(np.float64)
        xs = [f[start:start + chunk] for f in inputs.flat]
        scaled = [(x / keep32).astype(np.float64) for x in xs]  # float32 division, as the libraries do
        best = np.full(y.shape, np.inf)
        second = np.full(y.shape, np.inf)
        subset = np.zeros(y.shape, dtype=np.int64)
        for s in range(1 << count):
            candidate = np.zeros_like(y)
            for i in range(count):
                if s >> i & 1:
                    candidate += scaled[i]
            err = np.abs(y - candidate)
            better = err < best
            second = np.where(better, best, np.minimum(second, err))
            subset = np.where(better, s, subset)
            best = np.where(better, err, best)
        # float32 sums of up to `count` terms: a few ulps of the largest possible partial sum
        tolerance = 4 * np.spacing(sum(np.abs(v) for v in scaled).astype(np.float32)).astype(np.float64)
        unexplained += int(np.count_nonzero(best > tolerance))
        ambiguous += int(np.count_nonzero(second <= tolerance))
        for i in range(count):
            kept[i] += int(np.count_nonzero(subset >> i & 1))
        one = np.isin(subset, [1 << i for i in range(count)])
        singles += int(np.count_nonzero(one))
        for i in range(count):
            sel = one & (subset == 1 << i)
            if not sel.any():
                continue
            got = y[sel].astype(np.float32)
            exact32 = (xs[i][sel] / keep32).astype(np.float32)
            exact64 = (xs[i][sel].astype(np.float64) / keep).astype(np.float32)
            singles_exact32 += int(np.count_nonzero(got == exact32))
            singles_exact64 += int(np.count_nonzero(got == exact64))
            off = np.abs(got.astype(np.float64) - exact64) / np.spacing(np.abs(exact64))
            worst_single_ulps = max(worst_single_ulps, float(off.max()))
    n = inputs.numel
    fractions = [int(k) / n for k in kept]
    sigma = math.sqrt(keep * (1 - keep) / n)
    z = [(f - keep) / sigma for f in fractions]
    return {
        "keep_expected": keep,
        "kept_fraction": fractions,
        "kept_fraction_z": z,
        "entries_unexplained": unexplained,
        "entries_ambiguous": ambiguous,
        "single_survivor_entries": singles,
        "single_survivor_equal_x_div_keep_float32": singles_exact32,
        "single_survivor_equal_x_div_keep_float64_rounded": singles_exact64,
        "single_survivor_max_ulps_from_float64": worst_single_ulps,
        "ok": unexplained == 0 and all(abs(v) < 6 for v in z) and singles_exact32 == singles,
    }


def run_checks(ops: list[str], impls_of: dict[str, list[str]], workdir: Path, inputs: Inputs) -> list[dict]:
    checks = []

    reported: set[tuple[str, str]] = set()

    def missing(op, *impls):
        gone = [i for i in impls if read_output(workdir, op, i, inputs.numel) is None]
        new = [i for i in gone if (op, i) not in reported]
        if new:
            reported.update((op, i) for i in new)
            checks.append({"op": op, "kind": "missing output", "impls": new, "ok": False})
        return bool(gone)

    for op in ops:
        impls = impls_of[op]
        if op in ("ties_tensor", "ties_global"):
            scope = op.split("_")[1]
            thresholds = trim_thresholds(inputs, scope)
            ties_info = threshold_ties(inputs, thresholds, scope)
            pairs = [("taskarith", "plain", True)]
            if "peft" in impls:
                pairs += [("taskarith", "peft", False), ("plain", "peft", False)]
            for a, b, must_match in pairs:
                if missing(op, a, b):
                    continue
                verdict = compare_ties(read_output(workdir, op, a, inputs.numel),
                                       read_output(workdir, op, b, inputs.numel), inputs, thresholds)
                # Same semantics, same tie rule: must be bit-equal. Against PEFT (torch.topk, whose order
                # among equal magnitudes is unspecified), differences are allowed at trim ties only.
                ok = verdict["identical"] if must_match else verdict["differences_elsewhere"] == 0
                checks.append({"op": op, "kind": "bitwise vs " + b, "impl": a, "other": b, **verdict,
                               **ties_info, "ok": ok})
        elif op == "task_arithmetic":
            if missing(op, "plain"):
                continue
            want = read_output(workdir, op, "plain", inputs.numel)
            for impl in impls:
                if impl == "plain" or missing(op, impl):
                    continue
                verdict = compare_sum(read_output(workdir, op, impl, inputs.numel), want)
                checks.append({"op": op, "kind": "vs plain", "impl": impl, "other": "plain", **verdict,
                               "ok": verdict["max_ulps"] <= 2})
        elif op == "dare":
            present = [i for i in impls if not missing(op, i)]
            for impl in present:
                verdict = check_dare(read_output(workdir, op, impl, inputs.numel), inputs)
                checks.append({"op": op, "kind": "statistics", "impl": impl, **verdict})
            # Masks are random, so outputs need not be equal; this only records whether two drew the same.
            for a, b in [(a, b) for j, a in enumerate(present) for b in present[j + 1:]]:
                verdict = compare_sum(read_output(workdir, op, a, inputs.numel), read_output(workdir, op, b, inputs.numel))
                checks.append({"op": op, "kind": "same masks?", "impl": a, "other": b,
                               "identical": verdict["identical"], "differing_fraction": verdict["differing_fraction"],
                               "ok": True})
    return checks


# ---------------------------------------------------------------------------------------------
# The benchmark (parent)
# ---------------------------------------------------------------------------------------------


def child_command(args: argparse.Namespace, op: str, impl: str, workdir: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{op}:{impl}", "--workdir", str(workdir),
           "--params", str(args.params), "--tensors", str(args.tensors), "--shapes", args.shapes,
           "--vectors", str(args.vectors),
           "--repeats", str(args.repeats), "--seed", str(args.seed)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    return cmd


def pool(reports: list[dict], min_bytes: int) -> dict:
    """One row from the reports of a measurement's rounds: all timed calls together, the highest peak."""
    first = reports[0]
    times = [t for r in reports for t in r["times_ms"]]
    digests = [d for r in reports for d in r["output_digests"]]
    inputs = {tuple(r["input_digests"]) for r in reports}
    return {
        "op": first["op"],
        "impl": first["impl"],
        "expr": first["expr"],
        "rounds": len(reports),
        "times_ms": times,
        "median_ms": statistics.median(times),
        "best_ms": min(times),
        "min_bytes": min_bytes,
        "gbps": min_bytes / (statistics.median(times) / 1e3) / 1e9,
        "warmup_ms": [r["warmup_ms"] for r in reports],
        "setup_s": [r["setup_s"] for r in reports],
        "process_wall_s": [r["process_wall_s"] for r in reports],
        "peak_rss_bytes": max((r["peak_rss_bytes"] for r in reports if r["peak_rss_bytes"] is not None), default=None),
        "rss_inputs_bytes": max((r["rss_inputs_bytes"] for r in reports if r["rss_inputs_bytes"] is not None),
                                default=None),
        "threads": first["threads"],
        "input_digests": first["input_digests"],
        "input_digests_distinct": [list(i) for i in inputs],  # one entry unless rounds built different inputs
        "output_digests": digests,
        "deterministic": len(set(digests)) == 1,
        "output_problems": [p for r in reports for p in r["output_problems"]],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    machine, started = bench.begin()
    shapes = bench.model_shapes(args.shapes, args.params, args.tensors)
    numel = sum(math.prod(s) for s in shapes.values())
    nbytes = numel * 4
    min_bytes = (args.vectors + 1) * nbytes  # read every vector once, write the result once

    peft = peft_version()
    peft_note = None
    with_peft = not args.skip_peft
    if with_peft:
        try:
            load_peft_merge_utils()
        except Exception as exc:  # noqa: BLE001 - any failure means: benchmark without PEFT
            peft_note = f"PEFT unavailable ({type(exc).__name__}: {exc}); its rows are skipped"
            with_peft = False
    else:
        peft_note = "--skip-peft: PEFT's rows are skipped"

    print(f"vectors: {args.vectors} x {numel:,} float32 entries in {len(shapes)} {args.shapes}-like tensors = "
          f"{nbytes / 1e6:,.0f} MB each; {args.repeats} repeats (median and best after one warm-up) x {args.rounds} "
          "round(s); one process per measurement")
    print(f"PEFT: {peft or 'not installed'}" + (f" ({peft_note})" if peft_note else ""))

    impls_of = {op: implementations(op, with_peft) for op in args.ops}
    rows: list[dict] = []
    failures: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench_merge-")) if args.keep_outputs is None else args.keep_outputs
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print("measuring (progress; the table follows):")
        order = [(op, impl) for op in args.ops for impl in impls_of[op]]
        reports: dict[tuple[str, str], list[dict]] = {key: [] for key in order}
        errors: dict[tuple[str, str], str] = {}
        for round_ in range(args.rounds):
            # Every other round runs in reverse, so a slow drift of the machine hits all rows alike.
            for op, impl in order if round_ % 2 == 0 else order[::-1]:
                if (op, impl) in errors:
                    continue
                t0 = time.perf_counter()
                try:
                    report = bench.json_child(child_command(args, op, impl, workdir))
                except RuntimeError as exc:
                    errors[(op, impl)] = f"{op} [{impl}]: measurement process failed ({str(exc)[:300]})"
                    print(f"!!! {errors[(op, impl)]}", file=sys.stderr, flush=True)
                    continue
                report["process_wall_s"] = time.perf_counter() - t0
                reports[(op, impl)].append(report)
                times = report["times_ms"]
                print(f"  {OP_LABELS[op]:<12} {IMPLS[impl]:<26} median {statistics.median(times):10.1f} ms  "
                      f"best {min(times):10.1f} ms  peak RSS {bench.gib(report['peak_rss_bytes'], '?')} GiB"
                      + (f"  (round {round_ + 1})" if args.rounds > 1 else ""), flush=True)

        for op, impl in order:
            if (op, impl) in errors:
                failures.append(errors[(op, impl)])
                rows.append({"op": op, "impl": impl, "expr": EXPRESSIONS[(op, impl)], "error": errors[(op, impl)]})
                continue
            rows.append(pool(reports[(op, impl)], min_bytes))
            if rows[-1]["output_problems"]:
                failures.append(f"{op} [{impl}]: wrong output shapes/dtypes {rows[-1]['output_problems'][:3]}")

        # every measurement must have merged the same inputs
        seen = {tuple(d) for r in rows if "error" not in r for d in r["input_digests_distinct"]}
        inputs_agree = len(seen) <= 1
        if not inputs_agree:
            failures.append("the measurement processes built different inputs")

        for r in rows:
            if "error" in r:
                continue
            same = {x["impl"]: x for x in rows if x["op"] == r["op"] and "error" not in x}
            r["speedup_vs_peft"] = same["peft"]["median_ms"] / r["median_ms"] if "peft" in same else None
            r["speedup_vs_plain"] = same["plain"]["median_ms"] / r["median_ms"] if "plain" in same else None

        print("checking outputs ...", flush=True)
        t0 = time.perf_counter()
        inputs = Inputs(shapes, args.seed, args.vectors)
        if seen and seen != {tuple(inputs.digests)}:
            inputs_agree = False
            failures.append("the checking step built different inputs from the measurement processes")
        checks = run_checks(args.ops, impls_of, workdir, inputs)
        del inputs
        checks_s = time.perf_counter() - t0
    finally:
        if args.keep_outputs is None:
            shutil.rmtree(workdir, ignore_errors=True)

    # -------------------------------------------------------------------------------- summary
    def cells(r: dict) -> list[str]:
        if "error" in r:
            return [OP_LABELS[r["op"]], IMPLS[r["impl"]], "failed"] + [""] * 6
        x = [f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("speedup_vs_peft", "speedup_vs_plain")]
        return [OP_LABELS[r["op"]], IMPLS[r["impl"]], f"{r['median_ms']:.1f}", f"{r['best_ms']:.1f}",
                f"{r['gbps']:.2f}", *x, bench.gib(r["peak_rss_bytes"], "?"), bench.gib(r["rss_inputs_bytes"], "?")]

    print()
    print(bench.table(["op", "implementation", "median ms", "best ms", "GB/s", "x PEFT", "x plain", "peak RSS GiB",
                       "inputs GiB"], [cells(r) for r in rows], "llrrrrrrr", group=0))
    print()
    print(f"GB/s = {args.vectors + 1} x one vector's bytes (read each input, write the result) / median time; "
          "x PEFT, x plain = that implementation's median / this one's; peak RSS = high-water mark of the "
          "measurement's own process (inputs included), inputs = its RSS once the inputs were built")

    print()
    print("output checks:")
    for c in checks:
        flag = "ok " if c["ok"] else "!!!"
        if c["kind"] == "missing output":
            print(f"  {flag} {c['op']}: no output from {', '.join(c['impls'])}")
        elif c["op"].startswith("ties"):
            print(f"  {flag} {OP_LABELS[c['op']]}: {IMPLS[c['impl']]} vs {IMPLS[c['other']]}: "
                  + ("identical" if c["identical"] else
                     f"{c['differing_entries']:,} entries differ (max |diff| {c['max_abs_diff']:.3g}; "
                     f"{c['differences_at_a_trim_tie']:,} where an input sits exactly at its trim threshold, "
                     f"{c['differences_elsewhere']:,} elsewhere)")
                  + f"; trims with tied thresholds: {c['trims_with_tied_threshold']}")
        elif c["op"] == "task_arithmetic":
            print(f"  {flag} task arith: {IMPLS[c['impl']]} vs plain: "
                  + ("identical" if c["identical"] else
                     f"{c['differing_entries']:,} entries differ, max |diff| {c['max_abs_diff']:.3g} "
                     f"({c['max_ulps']:.1f} ulp)"))
        elif c["kind"] == "same masks?":
            print(f"  --  DARE {IMPLS[c['impl']]} vs {IMPLS[c['other']]}: "
                  + ("identical output (same random draws)" if c["identical"] else
                     f"{c['differing_fraction']:.1%} of entries differ (different random masks; not an error)"))
        else:
            print(f"  {flag} DARE {IMPLS[c['impl']]}: kept {', '.join(f'{f:.5f}' for f in c['kept_fraction'])} "
                  f"(expected {c['keep_expected']:.5f}; z {', '.join(f'{z:+.1f}' for z in c['kept_fraction_z'])}); "
                  f"unexplained {c['entries_unexplained']}, ambiguous {c['entries_ambiguous']}; "
                  f"single survivors = x / keep (float32) {c['single_survivor_equal_x_div_keep_float32']:,}"
                  f"/{c['single_survivor_entries']:,}, = float64-exact {c['single_survivor_equal_x_div_keep_float64_rounded']:,}"
                  f" (max {c['single_survivor_max_ulps_from_float64']:.0f} ulp off)")
    if not inputs_agree:
        print("  !!! the measurement processes did not all build the same inputs")
    for r in rows:
        if "error" not in r and not r["deterministic"]:
            print(f"  note: {OP_LABELS[r['op']]} [{IMPLS[r['impl']]}] gave different outputs on repeated calls")

    headline = None
    op, ours, theirs = HEADLINE
    row_ours = next((r for r in rows if r["op"] == op and r["impl"] == ours and "error" not in r), None)
    row_theirs = next((r for r in rows if r["op"] == op and r["impl"] == theirs and "error" not in r), None)
    if row_ours and row_theirs:
        agreement = next((c for c in checks if c["op"] == op and c.get("impl") == ours and c.get("other") == theirs),
                         None)
        speedup = row_theirs["median_ms"] / row_ours["median_ms"]
        headline = {
            "description": "taskarith TIES (scope='tensor', sign='sum') vs PEFT merge_utils.ties "
                           "(majority_sign_method='total'): PEFT median / taskarith median",
            "speedup": speedup,
            "goal": GOAL_SPEEDUP,
            "identical_output": agreement["identical"] if agreement else None,
            "differing_entries": agreement["differing_entries"] if agreement else None,
        }
        if agreement is None:
            same = "output unchecked"
        elif agreement["identical"]:
            same = "identical output"
        else:
            same = (f"{agreement['differing_entries']:,} entries differ, {agreement['differences_at_a_trim_tie']:,} "
                    "of them where an input sits exactly at its trim threshold")
        print()
        print(f"headline: taskarith TIES (tensor scope) is {speedup:.2f}x PEFT's ties ({same}); "
              f"goal >= {GOAL_SPEEDUP:.0f}x")

    failed_checks = [c for c in checks if not c["ok"]]
    for c in failed_checks:
        failures.append(f"check failed: {c['op']} {c.get('impl', '')} {c['kind']}")
    if failures:
        print(f"!!! {len(failures)} problem(s): " + "; ".join(failures), file=sys.stderr)

    bench.save(args.out, bench.result(
        "merge", machine, started, peft_version=peft, peft_note=peft_note,
        config={
            "params_requested": args.params, "params": numel, "tensors_requested": args.tensors,
            "shapes": args.shapes, **bench.shapes_config(shapes), "vectors": args.vectors, "dtype": "float32",
            "bytes_per_vector": nbytes, "min_bytes": min_bytes, "repeats": args.repeats, "rounds": args.rounds,
            "warmup_calls": 1, "device": "cpu", "threads_requested": args.threads, "seed": args.seed,
            "quick": args.quick, "density": DENSITY, "drop": DROP, "dare_seed": DARE_SEED,
            "weights": [1.0] * args.vectors,
            "inputs": f"{DELTA_STD} * s_tensor * r_row * (0.6 z_shared + 0.8 z_own), log-normal s and r",
            "ops": {op: OPS[op] for op in args.ops},
            "timing": "one process per (op, implementation): build inputs, one untimed warm-up call, then "
                      "time.perf_counter around 'result = call()' (previous result alive until reassigned)",
            "peft_loading": "peft/utils/merge_utils.py loaded on its own (needs only torch)",
            "taskarith_cache_bytes_env": os.environ.get("TASKARITH_CACHE_BYTES"),
        },
        results=rows, headline=headline,
        checks={"outputs_agree": not failed_checks, "inputs_agree": inputs_agree, "seconds": checks_s,
                "details": checks},
        failures=failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
