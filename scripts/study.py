"""What the healing studies (heal_curve.py, heal_schedule.py) share: a study folder with one settings file, named
heals in it that each resume after a kill, and JSON read and written atomically."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

from layerboost.util import read_json


def write(path: Path, obj) -> None:
    from layerboost.util import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj)


def claim(settings_file: Path, meta: dict, what: str) -> None:
    """Write the study's settings; a folder holding a study made with other settings is refused (the command line
    may differ)."""
    old = read_json(settings_file)
    if old is not None and {k: v for k, v in old.items() if k != "command"} != {k: v for k, v in meta.items() if k != "command"}:
        raise SystemExit(f"error: {settings_file.parent} holds a {what} with other settings; use another --out")
    write(settings_file, meta)


def pattern_plan(base, window: int):
    """The studies' plan: softmax, swa(window), none, repeated over the layers (10/10/10 on SmolLM2-135M)."""
    import layerboost as lb

    n = base.config.num_hidden_layers
    return lb.LayerPlan.from_kinds([("softmax", "swa", "none")[i % 3] for i in range(n)], window=window)


def model_at(base, plan, settings: dict, snapshot: Path):
    """A heal's hybrid at one of its snapshots: a fresh conversion with the heal's settings, the snapshot's
    trainable parameters loaded, the adapters merged."""
    from layerboost.heal import HealConfig, build_hybrid, load_snapshot

    h = build_hybrid(copy.deepcopy(base), plan, HealConfig(**settings))
    load_snapshot(snapshot, h)
    return h.peft_model.merge_and_unload().eval()


def heal_each(tag: str, base, plan, out: Path, runs: dict[str, dict], **common) -> None:
    """Heal a fresh copy of `base` with `plan` into out/<name> for each named run (its settings on top of
    `common`); a finished run is skipped, an interrupted one resumes from its checkpoint."""
    from layerboost.heal import heal

    for name, opts in runs.items():
        folder = out / name
        if (folder / "heal.json").is_file():
            print(f"[{tag}] {name}: done", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        print(f"[{tag}] {name}: healing to {common.get('tokens', opts.get('tokens'))} tokens", file=sys.stderr)
        heal(copy.deepcopy(base), plan, out=folder, resume=True, **common, **opts)
        print(f"[{tag}] {name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
