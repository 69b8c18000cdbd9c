"""The stages' steps and losses: attention transfer, block-wise local distillation, logit distillation
(exact or top-k, chunked, with an analytic gradient), and the held-out probe."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from ..compat import without_cache_kwargs
from ..surgery import decoder_parts
from ..teacher_cache import TeacherCache, boundary_name, topk_name
from .config import HealConfig
from .dist import Dist, all_reduce
from .student import Hybrid


def _autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def attn_step(h: Hybrid, ids: torch.Tensor, n_global: int, precision: str, scale: float = 1.0) -> torch.Tensor:
    """Stage 1 on one micro-batch: backward of sum over windowed layers of squared error / (L * N_global * D).

    Returns:
        the summed squared error per layer (L,) (detached), for logging.
    """
    record: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    last = max(h.windowed) + 1
    with torch.no_grad(), _autocast(ids.device, precision):
        x, ctx = h.embed(ids)
        x = h.run(x, 0, h.prefix, ctx)
        with h.teacher(record):
            h.run(x, h.prefix, last, ctx)  # only up to the last windowed layer: later layers give no target
    d = h.decoder.config.hidden_size
    sq = []
    loss = 0.0
    with _autocast(ids.device, precision):
        for i in h.windowed:
            inp, target = record[i]
            y = h.layers[i].self_attn(hidden_states=inp, **h.runner.layer_ctx(i, ctx))[0]
            err = (y.float() - target.float()).pow(2).sum()
            sq.append(err.detach())
            loss = loss + err / (len(h.windowed) * n_global * d)
    if loss.requires_grad:
        (loss * scale).backward()
    return torch.stack(sq)


def block_step(h: Hybrid, batches: list[tuple[torch.Tensor, list[int]]], precision: str, dist: Dist,
               scale: float = 1.0, cache: TeacherCache | None = None,
               n_real: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The block stage on one optimiser step's local micro-batches [(ids (B, T), stream rows)]: backward of
    mean_i sum ||block_i(x_i) - y_i||^2 / den_i, den_i = sum ||y_i - x_i||^2 over the step's global batch.

    The teacher targets of every micro-batch are gathered first (so den is known, and all-reduced across
    processes, before any backward); then each modified block runs on its teacher input and backpropagates
    on its own (one block's graph in memory at a time).

    Returns:
        (err (M,), den (M,)), fp32, detached, M = modified layers: this process's summed squared errors and
        the global normalisers; err / den is the relative error of each layer. Micro-batches from `n_real` on
        only pair up the processes' collectives: they count nowhere and backpropagate with weight 0.
    """
    n_real = len(batches) if n_real is None else n_real
    mods = h.modified
    need = sorted({j for i in mods for j in (i, i + 1)})  # layer boundaries: inputs and outputs
    dev = h.lm_head.weight.device
    den = torch.zeros(len(mods), device=dev)
    work = []
    for b, (ids, rows) in enumerate(batches):
        real = b < n_real
        with torch.no_grad(), _autocast(ids.device, precision):
            x, ctx = h.embed(ids)
            got = ([cache.load(boundary_name(j), rows, ids.shape[1], dev) for j in need]
                   if cache is not None and real else None)
            if got is not None and all(g is not None for g in got):
                tg = {j: g["h"] for j, g in zip(need, got)}
            else:
                tg = h.teacher_boundaries(h.run(x, 0, h.prefix, ctx), ctx, need)
                if cache is not None and real:
                    for j in need:
                        cache.save(boundary_name(j), rows, {"h": tg[j]})
            if real:
                den += torch.stack([(tg[i + 1].float() - tg[i].float()).pow(2).sum() for i in mods])
        work.append((ctx, tg, real))
    all_reduce(den, dist)
    err = torch.zeros(len(mods), device=dev)
    for ctx, tg, real in work:
        for k, i in enumerate(mods):
            with _autocast(dev, precision):
                out = h.layers[i](tg[i], **h.runner.layer_ctx(i, ctx))
            y = out[0] if isinstance(out, tuple) else out  # (B, T, D)
            e = (y.float() - tg[i + 1].float()).pow(2).sum()
            if e.requires_grad:
                (e * ((scale if real else 0.0) / (len(mods) * den[k]))).backward()
            if real:
                err[k] += e.detach()
    return err, den


def _topk_kl(zs_t: torch.Tensor, lse_s: torch.Tensor, logp: torch.Tensor, idx: torch.Tensor):
    """KL between the teacher's top-k + tail distribution and the student's grouped the same way, per position.

    Args:
        zs_t: student logits / tau (C, V) fp32; lse_s: their logsumexp (C, 1).
        logp, idx: the teacher's top-k log-probs at tau (C, k) and their token ids (C, k).

    Returns:
        (KL (C,), d KL / d zs_t (C, V)). With S the top-k, r = 1 - sum_S p the teacher's tail mass and
        q_tail = 1 - sum_S q the student's: KL = sum_S p log(p / q) + r log(r / q_tail), and the gradient is
        q - p~ with p~ = p on S and r q / q_tail elsewhere. k = V gives the exact KL and gradient.
    """
    ls = zs_t - lse_s  # student log-probs (C, V)
    p = logp.exp()  # (C, k)
    r = (1 - p.sum(-1, keepdim=True)).clamp_(min=0)  # (C, 1)
    if idx.shape[-1] == zs_t.shape[-1]:
        r.zero_()  # every token is in the top-k: 1 - sum p is rounding error, there is no tail
    tail = ls.scatter(-1, idx, float("-inf"))  # student log-probs outside the top-k
    lq_tail = tail.logsumexp(-1, keepdim=True)  # (C, 1); -inf when k = V
    kl = (p * (logp - ls.gather(-1, idx))).sum(-1, keepdim=True) + torch.xlogy(r, r)
    kl = kl - torch.where(r > 0, r * lq_tail, torch.zeros_like(r))
    g = ls.exp_().scatter_add_(-1, idx, -p)  # q - p on the top-k
    g -= tail.sub_(lq_tail.clamp(min=torch.finfo(tail.dtype).min)).exp_().mul_(r)  # - r q / q_tail elsewhere
    return kl.squeeze(-1), g


def _teacher_topk(ht: torch.Tensor, w: torch.Tensor, b, tau: float, k: int, chunk: int):
    """The teacher's top-k log-probs at tau (N, k) fp32 and token ids (N, k) int32, from final hidden states (N, D)."""
    vals, ids = [], []
    for a in range(0, ht.shape[0], chunk):
        zt = nn.functional.linear(ht[a:a + chunk], w, b).float()  # (C, V)
        if tau != 1.0:
            zt = zt.div_(tau)
        v, i = (zt - zt.logsumexp(-1, keepdim=True)).topk(k, dim=-1)
        vals.append(v)
        ids.append(i.int())
    return torch.cat(vals), torch.cat(ids)


def _kd_chunks(hs: torch.Tensor, ht: torch.Tensor, labels: torch.Tensor | None, w: torch.Tensor, b, tau: float,
               ce_weight: float, n_kl: int, n_ce: int, chunk: int):
    """KL(teacher || student) at temperature `tau` (+ CE) over positions in chunks, with its gradient.

    Args:
        hs, ht: final hidden states (N, D) of student (detached) and teacher; or ht = (log-probs (N, k), ids
            (N, k)), the teacher's top-k at tau: the KL of `_topk_kl` then.
        labels: (N,) next tokens, -100 where there is none; None when ce_weight == 0.
        w, b: lm_head weight (V, D) and bias (or None).
        n_kl, n_ce: global position counts that normalise the two terms.

    Returns:
        (sum of KL, sum of CE, d loss / d hs) with loss = tau^2 * sum KL / n_kl + ce_weight * sum CE / n_ce.
    """
    grad = torch.empty_like(hs)
    kl_sum = hs.new_zeros((), dtype=torch.float32)
    ce_sum = hs.new_zeros((), dtype=torch.float32)
    topk = isinstance(ht, tuple)
    for a in range(0, hs.shape[0], chunk):
        zs_low = nn.functional.linear(hs[a:a + chunk], w, b)  # (C, V), in the matmul's dtype
        if topk:
            zs = zs_low.float()
            zs_t = zs / tau if tau != 1.0 else zs
            kl, g = _topk_kl(zs_t, torch.logsumexp(zs_t, dim=-1, keepdim=True), ht[0][a:a + chunk],
                             ht[1][a:a + chunk].long())
            kl_sum += kl.sum()
            g.mul_(tau / n_kl)
        else:
            # fused log-softmaxes and row dot products: these (C, V) passes dominate the loop on a CPU
            zt = nn.functional.linear(ht[a:a + chunk], w, b)
            lt = torch.log_softmax(zt / tau if tau != 1.0 else zt, dim=-1, dtype=torch.float32)
            ls = torch.log_softmax(zs_low / tau if tau != 1.0 else zs_low, dim=-1, dtype=torch.float32)
            p_t = lt.exp()
            kl_sum += torch.linalg.vecdot(p_t, lt.sub_(ls)).sum()  # sum p_t (log p_t - log p_s)
            g = ls.exp_().sub_(p_t).mul_(tau / n_kl)  # d(tau^2 KL / n) / d logits
        if ce_weight > 0:
            lab = labels[a:a + chunk]
            ok = lab >= 0
            lp = torch.log_softmax(zs_low, dim=-1, dtype=torch.float32)  # at temperature 1
            ce_sum += (-lp.gather(-1, lab.clamp(min=0)[:, None]).squeeze(-1) * ok).sum()
            pg = lp.exp_()
            pg.scatter_add_(-1, lab.clamp(min=0)[:, None], -torch.ones_like(pg[:, :1]))
            g += pg.mul_(ok[:, None] * (ce_weight / n_ce))
        grad[a:a + chunk] = (g.to(w.dtype) @ w).to(hs.dtype)  # (C, D)
    return kl_sum, ce_sum, grad


def _kd_targets(h: Hybrid, x0: torch.Tensor, ctx: dict, cfg: HealConfig, rows: list[int] | None,
                cache: TeacherCache | None):
    """Stage 2's teacher side for one micro-batch (under no_grad): final normed hidden states (N, D), or with
    kd_topk the top-k (log-probs (N, k), ids (N, k)); read from `cache` when it holds every row, else computed
    (and stored)."""
    n_layers, (b, t, d) = len(h.layers), x0.shape
    name = topk_name(cfg.kd_topk, cfg.temperature) if cfg.kd_topk else boundary_name(n_layers)
    got = cache.load(name, rows, t, x0.device) if cache is not None else None
    if cfg.kd_topk and got is not None:
        return got["logp"].reshape(b * t, -1), got["idx"].reshape(b * t, -1)
    if got is not None:
        return h.decoder.norm(got["h"]).reshape(b * t, d)
    if cache is None and not cfg.kd_topk:
        with h.teacher():
            return h.decoder.norm(h.run(x0, h.prefix, n_layers, ctx)).reshape(b * t, d)
    last = h.teacher_boundaries(x0, ctx, [n_layers])[n_layers]  # (B, T, D)
    if not cfg.kd_topk:
        cache.save(name, rows, {"h": last})
        return h.decoder.norm(last).reshape(b * t, d)
    logp, idx = _teacher_topk(h.decoder.norm(last).reshape(b * t, d), h.lm_head.weight, h.lm_head.bias,
                              cfg.temperature, cfg.kd_topk, cfg.kl_chunk)
    if cache is not None:
        cache.save(name, rows, {"logp": logp.view(b, t, -1), "idx": idx.view(b, t, -1)})
    return logp, idx


def kd_step(h: Hybrid, ids: torch.Tensor, n_kl: int, n_ce: int, cfg: HealConfig, precision: str,
            scale: float = 1.0, rows: list[int] | None = None, cache: TeacherCache | None = None) -> torch.Tensor:
    """Stage 2 on one micro-batch: teacher pass (no grad) or cached targets, student pass, chunked KL; backward
    into the student. `rows`: the micro-batch's stream rows (the cache's keys).

    Returns:
        (sum KL, sum CE) over the micro-batch, detached.
    """
    with torch.no_grad(), _autocast(ids.device, precision):
        x, ctx = h.embed(ids)
        x0 = h.run(x, 0, h.prefix, ctx)  # shared by both
        ht = _kd_targets(h, x0, ctx, cfg, rows, cache)
    with _autocast(ids.device, precision):
        hs = h.decoder.norm(h.run(x0, h.prefix, len(h.layers), ctx))  # (B, T, D)
    labels = None
    if cfg.ce_weight > 0:
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        labels = labels.reshape(-1)
    d = hs.shape[-1]
    with torch.no_grad(), _autocast(ids.device, precision):  # the head's matmuls in `precision`, the KL in fp32
        kl, ce, grad = _kd_chunks(hs.detach().reshape(-1, d), ht, labels, h.lm_head.weight,
                                  h.lm_head.bias, cfg.temperature, cfg.ce_weight, n_kl, n_ce, cfg.kl_chunk)
    if hs.requires_grad:
        hs.backward((grad * scale).view_as(hs))
    return torch.stack([kl, ce])


# ---- held-out probes during healing ----------------------------------------------------------------


@torch.no_grad()
def probe(h: Hybrid, rows: torch.Tensor, precision: str = "fp32", batch: int = 4, chunk: int = 1024) -> dict:
    """Student vs teacher on held-out rows (B, T): mean KL(teacher || student) per token, next-token
    (argmax) agreement, and both perplexities of the text (positions 0..T-2 predicting 1..T-1)."""
    from ..quality import logprob_sums, next_tokens

    kl = agree = nll_s = nll_t = 0.0
    w, b = h.lm_head.weight, h.lm_head.bias
    for mb in rows.split(batch):
        mb = mb.to(w.device)
        with _autocast(mb.device, precision):
            x, ctx = h.embed(mb)
            x0 = h.run(x, 0, h.prefix, ctx)
            with h.teacher():
                ht = h.decoder.norm(h.run(x0, h.prefix, len(h.layers), ctx))
            hs = h.decoder.norm(h.run(x0, h.prefix, len(h.layers), ctx))
        d = hs.shape[-1]
        targets = next_tokens(mb).reshape(-1)
        hs, ht = hs.reshape(-1, d), ht.reshape(-1, d)
        for a in range(0, hs.shape[0], chunk):
            sums = logprob_sums(nn.functional.linear(ht[a:a + chunk], w, b).float().log_softmax(-1),  # (C, V)
                                nn.functional.linear(hs[a:a + chunk], w, b).float().log_softmax(-1), targets[a:a + chunk])
            kl, agree, nll_s, nll_t = (t + s for t, s in zip((kl, agree, nll_s, nll_t), sums))
    n, n_next = rows.numel(), rows.shape[0] * (rows.shape[1] - 1)
    return {"kl": kl / n, "agree": agree / n, "ppl": math.exp(nll_s / n_next), "ppl_teacher": math.exp(nll_t / n_next),
            "tokens_scored": n}


# ---- evaluation helpers (two separate models; for tests and reports) --------------------------------


@torch.no_grad()
def distill_kl(teacher: nn.Module, student: nn.Module, input_ids: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean per-token KL(teacher || student) of next-token distributions on `input_ids` (B, T)."""
    zt = teacher(input_ids=input_ids, use_cache=False).logits.float() / temperature
    zs = student(input_ids=input_ids, use_cache=False).logits.float() / temperature
    lt, ls = zt.log_softmax(-1), zs.log_softmax(-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean().item()


@torch.no_grad()
def attention_mse(teacher: nn.Module, student: nn.Module, input_ids: torch.Tensor, layers: list[int]) -> dict[int, float]:
    """MSE between student and teacher attention outputs at `layers`, each fed the teacher's layer input."""
    _, t_layers = decoder_parts(teacher)
    _, s_layers = decoder_parts(student)
    got: dict[int, tuple] = {}
    hooks = [t_layers[i].self_attn.register_forward_hook(
        lambda m, a, kw, out, i=i: got.__setitem__(i, (kw["hidden_states"], out[0], kw)), with_kwargs=True)
        for i in layers]
    try:
        teacher(input_ids=input_ids, use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
    out = {}
    for i in layers:
        x, y, kw = got[i]
        kw = {k: v for k, v in without_cache_kwargs(kw).items() if k != "hidden_states"}
        y_s = s_layers[i].self_attn(hidden_states=x, **kw)[0]
        out[i] = (y_s - y).pow(2).mean().item()
    return out
