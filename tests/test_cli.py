"""Property tests of `nc-ray` on malformed arguments (hypothesis), for every subcommand.

Each generated argument list is a valid one with exactly one thing wrong. Properties: exit
status 2 (argparse's usage error or a handler's), never a traceback, one `nc-ray` line on stderr
naming the offending option, path or value, Ray never started, and nothing under the test's
directory written, touched or created. `main` runs in-process with that directory as its cwd.
"""

from __future__ import annotations

import json
import re
import shutil
import string
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import ray
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nc_ray.sweep
from nc_ray.analysis import PhaseThresholds
from nc_ray.cli import SWEEP_MARKERS, main
from nc_ray.spec import load_spec
from nc_ray.schema import CONFIG_COLUMNS, SCHEMAS

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = 75  # per property
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# The test directory (main's cwd): a valid spec and sweep, and things that are neither.
SPEC = "smoke.yaml"
SWEEP = "sweep"
EMPTY_DIR = "empty"
A_FILE = "notes.txt"
PYARROW_SCHEMES = {"file", "local", "mock", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}

THRESHOLDS = tuple(f"--{f.name.replace('_', '-')}" for f in fields(PhaseThresholds))
ANALYSIS_OPTIONS = ("--radius", "--collapse-layer", "--member", *THRESHOLDS)
OPTIONS = {  # every option of each subcommand: unknown options must not abbreviate one of them
    "sweep": ("--storage", "--address", "--dry-run"),
    "resume": ("--address",),
    "status": ("--format",),
    "doctor": ("--quarantine",),
    "query": ("--sweep", "--format", "--output"),
    "phase": ("--metric", "--x", "--y", "--layer", "--layers", "--epoch", "--out", *ANALYSIS_OPTIONS),
    "report": ("--output", *ANALYSIS_OPTIONS),
}
# Options that take a value, with one valid value each (the generated base arguments use them).
VALID_VALUES = {
    "--storage": "runs-new", "--address": "localhost:6379", "--sweep": SWEEP, "--format": "csv", "--output": "result-new.csv",
    "--metric": "train_acc", "--x": "weight_decay", "--y": "depth", "--layer": "2", "--layers": "penultimate",
    "--epoch": "final", "--out": "figures-new", "--radius": "2.0", "--collapse-layer": "1", "--member": "m0",
    **{threshold: "0.5" for threshold in THRESHOLDS},
}
# Where an option's valid values differ between subcommands: (command, option) -> a valid value.
VALID_VALUES_OF = {("status", "--format"): "json"}
# Each subcommand's positionals: the argparse name of the first, valid values of all.
POSITIONALS = {
    "sweep": ("spec", [SPEC]), "query": ("sweep_dir", [SWEEP, "SELECT 1"]),
    **{command: ("sweep_dir", [SWEEP]) for command in ("resume", "status", "doctor", "phase", "report")},
}

ADDRESS = re.compile(r"(?:ray://)?(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")
GOOD_ADDRESSES = ("auto", "localhost:6379", "10.0.0.2:6379", "ray://head-node:10001", "[::1]:6379")
BAD_ADDRESSES = (
    "", "AUTO", "localhost", "localhost:", ":6379", "host:port", "host:99999", "host:0", "host:-1", "host:6379/x",
    "tcp://host:6379", "http://127.0.0.1:8265", "ray://", "ray://host", "user@host:6379", "host name:6379", "ray://host:1:2", "-host:6379",
)


def is_address(text: str) -> bool:
    match = ADDRESS.fullmatch(text)
    return text == "auto" or (match is not None and 1 <= int(match[1]) <= 65535)


def is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Case:
    argv: list[str]
    names: tuple[str, ...]  # what stderr must name: the option, path or value at fault
    files: tuple[tuple[str, bytes], ...] = ()  # written before the run (relative path, content)


# ------------------------------------------------------------------------------- strategies

words = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8)
file_names = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=12).filter(
    lambda name: name not in (".", "..", *SWEEP_MARKERS)
)
non_numbers = st.one_of(
    st.sampled_from(["", "one", "1,5", "0x10", "1e", "2 3"]),
    st.text(alphabet=string.ascii_letters + "%$#", min_size=1, max_size=6).filter(lambda text: not is_float(text)),
)
non_finite = st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity"])
negative_ints = st.integers(max_value=-1).map(str)
bad_ints = st.one_of(non_numbers, non_finite, st.sampled_from(["2.5", "1e3", "3."]))
bad_epochs = st.one_of(bad_ints.filter(lambda text: text not in ("final", "all")), negative_ints)
bad_layers = st.one_of(bad_ints, st.integers(max_value=0).map(str))
bad_collapse_layers = st.one_of(bad_ints, negative_ints)
bad_radii = st.one_of(non_numbers, non_finite, st.floats(max_value=0, allow_nan=False).map(repr))
bad_thresholds = st.one_of(non_numbers, non_finite, st.floats(max_value=0, exclude_max=True, allow_nan=False).map(repr))
bad_addresses = st.one_of(
    st.sampled_from(BAD_ADDRESSES),
    st.text(alphabet=string.ascii_letters + string.digits + ":/.-@[] ", max_size=24).filter(lambda text: not is_address(text)),
)
unknown_uris = st.builds(
    "{}://{}".format, st.from_regex(r"[a-z][a-z0-9+.-]{0,6}", fullmatch=True).filter(lambda s: s not in PYARROW_SCHEMES), words
)


@st.composite
def junk_dirs(draw: st.DrawFn) -> tuple[str, tuple[tuple[str, bytes], ...]]:
    """A new directory of random files (none named like a sweep's entries): (path, files)."""
    directory = f"junk-{draw(words)}"
    names = draw(st.lists(file_names, min_size=1, max_size=4, unique=True))
    return directory, tuple((f"{directory}/{name}", draw(st.binary(max_size=32))) for name in names)


@st.composite
def not_sweep_dirs(draw: st.DrawFn) -> tuple[str, tuple[tuple[str, bytes], ...]]:
    """A location that is not a sweep directory: missing, empty, a file, random files, a URI of no filesystem."""
    return draw(st.one_of(
        words.map(lambda w: (f"missing-{w}", ())),
        words.map(lambda w: (f"missing-{w}/{w}", ())),
        st.just((EMPTY_DIR, ())),
        st.just((A_FILE, ())),
        st.just((f"{A_FILE}/sub", ())),
        junk_dirs(),
        unknown_uris.map(lambda uri: (uri, ())),
    ))


def option_values(command: str) -> st.SearchStrategy[list[str]]:
    """Any valid selection of the command's options, in any order."""
    groups = [[option, VALID_VALUES_OF.get((command, option), VALID_VALUES[option])] if option in VALID_VALUES else [option]
              for option in OPTIONS[command]]
    groups = [g for g in groups if g[0] not in ("--layer", "--member")]  # --layers is the valid one; no member ids exist
    if not groups:
        return st.just([])
    return st.lists(st.sampled_from(groups), unique_by=lambda g: g[0], max_size=len(groups)).map(lambda gs: [a for g in gs for a in g])


@st.composite
def common_cases(draw: st.DrawFn, command: str) -> Case:
    """Argument lists any subcommand rejects: unknown or foreign options, positionals missing or extra, a value missing."""
    options = draw(option_values(command))
    required, values = POSITIONALS[command]
    base = [command, *values, *options]
    own = (*OPTIONS[command], "--help")
    foreign = sorted({o for other in OPTIONS.values() for o in other} - set(own))
    # Not a prefix of an own option: argparse reads an unambiguous prefix as the option.
    unknown = draw(st.one_of(words.map("--{}".format), st.sampled_from(foreign)).filter(lambda o: not any(m.startswith(o) for m in own)))
    kind = draw(st.sampled_from(["unknown", "unknown=value", "missing positional", "extra positional", "value missing"]))
    if kind == "unknown":
        return Case([*base, unknown], (unknown,))
    if kind == "unknown=value":
        return Case([command, f"{unknown}={draw(words)}", *base[1:]], (unknown,))
    if kind == "missing positional":
        return Case([command, *options], (required,))
    if kind == "extra positional":
        extra = draw(words)
        return Case([command, *values, extra, *options], (extra,))
    valued = [o for o in OPTIONS[command] if o in VALID_VALUES]
    if not valued:
        return Case([*base, unknown], (unknown,))
    option = draw(st.sampled_from(valued))
    return Case([*base, option], (option,))


def bad_value(command: str, option: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[Case]:
    """The command's valid arguments and then `option` with a bad value (the last value is the one used)."""
    return st.builds(
        lambda options, value: Case([command, *POSITIONALS[command][1], *options, f"{option}={value}"], (option, value)),
        option_values(command), values,
    )


def bad_sweep_dir(command: str, build: Callable[[str, list[str]], list[str]] | None = None) -> st.SearchStrategy[Case]:
    """The command with its SWEEP_DIR (or what `build(location, options)` puts it in) not a sweep directory."""
    def case(location: tuple[str, tuple[tuple[str, bytes], ...]], options: list[str]) -> Case:
        path, files = location
        argv = build(path, options) if build else [command, path, *POSITIONALS[command][1][1:], *options]
        return Case(argv, (path,), files)

    return st.builds(case, not_sweep_dirs(), option_values(command))


@st.composite
def bad_specs(draw: st.DrawFn) -> tuple[str, tuple[tuple[str, bytes], ...]]:
    """A spec path that is missing, a directory, not UTF-8, not YAML, YAML but not a mapping, or a mapping no spec is."""
    path = f"spec-{draw(words)}.yaml"
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), words)
    broken_yaml = st.builds(
        "{}{}".format, st.sampled_from(["", "name: x\n", "- 1\n"]),
        st.sampled_from(["key: [1, 2", "{a: 1", "a: b\n\tc: d", "a: 'open", "a:\n  - b\n c: d", "@x", "`x", "a: b: c", "- a\nb: c"]),
    )
    content = draw(st.one_of(
        st.just(None),
        st.just(b""),
        st.binary(max_size=16).map(lambda b: b"\xff\xfe" + b),
        broken_yaml.map(str.encode),
        st.one_of(scalars, st.lists(scalars, max_size=3)).map(lambda v: yaml.safe_dump(v).encode()),
        st.dictionaries(words, st.one_of(words, st.integers()), max_size=3).map(lambda v: yaml.safe_dump(v).encode()),
    ))
    if content is None:
        return draw(st.sampled_from([path, EMPTY_DIR, f"{A_FILE}/{path}"])), ()
    return path, ((path, content),)


def sweep_cases() -> st.SearchStrategy[Case]:
    return st.one_of(
        common_cases("sweep"),
        st.builds(lambda spec, options: Case(["sweep", spec[0], *options], (spec[0],), spec[1]), bad_specs(), option_values("sweep")),
        bad_value("sweep", "--storage", st.one_of(unknown_uris, st.sampled_from([A_FILE, f"{A_FILE}/runs"]))),
        bad_value("sweep", "--address", bad_addresses),
    )


def resume_cases() -> st.SearchStrategy[Case]:
    return st.one_of(common_cases("resume"), bad_sweep_dir("resume"), bad_value("resume", "--address", bad_addresses))


def query_cases() -> st.SearchStrategy[Case]:
    bad_sql = st.sampled_from([("SELECT no_such_column FROM metrics", "no_such_column"), ("SELEC 1", "SELEC"),
                               ("DROP VIEW metrics", "DROP"), ("COPY (SELECT 1) TO 'copied.csv'", "COPY")])
    return st.one_of(
        common_cases("query"),
        bad_sweep_dir("query"),
        bad_sweep_dir("query", lambda path, options: ["query", SWEEP, "SELECT 1", *options, "--sweep", path]),
        bad_value("query", "--format", words.filter(lambda w: w not in ("table", "csv", "json", "parquet"))),
        bad_value("query", "--output", st.sampled_from([EMPTY_DIR, SWEEP, f"{SWEEP}/out.csv", f"{A_FILE}/out.csv"])),
        st.builds(lambda sql, options: Case(["query", SWEEP, sql[0], *options], (sql[1],)), bad_sql, option_values("query")),
    )


def analysis_cases(command: str) -> list[st.SearchStrategy[Case]]:
    """Bad values of the options phase and report share."""
    return [
        bad_value(command, "--radius", bad_radii),
        bad_value(command, "--collapse-layer", bad_collapse_layers),
        st.sampled_from(THRESHOLDS).flatmap(lambda threshold: bad_value(command, threshold, bad_thresholds)),
    ]


def phase_cases() -> st.SearchStrategy[Case]:
    metric_names = set(SCHEMAS["metrics"].names)
    config_names = {name for name, _ in CONFIG_COLUMNS}
    return st.one_of(
        common_cases("phase"),
        bad_sweep_dir("phase"),
        bad_value("phase", "--epoch", bad_epochs),
        bad_value("phase", "--layer", bad_layers),
        bad_value("phase", "--layers", words.filter(lambda w: w not in ("hidden", "penultimate", "all"))),
        bad_value("phase", "--out", st.sampled_from([A_FILE, f"{A_FILE}/figures"])),
        # Not --layers hidden: argparse lets an option through the exclusive group when its value *is*
        # the default object, as an interned literal here is (never so for a real command line).
        st.builds(lambda options, layers: Case(["phase", SWEEP, *options, "--layers", layers, "--layer", "2"], ("--layer", "--layers")),
                  option_values("phase"), st.sampled_from(["penultimate", "all"])),
        st.builds(lambda options, metric: Case(["phase", SWEEP, *options, "--metric", metric], (metric,)),
                  option_values("phase"), words.filter(lambda w: w not in metric_names)),
        st.builds(lambda options, axis: Case(["phase", SWEEP, *options, "--x", axis], (axis,)),
                  option_values("phase"), st.one_of(words.filter(lambda w: w not in config_names), st.just("depth"))),
        *analysis_cases("phase"),
    )


def report_cases() -> st.SearchStrategy[Case]:
    return st.one_of(
        common_cases("report"),
        bad_sweep_dir("report"),
        bad_value("report", "--output", st.sampled_from([EMPTY_DIR, f"{A_FILE}/report.html"])),
        *analysis_cases("report"),
    )


top_level_cases = st.one_of(
    st.just(Case([], ("command",))),
    words.filter(lambda w: w not in OPTIONS).map(lambda w: Case([w, SWEEP], (w,))),
    words.map(lambda w: Case([f"--{w}", "status", SWEEP], (f"--{w}",))).filter(lambda c: not "--help".startswith(c.argv[0])),
)


# ------------------------------------------------------------------------------- the properties


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path with a valid spec and sweep directory, an empty directory and a file; Ray guarded."""
    shutil.copy(REPO / "jobs" / SPEC, tmp_path / SPEC)
    (tmp_path / SWEEP).mkdir()
    (tmp_path / SWEEP / "resolved_spec.json").write_text(json.dumps(load_spec(tmp_path / SPEC).resolved()))
    (tmp_path / EMPTY_DIR).mkdir()
    (tmp_path / A_FILE).write_text("not a sweep\n")

    def ray_started(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray started")

    monkeypatch.setattr(nc_ray.sweep, "connect", ray_started)
    monkeypatch.setattr(ray, "init", ray_started)
    return tmp_path


def snapshot(root: Path) -> set[tuple[str, int, int]]:
    """(path, size, mtime_ns) of `root` and everything under it."""
    return {(str(p.relative_to(root)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in (root, *root.rglob("*"))}


def check_rejected(case: Case, workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    for relative, content in case.files:
        (workspace / relative).parent.mkdir(parents=True, exist_ok=True)
        (workspace / relative).write_bytes(content)
    before = snapshot(workspace)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.chdir(workspace)  # relative paths, and the default --storage, land in the snapshot
        try:
            status = main(case.argv)
        except SystemExit as exit_:
            status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, (case.argv, status, err)
    assert "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("nc-ray")]) == 1, err
    for name in case.names:
        assert name in err or repr(name) in err, (name, err)
    assert snapshot(workspace) == before, case.argv


STATUS_AND_DOCTOR_CASES = st.one_of(
    st.sampled_from(["status", "doctor"]).flatmap(lambda command: st.one_of(common_cases(command), bad_sweep_dir(command))),
    bad_value("status", "--format", words.filter(lambda w: w not in ("text", "json"))),
)


@pytest.mark.parametrize("cases", [
    top_level_cases, sweep_cases(), resume_cases(), STATUS_AND_DOCTOR_CASES, query_cases(), phase_cases(), report_cases(),
], ids=["subcommand", "sweep", "resume", "status-doctor", "query", "phase", "report"])
@PROPERTY
@given(data=st.data())
def test_bad_arguments_are_rejected(cases, data, workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    check_rejected(data.draw(cases), workspace, monkeypatch, capsys)


@pytest.mark.parametrize("address", GOOD_ADDRESSES)
def test_good_addresses_pass_validation(address: str, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard, not the parser, stops a resume with a well-formed address."""
    monkeypatch.chdir(workspace)
    with pytest.raises(AssertionError, match="Ray started"):
        main(["resume", SWEEP, "--address", address])


def test_dry_run_of_a_valid_spec_still_plans(workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(workspace)
    assert main(["sweep", SPEC, "--storage", "runs-new", "--dry-run"]) == 0
    assert "8 members" in capsys.readouterr().out
    assert not (workspace / "runs-new").exists()


def test_the_address_examples_are_what_they_claim() -> None:
    assert all(is_address(a) for a in GOOD_ADDRESSES) and not any(is_address(a) for a in BAD_ADDRESSES)


def test_a_bad_ray_address_in_the_environment_is_refused_before_ray_starts(workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("RAY_ADDRESS", "head-node")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", SPEC, "--storage", "runs-new"])
    assert exit_info.value.code == 2
    assert "'head-node' (from --address or $RAY_ADDRESS)" in capsys.readouterr().err
    assert not (workspace / "runs-new").exists()
