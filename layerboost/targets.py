"""Engine targets: one record per place a hybrid is served, and what a plan must be to run there.

A target is named by the engine (`plan --target`, the run config's `plan.target`) and written by one export format
(`export --format`), whose name is the key every kind's record uses for what that format writes for its layers
(kinds/record.py). Which kinds a target runs comes from those records; the rules beyond the kinds are this record's
flags. plan, export, GGUF export, run and compare ask `problems()` here; nothing else states a target's rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kinds import EXPORT_FORMATS, KINDS, writable

EMPTY_FULL_CACHE = ("no softmax layer beside none layers: llama.cpp's full-attention cache would hold only the none "
                    "layers' empty caches, and it fails to create a context (measured); keep one softmax layer")


@dataclass(frozen=True)
class Target:
    """Where a hybrid is served.

    Attributes:
        name: the engine's name, the word `plan --target` and the run config take.
        format: the export format that writes it (`export --format`; a key of the kinds' `export` records);
            None: layerboost's own runtime, which runs every plan.
        one_window: the engine holds one sliding window per model.
        attention_in_layer0: layer 0 must attend (llama.cpp reads head sizes there).
        full_beside_empty: a layer without attention needs a layer with a full cache beside it (llama.cpp cannot
            create a context whose full-attention cache holds only empty layers).
    """

    name: str
    format: str | None
    one_window: bool = False
    attention_in_layer0: bool = False
    full_beside_empty: bool = False

    def kinds(self) -> list[str]:
        """The kinds this target runs."""
        return list(KINDS) if self.format is None else writable(self.format)

    def problems(self, plan) -> list[str]:
        """Why this target cannot run `plan`, one line each (empty: it can)."""
        if self.format is None:
            return []
        kinds = [s.kind for s in plan.layers]
        out = []
        for name, record in KINDS.items():  # what the format cannot write, and what to do instead: the kind's record
            where = [i for i, k in enumerate(kinds) if k == name]
            if where and record.export_as(self.format) is None:
                out.append(f"layers {where} are {name}: " + record.refusal(self.format, self.kinds()))
        if self.attention_in_layer0 and kinds and KINDS[kinds[0]].cacheless:
            out.append(f"layer 0 is {kinds[0]}: {self.name} reads head sizes from layer 0; keep attention there")
        if self.full_beside_empty and empty_full_cache(kinds):
            out.append(EMPTY_FULL_CACHE)
        return out + self.window_problems(plan)

    def window_problems(self, plan) -> list[str]:
        """The plan's windows against what the engine holds (empty: it holds them)."""
        windows = sorted({s.window for s in plan.layers if KINDS[s.kind].windowed})
        if self.one_window and len(windows) > 1:
            return [f"the plan has several windows {windows}: {self.name} holds one window per model; "
                    "re-plan with one window"]
        return []


def empty_full_cache(kinds: list[str]) -> bool:
    """Layers without attention and no layer with a full cache (e.g. swa + none, no softmax)."""
    return any(KINDS[k].cacheless for k in kinds) and not any(KINDS[k].cache == "full" for k in kinds)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("layerboost", None),  # layerboost's own runtime: every plan
    Target("llama.cpp", "gguf", one_window=True, attention_in_layer0=True, full_beside_empty=True),
    Target("transformers", "transformers", one_window=True),  # transformers; vLLM through its Transformers backend
    Target("deci", "deci"),  # vLLM, SGLang, TensorRT-LLM and mlx-lm (DeciLM / Nemotron-NAS block_configs)
)}
FORMATS = tuple(t.format for t in TARGETS.values() if t.format is not None)
if sorted(FORMATS) != sorted(EXPORT_FORMATS):
    raise RuntimeError(f"export formats {sorted(EXPORT_FORMATS)} (kinds/record.py) and targets' {sorted(FORMATS)} differ")


def register(target: Target) -> None:
    """Add a target (plan --target, the run config and make_plan then take its name); its format must be one the
    kinds' records name (kinds/record.py EXPORT_FORMATS) or None."""
    if target.name in TARGETS:
        raise ValueError(f"target {target.name!r} exists")
    if target.format is not None and target.format not in EXPORT_FORMATS:
        raise ValueError(f"target {target.name!r}: format {target.format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    TARGETS[target.name] = target


def unregister(name: str) -> None:
    TARGETS.pop(name)


def by_format(fmt: str) -> Target:
    """The target an export format writes for (the first registered)."""
    return next(t for t in TARGETS.values() if t.format == fmt)


def target_problems(plan, target: str) -> list[str]:
    """Why `target` (a name of TARGETS) cannot run `plan`, one line each (empty: it can)."""
    return TARGETS[target].problems(plan)


__all__ = ["EMPTY_FULL_CACHE", "FORMATS", "TARGETS", "Target", "by_format", "empty_full_cache", "register",
           "target_problems", "unregister"]
