"""Healing: distil the original model (teacher) into its converted hybrid (student) on a token budget.

    stage 1  attention transfer: every `swa` / `linear_swa` layer learns (feature maps, gate, and LoRA
             on its q/k/v/o) to reproduce the teacher's attention output at that layer (MSE), with the
             teacher's hidden state as input, so layers train independently from one teacher pass.
    stage 2  LoRA distillation: KL(teacher || student) on next-token distributions at a temperature
             (+ optional cross-entropy); the adapters are then merged and a plain hybrid is saved.

The other local stage (`local="block"`, instead of stage 1; Puzzle's blockwise local distillation):
    block    every modified layer (swa, linear_swa, none, bias, linear) learns to reproduce the teacher's
             whole decoder block (attention + MLP + residual) from the teacher's input to that block:
             loss = mean over modified layers i of ||block_i(x_i) - y_i||^2 / ||y_i - x_i||^2, sums over
             the step's global batch (x_i, y_i: teacher hidden states before / after layer i), i.e. a
             normalised MSE of the block's residual branch (1.0: no better than an identity block). All
             modified layers train at once and independently from one teacher pass; no LM head. Trains
             LoRA on the layer's projections (attention and MLP, where it has them) and the kind's own
             parameters (feature maps and gates, bias, linear map).

Teacher targets can be read from a `TeacherCache` (`teacher_cache=DIR`, see teacher_cache.py) instead of
running the teacher: block boundaries for the block stage, the final hidden state (exact KL) or top-k
log-probabilities (`kd_topk=k`: KL between the teacher's top-k + tail-mass distribution and the student's
distribution grouped the same way, exact when k = V) for stage 2.

One network serves as both models. The teacher pass runs the same decoder layers with the adapters
disabled and the original attention modules (kept aside before conversion) swapped back in; the layers
before the first layer that differs run once and feed both. Teacher logits are computed under no_grad
and the KL is taken chunk by chunk over positions with an analytic gradient, so full-vocabulary fp32
logits are never held for the whole batch.

Data-parallel: under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) each process takes every
world-th row of the global batch and the trainable gradients are summed with one all-reduce per step
(gloo on CPU, nccl on GPU); losses are normalised by global token counts, so a run with P processes
matches a single-process run with the same global batch.

Shapes: B rows, T tokens per row, D hidden size, V vocabulary, N = B * T positions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .attention import LinearSlidingWindowAttention, NoAttention
from .corpus import PackedRows, TrainingDataError, documents, parse_tokens
from .plan import WINDOWED_KINDS, LayerPlan
from .surgery import CheckpointError, convert, decoder_parts, plan_of, save
from .teacher_cache import TeacherCache, boundary_name, model_fingerprint, topk_name

PAPER_TOKENS = 10_000_000  # the paper heals with 10M tokens
STATE_SCHEMA = 1
STAGES = ("attn", "block", "kd", "done")  # a recipe runs "attn" or "block" (the local stage), then "kd"
LOCAL_STAGES = ("attn", "block")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class HealConfigError(ValueError):
    """Invalid healing settings; the message lists every problem."""


@dataclass
class HealConfig:
    """Every healing setting. Construction parses budgets (`"10M"`) and validates everything at once.

    Args:
        tokens: total token budget of both stages (input tokens of packed rows).
        attn_distill: run the local stage (False: the paper's "w/o Attn. Distill." ablation; stage 2 gets the whole budget).
        attn_fraction: share of `tokens` given to stage 1 when it runs (local="attn").
        local: the local stage: `attn` (attention transfer, windowed layers) or `block` (block-wise local
            distillation of every modified layer).
        block_fraction, block_lr: the block stage's share of `tokens` and peak learning rate (local="block").
        seq_len: tokens per packed row. batch_size: rows per micro-batch per process.
        grad_accum: micro-batches per optimiser step (global batch = batch_size * grad_accum * processes).
        attn_lr / lr: peak learning rates of stage 1 / stage 2 (linear warm-up, cosine to 10%).
        attn_lora: stage 1 also trains the LoRA adapters on q/k/v/o of the windowed layers.
        lora_rank, lora_alpha, lora_dropout: peft LoRA settings.
        lora_targets: projection names that get adapters.
        lora_layers: `neighbours` (modified layers and `neighbours` layers either side), `modified`, `all`,
            or a comma list of layer indices.
        temperature, ce_weight: stage-2 loss = T^2 KL(p_teacher^T || p_student^T) + ce_weight * CE.
        train_attention_params: feature maps and gates keep training in stage 2.
        kl_chunk: positions per logits chunk in the KL.
        kd_topk: 0: stage 2 uses the teacher's full distribution (exact); k > 0: its top-k log-probs + tail mass.
        teacher_cache: folder of a `TeacherCache` shared by runs (None: the teacher runs every step).
        teacher_cache_blocks: the block stage caches its boundaries too (4 D bytes per token per boundary).
        checkpoint_every: optimiser steps between checkpoints (0: only at stage ends).
        precision: auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16, fp16 (autocast + grad scaling).
        data_dir: the evaluation data directory whose splits are refused as training data.
    """

    tokens: int | str = PAPER_TOKENS
    attn_distill: bool = True
    attn_fraction: float = 0.25
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    attn_lr: float = 1e-3
    attn_lora: bool = True
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: float = 0.05
    max_grad_norm: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_layers: str = "neighbours"
    neighbours: int = 1
    temperature: float = 1.0
    ce_weight: float = 0.0
    train_attention_params: bool = True
    kl_chunk: int = 1024
    local: str = "attn"
    block_fraction: float = 0.5
    block_lr: float = 1e-3
    kd_topk: int = 0
    teacher_cache: str | None = None
    teacher_cache_blocks: bool = True
    checkpoint_every: int = 100
    precision: str = "auto"
    device: str = "auto"
    shuffle_rows: int = 256
    segment_chars: int = 8192
    progress: bool = True
    data_dir: str | None = None
    fsdp: bool = False

    def __post_init__(self):
        problems = []
        try:
            self.tokens = parse_tokens(self.tokens)
        except ValueError as e:
            problems.append(f"tokens: {e}")
        if isinstance(self.lora_targets, str):
            self.lora_targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        self.lora_targets = tuple(self.lora_targets)
        for name in ("seq_len", "batch_size", "grad_accum", "lora_rank", "kl_chunk", "shuffle_rows", "segment_chars"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        if self.seq_len == 1:
            problems.append("seq_len must be >= 2")
        for name in ("checkpoint_every", "neighbours", "kd_topk"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                problems.append(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("attn_lr", "block_lr", "lr", "temperature", "lora_alpha"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("attn_fraction", "block_fraction", "warmup", "lora_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.ce_weight < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            problems.append("ce_weight, weight_decay and max_grad_norm must be >= 0")
        if self.local not in LOCAL_STAGES:
            problems.append(f"local must be one of {', '.join(LOCAL_STAGES)}, got {self.local!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not self.lora_targets:
            problems.append("lora_targets is empty")
        if self.lora_layers not in ("neighbours", "modified", "all"):
            try:
                [int(x) for x in str(self.lora_layers).split(",")]
            except ValueError:
                problems.append(f"lora_layers must be neighbours, modified, all or a comma list of ints, got {self.lora_layers!r}")
        if self.fsdp:
            problems.append("fsdp: FSDP sharding is not implemented yet; use data-parallel (DDP) for now")
        if problems:
            raise HealConfigError("invalid heal settings:\n  - " + "\n  - ".join(problems))

    @property
    def stage_tokens(self) -> dict[str, int]:
        """Tokens per stage of the recipe, in order: {local stage, "kd"}."""
        frac = self.attn_fraction if self.local == "attn" else self.block_fraction
        local = round(self.tokens * frac) if self.attn_distill else 0
        return {self.local: local, "kd": self.tokens - local}

    def to_dict(self) -> dict:
        """Every field, except those added with the block stage and the teacher cache (issue 11) while they
        hold the values that give the earlier recipe: settings recorded before them (a heal run's resume key,
        a comparison's resolved settings) still match."""
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        if d["local"] == "attn":  # block_fraction and block_lr change nothing then
            del d["block_fraction"], d["block_lr"]
        for k, v in {"local": "attn", "kd_topk": 0, "teacher_cache": None, "teacher_cache_blocks": True}.items():
            if d[k] == v:
                del d[k]
        return d

    def resume_key(self, data: str, plan: LayerPlan, model: str) -> dict:
        """What must not change between a run and its resumption."""
        d = self.to_dict()
        for k in ("progress", "checkpoint_every", "device", "data_dir"):
            d.pop(k)
        for k in ("teacher_cache", "teacher_cache_blocks"):  # where targets come from, not what they are
            d.pop(k, None)
        return {"config": d, "data": str(data), "plan": plan.to_dict(), "model": model}


# ---- processes ------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_dist(device: str) -> _Dist:
    """Join the process group when launched by torchrun / accelerate (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world <= 1:
        return _Dist(0, 1, torch.device(device))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), dev)


def _all_reduce(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---- one network, two roles -------------------------------------------------------------------------


class _Record(nn.Module):
    """Wraps a teacher attention module and keeps its input and output (stage-1 targets)."""

    def __init__(self, attn: nn.Module, store: dict, idx: int):
        super().__init__()
        self.attn, self.store, self.idx = attn, store, idx

    def forward(self, hidden_states, **kwargs):
        out = self.attn(hidden_states=hidden_states, **kwargs)
        self.store[self.idx] = (hidden_states, out[0])
        return out


@dataclass
class Hybrid:
    """The student (converted model with LoRA) and everything needed to run it as its own teacher.

    Attributes:
        peft_model: the `peft` model around the converted hybrid.
        layers: the decoder layers (shared by teacher and student).
        originals: layer -> (original attention, original input norm), for every modified layer;
            kept outside the module tree so they are neither trained nor saved.
        prefix: layers [0, prefix) are identical in teacher and student (no change, no adapters).
        windowed: layers whose kind is swa / linear_swa.
    """

    peft_model: nn.Module
    decoder: nn.Module
    layers: nn.ModuleList
    lm_head: nn.Module
    plan: LayerPlan
    originals: dict[int, tuple[nn.Module, nn.Module]]
    prefix: int
    windowed: list[int]
    lora_layers: list[int]
    eager: bool
    adapter_layers: list[nn.Module] = field(default_factory=list)

    @property
    def modified(self) -> list[int]:
        """Layers whose kind is not softmax (the block stage's layers)."""
        return sorted(self.originals)

    @contextlib.contextmanager
    def teacher(self, record: dict | None = None):
        """Adapters off and the original attention back in every modified layer (record: stage-1 targets)."""
        saved = {}
        try:
            # peft's `disable_adapter()` does the same but costs ~35 ms per call (it scans the whole model
            # and reads its status); flipping the flag every LoRA layer reads is all it needs.
            for mod in self.adapter_layers:
                mod._disable_adapters = True
            for i, (attn, norm) in self.originals.items():
                layer = self.layers[i]
                saved[i] = (layer.self_attn, layer.input_layernorm)
                if record is not None and i in self.windowed:
                    attn = _Record(attn, record, i)
                layer.self_attn, layer.input_layernorm = attn, norm
            yield
        finally:
            for mod in self.adapter_layers:
                mod._disable_adapters = False
            for i, (attn, norm) in saved.items():
                self.layers[i].self_attn, self.layers[i].input_layernorm = attn, norm

    def embed(self, input_ids: torch.Tensor):
        """Embeddings, rotary tables, positions and mask for full causal rows (no padding, no cache)."""
        x = self.decoder.embed_tokens(input_ids)  # (B, T, D)
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)[None]
        pe = self.decoder.rotary_emb(x, position_ids=pos)
        mask = None  # sdpa: None means causal
        if self.eager:  # eager attention needs the additive causal mask spelled out
            mask = torch.full((t, t), float("-inf"), device=x.device, dtype=x.dtype).triu(1)[None, None]
        return x, dict(position_embeddings=pe, position_ids=pos, attention_mask=mask)

    def run(self, x: torch.Tensor, start: int, end: int, ctx: dict) -> torch.Tensor:
        for layer in self.layers[start:end]:
            out = layer(x, **ctx)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def teacher_boundaries(self, x0: torch.Tensor, ctx: dict, need: list[int]) -> dict[int, torch.Tensor]:
        """Teacher hidden states (B, T, D) at layer boundaries `need` (j: the input of layer j, len(layers): the
        last output), from x0 = the input of layer `prefix` (shared with the student). Call under no_grad."""
        if min(need) < self.prefix:
            raise ValueError(f"boundaries {need} start before the first layer that differs ({self.prefix})")
        out = {self.prefix: x0} if self.prefix in need else {}
        x = x0
        with self.teacher():
            for j in range(self.prefix, max(need)):
                x = self.run(x, j, j + 1, ctx)
                if j + 1 in need:
                    out[j + 1] = x
        return out


def _lora_layer_indices(cfg: HealConfig, plan: LayerPlan) -> list[int]:
    n = len(plan)
    modified = [i for i, s in enumerate(plan.layers) if s.kind != "softmax"]
    if cfg.lora_layers == "all":
        return list(range(n))
    if cfg.lora_layers == "modified":
        return modified
    if cfg.lora_layers == "neighbours":
        return sorted({j for i in modified for j in range(i - cfg.neighbours, i + cfg.neighbours + 1) if 0 <= j < n})
    idx = sorted({int(x) for x in str(cfg.lora_layers).split(",")})
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise HealConfigError(f"lora_layers {bad} are outside the model's {n} layers")
    return idx


def build_hybrid(model: nn.Module, plan: LayerPlan, cfg: HealConfig) -> Hybrid:
    """Convert `model` (the original, in place), add LoRA with peft, and keep the teacher's attention aside.

    Raises:
        ValueError: the model is already converted (the teacher's attention would be gone).
    """
    import peft
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if plan_of(model) is not None:
        raise ValueError("heal needs the original model (the teacher); this one is already a layerboost hybrid")
    decoder, layers = decoder_parts(model)
    plan = LayerPlan(plan.layers, num_layers=len(layers))
    originals = {i: (layers[i].self_attn, layers[i].input_layernorm) for i, s in enumerate(plan.layers) if s.kind != "softmax"}
    if not originals:
        raise ValueError("the plan changes no layer: there is nothing to heal")
    torch.manual_seed(cfg.seed)  # kinds with random init (linear's `down`)
    convert(model, plan)
    for p in model.parameters():
        p.requires_grad_(False)

    lora_layers = _lora_layer_indices(cfg, plan)
    layers_path = next(n for n, m in model.named_modules() if m is layers)
    targets = []
    for i in lora_layers:
        for name, mod in layers[i].named_modules():
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.lora_targets:
                targets.append(f"{layers_path}.{i}.{name}")
    if not targets:
        raise HealConfigError(
            f"no nn.Linear named {list(cfg.lora_targets)} in layers {lora_layers}: nothing would get LoRA adapters"
        )
    torch.manual_seed(cfg.seed)  # LoRA A init
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none")
    peft_model = get_peft_model(model, lcfg)
    first_diff = min(list(originals) + lora_layers)
    windowed = [i for i, s in enumerate(plan.layers) if s.kind in WINDOWED_KINDS]
    adapter_layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    if not all(isinstance(getattr(m, "_disable_adapters", None), bool) and m.disable_adapters is m._disable_adapters
               for m in adapter_layers):
        raise RuntimeError(f"this peft version ({peft.__version__}) keeps LoRA's on/off switch elsewhere; "
                           "layerboost.heal needs updating")
    return Hybrid(peft_model, decoder, layers, model.get_output_embeddings(), plan, originals, first_diff, windowed,
                  lora_layers, model.config._attn_implementation == "eager", adapter_layers)


def _lora_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    from peft.tuners.lora import LoraLayer

    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, LoraLayer):
            for sub in (mod.lora_A, mod.lora_B):
                for pname, p in sub.named_parameters():
                    out.append((f"{name}.{'lora_A' if sub is mod.lora_A else 'lora_B'}.{pname}", p))
    return out


def _attention_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The attention kinds' own parameters (`OWN`: linear_swa's feature maps and gate, bias, linear's maps)."""
    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, (LinearSlidingWindowAttention, NoAttention)):
            for sub in mod.OWN:
                obj = getattr(mod, sub)
                if isinstance(obj, nn.Parameter):
                    out.append((f"{name}.{sub}", obj))
                else:
                    out += [(f"{name}.{sub}.{n}", p) for n, p in obj.named_parameters()]
    return out


def heal_params(h: Hybrid) -> dict[str, nn.Parameter]:
    """Every parameter healing can change (LoRA A/B everywhere + the kinds' own parameters): the checkpoint."""
    return dict(_lora_params(h.peft_model) + _attention_params(h.peft_model))


def stage_params(h: Hybrid, stage: str, cfg: HealConfig) -> list[nn.Parameter]:
    """Trainable parameters of a stage: stage 1 touches only the windowed layers' attention, the block stage
    every modified layer (its LoRA adapters, attention and MLP, and its kind's own parameters)."""
    if stage == "block":
        return [p for i in h.modified for _, p in _attention_params(h.layers[i]) + _lora_params(h.layers[i])]
    if stage == "attn":
        out = []
        for i in h.windowed:
            attn = h.layers[i].self_attn
            out += [p for _, p in _attention_params(attn)]
            if cfg.attn_lora:
                out += [p for _, p in _lora_params(attn)]
        return out
    out = [p for _, p in _lora_params(h.peft_model)]
    if cfg.train_attention_params:
        out += [p for _, p in _attention_params(h.peft_model)]
    return out


# ---- losses -----------------------------------------------------------------------------------------


def _autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def attn_step(h: Hybrid, ids: torch.Tensor, n_global: int, precision: str, scale: float = 1.0) -> torch.Tensor:
    """Stage 1 on one micro-batch: backward of sum over windowed layers of squared error / (L * N_global * D).

    Returns:
        the summed squared error per layer (L,) (detached), for logging.
    """
    record: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    last = max(h.windowed) + 1
    with torch.no_grad(), _autocast(ids.device, precision):
        x, ctx = h.embed(ids)
        x = h.run(x, 0, h.prefix, ctx)
        with h.teacher(record):
            h.run(x, h.prefix, last, ctx)  # only up to the last windowed layer: later layers give no target
    d = h.decoder.config.hidden_size
    sq = []
    loss = 0.0
    with _autocast(ids.device, precision):
        for i in h.windowed:
            inp, target = record[i]
            y = h.layers[i].self_attn(hidden_states=inp, **ctx)[0]
            err = (y.float() - target.float()).pow(2).sum()
            sq.append(err.detach())
            loss = loss + err / (len(h.windowed) * n_global * d)
    if loss.requires_grad:
        (loss * scale).backward()
    return torch.stack(sq)


def block_step(h: Hybrid, batches: list[tuple[torch.Tensor, list[int]]], precision: str, dist: _Dist,
               scale: float = 1.0, cache: TeacherCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The block stage on one optimiser step's local micro-batches [(ids (B, T), stream rows)]: backward of
    mean_i sum ||block_i(x_i) - y_i||^2 / den_i, den_i = sum ||y_i - x_i||^2 over the step's global batch.

    The teacher targets of every micro-batch are gathered first (so den is known, and all-reduced across
    processes, before any backward); then each modified block runs on its teacher input and backpropagates
    on its own (one block's graph in memory at a time).

    Returns:
        (err (M,), den (M,)), fp32, detached, M = modified layers: this process's summed squared errors and
        the global normalisers; err / den is the relative error of each layer.
    """
    mods = h.modified
    need = sorted({j for i in mods for j in (i, i + 1)})  # layer boundaries: inputs and outputs
    dev = h.lm_head.weight.device
    den = torch.zeros(len(mods), device=dev)
    work = []
    for ids, rows in batches:
        with torch.no_grad(), _autocast(ids.device, precision):
            x, ctx = h.embed(ids)
            got = [cache.load(boundary_name(j), rows, ids.shape[1], dev) for j in need] if cache is not None else None
            if got is not None and all(g is not None for g in got):
                tg = {j: g["h"] for j, g in zip(need, got)}
            else:
                tg = h.teacher_boundaries(h.run(x, 0, h.prefix, ctx), ctx, need)
                if cache is not None:
                    for j in need:
                        cache.save(boundary_name(j), rows, {"h": tg[j]})
            den += torch.stack([(tg[i + 1].float() - tg[i].float()).pow(2).sum() for i in mods])
        work.append((ctx, tg))
    _all_reduce(den, dist)
    err = torch.zeros(len(mods), device=dev)
    for ctx, tg in work:
        for k, i in enumerate(mods):
            with _autocast(dev, precision):
                out = h.layers[i](tg[i], **ctx)
            y = out[0] if isinstance(out, tuple) else out  # (B, T, D)
            e = (y.float() - tg[i + 1].float()).pow(2).sum()
            if e.requires_grad:
                (e * (scale / (len(mods) * den[k]))).backward()
            err[k] += e.detach()
    return err, den


def _topk_kl(zs_t: torch.Tensor, lse_s: torch.Tensor, logp: torch.Tensor, idx: torch.Tensor):
    """KL between the teacher's top-k + tail distribution and the student's grouped the same way, per position.

    Args:
        zs_t: student logits / tau (C, V) fp32; lse_s: their logsumexp (C, 1).
        logp, idx: the teacher's top-k log-probs at tau (C, k) and their token ids (C, k).

    Returns:
        (KL (C,), d KL / d zs_t (C, V)). With S the top-k, r = 1 - sum_S p the teacher's tail mass and
        q_tail = 1 - sum_S q the student's: KL = sum_S p log(p / q) + r log(r / q_tail), and the gradient is
        q - p~ with p~ = p on S and r q / q_tail elsewhere. k = V gives the exact KL and gradient.
    """
    ls = zs_t - lse_s  # student log-probs (C, V)
    p = logp.exp()  # (C, k)
    r = (1 - p.sum(-1, keepdim=True)).clamp_(min=0)  # (C, 1)
    if idx.shape[-1] == zs_t.shape[-1]:
        r.zero_()  # every token is in the top-k: 1 - sum p is rounding error, there is no tail
    tail = ls.scatter(-1, idx, float("-inf"))  # student log-probs outside the top-k
    lq_tail = tail.logsumexp(-1, keepdim=True)  # (C, 1); -inf when k = V
    kl = (p * (logp - ls.gather(-1, idx))).sum(-1, keepdim=True) + torch.xlogy(r, r)
    kl = kl - torch.where(r > 0, r * lq_tail, torch.zeros_like(r))
    g = ls.exp_().scatter_add_(-1, idx, -p)  # q - p on the top-k
    g -= tail.sub_(lq_tail.clamp(min=torch.finfo(tail.dtype).min)).exp_().mul_(r)  # - r q / q_tail elsewhere
    return kl.squeeze(-1), g


def _teacher_topk(ht: torch.Tensor, w: torch.Tensor, b, tau: float, k: int, chunk: int):
    """The teacher's top-k log-probs at tau (N, k) fp32 and token ids (N, k) int32, from final hidden states (N, D)."""
    vals, ids = [], []
    for a in range(0, ht.shape[0], chunk):
        zt = nn.functional.linear(ht[a:a + chunk], w, b).float()  # (C, V)
        if tau != 1.0:
            zt = zt.div_(tau)
        v, i = (zt - zt.logsumexp(-1, keepdim=True)).topk(k, dim=-1)
        vals.append(v)
        ids.append(i.int())
    return torch.cat(vals), torch.cat(ids)


def _kd_chunks(hs: torch.Tensor, ht: torch.Tensor, labels: torch.Tensor | None, w: torch.Tensor, b, tau: float,
               ce_weight: float, n_kl: int, n_ce: int, chunk: int):
    """KL(teacher || student) at temperature `tau` (+ CE) over positions in chunks, with its gradient.

    Args:
        hs, ht: final hidden states (N, D) of student (detached) and teacher; or ht = (log-probs (N, k), ids
            (N, k)), the teacher's top-k at tau: the KL of `_topk_kl` then.
        labels: (N,) next tokens, -100 where there is none; None when ce_weight == 0.
        w, b: lm_head weight (V, D) and bias (or None).
        n_kl, n_ce: global position counts that normalise the two terms.

    Returns:
        (sum of KL, sum of CE, d loss / d hs) with loss = tau^2 * sum KL / n_kl + ce_weight * sum CE / n_ce.
    """
    grad = torch.empty_like(hs)
    kl_sum = hs.new_zeros((), dtype=torch.float32)
    ce_sum = hs.new_zeros((), dtype=torch.float32)
    topk = isinstance(ht, tuple)
    for a in range(0, hs.shape[0], chunk):
        zs = nn.functional.linear(hs[a:a + chunk], w, b).float()  # (C, V)
        if topk:
            zs_t = zs / tau if tau != 1.0 else zs
            lse_s = torch.logsumexp(zs_t, dim=-1, keepdim=True)
            kl, g = _topk_kl(zs_t, lse_s, ht[0][a:a + chunk], ht[1][a:a + chunk].long())
            kl_sum += kl.sum()
            g.mul_(tau / n_kl)
        else:
            zt = nn.functional.linear(ht[a:a + chunk], w, b).float()
            if tau != 1.0:
                zs_t, zt = zs / tau, zt.div_(tau)
            else:
                zs_t = zs
            lse_t = torch.logsumexp(zt, dim=-1, keepdim=True)
            lse_s = torch.logsumexp(zs_t, dim=-1, keepdim=True)
            p_t = (zt - lse_t).exp_()
            # KL = sum p_t (log p_t - log p_s) = sum p_t (zt - zs) - lse_t + lse_s   (sum p_t = 1)
            kl_sum += (zt.sub_(zs_t).mul_(p_t).sum(-1, keepdim=True) - lse_t + lse_s).sum()
            g = (zs_t - lse_s).exp_().sub_(p_t).mul_(tau / n_kl)  # d(tau^2 KL / n) / d logits
        if ce_weight > 0:
            lab = labels[a:a + chunk]
            ok = lab >= 0
            lse = torch.logsumexp(zs, dim=-1, keepdim=True) if tau != 1.0 else lse_s
            picked = zs.gather(-1, lab.clamp(min=0)[:, None])
            ce_sum += ((lse - picked).squeeze(-1) * ok).sum()
            pg = (zs - lse).exp_()
            pg.scatter_add_(-1, lab.clamp(min=0)[:, None], -torch.ones_like(picked))
            g += pg.mul_(ok[:, None] * (ce_weight / n_ce))
        grad[a:a + chunk] = (g.to(w.dtype) @ w).to(hs.dtype)  # (C, D)
    return kl_sum, ce_sum, grad


def _kd_targets(h: Hybrid, x0: torch.Tensor, ctx: dict, cfg: HealConfig, rows: list[int] | None,
                cache: TeacherCache | None):
    """Stage 2's teacher side for one micro-batch (under no_grad): final normed hidden states (N, D), or with
    kd_topk the top-k (log-probs (N, k), ids (N, k)); read from `cache` when it holds every row, else computed
    (and stored)."""
    n_layers, (b, t, d) = len(h.layers), x0.shape
    name = topk_name(cfg.kd_topk, cfg.temperature) if cfg.kd_topk else boundary_name(n_layers)
    got = cache.load(name, rows, t, x0.device) if cache is not None else None
    if cfg.kd_topk and got is not None:
        return got["logp"].reshape(b * t, -1), got["idx"].reshape(b * t, -1)
    if got is not None:
        return h.decoder.norm(got["h"]).reshape(b * t, d)
    if cache is None and not cfg.kd_topk:
        with h.teacher():
            return h.decoder.norm(h.run(x0, h.prefix, n_layers, ctx)).reshape(b * t, d)
    last = h.teacher_boundaries(x0, ctx, [n_layers])[n_layers]  # (B, T, D)
    if not cfg.kd_topk:
        cache.save(name, rows, {"h": last})
        return h.decoder.norm(last).reshape(b * t, d)
    logp, idx = _teacher_topk(h.decoder.norm(last).reshape(b * t, d), h.lm_head.weight, h.lm_head.bias,
                              cfg.temperature, cfg.kd_topk, cfg.kl_chunk)
    if cache is not None:
        cache.save(name, rows, {"logp": logp.view(b, t, -1), "idx": idx.view(b, t, -1)})
    return logp, idx


def kd_step(h: Hybrid, ids: torch.Tensor, n_kl: int, n_ce: int, cfg: HealConfig, precision: str,
            scale: float = 1.0, rows: list[int] | None = None, cache: TeacherCache | None = None) -> torch.Tensor:
    """Stage 2 on one micro-batch: teacher pass (no grad) or cached targets, student pass, chunked KL; backward
    into the student. `rows`: the micro-batch's stream rows (the cache's keys).

    Returns:
        (sum KL, sum CE) over the micro-batch, detached.
    """
    with torch.no_grad(), _autocast(ids.device, precision):
        x, ctx = h.embed(ids)
        x0 = h.run(x, 0, h.prefix, ctx)  # shared by both
        ht = _kd_targets(h, x0, ctx, cfg, rows, cache)
    with _autocast(ids.device, precision):
        hs = h.decoder.norm(h.run(x0, h.prefix, len(h.layers), ctx))  # (B, T, D)
    labels = None
    if cfg.ce_weight > 0:
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        labels = labels.reshape(-1)
    d = hs.shape[-1]
    with torch.no_grad():
        kl, ce, grad = _kd_chunks(hs.detach().reshape(-1, d), ht, labels, h.lm_head.weight,
                                  h.lm_head.bias, cfg.temperature, cfg.ce_weight, n_kl, n_ce, cfg.kl_chunk)
    if hs.requires_grad:
        hs.backward((grad * scale).view_as(hs))
    return torch.stack([kl, ce])


# ---- held-out probes during healing ----------------------------------------------------------------


@torch.no_grad()
def probe(h: Hybrid, rows: torch.Tensor, precision: str = "fp32", batch: int = 4, chunk: int = 1024) -> dict:
    """Student vs teacher on held-out rows (B, T): mean KL(teacher || student) per token, next-token
    (argmax) agreement, and both perplexities of the text (positions 0..T-2 predicting 1..T-1)."""
    from .quality import logprob_sums, next_tokens

    kl = agree = nll_s = nll_t = 0.0
    w, b = h.lm_head.weight, h.lm_head.bias
    for mb in rows.split(batch):
        mb = mb.to(w.device)
        with _autocast(mb.device, precision):
            x, ctx = h.embed(mb)
            x0 = h.run(x, 0, h.prefix, ctx)
            with h.teacher():
                ht = h.decoder.norm(h.run(x0, h.prefix, len(h.layers), ctx))
            hs = h.decoder.norm(h.run(x0, h.prefix, len(h.layers), ctx))
        d = hs.shape[-1]
        targets = next_tokens(mb).reshape(-1)
        hs, ht = hs.reshape(-1, d), ht.reshape(-1, d)
        for a in range(0, hs.shape[0], chunk):
            sums = logprob_sums(nn.functional.linear(ht[a:a + chunk], w, b).float().log_softmax(-1),  # (C, V)
                                nn.functional.linear(hs[a:a + chunk], w, b).float().log_softmax(-1), targets[a:a + chunk])
            kl, agree, nll_s, nll_t = (t + s for t, s in zip((kl, agree, nll_s, nll_t), sums))
    n, n_next = rows.numel(), rows.shape[0] * (rows.shape[1] - 1)
    return {"kl": kl / n, "agree": agree / n, "ppl": math.exp(nll_s / n_next), "ppl_teacher": math.exp(nll_t / n_next),
            "tokens_scored": n}


# ---- evaluation helpers (two separate models; for tests and reports) --------------------------------


@torch.no_grad()
def distill_kl(teacher: nn.Module, student: nn.Module, input_ids: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean per-token KL(teacher || student) of next-token distributions on `input_ids` (B, T)."""
    zt = teacher(input_ids=input_ids, use_cache=False).logits.float() / temperature
    zs = student(input_ids=input_ids, use_cache=False).logits.float() / temperature
    lt, ls = zt.log_softmax(-1), zs.log_softmax(-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean().item()


@torch.no_grad()
def attention_mse(teacher: nn.Module, student: nn.Module, input_ids: torch.Tensor, layers: list[int]) -> dict[int, float]:
    """MSE between student and teacher attention outputs at `layers`, each fed the teacher's layer input."""
    _, t_layers = decoder_parts(teacher)
    _, s_layers = decoder_parts(student)
    got: dict[int, tuple] = {}
    hooks = [t_layers[i].self_attn.register_forward_hook(
        lambda m, a, kw, out, i=i: got.__setitem__(i, (kw["hidden_states"], out[0], kw)), with_kwargs=True)
        for i in layers]
    try:
        teacher(input_ids=input_ids, use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
    out = {}
    for i in layers:
        x, y, kw = got[i]
        kw = {k: v for k, v in kw.items() if k not in ("hidden_states", "cache", "past_key_values", "use_cache")}
        y_s = s_layers[i].self_attn(hidden_states=x, **kw)[0]
        out[i] = (y_s - y).pow(2).mean().item()
    return out


# ---- checkpoints ------------------------------------------------------------------------------------


def _save_checkpoint(work: Path, h: Hybrid, opt, scaler, state: dict) -> None:
    """Write work/checkpoint atomically (tmp folder, then rename); the previous one survives a crash."""
    from safetensors.torch import save_file

    ck, tmp, old = work / "checkpoint", work / "checkpoint.tmp", work / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: p.detach().contiguous().cpu() for k, p in heal_params(h).items()}, tmp / "params.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(rng, tmp / "rng.safetensors")
    torch.save({"optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    with open(tmp / "state.json", "rb") as f:
        os.fsync(f.fileno())
    if ck.exists():
        shutil.rmtree(old, ignore_errors=True)
        ck.rename(old)
    tmp.rename(ck)
    shutil.rmtree(old, ignore_errors=True)


def _find_checkpoint(work: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old: killed between the two renames
        if (work / name / "state.json").is_file():
            return work / name
    return None


def _load_checkpoint(ck: Path, h: Hybrid) -> dict:
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
    except (OSError, ValueError, SafetensorError, RuntimeError, json.JSONDecodeError, EOFError) as e:
        raise CheckpointError(
            f"the heal checkpoint {ck} is corrupt or incomplete ({type(e).__name__}: {e}); delete {ck.parent} "
            "to start over, or restore the folder"
        ) from e
    mine = heal_params(h)
    if set(params) != set(mine):
        missing, extra = sorted(set(mine) - set(params)), sorted(set(params) - set(mine))
        raise CheckpointError(f"{ck} does not match this model and plan: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for k, p in mine.items():
            if params[k].shape != p.shape:
                raise CheckpointError(f"{ck}: {k} has shape {tuple(params[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(params[k])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    state["_opt"] = opt
    return state


# ---- the loop ---------------------------------------------------------------------------------------


def _lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine from `peak` down to 10% of it."""
    w = math.ceil(warmup * total)
    if step < w:
        return peak * (step + 1) / w
    frac = (step - w) / max(1, total - w)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _micro_batch_spans(rows: list[torch.Tensor], size: int) -> Iterator[tuple[int, int]]:
    """(i, j): consecutive rows of equal length, at most `size` per batch (only a budget's last row is shorter)."""
    i = 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and j - i < size and len(rows[j]) == len(rows[i]):
            j += 1
        yield i, j
        i = j


@dataclass
class _Run:
    h: Hybrid
    cfg: HealConfig
    dist: _Dist
    stream: PackedRows
    work: Path
    precision: str
    log_lines: int = 0
    state: dict = field(default_factory=dict)
    probe_rows: torch.Tensor | None = None
    probe_at: list[int] = field(default_factory=list)  # total tokens (both stages) at which to probe
    offset: int = 0  # tokens of earlier stages
    cache: TeacherCache | None = None
    train_s: float = 0.0  # seconds spent in training steps, all stages and sessions (no probes, no checkpoints)

    def maybe_probe(self, before: int, after: int) -> None:
        """Probe held-out text at every point of `probe_at` in (before, after] (0 is probed when before == -1)."""
        if self.probe_rows is None:
            return
        for at in self.probe_at:
            if before < at <= after or (before == -1 and at == 0):
                t0 = time.perf_counter()
                rec = {"probe": True, "tokens": after if at else 0, **probe(self.h, self.probe_rows, self.precision)}
                rec["probe_s"] = round(time.perf_counter() - t0, 3)
                rec["train_s"] = round(self.train_s, 3)
                self.log(rec)

    def log(self, record: dict) -> None:
        if self.dist.main:
            with open(self.work / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self.log_lines += 1


def _train_stage(run: _Run, stage: str, n_tokens: int, resume: dict | None) -> None:
    cfg, h, d = run.cfg, run.h, run.dist
    params = stage_params(h, stage, cfg)
    for p in heal_params(h).values():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise HealConfigError(f"stage {stage!r} has nothing to train (a plan with only `none` layers and attn_lora off?)")
    peak = {"attn": cfg.attn_lr, "block": cfg.block_lr, "kd": cfg.lr}[stage]
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=cfg.weight_decay, foreach=False)
    scaler = torch.amp.GradScaler(d.device.type) if run.precision == "fp16" else None
    step_rows = cfg.batch_size * cfg.grad_accum * d.world
    step_tokens = step_rows * cfg.seq_len
    total = math.ceil(n_tokens / step_tokens)
    step, done = 0, 0
    if resume is not None:
        opt.load_state_dict(resume["_opt"]["optimizer"])
        if scaler is not None and resume["_opt"]["scaler"] is not None:
            scaler.load_state_dict(resume["_opt"]["scaler"])
        step, done = resume["step"], resume["tokens"]
    bar = None
    if cfg.progress and d.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, initial=done, unit="tok", unit_scale=True, desc=f"heal {stage}", file=sys.stderr,
                   dynamic_ncols=True, smoothing=0.1)
    t_start = time.perf_counter()
    while done < n_tokens:
        t_step = time.perf_counter()
        need = min(step_tokens, n_tokens - done)
        first_row = run.stream.position
        rows, have = [], 0
        while have < need:
            try:
                r = next(run.stream)
            except StopIteration:
                raise TrainingDataError(
                    f"the training data ran out after {run.stream.position} rows of {cfg.seq_len} tokens, before the "
                    f"budget of {cfg.tokens} tokens: give more data or a smaller --tokens") from None
            rows.append(r[: need - have])
            have += len(rows[-1])
        n_global = sum(len(r) for r in rows)
        n_ce = n_global - len(rows)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, peak, cfg.warmup)
        scale = scaler.get_scale() if scaler is not None else 1.0
        stats = torch.zeros({"attn": len(h.windowed), "block": len(h.modified), "kd": 2}[stage])
        mine = rows[d.rank::d.world]
        ids = list(range(first_row, first_row + len(rows)))[d.rank::d.world]  # stream rows: the cache's keys
        batches = [(torch.stack(mine[i:j]).to(d.device), ids[i:j]) for i, j in _micro_batch_spans(mine, cfg.batch_size)]
        if stage == "block":
            err, den = block_step(h, batches, run.precision, d, scale, run.cache if cfg.teacher_cache_blocks else None)
            stats += err.cpu()
        for mb, mb_rows in batches:
            if stage == "attn":
                stats += attn_step(h, mb, n_global, run.precision, scale).cpu()
            elif stage == "kd":
                stats += kd_step(h, mb, n_global, max(1, n_ce), cfg, run.precision, scale, mb_rows, run.cache).cpu()
        if d.world > 1:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            _all_reduce(flat, d)
            o = 0
            for p in params:
                p.grad = flat[o:o + p.numel()].view_as(p).clone()
                o += p.numel()
            _all_reduce(stats, d)
        if scaler is not None:
            scaler.unscale_(opt)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        done += n_global
        if stage == "attn":
            per_layer = (stats / (n_global * h.decoder.config.hidden_size)).tolist()
            rec = {"stage": stage, "step": step, "tokens": done, "loss": sum(per_layer) / len(per_layer),
                   "mse": dict(zip(map(str, h.windowed), per_layer))}
        elif stage == "block":
            rel = (stats / den.cpu()).tolist()  # relative error of each modified block
            rec = {"stage": stage, "step": step, "tokens": done, "loss": sum(rel) / len(rel),
                   "rel": dict(zip(map(str, h.modified), rel))}
        else:
            kl, ce = stats[0].item() / n_global, stats[1].item() / max(1, n_ce)
            rec = {"stage": stage, "step": step, "tokens": done, "loss": cfg.temperature ** 2 * kl + cfg.ce_weight * ce,
                   "kl": kl, "ce": ce if cfg.ce_weight > 0 else None}
        rec["lr"] = opt.param_groups[0]["lr"]
        run.train_s += time.perf_counter() - t_step
        rec["elapsed_s"] = round(time.perf_counter() - t_start, 3)
        rec["train_s"] = round(run.train_s, 3)
        run.log(rec)
        run.maybe_probe(run.offset + done - n_global, run.offset + done)
        if bar is not None:
            bar.update(n_global)
            bar.set_postfix(loss=f"{rec['loss']:.4g}", step=f"{step}/{total}")
        last = done >= n_tokens
        if last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            nxt = STAGES[STAGES.index(stage) + 1] if last else stage
            state = {"schema_version": STATE_SCHEMA, "stage": nxt, "step": 0 if last else step,
                     "tokens": 0 if last else done, "position": run.stream.position, "log_lines": run.log_lines,
                     "train_s": run.train_s}
            if d.main:
                _save_checkpoint(run.work, h, opt, scaler, state)
            _barrier(d)
    if bar is not None:
        bar.close()


def merge_and_save(h: Hybrid, out: str | os.PathLike, tokenizer=None) -> nn.Module:
    """Merge the LoRA adapters into the weights and save a plain hybrid that `layerboost.load` reads.

    Returns:
        the merged model (the adapters are gone from `h.peft_model` afterwards).
    """
    merged = h.peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    merged.eval()
    save(merged, out, tokenizer=tokenizer)
    return merged


def _check_cache_space(cache: TeacherCache, h: Hybrid, cfg: HealConfig, budgets: dict) -> None:
    """Raise before training when the targets this run may write do not fit the cache's disk (upper bound:
    fp32 boundaries; files already there are counted as new)."""
    d = h.decoder.config.hidden_size
    n_bound = len({j for i in h.modified for j in (i, i + 1)}) if cfg.teacher_cache_blocks else 0
    need = budgets.get("block", 0) * n_bound * 4 * d
    need += budgets["kd"] * (8 * cfg.kd_topk if cfg.kd_topk else 4 * d)
    free = shutil.disk_usage(cache.dir).free
    if need > 0.9 * free:
        raise HealConfigError(
            f"the teacher cache may need {need / 1e9:.1f} GB and {cache.dir} has {free / 1e9:.1f} GB free: set "
            "teacher_cache_blocks=False (block targets are 4 D bytes per token per layer boundary), a smaller "
            "budget, or another teacher_cache folder")


def _resolve_precision(p: str, device: torch.device) -> str:
    if p == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if p == "fp16" and device.type != "cuda":
        raise HealConfigError("precision fp16 needs a CUDA device; use fp32 (or bf16) on CPU")
    return p


def heal(model_or_name, plan: LayerPlan | str | os.PathLike, *, data: str | os.PathLike, out: str | os.PathLike,
         tokens: int | str | None = None, attn_distill: bool = True, tokenizer=None, resume: bool = False,
         config: HealConfig | None = None, probe_rows: torch.Tensor | None = None,
         probe_at: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0), **options) -> Path:
    """Convert the model to `plan`, heal it by distillation from the original, save the merged hybrid in `out`.

    Args:
        model_or_name: the original model (converted in place) or a name for `load_model`.
        plan: a `LayerPlan` or a plan JSON file.
        data: text file(s)/folder, or `hub:PATH[:CONFIG][:SPLIT]`; evaluation splits are refused.
        out: output folder: the healed hybrid (readable by `layerboost.load`), `heal.json`, and
            `heal_state/` (log.jsonl with one line per step, the latest checkpoint).
        tokens: total budget (`10M`, `1.5M`, `200k`); default: the paper's 10M.
        attn_distill: run stage 1 (attention transfer) before stage 2.
        tokenizer: needed when `model_or_name` is a model object.
        resume: continue from the checkpoint in `out/heal_state`.
        config / **options: a `HealConfig`, or its fields as keyword arguments.
        probe_rows: held-out token rows (B, T): when given, KL(teacher || student), next-token agreement and
            perplexity on them are logged (`"probe": true` lines of log.jsonl) at the fractions `probe_at` of
            the budget, so a healing curve can be drawn.

    Returns:
        `out`, the saved hybrid's folder.

    Raises:
        HealConfigError, TrainingDataError, CheckpointError, FileExistsError (out holds a run and resume is off).
    """
    from .models import load_model

    if config is None:
        config = HealConfig(**({"tokens": tokens} if tokens is not None else {}), attn_distill=attn_distill, **options)
    elif tokens is not None or options:
        config = dataclasses.replace(config, **({"tokens": tokens} if tokens is not None else {}), **options)
    cfg = config
    d = _setup_dist(cfg.device)
    out = Path(out)
    work = out / "heal_state"
    model_name = model_or_name if isinstance(model_or_name, (str, os.PathLike)) else type(model_or_name).__name__
    if isinstance(model_or_name, (str, os.PathLike)):
        model, tokenizer = load_model(str(model_or_name), device=d.device)
    else:
        model = model_or_name.to(d.device)
        if tokenizer is None:
            raise HealConfigError("pass tokenizer= when heal gets a model object")
    if not isinstance(plan, LayerPlan):
        plan = LayerPlan.load(plan)
    key = cfg.resume_key(str(data), plan, str(model_name))
    ck = _find_checkpoint(work)
    if ck is not None and not resume:
        raise FileExistsError(f"{out} already holds a heal run ({ck}); pass --resume to continue it or choose another --out")
    if resume and ck is not None:
        old = json.loads((work / "config.json").read_text()) if (work / "config.json").is_file() else None
        if old != json.loads(json.dumps(key)):
            diff = sorted(k for k in key["config"] if old and old.get("config", {}).get(k) != key["config"][k])
            raise CheckpointError(f"{work} was made with other settings ({diff or 'data/plan/model'} differ): "
                                  "resume with the same settings or start a new --out")

    # The stream is checked (eval splits refused) before any model work.
    def docs():
        return documents(str(data), seed=cfg.seed, data_dir=cfg.data_dir, segment_chars=cfg.segment_chars)

    docs()  # raises now for missing data or evaluation splits, before the model is touched
    stream = PackedRows(docs, tokenizer, cfg.seq_len, cfg.seed, cfg.shuffle_rows)
    precision = _resolve_precision(cfg.precision, d.device)
    vocab = model.get_output_embeddings().weight.shape[0]
    if cfg.kd_topk > vocab:
        raise HealConfigError(f"kd_topk {cfg.kd_topk} is larger than the vocabulary ({vocab})")
    cache = None
    if cfg.teacher_cache:  # keyed by everything the teacher's targets depend on; the original weights, before surgery
        src = Path(str(data))
        cache = TeacherCache(cfg.teacher_cache, {
            "architecture": type(model).__name__, "weights": model_fingerprint(model),
            "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
            "data": str(src.resolve()) if src.exists() else str(data), "seq_len": cfg.seq_len, "seed": cfg.seed,
            "shuffle_rows": cfg.shuffle_rows, "segment_chars": cfg.segment_chars, "precision": precision,
            "device": d.device.type, "attn_implementation": model.config._attn_implementation})
    h = build_hybrid(model, plan, cfg)
    for attn, norm in h.originals.values():
        attn.to(d.device)
        norm.to(d.device)
    h.peft_model.train()  # LoRA dropout; the base model has no dropout of its own at p=0
    state = None
    if resume and ck is not None:
        state = _load_checkpoint(ck, h)
        stream.skip(state["position"])
    if d.main:
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(json.dumps(key, indent=1))
        log = work / "log.jsonl"
        keep = state["log_lines"] if state else 0
        lines = log.read_text().splitlines(keepends=True)[:keep] if log.is_file() else []
        log.write_text("".join(lines))
    _barrier(d)
    run = _Run(h, cfg, d, stream, work, precision, log_lines=state["log_lines"] if state else 0,
               probe_rows=probe_rows if d.main else None, probe_at=sorted({round(f * cfg.tokens) for f in probe_at}),
               cache=cache, train_s=state.get("train_s", 0.0) if state else 0.0)
    t0 = time.perf_counter()
    budgets = dict(cfg.stage_tokens)  # {local stage, "kd"}, in order
    if cfg.local == "attn" and not h.windowed:  # no swa / linear_swa layer: stage 1 has nothing to transfer
        budgets = {"attn": 0, "kd": cfg.tokens}
    if cache is not None:
        _check_cache_space(cache, h, cfg, budgets)
    stage = state["stage"] if state else next((s for s, n in budgets.items() if n > 0), "kd")
    if state is None:
        run.maybe_probe(-1, 0)
    offset = 0
    for s, n in budgets.items():
        if STAGES.index(stage) <= STAGES.index(s):
            run.offset = offset
            if n > 0:
                _train_stage(run, s, n, state if state and state["stage"] == s and state["step"] > 0 else None)
            stage = STAGES[STAGES.index(s) + 1]
        offset += n
    seconds = time.perf_counter() - t0
    if d.main:
        merge_and_save(h, out, tokenizer)
        summary = {"schema_version": STATE_SCHEMA, "model": str(model_name), "data": str(data), "plan": plan.to_dict(),
                   "config": cfg.to_dict(), "stage_tokens": budgets, "processes": d.world,
                   "seconds_this_session": round(seconds, 1), "train_s": round(run.train_s, 3),
                   "teacher_cache": cache.summary() if cache is not None else None, "torch": torch.__version__}
        (out / "heal.json").write_text(json.dumps(summary, indent=1))
    _barrier(d)
    return out


# ---- CLI ----------------------------------------------------------------------------------------------


def add_heal_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `layerboost heal`."""
    p.add_argument("--model", required=True, help="the original model: smollm2-135m, a .gguf, an HF folder or hub id")
    p.add_argument("--plan", required=True, help="plan JSON (from `layerboost plan`)")
    p.add_argument("--data", required=True,
                   help="training text: a file or folder of .txt, or hub:PATH[:CONFIG][:SPLIT]; eval splits are refused")
    p.add_argument("--tokens", default="10M", help="token budget of both stages, e.g. 10M (paper), 1.5M, 200k")
    p.add_argument("--out", required=True, help="output folder for the healed hybrid")
    p.add_argument("--no-attn-distill", action="store_true", help="skip stage 1 (attention transfer)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--data-dir", help="evaluation data directory (its splits are refused as training data)")
    defaults = HealConfig()
    g = p.add_argument_group("training")
    for name, typ, help_ in [
        ("attn_fraction", float, "share of the budget for stage 1"),
        ("seq_len", int, "tokens per packed row"),
        ("batch_size", int, "rows per micro-batch per process"),
        ("grad_accum", int, "micro-batches per optimiser step"),
        ("seed", int, "data order and LoRA init"),
        ("attn_lr", float, "stage-1 peak learning rate"),
        ("lr", float, "stage-2 peak learning rate"),
        ("lora_rank", int, "LoRA rank"),
        ("lora_alpha", float, "LoRA alpha"),
        ("lora_dropout", float, "LoRA dropout"),
        ("lora_targets", str, "comma list of projection names that get LoRA"),
        ("lora_layers", str, "neighbours | modified | all | comma list of layers"),
        ("neighbours", int, "layers either side of a modified layer that also get LoRA"),
        ("temperature", float, "KD temperature"),
        ("ce_weight", float, "weight of the cross-entropy term"),
        ("kl_chunk", int, "positions per logits chunk"),
        ("local", str, "local stage: attn (attention transfer) | block (block-wise local distillation)"),
        ("block_fraction", float, "share of the budget for the block stage (--local block)"),
        ("block_lr", float, "block-stage peak learning rate"),
        ("kd_topk", int, "stage 2 against the teacher's top-k log-probs + tail mass (0: full distribution)"),
        ("teacher_cache", str, "folder of teacher targets shared by runs (default: none, the teacher runs every step)"),
        ("checkpoint_every", int, "optimiser steps between checkpoints"),
        ("precision", str, "auto | fp32 | bf16 | fp16"),
    ]:
        default = getattr(defaults, name)
        if isinstance(default, tuple):
            default = ",".join(default)
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=default, help=help_)
    from .cli import add_device_dtype

    add_device_dtype(g, dtype=False)
    g.add_argument("--no-attn-lora", action="store_true", help="stage 1 trains only feature maps and gates")
    g.add_argument("--fsdp", action="store_true", help="shard the frozen weights with FSDP (not implemented yet)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-teacher-cache-blocks", action="store_true",
                   help="the teacher cache keeps no block-stage targets (they take 4 D bytes per token per boundary)")


def _check_before_loading(args: argparse.Namespace, cfg: HealConfig) -> None:
    """What `heal` would find wrong only after loading the model: the plan, --out, --resume and the data."""
    from .cli import check_writable, model_fits

    model_fits(args.model, LayerPlan.load(args.plan))
    check_writable(args.out)
    out = Path(args.out)
    ck = _find_checkpoint(out / "heal_state")
    if args.resume and ck is None:
        raise CheckpointError(f"--resume: {out} holds no heal checkpoint (heal_state/checkpoint) to continue; "
                              "drop --resume to start a new run there")
    if not args.resume and ck is not None:
        raise CheckpointError(f"{out} already holds a heal run ({ck}): pass --resume to continue it, or choose another --out")
    if not args.resume and (out / "config.json").is_file():
        raise CheckpointError(f"{out} already holds a model (config.json): choose another --out, or delete it first")
    documents(str(args.data), seed=cfg.seed, data_dir=cfg.data_dir, segment_chars=cfg.segment_chars)


def run_heal_cli(args: argparse.Namespace) -> int:
    """Run `layerboost heal` from parsed arguments; prints the output folder."""
    names = ["attn_fraction", "seq_len", "batch_size", "grad_accum", "seed", "attn_lr", "lr", "lora_rank", "lora_alpha",
             "lora_dropout", "lora_targets", "lora_layers", "neighbours", "temperature", "ce_weight", "kl_chunk",
             "checkpoint_every", "precision", "device", "local", "block_fraction", "block_lr", "kd_topk", "teacher_cache"]
    opts = {n: getattr(args, n) for n in names}
    cfg = HealConfig(tokens=args.tokens, attn_distill=not args.no_attn_distill, attn_lora=not args.no_attn_lora,
                     progress=not args.no_progress, data_dir=args.data_dir, fsdp=args.fsdp,
                     teacher_cache_blocks=not args.no_teacher_cache_blocks, **opts)
    _check_before_loading(args, cfg)
    out = heal(args.model, args.plan, data=args.data, out=args.out, resume=args.resume, config=cfg)
    if _setup_dist(cfg.device).main:
        print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="layerboost heal", description=__doc__.split("\n\n")[0])
    add_heal_arguments(p)
    return run_heal_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
