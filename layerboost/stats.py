"""Paired significance tests for rows scored on the same items.

Two models scored on the same items are compared item by item, not by their error bars:

    mcnemar(a, b)             exact two-sided McNemar test on 0/1 correctness (binomial on the
                              discordant pairs)
    paired_bootstrap(a, b)    mean of a - b, its 95% percentile interval and a two-sided p-value
                              from resampling items (any per-item measure: correctness, margins)
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mcnemar(a: Sequence[float], b: Sequence[float]) -> dict:
    """Exact McNemar test of paired 0/1 outcomes.

    Returns:
        {"a_only": items right only under a, "b_only": right only under b, "p": two-sided exact p}.

    Raises:
        ValueError: lengths differ or values are not 0/1.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples must have equal length, got {len(a)} and {len(b)}")
    if any(x not in (0, 1) for x in (*a, *b)):
        raise ValueError("McNemar needs 0/1 outcomes")
    n01 = sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
    n10 = sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
    n, k = n01 + n10, min(n01, n10)
    # P(X <= k) for X ~ Binomial(n, 1/2), doubled and capped at 1
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return {"a_only": n01, "b_only": n10, "p": p}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_resamples: int = 10_000, seed: int = 0,
                     strata: Sequence[str] | None = None) -> dict:
    """Bootstrap over items of mean(a - b).

    Args:
        a, b: per-item values of two models on the same items.
        strata: optional per-item group (e.g. the task); items are resampled within each group and the
            statistic is the unweighted mean of the group means (the average over tasks).

    Returns:
        {"diff": observed statistic, "ci95": [lo, hi], "p": two-sided bootstrap p-value of "no difference"}.
    """
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired samples must be non-empty and of equal length, got {len(a)} and {len(b)}")
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    keys = list(strata) if strata is not None else [""] * len(d)
    parts = [d[[i for i, k in enumerate(keys) if k == g]] for g in sorted(set(keys))]
    obs = float(np.mean([p.mean() for p in parts]))
    rng = np.random.default_rng(seed)
    boots = np.zeros(n_resamples)
    for p in parts:  # mean over groups of the resampled group means, 1000 resamples at a time
        for s in range(0, n_resamples, 1000):
            idx = rng.integers(0, len(p), size=(min(1000, n_resamples - s), len(p)))
            boots[s:s + len(idx)] += p[idx].mean(axis=1) / len(parts)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    # two-sided: how often the centred bootstrap distribution lies at least as far from 0 as observed
    extreme = int(np.sum(np.abs(boots - obs) >= abs(obs)))
    return {"diff": obs, "ci95": [float(lo), float(hi)], "p": (extreme + 1) / (n_resamples + 1)}


__all__ = ["mcnemar", "paired_bootstrap"]
