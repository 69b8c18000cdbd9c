"""Attention kinds. Each new module is built from the original attention module and reuses its
projections (q/k/v/o, and q_norm/k_norm on Qwen3), so checkpoint keys stay the same.

    softmax     the original module, untouched
    swa         softmax over the last `window` tokens (the token itself included)
    linear_swa  swa + linear attention over every older token, one shared normaliser (LoLCATs-style)
    none        no attention: the sublayer adds nothing and no q/k/v/o is computed

`none` caches nothing (an `EmptyLayer` only counts tokens). Each module that learns parameters of its
own names them in `OWN` (heal trains and checkpoints exactly those). A learned per-channel bias and a
low-rank linear map of the token's own state (DeciLM's replace_with_linear) heal no better than `none`
(docs/experiments/healing.md), so `none` is the one attention-free kind.

Shapes: B batch, T new tokens, n keys held (cached + new), nh query heads, nkv key/value heads,
hs head size, F linear-attention features.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import EmptyLayer, HybridCache, LinearWindowLayer
from .compat import allowed_mask, apply_rope, get_cache
from .kinds import kind
from .plan import LayerSpec


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, nkv, n, hs) -> (B, nkv * groups, n, hs)"""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _positions(t_new: int, n_keys: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key indices on one axis: the new tokens are the last `t_new` of the `n_keys`."""
    return torch.arange(n_keys - t_new, n_keys, device=device)[:, None], torch.arange(n_keys, device=device)[None]


class _ProjectedAttention(nn.Module):
    """Holds the original projections and computes RoPE'd q, k, v exactly as the original does."""

    def __init__(self, orig: nn.Module, spec: LayerSpec):
        super().__init__()
        self.config, self.layer_idx, self.spec = orig.config, orig.layer_idx, spec
        self.head_dim, self.scaling = orig.head_dim, orig.scaling
        self.num_key_value_groups = orig.num_key_value_groups
        self.is_causal = True
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = orig.q_proj, orig.k_proj, orig.v_proj, orig.o_proj
        self.q_norm = getattr(orig, "q_norm", None)  # Qwen3 normalises q and k per head before RoPE
        self.k_norm = getattr(orig, "k_norm", None)

    @property
    def window(self) -> int | None:
        return self.spec.window

    def qkv(self, hidden_states: torch.Tensor, position_embeddings):
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(b, t, -1, self.head_dim)
        v = self.v_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v  # (B, nh, T, hs), (B, nkv, T, hs), (B, nkv, T, hs)

    def extra_repr(self) -> str:
        return f"kind={self.spec.kind}, window={self.spec.window}, layer_idx={self.layer_idx}"


class SlidingWindowAttention(_ProjectedAttention):
    """Causal softmax attention over the last `window` tokens."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        b, t, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states, position_embeddings)
        cache = get_cache(kwargs)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # kept window + new: (B, nkv, n, hs)
        n = k.shape[-2]
        qi, kj = _positions(t, n, q.device)
        band = (kj <= qi) & (kj > qi - self.window)  # (T, n)
        pad = allowed_mask(attention_mask, n)  # (B, 1, T, n) or None
        # Keep each query's own key so rows that are all padding never softmax over nothing (NaN).
        allowed = band if pad is None else band & (pad | (kj == qi))
        y = F.scaled_dot_product_attention(
            q, repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups),
            attn_mask=allowed, scale=self.scaling,
        )  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1)), None


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


class LinearSlidingWindowAttention(_ProjectedAttention):
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

    def __init__(self, orig: nn.Module, spec: LayerSpec):
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
        layer = cache.layers[self.layer_idx] if isinstance(cache, HybridCache) else None
        if cache is not None:
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
    qi, kj = _positions(q.shape[-2], k.shape[-2], q.device)
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


class NoAttention(nn.Module):
    """The attention sublayer removed: returns zeros (a stride-0 view, no memory) and computes nothing."""

    OWN: tuple[str, ...] = ()

    def __init__(self, orig: nn.Module, spec: LayerSpec):
        super().__init__()
        self.layer_idx, self.spec = orig.layer_idx, spec

    def forward(self, hidden_states, **kwargs):
        cache = get_cache(kwargs)
        if cache is not None:
            layer = cache.layers[self.layer_idx]
            if not isinstance(layer, EmptyLayer):
                raise TypeError("attention-free layers need a layerboost HybridCache")
            layer.advance(hidden_states.shape[1])
        return self.decode(hidden_states), None

    def decode(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The sublayer's output for (B, T, D) inputs with no cache and no kwargs (what a decode engine calls)."""
        return hidden_states.new_zeros(()).expand_as(hidden_states)

    def extra_repr(self) -> str:
        return f"kind={self.spec.kind}, layer_idx={self.layer_idx}"


def build_attention(orig: nn.Module, spec: LayerSpec) -> nn.Module:
    """The module for `spec` (the class its `kinds` record names), built from the original attention `orig`.

    Raises:
        KeyError: unknown kind (the message lists the known ones).
    """
    cls = kind(spec.kind).module_class()
    return orig if cls is None else cls(orig, spec)


def attention_kind(module: nn.Module) -> str:
    spec = getattr(module, "spec", None)
    return spec.kind if spec is not None else "softmax"


__all__ = [
    "HedgehogFeatureMap",
    "LinearSlidingWindowAttention",
    "NoAttention",
    "SlidingWindowAttention",
    "attention_kind",
    "build_attention",
]
