"""The attention kinds a layer can take: one module per kind in this package, and a registry that every other
part of layerboost asks (by name, or by what a kind can do) instead of naming kinds itself.

    softmax.py     the original attention, untouched; a growing cache
    swa.py         softmax over the last `window` tokens; a window ring
    linear_swa.py  swa + Hedgehog linear attention over older tokens (LoLCATs); the ring + an fp32 state
    none.py        no attention: the sublayer adds 0 and caches nothing

Each kind's module holds its attention module (built from the original one, reusing its projections, with
`OWN` naming its own trainable parameters), its transformers-side cache layer (`HybridCache`, generate), its
engine buffers with their decode step, its sizes, and what each export format calls it, all gathered in one
`Kind` record (record.py). Adding a kind: one module like these, `register(KIND)`, and its tests (parity with
a plain reference, generate with the cache, the engine, save/load); tests/test_toy_kind.py adds one from the
test file alone.
"""

from __future__ import annotations

import torch.nn as nn

from . import linear_swa, none, softmax, swa
from .linear_swa import LINEAR_MIXES
from .record import EXPORT_FORMATS, Kind

KINDS: dict[str, Kind] = {}
ORIGINAL = softmax.KIND.name  # the kind that keeps the original attention module (what an unconverted layer is)


def register(record: Kind) -> Kind:
    """Make `record` a kind every plan, convert, heal, the engine and the exports accept.

    Raises:
        ValueError: a kind of that name, letter or colour is already registered.
    """
    for field in ("name", "letter", "colour"):
        taken = [r.name for r in KINDS.values() if getattr(r, field) == getattr(record, field)]
        if taken:
            raise ValueError(f"kind {record.name!r}: {field} {getattr(record, field)!r} is taken by {taken[0]!r}")
    KINDS[record.name] = record
    return record


def unregister(name: str) -> None:
    """Remove a registered kind (tests that register a toy kind).

    Raises:
        KeyError: unknown kind (the message lists the known ones).
    """
    kind(name)
    del KINDS[name]


def kind(name: str) -> Kind:
    """The record of `name`.

    Raises:
        KeyError: unknown kind; the message lists the known ones.
    """
    if name not in KINDS:
        raise KeyError(f"unknown attention kind {name!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[name]


def writable(fmt: str) -> list[str]:
    """The kinds export format `fmt` can write."""
    return [name for name, r in KINDS.items() if r.export_as(fmt) is not None]


def own_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every kind module's own parameters inside `module` (its `OWN`: e.g. linear_swa's
    feature maps and gate): what heal trains and checkpoints besides LoRA."""
    classes = tuple(r.module for r in KINDS.values() if r.module is not None)
    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, classes):
            for sub in mod.OWN:
                obj = getattr(mod, sub)
                prefix = f"{name}.{sub}" if name else sub
                if isinstance(obj, nn.Parameter):
                    out.append((prefix, obj))
                else:
                    out += [(f"{prefix}.{n}", p) for n, p in obj.named_parameters()]
    return out


def __getattr__(name: str):
    """Name tuples derived from the registry when asked, so a kind registered later is in them."""
    derived = {"NAMES": lambda r: True, "WINDOWED": lambda r: r.windowed, "CACHELESS": lambda r: r.cacheless}
    if name in derived:
        return tuple(k for k, r in KINDS.items() if derived[name](r))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


for _module in (softmax, swa, linear_swa, none):
    register(_module.KIND)

__all__ = ["EXPORT_FORMATS", "KINDS", "LINEAR_MIXES", "ORIGINAL", "Kind", "kind", "own_parameters", "register", "unregister",
           "writable"]
