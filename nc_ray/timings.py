"""Where a sweep's wall time goes, for benchmarks: timestamped events of the driver and its trials.

With $NC_RAY_TIMINGS set to a file path, `mark(event, **fields)` appends one JSON line
`{"event": ..., "t": <time.time()>, "pid": ..., **fields}` to that file; unset (the default), it
does nothing and costs one environment lookup. The driver of `nc-ray sweep` marks "main",
"spec_loaded", "runner_imported", "ray_start" / "ray_up" (an embedded Ray), "plan_start" /
"planned", "fit_start" / "fit_end" (Tune) and "done"; each trial marks "trial_start",
"train_start" (its pack built, data loaded) and "pack_end" (with its training and evaluation
seconds). They go to the same file: trials of an embedded Ray inherit the driver's environment,
and each line is one `write` on a file opened for appending, so concurrent writers do not
interleave. A trial on another node writes the same path on its own node. Standard library
only: the driver marks "main" before anything heavy is imported. `bench/bench_sweep.py
--end-to-end` reads the file.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

VARIABLE = "NC_RAY_TIMINGS"


def mark(event: str, **fields: Any) -> None:
    """Append the event, now, to $NC_RAY_TIMINGS if it is set."""
    path = os.environ.get(VARIABLE)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n"
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The events of a timings file, in time order."""
    with open(path, encoding="utf-8") as lines:
        return sorted((json.loads(line) for line in lines if line.strip()), key=lambda event: event["t"])
