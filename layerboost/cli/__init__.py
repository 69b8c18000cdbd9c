"""`layerboost <command> ...`: one module per command (its arguments and its call of the library), the options
they share (options.py) and the error handler (errors.py). Results go to stdout, progress to stderr. Nothing in
the library imports this package."""

from __future__ import annotations

import argparse
import sys

from . import analyze, bench, compare, convert, evaluate, export, generate, heal, plan, report, run, speed
from .errors import check_text_arguments, claimed_output, normalise_argv, one_line, user_errors
from .options import Parser

COMMANDS = (convert, generate, evaluate, analyze, plan, heal, bench, run, compare, report, export, speed)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="layerboost",
        description="Make a pretrained LLM cheaper to serve by reducing attention layer by layer (LayerBoost).",
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def command_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The defaults of the (sub-)command `args` ran: what an option added since an output was written had then."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or getattr(args, sub.dest, None) not in sub.choices:
            return {a.dest: a.default for a in parser._actions if a.dest != argparse.SUPPRESS}
        parser = sub.choices[getattr(args, sub.dest)]


def interrupted(args: argparse.Namespace) -> str:
    """The line after Ctrl-C: how to go on. A heal goes on from its last checkpoint only with --resume."""
    if args.command == "heal" and not args.resume:
        from pathlib import Path

        from ..heal.checkpoint import find_checkpoint

        if find_checkpoint(Path(args.out) / "heal_state") is not None:
            return "interrupted; the heal keeps its last checkpoint: run the same command with --resume to continue"
        return "interrupted before the heal's first checkpoint: run the same command again to start it"
    return "interrupted; finished work is kept: run the same command again to resume"


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. A user's mistake ends in one `error: ...` line on stderr and exit status 2, Ctrl-C
    in one line and exit status 130; `--debug` (anywhere on the command line) shows the traceback instead.
    Anything else is a bug and keeps its traceback."""
    argv, debug = normalise_argv(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad argument (2; its `error:` line is printed)
        return e.code if isinstance(e.code, int) else 2
    args.debug = debug
    args.defaults = command_defaults(parser, args)
    try:
        check_text_arguments(args)
        with claimed_output(args):
            return args.func(args)
    except user_errors() as e:
        if args.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"error: {interrupted(args)}", file=sys.stderr)
        return 130
