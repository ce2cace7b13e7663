"""Reads of a damaged sweep: queries, `phase` (final epoch and every epoch) and `report` leave out
each damaged file, naming it, and go on with the rest: a page corrupted behind an intact footer,
a members file gone, a foreign file, a copy whose rows would count twice. A sweep path with glob
characters reads as any other. (A damaged page that still decodes is for `nc-ray status`, which
checks page checksums: tests/test_completeness.py.)"""

import logging

import pyarrow.parquet as pq
import pytest

from nc_ray.cli import main
from nc_ray.query import open_sweep
from tests.faults import damage

READ_COMMANDS = {
    "query": lambda sweep: ["query", str(sweep), "SELECT count(*) AS n, sum(tcv_rel) AS s FROM metrics"],
    "phase --epoch all": lambda sweep: ["phase", str(sweep), "--epoch", "all"],
    "phase": lambda sweep: ["phase", str(sweep)],
    "report": lambda sweep: ["report", str(sweep)],
}


def skip_warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "nc_ray.query" and r.levelno == logging.WARNING)


@pytest.mark.parametrize("command", READ_COMMANDS)
def test_corrupt_pages_behind_intact_footers_are_skipped_in_every_read(command, smoke_copy, caplog, capsys):
    sweep = smoke_copy()
    metrics = damage.pack_files(sweep, "metrics", 3)[1]
    members = damage.pack_files(sweep, "members", 2)[0]  # the depth-3 members stay: phase still has a forecast to draw
    damage.corrupt_page(metrics, "tcv_rel", at=0)  # page headers: DuckDB stops there (TProtocolException)
    damage.corrupt_page(members, "status", at=0)
    with caplog.at_level(logging.WARNING, logger="nc_ray.query"):
        assert main(READ_COMMANDS[command](sweep)) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "TProtocol" not in out.err + out.out
    warnings = skip_warnings(caplog)
    assert f"skipping unreadable Parquet file {members}" in warnings
    if command in ("query", "phase --epoch all"):  # the final-epoch reads never need the epoch-3 file
        assert f"skipping unreadable Parquet file {metrics}" in warnings
    with open_sweep(sweep) as session:
        expected = 60 - pq.read_metadata(metrics).num_rows
        assert session.sql("SELECT count(*) AS n, count(tcv_rel) AS c FROM metrics").to_pylist() == [{"n": expected, "c": expected}]
        assert session.sql("SELECT count(*) AS n FROM members").to_pylist() == [{"n": 4}]
        assert session.skipped == sorted([str(metrics), str(members)])


@pytest.mark.parametrize("depth", [2, 3])  # with depth 3's members gone no complete member has a middle layer to forecast
@pytest.mark.parametrize("command", ["phase", "report"])
def test_phase_and_report_go_on_without_a_members_file(command, depth, smoke_copy, capsys):
    sweep = smoke_copy()
    damage.delete(damage.pack_files(sweep, "members", depth)[0])
    assert main(READ_COMMANDS[command](sweep)) == 0, capsys.readouterr().err
    with open_sweep(sweep) as session:  # what the query side returns: the other pack's members, every metrics row
        assert session.sql("SELECT count(*) AS n, count(DISTINCT depth) AS d FROM members").to_pylist() == [{"n": 4, "d": 1}]
        assert session.sql("SELECT count(*) AS n FROM metrics").to_pylist() == [{"n": 60}]


def test_foreign_files_and_copies_are_left_out_of_queries(smoke_copy, caplog):
    sweep = smoke_copy()
    stranger = sweep / "tables" / "metrics" / "stranger.parquet"
    damage.foreign(stranger)
    first, second = damage.pack_files(sweep, "metrics", 2)[:2]
    copy = first.with_name(first.name.replace("-e000000", "-e000009"))
    damage.copy_onto(first, copy)  # its 8 rows would count twice
    damage.copy_onto(first, second)  # epoch 0's rows where epoch 3's belong
    with caplog.at_level(logging.WARNING, logger="nc_ray.query"), open_sweep(sweep) as session:
        keys = session.sql("SELECT member_id, epoch, layer FROM metrics").to_pylist()
        assert len(keys) == 60 - 8 and len({tuple(k.values()) for k in keys}) == len(keys)
        assert all(k["member_id"] is not None for k in keys)
        assert session.skipped == sorted(map(str, (stranger, copy, second)))
    warnings = skip_warnings(caplog)
    assert f"skipping {stranger}: foreign" in warnings and f"skipping {copy}: misplaced" in warnings and f"skipping {second}: misplaced" in warnings


def test_a_sweep_path_with_glob_characters_reads_whole(smoke_copy, capsys):
    sweep = smoke_copy("runs[1]/a*b?")
    assert main(["query", str(sweep), "SELECT (SELECT count(*) FROM metrics) AS m, (SELECT count(*) FROM spectra) AS s, "
                                      "(SELECT count(*) FROM members) AS n, (SELECT count(*) FROM planned) AS p", "--format", "json"]) == 0
    assert capsys.readouterr().out.strip() == '[{"m": 60, "s": 60, "n": 8, "p": 8}]'
    for argv in (["status", str(sweep)], ["doctor", str(sweep)], ["phase", str(sweep)], ["report", str(sweep)]):
        assert main(argv) == 0, argv
        out = capsys.readouterr()
        assert "unreadable" not in out.out + out.err and "skipping" not in out.err, (argv, out)
    with open_sweep(sweep) as session:
        assert session.skipped == [] and session.directories == [sweep]
