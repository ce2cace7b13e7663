"""Benchmark: the cost of checking a big sweep's completeness (`nc_ray.integrity.check_sweep`,
what `nc-ray status`, `doctor`, `sweep` and `resume` run) and of opening a query session on it.

    python bench/bench_check.py [--members 10000] [--depth 4] [--width 64] [--evaluations 11] [--dir DIR] [--repeat 3]

Writes a finished synthetic sweep in the store layout (packs of 64 members, one metrics and one
spectra file per pack and evaluation, page checksums on, members rows complete) under DIR
(default: a temporary directory, removed at the end), then times, best of --repeat:
  check       check_sweep: every table file read whole (every page, checksums verified)
  keys only   the same files, only their key columns read (what the check would cost if it
              did not look for damaged pages)
  query open  open_sweep + one count over metrics (footers checked, no page read up front)
and prints the times, the rows and the bytes on disk.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nc_ray.config import MemberConfig, PackPlan
from nc_ray.integrity import check_sweep
from nc_ray.query import open_sweep
from nc_ray.schema import SCHEMAS, SPECTRUM_METRICS, TABLES
from nc_ray.store import SweepStore

PACK = 64


def _table(name: str, columns: dict, n: int) -> pa.Table:
    schema = SCHEMAS[name]
    return pa.Table.from_arrays([pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type) for f in schema], schema=schema)


def generate(root: Path, members: int, depth: int, width: int, evaluations: int, seed: int = 0) -> SweepStore:
    rng = np.random.default_rng(seed)
    store = SweepStore(str(root))
    every = 40
    configs = [
        MemberConfig(dataset="gaussian", dataset_params={"n_classes": 3}, n_per_class=None, standardize=True, arch="mlp", width=width,
                     depth=depth, activation="relu", bias=False, loss="ce", lr=0.05, momentum=0.9, batch_size=32,
                     epochs=every * (evaluations - 1), weight_decay=float(w), seed=i, metric_every=every, metric_initial=True,
                     metric_subset_per_class=None)
        for i, w in enumerate(np.geomspace(1e-4, 1e-1, members))
    ]
    write = {"compression": "zstd", "write_page_checksum": True}
    for table in TABLES:
        (root / "tables" / table).mkdir(parents=True, exist_ok=True)
    for start in range(0, members, PACK):
        pack = PackPlan.of(configs[start : start + PACK])
        store.write_pack(pack)
        ids = [m.member_id for m in pack.members]
        n = len(ids) * depth
        keys = {"member_id": np.repeat(ids, depth), "pack_id": [pack.pack_id] * n, "layer": np.tile(np.arange(1, depth + 1), len(ids))}
        for epoch in pack.first.evaluation_epochs():
            stem = f"{pack.pack_id}-e{epoch:06d}"
            metrics = {**keys, "epoch": [epoch] * n, **{m: rng.random(n) for m in SPECTRUM_METRICS if not m.startswith("rank")}}
            pq.write_table(_table("metrics", metrics, n), root / "tables" / "metrics" / f"{stem}.parquet", **write)
            spectra = {**keys, "epoch": [epoch] * n, "singular_values": list(np.sort(rng.random((n, width)))[:, ::-1])}
            pq.write_table(_table("spectra", spectra, n), root / "tables" / "spectra" / f"{stem}.parquet", **write)
        rows = {"member_id": ids, "pack_id": [pack.pack_id] * len(ids), "status": ["complete"] * len(ids)}
        pq.write_table(_table("members", rows, len(ids)), root / "tables" / "members" / f"{pack.pack_id}.parquet", **write)
    return store


def keys_only(store: SweepStore) -> int:
    rows = 0
    for table in TABLES:
        for name in store.list_files(f"tables/{table}", ".parquet"):
            rows += pq.read_table(store.path("tables", table, name), columns=["member_id"]).num_rows
    return rows


def best(repeat: int, run) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--evaluations", type=int, default=11)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_check_"))
    try:
        store = generate(root / "sweep", args.members, args.depth, args.width, args.evaluations)
        files = sum(len(store.list_files(f"tables/{t}", ".parquet")) for t in TABLES)
        size = sum(p.stat().st_size for p in (root / "sweep" / "tables").rglob("*.parquet"))
        check_s, check = best(args.repeat, lambda: check_sweep(store))
        assert check.problems == [] and len(check.statuses) == args.members, check.problems[:3]
        keys_s, rows = best(args.repeat, lambda: keys_only(store))

        def query() -> int:
            with open_sweep(root / "sweep") as session:
                return session.sql("SELECT count(*) AS n FROM metrics")["n"][0].as_py()

        query_s, _ = best(args.repeat, query)
        print(f"{args.members} members, {files} files, {rows} rows, {size / 2**20:.0f} MiB on disk")
        print(f"check (every page read)   {check_s:7.2f} s")
        print(f"keys only                 {keys_s:7.2f} s  (check / keys only: {check_s / keys_s:.1f}x)")
        print(f"query session open + count {query_s:6.2f} s")
    finally:
        if args.dir is None:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
