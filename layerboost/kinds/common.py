"""Parts the attention kinds share: the projections of the original attention, the bookkeeping of a
transformers cache layer, and the engine's one-token q/k/v and grouped softmax.

Shapes: B batch, T new tokens, n keys held (cached + new), nh query heads, nkv key/value heads,
G = nh // nkv, hs head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from ..compat import apply_rope


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, nkv, n, hs) -> (B, nkv * groups, n, hs)"""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def positions(t_new: int, n_keys: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key indices on one axis: the new tokens are the last `t_new` of the `n_keys`."""
    return torch.arange(n_keys - t_new, n_keys, device=device)[:, None], torch.arange(n_keys, device=device)[None]


def attention_weight_elements(spec, hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """The q/k/v/o projections' parameters: what one decode step of an attending layer reads."""
    return hidden * heads * head_dim * 2 + hidden * 2 * kv_heads * head_dim


class ProjectedAttention(nn.Module):
    """Holds the original projections (and Qwen3's q_norm/k_norm), so checkpoint keys stay the same, and
    computes RoPE'd q, k, v exactly as the original does."""

    OWN: tuple[str, ...] = ()

    def __init__(self, orig: nn.Module, spec):
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


class CountingLayer(CacheLayerMixin):
    """A transformers cache layer that counts the tokens it has processed (`seen`), whatever it keeps.

    Every layer counts, so sequence length and positions never depend on which kind layer 0 is (transformers
    reads layer 0 by default; an empty layer 0 would say 0). Masks are sized to every position seen
    (`get_mask_sizes`); windowed layers use the last columns. `TENSORS` names what a subclass holds per sequence.
    """

    is_sliding = False  # masks must span every position; windowed layers cut them themselves
    is_croppable = False
    TENSORS: tuple[str, ...] = ("keys", "values")

    def __init__(self):
        super().__init__()
        self.seen = 0

    def lazy_initialization(self, key_states, value_states):
        self.device, self.is_initialized = key_states.device, True

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, name, None) for name in self.TENSORS) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        for name in self.TENSORS:
            setattr(self, name, None)
        self.seen = 0

    def _map(self, fn) -> None:
        for name in self.TENSORS:
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} cannot roll back tokens (assisted/speculative decoding is not supported "
            "by layerboost hybrid caches)"
        )


@dataclass(frozen=True)
class DecodeShape:
    """What the engine's buffers of every layer are sized by."""

    batch: int
    max_seq_len: int
    nh: int
    nkv: int
    hs: int
    dtype: torch.dtype
    device: torch.device

    @property
    def groups(self) -> int:
        return self.nh // self.nkv


def one_token_qkv(attn: nn.Module, x: torch.Tensor, cos, sin, shape: DecodeShape):
    """q (B, nh, 1, hs), k and v (B, nkv, 1, hs) of one new token x (B, 1, D), RoPE applied, through `attn`'s
    projections (the original module or a `ProjectedAttention`)."""
    b, nh, nkv, hs = x.shape[0], shape.nh, shape.nkv, shape.hs
    q = attn.q_proj(x).view(b, 1, nh, hs)
    k = attn.k_proj(x).view(b, 1, nkv, hs)
    v = attn.v_proj(x).view(b, nkv, 1, hs)  # T = 1: (B, 1, nkv, hs) has the same layout
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rope(q.view(b, nh, 1, hs), k.view(b, nkv, 1, hs), cos, sin)
    return q, k, v


def grouped_attend(q, k, v, mask, scale: float, shape: DecodeShape) -> torch.Tensor:
    """Softmax attention of one query per head over n slots: q (B, nh, 1, hs), k/v (B, nkv, n, hs), mask (n,)
    bool (True: the slot holds a visible token) -> (B, 1, nh * hs).

    The G query heads sharing a kv head become G query rows (no key/value copies).
    """
    b = q.shape[0]
    y = F.scaled_dot_product_attention(q.reshape(b, shape.nkv, shape.groups, shape.hs), k, v,
                                       attn_mask=mask.view(1, 1, 1, -1), scale=scale)
    return y.reshape(b, 1, shape.nh * shape.hs)
