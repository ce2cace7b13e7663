"""A sweep directory: where every row, weight file and pack definition is written and read.

Layout under `<storage>/<name>/` (a local path or a pyarrow filesystem URI such as s3://):
    spec.yaml, resolved_spec.json, sweep.json   what was asked for, resolved, and run history
    packs/<pack_id>.json                         the members each pack (one Tune trial) trains
    state/<pack_id>.pt                           a running pack's latest training state
    progress/<pack_id>.json                      the latest epoch a pack has reached
    weights/<pack_id>.safetensors                final weights of a pack's members (no pickle)
    tables/members/<pack_id>.parquet             one row per member
    tables/metrics/<pack_id>-e<epoch>.parquet    one row per member x evaluation epoch x layer
    tables/spectra/<pack_id>-e<epoch>.parquet    one row per member x evaluation epoch x layer
    quarantine/<table>/<file>                    damaged table files moved aside by `nc-ray doctor`
    tune-<n>/                                    Tune's experiment directories

Every file is immutable once published and its name is a function of what it holds (pack and
epoch), so a trial retried after a crash rewrites the same names with the same rows: rows are
never duplicated or lost. Files are written under a hidden temporary name, then renamed, so a
reader never sees a half-written file (`*.parquet` globs skip the `.tmp` names).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import urllib.parse
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import filelock
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nc_ray.config import PackPlan
from nc_ray.schema import SCHEMAS, rows_to_table

logger = logging.getLogger(__name__)


def reads_as_parquet(source: str | pa.NativeFile, schema: pa.Schema | None = None) -> bool:
    """Whether a file reads whole as Parquet (of `schema`, if given): pages too, since a file can
    have an intact footer and damaged data."""
    try:
        pq.read_table(source, schema=schema)
    except (pa.ArrowInvalid, OSError):
        return False
    return True


def check_storage_uri(uri: str) -> None:
    """Refuse a storage URI that carries credentials (`s3://key:secret@bucket/...`).

    The URI is recorded in Tune's experiment state, in logs and in error messages; credentials
    belong in the environment or an instance role, where pyarrow's filesystems find them.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.username is not None or parts.password is not None:
        shown = f"{parts.scheme}://***@{parts.hostname or ''}{parts.path}"
        raise ValueError(
            f"storage URI {shown}: credentials in the URI would be written into Tune's experiment state and logs; "
            "give them through the environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or an instance role"
        )


class SweepStore:
    """Reads and writes one sweep directory through a pyarrow filesystem.

    `uri` is a local path or a filesystem URI; with `filesystem` (e.g. an `S3FileSystem` built
    with an endpoint), `uri` is a path inside that filesystem. The store pickles with its
    filesystem, so Ray workers write through the same one.
    """

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None):
        if filesystem is None:
            if "://" not in uri:
                uri = os.path.abspath(os.path.expanduser(uri))
            check_storage_uri(uri)
            self.uri = uri.rstrip("/")
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
            except pa.ArrowInvalid as error:
                raise ValueError(f"storage {uri}: {error}") from None
        else:
            self.uri = self.root = uri.rstrip("/")
            self.fs = filesystem
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Publish a file atomically: write a hidden temporary name, then rename over the target."""
        target = self.path(relative)
        directory, _, name = target.rpartition("/")
        temporary = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.fs.create_dir(directory, recursive=True)
            with self.fs.open_output_stream(temporary) as stream:
                stream.write(data)
            self.fs.move(temporary, target)
        except OSError as error:
            # Disk full, read-only or gone: the target is untouched; drop the partial temporary.
            with contextlib.suppress(OSError):
                self.fs.delete_file(temporary)
            raise OSError(f"cannot write {target}: {error}") from error

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def write_json(self, relative: str, data: Any) -> None:
        self.write_bytes(relative, json.dumps(data, indent=1, sort_keys=True).encode())

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_bytes(relative))

    def write_table(self, name: str, file_stem: str, rows: Sequence[dict]) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(rows_to_table(name, rows), sink, compression="zstd")
        self.write_bytes(f"tables/{name}/{file_stem}.parquet", sink.getvalue().to_pybytes())

    def list_files(self, relative: str, suffix: str) -> list[str]:
        """Names (not paths) of published files under a folder, hidden temporaries excluded."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        return sorted(
            info.base_name for info in self.fs.get_file_info(selector)
            if info.is_file and info.base_name.endswith(suffix) and not info.base_name.startswith(".")
        )

    def read_table(self, name: str, columns: Iterable[str] | None = None) -> pa.Table:
        """All readable published files of a table (an empty table of the schema when none).

        Unreadable files (damaged after publication: publishing itself is atomic) are left out
        with a warning naming each; `read_table_checked` also returns them.
        """
        return self.read_table_checked(name, columns)[0]

    def read_table_checked(self, name: str, columns: Iterable[str] | None = None) -> tuple[pa.Table, list[str]]:
        """`read_table`, and the paths of the files it had to leave out."""
        columns = list(columns) if columns else SCHEMAS[name].names
        files = [self.path("tables", name, f) for f in self.list_files(f"tables/{name}", ".parquet")]
        try:
            return ds.dataset(files, schema=SCHEMAS[name], filesystem=self.fs, format="parquet").to_table(columns=columns), []
        except (pa.ArrowInvalid, OSError):
            broken = self.unreadable_files(name)
            for path in broken:
                logger.warning("skipping unreadable Parquet file %s", path)
            readable = [f for f in files if f not in broken]
            return ds.dataset(readable, schema=SCHEMAS[name], filesystem=self.fs, format="parquet").to_table(columns=columns), broken

    def unreadable_files(self, name: str) -> list[str]:
        """Paths of a table's published files that do not read as Parquet of its schema (reads them all)."""
        broken = []
        for file in self.list_files(f"tables/{name}", ".parquet"):
            path = self.path("tables", name, file)
            with self.fs.open_input_file(path) as handle:
                if not reads_as_parquet(handle, SCHEMAS[name]):
                    broken.append(path)
        return broken

    def quarantine(self, path: str) -> list[str]:
        """Move a damaged table file from `tables/` into `quarantine/` (kept, not read).

        The pack's members row goes with it, so that the pack counts as unfinished and the next
        sweep retrains it, rewriting every file of the pack. Returns where the files went.
        """
        pack_id = path.rpartition("/")[2].split("-e")[0].removesuffix(".parquet")
        members_file = self.path("tables", "members", f"{pack_id}.parquet")
        moved = []
        for source in dict.fromkeys([path, members_file]):
            if self.fs.get_file_info(source).is_file:
                target = self.path("quarantine", source[len(self.path("tables")) + 1 :])
                self.fs.create_dir(target.rpartition("/")[0], recursive=True)
                self.fs.move(source, target)
                moved.append(target)
        return moved

    def write_pack(self, pack: PackPlan) -> None:
        self.write_bytes(f"packs/{pack.pack_id}.json", pack.to_json().encode())

    def read_pack(self, pack_id: str) -> PackPlan:
        return PackPlan.from_json(self.read_bytes(f"packs/{pack_id}.json").decode())

    def pack_ids(self) -> list[str]:
        return [name[: -len(".json")] for name in self.list_files("packs", ".json")]

    def delete(self, relative: str) -> None:
        """Remove a published file if it exists (a pack's state once the pack is finished)."""
        if self.exists(relative):
            self.fs.delete_file(self.path(relative))

    def member_statuses(self) -> dict[str, str]:
        """member_id -> final status, from the members table."""
        table = self.read_table("members", ["member_id", "status"])
        return dict(zip(table["member_id"].to_pylist(), table["status"].to_pylist()))


class SweepBusyError(RuntimeError):
    """Another nc-ray process holds the sweep directory."""


class SweepLock:
    """Exclusive ownership of a sweep directory (a lock file; local and shared filesystems)."""

    def __init__(self, store: SweepStore):
        self.lock = None
        if store.is_local:
            Path(store.root).mkdir(parents=True, exist_ok=True)
            self.lock = filelock.FileLock(os.path.join(store.root, ".lock"))
        self.where = store.uri

    def __enter__(self) -> SweepLock:
        if self.lock is not None:
            try:
                self.lock.acquire(timeout=0)
            except filelock.Timeout:
                raise SweepBusyError(
                    f"{self.where} is in use by another nc-ray sweep or resume (lock file {self.lock.lock_file}); "
                    "wait for it to finish or stop it first"
                ) from None
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.lock is not None:
            self.lock.release()

    def probe(self) -> None:
        """SweepBusyError now if another process holds the sweep (the lock is taken and released):
        a fast answer before Ray and torch are imported; the run itself takes the lock again."""
        with self:
            pass
