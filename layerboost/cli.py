"""`layerboost <stage> ...`: one sub-command per pipeline stage. Results go to stdout, progress to stderr."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="smollm2-135m (embedded), a .gguf file, a local HF or layerboost folder, or a hub id")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights dtype (default float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def cmd_convert(args) -> int:
    import layerboost as lb

    model, tok = lb.load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    plan = lb.LayerPlan.load(args.plan)
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
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature if args.temperature > 0 else None,
                             top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
    for row in out[:, enc["input_ids"].shape[1]:]:
        print(tok.decode(row, skip_special_tokens=True))
        print("---")
    return 0


def _plan_from_args(args, scores, config):
    """The plan a policy's arguments describe (None if no policy was given)."""
    from . import plan as P

    swa_kind = "linear_swa" if args.linear else "swa"
    if args.budget is not None:
        return P.plan_by_budget(scores, config, args.budget, context=args.context, window=args.window,
                                measure=args.budget_measure, none_below=args.none_below, swa_kind=swa_kind)
    if args.softmax_above is not None:
        if args.none_below is None:
            raise SystemExit("--softmax-above needs --none-below")
        return P.plan_by_thresholds(scores, args.softmax_above, args.none_below, args.window, swa_kind)
    if args.fractions:
        f = [float(v) for v in args.fractions.split(",")]
        if len(f) != 2:
            raise SystemExit("--fractions takes SOFTMAX,SWA (the rest is none), e.g. 0.34,0.33")
        return P.plan_by_fractions(scores, f[0], f[1], args.window, swa_kind)
    if any(v is not None for v in (args.softmax, args.swa, args.none)):
        return P.plan_by_counts(scores, args.softmax, args.swa, args.none, args.window, swa_kind)
    return None


def _policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan policy (most sensitive layers keep softmax, least sensitive lose attention)")
    g.add_argument("--softmax", type=int, help="number of softmax layers (counts: give two of three)")
    g.add_argument("--swa", type=int, help="number of sliding-window layers")
    g.add_argument("--none", type=int, help="number of attention-free layers")
    g.add_argument("--fractions", help="SOFTMAX,SWA fractions of layers, the rest none (e.g. 0.34,0.33)")
    g.add_argument("--softmax-above", type=float, help="threshold policy: drop (fraction, 0.01 = 1 point) >= this keeps softmax")
    g.add_argument("--none-below", type=float, help="drop < this becomes none (threshold and budget policies)")
    g.add_argument("--budget", type=float, help="budget policy: max cost relative to the base (e.g. 0.33)")
    g.add_argument("--budget-measure", choices=["kv", "decode"], default="kv",
                   help="kv: KV-cache bytes; decode: bytes read per decoded token (weights + KV)")
    g.add_argument("--context", type=int, default=4096, help="context length the budget is computed at")
    g.add_argument("--window", type=int, default=64, help="window of the sliding-window layers")
    g.add_argument("--linear", action="store_true", help="use linear_swa instead of swa for windowed layers")
    g.add_argument("--score", choices=["drop", "margin", "kl", "cosine"], default="drop",
                   help="rank layers by accuracy drop (default), the (less noisy) gold-answer margin drop, or the KL / "
                        "cosine proxy on calibration text")


def cmd_analyze(args) -> int:
    import json
    from pathlib import Path

    import layerboost as lb
    from .report import plot_sensitivity
    from .sensitivity import analyze, plan_scores, sensitivity_table

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = lb.load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    limit = None if not args.limit else int(args.limit) if args.limit >= 1 else args.limit
    res = analyze(model, tok, args.tasks.split(","), out_dir=args.out, limit=limit, seed=args.seed,
                  data_dir=args.data_dir, swa_window=args.swa_window, proxies=not args.no_proxies,
                  calib_seqs=args.calib_seqs, iterative_steps=args.iterative, batch_tokens=args.batch_tokens,
                  reuse_prefix=not args.naive, selection_size=args.selection_size, selection_seed=args.selection_seed)
    scores = plan_scores(res, args.score)
    plan = _plan_from_args(args, scores, model.config)
    if plan is None:
        plan = lb.plan.plan_by_fractions(scores, 1 / 3, 1 / 3, args.window)
    plan.save(Path(args.out) / "plan.json")
    plot_sensitivity(res, plan, Path(args.out) / "sensitivity.png", score=args.score)
    print(sensitivity_table(res, plan))
    print(f"wrote {args.out}/sensitivity.json, sensitivity.png, plan.json "
          f"({res['timing']['total_seconds']:.0f} s)")
    if "iterative" in res:
        print("iterative removal order:", [h["removed"] for h in res["iterative"]["history"]],
              "| disagreements with one-shot:", json.dumps(res["iterative"]["disagreements"]))
    return 0


def cmd_plan(args) -> int:
    import json

    from transformers import AutoConfig

    import layerboost as lb
    from .sensitivity import plan_scores

    res = json.loads(open(args.sensitivity).read())
    scores = plan_scores(res, args.score)
    config = None
    if args.budget is not None:
        if not args.model:
            raise SystemExit("--budget needs --model (or a config folder) to know the layer sizes")
        config = lb.load_model(args.model)[0].config if args.model == "smollm2-135m" else AutoConfig.from_pretrained(args.model)
    plan = _plan_from_args(args, scores, config)
    if plan is None:
        raise SystemExit("give a policy: --softmax/--swa/--none counts, --fractions, --softmax-above/--none-below, or --budget")
    plan.save(args.out)
    print(plan.table(scores))
    if config is not None:
        from .plan import relative_cost

        print(f"relative KV cache at {args.context} tokens: {relative_cost(plan, config, args.context, 'kv'):.3f}; "
              f"relative decode bytes/token: {relative_cost(plan, config, args.context, 'decode'):.3f}")
    print(f"wrote {args.out}")
    return 0


def cmd_run(args) -> int:
    from .run import RunConfig, run

    cfg = RunConfig.load(args.config)
    overrides = {k: v for k, v in (("out", args.out), ("data_dir", args.data_dir), ("model", args.model)) if v}
    if overrides:
        cfg = RunConfig.from_dict({**cfg.to_dict(), **overrides})
    report = run(cfg, log=lambda m: print(m, flush=True))
    print(f"report: {report}")
    return 0


def cmd_compare(args) -> int:
    from .compare import CompareConfig, compare
    from .run import ConfigError

    try:
        cfg = CompareConfig.load(args.config)
        overrides = {k: v for k, v in (("out", args.out), ("data_dir", args.data_dir), ("model", args.model)) if v}
        if overrides:
            import dataclasses

            cfg = CompareConfig.from_dict({**dataclasses.asdict(cfg), **overrides})
        md = compare(cfg, log=lambda m: print(m, flush=True))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"comparison: {md}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(f"wrote {write_report(args.run)}")
    return 0


def cmd_export(args) -> int:
    from .export import ExportError, export

    try:
        out = export(args.model, args.out, format=args.format, dtype=DTYPES[args.dtype])
    except ExportError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format} format)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerboost",
        description="Make a pretrained LLM cheaper to serve by reducing attention layer by layer (LayerBoost).",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    p = sub.add_parser("convert", help="convert a model to a hybrid following a layer plan and save it",
                       description="Replace each decoder layer's attention as plan.json says; save safetensors + plan.")
    _model_args(p)
    p.add_argument("--plan", required=True, help="plan JSON: {'schema_version': 1, 'layers': [{'kind': ...}, ...]}")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text with a base or converted model",
                       description="Greedy (or sampled) generation; several --prompt values run as one left-padded batch.")
    _model_args(p)
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.set_defaults(func=cmd_generate)

    from .evaluate import add_eval_arguments, run_eval_cli

    p = sub.add_parser("eval", help="zero-shot benchmarks scored like lm-evaluation-harness",
                       description="Evaluate a model on multiple-choice tasks and perplexity; JSON + table.")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval_cli)
    p = sub.add_parser("analyze", help="layer sensitivity: benchmark drop when each layer's attention is removed",
                       description="For each decoder layer, score the model with only that layer's attention removed "
                       "(and optionally windowed) on the tasks; write sensitivity.json, sensitivity.png and plan.json "
                       "to --out. Per-layer results are saved as they finish: re-running resumes. MEMORY: the hidden "
                       "states entering the current layer are kept for every scored sequence (tokens x hidden x 4 "
                       "bytes, ~0.5 GB for 1000 items on SmolLM2-135M); lower --limit to bound it.")
    _model_args(p)
    p.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,winogrande,mmlu")
    p.add_argument("--limit", type=float, default=200,
                   help="items per task (stratified, seeded) from the selection partition; 0 = all of it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--selection-size", type=int, default=100,
                   help="documents per task reserved for selection (analysis); evaluation of a comparison never scores them")
    p.add_argument("--selection-seed", type=int, default=0, help="seed of the selection partition")
    p.add_argument("--data-dir", help="local data folder (default: $LAYERBOOST_DATA_DIR or ../shared/data)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--swa-window", type=int, help="also measure each layer with a sliding window of this size")
    p.add_argument("--no-proxies", action="store_true", help="skip the KL and cosine proxies")
    p.add_argument("--calib-seqs", type=int, default=8, help="calibration sequences (x256 tokens) for the proxies")
    p.add_argument("--iterative", type=int, default=0, metavar="K",
                   help="also remove layers one at a time K times, re-measuring after each")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward")
    p.add_argument("--naive", action="store_true", help="recompute every layer for every variant (for checking)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    _policy_args(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("plan", help="turn a sensitivity.json into a layer plan",
                       description="Choose each layer's kind from its sensitivity by counts, fractions, thresholds, "
                       "or a KV-cache / decode-cost budget; print the plan table and write plan JSON.")
    p.add_argument("--sensitivity", required=True, help="sensitivity.json from `layerboost analyze`")
    p.add_argument("--out", default="plan.json")
    p.add_argument("--model", help="model (for --budget: layer sizes)")
    _policy_args(p)
    p.set_defaults(func=cmd_plan)

    from .heal import add_heal_arguments, run_heal_cli

    p = sub.add_parser("heal", help="heal a hybrid by distillation from the original model (LoRA + attention transfer)",
                       description="Convert the model to the plan, then distil: attention transfer for windowed layers "
                       "(stage 1), LoRA logit distillation (stage 2); merge adapters and save. Resumable.")
    add_heal_arguments(p)
    p.set_defaults(func=run_heal_cli)

    from .bench import add_bench_arguments, run_bench_cli

    p = sub.add_parser("bench", help="decode latency, memory and throughput: hybrid vs base in one run",
                       description="Benchmarks that measure the base model and its hybrid alternately in one process.")
    add_bench_arguments(p)
    p.set_defaults(func=run_bench_cli)

    p = sub.add_parser("run", help="the whole pipeline: analyze, plan, convert, heal, eval, bench, report",
                       description="Run every stage from a YAML config into one run folder, ending with report.md. "
                       "Stages already done with the same settings are skipped, so re-running resumes.")
    p.add_argument("config", nargs="?", help="YAML config, or a shipped name (default, paper); default: default")
    p.add_argument("--out", help="run folder (overrides the config's out)")
    p.add_argument("--data-dir", help="local data folder (overrides the config's data_dir)")
    p.add_argument("--model", help="model (overrides the config's model)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="the paper's comparison table: LayerBoost vs ablations and baselines",
                       description="Analyze on the selection partition, then measure every row (base, converted, "
                       "LayerBoost, w/o attention distillation, random/pattern placements, LoLCATs-style and "
                       "LLM-Drop-style baselines, other selection signals) on the evaluation partition at equal "
                       "healing budgets; writes comparison.md with paired tests and figures. Resumes row by row.")
    p.add_argument("config", nargs="?", help="YAML config or a shipped name (compare); default: compare")
    p.add_argument("--out", help="comparison folder (overrides the config's out)")
    p.add_argument("--data-dir", help="local data folder (overrides the config's data_dir)")
    p.add_argument("--model", help="model (overrides the config's model)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="rebuild report.md of a run folder from its stage outputs",
                       description="Write RUN/report.md from the JSON and PNG files the stages wrote.")
    p.add_argument("--run", required=True, help="run folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write a hybrid in a format other engines load without layerboost",
                       description="transformers: softmax + swa plans (one window) as a native class with "
                       "config.layer_types (Llama/Mistral -> Ministral, Qwen2/Qwen3 keep theirs). deci: softmax + none "
                       "plans in the DeciLM / Nemotron-NAS block_configs format (vLLM, SGLang, TensorRT-LLM, mlx-lm). "
                       "Plans a format cannot hold exactly are refused before anything is written.")
    p.add_argument("--model", required=True, help="a saved hybrid folder (layerboost convert / heal output)")
    p.add_argument("--format", required=True, choices=["transformers", "deci"])
    p.add_argument("--out", required=True, help="new output folder (must not exist, or be empty)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights dtype written (default float32)")
    p.set_defaults(func=cmd_export)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
