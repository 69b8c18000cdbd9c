"""Healing settings: `HealConfig` validates every field at construction, and its resume key."""

from __future__ import annotations

import math

import dataclasses
from dataclasses import dataclass, field

from ..corpus import parse_tokens
from ..plan import LayerPlan


PAPER_TOKENS = 10_000_000  # the paper heals with 10M tokens
STATE_SCHEMA = 1
STAGES = ("attn", "block", "kd", "done")  # a recipe runs "attn" or "block" (the local stage), then "kd"
LOCAL_STAGES = ("attn", "block")
SCHEDULES = ("cosine", "linear", "constant")  # stage 2's learning rate after the warm-up
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class HealConfigError(ValueError):
    """Invalid healing settings; the message lists every problem."""


class HealDivergedError(HealConfigError):
    """The loss became NaN or infinite: nothing was saved as a healed model (the settings need changing)."""


def _f(default, help: str, **kw):
    """A setting: its default and its meaning (`layerboost heal --help` prints it)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class HealConfig:
    """Every healing setting, each with its meaning (`dataclasses.fields(HealConfig)[i].metadata["help"]`, the one
    home `layerboost heal --help` reads too). Construction parses budgets (`"10M"`) and validates everything at once.

    The defaults were chosen by scripts/bench_heal_recipes.py; what was measured and why is in
    docs/experiments/healing.md#healing-recipes-time-to-quality.
    """

    tokens: int | str = _f(PAPER_TOKENS, "total token budget of both stages (input tokens of packed rows), e.g. "
                           "10M (the paper's), 1.5M, 200k")
    attn_distill: bool = _f(True, "run the local stage (false: the paper's \"w/o Attn. Distill.\" ablation; stage 2 "
                            "gets the whole budget)")
    attn_fraction: float = _f(0.25, "share of the budget for stage 1 (local attn)")
    seq_len: int = _f(256, "tokens per packed row")
    batch_size: int = _f(4, "rows per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimiser step (global batch = batch_size x grad_accum x processes)")
    seed: int = _f(0, "data order and LoRA init")
    attn_lr: float = _f(1e-3, "stage-1 peak learning rate (linear warm-up, cosine to 10%)")
    attn_lora: bool = _f(True, "stage 1 also trains the LoRA adapters on q/k/v/o of the windowed layers")
    lr: float = _f(3e-3, "stage-2 peak learning rate (linear warm-up, then the schedule)")
    schedule: str = _f("cosine", "stage-2 learning rate after the warm-up: cosine or linear decay to 10% of the peak, "
                       "or constant (stage 1 always decays by cosine)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup: float = _f(0.05, "share of each stage's steps spent warming the learning rate up")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: none)")
    lora_rank: int = _f(16, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_targets: tuple[str, ...] = _f(LORA_TARGETS, "comma list of projection names that get LoRA")
    lora_layers: str = _f("neighbours", "neighbours (modified layers and --neighbours layers either side), modified, "
                          "all, or a comma list of layer indices")
    neighbours: int = _f(1, "layers either side of a modified layer that also get LoRA")
    temperature: float = _f(1.0, "stage-2 loss = T^2 KL(p_teacher^T || p_student^T) + ce_weight CE: the T")
    ce_weight: float = _f(0.0, "weight of the cross-entropy term of stage 2")
    train_attention_params: bool = _f(True, "the kinds' own parameters (feature maps, gates) keep training in stage 2")
    kl_chunk: int = _f(1024, "positions per logits chunk of the KL")
    local: str = _f("attn", "the local stage: attn (attention transfer, windowed layers) or block (block-wise local "
                    "distillation of every modified layer)")
    block_fraction: float = _f(0.5, "share of the budget for the block stage (local block)")
    block_lr: float = _f(1e-3, "block-stage peak learning rate")
    kd_topk: int = _f(0, "0: stage 2 against the teacher's full distribution (exact); k > 0: its top-k log-probs + "
                      "tail mass")
    teacher_cache: str | None = _f(None, "folder of teacher targets shared by runs (none: the teacher runs every step)")
    teacher_cache_blocks: bool = _f(True, "the block stage caches its boundaries too (4 D bytes per token per "
                                    "boundary)")
    checkpoint_every: int = _f(100, "optimiser steps between checkpoints (0: only at stage ends)")
    precision: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16, fp16 (autocast + grad "
                        "scaling)")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    parallel: str = _f("replicate", "under torchrun: replicate (every rank holds the model; data parallel on FSDP2) "
                       "or shard (FSDP2 splits the decoder layers of student and teacher over the ranks)")
    weights_dtype: str = _f("float32", "frozen weights of student and teacher: float32, or bfloat16 (half the memory; "
                            "needs precision bf16; adapters, optimiser state and losses stay fp32)")
    shuffle_rows: int = _f(256, "rows shuffled together when packing the training text")
    retrieval_share: float = _f(0.0, "share of training rows turned into synthetic retrieval examples built from "
                                "their own text (a fact line at a random depth, asked for at the row's end; "
                                "corpus.retrieval_row), so the teacher's long-range copying is distilled")
    segment_chars: int = _f(8192, "characters per training-text segment (the unit the data order shuffles)")
    progress: bool = _f(True, "show a progress bar")
    data_dir: str | None = _f(None, "the evaluation data directory whose splits are refused as training data")

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
            if not 0 < getattr(self, name) < math.inf:
                problems.append(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("attn_fraction", "block_fraction", "warmup", "lora_dropout", "retrieval_share"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not all(0 <= v < math.inf for v in (self.ce_weight, self.weight_decay, self.max_grad_norm)):
            problems.append("ce_weight, weight_decay and max_grad_norm must be finite and >= 0")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
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
        """Every field, except those added since the first recipe while they hold the values that give it:
        settings recorded before them (a heal run's resume key, a comparison's resolved settings) still match."""
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        if d["local"] == "attn":  # block_fraction and block_lr change nothing then
            del d["block_fraction"], d["block_lr"]
        for k, v in {"local": "attn", "kd_topk": 0, "teacher_cache": None, "teacher_cache_blocks": True,
                     "parallel": "replicate", "weights_dtype": "float32", "schedule": "cosine",
                     "retrieval_share": 0.0}.items():
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


def window_note(cfg: HealConfig, plan: LayerPlan) -> str | None:
    """A hint when no training row is longer than the plan's widest window: a layer windowed at W computes exactly
    what softmax computes on the first W tokens, so rows no longer than W never train it as a window (and retrieval
    past W, the thing windows break, is never distilled)."""
    widest = max((s.window for s in plan.layers if s.window), default=None)
    if widest is None or cfg.seq_len > widest:
        return None
    return (f"heal: note: rows of {cfg.seq_len} tokens never reach past the plan's window of {widest}: its windowed "
            "layers train as if they were softmax. Heal on rows at least as long as the context the plan is for "
            f"(--seq-len {max(2 * widest, 2048)} or more), and see --retrieval-share")

