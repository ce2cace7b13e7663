"""Where trials are scheduled: plan packs from a spec, run them as Ray Tune trials, resume, extend.

A sweep directory is owned by one driver at a time (a lock file). `run_sweep` trains every
member of the spec that the members table does not list as finished: unfinished packs of earlier
runs keep their composition (so their files are rewritten, never duplicated), new members are
grouped into new packs. Each run is a new Tune experiment `tune-<n>`, and so is each
`resume_sweep` of a grid sweep: its unfinished packs continue from their saved training state.

Start-up, as a user waits for it (BENCHMARKS.md, "End to end"): the driver never imports torch
(only trials do); an embedded Ray starts while another thread plans the packs and writes their
files (`_train_unfinished`); trial actors start in the worker processes Ray prestarts
(`_tune_actor_runtime_env`); each worker process loads a dataset once for every pack it trains
(`nc_ray.trial`); and the costliest packs start first (`_fit`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs
import ray
from ray import tune
from tqdm import tqdm

from nc_ray import reaper, timings
from nc_ray._version import __version__
from nc_ray.config import PackPlan
from nc_ray.integrity import SweepCheck
from nc_ray.limits import RESOURCES_WAIT_S, LimitError, check_pack_memory, check_this_machine, missing_resources, reachable_address
from nc_ray.planning import (
    FINISHED, SweepPlan, objective_value, pack_cost, pack_summary, plan_sweep, study_storage, study_trials, sweep_store,
)
from nc_ray.spec import SweepSpec, parse_spec, read_spec_file
from nc_ray.store import SweepLock, SweepStore

logger = logging.getLogger(__name__)


_embedded_ray = False  # whether this process started the Ray it runs on (`connect`)
_reaped_since_fit = False  # whether `nc_ray.reaper` has watched this process since a Tune run began (`_fit`)


# The raylet connects to its own object store, which a thread of the raylet starts, while the
# store may not yet listen; Ray's default then retries after 1 s (raylet_client_connect_timeout_
# milliseconds), which made about half of all embedded starts here 1 s slower (BENCHMARKS.md,
# "What changed since the 2.65-2.88x measurements"). Retrying every 20 ms for as long in all
# (500 x 20 ms = 10 x 1 s) removes it.
# Only a Ray this process starts takes a system config: ray.init refuses one when joining.
_EMBEDDED_RAY_CONFIG = {"raylet_client_connect_timeout_milliseconds": 20, "raylet_client_num_connect_attempts": 500}


def connect(address: str | None = None) -> bool:
    """Join the cluster at `address` / $RAY_ADDRESS once its port answers (`reachable_address`:
    ray.init would retry a dead address for minutes), or start an embedded Ray sized to this
    machine. True when this process joins a cluster (or Ray is already initialized), False when
    it starts an embedded Ray, which no node will ever join.

    The embedded Ray is this driver's own even where another Ray runs on the machine (without
    address="local", ray.init joins the Ray started last there, and refuses num_cpus)."""
    if ray.is_initialized():
        return True
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=reachable_address(address))
        return True
    global _embedded_ray
    timings.mark("ray_start")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _system_config=_EMBEDDED_RAY_CONFIG)
    timings.mark("ray_up")
    _embedded_ray = True
    return False


def exit_process(code: int) -> None:
    """End this process now with exit status `code` (its output flushed), where that ends its
    embedded Ray as surely as `ray.shutdown()` would: the kernel ends Ray's GCS and raylet with
    the process that started them, and `nc_ray.reaper`, which has noted this driver's processes
    since its Tune run began, SIGKILLs the others. ray.shutdown(), which Python's exit would
    run, stops those processes one kind after another and waits for each: about 2 s of a user's
    wait on 2 CPUs (BENCHMARKS.md). Otherwise (a joined cluster, no /proc, nothing trained)
    it returns and the caller exits as usual. For `nc-ray`, once a sweep is done and reported:
    the sweep's lock is released and Tune's experiment state written by then."""
    if not (_embedded_ray and _reaped_since_fit):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _node_resources() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def check_cluster(spec: SweepSpec, source: str, *, joined: bool) -> None:
    """LimitError unless a node of the cluster can run one trial of `spec` (its resources.cpu and
    .gpu on one node), before Tune would wait for one forever; on a joined cluster, also the largest
    pack's memory against the largest node that fits a trial (memory and object store).

    A joined cluster may autoscale: it is asked for one trial's resources and given up to
    $NC_RAY_MAX_RESOURCES_WAIT_S to add a node. Nothing joins an embedded Ray: no wait there.
    """
    request = {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu}
    wait = RESOURCES_WAIT_S.value() if joined else 0.0
    nodes = _node_resources()
    missing = missing_resources(request, nodes)
    if missing is not None and wait > 0:
        from ray.autoscaler.sdk import request_resources

        logger.warning("%s: %s; asking the autoscaler for one and waiting up to %g s", source, missing, wait)
        deadline = time.monotonic() + wait
        request_resources(bundles=[{name: amount for name, amount in request.items() if amount > 0}])
        try:
            while missing is not None and time.monotonic() < deadline:
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
                nodes = _node_resources()
                missing = missing_resources(request, nodes)
        finally:
            request_resources(bundles=[])  # the request lasts until replaced: Tune's trials ask for themselves
    if missing is not None:
        waited = f" after waiting {wait:g} s for the autoscaler" if wait > 0 else ""
        longer = f", or wait longer: {RESOURCES_WAIT_S.how_to_raise}" if joined else ""
        raise LimitError(f"{source}: {missing}{waited}; lower resources.cpu / resources.gpu, or run on a cluster "
                         f"with such a node{longer}")
    memory = max(node.get("memory", 0) + node.get("object_store_memory", 0)
                 for node in nodes if missing_resources(request, [node]) is None)
    if joined and memory > 0:  # an embedded Ray's node was checked before it started; 0: not reported
        check_pack_memory(spec, source, int(memory), "the largest node that fits a trial")


def _starts_embedded(address: str | None) -> bool:
    """Whether `connect(address)` starts an embedded Ray."""
    return not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS"))


def _ray_deferred(spec: SweepSpec, source: str, address: str | None) -> bool:
    """Join Ray (or use the one running) and check its nodes (`check_cluster`) before the sweep's
    lock is taken or anything is written, so that a LimitError comes first, and return False;
    for an embedded Ray, check this machine instead (`check_this_machine`: its CPUs, GPUs and
    memory, what the embedded Ray's one node will have) and return True: no check can refuse
    that Ray once it runs, so `_train_unfinished` starts it while the packs are planned, which
    saves seconds of the start-up."""
    if _starts_embedded(address):
        check_this_machine(spec, source)
        return True
    check_cluster(spec, source, joined=connect(address))
    return False


@contextlib.contextmanager
def _tune_actor_runtime_env() -> Iterator[None]:
    """While it lasts, Tune gives its trial actors no environment variables of its own: neither the
    driver's AWS credentials nor its default PL_DISABLE_FORK (for PyTorch Lightning, unused here).

    Credentials: Ray's runtime-env agent writes each runtime_env, values included, to its log on
    every node (ray/tune/execution/class_cache.py names the variables copied). Trials get
    credentials from their node instead: the environment Ray was started in (the embedded Ray
    inherits the driver's), or an instance role.
    Start-up: an actor whose runtime_env differs from its job's cannot use the worker processes
    Ray prestarted (one per CPU, with Ray already imported) and waits for a new one (measured:
    1-3 s per trial actor on 2 CPUs, BENCHMARKS.md). Tune's Ray Train variables are still copied
    where the driver sets them. Scoped, so that a caller's own Tune runs keep Tune's defaults.
    """
    from ray.tune.execution import class_cache

    saved = class_cache.ENV_VARS_TO_PROPAGATE, class_cache.DEFAULT_ENV_VARS
    class_cache.ENV_VARS_TO_PROPAGATE = {name for name in saved[0] if not name.startswith("AWS_")}
    class_cache.DEFAULT_ENV_VARS = {}
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE, class_cache.DEFAULT_ENV_VARS = saved


def cluster_resources() -> dict[str, float]:
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def _tune_trainable(config: dict, *, store: SweepStore, threads: int, objective: dict | None = None) -> None:
    """A Tune trial: train one pack, continuing from its saved state if it has one, and report
    to Tune at every evaluation (its epoch: what `MemberProgress` counts).

    The pack's state lives in the sweep directory (`state/<pack_id>.pt`, replaced atomically at
    every evaluation), not in Tune checkpoints: Tune deletes a superseded checkpoint before it
    snapshots the experiment state, so a driver killed in between leaves an experiment that
    points at a deleted checkpoint and cannot be restored. A trial Tune restarts, after a crash
    or a resume, finds its state here instead, and rows already published are rewritten as is.
    """
    timings.mark("trial_start")
    # Imported here, in the trial's worker process: the driver, which imports this module too,
    # never needs torch (a second of its start-up).
    import torch

    from nc_ray.trial import PackRun, read_state, write_state

    torch.set_num_threads(threads)
    pack = store.read_pack(config["pack_id"]) if "pack_id" in config else _optuna_pack(store, config)

    def on_checkpoint(run_state: dict, summary: dict, metric_rows: list[dict]) -> None:
        write_state(store, pack.pack_id, run_state)
        if objective is not None:
            summary["objective"] = objective_value(metric_rows, objective)
        tune.report(summary)

    run = PackRun(pack, store)
    state = read_state(store, pack.pack_id)
    if state is not None:
        run.load_state_dict(state)
    timings.mark("train_start", pack_id=pack.pack_id, members=len(pack.members))
    run.run(on_checkpoint)
    store.delete(f"state/{pack.pack_id}.pt")
    timings.mark("pack_end", pack_id=pack.pack_id, train_s=run.wall_time, evaluation_s=run.metrics_time)


def _optuna_pack(store: SweepStore, config: dict) -> PackPlan:
    """In optuna mode a trial's config is a point (depth, λ[, lr]); its pack is every seed there."""
    spec = parse_spec(store.read_json("resolved_spec.json"), source=store.path("resolved_spec.json"))
    pack = PackPlan.of([spec.member(**config, seed=seed) for seed in spec.resolved()["grid"].get("seed", [spec.training.seed])])
    store.write_pack(pack)
    return pack


class MemberProgress(tune.Callback):
    """A progress bar in members trained: a pack of n members at epoch e of E counts n e / E, so
    the bar moves at every evaluation of every pack (each `tune.report`), not only when a pack
    finishes; a finished pack counts its n members, however early they stopped or diverged. With
    the members finished and an ETA. Cheap, since callbacks run in the driver's loop.

    Tune pickles its callbacks with the experiment, and `Tuner.restore` brings this one back:
    it holds only the sweep's store and counts from the sweep directory at setup (finished
    members, and the epoch of each pack that will continue from a saved state).
    """

    def __init__(self, store: SweepStore, members_per_trial: int):
        self.store = store
        self.members_per_trial = members_per_trial
        self.bar = None

    def setup(self, **info) -> None:
        store = self.store
        statuses = store.member_statuses()
        self.epochs = parse_spec(store.read_json("resolved_spec.json"), source=store.path("resolved_spec.json")).training.epochs
        self.sizes: dict[str, int] = {}  # pack_id (an optuna trial's id until its pack is known) -> members
        self.reached: dict[str, int] = {}  # pack_id -> the epoch counted
        for pack_id in store.pack_ids():
            members = store.read_pack(pack_id).members
            self.sizes[pack_id] = len(members)
            if all(statuses.get(m.member_id) in FINISHED for m in members):
                self.reached[pack_id] = self.epochs
            elif store.exists(f"state/{pack_id}.pt") and store.exists(f"progress/{pack_id}.json"):
                self.reached[pack_id] = min(self.epochs, int(store.read_json(f"progress/{pack_id}.json")["epoch"]))
        self.finished = sum(1 for s in statuses.values() if s in FINISHED)
        self.bar = tqdm(total=max(sum(self.sizes.values()), self.finished), initial=self._members_done(), desc="training",
                        dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} members [{elapsed}<{remaining}{postfix}]")
        self._show_finished()

    def _members_done(self) -> float:
        return sum(self.sizes[p] * epoch / self.epochs for p, epoch in self.reached.items())

    def _advance(self, trial, epoch: int) -> None:
        pack_id = trial.config.get("pack_id", trial.trial_id)
        if pack_id not in self.sizes:  # optuna trials define their packs as they start
            self.sizes[pack_id] = self.members_per_trial
            self.bar.total = max(self.bar.total, sum(self.sizes.values()))
        if epoch > self.reached.get(pack_id, -1):  # a retried trial may report an epoch again
            self.reached[pack_id] = epoch
            self.bar.update(self._members_done() - self.bar.n)

    def _show_finished(self) -> None:
        self.bar.set_postfix_str(f"{self.finished} finished", refresh=False)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.bar is not None and "epoch" in result:
            self._advance(trial, min(int(result["epoch"]), self.epochs))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if self.bar is not None:
            self._advance(trial, self.epochs)
            self.finished += self.sizes[trial.config.get("pack_id", trial.trial_id)]
            self._show_finished()
            self.bar.refresh()

    def on_experiment_end(self, trials, **info) -> None:
        if self.bar is not None:
            self.bar.close()

    def __getstate__(self) -> dict:
        return {"store": self.store, "members_per_trial": self.members_per_trial, "bar": None}


class TrialNames:
    """What Tune calls each trial: a pack's summary in Tune's status table and messages
    (`planning.pack_summary`: dataset, arch, depth, width, loss, λ range, members, pack id),
    and a short, filesystem-safe directory name `<pack_id>-d<depth>-w<width>-<loss>` (at most 48
    characters: one directory per trial, FIELD_NOTES on inodes and names).

    Grid trials are named from their pack (summaries made at planning, so Tune's trial creation
    reads no file); an optuna trial, whose pack is made when it starts, from its point. Held by
    the experiment Tune pickles: plain strings only.
    """

    def __init__(self, spec: SweepSpec, packs: list[PackPlan]):
        self.summaries = {p.pack_id: pack_summary(p) for p in packs}
        self.dirnames = {p.pack_id: f"{p.pack_id}-d{p.first.depth}-w{p.first.width}-{p.first.loss}" for p in packs}
        self.shape = f"{spec.dataset.name} {spec.model.arch} width {spec.model.width} {spec.loss}"

    def name(self, trial) -> str:
        config = trial.config
        if "pack_id" in config:
            return self.summaries.get(config["pack_id"], f"pack {config['pack_id']}")
        point = " ".join(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}" for key, value in sorted(config.items()))
        return f"{self.shape} {point} (trial {trial.trial_id})"

    def dirname(self, trial) -> str:
        config = trial.config
        if "pack_id" in config:
            name = self.dirnames.get(config["pack_id"], config["pack_id"])
        else:
            name = f"{trial.trial_id}-d{config.get('depth', '')}"
        return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:48]


def _trainable_for(plan_spec: SweepSpec, store: SweepStore):
    objective = plan_spec.search.objective.model_dump() if plan_spec.search.mode == "optuna" else None
    trainable = tune.with_parameters(
        _tune_trainable, store=store, threads=max(1, int(plan_spec.resources.cpu)), objective=objective
    )
    return tune.with_resources(trainable, {"cpu": plan_spec.resources.cpu, "gpu": plan_spec.resources.gpu})


def _run_config(spec: SweepSpec, store: SweepStore, name: str, callbacks: list):
    return tune.RunConfig(
        name=name,
        storage_path=store.root,
        storage_filesystem=store.fs,
        failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
        callbacks=callbacks,
        verbose=0,
    )


def _tune_config(spec: SweepSpec, store: SweepStore, packs: list[PackPlan]):
    """One trial per pack of `packs` (a grid sweep, or an optuna sweep's damaged packs); without
    packs, the spec's optuna search, for the trials its study has still to finish (`nc_ray.planning.study_trials`)."""
    names = TrialNames(spec, packs)
    if packs or spec.search.mode != "optuna":
        return tune.TuneConfig(reuse_actors=True, trial_name_creator=names.name, trial_dirname_creator=names.dirname)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    search = spec.search
    space = {
        "depth": optuna.distributions.CategoricalDistribution(spec.resolved()["grid"].get("depth", [spec.model.depth])),
        "weight_decay": optuna.distributions.FloatDistribution(search.weight_decay.low, search.weight_decay.high, log=True),
    }
    if search.lr is not None:
        space["lr"] = optuna.distributions.FloatDistribution(search.lr.low, search.lr.high, log=True)
    storage = study_storage(store)
    started, finished = study_trials(spec, store)
    # Seeded by the trials the study holds: a search that extends a study does not draw its first
    # points again (TPE samples its first trials at random from the seed).
    searcher = OptunaSearch(space=space, metric="objective", mode="min", storage=storage, study_name=spec.name, seed=started)
    return tune.TuneConfig(
        search_alg=searcher, num_samples=search.num_samples - finished, reuse_actors=True,
        trial_name_creator=names.name, trial_dirname_creator=names.dirname,
    )


def _tune_runs(store: SweepStore) -> list[str]:
    return store.read_json("sweep.json")["tune_runs"] if store.exists("sweep.json") else []


def _error_message(error: BaseException) -> str:
    """`<type>: <message>` of a trial's error (a RayTaskError's cause is the trial's own), at most 2000 characters."""
    cause = getattr(error, "cause", None) or error
    try:
        text = str(cause)
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails still has a type to report
        text = "<its message cannot be shown>"
    return f"{type(cause).__name__}: {text}"[:2000]


def _record_failures(store: SweepStore, results) -> int:
    """Members of trials that errored past max_failures get a `failed` row with the error; return
    how many. Recording never stops the driver: a failure that cannot be written (the storage that
    failed the trial fails again, a row does not fit the table) is logged with its error instead."""
    failed = 0
    statuses = store.member_statuses()
    for result in results:
        if result.error is None or "pack_id" not in (result.config or {}):
            continue
        pack_id, message = result.config["pack_id"], _error_message(result.error)
        try:
            pack = store.read_pack(pack_id)
            if all(statuses.get(m.member_id) in FINISHED for m in pack.members):
                continue
            rows = [{**m.record(), "pack_id": pack_id, "status": "failed", "error": message, "nc_ray_version": __version__}
                    for m in pack.members]
            store.write_table("members", pack_id, rows)
        except Exception as error:  # noqa: BLE001 - whatever fails here, the trial's error must reach the user
            logger.error("pack %s failed (%s); its failure could not be recorded in the members table: %s",
                         pack_id, message, _error_message(error))
            continue
        failed += len(rows)
    return failed


def run_sweep(
    spec_path: str | Path,
    storage: str | os.PathLike = "runs",
    address: str | None = None,
    show_progress: bool = True,
    filesystem: pafs.FileSystem | None = None,
) -> SweepStore:
    """Train every member of the spec not yet finished in `<storage>/<name>`; return the sweep's store.

    LimitError, before the lock is taken or anything is written, when the sweep would exhaust or
    block the machine (nc_ray.limits): its largest pack's memory, a cluster address that does not
    answer, or trial resources that no node has.
    """
    spec, spec_bytes = read_spec_file(spec_path)
    store = sweep_store(storage, spec.name, filesystem)
    ray_deferred = _ray_deferred(spec, str(spec_path), address)
    with SweepLock(store):
        store.write_bytes("spec.yaml", spec_bytes)
        store.write_json("resolved_spec.json", spec.resolved())
        _train_unfinished(spec, store, show_progress, ray_deferred)
    return store


def resume_sweep(
    sweep: str | os.PathLike,
    address: str | None = None,
    show_progress: bool = True,
    filesystem: pafs.FileSystem | None = None,
) -> SweepStore:
    """Finish an interrupted sweep from its directory alone.

    A grid sweep starts a new Tune experiment over its unfinished packs, which continue from
    their saved training state: nothing of Tune's own state is needed, so a driver killed at any
    point (even while Tune wrote its experiment state) can be resumed. An optuna sweep restores
    its latest experiment, whose searcher holds the study's pending trials, then trains its
    damaged packs again (`_search`).
    """
    store = SweepStore(os.fspath(sweep), filesystem)
    if not store.exists("resolved_spec.json"):
        raise FileNotFoundError(f"{store.uri}: not a sweep directory (no resolved_spec.json)")
    source = store.path("resolved_spec.json")
    spec = parse_spec(store.read_json("resolved_spec.json"), source=source)
    ray_deferred = _ray_deferred(spec, source, address)
    with SweepLock(store):
        if spec.search.mode == "grid":
            _train_unfinished(spec, store, show_progress, ray_deferred)
        else:
            if ray_deferred:
                connect()
            damaged = _plan_unfinished(spec, store, cluster_resources()).packs
            runs = _tune_runs(store)
            restorable = bool(runs) and tune.Tuner.can_restore(store.path(runs[-1]), storage_filesystem=store.fs)
            _search(spec, store, damaged, show_progress, restore=runs[-1] if restorable else None)
    return store


def _train_unfinished(spec: SweepSpec, store: SweepStore, show_progress: bool, ray_deferred: bool) -> None:
    """Plan the unfinished members into packs and run them as a new Tune experiment; with
    `ray_deferred` (`_ray_deferred`), start the embedded Ray meanwhile: Ray in this thread (its
    processes die with the thread that starts them, and its SIGTERM handler is set in the main
    thread only), planning in another."""
    if not ray_deferred:
        plan = _plan_unfinished(spec, store, cluster_resources())
    else:
        with ThreadPoolExecutor(1, thread_name_prefix="nc-ray-plan") as planner:
            planned = planner.submit(_plan_unfinished, spec, store, {"CPU": float(os.cpu_count() or 1)})  # what connect() starts
            connect()
        plan = planned.result()
    if spec.search.mode == "grid":
        if plan.packs:
            _fit(spec, store, _new_tune_run(store, spec), plan.packs, restore=False, show_progress=show_progress)
        return
    _search(spec, store, plan.packs, show_progress, restore=None)


def _search(spec: SweepSpec, store: SweepStore, damaged: list[PackPlan], show_progress: bool, *, restore: str | None) -> None:
    """An optuna sweep's search, then its `damaged` packs. With `restore` (the sweep's last Tune
    experiment), that experiment continues (its searcher holds the study's pending trials); otherwise a new one runs
    while the study has fewer than num_samples complete trials. The damaged packs then train again,
    one trial each, in an experiment of their own: the search's stays the sweep's last until then,
    so a resume interrupted before restores the search. The study keeps its trials' first values."""
    if restore is not None:
        _fit(spec, store, restore, [], restore=True, show_progress=show_progress)
    elif study_trials(spec, store)[1] < spec.search.num_samples:
        _fit(spec, store, _new_tune_run(store, spec), [], restore=False, show_progress=show_progress)
    if damaged:
        _fit(spec, store, _new_tune_run(store, spec), damaged, restore=False, show_progress=show_progress)


def _plan_unfinished(spec: SweepSpec, store: SweepStore, cluster: dict[str, float]) -> SweepPlan:
    """Plan the unfinished members into packs for `cluster` (Ray's resource totals) and publish
    the pack files. The members of packs that `check_sweep` finds damaged count as unfinished;
    their damaged files go into quarantine/ first and their saved states are dropped, so those
    packs train from scratch and rewrite every file they own."""
    timings.mark("plan_start")
    plan = plan_sweep(spec, store, cluster)
    _set_aside_damage(store, plan.check)
    _write_packs(store, plan.packs)
    timings.mark("planned", packs=len(plan.packs), pack_size=plan.pack_size)
    return plan


def _write_packs(store: SweepStore, packs: list[PackPlan]) -> None:
    """Publish the pack files in one batch of concurrent writes: on an object store each is a
    round trip or more (and a read of driver.json for the fence); on a local disk the 158 files of
    10,000 members take about 0.1 s either way."""
    with ThreadPoolExecutor(8, thread_name_prefix="nc-ray-packs") as writers:
        for written in [writers.submit(store.write_pack, pack) for pack in packs]:
            written.result()


def _set_aside_damage(store: SweepStore, check: SweepCheck) -> None:
    """Move the damaged table files of a check into quarantine/ and drop the saved state of its damaged packs."""
    for problem in check.problems:
        if problem.movable:
            moved = store.quarantine(problem.path, None)  # the check already counts the pack unfinished
            logger.warning("moved %s to %s: %s", problem.path, ", ".join(moved), problem.detail)
    for pack_id in sorted(check.damaged_packs):
        store.delete(f"state/{pack_id}.pt")  # a saved state would skip the epochs whose files are damaged


def _new_tune_run(store: SweepStore, spec: SweepSpec) -> str:
    """Record and name the sweep's next Tune experiment."""
    runs = _tune_runs(store)
    name = f"tune-{len(runs):03d}"
    store.write_json("sweep.json", {"name": spec.name, "tune_runs": [*runs, name], "nc_ray_version": __version__})
    return name


def _fit(spec: SweepSpec, store: SweepStore, name: str, packs: list[PackPlan], *, restore: bool, show_progress: bool) -> None:
    global _reaped_since_fit
    reaper.watch()  # the processes of an embedded Ray end with this driver, however it ends
    _reaped_since_fit = os.path.isdir("/proc/self")  # where the reaper runs (Linux)
    seeds = len(spec.resolved()["grid"].get("seed", [spec.training.seed]))
    callbacks = [MemberProgress(store, seeds)] if show_progress else []
    trainable = _trainable_for(spec, store)
    if restore:
        tuner = tune.Tuner.restore(store.path(name), trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=store.fs)
    else:
        # Tune starts grid trials in this order: the costliest packs first, so that the last ones
        # to finish are short and no slot idles long at the end (longest processing time first).
        ordered = sorted(packs, key=pack_cost, reverse=True)
        param_space = {"pack_id": tune.grid_search([p.pack_id for p in ordered])} if packs else {}
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=_tune_config(spec, store, packs),
                           run_config=_run_config(spec, store, name, callbacks))
    with _without_tune_loggers(), _tune_actor_runtime_env():
        timings.mark("fit_start")
        results = tuner.fit()
        timings.mark("fit_end")
    _record_failures(store, results)


@contextlib.contextmanager
def _without_tune_loggers() -> Iterator[None]:
    """Tune's JSON/CSV/TensorBoard loggers duplicate what the Parquet tables hold, one file per
    trial; without them Tune's result analysis warns about every trial, which says nothing here.
    Tune's console output goes too: its new output engine prints an experiment box and a results
    path at any verbosity (the old one, with verbose=0, prints nothing), and its "Wrote the latest
    version of all result files" line is logged at INFO. nc-ray shows its own progress bar and
    summary. Scoped, so that a caller's own Tune runs in this process keep their defaults."""
    variables = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0"}
    quiet = [logging.getLogger(name) for name in ("ray.tune.analysis.experiment_analysis", "ray.tune.tune")]
    saved_variables = {name: os.environ.get(name) for name in variables}
    saved_levels = [log.level for log in quiet]
    os.environ.update(variables)
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(quiet, saved_levels):
            log.setLevel(level)
        for name, value in saved_variables.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
