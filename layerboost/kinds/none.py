"""none: the attention sublayer removed. It adds nothing, computes no q/k/v/o and caches nothing
(`EmptyLayer` only counts tokens); `convert` drops the layer's input norm and the engine skips the sublayer.

A learned per-channel bias and a low-rank linear map of the token's own state (DeciLM's replace_with_linear)
heal no better than `none` (docs/experiments/healing.md), so `none` is the one attention-free kind.
"""

from __future__ import annotations

import torch.nn as nn

from ..compat import get_cache
from .common import CountingLayer
from .record import Kind


class EmptyLayer(CountingLayer):
    """Nothing stored; `advance` keeps the token count."""

    def advance(self, n_tokens: int) -> None:
        self.seen += n_tokens

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("an attention-free layer has no keys or values to cache")


class NoAttention(nn.Module):
    """Returns zeros (a stride-0 view, no memory) and computes nothing."""

    OWN: tuple[str, ...] = ()

    def __init__(self, orig: nn.Module, spec):
        super().__init__()
        self.layer_idx, self.spec = orig.layer_idx, spec

    def forward(self, hidden_states, **kwargs):
        cache = get_cache(kwargs)
        if cache is not None:
            layer = cache.layers[self.layer_idx]
            if not isinstance(layer, EmptyLayer):
                raise TypeError("attention-free layers need a layerboost HybridCache")
            layer.advance(hidden_states.shape[1])
        return hidden_states.new_zeros(()).expand_as(hidden_states), None

    def extra_repr(self) -> str:
        return f"kind={self.spec.kind}, layer_idx={self.layer_idx}"


KIND = Kind(
    "none", "no attention: the sublayer adds 0", module=NoAttention, cache=None,
    cache_layer=lambda spec: EmptyLayer(), decode_buffers=None,
    cached_tokens=lambda spec, context: 0, weight_elements=lambda spec, hidden, heads, kv_heads, head_dim: 0,
    letter="-", colour="#2ca02c", reads_input=False,
    export=(("transformers", None), ("deci", "no_op"), ("gguf", "no_attention")),
    refusals=(("transformers", "no transformers architecture has a decoder layer without attention; use --format "
                               "deci (softmax + none), or re-plan those layers as swa or softmax"),),
)
