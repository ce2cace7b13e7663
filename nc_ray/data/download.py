"""Fetch, verify and cache dataset files: one download path and one cache path for every dataset.

Layout under `cache_dir()`: `<name>.npz` (the parsed arrays, the only lasting state), `<name>.lock`
(serializes building across processes), `<name>/` (downloads, removed once the .npz is written).
Every file is written to a temporary name in its final directory and then `os.replace`d, so
readers never see a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
from filelock import FileLock

from nc_ray.data.base import DatasetError

log = logging.getLogger(__name__)

T = TypeVar("T")

DOWNLOAD_TIMEOUT_S = 60.0

# What parsing a damaged or truncated file raises (gzip, tar, pickle, and our own format checks).
_CORRUPT = (OSError, EOFError, ValueError, zlib.error, tarfile.TarError, pickle.UnpicklingError)


@dataclass(frozen=True)
class Remote:
    """Where a dataset's files live: base URLs tried in order, and each file's published MD5."""

    mirrors: tuple[str, ...]
    md5: Mapping[str, str]


def cache_dir() -> Path:
    """The dataset cache directory: $NC_RAY_DATA, else ~/.cache/nc_ray/data."""
    return Path(os.environ.get("NC_RAY_DATA") or "~/.cache/nc_ray/data").expanduser()


@contextlib.contextmanager
def atomic_write(dest: Path) -> Iterator[BinaryIO]:
    """Yield a file that becomes `dest` only if the block completes; otherwise it is deleted."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download(remote: Remote, filename: str, path: Path) -> None:
    expected = remote.md5[filename]
    path.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for base in remote.mirrors:
        url = f"{base.rstrip('/')}/{filename}"
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, atomic_write(path) as out:
                digest = hashlib.md5(usedforsecurity=False)
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                if digest.hexdigest() != expected:
                    raise DatasetError(f"MD5 mismatch: got {digest.hexdigest()}, expected {expected}")
            return
        except (OSError, ValueError, http.client.HTTPException) as e:
            errors.append(f"{url} ({e})")
    raise DatasetError(f"{path}: no verified download; tried " + "; ".join(errors))


def fetch(remote: Remote, filename: str, dest_dir: Path, parse: Callable[[Path], T]) -> T:
    """Return parse(dest_dir/filename), downloading the file unless a copy with its MD5 is there.

    A file that fails to parse is deleted (so the next call downloads it again) and a
    `DatasetError` naming it is raised.
    """
    path = dest_dir / filename
    if not (path.is_file() and _md5(path) == remote.md5[filename]):
        _download(remote, filename, path)
    try:
        return parse(path)
    except _CORRUPT as e:
        path.unlink(missing_ok=True)
        raise DatasetError(
            f"{path}: corrupt or truncated ({type(e).__name__}: {e}); removed, the next load downloads it again"
        ) from e


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return {key: z[key] for key in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        log.warning("%s: unreadable cache file (%s); rebuilding it", path, e)
        return None


def cached(name: str, build: Callable[[Path], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays cached as `<cache_dir>/<name>.npz`, made once by build(download_dir) if missing.

    A per-dataset file lock makes concurrent processes wait for one build instead of repeating it.
    """
    root = cache_dir()
    path = root / f"{name}.npz"
    arrays = _read_npz(path)
    if arrays is not None:
        return arrays
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f"{name}.lock"):
        arrays = _read_npz(path)  # another process may have built it while we waited
        if arrays is None:
            raw_dir = root / name
            arrays = build(raw_dir)
            with atomic_write(path) as f:
                np.savez(f, **arrays)
            shutil.rmtree(raw_dir, ignore_errors=True)  # the .npz holds everything the downloads did
    return arrays
