"""`nc-ray`: launch, resume and inspect sweeps.

    nc-ray sweep jobs/quickstart.yaml [--storage DIR|URI] [--address ADDR] [--dry-run]
    nc-ray resume SWEEP_DIR [--address ADDR]
    nc-ray status SWEEP_DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from nc_ray.spec import SpecError, load_spec
from nc_ray.store import SweepBusyError


def _sweep(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)  # validated before Ray starts or anything is written
    if args.dry_run:
        from nc_ray.sweep import plan_sweep

        plan = plan_sweep(spec, args.storage)
        print(f"sweep {spec.name} -> {plan.store.uri}")
        print(f"{plan.n_members} members, {plan.n_finished} already finished, {len(plan.packs)} packs of <= {plan.pack_size} (pack size for this machine's {os.cpu_count()} CPUs)")
        for pack in plan.packs:
            first = pack.members[0]
            decays = sorted({m["weight_decay"] for m in pack.members})
            print(
                f"  {pack.pack_id}  {len(pack.members):3d} members  {first['dataset']} {first['arch']} depth={first['depth']} "
                f"width={first['width']} loss={first['loss']} epochs={first['epochs']}  weight_decay {decays[0]:.3g}..{decays[-1]:.3g}"
            )
        return 0
    from nc_ray.sweep import run_sweep, sweep_status

    store = run_sweep(args.spec, args.storage, args.address)
    return _print_status(store.uri, sweep_status(store.uri))


def _resume(args: argparse.Namespace) -> int:
    from nc_ray.sweep import resume_sweep, sweep_status

    store = resume_sweep(args.sweep_dir, args.address)
    return _print_status(store.uri, sweep_status(store.uri))


def _status(args: argparse.Namespace) -> int:
    from nc_ray.sweep import sweep_status

    return _print_status(args.sweep_dir, sweep_status(args.sweep_dir))


def _print_status(where: str, status) -> int:
    counts = status.counts
    print(f"{where}: " + ", ".join(f"{counts[k]} {k}" for k in counts))
    for pack_id, (epoch, epochs) in sorted(status.running.items()):
        print(f"  pack {pack_id}: epoch {epoch}/{epochs}")
    for member_id, error in sorted(status.errors.items()):
        print(f"  failed {member_id}: {error}")
    print(f"tables: {where}/tables/{{members,metrics,spectra}}")
    return 1 if counts["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nc-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    address_help = "Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)"

    sweep = commands.add_parser("sweep", help="train every member of a job spec not yet finished")
    sweep.add_argument("spec", help="job spec YAML (see jobs/)")
    sweep.add_argument("--storage", default="runs", help="local directory or pyarrow URI (s3://, gs://) holding sweeps; default ./runs")
    sweep.add_argument("--address", default=None, help=address_help)
    sweep.add_argument("--dry-run", action="store_true", help="print the packs that would run, start nothing")
    sweep.set_defaults(handler=_sweep)

    resume = commands.add_parser("resume", help="continue an interrupted sweep from its directory")
    resume.add_argument("sweep_dir")
    resume.add_argument("--address", default=None, help=address_help)
    resume.set_defaults(handler=_resume)

    status = commands.add_parser("status", help="members complete / running / pending / diverged / failed")
    status.add_argument("sweep_dir")
    status.set_defaults(handler=_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SpecError as error:
        print(f"nc-ray: invalid job spec\n{error}", file=sys.stderr)
        return 2
    except (SweepBusyError, FileNotFoundError, KeyError) as error:
        print(f"nc-ray: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
