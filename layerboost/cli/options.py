"""Options every sub-command spells the same way, the plan-policy and config options some share, and the checks
made on arguments before any work."""

from __future__ import annotations

import argparse

from .. import kinds as K
from ..targets import TARGETS
from ..util import DTYPE_ALIASES, DTYPES, UsageError, check_writable, resolve_device


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default: appended as "(default: X)" unless the help text already names it
    (options without a default, flags and required arguments get nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse whose --help shows every default and whose errors are one `error: ...` line (exit status 2).

    Sub-command parsers are made by the same class, so they behave the same.
    """

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def device_arg(value: str) -> str:
    """`auto` (cuda if available, else cpu), `cpu`, `cuda` or `cuda:N`, resolved and checked."""
    try:
        return resolve_device(value)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def dtype_arg(value: str) -> str:
    return DTYPE_ALIASES.get(value, value)


def add_device_dtype(p: argparse.ArgumentParser, dtype: bool = True, what: str = "weights dtype") -> None:
    """`--device` and `--dtype` as every sub-command spells them."""
    p.add_argument("--device", type=device_arg, default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    if dtype:
        p.add_argument("--dtype", type=dtype_arg, default="float32", choices=list(DTYPES),
                       help=f"{what} (fp32, bf16, fp16 are accepted too)")


def limit_arg(value: str) -> int | float | None:
    """`--limit`: N >= 1 items per task, a fraction 0 < f < 1 of them, or 0 / all for every item."""
    if value.lower() in ("0", "all"):
        return None
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if 0 < x < 1:
        return x
    if x >= 1 and x.is_integer():
        return int(x)
    raise argparse.ArgumentTypeError(f"{value!r}: give N >= 1 items per task, a fraction between 0 and 1, or 0 (all)")


def add_limit(p: argparse.ArgumentParser, default: int | None) -> None:
    p.add_argument("--limit", type=limit_arg, default=default,
                   help="items per task (seeded, stratified): N >= 1, a fraction 0 < f < 1, or 0 = all"
                   + (" (default: all)" if default is None else ""))


def positive(cast=int, zero: bool = False):
    """An argparse type: a number > 0 (>= 0 with zero=True)."""
    def parse(value: str):
        try:
            x = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not x >= 0 or x == float("inf") or (x == 0 and not zero):  # NaN fails `x >= 0`
            raise argparse.ArgumentTypeError(f"must be a finite number {'>= 0' if zero else '> 0'}, got {value}")
        return x
    parse.__name__ = cast.__name__  # argparse names the type in its messages
    return parse


def finite(value: str) -> float:
    """An argparse type: a finite float (no nan, no inf)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return x


def int_list(value: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers > 0 ("64,256,1024"), without repeats."""
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give comma-separated whole numbers, e.g. 64,256,1024") from None
    if not out or min(out) <= 0 or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{value!r}: give distinct whole numbers > 0, e.g. 64,256,1024")
    return out


def nonempty(value: str) -> str:
    """An argparse type: text that is not empty or only blanks."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty: give some text")
    return value


def iterative_steps(value: str):
    """An argparse type: `auto` or a count >= 0."""
    return value if value == "auto" else positive(zero=True)(value)


def model_fits(model: str, plan=None, windows=()):
    """Check a plan and windows against the model's config.json before its weights are loaded.

    Returns:
        The config, or None for a hub id (checked after loading instead).
    """
    from ..models import model_config
    from ..plan import check_fits

    config = model_config(model)
    if config is not None:
        check_fits(plan, config, windows)
    return config


def add_force(p: argparse.ArgumentParser, writes: str) -> None:
    """--force, and what the command writes (`folder` or `file`, claimed by `claimed_output` before it runs)."""
    p.add_argument("--force", action="store_true",
                   help="write into --out even when another command, other settings or other files own it")
    p.set_defaults(writes=writes)


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="smollm2-135m (embedded), a .gguf file of a plain llama, mistral, qwen2/3 or gemma3 model (a "
                   "hybrid's GGUF runs in llama.cpp only), a local HF or layerboost folder, or a hub id")
    add_device_dtype(p)


def policy_from_args(args):
    """The plan policy the arguments describe (None if no policy was given)."""
    from ..plan import PlanPolicy

    common = dict(window=args.window, kind=args.kind, score=args.score,
                  ranking=args.ranking, target=args.target, keep_retrieval=args.keep_retrieval)
    given = [name for name, on in (
        ("--speedup/--kv-budget", args.speedup is not None or args.kv_budget is not None),
        ("--budget", args.budget is not None), ("--softmax-above", args.softmax_above is not None),
        ("--fractions", bool(args.fractions)),
        ("--softmax/--swa/--none", any(v is not None for v in (args.softmax, args.swa, args.none)))) if on]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} are different plan policies: give one")
    if args.speedup is not None or args.kv_budget is not None:
        return PlanPolicy("speed", speedup=args.speedup, kv_budget=args.kv_budget, context=args.context,
                          parallel=args.sequences, build=args.build,
                          windows=list(args.candidate_windows) if args.candidate_windows else None, **common)
    if args.budget is not None:
        return PlanPolicy("budget", budget=args.budget, context=args.context, budget_measure=args.budget_measure,
                          none_below=args.none_below, **common)
    if args.softmax_above is not None:
        if args.none_below is None:
            raise UsageError("--softmax-above needs --none-below")
        return PlanPolicy("thresholds", softmax_above=args.softmax_above, none_below=args.none_below, **common)
    if args.fractions:
        try:
            f = [float(v) for v in args.fractions.split(",")]
        except ValueError:
            f = []
        if len(f) != 2:
            raise UsageError(f"--fractions {args.fractions}: give SOFTMAX,SWA fractions (the rest is none), e.g. 0.34,0.33")
        return PlanPolicy("fractions", fractions=f, **common)
    if any(v is not None for v in (args.softmax, args.swa, args.none)):
        return PlanPolicy("counts", softmax=args.softmax, swa=args.swa, none=args.none, **common)
    return None


class _WindowedKind(argparse.Action):
    """--kind K, and its alias --linear (--kind linear_swa). Also sets `linear` (K is linear_swa) for the
    commands that still read that flag (cli/analyze.py's default policy)."""

    def __call__(self, parser, namespace, values, option_string=None):
        name = self.const if self.nargs == 0 else values
        namespace.kind, namespace.linear = name, name == "linear_swa"


def policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan policy (most sensitive layers keep softmax, least sensitive lose attention)")
    g.add_argument("--softmax", type=positive(zero=True), help="number of softmax layers (counts: give two of three)")
    g.add_argument("--swa", type=positive(zero=True), help="number of sliding-window layers")
    g.add_argument("--none", type=positive(zero=True), help="number of attention-free layers")
    g.add_argument("--fractions", help="SOFTMAX,SWA fractions of layers, the rest none (e.g. 0.34,0.33)")
    g.add_argument("--softmax-above", type=finite, help="threshold policy: drop (fraction, 0.01 = 1 point) >= this keeps softmax")
    g.add_argument("--none-below", type=finite, help="drop < this becomes none (threshold and budget policies)")
    g.add_argument("--budget", type=positive(float), help="budget policy: max cost relative to the base (e.g. 0.33)")
    g.add_argument("--budget-measure", choices=["kv", "decode"], default="kv",
                   help="kv: KV-cache bytes; decode: bytes read per decoded token (weights + KV)")
    g.add_argument("--context", type=positive(), default=4096, help="context length the budget is computed at")
    g.add_argument("--window", type=positive(), default=64, help="window of the sliding-window layers")
    from ..plan import PlanPolicy

    g.add_argument("--kind", choices=K.WINDOWED, default=PlanPolicy.kind, action=_WindowedKind,
                   help=f"the windowed layers' kind (default {PlanPolicy.kind})")
    g.add_argument("--linear", nargs=0, action=_WindowedKind, const="linear_swa", dest="kind", default=argparse.SUPPRESS,
                   help="the same as --kind linear_swa")
    p.set_defaults(linear=False)
    g.add_argument("--score", choices=["drop", "margin", "kl", "cosine"], default="kl",
                   help="rank layers by KL(base || variant) on calibration text (default), the cosine proxy, the "
                        "gold-answer margin drop, or the accuracy drop (the paper's Eq. 3); analyze --iterative "
                        "re-measures this signal after each removal")
    g.add_argument("--ranking", choices=["auto", "iterative", "one-shot"], default="auto",
                   help="iterative: by the analysis' iterative history of --score (removed layers first, the rest by "
                        "the last step's scores: the signal that healed best, docs/experiments/selection-signals.md); one-shot: each layer "
                        "removed alone; auto (default): iterative where the analysis has that history")
    g.add_argument("--speedup", type=positive(float),
                   help="speed policy: the plan of least predicted quality loss whose predicted decode speed at --context "
                        "is at least this many times the base's (needs analyze --windows and `layerboost speed "
                        "calibrate`); refused, naming the largest reachable, when out of reach")
    g.add_argument("--kv-budget", type=positive(float),
                   help="speed policy: the KV cache at --context at most this fraction of the base's (as the target "
                        "engine allocates it); alone or beside --speedup")
    g.add_argument("--sequences", type=positive(), default=1, help="speed policy: sequences decoded together")
    g.add_argument("--build", choices=["patched", "stock"], default="patched",
                   help="speed policy, target llama.cpp: patched (engines/llama.cpp/build.sh: softmax + swa + none) or "
                        "stock (any released llama.cpp and the applications built on it: softmax + none or softmax + swa)")
    g.add_argument("--candidate-windows", type=int_list, default=None,
                   help="speed policy: windows to choose among (default: every window the analysis measured)")
    g.add_argument("--keep-retrieval", type=positive(zero=True), default=0, metavar="K",
                   help="keep softmax in the K layers whose attention alone brings back most of a long-context answer "
                        "(needs analyze --retrieval), whatever the other scores say")
    g.add_argument("--target", choices=list(TARGETS), default="layerboost",
                   help="what will serve the model: only plans it runs are placed (" + "; ".join(
                       f"{t.name}: {'/'.join(t.kinds())}" + (", one window" if t.one_window else "")
                       + (", attention in layer 0" if t.attention_in_layer0 else "") for t in TARGETS.values()) + ")")


def config_with_overrides(cls, args):
    """`cls.load(args.config)` with the --out / --data-dir / --model overrides applied (and validated)."""
    import dataclasses

    cfg = cls.load(args.config)
    overrides = {k: v for k, v in (("out", args.out), ("data_dir", args.data_dir), ("model", args.model)) if v}
    if getattr(args, "rows", None):
        overrides["rows"] = [r.strip() for r in args.rows.split(",") if r.strip()]
    cfg = cls.from_dict({**dataclasses.asdict(cfg), **overrides}) if overrides else cfg
    check_writable(cfg.out)
    return cfg


def config_arguments(p: argparse.ArgumentParser, folder: str) -> None:
    p.add_argument("--out", help=f"{folder} (overrides the config's out)")
    p.add_argument("--force", action="store_true", help=f"write into the {folder} even when another command, other "
                   "settings or other files own it (stages whose settings changed are recomputed)")
    p.add_argument("--data-dir", help="local data folder (overrides the config's data_dir)")
    p.add_argument("--model", help="model (overrides the config's model)")


def claim_config_out(cfg, command: str, args):
    """Claim a run / comparison folder (outputs.py) with the config's settings; what only says where, or how
    fast, is left out (a comparison's rows may be added to its folder later)."""
    from ..outputs import claim

    import dataclasses

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "device", "threads", "rows")}
    return claim(cfg.out, command, settings, model=cfg.model, force=args.force,
                 resume_hint="rerun with the settings it was made with (its config.yaml), pass --force to recompute "
                             "the stages the new settings change, or ")


def run_config_command(args, config_cls, command: str, work, what: str) -> int:
    """A command driven by a YAML config (`run`, `compare`): the config with the command line's overrides, its
    folder claimed, `work(cfg, log)` run there; prints what it made."""
    cfg = config_with_overrides(config_cls, args)
    with claim_config_out(cfg, command, args):
        made = work(cfg, log=lambda m: print(m, flush=True))
    print(f"{what}: {made}")
    return 0
