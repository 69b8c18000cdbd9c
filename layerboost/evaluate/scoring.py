"""Scoring: log-likelihoods of every choice with each item's shared prefix run once (or naively, like
lm-eval), and rolling-window perplexity."""

from __future__ import annotations

import contextlib

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..compat import cache_argument, output_cache
from .requests import HFLMTokenizer, ItemScore, MCRequest, RollingRequest


def model_max_length(model, tokenizer=None, default: int = 2048) -> int:
    """lm-eval's `resolve_max_length`: config n_positions / max_position_embeddings / n_ctx, tokenizer, 2048."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml != int(1e30):  # transformers' VERY_LARGE_INTEGER means "unset"
        return int(mml)
    return default


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _accepts(model, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class _Choice:
    """One choice as scored: model input tokens, first scored logit position, target tokens."""

    slot: tuple[int, int]  # (request index, choice index)
    inp: list[int]
    first: int  # logit position that predicts the first continuation token
    targets: list[int]


def _choices_of(requests: Sequence[MCRequest], max_length: int) -> list[list[_Choice]]:
    out = []
    for ri, req in enumerate(requests):
        row = []
        for ci, (ctx, cont) in enumerate(zip(req.context_tokens, req.continuation_tokens)):
            if len(cont) > max_length:
                raise ValueError(f"{req.item.task} doc {req.item.doc_id}: continuation longer than the model's {max_length} tokens")
            full = list(ctx + cont)[-(max_length + 1) :]  # lm-eval: left-truncate to max_length + 1
            inp = full[:-1]
            row.append(_Choice((ri, ci), inp, len(inp) - len(cont), list(cont)))
        out.append(row)
    return out


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


@dataclass
class _Unit:
    """Choices of one item whose model inputs all start with `prefix` (at least one token)."""

    prefix: list[int]
    members: list[_Choice]

    @property
    def max_suffix(self) -> int:
        return max(len(m.inp) - len(self.prefix) for m in self.members)


def _units(choices: list[list[_Choice]]) -> list[_Unit]:
    units = []
    for row in choices:
        p = common_prefix_len([c.inp for c in row])
        if p == 0:  # choices differ from the first token: nothing to share
            units.extend(_Unit(c.inp, [c]) for c in row)
        else:
            units.append(_Unit(row[0].inp[:p], row))
    return units


@dataclass
class _Batch:
    """Units scored together.

    `single`: every member's input is the whole prefix (e.g. one-token MMLU answers), so one
    right-padded forward without cache scores them all (padding is after every scored position,
    so the causal mask already hides it). `shared`: the first `p` tokens (the shortest prefix in
    the batch) go through the model once per unit, then each member's remaining tokens run in one
    right-padded call on the cache repeated per member.
    """

    mode: str
    units: list[_Unit]
    p: int


def _slack(p: int) -> int:
    # how much longer than the batch's shortest a prefix may be: a little padding or repeated
    # prefix work buys bigger (much more efficient on CPU) matrix products
    return max(2, p // 8)


def _batches(units: list[_Unit], batch_size: int, max_tokens: int) -> list[_Batch]:
    """Group units of similar prefix length (and equal choice count), longest first, within a token budget."""
    batches = []
    single = sorted((u for u in units if u.max_suffix == 0), key=lambda u: -len(u.prefix))
    i = 0
    while i < len(single):
        top = len(single[i].prefix)  # longest in the batch: sets the padded width
        j = i + 1
        while j < len(single) and j - i < batch_size and (j - i + 1) * top <= max_tokens and top - len(single[j].prefix) <= _slack(top):
            j += 1
        batches.append(_Batch("single", single[i:j], top))
        i = j
    shared = sorted((u for u in units if u.max_suffix > 0), key=lambda u: (len(u.members), len(u.prefix)))
    i = 0
    while i < len(shared):
        k, p = len(shared[i].members), len(shared[i].prefix)  # shortest prefix: the shared part

        def width(u: _Unit) -> int:
            return len(u.prefix) - p + u.max_suffix

        s, j = width(shared[i]), i + 1
        while j < len(shared) and j - i < batch_size and len(shared[j].members) == k and len(shared[j].prefix) - p <= _slack(p):
            s2 = max(s, width(shared[j]))
            if (j - i + 1) * max(p, k * s2) > max_tokens:
                break
            s, j = s2, j + 1
        batches.append(_Batch("shared", shared[i:j], p))
        i = j
    batches.sort(key=lambda b: -max(len(m.inp) for u in b.units for m in u.members))  # longest first
    return batches


def _gather(logp: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """Sum of target log-probs over rows of `logp` [n, V] and whether each target is the argmax."""
    t = torch.tensor(targets, device=logp.device)
    ll = logp.gather(-1, t.unsqueeze(-1)).sum()
    greedy = bool((logp.argmax(-1) == t).all())
    return float(ll), greedy


class CacheUnsupportedError(RuntimeError):
    """The model's forward returns no KV cache that can be repeated across choices."""


def _forward_last(model, ids: torch.Tensor, keep: int, keep_arg: bool, **kwargs) -> tuple[torch.Tensor, object]:
    """Log-probs [B, keep, V] of the last `keep` positions, and the model output."""
    out = model(input_ids=ids, **({"logits_to_keep": keep} if keep_arg else {}), **kwargs)
    return F.log_softmax(out.logits[:, -keep:].float(), dim=-1), out


@torch.inference_mode()
def _score_batch(model, batch: _Batch, device, keep_arg: bool, cache_arg: bool) -> list[tuple[tuple[int, int], float, bool]]:
    p = batch.p
    results = []
    if batch.mode == "single":
        first = min(m.first for u in batch.units for m in u.members)
        keep = p - first  # logit positions first .. p-1 cover every row's scored positions
        ids = torch.tensor([u.prefix + [u.prefix[-1]] * (p - len(u.prefix)) for u in batch.units], device=device)
        logp, _ = _forward_last(model, ids, keep, keep_arg, use_cache=False)
        for b, u in enumerate(batch.units):
            for m in u.members:
                results.append((m.slot, *_gather(logp[b, m.first - first : len(m.inp) - first], m.targets)))
        return results
    k = len(batch.units[0].members)
    first = min(m.first for u in batch.units for m in u.members)
    keep = max(1, p - first)
    ids = torch.tensor([u.prefix[:p] for u in batch.units], device=device)
    logp1, out = _forward_last(model, ids, keep, keep_arg, use_cache=True)  # logit positions p-keep .. p-1
    cache = output_cache(out)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise CacheUnsupportedError(f"{type(model).__name__} returned no repeatable KV cache ({type(cache).__name__})")
    cache.batch_repeat_interleave(k)
    s = max(len(m.inp) - p for u in batch.units for m in u.members)
    rows = []
    for u in batch.units:
        for m in u.members:
            suf = m.inp[p:]
            rows.append(suf + [u.prefix[-1]] * (s - len(suf)))  # right padding: never attended by real tokens
    out2 = model(input_ids=torch.tensor(rows, device=device), use_cache=True, **cache_argument(cache_arg, cache))
    logp2 = F.log_softmax(out2.logits.float(), dim=-1)  # logit positions p .. p+s-1
    for b, u in enumerate(batch.units):
        for j, m in enumerate(u.members):
            end = len(m.inp)  # scored logit positions: m.first .. end-1
            parts = []
            if m.first < p:
                parts.append(logp1[b, m.first - (p - keep) : min(end, p) - (p - keep)])
            if end > p:
                parts.append(logp2[b * k + j, max(m.first, p) - p : end - p])
            logp = parts[0] if len(parts) == 1 else torch.cat(parts)
            results.append((m.slot, *_gather(logp, m.targets)))
    return results


@torch.inference_mode()
def _score_naive_batch(model, batch: list[_Choice], device) -> list[tuple[tuple[int, int], float, bool]]:
    width = max(len(c.inp) for c in batch)
    ids = torch.tensor([c.inp + [0] * (width - len(c.inp)) for c in batch], device=device)  # right padding, like lm-eval
    logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    return [(c.slot, *_gather(logp[i, c.first : len(c.inp)], c.targets)) for i, c in enumerate(batch)]


def score_requests(
    model,
    requests: Sequence[MCRequest],
    *,
    batch_size: int = 32,
    max_batch_tokens: int = 4096,
    method: str = "prefix",
    progress: bool = True,
    desc: str = "scoring",
) -> list[ItemScore]:
    """Log-likelihood of every choice of every request (lm-eval's `loglikelihood` semantics).

    Args:
        model: any Hugging Face causal LM (in eval mode).
        requests: from `encode_items` / `prepare_task`; can be reused across models.
        batch_size: most items per forward call.
        max_batch_tokens: most tokens per forward call (a single item may exceed it).
        method: `prefix` (shared prefix computed once, KV cache repeated for the choices) or
            `naive` (every choice scored on its own, as lm-eval does).
        progress: show a progress bar (items/s).
        desc: progress bar label.

    Returns:
        One `ItemScore` per request, in order.

    Raises:
        ValueError: unknown method, or a continuation longer than the model's context.
    """
    if method not in ("prefix", "naive"):
        raise ValueError(f"method must be 'prefix' or 'naive', not {method!r}")
    device = _model_device(model)
    choices = _choices_of(requests, model_max_length(model))
    remaining = [len(row) for row in choices]
    lls = [[0.0] * len(row) for row in choices]
    greedy = [[False] * len(row) for row in choices]
    bar = tqdm(total=len(requests), desc=desc, unit="item", disable=not progress, dynamic_ncols=True)

    def record(results):
        for (ri, ci), ll, g in results:
            lls[ri][ci], greedy[ri][ci] = ll, g
            remaining[ri] -= 1
            if remaining[ri] == 0:
                bar.update(1)

    try:
        if method == "prefix":
            keep_arg, cache_arg = _accepts(model, "logits_to_keep"), _accepts(model, "cache")
            batches = _batches(_units(choices), batch_size, max_batch_tokens)
            for i, batch in enumerate(batches):
                try:
                    record(_score_batch(model, batch, device, keep_arg, cache_arg))
                except CacheUnsupportedError as e:
                    warnings.warn(f"{e}; scoring the remaining choices one by one (slower)", stacklevel=2)
                    rest = [m for b in batches[i:] for u in b.units for m in u.members]
                    _run_naive(model, rest, device, batch_size, max_batch_tokens, record)
                    break
        else:
            _run_naive(model, [c for row in choices for c in row], device, batch_size, max_batch_tokens, record)
    finally:
        bar.close()
    return [ItemScore(tuple(a), tuple(g)) for a, g in zip(lls, greedy)]


def _run_naive(model, flat: list[_Choice], device, batch_size: int, max_tokens: int, record) -> None:
    flat = sorted(flat, key=lambda c: -len(c.inp))  # longest first, like lm-eval
    i = 0
    while i < len(flat):
        n = max(1, min(batch_size, max_tokens // len(flat[i].inp)))
        record(_score_naive_batch(model, flat[i : i + n], device))
        i += n


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[tuple[list[int], int]]:
    """lm-eval's disjoint rolling windows (`get_rolling_token_windows`, context_len=1).

    Args:
        tokens: the document's tokens (all are predicted).
        prefix_token: token that conditions the first prediction (BOS, else EOS).
        max_length: model context length.

    Returns:
        (model input, number of trailing positions scored) per window; the scored targets are
        the input shifted by one, ending with the window's last token.
    """
    windows, predicted, n = [], 0, len(tokens)
    if n == 0:
        return windows
    first = min(max_length, n)
    windows.append(([prefix_token] + list(tokens[:first]), first))
    predicted = first
    while predicted < n:
        pred_len = min(n - predicted, max_length)
        end = predicted + pred_len
        windows.append((list(tokens[max(0, end - max_length - 1) : end]), pred_len))
        predicted += pred_len
    return windows


@torch.inference_mode()
def score_rolling(
    model, tokenizer, requests: Sequence[RollingRequest], *, max_length: int | None = None, progress: bool = True, desc: str = "perplexity"
) -> list[float]:
    """Total log-likelihood of each document over lm-eval's rolling windows.

    Args:
        model: Hugging Face causal LM.
        tokenizer: its tokenizer (for the prefix token).
        requests: documents from `prepare_task` on a perplexity task.
        max_length: window length (default: lm-eval's, the model's max context).
        progress: show a progress bar.
        desc: progress bar label.

    Returns:
        Summed log-likelihood of every token of each document.
    """
    device = _model_device(model)
    max_length = max_length or model_max_length(model, tokenizer)
    prefix = HFLMTokenizer(tokenizer).prefix_token_id
    keep_arg = _accepts(model, "logits_to_keep")
    totals = []
    with _head_outside(model) as head:
        for req in tqdm(requests, desc=desc, unit="doc", disable=not progress, dynamic_ncols=True):
            total = 0.0
            for seq, n_pred in rolling_windows(req.tokens, prefix, max_length):
                ids = torch.tensor([seq[:-1]], device=device)
                kwargs = {"logits_to_keep": n_pred} if keep_arg else {}
                out = model(input_ids=ids, use_cache=False, **kwargs).logits[0, -n_pred:]
                targets = torch.tensor(seq[-n_pred:], device=device)
                for s in range(0, n_pred, 1024):  # the LM head and log-softmax in chunks bound memory on long windows
                    lp = F.log_softmax(head(out[s : s + 1024]).float(), dim=-1)
                    total += float(lp.gather(-1, targets[s : s + 1024, None]).sum())
            totals.append(total)
    return totals


@contextlib.contextmanager
def _head_outside(model):
    """Yield the function that turns the model's `.logits` output into logits. The LM head is taken out of the
    model for the duration (its input comes back as `.logits`, and is projected here 1,024 positions at a time):
    a whole window of logits is window x vocab floats, 34 GB for Gemma 3's 32k context and 262k vocabulary.
    Models that cap their logits (`final_logit_softcapping`) or have no swappable head keep their head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = next((n for n, m in model.named_children() if m is head), None) if head is not None else None
    if name is None or getattr(model.config, "final_logit_softcapping", None):
        yield lambda x: x
        return
    setattr(model, name, torch.nn.Identity())
    try:
        yield head
    finally:
        setattr(model, name, head)
