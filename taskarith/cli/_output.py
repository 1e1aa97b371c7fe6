"""What the commands share about their outputs: the checks before any work, writing a model, the log line."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import hf
from ..io import check_output as _check_output
from ..io import write_safetensors
from ..io._writer import MODEL_METADATA

__all__ = ["check_output", "log", "safetensors_output", "save_model"]


def check_output(args, *inputs, folder: bool) -> Path:
    """Refuse, before any work, an output that would destroy an input or a file taskarith did not write."""
    return _check_output(args.output, inputs=inputs, overwrite=args.overwrite, folder=folder, flag="--overwrite")


def safetensors_output(parser, args) -> Path:
    out = Path(args.output)
    if out.suffix != ".safetensors":
        parser.error(f"{args.command}: the output must be a .safetensors file, got {str(out)!r}")
    return out


def save_model(state: Mapping[str, torch.Tensor], out, *, like=None, shard_size="5GB") -> Path:
    """Write a state_dict to ``out``: one ``.safetensors`` file, or else a Hugging Face model folder
    (:func:`taskarith.hf.save_model`, with the non-weight files of ``like`` when it is a folder); atomically.
    """
    out = Path(out)
    if out.suffix == ".safetensors":
        write_safetensors(out, [(n, t.contiguous()) for n, t in state.items()], MODEL_METADATA)
        return out
    like = Path(like) if like is not None and Path(like).is_dir() else None
    # The command checked the output against its inputs before any work.
    return Path(hf.save_model(dict(state), out, like=like, shard_size=shard_size, overwrite=True))


def log(message: str) -> None:
    print(f"taskarith: {message}", file=sys.stderr)
