"""The top-level calls: `evaluate` (tasks -> scores and metrics) and `format_table`."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

from ..data import resolve_data_dir
from ..util import environment
from .metrics import item_predictions, mc_metrics, perplexity_metrics
from .requests import PreparedTask, prepare_tasks
from .scoring import score_requests, score_rolling
from .tasks import MCTask, PerplexityTask


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str | MCTask | PerplexityTask],
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    max_batch_tokens: int = 4096,
    method: str = "prefix",
    progress: bool = True,
    per_item: bool = False,
    prepared: Sequence[PreparedTask] | None = None,
    wikitext_max_length: int | None = None,
) -> dict:
    """Evaluate a causal LM on benchmarks, scored like lm-eval 0.4.x.

    Args:
        model: any Hugging Face causal LM (converted or not), in eval mode.
        tokenizer: its tokenizer.
        tasks: names (`piqa`, `arc_easy`, `arc_challenge`, `winogrande`, `mmlu`, `hellaswag`,
            `wikitext`), user task definition files, or task objects.
        data_dir: local data directory (None: `$LAYERBOOST_DATA_DIR` or `../shared/data`).
        limit: items per task (stratified, seeded); None for full splits.
        seed: subsample seed.
        batch_size: most items per forward call.
        max_batch_tokens: most tokens per forward call.
        method: `prefix` (fast) or `naive` (per choice, like lm-eval).
        progress: show progress bars.
        per_item: include per-item log-likelihoods, predictions and gold margins.
        prepared: already prepared tasks (skips loading and tokenising; `tasks` is then ignored).
        wikitext_max_length: rolling-window length of perplexity tasks (None: the model's context, as lm-eval).

    Returns:
        JSON-able dict: `tasks` (per task: metrics, stderrs, n, n_total, column, time_s, data),
        `average` (mean of each task's paper column over multiple-choice tasks), `settings`,
        `versions`, `total_time_s`.

    Raises:
        DataNotFoundError: a task's data is missing and the hub is unavailable.
        KeyError: unknown task.
    """
    t0 = time.perf_counter()
    model.eval()
    if prepared is None:
        prepared = prepare_tasks(tokenizer, tasks, data_dir=data_dir, limit=limit, seed=seed)
    out_tasks = {}
    for prep in prepared:
        t1 = time.perf_counter()
        name = prep.task.name
        if isinstance(prep.task, PerplexityTask):
            lls = score_rolling(model, tokenizer, prep.requests, max_length=wikitext_max_length, progress=progress, desc=name)
            res = perplexity_metrics(prep.requests, lls)
            res["max_length"] = wikitext_max_length
        else:
            scores = score_requests(
                model, prep.requests, batch_size=batch_size, max_batch_tokens=max_batch_tokens, method=method, progress=progress, desc=name
            )
            res = mc_metrics(prep.task, prep.items, scores)
            if per_item:
                res["items"] = [
                    {"doc_id": it.doc_id, "gold": it.gold, "logliks": list(sc.logliks), **item_predictions(it, sc)}
                    for it, sc in zip(prep.items, scores)
                ]
        res.update(n_total=prep.n_total, time_s=round(time.perf_counter() - t1, 3), data=prep.source)
        if prep.partition is not None:
            res["partition"] = prep.partition
        out_tasks[name] = res
    mc = {k: v for k, v in out_tasks.items() if v["column"] in ("acc", "acc_norm")}
    average = None
    if mc:
        ses = [v[f"{v['column']}_stderr"] for v in mc.values()]
        average = {
            "value": sum(v[v["column"]] for v in mc.values()) / len(mc),
            # tasks are independent samples: stderr of an unweighted mean of k task means
            "stderr": None if None in ses else math.sqrt(sum(s**2 for s in ses)) / len(mc),
            "columns": {k: v["column"] for k, v in mc.items()},
        }
    weights = next(model.parameters())
    return {
        "tasks": out_tasks,
        "average": average,
        "settings": {"limit": limit, "seed": seed, "batch_size": batch_size, "method": method, "data_dir": str(resolve_data_dir(data_dir))},
        "environment": environment(weights.device, weights.dtype),
        "total_time_s": round(time.perf_counter() - t0, 3),
    }


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(results: dict) -> str:
    """A readable table of `evaluate` results: one row per task with its paper column, then the average."""
    lines = [
        f"{'task':<16} {'metric':<16} {'value':>8} {'stderr':>8} {'n':>6} {'time_s':>8}",
        "-" * 67,
    ]
    for name, r in results["tasks"].items():
        col = r["column"]
        lines.append(f"{name:<16} {col:<16} {_fmt(r[col]):>8} {_fmt(r.get(col + '_stderr')):>8} {r['n']:>6} {r['time_s']:>8.1f}")
        if col == "word_perplexity":
            for extra in ("byte_perplexity", "bits_per_byte", "token_perplexity"):
                lines.append(f"{'':<16} {extra:<16} {_fmt(r[extra]):>8}")
    avg = results.get("average")
    if avg:
        cols = ", ".join(f"{k}={v}" for k, v in avg["columns"].items())
        lines.append("-" * 67)
        lines.append(f"{'average':<16} {'paper columns':<16} {_fmt(avg['value']):>8} {_fmt(avg['stderr']):>8}")
        lines.append(f"(columns: {cols}; acc_norm = log-likelihood / choice length in characters, as lm-eval)")
    return "\n".join(lines)
