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
- A table file that does not read as Parquet (truncated, garbage) is left out of its view for the
  rest of the session, with a logged warning naming its path and its path in `Sweep.skipped`, and
  the statement runs over the other files. Files are not checked up front: a file is skipped when
  a DuckDB error names it, at the session's opening or at any later query; a damaged file that
  DuckDB's message does not name (e.g. a corrupt page behind an intact footer) fails the query.
- Any other error of the database, or a refused statement, raises `QueryError` carrying DuckDB's
  message.
- Views are defined when the session opens: a table that had no file then stays empty for the
  session; tables that had files see files published later (the globs are re-read per query; a
  view with skipped files lists its files again before each statement).
- Local directories only (the views read through DuckDB's local filesystem).
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from nc_ray.schema import PLANNED_SCHEMA, SCHEMAS, TABLES
from nc_ray.store import reads_as_parquet

logger = logging.getLogger(__name__)

VIEWS = (*TABLES, "planned")
# DuckDB quotes the file it failed on in its message, with ' or " depending on the error.
_QUOTED_PARQUET_PATH = re.compile(r"""['"]([^'"]+\.parquet)['"]""")
Result = TypeVar("Result")


class QueryError(Exception):
    """The database rejected a query (the message is DuckDB's), or the query is not a read."""


def quote_identifier(name: str) -> str:
    """`name` as a SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def expand_sweep_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Sweep directories named by `paths` (glob patterns expanded), resolved, in order, no repeats.

    Raises FileNotFoundError when a path or pattern names no directory.
    """
    found: list[Path] = []
    for path in paths:
        text = os.path.expanduser(os.fspath(path))
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
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

    def __init__(self, directories: Sequence[Path]):
        self.directories = list(directories)
        self.names = sweep_names(self.directories)
        self._skipped: dict[str, set[str]] = {table: set() for table in TABLES}
        self._definitions: dict[str, str] = {}  # view -> the CREATE VIEW statement that defines it now
        self._con = duckdb.connect(":memory:")
        for view in VIEWS:
            schema = PLANNED_SCHEMA if view == "planned" else SCHEMAS[view]
            empty = pa.schema([pa.field("sweep", pa.string()), *schema]).empty_table()
            self._con.register(f"_empty_{view}", empty)  # fixes the columns and their order
        for view in VIEWS:
            self._run(functools.partial(self._define_view, view))
        allowed = ", ".join(_literal(str(d) + os.sep) for d in self.directories)
        for setting in (
            f"SET allowed_directories = [{allowed}]", "SET enable_external_access = false",
            "SET autoinstall_known_extensions = false", "SET autoload_known_extensions = false",
            "SET lock_configuration = true",
        ):
            self._con.execute(setting)

    @property
    def skipped(self) -> list[str]:
        """Paths of the table files left out of the views so far because they do not read as Parquet (sorted)."""
        return sorted(set().union(*self._skipped.values()))

    def _parquet_source(self, directory: Path, table: str) -> str | None:
        """`read_parquet`'s files for one sweep's table: its glob, or the list of its files but the
        skipped ones when it has some; None when it has no (readable) file."""
        files = glob.glob(os.path.join(glob.escape(str(directory)), "tables", table, "**", "*.parquet"), recursive=True)
        readable = [f for f in files if os.path.normpath(f) not in self._skipped[table]]
        if not readable:
            return None
        if len(readable) == len(files):
            return _literal(f"{directory}/tables/{table}/**/*.parquet")
        return "[" + ", ".join(map(_literal, readable)) + "]"

    def _define_view(self, view: str) -> None:
        """(Re)define a view over the current files of its table; a no-op when the definition is unchanged."""
        parts = [f"FROM _empty_{view}"]
        for directory, name in zip(self.directories, self.names):
            if view == "planned":
                if glob.glob(os.path.join(glob.escape(str(directory)), "packs", "*.json")):
                    source = _literal(f"{directory}/packs/*.json")
                    # union_by_name: pack files of version 1 lack the member fields version 2 added.
                    parts.append(f"SELECT {_literal(name)} AS sweep, pack_id, unnest(members, recursive := true) "
                                 f"FROM read_json({source}, union_by_name = true)")
            elif source := self._parquet_source(directory, view):
                parts.append(
                    f"SELECT {_literal(name)} AS sweep, * FROM read_parquet({source}, union_by_name = true, hive_partitioning = true)"
                )
        definition = f"CREATE OR REPLACE VIEW {view} AS " + " UNION ALL BY NAME ".join(parts)
        if definition != self._definitions.get(view):
            self._con.execute(definition)
            self._definitions[view] = definition

    def _unreadable_file_named(self, message: str) -> tuple[str, str] | None:
        """(table, path) of a table file that `message` quotes, not yet skipped, that does not read as Parquet."""
        for quoted in _QUOTED_PARQUET_PATH.findall(message):
            path = Path(os.path.normpath(quoted))
            for directory in self.directories:
                if path.is_relative_to(directory / "tables"):
                    table = path.relative_to(directory / "tables").parts[0]
                    # Messages quote readable files too (and a query can raise any message with error()).
                    if table in self._skipped and str(path) not in self._skipped[table] and not reads_as_parquet(str(path)):
                        return table, str(path)
        return None

    def _run(self, statement: Callable[[], Result]) -> Result:
        """`statement()`, retried without each unreadable table file that a DuckDB error names (see
        module doc); any other database error raises QueryError."""
        while True:
            try:
                for table, skipped in self._skipped.items():
                    if skipped:  # an explicit file list: re-listed, as DuckDB re-reads a glob
                        self._define_view(table)
                return statement()
            except duckdb.Error as error:
                unreadable = self._unreadable_file_named(str(error))
                if unreadable is None:
                    raise QueryError(str(error)) from None
                table, path = unreadable
                logger.warning("skipping unreadable Parquet file %s", path)
                self._skipped[table].add(path)

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


def open_sweep(*paths: str | os.PathLike) -> Sweep:
    """A read-only query session over the sweep directories `paths` (glob patterns allowed)."""
    return Sweep(expand_sweep_paths(paths))
