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
    """Claim the command's --out before it runs (outputs.py): folders get a manifest and a lock, files a lock and
    a check of their writer. `writes` is "folder", "file" (JSON that records its writer), "unmarked file" (never
    replaced without --force), or a function of the arguments that returns one of them. Commands without
    `writes`, an unset --out, and ranks > 0 of a launcher claim nothing."""
    import contextlib
    import os

    from ..outputs import claim, claim_file, written_by

    writes, out = getattr(args, "writes", None), getattr(args, "out", None)
    writes = writes(args) if callable(writes) else writes
    if writes is None or out is None or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    settings = command_settings(args)
    if writes in ("file", "unmarked file"):
        args.written_by = written_by(args.command, settings)
        return claim_file(Path(out), args.command, settings, args.force, marked=writes == "file")
    hint, restart = "", False
    if args.command == "heal":  # a heal resumes from its checkpoint; one that failed without one starts again
        from ..heal.checkpoint import find_checkpoint

        restart = find_checkpoint(Path(out) / "heal_state") is None
        hint = "" if restart else "resume it with the settings it was made with (--resume), or "
    key = " ".join(x for x in (args.command, getattr(args, "bench_command", None)) if x)
    return claim(out, args.command, settings, model=getattr(args, "model", None), force=args.force, resume_hint=hint,
                 key=key, defaults=getattr(args, "defaults", None), extends=getattr(args, "extends", None),
                 replace_failed=restart)


PATH_OPTIONS = ("model", "out", "plan", "data", "data_dir", "sensitivity", "run", "config", "eval_json", "analysis")


def check_text_arguments(args) -> None:
    """Every text argument is UTF-8 (a stray byte such as \\xff reaches Python as a lone surrogate that nothing
    can encode), and a path option is not empty (`--out ""` would mean the current folder).

    Raises:
        UsageError: naming the option and the fix.
    """
    for name, value in sorted(vars(args).items()):
        flag = "--" + name.replace("_", "-")
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if not isinstance(v, str):
                continue
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                shown = v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                raise UsageError(f"{flag} {shown!r} holds bytes that are not UTF-8 text: give it in UTF-8 (rename "
                                 "the file or folder, or fix the text's encoding)") from None
            if name in PATH_OPTIONS and not v.strip():
                raise UsageError(f"{flag} is empty: give a path (use . for the current folder)")


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
