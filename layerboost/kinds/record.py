"""The record of one attention kind: what every other part of layerboost asks about a kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# The export formats a record names (export.py writes transformers and deci folders, export_gguf.py gguf).
EXPORT_FORMATS = ("transformers", "deci", "gguf")


@dataclass(frozen=True)
class Kind:
    """Everything layerboost knows about one attention kind; each kind's module in this package builds one.

    Attributes:
        name: the plan's `kind` value (saved plans name kinds by it: never rename one).
        summary: one line saying what the kind computes.
        module: the nn.Module class that replaces the attention, built as `module(orig, spec)` from the original
            attention (None: the original module stays). Its class attribute `OWN` names its own trainable
            parameters (heal trains and checkpoints exactly those).
        cache: the name of the per-layer cache it keeps ("full", "window", "linear_window"; None: nothing).
        cache_layer: spec -> the transformers-side cache layer (`HybridCache`, generate) of one layer.
        decode_buffers: (spec, attn, shape) -> the engine's static buffers of one layer, an nn.Module with
            `load(cache_layer)`, `held_bytes(n_tokens)` and `step(attn, x, cos, sin, pos, valid, span)` (the
            decode step); None: the engine skips the layer's attention sublayer and its input norm.
        cached_tokens: (spec, context) -> keys/values the layer holds after `context` tokens.
        weight_elements: (spec, hidden, heads, kv_heads, head_dim) -> parameters one decode step reads for the
            layer's token mixer (spec may be None for a kind without options).
        state_bytes: (spec, heads, head_dim, context) -> bytes of a running state besides keys/values, per sequence.
        options: the `LayerSpec` fields besides `kind` this kind takes (`window`: the kind is windowed, and the
            field is then required).
        letter, colour: one-letter code in plan strings; colour in plots.
        reads_input: the module reads the layer's normed input (False: `convert` drops the input norm).
        export: (format, name) pairs: what that format writes for a layer of this kind, None where it cannot.
            A format left out cannot write it either.
        refusals: (format, advice) pairs: what to do instead where the format cannot write the kind.
    """

    name: str
    summary: str
    module: type | None
    cache: str | None
    cache_layer: Callable
    decode_buffers: Callable | None
    cached_tokens: Callable
    weight_elements: Callable
    state_bytes: Callable = lambda spec, heads, head_dim, context: 0
    options: tuple[str, ...] = ()
    letter: str = "?"
    colour: str = "#777777"
    reads_input: bool = True
    export: tuple[tuple[str, str | None], ...] = ()
    refusals: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        unknown = sorted({f for f, _ in self.export + self.refusals} - set(EXPORT_FORMATS))
        if unknown:
            raise ValueError(f"kind {self.name!r} names unknown export formats {unknown}; known: {', '.join(EXPORT_FORMATS)}")
        if self.module is not None and not isinstance(getattr(self.module, "OWN", None), tuple):
            raise ValueError(f"kind {self.name!r}: {self.module.__name__}.OWN must name its own trainable parameters "
                             "(a tuple, empty if it has none)")

    @property
    def windowed(self) -> bool:
        return "window" in self.options

    @property
    def cacheless(self) -> bool:
        return self.cache is None

    def export_as(self, fmt: str) -> str | None:
        """What `fmt` writes for a layer of this kind (None: it cannot)."""
        return dict(self.export).get(fmt)

    def refusal(self, fmt: str, writable: list[str]) -> str:
        """Why `fmt` cannot write this kind and what to do instead (`writable`: the kinds it can write)."""
        advice = dict(self.refusals).get(fmt)
        return advice or f"the {fmt} format has no {self.name} layer; re-plan those layers as {' or '.join(writable)}"
