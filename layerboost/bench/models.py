"""Models and plans to benchmark: random-weight models of real shapes, hybrid plans from kind counts."""

from __future__ import annotations

import copy

import torch

from .. import kinds as K
from ..plan import LayerPlan, PlanError, cap_to_native
from ..util import parse_dtype


SCHEMA_VERSION = 1


class BenchError(ValueError):
    """Benchmark settings that cannot run on this machine; the message says what to lower."""


# Shapes of real checkpoints, for random-weight models (speed does not depend on weight values).
RANDOM_CONFIGS = {
    "smollm2-135m": dict(arch="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama-1b": dict(arch="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                     rope_theta=500000.0, tie_word_embeddings=True),
    "llama-8b": dict(arch="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
                     rope_theta=500000.0, tie_word_embeddings=False),
    "mistral-7b": dict(arch="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=32768,
                       rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen2-7b": dict(arch="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, head_dim=128, intermediate_size=18944, vocab_size=152064,
                     rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen3-8b": dict(arch="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                     rope_theta=1000000.0, tie_word_embeddings=False),
    # For tests and smoke runs.
    "tiny": dict(arch="llama", hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, vocab_size=256, rope_theta=10000.0, tie_word_embeddings=True),
}


# ---- models and plans ---------------------------------------------------------------------------


def random_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 num_layers: int | None = None, seed: int = 0):
    """A random-weight model with the shape of a real checkpoint (`RANDOM_CONFIGS`), built on `device` in `dtype`.

    Built on the meta device and materialised directly where it runs (no slow init): weights
    N(0, 0.02), norms 1, biases 0.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    if name not in RANDOM_CONFIGS:
        raise KeyError(f"unknown random config {name!r}; known: {', '.join(RANDOM_CONFIGS)}")
    shape = dict(RANDOM_CONFIGS[name])
    arch = shape.pop("arch")
    theta = shape.pop("rope_theta")
    if num_layers is not None:
        shape["num_hidden_layers"] = num_layers
    common = dict(**shape, max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": theta},
                  attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cls, cfg = {
        "llama": (LlamaForCausalLM, lambda: LlamaConfig(**common)),
        "mistral": (MistralForCausalLM, lambda: MistralConfig(**common, sliding_window=None)),
        "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**common, attention_bias=True, use_sliding_window=False)),
        "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**common, use_sliding_window=False)),
    }[arch]
    config = cfg()
    with torch.device("meta"):
        model = cls(config).to(dtype)  # free on meta; then allocated once, in dtype, where it runs
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif pname.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        with torch.device(device):  # non-persistent buffers (rotary inv_freq) were left empty by to_empty
            model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.tie_weights()
    return model.eval()


def parse_kinds(text: str, num_layers: int) -> dict[str, int]:
    """`none:10,swa:10,softmax:10` -> counts; kinds without a count share the remaining layers equally
    (leftovers go to the later-listed kinds), so `none,swa,softmax` means thirds.

    Raises:
        PlanError: unknown kind, bad count, or counts that do not add up to `num_layers`.
    """
    counts: dict[str, int | None] = {}
    problems = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, n = part.partition(":")
        if kind not in K.KINDS:
            problems.append(f"unknown kind {kind!r}; known kinds: {', '.join(K.KINDS)}")
        elif kind in counts:
            problems.append(f"kind {kind!r} is listed twice")
        elif n and (not n.isdigit()):
            problems.append(f"count for {kind!r} must be a non-negative integer, got {n!r}")
        else:
            counts[kind] = int(n) if n else None
    if not counts and not problems:
        problems.append("no kinds given")
    if problems:
        raise PlanError("invalid --hybrid-kinds:\n  - " + "\n  - ".join(problems))
    fixed = sum(c for c in counts.values() if c is not None)
    free = [k for k, c in counts.items() if c is None]
    rest = num_layers - fixed
    if rest < 0 or (not free and rest != 0):
        raise PlanError(f"--hybrid-kinds counts add up to {fixed}, but the model has {num_layers} layers")
    for j, k in enumerate(free):
        counts[k] = rest // len(free) + (1 if j >= len(free) - rest % len(free) else 0)
    return {k: c for k, c in counts.items() if c}


def interleave(counts: dict[str, int]) -> list[str]:
    """The benchmarks' layout: the kinds spread evenly (`plan.spread`, ties in the order of `kinds.KINDS`), the
    first and last layer softmax when there are two or more, e.g. none:10,swa:10,softmax:10 -> S W - S W - ... S."""
    from ..plan import spread

    order = sorted(counts, key=list(K.KINDS).index)
    return spread({k: counts[k] for k in order}, pin_softmax_ends=True)


def hybrid_plan(num_layers: int, kinds: str | None = None, window: int = 64, plan_path: str | None = None) -> LayerPlan:
    """The hybrid's plan from `--plan plan.json` or `--hybrid-kinds` (default: thirds of none, swa, softmax)."""
    if plan_path:
        return LayerPlan.load(plan_path, num_layers=num_layers)
    return LayerPlan.from_kinds(interleave(parse_kinds(kinds or "none,swa,softmax", num_layers)), window=window,
                                num_layers=num_layers)


def kinds_string(plan: LayerPlan) -> str:
    """One letter per layer (the kinds' letters: S softmax, W swa, L linear_swa, - none, ...)."""
    return "".join(K.kind(k).letter for k in plan.kinds)


def hybrid_of(base, plan: LayerPlan):
    """A converted copy of `base` that shares its weights (no extra memory for parameters)."""
    from ..surgery import convert

    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    model = copy.deepcopy(base, memo)
    convert(model, plan)
    return model


def load_models(model: str | None = None, *, random_config: str | None = None, layers: int | None = None,
                dtype: str = "float32", device: str = "cpu", plan: str | None = None, hybrid_kinds: str | None = None,
                window: int = 64):
    """(base, hybrid, description): the base (`model`, or a random model of `random_config`'s shape with `layers`)
    and its hybrid (the plan JSON `plan`, or the kinds `hybrid_kinds` laid out with `window`)."""
    from ..surgery import decoder_parts, plan_of

    dtype, device = parse_dtype(dtype), torch.device(device)
    if random_config:
        base = random_model(random_config, dtype, device, num_layers=layers)
        name = f"random:{random_config}"
    else:
        from ..models import load_model

        base, _ = load_model(model, dtype=dtype, device=device)
        name = model
        if plan_of(base) is not None:
            raise PlanError(f"{model} is already a hybrid: give the original model; "
                            "the hybrid is built by --plan/--hybrid-kinds")
    n_layers = len(decoder_parts(base)[1])
    plan_path = plan
    plan = hybrid_plan(n_layers, hybrid_kinds, window, plan_path)
    if not plan_path:  # layers that slide natively (Gemma 3's local layers) keep at most their own window
        plan = cap_to_native(plan, base.config)[0]
    hybrid = hybrid_of(base, plan)
    return base, hybrid, {"name": name, "plan": plan.to_dict(), "kinds": kinds_string(plan),
                          "params": sum(p.numel() for p in base.parameters()), "layers": n_layers}
