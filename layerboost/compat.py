"""Every shim for transformers version differences lives here, nowhere else.

transformers 5.x renamed the cache argument `past_key_values` -> `cache` (5.24 still accepts the
old name with a warning). Decoder layers call `self_attn(hidden_states=..., attention_mask=...,
position_embeddings=(cos, sin), cache=..., ...)` and expect a `(output, weights)` pair.
"""

from __future__ import annotations

import torch

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def get_cache(kwargs: dict):
    """The cache object a decoder layer passed to its attention, whatever the argument's name."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(out):
    """The cache a model's forward returned (`cache` in transformers 5.x, `past_key_values` before)."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def cache_argument(model_accepts_cache: bool, cache) -> dict:
    """Keyword argument that passes `cache` to a model's forward under this transformers version's name."""
    return {"cache" if model_accepts_cache else "past_key_values": cache}


def without_cache_kwargs(kwargs: dict) -> dict:
    """A decoder layer's attention kwargs without the cache (under any of its names) and use_cache."""
    return {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS + ("use_cache",)}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE as Llama/Mistral/Qwen apply it: q, k (B, nh, T, hs); cos, sin (B, T, hs)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def allowed_mask(attention_mask: torch.Tensor | None, n_keys: int) -> torch.Tensor | None:
    """The model's 4D mask as booleans (True = may attend), cut to the last `n_keys` key columns.

    transformers gives sdpa-style boolean masks or eager-style additive float masks (0 = attend),
    whose key columns span every position seen so far (our `HybridCache.get_mask_sizes` makes sure
    of that); windowed layers hold only the last keys, so they take the last columns.
    `None` means a plain causal mask without padding.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise ValueError(
            f"layerboost attention expects the 4D mask transformers builds (sdpa or eager), got shape "
            f"{tuple(attention_mask.shape)}: load the model with attn_implementation='sdpa' or 'eager'"
        )
    m = attention_mask[..., -n_keys:]
    return m if m.dtype == torch.bool else m == 0


def detach_gguf_quantizer(model) -> None:
    """A GGUF-loaded model must forget its quantizer before `save_pretrained` will write it."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
