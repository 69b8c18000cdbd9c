"""Checkpoints of a heal run: trainable parameters, optimiser, scaler and loop state, written atomically."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from ..surgery import CheckpointError
from .config import STAGES, STATE_SCHEMA
from .dist import Dist, full, load_full, reshard, shard_like
from .student import Hybrid, heal_params


def full_params(h: Hybrid, d: Dist | None = None) -> dict[str, torch.Tensor]:
    """Every healing parameter as a full CPU tensor (gathered from the ranks' shards; collective)."""
    if d is not None:
        reshard(d)
    return {k: full(p.detach()).contiguous().cpu() for k, p in heal_params(h).items()}


def full_optimizer_state(opt) -> dict:
    """The optimiser's state dict with full CPU tensors (collective), as a single process would write it."""
    sd = opt.state_dict()
    sd["state"] = {i: {k: full(v).cpu() if torch.is_tensor(v) else v for k, v in sorted(st.items())}
                   for i, st in sorted(sd["state"].items())}
    return sd


def load_optimizer(opt, sd: dict) -> None:
    """Load a state dict of full tensors, laying each state tensor out as its parameter is (sharded or not)."""
    opt.load_state_dict(sd)
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    opt.state[p][k] = shard_like(p, v)


def save_checkpoint(work: Path, h: Hybrid, opt, scaler, state: dict, d: Dist | None = None) -> None:
    """Write work/checkpoint atomically (tmp folder, then rename); the previous one survives a crash. Every rank
    calls it (the tensors are gathered); rank 0 writes."""
    from safetensors.torch import save_file

    params, optimizer = full_params(h, d), full_optimizer_state(opt)
    if d is not None and not d.main:
        return
    ck, tmp, old = work / "checkpoint", work / "checkpoint.tmp", work / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(params, tmp / "params.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(rng, tmp / "rng.safetensors")
    torch.save({"optimizer": optimizer, "scaler": scaler.state_dict() if scaler is not None else None},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    with open(tmp / "state.json", "rb") as f:
        os.fsync(f.fileno())
    if ck.exists():
        shutil.rmtree(old, ignore_errors=True)
        ck.rename(old)
    tmp.rename(ck)
    shutil.rmtree(old, ignore_errors=True)


def load_params(params: dict[str, torch.Tensor], h: Hybrid, source) -> None:
    """Full tensors (a checkpoint's or a snapshot's) into the hybrid's healing parameters, each rank keeping its
    shard; checked first to be this model's, plan's and LoRA settings'.

    Raises:
        CheckpointError: names or shapes that differ.
    """
    mine = heal_params(h)
    if set(params) != set(mine):
        missing, extra = sorted(set(mine) - set(params)), sorted(set(params) - set(mine))
        raise CheckpointError(f"{source} was saved for another model, plan or LoRA settings: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for k, p in mine.items():
        if params[k].shape != p.shape:
            raise CheckpointError(f"{source} was saved for another model, plan or LoRA settings: {k} has shape "
                                  f"{tuple(params[k].shape)}, expected {tuple(p.shape)}")
    for k, p in mine.items():
        load_full(p, params[k])


def find_checkpoint(work: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old: killed between the two renames
        if (work / name / "state.json").is_file():
            return work / name
    return None


def load_checkpoint(ck: Path, h: Hybrid) -> dict:
    """Restore the trainable parameters and RNG; returns state.json (with the optimiser state under '_opt').

    Raises:
        CheckpointError: anything missing, unreadable or mismatched.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((ck / "state.json").read_text())
        if state.get("schema_version") != STATE_SCHEMA or state.get("stage") not in STAGES:
            raise ValueError(f"unknown schema {state.get('schema_version')!r} or stage {state.get('stage')!r}")
        params = load_file(ck / "params.safetensors")
        rng = load_file(ck / "rng.safetensors")
        opt = torch.load(ck / "optimizer.pt", weights_only=True, map_location="cpu")
    except (OSError, ValueError, SafetensorError, RuntimeError, json.JSONDecodeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"the heal checkpoint {ck} is corrupt or incomplete ({type(e).__name__}: {e}); delete {ck.parent} "
            "to start over, or restore the folder"
        ) from e
    load_params(params, h, ck)
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    state["_opt"] = opt
    return state


def save_snapshot(work: Path, h: Hybrid, tokens: int, d: Dist | None = None) -> Path:
    """The trainable parameters after `tokens` tokens, to work/snapshots/<tokens>.safetensors (atomically; every
    rank calls it, rank 0 writes)."""
    from safetensors.torch import save_file

    path = work / "snapshots" / f"{tokens}.safetensors"
    params = full_params(h, d)
    if d is None or d.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(params, tmp)
        os.replace(tmp, path)
    return path


def load_snapshot(path: str | os.PathLike, h: Hybrid) -> None:
    """Load a snapshot written by `save_snapshot` into a hybrid built with the same model, plan and settings.

    Raises:
        CheckpointError: unreadable, or made for another model, plan or settings.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        params = load_file(path)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read the snapshot {path} ({type(e).__name__}: {e})") from e
    load_params(params, h, path)
