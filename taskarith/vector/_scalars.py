"""Scalars that multiply or divide deltas: Python numbers or 0-d tensors, finite and in range."""

from __future__ import annotations

import functools
import math
import numbers

import torch

from ..errors import NonFiniteError, TaskArithError


def _scalar(value: object):
    """A Python number or 0-d real tensor usable as a multiplier, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        return value.detach()
    return None


def _exact_in_float32(value) -> bool:
    """Whether ``value`` is a float, or an int that float32 holds exactly (a larger int would round
    twice on its way there through a float)."""
    return isinstance(value, float) or (isinstance(value, int) and abs(value) <= 1 << 24)


def _is_one(value) -> bool:
    return isinstance(value, numbers.Number) and value == 1


def _require_scalar(value: object, what: str = "the scalar"):
    s = _scalar(value)
    if s is None:
        raise TaskArithError(
            f"{what} must be a real Python number or a 0-d tensor, got {type(value).__name__} {value!r:.60}"
        )
    return s


class DivisionByZeroError(TaskArithError, ZeroDivisionError):
    """A task vector divided by zero (or by a number that is zero in its dtype)."""


def _checked_scalar(value: object, what: str, dtypes, *, divisor: bool = False):
    """``value`` (a Python number or 0-d tensor, returned as given) once it is finite and, cast to
    each of ``dtypes`` (the dtypes it multiplies or divides), neither inf nor, for a ``divisor``,
    zero; otherwise raise an error naming ``what``, the value and the fix."""
    s = _require_scalar(value, what)
    try:
        x = float(s)
    except OverflowError:
        raise NonFiniteError(f"{what} (an int of {len(str(abs(s)))} digits) overflows float64: pass a smaller "
                             f"value as {what}.") from None
    if not math.isfinite(x):
        raise NonFiniteError(f"{what}={x} is not a finite number: pass a finite number as {what}.")
    for dtype in dtypes or [torch.float64]:  # none (an empty vector): still no zero divisor
        largest, smallest = _range_of(dtype)
        if abs(x) > largest:
            wider = " (or convert the vector with .to(dtype=torch.float64))" if dtype != torch.float64 else ""
            raise NonFiniteError(
                f"{what}={s!r:.60} overflows {dtype} (largest finite value {largest!r}), so the deltas would "
                f"become inf: pass a smaller value as {what}{wider}."
            )
        if divisor and abs(x) < smallest:
            raise DivisionByZeroError(
                f"cannot divide a task vector by {what}={s!r:.60}: it is zero in {dtype} (smallest positive "
                f"value {smallest!r}). Divide by a non-zero number, or multiply by 0 to zero the vector."
            )
    return s


@functools.cache
def _range_of(dtype: torch.dtype) -> tuple[float, float]:
    """The largest finite value of ``dtype`` and its smallest positive (subnormal) one."""
    info = torch.finfo(dtype)
    return info.max, info.tiny * info.eps


