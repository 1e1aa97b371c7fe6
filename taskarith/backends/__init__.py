"""Backends: the torch reference maths and the accelerators that compute the same bits faster.

* :mod:`._switch` — ``TASKARITH_BACKEND=auto|torch|numba|triton``, the one switch;
* :mod:`.kernels`, :mod:`.thresholds`, :mod:`.election`, :mod:`.draws` — the torch/numpy reference:
  exact selection, trim thresholds and tie cuts, sign election, keyed random draws;
* :mod:`._fused` — TIES' trim → elect → disjoint mean, blocked, dispatching to the accelerators;
* :mod:`._numba`, :mod:`._numba_kernels`, :mod:`._numba_select` — compiled CPU kernels;
* :mod:`._triton`, :mod:`._triton_kernels` — GPU kernels.

"Not taken": an accelerator's entry point returns False or None, writing nothing, wherever it does
not apply (device, dtype, layout, size, the switch); the caller then runs the reference path.
"""

from ._switch import CHOICES, allows, selected

__all__ = ["CHOICES", "allows", "selected"]
