"""Measured KV-cache bytes of a base model and a hybrid after prefill + decode, next to the formula.

    python scripts/cache_bytes.py --model smollm2-135m --plan-kinds softmax,none,swa --window 64

The hybrid plan repeats --plan-kinds over the layers (softmax,none,swa on 30 layers = 10 of each).
Bytes per token = (bytes at the longest length - bytes at the shortest) / (length difference).
"""

import argparse
import copy

import torch

import layerboost as lb
from layerboost import HybridCache, LayerPlan, expected_cache_bytes


@torch.no_grad()
def measure(model, plan, length: int, decode: int = 4) -> int:
    ids = torch.randint(10, 1000, (1, length - decode), generator=torch.Generator().manual_seed(0))
    if plan is None:  # the unmodified model with transformers' own DynamicCache
        out = model(ids, use_cache=True)
        for t in range(decode):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
        return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
                   for l in out.cache.layers)
    out = model(ids, cache=HybridCache(plan), use_cache=True)
    for t in range(decode):
        out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
    assert out.cache.get_seq_length() == length
    return out.cache.nbytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--plan-kinds", default="softmax,none,swa")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--lengths", default="128,512,1024,2048")
    args = ap.parse_args()
    base, _ = lb.load_model(args.model)
    n = base.config.num_hidden_layers
    kinds = (args.plan_kinds.split(",") * n)[:n]
    plan = LayerPlan.from_kinds(kinds, window=args.window)
    hybrid = copy.deepcopy(base)
    lb.convert(hybrid, plan)
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"model {args.model}, {n} layers, plan {plan.counts()}, window {args.window}, fp32, batch 1")
    print(f"{'tokens':>7} {'base bytes':>12} {'hybrid bytes':>13} {'hybrid formula':>15} {'ratio':>6}")
    rows = []
    for L in lengths:
        b, h = measure(base, None, L), measure(hybrid, plan, L)
        f = expected_cache_bytes(plan, base.config, 1, L)
        rows.append((L, b, h))
        print(f"{L:>7} {b:>12,} {h:>13,} {f:>15,} {h / b:>6.3f}")
    (l0, b0, h0), (l1, b1, h1) = rows[0], rows[-1]
    print(f"bytes per token (marginal, {l0}->{l1}): base {(b1 - b0) / (l1 - l0):,.0f}, hybrid {(h1 - h0) / (l1 - l0):,.0f}")
    print(f"hybrid/base cache bytes at {l1} tokens: {h1 / b1:.3f}")


if __name__ == "__main__":
    main()
