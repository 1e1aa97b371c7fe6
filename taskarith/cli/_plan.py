"""What a merge config resolves to: the :class:`Plan` that ``taskarith merge`` runs, and the dtype names
that configs and ``--dtype`` accept."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["DTYPES", "Plan"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}


@dataclass
class Plan:
    """A validated merge: what :func:`taskarith.merge_files` (or :func:`taskarith.merge`) will run."""

    method: str
    kind: str  # "models" (fine-tuned checkpoints) or "vectors" (task vector files)
    base: Path | None
    sources: list[Path]
    weights: list[float] | None
    options: dict = field(default_factory=dict)
    dtype: torch.dtype | None = None
    dialect: str = "taskarith"

    def describe(self) -> dict:
        return {"dialect": self.dialect, "method": self.method, "base": str(self.base) if self.base else None,
                self.kind: [str(s) for s in self.sources], "weights": self.weights, "options": self.options,
                "dtype": str(self.dtype).replace("torch.", "") if self.dtype else None}
