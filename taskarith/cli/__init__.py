"""``taskarith extract|apply|merge|inspect``: a thin command line over the Python API.

Exit codes: 0 success, 1 failure (a one-line ``taskarith: error: ...`` on
stderr; ``--debug`` shows the traceback), 2 usage error. Merge configs (YAML or
JSON, the taskarith format or mergekit's) are validated as a whole, with line
numbers, before any tensor is read, as ``docs/cli.md`` describes.

Layout:

- ``_parser``: the argparse parser, its subcommands and help texts;
- ``_vectors`` (extract, apply), ``_merge``, ``_inspect``: what each subcommand does;
- ``_output``: what the commands share to write their results;
- ``_failures``: how failures and signals become one line and an exit code;
- merge configs: ``_config`` (load, parse, taskarith's own format), ``_mergekit``
  (mergekit's format), ``_document`` (a config's values, their lines, its problems),
  ``_plan`` (the validated merge) and ``_yaml`` (bounded YAML/JSON reading).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from ._failures import Terminated, one_line, terminate_as_interrupt
from ._parser import build_parser

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also the console script's entry point).

    Example:
        >>> from taskarith.cli import main
        >>> main(["inspect", "no-such-vector.safetensors"])  # prints a one-line error to stderr
        1
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) and usage errors (2)
        return int(exit_.code or 0)
    debug = getattr(args, "debug", False)
    try:
        with terminate_as_interrupt():
            args.run(args, parser)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Terminated:
        print("taskarith: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("taskarith: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure becomes one line unless --debug
        if debug:
            raise
        print(f"taskarith: error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0
