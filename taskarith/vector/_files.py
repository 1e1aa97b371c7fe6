"""Task vector files: safetensors with ``taskarith.*`` metadata, written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import TaskArithError, raise_if_any
from ..io import PICKLE_SUFFIXES, check_output, read_safetensors, write_safetensors
from ..io._reader import FORMAT, FORMAT_VERSION
from ._info import Info

_RESERVED = "taskarith."

if TYPE_CHECKING:
    from ._core import TaskVector


class Files:
    """Mixin of :class:`~taskarith.TaskVector`: :meth:`save`, :meth:`load`, :meth:`with_metadata`."""

    __slots__ = ()

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None, *,
             overwrite: bool = False) -> None:
        """Write the vector to a ``.safetensors`` file, atomically.

        The file records a format version, the dtype policy, the skipped integer
        entries, tied names and the base fingerprint; ``metadata`` adds your own
        string pairs (keys must not start with ``taskarith.``). Any ordinary
        safetensors reader can load the deltas. An existing ``path`` is replaced
        only if taskarith wrote it, or with ``overwrite=True``.
        """
        check_output(path, overwrite=overwrite, folder=False)
        user = dict(self._info.metadata)
        user.update(metadata or {})
        bad = [f"{k!r}" for k, v in user.items() if not isinstance(k, str) or not isinstance(v, str) or k.startswith(_RESERVED)]
        raise_if_any(bad, error=TaskArithError, header="invalid metadata keys",
                     fix=f"Metadata is str -> str and keys starting with {_RESERVED!r} are reserved.")
        ours = file_metadata(self._layout.aliases, self._layout.names, self._info.base_fingerprint,
                             dtype_policy=self._info.dtype_policy, skipped=self._info.skipped)
        header = {**user, **ours}
        chunks = [(name, self[name]) for name in self._layout.slots]
        write_safetensors(path, chunks, header)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> TaskVector:
        """Read a vector written by :meth:`save` (or any safetensors file of float deltas).

        Example:
            >>> import tempfile, os, torch, taskarith as ta
            >>> tv = ta.TaskVector({"w": torch.arange(3.0)})
            >>> path = os.path.join(tempfile.mkdtemp(), "tv.safetensors")
            >>> tv.save(path, metadata={"task": "demo"})
            >>> loaded = ta.TaskVector.load(path)
            >>> loaded.equal(tv), loaded.metadata
            (True, {'task': 'demo'})
        """
        if Path(path).suffix in PICKLE_SUFFIXES:
            raise TaskArithError(f"refusing to unpickle {str(path)!r}: task vectors are stored as .safetensors")
        tensors, header = read_safetensors(path, device=str(device))  # the reader checked the format version
        aliases = json.loads(header.get(_RESERVED + "aliases", "{}"))
        tensors.update({a: tensors[c] for a, c in aliases.items()})
        order = json.loads(header.get(_RESERVED + "names", "[]"))
        if sorted(order) == sorted(tensors):
            tensors = {n: tensors[n] for n in order}
        vector = cls(tensors)
        info = Info(
            skipped=tuple(json.loads(header.get(_RESERVED + "skipped", "[]"))),
            base_fingerprint=header.get(_RESERVED + "base_fingerprint"),
            dtype_policy=header.get(_RESERVED + "dtype_policy", "given"),
            metadata={k: v for k, v in header.items() if not k.startswith(_RESERVED)},
        )
        vector._info = info
        return vector

    def with_metadata(self, **metadata: str) -> TaskVector:
        """The same vector (sharing memory) carrying extra user metadata for :meth:`save`."""
        # Views of their own: the buffer cache takes a dead vector's buffer back only when no other tensor
        # uses its storage, and a second vector holding the very same tensor objects would not count.
        buffers = {dtype: buf.view(buf.shape) for dtype, buf in self._buffers.items()}
        return type(self)._make(self._layout, buffers, replace(self._info, metadata={**self._info.metadata, **metadata}))


def file_metadata(aliases: Mapping[str, str], names: Sequence[str], base_fingerprint: str | None, *,
                  dtype_policy: str | None = None, skipped: Sequence[str] | None = None,
                  **more: str) -> dict[str, str]:
    """The ``taskarith.*`` metadata of a task vector file, for every writer of one: the format and its
    version, tied names, every name in order (safetensors readers sort names), and what is known."""
    ours = {"format": FORMAT, "format_version": FORMAT_VERSION}
    if dtype_policy is not None:
        ours["dtype_policy"] = dtype_policy
    if skipped is not None:
        ours["skipped"] = json.dumps(list(skipped))
    ours.update(aliases=json.dumps(dict(aliases)), names=json.dumps(list(names)), **more)
    if base_fingerprint:
        ours["base_fingerprint"] = base_fingerprint
    return {_RESERVED + k: v for k, v in ours.items()}
