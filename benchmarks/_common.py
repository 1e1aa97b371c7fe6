"""Scaffolding shared by the benchmark scripts, so that each script holds only what it measures.

* **machine**: :func:`machine_info` (CPU, caches, RAM, OS, versions, threads, CUDA device, load) and
  :func:`describe`, recorded in every result file so that it can be read on its own;
* **command line**: :class:`Parser`, the options the scripts share (``--params``, ``--repeats``,
  ``--quick``, ``--device``, ``--threads``, ``--seed``, ``--shapes``/``--tensors``, ``--dtype``, ``--out``);
* **timing**: :class:`Timer` (one warm-up call, then timed calls written as a user's loop),
  :func:`timing_row` (median, best, GB/s), :class:`BandwidthProbe` (``dst.copy_(src)`` or ``a.add_(b)``
  over flat buffers);
* **inputs**: the synthetic shapes (:func:`transformer_shapes`, :func:`lora_shapes`, :func:`llama_shapes`),
  random states, flat views and sharded safetensors checkpoints (:func:`write_checkpoint`);
* **memory**: :func:`peak_rss`, :func:`proc_bytes` (``/proc`` fields), :class:`PeakSampler`;
* **processes**: :func:`child_env`, :func:`json_child`, :func:`tee`, :func:`run_measured` (a tool started
  through a small launcher, its wall and CPU time, ``ru_maxrss`` and sampled private memory);
* **output**: :func:`table` (console), :func:`md_table`, :func:`result` and :func:`write_json`.

Only the standard library is imported at module level (torch, numpy and taskarith inside the functions
that need them), so the launcher of :func:`run_measured` stays small. taskarith is used through its public
names only; the one private module read here (whether the Numba kernels are on) is imported in
:func:`numba_version`, with a fallback for when it moves.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
M = 1_000_000
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


def _try(fn: Callable, default=None):
    """``fn()``, or ``default`` where the platform cannot tell (a file or call missing, an odd format)."""
    try:
        return fn()
    except (OSError, ValueError, IndexError, AttributeError):
        return default


def _read(path: str) -> str | None:
    return _try(lambda: Path(path).read_text(encoding="utf-8", errors="replace").strip())


def proc_bytes(field: str, path: str = "/proc/self/status") -> int | None:
    """A ``Field:  N kB`` line of ``/proc/<pid>/status`` or ``/proc/meminfo`` in bytes (None if unknown):
    ``VmRSS``, ``VmHWM``, ``RssAnon``, ``MemTotal``, ``MemAvailable``..."""
    lines = (_read(path) or "").splitlines()
    return next((_try(lambda x=x: int(x.split()[1]) * 1024) for x in lines if x.startswith(field + ":")), None)


def available_memory() -> int | None:
    """Bytes of RAM available to a new process (MemAvailable), or None if unknown."""
    return proc_bytes("MemAvailable", "/proc/meminfo")


def load_average() -> list[float] | None:
    return _try(lambda: list(os.getloadavg()))


def _cpu_model() -> str | None:
    """The CPU model string from /proc/cpuinfo (x86 "model name", or the ARM equivalents)."""
    fields: dict[str, str] = {}
    for key, sep, value in (line.partition(":") for line in (_read("/proc/cpuinfo") or "").splitlines()):
        if sep:
            fields.setdefault(key.strip(), value.strip())
    keys = ("model name", "Model", "Hardware", "cpu model", "Processor")
    return next((fields[k] for k in keys if fields.get(k)), None) or platform.processor() or None


def _cpu_caches() -> dict[str, int]:
    """Data/unified cache sizes of CPU 0 by level, e.g. {"L1d": 49152, "L2": 2097152, "L3": 272629760}."""
    units, root, caches = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}, "/sys/devices/system/cpu/cpu0/cache", {}
    for entry in sorted(e for e in _try(lambda: os.listdir(root), []) if e.startswith("index")):
        level, kind, text = (_read(f"{root}/{entry}/{f}") or "" for f in ("level", "type", "size"))
        size = _try(lambda t=text: int(t[:-1]) * units[t[-1]] if t[-1:] in units else int(t), 0)
        if level and size and kind in ("Data", "Unified"):
            caches[f"L{level}" + ("d" if kind == "Data" else "")] = size
    return caches


def _taskarith_runtime(name: str):
    """``taskarith.runtime.<name>`` (caches, threads, backend), or the top-level name of earlier releases."""
    import taskarith as ta

    owners = (getattr(ta, "runtime", None), ta)
    return next((getattr(o, name) for o in owners if o is not None and callable(getattr(o, name, None))), None)


def cache_info() -> dict | None:
    """taskarith's buffer cache (``buffers``, ``bytes``, ``limit``), None where this release has none."""
    fn = _taskarith_runtime("cache_info")
    return dict(fn()) if fn else None


def numba_version() -> str | None:
    """Numba's version when taskarith uses its compiled kernels, else None (the torch path).

    The one place the benchmarks read a private taskarith module; if it moves, the answer falls back
    to the public backend switch (``taskarith.runtime.backend()``) and whether Numba imports.
    """
    try:
        import taskarith  # noqa: F401
    except ImportError:  # a peer's environment, without taskarith
        return None
    try:
        from taskarith.backends import _numba  # private: whether the kernels are on (installed, allowed)

        on = bool(_numba.enabled())
    except Exception:  # noqa: BLE001 - moved or changed: ask the public switch
        backend = _taskarith_runtime("backend")
        on = backend is not None and backend() in ("auto", "numba")
    try:
        import numba
    except ImportError:
        return None
    return numba.__version__ if on else None


def machine_info() -> dict:
    """CPU, cores, RAM, OS, Python, library versions, torch threads and CUDA device, as a JSON-able dict.
    Everything is best effort: a field that cannot be read is ``None``."""
    import numpy as np
    import torch

    cuda = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        cuda = {"name": props.name, "memory_bytes": int(props.total_memory),
                "capability": f"{props.major}.{props.minor}", "cuda_version": torch.version.cuda,
                "device_count": torch.cuda.device_count()}
    return {
        "hostname": socket.gethostname(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
        "usable_cores": _try(lambda: len(os.sched_getaffinity(0))) or os.cpu_count(),
        "cpu_caches_bytes": _cpu_caches(),
        "ram_bytes": proc_bytes("MemTotal", "/proc/meminfo")
                     or _try(lambda: os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        "os": platform.platform(), "machine": platform.machine(), "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(), "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": numba_version(),  # None: taskarith's compiled CPU kernels are off (torch path)
        "torch_threads": torch.get_num_threads(), "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "load_average": load_average(), "cuda": cuda,
    }


def describe(info: dict) -> str:
    """One line for a console header."""
    ram = info.get("ram_bytes")
    ram_text = f"{ram / 2**30:.0f} GiB RAM" if ram else "RAM unknown"
    cuda = info.get("cuda")
    gpu = f", GPU {cuda['name']}" if cuda else ""
    numba = f", numba kernels {info['numba'] or 'off'}" if "numba" in info else ""  # absent: recorded before
    return (
        f"{info.get('cpu_model') or 'unknown CPU'}, {info.get('usable_cores')} usable cores "
        f"({info.get('torch_threads')} torch threads), {ram_text}{gpu}; "
        f"Python {info.get('python')}, torch {info.get('torch')}, numpy {info.get('numpy')}"
        f"{numba}; {info.get('os')}"
    )


def is_busy(info: dict) -> bool:
    load = info.get("load_average")
    return bool(load) and load[0] > 0.25 * (info.get("usable_cores") or 1)


def begin() -> tuple[dict, str]:
    """The machine and the start time of a run; prints the machine, and a note when it is not idle."""
    info = machine_info()
    print(f"machine: {describe(info)}")
    if is_busy(info):
        print(f"note: the machine is not idle (1-minute load average {info['load_average'][0]:.2f}, above a "
              "quarter of its cores); timings will be noisy")
    return info, now_utc()


def cache_note(machine: dict, nbytes: int, what: str) -> None:
    """Warn when ``nbytes`` fit in the CPU's last-level cache (then a run measures cache, not memory)."""
    last_level = max((machine.get("cpu_caches_bytes") or {}).values(), default=0)
    if nbytes <= last_level:
        print(f"note: {what} ({nbytes / 2**20:,.0f} MiB) fit in the CPU's last-level cache "
              f"({last_level / 2**20:,.0f} MiB): this measures cache, not memory, bandwidth; raise --params")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "unknown"


class Parser(argparse.ArgumentParser):
    """An argument parser with the options the scripts share, chosen by keyword; :meth:`parse` fills the
    ``--quick`` defaults, checks the values, sets torch's threads and the default ``--out``.

    ``out``: the default result name, formatted with ``host`` and the arguments (``"vector_ops-{host}-{device}"``
    becomes ``benchmarks/results/vector_ops-myhost-cpu.json``); ``params``/``repeats``: ``(default, with
    --quick)``; ``quick``: the help of ``--quick`` (the option exists when this or a quick default is given).
    """

    def __init__(self, doc: str, *, out: str, params: tuple | None = None, params_help: str = "parameters per vector",
                 repeats: tuple | None = None, quick: str | None = None, device: bool = False, threads: bool = True,
                 seed: bool = False, shapes: bool = False, dtypes: Mapping | None = None, dtype: str = "float32",
                 full_doc: bool = False):
        first = doc.strip().split("\n\n")[0].replace("\n", " ")
        super().__init__(description=doc if full_doc else first,
                         formatter_class=argparse.RawDescriptionHelpFormatter if full_doc else argparse.HelpFormatter)
        self.bench = {"out": out, "params": params, "repeats": repeats, "device": device}
        if params:
            self.add_argument("--params", type=int, default=None, help=f"{params_help} (default {params[0]:_}"
                              + (f"; {params[1]:_} with --quick)" if len(params) > 1 else ")"))
        if shapes:
            self.add_argument("--shapes", choices=SHAPES, default="transformer",
                              help="transformer: ~--tensors tensors shaped like a decoder transformer (a few large "
                                   f"ones); lora: pairs of rank-{LORA_RANK} LoRA A [r, d] / B [d, r] matrices "
                                   "(thousands of small tensors at 10M) (default transformer)")
            self.add_argument("--tensors", type=int, default=300,
                              help="approximate number of tensors per vector (default 300; transformer shapes only)")
        if dtypes:
            self.add_argument("--dtype", choices=sorted(dtypes), default=dtype, help=f"dtype (default {dtype})")
        if repeats:
            self.add_argument("--repeats", type=int, default=None, help=f"timed calls per measurement (default "
                              f"{repeats[0]}" + (f"; {repeats[1]} with --quick)" if len(repeats) > 1 else ")"))
        if device:
            self.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device (default cpu)")
        if threads:
            self.add_argument("--threads", type=int, default=None,
                              help="torch.set_num_threads(N) before measuring (default: torch's)")
        if seed:
            self.add_argument("--seed", type=int, default=0, help="seed of the random values (default 0)")
        self.add_argument("--out", type=Path, default=None,
                          help=f"JSON results path (default benchmarks/results/{out}.json)".replace("{", "<")
                          .replace("}", ">"))
        if quick or (params and len(params) > 1) or (repeats and len(repeats) > 1):
            self.add_argument("--quick", action="store_true", help=quick or "a short run (explicit flags win)")

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        args = self.parse_args(argv)
        quick = getattr(args, "quick", False)
        for name in ("params", "repeats"):
            spec = self.bench[name]
            if spec and getattr(args, name) is None:
                setattr(args, name, spec[1] if quick and len(spec) > 1 else spec[0])
        for name, least in (("params", 1000), ("repeats", 1), ("threads", 1), ("tensors", 1)):
            value = getattr(args, name, None)
            if value is not None and value < least:
                self.error(f"--{name} must be at least {least}")
        if self.bench["device"] and args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                self.error("--device cuda: no CUDA device is available to torch")
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        if args.out is None:
            args.out = RESULTS / (self.bench["out"].format(host=host(), **vars(args)) + ".json")
        return args


# ---------------------------------------------------------------------------------------------
# Timing and the bandwidth probe
# ---------------------------------------------------------------------------------------------


def sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class Timer:
    """One untimed warm-up call, then ``repeats`` calls timed with ``time.perf_counter`` (on CUDA, after a
    synchronize). The calls are written as a user's loop, ``result = fn()``: the previous result stays alive
    until the new one is assigned, so memory is allocated and released as in real code (``keep=False``: each
    result is dropped as soon as the call returns). ``before()`` and ``after(result)`` run around every timed
    call, untimed (a peak-memory reset, a hash of the output)."""

    def __init__(self, repeats: int, device="cpu", keep: bool = True):
        self.repeats, self.device, self.keep = repeats, device, keep

    def run(self, fn: Callable[[], object], before: Callable[[], object] | None = None,
            after: Callable[[object], object] | None = None) -> tuple[object, float, list[float]]:
        """Returns (last result, warm-up seconds, timed seconds)."""
        gc.collect()
        sync(self.device)
        t0 = time.perf_counter()
        result = fn()
        sync(self.device)
        warmup = time.perf_counter() - t0
        if after is not None:
            after(result)
        times = []
        for _ in range(self.repeats):
            if before is not None:
                before()
            t0 = time.perf_counter()
            if not self.keep:
                result = None
            result = fn()  # the previous result lives until this assignment, as in a user's loop
            sync(self.device)
            times.append(time.perf_counter() - t0)
            if after is not None:
                after(result)
        return result, warmup, times


def timing_row(op: str, impl: str, expr: str, min_bytes: int, warmup: float, times: list[float]) -> dict:
    """A result row: the timed calls, their median and best, and the effective bandwidth (min_bytes / time)."""
    median = statistics.median(times)
    return {"op": op, "impl": impl, "expr": expr, "min_bytes": min_bytes, "warmup_ms": warmup * 1e3,
            "times_ms": [t * 1e3 for t in times], "median_ms": median * 1e3, "best_ms": min(times) * 1e3,
            "gbps": min_bytes / median / 1e9, "gbps_best": min_bytes / min(times) / 1e9}


PROBES = {"copy": ("dst.copy_(src)", 2), "add": ("a.add_(b)", 3)}  # expression, buffers' bytes moved per call


class BandwidthProbe:
    """The bandwidth reference: ``dst.copy_(src)`` (moves 2 buffers' bytes) or ``a.add_(b)`` (3) over flat,
    preallocated, already-faulted buffers; each :meth:`measure` times it once more with a :class:`Timer`."""

    def __init__(self, kind: str, a, b):
        self.kind, (self.expr, self.passes) = kind, PROBES[kind]
        self.a, self.b = a, b
        self.a.copy_(self.b)  # fault the pages in now
        self.bytes = self.passes * a.numel() * a.element_size()
        self.rows: list[dict] = []

    @classmethod
    def alloc(cls, kind: str, numel: int, dtype=None, device="cpu") -> BandwidthProbe:
        import torch

        b = torch.randn(numel, dtype=dtype or torch.float32, device=device).mul_(0.01)
        return cls(kind, torch.empty_like(b), b)

    def measure(self, timer: Timer, impl: str | None = None) -> dict:
        fn = (lambda: self.a.copy_(self.b)) if self.kind == "copy" else (lambda: self.a.add_(self.b))
        _, warmup, times = timer.run(fn)
        row = timing_row(self.kind, impl or f"probe: {self.expr}", f"{self.expr}  # one flat preallocated buffer",
                         self.bytes, warmup, times)
        self.rows.append(row)
        return row

    @property
    def pooled_gbps(self) -> float:
        """Bytes / the median of every timed call of every measurement."""
        return self.bytes / (statistics.median(t for r in self.rows for t in r["times_ms"]) / 1e3) / 1e9

    @property
    def best_gbps(self) -> float:
        """The best measurement's bytes / median time."""
        return max(r["gbps"] for r in self.rows)


# ---------------------------------------------------------------------------------------------
# Inputs: synthetic shapes, states and checkpoints
# ---------------------------------------------------------------------------------------------

SHAPES = ("transformer", "lora")
LORA_RANK = 16
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_WIDTHS = (128, 256, 512)


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

    layer = [("norm1.weight", (d,)), ("norm1.bias", (d,))]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layer += [(f"attn.{proj}.weight", (d, d)), (f"attn.{proj}.bias", (d,))]
    layer += [("norm2.weight", (d,)), ("norm2.bias", (d,)), ("mlp.fc1.weight", (4 * d, d)), ("mlp.fc1.bias", (4 * d,)),
              ("mlp.fc2.weight", (d, 4 * d)), ("mlp.fc2.bias", (d,))]
    body = {f"layers.{i}.{name}": shape for i in range(layers) for name, shape in layer}
    for j in range(extra):
        body[f"layers.{j % layers}.attn.head_gate.{j // layers}"] = (heads,)
    tail = {"final_norm.weight": (d,), "final_norm.bias": (d,)}
    fixed = sum(math.prod(s) for s in (*body.values(), *tail.values())) + positions * d + 1
    vocab = max(1, (params - fixed) // (2 * d))  # token embedding and output head
    return {"embed.tokens.weight": (vocab, d), "embed.positions.weight": (positions, d), **body, **tail,
            "lm_head.weight": (vocab, d), "logit_scale": ()}


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

    while total + 2 * rank * LORA_WIDTHS[j % len(LORA_WIDTHS)] <= params:
        add(LORA_WIDTHS[j % len(LORA_WIDTHS)])
    rest = (params - total) // (2 * rank)
    if rest >= 1:
        add(rest)
    if not shapes:  # fewer than 2 * rank entries asked for: one pair of rank 1
        shapes["layers.0.q_proj.lora_A.weight"] = (1, params // 2 or 1)
        shapes["layers.0.q_proj.lora_B.weight"] = (params // 2 or 1, 1)
    return shapes


def model_shapes(kind: str, params: int, tensors: int = 300) -> dict[str, tuple[int, ...]]:
    """The shapes of ``--shapes kind``: ``transformer_shapes(params, tensors)`` or ``lora_shapes(params)``."""
    if kind == "transformer":
        return transformer_shapes(params, tensors)
    if kind == "lora":
        return lora_shapes(params)
    raise ValueError(f"unknown shapes {kind!r}; choose from {', '.join(SHAPES)}")


def shapes_config(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """How many tensors, of which ranks, and the largest: for a result file's ``config``."""
    by_rank: dict[str, int] = {}
    for shape in shapes.values():
        by_rank[f"{len(shape)}-D"] = by_rank.get(f"{len(shape)}-D", 0) + 1
    return {"tensors": len(shapes), "tensors_by_rank": by_rank,
            "largest_tensor": max(math.prod(s) for s in shapes.values())}


def llama_shapes(layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama model as Hugging Face names them (untied output head)."""
    layer = [*((f"self_attn.{p}_proj.weight", (hidden, hidden)) for p in "qkvo"),
             ("mlp.gate_proj.weight", (intermediate, hidden)), ("mlp.up_proj.weight", (intermediate, hidden)),
             ("mlp.down_proj.weight", (hidden, intermediate)), ("input_layernorm.weight", (hidden,)),
             ("post_attention_layernorm.weight", (hidden,))]
    return {"model.embed_tokens.weight": (vocab, hidden),
            **{f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in layer},
            "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def llama_layer_params(hidden: int, intermediate: int) -> int:
    return 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden


def make_state(shapes: Mapping[str, tuple[int, ...]], dtype=None, device="cpu", generator=None,
               scale: float = 0.01) -> dict:
    """Independently allocated tensors (as a state_dict holds them) of small random values."""
    import torch

    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=generator, dtype=dtype or torch.float32)
        t.mul_(scale)
        out[name] = t.to(device)
    return out


def flat(state: Mapping) -> object:
    import torch

    return torch.cat([t.reshape(-1) for t in state.values()])


def flat_views(buffer, shapes: Mapping[str, tuple[int, ...]]) -> dict:
    views, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        views[name] = buffer[offset:offset + n].view(shape)
        offset += n
    return views


def write_checkpoint(directory: Path, shapes: Mapping[str, tuple[int, ...]], make: Callable, *, shard_bytes: int,
                     itemsize: int, config: dict | None = None) -> None:
    """A sharded Hugging Face folder (``model-0000k-of-0000n.safetensors`` and the index) whose tensors come from
    ``make(index, name, shape)``, called in ``shapes`` order, one shard held in memory at a time."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    index_of = {name: i for i, name in enumerate(shapes)}
    weight_map, total = {}, 0
    for number, group in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        state = {name: make(index_of[name], name, shapes[name]) for name in group}
        total += sum(t.numel() * t.element_size() for t in state.values())
        save_file(state, directory / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in group})
        del state
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def peak_rss() -> int | None:
    """The process's peak resident memory (``ru_maxrss``, a high-water mark over its whole life), in bytes."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> int | None:
    """Reset Linux's VmHWM to the current VmRSS (``/proc/self/clear_refs``); returns VmRSS, None if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return None
    return proc_bytes("VmRSS")


class PeakSampler:
    """A thread that reads ``fields`` of ``/proc/<pid>/status`` every ``interval`` seconds, from :meth:`start`
    to :meth:`stop`, and keeps their peaks (bytes) in ``self.peak``."""

    def __init__(self, pid: int | str = "self", fields: tuple[str, ...] = ("RssAnon",), interval: float = 0.02):
        self.path, self.fields, self.interval = f"/proc/{pid}/status", fields, interval
        self.peak = dict.fromkeys(fields, 0)
        self.baseline = self.sample()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> dict[str, int]:
        values = {f: proc_bytes(f, self.path) or 0 for f in self.fields}
        for f, v in values.items():
            self.peak[f] = max(self.peak[f], v)
        return values

    def _loop(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def start(self) -> PeakSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        if self.path == "/proc/self/status":
            self.sample()


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def child_env(threads: int | None = None, *, offline: bool = False, isolated: bool = False) -> dict[str, str]:
    """The environment of a child process: the repository root and this folder importable (so a plain checkout
    works), or, ``isolated``, no ``PYTHONPATH``/``VIRTUAL_ENV`` at all (a tool from another environment);
    ``offline``: no Hugging Face downloads; ``threads``: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``."""
    env = dict(os.environ)
    if isolated:
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
    else:
        parts = [str(ROOT), str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    if offline:
        env.update(OFFLINE)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def last_json(text: str, key: str | None = None) -> dict | None:
    """The last line of ``text`` that is a JSON object (holding ``key``, if given)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if key is None or key in data:
                return data
    return None


def json_child(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``cmd`` (its stderr passes through) and return the JSON object on the last line of its stdout."""
    done = subprocess.run(cmd, env=env or child_env(), stdout=subprocess.PIPE, text=True, timeout=timeout,
                          check=False)
    data = last_json(done.stdout)
    if done.returncode or data is None:
        raise RuntimeError(f"{shlex.join(cmd[:4])} ... failed with status {done.returncode}: {done.stdout[-2000:]}")
    return data


def tee(cmd: list[str], log_path: Path, prefix: str = "    ") -> tuple[int, float]:
    """Run ``cmd`` from the repository root, echoing its output and keeping a copy in ``log_path``;
    returns (exit status, seconds)."""
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()
            log.write(line)
        status = proc.wait()
    return status, time.perf_counter() - t0


def _cpu_times() -> tuple[float, float]:
    """Busy and steal CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK")
    return sum(ticks[i] for i in (0, 1, 2, 5, 6)) / hz, ticks[7] / hz


def launch() -> None:
    """The launcher of :func:`run_measured` (``sys.argv[1]``: its JSON spec): ``sync``, run the command with a
    deadline, sample its private memory, ``wait4`` for its usage, time a ``sync`` after; print a JSON line."""
    spec = json.loads(sys.argv[1])
    os.sync()
    load = os.getloadavg()[0]
    busy0, steal0 = _cpu_times()
    with open(spec["log"], "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(spec["cmd"], stdout=out, stderr=subprocess.STDOUT, env=spec["env"], cwd=spec["cwd"])
        timed_out = False
        sampler = PeakSampler(proc.pid, ("RssAnon", "VmRSS"), 0.02).start()
        while True:  # wait4 with a deadline: a hung tool cannot hang the benchmark
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > spec["timeout"]:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.01)
        wall = time.perf_counter() - start
        sampler.stop()
    busy1, steal1 = _cpu_times()
    cpu = usage.ru_utime + usage.ru_stime
    synced = time.perf_counter()
    os.sync()
    print(json.dumps({"wall_seconds": wall, "sync_after_seconds": time.perf_counter() - synced,
                      "returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
                      "cpu_seconds": cpu, "other_cpu_seconds": max(0.0, busy1 - busy0 - cpu),
                      "steal_seconds": steal1 - steal0, "maxrss_bytes": usage.ru_maxrss * 1024,
                      "peak_rss_anon_bytes": sampler.peak["RssAnon"], "peak_vmrss_sampled_bytes": sampler.peak["VmRSS"],
                      "load_average_before": load}))


def run_measured(cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run ``cmd`` to completion through a small launcher process (standard library only: Linux starts a
    process's ``ru_maxrss`` at the RSS of the process that spawned it, so a tool started from a benchmark
    holding torch would inherit its high-water mark): wall and CPU time, ru_maxrss (wait4), sampled peak
    RssAnon / VmRSS, the 1-minute load average just before, the CPU time the rest of the machine used
    meanwhile (busy CPU time in /proc/stat minus the tool's) and the VM's steal time.

    ``sync`` runs first (untimed), so that the run does not pay for writing back data another process left
    dirty, and again after it (timed apart): what the tool left unwritten. ``in_process_seconds``: the
    ``"seconds"`` of the last JSON line of the tool's output, if it prints one."""
    spec = {"cmd": cmd, "env": env, "cwd": str(ROOT), "log": str(log), "timeout": timeout}
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import _common; _common.launch()"
    launched = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], check=False, capture_output=True,
                              text=True)
    result = last_json(launched.stdout, "wall_seconds")
    if launched.returncode or result is None:
        raise RuntimeError(f"the launcher failed: {launched.stderr[-2000:]}")
    text = log.read_text(errors="replace")
    result["in_process_seconds"] = (last_json(text, "seconds") or {}).get("seconds")
    result["log_tail"] = text[-2000:] if result["returncode"] else None
    return result


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as JSON atomically (a temporary beside ``path``, then renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def result(benchmark: str, machine: dict, started: str, **fields) -> dict:
    """A result file's fields common to every script, then the script's own."""
    import torch

    import taskarith as ta

    return {"benchmark": benchmark, "timestamp_utc": started, "finished_utc": now_utc(), "machine": machine,
            "torch_version": torch.__version__, "taskarith_version": ta.__version__, **fields,
            "load_average_end": load_average()}


def save(path: Path, data: dict) -> None:
    write_json(path, data)
    print(f"wrote {path}")


def table(header: list[str], rows: list[list], align: str | None = None, group: int | None = None) -> str:
    """A console table: columns as wide as their widest cell, ``align`` one of l/r per column (default: the
    first left, the others right), a blank line wherever column ``group`` changes."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]

    def line(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    head = line([str(h) for h in header])
    out = [head, "-" * len(head)]
    for i, r in enumerate(cells):
        if group is not None and i and r[group] != cells[i - 1][group]:
            out.append("")
        out.append(line(r))
    return "\n".join(out)


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" * len(header)
    seps = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(seps) + " |"] + ["| " + " | ".join(r) + " |"
                                                                                for r in rows]


def gib(n: float | None, missing: str = "–") -> str:
    return f"{n / 2**30:.2f}" if n is not None else missing


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "–"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2f} ms"


def fmt_x(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.3f}x"


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def size_label(n: int | None) -> str:
    """1000 -> "1k", 10_000_000 -> "10M", 2.5e9 -> "2.5B"."""
    if n is None:
        return "?"
    for unit, div in (("B", 10**9), ("M", M), ("k", 1000)):
        if n >= div:
            value = n / div
            return f"{value:.0f}{unit}" if value == int(value) or value >= 100 else f"{value:.3g}{unit}"
    return str(n)


if __name__ == "__main__":
    print(json.dumps(machine_info(), indent=2))
