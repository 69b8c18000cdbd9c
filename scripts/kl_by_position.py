"""Held-out KL(base || model) and NLL by token position: does a healed model hold up at long context?

Reads held-out text (`corpus.heldout_rows`, the blocks healing never reads) as rows of `--seq-len`
tokens, runs the base and each model over whole rows (no cache), and prints per position bucket the
mean KL(base || model) per token and the mean NLL of the next token, the base's NLL next to it. A
model healed on short sequences whose error grows with position shows it here. Not a test.

    python scripts/kl_by_position.py runs/compare-smollm2-135m/rows/lolcats/healed \
        runs/compare-smollm2-135m/rows/layerboost/healed --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model folders (e.g. a comparison row's healed/)")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None, help="the shared data folder (default: LAYERBOOST_DATA_DIR)")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens in all")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--buckets", default="0,64,256,512,1024,2048", help="bucket edges (token positions)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import layerboost as lb
    from layerboost.corpus import heldout_rows
    from layerboost.data import default_data_dir

    base, tok = lb.load_model(args.base)
    rows = heldout_rows(tok, Path(args.data_dir or default_data_dir()) / "corpus", args.tokens, seq_len=args.seq_len)
    edges = [int(x) for x in args.buckets.split(",")]
    buckets = [(a, min(b, args.seq_len - 1)) for a, b in zip(edges, edges[1:]) if a < args.seq_len - 1]

    def logprobs(model):
        with torch.no_grad():
            return [torch.log_softmax(model(r[None]).logits[0, :-1].float(), -1) for r in rows]

    def nll(lps):  # (positions,) mean over rows
        return -torch.stack([lp.gather(-1, r[1:, None])[:, 0] for lp, r in zip(lps, rows)]).mean(0)

    ref = logprobs(base)
    ref_nll = nll(ref)
    print(f"base {args.base}; {len(rows)} held-out rows x {args.seq_len} tokens; per bucket of positions "
          "[a, b): KL(base || model) nats/token, model NLL (base NLL)")
    print("model | " + " | ".join(f"[{a},{b})" for a, b in buckets))
    for path in args.models:
        lps = logprobs(lb.load_model(path)[0])
        kl = torch.stack([(p.exp() * (p - q)).sum(-1) for p, q in zip(ref, lps)]).mean(0)
        m_nll = nll(lps)
        print(f"{path} | " + " | ".join(f"KL {kl[a:b].mean():.3f}, NLL {m_nll[a:b].mean():.3f} ({ref_nll[a:b].mean():.3f})"
                                       for a, b in buckets), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
