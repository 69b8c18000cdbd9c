"""Healing settings: `HealConfig` validates every field at construction, and its resume key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..corpus import parse_tokens
from ..plan import LayerPlan


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
        weights_dtype: dtype the model's frozen weights (student and teacher) are loaded in: float32, or bfloat16
            (half the memory; needs precision bf16; the adapters, their optimiser state and the losses stay fp32,
            and the adapters merge into bf16 weights at the end).
        parallel: under torchrun, `replicate` (every rank holds the model, FSDP2 with one shard: data parallel)
            or `shard` (FSDP2 shards the decoder layers, student and teacher, over the ranks); see dist.py.
        data_dir: the evaluation data directory whose splits are refused as training data.
    """

    tokens: int | str = PAPER_TOKENS
    attn_distill: bool = True
    # Defaults measured by scripts/bench_heal_recipes.py (docs/results.md, issue 11): stage-2 lr 3e-3 reached the
    # old recipe's (lr 2e-4) final held-out KL in about a quarter of the time; 5e-3 broke down; rows of 256 tokens
    # healed better than 512 at equal tokens; 40% attention transfer and the block stage did not pay.
    attn_fraction: float = 0.25
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    attn_lr: float = 1e-3
    attn_lora: bool = True
    lr: float = 3e-3
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
    parallel: str = "replicate"
    weights_dtype: str = "float32"
    shuffle_rows: int = 256
    segment_chars: int = 8192
    progress: bool = True
    data_dir: str | None = None

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
        if self.weights_dtype not in ("float32", "bfloat16"):
            problems.append(f"weights_dtype must be float32 or bfloat16, got {self.weights_dtype!r}")
        elif self.weights_dtype == "bfloat16" and self.precision not in ("bf16", "auto"):
            problems.append(f"weights_dtype bfloat16 computes in bf16: set precision bf16 (got {self.precision!r})")
        if self.parallel not in ("replicate", "shard"):
            problems.append(f"parallel must be replicate or shard, got {self.parallel!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not self.lora_targets:
            problems.append("lora_targets is empty")
        if self.lora_layers not in ("neighbours", "modified", "all"):
            try:
                [int(x) for x in str(self.lora_layers).split(",")]
            except ValueError:
                problems.append(f"lora_layers must be neighbours, modified, all or a comma list of ints, got {self.lora_layers!r}")
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
        for k, v in {"local": "attn", "kd_topk": 0, "teacher_cache": None, "teacher_cache_blocks": True,
                     "parallel": "replicate", "weights_dtype": "float32"}.items():
            if d[k] == v:
                del d[k]
        return d

    def resume_key(self, data: str, plan: LayerPlan, model: str) -> dict:
        """What must not change between a run and its resumption."""
        d = self.to_dict()
        for k in ("progress", "checkpoint_every", "device", "data_dir"):
            d.pop(k)
        d.pop("parallel", None)  # how the ranks hold the model, not what is computed: any mode resumes any other
        for k in ("teacher_cache", "teacher_cache_blocks"):  # where targets come from, not what they are
            d.pop(k, None)
        return {"config": d, "data": str(data), "plan": plan.to_dict(), "model": model}

    REMOVED = {"fsdp": False}  # settings no longer known, with the value every run that recorded them had

    @classmethod
    def upgrade_key(cls, key: dict | None) -> dict | None:
        """A resume key recorded by an earlier version, without the settings since removed (when they held the
        only value those versions could run), so that its runs still resume."""
        if key is not None:
            for k, v in cls.REMOVED.items():
                if key.get("config", {}).get(k, v) == v:
                    key.get("config", {}).pop(k, None)
        return key
