"""Whether a sweep directory holds every row it should, once: the completeness invariant, checked.

The invariant. For every member m of a pack P (`packs/P.json`) with a finished row in `members`
(status complete or diverged), `metrics` and `spectra` each hold exactly one row (m, e, l) for
every evaluation epoch e of m up to its last one (`last_epoch`) and every layer l = 1..depth, and
no other row of m; the rows of pack P and epoch e lie in `tables/<table>/P-e<e>.parquet`, and
the members rows of P in `tables/members/P.parquet`, one per member. A pack not finished yet has
a file for every evaluation epoch up to the one its progress marker names.

`check_sweep` reads every published table file once, whole (every page of every column, with the
page checksums that files carry since they were added), keeps the key columns, and compares them
with what the pack definitions and members rows promise. The file names carry pack and epoch, so
no other column is compared. What it finds, by kind:

    unreadable  the file does not read whole as Parquet: footer, page or checksum
    foreign     it reads, but its columns are not those of its table (`store.schema_mismatch`)
    misplaced   its rows are not those its name promises: another pack or epoch (a copy: its rows
                duplicate another file's), a member not in the pack, a layer out of range, a key
                twice, rows of a finished member after its last epoch
    stray       its name is not one the layout gives any of the sweep's packs
    missing     a finished member lacks rows, or an unfinished pack lacks the file of an epoch it
                has evaluated
    undefined   members rows of a pack without its `packs/P.json`: its rows cannot be checked

Each problem names the pack whose retraining repairs it (`Problem.pack_id`): retraining rewrites
every file of a pack under the same names. A file-level problem is repaired by moving the file
aside too (`Problem.movable`), which is all a stray file needs. Members of a damaged pack count as
unfinished (`SweepCheck.statuses` leaves them out), so planning retrains them like any other.

Reading pyarrow only (no Ray, no torch): `nc-ray status` and `doctor` run it as they are.
"""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from nc_ray.config import MemberConfig, PackPlan
from nc_ray.schema import MEMBER_STATUSES, SCHEMAS, TABLES
from nc_ray.store import SweepStore, parse_table_file, schema_mismatch

FINISHED = ("complete", "diverged")
PROBLEM_KINDS = ("unreadable", "foreign", "misplaced", "stray", "missing", "undefined")
FILE_KINDS = ("unreadable", "foreign", "misplaced", "stray")
# What the check keeps of each file's rows (a column a file lacks reads as nulls).
_KEPT = {"members": ("member_id", "pack_id", "status", "error", "stopped_epoch", "final_epoch"),
         "metrics": ("member_id", "pack_id", "epoch", "layer"), "spectra": ("member_id", "pack_id", "epoch", "layer")}
_READERS = 8  # files read at once (pyarrow decodes without the GIL; object stores answer slowly)


@dataclass(frozen=True)
class Problem:
    """One way the sweep falls short of the invariant (`kind`, one of PROBLEM_KINDS)."""

    kind: str
    path: str  # the file concerned: the damaged file, or the file that lacks (or should hold) missing rows
    detail: str  # what is wrong, in words
    pack_id: str | None  # the pack whose retraining repairs it; None where moving the file aside is all it takes

    @property
    def movable(self) -> bool:
        """Whether the file itself is damaged and goes to quarantine/ (missing rows have no file to move)."""
        return self.kind in FILE_KINDS

    def __str__(self) -> str:
        return f"{self.kind}: {self.path} ({self.detail})"


@dataclass(frozen=True)
class SweepCheck:
    """What `check_sweep` found: the trusted member statuses and every problem."""

    statuses: dict[str, str]  # member_id -> status, from readable members rows of packs without problems
    errors: dict[str, str]  # member_id -> error, for failed members among `statuses`
    problems: list[Problem] = field(default_factory=list)

    @property
    def damaged_packs(self) -> set[str]:
        """Packs to retrain from scratch."""
        return {p.pack_id for p in self.problems if p.pack_id is not None}


def last_epoch(config: MemberConfig, status: str, stopped_epoch: int | None, final_epoch: int | None) -> int | None:
    """The last evaluation epoch with rows of a finished member: where its stop rule stopped it, its
    last finite evaluation if it diverged (None: it had none), else its final epoch."""
    if status == "diverged":
        return final_epoch
    return stopped_epoch if stopped_epoch is not None else config.epochs


@dataclass
class _File:
    """One table file as read: its name's pack and epoch, its key columns or why they are not to be trusted."""

    table: str
    path: str
    pack_id: str | None = None
    epoch: int | None = None
    keys: pa.Table | None = None
    problem: Problem | None = None


def _read(store: SweepStore, table: str, name: str, packs: dict[str, PackPlan]) -> _File | None:
    """Read one file whole and judge it against its name alone; None if it is gone (moved or deleted meanwhile)."""
    path = store.path("tables", table, name)
    parsed = parse_table_file(table, name)
    pack_id, epoch = parsed if parsed else (None, None)
    pack = packs.get(pack_id)
    # A file no pack of the sweep would write: moving it aside repairs everything.
    stray = parsed is None or (pack is not None and epoch is not None and not pack.first.is_evaluation_epoch(epoch))
    owner = None if stray else pack_id
    found = _File(table, path, pack_id, epoch)
    try:
        with store.fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle, page_checksum_verification=True)
            mismatch = schema_mismatch(table, parquet.schema_arrow)
            if mismatch:
                found.problem = Problem("foreign", path, mismatch, owner)
                return found
            whole = parquet.read(use_threads=False)  # every page of every column: damage anywhere shows here
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError) as error:
        found.problem = Problem("unreadable", path, " ".join(str(error).split()) or type(error).__name__, owner)
        return found
    keys = whole.select([c for c in _KEPT[table] if c in whole.column_names])
    for column in _KEPT[table]:
        if column not in keys.column_names:  # written before the column existed
            keys = keys.append_column(column, pa.nulls(keys.num_rows, SCHEMAS[table].field(column).type))
    if stray:
        why = "not a name the sweep's files have" if parsed is None else f"epoch {epoch} is not an evaluation epoch of pack {pack_id}"
        found.problem = Problem("stray", path, f"{why}; it holds {_whose(keys)}", None)
        return found
    misfit = _misfit(table, keys, pack_id, epoch, pack)
    if misfit:
        found.problem = Problem("misplaced", path, misfit, pack_id)
    else:
        found.keys = keys
    return found


def _whose(keys: pa.Table) -> str:
    """The rows of a file in words: `<n> rows of <pack>[-e<epoch>], ...` (the names of the files they belong in)."""
    by = ["pack_id", "epoch"] if "epoch" in keys.column_names else ["pack_id"]
    groups = keys.group_by(by).aggregate([]).to_pylist()
    names = sorted(f"{g['pack_id'] or 'no pack'}" + (f"-e{g['epoch']:06d}" if g.get("epoch") is not None else "") for g in groups)
    return f"{keys.num_rows} rows of {', '.join(names)}" if keys.num_rows else "no rows"


def _misfit(table: str, keys: pa.Table, pack_id: str, epoch: int | None, pack: PackPlan | None) -> str | None:
    """Why a file's rows are not those its name promises, or None. A null pack_id (rows written
    without one) is judged by membership alone."""
    import pyarrow.compute as pc  # here: query sessions import this module for its footer checks alone

    if keys.num_rows == 0:
        return None
    other_pack = pc.any(pc.not_equal(keys["pack_id"], pack_id)).as_py()
    other_epoch = epoch is not None and (keys["epoch"].null_count or not pc.all(pc.equal(keys["epoch"], epoch)).as_py())
    if other_pack or other_epoch:
        return f"it holds {_whose(keys)}, not the rows its name says: a copy duplicates another file's rows"
    row_key = ["member_id"] if table == "members" else ["member_id", "layer"]
    if keys.group_by(row_key).aggregate([]).num_rows != keys.num_rows or keys["member_id"].null_count:
        return "holds a key twice, or rows without a member_id"
    if table == "members":
        unknown = set(keys["status"].to_pylist()) - set(MEMBER_STATUSES)
        if unknown:
            return f"status {sorted(map(str, unknown))} is none of {', '.join(MEMBER_STATUSES)}"
    if pack is None:
        return None
    ids = pa.array([m.member_id for m in pack.members])
    position = pc.index_in(keys["member_id"], value_set=ids)
    if position.null_count:
        return f"{position.null_count} rows of members not in pack {pack_id}"
    if table != "members":
        depth = pc.take(pa.array([m.depth for m in pack.members]), position)
        layer = keys["layer"]
        if layer.null_count or not pc.all(pc.and_(pc.greater_equal(layer, 1), pc.less_equal(layer, depth))).as_py():
            return "a layer outside 1..depth of its member"
    return None


def footer_problem(table: str, name: str, parquet: pq.ParquetFile) -> tuple[str, str] | None:
    """(kind, detail) of what a file's footer alone shows to be wrong, or None: a foreign schema,
    or, for a name of the layout, row-group statistics of pack_id / epoch other than its name's
    (a copy). Cheap (no page is read): what a query session checks of every file."""
    mismatch = schema_mismatch(table, parquet.schema_arrow)
    if mismatch:
        return "foreign", mismatch
    parsed = parse_table_file(table, name)
    if parsed is None:
        return None  # a name of the user's own (e.g. in a hive partition): nothing to compare with
    metadata = parquet.metadata
    for name, expected in zip(("pack_id", "epoch"), parsed):
        index = _leaf_index(parquet, name)
        for group in range(metadata.num_row_groups if index is not None and expected is not None else 0):
            statistics = metadata.row_group(group).column(index).statistics
            if statistics is None or not statistics.has_min_max:
                continue
            if statistics.min != expected or statistics.max != expected:
                held = statistics.min if statistics.min == statistics.max else f"{statistics.min}..{statistics.max}"
                return "misplaced", f"its rows have {name} {held}, not {expected} as its name says: a copy duplicates another file's rows"
    return None


def _leaf_index(parquet: pq.ParquetFile, name: str) -> int | None:
    """The Parquet column index of the top-level primitive column `name`, or None."""
    schema = parquet.metadata.schema
    index = parquet.schema_arrow.get_field_index(name)  # the leaf index too, while no nested column comes first
    if 0 <= index < len(schema) and schema.column(index).path == name:
        return index
    return next((i for i in range(len(schema)) if schema.column(i).path == name), None)


def _read_all(store: SweepStore, packs: dict[str, PackPlan]) -> list[_File]:
    names = [(table, name) for table in TABLES for name in store.list_files(f"tables/{table}", ".parquet")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=_READERS) as pool:
        read = list(pool.map(lambda item: _read(store, *item, packs), names))
    return [f for f in read if f is not None]


def _read_packs(store: SweepStore) -> tuple[dict[str, PackPlan], list[Problem]]:
    packs, problems = {}, []
    for pack_id in store.pack_ids():
        try:
            packs[pack_id] = store.read_pack(pack_id)
        except (OSError, ValueError, KeyError, TypeError) as error:
            problems.append(Problem("unreadable", store.path("packs", f"{pack_id}.json"), f"pack definition: {error}", None))
    return packs, problems


def _progress(store: SweepStore, pack_ids: Iterable[str]) -> dict[str, int]:
    """pack_id -> the latest epoch its progress marker names (packs that have one)."""
    reached = {}
    for pack_id in pack_ids:
        if store.exists(f"progress/{pack_id}.json"):
            try:
                reached[pack_id] = int(store.read_json(f"progress/{pack_id}.json")["epoch"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a marker is a hint for status; the files themselves are checked
    return reached


def check_sweep(store: SweepStore) -> SweepCheck:
    """Check the completeness invariant (module doc) on the sweep in `store`; reads every table file once."""
    packs, problems = _read_packs(store)
    # Progress first, files second: a pack publishes an epoch's files before its marker names it.
    progress = _progress(store, packs)
    files = _read_all(store, packs)
    problems += [f.problem for f in files if f.problem is not None]
    good = [f for f in files if f.problem is None]

    rows_of: dict[str, dict] = {}  # member_id -> its members row
    for f in good:
        if f.table == "members":
            for row in f.keys.to_pylist():
                rows_of[row["member_id"]] = row
    held: dict[tuple[str, str, int], Counter] = {}  # (table, pack, epoch) -> member_id -> rows
    for f in good:
        if f.table != "members":
            held[(f.table, f.pack_id, f.epoch)] = Counter(f.keys["member_id"].to_pylist())
    reported = {(f.table, f.pack_id, f.epoch) for f in files if f.problem is not None}

    for pack_id in sorted({r["pack_id"] for r in rows_of.values()} - set(packs)):
        problems.append(Problem("undefined", store.path("tables", "members", f"{pack_id}.parquet"),
                                f"members rows of pack {pack_id}, which has no packs/{pack_id}.json: its rows cannot be checked", None))
    for pack_id, pack in sorted(packs.items()):
        problems += _pack_problems(store, pack, rows_of, held, reported, progress.get(pack_id))

    damaged = {p.pack_id for p in problems if p.pack_id is not None}
    statuses = {m: r["status"] for m, r in rows_of.items() if r["pack_id"] not in damaged}
    errors = {m: rows_of[m]["error"] for m, s in statuses.items() if s == "failed"}
    return SweepCheck(statuses, errors, problems)


def _pack_problems(
    store: SweepStore, pack: PackPlan, rows_of: dict[str, dict], held: dict[tuple[str, str, int], Counter],
    reported: set[tuple[str, str | None, int | None]], reached: int | None,
) -> list[Problem]:
    """Rows missing from, or present beyond, what one pack's members rows and progress marker
    promise (files already reported as damaged left out)."""
    last = {}  # member_id -> its last epoch with rows, for the pack's finished members
    for member in pack.members:
        row = rows_of.get(member.member_id)
        if row is not None and row["status"] in FINISHED:
            last[member.member_id] = last_epoch(member, row["status"], row["stopped_epoch"], row["final_epoch"])
    unfinished = len(last) < len(pack.members)
    problems = []
    for table in ("metrics", "spectra"):
        for epoch in pack.first.evaluation_epochs():
            if (table, pack.pack_id, epoch) in reported:
                continue
            present = held.get((table, pack.pack_id, epoch))
            path = store.path("tables", table, f"{pack.pack_id}-e{epoch:06d}.parquet")
            expected = {m.member_id: m.depth for m in pack.members if m.member_id in last and last[m.member_id] is not None and epoch <= last[m.member_id]}
            lacking = sum(depth - (present or {}).get(member_id, 0) for member_id, depth in expected.items())
            beyond = sum(count for member_id, count in (present or {}).items() if member_id in last and member_id not in expected)
            if present is None and (expected or (unfinished and reached is not None and epoch <= reached)):
                what = f"{lacking} rows of finished members" if expected else f"the rows of epoch {epoch}, which the pack has evaluated"
                problems.append(Problem("missing", path, f"the file is gone: {what}", pack.pack_id))
            elif lacking:
                problems.append(Problem("missing", path, f"it lacks {lacking} rows of finished members", pack.pack_id))
            if beyond:
                problems.append(Problem("misplaced", path, f"{beyond} rows of members that stopped or diverged before epoch {epoch}", pack.pack_id))
    return problems
