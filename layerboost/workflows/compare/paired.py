"""Rows compared over the same items: per-item scoring of a task, pooling, and the paired tests."""

from __future__ import annotations

import math

def task_items(model, tok, prep, batch_size: int) -> dict:
    """One prepared task's accuracy, with its items as {doc_id, correct, margin} in the task's own column (acc or
    acc_norm): what the paired tests read."""
    from ...evaluate import evaluate

    r = evaluate(model, tok, [], prepared=[prep], batch_size=batch_size, per_item=True,
                 progress=True)["tasks"][prep.task.name]
    key = "_norm" if r["column"] == "acc_norm" else ""
    r["items"] = [{"doc_id": it["doc_id"], "correct": int(it["pred" + key] == it["gold"]),
                   "margin": it["margin" + key]} for it in r.pop("items")]
    return r


def pooled_items(row: dict) -> tuple[list[float], list[float], list[str], list[tuple]]:
    """Pooled per-item (correct, margin, task, key) of a row, in a fixed order."""
    correct, margin, task, keys = [], [], [], []
    for t in sorted(row["eval"]):
        for it in row["eval"][t]["items"]:
            correct.append(it["correct"])
            margin.append(it["margin"] if math.isfinite(it["margin"]) else 0.0)
            task.append(t)
            keys.append((t, it["doc_id"]))
    return correct, margin, task, keys


def significance(a: dict, b: dict) -> dict:
    """Paired tests of row a against row b: over the same items (when both were evaluated) and the same
    held-out rows."""
    from ...evaluate.retrieval import paired
    from ...stats import mcnemar, paired_bootstrap

    out = {"heldout_kl": paired_bootstrap(a["heldout"]["kl_rows"], b["heldout"]["kl_rows"])}
    for family, r in (a.get("retrieval") or {}).items():  # per length, over the same trials
        rb = (b.get("retrieval") or {}).get(family)
        if rb:
            out[family] = paired(r, rb)
    if "eval" in a and "eval" in b:
        ca, ma, ta, ka = pooled_items(a)
        cb, mb, _, kb = pooled_items(b)
        if ka != kb:
            raise ValueError(f"rows {a['name']} and {b['name']} were scored on different items")
        out.update(mcnemar=mcnemar(ca, cb),
                   accuracy=paired_bootstrap(ca, cb, strata=ta),  # difference of the average over tasks
                   margin=paired_bootstrap(ma, mb, strata=ta))
    return out
