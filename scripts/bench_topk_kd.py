"""What top-k logit distillation loses against the full distribution, on one batch of held-out text.

For the unhealed hybrid (default: the pattern plan softmax, swa, none repeated) against its base model:
the exact KL(base || hybrid) per token, the top-k grouped KL (`kd_topk=k`: the teacher's k most likely
tokens + one tail bucket), the teacher's mean tail mass, and the cosine between the top-k and the exact
gradient with respect to the student's final hidden states (the signal stage 2 backpropagates).

    python scripts/bench_topk_kd.py [--tokens 1024] [--k 16,64,256,1024]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--k", default="16,64,256,1024")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import layerboost as lb
    from layerboost.corpus import heldout_rows
    from layerboost.data import default_data_dir
    from layerboost.heal import HealConfig, build_hybrid
    from layerboost.heal.losses import _kd_chunks, _teacher_topk

    base, tok = lb.load_model(args.model)
    n = base.config.num_hidden_layers
    plan = lb.LayerPlan.from_kinds([("softmax", "swa", "none")[i % 3] for i in range(n)], window=64)
    rows = heldout_rows(tok, str(default_data_dir() / "corpus"), args.tokens, args.seq_len)
    h = build_hybrid(base, plan, HealConfig(tokens=1000))
    w, b = h.lm_head.weight, h.lm_head.bias
    with torch.no_grad():
        x, ctx = h.embed(rows)
        x0 = h.run(x, 0, h.prefix, ctx)
        with h.teacher():
            ht = h.decoder.norm(h.run(x0, h.prefix, n, ctx)).reshape(-1, w.shape[1])
        hs = h.decoder.norm(h.run(x0, h.prefix, n, ctx)).reshape(-1, w.shape[1])
        m = hs.shape[0]
        kl, _, g = _kd_chunks(hs, ht, None, w, b, 1.0, 0.0, m, m, 512)
        out = {"tokens": m, "exact_kl": kl.item() / m, "topk": {}}
        for k in map(int, args.k.split(",")):
            top = _teacher_topk(ht, w, b, 1.0, k, 512)
            kl_k, _, g_k = _kd_chunks(hs, top, None, w, b, 1.0, 0.0, m, m, 512)
            out["topk"][k] = {"kl": kl_k.item() / m, "kl_share": kl_k.item() / kl.item(),
                              "tail_mass": (1 - top[0].exp().sum(-1)).mean().item(),
                              "grad_cosine": torch.nn.functional.cosine_similarity(g_k.flatten(), g.flatten(), 0).item(),
                              "per_token_grad_cosine": torch.nn.functional.cosine_similarity(g_k, g, 1).mean().item()}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
