"""The stage-2 learning-rate schedule for long budgets, chosen on a selection slice of held-out text.

Every arm heals the same plan and data order by logit distillation alone (so the whole budget is stage 2),
differing only in the peak learning rate and the shape after the warm-up. Quality is read on the selection
slice: held-out rows that follow the reported slice (the first --reported-tokens of held-out text, which the
curve and the comparison report on, are never read here). Paired bootstrap over the selection rows tests each
arm against the current default; the pick is the lowest-KL arm that beats the default by more than the
healing-seed spread with p < 0.05 (else the default), and is tested against the next-best arm too.

    heal     each arm to --tokens, probed on the selection slice along the way; resumes after a kill
    report   schedule.json and schedule.png, a printed table

    python scripts/heal_schedule.py heal --tokens 1M --out runs/heal_schedule      # hours: run in the background
    python scripts/heal_schedule.py report --out runs/heal_schedule --docs docs/heal-schedule-smollm2-135m \
        --curve runs/heal_curve                                                  # + the mid-schedule check
    python scripts/heal_schedule.py heal --tokens 1M --seed 1 --arms cosine_3e-3,linear_3e-3 \
        --out runs/heal_schedule_seed1                                           # the pick against the default, again
    python scripts/heal_schedule.py heal --smoke --out runs/heal_schedule_smoke    # tiny budget, proves it runs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import claim, heal_each, model_at, pattern_plan, write  # noqa: E402
from layerboost.util import read_json  # noqa: E402

DEFAULT_ARM = "cosine_3e-3"  # HealConfig's defaults
ARMS = {
    "cosine_3e-3": {"schedule": "cosine", "lr": 3e-3},
    "constant_3e-3": {"schedule": "constant", "lr": 3e-3},
    "linear_3e-3": {"schedule": "linear", "lr": 3e-3},
    "cosine_1e-3": {"schedule": "cosine", "lr": 1e-3},
}
SEED_SPREAD = 0.0004  # held-out KL across healing seeds (docs/experiments/comparison.md)


def choose(ends: dict, tests: dict, default: str = DEFAULT_ARM) -> str:
    """The lowest-KL arm whose KL per row beats the default's by more than SEED_SPREAD with p < 0.05, else the
    default. `ends[arm]["kl"]` is the arm's final KL, `tests[arm]` its paired test against the default."""
    wins = [a for a, t in tests.items() if t["diff"] < -SEED_SPREAD and t["p"] < 0.05]
    return min(wins, key=lambda a: ends[a]["kl"]) if wins else default


def selection_rows(tok, data: str, reported_tokens: int, tokens: int, seq_len: int) -> torch.Tensor:
    """Held-out rows after the reported slice: the first ceil(reported / seq_len) rows are skipped."""
    from layerboost.corpus import heldout_rows

    skip = -(-reported_tokens // seq_len)
    return heldout_rows(tok, data, skip * seq_len + tokens, seq_len)[skip:]


def heal_arms(args) -> int:
    import layerboost as lb
    from layerboost.data import default_data_dir
    from layerboost.heal import HealConfig

    data = args.data or str(default_data_dir() / "corpus")
    out = Path(args.out)
    settings = {"tokens": args.tokens, "attn_distill": False, "precision": "bf16", "weights_dtype": "bfloat16",
                "checkpoint_every": args.checkpoint_every}
    if args.seed:  # seed 0 is HealConfig's default, left out so that the first study's settings still match
        settings["seed"] = args.seed
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        raise SystemExit(f"error: unknown arm {', '.join(unknown)}; known: {', '.join(ARMS)}")
    arms = {a: ARMS[a] for a in args.arms.split(",")}
    for a in arms.values():
        HealConfig(**settings, **a)  # every arm's settings checked before the model loads
    base, tok = lb.load_model(args.model)
    plan = pattern_plan(base, args.window)
    rows = selection_rows(tok, data, args.reported_tokens, args.probe_tokens, args.seq_len)
    meta = {"model": args.model, "data": data, "plan": plan.to_dict(), "settings": settings, "arms": ARMS,
            "selection": {"skipped_reported_tokens": args.reported_tokens, "tokens": int(rows.numel()),
                          "seq_len": args.seq_len}, "probe_at": args.probe_at, "command": " ".join(sys.argv)}
    claim(out / "schedule_settings.json", meta, "study")
    heal_each("schedule", base, plan, out, arms, data=data, tokenizer=tok, probe_rows=rows,
              probe_at=tuple(float(x) for x in args.probe_at.split(",")), **settings)
    return 0


def report(args) -> int:
    """Each finished arm's end point re-measured per row on the selection slice (KL, agreement, perplexity), the
    paired tests against the default arm, the probes, the pick; schedule.json and schedule.png."""
    import layerboost as lb
    from layerboost.quality import heldout_metrics
    from layerboost.stats import paired_bootstrap

    out = Path(args.out)
    meta = read_json(out / "schedule_settings.json")
    if meta is None:
        raise SystemExit(f"error: {out} holds no study (run the heal phase first)")
    base, tok = lb.load_model(meta["model"])
    sel = meta["selection"]
    rows = selection_rows(tok, meta["data"], sel["skipped_reported_tokens"], sel["tokens"], sel["seq_len"])
    done = [a for a in meta["arms"] if (out / a / "heal.json").is_file()]
    ends, curves = {}, {}
    for a in done:
        f = out / a / "selection_end.json"
        if read_json(f) is None:
            model = lb.load(out / a).eval()
            write(f, heldout_metrics(base, model, rows))
        ends[a] = read_json(f)
        curves[a] = [json.loads(x) for x in (out / a / "heal_state" / "log.jsonl").read_text().splitlines()
                     if '"probe"' in x]
    tests = {a: paired_bootstrap(ends[a]["kl_rows"], ends[DEFAULT_ARM]["kl_rows"])
             for a in done if a != DEFAULT_ARM and DEFAULT_ARM in ends}
    mid = mid_schedule(args, base, rows, ends.get(DEFAULT_ARM), meta["settings"]["tokens"]) if args.curve else None
    pick = choose(ends, tests) if DEFAULT_ARM in ends else None
    rest = sorted((a for a in ends if a != pick), key=lambda a: ends[a]["kl"])
    runner_up = {"arm": rest[0], "vs": paired_bootstrap(ends[pick]["kl_rows"], ends[rest[0]]["kl_rows"])} \
        if pick and rest else None
    table = [{"arm": a, **meta["arms"][a], "kl": ends[a]["kl"], "agree": ends[a]["agree"], "ppl": ends[a]["ppl"],
              "train_s": curves[a][-1]["train_s"] if curves[a] else None,
              "probes": {p["tokens"]: round(p["kl"], 4) for p in curves[a]}, "vs_default": tests.get(a)} for a in done]
    record = {"settings": meta, "table": table, "pick": pick, "pick_vs_runner_up": runner_up, "default": DEFAULT_ARM,
              "selection_rows": int(rows.shape[0]), "mid_schedule": mid}
    write(out / "schedule.json", record)
    _plot(curves, out / "schedule.png")
    for r in table:
        t = r["vs_default"]
        vs = f"{t['diff']:+.4f} [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}] p={t['p']:.3g}" if t else "-"
        print(f"{r['arm']:>14}  KL {r['kl']:.4f}  agree {r['agree']:.3f}  ppl {r['ppl']:.2f}  vs default {vs}")
    rule = f"beats {DEFAULT_ARM} by more than {SEED_SPREAD} with p < 0.05"
    print("pick: none until the default arm has finished" if pick is None else
          f"pick: {pick} (the lowest-KL arm that {rule})" if pick != DEFAULT_ARM else
          f"pick: {DEFAULT_ARM}, the default: no arm {rule}")
    if runner_up:
        t = runner_up["vs"]
        print(f"pick vs the next-best arm {runner_up['arm']}: {t['diff']:+.4f} "
              f"[{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}] p={t['p']:.3g}")
    if mid:
        print(f"mid-schedule: {mid['row']} at {mid['tokens']} tokens KL {mid['kl']:.4f}"
              + (f", vs the complete default arm {mid['vs_default']['diff']:+.4f} p={mid['vs_default']['p']:.3g}"
                 if mid.get("vs_default") else ""))
    if args.docs:
        import shutil

        Path(args.docs).mkdir(parents=True, exist_ok=True)
        for f in ("schedule.json", "schedule.png", "schedule_settings.json"):
            shutil.copy(out / f, Path(args.docs) / f)
    return 0


def mid_schedule(args, base, rows, default_end: dict | None, budget) -> dict:
    """A curve row's snapshot nearest --curve-at (default: the study's budget; mid-way through the row's longer
    schedule) on the selection slice,
    paired against the default arm's complete heal of the same budget: how much a mid-schedule point
    overstates the KL a heal of that budget reaches."""
    import layerboost as lb
    from layerboost.corpus import parse_tokens
    from layerboost.quality import heldout_metrics
    from layerboost.stats import paired_bootstrap

    curve = Path(args.curve)
    meta = read_json(curve / "curve_settings.json")
    if meta is None:
        raise SystemExit(f"error: {curve} holds no curve")
    snaps = sorted(int(p.stem) for p in (curve / args.curve_row / "heal_state" / "snapshots").glob("*.safetensors"))
    want = parse_tokens(args.curve_at or budget)
    tokens = min(snaps, key=lambda t: abs(t - want)) if snaps else None
    if tokens is None or abs(tokens - want) > 0.01 * want:
        raise SystemExit(f"error: {curve}/{args.curve_row} has no snapshot within 1% of {want} tokens")
    settings = {**meta["settings"], **meta["rows"][args.curve_row]}
    model = model_at(base, lb.LayerPlan.from_dict(meta["plan"]),
                     settings, curve / args.curve_row / "heal_state" / "snapshots" / f"{tokens}.safetensors")
    m = heldout_metrics(base, model, rows)
    return {"row": args.curve_row, "tokens": tokens, "of": settings["tokens"], "kl": m["kl"], "agree": m["agree"],
            "ppl": m["ppl"], "vs_default": paired_bootstrap(m["kl_rows"], default_end["kl_rows"]) if default_end else None}


def _plot(curves: dict, path: Path) -> None:
    from layerboost.workflows.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=150)
    for a, pts in curves.items():
        ax.plot([p["tokens"] / 1e6 for p in pts], [p["kl"] for p in pts], marker="o", label=a)
    ax.set_xlabel("healing tokens (millions), logit distillation only")
    ax.set_ylabel("KL to the base on the selection slice (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=["heal", "report"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=None, help="training text (default: <data-dir>/corpus)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--tokens", default="1M")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="data order and LoRA init of every arm (a repeat of the "
                    "study with another seed goes in another --out)")
    ap.add_argument("--probe-at", default="0,0.1,0.25,0.5,0.75,1", help="fractions of the budget probed")
    ap.add_argument("--probe-tokens", type=int, default=16384, help="selection-slice tokens each probe reads")
    ap.add_argument("--reported-tokens", type=int, default=16384,
                    help="held-out tokens reported elsewhere (the curve, the comparison): skipped")
    ap.add_argument("--seq-len", type=int, default=512, help="held-out row length")
    ap.add_argument("--curve", default=None, help="report: a heal_curve.py folder whose --curve-row snapshot at "
                    "--curve-at is scored on the selection slice against the complete default arm")
    ap.add_argument("--curve-row", default="no_attn")
    ap.add_argument("--curve-at", default=None, help="default: the study's budget")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/heal_schedule")
    ap.add_argument("--docs", default=None, help="report: also copy schedule.json / .png here")
    ap.add_argument("--smoke", action="store_true", help="tiny budget (3k tokens, 1,024 probe tokens, 2 arms)")
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.probe_tokens, args.probe_at = "3072", 1024, "0,0.5,1"
        args.arms = "cosine_3e-3,constant_3e-3"
    if args.threads:
        torch.set_num_threads(args.threads)
    return heal_arms(args) if args.phase == "heal" else report(args)


if __name__ == "__main__":
    sys.exit(main())
