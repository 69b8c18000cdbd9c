"""Wall time of the sensitivity analysis with exact prefix reuse vs the naive full recompute.

Both runs score the same items on the same model in one process and must give identical
log-likelihoods; the ratio reuse/naive is printed last (goal: <= 0.55).

    python scripts/bench_sensitivity.py --model smollm2-135m --limit 10
"""

import argparse
import json
import platform
import time

import torch

import layerboost as lb
from layerboost.evaluate import prepare_tasks
from layerboost.sensitivity import items_from_tasks, layer_sensitivity


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,winogrande,mmlu")
    ap.add_argument("--limit", type=int, default=10, help="items per task")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = lb.load_model(args.model)
    items = items_from_tasks(prepare_tasks(tok, args.tasks.split(","), limit=args.limit, seed=0))
    times, results = {}, {}
    for mode in ("reuse", "naive"):
        t0 = time.perf_counter()
        results[mode] = layer_sensitivity(model, items, reuse_prefix=mode == "reuse", progress=True)
        times[mode] = time.perf_counter() - t0
    same = [r["loglikelihoods"] for r in results["reuse"]["layers"]] == [r["loglikelihoods"] for r in results["naive"]["layers"]]
    out = {"model": args.model, "tasks": args.tasks, "items": len(items), "tokens": results["reuse"]["n_tokens"],
           "layers": len(results["reuse"]["layers"]), "threads": args.threads, "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "seconds": times, "identical": same, "ratio": times["reuse"] / times["naive"]}
    if args.json:
        open(args.json, "w").write(json.dumps(out, indent=1))
    print(f"items {len(items)}, scored tokens {out['tokens']}, layers {out['layers']}, threads {args.threads}")
    print(f"naive  {times['naive']:.1f} s")
    print(f"reuse  {times['reuse']:.1f} s   identical log-likelihoods: {same}")
    print(f"ratio reuse/naive: {out['ratio']:.3f}")


if __name__ == "__main__":
    main()
