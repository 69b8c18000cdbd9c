"""A heterogeneous per-layer KV cache for hybrid models: one cache layer per decoder layer, of the kind the
plan gives it (each kind's module in layerboost/kinds/ defines its layer; every layer counts the tokens it
has seen, so positions never depend on which kind layer 0 is).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache

from .compat import CACHE_KWARGS
from .kinds import kind
from .kinds.common import CountingLayer
from .plan import LayerPlan


def make_cache_layer(spec) -> CountingLayer:
    """The cache layer `spec`'s kind keeps (its record's `cache_layer`)."""
    return kind(spec.kind).cache_layer(spec)


class HybridCache(Cache):
    """One cache layer per decoder layer, chosen by the plan. Works with `model.generate`."""

    def __init__(self, plan: LayerPlan):
        super().__init__(layers=[make_cache_layer(s) for s in plan.layers])
        self.plan = plan

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(0) + query_length, 0

    def nbytes(self) -> int:
        """Bytes held by all layers (keys, values and linear states)."""
        return sum(layer.nbytes() for layer in self.layers)


def expected_cache_bytes(plan: LayerPlan, config, batch: int, seq_len: int, dtype=torch.float32) -> int:
    """Bytes a `HybridCache` holds after `seq_len` tokens (the formula the tests check): per layer,
    2 * B * nkv * (the kind's cached tokens) * hs * bytes + B * (the kind's running-state bytes)."""
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    hs = getattr(config, "head_dim", None) or config.hidden_size // nh
    el = torch.empty((), dtype=dtype).element_size()
    total = 0
    for spec in plan.layers:
        k = kind(spec.kind)
        total += 2 * batch * nkv * k.cached_tokens(spec, seq_len) * hs * el + batch * k.state_bytes(spec, nh, hs, seq_len)
    return total


def install_cache_hook(decoder_model, plan: LayerPlan):
    """Make every forward of `decoder_model` (e.g. `LlamaModel`) use a `HybridCache`.

    transformers builds a `DynamicCache` from the config when no cache is given (forward with
    use_cache, and `generate`), which would give windowed layers full-length keys and make an
    attention-free layer 0 report length 0. This pre-hook swaps in a `HybridCache` instead; an
    empty `DynamicCache` (what `generate` makes) is replaced, and `generate` then carries ours on
    because it reads the cache back from the model outputs.
    """

    def hook(module, args, kwargs):
        name = next((n for n in CACHE_KWARGS if kwargs.get(n) is not None), None)
        cache = kwargs.get(name) if name else None
        if isinstance(cache, HybridCache):
            return None
        if cache is None:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = module.config.use_cache
            if not use_cache:
                return None
        elif not (type(cache) is DynamicCache and cache.get_seq_length() == 0):
            raise TypeError(
                f"a layerboost hybrid model needs a layerboost.HybridCache, got a non-empty {type(cache).__name__}: "
                "pass cache=HybridCache(model.layerboost_plan) or let the model create one"
            )
        kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
        kwargs["cache"] = HybridCache(plan)
        return args, kwargs

    return decoder_model.register_forward_pre_hook(hook, with_kwargs=True)
