"""The healing stages as objects: what each trains, its peak learning rate and schedule, its step and its log line.

A recipe runs a local stage (`attn` or `block`, HealConfig.local) and then `kd`; the loop (train.py) asks the
stage in hand and never names one. Checkpoints record a stage by its `name` (config.STAGES holds the order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..kinds import own_parameters
from .config import HealConfig
from .losses import attn_step, block_step, kd_step
from .student import Hybrid, lora_params


@dataclass(frozen=True)
class Stage:
    """One healing stage.

    Attributes:
        name: the stage's name in checkpoints, logs and HealConfig.stage_tokens.
        lr_option: the HealConfig field holding its peak learning rate (its command-line flag is the same name
            with dashes).
    """

    name: str
    lr_option: str

    def peak_lr(self, cfg: HealConfig) -> float:
        return getattr(cfg, self.lr_option)

    def schedule(self, cfg: HealConfig) -> str:
        """The decay after the warm-up (train.lr_at)."""
        return "cosine"

    def lr_flag(self) -> str:
        return "--" + self.lr_option.replace("_", "-")

    def params(self, h: Hybrid, cfg: HealConfig) -> list[nn.Parameter]:
        """The parameters this stage trains."""
        raise NotImplementedError

    def n_stats(self, h: Hybrid) -> int:
        """Length of the loss statistics a step sums over ranks."""
        raise NotImplementedError

    def step(self, h: Hybrid, batches: list, n_real: int, n_global: int, n_ce: int, cfg: HealConfig, precision: str,
             dist, scale: float, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of this rank's micro-batches (`batches`: (ids, stream rows); the first `n_real`
        count, the rest are FSDP2 padding with weight 0). Returns (loss statistics, normalisers or None)."""
        stats = torch.zeros(self.n_stats(h))
        for k, (mb, mb_rows) in enumerate(batches):
            got = self.micro_step(h, mb, mb_rows, n_global, n_ce, cfg, precision, scale if k < n_real else 0.0,
                                  cache if k < n_real else None).cpu()
            if k < n_real:
                stats += got
        return stats, None

    def micro_step(self, h, mb, mb_rows, n_global, n_ce, cfg, precision, weight, cache) -> torch.Tensor:
        raise NotImplementedError

    def losses(self, h: Hybrid, cfg: HealConfig, stats: torch.Tensor, den, n_global: int, n_rows: int) -> dict:
        """A step's log fields from its summed statistics: the loss, and what makes it."""
        raise NotImplementedError


class AttnStage(Stage):
    """Stage 1, attention transfer: each windowed layer reproduces the teacher's attention output (MSE)."""

    def params(self, h, cfg):
        out = []
        for i in h.windowed:
            attn = h.layers[i].self_attn
            out += [p for _, p in own_parameters(attn)]
            if cfg.attn_lora:
                out += [p for _, p in lora_params(attn)]
        return out

    def n_stats(self, h):
        return len(h.windowed)

    def micro_step(self, h, mb, mb_rows, n_global, n_ce, cfg, precision, weight, cache):
        return attn_step(h, mb, n_global, precision, weight)

    def losses(self, h, cfg, stats, den, n_global, n_rows):
        per_layer = (stats / (n_global * h.decoder.config.hidden_size)).tolist()
        return {"loss": sum(per_layer) / len(per_layer), "mse": dict(zip(map(str, h.windowed), per_layer))}


class BlockStage(Stage):
    """The block-wise local stage: each modified layer reproduces the teacher's whole decoder block."""

    def params(self, h, cfg):
        return [p for i in h.modified for _, p in own_parameters(h.layers[i]) + lora_params(h.layers[i])]

    def n_stats(self, h):
        return len(h.modified)

    def step(self, h, batches, n_real, n_global, n_ce, cfg, precision, dist, scale, cache):
        err, den = block_step(h, batches, precision, dist, scale, cache if cfg.teacher_cache_blocks else None,
                              n_real=n_real)
        stats = torch.zeros(self.n_stats(h))
        stats += err.cpu()
        return stats, den

    def losses(self, h, cfg, stats, den, n_global, n_rows):
        rel = (stats / den.cpu()).tolist()  # relative error of each modified block
        return {"loss": sum(rel) / len(rel), "rel": dict(zip(map(str, h.modified), rel))}


class KDStage(Stage):
    """Stage 2, logit distillation: KL(teacher || student) at a temperature, plus optional cross-entropy."""

    def schedule(self, cfg):
        return cfg.schedule

    def params(self, h, cfg):
        out = [p for _, p in lora_params(h.peft_model)]
        if cfg.train_attention_params:
            out += [p for _, p in own_parameters(h.peft_model)]
        return out

    def n_stats(self, h):
        return 2

    def micro_step(self, h, mb, mb_rows, n_global, n_ce, cfg, precision, weight, cache):
        return kd_step(h, mb, n_global, max(1, n_ce), cfg, precision, weight, mb_rows, cache)

    def losses(self, h, cfg, stats, den, n_global, n_rows):
        n_ce = n_global - n_rows
        kl, ce = stats[0].item() / n_global, stats[1].item() / max(1, n_ce)
        return {"loss": cfg.temperature ** 2 * kl + cfg.ce_weight * ce, "kl": kl,
                "ce": ce if cfg.ce_weight > 0 else None}


STAGE: dict[str, Stage] = {s.name: s for s in (AttnStage("attn", "attn_lr"), BlockStage("block", "block_lr"),
                                               KDStage("kd", "lr"))}


def stage_params(h: Hybrid, stage: str, cfg: HealConfig) -> list[nn.Parameter]:
    """Trainable parameters of the stage named `stage`."""
    return STAGE[stage].params(h, cfg)


__all__ = ["STAGE", "Stage", "stage_params"]
