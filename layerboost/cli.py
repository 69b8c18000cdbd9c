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

    if False:  # EVAL
        from .evaluate import add_eval_arguments, run_eval_cli

        p = sub.add_parser("eval", help="zero-shot benchmarks scored like lm-evaluation-harness",
                           description="Evaluate a model on multiple-choice tasks and perplexity; JSON + table.")
        add_eval_arguments(p)
        p.set_defaults(func=run_eval_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
