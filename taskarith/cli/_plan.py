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
    base: Path | None  # the base model; for mergekit configs, the model whose layout and files the output takes
    sources: list[Path]  # (mergekit slices: views assembling layers of several models)
    weights: list | None
    options: dict = field(default_factory=dict)
    dtype: torch.dtype | None = None
    dialect: str = "taskarith"
    compute_dtype: torch.dtype | None = None  # mergekit's dtype: the models' weights converted before merging
    base_used: bool = True  # whether the method reads the base model (mergekit's linear does not)
    notes: list[str] = field(default_factory=list)  # said once the merge is written (a seed drawn for it)
    config: dict | None = None  # config.json keys the output changes (a layer count changed by slices)
    files: dict[str, str | bytes | None] = field(default_factory=dict)  # written beside the weights (None: not copied)

    def paths(self) -> list:
        """Every input path (the models behind slice views included)."""
        return [p for s in [self.base, *self.sources] if s is not None for p in getattr(s, "paths", [s])]

    def describe(self) -> dict:
        described = {"dialect": self.dialect, "method": self.method, "base": str(self.base) if self.base else None,
                     self.kind: [str(s) for s in self.sources], "weights": _shown(self.weights),
                     "options": {k: _shown(v) for k, v in self.options.items()},
                     "dtype": _dtype(self.dtype)}
        if self.dialect == "mergekit":
            described.update(compute_dtype=_dtype(self.compute_dtype), base_used=self.base_used,
                             config=self.config, notes=self.notes)
        return described


def _dtype(dtype) -> str | None:
    return str(dtype).replace("torch.", "") if dtype else None


def _shown(value):
    """A value for JSON: per-tensor values as their description."""
    if isinstance(value, (list, tuple)):
        return [_shown(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)
