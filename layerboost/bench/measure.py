"""Measuring: decode latency and memory vs length, throughput at given concurrency, roofline numbers;
base and hybrid alternate in one process."""

from __future__ import annotations

import functools
import gc
import resource
import statistics
import sys
import time

import torch

from ..cache import expected_cache_bytes
from ..engine import Engine
from ..plan import native_plan
from .models import BenchError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_prompt(vocab: int, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def timed_decode(engine: Engine, token: torch.Tensor, n: int, device) -> tuple[torch.Tensor, float]:
    """Decode n greedy steps; seconds between two synchronised clock reads."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        token = engine.decode_one_token(token).argmax(dim=-1, keepdim=True)
    _sync(device)
    return token, time.perf_counter() - t0


def timed_prefill(engine: Engine, ids: torch.Tensor, device) -> tuple[torch.Tensor, float]:
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
        timed_decode(engine, token, steps, device)
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


def _check_cache_budget(models: dict, batch: int, tmax: int, budget: int) -> None:
    """Refuse, before anything is allocated, a run whose two caches at `tmax` tokens exceed `budget` bytes."""
    from ..surgery import plan_of

    need = sum(expected_cache_bytes(plan_of(m) or native_plan(m), m.config,
                                    batch, tmax, next(m.parameters()).dtype) for m in models.values())
    if need > budget:
        raise BenchError(f"latency at {tmax} tokens with batch {batch} needs {need / 2**30:.3g} GiB of cache (base + "
                         f"hybrid), more than the memory budget of {budget / 2**30:.3g} GiB: lower "
                         "--lengths or --batch, or raise --memory-budget-gb")


def _timed_spans(prompt: int, lengths: list[int], points: list[int], sample_steps: int,
                 chunk: int) -> list[tuple[int, int]]:
    """(span, first position) of every timed run of steps: sampled, `sample_steps` steps ending at each point;
    full, chunks of `chunk` steps cut at every length."""
    if sample_steps:
        return [(prompt + L, prompt + max(L - sample_steps, 0)) for L in points]
    ends, done = [], 0
    for L in lengths:
        while done < L:
            done += min(chunk, L - done)
            ends.append(done)
    return [(prompt + e, prompt + s) for s, e in zip([0] + ends[:-1], ends)]


def _gpu_peaks(models: dict, results: list[dict], batch: int, prompt: int, ids, device) -> None:
    """GPU peak memory of a run of each length: an eager engine sized for it, prefill + 2 steps (into `results`)."""
    gc.collect()
    torch.cuda.empty_cache()
    for res in results:
        m = models[res["model"]]
        torch.cuda.reset_peak_memory_stats(device)
        e = Engine(m, batch, prompt + res["decode_len"])
        tok, _ = timed_prefill(e, ids, device)
        timed_decode(e, tok, 2, device)
        res["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        res["cache_bytes_allocated"] = e.cache_bytes()
        del e
        gc.collect()
        torch.cuda.empty_cache()


def _latency_ratios(results: list[dict], lengths: list[int], names: list[str]) -> list[dict]:
    """Hybrid against base at each length: speed-ups, step time and bytes, cache (and GPU peak) ratios."""
    ratios = []
    for L in lengths:
        b, h = [next(x for x in results if x["model"] == n and x["decode_len"] == L) for n in names]
        ratios.append({"decode_len": L,
                       "speedup": b["ms_per_token"]["median"] / h["ms_per_token"]["median"],
                       "speedup_at_end": b["ms_per_step_at_end"]["median"] / h["ms_per_step_at_end"]["median"],
                       "step_time_ratio": h["ms_per_step_at_end"]["median"] / b["ms_per_step_at_end"]["median"],
                       "step_bytes_ratio": h["step_bytes"] / b["step_bytes"],
                       "cache_ratio": h["cache_bytes_held"] / b["cache_bytes_held"],
                       "cache_ratio_theory": h["cache_bytes_theory"] / b["cache_bytes_theory"]})
        if "gpu_peak_bytes" in b:
            ratios[-1]["gpu_peak_ratio"] = h["gpu_peak_bytes"] / b["gpu_peak_bytes"]
    return ratios


def _warm_up(engines: dict, ids, spans, warm: int, compile: bool, device) -> dict[str, float]:
    """A prefill and `warm` steps per model, timed apart (compiled: at every span, since a new span compiles
    once more or records a new CUDA graph); seconds per model."""
    warmup_s = {}
    for name, e in engines.items():
        t0 = time.perf_counter()
        tok, _ = timed_prefill(e, ids, device)
        for span, start in (spans if compile else spans[-1:]):
            e.span, e.pos = span, max(start, span - warm)
            tok, _ = timed_decode(e, tok, min(warm, span - e.pos), device)
        warmup_s[name] = time.perf_counter() - t0
        log(f"  warm-up {name}: {warmup_s[name]:.1f}s" + (" (compile included)" if compile else ""))
    return warmup_s


def _sampled_totals(samples: dict, spans, points: list[int], lengths: list[int], prompt: int, repeats: int,
                    names: list[str], total: dict, step_ms: dict) -> None:
    """Sampled method: per repeat, ms/step at every position is the linear interpolation between that repeat's
    samples (x = the middle of each sampled span; constant beyond the first and last), summed over positions
    prompt .. prompt + L - 1 into `total`; per-step cost is linear in the context, so this is close."""
    mid = [(span + start) / 2 for span, start in spans]
    for n in names:
        for r in range(repeats):
            ys = [samples[(n, L)][r] for L in points]
            for L in lengths:
                pos = torch.arange(prompt, prompt + L, dtype=torch.float64)
                total[(n, L)].append(float(_interp(pos, mid, ys).sum()) / 1e3)
        for L in lengths:
            step_ms[(n, L)] = samples[(n, L)]


def _latency_row(name: str, e, m, L: int, batch: int, prompt: int, total: list[float], step_ms: list[float],
                 prefill_s: list[float], copy_gbps) -> dict:
    """One model at one decode length: times, speed, cache bytes (formula, held, allocated) and the roofline."""
    return {
        "model": name, "decode_len": L, "context": prompt + L, "batch": batch, "prompt": prompt,
        "total_s": stats(total), "ms_per_token": stats([1e3 * t / L for t in total]),
        "tokens_per_s": batch * L / statistics.median(total),
        "ms_per_step_at_end": stats(step_ms), "prefill_s": stats(prefill_s),
        "cache_bytes_theory": expected_cache_bytes(e.plan, m.config, batch, prompt + L, e.dtype),
        "cache_bytes_held": e.held_bytes(prompt + L),
        "cache_bytes_allocated": e.cache_bytes(),
        **roofline(e.step_bytes(prompt + L), statistics.median(step_ms) / 1e3, copy_gbps),
    }


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
        _check_cache_budget(models, batch, tmax, memory_budget_bytes)
    engines = {name: Engine(m, batch, tmax, compile=compile) for name, m in models.items()}
    vocab = base.config.vocab_size
    ids = random_prompt(vocab, batch, prompt, device)
    method = "sampled" if sample_steps else "full"
    points = sorted(set([sample_steps] + lengths)) if sample_steps else []  # sampled: decode lengths timed
    spans = _timed_spans(prompt, lengths, points, sample_steps, chunk)
    samples = {(n, L): [] for n in models for L in points}
    log(f"latency: batch {batch}, prompt {prompt}, lengths {lengths}, method {method}, repeats {repeats}"
         + (", compiled" if compile else ""))
    # Warm-up (excluded, timed apart: it includes compiling): a prefill and a few steps per model;
    # compiled, at every span (a new span compiles once more, or records a new CUDA graph).
    warmup_s = _warm_up(engines, ids, spans, max(warmup, 3) if compile else warmup, compile, device)
    prefill_s = {n: [] for n in models}
    total = {(n, L): [] for n in models for L in lengths}
    step_ms = {(n, L): [] for n in models for L in lengths}  # ms per step at the end of each length
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        tokens = {}
        for n in order:
            engines[n].span = tmax
            tokens[n], dt = timed_prefill(engines[n], ids, device)
            prefill_s[n].append(dt)
        if method == "full":
            cum = {n: 0.0 for n in models}
            for span, start in spans:
                L = span - prompt
                for n in order:
                    engines[n].span = span
                    tokens[n], dt = timed_decode(engines[n], tokens[n], span - start, device)
                    cum[n] += dt
                    if L in lengths:  # the chunk that ends at L: ms per step there
                        step_ms[(n, L)].append(1e3 * dt / (span - start))
                if L in lengths:
                    for n in order:
                        total[(n, L)].append(cum[n])
                    log(f"  repeat {r + 1}/{repeats} L={L}: " + ", ".join(f"{n} {cum[n]:.2f}s" for n in models))
        else:
            for L, (span, start) in zip(points, spans):
                for n in order:
                    engines[n].span, engines[n].pos = span, start  # cost per step depends on the span, not on values
                    tokens[n], dt = timed_decode(engines[n], tokens[n], span - start, device)
                    samples[(n, L)].append(1e3 * dt / (span - start))
                log(f"  repeat {r + 1}/{repeats} context {span}: "
                     + ", ".join(f"{n} {samples[(n, L)][-1]:.1f} ms/step" for n in models))
    if method == "sampled":
        _sampled_totals(samples, spans, points, lengths, prompt, repeats, list(models), total, step_ms)
    profile = {}
    if profile_steps:
        for n in models:
            e = engines[n]
            e.span, e.pos = tmax, tmax - profile_steps
            profile[n] = _profile(e, tokens[n], profile_steps, device)
            profile[n]["context"] = tmax
    copy_gbps = copy_bandwidth_gbps(str(device)) if device.type == "cuda" else None
    results = [_latency_row(n, engines[n], m, L, batch, prompt, total[(n, L)], step_ms[(n, L)], prefill_s[n], copy_gbps)
               for L in lengths for n, m in models.items()]
    if device.type == "cuda":
        del engines
        _gpu_peaks(models, results, batch, prompt, ids, device)
    ratios = _latency_ratios(results, lengths, list(models))
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
    log(f"throughput: concurrency {list(concurrency)}, prompt {prompt}, output {output}, prefill {prefill}"
         + (", compiled" if compile else ""))
    for li, c in enumerate(concurrency):
        order = list(models) if li % 2 == 0 else list(models)[::-1]
        for n in order:
            m = models[n]
            from ..surgery import plan_of

            plan = plan_of(m) or native_plan(m)
            dtype = next(m.parameters()).dtype
            theory = expected_cache_bytes(plan, m.config, c, prompt + output, dtype)
            res = {"model": n, "concurrency": c, "prompt": prompt, "output": output, "prefill": prefill,
                   "cache_bytes_theory": theory, "status": "ok"}
            results.append(res)
            if device.type != "cuda" and memory_budget_bytes is not None and theory > memory_budget_bytes:
                res["status"] = "exceeds_memory_budget"
                res["memory_budget_bytes"] = memory_budget_bytes
                log(f"  C={c} {n}: cache needs {theory / 2**30:.1f} GiB > budget "
                     f"{memory_budget_bytes / 2**30:.1f} GiB: skipped")
                continue
            e = None
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                e = Engine(m, c, prompt + output, compile=compile)
                ids = random_prompt(vocab, 1 if prefill == "shared" else c, prompt, device, seed=li)
                tok0, pre = timed_prefill(e, ids, device)
                t0 = time.perf_counter()
                timed_decode(e, tok0, warm, device)  # compiled: compiles (or records CUDA graphs) here
                res["warmup_s"] = time.perf_counter() - t0
                times = []
                for _ in range(repeats):
                    e.pos = prompt  # rewind (timing only: linear_swa states keep what warm-up folded)
                    _, dt = timed_decode(e, tok0, output, device)
                    times.append(dt)
                med = statistics.median(times)
                res.update({"decode_s": stats(times), "prefill_s": pre, "tokens_per_s": c * output / med,
                            "tokens_per_s_end_to_end": c * output / (med + pre),
                            "cache_bytes_allocated": e.cache_bytes(), "peak_rss_bytes": peak_rss_bytes(),
                            **roofline(e.step_bytes(prompt + output), med / output, copy_gbps)})
                if device.type == "cuda":
                    res["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
                log(f"  C={c} {n}: {res['tokens_per_s']:.1f} tok/s (decode {med:.2f}s, prefill {pre:.2f}s)")
            except torch.OutOfMemoryError as err:
                res["status"] = "oom"
                res["error"] = str(err).splitlines()[0][:300]
                log(f"  C={c} {n}: out of memory")
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
