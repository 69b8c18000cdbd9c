"""Build the attention module a plan entry names, from the original attention module.

The modules themselves live with their kinds (layerboost/kinds/<kind>.py); this file only asks the registry.
"""

from __future__ import annotations

import torch.nn as nn

from .kinds import ORIGINAL, kind, own_parameters


def build_attention(orig: nn.Module, spec) -> nn.Module:
    """The module for `spec` (a `LayerSpec`; the class its kind's record names), built from the original
    attention `orig` (the original itself where the kind keeps it).

    Raises:
        KeyError: unknown kind (the message lists the known ones).
        TypeError: the new module has parameters that are neither the original's nor named in its `OWN`
            (heal would neither train nor checkpoint them).
    """
    cls = kind(spec.kind).module
    if cls is None:
        return orig
    new = cls(orig, spec)
    known = {id(p) for p in orig.parameters()} | {id(p) for _, p in own_parameters(new)}
    stray = [n for n, p in new.named_parameters() if id(p) not in known]
    if stray:
        raise TypeError(f"{cls.__name__} (kind {spec.kind!r}) has parameters {stray[:4]} that are neither the "
                        "original attention's nor named in its OWN: heal would neither train nor checkpoint them")
    return new


def attention_kind(module: nn.Module) -> str:
    """The kind of a decoder layer's attention module (an original module: `ORIGINAL`)."""
    spec = getattr(module, "spec", None)
    return spec.kind if spec is not None else ORIGINAL


__all__ = ["attention_kind", "build_attention"]
