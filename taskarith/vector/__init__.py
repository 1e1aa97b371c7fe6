"""The task vector: :class:`TaskVector` and the pieces it is made of.

* :mod:`._core` — construction (from a mapping, from two models), the mapping interface, conversion;
* :mod:`._algebra` — operators, in-place forms, weighted sums, reductions;
* :mod:`._apply` — :meth:`TaskVector.apply_to` and its checks;
* :mod:`._files` — save, load, metadata; :mod:`._scalars` — scalar checks; :mod:`._info` — provenance.
"""

from ._algebra import _dot64  # noqa: F401  (package-private: metrics)
from ._core import TaskVector
from ._files import file_metadata
from ._info import Info as _Info  # noqa: F401  (package-private: merging, attribution)
from ._scalars import DivisionByZeroError, _checked_scalar  # noqa: F401  (package-private)

__all__ = ["DivisionByZeroError", "TaskVector", "file_metadata"]
