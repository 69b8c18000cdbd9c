"""`layerboost <stage> ...`: one sub-command per pipeline stage. Results go to stdout, progress to stderr."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from .util import DTYPE_ALIASES, DTYPES, UsageError, check_new_folder, check_writable, resolve_device  # noqa: F401


# ---- shared options: one spelling and meaning in every sub-command ------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default: appended as "(default: X)" unless the help text already names it
    (options without a default, flags and required arguments get nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return super()._get_help_string(action)


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HelpFormatter whose description keeps its own line breaks."""


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
        if x < 0 or (x == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero else '> 0'}, got {value}")
        return x
    parse.__name__ = cast.__name__  # argparse names the type in its messages
    return parse


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
    from .models import model_config
    from .plan import check_fits

    config = model_config(model)
    if config is not None:
        check_fits(plan, config, windows)
    return config


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user's input causes; each message names the problem and the fix. Anything else is a bug."""
    from .bench import BenchError
    from .corpus import TrainingDataError
    from .data import DataNotFoundError
    from .evaluate import TaskError
    from .export import ExportError
    from .heal import HealConfigError
    from .models import ModelLoadError
    from .plan import PlanError
    from .run import ConfigError
    from .sensitivity import AnalysisError
    from .surgery import CheckpointError, UnsupportedModelError

    return (UsageError, ConfigError, PlanError, HealConfigError, TrainingDataError, CheckpointError, DataNotFoundError,
            ModelLoadError, UnsupportedModelError, ExportError, TaskError, AnalysisError, BenchError)


def add_force(p: argparse.ArgumentParser, writes: str) -> None:
    """--force, and what the command writes (`folder` or `file`, claimed by `claimed_output` before it runs)."""
    p.add_argument("--force", action="store_true",
                   help="write into --out even when another command, other settings or other files own it")
    p.set_defaults(writes=writes)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="smollm2-135m (embedded), a .gguf file, a local HF or layerboost folder, or a hub id")
    add_device_dtype(p)


def cmd_convert(args) -> int:
    import layerboost as lb

    plan = lb.LayerPlan.load(args.plan)
    model_fits(args.model, plan)
    model, tok = lb.load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    record = lb.convert(model, plan)
    lb.save(model, args.out, tokenizer=tok)
    print(plan.table())
    changed = sum(r.old != r.new for r in record)
    print(f"replaced attention in {changed} of {len(record)} layers; saved to {args.out}")
    return 0


def cmd_generate(args) -> int:
    import layerboost as lb

    model, tok = lb.load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    prompts = args.prompt
    if args.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(args.device)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and enc["input_ids"].shape[1] + args.max_new_tokens > context:
        raise UsageError(f"{enc['input_ids'].shape[1]} prompt tokens + --max-new-tokens {args.max_new_tokens} exceed the "
                         f"model's context of {context} tokens: ask for fewer new tokens")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature if args.temperature > 0 else None,
                             top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
    for row in out[:, enc["input_ids"].shape[1]:]:
        print(tok.decode(row, skip_special_tokens=True))
        print("---")
    return 0


def _policy_from_args(args):
    """The plan policy the arguments describe (None if no policy was given)."""
    from .plan import PlanPolicy

    common = dict(window=args.window, kind="linear_swa" if args.linear else "swa", score=args.score,
                  ranking=args.ranking, target=args.target)
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


def _policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan policy (most sensitive layers keep softmax, least sensitive lose attention)")
    g.add_argument("--softmax", type=positive(zero=True), help="number of softmax layers (counts: give two of three)")
    g.add_argument("--swa", type=positive(zero=True), help="number of sliding-window layers")
    g.add_argument("--none", type=positive(zero=True), help="number of attention-free layers")
    g.add_argument("--fractions", help="SOFTMAX,SWA fractions of layers, the rest none (e.g. 0.34,0.33)")
    g.add_argument("--softmax-above", type=float, help="threshold policy: drop (fraction, 0.01 = 1 point) >= this keeps softmax")
    g.add_argument("--none-below", type=float, help="drop < this becomes none (threshold and budget policies)")
    g.add_argument("--budget", type=positive(float), help="budget policy: max cost relative to the base (e.g. 0.33)")
    g.add_argument("--budget-measure", choices=["kv", "decode"], default="kv",
                   help="kv: KV-cache bytes; decode: bytes read per decoded token (weights + KV)")
    g.add_argument("--context", type=positive(), default=4096, help="context length the budget is computed at")
    g.add_argument("--window", type=positive(), default=64, help="window of the sliding-window layers")
    g.add_argument("--linear", action="store_true", help="use linear_swa instead of swa for windowed layers")
    g.add_argument("--score", choices=["drop", "margin", "kl", "cosine"], default="kl",
                   help="rank layers by KL(base || variant) on calibration text (default), the cosine proxy, the "
                        "gold-answer margin drop, or the accuracy drop (the paper's Eq. 3); analyze --iterative "
                        "re-measures this signal after each removal")
    g.add_argument("--ranking", choices=["auto", "iterative", "one-shot"], default="auto",
                   help="iterative: by the analysis' iterative history of --score (removed layers first, the rest by "
                        "the last step's scores: the signal that healed best, docs/results.md); one-shot: each layer "
                        "removed alone; auto (default): iterative where the analysis has that history")
    g.add_argument("--target", choices=["layerboost", "llama.cpp", "transformers"], default="layerboost",
                   help="what will serve the model: only plans it runs are placed (llama.cpp: softmax/swa/none, one "
                        "window, attention in layer 0; transformers: softmax/swa, one window; layerboost: any)")


def cmd_analyze(args) -> int:
    import json

    import layerboost as lb
    from .evaluate import Partition, get_task
    from .plan import check_fits
    from .report import plot_sensitivity
    from .sensitivity import PROXY_SCORES, analyze, check_analysis_dir, iterative_problems, iterative_steps_for
    from .sensitivity import plan_scores, ranking_used, sensitivity_table

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        get_task(t)
    check_writable(args.out)
    if args.no_proxies and args.score in PROXY_SCORES:
        raise UsageError(f"--score {args.score} ranks layers by a proxy that --no-proxies skips: drop --no-proxies, "
                         "or choose --score margin or drop")
    part = Partition("selection", args.selection_size, args.selection_seed).to_dict()
    check_analysis_dir(args.out, {"tasks": tasks, "limit": args.limit, "seed": args.seed, "partition": part})
    policy = _policy_from_args(args) or lb.plan.PlanPolicy(  # no policy given: thirds, --window and --linear apply
        "fractions", fractions=[1 / 3, 1 / 3], window=args.window, kind="linear_swa" if args.linear else "swa",
        score=args.score, ranking=args.ranking, target=args.target)

    def policy_fits(config):  # the plan policy and the iterative mode, tried on the model's layers before the analysis
        n = config.num_hidden_layers
        plan = lb.plan.make_plan(policy, [0.0] * n, config)
        check_fits(plan, config, (args.window, args.swa_window))
        problems = iterative_problems(policy, args.iterative, n, plan.counts()["none"])
        if problems:
            raise UsageError(f"--iterative {args.iterative} / --ranking {args.ranking}: " + "; ".join(problems))

    config = model_fits(args.model)
    if config is not None:
        policy_fits(config)
    model, tok = lb.load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    if config is None:
        policy_fits(model.config)
    res = analyze(model, tok, tasks, out_dir=args.out, limit=args.limit, seed=args.seed,
                  data_dir=args.data_dir, swa_window=args.swa_window, proxies=not args.no_proxies,
                  calib_seqs=args.calib_seqs, iterative_steps=iterative_steps_for(policy, model.config, args.iterative),
                  batch_tokens=args.batch_tokens,
                  reuse_prefix=not args.naive, selection_size=args.selection_size, selection_seed=args.selection_seed,
                  iterative_score=args.score)
    used = ranking_used(res, args.score, args.ranking, policy.thresholds)
    scores = plan_scores(res, args.score, used)
    plan = lb.plan.make_plan(policy, scores, model.config, log=print)
    plan.save(Path(args.out) / "plan.json")
    plot_sensitivity(res, plan, Path(args.out) / "sensitivity.png", score=args.score, ranking=used)
    print(sensitivity_table(res, plan))
    if "iterative" in res:
        print("iterative removal order:", [h["removed"] for h in res["iterative"]["history"]],
              "| disagreements with one-shot:", json.dumps(res["iterative"]["disagreements"]))
    print(f"plan: layers ranked by {args.score}, {used}")
    print(f"wrote {args.out}/sensitivity.json, sensitivity.png, plan.json "
          f"({res['timing']['total_seconds']:.0f} s)")
    return 0


def cmd_plan(args) -> int:
    import layerboost as lb
    from .models import model_config
    from .plan import check_fits
    from .sensitivity import load_sensitivity, plan_scores, ranking_used

    sens = load_sensitivity(args.sensitivity)
    policy = _policy_from_args(args)
    if policy is None:
        raise UsageError("give a policy: --softmax/--swa/--none counts, --fractions, --softmax-above/--none-below, or --budget")
    used = ranking_used(sens, args.score, args.ranking, policy.thresholds)
    scores = plan_scores(sens, args.score, used)
    check_writable(args.out, folder=False)
    if args.budget is not None and not args.model:
        raise UsageError("--budget needs --model (or a config folder) to know the layer sizes")
    config = model_config(args.model, hub=True) if args.model else None
    plan = lb.plan.make_plan(policy, scores, config, log=print)
    if config is not None:
        check_fits(plan, config)
    plan.save(args.out, extra={"written_by": args.written_by})
    print(plan.table(scores))
    print(f"layers ranked by {args.score}, {used}" + (" (removed layers first, in removal order: their score is a "
                                                      "rank below every measured one)" if used == "iterative" else ""))
    if config is not None:
        from .plan import relative_cost

        print(f"relative KV cache at {args.context} tokens: {relative_cost(plan, config, args.context, 'kv'):.3f}; "
              f"relative decode bytes/token: {relative_cost(plan, config, args.context, 'decode'):.3f}")
    print(f"wrote {args.out}")
    return 0


def _config_with_overrides(cls, args):
    """`cls.load(args.config)` with the --out / --data-dir / --model overrides applied (and validated)."""
    import dataclasses

    cfg = cls.load(args.config)
    overrides = {k: v for k, v in (("out", args.out), ("data_dir", args.data_dir), ("model", args.model)) if v}
    if getattr(args, "rows", None):
        overrides["rows"] = [r.strip() for r in args.rows.split(",") if r.strip()]
    cfg = cls.from_dict({**dataclasses.asdict(cfg), **overrides}) if overrides else cfg
    check_writable(cfg.out)
    return cfg


def _config_arguments(p: argparse.ArgumentParser, folder: str) -> None:
    p.add_argument("--out", help=f"{folder} (overrides the config's out)")
    p.add_argument("--force", action="store_true", help=f"write into the {folder} even when another command, other "
                   "settings or other files own it (stages whose settings changed are recomputed)")
    p.add_argument("--data-dir", help="local data folder (overrides the config's data_dir)")
    p.add_argument("--model", help="model (overrides the config's model)")


def _claim_config_out(cfg, command: str, args):
    """Claim a run / comparison folder (outputs.py) with the config's settings; what only says where, or how
    fast, is left out (a comparison's rows may be added to its folder later)."""
    from .outputs import claim

    import dataclasses

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "device", "threads", "rows")}
    return claim(cfg.out, command, settings, model=cfg.model, force=args.force,
                 resume_hint="rerun with the settings it was made with (its config.yaml), pass --force to recompute "
                             "the stages the new settings change, or ")


def cmd_run(args) -> int:
    from .run import RunConfig, run

    cfg = _config_with_overrides(RunConfig, args)
    with _claim_config_out(cfg, "run", args):
        report = run(cfg, log=lambda m: print(m, flush=True))
    print(f"report: {report}")
    return 0


def cmd_compare(args) -> int:
    from .compare import CompareConfig, compare

    cfg = _config_with_overrides(CompareConfig, args)
    with _claim_config_out(cfg, "compare", args):
        md = compare(cfg, log=lambda m: print(m, flush=True))
    print(f"comparison: {md}")
    return 0


def cmd_report(args) -> int:
    from .outputs import folder_lock
    from .report import write_report

    if not (Path(args.run) / "stages").is_dir():
        raise UsageError(f"--run {args.run} is not a run folder (no stages/ inside): give the folder `layerboost run` wrote")
    with folder_lock(Path(args.run), "report"):  # not while a run writes there
        print(f"wrote {write_report(args.run)}")
    return 0


GGUF_ONLY_TYPES = ("q8_0",)


def gguf_dtype_arg(value: str) -> str:
    """--dtype of export: the torch dtype names and aliases, f32/f16 (GGUF's names) and q8_0."""
    value = {"f32": "float32", "f16": "float16"}.get(value, value)
    return value if value in GGUF_ONLY_TYPES else dtype_arg(value)


def cmd_export(args) -> int:
    from .export import ExportError, export

    try:
        dtype = args.dtype if args.dtype in GGUF_ONLY_TYPES else DTYPES[args.dtype]
        out = export(args.model, args.out, format=args.format, dtype=dtype, gguf_arch=args.gguf_arch,
                     tokenizer_pre=args.tokenizer_pre)
    except ExportError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format} format)")
    if args.format == "gguf":
        from .export_gguf import describe

        print(describe(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="layerboost",
        description="Make a pretrained LLM cheaper to serve by reducing attention layer by layer (LayerBoost).",
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    p = sub.add_parser("convert", help="convert a model to a hybrid following a layer plan and save it",
                       description="Replace each decoder layer's attention as plan.json says; save safetensors + plan.")
    _model_args(p)
    p.add_argument("--plan", required=True, help="plan JSON: {'schema_version': 1, 'layers': [{'kind': ...}, ...]}")
    p.add_argument("--out", required=True, help="output folder")
    add_force(p, "folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text with a base or converted model",
                       description="Greedy (or sampled) generation; several --prompt values run as one left-padded batch.")
    _model_args(p)
    p.add_argument("--prompt", required=True, action="append", type=nonempty, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=positive(), default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=positive(float, zero=True), default=0.0, help="0 = greedy")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.set_defaults(func=cmd_generate)

    from .evaluate import add_eval_arguments, run_eval_cli

    p = sub.add_parser("eval", help="zero-shot benchmarks scored like lm-evaluation-harness",
                       description="Evaluate a model on multiple-choice tasks and perplexity; JSON + table.")
    add_eval_arguments(p)
    add_force(p, "file")
    p.set_defaults(func=run_eval_cli)
    p = sub.add_parser("analyze", help="layer sensitivity: benchmark drop when each layer's attention is removed",
                       description="For each decoder layer, score the model with only that layer's attention removed "
                       "(and optionally windowed) on the tasks; write sensitivity.json, sensitivity.png and plan.json "
                       "to --out. Per-layer results are saved as they finish: re-running resumes. MEMORY: the hidden "
                       "states entering the current layer are kept for every scored sequence (tokens x hidden x 4 "
                       "bytes, ~0.5 GB for 1000 items on SmolLM2-135M); lower --limit to bound it.")
    _model_args(p)
    p.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,winogrande,mmlu",
                   help="comma-separated task names or task definition .yaml/.json files")
    add_limit(p, 200)
    p.add_argument("--seed", type=int, default=0, help="subsample seed")
    p.add_argument("--selection-size", type=positive(), default=100,
                   help="documents per task reserved for selection (analysis); evaluation of a comparison never scores them")
    p.add_argument("--selection-seed", type=int, default=0, help="seed of the selection partition")
    p.add_argument("--data-dir", help="local data folder (default: $LAYERBOOST_DATA_DIR or ../shared/data)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--swa-window", type=positive(), help="also measure each layer with a sliding window of this size")
    p.add_argument("--no-proxies", action="store_true", help="skip the KL and cosine proxies")
    p.add_argument("--calib-seqs", type=positive(), default=8, help="calibration sequences (x256 tokens) for the proxies")
    p.add_argument("--iterative", type=iterative_steps, default="auto", metavar="K",
                   help="remove layers one at a time K times by --score, re-measuring the rest after each (the "
                        "plan then ranks by it, see --ranking); auto (default): as many as the plan's attention-free "
                        "layers for the kl and cosine scores (none for margin and drop, whose every step repeats "
                        "the item pass, for --ranking one-shot and for the threshold policy); 0: one-shot only. Costs about "
                        "one KL-proxy pass over the remaining layers per step (SmolLM2-135M, 10 steps, 8 calibration "
                        "sequences: 22 min on 2 CPU cores shared with other jobs)")
    p.add_argument("--batch-tokens", type=positive(), default=8192, help="padded tokens per forward")
    p.add_argument("--naive", action="store_true", help="recompute every layer for every variant (for checking)")
    p.add_argument("--threads", type=positive(), help="torch CPU threads (default: torch's)")
    _policy_args(p)
    add_force(p, "folder")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("plan", help="turn a sensitivity.json into a layer plan",
                       description="Choose each layer's kind from its sensitivity by counts, fractions, thresholds, "
                       "or a KV-cache / decode-cost budget; print the plan table and write plan JSON.")
    p.add_argument("--sensitivity", required=True, help="sensitivity.json from `layerboost analyze`")
    p.add_argument("--out", default="plan.json", help="plan JSON to write")
    p.add_argument("--model", help="model (for --budget: layer sizes; checks the plan fits it)")
    _policy_args(p)
    add_force(p, "file")
    p.set_defaults(func=cmd_plan)

    from .heal import add_heal_arguments, run_heal_cli

    p = sub.add_parser("heal", help="heal a hybrid by distillation from the original model (LoRA + attention transfer)",
                       description="Convert the model to the plan, then distil: attention transfer for windowed layers "
                       "(stage 1), LoRA logit distillation (stage 2); merge adapters and save. Resumable.")
    add_heal_arguments(p)
    add_force(p, "folder")
    p.set_defaults(func=run_heal_cli)

    from .bench import add_bench_arguments, run_bench_cli

    p = sub.add_parser("bench", help="decode latency, memory and throughput: hybrid vs base in one run",
                       description="Benchmarks that measure the base model and its hybrid alternately in one process.")
    add_bench_arguments(p)
    p.set_defaults(func=run_bench_cli, writes="folder")

    p = sub.add_parser("run", help="the whole pipeline: analyze, plan, convert, heal, eval, bench, report",
                       description="Run every stage from a YAML config into one run folder, ending with report.md. "
                       "Stages already done with the same settings are skipped, so re-running resumes.")
    p.add_argument("config", nargs="?", help="YAML config, or a shipped name (default, paper); default: default")
    _config_arguments(p, "run folder")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="the paper's comparison table: LayerBoost vs ablations and baselines",
                       description="Analyze on the selection partition, then measure every row (base, converted, "
                       "LayerBoost, w/o attention distillation, random/pattern placements, LoLCATs-style and "
                       "LLM-Drop-style baselines, other selection signals) on the evaluation partition at equal "
                       "healing budgets; writes comparison.md with paired tests and figures. Resumes row by row.")
    p.add_argument("config", nargs="?", help="YAML config or a shipped name (compare); default: compare")
    _config_arguments(p, "comparison folder")
    p.add_argument("--rows", help="comma-separated rows to run instead of the config's (e.g. the key rows' accuracy "
                   "first; rows may be added to a folder later)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="rebuild report.md of a run folder from its stage outputs",
                       description="Write RUN/report.md from the JSON and PNG files the stages wrote.")
    p.add_argument("--run", required=True, help="run folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write a hybrid in a format other engines load without layerboost",
                       description="transformers: softmax + swa plans (one window) as a native class with "
                       "config.layer_types (Llama/Mistral -> Ministral, Qwen2/Qwen3 keep theirs). deci: softmax + none "
                       "plans in the DeciLM / Nemotron-NAS block_configs format (vLLM, SGLang, TensorRT-LLM, mlx-lm). "
                       "gguf: one llama.cpp file, any plan of softmax, swa and none (softmax + swa + none needs the "
                       "patched llama.cpp of engines/llama.cpp/build.sh). "
                       "Plans a format cannot hold exactly are refused before anything is written.")
    p.add_argument("--model", required=True, help="a saved hybrid folder (layerboost convert / heal output)")
    p.add_argument("--format", required=True, choices=["transformers", "deci", "gguf"], help="output format")
    p.add_argument("--out", required=True, help="new output folder (must not exist, or be empty); for gguf a new "
                   "file name ending in .gguf")
    p.add_argument("--dtype", type=gguf_dtype_arg, default="float32", choices=list(DTYPES) + list(GGUF_ONLY_TYPES),
                   help="weights dtype written (fp32/f32, bf16, fp16/f16 are accepted too); gguf also takes q8_0")
    p.add_argument("--gguf-arch", choices=["llama", "deci", "granite_swa"], default=None,
                   help="gguf: the llama.cpp architecture (default: chosen from the plan: llama for softmax only, "
                   "deci with none layers, granite_swa for softmax + swa)")
    p.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="gguf: llama.cpp's pre-tokenizer name for a tokenizer layerboost does not recognise")
    p.set_defaults(func=cmd_export)

    return parser


def one_line(e: Exception) -> str:
    """An error message on one line: a headline and its problem list joined by '; '."""
    lines = [ln.strip().removeprefix("- ") for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:1] + ["; ".join(lines[1:])]).strip()


NOT_SETTINGS = {"func", "debug", "force", "out", "resume", "no_progress", "threads", "device", "command", "writes",
                "written_by"}  # what may change between a command and its rerun into the same output


def command_settings(args) -> dict:
    """The arguments that decide what a command writes (its output's owner record)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}


def claimed_output(args):
    """Claim the command's --out before it runs (outputs.py): folders get a manifest and a lock, files are
    checked for their writer. Commands without `writes`, an unset --out, and ranks > 0 of a launcher claim nothing."""
    import contextlib
    import os

    from .outputs import check_file, claim, written_by

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
                 key=key)


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


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. A user's mistake ends in one `error: ...` line on stderr and exit status 2, Ctrl-C
    in one line and exit status 130; `--debug` (anywhere on the command line) shows the traceback instead.
    Anything else is a bug and keeps its traceback."""
    argv, debug = normalise_argv(sys.argv[1:] if argv is None else list(argv))
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad argument (2; its `error:` line is printed)
        return e.code if isinstance(e.code, int) else 2
    args.debug = debug
    try:
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
        print("error: interrupted; finished work is kept (a heal keeps its last checkpoint): run the same command "
              "again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
