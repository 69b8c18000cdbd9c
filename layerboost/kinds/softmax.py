"""softmax: the original attention module, untouched; its cache grows with every token.

transformers side: `FullLayer` keeps (B, nkv, T, hs) keys and values. Engine: `FullKV` holds (B, nkv, Tmax, hs),
token t at slot t; a step reads the first `span` slots under the mask slot <= t.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .common import CountingLayer, DecodeShape, attention_weight_elements, grouped_attend, one_token_qkv
from .record import Kind


class FullLayer(CountingLayer):
    """(B, nkv, T, hs) keys and values that grow."""

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.is_initialized = True
        self.seen += key_states.shape[-2]
        return self.keys, self.values


class FullKV(nn.Module):
    """The engine's buffers: every token's keys and values, (B, nkv, Tmax, hs)."""

    def __init__(self, spec, attn: nn.Module, shape: DecodeShape):
        super().__init__()
        self.shape = shape
        size = (shape.batch, shape.nkv, shape.max_seq_len, shape.hs)
        self.register_buffer("k", torch.zeros(size, dtype=shape.dtype, device=shape.device), persistent=False)
        self.register_buffer("v", torch.zeros(size, dtype=shape.dtype, device=shape.device), persistent=False)

    def load(self, layer: FullLayer) -> None:
        n = layer.keys.shape[-2]
        self.k[:, :, :n].copy_(layer.keys)
        self.v[:, :, :n].copy_(layer.values)

    def held_bytes(self, n_tokens: int) -> int:
        return 2 * self.k[:, :, :n_tokens].numel() * self.k.element_size()

    def step(self, attn, x, cos, sin, pos, valid, span: int) -> torch.Tensor:
        """The attention sublayer's output (B, 1, D) for x (B, 1, D) at position pos (1,); writes slot pos."""
        q, k, v = one_token_qkv(attn, x, cos, sin, self.shape)
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return attn.o_proj(grouped_attend(q, self.k[:, :, :span], self.v[:, :, :span], valid[:span], attn.scaling,
                                          self.shape))


KIND = Kind(
    "softmax", "the original attention, full causal softmax", module=None, cache="full",
    cache_layer=lambda spec: FullLayer(), decode_buffers=FullKV,
    cached_tokens=lambda spec, context: context, weight_elements=attention_weight_elements,
    letter="S", colour="#1f77b4",
    export=(("transformers", "full_attention"), ("deci", "attention"), ("gguf", "full_attention")),
)
