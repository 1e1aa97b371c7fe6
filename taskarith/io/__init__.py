"""Reading models and writing task vectors and model folders.

Sources of weights, accepted wherever a model is expected:

* an ``nn.Module`` (its ``state_dict()``),
* a ``Mapping[str, Tensor]``,
* a ``.safetensors`` file,
* a folder holding ``model.safetensors`` or a sharded
  ``model.safetensors.index.json`` (the Hugging Face layout),
* a pickle checkpoint (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), only with
  ``allow_pickle=True``: unpickling runs code from the file, so it is refused by
  default and, when allowed, loaded with ``torch.load(weights_only=True)``.

Every safetensors source goes through one reader, :class:`Checkpoint`, which
validates all headers, offsets, dtypes and shard paths before reading a tensor;
every output through one writer (:func:`write_safetensors`, :func:`write_model`)
under the output policy of :func:`check_output`. Files are written atomically:
into a temporary beside the target, flushed to disk, then renamed over it, so an
interrupted write leaves any previous file intact and never a half-written one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch

from .._extract import device_of
from ..errors import TaskArithError
from ._paths import (
    MARKER,
    atomic_file,
    atomic_folder,
    check_output,
    is_taskarith_file,
    remove_stale,
    scratch_folder,
)
from ._reader import SHARD_INDEX, SINGLE_FILE, Checkpoint, open_checkpoint
from ._writer import Lazy, copy_extras, parse_bytes, write_model, write_safetensors

atomic_path = atomic_file  # the name earlier releases exported

__all__ = [
    "MARKER", "PICKLE_SUFFIXES", "SHARD_INDEX", "SINGLE_FILE", "Checkpoint", "Lazy", "Source", "atomic_file", "atomic_folder",
    "atomic_path", "check_output", "copy_extras", "is_taskarith_file", "load_state_dict", "open_checkpoint", "parse_bytes",
    "read_safetensors", "remove_stale", "scratch_folder", "write_model", "write_safetensors",
]

Source = Union[torch.nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def load_state_dict(
    source: Source, *, device: str | torch.device | None = None, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Every named tensor of ``source`` as a plain dict.

    Modules and mappings are not copied: their tensors are returned as they are
    (tied parameters stay tied), moved only if ``device`` differs.

    Example:
        >>> import torch, taskarith as ta
        >>> sorted(ta.io.load_state_dict(torch.nn.Linear(2, 1)))
        ['bias', 'weight']
    """
    if isinstance(source, torch.nn.Module):
        state = source.state_dict()
    elif isinstance(source, Mapping):
        # Only tensors that track gradients need a detached view (a view per tensor costs ~1 us).
        state = {k: v.detach() if isinstance(v, torch.Tensor) and v.requires_grad else v for k, v in source.items()}
        bad = [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TaskArithError(
                f"a state_dict maps names to tensors, but these values are not tensors: {', '.join(bad)}. "
                "Pass model.state_dict() or a dict of tensors."
            )
    elif isinstance(source, (str, os.PathLike)):
        state = _load_path(Path(source), allow_pickle=allow_pickle)
    else:
        raise TaskArithError(
            f"cannot read weights from a {type(source).__name__}: pass an nn.Module, a dict of tensors, "
            "a .safetensors file or a directory holding model.safetensors[.index.json]."
        )
    if device is not None:
        device = device_of(device)
        state = {k: v.to(device) for k, v in state.items()}
    return state


def _load_path(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix in PICKLE_SUFFIXES and path.is_file():
        if not allow_pickle:
            raise TaskArithError(
                f"refusing to unpickle {str(path)!r}: pickle files can run arbitrary code when loaded. "
                "Convert it to .safetensors, or pass allow_pickle=True if you trust the file "
                "(it is then read with torch.load(weights_only=True))."
            )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as err:  # pickle and torch raise many types for a damaged or hostile file
            raise TaskArithError(f"cannot read {str(path)!r} as a PyTorch checkpoint with weights_only=True "
                                 f"({type(err).__name__}): the file is damaged, or holds objects other than "
                                 "tensors. Convert it to .safetensors with the code that wrote it.") from err
        if not isinstance(obj, Mapping):
            raise TaskArithError(
                f"{str(path)!r} holds a {type(obj).__name__}, not a state_dict; save model.state_dict() instead."
            )
        return load_state_dict(obj)
    if path.is_file() and path.suffix != ".safetensors":
        raise TaskArithError(
            f"unknown weight file type {path.suffix!r} for {str(path)!r}: expected .safetensors "
            f"(or, with allow_pickle=True, one of {sorted(PICKLE_SUFFIXES)})."
        )
    return Checkpoint(path).state_dict()


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (validated by :class:`Checkpoint`)."""
    checkpoint = Checkpoint(path)
    return checkpoint.state_dict(device), dict(checkpoint.metadata)
