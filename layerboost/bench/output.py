"""Benchmark output: tables, figures, and the files each result is saved as (`save_result`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..plan import LayerPlan
from ..util import atomic_write, environment, write_json
from .measure import bench_latency, bench_throughput
from .models import hybrid_of


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
    with one of "accuracy", "acc", "average", "mean" (optionally under a top-level "models").

    Raises:
        BenchError: the file is missing, not JSON, or holds no accuracy for one of the models.
    """
    from .models import BenchError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"--eval-json {path} cannot be read ({getattr(e, 'strerror', None) or e}): give the "
                         "accuracy file, e.g. {\"base\": 0.5, \"hybrid\": 0.48}") from None
    except ValueError as e:
        raise BenchError(f"--eval-json {path} is not valid JSON ({e}): give e.g. {{\"base\": 0.5, \"hybrid\": 0.48}}") \
            from None
    data = data.get("models", data) if isinstance(data, dict) else {}
    out = {}
    for n in ("base", "hybrid"):
        v = data.get(n)
        if isinstance(v, dict):
            v = next((v[k] for k in ("accuracy", "acc", "average", "mean") if k in v), None)
        if not isinstance(v, (int, float)):
            raise BenchError(f"--eval-json {path}: no accuracy for {n!r}; expected {{'base': 0.5, 'hybrid': 0.48}} or "
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


def save_result(folder: Path, name: str, record: dict, accuracy: dict | None = None) -> str:
    """Write one benchmark's record the way every caller (`bench --out`, the run's bench stage) does: <name>.json
    (with its table, and the accuracy the throughput plot shows), <name>.txt and <name>.png. Returns the table."""
    folder.mkdir(parents=True, exist_ok=True)
    table = latency_table(record) if name == "latency" else throughput_table(record)
    record = {**record, "table": table, **({"accuracy": accuracy} if name == "throughput" else {})}
    write_json(folder / f"{name}.json", record)
    atomic_write(folder / f"{name}.txt", table + "\n")
    if name == "latency":
        plot_latency(record, folder / "latency.png")
    else:
        plot_throughput(record, folder / "throughput.png", accuracy)
    return table


def bench_side_by_side(model, plan: LayerPlan, out: Path, latency: dict, throughput: dict,
                       accuracy: dict | None = None) -> dict:
    """Latency and throughput of `model` and its hybrid under `plan`, measured side by side (the run's bench
    stage); settings are `bench_latency` / `bench_throughput` keyword arguments. Files as `save_result`."""
    hybrid = hybrid_of(model, plan)
    p = next(model.parameters())
    common = {"environment": environment(p.device, p.dtype), "plan": plan.to_dict()}
    save_result(out, "latency", {**bench_latency(model, hybrid, **latency), **common})
    save_result(out, "throughput", {**bench_throughput(model, hybrid, **throughput), **common}, accuracy)
    return {"latency": str(out / "latency.json"), "throughput": str(out / "throughput.json")}
