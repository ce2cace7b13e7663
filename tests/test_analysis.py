"""Tests for nc_ray.analysis, nc_ray.plots, nc_ray.report and `nc-ray phase` / `nc-ray report`, on
the synthetic sweep of tests/test_query.py: aggregated numbers against a direct pandas/numpy
computation from the metrics table, phases of constructed cells, counts, stored thresholds, the
forecast comparison, valid PNGs and a self-contained HTML page."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import pyarrow as pa

from nc_ray.analysis import (
    METADATA_KEY, PhaseThresholds, aggregate, boundary_comparison, boundary_text, forecast_comparison, forecast_setup, write_aggregate,
)
from nc_ray.plots import collapse_objective_concordance
from nc_ray.cli import main
from nc_ray.query import open_sweep
from nc_ray.store import SweepStore
from nc_ray.theory import forecast
from tests.test_query import DECAYS, DEPTHS, DIVERGED, EXPECTED_PHASES, FAILED, K, UNFINISHED, build_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    return build_sweep(tmp_path_factory.mktemp("analysis") / "alpha", seed=1)


def _direct(sweep_dir: Path, metric: str, layers: str = "hidden", epoch: int | None = None) -> pd.DataFrame:
    """Per (weight_decay, depth): median, q25, q75 over complete members of the per-member median
    over the selected layers, computed with pandas/numpy from the raw tables."""
    store = SweepStore(str(sweep_dir))
    metrics = store.read_table("metrics").to_pandas()
    members = store.read_table("members", ["member_id", "status", "final_epoch"]).to_pandas()
    rows = metrics.merge(members[members.status == "complete"], on="member_id")
    rows = rows[rows.epoch == (rows.final_epoch if epoch is None else epoch)]
    keep = {"hidden": (rows.layer < rows.depth) & ((rows.layer > 1) | (rows.depth <= 2)), "penultimate": rows.layer == rows.depth}[layers]
    per_member = rows[keep].groupby(["weight_decay", "depth", "member_id"])[metric].median().reset_index()
    return per_member.groupby(["weight_decay", "depth"])[metric].agg(
        median="median", q25=lambda v: np.quantile(v, 0.25), q75=lambda v: np.quantile(v, 0.75), n="size"
    ).reset_index()


def _cells(table) -> dict:
    return {(row["weight_decay"], row["depth"]): row for row in table.to_pylist()}


@pytest.mark.parametrize(("metric", "layers"), [("nc1", "hidden"), ("rank_rel_1e2", "hidden"), ("tcv_rel", "penultimate"), ("test_acc", "hidden")])
def test_aggregate_matches_a_direct_computation(sweep_dir, metric, layers):
    with open_sweep(sweep_dir) as sweep:
        cells = _cells(aggregate(sweep, metrics=[metric], layers=layers))
    direct = _direct(sweep_dir, metric, layers)
    assert len(direct) == len(DECAYS) * len(DEPTHS) == len(cells)
    for row in direct.itertuples():
        cell = cells[(row.weight_decay, row.depth)]
        assert cell["n_complete"] == row.n == 3
        for stat in ("median", "q25", "q75"):
            assert cell[f"{metric}_{stat}"] == pytest.approx(getattr(row, stat), rel=1e-12)


def test_aggregate_at_a_given_epoch_and_per_epoch(sweep_dir):
    with open_sweep(sweep_dir) as sweep:
        at_zero = _cells(aggregate(sweep, metrics=["nc1"], epoch=0))
        every = aggregate(sweep, metrics=["nc1"], epoch="all").to_pylist()
    direct = _direct(sweep_dir, "nc1", epoch=0)
    for row in direct.itertuples():
        assert at_zero[(row.weight_decay, row.depth)]["nc1_median"] == pytest.approx(row.median, rel=1e-12)
    assert {r["epoch"] for r in every} == {0, 10} and len(every) == 2 * len(DECAYS) * len(DEPTHS)
    by_epoch = {(r["epoch"], r["weight_decay"], r["depth"]): r["nc1_median"] for r in every}
    for row in direct.itertuples():
        assert by_epoch[(0, row.weight_decay, row.depth)] == pytest.approx(row.median, rel=1e-12)


def test_phases_of_constructed_cells_and_member_counts(sweep_dir):
    with open_sweep(sweep_dir) as sweep:
        cells = _cells(aggregate(sweep))
    assert {cell: row["phase"] for cell, row in cells.items()} == EXPECTED_PHASES
    for (decay, depth), row in cells.items():
        expected = {"n_complete": 3, "n_diverged": 0, "n_failed": 0, "n_unfinished": 0, "n_configs": 1, "n_classes": K}
        for status, (d, L, _) in (("n_diverged", DIVERGED), ("n_failed", FAILED), ("n_unfinished", UNFINISHED)):
            expected[status] += (decay, depth) == (d, L)
        assert {k: row[k] for k in expected} == expected, (decay, depth)
    # The diverged member's epoch-0 rows (train_acc 0) and the unfinished one's rows stay out.
    assert cells[(DIVERGED[0], DIVERGED[1])]["train_acc_median"] == pytest.approx(0.999)


def test_thresholds_change_phases_and_are_stored(sweep_dir):
    strict = PhaseThresholds(collapsed_acc=1.0, trivial_acc_margin=0.0)
    with open_sweep(sweep_dir) as sweep:
        table = aggregate(sweep, thresholds=strict)
    phases = {cell: row["phase"] for cell, row in _cells(table).items()}
    assert phases[(1e-2, 2)] == "low_rank"  # median train_acc 0.999 < 1.0: no DNC1, hidden rank still <= K
    assert phases[(1e-1, 3)] == "trivial"  # still: 0.2 <= 1/3
    assert phases[(1e-3, 2)] == "not_collapsed"
    with open_sweep(sweep_dir) as sweep:
        rank_strict = _cells(aggregate(sweep, thresholds=PhaseThresholds(low_rank_per_class=0.1)))
    assert {rank_strict[cell]["phase"] for cell in [(1e-2, 2), (1e-2, 3)]} == {"collapsed"}  # DNC1, rank > 0.1 K
    for row in rank_strict.values():
        assert row["rank_below_dnc"] == (row["phase_rank_rel"] < K - 1)
    assert set(table["threshold_collapsed_acc"].to_pylist()) == {1.0}
    path = write_aggregate(str(sweep_dir / "analysis"), table)
    assert path == str(sweep_dir / "analysis" / "phase_weight_decay_depth.parquet")
    stored = pq.read_table(path)
    info = json.loads(stored.schema.metadata[METADATA_KEY])
    assert info["thresholds"] == strict.as_dict() and (info["x"], info["y"], info["layers"], info["epoch"]) == ("weight_decay", "depth", "hidden", "final")
    assert stored.num_rows == table.num_rows
    with open_sweep(sweep_dir) as sweep:  # the analysis folder is not one of the query views
        assert "phase" not in sweep.columns("metrics")
    with pytest.raises(ValueError, match="finite number"):
        PhaseThresholds(collapsed_acc=float("nan"))


def test_layer_numbers_and_bad_options(sweep_dir):
    with open_sweep(sweep_dir) as sweep:
        layer3 = _cells(aggregate(sweep, metrics=["sv_max"], layers=3))
        assert layer3[(1e-3, 2)]["sv_max_median"] is None and layer3[(1e-3, 3)]["sv_max_median"] is not None
        for bad in ({"x": "depth"}, {"x": "nope"}, {"metrics": ["member_id"]}, {"layers": "middle"}, {"epoch": -1}):
            with pytest.raises(ValueError):
                aggregate(sweep, **bad)


def test_forecast_comparison_against_theory_and_spectra(sweep_dir):
    with open_sweep(sweep_dir) as sweep:
        setup = forecast_setup(sweep, radius=2.0)
        table = forecast_comparison(sweep, setup)
        spectra = sweep.spectra(["member_id", "depth", "weight_decay", "layer", "epoch", "singular_values"], epoch=10, layer=2, depth=3).to_pandas()
        complete = set(sweep.members(["member_id"], status="complete")["member_id"].to_pylist())
    assert (setup.n_classes, setup.loss, setup.radius_source) == (K, "ce", "given")
    rows = {(r["depth"], r["weight_decay"]): r for r in table.to_pylist()}
    assert set(rows) == {(3, d) for d in DECAYS}  # depth 2 has no middle layer past layer 1
    for decay in DECAYS:
        row = rows[(3, decay)]
        expected_s = forecast(decay, 2, K, 2.0, "ce").s_star
        assert row["s_star"] == pytest.approx(float(expected_s)) and row["k"] == K - 1 and row["label"] == "reconstructed"
        values = spectra[(spectra.weight_decay == decay) & spectra.member_id.isin(complete)]
        # The significant singular values (> 0.1 σ_1), not the top k with near-zero ones included.
        significant = [np.asarray(sv)[np.asarray(sv) > 0.1 * sv[0]] for sv in values.singular_values]
        size = np.median([s.mean() for s in significant])
        assert row["size"] == pytest.approx(size, rel=1e-12)
        assert row["count"] == np.median([len(s) for s in significant])
        assert row["size_q25"] <= row["size"] <= row["size_q75"]
        assert row["rel_error"] == pytest.approx(abs(size - expected_s) / expected_s, rel=1e-9)


def test_a_zero_matrix_has_no_significant_singular_values(tmp_path):
    """The zero-matrix rule in the comparison: count 0 and no size on σ_1 < 1e-10."""
    sweep_dir = build_sweep(tmp_path / "zero", seed=2)
    spectra_dir = sweep_dir / "tables" / "spectra"
    for path in spectra_dir.glob("*.parquet"):
        table = pq.read_table(path)
        zeroed = [[v * 1e-30 for v in sv] if d == 3 and w == DECAYS[0] else sv
                  for sv, d, w in zip(table["singular_values"].to_pylist(), table["depth"].to_pylist(), table["weight_decay"].to_pylist())]
        table = table.set_column(table.schema.get_field_index("singular_values"), "singular_values", pa.array(zeroed, type=pa.list_(pa.float64())))
        pq.write_table(table, path)
    with open_sweep(sweep_dir) as sweep:
        row = {(r["depth"], r["weight_decay"]): r for r in forecast_comparison(sweep, forecast_setup(sweep, radius=2.0)).to_pylist()}[(3, DECAYS[0])]
    assert row["count"] == 0 and row["size"] is None


def test_boundary_comparison_brackets_the_measured_trivial_boundary(sweep_dir):
    with open_sweep(sweep_dir) as sweep:
        setup = forecast_setup(sweep, radius=2.0)
        table = boundary_comparison(aggregate(sweep), setup)
    rows = {r["depth"]: r for r in table.to_pylist()}
    assert set(rows) == set(DEPTHS)
    for depth in DEPTHS:  # trivial at λ = 0.1 for both depths (EXPECTED_PHASES), not below
        assert (rows[depth]["measured_boundary"], rows[depth]["last_non_trivial"]) == (0.1, 0.01)
        assert rows[depth]["lambda_crit"] == pytest.approx(setup.critical_weight_decay([depth])[depth])
        crit = rows[depth]["lambda_crit"]  # inf for a one-layer tail (depth 2): no ratio
        assert rows[depth]["ratio"] == (pytest.approx(0.1 / crit) if np.isfinite(crit) else None)
    assert "none in" not in boundary_text(table) and "0.1" in boundary_text(table)


def test_concordance_of_objective_and_collapse_within_cells():
    table = pa.table({
        "depth": [2, 2, 2, 3, 3], "weight_decay": [0.1, 0.1, 0.1, 0.1, 0.1],
        "tcv_rel": [0.01, 0.02, 0.03, 0.5, 0.1], "objective": [1.0, 2.0, 1.5, 1.0, 1.0],
    })
    # depth 2: pairs (0.01, 1.0)-(0.02, 2.0) agree, (0.01)-(0.03) agree, (0.02, 2.0)-(0.03, 1.5) disagree;
    # depth 3: equal objectives, a tie, not counted.
    assert collapse_objective_concordance(table) == (2, 3)


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 8_000, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 150 and image.shape[1] > 250, (path, image.shape)


def test_phase_command_writes_the_table_and_valid_pngs(sweep_dir, tmp_path, capsys):
    out = tmp_path / "figures"
    assert main(["phase", str(sweep_dir), "--metric", "nc1", "--radius", "2.0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    pngs = sorted(out.glob("*.png"))
    assert {p.stem for p in pngs} == {
        "phase_map_weight_decay_depth", "heatmap_nc1_hidden",
        "relation_bound", "relation_trajectories", "relation_objective", "relation_rank", "relation_tcv",
        "relation_spectra", "relation_forecast",
    }
    for path in pngs:
        _check_png(path)
        assert str(path) in printed
    assert (out / "phase_weight_decay_depth.parquet").exists()  # with --out, the table goes there too
    assert re.search(r"^3 +N +C\+L +T$", printed, re.MULTILINE)  # the text phase grid, depth 3 row
    assert main(["phase", str(sweep_dir), "--metric", "member_id"]) == 2
    assert "metrics must be numeric" in capsys.readouterr().err


def test_report_is_one_self_contained_page(sweep_dir, tmp_path, capsys):
    output = tmp_path / "report.html"
    assert main(["report", str(sweep_dir), "--radius", "2.0", "--output", str(output)]) == 0
    assert str(output) in capsys.readouterr().out
    page = output.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 1 + 5 + 7  # phase map, heatmaps, relations (forecast, bound, trajectories, objective, rank, tcv, spectra)
    assert all(base64.b64decode(i)[:8] == PNG_SIGNATURE for i in images)
    assert not re.search(r'src="(?!data:)', page)  # nothing loaded from elsewhere
    n_rows = pq.read_table(sweep_dir / "tables/metrics").num_rows
    assert f"{(n_rows - 1) / n_rows:.6f} ({n_rows - 1} of {n_rows} metrics rows)" in page  # one row has bound_ok false
    assert "collapsed_low_rank" in page and "weight_decay" in page and "reconstructed" in page


def test_phase_goes_on_when_the_final_epoch_files_are_damaged(tmp_path, capsys):
    sweep = build_sweep(tmp_path / "damaged")
    for final in (sweep / "tables" / "metrics").glob("*-e000010.parquet"):
        final.write_bytes(final.read_bytes()[:100])
    assert main(["phase", str(sweep), "--out", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    assert "phase table:" in out and "heatmap_train_acc" in out
    assert "relation_" not in out  # no complete member has a readable final epoch to relate


# Each figure holds an artist that records the pid drawing it and needs LOCK. In a fresh interpreter
# (no Ray threads) render_pngs forks; with a thread holding LOCK it must render in this process,
# since a forked child would inherit LOCK held and wait for it for ever.
RENDER_SCRIPT = textwrap.dedent("""
    import os, sys, threading, time
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure
    from nc_ray.plots import png_bytes, render_pngs

    LOCK = threading.Lock()
    PIDS = sys.argv[1]

    class NeedsLock(Artist):
        def draw(self, renderer):
            with LOCK, open(PIDS, "a") as f:
                f.write(f"{os.getpid()}\\n")

    def figures():
        out = {}
        for i in range(4):
            figure = Figure(figsize=(2, 2))
            figure.add_subplot().plot([0, 1], [0, i])
            figure.add_artist(NeedsLock())
            out[f"f{i}"] = figure
        return out

    forked = render_pngs(figures(), processes=2)
    assert forked == {name: png_bytes(f) for name, f in figures().items()}
    print("forked", len(set(open(PIDS).read().split()) - {str(os.getpid())}) > 0)
    open(PIDS, "w").close()

    LOCK.acquire()
    holder = threading.Thread(target=lambda: (time.sleep(1.0), LOCK.release()))
    holder.start()
    assert render_pngs(figures(), processes=2).keys() == {"f0", "f1", "f2", "f3"}
    holder.join()
    print("threaded", set(open(PIDS).read().split()) == {str(os.getpid())})
""")


def test_figures_render_in_forked_processes_only_when_no_other_thread_could_hold_a_lock(tmp_path):
    # Its own session, so that a hang kills the forked children with it.
    process = subprocess.Popen([sys.executable, "-c", RENDER_SCRIPT, str(tmp_path / "pids")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, err
    assert out.split() == ["forked", "True", "threaded", "True"]
