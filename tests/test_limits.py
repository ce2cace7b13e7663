"""Every limit of nc_ray.limits, triggered: refused before any work starts, with a message that
names the problem and how to raise the limit, fast and in little memory.

Spec limits are tried on load_spec in-process (peak Python allocation measured with tracemalloc)
and through `python -m nc_ray.cli sweep` (the child's peak RSS from os.wait4): exit status 2, no
traceback, the problem on one line, nothing created under --storage. The cluster checks join the
test session's Ray (2 CPUs, 1 GPU).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from nc_ray import limits
from nc_ray.config import MemberConfig, PackPlan
from nc_ray.data import dataset_names
from nc_ray.limits import GIB, LimitError, check_pack_memory, evaluation_count, largest_pack, missing_resources, reachable_address
from nc_ray.spec import SpecError, load_spec, parse_spec
from nc_ray.store import SweepStore

REPO = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())
MAX_MB = 500
LIMIT_VARIABLES = [limit.variable for limit in limits.LIMITS]


@pytest.fixture(autouse=True)
def default_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from the default limits, whatever the environment sets."""
    for variable in [*LIMIT_VARIABLES, "RAY_ADDRESS"]:
        monkeypatch.delenv(variable, raising=False)


def smoke(**changes: object) -> dict:
    """The smoke job with dotted keys set."""
    data = yaml.safe_load(yaml.safe_dump(SMOKE))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return data


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(path: Path) -> str:
    """load_spec's SpecError for `path`, asserting its work stayed under MAX_MB of Python allocations."""
    tracemalloc.start()
    try:
        with pytest.raises(SpecError) as info:
            load_spec(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_MB * 2**20, peak
    return str(info.value)


@dataclass
class Ran:
    status: int
    err: str
    max_rss_mb: float


def run_cli(*args: str, env: dict[str, str] | None = None) -> Ran:
    """`python -m nc_ray.cli ARGS` with its own peak RSS (os.wait4); a runaway dies at 120 CPU seconds."""
    environment = {k: v for k, v in os.environ.items() if k not in LIMIT_VARIABLES and k != "RAY_ADDRESS"} | (env or {})

    def cpu_guard() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (120, 120))

    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen([sys.executable, "-m", "nc_ray.cli", *args], cwd=REPO, env=environment,
                                 stdout=subprocess.DEVNULL, stderr=err, preexec_fn=cpu_guard)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return Ran(child.returncode, err.read().decode(), usage.ru_maxrss / 1024)


def assert_cli_refuses(tmp_path: Path, spec: Path, *needles: str, env: dict[str, str] | None = None,
                       extra: tuple[str, ...] = ()) -> str:
    storage = tmp_path / "runs"
    ran = run_cli("sweep", str(spec), "--storage", str(storage), *extra, env=env)
    assert ran.status == 2, ran.err
    assert "Traceback" not in ran.err, ran.err
    problem_lines = [line for line in ran.err.splitlines() if any(needle in line for needle in needles)]
    assert problem_lines, ran.err
    assert all(needle in problem_lines[-1] for needle in needles), ran.err
    assert not storage.exists(), list(storage.rglob("*"))
    assert ran.max_rss_mb < MAX_MB, ran.max_rss_mb
    return ran.err


BOMB = 'a0: &a0 ["lol"]\n' + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
DEFINED = "defs:\n" + "".join(f"  {line}\n" for line in BOMB.splitlines())
SMOKE_TEXT = yaml.safe_dump(SMOKE)


# ---------------------------------------------------------------- the spec file


def test_a_spec_file_over_the_byte_limit_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.yaml"
    with big.open("w") as file:
        file.write(SMOKE_TEXT + "#")
        file.truncate(55 * 2**20)  # 55 MB of a comment, sparse on disk
    message = refused(big)
    assert f"{big}: {55 * 2**20} bytes, above the limit of {2**20}" in message and "$NC_RAY_MAX_SPEC_BYTES" in message
    message = refused(Path("/dev/zero"))  # no size to stat: at most limit + 1 bytes are read
    assert "more than 1048576 bytes" in message and "$NC_RAY_MAX_SPEC_BYTES" in message
    monkeypatch.setenv("NC_RAY_MAX_SPEC_BYTES", "100")
    assert "above the limit of 100 bytes" in refused(REPO / "jobs" / "smoke.yaml")
    monkeypatch.setenv("NC_RAY_MAX_SPEC_BYTES", str(2**20))
    assert load_spec(REPO / "jobs" / "smoke.yaml").name == "smoke"


def test_the_cli_stops_at_once_on_dev_zero(tmp_path: Path) -> None:
    assert_cli_refuses(tmp_path, Path("/dev/zero"), "more than 1048576 bytes", "$NC_RAY_MAX_SPEC_BYTES")


def test_nesting_deeper_than_the_limit_is_refused_without_recursion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = write(tmp_path, SMOKE_TEXT + "extra: " + "[" * 1000 + "]" * 1000 + "\n")
    message = refused(deep)
    assert "nested deeper than the limit of 32 levels" in message and "$NC_RAY_MAX_SPEC_DEPTH" in message
    assert "RecursionError" not in message
    forty = write(tmp_path, SMOKE_TEXT + "extra: " + "[" * 40 + "]" * 40 + "\n", "forty.yaml")
    assert "nested deeper" in refused(forty)
    monkeypatch.setenv("NC_RAY_MAX_SPEC_DEPTH", "64")
    assert refused(forty).endswith("unknown key")  # read; refused for its unknown key only
    assert_cli_refuses(tmp_path, deep, "nested deeper than the limit of 32 levels", "$NC_RAY_MAX_SPEC_DEPTH")


@pytest.mark.parametrize("where", ["top level", "name", "dataset params", "grid axis"])
def test_an_alias_bomb_is_refused_before_it_is_expanded(where: str, tmp_path: Path) -> None:
    text = {
        "top level": BOMB + SMOKE_TEXT,
        "name": DEFINED + SMOKE_TEXT.replace("name: smoke", "name: *a9"),
        "dataset params": DEFINED + SMOKE_TEXT.replace("params:\n", "params:\n    x: *a9\n"),
        "grid axis": DEFINED + SMOKE_TEXT.replace("grid:\n", "grid:\n  lr: *a9\n"),
    }[where]
    message = refused(write(tmp_path, text))
    assert "holds more than the limit of 1000000" in message and "$NC_RAY_MAX_SPEC_NODES" in message


def test_the_value_that_crosses_the_node_limit_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = 'a0: &a0 [1, 2]\n' + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 6))
    path = write(tmp_path, small + SMOKE_TEXT)
    # a_i expands to 2**(i + 2) - 1 nodes: the keys and values up to a4 make 125, a5 alone 127
    monkeypatch.setenv("NC_RAY_MAX_SPEC_NODES", "126")
    assert "job.yaml: line 6, column 5: this value holds more than the limit of 126" in refused(path)
    monkeypatch.setenv("NC_RAY_MAX_SPEC_NODES", "124")
    assert "job.yaml: line 1, column 1: " in refused(path)
    monkeypatch.setenv("NC_RAY_MAX_SPEC_NODES", "1000")
    assert refused(path).splitlines()[0].endswith("unknown key")


def test_the_cli_refuses_an_alias_bomb_in_little_memory(tmp_path: Path) -> None:
    spec = write(tmp_path, DEFINED + SMOKE_TEXT.replace("name: smoke", "name: *a9"))
    assert_cli_refuses(tmp_path, spec, "holds more than the limit of 1000000", "$NC_RAY_MAX_SPEC_NODES")


def test_a_recursive_alias_and_an_endless_integer_are_yaml_errors(tmp_path: Path) -> None:
    assert "an alias refers to a node that contains it" in refused(write(tmp_path, "name: &a [x, *a]\n"))
    message = refused(write(tmp_path, SMOKE_TEXT.replace("width: 8", "width: " + "9" * 5000), "digits.yaml"))
    assert "invalid YAML" in message and "5000 digits" in message


def test_values_in_error_messages_are_bounded(tmp_path: Path) -> None:
    long_name = write(tmp_path, SMOKE_TEXT.replace("name: smoke", "name: " + "x" * 200_000))
    many = write(tmp_path, yaml.safe_dump(smoke(**{"grid.seed": ["a"] * 20_000})), "many.yaml")
    for path in (long_name, many):
        message = refused(path)
        assert len(message) < 20_000 and max(len(line) for line in message.splitlines()) < 500, message[:1000]
    assert message.splitlines()[-1] == f"{many}: ...: {20_000 - 50} more problems not shown"


# ---------------------------------------------------------------- members, evaluations, epochs, depth


def test_the_grid_is_capped_by_its_member_count_without_expanding_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = write(tmp_path, yaml.safe_dump(smoke(**{"grid.seed": {"count": 10_000}, "grid.lr": {"log_range": [1e-3, 1e-1], "num": 10_000}})))
    message = refused(spec)
    assert f"{spec}: grid: 400000000: members (depth 2 x lr 10000 x weight_decay 2 x seed 10000), above the limit of 100000" in message
    assert "limits.members in the job spec or $NC_RAY_MAX_MEMBERS" in message
    assert_cli_refuses(tmp_path, spec, "above the limit of 100000 (members of a sweep)", "limits.members", extra=("--dry-run",))
    three = smoke(**{"grid.seed": {"count": 3}})  # 12 members
    assert "limits.members" in str(pytest.raises(SpecError, parse_spec, three | {"limits": {"members": 11}}).value)
    assert len(parse_spec(three | {"limits": {"members": 12}}).members()) == 12
    monkeypatch.setenv("NC_RAY_MAX_MEMBERS", "11")
    pytest.raises(SpecError, parse_spec, three)
    assert parse_spec(three | {"limits": {"members": 12}}).resolved()["limits"]["members"] == 12  # the spec's own value wins


def test_optuna_members_are_trials_times_seeds() -> None:
    optuna = smoke(search={"mode": "optuna", "num_samples": 60_000, "weight_decay": {"low": 1e-5, "high": 1e-1},
                           "objective": {"metric": "tcv_rel", "layer": "penultimate", "target": 1e-2}})
    del optuna["grid"]["weight_decay"]
    with pytest.raises(SpecError) as info:
        parse_spec(optuna, "optuna.yaml")
    assert "optuna.yaml: search.num_samples: 60000: trials of 2 seeds each make 120000 members, above the limit of 100000" in str(info.value)


def test_evaluations_and_epochs_are_capped_arithmetically(tmp_path: Path) -> None:
    spec = write(tmp_path, yaml.safe_dump(smoke(**{"training.epochs": 10**12, "metrics.every": 1})))
    message = refused(spec)
    assert f"{spec}: training.epochs: 1000000000000: above the limit of 1000000 (training epochs); raise it with limits.epochs" in message
    assert "metrics.every: 1: evaluates each member 1000000000001 times in 1000000000000 epochs, above the limit of 10000" in message
    assert "limits.evaluations in the job spec or $NC_RAY_MAX_EVALUATIONS" in message
    assert_cli_refuses(tmp_path, spec, "above the limit of 10000 (evaluations per member)", "$NC_RAY_MAX_EVALUATIONS")
    fine = smoke(**{"training.epochs": 20_000, "metrics.every": 1})
    pytest.raises(SpecError, parse_spec, fine)
    assert parse_spec(fine | {"limits": {"evaluations": 20_001}}).resolved()["limits"]["evaluations"] == 20_001


@pytest.mark.parametrize(("epochs", "every", "initial"), [(6, 3, True), (7, 3, False), (1, 5, True), (10, 1, True), (9, 10, False)])
def test_evaluation_count_is_the_length_of_the_evaluation_epochs(epochs: int, every: int, initial: bool) -> None:
    member = parse_spec(smoke(**{"training.epochs": epochs, "metrics.every": every, "metrics.initial": initial})).members()[0]
    assert evaluation_count(epochs, every, initial) == len(member.evaluation_epochs())


def test_depth_is_capped_and_integers_fit_int64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = write(tmp_path, yaml.safe_dump(smoke(**{"grid.depth": [2, 1_000_000]})))
    message = refused(deep)
    assert f"{deep}: grid.depth[1]: 1000000: above the limit of 1000 (network depth); raise it with limits.depth" in message
    assert "$NC_RAY_MAX_DEPTH" in message
    assert_cli_refuses(tmp_path, deep, "above the limit of 1000 (network depth)", "$NC_RAY_MAX_DEPTH")
    monkeypatch.setenv("NC_RAY_MAX_DEPTH", "2000000")
    assert parse_spec(smoke(**{"grid.depth": [2, 1_000_000]})).resolved()["limits"]["depth"] == 2_000_000
    for key in ("model.width", "training.batch_size", "training.seed", "grid.width"):
        value = [10**30] if key == "grid.width" else 10**30
        with pytest.raises(SpecError, match="less than or equal to 9223372036854775807"):
            parse_spec(smoke(**{key: value}))


def test_a_bad_limit_variable_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NC_RAY_MAX_MEMBERS", "lots")
    with pytest.raises(SpecError, match=r"limits\.members: <missing>: \$NC_RAY_MAX_MEMBERS='lots': expected an integer >= 0"):
        parse_spec(smoke())
    monkeypatch.setenv("NC_RAY_MAX_SPEC_BYTES", "-1")
    with pytest.raises(SpecError, match=r"\$NC_RAY_MAX_SPEC_BYTES='-1'"):
        load_spec(REPO / "jobs" / "smoke.yaml")


def test_resolved_specs_record_the_limits_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NC_RAY_MAX_EPOCHS", "5000")
    resolved = parse_spec(smoke()).resolved()
    assert resolved["limits"] == {"members": 100_000, "evaluations": 10_000, "epochs": 5000, "depth": 1000, "pack_memory_gib": None}
    monkeypatch.delenv("NC_RAY_MAX_EPOCHS")
    assert parse_spec(resolved).resolved() == resolved  # a worker or a resume checks the same limits


# ---------------------------------------------------------------- the memory of a pack


def test_the_estimate_grows_with_the_shape_and_counts_every_dataset() -> None:
    spec = parse_spec(smoke())
    member, size, estimate = largest_pack(spec)
    assert (member.depth, size) == (3, 4) and estimate < 1 * GIB
    wider = parse_spec(smoke(**{"model.width": 4096}))
    assert largest_pack(wider)[2] > estimate
    assert largest_pack(parse_spec(smoke(**{"resources.pack_size": 2})))[1:] < (size, estimate)
    for name in set(dataset_names()) - {"arrays"}:  # arrays: its size is known only by reading its file
        named = parse_spec(smoke(**{"dataset": {"name": name}, "model.width": 16}))
        assert limits.dataset_shape(named.members()[0]) is not None, name


def test_the_dataset_shapes_bound_what_loads() -> None:
    from nc_ray.data import load_dataset

    for data in ({"name": "digits"}, {"name": "gaussian", "params": {"n_classes": 3, "dim": 5, "samples_per_class": 7}},
                 {"name": "gaussian", "n_per_class": 4}):
        member = parse_spec(smoke(dataset=data, **{"model.width": 16})).members()[0]
        loaded = load_dataset(data["name"], n_per_class=data.get("n_per_class"), **data.get("params", {}))
        n_train, n_test, in_dim = limits.dataset_shape(member)
        assert len(loaded.x_train) <= n_train and len(loaded.x_test) <= n_test and loaded.in_dim == in_dim


def test_a_pack_too_large_for_the_machine_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    huge = parse_spec(smoke(**{"model.width": 10**9}), "huge.yaml")
    with pytest.raises(LimitError) as info:
        check_pack_memory(huge, "huge.yaml", 64 * GIB, "this machine")
    message = str(info.value)
    assert message.startswith("huge.yaml: a pack of 4 members of width 1000000000 and depth 3 on gaussian (batch 32) needs about")
    assert "more than 50% of the 64.0 GiB of this machine" in message
    assert "lower resources.pack_size, the width, depth or batch_size, or raise it with limits.pack_memory_gib in the job spec or $NC_RAY_MAX_PACK_MEMORY_GIB" in message
    wide = parse_spec(smoke(**{"model.width": 20_000}))
    need = largest_pack(wide)[2]
    with pytest.raises(LimitError, match="more than the limit of 1 GiB"):
        check_pack_memory(wide.model_copy(update={"limits": wide.limits.model_copy(update={"pack_memory_gib": 1.0})}), "w.yaml", 64 * GIB, "x")
    monkeypatch.setenv("NC_RAY_MAX_PACK_MEMORY_GIB", str(need / GIB * 1.01))
    check_pack_memory(wide, "w.yaml", 1 * GIB, "a small node")  # raised above the estimate: passes
    spec = write(tmp_path, yaml.safe_dump(smoke(**{"model.width": 10**9})))
    assert_cli_refuses(tmp_path, spec, "needs about", "$NC_RAY_MAX_PACK_MEMORY_GIB")


# ---------------------------------------------------------------- the cluster


def test_an_address_that_does_not_answer_is_refused_before_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LimitError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:1 within 10 s: .*NC_RAY_MAX_CONNECT_S"):
        reachable_address("127.0.0.1:1")
    with pytest.raises(LimitError, match=r"ray://127\.0\.0\.1:1 within 10 s"):
        reachable_address("ray://127.0.0.1:1")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert reachable_address(f"127.0.0.1:{port}") == f"127.0.0.1:{port}"
        assert reachable_address(f"ray://localhost:{port}") == f"ray://localhost:{port}"
    spec = REPO / "jobs" / "smoke.yaml"
    assert_cli_refuses(tmp_path, spec, "cannot reach the Ray cluster at 127.0.0.1:1", "$NC_RAY_MAX_CONNECT_S",
                       env={"RAY_ADDRESS": "127.0.0.1:1", "NC_RAY_MAX_CONNECT_S": "2"})
    assert_cli_refuses(tmp_path, spec, "cannot reach the Ray cluster at 127.0.0.1:1 within 2 s",
                       env={"NC_RAY_MAX_CONNECT_S": "2"}, extra=("--address", "127.0.0.1:1"))


def test_missing_resources_say_what_is_missing() -> None:
    nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 8.0}]
    assert missing_resources({"CPU": 4, "GPU": 0}, nodes) is None
    assert missing_resources({"CPU": 4, "GPU": 0.5}, nodes) == (
        "a trial asks for 4 CPU and 0.5 GPU on one node, and no node has that (at most 8 CPU, 1 GPU on any of 2 nodes)")


def test_a_trial_this_machine_cannot_run_is_refused_before_ray_starts(tmp_path: Path) -> None:
    spec = write(tmp_path, yaml.safe_dump(smoke(resources={"cpu": 4096})))
    assert_cli_refuses(tmp_path, spec, "a trial asks for 4096 CPU, and this machine has", "lower resources.cpu")


def test_a_trial_asking_for_more_gpus_than_this_machine_has_is_refused_before_ray_starts(tmp_path: Path) -> None:
    from nc_ray.limits import this_machine_gpus

    asked = this_machine_gpus() + 1
    spec = write(tmp_path, yaml.safe_dump(smoke(resources={"cpu": 1, "gpu": asked})))
    err = assert_cli_refuses(tmp_path, spec, f"a trial asks for {asked} GPU, and this machine has {asked - 1}",
                             "set resources.gpu: 0")
    assert "Started a local Ray instance" not in err, err


def test_a_trial_no_node_can_run_is_refused_before_tune(ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nc_ray.sweep import check_cluster

    for resources, asked in (({"cpu": 64}, "64 CPU"), ({"gpu": 2}, "1 CPU and 2 GPU")):
        spec = parse_spec(smoke(resources=resources), "big.yaml")
        with pytest.raises(LimitError) as info:
            check_cluster(spec, "big.yaml", joined=False)
        assert str(info.value).startswith(f"big.yaml: a trial asks for {asked}")
        assert "at most 2 CPU" in str(info.value) and "lower resources.cpu / resources.gpu" in str(info.value)
    monkeypatch.setenv("NC_RAY_MAX_RESOURCES_WAIT_S", "1")
    with pytest.raises(LimitError, match=r"after waiting 1 s for the autoscaler; .*\$NC_RAY_MAX_RESOURCES_WAIT_S"):
        check_cluster(parse_spec(smoke(resources={"cpu": 64})), "big.yaml", joined=True)
    check_cluster(parse_spec(smoke(resources={"cpu": 2, "gpu": 1})), "fits.yaml", joined=True)
    spec = write(tmp_path, yaml.safe_dump(smoke(resources={"cpu": 64})))
    assert_cli_refuses(tmp_path, spec, "a trial asks for 64 CPU", "$NC_RAY_MAX_RESOURCES_WAIT_S",
                       env={"NC_RAY_MAX_RESOURCES_WAIT_S": "0"}, extra=("--address", ray_address))


# ---------------------------------------------------------------- recording failures


def test_a_failure_that_cannot_be_written_is_logged_and_the_driver_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from nc_ray.sweep import _record_failures

    store = SweepStore(str(tmp_path / "sweep"))
    base = parse_spec(smoke()).members()[0]
    good = PackPlan.of([base])
    unwritable = PackPlan.of([MemberConfig(**{**base.to_dict(), "width": 10**30, "dataset_params": base.dataset_params})])
    for pack in (good, unwritable):
        store.write_pack(pack)

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    results = [SimpleNamespace(error=RuntimeError("trial died"), config={"pack_id": unwritable.pack_id}),
               SimpleNamespace(error=SimpleNamespace(cause=Unprintable()), config={"pack_id": good.pack_id})]
    with caplog.at_level(logging.ERROR, logger="nc_ray.sweep"):
        assert _record_failures(store, results) == 1
    assert f"pack {unwritable.pack_id} failed (RuntimeError: trial died)" in caplog.text
    assert "could not be recorded" in caplog.text
    table = store.read_table("members")
    assert table["status"].to_pylist() == ["failed"]
    assert table["error"].to_pylist() == ["Unprintable: <its message cannot be shown>"]


# ---------------------------------------------------------------- queries

FIXTURE_SWEEP = Path(__file__).resolve().parent / "fixtures" / "sweep_v1"
ENDLESS = "SELECT sum(i) FROM range(100000000000) t(i)"


# Runs `nc-ray ARGS` and reports its own peak RSS (VmHWM, which execve resets; ru_maxrss would
# include the forking test process's memory) on a last stderr line.
_PEAK_REPORTING_CLI = """
import atexit, runpy, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("peak_kib", line.split()[1], file=sys.stderr)
atexit.register(peak)
sys.argv = ["nc-ray", *sys.argv[1:]]
runpy.run_module("nc_ray.cli", run_name="__main__")
"""


def run_query(*args: str, env: dict[str, str] | None = None) -> SimpleNamespace:
    """`nc-ray query FIXTURE ARGS` in a subprocess: its returncode, stderr and peak memory (bytes)."""
    result = subprocess.run([sys.executable, "-c", _PEAK_REPORTING_CLI, "query", str(FIXTURE_SWEEP), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=60, env={**os.environ, **(env or {})})
    *lines, last = result.stderr.splitlines()
    assert last.startswith("peak_kib "), result.stderr
    return SimpleNamespace(returncode=result.returncode, stderr="\n".join(lines), peak=int(last.split()[1]) * 1024)


def test_a_query_past_its_time_limit_stops_and_says_how_to_raise_it() -> None:
    result = run_query(ENDLESS, "--timeout", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("nc-ray: the query ran past its limit of 1 s and was stopped; "
                                     "raise it with $NC_RAY_QUERY_TIMEOUT_S (nc-ray query: --timeout)")
    assert "past its limit of 1 s" in run_query(ENDLESS, env={"NC_RAY_QUERY_TIMEOUT_S": "1"}).stderr
    from nc_ray.query import QueryError, open_sweep

    with open_sweep(FIXTURE_SWEEP, timeout_s=0.5) as sweep, pytest.raises(QueryError, match="past its limit of 0.5 s"):
        sweep.sql(ENDLESS)


def test_a_query_past_its_memory_limit_stops_within_it() -> None:
    result = run_query("SELECT i, count(*) FROM range(200000000) t(i) GROUP BY i", "--memory-gib", "0.1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "needs more than its memory limit of 0.1 GiB; raise it with $NC_RAY_QUERY_MEMORY_GIB" in result.stderr
    assert result.peak < 500 * 2**20, result.peak
    from nc_ray.query import open_sweep

    with open_sweep(FIXTURE_SWEEP) as sweep:  # the default: a quarter of the machine's memory
        limit = sweep.sql("SELECT current_setting('memory_limit') AS m").column(0)[0].as_py()
    assert limit.endswith("B") and sweep.memory_gib == pytest.approx(limits.machine_memory_bytes() / 4 / GIB)


def test_ctrl_c_during_a_query_exits_130_without_a_traceback() -> None:
    import signal
    import time

    # As from a terminal: SIGINT not ignored (a test run in the background inherits it ignored).
    process = subprocess.Popen([sys.executable, "-m", "nc_ray.cli", "query", str(FIXTURE_SWEEP), ENDLESS],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(2.5)  # past the imports, inside the statement
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and err.strip() == "nc-ray: interrupted"
