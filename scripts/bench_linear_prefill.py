"""linear_swa prefill: the blocked form against the all-pairs form, side by side in one process.

Converts every layer of a model to `linear_swa` (LoLCATs' mix, window 64, feature dim 64 unless told)
and times one full-sequence forward pass (no cache, as WikiText-2 scoring and healing run) per
length, with the attention terms computed block by block (what `LinearSlidingWindowAttention` does
for a long prefill) and then all at once (the form it keeps for cached or padded calls). Prints each
time, the ratio all-pairs / blocked and the largest logit difference between the two. Not a test.

    python scripts/bench_linear_prefill.py --lengths 1024,2048,4096
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="1024,2048,4096", help="comma-separated sequence lengths")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--feature-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per form (the fastest is kept)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import layerboost as lb
    from layerboost.kinds import linear_swa as attention  # where the linear_swa forms live
    from layerboost.plan import LayerPlan, LayerSpec

    model = lb.load_model(args.model)[0]
    n = model.config.num_hidden_layers
    lb.convert(model, LayerPlan(tuple(LayerSpec("linear_swa", args.window, args.feature_dim, "lolcats") for _ in range(n))))
    blocked = attention._blocked_linear_swa

    def all_pairs(q, k, v, fq, fk, fw, fl, window, scaling):
        return attention._all_pairs_linear_swa(q, k, v, fq, fk, fw, fl, window, scaling)

    print(f"{args.model}, {n} x linear_swa(window {args.window}, feature dim {args.feature_dim}), fp32, "
          f"{args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("length | blocked s | all-pairs s | all-pairs / blocked | max |logit diff|")
    for length in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        times, logits = {}, {}
        with torch.no_grad():
            for name, fn in (("blocked", blocked), ("all_pairs", all_pairs)):
                attention._blocked_linear_swa = fn  # the forward calls it for every long prefill
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    out = model(ids).logits
                    best = min(best, time.perf_counter() - t0)
                times[name], logits[name] = best, out
        attention._blocked_linear_swa = blocked
        diff = (logits["blocked"] - logits["all_pairs"]).abs().max().item()
        print(f"{length} | {times['blocked']:.2f} | {times['all_pairs']:.2f} | "
              f"{times['all_pairs'] / times['blocked']:.2f}x | {diff:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
