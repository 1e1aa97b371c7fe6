"""taskarith: edit neural networks with task arithmetic.

A task vector is ``τ = θ_finetuned − θ_pretrained``. Add vectors to learn
several tasks at once, negate one to forget a task, scale them, and apply the
result to a base model (or to a different pretrained model of the same
architecture)::

    import taskarith as ta
    tv = ta.TaskVector.from_models(pretrained, finetuned)
    model.load_state_dict(tv.apply_to(pretrained, scale=0.5))
"""

from . import attribution, hf, io, kernels, lora, merging, metrics  # attribution imports captum only when used
from ._consolidate import consolidate, tune_scale
from ._flat import cache_info, empty_cache
from .errors import (
    BaseMismatchError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
    TaskArithError,
)
from .merging import merge, methods
from .streaming import merge_files
from .vector import TaskVector

__version__ = "0.1.0"

__all__ = [
    "BaseMismatchError",
    "KeyMismatchError",
    "NonFiniteError",
    "ShapeMismatchError",
    "TaskArithError",
    "TaskVector",
    "__version__",
    "attribution",
    "cache_info",
    "consolidate",
    "empty_cache",
    "hf",
    "io",
    "kernels",
    "load",
    "lora",
    "merge",
    "merge_files",
    "merging",
    "methods",
    "metrics",
    "save",
    "tune_scale",
]


def load(path, device="cpu") -> TaskVector:
    """Read a task vector from a ``.safetensors`` file (see :meth:`TaskVector.load`)."""
    return TaskVector.load(path, device=device)


def save(vector: TaskVector, path, metadata=None, *, overwrite: bool = False) -> None:
    """Write a task vector to a ``.safetensors`` file atomically (see :meth:`TaskVector.save`): an existing
    file is replaced only if taskarith wrote it, or with ``overwrite=True``."""
    vector.save(path, metadata=metadata, overwrite=overwrite)
