"""The iterative mode: remove the least sensitive layer, re-measure the rest, repeat; and the ranking its
history gives."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from ..plan import LayerSpec
from ..util import write_json
from .store import AnalysisError, schema1_renamed
from .items import LayerRunner, PackedItem, layer_sensitivity, variant
from .proxies import base_logprobs, cosine_proxy, kl_proxy
from .ranking import PROXY_SCORES


@torch.no_grad()
def iterative_removal(model: nn.Module, items: list[PackedItem], steps: int, *, batch_tokens: int = 8192,
                      score: str = "margin_drop", out_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Remove the least sensitive layer's attention, re-measure the remaining layers on the modified
    model, and repeat `steps` times. Each step is saved (and resumed) under out_dir/iterative/step_k.
    `score` is the per-layer key ranked: "margin_drop" (default: on few items the accuracy "drop" ties
    most layers at 0 and once removed layer 0, the costliest layer by KL, first) or "drop".

    Returns:
        one dict per step: the layer removed, its score when removed, and all remaining layers' scores.
    """
    def measure(step, remaining, removed):
        sub = Path(out_dir) / "iterative" / f"step_{step:02d}" if out_dir else None
        res = layer_sensitivity(model, items, layers=remaining, batch_tokens=batch_tokens, out_dir=sub,
                                fingerprint={"n_items": len(items), "removed": removed}, progress=progress)
        return {r["layer"]: r[score] for r in res["layers"]}

    return _remove_greedily(LayerRunner(model), steps, measure)


def _remove_greedily(runner: LayerRunner, steps: int, measure) -> list[dict]:
    """The loop of both iterative signals: score every remaining layer (`measure(step, remaining, removed)`,
    with the layers removed so far removed), remove the lowest (ties: the lower index), repeat."""
    if steps > len(runner.layers):
        raise AnalysisError(f"{steps} iterative steps, but the model has {len(runner.layers)} layers: ask for at most "
                            f"{len(runner.layers)}")
    removed: list[int] = []
    history = []
    with contextlib.ExitStack() as stack:
        for step in range(steps):
            remaining = [i for i in range(len(runner.layers)) if i not in removed]
            scores = measure(step, remaining, list(removed))
            pick = min(remaining, key=lambda i: (scores[i], i))
            history.append({"step": step, "removed": pick, "score": scores[pick], "scores": scores,
                            "removed_before": list(removed)})
            removed.append(pick)
            stack.enter_context(variant(runner, pick, LayerSpec("none")))
    return history


@torch.no_grad()
def iterative_proxy(model: nn.Module, calib: torch.Tensor, steps: int, *, score: str, batch: int = 4,
                    out_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Iterative removal ranked by a proxy on calibration text: remove the layer that scores lowest, keep
    it removed, re-measure every remaining layer, repeat `steps` times.

    `kl`: KL(original || model with the candidate removed too), always against the original model, so
    step k ranks the cost of the k+1 removals together. `cosine`: 1 - cos(x, x + attn(x)) of each
    remaining layer in the model as it is now (LLM-Drop's iterative dropping). Each step is saved (and
    resumed) as out_dir/iterative_<score>/step_k.json.

    Returns:
        one dict per step: the layer removed, its score, and every remaining layer's score (as `iterative_removal`).
    """
    if score not in PROXY_SCORES:
        raise AnalysisError(f"iterative_proxy: score must be kl or cosine, not {score!r}")
    runner = LayerRunner(model)
    reference = base_logprobs(runner, calib, batch) if score == "kl" else None

    def proxy(remaining):
        if score == "kl":
            return kl_proxy(model, calib, layers=remaining, batch=batch, progress=progress, reference=reference)
        cos = cosine_proxy(model, calib, batch=batch)
        return [cos[i] for i in remaining]

    def measure(step, remaining, removed):
        f = Path(out_dir) / f"iterative_{score}" / f"step_{step:02d}.json" if out_dir else None
        saved = json.loads(f.read_text()) if f is not None and f.is_file() else None
        if saved is not None:
            saved = schema1_renamed(saved)
        if saved is not None and saved["removed_before"] == removed and saved["n_calib"] == list(calib.shape):
            return {int(k): v for k, v in saved["scores"].items()}
        scores = dict(zip(remaining, proxy(remaining)))
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            write_json(f, {"removed_before": removed, "scores": {str(k): v for k, v in scores.items()},
                           "n_calib": list(calib.shape)})
        return scores

    return _remove_greedily(runner, steps, measure)


def remove_iteratively(model: nn.Module, score: str, steps: int, *, items: list[PackedItem] | None = None,
                       calib: torch.Tensor | None = None, out_dir: str | Path | None = None, batch_tokens: int = 8192,
                       progress: bool = True) -> list[dict]:
    """Iterative removal by the signal `score` (any of PLAN_SCORES): the KL or cosine proxy on `calib`, or the
    gold-margin / accuracy drop on `items`."""
    if score in PROXY_SCORES:
        return iterative_proxy(model, calib, steps, score=score, out_dir=out_dir, progress=progress)
    key = {"drop": "drop", "margin": "margin_drop"}[score]
    return iterative_removal(model, items, steps, batch_tokens=batch_tokens, score=key, out_dir=out_dir, progress=progress)


def ranking_disagreements(one_shot: dict[int, float], history: list[dict]) -> list[dict]:
    """Steps where iterative removal picks another layer than the one-shot ranking would (the least
    sensitive one-shot layer among those not yet removed)."""
    out = []
    for h in history:
        left = [i for i in one_shot if i not in h["removed_before"]]
        expected = min(left, key=lambda i: (one_shot[i], i))
        if expected != h["removed"]:
            out.append({"step": h["step"], "one_shot": expected, "iterative": h["removed"],
                        "one_shot_score": one_shot[expected], "iterative_score": h["score"]})
    return out


def check_steps(steps):
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise AnalysisError(f"iterative_steps must be a count >= 0 or a function of the one-shot result (for the "
                            f"CLI's auto: iterative_steps_for(policy, config)), not {steps!r}")
    return steps
