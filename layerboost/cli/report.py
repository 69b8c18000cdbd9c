"""`layerboost report`: rebuild a run's report.md."""

from __future__ import annotations

from pathlib import Path

from ..util import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="rebuild report.md of a run folder from its stage outputs",
                       description="Write RUN/report.md from the JSON and PNG files the stages wrote.")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--force", action="store_true",
                   help="replace a report.md that was edited since layerboost wrote it, or that is a link")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..outputs import folder_lock
    from ..workflows.report import write_report

    if not (Path(args.run) / "stages").is_dir():
        raise UsageError(f"--run {args.run} is not a run folder (no stages/ inside): give the folder `layerboost run` wrote")
    with folder_lock(Path(args.run), "report"):  # not while a run writes there
        print(f"wrote {write_report(args.run, force=args.force)}")
    return 0
