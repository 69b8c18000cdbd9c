"""Each layer's part in long-context retrieval (`analyze --retrieval`), measured on trials that choose layers and
are never reported: the pass-key family at another seed than evaluation's, and facts placed in novel text outside
the held-out blocks (evaluate/retrieval.py, source "selection").

Two measures per layer, both in nats of the true key's log-likelihood (the answer tokens after the prompt), averaged
over the trials:

- `alone`: every layer windowed (swa at `window`) except this one, minus every layer windowed: how much of the
  answer this layer's global attention alone brings back. A hybrid keeps only a few global layers, so this is the
  regime its plan lives in; the planner keeps softmax in the layers that score highest
  (PlanPolicy.keep_retrieval).
- `drop`: the base minus the base with only this layer windowed. Retrieval is spread over several layers, so one
  windowed layer rarely costs much; reported beside `alone`, not planned by.

The hidden states entering layer i are carried forward once for each regime (all original, all windowed) and each
variant is finished from them, as the KL proxies do (about 2 x n_layers / 2 full forwards per trial).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..attention import build_attention
from ..plan import LayerSpec
from .items import LayerRunner
from .store import AnalysisError


def retrieval_rows(tokenizer, length: int, trials: int, seed: int, data_dir=None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, true key ids) of `trials` trials of each retrieval family at `length` tokens, selection text."""
    from ..evaluate.requests import encode_items
    from ..evaluate.retrieval import FAMILIES, retrieval_items

    rows = []
    for family in FAMILIES:
        items = retrieval_items(tokenizer, family, length, trials, seed, source="selection", data_dir=data_dir)
        for req in encode_items(tokenizer, items):
            rows.append((list(req.context_tokens[0]), list(req.continuation_tokens[0])))
    return rows


@torch.no_grad()
def retrieval_signal(model, tokenizer, *, length: int = 2048, trials: int = 8, window: int = 64, seed: int = 1,
                     data_dir=None, store=None, progress: bool = True, rows=None) -> dict:
    """Per layer, `alone` and `drop` (see the module docstring) on `trials` trials of each family at `length`
    tokens. `store` (a sensitivity Store): each layer's values are saved as it finishes and read back on a rerun;
    `rows`: (prompt ids, answer ids) pairs instead of the trials (tests).

    Raises:
        ValueError: seed 0 (it draws the reported pass-key trials), or a window the prompts do not exceed.
    """
    if seed == 0 and rows is None:
        raise ValueError("retrieval seed 0 draws the trials evaluation reports: choose layers with another seed (e.g. 1)")
    t0 = time.perf_counter()
    rows = rows if rows is not None else retrieval_rows(tokenizer, length, trials, seed, data_dir)
    if min(len(p) for p, _ in rows) <= window:
        raise ValueError(f"retrieval prompts of {length} tokens do not exceed the window {window}: a window only "
                         "differs from softmax past its width; use a longer --retrieval-len or a smaller window")
    runner = LayerRunner(model)
    n = len(runner.layers)
    original = [b.self_attn for b in runner.layers]
    windowed = [build_attention(m, LayerSpec("swa", window)) for m in original]

    def run(i, h, ctx, module):
        block = runner.layers[i]
        block.self_attn = module
        try:
            return runner.layer(i, h, ctx)
        finally:
            block.self_attn = original[i]

    def finish(h, ctx, start, mods, answer):
        for j in range(start, n):
            h = run(j, h, ctx, mods[j])
        t = h.shape[1]
        logp = torch.log_softmax(runner.logits(h[0, t - len(answer) - 1 : t - 1]).float(), dim=-1)
        return logp[torch.arange(len(answer)), torch.tensor(answer, device=logp.device)].sum().item()

    seqs = [(torch.tensor([p + a]), a) for p, a in rows]
    emb = [runner.embed(ids) for ids, _ in seqs]
    ctxs = [c for _, c in emb]
    base_ll = [finish(h, c, 0, original, a) for (h, c), (_, a) in zip(emb, seqs)]
    win_ll = [finish(h, c, 0, windowed, a) for (h, c), (_, a) in zip(emb, seqs)]
    h_base, h_win = [h for h, _ in emb], [h for h, _ in emb]
    done = {i: store.get(f"retrieval_{i}") for i in range(n)} if store is not None else {}
    out = {i: v for i, v in done.items() if v is not None}
    last = max((i for i in range(n) if i not in out), default=-1)
    for i in tqdm(range(last + 1), desc="retrieval signal", disable=not progress or last < 0, dynamic_ncols=True):
        if i not in out:
            alone = [finish(run(i, h, c, original[i]), c, i + 1, windowed, a) - w
                     for h, c, (_, a), w in zip(h_win, ctxs, seqs, win_ll)]
            drop = [b - finish(run(i, h, c, windowed[i]), c, i + 1, original, a)
                    for h, c, (_, a), b in zip(h_base, ctxs, seqs, base_ll)]
            out[i] = {"alone": alone, "drop": drop}
            if store is not None:
                store.put(f"retrieval_{i}", out[i])
        if i < last:
            h_base = [run(i, h, c, original[i]) for h, c in zip(h_base, ctxs)]
            h_win = [run(i, h, c, windowed[i]) for h, c in zip(h_win, ctxs)]

    def mean(v):
        return sum(v) / len(v)

    return {"length": length, "trials": trials, "window": window, "seed": seed, "source": "selection",
            "rows": len(rows), "base_ll": mean(base_ll), "windowed_ll": mean(win_ll),
            "alone": [mean(out[i]["alone"]) for i in range(n)], "drop": [mean(out[i]["drop"]) for i in range(n)],
            "per_row": {"base_ll": base_ll, "windowed_ll": win_ll, "alone": [out[i]["alone"] for i in range(n)],
                        "drop": [out[i]["drop"] for i in range(n)]},
            "seconds": time.perf_counter() - t0}


def retrieval_scores(sens: dict, policy) -> list[float] | None:
    """Per-layer retrieval scores (`alone`) for policy.keep_retrieval; None when the policy keeps none.

    Raises:
        AnalysisError: the policy keeps layers for retrieval, but the analysis measured no retrieval signal.
    """
    if not policy.keep_retrieval:
        return None
    if not sens.get("retrieval"):
        raise AnalysisError("keep_retrieval needs the retrieval signal: analyze with --retrieval (the same --out "
                            "resumes the analysis and adds it)")
    return sens["retrieval"]["alone"]
