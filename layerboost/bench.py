"""Efficiency benchmarks: decode latency, memory and throughput, base vs hybrid in one run.

    layerboost bench latency    --model smollm2-135m --hybrid-kinds none:10,swa:10,softmax:10 --window 64
    layerboost bench throughput --random-config llama-1b --dtype bf16 --concurrency 50,100,200

Both models decode with `layerboost.engine.Engine` (static-shape decode over preallocated buffers;
`--compile`: the step through `torch.compile`, CUDA graphs on a GPU), one after the other in the
same process, alternating: latency alternates in chunks of decode steps, throughput per
concurrency level (the order flips every level). Rules: warm-up excluded (and timed apart: with
`--compile` it includes compiling), the device is synchronised before every clock read, medians
over repeats with min and max, theoretical cache bytes next to the measured ones, ratios printed
last. Timing and progress go to stderr; the table goes to stdout, JSON and PNG plots to `--out`.

Roofline columns: `step MB` = the bytes one decode step must read (weights it uses + the caches
holding the context, `Engine.step_bytes`), `GB/s` = those bytes / the measured step time, and on
a GPU `%copy` = that over the device's copy bandwidth (1 GiB device-to-device copies, read +
write, measured once). The ratios put hybrid/base step time next to hybrid/base step bytes.

Latency methods (each timed run of steps reads a span of slots that ends where the run ends,
`Engine.span`: a step costs what it costs in an engine sized for that context):
    full     decode every token: one decode of the longest length per repeat, clock read at each
             requested length (the time to decode L tokens does not depend on decoding more later)
    sampled  (`--sample-steps S`) time S decode steps ending at each requested length (the engine
             jumps to that position; per-step cost does not depend on cache values), and estimate
             the total as the sum over every position of the per-step time interpolated linearly
             between the samples (attention is linear in the context, the rest is constant). For
             CPUs, where decoding 4096 tokens at batch 16 takes most of an hour per model.

Throughput: C sequences decoded as one static batch for `--output` tokens after a `--prompt`
token prompt: tokens/s = C * output / decode time (prefill reported separately, and end to end).
`--prefill shared` runs the prompt once at batch 1 and copies its cache into all C rows (decode
work is identical; the CPU default, where prefilling C long prompts would take minutes);
`batched` prefills all C prompts. A level that does not fit is recorded, not fatal: on a GPU a
`torch.OutOfMemoryError`; on the CPU the cache would exceed `--memory-budget-gb` (the run does not
allocate it, so a shared machine is never pushed into the kernel's OOM killer).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from .cache import expected_cache_bytes
from .engine import Engine
from .plan import KINDS, LayerPlan, PlanError

SCHEMA_VERSION = 1


class BenchError(ValueError):
    """Benchmark settings that cannot run on this machine; the message says what to lower."""


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

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
    model.random_config_name = name
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
        if kind not in KINDS:
            problems.append(f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
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
    """Spread the kinds evenly over the layers; with >= 2 softmax layers the first and last layer stay softmax.

    Each remaining layer takes the kind furthest behind its even share (ties: the order of `KINDS`),
    e.g. none:10,swa:10,softmax:10 -> S W - S W - ... S (S softmax, W swa, - none).
    """
    n = sum(counts.values())
    kinds: list[str | None] = [None] * n
    left = dict(counts)
    if left.get("softmax", 0) >= 2:
        kinds[0] = kinds[-1] = "softmax"
        left["softmax"] -= 2
    slots = [i for i in range(n) if kinds[i] is None]
    total = len(slots)
    used = {k: 0 for k in left}
    for j, i in enumerate(slots):
        k = max((k for k in left if used[k] < left[k]),
                key=lambda k: ((j + 1) * left[k] / total - used[k], -KINDS.index(k)))
        kinds[i] = k
        used[k] += 1
    return kinds  # type: ignore[return-value]


def hybrid_plan(num_layers: int, kinds: str | None = None, window: int = 64, plan_path: str | None = None) -> LayerPlan:
    """The hybrid's plan from `--plan plan.json` or `--hybrid-kinds` (default: thirds of none, swa, softmax)."""
    if plan_path:
        return LayerPlan.load(plan_path, num_layers=num_layers)
    return LayerPlan.from_kinds(interleave(parse_kinds(kinds or "none,swa,softmax", num_layers)), window=window,
                                num_layers=num_layers)


KIND_LETTERS = {"softmax": "S", "swa": "W", "linear_swa": "L", "none": "-", "bias": "b", "linear": "l"}


def kinds_string(plan: LayerPlan) -> str:
    """One letter per layer: S softmax, W swa, L linear_swa, - none."""
    return "".join(KIND_LETTERS[k] for k in plan.kinds)


def hybrid_of(base, plan: LayerPlan):
    """A converted copy of `base` that shares its weights (no extra memory for parameters)."""
    from .surgery import convert

    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    model = copy.deepcopy(base, memo)
    convert(model, plan)
    return model


def load_models(args):
    """(base, hybrid, description) from the CLI arguments."""
    from .surgery import decoder_parts, plan_of

    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    if args.random_config:
        base = random_model(args.random_config, dtype, device, num_layers=args.layers)
        name = f"random:{args.random_config}"
    else:
        from .models import load_model

        base, _ = load_model(args.model, dtype=dtype, device=device)
        name = args.model
        if plan_of(base) is not None:
            raise PlanError(f"{args.model} is already a hybrid: give the original model; "
                            "the hybrid is built by --plan/--hybrid-kinds")
    n_layers = len(decoder_parts(base)[1])
    plan = hybrid_plan(n_layers, args.hybrid_kinds, args.window, args.plan)
    hybrid = hybrid_of(base, plan)
    return base, hybrid, {"name": name, "plan": plan.to_dict(), "kinds": kinds_string(plan),
                          "params": sum(p.numel() for p in base.parameters()), "layers": n_layers}


# ---- measuring ----------------------------------------------------------------------------------


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu,
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
           "dtype": str(dtype).replace("torch.", ""), "gpu": None}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    import psutil

    env["ram_bytes"] = psutil.virtual_memory().total
    env["ram_available_bytes"] = psutil.virtual_memory().available
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prompt(vocab: int, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def _decode(engine: Engine, token: torch.Tensor, n: int, device) -> tuple[torch.Tensor, float]:
    """Decode n greedy steps; seconds between two synchronised clock reads."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        token = engine.decode_one_token(token).argmax(dim=-1, keepdim=True)
    _sync(device)
    return token, time.perf_counter() - t0


def _prefill(engine: Engine, ids: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    _sync(device)
    t0 = time.perf_counter()
    token = engine.prefill(ids).argmax(dim=-1, keepdim=True)
    _sync(device)
    if token.shape[0] != engine.batch_size:  # a shared (batch-1) prompt
        token = token.expand(engine.batch_size, 1).contiguous()
    return token, time.perf_counter() - t0


def _interp(x: torch.Tensor, xp: list[float], fp: list[float]) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, constant beyond the ends (numpy.interp)."""
    xp_t, fp_t = torch.tensor(xp, dtype=torch.float64), torch.tensor(fp, dtype=torch.float64)
    if len(xp) == 1:
        return fp_t.expand_as(x).clone()
    i = torch.searchsorted(xp_t, x).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp_t[i - 1], xp_t[i], fp_t[i - 1], fp_t[i]
    w = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return y0 + w * (y1 - y0)


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(device: str) -> float:
    """The device's measured copy bandwidth in GB/s, bytes read + written (1 GiB device-to-device copies).

    Measured once per process and device: 3 copies of warm-up, then 10 timed between two syncs.
    """
    dev = torch.device(device)
    src = torch.empty(2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    _sync(dev)
    seconds = (time.perf_counter() - t0) / 10
    del src, dst
    return 2 * 2**30 / seconds / 1e9


def roofline(step_bytes: int, step_s: float, copy_gbps: float | None = None) -> dict:
    """A decode step's roofline: the bytes it must read (`Engine.step_bytes`), the bandwidth it achieves
    reading them in `step_s` seconds, and, given the device's copy bandwidth, the fraction of it."""
    out = {"step_bytes": step_bytes, "achieved_gbps": step_bytes / step_s / 1e9}
    if copy_gbps:
        out["copy_bw_fraction"] = out["achieved_gbps"] / copy_gbps
    return out


def _profile(engine: Engine, token, steps: int, device) -> dict:
    """Where decode time goes: self time per op over `steps` steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        _decode(engine, token, steps, device)
    use_cuda = device.type == "cuda"
    rows = []
    for e in prof.key_averages():
        t = (e.self_device_time_total if use_cuda else e.self_cpu_time_total) / 1e3
        rows.append((t, e.key, e.count))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    groups = {"attention (sdpa / window softmax)": ("scaled_dot_product", "flash_attention", "_softmax", "exp", "amax"),
              "matmul (projections, MLP, lm_head)": ("addmm", "aten::mm", "aten::bmm", "matmul", "linear"),
              "cache writes (copy_)": ("copy_",),
              "elementwise (norms, rope, adds, activations)": ("mul", "add", "silu", "rsqrt", "pow", "mean", "neg",
                                                             "cat", "div", "sigmoid", "sum")}
    by_group = {g: 0.0 for g in groups}
    by_group["other"] = 0.0
    for t, key, _ in rows:
        g = next((g for g, pats in groups.items() if any(p in key for p in pats)), "other")
        by_group[g] += t
    return {"steps": steps, "total_ms": total, "ms_per_step": total / steps,
            "by_group_ms_per_step": {g: v / steps for g, v in by_group.items()},
            "top_ops": [{"op": k, "self_ms_per_step": t / steps, "calls_per_step": c / steps} for t, k, c in rows[:12]]}


def bench_latency(base, hybrid, batch: int = 16, prompt: int = 128, lengths=(512, 1024, 2048, 4096),
                  repeats: int = 3, warmup: int = 4, sample_steps: int = 0, chunk: int = 64,
                  profile_steps: int = 0, compile: bool = False, memory_budget_bytes: int | None = None,
                  device=None) -> dict:
    """Decode latency, cache memory and roofline vs decode length, base and hybrid alternating in one process.

    Args:
        base, hybrid: the two models (any pair the engine supports).
        batch: sequences per batch. prompt: prompt tokens. lengths: decode lengths (steps after the prefill).
        repeats: measured repeats (median, min, max). warmup: decode steps per model before measuring
            (compiled: at every span the timed steps use, at least 3: CUDA graphs record on the second call).
        sample_steps: 0 = decode every token ("full"); S > 0 = time S steps at each length ("sampled").
        chunk: full method: decode steps per turn before switching model (alternation granularity).
        profile_steps: profile this many steps per model at the longest context (0 = no profile).
        compile: decode with `Engine(..., compile=True)`; compile time is reported apart (`warmup_s`).
        memory_budget_bytes: CPU: refuse (before allocating) when the two caches at the longest length exceed this.

    Every timed step reads a span of slots that ends where its chunk or sample ends (`Engine.span`),
    so a step at context c costs what a step of an engine sized for c tokens costs.

    Returns:
        {"method", "results": [per model and length], "ratios": [per length], "warmup_s", "profile"?}
    """
    device = device or next(base.parameters()).device
    lengths = sorted(set(int(x) for x in lengths))
    tmax = prompt + max(lengths)
    models = {"base": base, "hybrid": hybrid}
    if device.type != "cuda" and memory_budget_bytes is not None:
        from .surgery import plan_of

        need = sum(expected_cache_bytes(plan_of(m) or LayerPlan.uniform("softmax", m.config.num_hidden_layers), m.config,
                                        batch, tmax, next(m.parameters()).dtype) for m in models.values())
        if need > memory_budget_bytes:
            raise BenchError(f"latency at {tmax} tokens with batch {batch} needs {need / 2**30:.3g} GiB of cache (base + "
                             f"hybrid), more than the memory budget of {memory_budget_bytes / 2**30:.3g} GiB: lower "
                             "--lengths or --batch, or raise --memory-budget-gb")
    engines = {name: Engine(m, batch, tmax, compile=compile) for name, m in models.items()}
    vocab = base.config.vocab_size
    ids = _prompt(vocab, batch, prompt, device)
    method = "sampled" if sample_steps else "full"
    points = sorted(set([sample_steps] + lengths)) if sample_steps else []  # sampled: decode lengths timed
    # (span, first position) of every timed run of steps
    if method == "sampled":
        spans = [(prompt + L, prompt + max(L - sample_steps, 0)) for L in points]
    else:  # chunks of `chunk` steps, cut at every length
        ends, done = [], 0
        for L in lengths:
            while done < L:
                done += min(chunk, L - done)
                ends.append(done)
        spans = [(prompt + e, prompt + s) for s, e in zip([0] + ends[:-1], ends)]
    samples = {(n, L): [] for n in models for L in points}
    _log(f"latency: batch {batch}, prompt {prompt}, lengths {lengths}, method {method}, repeats {repeats}"
         + (", compiled" if compile else ""))
    # Warm-up (excluded, timed apart: it includes compiling): a prefill and a few steps per model;
    # compiled, at every span (a new span compiles once more, or records a new CUDA graph).
    warm = max(warmup, 3) if compile else warmup
    warmup_s = {}
    for name, e in engines.items():
        t0 = time.perf_counter()
        tok, _ = _prefill(e, ids, device)
        for span, start in (spans if compile else spans[-1:]):
            e.span, e.pos = span, max(start, span - warm)
            tok, _ = _decode(e, tok, min(warm, span - e.pos), device)
        warmup_s[name] = time.perf_counter() - t0
        _log(f"  warm-up {name}: {warmup_s[name]:.1f}s" + (" (compile included)" if compile else ""))
    prefill_s = {n: [] for n in models}
    total = {(n, L): [] for n in models for L in lengths}
    step_ms = {(n, L): [] for n in models for L in lengths}  # ms per step at the end of each length
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        tokens = {}
        for n in order:
            engines[n].span = tmax
            tokens[n], dt = _prefill(engines[n], ids, device)
            prefill_s[n].append(dt)
        if method == "full":
            cum = {n: 0.0 for n in models}
            for span, start in spans:
                L = span - prompt
                for n in order:
                    engines[n].span = span
                    tokens[n], dt = _decode(engines[n], tokens[n], span - start, device)
                    cum[n] += dt
                    if L in lengths:  # the chunk that ends at L: ms per step there
                        step_ms[(n, L)].append(1e3 * dt / (span - start))
                if L in lengths:
                    for n in order:
                        total[(n, L)].append(cum[n])
                    _log(f"  repeat {r + 1}/{repeats} L={L}: " + ", ".join(f"{n} {cum[n]:.2f}s" for n in models))
        else:
            for L, (span, start) in zip(points, spans):
                for n in order:
                    engines[n].span, engines[n].pos = span, start  # cost per step depends on the span, not on values
                    tokens[n], dt = _decode(engines[n], tokens[n], span - start, device)
                    samples[(n, L)].append(1e3 * dt / (span - start))
                _log(f"  repeat {r + 1}/{repeats} context {span}: "
                     + ", ".join(f"{n} {samples[(n, L)][-1]:.1f} ms/step" for n in models))
    if method == "sampled":
        # Per repeat: ms/step at every position = linear interpolation between that repeat's samples
        # (x = the middle of each sampled span; constant beyond the first and last), summed over the
        # positions prompt .. prompt + L - 1. Per-step cost is linear in the context, so this is close.
        mid = [(span + start) / 2 for span, start in spans]
        for n in models:
            for r in range(repeats):
                ys = [samples[(n, L)][r] for L in points]
                for L in lengths:
                    pos = torch.arange(prompt, prompt + L, dtype=torch.float64)
                    total[(n, L)].append(float(_interp(pos, mid, ys).sum()) / 1e3)
            for L in lengths:
                step_ms[(n, L)] = samples[(n, L)]
    profile = {}
    if profile_steps:
        for n in models:
            e = engines[n]
            e.span, e.pos = tmax, tmax - profile_steps
            profile[n] = _profile(e, tokens[n], profile_steps, device)
            profile[n]["context"] = tmax
    copy_gbps = copy_bandwidth_gbps(str(device)) if device.type == "cuda" else None
    results = []
    for L in lengths:
        for n, m in models.items():
            e = engines[n]
            ms_tok = [1e3 * t / L for t in total[(n, L)]]
            step = statistics.median(step_ms[(n, L)])
            results.append({
                "model": n, "decode_len": L, "context": prompt + L, "batch": batch, "prompt": prompt,
                "total_s": stats(total[(n, L)]), "ms_per_token": stats(ms_tok),
                "tokens_per_s": batch * L / statistics.median(total[(n, L)]),
                "ms_per_step_at_end": stats(step_ms[(n, L)]), "prefill_s": stats(prefill_s[n]),
                "cache_bytes_theory": expected_cache_bytes(e.plan, m.config, batch, prompt + L, e.dtype),
                "cache_bytes_held": e.held_bytes(prompt + L),
                "cache_bytes_allocated": e.cache_bytes(),
                **roofline(e.step_bytes(prompt + L), step / 1e3, copy_gbps),
            })
    if device.type == "cuda":  # peak memory of a run of each length: an eager engine sized for it, prefill + 2 steps
        del engines
        gc.collect()
        torch.cuda.empty_cache()
        for res in results:
            m = models[res["model"]]
            torch.cuda.reset_peak_memory_stats(device)
            e = Engine(m, batch, prompt + res["decode_len"])
            tok, _ = _prefill(e, ids, device)
            _decode(e, tok, 2, device)
            res["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
            res["cache_bytes_allocated"] = e.cache_bytes()
            del e
            gc.collect()
            torch.cuda.empty_cache()
    ratios = []
    for L in lengths:
        b, h = [next(x for x in results if x["model"] == n and x["decode_len"] == L) for n in models]
        ratios.append({"decode_len": L,
                       "speedup": b["ms_per_token"]["median"] / h["ms_per_token"]["median"],
                       "speedup_at_end": b["ms_per_step_at_end"]["median"] / h["ms_per_step_at_end"]["median"],
                       "step_time_ratio": h["ms_per_step_at_end"]["median"] / b["ms_per_step_at_end"]["median"],
                       "step_bytes_ratio": h["step_bytes"] / b["step_bytes"],
                       "cache_ratio": h["cache_bytes_held"] / b["cache_bytes_held"],
                       "cache_ratio_theory": h["cache_bytes_theory"] / b["cache_bytes_theory"]})
        if "gpu_peak_bytes" in b:
            ratios[-1]["gpu_peak_ratio"] = h["gpu_peak_bytes"] / b["gpu_peak_bytes"]
    out = {"method": method, "sample_steps": sample_steps, "chunk": chunk, "repeats": repeats, "warmup": warmup,
           "compile": compile, "warmup_s": warmup_s, "results": results, "ratios": ratios,
           "peak_rss_bytes": peak_rss_bytes()}
    if copy_gbps is not None:
        out["copy_gbps"] = copy_gbps
    if method == "sampled":
        out["samples_ms_per_step"] = [{"model": n, "decode_len": L, "positions": [start, span],
                                       "values": samples[(n, L)]} for n in models for L, (span, start) in zip(points, spans)]
    if profile:
        out["profile"] = profile
    return out


def bench_throughput(base, hybrid, concurrency=(50, 100, 200), prompt: int = 1024, output: int = 16,
                     prefill: str = "shared", repeats: int = 1, warmup: int = 2,
                     memory_budget_bytes: int | None = None, compile: bool = False, device=None) -> dict:
    """Generated tokens/s at each concurrency level (C sequences decoded as one batch), base vs hybrid.

    Args:
        concurrency: sequences in flight per level. prompt / output: tokens per sequence.
        prefill: "shared" (one prompt, its cache copied into every row) or "batched" (C prompts).
        repeats: decode repeats per level (the position is rewound to the prompt; medians).
        warmup: decode steps per level before measuring (excluded; rewound; compiled: at least 3).
        memory_budget_bytes: CPU: a level whose cache would exceed this is recorded as not fitting
            instead of being allocated. GPU: `torch.OutOfMemoryError` is caught and recorded.
        compile: decode with `Engine(..., compile=True)`; compile time is reported apart (`warmup_s`).

    Returns:
        {"results": [per model and level], "ratios": [per level]}
    """
    if prefill not in ("shared", "batched"):
        raise ValueError(f"prefill must be 'shared' or 'batched', got {prefill!r}")
    device = device or next(base.parameters()).device
    models = {"base": base, "hybrid": hybrid}
    vocab = base.config.vocab_size
    results = []
    copy_gbps = copy_bandwidth_gbps(str(device)) if device.type == "cuda" else None
    warm = max(warmup, 3) if compile else warmup
    _log(f"throughput: concurrency {list(concurrency)}, prompt {prompt}, output {output}, prefill {prefill}"
         + (", compiled" if compile else ""))
    for li, c in enumerate(concurrency):
        order = list(models) if li % 2 == 0 else list(models)[::-1]
        for n in order:
            m = models[n]
            from .surgery import plan_of

            plan = plan_of(m) or LayerPlan.uniform("softmax", m.config.num_hidden_layers)
            dtype = next(m.parameters()).dtype
            theory = expected_cache_bytes(plan, m.config, c, prompt + output, dtype)
            res = {"model": n, "concurrency": c, "prompt": prompt, "output": output, "prefill": prefill,
                   "cache_bytes_theory": theory, "status": "ok"}
            results.append(res)
            if device.type != "cuda" and memory_budget_bytes is not None and theory > memory_budget_bytes:
                res["status"] = "exceeds_memory_budget"
                res["memory_budget_bytes"] = memory_budget_bytes
                _log(f"  C={c} {n}: cache needs {theory / 2**30:.1f} GiB > budget "
                     f"{memory_budget_bytes / 2**30:.1f} GiB: skipped")
                continue
            e = None
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                e = Engine(m, c, prompt + output, compile=compile)
                ids = _prompt(vocab, 1 if prefill == "shared" else c, prompt, device, seed=li)
                tok0, pre = _prefill(e, ids, device)
                t0 = time.perf_counter()
                _decode(e, tok0, warm, device)  # compiled: compiles (or records CUDA graphs) here
                res["warmup_s"] = time.perf_counter() - t0
                times = []
                for _ in range(repeats):
                    e.pos = prompt  # rewind (timing only: linear_swa states keep what warm-up folded)
                    _, dt = _decode(e, tok0, output, device)
                    times.append(dt)
                med = statistics.median(times)
                res.update({"decode_s": stats(times), "prefill_s": pre, "tokens_per_s": c * output / med,
                            "tokens_per_s_end_to_end": c * output / (med + pre),
                            "cache_bytes_allocated": e.cache_bytes(), "peak_rss_bytes": peak_rss_bytes(),
                            **roofline(e.step_bytes(prompt + output), med / output, copy_gbps)})
                if device.type == "cuda":
                    res["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
                _log(f"  C={c} {n}: {res['tokens_per_s']:.1f} tok/s (decode {med:.2f}s, prefill {pre:.2f}s)")
            except torch.OutOfMemoryError as err:
                res["status"] = "oom"
                res["error"] = str(err).splitlines()[0][:300]
                _log(f"  C={c} {n}: out of memory")
            finally:
                del e
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    ratios = []
    for c in concurrency:
        b, h = [next(x for x in results if x["model"] == n and x["concurrency"] == c) for n in models]
        r = {"concurrency": c, "base_status": b["status"], "hybrid_status": h["status"],
             "cache_ratio_theory": h["cache_bytes_theory"] / b["cache_bytes_theory"]}
        if b["status"] == h["status"] == "ok":
            r["throughput_ratio"] = h["tokens_per_s"] / b["tokens_per_s"]
            r["end_to_end_ratio"] = h["tokens_per_s_end_to_end"] / b["tokens_per_s_end_to_end"]
            r["step_bytes_ratio"] = h["step_bytes"] / b["step_bytes"]  # bytes predict throughput 1 / this
        ratios.append(r)
    out = {"repeats": repeats, "warmup": warmup, "compile": compile, "results": results, "ratios": ratios,
           "peak_rss_bytes": peak_rss_bytes()}
    if copy_gbps is not None:
        out["copy_gbps"] = copy_gbps
    return out


# ---- output -------------------------------------------------------------------------------------


def _mb(x) -> str:
    return f"{x / 2**20:,.1f}" if x is not None else "-"


def _roof_cols(r: dict, bw: bool) -> str:
    """step MB, GB/s (and % of the copy bandwidth) of one result row."""
    if "step_bytes" not in r:
        return f" {'-':>9} {'-':>7}" + (f" {'-':>6}" if bw else "")
    out = f" {r['step_bytes'] / 1e6:>9,.1f} {r['achieved_gbps']:>7.2f}"
    return out + (f" {100 * r['copy_bw_fraction']:>5.1f}%" if bw else "")


def _roof_head(bw: bool) -> str:
    return f" {'step MB':>9} {'GB/s':>7}" + (f" {'%copy':>6}" if bw else "")


def _compile_line(data: dict) -> str:
    w = data.get("warmup_s") or {}
    what = "compile + warm-up (excluded)" if data.get("compile") else "warm-up (excluded)"
    line = f"{what}: " + ", ".join(f"{n} {v:.1f}s" for n, v in w.items()) if w else ""
    if data.get("copy_gbps"):
        line += ("; " if line else "") + f"device copy bandwidth {data['copy_gbps']:,.0f} GB/s (read + write)"
    return line


def latency_table(data: dict) -> str:
    gpu = any("gpu_peak_bytes" in r for r in data["results"])
    bw = bool(data.get("copy_gbps"))
    rows = [f"{'L':>6} {'model':<7} {'ms/token median [min-max]':<30} {'ms/step@end':>11} {'tok/s':>8} "
            f"{'cache MiB':>10} {'theory MiB':>10}" + _roof_head(bw) + (f" {'GPU peak MiB':>12}" if gpu else "")]
    for r in data["results"]:
        t = r["ms_per_token"]
        line = (f"{r['decode_len']:>6} {r['model']:<7} " + f"{t['median']:.2f} [{t['min']:.2f}-{t['max']:.2f}]".ljust(30)
                + f" {r['ms_per_step_at_end']['median']:>11.2f} {r['tokens_per_s']:>8.1f} {_mb(r['cache_bytes_held']):>10}"
                f" {_mb(r['cache_bytes_theory']):>10}" + _roof_cols(r, bw))
        if gpu:
            line += f" {_mb(r.get('gpu_peak_bytes')):>12}"
        rows.append(line)
    rows.append("step MB: weights + caches one decode step must read at context prompt + L; "
                "GB/s: step MB / ms/step@end")
    if _compile_line(data):
        rows.append(_compile_line(data))
    for n, prof in data.get("profile", {}).items():
        groups = ", ".join(f"{g.split(' (')[0]} {v:.1f}" for g, v in prof["by_group_ms_per_step"].items())
        rows.append(f"profile {n} at context {prof['context']}: {prof['ms_per_step']:.1f} ms/step = {groups}")
    rows.append("ratios (hybrid vs base):")
    for q in data["ratios"]:
        rows.append(f"  L={q['decode_len']}: speedup {q['speedup']:.2f}x (at end {q['speedup_at_end']:.2f}x), "
                    f"cache {q['cache_ratio']:.3f}x (theory {q['cache_ratio_theory']:.3f}x)"
                    + (f", GPU peak {q['gpu_peak_ratio']:.3f}x" if "gpu_peak_ratio" in q else "")
                    + (f"; step time hybrid/base {q['step_time_ratio']:.3f}x, "
                       f"bytes predict {q['step_bytes_ratio']:.3f}x"
                       if "step_bytes_ratio" in q else ""))
    q = data["ratios"][-1]
    rows.append(f"hybrid/base at L={q['decode_len']}: time per token {1 / q['speedup']:.3f}x "
                f"(throughput {q['speedup']:.2f}x), cache bytes {q['cache_ratio']:.3f}x")
    return "\n".join(rows)


def throughput_table(data: dict) -> str:
    bw = bool(data.get("copy_gbps"))
    rows = [f"{'C':>5} {'model':<7} {'status':<22} {'tok/s':>9} {'e2e tok/s':>10} {'decode s':>9} {'prefill s':>9} "
            f"{'cache MiB':>10}" + _roof_head(bw)]
    for r in data["results"]:
        ok = r["status"] == "ok"
        rows.append(f"{r['concurrency']:>5} {r['model']:<7} {r['status']:<22} "
                    + (f"{r['tokens_per_s']:>9.1f} {r['tokens_per_s_end_to_end']:>10.1f} {r['decode_s']['median']:>9.2f} "
                       f"{r['prefill_s']:>9.2f} " if ok else f"{'-':>9} {'-':>10} {'-':>9} {'-':>9} ")
                    + f"{_mb(r['cache_bytes_theory']):>10}" + _roof_cols(r, bw))
    rows.append("step MB: weights + caches one decode step must read at context prompt + output; "
                "GB/s: step MB / step time")
    warm = {f"{r['model']}@C={r['concurrency']}": r["warmup_s"] for r in data["results"] if "warmup_s" in r}
    if warm or data.get("copy_gbps"):
        rows.append(_compile_line({**data, "warmup_s": warm}))
    rows.append("ratios (hybrid vs base):")
    parts = []
    for q in data["ratios"]:
        if "throughput_ratio" in q:
            parts.append(f"C={q['concurrency']} {q['throughput_ratio']:.2f}x")
        else:
            parts.append(f"C={q['concurrency']} base {q['base_status']}, hybrid {q['hybrid_status']}")
        rows.append(f"  C={q['concurrency']}: " + (f"throughput {q['throughput_ratio']:.2f}x (end to end "
                    f"{q['end_to_end_ratio']:.2f}x, bytes predict {1 / q['step_bytes_ratio']:.2f}x), "
                    if "throughput_ratio" in q else
                    f"base {q['base_status']}, hybrid {q['hybrid_status']}, ") + f"cache {q['cache_ratio_theory']:.3f}x")
    rows.append("hybrid/base throughput: " + "; ".join(parts))
    return "\n".join(rows)


def plot_latency(data: dict, path: Path) -> None:
    """Figure 3 style: latency and memory vs decode length, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    mem_key = "gpu_peak_bytes" if any("gpu_peak_bytes" in r for r in data["results"]) else "cache_bytes_held"
    for n in ("base", "hybrid"):
        rs = [r for r in data["results"] if r["model"] == n]
        xs = [r["decode_len"] for r in rs]
        ax1.errorbar(xs, [r["total_s"]["median"] for r in rs],
                     yerr=[[r["total_s"]["median"] - r["total_s"]["min"] for r in rs],
                           [r["total_s"]["max"] - r["total_s"]["median"] for r in rs]], marker="o", capsize=3, label=n)
        ax2.plot(xs, [r[mem_key] / 2**30 for r in rs], marker="o", label=n)
    ax1.set(xlabel="decode length (tokens)", ylabel="decode time (s)",
            title=f"latency, batch {data['results'][0]['batch']} ({data['method']})")
    ax2.set(xlabel="decode length (tokens)",
            ylabel="GPU peak memory (GiB)" if mem_key == "gpu_peak_bytes" else "KV cache (GiB)", title="memory")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_accuracy(path: str) -> dict[str, float]:
    """Accuracy per model from an eval JSON: {"base": 0.52, "hybrid": 0.50}, or values that are objects
    with one of "accuracy", "acc", "average", "mean" (optionally under a top-level "models")."""
    data = json.loads(Path(path).read_text())
    data = data.get("models", data)
    out = {}
    for n in ("base", "hybrid"):
        v = data.get(n)
        if isinstance(v, dict):
            v = next((v[k] for k in ("accuracy", "acc", "average", "mean") if k in v), None)
        if not isinstance(v, (int, float)):
            raise ValueError(f"{path}: no accuracy for {n!r}; expected {{'base': 0.5, 'hybrid': 0.48}} or "
                             "{'base': {'accuracy': 0.5}, ...}")
        out[n] = float(v)
    return out


def plot_throughput(data: dict, path: Path, accuracy: dict[str, float] | None = None) -> None:
    """Throughput per concurrency level; with `accuracy`, Figure 2 style: accuracy vs throughput per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [q["concurrency"] for q in data["ratios"]]
    fig, axes = plt.subplots(1, len(levels) if accuracy else 1, figsize=(4 * len(levels) if accuracy else 6, 4),
                             squeeze=False)
    if accuracy:
        for ax, c in zip(axes[0], levels):
            for n, marker in (("base", "o"), ("hybrid", "s")):
                r = next(x for x in data["results"] if x["model"] == n and x["concurrency"] == c)
                if r["status"] == "ok":
                    ax.scatter([r["tokens_per_s"]], [accuracy[n]], marker=marker, s=60, label=n)
                else:
                    ax.axhline(accuracy[n], ls=":", color="gray", label=f"{n}: {r['status']}")
            ax.set(title=f"concurrency {c}", xlabel="throughput (tokens/s)", ylabel="accuracy")
            ax.grid(alpha=0.3)
            ax.legend()
    else:
        ax = axes[0][0]
        width = 0.38
        for j, n in enumerate(("base", "hybrid")):
            vals = []
            for c in levels:
                r = next(x for x in data["results"] if x["model"] == n and x["concurrency"] == c)
                vals.append(r["tokens_per_s"] if r["status"] == "ok" else 0.0)
            ax.bar([i + (j - 0.5) * width for i in range(len(levels))], vals, width, label=n)
        ax.set_xticks(range(len(levels)), [str(c) for c in levels])
        ax.set(xlabel="concurrency (sequences in flight; 0 = did not fit)", ylabel="tokens/s", title="throughput")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- CLI ----------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _common(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="smollm2-135m (embedded), a .gguf file, or a local HF folder (the base model)")
    src.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS),
                     help="a random-weight model with a real checkpoint's shape (speed does not depend on weights)")
    from .cli import add_device_dtype, positive

    p.add_argument("--layers", type=positive(), help="with --random-config: override the number of layers")
    add_device_dtype(p)
    p.add_argument("--threads", type=positive(), help="torch CPU threads (default: torch's)")
    p.add_argument("--memory-budget-gb", type=positive(float), default=None,
                   help="CPU: refuse (latency) or skip and record (throughput) what needs more cache than this "
                        "(default: half the available RAM)")
    hp = p.add_mutually_exclusive_group()
    hp.add_argument("--plan", help="the hybrid's plan JSON")
    hp.add_argument("--hybrid-kinds", default=None,
                    help="counts per kind, e.g. none:10,swa:10,softmax:10; a kind without a count shares the rest "
                         "(default none,swa,softmax = thirds). Layout: softmax first and last, the rest spread evenly")
    p.add_argument("--window", type=positive(), default=64, help="window of swa / linear_swa layers")
    p.add_argument("--warmup", type=int, default=None, help="decode steps per model before measuring (excluded)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on a GPU); compile time is reported apart")
    p.add_argument("--out", help="folder for the JSON and PNG plots")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `latency` and `throughput` sub-commands to `parser` (the `layerboost bench` parser)."""
    sub = parser.add_subparsers(dest="bench_command", required=True)
    from .cli import RawHelpFormatter

    lat = sub.add_parser("latency", help="decode latency and memory vs decode length (batch 16), base vs hybrid",
                         description=__doc__, formatter_class=RawHelpFormatter)
    _common(lat)
    lat.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    lat.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    lat.add_argument("--lengths", type=_ints, default=None,
                     help="decode lengths (default CPU 512,1024,2048,4096; GPU 1024,...,32768)")
    lat.add_argument("--repeats", type=int, default=3, help="measured repeats (median, min, max)")
    lat.add_argument("--sample-steps", type=int, default=0,
                     help="0: decode every token (default); S: time S steps at each length and estimate totals")
    lat.add_argument("--chunk", type=int, default=64, help="full method: steps per model turn")
    lat.add_argument("--profile", type=int, default=0, metavar="STEPS",
                     help="profile STEPS decode steps per model at the longest context")
    thr = sub.add_parser("throughput", help="tokens/s at concurrency 50/100/200, base vs hybrid",
                         description=__doc__, formatter_class=RawHelpFormatter)
    _common(thr)
    thr.add_argument("--concurrency", type=_ints, default=[50, 100, 200], help="sequences in flight per level")
    thr.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 1024)")
    thr.add_argument("--output", type=int, default=None, help="generated tokens per sequence (default CPU 16, GPU 256)")
    thr.add_argument("--prefill", choices=["shared", "batched"], default=None,
                     help="shared: one prompt copied into every row (CPU default); batched: C prompts (GPU default)")
    thr.add_argument("--repeats", type=int, default=1, help="decode repeats per level (median)")
    thr.add_argument("--eval-json", help="accuracy per model ({'base': 0.5, 'hybrid': 0.48}) for a Figure 2 plot")


def run_bench_cli(args) -> int:
    """Run `layerboost bench latency|throughput` from parsed arguments; prints the table, writes JSON/PNG."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from .cli import check_writable, model_fits

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.out:
        check_writable(args.out)
    if args.model:
        model_fits(args.model, LayerPlan.load(args.plan) if args.plan else None, (args.window,))
    budget = None  # CPU: the caches must fit this (GPU: out-of-memory is caught and recorded)
    if not gpu:
        if args.memory_budget_gb is not None:
            budget = int(args.memory_budget_gb * 2**30)
        else:
            import psutil

            budget = psutil.virtual_memory().available // 2
    t0 = time.perf_counter()
    base, hybrid, desc = load_models(args)
    _log(f"models ready in {time.perf_counter() - t0:.1f}s; hybrid layers: {desc['kinds']} "
         "(S softmax, W swa, L linear_swa, - none)")
    env = environment(device, DTYPES[args.dtype])
    out = {"schema_version": SCHEMA_VERSION, "benchmark": args.bench_command, "environment": env, "model": desc,
           "command": " ".join(sys.argv)}
    if args.bench_command == "latency":
        lengths = args.lengths or ([1024, 2048, 4096, 8192, 16384, 32768] if gpu else [512, 1024, 2048, 4096])
        data = bench_latency(base, hybrid, batch=args.batch, prompt=args.prompt, lengths=lengths, repeats=args.repeats,
                             warmup=4 if args.warmup is None else args.warmup, sample_steps=args.sample_steps,
                             chunk=args.chunk, profile_steps=args.profile, compile=args.compile,
                             memory_budget_bytes=budget, device=device)
        table = latency_table(data)
    else:
        data = bench_throughput(base, hybrid, concurrency=args.concurrency,
                                prompt=args.prompt or 1024, output=args.output or (256 if gpu else 16),
                                prefill=args.prefill or ("batched" if gpu else "shared"), repeats=args.repeats,
                                warmup=2 if args.warmup is None else args.warmup,
                                memory_budget_bytes=budget, compile=args.compile, device=device)
        table = throughput_table(data)
    out.update(data)
    out["wall_s"] = time.perf_counter() - t0
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        name = args.bench_command
        (folder / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
        if name == "latency":
            plot_latency(out, folder / "latency.png")
        else:
            plot_throughput(out, folder / "throughput.png",
                            read_accuracy(args.eval_json) if getattr(args, "eval_json", None) else None)
        (folder / f"{name}.txt").write_text(table + "\n")
        _log(f"wrote {folder / (name + '.json')} and plots")
    print(f"{desc['name']} | {env['device']} {env['gpu'] or env['cpu']} | {env['dtype']} | threads {env['threads']} | "
          f"torch {env['torch']} | transformers {env['transformers']}")
    print(f"hybrid plan: {desc['kinds']} (S softmax, W swa, L linear_swa, - none; window {args.window})")
    print(table)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerboost.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    return run_bench_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
