"""The tokens-to-quality curve of healing: the default plan healed to a long budget, with and without attention
distillation, probed along the way, then evaluated at chosen points and fitted.

    heal      each row heals a fresh copy of the model to --tokens; held-out KL, agreement and perplexity are
              probed (in fp32) at --probe-at tokens, where the trainable parameters are also saved
              (heal_state/snapshots/). A killed run resumes where its last checkpoint left it: rerun the command.
    evaluate  the base model and each row at --eval-at tokens (snapshots merged into the hybrid): WikiText-2
              perplexity (every document, float32) and accuracy on the comparison's evaluation partition (MMLU 20
              per subject, weights in bfloat16, as the comparison), with per-item records; every finished
              complete heal (`budgets`) gets WikiText-2 and the held-out KL, as eval/<row>_complete_<tokens>.
    budgets   complete heals at smaller budgets (--at) with the curve's settings, each with its own schedule: a
              row's points along its one schedule are mid-decay, so the law of tokens is fitted to complete heals
              (these ends, and the row's own end); out/budgets/<tokens>/<row>; resumes like heal
    rate      each stage's training speed on quiet cores (a short heal of the same settings; stop every other
              job first), so the figure's hours are this CPU's, not the wall time of a heal that shared it
    report    curve.json, curve.png (quality against tokens and against training hours, both rows, the base
              line), the paired tests and a fitted law of the KL gap against tokens; printed as a table.

The rows (both the default recipe; everything else as `layerboost heal` defaults, except --precision):
    attn      attention transfer on 25% of the budget, then LoRA logit distillation
    no_attn   LoRA logit distillation on the whole budget (the paper's "w/o Attn. Distill.")

    python scripts/heal_curve.py heal --tokens 2M --out runs/heal_curve          # hours: run in the background
    python scripts/heal_curve.py evaluate --out runs/heal_curve --eval-at 200k,1M,2M
    python scripts/heal_curve.py budgets --at 200k,500k,1M --rows no_attn --out runs/heal_curve
    python scripts/heal_curve.py rate --out runs/heal_curve                       # minutes, quiet cores
    python scripts/heal_curve.py report --out runs/heal_curve --docs docs/heal-curve-smollm2-135m
    python scripts/heal_curve.py heal --smoke --out runs/heal_curve_smoke       # tiny budget, proves it runs
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import claim, heal_each, model_at, pattern_plan, write  # noqa: E402
from layerboost.util import allocator, read_json  # noqa: E402

ROWS = {"attn": {}, "no_attn": {"attn_distill": False}}
PROBE_AT = "0,50k,100k,200k,500k,1M,2M,5M,10M"  # the points at or below --tokens are probed, and the end


def token_list(text: str, limit: int | None = None) -> list[int]:
    from layerboost.corpus import parse_tokens

    pts = sorted({parse_tokens(x) if x.strip() != "0" else 0 for x in text.split(",") if x.strip()})
    return [p for p in pts if limit is None or p <= limit]


def heal_rows(args) -> int:
    import layerboost as lb
    from layerboost.corpus import heldout_rows
    from layerboost.data import default_data_dir
    from layerboost.heal import HealConfig

    data = args.data or str(default_data_dir() / "corpus")
    out = Path(args.out)
    settings = {"tokens": args.tokens, "precision": args.precision, "checkpoint_every": args.checkpoint_every}
    cfg = HealConfig(**settings)  # checked before the model loads
    points = token_list(args.probe_at, cfg.tokens)
    if cfg.tokens not in points:
        points.append(cfg.tokens)
    base, tok = lb.load_model(args.model)
    plan = pattern_plan(base, args.window)
    probe_rows = heldout_rows(tok, data, args.probe_tokens, cfg.seq_len)
    meta = {"model": args.model, "data": data, "plan": plan.to_dict(), "settings": settings, "probe_at": points,
            "probe_tokens": int(probe_rows.numel()), "rows": ROWS, "command": " ".join(sys.argv)}
    claim(out / "curve_settings.json", meta, "curve")
    heal_each("curve", base, plan, out, {r: ROWS[r] for r in args.rows.split(",")}, data=data, tokenizer=tok,
              probe_rows=probe_rows, probe_at=tuple(p / cfg.tokens for p in points), snapshots=True, **settings)
    return 0


def _curve_settings(out: Path) -> dict:
    """The curve's settings file (written by the heal phase); one line when there is none."""
    meta = read_json(out / "curve_settings.json")
    if meta is None:
        raise SystemExit(f"error: {out} holds no curve (run the heal phase first)")
    return meta


def _probe_rows(tok, meta: dict):
    """The held-out rows the curve's probes read (the same rows for every heal and evaluation of the curve)."""
    from layerboost.corpus import heldout_rows
    from layerboost.heal import HealConfig

    return heldout_rows(tok, meta["data"], meta["probe_tokens"], HealConfig(**meta["settings"]).seq_len)


def heal_budgets(args) -> int:
    import layerboost as lb
    from layerboost.heal import HealConfig

    out = Path(args.out)
    meta = _curve_settings(out)
    full = HealConfig(**meta["settings"]).tokens
    budgets = token_list(args.at)
    if not budgets or budgets[-1] >= full or budgets[0] <= 0:
        raise SystemExit(f"error: --at {args.at}: give budgets above 0 and below the curve's {full} tokens")
    rows = args.rows.split(",")
    for b in budgets:
        if b < HealConfig(**{**meta["settings"], "tokens": b}).seq_len:  # every budget checked before the model loads
            raise SystemExit(f"error: --at {args.at}: a budget of {b} tokens is less than one sequence; give more")
    base, tok = lb.load_model(meta["model"])
    plan = lb.LayerPlan.from_dict(meta["plan"])
    probe_rows = _probe_rows(tok, meta)
    for b in budgets:  # the curve's settings but the budget: its own warm-up, decay and stage split
        heal_each(f"budget {b}", base, plan, out / "budgets" / str(b), {r: ROWS[r] for r in rows}, data=meta["data"],
                  tokenizer=tok, probe_rows=probe_rows, probe_at=(1.0,), snapshots=True,
                  **{**meta["settings"], "tokens": b})
    return 0


def _complete_heals(out: Path, rows: list[str], settings: dict) -> list[tuple[str, Path, dict, dict]]:
    """Each finished complete heal (`budgets`): (name, snapshot, heal settings, its end probe); `settings` are
    the curve's, whose budget each heal replaces."""
    found = []
    for folder in sorted((out / "budgets").glob("*/*")):
        row, b = folder.name, folder.parent.name
        if row not in rows or not (folder / "heal.json").is_file():
            continue
        end = _probes(folder)[-1]
        found.append((f"{row}_complete_{end['tokens']}", folder / "heal_state" / "snapshots" /
                      f"{end['tokens']}.safetensors", {**settings, "tokens": int(b), **ROWS[row]}, end))
    return found


def measure_rates(args) -> int:
    """Tokens per second of each stage with the curve's settings: one short heal (--rate-steps optimiser steps
    per stage; the time from the end of each stage's 4th step to its last, so the first steps' warm-up is left
    out), written to rates.json."""
    import tempfile

    import layerboost as lb
    from layerboost.heal import HealConfig, heal

    out = Path(args.out)
    meta = _curve_settings(out)
    cfg = HealConfig(**meta["settings"])
    step = cfg.batch_size * cfg.seq_len
    settings = {**meta["settings"], "tokens": 2 * args.rate_steps * step, "attn_fraction": 0.5, "checkpoint_every": 0}
    base, tok = lb.load_model(meta["model"])
    with tempfile.TemporaryDirectory() as tmp:
        heal(base, lb.LayerPlan.from_dict(meta["plan"]), data=meta["data"], out=Path(tmp) / "h", tokenizer=tok,
             **settings)
        log = [json.loads(x) for x in (Path(tmp) / "h" / "heal_state" / "log.jsonl").read_text().splitlines()]
    rates = {}
    for stage in ("attn", "kd"):
        steps = [x for x in log if x.get("stage") == stage][3:]
        rates[stage] = (steps[-1]["tokens"] - steps[0]["tokens"]) / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"])
    record = {"tokens_per_s": rates, "steps_timed": {k: args.rate_steps - 4 for k in rates},
              "settings": settings, "command": " ".join(sys.argv), "threads": torch.get_num_threads(),
              "allocator": allocator(), "malloc_conf": os.environ.get("MALLOC_CONF")}
    write(out / "rates.json", record)
    print(json.dumps(record["tokens_per_s"]))
    return 0


def stage1_tokens(settings: dict, row: str) -> int:
    """The row's attention-transfer tokens (0 for no_attn): its points up to there are stage 1 alone."""
    from layerboost.heal import HealConfig

    return HealConfig(**settings, **ROWS[row]).stage_tokens["attn"]


def quiet_hours(tokens: int, stage1: int, rates: dict) -> float:
    """Training hours to `tokens` at the measured quiet rates: `stage1` tokens of stage 1, then stage 2."""
    return (min(tokens, stage1) / rates["attn"] + max(0, tokens - stage1) / rates["kd"]) / 3600


def evaluate_points(args) -> int:
    """WikiText-2 (every document) and accuracy on the evaluation partition (per item) of the base and of each row
    at --eval-at tokens; each (model, task) result is a file, so a killed evaluation resumes."""
    import layerboost as lb
    from layerboost.evaluate import Partition, perplexity_metrics, prepare_task, score_rolling
    from layerboost.quality import heldout_metrics
    from layerboost.util import parse_dtype
    from layerboost.workflows.compare import task_items

    out = Path(args.out)
    meta = _curve_settings(out)
    base, tok = lb.load_model(meta["model"])
    plan = lb.LayerPlan.from_dict(meta["plan"])
    part = Partition("evaluation", args.selection_size, 0)
    tasks = [prepare_task(tok, t, limit=args.limit, seed=0, partition=part,
                          per_stratum=args.mmlu_per_subject if t == "mmlu" else None) for t in args.tasks.split(",")]
    wiki = prepare_task(tok, "wikitext", limit=args.wikitext_docs, seed=0)
    # name -> (snapshot, heal settings, its probe, WikiText-2, accuracy); the base has no snapshot
    points = {"base": (None, None, None, True, True)}
    for row in args.rows.split(","):
        probes = {p["tokens"]: p for p in _probes(out / row)}
        wiki_at, acc_at = (set(_snapshot_tokens(out / row, at)) for at in (args.wikitext_at, args.eval_at))
        for t in sorted(wiki_at | acc_at):
            points[f"{row}_{t}"] = (out / row / "heal_state" / "snapshots" / f"{t}.safetensors",
                                    {**meta["settings"], **ROWS[row]}, probes[t], t in wiki_at, t in acc_at)
    for name, snap, settings, probe in _complete_heals(out, args.rows.split(","), meta["settings"]):
        points[name] = (snap, settings, probe, True, False)
    heldout = None  # the probes' held-out rows (read when a point needs them): the same rows, in float32
    for name, (snap, settings, probe, want_wiki, want_acc) in points.items():
        folder = out / "eval" / name
        todo = [p for p in tasks if want_acc and read_json(folder / f"{p.task.name}.json") is None]
        wiki_todo = want_wiki and _wikitext_missing(folder / "wikitext.json", args.wikitext_max_length)
        heldout_todo = snap is not None and read_json(folder / "heldout.json") is None
        if not todo and not wiki_todo and not heldout_todo:
            continue
        model = copy.deepcopy(base) if snap is None else model_at(base, plan, settings, snap)
        print(f"[curve] evaluating {name}", file=sys.stderr)
        if heldout_todo:  # the probe's held-out KL again, per row, for paired tests between the rows
            if heldout is None:
                heldout = _probe_rows(tok, meta)
            write(folder / "heldout.json", {**heldout_metrics(base, model.float(), heldout), "probe": probe})
        if wiki_todo:  # in float32, as the comparison measures it
            lls = score_rolling(model, tok, wiki.requests, max_length=args.wikitext_max_length, desc="wikitext")
            write(folder / "wikitext.json", {**perplexity_metrics(wiki.requests, lls), "doc_logliks": lls,
                                             "dtype": "float32", "max_length": args.wikitext_max_length})
        model = model.to(parse_dtype(args.accuracy_dtype))  # the comparison's accuracy pass runs in bfloat16
        for prep in todo:
            r = task_items(model, tok, prep, batch_size=32)
            write(folder / f"{prep.task.name}.json", {**r, "partition": part.to_dict(), "limit": args.limit,
                                                      "mmlu_per_subject": args.mmlu_per_subject if prep.task.name == "mmlu"
                                                      else None, "dtype": args.accuracy_dtype})
    return 0


def _wikitext_missing(path: Path, max_length: int | None) -> bool:
    """True when `path` holds no WikiText-2 result; an error when it holds one measured with other windows."""
    have = read_json(path)
    if have is not None and have.get("max_length") != max_length:
        raise SystemExit(f"error: {path} was measured with windows of {have.get('max_length') or 'the model context'} "
                         f"tokens, not --wikitext-max-length {max_length}: move it away or pass that length")
    return have is None


def _probes(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "heal_state" / "log.jsonl").read_text().splitlines() if '"probe"' in x]


def _snapshot_tokens(folder: Path, at: str) -> list[int]:
    """The probed token counts (snapshots) nearest each point of `at` ('last': the final one; 'all': every one)."""
    have = [p["tokens"] for p in _probes(folder) if p.get("snapshot")]
    if at.strip() == "all":
        return sorted(have)
    want = [max(have) if x.strip() == "last" else token_list(x)[0] for x in at.split(",") if x.strip()]
    return sorted({min(have, key=lambda t: abs(t - w)) for w in want if have})


def fit_gap(tokens: list[float], gaps: list[float]) -> dict:
    """Least squares of log(gap) = a - b log(tokens) (a power law of the quality gap), with the standard errors
    of a and b, and the tokens at which the gap reaches given levels (with a 95% interval from a and b's
    covariance, by sampling)."""
    import numpy as np

    x, y = np.log(np.asarray(tokens, float)), np.log(np.asarray(gaps, float))
    X = np.stack([np.ones_like(x), -x], 1)
    coef, res, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = max(1, len(x) - 2)
    s2 = float(((y - X @ coef) ** 2).sum()) / dof
    cov = s2 * np.linalg.inv(X.T @ X)
    return {"a": float(coef[0]), "b": float(coef[1]), "se_a": float(cov[0, 0] ** 0.5), "se_b": float(cov[1, 1] ** 0.5),
            "cov": cov.tolist(), "points": len(x), "dof": dof, "residual_sd": s2 ** 0.5,
            "data": [[float(t), float(g)] for t, g in zip(tokens, gaps)]}


def _crossing(a: float, b: float, gap: float) -> float | None:
    """Tokens at which a gap e^a T^-b reaches `gap`; None when b <= 0 or beyond float range (JSON has no inf)."""
    log_t = (a - math.log(gap)) / b if b > 0 else math.inf
    return math.exp(log_t) if log_t < 700 else None


def tokens_to(fit: dict, gap: float, draws: int = 20000) -> dict:
    """Tokens at which the fitted gap reaches `gap`: point estimate and a 95% interval from parameter draws.
    The draws are multivariate t with the fit's residual degrees of freedom (the residual variance is itself
    estimated from a few points: with 3 points, 1 degree of freedom, the interval is rightly wide). With 4 points
    or more, `leave_one_out` gives the crossing refitted without each point in turn (how much one point moves it)."""
    import numpy as np

    if fit["b"] <= 0:
        return {"tokens": None, "ci95": None}
    rng = np.random.default_rng(0)
    z = rng.multivariate_normal([0.0, 0.0], fit["cov"], size=draws)
    ab = np.array([fit["a"], fit["b"]]) + z * np.sqrt(fit["dof"] / rng.chisquare(fit["dof"], size=(draws, 1)))
    ok = ab[:, 1] > 0
    # a draw whose gap does not fall never crosses: infinitely many tokens (an unbounded end is None)
    with np.errstate(over="ignore"):  # a slope near 0 crosses beyond any float: inf, as it should
        t = np.sort(np.where(ok, np.exp((ab[:, 0] - np.log(gap)) / np.where(ok, ab[:, 1], 1.0)), np.inf))
    lo, hi = (float(t[min(draws - 1, int(q * draws))]) for q in (0.025, 0.975))
    out = {"tokens": _crossing(fit["a"], fit["b"], gap),
           "ci95": [lo if math.isfinite(lo) else None, hi if math.isfinite(hi) else None],
           "draws_with_b_above_0": float(ok.mean())}
    if len(fit.get("data", [])) >= 4:
        loo = []
        for i in range(len(fit["data"])):
            rest = fit["data"][:i] + fit["data"][i + 1:]
            f = fit_gap(*zip(*rest))
            loo.append({"left_out": fit["data"][i][0],
                        "tokens": _crossing(f["a"], f["b"], gap)})
        out["leave_one_out"] = loo
    return out


def ratio_law(points: list[tuple[int, float]]) -> dict | None:
    """The power law of log(ratio to the base) against tokens, fitted to the points above the base (None with
    fewer than 3); `tokens_to(law, log(x))` is then where the ratio reaches x."""
    usable = [(t, math.log(v)) for t, v in points if v > 1]
    return fit_gap(*zip(*usable)) if len(usable) >= 3 else None


LEVELS = (1.5, 1.3)  # the perplexity ratios to the base whose token counts are asked for


def crossing(points: list[tuple[int, float]], level: float) -> dict:
    """Where measured points first reach `level` (ratio <= level): the first such point and the last one before it."""
    first = next((t for t, v in points if v <= level), None)
    before = [t for t, v in points if v > level and (first is None or t < first)]
    return {"reached_by": first, "not_yet_at": before[-1] if before else None}


def report(args) -> int:
    """curve.json and curve.png from the probes and the evaluations; prints the table."""
    from layerboost.stats import mcnemar, paired_bootstrap
    from layerboost.workflows.compare import pooled_items

    out = Path(args.out)
    meta = _curve_settings(out)
    rows = [r for r in args.rows.split(",") if (out / r / "heal_state" / "log.jsonl").is_file()]
    curves = {r: _probes(out / r) for r in rows}
    evals = {p.name: {f.stem: json.loads(f.read_text()) for f in p.glob("*.json")}
             for p in sorted((out / "eval").glob("*")) if p.is_dir()} if (out / "eval").is_dir() else {}

    def items(e):  # (keys, correct, margin, task) of the tasks' items, pooled as the comparison pools them
        correct, margin, task, keys = pooled_items({"eval": {t: r for t, r in e.items()
                                                             if t not in ("wikitext", "heldout")}})
        return keys, correct, margin, task

    against = {}  # comparison rows (rows/<name>.json), each paired with every point over the same items
    for path in args.against or []:
        row_ = read_json(path)
        if row_ is None or "eval" not in row_:
            raise SystemExit(f"error: --against {path}: not a comparison row with accuracy items (rows/<name>.json)")
        against[f"comparison {row_['name']}"] = {**row_["eval"], **({"wikitext": row_["wikitext"]} if "wikitext" in row_
                                                                    else {})}
    tests = {}
    for name, e in evals.items():
        if name == "base" or "base" not in evals:
            continue
        others = [("base", evals["base"]), *against.items()]
        row, _, tok = name.rpartition("_")
        # attn against no_attn, a complete heal against its row's point along the long schedule, at the nearest
        # point (probes fall on step ends: 1000736 against 1000448)
        twin = "no_attn" if row == "attn" else row.removesuffix("_complete") if row.endswith("_complete") else None
        if twin:
            near = [n for n in evals if n.rpartition("_")[0] == twin
                    and abs(int(n.rpartition("_")[2]) - int(tok)) <= 0.01 * int(tok)]
            if near:
                n = min(near, key=lambda n: abs(int(n.rpartition("_")[2]) - int(tok)))
                others.append((n, evals[n]))
        for other, f in others:
            t = {}
            ka, ca, ma, ta = items(e)
            kb, cb, mb, _ = items(f)
            if ka and ka == kb:
                t.update(mcnemar=mcnemar(ca, cb), accuracy=paired_bootstrap(ca, cb, strata=ta),
                         margin=paired_bootstrap(ma, mb, strata=ta))
            if "heldout" in e and "heldout" in f:  # per held-out row: KL to the base (lower is better)
                t["heldout_kl_per_row"] = paired_bootstrap(e["heldout"]["kl_rows"], f["heldout"]["kl_rows"])
            if "wikitext" in e and "wikitext" in f and e["wikitext"].get("max_length") == f["wikitext"].get("max_length"):
                # per document: log-likelihood per word
                wa = e["wikitext"]["doc_logliks"]
                wb = f["wikitext"]["doc_logliks"]
                t["wikitext_loglik_per_doc"] = paired_bootstrap(wa, wb)
            tests[f"{name} vs {other}"] = t

    # the snapshot, merged into a model, gives the probe's held-out KL again (the heal probed its live adapters)
    checks = {n: {"heldout_kl": e["heldout"]["kl"], "probe_kl": e["heldout"]["probe"]["kl"],
                  "abs_diff": abs(e["heldout"]["kl"] - e["heldout"]["probe"]["kl"])}
              for n, e in evals.items() if "heldout" in e}
    fits, answers = {}, {}
    stage1 = {r: stage1_tokens(meta["settings"], r) for r in curves}
    base_wiki = evals.get("base", {}).get("wikitext", {}).get("word_perplexity")
    for r, pts in curves.items():
        local = stage1[r]
        # the law is fitted to stage-2 points only: attention transfer alone is another regime (its KL barely moves)
        series = {"held-out perplexity": [(p["tokens"], p["ppl"] / p["ppl_teacher"]) for p in pts if p["tokens"] > local]}
        if base_wiki:
            series["WikiText-2 word perplexity"] = sorted(
                (int(n.rpartition("_")[2]), e["wikitext"]["word_perplexity"] / base_wiki) for n, e in evals.items()
                if n.rpartition("_")[0] == r and "wikitext" in e and int(n.rpartition("_")[2]) > local)
        # complete heals (`budgets`) and the row's own end, when it finished: the law of tokens proper
        ends = {int(n.rpartition("_")[2]): e for n, e in evals.items() if n.rpartition("_")[0] == f"{r}_complete"}
        if ends and (out / r / "heal.json").is_file():
            last = pts[-1]
            ends[last["tokens"]] = {**evals.get(f"{r}_{last['tokens']}", {}), "heldout": {"probe": last}}
            series["held-out perplexity, complete heals"] = sorted(
                (t, e["heldout"]["probe"]["ppl"] / e["heldout"]["probe"]["ppl_teacher"]) for t, e in ends.items()
                if "heldout" in e)
            if base_wiki:
                series["WikiText-2 word perplexity, complete heals"] = sorted(
                    (t, e["wikitext"]["word_perplexity"] / base_wiki) for t, e in ends.items() if "wikitext" in e)
        answers[r] = {}
        for what, pts_ in series.items():
            a = answers[r][what] = {"x_base": pts_, **{f"{x}x": {"measured": crossing(pts_, x)} for x in LEVELS}}
            if (f := ratio_law(pts_)) is not None:
                fits[f"{r}: {what}, log of the ratio to the base"] = f
                for x in LEVELS:
                    a[f"{x}x"]["fit"] = tokens_to(f, math.log(x))
            else:
                a["fit"] = f"not fitted: {sum(v > 1 for _, v in pts_)} points above the base (3 needed)"
        kl = [(p["tokens"], p["kl"]) for p in pts if p["tokens"] > local]
        if len(kl) >= 3:
            fits[f"{r}: held-out KL"] = fit_gap(*zip(*kl))
    record = {"settings": meta, "curves": curves, "evaluations": {n: {t: {k: v for k, v in r.items() if k not in (
        "items", "doc_logliks")} for t, r in e.items()} for n, e in evals.items()}, "tests": tests, "fits": fits,
        "answers": answers, "snapshot_checks": checks}
    rates = read_json(out / "rates.json")
    hours = {r: [quiet_hours(p["tokens"], stage1[r], rates["tokens_per_s"]) if rates else p["train_s"] / 3600
                 for p in pts] for r, pts in curves.items()}
    record["hours"] = {"per_probe": hours, "from": "quiet rates (rates.json)" if rates else "wall clock of the heal",
                       "rates": rates}
    write(out / "curve.json", record)
    plot(curves, hours, "training hours at this CPU's quiet rate" if rates else
         "wall-clock training hours (cores shared; run `rate` for this CPU's)", evals, out / "curve.png",
         {r: next((fits[k], w) for w in ("WikiText-2 word perplexity, complete heals", "WikiText-2 word perplexity")
                 if (k := f"{r}: {w}, log of the ratio to the base") in fits)
         for r in curves if any(k.startswith(f"{r}: WikiText-2") for k in fits)})
    print(json.dumps({"answers": answers, "fits": {k: {x: v[x] for x in ("a", "b", "se_b", "points")}
                                                   for k, v in fits.items()}}, indent=1))
    if args.docs:
        import shutil

        Path(args.docs).mkdir(parents=True, exist_ok=True)
        for f in ("curve.json", "curve.png", "curve_settings.json", "rates.json"):
            if (out / f).is_file():
                shutil.copy(out / f, Path(args.docs) / f)
        for r in rows:  # every step and probe of each row's heal
            shutil.copy(out / r / "heal_state" / "log.jsonl", Path(args.docs) / f"{r}_log.jsonl")
    return 0


def plot(curves: dict, hours: dict, hours_label: str, evals: dict, path: Path, wiki_laws: dict | None = None) -> None:
    """KL against tokens and hours, WikiText-2 against tokens (complete heals at smaller budgets as open markers in
    the tokens panels);
    `wiki_laws` (row -> (ratio law, what it was fitted to)) are drawn dashed from the first fitted point to where
    the law reaches the lowest level in LEVELS."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    color = {}
    for r, pts in curves.items():
        tok = [p["tokens"] / 1e6 for p in pts]
        color[r] = axes[0].plot(tok, [p["kl"] for p in pts], marker="o", label=r)[0].get_color()
        axes[1].plot(hours[r], [p["kl"] for p in pts], marker="o", label=r, color=color[r])
        wk = sorted((int(n.rpartition("_")[2]) / 1e6, e["wikitext"]["word_perplexity"]) for n, e in evals.items()
                    if n.rpartition("_")[0] == r and "wikitext" in e)
        if wk:
            axes[2].plot(*zip(*wk), marker="s", label=r, color=color[r])
        for ax, key, value in ((axes[0], "heldout", "kl"), (axes[2], "wikitext", "word_perplexity")):
            done = sorted((int(n.rpartition("_")[2]) / 1e6, e[key][value]) for n, e in evals.items()
                          if n.rpartition("_")[0] == f"{r}_complete" and key in e)
            if done:
                ax.plot(*zip(*done), marker="o", ls="none", mfc="none", color=color[r],
                        label=f"{r}: complete heals at smaller budgets")
    right = last = max(p["tokens"] for pts in curves.values() for p in pts)
    if "base" in evals and "wikitext" in evals["base"]:
        base = evals["base"]["wikitext"]["word_perplexity"]
        axes[2].axhline(base, color="k", ls="--", label="base")
        for x in LEVELS:
            axes[2].axhline(x * base, color="grey", ls=":", lw=0.8)
            axes[2].annotate(f"{x}x base", (0.002, x * base), fontsize=7, color="grey", va="bottom")
        for r, (law, what) in (wiki_laws or {}).items():
            if law["b"] <= 0:
                continue
            # drawn to the lowest level, but at most 100x past the last point (a flat law never gets there)
            end = min(_crossing(law["a"], law["b"], math.log(min(LEVELS))) or math.inf, 100 * law["data"][-1][0])
            t = np.geomspace(law["data"][0][0], max(end, law["data"][-1][0]), 100)
            right = max(right, t[-1])
            axes[2].plot(t / 1e6, base * np.exp(np.exp(law["a"]) * t ** -law["b"]), ls="--", lw=1,
                         color=color.get(r), label=f"{r}: law fitted to its {what.partition(', ')[2] or 'points'}")
    axes[0].axhline(0, color="k", ls="--", lw=0.8)
    # each panel's legend where its lines are not: below the KL curves, at the top right of the hours panel
    for ax, x, y, where in zip(axes, ("healing tokens (millions)", hours_label, "healing tokens (millions)"),
                               ("held-out KL to the base (nats/token)", "held-out KL to the base (nats/token)",
                                "WikiText-2 word perplexity"),
                               ({"loc": "lower left", "bbox_to_anchor": (0.02, 0.1)}, {"loc": "upper right"}, {})):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False, **where)
    for ax in (axes[0], axes[2]):  # tokens: linear up to 50k (the 0 point), logarithmic above
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlim(0, 1.3 * (right if ax is axes[2] else last) / 1e6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=["heal", "budgets", "evaluate", "rate", "report"])
    ap.add_argument("--at", default=None, help="budgets: the complete heals' budgets, below the curve's (default "
                    "200k,500k,1M)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=None, help="training text (default: <data-dir>/corpus)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--tokens", default="2M")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--probe-at", default=PROBE_AT)
    ap.add_argument("--probe-tokens", type=int, default=16384, help="held-out tokens read at each probe")
    ap.add_argument("--eval-at", default="200k,1M,last", help="snapshots whose accuracy is scored (nearest probe; "
                    "last: the end; all: every one)")
    ap.add_argument("--wikitext-at", default="all", help="snapshots whose WikiText-2 perplexity is measured")
    ap.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,winogrande,mmlu")
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: the whole evaluation partition)")
    ap.add_argument("--mmlu-per-subject", type=int, default=20, help="MMLU items per subject (the comparison's)")
    ap.add_argument("--accuracy-dtype", default="bfloat16", help="weights in the multiple-choice pass (the comparison's)")
    ap.add_argument("--selection-size", type=int, default=100, help="documents per task the partition reserves")
    ap.add_argument("--wikitext-docs", type=int, default=None, help="WikiText-2 documents (default: all 62)")
    ap.add_argument("--wikitext-max-length", type=int, default=2048,
                    help="WikiText-2 rolling window in tokens (the comparison's 2048; 0: the model's context)")
    ap.add_argument("--rate-steps", type=int, default=40, help="rate: optimiser steps per stage")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/heal_curve")
    ap.add_argument("--docs", default=None, help="report: also copy curve.json / curve.png here")
    ap.add_argument("--against", nargs="*", help="report: comparison rows (rows/<name>.json) to pair every point with, "
                    "e.g. the same plan healed 200k tokens")
    ap.add_argument("--smoke", action="store_true", help="tiny budget (4k tokens, 512 probe tokens)")
    args = ap.parse_args()
    args.wikitext_max_length = args.wikitext_max_length or None
    if args.smoke:
        args.tokens, args.probe_tokens, args.probe_at, args.eval_at = "4096", 512, "0,1024,2048,3072", "1024,2048,last"
        args.limit, args.wikitext_docs, args.rate_steps = args.limit or 8, args.wikitext_docs or 1, 6
        args.mmlu_per_subject, args.wikitext_max_length = 1, 128
        args.at = args.at or "1024,3072"
    args.at = args.at or "200k,500k,1M"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase == "heal":
        return heal_rows(args)
    if args.phase == "budgets":
        return heal_budgets(args)
    if args.phase == "evaluate":
        return evaluate_points(args)
    if args.phase == "rate":
        return measure_rates(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
