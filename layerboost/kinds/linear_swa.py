"""linear_swa: softmax over the last `window` tokens plus Hedgehog linear attention over every older
token, one shared normaliser (LoLCATs-style); a fresh module is close to `swa`.

transformers side: `LinearWindowLayer`, the window plus an fp32 state (B, nh, F, hs) and normaliser (B, nh, F),
F = 2 * feature_dim. Engine: `LinearWindowKV`, the swa ring plus that state; each step first folds the key in
the slot about to be overwritten (position t - W) into the state (times 0 while t < W: no branch on t).
Its own parameters (trained and checkpointed by heal): the two feature maps and the per-head gate.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compat import allowed_mask, get_cache
from .common import DecodeShape, ProjectedAttention, attention_weight_elements, one_token_qkv, positions, repeat_kv
from .record import Kind
from .swa import WindowKV, WindowLayer, window_tokens

# How linear_swa weighs its two terms: "gate" scales the linear term by sigmoid(gate) (starts near
# swa); "lolcats" scales the window term by a learned sigmoid factor and leaves the linear term
# unscaled (LoLCATs' published setting).
LINEAR_MIXES = ("gate", "lolcats")


class HedgehogFeatureMap(nn.Module):
    """phi(x) = [softmax(x W_h), softmax(-x W_h)] per head (Hedgehog); W starts as identity."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        eye = torch.eye(head_dim, feature_dim)
        self.weight = nn.Parameter(eye.expand(num_heads, head_dim, feature_dim).clone())  # (nh, hs, F/2)
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, nh, n, hs) -> (B, nh, n, 2 * feature_dim), fp32"""
        z = torch.matmul(x.float(), self.weight.float()) + self.bias.float()
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


class LinearSlidingWindowAttention(ProjectedAttention):
    """Softmax over the last `window` tokens plus linear attention over all older ones.

    y_i = (a * sum_win e^(s_ij - m_i) v_j + g * phi(q_i) . sum_old phi(k_j) v_j)
          / (a * sum_win e^(s_ij - m_i) + g * phi(q_i) . sum_old phi(k_j))
    with m_i the row max over the window and (a, g) per head from `mix_factors()`:
      mix "gate" (default): a = 1, g = sigmoid(gate), gate starting at -4 (g ~ 0.018), so a fresh
          module is close to `swa` and older tokens can never outweigh the window much;
      mix "lolcats": a = sigmoid(gate), gate starting at 0 (a = 0.5), g = 1: LoLCATs' learned
          factor on the window term, the linear term unscaled.
    Keys leaving the window are folded into the cache's fp32 state, so decoding costs
    O(window + F) per token.
    """

    GATE_INIT = {"gate": -4.0, "lolcats": 0.0}
    OWN = ("feature_map_q", "feature_map_k", "gate")

    def __init__(self, orig: nn.Module, spec):
        super().__init__(orig, spec)
        nh = orig.config.num_attention_heads
        fdim = spec.feature_dim or self.head_dim
        dev = orig.q_proj.weight.device
        self.feature_map_q = HedgehogFeatureMap(nh, self.head_dim, fdim).to(dev)
        self.feature_map_k = HedgehogFeatureMap(nh, self.head_dim, fdim).to(dev)
        self.mix = spec.mix or "gate"
        self.gate = nn.Parameter(torch.full((nh,), self.GATE_INIT[self.mix], device=dev))

    def mix_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(window factor, linear factor), each (nh,) fp32: the weights of the two terms."""
        g = torch.sigmoid(self.gate.float())
        one = torch.ones_like(g)
        return (one, g) if self.mix == "gate" else (g, one)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        b, t, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states, position_embeddings)
        cache = get_cache(kwargs)
        layer = None
        if cache is not None:
            layer = cache.layers[self.layer_idx] if hasattr(cache, "layers") else None
            if not isinstance(layer, LinearWindowLayer):
                raise TypeError("linear_swa layers need a layerboost HybridCache")
            state, normalizer = layer.state, layer.normalizer  # keys folded before this call
            k, v = layer.update(k, v)
        else:
            state = normalizer = None
        n, groups = k.shape[-2], self.num_key_value_groups
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)  # (B, nh, n, hs)
        pad = allowed_mask(attention_mask, n)  # (B, 1, T, n) or None
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)  # (B, nh, T, F), (B, nh, n, F)
        fw, fl = (f[None, :, None, None] for f in self.mix_factors())
        # A long prefill with no cached keys and no padded key goes block by block in O(T * window)
        # memory; both forms give the same sums up to rounding (tested against each other).
        # (A mask whose last row lets the last query see every key has no padded key.)
        if n == t and t > 2 * self.window and (pad is None or bool(pad[:, :, -1].all())):
            num, den = _blocked_linear_swa(q, k, v, fq, fk, fw, fl, self.window, self.scaling)
        else:
            num, den = _all_pairs_linear_swa(q, k, v, fq, fk, fw, fl, self.window, self.scaling, pad)
        if state is not None:
            num = num + fl * torch.matmul(fq, state)
            den = den + fl * torch.matmul(fq, normalizer.unsqueeze(-1))
        y = (num / den).to(q.dtype)

        n_evict = n - self.window  # keys that have now left every future query's window
        if layer is not None and n_evict > 0:
            fk_old, v_old = fk[:, :, :n_evict], v[:, :, :n_evict].float()
            if pad is not None:  # padding keys never enter the state
                fk_old = fk_old * pad[:, :, -1, :n_evict, None]
            layer.fold(torch.matmul(fk_old.transpose(-1, -2), v_old), fk_old.sum(dim=-2))
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1)), None


def _all_pairs_linear_swa(q, k, v, fq, fk, fw, fl, window: int, scaling: float, pad=None):
    """linear_swa's numerator (B, nh, T, hs) and denominator (B, nh, T, 1), fp32, with every
    (query, key) pair's weight at once: O(T * n) memory. The new queries are the last T of the n keys
    (q: (B, nh, T, hs); k, v: (B, nh, n, hs), repeated to nh heads); `pad` (B, 1, T, n) or None."""
    qi, kj = positions(q.shape[-2], k.shape[-2], q.device)
    in_window = (kj <= qi) & (kj > qi - window)
    older = kj <= qi - window
    # Keep each query's own key so rows that are all padding never divide by zero.
    win_mask = in_window if pad is None else in_window & (pad | (kj == qi))
    old_mask = older if pad is None else older & pad
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scaling  # (B, nh, T, n)
    s = s.masked_fill(~win_mask, float("-inf"))
    a_win = torch.exp(s - s.amax(dim=-1, keepdim=True))
    a_old = torch.matmul(fq, fk.transpose(-1, -2)) * old_mask
    weights = fw * a_win + fl * a_old
    return torch.matmul(weights, v.float()), weights.sum(dim=-1, keepdim=True)


def _blocked_linear_swa(q, k, v, fq, fk, fw, fl, window: int, scaling: float):
    """linear_swa's numerator (B, nh, T, hs) and denominator (B, nh, T, 1), fp32, over blocks of
    `window` queries. A query at row r of block c sees, among the 2 * window keys of blocks c-1 and c
    (column j, at offset j - window from the block's start), window keys where r < j <= r + window
    and older keys where j <= r; every key of blocks <= c-2 is older and enters through a running
    sum of phi(k) v over blocks. q, k, v: (B, nh, T, hs) with keys already repeated to nh heads;
    no cached keys, no padding."""
    b, nh, t, hs = q.shape
    w = window
    c = -(-t // w)  # blocks; the tail is padded with zeros, which no real query can see (causal)

    def blocks(x):  # (B, nh, T, d) -> (B, nh, C, W, d)
        return F.pad(x, (0, 0, 0, c * w - t)).view(b, nh, c, w, x.shape[-1])

    def with_previous(x):  # (B, nh, C, W, d) -> (B, nh, C, 2W, d): block c-1 (zeros for c = 0), then c
        return torch.cat([F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1], x], dim=3)

    qb, fqb = blocks(q), blocks(fq)
    kb, vb, fkb = blocks(k), blocks(v.float()), blocks(fk)
    r = torch.arange(w, device=q.device)[:, None]
    j = torch.arange(2 * w, device=q.device)[None]
    first = torch.arange(c, device=q.device)[:, None, None] == 0  # block 0 has no block before it
    win_mask = (j > r) & (j <= r + w) & ~(first & (j < w))  # (C, W, 2W)
    old_mask = (j <= r) & ~first

    s = torch.matmul(qb, with_previous(kb).transpose(-1, -2)).float() * scaling  # (B, nh, C, W, 2W)
    s = s.masked_fill(~win_mask, float("-inf"))
    a_win = torch.exp(s - s.amax(dim=-1, keepdim=True))
    a_old = torch.matmul(fqb, with_previous(fkb).transpose(-1, -2)) * old_mask
    fw, fl = fw[..., None], fl[..., None]  # (1, nh, 1, 1, 1)
    weights = fw * a_win + fl * a_old
    num = torch.matmul(weights, with_previous(vb))  # (B, nh, C, W, hs)
    den = weights.sum(dim=-1, keepdim=True)
    # keys of blocks <= c-2: the running sum over blocks, shifted by two
    kv = torch.cumsum(torch.matmul(fkb.transpose(-1, -2), vb), dim=2)  # (B, nh, C, F, hs)
    z = torch.cumsum(fkb.sum(dim=3), dim=2)  # (B, nh, C, F)
    kv, z = F.pad(kv, (0, 0, 0, 0, 2, 0))[:, :, :c], F.pad(z, (0, 0, 2, 0))[:, :, :c]
    num = num + fl * torch.matmul(fqb, kv)
    den = den + fl * torch.matmul(fqb, z.unsqueeze(-1))
    return num.reshape(b, nh, c * w, hs)[:, :, :t], den.reshape(b, nh, c * w, 1)[:, :, :t]


class LinearWindowLayer(WindowLayer):
    """The window plus `state` (B, nh, F, hs) and `normalizer` (B, nh, F), fp32.

    The attention module folds the keys that leave the window into the state (`fold`).
    """

    TENSORS = ("keys", "values", "state", "normalizer")

    def __init__(self, window: int):
        super().__init__(window)
        self.state: torch.Tensor | None = None
        self.normalizer: torch.Tensor | None = None

    def fold(self, d_state: torch.Tensor, d_normalizer: torch.Tensor) -> None:
        if self.state is None:
            self.state, self.normalizer = d_state.float(), d_normalizer.float()
        else:
            self.state = self.state + d_state
            self.normalizer = self.normalizer + d_normalizer


class LinearWindowKV(WindowKV):
    """The engine's buffers: the swa ring plus the fp32 linear-attention state of every older token."""

    def __init__(self, spec, attn: LinearSlidingWindowAttention, shape: DecodeShape):
        super().__init__(spec, attn, shape)
        features = attn.feature_map_q.weight.shape[-1] * 2
        self.register_buffer("state", torch.zeros(shape.batch, shape.nh, features, shape.hs, dtype=torch.float32,
                                                  device=shape.device), persistent=False)
        self.register_buffer("normalizer", torch.zeros(shape.batch, shape.nh, features, dtype=torch.float32,
                                                       device=shape.device), persistent=False)

    def load(self, layer: LinearWindowLayer) -> None:
        super().load(layer)
        if layer.state is None:
            self.state.zero_()
            self.normalizer.zero_()
        else:
            self.state.copy_(layer.state)
            self.normalizer.copy_(layer.normalizer)

    def held_bytes(self, n_tokens: int) -> int:
        return super().held_bytes(n_tokens) + (self.state.numel() + self.normalizer.numel()) * 4

    def fold(self, attn: LinearSlidingWindowAttention, slot, pos) -> None:
        """Fold the key leaving the window (position t - W, still in `slot`) into the fp32 state.

        Done every step, times 0 while t < W (the slot then holds nothing, or a key still in the window).
        """
        leaving = (pos >= attn.window).float()  # (1,)
        groups = self.shape.groups
        k_old = repeat_kv(self.k.index_select(2, slot), groups)  # (B, nh, 1, hs)
        v_old = repeat_kv(self.v.index_select(2, slot), groups).float()
        fk = attn.feature_map_k(k_old) * leaving  # (B, nh, 1, F)
        self.state.add_(torch.matmul(fk.transpose(-1, -2), v_old))
        self.normalizer.add_(fk[:, :, 0])

    def attend(self, attn: LinearSlidingWindowAttention, q, mask) -> torch.Tensor:
        """LinearSlidingWindowAttention's formula for one query q (B, nh, 1, hs): the weighted window softmax
        over the ring + the linear state -> (B, 1, nh * hs)."""
        b, s_ = q.shape[0], self.shape
        qg = q.reshape(b, s_.nkv, s_.groups, s_.hs)  # (B, nkv, G, hs)
        s = torch.matmul(qg, self.k.transpose(-1, -2)).float() * attn.scaling  # (B, nkv, G, slots)
        s = s.masked_fill(~mask, float("-inf"))  # the slot just written is always visible: no empty row
        a = torch.exp(s - s.amax(dim=-1, keepdim=True))
        fw, fl = (f[None, :, None, None] for f in attn.mix_factors())  # (1, nh, 1, 1) each
        num = fw * torch.matmul(a, self.v.float()).view(b, s_.nh, 1, s_.hs)
        den = fw * a.sum(dim=-1).view(b, s_.nh, 1, 1)
        fq = attn.feature_map_q(q)  # (B, nh, 1, F)
        num = num + fl * torch.matmul(fq, self.state)
        den = den + fl * torch.matmul(fq, self.normalizer.unsqueeze(-1))
        return (num / den).to(q.dtype).view(b, 1, s_.nh * s_.hs)

    def step(self, attn, x, cos, sin, pos, valid, span: int) -> torch.Tensor:
        """The attention sublayer's output (B, 1, D) for x (B, 1, D) at position pos (1,)."""
        q, k, v = one_token_qkv(attn, x, cos, sin, self.shape)
        slot = pos % self.slots  # (1,)
        self.fold(attn, slot, pos)
        self.write(slot, k, v)
        return attn.o_proj(self.attend(attn, q, valid[: self.slots]))


def state_bytes(spec, heads: int, head_dim: int, context: int) -> int:
    """Once tokens have left the window: an fp32 state (features x head_dim) and normaliser (features) per head,
    with 2 * feature_dim features."""
    if context <= (spec.window or 0):
        return 0
    return 4 * heads * 2 * (spec.feature_dim or head_dim) * (head_dim + 1)


def weight_elements(spec, hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """The q/k/v/o projections plus the two feature maps."""
    features = 2 * heads * 2 * (spec.feature_dim or head_dim) * head_dim
    return attention_weight_elements(spec, hidden, heads, kv_heads, head_dim) + features


_NO_LINEAR = "no {} model has linear attention beside a window; re-plan those layers as "
KIND = Kind(
    "linear_swa", "window softmax plus Hedgehog linear attention over older tokens (LoLCATs)",
    module=LinearSlidingWindowAttention, cache="linear_window",
    cache_layer=lambda spec: LinearWindowLayer(spec.window), decode_buffers=LinearWindowKV,
    cached_tokens=window_tokens, weight_elements=weight_elements, state_bytes=state_bytes,
    options=("window", "feature_dim", "mix"), letter="L", colour="#9467bd",
    refusals=(("transformers", _NO_LINEAR.format("transformers") + "swa or softmax"),
              ("deci", _NO_LINEAR.format("deci") + "swa, softmax or none"),
              ("gguf", "llama.cpp has no linear attention beside a window; re-plan those layers as swa, softmax or none")),
)
