"""SmolLM2-135M as a softmax + swa hybrid (15 softmax / 15 swa, window 64, alternating), exported with
`--format transformers`, then generated from in a fresh process that never imports layerboost.

Prints layerboost's and plain transformers' greedy continuations of two prompts (the first runs past
the window) and whether the tokens are identical. About a minute on 2 CPU cores:

    OMP_NUM_THREADS=1 python scripts/export_smollm2.py [--out DIR]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import layerboost as lb

NEW_TOKENS = 40
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a screw press adapted from wine making. Within fifty years, "
    "presses were running in more than two hundred European cities, and the price of books fell sharply. "
    "Printers soon competed for authors, scholars and readers, and pamphlets spread news faster than ever "
    "before. The most important consequence of this change was",
    "The capital of France is",
]

# Runs in the fresh process: plain transformers only.
CHILD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = []
with torch.no_grad():
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        ids.append(model.generate(**enc, max_new_tokens=new, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist())
assert "layerboost" not in sys.modules
print(json.dumps({"class": type(model).__name__, "ids": ids}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="export folder to keep (default: a temporary folder, removed at the end)")
    args = ap.parse_args()
    if args.out:
        return 0 if check(Path(args.out)) else 1
    with tempfile.TemporaryDirectory() as tmp:
        return 0 if check(Path(tmp) / "smollm2-swa64-transformers") else 1


def check(out: Path) -> bool:
    t0 = time.perf_counter()
    model, tok = lb.load_model("smollm2-135m")
    plan = lb.LayerPlan.from_kinds(["softmax", "swa"] * 15, window=64)
    lb.convert(model, plan)
    lb.export(model, out, format="transformers", tokenizer=tok)
    print(f"exported to {out} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    ours = []
    with torch.no_grad():
        for p in PROMPTS:
            enc = tok(p, return_tensors="pt")
            out_ids = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
            ours.append(out_ids[0, enc["input_ids"].shape[1]:].tolist())
    res = subprocess.run([sys.executable, "-c", CHILD, str(out), json.dumps(PROMPTS), str(NEW_TOKENS)],
                         capture_output=True, text=True, check=True)
    theirs = json.loads(res.stdout.strip().splitlines()[-1])

    cfg = json.loads((out / "config.json").read_text())
    kinds = cfg["layer_types"]
    print(f"export: {theirs['class']}, sliding_window {cfg['sliding_window']}, "
          f"{kinds.count('sliding_attention')} sliding / {kinds.count('full_attention')} full layers")
    for p, a, b in zip(PROMPTS, ours, theirs["ids"]):
        print(f"\nprompt ({len(tok(p)['input_ids'])} tokens): {p[:60]}...")
        print(f"  layerboost         ({len(a)} tokens): {tok.decode(a)!r}")
        print(f"  plain transformers ({len(b)} tokens): {tok.decode(b)!r}")
    identical = ours == theirs["ids"]
    print(f"\nidentical: {identical}")
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return identical


if __name__ == "__main__":
    sys.exit(main())
