"""Read-only SQL over sweep directories: DuckDB views over the Parquet tables of one or more sweeps.

    sweep = open_sweep("runs/quickstart")                 # or several dirs, or a glob
    sweep.sql("SELECT depth, avg(train_acc) FROM metrics GROUP BY depth")   # -> pyarrow.Table
    sweep.df("SELECT * FROM members")                     # -> pandas.DataFrame
    sweep.pl("SELECT * FROM members")                     # -> polars.DataFrame (needs `pip install polars`)
    sweep.metrics(depth=4, epoch=400)                     # equality / IN filters -> pyarrow.Table

Views (every one starts with a `sweep` column, the sweep directory's name):
    members, metrics, spectra   the tables of `nc_ray.store` (`tables/<name>/**/*.parquet`), read
                                with hive partitions and union by name: columns missing from some
                                files are null, and every column of `nc_ray.schema.SCHEMAS` exists
                                even when a table has no file yet
    planned                     one row per member the sweep planned (the member records of
                                `packs/*.json`): what a finished sweep will hold

Contract of a session:
- Read-only. Only single SELECT statements run (COPY, EXPORT, ATTACH, CREATE, SET, PRAGMA, ... are
  refused before they reach the database), and DuckDB's external access is off except for reads
  inside the sweep directories, with the configuration locked: nothing can be written or deleted
  under a sweep, and no file outside the sweeps can be read.
- Damaged table files are left out of their views, each with a logged warning naming its path and
  what is wrong, and listed in `Sweep.skipped`; the statement runs over the other files:
  - before a file is first read, its footer is checked (`integrity.footer_problem`, no page read):
    a footer that does not read, a foreign schema (key columns missing, or of other types), or,
    in a file named as the layout names them, pack_id / epoch statistics other than its name's
    (a copy, whose rows would count twice);
  - when a statement fails on a file's data (e.g. a corrupt page behind an intact footer), the
    files the error names, or else every file not yet read whole this session, are read whole
    (`store.reads_whole`), those that do not read are left out, and the statement runs again.
  A damaged page that still decodes (a flipped bit) is not seen here: `nc-ray status` and
  `nc-ray doctor` check the page checksums. A skipped file that is rewritten (e.g. by `nc-ray
  resume`) is checked again and counts again if it is whole.
- Any other error of the database, or a refused statement, raises `QueryError` carrying DuckDB's
  message.
- The views list the sweep's files again before each statement, so files published meanwhile are
  read. They read explicit file lists, never patterns: a sweep path may hold glob characters.
- Local directories only (the views read through DuckDB's local filesystem).
"""

from __future__ import annotations

import glob
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from nc_ray.integrity import footer_problem
from nc_ray.schema import PLANNED_SCHEMA, SCHEMAS, TABLES
from nc_ray.store import reads_whole

logger = logging.getLogger(__name__)

VIEWS = (*TABLES, "planned")
# DuckDB quotes the file it failed on in its message, with ' or " depending on the error.
_QUOTED_PARQUET_PATH = re.compile(r"""['"]([^'"]+\.parquet)['"]""")
# Errors of the statement itself (syntax, names, types, permissions): no file's data is to blame.
_STATEMENT_ERRORS = (duckdb.ProgrammingError, duckdb.PermissionException, duckdb.InterruptException, duckdb.OutOfMemoryException)
Result = TypeVar("Result")


class QueryError(Exception):
    """The database rejected a query (the message is DuckDB's), or the query is not a read."""


def _sql_type(arrow: pa.DataType) -> str:
    """DuckDB's name of the types the tables use (nc_ray.schema)."""
    if pa.types.is_list(arrow):
        return f"{_sql_type(arrow.value_type)}[]"
    if pa.types.is_timestamp(arrow):
        return "TIMESTAMPTZ" if arrow.tz else "TIMESTAMP"
    names = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN"}
    if arrow not in names:
        raise TypeError(f"no DuckDB type for the column type {arrow}")
    return names[arrow]


def quote_identifier(name: str) -> str:
    """`name` as a SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def expand_sweep_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Sweep directories named by `paths` (glob patterns expanded), resolved, in order, no repeats.

    A path that names a directory as it is is taken as it is, glob characters and all (`runs[1]`).
    Raises FileNotFoundError when a path or pattern names no directory.
    """
    found: list[Path] = []
    for path in paths:
        text = os.path.expanduser(os.fspath(path))
        matches = sorted(glob.glob(text)) if glob.has_magic(text) and not os.path.isdir(text) else [text]
        directories = [Path(m).resolve() for m in matches if os.path.isdir(m)]
        if not directories:
            raise FileNotFoundError(f"no sweep directory at {text}")
        found.extend(d for d in directories if d not in found)
    if not found:
        raise FileNotFoundError("no sweep directory given")
    return found


def sweep_names(directories: Sequence[Path]) -> list[str]:
    """The `sweep` column's values: directory names, or full paths where two names coincide."""
    names = [d.name for d in directories]
    return names if len(set(names)) == len(names) else [str(d) for d in directories]


class Sweep:
    """A read-only DuckDB session over the views of one or more sweep directories (see module doc).

    Results come in three formats, the same rows and columns in each:
        sql(query)  pyarrow.Table      (also `select`, `members`, `metrics`, `spectra`)
        df(query)   pandas.DataFrame
        pl(query)   polars.DataFrame   (polars is optional: `pip install polars`)
    """

    def __init__(self, directories: Sequence[Path], *, memory_gib: float | None = None, threads: int | None = None,
                 timeout_s: float | None = None):
        """Limits (each also from its environment variable, `nc_ray.limits`): `memory_gib`, DuckDB's
        memory limit (default a quarter of this machine's memory; nothing spills to disk), `threads`
        (default DuckDB's), `timeout_s` per statement (default none). A statement past a limit
        raises QueryError saying how to raise it."""
        from nc_ray.limits import QUERY_MEMORY_GIB, QUERY_MEMORY_SHARE, QUERY_THREADS, QUERY_TIMEOUT_S, machine_memory_bytes

        memory = QUERY_MEMORY_GIB.value(memory_gib)
        self.memory_gib = QUERY_MEMORY_SHARE * machine_memory_bytes() / 2**30 if math.isnan(memory) else memory
        self.threads = QUERY_THREADS.value(threads)
        timeout = QUERY_TIMEOUT_S.value(timeout_s)
        self.timeout_s = None if math.isnan(timeout) else timeout
        self.directories = list(directories)
        self.names = sweep_names(self.directories)
        self._skipped: dict[str, str] = {}  # path -> why it is left out
        self._footers: dict[str, tuple[tuple[int, int], tuple[str, str] | None]] = {}  # path -> (its size and mtime, footer_problem)
        self._whole: dict[str, tuple[int, int]] = {}  # path -> size and mtime when it last read whole
        self._definitions: dict[str, str] = {}  # view -> the CREATE VIEW statement that defines it now
        self._con = duckdb.connect(":memory:")
        for view in VIEWS:
            schema = PLANNED_SCHEMA if view == "planned" else SCHEMAS[view]
            # An empty view of typed NULLs fixes the columns and their order (registering an empty
            # Arrow table would do the same, but makes DuckDB import pandas: 0.1-0.2 s per command).
            columns = ", ".join(f"CAST(NULL AS {_sql_type(f.type)}) AS {quote_identifier(f.name)}"
                                for f in [pa.field("sweep", pa.string()), *schema])
            self._con.execute(f"CREATE VIEW _empty_{view} AS SELECT {columns} WHERE false")
        self._run(lambda: None)  # defines the views
        allowed = ", ".join(_literal(str(d) + os.sep) for d in self.directories)
        limits = [f"SET memory_limit = '{max(self.memory_gib, 0.01) * 1024:.0f}MiB'", "SET max_temp_directory_size = '0B'"]
        if not math.isnan(self.threads):
            limits.append(f"SET threads = {max(1, int(self.threads))}")
        for setting in (
            *limits, f"SET allowed_directories = [{allowed}]", "SET enable_external_access = false",
            "SET autoinstall_known_extensions = false", "SET autoload_known_extensions = false",
            "SET lock_configuration = true",
        ):
            self._con.execute(setting)

    @property
    def skipped(self) -> list[str]:
        """Paths of the table files left out of the views now because they are damaged (sorted)."""
        return sorted(self._skipped)

    def _skip(self, path: str, kind: str, detail: str) -> None:
        if path not in self._skipped:
            if kind == "unreadable":
                logger.warning("skipping unreadable Parquet file %s", path)
            else:
                logger.warning("skipping %s: %s (%s)", path, kind, detail)
        self._skipped[path] = f"{kind}: {detail}"

    def _table_files(self, directory: Path, table: str) -> list[str]:
        """The files of one sweep's table that the view reads: published (not hidden), footers
        checked (`footer_problem`), not found damaged."""
        paths = []
        for folder, subfolders, names in os.walk(directory / "tables" / table):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # hive partitions, say; never hidden ones
            paths += [os.path.join(folder, n) for n in names if n.endswith(".parquet") and not n.startswith(".")]
        readable = []
        for path in sorted(paths):
            try:
                stat = os.stat(path)
            except FileNotFoundError:  # moved aside meanwhile
                continue
            version = (stat.st_size, stat.st_mtime_ns)
            path = os.path.normpath(path)
            if self._footers.get(path, (None,))[0] != version:  # new, or rewritten since its check
                try:
                    problem = footer_problem(table, os.path.basename(path), pq.ParquetFile(path))
                except (pa.ArrowException, OSError) as error:
                    problem = ("unreadable", " ".join(str(error).split()))
                self._footers[path] = (version, problem)
                self._skipped.pop(path, None)
                if problem:
                    self._skip(path, *problem)
            if path not in self._skipped:
                readable.append(path)
        return readable

    def _define_view(self, view: str) -> None:
        """(Re)define a view over the current files of its table; a no-op when the definition is unchanged."""
        parts = [f"FROM _empty_{view}"]
        for directory, name in zip(self.directories, self.names):
            if view == "planned":
                packs = sorted(str(p) for p in (directory / "packs").glob("*.json")) if (directory / "packs").is_dir() else []
                if packs:
                    source = "[" + ", ".join(map(_literal, packs)) + "]"
                    # union_by_name: pack files of version 1 lack the member fields version 2 added.
                    parts.append(f"SELECT {_literal(name)} AS sweep, pack_id, unnest(members, recursive := true) "
                                 f"FROM read_json({source}, union_by_name = true)")
            elif files := self._table_files(directory, view):
                source = "[" + ", ".join(map(_literal, files)) + "]"
                parts.append(f"SELECT {_literal(name)} AS sweep, * FROM read_parquet({source}, union_by_name = true, hive_partitioning = true)")
        definition = f"CREATE OR REPLACE VIEW {view} AS " + " UNION ALL BY NAME ".join(parts)
        if definition != self._definitions.get(view):
            self._con.execute(definition)
            self._definitions[view] = definition

    def _damaged_files(self, error: duckdb.Error) -> list[str]:
        """The files to blame for `error`, read whole: those it quotes, or, when it quotes none, every
        file of the views not yet read whole (once per file and version); [] when it is the statement's."""
        if isinstance(error, _STATEMENT_ERRORS):
            return []
        listed = {path: version for path, (version, problem) in self._footers.items() if problem is None and path not in self._skipped}
        quoted = [os.path.normpath(q) for q in _QUOTED_PARQUET_PATH.findall(str(error))]
        suspects = [q for q in quoted if q in listed] or [p for p, version in listed.items() if self._whole.get(p) != version]
        damaged = []
        for path in suspects:
            problem = reads_whole(path)
            if problem is None:
                self._whole[path] = listed[path]
            else:
                self._skip(path, "unreadable", problem)
                damaged.append(path)
        return damaged

    def _run(self, statement: Callable[[], Result]) -> Result:
        """`statement()` over views listed afresh, retried without the damaged files a DuckDB error
        leads to (see module doc); any other database error raises QueryError, one past a limit
        saying how to raise it. Ctrl-C during a statement stops it and raises KeyboardInterrupt."""
        from nc_ray.limits import QUERY_MEMORY_GIB, QUERY_TIMEOUT_S

        def attempt() -> Result:
            for view in VIEWS:
                self._define_view(view)
            return statement()

        while True:
            try:
                return self._stoppable(attempt)
            except TimeoutError:
                raise QueryError(f"the query ran past its limit of {self.timeout_s:g} s and was stopped; "
                                 f"{QUERY_TIMEOUT_S.how_to_raise} (nc-ray query: --timeout)") from None
            except duckdb.OutOfMemoryException:
                raise QueryError(f"the query needs more than its memory limit of {self.memory_gib:.3g} GiB; "
                                 f"{QUERY_MEMORY_GIB.how_to_raise} (nc-ray query: --memory-gib)") from None
            except duckdb.Error as error:
                if not self._damaged_files(error):
                    raise QueryError(str(error)) from None

    def _stoppable(self, work: Callable[[], Result]) -> Result:
        """`work()` in a helper thread, while this one waits, free to stop it through DuckDB's
        interrupt: at the session's timeout (TimeoutError) or on Ctrl-C (KeyboardInterrupt). A
        statement running in this thread would hold Ctrl-C until it ended on its own."""
        outcome: dict[str, Any] = {}
        # An Event, not Thread.join: a join that Ctrl-C interrupts leaves Python 3.11's thread looking ended.
        done = threading.Event()

        def run() -> None:
            try:
                outcome["value"] = work()
            except BaseException as error:  # handed to the waiting thread, which raises it
                outcome["error"] = error
            finally:
                done.set()

        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        threading.Thread(target=run, name="nc_ray-query", daemon=True).start()
        try:
            while not done.wait(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))):
                if deadline is not None and time.monotonic() >= deadline:
                    self._con.interrupt()
                    done.wait()
                    if isinstance(outcome.get("error"), duckdb.InterruptException):
                        raise TimeoutError
        except KeyboardInterrupt:
            self._con.interrupt()
            done.wait()
            raise
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    # ------------------------------------------------------------------------------- queries

    def _check_read_only(self, query: str) -> None:
        try:
            statements = self._con.extract_statements(query)
        except duckdb.Error as error:
            raise QueryError(str(error)) from None
        if len(statements) != 1:
            raise QueryError(f"expected one SQL statement, got {len(statements)}")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            raise QueryError(f"sweep queries are read-only: only SELECT statements run, not {kind.name}")

    def sql(self, query: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Run one SELECT statement (optional `?` parameters) and return its result as Arrow."""
        self._check_read_only(query)
        arguments = list(params) if params is not None else None
        # The relation stays inside: it has writers (to_parquet, insert, ...) that must not reach callers.
        return self._run(lambda: self._con.sql(query, params=arguments).to_arrow_table())

    def df(self, query: str, params: Sequence[Any] | None = None):
        """`sql` as a pandas DataFrame."""
        return self.sql(query, params).to_pandas()

    def pl(self, query: str, params: Sequence[Any] | None = None):
        """`sql` as a polars DataFrame. Raises ImportError, before the query runs, when polars is not installed."""
        try:
            import polars  # optional: only this method needs it
        except ImportError:
            raise ImportError("Sweep.pl needs polars, which is not installed: pip install polars") from None
        return polars.from_arrow(self.sql(query, params))

    def columns(self, view: str) -> list[str]:
        """Column names of a view."""
        if view not in VIEWS:
            raise QueryError(f"unknown view {view!r}; views: {', '.join(VIEWS)}")
        return self.sql(f"SELECT * FROM {view} LIMIT 0").column_names

    def select(self, view: str, columns: Sequence[str] | None = None, **equals: Any) -> pa.Table:
        """Rows of a view where each keyword column equals its value (a list or tuple means IN,
        None means IS NULL); `columns` picks the columns (default all). Unknown names raise QueryError."""
        known = self.columns(view)
        unknown = [c for c in [*(columns or []), *equals] if c not in known]
        if unknown:
            raise QueryError(f"no column(s) {', '.join(unknown)} in {view}; columns: {', '.join(known)}")
        conditions, params = [], []
        for name, value in equals.items():
            column = quote_identifier(name)
            if value is None:
                conditions.append(f"{column} IS NULL")
            elif isinstance(value, (list, tuple)):
                conditions.append(f"{column} IN ({', '.join('?' * len(value))})" if value else "false")
                params.extend(value)
            else:
                conditions.append(f"{column} = ?")
                params.append(value)
        selected = ", ".join(quote_identifier(c) for c in columns) if columns else "*"
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        return self.sql(f"SELECT {selected} FROM {view}{where}", params)

    def members(self, columns: Sequence[str] | None = None, **equals: Any) -> pa.Table:
        """`select("members", ...)`."""
        return self.select("members", columns, **equals)

    def metrics(self, columns: Sequence[str] | None = None, **equals: Any) -> pa.Table:
        """`select("metrics", ...)`."""
        return self.select("metrics", columns, **equals)

    def spectra(self, columns: Sequence[str] | None = None, **equals: Any) -> pa.Table:
        """`select("spectra", ...)`."""
        return self.select("spectra", columns, **equals)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def format_table(table: pa.Table) -> str:
    """A readable box rendering of a result (DuckDB's; long results show their head and tail)."""
    with duckdb.connect(":memory:") as scratch:  # holds nothing but `table`
        return str(scratch.from_arrow(table))


def open_sweep(*paths: str | os.PathLike, memory_gib: float | None = None, threads: int | None = None,
               timeout_s: float | None = None) -> Sweep:
    """A read-only SQL session over one or more sweep directories.

    Args:
        *paths: sweep directories (local), or glob patterns matching several; their rows are told
            apart by the `sweep` column of every view.
        memory_gib, threads, timeout_s: the session's limits (see `Sweep`); default from
            $NC_RAY_QUERY_MEMORY_GIB etc., else a quarter of the memory, all cores and no timeout.

    Returns:
        A `Sweep` with the views `members`, `metrics`, `spectra` and `planned`; `sql` gives
        Arrow, `df` pandas and `pl` polars. Close it (or use it as a context manager) when done.

    Raises:
        FileNotFoundError: a path names no directory.

    Example::

        with nc_ray.open_sweep("runs/quickstart") as sweep:
            ranks = sweep.df("SELECT depth, weight_decay, median(rank_rel_1e2) AS rank FROM metrics "
                             "WHERE layer > 1 AND layer < depth GROUP BY ALL ORDER BY ALL")
    """
    return Sweep(expand_sweep_paths(paths), memory_gib=memory_gib, threads=threads, timeout_s=timeout_s)
