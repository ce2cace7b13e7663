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
    quarantine/<table>/<file>                    damaged table files moved aside (`nc-ray doctor --quarantine`, `resume`)
    driver.json                                  the token of the driver that holds the sweep (see `SweepLock`)
    tune-<n>/                                    Tune's experiment directories

Every file is immutable once published and its name is a function of what it holds (pack and
epoch), so a trial retried after a crash rewrites the same names with the same rows: rows are
never duplicated or lost. Files are written under a hidden temporary name, then renamed, so a
reader never sees a half-written file (`*.parquet` globs skip the `.tmp` names). Table files
carry Parquet page checksums, so damage anywhere in a file is found by reading it whole
(`nc_ray.integrity`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import urllib.parse
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import filelock
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nc_ray.config import PackPlan
from nc_ray.schema import SCHEMAS, rows_to_table

logger = logging.getLogger(__name__)


DRIVER_FILE = "driver.json"
# The columns that say what a row is: a file of the table without them is not one of its files.
KEY_COLUMNS = {"members": ("member_id", "status"), "metrics": ("member_id", "epoch", "layer"), "spectra": ("member_id", "epoch", "layer")}
_COLUMN_TYPES = {table: dict(zip(schema.names, schema.types)) for table, schema in SCHEMAS.items()}
TABLE_FILE_NAMES = {
    "members": re.compile(r"(?P<pack_id>[0-9A-Za-z_]+)\.parquet"),
    "metrics": re.compile(r"(?P<pack_id>[0-9A-Za-z_]+)-e(?P<epoch>[0-9]{6,})\.parquet"),
    "spectra": re.compile(r"(?P<pack_id>[0-9A-Za-z_]+)-e(?P<epoch>[0-9]{6,})\.parquet"),
}
# Query parameters that carry secrets in pyarrow's and fsspec's filesystem URIs (access_key, secret_key,
# session_token, access_token, account_key, password, credentials, ...).
_SECRET_PARAMETER = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"`<>]+")


def schema_mismatch(table: str, schema: pa.Schema) -> str | None:
    """Why a file's schema is not one of `table`'s (a key column missing, a column of another
    type), or None. Files of earlier versions lack later columns, files of later versions may
    have more, and Parquet stores second timestamps as milliseconds: all of these match."""
    expected = _COLUMN_TYPES[table]
    names = schema.names
    for name, kind in zip(names, schema.types):
        wanted = expected.get(name)
        if wanted is not None and kind != wanted and not (pa.types.is_timestamp(kind) and pa.types.is_timestamp(wanted)):
            return f"column {name!r} is {kind}, not {wanted}"
    missing = [name for name in KEY_COLUMNS[table] if name not in names]
    return f"no column {', '.join(missing)}" if missing else None


def parse_table_file(table: str, name: str) -> tuple[str, int | None] | None:
    """(pack_id, epoch) of a table file's name (epoch None for `members`); None for a name the
    layout never writes."""
    match = TABLE_FILE_NAMES[table].fullmatch(name)
    if match is None:
        return None
    epoch = match.groupdict().get("epoch")
    return match["pack_id"], int(epoch) if epoch is not None else None


def reads_whole(source: str | pa.NativeFile) -> str | None:
    """None when a file reads whole as Parquet (every page of every column, with its page
    checksums where it has them), else why not: a file can have an intact footer and damaged data."""
    try:
        pq.ParquetFile(source, page_checksum_verification=True).read(use_threads=False)
    except (pa.ArrowException, OSError) as error:
        return " ".join(str(error).split()) or type(error).__name__
    return None


def redact(text: str) -> str:
    """`text` with every URI's user info and query parameter values replaced by ***
    (`s3://key:secret@bucket/p?secret_key=s` -> `s3://***@bucket/p?secret_key=***`): what every
    message that may quote a storage URI goes through."""

    def masked(match: re.Match) -> str:
        try:
            parts = urllib.parse.urlsplit(match[0])
            netloc = parts.netloc if "@" not in parts.netloc else "***@" + parts.netloc.rpartition("@")[2]
        except ValueError:  # not a URI after all (e.g. an unbalanced bracket): show nothing of it
            return "***"
        query = "&".join(f"{name}=***" if value else name for name, _, value in (p.partition("=") for p in parts.query.split("&") if p))
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))

    return _URI.sub(masked, text)


def check_storage_uri(uri: str) -> None:
    """Refuse a storage URI that carries credentials (`s3://key:secret@bucket/...`, or a query
    parameter such as `?secret_key=...`).

    The URI is recorded in Tune's experiment state, in logs and in error messages, and the
    filesystem it configures is pickled into Tune's experiment directory; credentials belong in
    the environment or an instance role, where pyarrow's filesystems find them.
    """
    parts = urllib.parse.urlsplit(uri)
    secrets = [name for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if _SECRET_PARAMETER.search(name)]
    if parts.username is not None or parts.password is not None or secrets:
        raise ValueError(
            f"storage URI {redact(uri)}: credentials in the URI would be written into Tune's experiment state and logs; "
            "give them through the environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or an instance role"
        )


class SweepStore:
    """Reads and writes one sweep directory through a pyarrow filesystem.

    `uri` is a local path or a filesystem URI; with `filesystem` (e.g. an `S3FileSystem` built
    with an endpoint), `uri` is a path inside that filesystem. The store pickles with its
    filesystem, so Ray workers write through the same one. `uri` is what messages show
    (`redact`ed); `root` is the path inside the filesystem.

    `fence`, set by `SweepLock` while a driver holds the sweep, travels with the store into the
    trials: every write and delete first checks that the sweep's driver.json still holds it, so a
    trial of a driver that was killed publishes nothing once the next driver has taken the sweep.
    """

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None):
        if filesystem is None:
            if "://" not in uri:
                uri = os.path.abspath(os.path.expanduser(uri))
            check_storage_uri(uri)
            uri = uri.rstrip("/")
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
            except pa.ArrowInvalid as error:
                raise ValueError(f"storage {redact(uri)}: {redact(str(error))}") from None
        else:
            uri = self.root = uri.rstrip("/")
            self.fs = filesystem
        self.uri = redact(uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self.fence: str | None = None

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Publish a file atomically: write a hidden temporary name, then rename over the target
        (after checking the fence, if the store has one: `SweepFencedError` when it was lost)."""
        target = self.path(relative)
        directory, _, name = target.rpartition("/")
        temporary = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.fs.create_dir(directory, recursive=True)
            with self.fs.open_output_stream(temporary) as stream:
                stream.write(data)
            self.check_fence(target)
            self.fs.move(temporary, target)
        except (OSError, SweepFencedError) as error:
            # Disk full, read-only, gone or taken over: the target is untouched; drop the partial temporary.
            with contextlib.suppress(OSError):
                self.fs.delete_file(temporary)
            if isinstance(error, SweepFencedError):
                raise
            raise OSError(f"cannot write {target}: {error}") from error

    def check_fence(self, target: str) -> None:
        """SweepFencedError if this store has a fence and the sweep's driver.json no longer holds it."""
        if self.fence is None:
            return
        try:
            holder = self.read_json(DRIVER_FILE)
        except (OSError, ValueError):
            holder = {}
        if holder.get("token") != self.fence:
            raise SweepFencedError(
                f"not writing {target}: the sweep {self.uri} was taken over by another driver "
                f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}); this trial's driver is gone"
            )

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def write_json(self, relative: str, data: Any) -> None:
        self.write_bytes(relative, json.dumps(data, indent=1, sort_keys=True).encode())

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_bytes(relative))

    def write_table(self, name: str, file_stem: str, rows: Sequence[dict]) -> None:
        sink = pa.BufferOutputStream()
        # Page checksums: a damaged page is found on reading it, even where it would still decode.
        pq.write_table(rows_to_table(name, rows), sink, compression="zstd", write_page_checksum=True)
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
        """`read_table`, and the paths of the files it had to leave out: files that do not read
        (the columns asked for) or whose columns are not the table's (`schema_mismatch`)."""
        import pyarrow.dataset as ds  # here: it imports pandas, 0.1-0.2 s that `nc-ray query` need not pay

        columns = list(columns) if columns else SCHEMAS[name].names
        files, broken = [], []
        for file in self.list_files(f"tables/{name}", ".parquet"):
            path = self.path("tables", name, file)
            try:
                with self.fs.open_input_file(path) as handle:
                    problem = schema_mismatch(name, pq.read_schema(handle))
            except (pa.ArrowException, OSError) as error:
                problem = str(error)
            (broken if problem else files).append(path)
        try:
            table = ds.dataset(files, schema=SCHEMAS[name], filesystem=self.fs, format="parquet").to_table(columns=columns)
        except (pa.ArrowException, OSError):  # a damaged page in a column asked for: find its file
            parts = []
            for path in files:
                try:
                    parts.append(ds.dataset([path], schema=SCHEMAS[name], filesystem=self.fs, format="parquet").to_table(columns=columns))
                except (pa.ArrowException, OSError):
                    broken.append(path)
            table = pa.concat_tables(parts) if parts else SCHEMAS[name].empty_table().select(columns)
        for path in broken:
            logger.warning("skipping unreadable Parquet file %s", path)
        return table, sorted(broken)

    def quarantine(self, path: str, pack_id: str | None) -> list[str]:
        """Move a damaged table file from `tables/` into `quarantine/` (kept, not read), and with
        it the members row of `pack_id` (the pack whose rows the file should have held, if any),
        so that the pack counts as unfinished and the next sweep retrains it, rewriting every file
        of the pack. A name already in quarantine/ is kept: the newcomer gets a random suffix.
        Returns where the files went."""
        members_file = [self.path("tables", "members", f"{pack_id}.parquet")] if pack_id else []
        moved = []
        for source in dict.fromkeys([path, *members_file]):
            if self.fs.get_file_info(source).is_file:
                target = self.path("quarantine", source[len(self.path("tables")) + 1 :])
                if self.fs.get_file_info(target).type != pafs.FileType.NotFound:
                    stem, _, suffix = target.rpartition(".")
                    target = f"{stem}.{uuid.uuid4().hex[:8]}.{suffix}"
                self.check_fence(target)
                try:
                    self.fs.create_dir(target.rpartition("/")[0], recursive=True)
                    self.fs.move(source, target)
                except OSError as error:
                    raise OSError(f"cannot move {source} into {self.path('quarantine')}/: {error}") from error
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
            self.check_fence(self.path(relative))
            self.fs.delete_file(self.path(relative))

    def member_statuses(self) -> dict[str, str]:
        """member_id -> final status, from the members table."""
        table = self.read_table("members", ["member_id", "status"])
        return dict(zip(table["member_id"].to_pylist(), table["status"].to_pylist()))


class SweepBusyError(RuntimeError):
    """Another nc-ray process holds the sweep directory."""


class SweepFencedError(RuntimeError):
    """A write of a driver (or of its trials) that no longer holds the sweep: another driver took it."""


class SweepLock:
    """Exclusive ownership of a sweep directory: a lock file (local and shared filesystems) and a
    fence token.

    Taking the lock writes a new token into driver.json and sets it as the store's `fence`, which
    the store carries into every trial. A driver SIGKILLed loses its lock at once, but its trials
    may go on for seconds (a joined cluster ends them when it notices their driver's death); they
    check the token before each write and stop at the first one after the next driver took the
    sweep. Object stores have no lock: there the token alone makes the latest driver the only writer.
    """

    def __init__(self, store: SweepStore):
        self.store = store
        self.lock = None
        self.where = store.uri
        if store.is_local:
            try:
                Path(store.root).mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise OSError(error.errno, f"cannot make the sweep directory {self.where}: {error.strerror}") from None
            self.lock = filelock.FileLock(os.path.join(store.root, ".lock"))

    def __enter__(self) -> SweepLock:
        self._acquire()
        try:
            token = uuid.uuid4().hex
            self.store.fence = None  # driver.json does not hold the new token yet: nothing to check this write against
            self.store.write_json(DRIVER_FILE, {"token": token, "pid": os.getpid(), "host": socket.gethostname()})
            self.store.fence = token
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.store.fence = None
        self._release()

    def _acquire(self) -> None:
        if self.lock is not None:
            try:
                self.lock.acquire(timeout=0)
            except filelock.Timeout:
                raise SweepBusyError(
                    f"{self.where} is in use by another nc-ray sweep or resume (lock file {self.lock.lock_file}); "
                    "wait for it to finish or stop it first"
                ) from None
            except OSError as error:  # a read-only sweep directory, say: a sweep or resume writes into it
                raise OSError(error.errno, f"cannot take the lock file {self.lock.lock_file} of the sweep {self.where}: "
                                           f"{error.strerror}; `nc-ray sweep` and `resume` write into the sweep directory") from None

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def probe(self) -> None:
        """SweepBusyError now if another process holds the sweep (the lock is taken and released,
        nothing is written): a fast answer before Ray and torch are imported; the run itself takes
        the lock again."""
        self._acquire()
        self._release()
