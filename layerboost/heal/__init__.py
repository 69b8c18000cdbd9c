"""Healing: distil the original model (teacher) into its converted hybrid (student) on a token budget.

    stage 1  attention transfer: every `swa` / `linear_swa` layer learns (feature maps, gate, and LoRA
             on its q/k/v/o) to reproduce the teacher's attention output at that layer (MSE), with the
             teacher's hidden state as input, so layers train independently from one teacher pass.
    stage 2  LoRA distillation: KL(teacher || student) on next-token distributions at a temperature
             (+ optional cross-entropy); the adapters are then merged and a plain hybrid is saved.

The other local stage (`local="block"`, instead of stage 1; Puzzle's blockwise local distillation):
    block    every modified layer (swa, linear_swa, none) learns to reproduce the teacher's
             whole decoder block (attention + MLP + residual) from the teacher's input to that block:
             loss = mean over modified layers i of ||block_i(x_i) - y_i||^2 / ||y_i - x_i||^2, sums over
             the step's global batch (x_i, y_i: teacher hidden states before / after layer i), i.e. a
             normalised MSE of the block's residual branch (1.0: no better than an identity block). All
             modified layers train at once and independently from one teacher pass; no LM head. Trains
             LoRA on the layer's projections (attention and MLP, where it has them) and the kind's own
             parameters (linear_swa's feature maps and gate).

Teacher targets can be read from a `TeacherCache` (`teacher_cache=DIR`, see teacher_cache.py) instead of
running the teacher: block boundaries for the block stage, the final hidden state (exact KL) or top-k
log-probabilities (`kd_topk=k`: KL between the teacher's top-k + tail-mass distribution and the student's
distribution grouped the same way, exact when k = V) for stage 2.

One network serves as both models. The teacher pass runs the same decoder layers with the adapters
disabled and the original attention modules (kept aside before conversion) swapped back in; the layers
before the first layer that differs run once and feed both. Teacher logits are computed under no_grad
and the KL is taken chunk by chunk over positions with an analytic gradient, so full-vocabulary fp32
logits are never held for the whole batch.

Several processes: under `torchrun` (WORLD_SIZE > 1) each process takes every world-th row of the global
batch, and torch's FSDP2 holds the decoder layers, replicated or sharded (dist.py), and sums the gradients
(gloo on CPU, nccl on GPU); losses are normalised by global token counts, so a run with P processes matches a
single-process run with the same global batch.

Shapes: B rows, T tokens per row, D hidden size, V vocabulary, N = B * T positions.

The package, module by module: config (HealConfig), student (the one network in two roles), losses (each
stage's step and loss, the probe), stages (the stages as objects: what each trains, its rate, step and log line),
checkpoint, dist (several processes: FSDP2), train (the loop: `heal`).
Its command line is layerboost.cli.heal.
"""

from .checkpoint import load_snapshot
from .config import LORA_TARGETS, PAPER_TOKENS, STAGES, HealConfig, HealConfigError
from .losses import attention_mse, attn_step, distill_kl, kd_step, probe
from .stages import STAGE, Stage, stage_params
from .student import Hybrid, build_hybrid
from .train import heal, merge_and_save

__all__ = ["HealConfig", "HealConfigError", "Hybrid", "LORA_TARGETS", "PAPER_TOKENS", "STAGE", "STAGES", "Stage", "attention_mse", "attn_step", "build_hybrid",
           "distill_kl", "heal", "kd_step", "load_snapshot", "merge_and_save", "probe", "stage_params"]
