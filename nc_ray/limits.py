"""What a sweep may ask of the machine: every limit, its default, how to raise it, and the checks
that run before any work starts.

A limit is read, in order, from the job spec's `limits:` section (where it has a key there), from
its environment variable, or from its default. Limits on the spec file itself apply before the
spec is read, so only their variables set them. Who checks what:

  spec file size, nesting depth, expanded size     `nc_ray.spec.load_spec`, before YAML objects are built
  members, evaluations, epochs, depth              spec validation (`SweepSpec`), from numbers alone
  the memory of one pack, a trial's CPUs and GPUs  `check_this_machine` before an embedded Ray starts;
                                                   `nc_ray.sweep.check_cluster` on a joined cluster's nodes
  a cluster address that answers                   `preflight` and `nc_ray.sweep.connect`, before any lock
  a node that can run one trial (CPU, GPU)         `nc_ray.sweep.check_cluster`, before Tune starts

This module imports neither Ray nor torch, except Ray's address lookup for `--address auto` and its
GPU detection for a spec that asks for GPUs.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nc_ray.config import MemberConfig

if TYPE_CHECKING:
    from nc_ray.spec import SweepSpec

INT64_MAX = 2**63 - 1  # every integer of a member is a column of an int64 table
GIB = 2**30


class LimitError(ValueError):
    """A sweep that would exhaust or block the machine, refused before any work starts; the message
    names what is asked, what is available, and how to raise the limit."""


@dataclass(frozen=True)
class Limit:
    """One limit: its environment variable, its default, and its key under `limits:` in a job spec
    (None: the variable alone sets it)."""

    variable: str
    default: float
    what: str  # the quantity limited, as error messages name it
    key: str | None = None
    integer: bool = True

    def value(self, given: float | None = None) -> float:
        """`given` (the spec's value) if set, else $variable if set, else the default."""
        if given is not None:
            return given
        text = os.environ.get(self.variable, "").strip()
        if not text:
            return self.default
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            value = math.nan
        if not 0 <= value < math.inf:  # nan fails too
            kind = "an integer" if self.integer else "a number"
            raise LimitError(f"${self.variable}={text!r}: expected {kind} >= 0 ({self.what})")
        return value

    @property
    def how_to_raise(self) -> str:
        where = f"limits.{self.key} in the job spec or ${self.variable}" if self.key else f"${self.variable}"
        return f"raise it with {where}"


SPEC_BYTES = Limit("NC_RAY_MAX_SPEC_BYTES", 2**20, "bytes of a job spec file")
SPEC_DEPTH = Limit("NC_RAY_MAX_SPEC_DEPTH", 32, "nesting depth of a job spec")
SPEC_NODES = Limit("NC_RAY_MAX_SPEC_NODES", 1_000_000, "keys and values of a job spec, every alias expanded")
MEMBERS = Limit("NC_RAY_MAX_MEMBERS", 100_000, "members of a sweep", key="members")
EVALUATIONS = Limit("NC_RAY_MAX_EVALUATIONS", 10_000, "evaluations per member", key="evaluations")
EPOCHS = Limit("NC_RAY_MAX_EPOCHS", 1_000_000, "training epochs", key="epochs")
DEPTH = Limit("NC_RAY_MAX_DEPTH", 1_000, "network depth", key="depth")
# No default value: without one, a pack may need PACK_MEMORY_SHARE of its node's memory (`check_pack_memory`).
PACK_MEMORY_GIB = Limit("NC_RAY_MAX_PACK_MEMORY_GIB", math.nan, "GiB of memory one pack may need",
                        key="pack_memory_gib", integer=False)
CONNECT_S = Limit("NC_RAY_MAX_CONNECT_S", 10.0, "seconds to reach a Ray cluster", integer=False)
RESOURCES_WAIT_S = Limit("NC_RAY_MAX_RESOURCES_WAIT_S", 600.0, "seconds to wait for a node that fits a trial",
                         integer=False)
# A query session (nc_ray.query.Sweep): DuckDB's memory limit (no default value: QUERY_MEMORY_SHARE of
# this machine's memory), its threads (no default value: DuckDB's, all cores) and a wall-clock limit per
# statement (no default value: none in the library; the `nc-ray query` command passes 60 s).
QUERY_MEMORY_GIB = Limit("NC_RAY_QUERY_MEMORY_GIB", math.nan, "GiB of memory a query may use", integer=False)
QUERY_THREADS = Limit("NC_RAY_QUERY_THREADS", math.nan, "threads a query may use")
QUERY_TIMEOUT_S = Limit("NC_RAY_QUERY_TIMEOUT_S", math.nan, "seconds a query may run", integer=False)
QUERY_MEMORY_SHARE = 0.25
LIMITS = (SPEC_BYTES, SPEC_DEPTH, SPEC_NODES, MEMBERS, EVALUATIONS, EPOCHS, DEPTH, PACK_MEMORY_GIB, CONNECT_S,
          RESOURCES_WAIT_S, QUERY_MEMORY_GIB, QUERY_THREADS, QUERY_TIMEOUT_S)
# Without limits.pack_memory_gib or its variable, a pack may need this share of its node's memory:
# the rest is for Ray, the driver and the other trials on the node.
PACK_MEMORY_SHARE = 0.5


def evaluation_count(epochs: int, every: int, initial: bool) -> int:
    """len(MemberConfig.evaluation_epochs()), computed without the list: epoch 0 if initial, the
    multiples of `every` up to `epochs`, and `epochs`."""
    return int(initial) + epochs // every + (epochs % every != 0)


# ---------------------------------------------------------------- memory of a pack

F32, F64, I64 = 4, 8, 8
# A Ray worker process with torch and nc_ray imported and its first pack started (thread pools,
# kernels), before it holds any data: measured about 460 MB outside Ray on the development machine.
WORKER_BASE_BYTES = 600 * 2**20
# Allocator slack over the tensors counted. Without it the phases below came within 10% of the
# peak RSS above the imports of five packs run on the development machine; with it and the base,
# the estimate is 1.2-1.45x their peak RSS (RELIABILITY.md, "Limits").
ALLOCATOR_SLACK = 1.2
# pack_metrics streams the metric set in chunks of about this many float64 elements per tensor
# (nc_ray.metrics._CHUNK_TENSOR_BYTES / 8, at least _MIN_CHUNK samples); evaluate() in 8192 samples.
_METRIC_CHUNK_ELEMENTS, _MIN_METRIC_CHUNK, _EVALUATE_CHUNK = 2**19, 128, 8192


def dataset_shape(member: MemberConfig) -> tuple[int, int, int] | None:
    """(train samples, test samples, input features) of a member's dataset, from its params alone
    (upper bounds where a split rounds); None for a dataset whose size is known only by reading it."""
    params = dict(member.dataset_params)
    if member.dataset == "gaussian":
        k = params["n_classes"]
        shape = (k * params["samples_per_class"], k * params["test_samples_per_class"], params["dim"])
    elif member.dataset == "mnist1d":
        total = params["num_samples"] // 10 * 10
        shape = (total, total, params["final_seq_length"])
    else:
        shape = {"digits": (1797, 1797, 64), "mnist": (60_000, 10_000, 784), "fashion_mnist": (60_000, 10_000, 784),
                 "cifar10": (50_000, 10_000, 3072)}.get(member.dataset)
    if shape is None:
        return None
    n_train, n_test, in_dim = shape
    if member.n_per_class is not None:
        from nc_ray.data import n_classes_of  # here: query sessions read this module's limits, not datasets

        n_train = min(n_train, member.n_per_class * n_classes_of(member.dataset, **params))
    return n_train, n_test, in_dim


def pack_memory_bytes(member: MemberConfig, pack_size: int) -> int:
    """An upper estimate of the peak memory of one trial that trains `pack_size` members of
    `member`'s shape (float32, on one device), from shapes alone, after nc_ray.train and
    nc_ray.metrics. With G members of P weights each (the pack's weights take W = 4 G P bytes),
    a batch of B samples, d input features, layer outputs o_l and K classes:

        worker base + ALLOCATOR_SLACK x the largest of
          loading:    the train and test sets made in float64 with temporaries (6 copies in float32)
          training:   data + 2 W (weights, momentum) + the largest of the phases
            step        2 W (the members' working copies) + 3 G B (d + Σ o_l) 4 (layer inputs,
                        pre-activations, deltas) + the epoch's data orders (G N 8)
            metrics     8 W (a copy of the pack, float64 weights, the graph's weights, float64
                        Δ(Z − M)ᵀ) + SVD of the widest layer (2 copies, float64) + one chunk of the
                        metric set through every layer (float32 and float64, forward and backward)
            evaluation  one 8192-sample chunk through the widest layer (3 tensors)
            checkpoint  weights and momentum serialized, and a copy of those bytes (4 W)

    A dataset of unknown size (`dataset_shape` None) counts no data and a first layer as wide as the others.
    """
    shape = dataset_shape(member)
    n_train, n_test, in_dim = shape if shape is not None else (0, 0, member.width)
    from nc_ray.data import n_classes_of

    g, k = pack_size, n_classes_of(member.dataset, **dict(member.dataset_params))
    outs = [member.width] * (member.depth - 1) + [k]
    layers = [o * i for o, i in zip(outs, [in_dim] + outs[:-1])]
    weights = g * (sum(layers) + (sum(outs) if member.bias else 0)) * F32
    widest_out = max(outs)

    n_metric = n_train
    if member.metric_subset_per_class is not None:
        n_metric = min(n_train, member.metric_subset_per_class * k)
    data = (n_train + n_test + (n_metric if n_metric < n_train else 0)) * (in_dim * F32 + I64)
    loading = 6 * (n_train + n_test) * in_dim * F32

    batch = min(member.batch_size or n_train, n_train)
    step = 2 * weights + 3 * g * batch * (in_dim + sum(outs)) * F32 + g * n_train * I64
    chunk = min(n_metric, max(_MIN_METRIC_CHUNK, _METRIC_CHUNK_ELEMENTS // (g * max(in_dim, widest_out))))
    metrics = (8 * weights + 2 * g * max(layers) * F64 + chunk * in_dim * (F32 + F64)
               + g * chunk * sum(outs) * (3 * F32 + 2 * F64) + 4 * g * chunk * widest_out * F64)
    evaluated = min(_EVALUATE_CHUNK, max(n_train, n_test))
    evaluation = evaluated * in_dim * F32 + 3 * g * evaluated * widest_out * F32
    checkpoint = 4 * weights
    training = data + 2 * weights + max(step, metrics, evaluation, checkpoint)
    return WORKER_BASE_BYTES + math.ceil(ALLOCATOR_SLACK * max(loading, training))


def largest_pack(spec: SweepSpec) -> tuple[MemberConfig, int, int]:
    """(a member, the pack size, the estimated bytes) of the spec's pack that needs the most memory.

    The estimate grows with width and depth, so the widest and deepest member of each dataset
    stands for its shape; a pack is as large as the spec lets one be: its pack_size (at most
    planning's auto size), at most the members sharing a shape (grid), or the seeds (optuna).
    """
    from nc_ray.planning import MAX_AUTO_PACK_SIZE  # planning imports the spec, which imports this module

    axes = spec.grid.axes()
    if spec.search.mode == "grid":
        sharing = math.prod(len(axes.get(axis, [None])) for axis in ("lr", "weight_decay", "seed"))
        chosen = spec.resources.pack_size
        size = min(sharing, MAX_AUTO_PACK_SIZE if chosen == "auto" else chosen)
    else:
        size = len(axes.get("seed", [None]))
    largest = {"width": max(axes.get("width", [spec.model.width])), "depth": max(axes.get("depth", [spec.model.depth]))}
    members = [spec.member(dataset=name, **largest) for name in axes.get("dataset", [spec.dataset.name])]
    return max(((member, size, pack_memory_bytes(member, size)) for member in members), key=lambda item: item[2])


def machine_memory_bytes() -> int:
    """This machine's memory: physical memory, or the container's (cgroup) limit where lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def check_pack_memory(spec: SweepSpec, source: str, node_memory: int, node: str) -> None:
    """LimitError if the spec's largest pack (`largest_pack`) needs more memory than one pack may:
    limits.pack_memory_gib / $NC_RAY_MAX_PACK_MEMORY_GIB, else PACK_MEMORY_SHARE of `node_memory`."""
    member, size, need = largest_pack(spec)
    given = PACK_MEMORY_GIB.value(spec.limits.pack_memory_gib)
    if math.isnan(given):
        limit, allowed = PACK_MEMORY_SHARE * node_memory, f"{PACK_MEMORY_SHARE:.0%} of the {node_memory / GIB:.1f} GiB of {node}"
    else:
        limit, allowed = given * GIB, f"the limit of {given:g} GiB"
    if need > limit:
        raise LimitError(
            f"{source}: a pack of {size} members of width {member.width} and depth {member.depth} on {member.dataset} "
            f"(batch {member.batch_size or 'full'}) needs about {need / GIB:.3g} GiB, more than {allowed}; "
            f"lower resources.pack_size, the width, depth or batch_size, or {PACK_MEMORY_GIB.how_to_raise}"
        )


def reachable_address(address: str) -> str:
    """The Ray address to join once its port accepts a TCP connection within $NC_RAY_MAX_CONNECT_S
    (HOST:PORT, ray://HOST:PORT, or `auto`: the address of the Ray started on this machine with
    `ray start`); LimitError otherwise. A dead address would make ray.init retry for minutes."""
    timeout = CONNECT_S.value()
    resolved = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die  # what ray.init does with "auto"

        try:
            resolved = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as error:
            raise LimitError(f"address auto: no Ray cluster found on this machine ({str(error).splitlines()[0]}); "
                             "start one with `ray start --head`, or leave the address out for an embedded Ray") from None
    host, _, port = resolved.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as error:
        shown = address if resolved == address else f"{address} ({resolved})"
        raise LimitError(
            f"cannot reach the Ray cluster at {shown} within {timeout:g} s: {getattr(error, 'strerror', None) or error}; "
            f"check --address / $RAY_ADDRESS, or wait longer: {CONNECT_S.how_to_raise}"
        ) from None
    return resolved


def missing_resources(request: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """None if one of `nodes` (Ray resource totals per node) holds all of `request` (one trial's
    CPU and GPU), else what is missing, in words."""
    wanted = {name: amount for name, amount in request.items() if amount > 0}
    if any(all(node.get(name, 0) >= amount for name, amount in wanted.items()) for node in nodes):
        return None
    largest = ", ".join(f"{max((node.get(name, 0) for node in nodes), default=0):g} {name}" for name in wanted)
    asked = " and ".join(f"{amount:g} {name}" for name, amount in wanted.items())
    return f"a trial asks for {asked} on one node, and no node has that (at most {largest} on any of {len(nodes)} nodes)"


def this_machine_gpus() -> int:
    """The GPUs an embedded Ray would give this machine's node, found as Ray finds them (NVML, capped
    by $CUDA_VISIBLE_DEVICES) without starting Ray, which takes seconds."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    manager = get_accelerator_manager_for_resource("GPU")
    count = manager.get_current_node_num_accelerators()
    visible = manager.get_current_process_visible_accelerator_ids()
    return count if visible is None else min(count, len(visible))


def check_this_machine(spec: SweepSpec, source: str) -> None:
    """LimitError, before an embedded Ray starts, if this machine (its node: all its CPUs and GPUs)
    cannot run a trial of `spec`: its CPUs, its GPUs, or the largest pack's memory."""
    cpus = os.cpu_count() or 1
    if spec.resources.cpu > cpus:
        raise LimitError(f"{source}: a trial asks for {spec.resources.cpu:g} CPU, and this machine has {cpus}; "
                         "lower resources.cpu, or join a cluster with larger nodes (--address)")
    if spec.resources.gpu > 0:
        gpus = this_machine_gpus()
        if spec.resources.gpu > gpus:
            raise LimitError(f"{source}: a trial asks for {spec.resources.gpu:g} GPU, and this machine has {gpus}; "
                             "set resources.gpu: 0 to train on the CPU, or join a cluster with GPU nodes (--address)")
    check_pack_memory(spec, source, machine_memory_bytes(), "this machine")


def preflight(spec: SweepSpec, source: str, address: str | None) -> None:
    """What `nc-ray sweep` checks before it imports Ray or writes anything: with an address (or
    $RAY_ADDRESS), that the cluster answers; without, `check_this_machine`. LimitError otherwise.
    (`run_sweep` checks the same as it starts Ray.)"""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        reachable_address(address)
    else:
        check_this_machine(spec, source)
