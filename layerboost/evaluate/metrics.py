"""Metrics: acc, acc_norm and their standard errors as lm-eval computes them; perplexity metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .requests import ItemScore, MCItem, RollingRequest
from .tasks import MCTask


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's `mean_stderr`: sample standard deviation / sqrt(n); None when n < 2."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_sample_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """lm-eval's pooled stderr of a size-weighted group mean (MMLU over its subjects)."""
    var = sum((n - 1) * se**2 * n for n, se in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, like np.argmax


def item_predictions(item: MCItem, score: ItemScore) -> dict:
    """Predictions and margins of one item.

    Returns:
        `pred` (argmax log-likelihood), `pred_norm` (argmax of log-likelihood / len(choice)),
        `margin` and `margin_norm`: gold score minus the best other choice's score (> 0 iff correct
        without ties).
    """
    norm = [ll / len(c) for ll, c in zip(score.logliks, item.choices)]
    out = {}
    for key, vals in (("", score.logliks), ("_norm", norm)):
        others = [v for i, v in enumerate(vals) if i != item.gold]
        out["pred" + key] = _argmax(vals)
        out["margin" + key] = vals[item.gold] - max(others) if others else float("inf")
    return out


def mc_metrics(task: MCTask, items: Sequence[MCItem], scores: Sequence[ItemScore]) -> dict:
    """acc, acc_norm and their stderrs, with lm-eval's group pooling when the task has groups.

    Returns:
        {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "column", "subtasks"?}.
    """
    preds = [item_predictions(it, sc) for it, sc in zip(items, scores)]
    res: dict = {"column": task.column, "n": len(items)}
    for metric, key in (("acc", "pred"), ("acc_norm", "pred_norm")):
        vals = [float(p[key] == it.gold) for p, it in zip(preds, items)]
        res[metric] = sum(vals) / len(vals)
        if task.group is None:
            res[f"{metric}_stderr"] = mean_stderr(vals)
            continue
        groups: dict[str, list[float]] = {}
        for v, it in zip(vals, items):
            groups.setdefault(it.group, []).append(v)
        subtasks = res.setdefault("subtasks", {})
        for g, gv in sorted(groups.items()):
            subtasks.setdefault(g, {"n": len(gv)})
            subtasks[g][metric] = sum(gv) / len(gv)
            subtasks[g][f"{metric}_stderr"] = mean_stderr(gv)
        ses = [subtasks[g][f"{metric}_stderr"] for g in sorted(groups)]
        # lm-eval: pooled over sub-tasks, "N/A" (here None) if any sub-task has fewer than 2 items
        res[f"{metric}_stderr"] = None if None in ses else pooled_sample_stderr(ses, [len(groups[g]) for g in sorted(groups)])
    return res


def perplexity_metrics(requests: Sequence[RollingRequest], logliks: Sequence[float]) -> dict:
    """lm-eval's word_perplexity, byte_perplexity, bits_per_byte, plus token perplexity."""
    ll = sum(logliks)
    words = sum(r.words for r in requests)
    nbytes = sum(r.bytes for r in requests)
    ntok = sum(len(r.tokens) for r in requests)
    return {
        "column": "word_perplexity",
        "n": len(requests),
        "word_perplexity": math.exp(-ll / words),
        "byte_perplexity": math.exp(-ll / nbytes),
        "bits_per_byte": -ll / nbytes / math.log(2),
        "token_perplexity": math.exp(-ll / ntok),
        "tokens": ntok,
    }
