"""``taskarith extract|apply|merge|inspect``: a thin command line over the Python API.

Exit codes: 0 success, 1 failure (a one-line ``taskarith: error: ...`` on
stderr; ``--debug`` shows the traceback), 2 usage error. Merge configs (YAML or
JSON, the taskarith format or mergekit's) are read by :mod:`taskarith._config`
as ``docs/cli.md`` describes: the whole config is validated, with line numbers,
before any tensor is read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from . import _config, _extract, merging, metrics, outofcore, runtime
from ._config import DTYPES
from .errors import BaseMismatchError, TaskArithError
from .io import Checkpoint, check_output, load_state_dict, scratch_folder, write_safetensors
from .io._writer import MODEL_METADATA
from .vector import TaskVector, _checked_scalar

__all__ = ["main"]

_DTYPE_CHOICES = ["float32", "float16", "bfloat16", "float64"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also the console script's entry point).

    Example:
        >>> from taskarith.cli import main
        >>> main(["inspect", "no-such-vector.safetensors"])  # prints a one-line error to stderr
        1
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) and usage errors (2)
        return int(exit_.code or 0)
    debug = getattr(args, "debug", False)
    try:
        with _terminate_as_interrupt():
            args.run(args, parser)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except _Terminated:
        print("taskarith: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("taskarith: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure becomes one line unless --debug
        if debug:
            raise
        message = _cli_words(" ".join(str(err).split()) or type(err).__name__)
        if not isinstance(err, (TaskArithError, OSError)):  # unexpected: say what it was and how to see more
            message = f"{type(err).__name__}: {message} (run with --debug for the traceback)"
        print(f"taskarith: error: {message}", file=sys.stderr)
        return 1
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every temporary file is removed on the way out."""


class _terminate_as_interrupt:
    def __enter__(self):
        self.previous = None
        try:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread: leave signals alone
            pass

    @staticmethod
    def _raise(signum, frame):
        raise _Terminated()

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# How the Python API's messages name options, and the flags a command-line user types instead.
_FLAGS = [
    (r"\boverwrite=True", "--overwrite"),
    (r"\bon_base_mismatch='ignore'", "--on-base-mismatch ignore"),
    (r"\bon_base_mismatch='raise'", "--on-base-mismatch raise"),
    (r"\ballow_pickle=True", "--allow-pickle"),
    (r"\bcheck_finite=True", "--check-finite"),
    (r"\bstrict=False", "--partial"),
    (r"\bmax_memory\b", "--max-memory"),
    (r"\bshard_size\b", "--shard-size"),
]


def _cli_words(message: str) -> str:
    """A library message in the command line's words: its flags instead of Python keywords."""
    for pattern, flag in _FLAGS:
        message = re.sub(pattern, flag, message)
    return message


# ------------------------------------------------------------------ parser


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    parser = argparse.ArgumentParser(
        prog="taskarith", parents=[common],
        description="Task arithmetic on model checkpoints: extract, apply, merge and inspect task vectors.",
        epilog="Run 'taskarith COMMAND --help' for a command's options. Docs: docs/cli.md",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", parents=[common], help="save the task vector FINETUNED - BASE",
                       description="Save the task vector τ = FINETUNED − BASE as a .safetensors file.")
    p.add_argument("base", metavar="BASE", help="pretrained model: .safetensors file or model folder")
    p.add_argument("finetuned", metavar="FINETUNED", help="fine-tuned model of the same architecture")
    p.add_argument("-o", "--output", required=True, metavar="VECTOR.safetensors", help="where to write the vector")
    p.add_argument("--dtype", choices=_DTYPE_CHOICES,
                   help="store deltas in this dtype (default: float32 for half-precision weights, else theirs)")
    p.add_argument("--check-finite", action="store_true", help="fail if a delta holds NaN or inf")
    p.add_argument("--allow-pickle", action="store_true", help="also read .bin/.pt checkpoints (weights_only)")
    _overwrite_flag(p)
    p.set_defaults(run=_extract_cmd)

    p = sub.add_parser("apply", parents=[common], help="add scaled task vectors to a model",
                       description="Write BASE + Σ λ_i τ_i. Each VECTOR may carry its own scale as PATH:λ "
                                   "(e.g. math.safetensors:0.3). --scale given once is the scale of every "
                                   "vector without one; given once per vector, the scales in order.")
    p.add_argument("base", metavar="BASE", help="model to edit: .safetensors file or model folder")
    p.add_argument("vectors", nargs="+", metavar="VECTOR[:SCALE]", help="task vector files")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="a .safetensors path writes one file; anything else a model folder")
    p.add_argument("--scale", action="append", type=_number, metavar="λ", help="scale (default 1.0; see above)")
    p.add_argument("--dtype", choices=_DTYPE_CHOICES, help="dtype of the edited weights (default: the base's)")
    p.add_argument("--on-base-mismatch", choices=["warn", "raise", "ignore"], default="warn",
                   help="when a vector was extracted from another base (task transfer: ignore)")
    p.add_argument("--partial", action="store_true", help="allow vectors covering only part of the model")
    p.add_argument("--shard-size", default="5GB", metavar="SIZE", help="largest shard of a model folder (default 5GB)")
    _overwrite_flag(p)
    p.set_defaults(run=_apply_cmd)

    p = sub.add_parser("merge", parents=[common], help="merge models or vectors as a config file says",
                       description="Merge fine-tuned models (or task vectors) as CONFIG (YAML or JSON, taskarith's "
                                   "format or mergekit's task_arithmetic/ties/dare_ties subset) says. The config is "
                                   "validated before any tensor is read; the merge runs out of core.")
    p.add_argument("config", metavar="CONFIG", help="merge config (.yaml, .yml or .json)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="model folder, or a .safetensors file (a task vector when merging vectors without a base)")
    p.add_argument("--max-memory", default=None, metavar="SIZE", help="memory budget of the out-of-core merge "
                   "(default 2GB)")
    p.add_argument("--device", default=None, help="merge in memory on this device (cpu, cuda, ...) instead of "
                   "out of core; loads every model")
    p.add_argument("--shard-size", default="5GB", metavar="SIZE", help="largest shard of a model folder (default 5GB)")
    p.add_argument("--seed", type=int, default=None, help="seed of randomized methods (DARE); overrides the config")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved merge as JSON, and stop")
    p.add_argument("--strict", action="store_true", help="when merging vectors onto a base, refuse vectors extracted "
                   "from another base (default: warn)")
    _overwrite_flag(p)
    p.set_defaults(run=_merge_cmd)

    p = sub.add_parser("inspect", parents=[common], help="sizes, norms, sparsity, cosines and sign conflicts",
                       description="Describe task vectors: size, dtypes, norm, sparsity; for several, the pairwise "
                                   "cosine matrix and the sign-conflict rate.")
    p.add_argument("vectors", nargs="+", metavar="VECTOR", help="task vector files")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--density", type=_number, default=None,
                   help="also report the sign-conflict rate among each vector's top-DENSITY magnitudes")
    p.add_argument("--atol", type=_number, default=0.0, help="entries with |x| <= ATOL count as zero (default 0)")
    p.set_defaults(run=_inspect_cmd)
    return parser


def _overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output that taskarith did not write "
                   "(an output taskarith wrote is replaced without it; an input never is)")


def _check_output(args, *inputs, folder: bool) -> Path:
    """Refuse, before any work, an output that would destroy an input or a file taskarith did not write."""
    return check_output(args.output, inputs=inputs, overwrite=args.overwrite, folder=folder, flag="--overwrite")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _safetensors_output(parser, args) -> Path:
    out = Path(args.output)
    if out.suffix != ".safetensors":
        parser.error(f"{args.command}: the output must be a .safetensors file, got {str(out)!r}")
    return out


def _log(message: str) -> None:
    print(f"taskarith: {message}", file=sys.stderr)


# ---------------------------------------------------------------- commands


def _extract_cmd(args, parser) -> None:
    out = _safetensors_output(parser, args)
    _check_output(args, args.base, args.finetuned, folder=False)
    tv = TaskVector.from_models(args.base, args.finetuned, dtype=DTYPES.get(args.dtype),
                                check_finite=args.check_finite, allow_pickle=args.allow_pickle)
    tv.save(out, overwrite=True)  # checked above
    _log(f"wrote {out} ({len(tv)} tensors, {tv.numel():,} entries, norm {tv.norm():.6g})")


def _split_scale(text: str) -> tuple[str, float | None]:
    """``PATH:λ`` -> (PATH, λ); a path that exists as written is never split."""
    path, sep, suffix = text.rpartition(":")
    if not sep or os.path.exists(text):
        return text, None
    try:
        value = float(suffix)
    except ValueError:
        return text, None
    if not math.isfinite(value):
        raise TaskArithError(f"the scale of {text!r} must be finite")
    return path, value


def apply_scales(vectors: Sequence[str], scales: Sequence[float] | None) -> list[tuple[str, float]]:
    """Resolve ``PATH[:λ]`` arguments and ``--scale`` flags to (path, λ) pairs.

    One ``--scale`` is the default for vectors without their own ``:λ``; one
    ``--scale`` per vector gives the scales in order (no ``:λ`` allowed then).

    Example:
        >>> apply_scales(["a.safetensors:0.3", "b.safetensors"], [0.5])
        [('a.safetensors', 0.3), ('b.safetensors', 0.5)]
        >>> apply_scales(["a.safetensors", "b.safetensors"], [0.1, 0.2])
        [('a.safetensors', 0.1), ('b.safetensors', 0.2)]
    """
    pairs = [_split_scale(v) for v in vectors]
    scales = list(scales or [])
    if len(scales) > 1:
        if len(scales) != len(pairs):
            raise TaskArithError(f"got {len(scales)} --scale values for {len(pairs)} vectors; give one --scale "
                                 "for all, one per vector, or write PATH:SCALE")
        own = [v for v, (_, s) in zip(vectors, pairs) if s is not None]
        if own:
            raise TaskArithError(f"{own[0]!r} carries its own scale and --scale is given per vector; use one form")
        return [(p, s) for (p, _), s in zip(pairs, scales)]
    default = scales[0] if scales else 1.0
    return [(p, default if s is None else s) for p, s in pairs]


def _apply_cmd(args, parser) -> None:
    pairs = apply_scales(args.vectors, args.scale)
    missing = [p for p, _ in pairs if not Path(p).is_file()]
    if missing:
        raise TaskArithError(f"no such vector file(s): {', '.join(map(repr, missing))}")
    _check_output(args, args.base, *(p for p, _ in pairs), folder=Path(args.output).suffix != ".safetensors")
    vectors = [TaskVector.load(p) for p, _ in pairs]
    for (path, scale), vector in zip(pairs, vectors):
        _checked_scalar(scale, f"the scale of {path!r}", list(vector.dtypes))
    total = TaskVector.sum(vectors, [s for _, s in pairs]) if len(vectors) > 1 or pairs[0][1] != 1.0 else vectors[0]
    state = load_state_dict(args.base)
    edited = total.apply_to(state, strict=not args.partial, on_base_mismatch=args.on_base_mismatch)
    if args.dtype:  # recompute the edited entries rounded once into the dtype (a cast would round twice)
        dtype = DTYPES[args.dtype]
        edited = {n: _extract.apply_entry(state[n], total[n], 1.0, torch.empty(t.shape, dtype=dtype))
                  if n in total and t.is_floating_point() else t for n, t in edited.items()}
    written = save_model(edited, args.output, like=args.base, shard_size=args.shard_size)
    _log(f"wrote {written} (base + {' + '.join(f'{s:g}·{Path(p).name}' for p, s in pairs)})")


def _merge_cmd(args, parser) -> None:
    if args.device is not None and args.max_memory is not None:
        parser.error("merge: --max-memory limits the out-of-core merge; --device merges in memory. Pick one.")
    out = Path(args.output)
    plan = _config.load(args.config, seed=args.seed, output=out)
    _check_output(args, args.config, plan.base, *plan.sources, folder=out.suffix != ".safetensors")
    if plan.kind == "vectors" and plan.base is not None:
        _check_vector_bases(plan, strict=args.strict)
    if args.dry_run:
        print(json.dumps(plan.describe(), indent=2))
        return
    if args.device is not None:
        _merge_in_memory(plan, out, _extract.device_of(args.device), args.shard_size)
    else:
        _merge_out_of_core(plan, out, args.max_memory or "2GB", args.shard_size, args.progress)
    _log(f"wrote {out} ({plan.method} of {len(plan.sources)} {plan.kind})")


def _check_vector_bases(plan, *, strict: bool) -> None:
    """Vectors merged onto a base were extracted from it: their recorded fingerprints must match it,
    as ``apply`` checks (a warning by default, an error with ``--strict``)."""
    base = Checkpoint(plan.base)
    others = []
    for source in plan.sources:
        vector = Checkpoint(source)
        recorded = vector.metadata.get("taskarith.base_fingerprint")
        if recorded is None:
            continue
        probe = _base_probe(base, vector)
        if probe is not None and _extract.fingerprint(probe, list(probe)) != recorded:
            others.append(str(source))
    if others:
        message = (f"{len(others)} vector file(s) were extracted from a different base model than "
                   f"{str(plan.base)!r}: {', '.join(map(repr, others))}. That is fine for deliberate task transfer; "
                   "otherwise check the config's base")
        if strict:
            raise BaseMismatchError(message + " (or drop --strict to merge anyway).")
        warnings.warn(message + " (--strict refuses such a merge).", stacklevel=2)


def _base_probe(base: Checkpoint, vector: Checkpoint) -> dict[str, torch.Tensor] | None:
    """The base's tensor for each name the vector stores (under a tied name of it where the base keeps
    only that one), as its fingerprint was taken; None where the base lacks one (apply reports that)."""
    aliases = json.loads(vector.metadata.get("taskarith.aliases", "{}"))
    probe = {}
    for name in vector.names():
        found = next((n for n in (name, *(a for a, c in aliases.items() if c == name)) if n in base), None)
        if found is None:
            return None
        probe[name] = base.tensor(found)
    return probe


def _merge_out_of_core(plan, out: Path, max_memory, shard_size, progress) -> None:
    runtime.hold_freed_memory()  # this process only merges: reuse freed memory, fewer page faults
    common = dict(weights=plan.weights, max_memory=max_memory, progress=progress, overwrite=True, **plan.options)
    if plan.kind == "models" and out.suffix != ".safetensors":
        outofcore.merge_files(plan.base, plan.sources, out, plan.method, dtype=plan.dtype,
                              shard_size=shard_size, **common)
        return
    if plan.base is None:
        outofcore.merge_files(None, plan.sources, out, plan.method, dtype=plan.dtype, **common)
        return
    with scratch_folder(out) as tmp:
        if plan.kind == "models":  # one file: merge into an unsharded folder, keep its weights
            folder = outofcore.merge_files(plan.base, plan.sources, tmp / "model", plan.method,
                                           dtype=plan.dtype, shard_size=1 << 62, **common)
            os.replace(folder / "model.safetensors", out)
        else:  # vectors onto a base: merge the vectors out of core, then apply
            merged = outofcore.merge_files(None, plan.sources, tmp / "merged.safetensors", plan.method, **common)
            vector = TaskVector.load(merged)
            save_model(applied(load_state_dict(plan.base), vector, plan.dtype), out, like=plan.base,
                       shard_size=shard_size)


def _merge_in_memory(plan, out: Path, device: torch.device, shard_size) -> None:
    base = load_state_dict(plan.base) if plan.base is not None else None
    if plan.kind == "models":
        vectors = [TaskVector.from_models(base, s).to(device) for s in plan.sources]
    else:
        vectors = [TaskVector.load(s, device=device) for s in plan.sources]
    merged = merging.merge(vectors, plan.method, weights=plan.weights,
                           dtype=plan.dtype if base is None else None, **plan.options).to("cpu")
    del vectors
    if base is None:
        merged.save(out, overwrite=True)  # the output was checked before the merge
        return
    save_model(applied(base, merged, plan.dtype), out, like=plan.base, shard_size=shard_size)


def applied(base: Mapping[str, torch.Tensor], vector: TaskVector, dtype: torch.dtype | None) -> dict:
    """``base + vector`` rounded once into ``dtype`` (default: each base entry's), as out-of-core merges do."""
    if dtype is None:
        return vector.apply_to(base, on_base_mismatch="ignore")
    missing = [n for n in vector if n not in base]
    if missing:
        raise TaskArithError(f"the base lacks {len(missing)} tensor(s) of the merged vector: {missing[:10]}")
    out = {}
    for name, b in base.items():
        if name in vector and b.is_floating_point():
            out[name] = _extract.apply_entry(b, vector[name], 1.0, torch.empty(b.shape, dtype=dtype))
        else:
            out[name] = b
    return out


def save_model(state: Mapping[str, torch.Tensor], out, *, like=None, shard_size="5GB") -> Path:
    """Write a state_dict to ``out``: one ``.safetensors`` file, or else a Hugging Face model folder
    (:func:`taskarith.hf.save_model`, with the non-weight files of ``like`` when it is a folder); atomically.
    """
    out = Path(out)
    if out.suffix == ".safetensors":
        write_safetensors(out, [(n, t.contiguous()) for n, t in state.items()], MODEL_METADATA)
        return out
    from . import hf

    like = Path(like) if like is not None and Path(like).is_dir() else None
    # The command checked the output against its inputs before any work.
    return Path(hf.save_model(dict(state), out, like=like, shard_size=shard_size, overwrite=True))


def _inspect_cmd(args, parser) -> None:
    if args.density is not None and not 0 < args.density <= 1:
        parser.error(f"inspect: --density must be in (0, 1], got {args.density}")
    if args.atol < 0:
        parser.error(f"inspect: --atol must be >= 0, got {args.atol}")
    missing = [p for p in args.vectors if not Path(p).is_file()]
    if missing:
        raise TaskArithError(f"no such vector file(s): {', '.join(map(repr, missing))}")
    vectors = [TaskVector.load(p) for p in args.vectors]
    report = {"vectors": [_describe(p, v, args.atol) for p, v in zip(args.vectors, vectors)]}
    if len(vectors) > 1:
        report["cosine"] = metrics.cosine_matrix(vectors).tolist()
        report["sign_conflict_rate"] = metrics.sign_conflict_rate(vectors)
        if args.density is not None:
            report["density"] = args.density
            report["sign_conflict_rate_at_density"] = metrics.sign_conflict_rate(vectors, density=args.density)
    if args.json:
        print(json.dumps(_finite(report), indent=2))
    else:
        print(_table(report))


def _describe(path: str, v: TaskVector, atol: float) -> dict:
    return {
        "path": path, "tensors": len(v), "entries": v.numel(), "nbytes": v.nbytes,
        "dtypes": {str(d).replace("torch.", ""): n for d, n in v.dtypes.items()},
        "norm": v.norm(), "sparsity": metrics.sparsity(v, atol=atol), "skipped": list(v.skipped),
    }


def _finite(obj):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _table(report: dict) -> str:
    rows = [["#", "vector", "tensors", "entries", "dtypes", "norm", "sparsity"]]
    for i, d in enumerate(report["vectors"]):
        dtypes = ", ".join(d["dtypes"]) or "-"
        rows.append([str(i), d["path"], str(d["tensors"]), f"{d['entries']:,}", dtypes, f"{d['norm']:.6g}",
                     f"{100 * d['sparsity']:.2f}%"])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 1 or c == 4 else cell.rjust(w) for c, (cell, w) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    if "cosine" in report:
        n = len(report["cosine"])
        lines += ["", "cosine similarity", "     " + "".join(f"{f'[{j}]':>8}" for j in range(n))]
        lines += [f"{f'[{i}]':>5}" + "".join(f"{c:>8.4f}" for c in row) for i, row in enumerate(report["cosine"])]
        lines += ["", f"sign conflict rate: {report['sign_conflict_rate']:.4f}"]
        if "sign_conflict_rate_at_density" in report:
            lines.append(f"sign conflict rate (top {report['density']:g} of each vector): "
                         f"{report['sign_conflict_rate_at_density']:.4f}")
    return "\n".join(lines)
