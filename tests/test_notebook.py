"""Notebook interop: the result formats of `Sweep` (Arrow, pandas, polars, and polars' absence)
and the walk-through docs/notebook.md, whose `python` blocks run in order, as a notebook runs its
cells, on a copy of the finished sweep tests/fixtures/sweep_v1 (weights included; no Ray)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import matplotlib
import pytest

from nc_ray.query import open_sweep

REPO = Path(__file__).resolve().parents[1]
WALK_THROUGH = REPO / "docs" / "notebook.md"
SWEEP_V1 = REPO / "tests" / "fixtures" / "sweep_v1"
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
QUERY = "SELECT depth, weight_decay, count(*) AS n, max(train_acc) AS acc FROM metrics GROUP BY ALL ORDER BY ALL"  # exact aggregates: avg may sum in another order per run


def test_a_query_gives_the_same_result_as_arrow_pandas_and_polars():
    polars = pytest.importorskip("polars", reason="polars is not installed (pip install -e '.[test]')")
    with open_sweep(SWEEP_V1) as sweep:
        arrow = sweep.sql(QUERY)
        assert sweep.df(QUERY).equals(arrow.to_pandas())
        frame = sweep.pl(QUERY)
        assert isinstance(frame, polars.DataFrame) and frame.equals(polars.from_arrow(arrow))
        assert sweep.pl("SELECT member_id FROM members WHERE depth = ?", [2]).height == 4


def test_polars_results_without_polars_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "polars", None)  # makes `import polars` raise ImportError
    with open_sweep(SWEEP_V1) as sweep, pytest.raises(ImportError, match=r"pip install polars"):
        sweep.pl(QUERY)


def test_the_notebook_walk_through_runs(tmp_path, monkeypatch):
    pytest.importorskip("polars", reason="polars is not installed (pip install -e '.[test]')")
    shutil.copytree(SWEEP_V1, tmp_path / "runs" / "quickstart")
    monkeypatch.chdir(tmp_path)
    matplotlib.use("Agg")
    text = WALK_THROUGH.read_text()
    blocks = list(CODE_BLOCK.finditer(text))
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        # Padded to its line in the page, so that a traceback points at docs/notebook.md's line.
        first_line = text.count("\n", 0, block.start(1))
        exec(compile("\n" * first_line + block.group(1), str(WALK_THROUGH), "exec"), namespace)
    figure = tmp_path / "hidden_rank_vs_lambda.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(namespace["ranks"]) == 4 and set(namespace["ranks"]["depth"]) == {2, 3}  # sweep_v1: depth {2, 3} x 2 λ
    assert len(namespace["recomputed"]) == namespace["member"]["depth"] == 3
