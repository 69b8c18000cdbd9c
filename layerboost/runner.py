"""One decoder runner: embedding, rotary tables, the mask every attention implementation needs, and the
loop over decoder layers i..j. Sensitivity analysis, healing (teacher and student) and the engine's
prefill all run the model through it, so "causal" means the same thing everywhere.

Masks: sdpa layers take `None` as plain causal (is_causal); eager layers apply whatever additive
mask they get and nothing else, so for them the causal mask is spelled out. Packed rows (several
segments sharing a prefix, sensitivity's multiple-choice items) get an additive tree mask under
either implementation.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .surgery import decoder_parts


def tree_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) segment ids -> additive mask (B, 1, T, T): causal, and a token of segment j > 0 sees only
    segment 0 (the shared prefix) and its own segment."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
    mask = torch.zeros(segments.shape[0], 1, t, t, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~(causal & same)[:, None], torch.finfo(dtype).min)


def causal_mask(t: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive causal mask (1, 1, T, T) for eager attention (0: attend, dtype's min: masked)."""
    keep = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return torch.zeros(1, 1, t, t, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)


class DecoderRunner:
    """Runs a supported causal LM's decoder on full rows (no padding before a scored position).

    Attributes:
        decoder: the decoder model (embed_tokens, rotary_emb, norm). layers: its decoder layers.
        eager: the model uses eager attention (explicit masks).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.decoder, self.layers = decoder_parts(model)
        self.eager = model.config._attn_implementation == "eager"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def mask(self, t: int, dtype: torch.dtype, device, segments: torch.Tensor | None = None) -> torch.Tensor | None:
        """The attention mask layers get for rows of length t: a tree mask for packed segments, else
        None (sdpa: causal) or the additive causal mask (eager)."""
        if segments is not None:
            return tree_mask(segments.to(device), dtype)
        return causal_mask(t, dtype, device) if self.eager else None

    def embed(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
              segments: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(hidden states (B, T, D), ctx): ctx holds what every layer needs (rotary tables, position ids, mask)."""
        ids = ids.to(self.device)
        x = self.decoder.embed_tokens(ids)
        t = ids.shape[1]
        pos = torch.arange(t, device=x.device)[None] if positions is None else positions.to(x.device)
        pe = self.decoder.rotary_emb(x, position_ids=pos)
        return x, dict(position_embeddings=pe, position_ids=pos, attention_mask=self.mask(t, x.dtype, x.device, segments))

    def layer(self, i: int, x: torch.Tensor, ctx: dict, **extra) -> torch.Tensor:
        """Decoder layer i on x (extra: e.g. cache=..., use_cache=True for a prefill)."""
        out = self.layers[i](x, **ctx, **extra)
        return out[0] if isinstance(out, tuple) else out

    def run(self, x: torch.Tensor, ctx: dict, start: int = 0, end: int | None = None, **extra) -> torch.Tensor:
        """Layers [start, end) in order."""
        for i in range(start, len(self.layers) if end is None else end):
            x = self.layer(i, x, ctx, **extra)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head."""
        return self.model.lm_head(self.decoder.norm(x))
