"""The attention kinds a layer can take: one record per kind, and everything else asks here.

A record says which module replaces the attention (in attention.py), which per-layer cache it keeps
(the HF-side layer in cache.py and the engine's static buffers in engine.py are chosen by that cache
type), how many bytes that cache and the kind's weights take, which options a `LayerSpec` of the kind
accepts, its letter, label and colour in tables and plots, and what the exports write for it.

Adding a kind: a record below, its module class in attention.py, and tests (parity with a plain
reference, generate with the cache, save/load). A kind with a new cache type also needs that cache in
cache.py and its decode step in engine.py.

Cache types: "full" (every past key and value), "window" (the last `window` keys and values, a ring),
"linear_window" (a window ring plus a running linear-attention state), None (nothing: the kind reads
only the current token).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# How linear_swa weighs its two terms: "gate" scales the linear term by sigmoid(gate) (starts near
# swa); "lolcats" scales the window term by a learned sigmoid factor and leaves the linear term
# unscaled (LoLCATs' published setting).
LINEAR_MIXES = ("gate", "lolcats")


@dataclass(frozen=True)
class Kind:
    """Everything layerboost knows about one attention kind.

    Attributes:
        name: the plan's `kind` value.
        summary: one line saying what the kind computes (for readers of this table; the README's kind table
            says the same).
        module: "ClassName" in layerboost.attention that replaces the attention (None: keep the original).
        cache: the per-layer cache type (see the module docstring); None for cacheless kinds.
        options: the `LayerSpec` fields besides `kind` this kind takes (`window` is then required).
        letter, colour: one-letter code in plan strings; colour in plots.
        reads_input: the module reads the layer's normed input (False: `convert` drops the input norm).
        export: format -> what that format writes for a layer of this kind (None: it cannot).
    """

    name: str
    summary: str
    module: str | None
    cache: str | None
    options: tuple[str, ...]
    letter: str
    colour: str
    reads_input: bool = True
    export: tuple[tuple[str, str | None], ...] = ()

    @property
    def windowed(self) -> bool:
        return self.cache in ("window", "linear_window")

    @property
    def cacheless(self) -> bool:
        return self.cache is None

    def module_class(self):
        """The attention module class (None: the original module stays)."""
        return None if self.module is None else getattr(importlib.import_module("layerboost.attention"), self.module)

    def export_as(self, fmt: str) -> str | None:
        return dict(self.export).get(fmt)

    # ---- sizes ---------------------------------------------------------------------------------
    def cached_tokens(self, spec, context: int) -> int:
        """Keys/values this layer holds after `context` tokens."""
        return {"full": context, "window": min(context, spec.window or 0),
                "linear_window": min(context, spec.window or 0), None: 0}[self.cache]

    def state_bytes(self, spec, heads: int, head_dim: int, context: int) -> int:
        """Bytes of a running state besides keys/values, per sequence: linear_window keeps, once tokens
        have left the window, an fp32 state (features x head_dim) and normaliser (features) per head,
        with 2 * feature_dim features."""
        if self.cache != "linear_window" or context <= (spec.window or 0):
            return 0
        return 4 * heads * 2 * (spec.feature_dim or head_dim) * (head_dim + 1)

    def weight_elements(self, spec, hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
        """Parameters one decode step reads for this layer's token mixer: the q/k/v/o projections for every
        kind that attends, plus linear_window's two feature maps; nothing for a cacheless kind."""
        if self.cache is None:
            return 0
        attn = hidden * heads * head_dim * 2 + hidden * 2 * kv_heads * head_dim
        features = 2 * heads * 2 * (spec.feature_dim or head_dim) * head_dim if self.cache == "linear_window" else 0
        return attn + features


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("softmax", "the original attention, full causal softmax", None, "full", (), "S", "#1f77b4",
         export=(("transformers", "full_attention"), ("deci", "attention"))),
    Kind("swa", "softmax over the last `window` tokens (the token itself included)", "SlidingWindowAttention",
         "window", ("window",), "W", "#ff7f0e",
         export=(("transformers", "sliding_attention"), ("deci", None))),
    Kind("linear_swa", "window softmax plus Hedgehog linear attention over older tokens (LoLCATs)",
         "LinearSlidingWindowAttention", "linear_window", ("window", "feature_dim", "mix"), "L", "#9467bd"),
    Kind("none", "no attention: the sublayer adds 0", "NoAttention", None, (), "-", "#2ca02c", reads_input=False,
         export=(("transformers", None), ("deci", "no_op"))),
)}


def kind(name: str) -> Kind:
    """The record of `name`; an unknown name raises KeyError listing the known ones."""
    if name not in KINDS:
        raise KeyError(f"unknown attention kind {name!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[name]


NAMES = tuple(KINDS)
WINDOWED = tuple(k for k, r in KINDS.items() if r.windowed)
CACHELESS = tuple(k for k, r in KINDS.items() if r.cacheless)
