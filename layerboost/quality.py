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


def logprob_sums(ref: torch.Tensor, model: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float, float]:
    """Sums over the positions of one chunk of log-probabilities (C, V), reference and model:
    KL(ref || model), argmax agreement, and the NLL of `targets` (C,) under the model and under the
    reference (positions whose target is -1, the last of a row, have no next token and are skipped)."""
    ok = targets >= 0
    tg = targets[ok][:, None]
    return ((ref.exp() * (ref - model)).sum().item(), (ref.argmax(-1) == model.argmax(-1)).sum().item(),
            -model[ok].gather(-1, tg).sum().item(), -ref[ok].gather(-1, tg).sum().item())


def next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """(..., T) ids -> (..., T) the token each position predicts, -1 at the last position."""
    return torch.cat([ids[..., 1:], torch.full_like(ids[..., :1], -1)], dim=-1)


@torch.no_grad()
def heldout_metrics(base, model, rows: torch.Tensor, batch: int = 2, chunk: int = 1024) -> dict:
    """KL(base || model), argmax agreement and perplexities on `rows` (B, T) of held-out token ids.

    Returns:
        {"kl", "agree", "ppl", "ppl_base", "tokens", "seq_len" (tokens per row), "kl_rows": per row,
        "nll_rows": per row (model)}.
    """
    dev = next(model.parameters()).device
    kl_rows, nll_rows, nll_base, agree, n = [], [], 0.0, 0, 0
    for mb in rows.split(batch):
        mb = mb.to(dev)
        zb = base(input_ids=mb, use_cache=False).logits
        zm = model(input_ids=mb, use_cache=False).logits if model is not base else zb
        targets = next_tokens(mb)
        for r in range(mb.shape[0]):
            kl_r, nll_r = 0.0, 0.0
            for a in range(0, mb.shape[1], chunk):
                kl, ag, nll_m, nll_b = logprob_sums(zb[r, a:a + chunk].float().log_softmax(-1),  # (C, V)
                                                    zm[r, a:a + chunk].float().log_softmax(-1), targets[r, a:a + chunk])
                kl_r, agree, nll_r, nll_base = kl_r + kl, agree + ag, nll_r + nll_m, nll_base + nll_b
            kl_rows.append(kl_r / mb.shape[1])
            nll_rows.append(nll_r / (mb.shape[1] - 1))
            n += mb.shape[1]
    n_next = rows.shape[0] * (rows.shape[1] - 1)
    return {"kl": sum(kl_rows) / len(kl_rows), "agree": agree / n, "ppl": math.exp(sum(nll_rows) / len(nll_rows)),
            "ppl_base": math.exp(nll_base / n_next), "tokens": n, "seq_len": rows.shape[1], "kl_rows": kl_rows,
            "nll_rows": nll_rows}


__all__ = ["heldout_metrics", "logprob_sums", "next_tokens"]
