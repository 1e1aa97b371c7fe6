"""What a vector knows about where it came from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Info:
    """What a vector knows about where it came from (kept through algebra when unambiguous)."""

    skipped: tuple[str, ...] = ()
    base_fingerprint: str | None = None
    dtype_policy: str = "given"
    metadata: Mapping[str, str] = field(default_factory=dict)

    def combine(self, other: Info) -> Info:
        return Info(
            skipped=tuple(sorted(set(self.skipped) | set(other.skipped))),
            base_fingerprint=self.base_fingerprint if self.base_fingerprint == other.base_fingerprint else None,
            dtype_policy=self.dtype_policy if self.dtype_policy == other.dtype_policy else "mixed",
        )
