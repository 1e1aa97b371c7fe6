"""``taskarith inspect``: describe task vectors, as a table or as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .. import metrics
from ..errors import TaskArithError
from ..vector import TaskVector

__all__ = ["inspect"]


def inspect(args, parser) -> None:
    if args.density is not None and not 0 < args.density <= 1:
        parser.error(f"inspect: --density must be in (0, 1], got {args.density}")
    if args.atol < 0:
        parser.error(f"inspect: --atol must be >= 0, got {args.atol}")
    missing = [p for p in args.vectors if not Path(p).is_file()]
    if missing:
        raise TaskArithError(f"no such vector file(s): {', '.join(map(repr, missing))}")
    vectors = [TaskVector.load(p) for p in args.vectors]
    report = {"vectors": [_describe(p, v, args.atol) for p, v in zip(args.vectors, vectors)]}
    if len(vectors) > 1:
        report.update(_compare(vectors, args.density))
    if args.json:
        print(json.dumps(_finite(report), indent=2))
    else:
        print(_table(report))


def _describe(path: str, v: TaskVector, atol: float) -> dict:
    return {
        "path": path, "tensors": len(v), "entries": v.numel(), "nbytes": v.nbytes,
        "dtypes": {str(d).replace("torch.", ""): n for d, n in v.dtypes.items()},
        "norm": v.norm(), "sparsity": metrics.sparsity(v, atol=atol), "skipped": list(v.skipped),
    }


def _compare(vectors: list[TaskVector], density: float | None) -> dict:
    """What several vectors are to each other: cosines and sign conflicts (also among the top ``density``)."""
    report = {"cosine": metrics.cosine_matrix(vectors).tolist(),
              "sign_conflict_rate": metrics.sign_conflict_rate(vectors)}
    if density is not None:
        report["density"] = density
        report["sign_conflict_rate_at_density"] = metrics.sign_conflict_rate(vectors, density=density)
    return report


def _finite(obj):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _table(report: dict) -> str:
    rows = [["#", "vector", "tensors", "entries", "dtypes", "norm", "sparsity"]]
    for i, d in enumerate(report["vectors"]):
        dtypes = ", ".join(d["dtypes"]) or "-"
        rows.append([str(i), d["path"], str(d["tensors"]), f"{d['entries']:,}", dtypes, f"{d['norm']:.6g}",
                     f"{100 * d['sparsity']:.2f}%"])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 1 or c == 4 else cell.rjust(w) for c, (cell, w) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    if "cosine" in report:
        lines += _comparison_lines(report)
    return "\n".join(lines)


def _comparison_lines(report: dict) -> list[str]:
    n = len(report["cosine"])
    lines = ["", "cosine similarity", "     " + "".join(f"{f'[{j}]':>8}" for j in range(n))]
    lines += [f"{f'[{i}]':>5}" + "".join(f"{c:>8.4f}" for c in row) for i, row in enumerate(report["cosine"])]
    lines += ["", f"sign conflict rate: {report['sign_conflict_rate']:.4f}"]
    if "sign_conflict_rate_at_density" in report:
        lines.append(f"sign conflict rate (top {report['density']:g} of each vector): "
                     f"{report['sign_conflict_rate_at_density']:.4f}")
    return lines
