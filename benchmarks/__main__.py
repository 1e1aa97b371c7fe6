"""``python -m benchmarks``: the benchmark suite (see ``benchmarks/run.py``)."""

import sys
from pathlib import Path

# The scripts in this directory import each other as top-level modules (``import _common as bench``).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import main  # sibling file, importable once on sys.path

if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks"))
