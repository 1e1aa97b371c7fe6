"""Helpers shared by the tests: switching the backend, comparing bit patterns."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def backend(name: str):
    """Run the block under ``TASKARITH_BACKEND=name`` (restored afterwards)."""
    before = os.environ.get("TASKARITH_BACKEND")
    os.environ["TASKARITH_BACKEND"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["TASKARITH_BACKEND"]
        else:
            os.environ["TASKARITH_BACKEND"] = before


def kernels(on: bool):
    """The compiled kernels on (``numba``) or off (``torch``) inside the block."""
    return backend("numba" if on else "torch")
