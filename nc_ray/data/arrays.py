"""`arrays`: bring your own data, one .npz file at a local path or a storage URI (s3://, gs://, file://).

The file holds `x_train` (N, d) floats, `y_train` (N,) integer labels, and optionally `x_test`
and `y_test` (both or neither), as `np.savez` writes them. K = max label + 1, and every class
0..K-1 must have a sample in y_train. Without test arrays, a stratified `test_fraction` of the
train set is held out as the test set (scikit-learn's `train_test_split`, deterministic in
`split_seed`), as `digits` does.

The file is read through pyarrow's filesystems, so Ray workers on other machines read the same
file. Spec validation reads it whole (`pin_arrays`): every check below runs before anything
starts, and the params get pinned the file's sha256, its K and its absolute path (trials run in
Tune's own directories, where a relative path would name another file). A member's id includes
them, so editing the file gives new member ids instead of rows of old and new data mixed under
one id. Workers read the file again (`arrays`) and refuse content whose sha256 is not the pinned one.

Limits: a file larger than $NC_RAY_MAX_ARRAYS_BYTES (default 2 GiB) is refused before it is
read, and so are arrays that take more than that once decompressed; pickled objects are never loaded.
"""

from __future__ import annotations

import hashlib
import io
import numbers
import os
import re
import urllib.parse
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from nc_ray.data.base import Arrays, ParamError, is_int, require

MAX_BYTES_VARIABLE = "NC_RAY_MAX_ARRAYS_BYTES"
DEFAULT_MAX_BYTES = 2 * 1024**3
TRAIN_KEYS, TEST_KEYS = ("x_train", "y_train"), ("x_test", "y_test")
# What reading a damaged archive or member raises: zipfile raises NotImplementedError for an
# unknown compression or version, RuntimeError for an encrypted member.
_UNREADABLE = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


def check_arrays(params: Mapping[str, object]) -> None:
    """Check the complete params of `arrays` without reading the file."""
    path = params["path"]
    require(isinstance(path, str) and path != "", "path", path,
            "required: the .npz file, a local path or a storage URI (s3://, gs://, file://)")
    parts = urllib.parse.urlsplit(path) if "://" in path else None
    require(parts is None or (parts.username is None and parts.password is None), "path", "<a URI with credentials>",
            "credentials in the URI would be written into member ids and tables; give them through the "
            "environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or an instance role")
    sha256 = params["sha256"]
    require(isinstance(sha256, str) and (sha256 == "" or re.fullmatch(r"[0-9a-f]{64}", sha256) is not None),
            "sha256", sha256, "must be 64 lowercase hex digits (the file's sha256), or left out to be pinned")
    n_classes = params["n_classes"]
    require(is_int(n_classes) and (n_classes == 0 or n_classes >= 2), "n_classes", n_classes,
            "must be an integer >= 2, or left out to be taken from the labels")
    fraction = params["test_fraction"]
    require(isinstance(fraction, numbers.Real) and not isinstance(fraction, bool) and 0 < fraction < 1,
            "test_fraction", fraction, "must be a number in (0, 1)")
    require(is_int(params["split_seed"]) and params["split_seed"] >= 0, "split_seed", params["split_seed"],
            "must be an integer >= 0")


def _one_line(error: BaseException) -> str:
    """A library's error message on one line, as spec errors are."""
    return " ".join(str(error).split())


def max_bytes(path: str) -> int:
    """The size limit: $NC_RAY_MAX_ARRAYS_BYTES, else 2 GiB."""
    raw = os.environ.get(MAX_BYTES_VARIABLE)
    if raw is None:
        return DEFAULT_MAX_BYTES
    require(raw.strip().isdigit() and int(raw) > 0, "path", path,
            f"${MAX_BYTES_VARIABLE}={raw!r} must be a positive whole number of bytes")
    return int(raw)


def _locate(path: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path in it, where): `where` is the URI as given or the absolute local path."""
    if "://" not in path:
        where = os.path.abspath(os.path.expanduser(path))
        return pafs.LocalFileSystem(), where, where
    try:
        fs, inner = pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise ParamError("path", path, f"not a storage URI pyarrow can open ({_one_line(error)})") from None
    return fs, inner, path


def _read(path: str, limit: int) -> tuple[bytes, str]:
    """The file's bytes and where it is (see `_locate`), its size checked against the limit first."""
    fs, inner, where = _locate(path)
    try:
        info = fs.get_file_info(inner)
        require(info.type != pafs.FileType.NotFound, "path", path, f"{where}: no such file")
        require(info.type == pafs.FileType.File, "path", path, f"{where}: not a file")
        require(info.size <= limit, "path", path,
                f"{where}: {info.size} bytes, over the limit of {limit}; raise it with {MAX_BYTES_VARIABLE}=<bytes>")
        with fs.open_input_stream(inner) as f:
            return f.read(), where
    except OSError as error:
        raise ParamError("path", path, f"{where}: cannot read ({_one_line(error)})") from None


def _features(key: str, x: np.ndarray) -> None:
    require(x.ndim == 2, key, f"shape {x.shape}", "must be 2-D (samples, features)")
    require(x.dtype.kind == "f", key, f"dtype {x.dtype}", "must hold floats (e.g. x.astype(np.float32))")
    require(x.size > 0, key, f"shape {x.shape}", "is empty")
    finite = np.isfinite(x)
    if not finite.all():
        row = int(np.argmin(finite.all(axis=1)))
        raise ParamError(key, f"{x.size - int(finite.sum())} NaN or infinite values", f"must be finite (the first in row {row})")


def _labels(key: str, y: np.ndarray, x_key: str, x: np.ndarray) -> None:
    require(y.ndim == 1, key, f"shape {y.shape}", "must be 1-D (one label per sample)")
    require(y.dtype.kind in "iu", key, f"dtype {y.dtype}", "must hold integer labels 0..K-1")
    require(len(y) == len(x), key, f"{len(y)} labels", f"must match the {len(x)} rows of {x_key}")


def _parse(data: bytes, limit: int, test_fraction: float, split_seed: int) -> Arrays:
    """Check the archive's keys and arrays and make the train/test split. A ParamError names the
    key in the file (or `archive`), what it holds, and the problem."""
    require(zipfile.is_zipfile(io.BytesIO(data)), "archive", "not a zip file (or a truncated one)",
            "must be a .npz archive (np.savez or np.savez_compressed write one)")
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        stored = sum(entry.file_size for entry in npz.zip.infolist())
        keys = set(npz.files)
    except _UNREADABLE as error:
        raise ParamError("archive", "unreadable", _one_line(error)) from None
    require(stored <= limit, "archive", f"{stored} bytes decompressed",
            f"over the limit of {limit}; raise it with {MAX_BYTES_VARIABLE}=<bytes>")
    known = (*TRAIN_KEYS, *TEST_KEYS)
    require(keys <= set(known), "keys", sorted(keys), f"unknown {sorted(keys - set(known))}; expected {', '.join(known)}")
    require(set(TRAIN_KEYS) <= keys, "keys", sorted(keys), f"missing {sorted(set(TRAIN_KEYS) - keys)}")
    has_test = set(TEST_KEYS) <= keys
    require(has_test or not keys & set(TEST_KEYS), "keys", sorted(keys), "x_test and y_test come together or not at all")

    a = {}
    for key in sorted(keys):
        try:
            a[key] = npz[key]
        except _UNREADABLE as error:
            # an object array raises ValueError here: allow_pickle=False never unpickles
            raise ParamError(key, "unreadable array", _one_line(error)) from None
        require(isinstance(a[key], np.ndarray), key, "not an array", "must be a .npy array inside the archive")
    for split in ("train", "test") if has_test else ("train",):
        _features(f"x_{split}", a[f"x_{split}"])
        _labels(f"y_{split}", a[f"y_{split}"], f"x_{split}", a[f"x_{split}"])
    y = a["y_train"].astype(np.int64)
    require(y.min() >= 0, "y_train", f"label {y.min()}", "labels must be integers 0..K-1")
    require(y.max() < len(y), "y_train", f"label {y.max()}", f"K = max label + 1 classes cannot all be present in {len(y)} samples")
    counts = np.bincount(y)
    n_classes = len(counts)
    missing = np.flatnonzero(counts == 0).tolist()
    require(not missing, "y_train", f"classes {missing[:10]}{'...' if len(missing) > 10 else ''} absent",
            f"every class 0..K-1 (K = max label + 1 = {n_classes}) needs a training sample")
    require(n_classes >= 2, "y_train", "a single class", "needs at least 2 classes")
    if not has_test:
        # Imported here: scikit-learn takes about a second to import and only a held-out split needs it.
        from sklearn.model_selection import train_test_split

        try:
            train, test = train_test_split(np.arange(len(y)), test_size=float(test_fraction),
                                           random_state=int(split_seed), stratify=y)
        except ValueError as error:  # a class with one sample, or fewer test samples than classes
            raise ParamError("test_fraction", test_fraction, f"no x_test/y_test, and this stratified hold-out fails: {_one_line(error)}") from None
        return Arrays(a["x_train"][train], y[train], a["x_train"][test], y[test], n_classes=n_classes)
    x_test, y_test = a["x_test"], a["y_test"].astype(np.int64)
    require(x_test.shape[1] == a["x_train"].shape[1], "x_test", f"{x_test.shape[1]} features",
            f"must match the {a['x_train'].shape[1]} of x_train")
    outside = y_test[(y_test < 0) | (y_test >= n_classes)]
    require(outside.size == 0, "y_test", f"label {outside[:1].tolist()}", f"outside 0..{n_classes - 1} (K from y_train)")
    return Arrays(a["x_train"], y, x_test, y_test, n_classes=n_classes)


def read_arrays(params: Mapping[str, object]) -> tuple[Arrays, dict[str, object]]:
    """The file's arrays, checked, and the values to pin (absolute path or URI, sha256, K).

    A given sha256 or n_classes that the file does not have is an error naming both. Problems of
    the file's content are reported against `path`, their message naming the key in the file.
    """
    path = str(params["path"])
    limit = max_bytes(path)
    data, where = _read(path, limit)
    digest = hashlib.sha256(data).hexdigest()
    require(params["sha256"] in ("", digest), "sha256", params["sha256"],
            f"{where} has sha256 {digest!r}: the file changed since this value was pinned; "
            "leave sha256 out to pin the new content (its members get new ids)")
    try:
        a = _parse(data, limit, params["test_fraction"], params["split_seed"])
    except ParamError as error:
        if error.key == "test_fraction":
            raise ParamError(error.key, error.value, f"{where}: {error.why}") from None
        raise ParamError("path", path, f"{where}: {error.key}: {error.value}: {error.why}") from None
    require(params["n_classes"] in (0, a.n_classes), "n_classes", params["n_classes"],
            f"{where} has labels 0..{a.n_classes - 1}, so K = {a.n_classes}")
    return a, {"path": where, "sha256": digest, "n_classes": a.n_classes}


def pin_arrays(params: Mapping[str, object]) -> dict[str, object]:
    """The values `arrays` pins into its params (see `read_arrays`); reads and checks the whole file."""
    return read_arrays(params)[1]


def n_classes_of_arrays(params: Mapping[str, object]) -> int:
    """K: the pinned n_classes, else read from the file."""
    return int(params["n_classes"]) or int(pin_arrays(params)["n_classes"])


def arrays(*, path: str = "", sha256: str = "", n_classes: int = 0, test_fraction: float = 0.2, split_seed: int = 0) -> Arrays:
    """The .npz file at `path` (see the module doc): x as stored (float), y int64; with `sha256`
    given, content with another sha256 is refused. Same file and params -> identical arrays."""
    params = {"path": path, "sha256": sha256, "n_classes": n_classes, "test_fraction": test_fraction, "split_seed": split_seed}
    return read_arrays(params)[0]
