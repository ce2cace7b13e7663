"""`nc-ray`: launch, resume and inspect sweeps.

    nc-ray sweep jobs/quickstart.yaml [--storage DIR|URI] [--address ADDR] [--dry-run]
    nc-ray resume SWEEP_DIR [--address ADDR]
    nc-ray status SWEEP_DIR [--format text|json]
    nc-ray doctor SWEEP_DIR [--quarantine]
    nc-ray query SWEEP_DIR ["SELECT ..."] [--sweep DIR ...] [--format table|csv|json|parquet] [--output FILE]
    nc-ray phase SWEEP_DIR [--metric M ...] [--x weight_decay] [--y depth] [--layer N | --layers hidden] [--epoch N|all]
    nc-ray report SWEEP_DIR [--output FILE]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from nc_ray import timings
from nc_ray.store import SweepBusyError, SweepFencedError, SweepLock, SweepStore, redact

# What makes a directory a sweep's: resolved_spec.json, written when `nc-ray sweep` starts, or
# tables/ (results copied without the rest).
SWEEP_MARKERS = ("resolved_spec.json", "tables")
SCIENCE_EPILOG = ("Every metric, the certificates b0 and b0_perp, the phases and the forecast are defined in docs/science.md "
                  "of the nc_ray repository.")
_ADDRESS = re.compile(r"(?:ray://)?(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")


def _sweep_at(where: str | Path) -> SweepStore:
    """The store of the sweep directory `where` (a path or URI); FileNotFoundError unless it is one (see SWEEP_MARKERS)."""
    store = SweepStore(str(where))
    if not any(store.exists(marker) for marker in SWEEP_MARKERS):
        if store.exists(".lock") or store.exists("spec.yaml"):  # what `nc-ray sweep` writes before resolved_spec.json
            copy = f" (a copy of it is {store.uri}/spec.yaml)" if store.exists("spec.yaml") else ""
            raise FileNotFoundError(
                f"{store.uri}: a sweep was started here but stopped before it recorded its job (no resolved_spec.json), "
                f"so nothing was trained and there is nothing to resume; start it again with "
                f"`nc-ray sweep JOB.yaml --storage {store.uri.rpartition('/')[0] or '/'}`, JOB.yaml being the job it was started with{copy}"
            )
        raise FileNotFoundError(f"{store.uri}: not a sweep directory (it holds neither resolved_spec.json nor tables/)")
    return store


def _sweep_dirs(*patterns: str) -> list[Path]:
    """The local sweep directories `patterns` name, glob patterns expanded; FileNotFoundError where a
    pattern names no directory (`expand_sweep_paths`) or a directory is not a sweep's."""
    from nc_ray.query import expand_sweep_paths

    directories = expand_sweep_paths(patterns)
    for directory in directories:
        _sweep_at(directory)
    return directories


def _sweep(args: argparse.Namespace) -> int:
    from nc_ray.spec import load_spec

    spec = load_spec(args.spec)  # validated before Ray starts or anything is written
    timings.mark("spec_loaded")
    if args.dry_run:
        from nc_ray.planning import pack_summary, plan_sweep, study_trials, sweep_store

        plan = plan_sweep(spec, sweep_store(args.storage, spec.name))
        print(f"sweep {spec.name} -> {plan.store.uri}")
        if spec.search.mode == "optuna":
            grid = spec.resolved()["grid"]
            complete = study_trials(spec, plan.store)[1]
            print(
                f"optuna search: {spec.search.num_samples} trials, each a pack of the {len(grid.get('seed', [0]))} seeds at a sampled "
                f"depth in {grid.get('depth', [spec.model.depth])} and weight_decay in [{spec.search.weight_decay.low:g}, {spec.search.weight_decay.high:g}]; "
                f"{complete} complete in the sweep's study, {max(0, spec.search.num_samples - complete)} to run"
            )
            if plan.packs:
                print(f"damaged packs to train again: {len(plan.packs)}")
            return 0
        chosen = f"auto: for this machine's {os.cpu_count()} CPUs" if plan.pack_size_auto else "set in the spec"
        print(f"{plan.n_members} members, {plan.n_finished} already finished, {len(plan.packs)} packs of <= {plan.pack_size} (pack size {chosen})")
        for pack in plan.packs:
            print(f"  {pack_summary(pack)}  epochs={pack.first.epochs}  {pack.first.describe_schedule()}")
        return 0
    from nc_ray.limits import LimitError, preflight
    from nc_ray.planning import sweep_status, sweep_store

    try:
        preflight(spec, args.spec, args.address)  # memory, the cluster's address: before Ray is imported or anything written
        store = sweep_store(args.storage, spec.name)
        if store.exists(".lock"):  # only an existing lock file can be held; probing makes the directory
            SweepLock(store).probe()
        from nc_ray.sweep import run_sweep

        timings.mark("runner_imported")
        store = run_sweep(args.spec, args.storage, args.address)
    except LimitError as error:
        print(f"nc-ray: {error}", file=sys.stderr)
        return 2
    code = _print_status(store.uri, sweep_status(store))
    timings.mark("done")
    return code


def _resume(args: argparse.Namespace) -> int:
    from nc_ray.planning import sweep_status

    SweepLock(_sweep_at(args.sweep_dir)).probe()
    from nc_ray.limits import LimitError
    from nc_ray.sweep import resume_sweep

    try:
        store = resume_sweep(args.sweep_dir, args.address)  # refuses a directory without resolved_spec.json
    except LimitError as error:
        print(f"nc-ray: {error}", file=sys.stderr)
        return 2
    return _print_status(store.uri, sweep_status(store))


def _status(args: argparse.Namespace) -> int:
    from nc_ray.planning import sweep_status

    store = _sweep_at(args.sweep_dir)
    status = sweep_status(store)
    if args.format == "json":
        import json

        print(json.dumps(status_document(store.uri, status), indent=1))
        return _status_code(status)
    return _print_status(store.uri, status)


STATUS_JSON_EPILOG = """\
--format json prints one JSON object (exit status as with text: 1 when members failed or the
tables are damaged, else 0); its shape is stable ("format" names its version, keys are only added):
  {"format": "nc-ray-status/1", "sweep": URI,
   "counts": {"complete": n, "running": n, "pending": n, "diverged": n, "failed": n}, "members": n,
   "running_packs": [{"pack_id": ID, "epoch": e, "epochs": E}, ...],
   "failed": [{"member_id": ID, "error": TEXT}, ...],
   "problems": [{"kind": KIND, "path": PATH, "detail": TEXT, "pack_id": ID or null, "repaired_by_resume": bool}, ...],
   "tables": URI/tables}
running_packs: packs evaluated at least once and unfinished (live, or left by a driver that died)."""


def status_document(where: str, status) -> dict:
    """`nc-ray status --format json`: the sweep's status as the stable JSON object STATUS_JSON_EPILOG describes."""
    return {
        "format": "nc-ray-status/1",
        "sweep": where,
        "counts": {state: status.counts[state] for state in ("complete", "running", "pending", "diverged", "failed")},
        "members": sum(status.counts.values()),
        "running_packs": [{"pack_id": pack_id, "epoch": epoch, "epochs": epochs} for pack_id, (epoch, epochs) in sorted(status.running.items())],
        "failed": [{"member_id": member_id, "error": error} for member_id, error in sorted(status.errors.items())],
        "problems": [{"kind": p.kind, "path": p.path, "detail": p.detail, "pack_id": p.pack_id, "repaired_by_resume": _repaired_by_resume(p)}
                     for p in status.problems],
        "tables": f"{where}/tables",
    }


def _repaired_by_resume(problem) -> bool:
    return problem.pack_id is not None or problem.movable


def _status_code(status) -> int:
    return 1 if status.counts["failed"] or status.problems else 0


def _doctor(args: argparse.Namespace) -> int:
    from nc_ray.integrity import check_sweep

    store = _sweep_at(args.sweep_dir)
    problems = check_sweep(store).problems
    for problem in problems:
        moved = store.quarantine(problem.path, problem.pack_id) if args.quarantine and problem.movable else []
        print(str(problem) + (f" -> moved to {', '.join(moved)}" if moved else ""))
    if not problems:
        print(f"{store.uri}: every table file reads whole and holds the rows its name says; every finished member has all its rows")
    elif args.quarantine:
        print(f"run `nc-ray resume {store.uri}` to retrain the packs named")
    return 1 if problems and not args.quarantine else 0


def _print_status(where: str, status) -> int:
    counts = status.counts
    print(f"{where}: " + ", ".join(f"{counts[k]} {k}" for k in counts))
    for pack_id, (epoch, epochs) in sorted(status.running.items()):
        print(f"  pack {pack_id}: epoch {epoch}/{epochs}")
    if status.running:
        # A progress file cannot tell a live trial from one whose driver died.
        print(f"  (running: evaluated and unfinished; if no nc-ray driver is running, `nc-ray resume {where}` continues them)")
    for member_id, error in sorted(status.errors.items()):
        print(f"  failed {member_id}: {error}")
    if status.problems:
        print(f"  damage (`nc-ray resume {where}` moves damaged files into quarantine/ and retrains their packs, whose members count as pending):")
    for problem in status.problems:
        print(f"    {problem}" + ("" if _repaired_by_resume(problem) else " [not repaired by resume]"))
    print(f"tables: {where}/tables/{{members,metrics,spectra}}")
    return _status_code(status)


def _exits_2_on_query_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A QueryError (DuckDB's message) or ValueError (a bad option) -> its message on stderr, exit 2."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from nc_ray.query import QueryError

        try:
            return handler(args)
        except (QueryError, ValueError) as error:
            print(f"nc-ray: {redact(str(error))}", file=sys.stderr)
            return 2

    return run


@_exits_2_on_query_errors
def _query(args: argparse.Namespace) -> int:
    from nc_ray.query import VIEWS, Sweep

    limits = {"memory_gib": args.memory_gib, "threads": args.threads, "timeout_s": args.timeout}
    with Sweep(_sweep_dirs(args.sweep_dir, *args.sweep), **limits) as sweep:
        if args.output and any(Path(args.output).resolve().is_relative_to(d) for d in sweep.directories):
            raise ValueError(f"query sessions are read-only: --output {args.output} is inside a sweep directory")
        if args.sql is None:
            counts = ", ".join(f"{v} ({sweep.sql(f'SELECT count(*) FROM {v}').column(0)[0].as_py()} rows)" for v in VIEWS)
            print(f"views over {', '.join(map(str, sweep.directories))}: {counts}")
            for view in VIEWS:
                print(f"  {view}: {', '.join(sweep.columns(view))}")
            return 0
        table = sweep.sql(args.sql)
    _write_result(table, args.format, args.output)
    return 0


def _write_result(table, form: str, output: str | None) -> None:
    import json

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    sink = open(output, "wb") if output else sys.stdout.buffer
    try:
        if form == "table":
            from nc_ray.query import format_table

            sink.write((format_table(table) + "\n").encode())
        elif form == "csv":
            pacsv.write_csv(table, sink)
        elif form == "json":
            sink.write((json.dumps(table.to_pylist(), default=str) + "\n").encode())
        else:
            pq.write_table(table, sink)
        sink.flush()
    finally:
        if output:
            sink.close()


def _thresholds(args: argparse.Namespace):
    from dataclasses import fields

    from nc_ray.analysis import PhaseThresholds

    return PhaseThresholds(**{f.name: getattr(args, f.name) for f in fields(PhaseThresholds)})


@_exits_2_on_query_errors
def _phase(args: argparse.Namespace) -> int:
    from nc_ray.analysis import DEFAULT_METRICS, aggregate, boundary_comparison, boundary_text, phase_grid_text, try_forecast_setup, write_aggregate
    from nc_ray.plots import render_pngs, standard_figures
    from nc_ray.query import Sweep
    from nc_ray.schema import EVALUATION_COLUMNS

    layers = args.layer if args.layer is not None else args.layers
    epoch = args.epoch
    metrics = args.metric or ["train_acc", "rank_rel_1e2", "dist_k_rel", "tcv_rel", "sv_max"]
    with Sweep(_sweep_dirs(args.sweep_dir)) as sweep:
        table = aggregate(sweep, x=args.x, y=args.y, metrics=[*metrics, *DEFAULT_METRICS], layers=layers, epoch=epoch, thresholds=_thresholds(args))
        out = Path(args.out) if args.out else sweep.directories[0] / "analysis"
        print(f"phase table: {write_aggregate(str(out), table)}")
        if epoch == "all":
            print("heatmaps are drawn for one epoch: pass --epoch N (or leave it out for the final epoch)")
            return 0
        setup, problem = try_forecast_setup(sweep, args.collapse_layer, args.radius)
        if problem:
            print(f"no forecast boundary: {problem}")
        when = "final epoch" if epoch == "final" else f"epoch {epoch}"
        where = f"layer {layers}" if isinstance(layers, int) else f"{layers} layers"
        per_member = {name for name, _ in EVALUATION_COLUMNS}  # the same on every layer
        heatmaps = {
            m if m in per_member else f"{m}_{layers}": (f"{m}_median", f"{m}{'' if m in per_member else ', ' + where}, {when} (median over seeds)")
            for m in metrics
        }
        figures = standard_figures(sweep, table, heatmaps, setup, args.member)
    if not figures:
        print("no cells to draw: the sweep has no member rows yet")
        return 1
    print(phase_grid_text(table))
    if setup is not None and (args.x, args.y) == ("weight_decay", "depth"):
        print(boundary_text(boundary_comparison(table, setup)))
    suffix = "" if epoch == "final" else f"_e{epoch}"
    out.mkdir(parents=True, exist_ok=True)
    for name, png in render_pngs(figures).items():
        path = out / f"{name}{suffix}.png"
        path.write_bytes(png)
        print(f"wrote {path}")
    return 0


@_exits_2_on_query_errors
def _report(args: argparse.Namespace) -> int:
    from nc_ray.report import write_report

    _sweep_dirs(args.sweep_dir)  # refuses a directory that is not a sweep's before the page is written into it
    path, problem = write_report(
        args.sweep_dir, args.output, thresholds=_thresholds(args), radius=args.radius, collapse_layer=args.collapse_layer, member_id=args.member,
    )
    if problem:
        print(f"no forecast in the report: {problem}")
    print(f"report: {path}")
    return 0


def _query_timeout() -> float:
    """`nc-ray query`'s default statement timeout: $NC_RAY_QUERY_TIMEOUT_S, else 60 s (the library has none)."""
    text = os.environ.get("NC_RAY_QUERY_TIMEOUT_S", "").strip()
    return _number(float, 0, above=True)(text) if text else 60.0


def _epoch(text: str) -> int | str:
    """argparse type of --epoch: an epoch number >= 0, 'final' or 'all'."""
    if text in ("final", "all"):
        return text
    try:
        epoch = int(text)
    except ValueError:
        epoch = -1
    if epoch < 0:
        raise argparse.ArgumentTypeError(f"expected an epoch number >= 0, 'final' or 'all', got {text!r}")
    return epoch


def _number(convert: Callable[[str], int | float], minimum: float, *, above: bool = False) -> Callable[[str], int | float]:
    """An argparse type: `convert(text)`, required finite and >= `minimum` (> with `above`)."""
    wanted = f"{'an integer' if convert is int else 'a finite number'} {'>' if above else '>='} {minimum:g}"

    def parse(text: str) -> int | float:
        try:
            value = convert(text)
        except ValueError:
            value = math.nan
        # Comparisons, not math.isfinite: that overflows on huge ints; nan fails every comparison.
        if not ((minimum < value if above else minimum <= value) and value < math.inf):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def _address(text: str) -> str:
    """argparse type of --address: 'auto', or HOST:PORT with an optional ray:// (what ray.init takes)."""
    match = _ADDRESS.fullmatch(text)
    if text != "auto" and not (match and 1 <= int(match[1]) <= 65535):
        raise argparse.ArgumentTypeError(f"expected 'auto' or HOST:PORT, optionally after ray://, got {text!r} (from --address or $RAY_ADDRESS)")
    return text


def _file_in_the_way(path: Path) -> Path | None:
    """The file at `path` or above it, if any: it stops `path` from being made as a directory."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    return None if existing.is_dir() else existing


def _directory(text: str) -> str:
    """argparse type of a local directory that nc-ray writes into, made when missing."""
    blocking = _file_in_the_way(Path(text).expanduser())
    if blocking is not None:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be a directory: {blocking} is a file")
    return text


def _output_file(text: str) -> str:
    """argparse type of an output file: not a directory, in a directory that exists or can be made."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    blocking = _file_in_the_way(path.parent)
    if blocking is not None:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: {blocking} is a file, not a directory")
    return text


def _location(text: str) -> str:
    """argparse type of a sweep's or storage's place: a local path, or a URI of a filesystem pyarrow has."""
    if "://" in text:
        try:
            SweepStore(text)
        except (ValueError, OSError) as error:  # an unknown scheme or credentials in the URI; hdfs:// without its libraries
            raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _storage(text: str) -> str:
    """argparse type of --storage: a local directory (made when missing) or a URI of a filesystem pyarrow has."""
    return _location(text) if "://" in text else _directory(text)


def _add_analysis_options(parser: argparse.ArgumentParser) -> None:
    """Phase thresholds (one option per PhaseThresholds field) and forecast options."""
    from dataclasses import fields

    from nc_ray.analysis import PhaseThresholds

    group = parser.add_argument_group("phase thresholds (SCIENCE.md defaults, stored with the outputs)")
    for field in fields(PhaseThresholds):
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=_number(float, 0), default=field.default, help=f"default {field.default}")
    parser.add_argument("--radius", type=_number(float, 0, above=True), default=None, help="class-mean radius r for the forecast (default: from the training inputs)")
    parser.add_argument("--collapse-layer", type=_number(int, 0), default=1, help="m: features collapse after layer m, the forecast's tail is D = L - m (default 1)")
    parser.add_argument("--member", default=None, help="member_id whose spectra are plotted over epochs (default: a complete member mid-grid)")


class _Parser(argparse.ArgumentParser):
    """argparse with its error messages `redact`ed: an argument may be a URI with credentials.
    Subcommand parsers are of the same class (argparse makes them with type(parent))."""

    def error(self, message: str):
        super().error(redact(message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nc-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SCIENCE_EPILOG)
    commands = parser.add_subparsers(dest="command", required=True)
    address_help = "Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)"

    sweep = commands.add_parser("sweep", help="train every member of a job spec not yet finished")
    sweep.add_argument("spec", help="job spec YAML (see jobs/)")
    sweep.add_argument("--storage", type=_storage, default="runs", help="local directory or pyarrow URI (s3://, gs://) holding sweeps; default ./runs")
    # A string default goes through `type` too: $RAY_ADDRESS is checked like --address.
    sweep.add_argument("--address", type=_address, default=os.environ.get("RAY_ADDRESS"), help=address_help)
    sweep.add_argument("--dry-run", action="store_true", help="print the packs that would run, start nothing")
    sweep.set_defaults(handler=_sweep)

    resume = commands.add_parser("resume", help="continue an interrupted sweep from its directory")
    resume.add_argument("sweep_dir", type=_location)
    resume.add_argument("--address", type=_address, default=os.environ.get("RAY_ADDRESS"), help=address_help)
    resume.set_defaults(handler=_resume)

    status = commands.add_parser("status", help="members complete / running / pending / diverged / failed, and any damage to the tables",
                                 epilog=STATUS_JSON_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("sweep_dir", type=_location)
    status.add_argument("--format", choices=("text", "json"), default="text", help="text for people (default), json for scripts")
    status.set_defaults(handler=_status)

    doctor = commands.add_parser("doctor", help="check every table file whole and every finished member's rows; --quarantine moves damaged files aside")
    doctor.add_argument("sweep_dir", type=_location)
    doctor.add_argument("--quarantine", action="store_true", help="move damaged files (and their packs' members rows) to <sweep>/quarantine/; `resume` does this too")
    doctor.set_defaults(handler=_doctor)

    query = commands.add_parser("query", help="SQL over the views members, metrics, spectra, planned (read-only)")
    query.add_argument("sweep_dir", help="sweep directory (or a quoted glob matching several)")
    query.add_argument("sql", nargs="?", default=None, help="one SELECT statement, right after SWEEP_DIR (before any option); without it, list the views")
    query.add_argument("--sweep", action="append", default=[], metavar="DIR", help="another sweep directory or glob (repeatable); adds rows, told apart by the sweep column")
    query.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table")
    query.add_argument("--output", type=_output_file, default=None, metavar="FILE", help="write the result here (default stdout); not inside a sweep directory")
    query.add_argument("--timeout", type=_number(float, 0, above=True), default=_query_timeout(), metavar="S",
                       help="stop a query running longer (default $NC_RAY_QUERY_TIMEOUT_S, else 60)")
    query.add_argument("--memory-gib", type=_number(float, 0, above=True), default=None, metavar="GIB",
                       help="DuckDB's memory limit (default $NC_RAY_QUERY_MEMORY_GIB, else a quarter of this machine's memory)")
    query.add_argument("--threads", type=_number(int, 1), default=None, help="DuckDB's threads (default $NC_RAY_QUERY_THREADS, else all cores)")
    query.set_defaults(handler=_query)

    phase = commands.add_parser("phase", help="aggregate per cell, write the phase table, phase map, heatmaps and relation plots",
                                epilog=SCIENCE_EPILOG)
    phase.add_argument("sweep_dir")
    phase.add_argument("--metric", action="append", default=None, help="metric to draw as a heatmap (repeatable; default train_acc, rank_rel_1e2, dist_k_rel, tcv_rel, sv_max)")
    phase.add_argument("--x", default="weight_decay", help="config column across (default weight_decay, log axis)")
    phase.add_argument("--y", default="depth", help="config column up (default depth)")
    chosen = phase.add_mutually_exclusive_group()
    chosen.add_argument("--layer", type=_number(int, 1), default=None, help="metrics of this layer number")
    chosen.add_argument("--layers", choices=("hidden", "penultimate", "all"), default="hidden",
                        help="per member, the median over these layers: hidden = 2..L-1, penultimate = layer L (default hidden)")
    phase.add_argument("--epoch", type=_epoch, default="final", help="an evaluation epoch, 'final' (default: each member's last) or 'all' (table only)")
    phase.add_argument("--out", type=_directory, default=None, help="folder for the PNGs (default SWEEP_DIR/analysis)")
    _add_analysis_options(phase)
    phase.set_defaults(handler=_phase)

    report = commands.add_parser("report", help="one self-contained HTML page with the sweep's result", epilog=SCIENCE_EPILOG)
    report.add_argument("sweep_dir")
    report.add_argument("--output", type=_output_file, default=None, metavar="FILE", help="default SWEEP_DIR/analysis/report.html")
    _add_analysis_options(report)
    report.set_defaults(handler=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in `argv` (default: this process's command line) and return its exit status.
    As the command line's own run (`argv` None), a sweep or resume that trained on an embedded Ray
    ends the process right there (`nc_ray.sweep.exit_process`)."""
    timings.mark("main")
    args = build_parser().parse_args(argv)
    code = _run(args)
    runner = sys.modules.get("nc_ray.sweep")  # imported only by a command that ran a sweep: the read side never imports Ray
    if argv is None and runner is not None:
        runner.exit_process(code)  # without waiting for ray.shutdown, where that is safe
    return code


def _run(args: argparse.Namespace) -> int:
    """The handler's exit status; a user's error as one `nc-ray:` line on stderr and status 2 (130 for Ctrl-C)."""
    try:
        return args.handler(args)
    except (SweepBusyError, SweepFencedError, KeyError, OSError) as error:
        # OSError: a path that is missing, unwritable or read-only, a full disk, storage out of reach.
        print(f"nc-ray: {redact(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nc-ray: interrupted", file=sys.stderr)
        return 130
    except ValueError as error:
        # nc_ray.spec is imported only by the commands that read specs (pydantic costs `query` ~0.1 s);
        # a SpecError can only come from it, so it is loaded whenever one is raised.
        spec = sys.modules.get("nc_ray.spec")
        if spec is None or not isinstance(error, spec.SpecError):
            raise
        print(f"nc-ray: invalid job spec\n{redact(str(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
