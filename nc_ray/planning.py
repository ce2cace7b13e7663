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
from nc_ray.data import n_classes_of
from nc_ray.integrity import FINISHED, Problem, SweepCheck, check_sweep
from nc_ray.limits import dataset_shape
from nc_ray.spec import SweepSpec
from nc_ray.store import SweepStore

MAX_AUTO_PACK_SIZE = 64
# The auto pack size's measured constants (bench/bench_sweep.py --pack-rule, BENCHMARKS.md "Pack
# size"), for packs training on one CPU thread:
SECONDS_PER_MAC = 0.06e-9  # a member's training time per multiply-add of `member_cost`, in a pack of >= 8
STEP_OVERHEAD_S = 0.14e-3  # per optimizer step of a pack, whatever its size (dispatch, the step's bookkeeping)
PACK_OVERHEAD_S = 0.05  # per pack on a worker that trained one before: Tune's switch, building it, its final files
OVERHEAD_SHARE = 0.25  # a pack is large enough once each fixed cost above is <= this share of its members' training
PACKS_PER_SLOT = 2  # where members allow, at least this many packs per trial slot: the longest-first order then evens the slots


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


def auto_pack_size(members: Sequence[MemberConfig], slots: int) -> int:
    """The pack size for `members` (those to plan) on `slots` trial slots, from a measured cost model.

    With a typical member (the median `member_cost`) that trains for t seconds per epoch
    (`member_cost` / epochs x SECONDS_PER_MAC) in s optimizer steps per epoch, a pack of g members
    is large enough once its fixed costs are at most OVERHEAD_SHARE of its training:

        efficient  g >= s STEP_OVERHEAD_S / (OVERHEAD_SHARE t)             per step
        amortized  g >= PACK_OVERHEAD_S / (OVERHEAD_SHARE t epochs)       per pack

    and, for balance, g >= n / (PACKS_PER_SLOT slots), which leaves PACKS_PER_SLOT packs per
    slot (fewer, larger packs beyond that only cost balance). The size is the largest of the
    three, at most n / slots (every slot gets a pack: small sweeps keep all slots busy) and at
    most MAX_AUTO_PACK_SIZE. Large sweeps of cheap members get packs of 64; a small sweep of
    long-training members gets about two packs per slot.
    """
    n = len(members)
    if n == 0:
        return 1
    typical = sorted(members, key=member_cost)[n // 2]
    epoch_s = member_cost(typical) / typical.epochs * SECONDS_PER_MAC
    shape = dataset_shape(typical)
    n_train = shape[0] if shape is not None else 1
    steps = math.ceil(n_train / min(typical.batch_size or n_train, n_train))
    efficient = steps * STEP_OVERHEAD_S / (OVERHEAD_SHARE * epoch_s)
    amortized = PACK_OVERHEAD_S / (OVERHEAD_SHARE * epoch_s * typical.epochs)
    balanced = n / (PACKS_PER_SLOT * max(1, slots))
    every_slot = math.ceil(n / max(1, slots))
    return max(1, min(MAX_AUTO_PACK_SIZE, every_slot, math.ceil(max(efficient, amortized, balanced))))


def member_cost(member: MemberConfig) -> float:
    """A member's training work in multiply-adds of its forward passes: epochs x train samples x
    weights (Σ_l in_l out_l). Backward passes and evaluations scale with it, so it orders packs by
    cost and, times a measured rate, estimates seconds. A dataset of unknown size
    (`limits.dataset_shape` None) counts one sample and a first layer as wide as the others."""
    shape = dataset_shape(member)
    n_train, _, in_dim = shape if shape is not None else (1, 0, member.width)
    outs = [member.width] * (member.depth - 1) + [n_classes_of(member.dataset, **dict(member.dataset_params))]
    return float(member.epochs * n_train * sum(o * i for o, i in zip(outs, [in_dim, *outs[:-1]])))


def pack_cost(pack: PackPlan) -> float:
    """`member_cost` summed over the pack's members."""
    return len(pack.members) * member_cost(pack.first)


def pack_summary(pack: PackPlan) -> str:
    """A pack in a few words, as `--dry-run` and Tune's status table show it:
    `digits mlp depth=4 width=64 loss=ce weight_decay 0.0001..0.1 x64 (pack 0123456789abcdef)`."""
    first = pack.first
    decays = sorted({m.weight_decay for m in pack.members})
    decay = f"{decays[0]:.3g}" if len(decays) == 1 else f"{decays[0]:.3g}..{decays[-1]:.3g}"
    return (f"{first.dataset} {first.arch} depth={first.depth} width={first.width} loss={first.loss} "
            f"weight_decay {decay} x{len(pack.members)} (pack {pack.pack_id})")


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
    its rows land in the files it already started; the rest are grouped by shape, and each group
    is split into the fewest packs of at most `pack_size` members, of equal sizes (+-1): a group
    of 16 with pack_size 12 makes two packs of 8, not 12 and 4.
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
        count = math.ceil(len(group) / pack_size)
        bounds = [len(group) * i // count for i in range(count + 1)]
        packs += [PackPlan.of(group[start:end]) for start, end in zip(bounds, bounds[1:])]
    return packs


def sweep_store(storage: str | os.PathLike, name: str, filesystem: pafs.FileSystem | None = None) -> SweepStore:
    """The store of sweep `name` under `storage` (a local path or URI, or a path in `filesystem`)."""
    return SweepStore(posixpath.join(os.fspath(storage), name), filesystem)


def plan_sweep(spec: SweepSpec, store: SweepStore, cluster: dict[str, float] | None = None) -> SweepPlan:
    """The packs that train every member of `spec` the sweep in `store` has not finished.

    `cluster` holds Ray's resource totals (for the auto pack size); without it, this machine's CPUs.
    Members of damaged packs count as unfinished (`check_sweep`), so their packs run again whole.
    In optuna mode the search makes the packs as its trials start: only damaged packs are planned.
    """
    check = check_sweep(store)
    statuses = check.statuses
    existing = [store.read_pack(pack_id) for pack_id in store.pack_ids()]
    if spec.search.mode == "grid":
        members = spec.members()
    else:  # the search makes a pack per trial; planned here are only the damaged ones, to train again
        members = [m for pack in existing if pack.pack_id in check.damaged_packs for m in pack.members]
    pending = [m for m in members if statuses.get(m.member_id) not in FINISHED]
    auto = spec.resources.pack_size == "auto"
    pack_size = auto_pack_size(pending, parallel_slots(spec, cluster or {})) if auto else spec.resources.pack_size
    packs = plan_packs(members, existing, statuses, pack_size)
    return SweepPlan(spec, store, packs, len(members), len(members) - len(pending), pack_size, auto, check)


def study_storage(store: SweepStore):
    """The journal file that keeps an optuna sweep's study, in the sweep directory."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not store.is_local:
        raise ValueError(f"{store.uri}: optuna mode keeps its study in a journal file and needs local (or mounted) storage")
    return JournalStorage(JournalFileBackend(os.path.join(store.root, "optuna.journal")))


def study_trials(spec: SweepSpec, store: SweepStore) -> tuple[int, int]:
    """(trials, complete trials) of the sweep's optuna study; (0, 0) before its first search (no
    journal file yet: none is created here)."""
    if not store.exists("optuna.journal"):
        return 0, 0
    import optuna

    storage = study_storage(store)
    if spec.name not in optuna.get_all_study_names(storage):
        return 0, 0
    trials = optuna.load_study(study_name=spec.name, storage=storage).get_trials(deepcopy=False)
    return len(trials), sum(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)


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
