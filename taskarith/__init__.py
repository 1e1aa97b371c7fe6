"""taskarith: edit neural networks with task arithmetic.

A task vector is ``τ = θ_finetuned − θ_pretrained``. Add vectors to learn
several tasks at once, negate one to forget a task, scale them, and apply the
result to a base model (or to a different pretrained model of the same
architecture)::

    import taskarith as ta
    tv = ta.TaskVector.from_models(pretrained, finetuned)
    model.load_state_dict(tv.apply_to(pretrained, scale=0.5))
"""

from . import io, kernels, merging
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
    "TaskVector",
    "merge",
    "merge_files",
    "methods",
    "TaskArithError",
    "KeyMismatchError",
    "ShapeMismatchError",
    "NonFiniteError",
    "BaseMismatchError",
    "load",
    "save",
    "io",
    "merging",
    "kernels",
    "empty_cache",
    "cache_info",
    "__version__",
]


def load(path, device="cpu") -> TaskVector:
    """Read a task vector from a ``.safetensors`` file (see :meth:`TaskVector.load`)."""
    return TaskVector.load(path, device=device)


def save(vector: TaskVector, path, metadata=None) -> None:
    """Write a task vector to a ``.safetensors`` file atomically (see :meth:`TaskVector.save`)."""
    vector.save(path, metadata=metadata)



# Attribution-guided consolidation, loaded on first use: `import taskarith` never imports captum.
__all__ += ["consolidate", "tune_scale", "attribution"]


def __getattr__(name):
    if name in ("consolidate", "tune_scale"):
        from . import _consolidate

        return getattr(_consolidate, name)
    if name == "attribution":
        import importlib

        return importlib.import_module(".attribution", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
