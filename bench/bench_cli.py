"""How long the read-side commands take as a user waits for them: each a fresh process, from launch
to exit, medians of interleaved runs.

    python bench/bench_cli.py [SWEEP_DIR] [--runs 3]

SWEEP_DIR is a finished sweep (default runs/quickstart: run the README's quickstart first). Timed:
`nc-ray --help`, `status`, `doctor`, `query` (a count), `sweep --dry-run` of its own job, `phase`
and `report`, beside a bare `python -c "import duckdb, pyarrow"`: the floor any query pays. Targets
(BENCHMARKS.md): query <= 2x the floor, phase <= 4 s and report <= 6 s on the quickstart.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def commands(sweep: Path, scratch: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "nc_ray.cli"]
    return {
        "import duckdb, pyarrow (floor)": [sys.executable, "-c", "import duckdb, pyarrow"],
        "nc-ray --help": [*cli, "--help"],
        "nc-ray status": [*cli, "status", str(sweep)],
        "nc-ray doctor": [*cli, "doctor", str(sweep)],
        "nc-ray query (count)": [*cli, "query", str(sweep), "SELECT count(*) FROM metrics"],
        "nc-ray sweep --dry-run": [*cli, "sweep", str(sweep / "spec.yaml"), "--storage", str(sweep.parent), "--dry-run"],
        "nc-ray phase": [*cli, "phase", str(sweep), "--out", str(scratch / "phase")],
        "nc-ray report": [*cli, "report", str(sweep), "--output", str(scratch / "report.html")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", default="runs/quickstart")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sweep = Path(args.sweep).resolve()
    if not (sweep / "resolved_spec.json").exists():
        sys.exit(f"{sweep}: not a finished sweep (run `nc-ray sweep jobs/quickstart.yaml` first)")
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_cli-") as scratch:
        named = commands(sweep, Path(scratch))
        for _ in range(args.runs):  # interleaved: a load spike hits every command alike
            for name, command in named.items():
                started = time.perf_counter()
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times.setdefault(name, []).append(time.perf_counter() - started)
    floor = statistics.median(times["import duckdb, pyarrow (floor)"])
    print(f"{sweep}: medians of {args.runs} runs, each a fresh process from launch to exit")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:32s} {median:6.2f} s  ({', '.join(f'{v:.2f}' for v in values)})  {median / floor:5.1f}x the floor")


if __name__ == "__main__":
    main()
