"""Benchmark: the default phase aggregation (`nc_ray.analysis.aggregate`) on a synthetic sweep.

    python bench/bench_aggregate.py [--rows 10000000] [--dir DIR] [--repeat 3]

Writes a synthetic sweep (members + metrics tables in the store layout, digits-like: K = 10,
depths 3/4/6/8, 20 weight decays, 21 evaluation epochs, seeds filling up to --rows metrics rows,
1% diverged and 0.5% failed members) under DIR (default: a temporary directory, removed at the
end), then times, best of --repeat:
  nc_ray     open_sweep(DIR) + aggregate(sweep) with the defaults
  by hand    one hand-written DuckDB query of the same aggregation over the same files
and prints both times and their ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nc_ray.analysis import aggregate
from nc_ray.query import open_sweep
from nc_ray.schema import SCHEMAS

DEPTHS = (3, 4, 6, 8)
DECAYS = np.geomspace(1e-4, 1e-1, 20)
EPOCHS = np.arange(0, 401, 20)
FILES_PER_EPOCH = 2
DIGITS_PARAMS = json.dumps({"split_seed": 0, "test_fraction": 0.2}, sort_keys=True)


def _write(path: Path, name: str, columns: dict[str, pa.Array | np.ndarray], n: int) -> None:
    """A table of the store's schema: given columns, nulls elsewhere."""
    schema = SCHEMAS[name]
    arrays = [pa.array(columns[f.name]).cast(f.type) if f.name in columns else pa.nulls(n, f.type) for f in schema]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path, compression="zstd")


def generate(root: Path, rows: int, seed: int = 0) -> int:
    """Write the synthetic sweep under root; return the number of metrics rows written."""
    rng = np.random.default_rng(seed)
    rows_per_seed = len(DECAYS) * sum(DEPTHS) * len(EPOCHS)
    seeds = max(1, math.ceil(rows / (rows_per_seed * 0.985)))  # 1.5% of members stop early or fail
    depth, decay, member_seed = (a.ravel() for a in np.meshgrid(DEPTHS, DECAYS, np.arange(seeds), indexing="ij"))
    n_members = depth.size
    ids = np.array([f"{i:016x}" for i in range(n_members)], dtype=object)
    status = np.where(rng.random(n_members) < 0.01, "diverged", "complete").astype(object)
    status[rng.random(n_members) < 0.005] = "failed"
    last_epoch = np.where(status == "diverged", rng.choice(EPOCHS[:-1], n_members), EPOCHS[-1])
    last_epoch[status == "failed"] = -1  # failed members wrote no metrics
    config = {"dataset": np.full(n_members, "digits", dtype=object), "arch": np.full(n_members, "mlp", dtype=object),
              "width": np.full(n_members, 64), "loss": np.full(n_members, "ce", dtype=object),
              "lr": np.full(n_members, 0.05), "depth": depth, "weight_decay": decay, "seed": member_seed}
    # FILES_PER_EPOCH packs, member i in pack i % FILES_PER_EPOCH, each with its members file and one
    # metrics file per epoch, named as nc_ray names them (queries skip files whose rows another pack owns).
    pack_of = np.array([f"synthetic{i % FILES_PER_EPOCH}" for i in range(n_members)], dtype=object)
    members = {**config, "member_id": ids, "pack_id": pack_of, "dataset_params": np.full(n_members, DIGITS_PARAMS, dtype=object),
               "status": status, "final_epoch": np.where(status == "failed", 0, last_epoch), "epochs": np.full(n_members, EPOCHS[-1])}
    for part in range(FILES_PER_EPOCH):
        mine = np.arange(n_members) % FILES_PER_EPOCH == part
        _write(root / f"tables/members/synthetic{part}.parquet", "members", {k: v[mine] for k, v in members.items()}, int(mine.sum()))
    # One row per member x layer, repeated for each epoch the member reached.
    member_of_row = np.repeat(np.arange(n_members), depth)
    layer = np.concatenate([np.arange(1, d + 1) for d in depth])
    written = 0
    for epoch in EPOCHS:
        for part in range(FILES_PER_EPOCH):
            rows_here = (last_epoch[member_of_row] >= epoch) & (member_of_row % FILES_PER_EPOCH == part)
            index, lay = member_of_row[rows_here], layer[rows_here]
            n = index.size
            columns = {name: values[index] for name, values in config.items()}
            columns.update({
                "member_id": pa.DictionaryArray.from_arrays(pa.array(index, pa.int32()), pa.array(ids)).cast(pa.string()),
                "pack_id": np.full(n, f"synthetic{part}", dtype=object), "epoch": np.full(n, epoch), "layer": lay,
                "train_acc": rng.random(n), "test_acc": rng.random(n), "sv_max": rng.lognormal(0, 1, n),
                "rank_rel_1e2": rng.integers(1, 64, n), "stable_rank": rng.random(n) * 10, "dist_k_rel": rng.random(n),
                "tcv_rel": rng.random(n), "nc1": rng.lognormal(0, 1, n), "bound_ratio": rng.random(n),
            })
            _write(root / f"tables/metrics/synthetic{part}-e{epoch:06d}.parquet", "metrics", columns, n)
            written += n
    return written


def by_hand(root: Path) -> pa.Table:
    """The default aggregation written directly against the files (K = 10 known)."""
    metrics = ("train_acc", "test_acc", "sv_max", "rank_rel_1e2", "stable_rank", "dist_k_rel", "tcv_rel", "nc1", "bound_ratio")
    hidden = "m.layer < m.depth AND (m.layer > 1 OR m.depth <= 2)"
    per_member = ", ".join(f"median({m}) FILTER (WHERE {hidden}) AS {m}" for m in metrics)
    per_cell = ", ".join(f"quantile_cont({m}, [0.25, 0.5, 0.75]) AS {m}" for m in metrics)
    query = f"""
    WITH mem AS (SELECT member_id, status, final_epoch, weight_decay, depth FROM read_parquet('{root}/tables/members/*.parquet')),
    pm AS (
        SELECT c.weight_decay, c.depth, {per_member},
            median(train_acc) AS acc, median(sv_max) AS sv,
            median(tcv_rel) FILTER (WHERE m.layer = m.depth) AS tcv, median(rank_rel_1e2) FILTER (WHERE {hidden}) AS rk
        FROM read_parquet('{root}/tables/metrics/*.parquet') m
        JOIN mem c ON m.member_id = c.member_id AND m.epoch = c.final_epoch
        WHERE c.status = 'complete' GROUP BY c.weight_decay, c.depth, c.member_id
    ),
    cell AS (SELECT weight_decay, depth, {per_cell}, median(acc) acc, median(sv) sv, median(tcv) tcv, median(rk) rk FROM pm GROUP BY ALL),
    counts AS (
        SELECT weight_decay, depth, count(*) FILTER (WHERE status = 'complete') n_complete,
            count(*) FILTER (WHERE status = 'diverged') n_diverged, count(*) FILTER (WHERE status = 'failed') n_failed
        FROM mem GROUP BY ALL
    )
    SELECT *, CASE WHEN acc <= 0.15 OR sv < 1e-3 THEN 'trivial'
        WHEN acc >= 0.99 AND tcv <= 1e-2 AND rk <= 10 THEN 'collapsed_low_rank'
        WHEN acc >= 0.99 AND tcv <= 1e-2 THEN 'collapsed'
        WHEN rk <= 10 THEN 'low_rank' ELSE 'not_collapsed' END AS phase
    FROM counts LEFT JOIN cell USING (weight_decay, depth) ORDER BY depth, weight_decay
    """
    with duckdb.connect() as con:
        return con.sql(query).to_arrow_table()


def ours(root: Path) -> pa.Table:
    with open_sweep(root) as sweep:
        return aggregate(sweep)


def best_of(repeat: int, fn, *args) -> tuple[float, pa.Table]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="keep the synthetic sweep here (reused if it has tables)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="nc_ray_bench_")) / "synthetic"
    try:
        if not (root / "tables/metrics").is_dir():
            started = time.perf_counter()
            n = generate(root, args.rows)
            print(f"generated {n:,} metrics rows in {time.perf_counter() - started:.1f} s under {root}")
        t_hand, hand = best_of(args.repeat, by_hand, root)
        t_ours, table = best_of(args.repeat, ours, root)
        same = hand["n_complete"].to_pylist() == table["n_complete"].to_pylist() and hand["phase"].to_pylist() == table["phase"].to_pylist() and np.allclose(
            hand["nc1"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, 3)[:, 1].astype(float),
            table["nc1_median"].to_numpy().astype(float),
        )
        print(f"cells: {table.num_rows}, results agree: {same}")
        print(f"nc_ray aggregate (default phase aggregation): {t_ours:.2f} s")
        print(f"hand-written DuckDB query:                    {t_hand:.2f} s")
        print(f"ratio: {t_ours / t_hand:.2f}x")
    finally:
        if args.dir is None:
            shutil.rmtree(root.parent)


if __name__ == "__main__":
    main()
