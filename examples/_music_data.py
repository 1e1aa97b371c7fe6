"""Data for examples/mnist_music.py: find the IDX files, check them, split them.

An explicit --data-dir is only read: when it lacks the files the study stops at once with one line
that names the folder and the files expected, and writes nothing into it. Without --data-dir the
study looks in ./data/<dataset>; when the files are not there it checks that torchvision's download
host answers before downloading (offline: one line, nothing created), and a download that fails
removes what it created.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import os
import shutil
import socket
import struct
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}

# md5 of each file as stored. The .gz sums are torchvision's (the files its download fetches),
# plus those of Debian's dataset-fashion-mnist package (recompressed, same pixels). The sums of
# uncompressed files are of the decompressed content of verified archives; MNIST's train files
# have no uncompressed sum here, so such files are only checked for shape.
KNOWN_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": {"f68b3c2dcbeaaa9fbdd348bbdeb94873"},
        "train-labels-idx1-ubyte.gz": {"d53e105ee54ea40749a09fcbcd1e9432"},
        "t10k-images-idx3-ubyte.gz": {"9fb629c4189551a2d022fa330f9573f3"},
        "t10k-labels-idx1-ubyte.gz": {"ec29112dd5afa0611ce80d1b7f02629c"},
        "t10k-images-idx3-ubyte": {"2646ac647ad5339dbf082846283269ea"},
        "t10k-labels-idx1-ubyte": {"27ae3e4e09519cfbb04c329615203637"},
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": {"8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                       "cf8536b0aa1a6ac5fa3f23001093305c"},
        "train-labels-idx1-ubyte.gz": {"25c81989df183df01b3e8a0aad5dffbe",
                                       "10bea18fdb374794d4bb42e356e600c9"},
        "t10k-images-idx3-ubyte.gz": {"bef4ecab320f06d8554ea6380940ec79",
                                      "f78720b4224f21cce2f2ccf2d7a94c9a"},
        "t10k-labels-idx1-ubyte.gz": {"bb300cfdad3c16e7a12a480ee83cd310",
                                      "0d30e22e447f3c33dab9ed536400ac01"},
        "train-images-idx3-ubyte": {"f4a8712d7a061bf5bd6d2ca38dc4d50a"},
        "train-labels-idx1-ubyte": {"9018921c3c673c538a1fc5bad174d6f9"},
        "t10k-images-idx3-ubyte": {"8181f5470baa50b63fa0f6fddb340f0a"},
        "t10k-labels-idx1-ubyte": {"15d484375f8d13e6eb1aabb0c3f46965"},
    },
}
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Boot"],
}
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
# The real MNIST test split kept beside this repository (named in the error messages).
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"
FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


class DataUnavailable(Exception):
    """No usable IDX files; main() prints the message as one line and exits with code 2."""


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or raw) of unsigned bytes into an array of its declared shape."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # a truncated or corrupt download, for instance
        raise DataUnavailable(one_line(f"cannot read {path}: {exc}")) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataUnavailable(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise DataUnavailable(f"{path}: header says {dims}, found {data.size} bytes")
    return data.reshape(dims)


def find_idx(folder: Path, stem: str, dataset: str) -> Path | None:
    """The file `stem` (or `stem.gz`) in `folder` or torchvision's `<Folder>/raw` layout."""
    for base in (folder, folder / TORCHVISION_FOLDER[dataset] / "raw"):
        for name in (stem + ".gz", stem):
            if (base / name).is_file():
                return base / name
    return None


def check_md5(path: Path, dataset: str, verify: bool) -> str:
    known = KNOWN_MD5[dataset].get(path.name)
    if known is None:
        return "unverified (no known md5 for this file)"
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest in known:
        return f"verified md5 {digest}"
    if verify:
        raise DataUnavailable(f"{path}: md5 {digest} matches none of the known checksums "
                              f"{sorted(known)}; the file may be corrupt. Replace it, or pass "
                              f"--no-verify to use it anyway.")
    return f"MISMATCH md5 {digest} (used because of --no-verify)"


def _where_to_get(dataset: str) -> str:
    if dataset == "fashion-mnist":
        return ("install Debian's package: apt-get install -y dataset-fashion-mnist "
                f"(files land in {FASHION_SYSTEM})")
    shared = None
    if SHARED_MNIST.is_dir():  # relative to the working directory when that is short
        rel = os.path.relpath(SHARED_MNIST)
        shared = rel if rel.count("..") <= 2 else str(SHARED_MNIST)
    return (f"the real MNIST test split is in {shared}/ (pass --data-dir {shared})" if shared else
            "put the MNIST IDX files in a folder and pass --data-dir")


def _expected(dataset: str) -> str:
    return (f"t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (.gz or not, in the folder or in its "
            f"{TORCHVISION_FOLDER[dataset]}/raw; add train-images-idx3-ubyte and "
            f"train-labels-idx1-ubyte for the full protocol, the test split alone is enough)")


def _found(folder: Path, dataset: str) -> dict:
    return {k: p for k, stem in FILES.items() if (p := find_idx(folder, stem, dataset))}


def locate_files(args) -> tuple[dict[str, Path], list[str]]:
    """Find the IDX files: an explicit --data-dir (read only), else the defaults, else download."""
    if args.data_dir is not None:
        folder = Path(args.data_dir)
        found = _found(folder, args.dataset) if folder.is_dir() else {}
        if "test_images" in found and "test_labels" in found:
            return found, [f"read from {folder}"]
        what = ("does not exist" if not folder.exists() else "is not a folder" if not folder.is_dir()
                else f"has no {args.dataset} IDX test split"
                + (f" (found only {', '.join(p.name for p in found.values())})" if found else ""))
        raise DataUnavailable(f"--data-dir {folder} {what}: expected {_expected(args.dataset)}; "
                              f"nothing was downloaded or written there. To supply the files, "
                              f"{_where_to_get(args.dataset)}.")
    folders = [Path("data") / args.dataset]
    if args.dataset == "fashion-mnist":
        folders.append(FASHION_SYSTEM)
    for folder in folders:
        found = _found(folder, args.dataset)
        if "test_images" in found and "test_labels" in found:
            return found, [f"read from {folder}"]
    tried = " or ".join(str(f) for f in folders)
    hint = f"To supply them, {_where_to_get(args.dataset)}."
    if args.no_download:
        raise DataUnavailable(f"no {args.dataset} IDX files in {tried} and --no-download is set. {hint}")
    return download(folders[0], args.dataset, tried, hint)


# ---------------------------------------------------------------------------------------------
# torchvision's download, only when its host answers, cleaned up when it fails
# ---------------------------------------------------------------------------------------------

def reachable(urls: list, timeout: float = 5.0) -> str | None:
    """The host of the first URL that accepts a TCP connection, None if none does within
    `timeout` seconds in all (DNS included: the probe runs in a thread that is not waited for)."""
    hit = []

    def probe():
        for url in urls:
            parts = urllib.parse.urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                with socket.create_connection((parts.hostname, port), timeout=timeout):
                    hit.append(parts.hostname)
                    return
            except OSError:
                continue

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return hit[0] if hit else None


def torchvision_download(root: Path, dataset: str) -> None:
    """Both splits of the data set through torchvision (into <root>/<Folder>/raw)."""
    import torchvision.datasets as tvd
    cls = tvd.MNIST if dataset == "mnist" else tvd.FashionMNIST
    for train in (True, False):
        cls(str(root), train=train, download=True)


def _mirrors(dataset: str) -> list:
    import torchvision.datasets as tvd
    cls = tvd.MNIST if dataset == "mnist" else tvd.FashionMNIST
    return list(cls.mirrors)


def download(root: Path, dataset: str, tried: str, hint: str) -> tuple[dict, list]:
    """Download into `root`; on any failure remove every file and folder this call created."""
    try:
        mirrors = _mirrors(dataset)
    except ImportError:
        raise DataUnavailable(f"no {dataset} IDX files in {tried}, and torchvision (which would "
                              f"download them) is not installed. {hint}") from None
    host = reachable(mirrors)
    if host is None:
        hosts = ", ".join(urllib.parse.urlsplit(u).hostname for u in mirrors)
        raise DataUnavailable(f"no {dataset} IDX files in {tried}, and the download host ({hosts}) "
                              f"cannot be reached (offline?); nothing was written. {hint}")
    top = root  # the highest folder this call creates (removed whole on failure)
    while not top.parent.exists():
        top = top.parent
    before = set(root.rglob("*")) if root.exists() else None
    print(f"downloading {dataset} with torchvision from {host} into {root} ...", flush=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torchvision_download(root, dataset)
        found = _found(root, dataset)
        if len(found) < len(FILES):
            raise RuntimeError(f"found only {sorted(p.name for p in found.values())} afterwards")
    except BaseException as exc:
        if before is None:
            shutil.rmtree(top, ignore_errors=True)
        else:  # deepest first, so that emptied folders go too
            for path in sorted(set(root.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
                (shutil.rmtree if path.is_dir() else Path.unlink)(path)
        if not isinstance(exc, Exception):
            raise
        raise DataUnavailable(one_line(f"the torchvision download of {dataset} into {root} failed "
                                       f"({type(exc).__name__}: {exc}); what it wrote was removed. "
                                       f"{hint}", limit=500)) from None
    return found, [f"downloaded by torchvision from {host} into {root}"]


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

@dataclass
class Split:
    x: torch.Tensor  # float32 [n, 784], pixels scaled to [-1, 1]
    y: torch.Tensor  # int64 [n]

    def __len__(self):
        return len(self.y)

    def to(self, device):
        return Split(self.x.to(device), self.y.to(device))


def to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    # x / 127.5 - 1 is exactly ToTensor() (x / 255) followed by Normalize(mean=0.5, std=0.5).
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0)
    return Split(x, torch.from_numpy(labels.astype(np.int64)))


def read_arrays(args) -> tuple[dict, list]:
    """Find, check and read the IDX files: {train_/test_ images/labels: array}, provenance lines."""
    paths, provenance = locate_files(args)
    provenance += [f"{p}: {check_md5(p, args.dataset, not args.no_verify)}" for p in paths.values()]
    return {k: read_idx(p) for k, p in paths.items()}, provenance


def stratified(labels: np.ndarray, n: int, rng) -> np.ndarray:
    """n indices drawn without replacement with each class's share of `labels` (largest remainder)."""
    counts = np.bincount(labels, minlength=10)
    quota = n * counts / counts.sum()
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[:n - take.sum()]] += 1
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
                           for c, k in enumerate(take) if k])


def split_data(arrays: dict, args, split_seed: int) -> dict:
    """Split the arrays: pretrain / validation / three task sets / evaluation.

    Full mode: the training split feeds pretraining, validation and the task sets; the whole test
    split evaluates (its natural class mix). Test-split mode: the evaluation part is drawn first,
    stratified to the test split's class mix, then the task sets, then validation and pretraining
    from what is left, all disjoint."""
    rng = np.random.default_rng(split_seed)
    full = "train_images" in arrays and "train_labels" in arrays
    if full:
        pool_x, pool_y = arrays["train_images"], arrays["train_labels"]
        eval_x, eval_y = arrays["test_images"], arrays["test_labels"]
    else:
        pool_x, pool_y = arrays["test_images"], arrays["test_labels"]
    task_n = args.task_samples or (1000 if full else 300)
    val_n = args.val_size or (5000 if full else 1000)

    taken = np.zeros(len(pool_y), dtype=bool)
    if not full:
        eval_idx = stratified(pool_y, min(args.eval_size, len(pool_y)), rng)
        taken[eval_idx] = True
        eval_x, eval_y = pool_x[eval_idx], pool_y[eval_idx]
    tasks = {}
    for c in args.digits:  # task sets (exclusive), then the rest shuffled into validation / pretrain
        candidates = np.flatnonzero((pool_y == c) & ~taken)
        if len(candidates) < task_n:
            raise DataUnavailable(f"only {len(candidates)} samples of class {c} left for its task set; "
                                  f"lower --task-samples (asked for {task_n}) or --eval-size")
        idx = rng.choice(candidates, size=task_n, replace=False)
        taken[idx] = True
        tasks[c] = to_split(pool_x[idx], pool_y[idx])
    rest = rng.permutation(np.flatnonzero(~taken))
    val_idx, pre_idx = rest[:val_n], rest[val_n:]
    if len(pre_idx) < 1000:
        raise DataUnavailable(f"only {len(pre_idx)} samples left for pretraining; "
                              f"lower --val-size / --eval-size / --task-samples")
    note = None if full else (
        f"Test-split mode: only the {len(pool_y)}-image test split was found, so it is split "
        f"disjointly into evaluation ({len(eval_y)}, stratified to the test split's class mix), "
        f"task sets ({task_n} per class, fewer than the study's 1000), validation ({len(val_idx)}) "
        f"and pretraining ({len(pre_idx)}) parts.")
    share = dict(evaluation=float(np.isin(eval_y, args.digits).mean()),
                 source=float(np.isin(arrays["test_labels"], args.digits).mean()))
    return dict(full=full, note=note, task_samples=task_n, task_share=share, split_seed=split_seed,
                eval_class_counts=np.bincount(eval_y, minlength=10).tolist(),
                pretrain=to_split(pool_x[pre_idx], pool_y[pre_idx]),
                val=to_split(pool_x[val_idx], pool_y[val_idx]),
                eval=to_split(eval_x, eval_y), tasks=tasks,
                sizes=dict(pretrain=len(pre_idx), val=len(val_idx), eval=len(eval_y),
                           task_per_class=task_n))


def seed_split(args, seed: int) -> int:
    """The split seed of a study seed: --split-seed, plus the seed with --vary-split."""
    return args.split_seed + seed if getattr(args, "vary_split", False) else args.split_seed


def load_data(args, split_seed: int | None = None) -> dict:
    """Read the IDX files and split them (split seed: --split-seed unless given)."""
    arrays, provenance = read_arrays(args)
    data = split_data(arrays, args, args.split_seed if split_seed is None else split_seed)
    return dict(data, provenance=provenance)
