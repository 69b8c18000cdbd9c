"""Time to quality of healing recipes: one plan, one data stream, one held-out text, each recipe in turn.

    current   the shipped recipe: attention transfer (attn_fraction of the budget), then LoRA logit distillation
    block     block-wise local distillation of every modified layer (block_fraction), then logit distillation
    NAME:k=v,...  any other recipe: HealConfig fields (and `tokens`, its own budget), e.g.
              --recipe block30:local=block,block_fraction=0.3  --recipe topk:kd_topk=64,teacher_cache=runs/tc
              `none_as=KIND` heals the plan with its `none` layers given another cacheless kind (how the
              removed `bias` and `linear` kinds were measured, docs/experiments/healing.md), e.g. --recipe x:none_as=KIND
              list values separate their items with `;`: --recipe attn_only:lora_targets=q_proj;k_proj;v_proj;o_proj

Every recipe heals a fresh copy of the same model (`heal(..., probe_rows=..., probe_at=...)`); its log.jsonl
holds held-out KL(base || student) per token, next-token agreement and perplexity at the probe points, with
`train_s` (seconds spent in training steps: probes, checkpoints and model saving excluded) and tokens. The
held-out rows come from `heldout_rows`: text that training never reads. Printed last (stdout; progress on
stderr): the time each recipe needs to reach the KL the current recipe reaches at its full budget
(interpolated linearly in log KL between probes) and the KL each reaches at equal times. Written to --out:
recipes.json (settings, environment, curves, summary) and recipes.png (KL and perplexity against time,
KL against tokens). A recipe whose folder already holds a finished heal is read back, a killed one resumes.

    python scripts/bench_heal_recipes.py --tokens 200k --out runs/heal_recipes   # the recipes table of docs/experiments/healing.md
    python scripts/bench_heal_recipes.py --smoke                                 # tiny budget, proves it runs
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

DEFAULT_RECIPES = {"current": {}, "block": {"local": "block", "block_fraction": 0.5}}
PROBE_AT = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def parse_recipe(text: str) -> tuple[str, dict]:
    """`name` (a default recipe) or `name:key=value,...` -> (name, options); values parsed as JSON when they can be."""
    name, _, rest = text.partition(":")
    if not rest:
        if name not in DEFAULT_RECIPES:
            raise SystemExit(f"unknown recipe {name!r}: give name:key=value,... or one of {', '.join(DEFAULT_RECIPES)}")
        return name, dict(DEFAULT_RECIPES[name])
    opts = {}
    for part in rest.split(","):
        k, eq, v = part.partition("=")
        if not eq:
            raise SystemExit(f"recipe {name!r}: {part!r} is not key=value")
        if ";" in v:  # a list: lora_targets=q_proj;v_proj
            opts[k.strip()] = [x for x in v.split(";") if x]
            continue
        try:
            opts[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            opts[k.strip()] = v
    return name, opts


def make_plan(spec: str, n_layers: int, window: int):
    from layerboost import LayerPlan

    if spec == "pattern":  # softmax, swa, none repeated: 10 / 10 / 10 on a 30-layer model
        return LayerPlan.from_kinds([("softmax", "swa", "none")[i % 3] for i in range(n_layers)], window=window)
    return LayerPlan.load(spec, num_layers=n_layers)


def recipe_plan(plan, none_as: str | None):
    """`plan` with its `none` layers given kind `none_as` (None: unchanged)."""
    from layerboost import LayerPlan, LayerSpec

    if none_as is None:
        return plan
    return LayerPlan(tuple(LayerSpec(none_as) if s.kind == "none" else s for s in plan.layers))


def curve(out: Path) -> tuple[list[dict], list[dict]]:
    """(probe points, training steps) of a heal folder's log."""
    lines = [json.loads(x) for x in (out / "heal_state" / "log.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("probe")], [x for x in lines if not x.get("probe")]


def time_to(points: list[dict], target: float) -> float | None:
    """Training seconds at which the probed KL first reaches `target` (linear in log KL between probes)."""
    for a, b in zip(points, points[1:]):
        if b["kl"] <= target:
            if a["kl"] <= target:
                return a["train_s"]
            f = (math.log(a["kl"]) - math.log(target)) / (math.log(a["kl"]) - math.log(b["kl"]))
            return a["train_s"] + f * (b["train_s"] - a["train_s"])
    return None


def kl_at(points: list[dict], t: float) -> float:
    """Probed KL at training time t (log-linear between probes; the last probe's KL after the run ended)."""
    for a, b in zip(points, points[1:]):
        if a["train_s"] <= t <= b["train_s"]:
            f = (t - a["train_s"]) / max(1e-9, b["train_s"] - a["train_s"])
            return math.exp(math.log(a["kl"]) + f * (math.log(b["kl"]) - math.log(a["kl"])))
    return points[-1]["kl"]


def stage_rates(steps: list[dict]) -> dict[str, float]:
    """Training tokens per second of each stage (from the step records' tokens and train_s)."""
    out, prev_t, prev_tok, stage = {}, 0.0, 0, None
    per: dict[str, list[float]] = {}
    for r in steps:
        if r["stage"] != stage:
            stage, prev_tok = r["stage"], 0
        per.setdefault(stage, [0, 0.0])
        per[stage][0] += r["tokens"] - prev_tok
        per[stage][1] += r["train_s"] - prev_t
        prev_t, prev_tok = r["train_s"], r["tokens"]
    for s, (tok, sec) in per.items():
        out[s] = tok / sec if sec > 0 else float("nan")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = plt.get_cmap("tab20").colors  # one colour per recipe (the default cycle repeats after 10)
    for k, (name, r) in enumerate(results.items()):
        pts = r["probes"]
        t = [p["train_s"] / 60 for p in pts]
        style = dict(color=colours[k % len(colours)], marker="os^D"[k // len(colours) % 4], label=name,
                     lw=2.2 if name == "current" else 1.2)
        axes[0].plot(t, [p["kl"] for p in pts], **style)
        axes[1].plot(t, [p["ppl"] for p in pts], **style)
        axes[2].plot([p["tokens"] / 1e3 for p in pts], [p["kl"] for p in pts], **style)
    for ax, (x, y) in zip(axes, [("training time (min)", "held-out KL (nats/token)"),
                                 ("training time (min)", "held-out perplexity"),
                                 ("tokens (thousands)", "held-out KL (nats/token)")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.suptitle("healing recipes: time to quality", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=None, help="training text (default: <data-dir>/corpus)")
    ap.add_argument("--plan", default="pattern", help="'pattern' (softmax, swa, none repeated) or a plan JSON")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--tokens", default="200k", help="budget of every recipe that does not set its own `tokens`")
    ap.add_argument("--recipe", action="append", help="NAME or NAME:key=value,... (repeat; default: current, block)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--probe-tokens", type=int, default=4096, help="held-out tokens read at each probe")
    ap.add_argument("--probe-at", default=",".join(map(str, PROBE_AT)), help="fractions of each budget to probe at")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/heal_recipes")
    ap.add_argument("--smoke", action="store_true", help="tiny budget (2k tokens, 512 probe tokens): proves it runs")
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.probe_tokens, args.probe_at = "2048", 512, "0,0.5,1"
        args.out = args.out if args.out != "runs/heal_recipes" else "runs/heal_recipes_smoke"
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import layerboost as lb
    from layerboost.corpus import heldout_rows
    from layerboost.data import default_data_dir
    from layerboost.heal import HealConfig, heal

    recipes = dict(parse_recipe(r) for r in (args.recipe or list(DEFAULT_RECIPES)))
    if "current" not in recipes:
        raise SystemExit("the recipes must include `current` (the KL to reach is the current recipe's)")
    for name, opts in recipes.items():  # every setting checked before the model loads
        HealConfig(**{"tokens": args.tokens, **{k: v for k, v in opts.items() if k != "none_as"}})
    data = args.data or str(default_data_dir() / "corpus")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, tok = lb.load_model(args.model)
    plan = make_plan(args.plan, base.config.num_hidden_layers, args.window)
    probe_rows = heldout_rows(tok, data, args.probe_tokens, args.seq_len)
    probe_at = tuple(float(x) for x in args.probe_at.split(","))
    print(f"[bench] {args.model} loaded in {time.perf_counter() - t0:.0f} s; plan {plan.counts()}; "
          f"{probe_rows.numel()} held-out tokens", file=sys.stderr)

    results = {}
    base_plan = plan
    for name, opts in recipes.items():
        folder = out / name
        opts = dict(opts)
        plan = recipe_plan(base_plan, opts.pop("none_as", None))
        settings = {"seq_len": args.seq_len, "batch_size": args.batch_size, "checkpoint_every": 20,
                    "tokens": args.tokens, **opts}
        state = folder / "heal_state" / "config.json"
        if state.is_file():  # a folder from an earlier run of this benchmark: only the same recipe may continue
            old = HealConfig.upgrade_key(json.loads(state.read_text()))
            new = json.loads(json.dumps(HealConfig(**settings).resume_key(data, plan, "")))
            if (old["config"], old["plan"], old["data"]) != (new["config"], new["plan"], new["data"]):
                raise SystemExit(f"{folder} holds recipe {name!r} with other settings, plan or data: use another --out")
        if not (folder / "heal.json").is_file():
            t1 = time.perf_counter()
            print(f"[bench] {name}: {settings}", file=sys.stderr)
            heal(copy.deepcopy(base), plan, data=data, out=folder, tokenizer=tok, resume=True, probe_rows=probe_rows,
                 probe_at=probe_at, **settings)
            print(f"[bench] {name}: done in {time.perf_counter() - t1:.0f} s (probes and saving included)", file=sys.stderr)
        summary = json.loads((folder / "heal.json").read_text())
        probes, steps = curve(folder)
        results[name] = {"settings": settings, "plan_kinds": plan.counts(), "stage_tokens": summary["stage_tokens"], "train_s": steps[-1]["train_s"],
                         "teacher_cache": summary.get("teacher_cache"), "stage_tokens_per_s": stage_rates(steps),
                         "probe_s": sum(p.get("probe_s", 0) for p in probes), "probes": probes}

    cur = results["current"]
    target = cur["probes"][-1]["kl"]
    t_cur = cur["train_s"]
    times = sorted({t_cur, *(r["train_s"] for r in results.values())})
    summary = {"target_kl": target, "current_train_s": t_cur, "recipes": {}}
    for name, r in results.items():
        t = time_to(r["probes"], target)
        summary["recipes"][name] = {
            "final_kl": r["probes"][-1]["kl"], "final_ppl": r["probes"][-1]["ppl"], "train_s": r["train_s"],
            "time_to_target_s": t, "time_ratio_vs_current": None if t is None else t / t_cur,
            "kl_at": {f"{s:.1f}s": kl_at(r["probes"], s) for s in times}}
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    record = {"schema_version": 1, "command": " ".join(sys.argv), "model": args.model, "data": data,
              "plan": base_plan.to_dict(), "probe_tokens": int(probe_rows.numel()), "probe_at": probe_at,
              "environment": env, "results": results, "summary": summary}
    (out / "recipes.json").write_text(json.dumps(record, indent=1))
    plot(results, out / "recipes.png")

    print(f"target: held-out KL {target:.4f} (current recipe at its full budget, {t_cur:.0f} s of training)")
    print(f"{'recipe':<16} {'tokens':>8} {'train s':>8} {'final KL':>9} {'ppl':>8} {'s to target':>12} {'x current':>9}  "
          + "  ".join(f"KL@{k}" for k in summary["recipes"]["current"]["kl_at"]))
    for name, s in summary["recipes"].items():
        tt = s["time_to_target_s"]
        print(f"{name:<16} {sum(results[name]['stage_tokens'].values()):>8} {s['train_s']:>8.0f} {s['final_kl']:>9.4f} "
              f"{s['final_ppl']:>8.2f} {'not reached' if tt is None else f'{tt:.0f}':>12} "
              f"{'-' if tt is None else format(s['time_ratio_vs_current'], '.2f'):>9}  "
              + "  ".join(f"{v:>{len(k) + 3}.4f}" for k, v in s["kl_at"].items()))
    rates = {n: {k: round(v, 1) for k, v in r["stage_tokens_per_s"].items()} for n, r in results.items()}
    print(f"training tokens/s by stage: {rates}")
    print(f"wrote {out / 'recipes.json'} and {out / 'recipes.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
