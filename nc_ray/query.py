"""Read-only SQL over sweep directories: DuckDB views over the Parquet tables of one or more sweeps.

    sweep = open_sweep("runs/quickstart")                 # or several dirs, or a glob
    sweep.sql("SELECT depth, avg(train_acc) FROM metrics GROUP BY depth")   # -> pyarrow.Table
    sweep.df("SELECT * FROM members")                     # -> pandas.DataFrame
    sweep.metrics(depth=4, epoch=400)                     # equality / IN filters -> pyarrow.Table

Views (every one starts with a `sweep` column, the sweep directory's name):
    members, metrics, spectra   the tables of `nc_ray.store` (`tables/<name>/**/*.parquet`), read
                                with hive partitions and union by name: columns missing from some
                                files are null, and every column of `nc_ray.store.SCHEMAS` exists
                                even when a table has no file yet
    planned                     one row per member the sweep planned (the member records of
                                `packs/*.json`): what a finished sweep will hold

Contract of a session:
- Read-only. Only single SELECT statements run (COPY, EXPORT, ATTACH, CREATE, SET, PRAGMA, ... are
  refused before they reach the database), and DuckDB's external access is off except for reads
  inside the sweep directories, with the configuration locked: nothing can be written or deleted
  under a sweep, and no file outside the sweeps can be read.
- Any error of the database, or a refused statement, raises `QueryError` carrying DuckDB's message
  (for unreadable Parquet files DuckDB's message names the file).
- Views are defined when the session opens: a table that had no file then stays empty for the
  session; tables that had files see files published later (the globs are re-read per query).
- Local directories only (the views read through DuckDB's local filesystem).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from nc_ray.store import CONFIG_COLUMNS, SCHEMAS, TABLES

VIEWS = (*TABLES, "planned")
_PLANNED_SCHEMA = pa.schema([SCHEMAS["members"].field(name) for name in ("member_id", "pack_id", *(n for n, _ in CONFIG_COLUMNS))])


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
    """A read-only DuckDB session over the views of one or more sweep directories (see module doc)."""

    def __init__(self, directories: Sequence[Path]):
        self.directories = list(directories)
        self.names = sweep_names(self.directories)
        self._con = duckdb.connect(":memory:")
        for view in VIEWS:
            self._create_view(view)
        allowed = ", ".join(_literal(str(d) + os.sep) for d in self.directories)
        for setting in (
            f"SET allowed_directories = [{allowed}]", "SET enable_external_access = false",
            "SET autoinstall_known_extensions = false", "SET autoload_known_extensions = false",
            "SET lock_configuration = true",
        ):
            self._con.execute(setting)

    def _create_view(self, view: str) -> None:
        schema = _PLANNED_SCHEMA if view == "planned" else SCHEMAS[view]
        empty = pa.schema([pa.field("sweep", pa.string()), *schema]).empty_table()
        self._con.register(f"_empty_{view}", empty)  # fixes the columns and their order
        parts = [f"FROM _empty_{view}"]
        for directory, name in zip(self.directories, self.names):
            if view == "planned":
                if glob.glob(os.path.join(glob.escape(str(directory)), "packs", "*.json")):
                    source = _literal(f"{directory}/packs/*.json")
                    parts.append(f"SELECT {_literal(name)} AS sweep, unnest(members, recursive := true) FROM read_json({source})")
            elif glob.glob(os.path.join(glob.escape(str(directory)), "tables", view, "**", "*.parquet"), recursive=True):
                source = _literal(f"{directory}/tables/{view}/**/*.parquet")
                parts.append(
                    f"SELECT {_literal(name)} AS sweep, * FROM read_parquet({source}, union_by_name = true, hive_partitioning = true)"
                )
        try:
            self._con.execute(f"CREATE VIEW {view} AS " + " UNION ALL BY NAME ".join(parts))
        except duckdb.Error as error:  # e.g. unreadable files, or hive partition depths that differ
            raise QueryError(f"cannot read the {view} table: {error}") from None

    # ------------------------------------------------------------------------------- queries

    def _relation(self, query: str, params: Sequence[Any] | None) -> duckdb.DuckDBPyRelation:
        # Private: a relation has writers (to_parquet, insert, ...) that must not reach callers.
        try:
            statements = self._con.extract_statements(query)
        except duckdb.Error as error:
            raise QueryError(str(error)) from None
        if len(statements) != 1:
            raise QueryError(f"expected one SQL statement, got {len(statements)}")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            raise QueryError(f"sweep queries are read-only: only SELECT statements run, not {kind.name}")
        try:
            return self._con.sql(query, params=list(params) if params is not None else None)
        except duckdb.Error as error:
            raise QueryError(str(error)) from None

    def sql(self, query: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Run one SELECT statement (optional `?` parameters) and return its result as Arrow."""
        relation = self._relation(query, params)
        try:
            return relation.to_arrow_table()
        except duckdb.Error as error:
            raise QueryError(str(error)) from None

    def df(self, query: str, params: Sequence[Any] | None = None):
        """`sql` as a pandas DataFrame."""
        return self.sql(query, params).to_pandas()

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
