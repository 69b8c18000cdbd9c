"""Each row's plan and healing mode, from the analysis and the config."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import CompareConfig, split_seed

def plan_hash(plan) -> str:
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def row_plans(cfg: CompareConfig, sens: dict, config, iterative_plan=None) -> dict:
    """name -> (plan or None, heal mode or None, description) for every row to run, in order. Every plan is placed
    for the model `config` describes as any other plan is (plan.make_plan: a layer that slides natively keeps its
    own window)."""
    from ... import plan as P
    from ...plan import LayerPlan, LayerSpec, PlanPolicy
    from ...sensitivity import plan_scores

    n_layers = config.num_hidden_layers

    def counts(scores, softmax, swa, none):
        pol = PlanPolicy("counts", softmax=softmax, swa=swa, none=none, window=cfg.window, ranking="one-shot")
        return P.make_plan(pol, scores, config)

    def placed(plan):  # a fixed layout (random, pattern, every layer linear) capped like a placed one
        return P.cap_to_native(plan, config)[0]

    def by(score):  # one-shot: the iterative signal is its own row
        return counts(plan_scores(sens, score, "one-shot"), cfg.softmax, cfg.swa, cfg.none)

    main = by(cfg.score)
    rows: dict = {}
    for r in cfg.rows:
        if r == "base":
            rows[r] = (None, None, "the original model")
        elif r == "converted":
            rows[r] = (main, None, f"sensitivity plan ({cfg.score}), unhealed")
        elif r == "layerboost":
            rows[r] = (main, "both", f"sensitivity plan ({cfg.score}), attention transfer + logit distillation")
        elif r == "no_attn_distill":
            rows[r] = (main, "kd", f"sensitivity plan ({cfg.score}), logit distillation only")
        elif r == "random":
            for s in cfg.random_seeds:
                rows[f"random_s{s}"] = (placed(P.plan_random(n_layers, cfg.softmax, cfg.swa, cfg.none, s, cfg.window)), None,
                                        f"random placement, seed {s}, unhealed (held-out text only)")
            rows["random"] = ("median", "both", "random placement (seed with the median unhealed KL), healed")
        elif r == "pattern":
            rows[r] = (placed(P.plan_pattern(n_layers, cfg.softmax, cfg.swa, cfg.none, cfg.window)), "both",
                       "interleaved pattern, healed")
        elif r in ("lolcats", "lolcats_gate"):
            mix = "lolcats" if r == "lolcats" else "gate"
            spec = LayerSpec("linear_swa", cfg.linear_window, cfg.linear_feature_dim, mix)
            rows[r] = (placed(LayerPlan((spec,) * n_layers)), "both",
                       f"every layer linear_swa (window {cfg.linear_window}, feature dim {cfg.linear_feature_dim}, "
                       f"mix {mix}), healed")
        elif r == "llm_drop":
            scores = plan_scores(sens, "cosine", "one-shot")
            rows[r] = (counts(scores, n_layers - cfg.none, 0, cfg.none), "both",
                       f"{cfg.none} attention-free layers by the cosine proxy, the rest softmax, healed")
        elif split_seed(r)[1] is not None:
            base, seed = split_seed(r)
            plan, mode, desc = rows[base]
            rows[r] = (plan, mode, f"{desc}; healing seed {seed} (continuous measures only)")
        elif r.startswith("signal_"):
            sig = r[len("signal_"):]
            plan = iterative_plan if sig == "iterative" else by(sig)
            if plan == main:
                rows[r] = ("same", None, f"signal {sig}: same plan as layerboost")
            else:
                rows[r] = (plan, "both", f"sensitivity plan ({sig}), healed")
    return rows


def iterative_plan(model, tok, cfg: CompareConfig, out: Path):
    """Row 3 with the iterative signal: remove the least sensitive layer's attention, re-measure, repeat
    `none` times (LLM-Drop-style interactions); the rest ranked by the last step's scores. The signal is row
    3's: a proxy on calibration text (cosine, KL), else the margin or accuracy drop on `iterative_limit` items."""
    from ... import plan as P
    from ...evaluate import Partition, prepare_tasks
    from ...sensitivity import PROXY_SCORES, calibration_tokens, items_from_tasks, iterative_scores, remove_iteratively

    items = calib = None
    if cfg.score in PROXY_SCORES:  # the proxy re-measured after each removal, on the analysis' calibration text
        calib = calibration_tokens(tok, cfg.data_dir, cfg.calib_seqs)
    else:
        part = Partition("selection", cfg.selection_size, cfg.selection_seed)
        items = items_from_tasks(prepare_tasks(tok, cfg.tasks, data_dir=cfg.data_dir, limit=cfg.iterative_limit,
                                               seed=0, partition=part))
    hist = remove_iteratively(model, cfg.score, cfg.none, items=items, calib=calib, out_dir=out)
    scores = iterative_scores(hist, len(model.model.layers))
    pol = P.PlanPolicy("counts", softmax=cfg.softmax, swa=cfg.swa, none=cfg.none, window=cfg.window, ranking="one-shot")
    return P.make_plan(pol, scores, model.config)
