#!/usr/bin/env python
"""The goal-1 ratios of a ``bench_goals.py`` result file as one Markdown table (op x shapes and dtype),
plus the other goals and the count met: what ``benchmarks/README.md`` shows under "Measured".

    python benchmarks/goals_table.py benchmarks/results/goals-vm-cpu.json
    python benchmarks/goals_table.py --compare BEFORE.json AFTER.json   # absolute GB/s, op by op
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHAPES = {"transformer": "transformer", "lora": "LoRA"}


def render(report: dict) -> str:
    """Each cell: the ratio to the run's best probe (the goal's), then in parentheses the ratio to the
    probe timed in alternation with the op (``paired_ratio``), where the file has it."""
    rows = report.get("vector_ops", [])
    lines = [_grid("op", rows, lambda key, row: _cell(row))]
    goals = report.get("goals", [])
    others = [g for g in goals if g["group"] != "vector_ops"]
    if others:
        lines.append("")
        lines += [f"- {g['name']}: {g['measured']}, **{g['value']:.2f}x** (goal {g['comparison']} {g['target']}x, "
                  f"{'met' if g['passed'] else 'not met'})" for g in others]
    lines.append("")
    lines.append(f"{sum(g['passed'] for g in goals)} of {len(goals)} goals met.")
    return "\n".join(lines)


def _grid(corner: str, rows: list[dict], cell) -> str:
    """A table of ``rows`` (result rows of goal 1): an op per line, a shapes-and-dtype block per column,
    ``cell(key, row)`` in each (``row`` None where the file has none)."""
    blocks = list(dict.fromkeys((r["shapes"], r["dtype"]) for r in rows))
    by_cell = {(r["op"], r["shapes"], r["dtype"]): r for r in rows}
    lines = [f"| {corner} | " + " | ".join(f"{SHAPES.get(s, s)} {d}" for s, d in blocks) + " |",
             "| --- |" + " ---: |" * len(blocks)]
    for op in dict.fromkeys(r["op"] for r in rows):
        cells = [cell((op, s, d), by_cell.get((op, s, d))) for s, d in blocks]
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row: dict | None) -> str:
    if row is None:
        return "—"
    paired = f" ({row['paired_ratio']:.2f})" if "paired_ratio" in row else ""
    return f"{row['ratio']:.2f}{paired}"


def compare(before: dict, after: dict) -> str:
    """Goal 1's absolute GB/s of two result files, op by op: what changed, whatever the probes did."""
    old = {(r["op"], r["shapes"], r["dtype"]): r["gbps"] for r in before.get("vector_ops", [])}
    rows = [r for r in after.get("vector_ops", []) if (r["op"], r["shapes"], r["dtype"]) in old]
    return _grid("op (GB/s, before → after)", rows,
                 lambda key, row: "—" if row is None else f"{old[key]:.1f} → {row['gbps']:.1f}")


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--compare":
        before, after = (json.loads(Path(p).read_text()) for p in argv[1:])
        print(compare(before, after))
        return 0
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print(render(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
