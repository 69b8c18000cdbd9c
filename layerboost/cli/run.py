"""`layerboost run`: the whole pipeline from a config."""

from __future__ import annotations

from .options import config_arguments, run_config_command


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline: analyze, plan, convert, heal, eval, bench, report",
                       description="Run every stage from a YAML config into one run folder, ending with report.md. "
                       "Stages already done with the same settings are skipped, so re-running resumes.")
    p.add_argument("config", nargs="?", help="YAML config, or a shipped name (default, paper); default: default")
    config_arguments(p, "run folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..workflows.run import RunConfig, run as work

    return run_config_command(args, RunConfig, "run", work, "report")
