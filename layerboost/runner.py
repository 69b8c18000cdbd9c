"""One decoder runner: embedding, rotary tables, the mask every attention implementation needs, and the
loop over decoder layers i..j. Sensitivity analysis, healing (teacher and student) and the engine's
prefill all run the model through it, so "causal" means the same thing everywhere.

Masks: sdpa layers take `None` as plain causal (is_causal); eager layers apply whatever additive
mask they get and nothing else, so for them the causal mask is spelled out. Packed rows (several
segments sharing a prefix, sensitivity's multiple-choice items) get an additive tree mask under
either implementation. An original module that slides natively (Gemma 3's local layers) gets its
window added to the mask; layerboost's own modules apply their windows themselves.

Rotary tables: one per layer type where the family has several (Gemma 3: local and global theta).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .plan import native_window
from .surgery import architecture, decoder_parts


def tree_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) segment ids -> additive mask (B, 1, T, T): causal, and a token of segment j > 0 sees only
    segment 0 (the shared prefix) and its own segment."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
    mask = torch.zeros(segments.shape[0], 1, t, t, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~(causal & same)[:, None], torch.finfo(dtype).min)


def causal_mask(t: int, dtype: torch.dtype, device, window: int | None = None) -> torch.Tensor:
    """Additive causal mask (1, 1, T, T) (0: attend, dtype's min: masked), limited to the last `window` tokens."""
    i = torch.arange(t, device=device)
    keep = i[None] <= i[:, None]
    if window is not None:
        keep &= i[None] > i[:, None] - window
    return torch.zeros(1, 1, t, t, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)


class DecoderRunner:
    """Runs a supported causal LM's decoder on full rows (no padding before a scored position).

    Attributes:
        decoder: the decoder model (embed_tokens, rotary_emb, norm). layers: its decoder layers.
        eager: the model uses eager attention (explicit masks).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.arch = architecture(model)
        self.decoder, self.layers = decoder_parts(model)
        self.eager = model.config._attn_implementation == "eager"
        types = getattr(model.config, "layer_types", None)
        self.layer_types = list(types) if self.arch.rope_per_layer_type else None
        self.native_windows = sorted({native_window(model.config, i) for i in range(len(self.layers))} - {None})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def mask(self, t: int, dtype: torch.dtype, device, segments: torch.Tensor | None = None,
             window: int | None = None) -> torch.Tensor | None:
        """The attention mask layers get for rows of length t: a tree mask for packed segments, else
        None (sdpa: causal) or the additive causal mask (eager); `window` limits either to the last tokens."""
        if window is not None and window >= t:
            window = None
        if segments is not None:
            m = tree_mask(segments.to(device), dtype)
            return m if window is None else m.masked_fill_(causal_mask(t, dtype, device, window) < 0, torch.finfo(dtype).min)
        return causal_mask(t, dtype, device, window) if self.eager or window is not None else None

    def rotary(self, x: torch.Tensor, positions: torch.Tensor):
        """(cos, sin) tables, or {layer type: (cos, sin)} for families with a rotary table per layer type."""
        if self.layer_types is None:
            return self.decoder.rotary_emb(x, position_ids=positions)
        return {lt: self.decoder.rotary_emb(x, positions, lt) for lt in sorted(set(self.layer_types))}

    def embed(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
              segments: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(hidden states (B, T, D), ctx): ctx holds what every layer needs (rotary tables, position ids, mask)."""
        ids = ids.to(self.device)
        x = self.decoder.embed_tokens(ids)
        t = ids.shape[1]
        pos = torch.arange(t, device=x.device)[None] if positions is None else positions.to(x.device)
        ctx = dict(position_embeddings=self.rotary(x, pos), position_ids=pos,
                   attention_mask=self.mask(t, x.dtype, x.device, segments))
        # native window -> its mask, for original modules that slide (which modules are original may change
        # after this call: heal's teacher mode swaps them back, so every window the config has gets one)
        ctx["_sliding"] = {w: self.mask(t, x.dtype, x.device, segments, window=w) for w in self.native_windows}
        return x, ctx

    def layer_ctx(self, i: int, ctx: dict) -> dict:
        """ctx as layer i needs it: its layer type's rotary table; a native window in the mask of an
        original module that slides (layerboost modules, which carry a `spec`, window themselves)."""
        out = {k: v for k, v in ctx.items() if k != "_sliding"}
        if self.layer_types is not None and isinstance(out["position_embeddings"], dict):
            out["position_embeddings"] = out["position_embeddings"][self.layer_types[i]]
        window = self.native_window(i)
        if window is not None:
            out["attention_mask"] = ctx["_sliding"][window]
        return out

    def native_window(self, i: int) -> int | None:
        """The window layer i's module relies on the mask for: an original module's native window (Mistral,
        Gemma 3's local layers), None for full attention and for layerboost modules (which carry a `spec`)."""
        return None if hasattr(self.layers[i].self_attn, "spec") else native_window(self.model.config, i)

    def layer(self, i: int, x: torch.Tensor, ctx: dict, **extra) -> torch.Tensor:
        """Decoder layer i on x (extra: e.g. cache=..., use_cache=True for a prefill)."""
        out = self.layers[i](x, **self.layer_ctx(i, ctx), **extra)
        return out[0] if isinstance(out, tuple) else out

    def run(self, x: torch.Tensor, ctx: dict, start: int = 0, end: int | None = None, **extra) -> torch.Tensor:
        """Layers [start, end) in order."""
        for i in range(start, len(self.layers) if end is None else end):
            x = self.layer(i, x, ctx, **extra)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (and the family's logit softcap)."""
        logits = self.model.lm_head(self.decoder.norm(x))
        cap = getattr(self.model.config, self.arch.final_softcap, None) if self.arch.final_softcap else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
