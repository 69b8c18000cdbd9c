"""How closely llama.cpp reproduces layerboost on each plan family: the numbers behind tests/test_gguf.py.

    python scripts/check_llama_cpp.py [--model DIR] > table.md

For SmolLM2-135M (base, softmax + none, softmax + swa, the default 10/10/10 plan; window 64) and Gemma 3 270M
with its local windows narrowed to 128 (f32 files, f32 cache): greedy tokens on 3 WikiText prompts (100 tokens
+ 60 new) and how many equal layerboost's, the largest log-probability difference over those tokens with flash
attention off and on, and perplexity on 8 chunks of 256 tokens in both engines. `--model DIR` adds a saved
hybrid (e.g. a run's healed model) as one more row, `--gguf FILE` its export made by the CLI.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

import layerboost as lb
from layerboost import LayerPlan
from layerboost.data import default_data_dir
from layerboost.engine import Engine
from layerboost.export_gguf import write_gguf
from layerboost.llama_cpp import perplexity, reference_perplexity, serve

PLANS = {"base": None, "softmax+none": ["softmax"] * 20 + ["none"] * 10, "softmax+swa": ["softmax", "swa"] * 15,
         "default 10/10/10": ["softmax", "swa", "none"] * 10}


def measure(name, model, tok, text: str, tmp: Path, prompt_len: int = 100, new: int = 60, gguf=None) -> str:
    path = Path(gguf) if gguf else write_gguf(model, tok, tmp / "m.gguf", "f32")
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 600][:3]
    prompts = [tok(line)["input_ids"][:prompt_len] for line in lines]
    eng = Engine(model, 1, prompt_len + new + 1)
    equal, total, gaps = 0, 0, {}
    for fa in ("off", "on"):
        worst = 0.0
        with serve(path, ctx=512, kv_type="f32", flash_attn=fa) as s:
            for ids in prompts:
                out = s.completion(ids, new, n_probs=1)
                theirs = out["tokens"]
                with torch.no_grad():
                    lp = torch.log_softmax(model(torch.tensor([ids + theirs])).logits[0].double(), -1)
                for i, cp in enumerate(out["completion_probabilities"]):
                    worst = max(worst, abs(cp["logprob"] - lp[len(ids) - 1 + i, theirs[i]].item()))
                if fa == "off":
                    ours = eng.generate(torch.tensor([ids]), new)[0, len(ids):].tolist()
                    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), new)
                    equal, total = equal + k, total + new
        gaps[fa] = worst
    f = tmp / "text.txt"
    f.write_text(text[:40000])
    ids = tok(f.read_text())["input_ids"]  # with the model's BOS in front, as llama-perplexity tokenizes
    bos = tok.bos_token_id if ids[:1] == [tok.bos_token_id] else None
    ours = reference_perplexity(model, ids, 256, 8, bos=bos)
    theirs = perplexity(path, f, 256, 8, kv_type="f32", flash_attn="off")
    if not gguf:
        path.unlink()
    return (f"| {name} | {equal}/{total} | {gaps['off']:.1e} | {gaps['on']:.1e} | {ours:.4f} | {theirs:.4f} | "
            f"{(theirs - ours) / ours:+.1e} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a saved hybrid folder to add as a row")
    ap.add_argument("--gguf", help="with --model: its f32 export written by `layerboost export --format gguf`")
    ap.add_argument("--skip-families", action="store_true")
    args = ap.parse_args()
    text = (default_data_dir() / "wikitext/wiki.test.raw").read_text()
    print("| model | greedy tokens equal (until the first difference) | max abs dlogprob, FA off | FA on | "
          "perplexity layerboost | llama.cpp | relative |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.skip_families:
            model, tok = lb.load_model("smollm2-135m")
            for name, kinds in PLANS.items():
                m = model if kinds is None else copy.deepcopy(model)
                if kinds is not None:
                    lb.convert(m, LayerPlan.from_kinds(kinds, window=64))
                print(measure(f"SmolLM2 {name}", m, tok, text, tmp), flush=True)
            del model
            g, gtok = lb.load_model("gemma3-270m")
            lb.convert(g, LayerPlan(tuple(lb.LayerSpec("swa", 128) if s.kind == "swa" else s
                                          for s in lb.plan.native_plan(g).layers)))
            print(measure("Gemma 3 270M, local windows 128", g, gtok, text, tmp, prompt_len=150, new=40), flush=True)
        if args.model:
            m, tok = lb.load_model(args.model)
            print(measure(f"`{args.model}`", m, tok, text, tmp, gguf=args.gguf), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
