"""A heterogeneous per-layer KV cache for hybrid models.

    softmax     FullLayer         keys/values grow with every token
    swa         WindowLayer       only the last `window` keys/values (bounded)
    linear_swa  LinearWindowLayer the last `window` keys/values + an fp32 linear-attention state
    none        EmptyLayer        nothing (only counts tokens)

Every layer counts the tokens it has seen, so sequence length and positions never depend on
which kind layer 0 is (transformers reads layer 0 by default; an empty layer 0 would say 0).
Masks are sized to every position seen (`get_mask_sizes`); windowed layers use the last columns.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from .compat import CACHE_KWARGS
from .kinds import kind
from .plan import LayerPlan


class _CountingLayer(CacheLayerMixin):
    """Shared bookkeeping: `seen` = tokens this layer has processed."""

    is_sliding = False  # masks must span every position; windowed layers cut them themselves
    is_croppable = False

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
        return [t for t in (self.keys, self.values) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        self.keys = self.values = None
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in ("keys", "values", "state", "normalizer"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in ("keys", "values", "state", "normalizer"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in ("keys", "values", "state", "normalizer"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} cannot roll back tokens (assisted/speculative decoding is not supported "
            "by layerboost hybrid caches)"
        )


class FullLayer(_CountingLayer):
    """softmax layers: (B, nkv, T, hs) keys and values that grow."""

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.is_initialized = True
        self.seen += key_states.shape[-2]
        return self.keys, self.values


class WindowLayer(_CountingLayer):
    """swa layers: keep the last `window` keys/values.

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


class LinearWindowLayer(WindowLayer):
    """linear_swa layers: the window plus `state` (B, nh, F, hs) and `normalizer` (B, nh, F), fp32.

    The attention module folds the keys that leave the window into the state (`fold`).
    """

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

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + [t for t in (self.state, self.normalizer) if t is not None]

    def reset(self) -> None:
        super().reset()
        self.state = self.normalizer = None


class EmptyLayer(_CountingLayer):
    """Cacheless layers (none): no attention, nothing stored; `advance` keeps the token count."""

    def advance(self, n_tokens: int) -> None:
        self.seen += n_tokens

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("an attention-free layer has no keys or values to cache")


CACHE_LAYERS = {"full": lambda spec: FullLayer(), "window": lambda spec: WindowLayer(spec.window),
                "linear_window": lambda spec: LinearWindowLayer(spec.window), None: lambda spec: EmptyLayer()}


def make_cache_layer(spec) -> _CountingLayer:
    """The cache layer for the cache type of `spec`'s kind (kinds.py)."""
    return CACHE_LAYERS[kind(spec.kind).cache](spec)


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
    """Bytes a `HybridCache` holds after `seq_len` tokens (the formula the tests check).

    softmax: 2 * B * nkv * T * hs * bytes; swa: 2 * B * nkv * min(T, W) * hs * bytes;
    linear_swa: the swa window + fp32 state B * nh * F * hs + normaliser B * nh * F (F = 2 * feature_dim);
    none: 0.
    """
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
