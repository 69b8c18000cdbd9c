"""`layerboost generate`: generate text."""

from __future__ import annotations

import torch

from ..util import DTYPES, UsageError
from .options import positive, nonempty, model_args


MIN_TEMPERATURE = 1e-4  # float32 logits of ~30 divided by less than ~1e-37 are inf; 1e-4 keeps a wide margin


def temperature(value: str) -> float:
    """An argparse type: 0 (greedy) or a finite temperature >= MIN_TEMPERATURE."""
    import argparse

    t = positive(float, zero=True)(value)
    if 0 < t < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"{value} is too small to sample with (logits / temperature overflow): give 0 "
                                         f"for greedy decoding, or at least {MIN_TEMPERATURE}")
    return t


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a base or converted model",
                       description="Greedy (or sampled) generation; several --prompt values run as one left-padded batch.")
    model_args(p)
    p.add_argument("--prompt", required=True, action="append", type=nonempty, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=positive(), default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=temperature, default=0.0,
                   help=f"0 = greedy; else at least {MIN_TEMPERATURE} (below it logits / temperature overflow)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.set_defaults(func=run)


def run(args) -> int:
    import layerboost as lb

    model, tok = lb.load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    prompts = args.prompt
    if args.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(args.device)
    context = getattr(model.config, "max_position_embeddings", None)
    prompt_tokens = enc["input_ids"].shape[1]
    if context is not None and prompt_tokens >= context:
        raise UsageError(f"the prompt is {prompt_tokens} tokens, and the model's context is {context}: shorten the "
                         "prompt")
    if context is not None and prompt_tokens + args.max_new_tokens > context:
        raise UsageError(f"{prompt_tokens} prompt tokens + --max-new-tokens {args.max_new_tokens} exceed the "
                         f"model's context of {context} tokens: ask for at most {context - prompt_tokens} new tokens")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature if args.temperature > 0 else None,
                             top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
    for row in out[:, enc["input_ids"].shape[1]:]:
        print(tok.decode(row, skip_special_tokens=True))
        print("---")
    return 0
