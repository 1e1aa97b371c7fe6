"""Where files may be read from and written to: containment, the output policy, atomic temporaries.

The output policy protects what a user already has on disk:

* an output that is, contains or lies inside an input is refused before any work;
* an existing output is replaced only if taskarith wrote it (a folder holds the
  marker file ``.taskarith-output`` listing what it wrote, and nothing else; a
  ``.safetensors`` file carries ``taskarith.*`` metadata) or the caller passes
  ``overwrite=True``; a file never becomes a folder
  and a folder never becomes a file;
* everything is written under a temporary name beside the output,
  ``.NAME.taskarith-tmp-PID-XXXX``, and renamed into place when complete; a later
  write to the same output removes the temporaries of processes that no longer run
  (a killed merge leaves nothing behind for long).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import TaskArithError

MARKER = ".taskarith-output"
_TMP_TAG = "taskarith-tmp"


def is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both already resolved)."""
    return path == folder or folder in path.parents


def contained_link_target(folder: str | os.PathLike, file: str | os.PathLike) -> Path | None:
    """The real path of ``file`` if it lies in ``folder`` or, for a Hugging Face cache snapshot
    (``<repo>/snapshots/<revision>``), in that repository's ``blobs`` folder; else None."""
    real, root = Path(os.path.realpath(file)), Path(os.path.realpath(folder))
    if is_within(real, root):
        return real
    if root.parent.name == "snapshots" and is_within(real, root.parent.parent / "blobs"):
        return real
    return None


# ------------------------------------------------------------------ the policy


def check_output(out: str | os.PathLike, *, inputs: Iterable[object] = (), overwrite: bool = False,
                 folder: bool, flag: str = "overwrite=True") -> Path:
    """Refuse an output that would lose a user's file; returns ``out`` as a Path.

    Args:
        out: the file or folder about to be written.
        inputs: every input of the command (paths; other objects are ignored).
        overwrite: the user allows replacing an existing output taskarith did not write.
        folder: whether ``out`` will be a folder (else a file).
        flag: how the user says ``overwrite`` (the command line passes ``--overwrite``).
    """
    out = Path(out)
    real_out = Path(os.path.realpath(out))
    for source in inputs:
        if not isinstance(source, (str, os.PathLike)) or not os.path.exists(source):
            continue
        real_in = Path(os.path.realpath(source))
        if real_out == real_in or (out.exists() and os.path.samefile(out, source)):
            relation = "is"
        elif is_within(real_in, real_out):
            relation = "contains"
        elif is_within(real_out, real_in):
            relation = "lies inside"
        else:
            continue
        raise TaskArithError(f"the output {str(out)!r} {relation} the input {str(source)!r}: writing it would "
                             "destroy an input. Choose an output outside every input.")
    if not os.path.lexists(out):
        return out
    kind = "folder" if out.is_dir() else "file"
    if folder and kind == "file":
        raise TaskArithError(f"the output {str(out)!r} is an existing file, and a model is written as a folder: "
                             "choose another output (a file is never replaced by a folder).")
    if not folder and kind == "folder":
        raise TaskArithError(f"the output {str(out)!r} is an existing folder, and this writes a single file: "
                             "choose a file name (a folder is never replaced by a file).")
    if overwrite or (not folder and is_taskarith_file(out)):
        return out
    foreign = _foreign_entries(out) if folder else None
    if foreign == []:
        return out
    if foreign:
        raise TaskArithError(f"the output {str(out)!r} is a folder taskarith wrote, but it now also holds "
                             f"{', '.join(map(repr, foreign[:10]))}, which taskarith did not write; pass {flag} "
                             "to replace it with them, or move them out first.")
    raise TaskArithError(f"the output {str(out)!r} exists and was not written by taskarith; pass {flag} to "
                         f"replace it, or choose another output.")


def _foreign_entries(folder: Path) -> list[str] | None:
    """The entries of ``folder`` taskarith did not write: none for an empty folder, those missing from
    the marker's list for a folder taskarith wrote, and None (unknown: all of them) for any other."""
    present = sorted(e.name for e in folder.iterdir())
    if not present:
        return []
    try:
        written = json.loads((folder / MARKER).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(written, list):
        return None
    return [name for name in present if name != MARKER and name not in written]


def is_taskarith_file(path: Path) -> bool:
    """Whether ``path`` is a valid safetensors file whose metadata says taskarith wrote it."""
    from ._reader import Checkpoint  # the reader needs this module's containment rules first

    try:
        return path.suffix == ".safetensors" and any(k.startswith("taskarith.") for k in Checkpoint(path).metadata)
    except (TaskArithError, OSError):
        return False


# ------------------------------------------------------------- temporaries


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other way to read it; set back at once
    os.umask(mask)
    return mask


def _temp(target: Path, *, folder: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    prefix = f".{target.name}.{_TMP_TAG}-{os.getpid()}-"
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: a model folder follows the umask
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def remove_stale(target: Path) -> None:
    """Remove temporaries beside ``target`` left by taskarith processes that no longer run.

    A previous output moved aside (``...old``) by a process killed before its
    replacement was renamed in is put back when ``target`` is missing.
    """
    prefix = f".{target.name}.{_TMP_TAG}-"
    try:
        entries = [e for e in target.parent.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if entry.name.endswith(".old") and not os.path.lexists(target):
            os.replace(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; flush it to disk and rename it over ``path`` on success.

    On any exception (KeyboardInterrupt included) the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = _temp(path, folder=False)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` (holding the taskarith marker); swap it into place
    on success, removing the previous ``path``. On any exception ``path`` is left as it was."""
    path = Path(path)
    tmp = _temp(path, folder=True)
    try:
        yield tmp
        # The marker lists what was written, so that a later write replaces the folder only while it
        # holds nothing else (a file the user added since is never deleted without being asked).
        entries = sorted(e.name for e in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"written_by": "taskarith", "entries": entries}, indent=1) + "\n")
        if os.path.lexists(path):
            old = tmp.with_name(tmp.name + ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def scratch_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``target`` for intermediate files, removed on exit (and, should this
    process be killed, by the next write to ``target``)."""
    tmp = _temp(Path(target), folder=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
