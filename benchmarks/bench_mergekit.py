#!/usr/bin/env python
"""End-to-end file merges, taskarith against mergekit: the same model files, in the same run.

Writes a synthetic Llama-shaped model (a ``config.json`` for ``LlamaForCausalLM``, so mergekit accepts
the architecture; hidden 1024, intermediate 2816, vocabulary 32000, 24 layers by default, about 374M
parameters, bfloat16) as a base and three fine-tunes (the base plus small seeded perturbations, about
half of them zero, so TIES has something to trim) in sharded safetensors. Then, for task arithmetic
and TIES, it times three ways of producing the merged model folder, each in a fresh child process:

* **mergekit**: its command line, ``mergekit-yaml CONFIG.yml OUT`` (on the CPU, mergekit's defaults),
  run from mergekit's own virtual environment (``--mergekit-python``) so that it cannot change the
  packages this script and taskarith run with;
* **taskarith API**: ``taskarith.merge_files(base, sources, out, method, ...)`` in a child of this script;
* **taskarith CLI**: ``python -m taskarith merge CONFIG.yml -o OUT`` on the *same* mergekit YAML file
  (taskarith reads mergekit's task_arithmetic/ties subset; see docs/cli.md).

Each is run ``--repeats`` times (default 2; every other round in reverse order) and the median wall
time of the whole process (start to exit, imports included) is reported, with the process's peak RSS
(``ru_maxrss`` from ``wait4``, memory-mapped input pages included) and its peak private memory
(``RssAnon`` sampled from ``/proc/PID/status`` every 20 ms); each tool is started by a small launcher
process, so that its ``ru_maxrss`` does not begin at the RSS of this script (Linux carries the
spawning process's high-water mark over ``exec``). The inputs were just written, so they
sit in the page cache for every run: the timings are warm-cache timings, the same for every tool.
Before every run the script calls ``sync`` (untimed), so that no run pays for writing back data
that the model writer or an earlier run left dirty (on ext4 an ``fsync`` can wait for all of it);
the ``sync`` after a run is timed apart (``sync s``): what the tool left to write back. taskarith
fsyncs its output before it returns; mergekit does not, so part of its writing shows up there.

Every tensor of each tool's last output is compared with a float32 reference computed here, in
memory, independently of both libraries:

* task arithmetic: ``base + Σ_i (ft_i − base)``, deltas and sum in float32 (in order i = 0, 1, 2),
  rounded once to the model's dtype;
* TIES: per tensor, each delta keeps its ``k = floor(0.2 · n)`` largest magnitudes (equal magnitudes
  at the threshold: the lowest flat indices are kept), the sign of the exact sum of the trimmed
  deltas is elected (a zero sum elects +), and the non-zero trimmed entries with the elected sign are
  averaged (0 where there are none); ``base + mean`` in float32, rounded once to the model's dtype.

Reported per tool: the fraction of output entries that differ from the reference, the largest
absolute difference, and the largest difference in ulps (units in the last place of the larger of the
two values). mergekit computes in the config's ``dtype`` (the model's: bfloat16 by default), so some
of its entries differ: that is a measurement, not an error.

Why the configurations compute the same merge (mergekit's
``mergekit/merge_methods/generalized_task_arithmetic.py``, ``registry.py`` and ``sparsify.py``, read in
mergekit 0.1.5; docs/cli.md):

* ``merge_method: task_arithmetic`` with ``weight: 1.0`` per model and ``normalize: false`` (its
  default) returns ``base + Σ w_i (m_i − base)``, which is taskarith's ``task_arithmetic`` with
  weights 1 and ``scale=1``.
* ``merge_method: ties`` trims each tensor on its own (``sparsify`` runs per tensor: taskarith's
  ``scope="tensor"``), keeping the ``max(1, int(density · numel))`` largest magnitudes (taskarith's
  ``floor(density · n)`` for every tensor here; ``rescale`` defaults to false for ties, so the kept
  entries are not rescaled); it weights the trimmed deltas, elects per entry
  ``+1 if Σ_i w_i δ̃_i >= 0 else −1`` (``consensus_method: sum``: taskarith's ``sign="sum"``, a zero sum
  electing + in both), and builds the mask ``m_i = (sign(w_i δ̃_i) == elected)``, which is 0 for
  trimmed (zero) entries because their sign is 0. The merged delta is ``Σ w_i m_i δ̃_i``, divided,
  with ``normalize: true``, by ``Σ w_i m_i`` (a zero divisor replaced by 1). With every ``w_i = 1``
  the divisor is ``Σ m_i``, the number of non-zero trimmed entries that carry the elected sign, so
  mergekit's normalized sum is exactly taskarith's disjoint mean (and 0 where no entry agrees, as
  the numerator is then 0). With unequal weights it would be a weighted mean instead, which is why
  taskarith's CLI refuses that case. Two differences remain, neither in the semantics: mergekit
  chooses among equal magnitudes at the trim threshold with ``torch.argsort``/``topk`` (unspecified
  order; taskarith keeps the lowest indices), and it computes in the dtype of the loaded tensors
  (bfloat16 here: the deltas, the sum, the division and ``base + delta`` each round to bfloat16),
  where taskarith computes half-precision weights in float32 and rounds once.

Setup: mergekit lives in a virtual environment of its own::

    python3 -m venv /path/to/mkvenv && /path/to/mkvenv/bin/pip install mergekit

    python benchmarks/bench_mergekit.py --mergekit-python /path/to/mkvenv/bin/python
    python benchmarks/bench_mergekit.py --mergekit-python ... --params 100_000_000 --dtype float32
    python benchmarks/bench_mergekit.py --keep --workdir /tmp/mk   # keep the models and outputs

Without mergekit (no ``--mergekit-python`` and no ``mergekit-yaml`` on ``PATH``) only taskarith is
measured, with a note. Results go to ``benchmarks/results/mergekit-<host>.json``. Nothing here
asserts on timings: the goals (taskarith at least 2x faster than mergekit for task arithmetic, 5x
for TIES, outputs equal to the float32 reference) are evaluated from the measured numbers and printed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as bench  # sibling file: the scaffolding
import torch
from safetensors import safe_open

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DENSITY = 0.2
METHODS = ("task_arithmetic", "ties")
TOOLS = ("mergekit", "taskarith_api", "taskarith_cli")
LABELS = {"mergekit": "mergekit-yaml (CLI)", "taskarith_api": "taskarith merge_files", "taskarith_cli": "taskarith merge (CLI)"}
# mergekit's options: everything on the CPU, its defaults otherwise. --no-copy-tokenizer because the
# synthetic model has no tokenizer to copy; --lazy-unpickle only affects pickled (.bin) inputs.
MERGEKIT_OPTIONS = ["--no-copy-tokenizer", "--out-shard-size", "5B", "--lazy-unpickle"]


# ------------------------------------------------------------------ the model


def layers_for(params: int, hidden: int, intermediate: int, vocab: int) -> int:
    return max(1, round((params - 2 * vocab * hidden - hidden) / bench.llama_layer_params(hidden, intermediate)))


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype,
    }


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + p) % (1 << 62)
    return torch.Generator().manual_seed(seed)


def base_tensor(seed: int, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=_generator(seed, 0, index)) * 0.02).to(dtype)


def finetune_tensor(seed: int, source: int, index: int, base: torch.Tensor) -> torch.Tensor:
    """``base`` plus a seeded perturbation of size ~1e-3: a part shared by every fine-tune (so their signs
    agree more often than chance), a log-normal scale per row, and about half of the entries left at 0."""
    shape = tuple(base.shape)
    shared = torch.randn(shape, generator=_generator(seed, 1, index))
    g = _generator(seed, 2 + source, index)
    delta = torch.randn(shape, generator=g).add_(shared, alpha=0.7)
    del shared
    rows = torch.randn(shape[0], generator=g).mul_(0.5).exp_().mul_(1e-3)
    delta.mul_(rows.view(-1, *([1] * (len(shape) - 1))))
    delta.mul_(torch.rand(shape, generator=g) < 0.5)
    return delta.add_(base.float()).to(base.dtype)


def write_models(workdir: Path, shapes: dict, dtype: torch.dtype, config: dict, sources: int, seed: int,
                 shard_bytes: int) -> list[Path]:
    itemsize = torch.empty((), dtype=dtype).element_size()
    base_dir = workdir / "base"
    bench.write_checkpoint(base_dir, shapes, lambda i, n, s: base_tensor(seed, i, s, dtype), shard_bytes=shard_bytes,
                           itemsize=itemsize, config=config)
    base = Model(base_dir)
    dirs = []
    for source in range(sources):
        d = workdir / f"ft{source}"
        bench.write_checkpoint(d, shapes, lambda i, n, s, source=source: finetune_tensor(seed, source, i, base.tensor(n)),
                               shard_bytes=shard_bytes, itemsize=itemsize, config=config)
        dirs.append(d)
    base.close()
    return dirs


class Model:
    """Tensors of a safetensors model folder (sharded or not), read one at a time."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            weight_map = {}
            for file in sorted(directory.glob("*.safetensors")):
                with safe_open(file, framework="pt") as f:
                    weight_map.update({name: file.name for name in f.keys()})  # noqa: SIM118 - safe_open is not iterable
        self.directory, self.weight_map = directory, weight_map
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def tensor(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.directory / file, framework="pt")
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


# ------------------------------------------------------------------ configs


def mergekit_yaml(method: str, base: Path, sources: list[Path], dtype: str) -> str:
    """The mergekit config both mergekit-yaml and ``taskarith merge`` read (see the module docstring)."""
    params = f"{{weight: 1.0, density: {DENSITY}}}" if method == "ties" else "{weight: 1.0}"
    lines = ["models:"]
    for s in sources:
        lines += [f"  - model: {json.dumps(str(s))}", f"    parameters: {params}"]
    lines += [f"merge_method: {method}", f"base_model: {json.dumps(str(base))}", "parameters:",
              f"  normalize: {'true' if method == 'ties' else 'false'}", f"dtype: {dtype}", ""]
    return "\n".join(lines)


def taskarith_options(method: str) -> dict:
    return {"density": DENSITY, "scope": "tensor", "sign": "sum"} if method == "ties" else {}


# ------------------------------------------------------------------ measuring


def child_api(args) -> None:
    """The taskarith API measurement: one merge_files call; prints a JSON line with its time."""
    import taskarith as ta

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = json.loads(args.child_api)
    start = time.perf_counter()
    ta.merge_files(spec["base"], spec["sources"], spec["out"], spec["method"], max_memory=spec["max_memory"],
                   progress=False, **spec["options"])
    print(json.dumps({"seconds": time.perf_counter() - start}))


def find_mergekit(python: str | None) -> tuple[str | None, str | None, str]:
    """(python, mergekit-yaml) of mergekit's environment, or Nones and why."""
    if python:
        script = Path(python).parent / "mergekit-yaml"
        if not Path(python).exists():
            return None, None, f"--mergekit-python {python} does not exist"
        if not script.exists():
            return None, None, f"no mergekit-yaml beside {python} (pip install mergekit in that environment)"
        return python, str(script), ""
    script = shutil.which("mergekit-yaml")
    if script is None:
        return None, None, "mergekit not found: pass --mergekit-python /path/to/venv/bin/python (see the docstring)"
    sibling = Path(script).parent / "python"
    return (str(sibling) if sibling.exists() else None), script, ""


def mergekit_versions(python: str | None) -> dict:
    if python is None:
        return {}
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {'python': sys.version.split()[0]}\n"
            "for p in ('mergekit', 'torch', 'transformers', 'safetensors'):\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    done = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True, env=bench.child_env(offline=True, isolated=True))
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}


# ------------------------------------------------------------------ reference


def keep_top(magnitude: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Mask of the k largest of a flat tensor, equal values at the threshold going to the lowest indices.

    Also returns how many entries equal to the threshold were left out by that rule."""
    n = magnitude.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool), 0
    if k >= n:
        return torch.ones(n, dtype=torch.bool), 0
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    mask = magnitude > threshold
    slots = k - int(mask.sum())
    ties = magnitude == threshold
    tied = int(ties.sum())
    mask |= ties & (ties.cumsum(0) <= slots)
    return mask, tied - slots


def reference_task_arithmetic(base: torch.Tensor, fts: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    b = base.float()
    total = fts[0].float() - b
    for f in fts[1:]:
        total += f.float() - b
    return (b + total).to(base.dtype), 0


def reference_ties(base: torch.Tensor, fts: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    b = base.float().reshape(-1)
    trimmed, dropped_ties = [], 0
    for f in fts:
        delta = f.float().reshape(-1) - b
        mask, left_out = keep_top(delta.abs(), math.floor(DENSITY * delta.numel()))
        trimmed.append(delta * mask)
        dropped_ties += left_out
    exact = trimmed[0].double()
    for t in trimmed[1:]:
        exact += t.double()  # exact for three float32 values of these magnitudes
    elected = torch.where(exact >= 0, 1.0, -1.0).float()
    del exact
    kept = torch.zeros_like(b)
    count = torch.zeros_like(b)
    for t in trimmed:
        agree = (t != 0) & (torch.sign(t) == elected)
        kept += torch.where(agree, t, 0.0)
        count += agree
    mean = kept / count.clamp_min(1)
    return (b + mean).to(base.dtype).view(base.shape), dropped_ties


REFERENCES = {"task_arithmetic": reference_task_arithmetic, "ties": reference_ties}
PRECISION = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}


def compare(reference: torch.Tensor, output: torch.Tensor) -> dict:
    """Differing entries, the largest absolute difference, and the largest difference in ulps: units in the
    last place of the larger of the two magnitudes, in the reference's dtype (so a zero on one side counts
    the steps at the other's magnitude)."""
    ref, out = reference.reshape(-1), output.reshape(-1)
    differ = ref != out
    n = int(differ.sum())
    if n == 0:
        return {"differing": 0, "max_abs": 0.0, "max_ulps": 0.0, "over_1ulp": 0}
    r, o = ref[differ].double(), out[differ].double()
    diff = (o - r).abs()
    _, exponent = torch.frexp(torch.maximum(r.abs(), o.abs()))
    ulp = torch.ldexp(torch.ones_like(r), (exponent - PRECISION[reference.dtype]).double())
    ulps = diff / ulp.clamp_min(torch.finfo(reference.dtype).smallest_normal * 2.0 ** (1 - PRECISION[reference.dtype]))
    return {"differing": n, "max_abs": float(diff.max()), "max_ulps": float(ulps.max()), "over_1ulp": int((ulps > 1).sum())}


def check_outputs(method: str, base_dir: Path, source_dirs: list[Path], outputs: dict[str, Path]) -> dict:
    """Every tensor of every output against the reference of ``method``."""
    base = Model(base_dir)
    fts = [Model(d) for d in source_dirs]
    results = {}
    opened = {}
    for tool, directory in outputs.items():
        try:
            opened[tool] = Model(directory)
            missing = sorted(set(base.names()) - set(opened[tool].names()))
            extra = sorted(set(opened[tool].names()) - set(base.names()))
        except Exception as err:  # noqa: BLE001 - reported, not raised: one broken output must not hide the others
            results[tool] = {"error": f"cannot read the output: {err}"}
            continue
        results[tool] = {"entries": 0, "differing": 0, "max_abs": 0.0, "max_ulps": 0.0, "over_1ulp": 0,
                         "dtype_mismatches": [], "missing": missing[:20], "extra": extra[:20],
                         "worst_tensor": None}
    dropped_ties = 0
    for name in base.names():
        b = base.tensor(name)
        reference, left_out = REFERENCES[method](b, [m.tensor(name) for m in fts])
        dropped_ties += left_out
        for tool, model in opened.items():
            row = results[tool]
            if name not in model.weight_map:
                continue
            out = model.tensor(name)
            if out.dtype != reference.dtype:
                row["dtype_mismatches"].append(f"{name}: {out.dtype}")
                out = out.to(reference.dtype)
            stats = compare(reference, out)
            row["entries"] += reference.numel()
            row["differing"] += stats["differing"]
            row["over_1ulp"] += stats["over_1ulp"]
            if stats["max_abs"] > row["max_abs"]:
                row["worst_tensor"] = name
            row["max_abs"] = max(row["max_abs"], stats["max_abs"])
            row["max_ulps"] = max(row["max_ulps"], stats["max_ulps"])
            del out
    for row in results.values():
        if "entries" in row:
            row["fraction_differing"] = row["differing"] / max(row["entries"], 1)
            row["equal"] = row["differing"] == 0 and not row["missing"] and not row["dtype_mismatches"]
    return {"tools": results, "reference_trim_ties_left_out": dropped_ties if method == "ties" else None}


# ------------------------------------------------------------------ main


def _median(runs: list[dict], key: str) -> float | None:
    values = [x[key] for x in runs]
    return statistics.median(values) if values and None not in values else None


def main(argv=None) -> int:
    p = bench.Parser(__doc__, out="mergekit-{host}", repeats=(2,), seed=True, threads=False, dtypes=DTYPES,
                     dtype="bfloat16", full_doc=True)
    p.add_argument("--mergekit-python", default=None, help="python of mergekit's virtualenv (mergekit-yaml beside it)")
    p.add_argument("--params", type=int, default=None,
                   help="about this many parameters (sets the layer count; default 24 layers, ~374M)")
    p.add_argument("--layers", type=int, default=24, help="decoder layers (default 24; ignored with --params)")
    p.add_argument("--sources", type=int, default=3, help="fine-tuned models to merge (default 3)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: task_arithmetic,ties")
    p.add_argument("--max-memory", default="2GB", help="taskarith's max_memory (default 2GB, the CLI's default)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every tool (default: each tool's own)")
    p.add_argument("--skip-cli", action="store_true", help="leave out taskarith's CLI")
    p.add_argument("--shard-mb", type=int, default=512, help="input shard size in MB (default 512)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed (default 3600)")
    p.add_argument("--workdir", default=None, help="where to write models and outputs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (models, configs, outputs, logs)")
    p.add_argument("--child-api", default=None, help=argparse.SUPPRESS)
    args = p.parse(argv)
    if args.child_api:
        child_api(args)
        return 0

    import taskarith as ta

    hidden, intermediate, vocab = 1024, 2816, 32000
    layers = layers_for(args.params, hidden, intermediate, vocab) if args.params else args.layers
    shapes = bench.llama_shapes(layers, hidden, intermediate, vocab)
    params = sum(math.prod(s) for s in shapes.values())
    dtype = DTYPES[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    mk_python, mk_script, mk_note = find_mergekit(args.mergekit_python)
    tools = [t for t in TOOLS if (t != "mergekit" or mk_script) and (t != "taskarith_cli" or not args.skip_cli)]
    info, started = bench.begin()
    if mk_note:
        print(f"note: {mk_note}; measuring taskarith only")
    mk_versions = mergekit_versions(mk_python)
    if mk_script:
        print(f"mergekit {mk_versions.get('mergekit')} (torch {mk_versions.get('torch')}, transformers "
              f"{mk_versions.get('transformers')}) from {mk_script}")

    created = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="taskarith-mergekit-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_bytes = params * itemsize
    print(f"writing base + {args.sources} fine-tunes: {layers} layers, {params / 1e6:.0f}M parameters, "
          f"{ckpt_bytes / 1e9:.2f} GB each ({args.dtype}), to {workdir} ...")
    start = time.perf_counter()
    for d in ["base", *(f"ft{i}" for i in range(args.sources)), "out", "configs", "logs"]:
        if (workdir / d).exists():
            shutil.rmtree(workdir / d)
    config = llama_config(layers, hidden, intermediate, vocab, args.dtype)
    source_dirs = write_models(workdir, shapes, dtype, config, args.sources, args.seed, args.shard_mb * 10**6)
    base_dir = workdir / "base"
    setup_seconds = time.perf_counter() - start
    print(f"  done in {setup_seconds:.1f} s")
    (workdir / "configs").mkdir()
    (workdir / "logs").mkdir()

    env_ta = bench.child_env(args.threads, offline=True)
    env_mk = bench.child_env(args.threads, offline=True, isolated=True)
    startup = {}
    if mk_script:
        startup["mergekit"] = bench.run_measured([mk_script, "--help"], env_mk, workdir / "logs" / "mergekit-help.log",
                                                 300)["wall_seconds"]
    startup["taskarith_cli"] = bench.run_measured([sys.executable, "-m", "taskarith", "merge", "--help"], env_ta,
                                            workdir / "logs" / "taskarith-help.log", 300)["wall_seconds"]

    def command(tool: str, method: str, cfg: Path, out: Path) -> tuple[list[str], dict]:
        if tool == "mergekit":
            return [mk_script, str(cfg), str(out), *MERGEKIT_OPTIONS], env_mk
        if tool == "taskarith_cli":
            return [sys.executable, "-m", "taskarith", "merge", str(cfg), "-o", str(out), "--no-progress",
                    "--max-memory", str(args.max_memory)], env_ta
        spec = {"base": str(base_dir), "sources": [str(s) for s in source_dirs], "out": str(out), "method": method,
                "max_memory": args.max_memory, "options": taskarith_options(method)}
        cmd = [sys.executable, __file__, "--child-api", json.dumps(spec)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        return cmd, env_ta

    rows, checks, failures = [], {}, []
    for method in methods:
        cfg = workdir / "configs" / f"{method}.yml"
        cfg.write_text(mergekit_yaml(method, base_dir, source_dirs, args.dtype))
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        print(f"\n{method}: {len(tools)} tools x {args.repeats} runs (progress; the table follows)")
        for r in range(args.repeats):
            for tool in (tools if r % 2 == 0 else tools[::-1]):
                out = workdir / "out" / method / tool
                if out.exists():
                    shutil.rmtree(out)
                out.parent.mkdir(parents=True, exist_ok=True)
                cmd, env = command(tool, method, cfg, out)
                result = bench.run_measured(cmd, env, workdir / "logs" / f"{method}-{tool}-{r}.log", args.timeout)
                runs[tool].append(result)
                status = "" if result["returncode"] == 0 else f"  FAILED (exit {result['returncode']})"
                print(f"  {tool:<15} run {r + 1}: {result['wall_seconds']:8.2f} s  CPU {result['cpu_seconds']:7.1f} s  "
                      f"others' CPU {result['other_cpu_seconds']:6.1f} s  peak RSS {bench.gib(result['maxrss_bytes'], '-')} GiB{status}",
                      flush=True)
                if result["returncode"]:
                    failures.append(f"{method} {tool} run {r + 1}: exit {result['returncode']}")
                    print(result["log_tail"])
        for tool in tools:
            ok = [x for x in runs[tool] if x["returncode"] == 0]
            medians = {key: _median(ok, key) for key in
                       ("wall_seconds", "in_process_seconds", "sync_after_seconds", "cpu_seconds",
                        "other_cpu_seconds", "maxrss_bytes", "peak_rss_anon_bytes")}
            rows.append({"method": method, "tool": tool, "label": LABELS[tool],
                         "command": command(tool, method, cfg, workdir / "out" / method / tool)[0],
                         **{f"median_{key}": value for key, value in medians.items()},
                         "runs": runs[tool], "ok": len(ok) == len(runs[tool])})
        print("  checking every tensor against the float32 reference ...", flush=True)
        start = time.perf_counter()
        outputs = {t: workdir / "out" / method / t for t in tools if runs[t] and runs[t][-1]["returncode"] == 0}
        checks[method] = check_outputs(method, base_dir, source_dirs, outputs)
        checks[method]["seconds"] = time.perf_counter() - start
        if not args.keep:
            shutil.rmtree(workdir / "out" / method, ignore_errors=True)

    # ---- table, speedups, goals
    print(f"\n{params / 1e6:.0f}M parameters ({args.dtype}), base + {args.sources} fine-tunes; wall time of the whole "
          f"process, median of {args.repeats}")
    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    print(bench.table(["method", "tool", "median s", "runs s", "in-proc s", "CPU s", "sync s", "peak RSS GiB",
                       "private GiB"],
                      [[r["method"], LABELS[r["tool"]], fmt(r["median_wall_seconds"]) if r["median_wall_seconds"]
                        else "failed", " ".join(f"{x['wall_seconds']:.1f}" for x in r["runs"]),
                        fmt(r["median_in_process_seconds"]), fmt(r["median_cpu_seconds"], ".1f"),
                        fmt(r["median_sync_after_seconds"]), bench.gib(r["median_maxrss_bytes"], "-"),
                        bench.gib(r["median_peak_rss_anon_bytes"], "-")] for r in rows], "llrrrrrrr"))
    busy = [f"{r['method']} {r['tool']} run {i + 1} ({x['other_cpu_seconds']:.0f} s)" for r in rows
            for i, x in enumerate(r["runs"]) if x["other_cpu_seconds"] > 0.1 * x["wall_seconds"]]
    if busy:
        print("note: other programs used the CPU during " + ", ".join(busy) + "; those runs are slower than they "
              "would be on an idle machine")
    print("process start-up alone ('--help'): " + ", ".join(f"{t} {s:.2f} s" for t, s in startup.items()))

    speedups = {}
    by = {(r["method"], r["tool"]): r for r in rows}
    for method in methods:
        mk = by.get((method, "mergekit"))
        for tool in ("taskarith_api", "taskarith_cli"):
            mine = by.get((method, tool))
            if mk and mine and mk["median_wall_seconds"] and mine["median_wall_seconds"]:
                speedups[f"{method}/{tool}"] = mk["median_wall_seconds"] / mine["median_wall_seconds"]
    if speedups:
        print("\nspeedup over mergekit (mergekit's median wall time / taskarith's):")
        for key, value in speedups.items():
            print(f"  {key:<32}{value:6.2f}x")

    print("\nagreement with the float32 reference (every entry of every tensor):")
    agreement = []
    for method, check in checks.items():
        for tool, row in check["tools"].items():
            if "error" in row:
                agreement.append([method, LABELS[tool], row["error"], "", "", "", ""])
                continue
            agreement.append([method, LABELS[tool], f"{row['differing']:,}", f"{row['fraction_differing']:.2e}",
                              f"{row['max_abs']:.3g}", f"{row['max_ulps']:.3g}", f"{row['over_1ulp']:,}"
                              + ("" if not (row["missing"] or row["dtype_mismatches"])
                                 else "  (missing tensors or other dtypes)")])
    print(bench.table(["method", "tool", "differing", "fraction", "max |diff|", "max ulps", "> 1 ulp"], agreement,
                      "llrrrrr"))
    for method, check in checks.items():
        if check["reference_trim_ties_left_out"] is not None:
            print(f"  ({method}: {check['reference_trim_ties_left_out']:,} entries equal to a trim threshold were left out "
                  f"by the lowest-index rule; a tool breaking those ties otherwise keeps others)")

    goals = []
    for method, factor in (("task_arithmetic", 2.0), ("ties", 5.0)):
        for tool in ("taskarith_api", "taskarith_cli"):
            key = f"{method}/{tool}"
            if method not in methods or tool not in tools:
                continue
            value = speedups.get(key)
            goals.append({"goal": f"{LABELS[tool]} at least {factor:g}x faster than mergekit, {method}",
                          "status": "not measured" if value is None else ("met" if value >= factor else "not met"),
                          "value": value})
    for method, check in checks.items():
        for tool in ("taskarith_api", "taskarith_cli"):
            row = check["tools"].get(tool)
            if row is None:
                continue
            equal = row.get("equal", False)
            goals.append({"goal": f"{LABELS[tool]} output equal to the float32 reference, {method}",
                          "status": "met" if equal else "not met", "value": row.get("fraction_differing")})
    print("\ngoals:")
    for g in goals:
        value = g["value"]
        shown = "" if value is None else (f" ({value:.2f}x)" if "faster" in g["goal"] else f" (fraction differing {value:.2e})")
        print(f"  {g['status']:<13}{g['goal']}{shown}")

    yamls = {m: mergekit_yaml(m, Path("BASE"), [Path(f"FT{i}") for i in range(args.sources)], args.dtype)
             for m in methods}
    print()
    bench.save(args.out, bench.result(
        "mergekit", info, started,
        versions={"taskarith": ta.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
                  "mergekit_env": mk_versions},
        mergekit={"script": mk_script, "python": mk_python, "options": MERGEKIT_OPTIONS, "note": mk_note or None},
        config={"params": params, "layers": layers, "hidden": hidden, "intermediate": intermediate, "vocab": vocab,
                "dtype": args.dtype, "sources": args.sources, "checkpoint_bytes": ckpt_bytes, "density": DENSITY,
                "methods": methods, "repeats": args.repeats, "taskarith_max_memory": args.max_memory,
                "threads": args.threads, "input_shard_bytes": args.shard_mb * 10**6, "seed": args.seed,
                "mergekit_configs": yamls, "taskarith_options": {m: taskarith_options(m) for m in methods}},
        setup_seconds=setup_seconds, startup_seconds=startup, rows=rows, speedups=speedups, agreement=checks,
        goals=goals, failures=failures))
    if args.keep:
        print(f"kept {workdir}")
    elif created:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        for d in ["base", *(f"ft{i}" for i in range(args.sources)), "out"]:
            shutil.rmtree(workdir / d, ignore_errors=True)
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
