"""swa: causal softmax over the last `window` tokens (the token itself included).

transformers side: `WindowLayer` keeps the last `window` keys/values. Engine: `WindowKV`, a ring of
min(W, Tmax) slots, token t at slot t % W; a step reads every slot under the mask slot <= t (slot j is
filled once t >= j).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compat import allowed_mask, get_cache
from .common import (CountingLayer, DecodeShape, ProjectedAttention, attention_weight_elements, grouped_attend,
                     one_token_qkv, positions, repeat_kv)
from .record import Kind


class SlidingWindowAttention(ProjectedAttention):
    """Causal softmax attention over the last `window` tokens."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        b, t, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states, position_embeddings)
        cache = get_cache(kwargs)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # kept window + new: (B, nkv, n, hs)
        n = k.shape[-2]
        qi, kj = positions(t, n, q.device)
        band = (kj <= qi) & (kj > qi - self.window)  # (T, n)
        pad = allowed_mask(attention_mask, n)  # (B, 1, T, n) or None
        # Keep each query's own key so rows that are all padding never softmax over nothing (NaN).
        allowed = band if pad is None else band & (pad | (kj == qi))
        y = F.scaled_dot_product_attention(
            q, repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups),
            attn_mask=allowed, scale=self.scaling,
        )  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1)), None


class WindowLayer(CountingLayer):
    """Keeps the last `window` keys/values.

    `update` returns the kept keys followed by the new ones (so a query can see its whole window
    even in a multi-token prefill), then keeps only the last `window`.
    """

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:
            k_all, v_all = key_states, value_states
        else:
            k_all = torch.cat([self.keys, key_states], dim=-2)
            v_all = torch.cat([self.values, value_states], dim=-2)
        # .contiguous() copies the kept slice so the long prefill tensors can be freed.
        self.keys = k_all[..., -self.window :, :].contiguous()
        self.values = v_all[..., -self.window :, :].contiguous()
        self.is_initialized = True
        self.seen += key_states.shape[-2]
        return k_all, v_all


class WindowKV(nn.Module):
    """The engine's buffers: a ring of `slots` = min(W, Tmax) positions, token t at slot t % slots."""

    def __init__(self, spec, attn: nn.Module, shape: DecodeShape):
        super().__init__()
        self.shape, self.slots = shape, min(spec.window, shape.max_seq_len)
        size = (shape.batch, shape.nkv, self.slots, shape.hs)
        self.register_buffer("k", torch.zeros(size, dtype=shape.dtype, device=shape.device), persistent=False)
        self.register_buffer("v", torch.zeros(size, dtype=shape.dtype, device=shape.device), persistent=False)

    def load(self, layer: WindowLayer) -> None:
        n = layer.keys.shape[-2]  # the last min(seen, W) tokens, oldest first
        pos = torch.arange(layer.seen - n, layer.seen, device=self.k.device)
        self.k[:, :, pos % self.slots] = layer.keys
        self.v[:, :, pos % self.slots] = layer.values

    def held_bytes(self, n_tokens: int) -> int:
        return 2 * self.k[:, :, : min(n_tokens, self.slots)].numel() * self.k.element_size()

    def write(self, slot, k, v) -> None:
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)

    def step(self, attn, x, cos, sin, pos, valid, span: int) -> torch.Tensor:
        """The attention sublayer's output (B, 1, D) for x (B, 1, D) at position pos (1,); writes slot pos % W."""
        q, k, v = one_token_qkv(attn, x, cos, sin, self.shape)
        self.write(pos % self.slots, k, v)
        # ring slot j holds a token once t >= j
        return attn.o_proj(grouped_attend(q, self.k, self.v, valid[: self.slots], attn.scaling, self.shape))


def window_tokens(spec, context: int) -> int:
    """Keys/values a windowed layer holds after `context` tokens."""
    return min(context, spec.window or 0)


KIND = Kind(
    "swa", "softmax over the last `window` tokens (the token itself included)", module=SlidingWindowAttention,
    cache="window", cache_layer=lambda spec: WindowLayer(spec.window), decode_buffers=WindowKV,
    cached_tokens=window_tokens, weight_elements=attention_weight_elements, options=("window",),
    letter="W", colour="#ff7f0e",
    export=(("transformers", "sliding_attention"), ("deci", None), ("gguf", "sliding_attention")),
    refusals=(("deci", "the deci format's window_length is ignored by vLLM, SGLang, TensorRT-LLM and mlx-lm (they "
                       "would attend to every token); re-plan those layers as softmax or none, or export a softmax + "
                       "swa plan with --format transformers"),),
)
