"""`layerboost heal` / `python -m layerboost.heal`: arguments, checks before loading, and the call of `heal`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..corpus import documents
from ..plan import LayerPlan
from ..surgery import CheckpointError
from ..heal.checkpoint import find_checkpoint
from ..heal.config import HealConfig, HealConfigError
from ..heal.dist import setup_dist
from ..heal.train import heal
from ..util import allocator, check_writable, resolve_device
from .options import add_device_dtype, add_force, model_fits


def add_heal_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `layerboost heal`."""
    p.add_argument("--model", required=True, help="the original model: smollm2-135m, a .gguf, an HF folder or hub id")
    p.add_argument("--plan", default=None, help="plan JSON (from `layerboost plan`); with --student, its plan by default")
    p.add_argument("--student", default=None, help="a folder `layerboost convert` wrote from --model: healing starts "
                   "from its weights (--model stays the teacher); default: --model converted to --plan here")
    p.add_argument("--data", required=True,
                   help="training text: a file or folder of .txt, or hub:PATH[:CONFIG][:SPLIT]; eval splits are refused")
    p.add_argument("--tokens", default=None, help="token budget of both stages, e.g. 10M (the paper's; the default, said "
                   "when used: hours on a GPU, days on a CPU), 1.5M, 200k")
    p.add_argument("--out", required=True, help="output folder for the healed hybrid")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g = p.add_argument_group("training (every HealConfig setting; their meaning lives there)")
    for f in dataclasses.fields(HealConfig):
        if f.name in OWN_OPTIONS:
            continue
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%")  # argparse formats help
        if f.name == "device":
            add_device_dtype(g, dtype=False)
        elif isinstance(f.default, bool) and f.default:  # a switch that is on by default: --no-NAME turns it off
            g.add_argument("--no-" + flag[2:], dest=f.name, action="store_false",
                           help=f"turn off what is on by default: {text}")
        elif isinstance(f.default, bool):
            g.add_argument(flag, dest=f.name, action="store_true", help=text)
        else:
            default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            kind = {"int": int, "float": float}.get(str(f.type), str)
            g.add_argument(flag, type=kind, default=default, help=text)


OWN_OPTIONS = {"tokens"}  # spelled above (its default is said when used)


def _check_before_loading(args: argparse.Namespace, cfg: HealConfig) -> None:
    """What `heal` would find wrong only after loading the model: the plan, --out, --resume and the data."""

    from ..models import is_layerboost_dir

    if is_layerboost_dir(args.model):
        raise HealConfigError(f"--model {args.model} is already a layerboost hybrid: heal takes the original model (the "
                              "teacher) as --model, and the hybrid as --student")
    if args.student is not None and not is_layerboost_dir(args.student):
        raise HealConfigError(f"--student {args.student} is not a folder `layerboost convert` wrote (no layerboost "
                              "plan in its config.json): convert the original first, or leave --student out")
    if args.plan is None:
        if args.student is None:
            raise HealConfigError("give --plan (a plan JSON from `layerboost plan`), or --student (a converted model)")
        args.plan = str(Path(args.student) / "plan.json")
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


HEALING_DOC = "docs/experiments/healing.md"


def allocator_note(device: str) -> str | None:
    """A hint for healing on CPU with the C library's malloc, which hands freed buffers back to the kernel and
    faults them in again at every step. jemalloc keeping freed memory avoids that but can grow without bound, so
    the hint gives both sides and does not choose; the measurements live in the linked section, not here."""
    if not device.startswith("cpu") or allocator() != "glibc":
        return None
    return ("heal: note: on CPU, healing ran faster with jemalloc keeping its memory (apt install libjemalloc2; "
            "LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 layerboost heal ...), but in "
            "long heals its memory grew to many times what was in use: run it under a memory limit; a killed heal "
            f"continues with --resume ({HEALING_DOC}#healing-on-a-cpu-the-c-allocator-2026-12-05)")


def schedule_note(cfg: HealConfig) -> str | None:
    """A hint when a stage 2 of 1M tokens or more runs the default schedule (cosine from 3e-3, chosen at a short
    budget): at 1M, linear decay from the same peak ended lower in held-out KL. One small model and two seeds, so
    it is a hint, not a new default; the numbers live in the linked section."""
    if cfg.stage_tokens["kd"] < 1_000_000 or cfg.schedule != "cosine" or cfg.lr != 3e-3:
        return None
    return ("heal: note: for a stage 2 of 1M tokens or more, consider --schedule linear: at 1M tokens it ended lower in "
            f"held-out KL than this default (cosine) in both seeds measured ({HEALING_DOC}"
            "#the-stage-2-schedule-for-long-budgets)")


def run_heal_cli(args: argparse.Namespace) -> int:
    """Run `layerboost heal` from parsed arguments; prints the output folder."""
    if args.tokens is None:
        args.tokens = "10M"
        print("heal: no --tokens given: healing the paper's budget of 10M tokens (about 50 hours on 2 CPU cores); pass "
              "e.g. --tokens 200k for a first look", file=sys.stderr)
    cfg = HealConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(HealConfig)})
    _check_before_loading(args, cfg)
    for note in (allocator_note(resolve_device(cfg.device)), schedule_note(cfg)):
        if note:
            print(note, file=sys.stderr)
    out = heal(args.model, args.plan, data=args.data, out=args.out, resume=args.resume, config=cfg,
               student=args.student)
    if setup_dist(cfg.device, cfg.parallel).main:
        print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..heal import __doc__ as package_doc

    p = argparse.ArgumentParser(prog="layerboost heal", description=package_doc.split("\n\n")[0])
    add_heal_arguments(p)
    return run_heal_cli(p.parse_args(argv))


def add_parser(sub) -> None:
    p = sub.add_parser("heal", help="heal a hybrid by distillation from the original model (LoRA + attention transfer)",
                       description="Convert the model to the plan (or start from --student), then distil: attention "
                       "transfer for windowed layers (stage 1), LoRA logit distillation (stage 2); merge adapters and "
                       "save. Resumable.")
    add_heal_arguments(p)
    add_force(p, "folder")
    p.set_defaults(func=run_heal_cli)
