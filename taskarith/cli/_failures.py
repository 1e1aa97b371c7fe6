"""How a failure or a signal ends the command: one line on stderr and an exit code, never a traceback
unless ``--debug``; SIGTERM unwinds like Ctrl-C so that every temporary file is removed on the way out."""

from __future__ import annotations

import re
import signal

from ..errors import TaskArithError

__all__ = ["Terminated", "one_line", "terminate_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every temporary file is removed on the way out."""


class terminate_as_interrupt:
    def __enter__(self):
        self.previous = None
        try:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread: leave signals alone
            pass

    @staticmethod
    def _raise(signum, frame):
        raise Terminated()

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# How the Python API's messages name options, and the flags a command-line user types instead.
_FLAGS = [
    (r"\boverwrite=True", "--overwrite"),
    (r"\bon_base_mismatch='ignore'", "--on-base-mismatch ignore"),
    (r"\bon_base_mismatch='raise'", "--on-base-mismatch raise"),
    (r"\ballow_pickle=True", "--allow-pickle"),
    (r"\bcheck_finite=True", "--check-finite"),
    (r"\bstrict=False", "--partial"),
    (r"\bmax_memory\b", "--max-memory"),
    (r"\bshard_size\b", "--shard-size"),
]


def one_line(err: Exception) -> str:
    """What ``taskarith: error:`` says about ``err``: its message on one line, in the command line's words;
    an unexpected kind of failure also says what it was and how to see more."""
    message = cli_words(" ".join(str(err).split()) or type(err).__name__)
    if not isinstance(err, (TaskArithError, OSError)):
        message = f"{type(err).__name__}: {message} (run with --debug for the traceback)"
    return message


def cli_words(message: str) -> str:
    """A library message in the command line's words: its flags instead of Python keywords."""
    for pattern, flag in _FLAGS:
        message = re.sub(pattern, flag, message)
    return message
