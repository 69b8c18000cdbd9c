"""The error handler's parts: which exceptions are a user's mistake, their one-line form, the command line's
normalisation, and the claim of a command's output before it runs (outputs.py)."""

from __future__ import annotations

import re
from pathlib import Path

from ..util import UsageError


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user's input causes; each message names the problem and the fix. Anything else is a bug."""
    from ..bench import BenchError
    from ..corpus import TrainingDataError
    from ..data import DataNotFoundError
    from ..evaluate import TaskError
    from ..export import ExportError
    from ..heal import HealConfigError
    from ..models import ModelLoadError
    from ..plan import PlanError
    from ..workflows.run import ConfigError
    from ..sensitivity import AnalysisError
    from ..surgery import CheckpointError, UnsupportedModelError
    from ..llama_cpp import LlamaCppMissing
    from ..speed import SpeedModelError

    return (UsageError, ConfigError, PlanError, HealConfigError, TrainingDataError, CheckpointError, DataNotFoundError,
            ModelLoadError, UnsupportedModelError, ExportError, TaskError, AnalysisError, BenchError,
            SpeedModelError, LlamaCppMissing)


def one_line(e: Exception) -> str:
    """An error message on one line: a headline and its problem list joined by '; '."""
    lines = [ln.strip().removeprefix("- ") for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:1] + ["; ".join(lines[1:])]).strip()


NOT_SETTINGS = {"func", "debug", "force", "out", "resume", "no_progress", "progress", "checkpoint_every", "parallel",
                "threads", "device", "command", "writes", "defaults", "extends",
                "written_by"}  # what may change between a command and its rerun into the same output


def command_settings(args) -> dict:
    """The arguments that decide what a command writes (its output's owner record)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}


def claimed_output(args):
    """Claim the command's --out before it runs (outputs.py): folders get a manifest and a lock, files are
    checked for their writer. Commands without `writes`, an unset --out, and ranks > 0 of a launcher claim nothing."""
    import contextlib
    import os

    from ..outputs import check_file, claim, written_by

    writes, out = getattr(args, "writes", None), getattr(args, "out", None)
    if writes is None or not out or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    settings = command_settings(args)
    if writes == "file":
        check_file(Path(out), args.command, settings, args.force)
        args.written_by = written_by(args.command, settings)
        return contextlib.nullcontext()
    hint = "resume it with the settings it was made with (--resume), or " if args.command == "heal" else ""
    key = " ".join(x for x in (args.command, getattr(args, "bench_command", None)) if x)
    return claim(out, args.command, settings, model=getattr(args, "model", None), force=args.force, resume_hint=hint,
                 key=key, defaults=getattr(args, "defaults", None), extends=getattr(args, "extends", None))


def normalise_argv(argv: list[str]) -> tuple[list[str], bool]:
    """(argv, debug): `--debug` taken from anywhere before `--`, and `--opt -5k` joined as `--opt=-5k` so that a
    negative value reaches the option's own check instead of argparse's "expected one argument"."""
    out, debug, i = [], False, 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out += argv[i:]
            break
        if a == "--debug":
            debug = True
        elif a.startswith("--") and "=" not in a and i + 1 < len(argv) and re.match(r"-\.?\d", argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 1
        else:
            out.append(a)
        i += 1
    return out, debug
