"""The argparse parser: the subcommands, their flags and help texts; each subcommand's ``run`` is the
function in ``_vectors``, ``_merge`` or ``_inspect`` that does it."""

from __future__ import annotations

import argparse
import math

from . import _inspect, _merge, _vectors

__all__ = ["build_parser"]

_DTYPE_CHOICES = ["float32", "float16", "bfloat16", "float64"]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # flags every command takes, before or after its name
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    parser = argparse.ArgumentParser(
        prog="taskarith", parents=[common],
        description="Task arithmetic on model checkpoints: extract, apply, merge and inspect task vectors.",
        epilog="Run 'taskarith COMMAND --help' for a command's options. Docs: docs/cli.md",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_extract, _add_apply, _add_merge, _add_inspect, _add_extract_lora):
        add(sub, common)
    return parser


def _add_extract(sub, common) -> None:
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
    p.set_defaults(run=_vectors.extract)


def _add_apply(sub, common) -> None:
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
    p.set_defaults(run=_vectors.apply)


def _add_merge(sub, common) -> None:
    p = sub.add_parser("merge", parents=[common], help="merge models or vectors as a config file says",
                       description="Merge fine-tuned models (or task vectors) as CONFIG (YAML or JSON, taskarith's "
                                   "format or mergekit's, every mergekit method) says. The config is validated "
                                   "before any tensor is read; the merge runs out of core.")
    p.add_argument("config", metavar="CONFIG", help="merge config (.yaml, .yml or .json)")
    p.add_argument("positional_output", nargs="?", metavar="OUT", help="the output, as mergekit-yaml takes it "
                   "(same as -o)")
    p.add_argument("-o", "--output", metavar="OUT",
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
    p.add_argument("--semantics", choices=["mergekit", "taskarith"], default="mergekit",
                   help="mergekit configs: reproduce mergekit's arithmetic (default), or run task_arithmetic, ties "
                   "and dare_ties as taskarith's own exact methods (see docs/cli.md)")
    p.add_argument("-I", "--intermediate-dir", default=None, metavar="DIR",
                   help="configs of several merges (mergekit-multi's) with an unnamed final merge: where the named "
                   "merges go (DIR/NAME); the final one goes to -o. Without an unnamed one, each goes to OUT/NAME")
    _overwrite_flag(p)
    _mergekit_flags(p)
    p.set_defaults(run=_merge.merge)


def _mergekit_flags(p: argparse.ArgumentParser) -> None:
    """mergekit-yaml's flags: those with a taskarith meaning, and those accepted as what taskarith always does."""
    g = p.add_argument_group("mergekit-yaml flags", "accepted so that mergekit command lines run unchanged")
    g.add_argument("--random-seed", type=int, dest="seed", default=argparse.SUPPRESS, help="same as --seed")
    g.add_argument("--cuda", action="store_const", const="cuda", dest="compute_device", default=None,
                   help="compute on the GPU (the merge still streams from disk)")
    g.add_argument("--out-shard-size", type=_parameter_count, default=None, metavar="N",
                   help="largest shard in parameters (mergekit's meaning: 5B, 500M, ...); --shard-size is in bytes")
    for flag, meaning in _ALWAYS.items():
        g.add_argument(flag, action="store_true", help=meaning)
    for flag, meaning in _IGNORED_VALUES.items():
        g.add_argument(flag, metavar="VALUE", default=None, help=meaning)
    g.add_argument("-v", "--verbose", action="count", default=0, help="accepted (taskarith prints one line)")


_ALWAYS = {
    "--copy-tokenizer": "accepted: the base model's tokenizer files are always copied",
    "--no-copy-tokenizer": "accepted; the tokenizer files are still copied (delete them afterwards if unwanted)",
    "--lazy-unpickle": "accepted: inputs are always memory-mapped (safetensors)",
    "--allow-crimes": "accepted: models of one architecture are checked by tensor names and shapes only",
    "--low-cpu-memory": "accepted: the merge streams within --max-memory",
    "--write-model-card": "accepted: a README.md model card is always written",
    "--clone-tensors": "accepted (no effect)",
    "--trust-remote-code": "accepted (taskarith runs no model code)",
    "--safe-serialization": "accepted: outputs are always safetensors",
    "--read-to-gpu": "accepted: with --cuda, blocks are copied to the GPU as they are merged",
    "--multi-gpu": "accepted (one device)",
    "--gpu-rich": "accepted (same as --cuda)",
    "--async-write": "accepted: writing overlaps merging",
    "--quiet": "accepted",
}
_IGNORED_VALUES = {
    "--transformers-cache": "accepted (no effect: Hub models are read from the Hugging Face cache, HF_HUB_CACHE)",
    "--lora-merge-cache": "accepted (no effect: MODEL+LORA is merged as it is read, no copy is written)",
    "--lora-merge-dtype": "accepted (no effect: a LoRA is merged in the model's dtype, as by default in mergekit)",
    "--num-threads": "accepted (torch's threads are used)",
    "--write-threads": "accepted (no effect)",
}


def _parameter_count(text: str) -> int:
    """mergekit's sizes: a count of parameters with an optional K, M or B suffix."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale != 1 else text
    if not digits.isdigit() or int(digits) * scale < 1:
        raise argparse.ArgumentTypeError(f"expected a number of parameters such as 5B or 500M, got {text!r}")
    return int(digits) * scale


def _add_inspect(sub, common) -> None:
    p = sub.add_parser("inspect", parents=[common], help="sizes, norms, sparsity, cosines and sign conflicts",
                       description="Describe task vectors: size, dtypes, norm, sparsity; for several, the pairwise "
                                   "cosine matrix and the sign-conflict rate.")
    p.add_argument("vectors", nargs="+", metavar="VECTOR", help="task vector files")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--density", type=_number, default=None,
                   help="also report the sign-conflict rate among each vector's top-DENSITY magnitudes")
    p.add_argument("--atol", type=_number, default=0.0, help="entries with |x| <= ATOL count as zero (default 0)")
    p.set_defaults(run=_inspect.inspect)


def _add_extract_lora(sub, common) -> None:
    from . import _extract_lora

    p = sub.add_parser("extract-lora", parents=[common], help="save FINETUNED - BASE as a PEFT LoRA adapter",
                       description="Approximate τ = FINETUNED − BASE by a PEFT LoRA adapter of rank R (a truncated "
                                   "SVD of each Linear, Conv1D and Embedding delta; biases and norms in full) and "
                                   "write the adapter folder. Prints the worst per-layer relative error.")
    p.add_argument("base", metavar="BASE", help="pretrained model: model folder (with config.json) or .safetensors file")
    p.add_argument("finetuned", metavar="FINETUNED", help="fine-tuned model of the same architecture")
    p.add_argument("-r", "--rank", required=True, metavar="R", help="LoRA rank (a positive integer)")
    p.add_argument("-o", "--output", required=True, metavar="ADAPTER", help="the adapter folder to write")
    p.add_argument("--dtype", choices=_DTYPE_CHOICES, help="dtype of the LoRA factors (default: the deltas')")
    p.add_argument("--target", action="append", metavar="MODULE", help="factor only these layers (module names or "
                   "dotted suffixes such as q_proj; repeat for several); the other layers' deltas are dropped")
    p.add_argument("--rest", choices=["full", "drop"], default="full", help="biases, norms and other deltas LoRA "
                   "cannot express: store them in full (default) or drop them")
    p.add_argument("--svd", choices=["auto", "exact", "randomized"], default="auto",
                   help="exact SVD, randomized SVD, or by size (auto: randomized above 1024 rows and columns)")
    p.add_argument("--niter", type=int, default=2, help="power iterations of the randomized SVD (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD (default 0)")
    p.add_argument("--json", action="store_true", help="also print the per-layer report as JSON on stdout")
    p.add_argument("--allow-pickle", action="store_true", help="also read .bin/.pt checkpoints (weights_only)")
    _overwrite_flag(p)
    p.set_defaults(run=_extract_lora.run)

def _overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output that taskarith did not write "
                   "(an output taskarith wrote is replaced without it; an input never is)")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
