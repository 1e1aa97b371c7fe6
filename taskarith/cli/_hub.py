"""Hugging Face Hub ids in merge configs: ``org/name`` (or ``org/name@revision``) that is not a local path
is read from the Hugging Face cache, and downloaded into it when the Hub may be reached, as mergekit does.

The cache is the one ``huggingface_hub`` uses: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``, read when the config is (not when ``huggingface_hub`` was imported), and
``HF_HUB_OFFLINE=1`` forbids downloading. A model found nowhere is one line saying how to fetch it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import TaskArithError

__all__ = ["cache_folder", "is_repo_id", "offline", "snapshot", "split_revision"]

# What the Hub allows in a repo id: "org/name", letters, digits, '-', '_' and '.', no '..' and no leading '.'.
_REPO_ID = re.compile(r"(?!\.)[\w.-]{1,96}/(?!\.)[\w.-]{1,96}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# A model's weights, config and tokenizer files (mergekit downloads the same, and safetensors only).
_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
_TRUE = {"1", "on", "yes", "true"}


def split_revision(value: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` as ``("org/name", "rev")``; a text without one ``@`` as ``(value, None)``."""
    if value.count("@") == 1:
        path, revision = value.split("@")
        if path and revision:
            return path, revision
    return value, None


def is_repo_id(value: str) -> bool:
    """Whether ``value`` (without its ``@revision``) can name a model on the Hub."""
    return bool(_REPO_ID.fullmatch(value)) and ".." not in value and not value.endswith(".safetensors")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (``huggingface_hub`` reads it only when imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cache_folder() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` finds it, from the environment as it is now."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "huggingface" / "hub"


def snapshot(repo_id: str, revision: str | None = None, *, what: str = "model") -> Path:
    """The local folder of ``repo_id`` at ``revision`` (default: main): from the cache, else downloaded
    into it unless offline. Raises one-line :class:`TaskArithError` naming the model and how to fetch it."""
    cache = cache_folder()
    found = _cached(cache, repo_id, revision)
    if found is not None:
        return found
    shown = repo_id + (f"@{revision}" if revision else "")
    fetch = f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}`"
    if offline():
        raise TaskArithError(f"{shown!r} is not a local path, and the {what} is not in the Hugging Face cache "
                             f"({cache}) while HF_HUB_OFFLINE=1 forbids downloading it: fetch it first with {fetch} "
                             "where the Hub can be reached (the same cache), or give a local folder")
    try:
        import huggingface_hub
    except ImportError:
        raise TaskArithError(f"{shown!r} is not a local path nor a {what} in the Hugging Face cache ({cache}); "
                             f"downloading it needs huggingface_hub (pip install huggingface_hub), or fetch it "
                             f"with {fetch}, or give a local folder") from None
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                                   allow_patterns=_PATTERNS)
    except Exception as err:  # noqa: BLE001 - any failure of the download is reported as one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TaskArithError(f"{shown!r} is not a local path, and downloading the {what} from the Hugging Face "
                             f"Hub failed ({type(err).__name__}: {reason[:200]}): check the name, the revision, "
                             f"your network and token (HF_TOKEN), or fetch it with {fetch}") from None
    return Path(folder)


def _cached(cache: Path, repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot of ``repo_id`` at ``revision``, by the cache's layout: ``models--org--name``
    holds ``refs/<branch or tag>`` (a commit hash) and ``snapshots/<commit>/``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    commit = revision
    if ".." in revision.split("/") or revision.startswith("/"):
        return None
    if not _COMMIT.fullmatch(revision):
        try:
            commit = (repo / "refs" / revision).read_text().strip()
        except (OSError, ValueError):
            return None
        if not _COMMIT.fullmatch(commit):
            return None
    folder = repo / "snapshots" / commit
    try:
        return folder if folder.is_dir() and any(folder.iterdir()) else None
    except OSError:
        return None
