"""Continuous quality measures of a model against its base on held-out text.

Accuracy on a few hundred items cannot separate close models; these can:

    kl      mean KL(base || model) of next-token distributions per token
    agree   share of positions where both models' most likely next token is the same
    ppl     perplexity of the held-out text under the model (and `ppl_base` under the base)

Per-row values (`kl_rows`, `nll_rows`) are kept so two models can be compared with a paired test
over the same rows (`stats.paired_bootstrap`). The held-out rows come from `corpus.heldout_rows`:
text that neither healing nor calibration ever reads.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def heldout_metrics(base, model, rows: torch.Tensor, batch: int = 2, chunk: int = 1024) -> dict:
    """KL(base || model), argmax agreement and perplexities on `rows` (B, T) of held-out token ids.

    Returns:
        {"kl", "agree", "ppl", "ppl_base", "tokens", "kl_rows": per row, "nll_rows": per row (model)}.
    """
    dev = next(model.parameters()).device
    kl_rows, nll_rows, nll_base, agree, n = [], [], 0.0, 0, 0
    for mb in rows.split(batch):
        mb = mb.to(dev)
        zb = base(input_ids=mb, use_cache=False).logits
        zm = model(input_ids=mb, use_cache=False).logits if model is not base else zb
        for r in range(mb.shape[0]):
            kl_r, nll_r = 0.0, 0.0
            for a in range(0, mb.shape[1], chunk):
                lb = zb[r, a:a + chunk].float().log_softmax(-1)  # (C, V)
                lm = zm[r, a:a + chunk].float().log_softmax(-1)
                kl_r += (lb.exp() * (lb - lm)).sum().item()
                agree += (lb.argmax(-1) == lm.argmax(-1)).sum().item()
                tg = mb[r, a + 1:a + chunk + 1]  # next tokens; the last position has none
                k = tg.shape[0]
                nll_r -= lm[:k].gather(-1, tg[:, None]).sum().item()
                nll_base -= lb[:k].gather(-1, tg[:, None]).sum().item()
            kl_rows.append(kl_r / mb.shape[1])
            nll_rows.append(nll_r / (mb.shape[1] - 1))
            n += mb.shape[1]
    n_next = rows.shape[0] * (rows.shape[1] - 1)
    return {"kl": sum(kl_rows) / len(kl_rows), "agree": agree / n, "ppl": math.exp(sum(nll_rows) / len(nll_rows)),
            "ppl_base": math.exp(nll_base / n_next), "tokens": n, "kl_rows": kl_rows, "nll_rows": nll_rows}


__all__ = ["heldout_metrics"]
