"""taskarith: edit neural networks with task arithmetic.

A task vector is ``τ = θ_finetuned − θ_pretrained``. Add vectors to learn
several tasks at once, negate one to forget a task, scale them, and apply the
result to a base model (or to a different pretrained model of the same
architecture)::

    import taskarith as ta
    tv = ta.TaskVector.from_models(pretrained, finetuned)
    model.load_state_dict(tv.apply_to(pretrained, scale=0.5))

The top level holds what most work needs: :class:`TaskVector`, :func:`merge`,
:func:`merge_files`, :func:`methods`, :func:`register`, :func:`consolidate`,
:func:`load`, :func:`save` and the errors. Submodules: :mod:`taskarith.merging`
(methods and their contract), :mod:`taskarith.attribution` (integrated
gradients), :mod:`taskarith.metrics`, :mod:`taskarith.hf`, :mod:`taskarith.lora`
and :mod:`taskarith.io` (interop), :mod:`taskarith.runtime` (caches, threads,
backend).
"""

from . import attribution, hf, io, lora, merging, metrics, runtime  # noqa: F401  (submodules of the surface; captum loads only when used)
from .attribution import consolidate
from .errors import (
    BaseMismatchError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
    TaskArithError,
)
from .merging import merge, methods, register
from .outofcore import merge_files
from .vector import TaskVector

__version__ = "0.2.0"

__all__ = [
    "BaseMismatchError",
    "KeyMismatchError",
    "NonFiniteError",
    "ShapeMismatchError",
    "TaskArithError",
    "TaskVector",
    "consolidate",
    "load",
    "merge",
    "merge_files",
    "methods",
    "register",
    "save",
]


def load(path, device="cpu") -> TaskVector:
    """Read a task vector from a ``.safetensors`` file (see :meth:`TaskVector.load`)."""
    return TaskVector.load(path, device=device)


def save(vector: TaskVector, path, metadata=None, *, overwrite: bool = False) -> None:
    """Write a task vector to a ``.safetensors`` file atomically (see :meth:`TaskVector.save`): an existing
    file is replaced only if taskarith wrote it, or with ``overwrite=True``."""
    vector.save(path, metadata=metadata, overwrite=overwrite)
