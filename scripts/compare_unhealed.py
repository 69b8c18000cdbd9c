"""Held-out KL / agreement / perplexity of every comparison row's plan before any healing: minutes
instead of hours, the first look at whether layer selection beats the baselines.

    python scripts/compare_unhealed.py [CONFIG] [--then-compare]

Uses the comparison folder of CONFIG (default: the shipped `compare`), so the analysis is shared
with (and resumed by) `layerboost compare`; rows are stored as `unhealed_<row>`.
"""

import argparse
import sys

from layerboost.workflows.compare import CompareConfig, Comparison, row_plans


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="compare")
    ap.add_argument("--then-compare", action="store_true", help="continue with the full comparison afterwards")
    args = ap.parse_args()
    cfg = CompareConfig.load(args.config)
    c = Comparison(cfg, log=lambda m: print(m, flush=True))
    sens = c.analysis()
    plans = row_plans(cfg, sens, sens["n_layers"])
    results = {"base": c.row("base_heldout", None, None, "the original model", light=True)}
    for name, (plan, _, desc) in plans.items():
        if plan is None or isinstance(plan, str):
            continue
        key = name if name.startswith("random_s") else f"unhealed_{name}"
        results[key] = c.row(key, plan, None, desc.split(", healed")[0] + ", unhealed", light=True)
    for n, r in results.items():
        h = r["heldout"]
        print(f"{n:28s} KL {h['kl']:.4f}  agree {h['agree']:.3f}  ppl {h['ppl']:.2f}  (base ppl {h['ppl_base']:.2f})")
    if args.then_compare:
        print(f"comparison: {c.run()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
