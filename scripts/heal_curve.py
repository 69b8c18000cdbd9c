"""The tokens-to-quality curve of healing: the default plan healed to a long budget, with and without attention
distillation, probed along the way, then evaluated at chosen points and fitted.

    heal      each row heals a fresh copy of the model to --tokens; held-out KL, agreement and perplexity are
              probed (in fp32) at --probe-at tokens, where the trainable parameters are also saved
              (heal_state/snapshots/). A killed run resumes where its last checkpoint left it: rerun the command.
    evaluate  the base model and each row at --eval-at tokens (snapshots merged into the hybrid): WikiText-2
              perplexity (every document) and accuracy on the evaluation partition, with per-item records.
    report    curve.json, curve.png (quality against tokens and against training hours, both rows, the base
              line), the paired tests and a fitted law of the KL gap against tokens; printed as a table.

The rows (both the default recipe; everything else as `layerboost heal` defaults, except --precision):
    attn      attention transfer on 25% of the budget, then LoRA logit distillation
    no_attn   LoRA logit distillation on the whole budget (the paper's "w/o Attn. Distill.")

    python scripts/heal_curve.py heal --tokens 2M --out runs/heal_curve          # hours: run in the background
    python scripts/heal_curve.py evaluate --out runs/heal_curve --eval-at 200k,1M,2M
    python scripts/heal_curve.py report --out runs/heal_curve --docs docs/heal-curve-smollm2-135m
    python scripts/heal_curve.py heal --smoke --out runs/heal_curve_smoke       # tiny budget, proves it runs
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

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
    from layerboost.heal import HealConfig, heal

    data = args.data or str(default_data_dir() / "corpus")
    out = Path(args.out)
    settings = {"tokens": args.tokens, "precision": args.precision, "checkpoint_every": args.checkpoint_every}
    cfg = HealConfig(**settings)  # checked before the model loads
    points = token_list(args.probe_at, cfg.tokens)
    if cfg.tokens not in points:
        points.append(cfg.tokens)
    base, tok = lb.load_model(args.model)
    plan = lb.LayerPlan.from_kinds([("softmax", "swa", "none")[i % 3] for i in range(base.config.num_hidden_layers)],
                                   window=args.window)
    probe_rows = heldout_rows(tok, data, args.probe_tokens, cfg.seq_len)
    meta = {"model": args.model, "data": data, "plan": plan.to_dict(), "settings": settings, "probe_at": points,
            "probe_tokens": int(probe_rows.numel()), "rows": ROWS, "command": " ".join(sys.argv)}
    out.mkdir(parents=True, exist_ok=True)
    if (out / "curve_settings.json").is_file():
        old = json.loads((out / "curve_settings.json").read_text())
        if {k: v for k, v in old.items() if k != "command"} != {k: v for k, v in meta.items() if k != "command"}:
            raise SystemExit(f"error: {out} holds a curve with other settings; use another --out")
    (out / "curve_settings.json").write_text(json.dumps(meta, indent=1))
    for name in args.rows.split(","):
        folder = out / name
        if (folder / "heal.json").is_file():
            print(f"[curve] {name}: done", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        print(f"[curve] {name}: healing to {cfg.tokens} tokens", file=sys.stderr)
        heal(copy.deepcopy(base), plan, data=data, out=folder, tokenizer=tok, resume=True, probe_rows=probe_rows,
             probe_at=tuple(p / cfg.tokens for p in points), snapshots=True, **settings, **ROWS[name])
        print(f"[curve] {name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=["heal", "evaluate", "report"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=None, help="training text (default: <data-dir>/corpus)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--tokens", default="2M")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--probe-at", default=PROBE_AT)
    ap.add_argument("--probe-tokens", type=int, default=16384, help="held-out tokens read at each probe")
    ap.add_argument("--eval-at", default="200k,1M,2M")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/heal_curve")
    ap.add_argument("--docs", default=None, help="report: also copy curve.json / curve.png here")
    ap.add_argument("--smoke", action="store_true", help="tiny budget (4k tokens, 512 probe tokens)")
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.probe_tokens, args.probe_at, args.eval_at = "4096", 512, "0,2048", "2048,4096"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase == "heal":
        return heal_rows(args)
    raise SystemExit(f"error: phase {args.phase} is not written yet")


if __name__ == "__main__":
    sys.exit(main())
