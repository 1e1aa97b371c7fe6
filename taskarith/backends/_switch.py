"""Which kernels run: one switch for every accelerated path.

``TASKARITH_BACKEND`` in the environment chooses:

* ``auto`` (the default): compiled Numba kernels for CPU tensors and Triton kernels for CUDA
  tensors, wherever they take the tensors at hand, torch everywhere else;
* ``torch``: the torch reference path only;
* ``numba`` / ``triton``: that accelerator where it applies, never the other one.

Every path computes the same bits, so the switch changes speed, never results (the tests compare
the paths bit for bit). The older ``TASKARITH_NUMBA=0`` still turns the Numba kernels off when
``TASKARITH_BACKEND`` is not set.
"""

from __future__ import annotations

import os

from ..errors import TaskArithError

CHOICES = ("auto", "torch", "numba", "triton")


def selected() -> str:
    """The backend the environment asks for (read at every call: tests and benchmarks switch it).

    Example:
        >>> selected() in CHOICES
        True
    """
    value = os.environ.get("TASKARITH_BACKEND")
    if value is None:
        return "triton" if os.environ.get("TASKARITH_NUMBA") == "0" else "auto"
    choice = value.strip().lower()
    if choice not in CHOICES:
        raise TaskArithError(f"TASKARITH_BACKEND={value!r} is not a backend: set it to one of "
                             f"{', '.join(CHOICES)} (or unset it for auto)")
    return choice


def allows(accelerator: str) -> bool:
    """Whether ``accelerator`` (``"numba"`` or ``"triton"``) may run under the selected backend."""
    choice = selected()
    return choice == "auto" or choice == accelerator
