"""Hugging Face model folders: write an edited state_dict back as a folder ``from_pretrained`` loads.

Reading needs nothing special: every function that takes a model accepts a
folder holding ``model.safetensors`` or a sharded ``model.safetensors.index.json``
(see :func:`taskarith.io.load_state_dict`). :func:`save_model` is the way back::

    import taskarith as ta
    from taskarith import hf

    tv = ta.TaskVector.from_models("llama-base", "llama-math")
    hf.save_model(tv.apply_to("llama-base", scale=0.8), "llama-edit", like="llama-base")

Tied weights (two names sharing one tensor, such as ``lm_head.weight`` and
``model.embed_tokens.weight``) are written as the folder ``like`` stores them:
names it leaves out (Transformers re-ties them on load) are left out again,
and without ``like`` every name gets its own copy, which Transformers ties
back on load because the values are equal.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from . import _extract
from .errors import KeyMismatchError, ShapeMismatchError, TaskArithError, format_names
from .io import SHARD_INDEX, SINGLE_FILE, Checkpoint, check_output, load_state_dict, parse_bytes, write_model

__all__ = ["save_model"]



def save_model(
    state_dict: Mapping[str, torch.Tensor] | torch.nn.Module,
    out: str | os.PathLike,
    *,
    like: str | os.PathLike | None = None,
    shard_size: str | int = "5GB",
    strict: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a full state_dict as a Hugging Face model folder, atomically.

    The folder holds ``model.safetensors``, or when the weights exceed
    ``shard_size`` the shards ``model-00001-of-0000N.safetensors`` and a
    ``model.safetensors.index.json`` (``metadata.total_size`` in bytes of tensor
    data and a ``weight_map``); every file carries the ``{"format": "pt"}``
    metadata Transformers expects. Everything else in ``like`` is copied:
    ``config.json`` (its ``torch_dtype`` set to the written weights' dtype),
    ``generation_config.json``, tokenizer files, the model card and subfolders,
    except weight files of any format, hidden entries (``.git``, ``.cache``) and
    symlinks leading out of ``like``. The folder is built beside ``out`` and
    swapped in only when complete; on any error ``out`` is left as it was.

    Args:
        state_dict: the weights (``nn.Module`` or mapping of names to tensors),
            e.g. the result of :meth:`TaskVector.apply_to`.
        out: the folder to write. An existing folder is replaced only if it is empty,
            or taskarith wrote it (its marker ``.taskarith-output`` lists what it wrote)
            and it holds nothing else, or with ``overwrite=True``; ``out`` must not be,
            hold or lie inside ``like``.
        like: the base model's folder, whose non-weight files are copied and
            whose stored names decide how tied weights are written.
        shard_size: largest shard, as bytes or a string such as ``"5GB"`` or
            ``"500MiB"``; a tensor larger than it gets a shard of its own.
        strict: when ``like`` stores weights, require the written names and
            shapes to be exactly its names and shapes (all differences are
            reported at once). Pass ``False`` to write a different architecture
            next to ``like``'s config on purpose.
        overwrite: replace an existing ``out`` that taskarith did not write.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Example:
        >>> import os, tempfile, torch
        >>> from taskarith import hf
        >>> out = hf.save_model(torch.nn.Linear(3, 2), os.path.join(tempfile.mkdtemp(), "model"))
        >>> sorted(p.name for p in out.iterdir())
        ['.taskarith-output', 'model.safetensors']
    """
    state = load_state_dict(state_dict)
    shard_bytes = parse_bytes(shard_size, what="shard_size")
    like = None if like is None else Path(like)
    if like is not None and not like.is_dir():
        raise TaskArithError(f"like={str(like)!r} is not a folder: pass the base model's folder (it holds config.json)")
    out = check_output(out, inputs=[like], overwrite=overwrite, folder=True)
    stored = _stored_shapes(like)
    names = _names_to_write(state, stored)
    if not names:
        raise TaskArithError("the state_dict is empty: there is nothing to write")
    if stored is not None and strict:
        _check_like(state, names, stored, like)
    return write_model(out, [(n, state[n]) for n in names], shard_bytes=shard_bytes, like=like)


def _stored_shapes(like: Path | None) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes of the safetensors weights in ``like``, or None when it holds none."""
    if like is None or not ((like / SINGLE_FILE).is_file() or (like / SHARD_INDEX).is_file()):
        return None
    checkpoint = Checkpoint(like)
    return {name: checkpoint.shape(name) for name in checkpoint.names()}


def _names_to_write(state: Mapping[str, torch.Tensor], stored: Mapping[str, tuple] | None) -> list[str]:
    """Every name, except tied names that ``like`` leaves out while storing another name of their group."""
    if stored is None:
        return list(state)
    aliases = _extract.tied_groups(state, list(state))
    groups: dict[str, list[str]] = {}
    for name in state:
        groups.setdefault(aliases.get(name, name), []).append(name)
    dropped = set()
    for members in groups.values():
        kept = [n for n in members if n in stored]
        if len(members) > 1 and kept:
            dropped.update(n for n in members if n not in kept)
    return [n for n in state if n not in dropped]


def _check_like(state, names: list[str], stored: Mapping[str, tuple], like: Path) -> None:
    missing = [n for n in stored if n not in state]
    extra = [n for n in names if n not in stored]
    shapes = [f"{n!r}: {tuple(state[n].shape)} here vs {stored[n]} in {like.name}"
              for n in names if n in stored and tuple(state[n].shape) != tuple(stored[n])]
    if not (missing or extra or shapes):
        return
    parts = [f"the state_dict does not match the weights of {str(like)!r}:"]
    if missing:
        parts.append(f"missing {len(missing)}: {format_names(missing)};")
    if extra:
        parts.append(f"not in {like.name} {len(extra)}: {format_names(extra)} (a tied weight that {like.name} "
                     "leaves out must share memory with the weight it is tied to);")
    if shapes:
        parts.append(f"shapes differ {len(shapes)}: {'; '.join(shapes[:20])};")
    parts.append("write the model the folder describes, or pass strict=False to write a different one on purpose.")
    error = KeyMismatchError if missing or extra else ShapeMismatchError
    raise error(" ".join(parts), **({"missing": missing, "extra": extra} if error is KeyMismatchError else {}))
