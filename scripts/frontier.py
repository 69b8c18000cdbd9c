"""The quality-speed frontier (issue 35): plans chosen by a target speed beside fixed families, each healed the same
budget, then measured. Resumable phase by phase and row by row; rerun the same phase to continue.

    python scripts/frontier.py plans --sensitivity S.json --out runs/frontier      # the rows' plan files
    python scripts/frontier.py heal --out runs/frontier [--rows a,b]                # heal each row in turn (resumes)
    python scripts/frontier.py status --out runs/frontier

Rows: the planner's picks at 1.3 / 1.5 / 1.7 / 1.9x predicted llama.cpp decode at 4,096 tokens (patched build) and
1.5x for stock llama.cpp, and fixed families placed by the one-shot KL proxy of the same analysis (the ranking every
earlier plan used): 10/10/10 at windows 64 / 256 / 1024, softmax + swa (10/20 w256, 5/25 w512), softmax + none
(20/10, 15/15), and the LLM-Drop layout (10 none by the cosine proxy, 20 softmax). Layer 0 keeps softmax in every
family (llama.cpp reads head sizes there). Every row is healed with the same settings (HEAL below).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from layerboost import speed as S
from layerboost.models import model_config
from layerboost.plan import LayerPlan, PlanPolicy, make_plan, plan_by_target
from layerboost.sensitivity import load_sensitivity

MODEL = "smollm2-135m"
CONTEXT = 4096
TOKENS = "200k"
# 2048-token rows: a window of up to 1024 differs from softmax on half of every row; bf16 weights and autocast
# (measured harmless: +0.0006 KL at 200k tokens, 1.8x faster, docs/experiments/healing.md)
HEAL = ["--tokens", TOKENS, "--seq-len", "2048", "--batch-size", "1", "--precision", "bf16",
        "--weights-dtype", "bfloat16", "--seed", "0", "--checkpoint-every", "10"]
PICKS = {"pick-1.3": (1.3, "patched"), "pick-1.5": (1.5, "patched"), "pick-1.7": (1.7, "patched"),
         "pick-1.9": (1.9, "patched"), "pick-1.5-stock": (1.5, "stock")}
FAMILIES = {  # name -> (softmax, swa, none, window, score the layers are ranked by)
    "third-w64": (10, 10, 10, 64, "kl"), "third-w256": (10, 10, 10, 256, "kl"), "third-w1024": (10, 10, 10, 1024, "kl"),
    "swa-10-20-w256": (10, 20, 0, 256, "kl"), "swa-5-25-w512": (5, 25, 0, 512, "kl"),
    "none-20-10": (20, 0, 10, 64, "kl"), "none-15-15": (15, 0, 15, 64, "kl"),
    "llm-drop": (20, 0, 10, 64, "cosine"),
}


def predicted_loss(plan: LayerPlan, costs: dict) -> float | None:
    """The planner's quality estimate of any plan: its layers' summed KL costs (None: a window not measured)."""
    total = 0.0
    for i, s in enumerate(plan.layers):
        if s.kind == "softmax":
            continue
        key = "none" if s.kind == "none" else f"swa:{s.window}"
        if key not in costs:
            return None
        total += costs[key][i]
    return total


def make_plans(args) -> int:
    sens = load_sensitivity(args.sensitivity)
    config = model_config(MODEL)
    costs = sens["window_costs"]["kl"]
    speed = S.require(S.llama_cpp_key(config, "f32", 2), f"layerboost speed calibrate --model {MODEL}")
    base = LayerPlan.uniform("softmax", config.num_hidden_layers)
    out = Path(args.out) / "plans"
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, (target, build) in PICKS.items():
        pol = PlanPolicy("speed", speedup=target, context=CONTEXT, target="llama.cpp", build=build)
        rows[name] = (plan_by_target(costs, pol, speed, config=config)[0].plan, {"policy": "speed", "speedup": target,
                                                                                  "build": build})
    for name, (s, w, n, window, score) in FAMILIES.items():
        pol = PlanPolicy("counts", softmax=s, swa=w, none=n, window=window, target="llama.cpp", ranking="one-shot",
                         score=score)
        rows[name] = (make_plan(pol, sens["proxies"][score], config),
                      {"policy": "counts", "counts": [s, w, n], "window": window, "ranking": f"one-shot {score}"})
    for name, (plan, how) in rows.items():
        path = out / f"{name}.json"
        pred = {"loss": predicted_loss(plan, costs), "speedup_4096": speed.speedup(plan, base, CONTEXT),
                "speedup_8192": speed.speedup(plan, base, 8192), "kv_4096": None}
        if path.exists() and LayerPlan.load(path) != plan:
            print(f"{path} holds another plan: kept (delete it to place the row again)", file=sys.stderr)
            continue
        plan.save(path, extra={"row": name, "how": how, "predicted": pred, "sensitivity": args.sensitivity})
        c = plan.counts()
        print(f"{name:<16} {c['softmax']:>2}/{c['swa']:>2}/{c['none']:>2} predicted {pred['speedup_4096']:.2f}x @4096 "
              f"loss {pred['loss']:.3f}")
    return 0


def heal(args) -> int:
    root = Path(args.out)
    names = args.rows.split(",") if args.rows else sorted(p.stem for p in (root / "plans").glob("*.json"))
    for name in names:
        folder = root / "heal" / name
        if (folder / "heal.json").exists():  # heal writes it last
            continue
        cmd = ["layerboost", "heal", "--model", MODEL, "--plan", str(root / "plans" / f"{name}.json"),
               "--data", args.data, "--out", str(folder), *HEAL, "--no-progress"]
        if folder.exists():  # a killed heal: continue from its last checkpoint (heal_state/)
            cmd.append("--resume")
        print(" ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode:
            print(f"{name}: heal failed", file=sys.stderr)
            return 1
    return 0


def status(args) -> int:
    root = Path(args.out)
    for p in sorted((root / "plans").glob("*.json")):
        d = json.loads(p.read_text())
        done = (root / "heal" / p.stem / "heal.json").exists()
        print(f"{p.stem:<16} predicted {d['predicted']['speedup_4096']:.2f}x loss {d['predicted']['loss']:.3f} "
              f"heal {'done' if done else 'pending'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("plans")
    p.add_argument("--sensitivity", required=True)
    p.add_argument("--out", required=True)
    h = sub.add_parser("heal")
    h.add_argument("--out", required=True)
    h.add_argument("--rows")
    h.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"))
    s = sub.add_parser("status")
    s.add_argument("--out", required=True)
    args = ap.parse_args()
    return {"plans": make_plans, "heal": heal, "status": status}[args.phase](args)


if __name__ == "__main__":
    raise SystemExit(main())
