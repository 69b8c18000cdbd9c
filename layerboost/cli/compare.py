"""`layerboost compare`: the comparison table."""

from __future__ import annotations

from .options import config_arguments, run_config_command


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="the paper's comparison table: LayerBoost vs ablations and baselines",
                       description="Analyze on the selection partition, then measure every row (base, converted, "
                       "LayerBoost, w/o attention distillation, random/pattern placements, LoLCATs-style and "
                       "LLM-Drop-style baselines, other selection signals) on the evaluation partition at equal "
                       "healing budgets; writes comparison.md with paired tests and figures. Resumes row by row.")
    p.add_argument("config", nargs="?", help="YAML config or a shipped name (compare); default: compare")
    config_arguments(p, "comparison folder")
    p.add_argument("--rows", help="comma-separated rows to run instead of the config's (e.g. the key rows' accuracy "
                   "first; rows may be added to a folder later)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..workflows.compare import CompareConfig, compare as work

    return run_config_command(args, CompareConfig, "compare", work, "comparison")
