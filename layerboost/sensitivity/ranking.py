"""Which score and ranking a plan uses, and whether an analysis can serve a plan policy (checked before any
work)."""

from __future__ import annotations

from ..plan import RANKINGS
from .store import AnalysisError


PLAN_SCORES = ("drop", "margin", "kl", "cosine")


PROXY_SCORES = ("kl", "cosine")  # measured on calibration text, not on labelled items


def plan_scores(result: dict, score: str, ranking: str = "auto", thresholds: bool = False) -> list[float]:
    """Per-layer scores a plan is chosen from (higher = more sensitive, keeps softmax):

    `drop`: average accuracy drop when the layer's attention is removed (the paper's Eq. 3);
    `margin`: drop of the mean gold-answer margin (continuous; fewer ties on few items);
    `kl`: KL(base || variant) of next-token distributions on calibration text (proxy);
    `cosine`: 1 - cos(x, x + attn(x)) on calibration text (LLM-Drop's importance).

    `ranking`: "one-shot" scores each layer removed alone; "iterative" ranks by the analysis' iterative
    history of the same signal (`iterative_scores`; the comparison's best signal, docs/experiments/selection-signals.md);
    "auto" is iterative where the result holds that history, else one-shot (`ranking_used` names it).
    `thresholds`: the policy compares scores with thresholds (`PlanPolicy.thresholds`), so one-shot.
    """
    if ranking_used(result, score, ranking, thresholds) == "iterative":
        return iterative_scores(result["iterative"]["history"], result["n_layers"])
    if score in PROXY_SCORES:
        if score not in result.get("proxies", {}):
            raise AnalysisError(f"score {score!r} needs the proxies: run analyze without --no-proxies, or use --score drop")
        return result["proxies"][score]
    key = "sensitivity_margin" if score == "margin" else "sensitivity"
    if key not in result:
        raise AnalysisError(f"this sensitivity result has no {key!r} (written by an older layerboost?): run analyze again")
    return result[key]


def ranking_used(result: dict, score: str, ranking: str = "auto", thresholds: bool = False) -> str:
    """"iterative" or "one-shot": the ranking `plan_scores` uses for these arguments. A threshold policy
    ranks one-shot (its thresholds are in one-shot units); auto ranks iteratively where `result` holds an
    iterative history of `score`.

    Raises:
        AnalysisError: unknown score or ranking, or "iterative" asked of a threshold policy or of a result
            without that history.
    """
    if score not in PLAN_SCORES:
        raise AnalysisError(f"score must be one of {', '.join(PLAN_SCORES)}, not {score!r}")
    if ranking not in RANKINGS:
        raise AnalysisError(f"ranking must be one of {', '.join(RANKINGS)}, not {ranking!r}")
    if thresholds:
        if ranking == "iterative":
            raise AnalysisError("ranking 'iterative' cannot serve thresholds (softmax_above / none_below), which are "
                                "in one-shot score units: rank one-shot or auto, or choose the plan by counts")
        return "one-shot"
    it = result.get("iterative") or {}
    has = it.get("score") == score and bool(it.get("history"))
    if ranking == "iterative" and not has:
        found = (f"its iterative history ranks by {it.get('score', 'an older analysis signal')!r}" if it.get("history")
                 else "it has no iterative history")
        raise AnalysisError(f"ranking 'iterative' by {score!r}: {found}; run analyze --iterative K --score {score}, "
                            "or rank one-shot")
    return "iterative" if has and ranking != "one-shot" else "one-shot"


def auto_measures(policy) -> bool:
    """Whether the iterative mode's `auto` measures any step (as many as the plan's attention-free layers):
    not where the plan will not use the history (ranking "one-shot"; threshold policies, whose thresholds
    are in one-shot units), nor for the item signals (margin, drop: each step would repeat the whole item
    pass; ask with a count)."""
    return (policy.ranking != "one-shot" and not policy.thresholds and policy.score in PROXY_SCORES
            and policy.policy != "speed")  # the speed policy places layers by window costs, not by a ranking


def iterative_steps_for(policy, config=None, iterative="auto"):
    """The `iterative_steps` argument of `analyze`: a count as given, or for "auto" a function of the one-shot
    result: the attention-free layers `policy` places from the one-shot scores where `auto_measures`, else 0."""
    import dataclasses

    from ..plan import make_plan

    if iterative != "auto":
        return iterative

    def steps(result: dict) -> int:
        if not auto_measures(policy):
            return 0
        counting = dataclasses.replace(policy, keep_retrieval=0)  # keeping layers softmax moves none of the count
        return make_plan(counting, plan_scores(result, policy.score, "one-shot"), config).counts()["none"]

    return steps


def iterative_problems(policy, iterative, n_layers: int | None = None, n_none: int | None = None) -> list[str]:
    """What the iterative mode `iterative` ("auto" or a count) and `policy.ranking` cannot do, found before
    any work: more steps than layers, or an iterative ranking that will get no history. `n_layers` and
    `n_none` (the plan's attention-free count, from `make_plan` on any scores) are checked when known."""
    out = []
    if iterative != "auto" and n_layers is not None and iterative > n_layers:
        out.append(f"{iterative} iterative steps, but the model has {n_layers} layers: ask for at most {n_layers}")
    if policy.ranking != "iterative" or policy.thresholds:
        return out  # a threshold policy with ranking iterative: its own check (PlanPolicy, ranking_used)
    if iterative == 0 or (iterative == "auto" and (not auto_measures(policy) or n_none == 0)):
        out.append("ranking 'iterative' needs the iterative history, and the iterative mode measures no step here "
                   "(auto: as many as the plan's attention-free layers, for the kl and cosine scores only): "
                   "ask for a count of steps > 0, or rank one-shot or auto")
    return out


def iterative_scores(history: list[dict], n_layers: int) -> list[float]:
    """Plan scores from an iterative removal of K layers: the layers still there keep the last step's
    scores (each measured with the first K - 1 removed layers removed, the step that chose the K-th); the
    removed layers rank below all of them, in removal order (the first removed is the least sensitive).
    A removed layer's value is min(0, lowest remaining score) - (steps left when it was removed): a rank,
    not a measurement."""
    removed = [h["removed"] for h in history]
    last = {int(k): v for k, v in history[-1]["scores"].items()} if history else {}
    remaining = [last[i] for i in range(n_layers) if i not in removed]
    floor = min([0.0, *remaining])
    out = [last.get(i, 0.0) for i in range(n_layers)]
    for k, i in enumerate(removed):
        out[i] = floor - (len(removed) - k)
    return out
