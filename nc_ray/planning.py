"""What a sweep still has to train, and where it stands: planning without Ray or torch.

`plan_sweep` turns a spec and a sweep directory into packs (`PackPlan`s) of the members not yet
finished; `sweep_status` counts members by state from the sweep directory alone. Both are what
`nc-ray sweep --dry-run` and `nc-ray status` run, so they import neither Ray nor torch; the Tune
runner (`nc_ray.sweep`) calls the same functions. Both go by `nc_ray.integrity.check_sweep`: a
member counts as finished only if its pack's files hold every row they should, so a damaged pack
(a file gone, unreadable, foreign or holding the wrong rows) is planned again like an unfinished one.
"""

from __future__ import annotations

import math
import os
import posixpath
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from nc_ray.config import MemberConfig, PackPlan
from nc_ray.integrity import FINISHED, Problem, SweepCheck, check_sweep
from nc_ray.spec import SweepSpec
from nc_ray.store import SweepStore

MAX_AUTO_PACK_SIZE = 64


@dataclass(frozen=True)
class SweepPlan:
    """The packs that finish a sweep, with the counts `--dry-run` prints, and the check they come from."""

    spec: SweepSpec
    store: SweepStore
    packs: list[PackPlan]
    n_members: int
    n_finished: int
    pack_size: int
    pack_size_auto: bool
    check: SweepCheck


def auto_pack_size(n_members: int, slots: int) -> int:
    """Enough packs to keep every slot busy twice over, each as large as that allows (<= 64)."""
    return max(1, min(MAX_AUTO_PACK_SIZE, math.ceil(n_members / (2 * max(1, slots)))))


def parallel_slots(spec: SweepSpec, cluster: dict[str, float]) -> int:
    """How many trials of this spec's size the cluster (Ray resource totals) can run at once."""
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    by_cpu = cluster.get("CPU", os.cpu_count() or 1) / cpu
    by_gpu = cluster.get("GPU", 0) / gpu if gpu > 0 else math.inf
    return max(1, int(min(by_cpu, by_gpu)))


def plan_packs(
    members: Sequence[MemberConfig],
    existing: Sequence[PackPlan],
    statuses: dict[str, str],
    pack_size: int,
) -> list[PackPlan]:
    """Packs that train every member not yet finished.

    An unfinished pack of an earlier run that holds any wanted member is run again whole, so
    its rows land in the files it already started; the rest are grouped by shape and chunked.
    """
    wanted = {m.member_id: m for m in members if statuses.get(m.member_id) not in FINISHED}
    packs, taken = [], set()
    for pack in existing:
        ids = [m.member_id for m in pack.members]
        if any(statuses.get(i) not in FINISHED for i in ids) and taken.isdisjoint(ids) and any(i in wanted for i in ids):
            packs.append(pack)
            taken.update(ids)
    groups: dict[tuple, list[MemberConfig]] = defaultdict(list)
    for member_id, member in wanted.items():
        if member_id not in taken:
            groups[member.pack_key()].append(member)
    for group in groups.values():
        packs += [PackPlan.of(group[start : start + pack_size]) for start in range(0, len(group), pack_size)]
    return packs


def sweep_store(storage: str | os.PathLike, name: str, filesystem: pafs.FileSystem | None = None) -> SweepStore:
    """The store of sweep `name` under `storage` (a local path or URI, or a path in `filesystem`)."""
    return SweepStore(posixpath.join(os.fspath(storage), name), filesystem)


def plan_sweep(spec: SweepSpec, store: SweepStore, cluster: dict[str, float] | None = None) -> SweepPlan:
    """The packs that train every member of `spec` the sweep in `store` has not finished.

    `cluster` holds Ray's resource totals (for the auto pack size); without it, this machine's CPUs.
    Members of damaged packs count as unfinished (`check_sweep`), so their packs run again whole.
    """
    members = spec.members() if spec.search.mode == "grid" else []  # optuna packs are made per trial
    check = check_sweep(store)
    statuses = check.statuses
    existing = [store.read_pack(pack_id) for pack_id in store.pack_ids()]
    pending = [m for m in members if statuses.get(m.member_id) not in FINISHED]
    auto = spec.resources.pack_size == "auto"
    pack_size = auto_pack_size(len(pending), parallel_slots(spec, cluster or {})) if auto else spec.resources.pack_size
    packs = plan_packs(members, existing, statuses, pack_size)
    return SweepPlan(spec, store, packs, len(members), len(members) - len(pending), pack_size, auto, check)


def objective_value(metric_rows: list[dict], objective: dict) -> float:
    """An optuna trial's score: |log10(median over members of the chosen layer metric) − log10(target)|
    (per member, the median over the chosen layers); inf if no value is finite and positive."""
    by_member: dict[str, list[dict]] = defaultdict(list)
    for row in metric_rows:
        by_member[row["member_id"]].append(row)
    values = []
    layer = objective["layer"]
    for rows in by_member.values():
        if layer == "penultimate":
            chosen = [r for r in rows if r["layer"] == r["depth"]]
        elif layer == "hidden":
            chosen = [r for r in rows if 1 < r["layer"] < r["depth"]]
        else:
            chosen = [r for r in rows if r["layer"] == int(layer)]
        layer_values = [r[objective["metric"]] for r in chosen if r[objective["metric"]] is not None]
        if layer_values:
            values.append(float(np.median(layer_values)))
    finite = [v for v in values if np.isfinite(v) and v > 0]
    if not finite:
        return math.inf
    return abs(math.log10(float(np.median(finite))) - math.log10(objective["target"]))


@dataclass(frozen=True)
class SweepStatus:
    counts: dict[str, int]  # complete, diverged, failed, running, pending
    errors: dict[str, str]  # member_id -> error, for failed members
    running: dict[str, tuple[int, int]]  # pack_id -> (epoch reached, epochs)
    problems: list[Problem]  # where the sweep falls short of the completeness invariant (nc_ray.integrity)

    @property
    def unreadable(self) -> list[str]:
        """Table files that do not read whole (their packs count as unfinished)."""
        return sorted(p.path for p in self.problems if p.kind == "unreadable")


def sweep_status(sweep: str | SweepStore) -> SweepStatus:
    """Members by state, from the members table, the pack definitions and progress markers, after
    `check_sweep`: members of a damaged pack are pending (`nc-ray resume` retrains them), whatever
    their members rows say."""
    store = sweep if isinstance(sweep, SweepStore) else SweepStore(sweep)
    check = check_sweep(store)
    statuses, damaged = check.statuses, check.damaged_packs
    counts = {state: 0 for state in ("complete", "diverged", "failed", "running", "pending")}
    running = {}
    for pack_id in store.pack_ids():
        try:
            pack = store.read_pack(pack_id)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # reported by the check
        open_members = [m for m in pack.members if statuses.get(m.member_id) is None]
        if not open_members:
            continue
        if pack_id not in damaged and store.exists(f"progress/{pack_id}.json"):
            progress = store.read_json(f"progress/{pack_id}.json")
            running[pack_id] = (progress["epoch"], progress["epochs"])
            counts["running"] += len(open_members)
        else:
            counts["pending"] += len(open_members)
    for status in statuses.values():
        counts[status] += 1
    return SweepStatus(counts, check.errors, running, check.problems)
