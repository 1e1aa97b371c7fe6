"""The exception family of taskarith.

Every input problem raises a :class:`TaskArithError` (a :class:`ValueError`), so
``except ValueError`` keeps working for callers that do not know this library.
Messages name the offending key, what was expected, what was given, and the fix;
where several keys are wrong, all of them are reported at once.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "BaseMismatchError",
    "KeyMismatchError",
    "NonFiniteError",
    "ShapeMismatchError",
    "TaskArithError",
]

_MAX_LISTED = 20  # a message listing 10,000 names helps nobody


class TaskArithError(ValueError):
    """Base class of every error raised by taskarith for bad input."""


class KeyMismatchError(TaskArithError):
    """Two collections of tensors do not hold the same names.

    Attributes:
        missing: names the reference has and the other lacks, sorted.
        extra: names the other has and the reference lacks, sorted.
    """

    def __init__(self, message: str, *, missing: Iterable[str] = (), extra: Iterable[str] = ()):
        super().__init__(message)
        self.missing = sorted(missing)
        self.extra = sorted(extra)


class ShapeMismatchError(TaskArithError):
    """Tensors under the same name have different shapes, dtypes or devices."""


class NonFiniteError(TaskArithError):
    """NaN or infinite values were found where the caller asked for finite ones."""


class BaseMismatchError(TaskArithError):
    """A task vector was applied to a base model it was not extracted from."""


def format_names(names: Iterable[str]) -> str:
    """Render names for a message: quoted, sorted, truncated after a few dozen."""
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", ... ({len(names) - _MAX_LISTED} more)"
    return shown


def check_same_keys(expected: Iterable[str], got: Iterable[str], *, what: str, fix: str) -> None:
    """Raise :class:`KeyMismatchError` listing every missing and extra name.

    Args:
        expected: names of the reference collection.
        got: names of the collection being checked.
        what: a phrase naming the two sides, e.g. ``"pretrained vs finetuned"``.
        fix: one sentence telling the caller what to do.
    """
    expected, got = set(expected), set(got)
    if expected == got:
        return
    missing, extra = expected - got, got - expected
    parts = [f"key mismatch ({what}):"]
    if missing:
        parts.append(f"missing {len(missing)}: {format_names(missing)};")
    if extra:
        parts.append(f"extra {len(extra)}: {format_names(extra)};")
    parts.append(fix)
    raise KeyMismatchError(" ".join(parts), missing=missing, extra=extra)


def raise_if_any(problems: list[str], *, error: type[TaskArithError], header: str, fix: str) -> None:
    """Raise ``error`` listing every problem at once, or do nothing when there are none."""
    if not problems:
        return
    shown = "; ".join(problems[:_MAX_LISTED])
    if len(problems) > _MAX_LISTED:
        shown += f"; ... ({len(problems) - _MAX_LISTED} more)"
    raise error(f"{header} ({len(problems)}): {shown}. {fix}")
