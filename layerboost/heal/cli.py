"""`layerboost heal` / `python -m layerboost.heal`: arguments, checks before loading, and the call of `heal`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..corpus import documents
from ..plan import LayerPlan
from ..surgery import CheckpointError
from .checkpoint import find_checkpoint
from .config import HealConfig, HealConfigError
from .dist import setup_dist
from .train import heal


def add_heal_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `layerboost heal`."""
    p.add_argument("--model", required=True, help="the original model: smollm2-135m, a .gguf, an HF folder or hub id")
    p.add_argument("--plan", required=True, help="plan JSON (from `layerboost plan`)")
    p.add_argument("--data", required=True,
                   help="training text: a file or folder of .txt, or hub:PATH[:CONFIG][:SPLIT]; eval splits are refused")
    p.add_argument("--tokens", default=None, help="token budget of both stages, e.g. 10M (the paper's; the default, said "
                   "when used: hours on a GPU, days on a CPU), 1.5M, 200k")
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
    from ..cli import add_device_dtype

    add_device_dtype(g, dtype=False)
    g.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="frozen weights of student and teacher; bfloat16 halves their memory (needs --precision bf16)")
    g.add_argument("--parallel", choices=["replicate", "shard"], default="replicate",
                   help="under torchrun: replicate (every rank holds the model; data parallel) or shard (FSDP2 shards "
                        "the decoder layers of student and teacher over the ranks)")
    g.add_argument("--no-attn-lora", action="store_true", help="stage 1 trains only feature maps and gates")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-teacher-cache-blocks", action="store_true",
                   help="the teacher cache keeps no block-stage targets (they take 4 D bytes per token per boundary)")


def _check_before_loading(args: argparse.Namespace, cfg: HealConfig) -> None:
    """What `heal` would find wrong only after loading the model: the plan, --out, --resume and the data."""
    from ..cli import check_writable, model_fits

    from ..models import is_layerboost_dir

    if is_layerboost_dir(args.model):
        raise HealConfigError(f"--model {args.model} is already a layerboost hybrid: heal takes the original model (the "
                              "teacher) and --plan, and converts it itself")
    model_fits(args.model, LayerPlan.load(args.plan))
    check_writable(args.out)
    out = Path(args.out)
    ck = find_checkpoint(out / "heal_state")
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
             "checkpoint_every", "precision", "device", "parallel", "weights_dtype", "local", "block_fraction", "block_lr", "kd_topk", "teacher_cache"]
    opts = {n: getattr(args, n) for n in names}
    if args.tokens is None:
        args.tokens = "10M"
        print("heal: no --tokens given: healing the paper's budget of 10M tokens (about 50 hours on 2 CPU cores); pass "
              "e.g. --tokens 200k for a first look", file=sys.stderr)
    cfg = HealConfig(tokens=args.tokens, attn_distill=not args.no_attn_distill, attn_lora=not args.no_attn_lora,
                     progress=not args.no_progress, data_dir=args.data_dir,
                     teacher_cache_blocks=not args.no_teacher_cache_blocks, **opts)
    _check_before_loading(args, cfg)
    out = heal(args.model, args.plan, data=args.data, out=args.out, resume=args.resume, config=cfg)
    if setup_dist(cfg.device, cfg.parallel).main:
        print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import __doc__ as package_doc

    p = argparse.ArgumentParser(prog="layerboost heal", description=package_doc.split("\n\n")[0])
    add_heal_arguments(p)
    return run_heal_cli(p.parse_args(argv))
