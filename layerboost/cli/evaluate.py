"""`layerboost eval`: arguments and the call of `evaluate`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..evaluate.api import evaluate, format_table
from ..evaluate.requests import Partition, load_task_docs, prepare_task
from ..evaluate.tasks import MCTask, PAPER_TASKS, TASKS, get_task
from ..util import UsageError, check_writable
from .options import add_device_dtype, add_force, add_limit, int_list, positive


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `layerboost eval` options to a parser."""

    parser.add_argument("--model", required=True, help="smollm2-135m, a .gguf file of a plain "
                        "llama, mistral, qwen2/3 or gemma3 model (a hybrid's GGUF runs in llama.cpp only), an HF or "
                        "layerboost folder, or a hub id")
    parser.add_argument(
        "--tasks",
        default=",".join(PAPER_TASKS),
        help=f"comma-separated tasks ({', '.join(TASKS)}, passkey, needle) or task definition .yaml/.json files (default: {','.join(PAPER_TASKS)})",
    )
    add_limit(parser, None)
    parser.add_argument("--data-dir", default=None, help="local data directory (default: $LAYERBOOST_DATA_DIR or ../shared/data)")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--batch-size", type=positive(), default=32, help="most items per forward call")
    parser.add_argument("--seed", type=int, default=0, help="subsample seed")
    add_device_dtype(parser)
    parser.add_argument("--method", default="prefix", choices=["prefix", "naive"], help="naive: score each choice alone (lm-eval's way)")
    parser.add_argument("--per-item", action="store_true", help="include per-item log-likelihoods and margins in the JSON")
    parser.add_argument("--partition", default="all", choices=["all", "evaluation", "selection"],
                        help="score the whole split, or only the evaluation (or selection) part of the seeded "
                             "selection/evaluation partition that `analyze` and `compare` use")
    parser.add_argument("--selection-size", type=positive(), default=100, help="documents per task in the selection part")
    parser.add_argument("--selection-seed", type=int, default=0, help="seed of the partition")
    parser.add_argument("--mmlu-per-subject", type=int, default=None, metavar="N",
                        help="MMLU only: N items from each of its 57 subjects (seeded) instead of --limit")
    parser.add_argument("--retrieval-lengths", "--passkey-lengths", type=int_list, default=(1024, 2048, 4096, 8192),
                        help="tasks passkey (a 5-digit key hidden in filler) and needle (a fact line in WikiText-2 "
                             "prose): prompt lengths in tokens; the true key is scored against distractor keys and by "
                             "greedy exact match (layerboost/evaluate/retrieval.py)")
    parser.add_argument("--retrieval-trials", "--passkey-trials", type=positive(), default=50,
                        help="tasks passkey / needle: trials per length")
    parser.add_argument("--retrieval-seed", "--passkey-seed", type=int, default=0,
                        help="tasks passkey / needle: trial seed (0 for reported numbers; analyze chooses layers "
                             "with another)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_eval_cli(args: argparse.Namespace) -> int:
    """Run `layerboost eval`: load the data, then the model, evaluate, print a table, write JSON.

    Returns:
        0 on success. A missing model or data, a bad task or an unwritable --out raises before any scoring
        (`layerboost.cli.main` prints it as one `error:` line).
    """
    from ..models import load_model

    limit = args.limit
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    from ..evaluate.retrieval import FAMILIES

    retrieval = [t for t in names if t in FAMILIES]
    tasks = [get_task(t) for t in names if t not in FAMILIES]
    if not tasks and not retrieval:
        raise UsageError(f"--tasks {args.tasks!r} names no task: give a comma-separated list, e.g. piqa,arc_easy")
    if args.mmlu_per_subject is not None and args.mmlu_per_subject < 1:
        raise UsageError(f"--mmlu-per-subject must be at least 1, got {args.mmlu_per_subject}")
    if args.out:
        check_writable(args.out, folder=False)  # before the work, not after it
    docs = [load_task_docs(t, args.data_dir) for t in tasks]  # fail on missing data before the slow model load
    if "needle" in retrieval:
        from ..data import load_dataset_docs

        load_dataset_docs("wikitext", args.data_dir)  # the needle's prose
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    part = None if args.partition == "all" else Partition(args.partition, args.selection_size, args.selection_seed)
    per_subject = args.mmlu_per_subject
    prepared = [prepare_task(tok, t, limit=limit, seed=args.seed, docs=d, partition=part if isinstance(t, MCTask) else None,
                             per_stratum=per_subject if t.name == "mmlu" else None)
                for t, d in zip(tasks, docs)]
    results = evaluate(
        model,
        tok,
        tasks,
        data_dir=args.data_dir,
        limit=limit,
        seed=args.seed,
        batch_size=args.batch_size,
        method=args.method,
        progress=not args.no_progress,
        per_item=args.per_item,
        prepared=prepared,
    ) if tasks else {"tasks": {}}
    from ..evaluate.retrieval import format_retrieval, score_retrieval

    for family in retrieval:
        results[family] = score_retrieval(model, tok, family, args.retrieval_lengths, args.retrieval_trials,
                                          args.retrieval_seed, progress=not args.no_progress, data_dir=args.data_dir)
    plan = getattr(model.config, "layerboost_plan", None)
    results = {
        "model": args.model,
        "plan": plan if isinstance(plan, (dict, list, str, type(None))) else str(plan),
        "dtype": args.dtype,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "mmlu_per_subject": per_subject,
        **results,
    }
    if tasks:
        print(format_table(results))
    for family in retrieval:
        print(format_retrieval(results[family]))
    if args.out:
        from ..util import write_json

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {**results, "written_by": getattr(args, "written_by", None)})
        print(f"results written to {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="zero-shot benchmarks scored like lm-evaluation-harness",
                       description="Evaluate a model on multiple-choice tasks and perplexity; JSON + table.")
    add_eval_arguments(p)
    add_force(p, "file")
    p.set_defaults(func=run_eval_cli)
