"""GPU decode run: static-shape decode, eager vs compiled, base vs hybrid, with the roofline.

Random-weight Llama-3.2-1B and Llama-3.1-8B shapes in bf16, one process, < 8 minutes on one H100/H200:
    latency     batch 16, prompt 128, decode lengths 1k..32k, sampled (8 steps at each length, 2 repeats),
                time and GPU peak memory
    throughput  concurrency 50 / 100 / 200 at contexts 4k and 16k (prompt = context - 64, 64 decoded
                tokens, shared prefill); a level that does not fit is recorded as "oom"
each for base and hybrid (thirds of none / swa (window 512) / softmax, softmax first and last),
eager and `--compile` (torch.compile, CUDA graphs). Order: 8B eager, 1B eager, 1B compiled, 8B
compiled (compiled runs compile once per model and engine shape, and once more for the second span;
the machine's inductor cache starts cold). No run starts after --budget-s (400); a run still going
at --deadline-s (450) is stopped and recorded as such. Everything lands in OUT, rewritten after
every run (5 files): results.json (every run's full output, the environment, the copy bandwidth),
summary.md (the tables), latency.png, throughput.png, log.txt.

On the GPU machine (its image has transformers 5.17; layerboost needs >= 5.24; huggingface_hub
1.33 there is new enough). Here, once, in the repo root:
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl transformers==5.24.0
then run with `carry: [".whl"]`:
    PYTHONUNBUFFERED=1 python3 scripts/gpu_decode.py --out $OUT --wheels .whl
The script installs the carried wheels into /tmp/lb_site when the machine's transformers is older,
and restarts itself with them on PYTHONPATH.

On CPU, the same code end to end with tiny shapes (a 3-layer model, a few steps, eager and compiled):
    OMP_NUM_THREADS=1 python scripts/gpu_decode.py --out /tmp/gpu_decode_smoke --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEED_TRANSFORMERS = "5.24"


def ensure_transformers(wheels: str | None) -> None:
    """Install the carried transformers wheel (into /tmp/lb_site) and restart, if the installed one is too old."""
    from packaging.version import Version

    if Version(version("transformers")) >= Version(NEED_TRANSFORMERS):
        return
    if os.environ.get("LB_GPU_DECODE_RESTARTED"):
        sys.exit(f"transformers {version('transformers')} is still first on the path after installing the wheels")
    found = sorted(Path(wheels).glob("*.whl")) if wheels else []
    if not any(w.name.startswith("transformers-") for w in found):
        sys.exit(f"transformers {version('transformers')} < {NEED_TRANSFORMERS} and no transformers wheel in "
                 f"--wheels {wheels!r}: see this script's docstring")
    target = "/tmp/lb_site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", target, *map(str, found)], check=True)
    env = dict(os.environ, LB_GPU_DECODE_RESTARTED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")])))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def settings(smoke: bool) -> dict:
    if smoke:
        return dict(shapes=["tiny"], layers=3, dtype="fp32", device="cpu", window=8,
                    latency=dict(batch=2, prompt=8, lengths=[16, 32], sample_steps=4, repeats=1, warmup=1),
                    contexts=[24, 40], throughput=dict(concurrency=[2, 3], output=4, prefill="shared", repeats=1,
                                                       warmup=1))
    return dict(shapes=["llama-8b", "llama-1b"], layers=None, dtype="bf16", device="cuda", window=512,
                latency=dict(batch=16, prompt=128, lengths=[1024, 2048, 4096, 8192, 16384, 32768], sample_steps=8,
                             repeats=2, warmup=2),
                contexts=[16384, 4096], throughput=dict(concurrency=[50, 100, 200], output=64, prefill="shared",
                                                        repeats=1, warmup=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.json, summary.md, plots and log.txt")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: check that everything runs")
    ap.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of carried wheels (default .whl)")
    ap.add_argument("--budget-s", type=float, default=400, help="start no run after this many seconds (default 400)")
    ap.add_argument("--deadline-s", type=float, default=450, help="stop a run still going at this time (default 450)")
    args = ap.parse_args()
    if not args.smoke:
        ensure_transformers(args.wheels)
    t_start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import torch

    from layerboost import bench
    from layerboost.util import parse_dtype
    from layerboost.surgery import decoder_parts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "w")

    def log(msg: str) -> None:
        line = f"[{time.perf_counter() - t_start:6.1f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    cfg = settings(args.smoke)
    device, dtype = torch.device(cfg["device"]), parse_dtype(cfg["dtype"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --smoke on a CPU")
    record = {"environment": bench.environment(device, dtype), "settings": cfg, "runs": [],
              "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    if device.type == "cuda":
        record["copy_gbps"] = bench.copy_bandwidth_gbps(str(device))
        log(f"device copy bandwidth {record['copy_gbps']:,.0f} GB/s (read + write)")
    def save() -> None:
        record["total_s"] = time.perf_counter() - t_start
        (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
        write_summary(record, out / "summary.md")
        plot_latency(record, out / "latency.png")
        plot_throughput(record, out / "throughput.png")

    def stop(signum, frame):
        raise TimeoutError(f"stopped at the deadline ({args.deadline_s:.0f} s)")

    signal.signal(signal.SIGALRM, stop)
    groups = [(s, False) for s in cfg["shapes"]] + [(s, True) for s in reversed(cfg["shapes"])]
    models = {}
    for shape, compiled in groups:
        if shape not in models:
            models.clear()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            base = bench.random_model(shape, dtype, device, num_layers=cfg["layers"])
            n = len(decoder_parts(base)[1])
            plan = bench.hybrid_plan(n, "none,swa,softmax", window=cfg["window"])
            models[shape] = (base, bench.hybrid_of(base, plan), plan)
            log(f"{shape}: {n} layers, hybrid {bench.kinds_string(plan)}")
        base, hybrid, plan = models[shape]
        jobs = [("latency", None)] + [("throughput", c) for c in cfg["contexts"]]
        for kind, context in jobs:
            name = (f"{shape} {kind}" + (f" context {context}" if context else "")
                    + (" compiled" if compiled else " eager"))
            run = {"name": name, "shape": shape, "benchmark": kind, "context": context, "compile": compiled,
                   "plan": plan.to_dict(), "kinds": bench.kinds_string(plan)}
            record["runs"].append(run)
            if time.perf_counter() - t_start > min(args.budget_s, args.deadline_s - 1):
                run["status"] = "skipped: time budget spent"
                log(f"{name}: skipped (budget)")
                continue
            log(f"{name} ...")
            t0 = time.perf_counter()
            signal.alarm(max(1, int(args.deadline_s - (t0 - t_start))))
            try:
                if kind == "latency":
                    data = bench.bench_latency(base, hybrid, compile=compiled, device=device, **cfg["latency"])
                    run["table"] = bench.latency_table(data)
                else:
                    t = cfg["throughput"]
                    data = bench.bench_throughput(base, hybrid, prompt=context - t["output"], compile=compiled,
                                                  device=device, **t)
                    run["table"] = bench.throughput_table(data)
                run.update(status="ok", data=data)
            except Exception as e:  # record it and go on: one failed run (OOM, deadline) must not lose the others
                run.update(status=f"failed: {type(e).__name__}: {str(e)[:300]}", traceback=traceback.format_exc())
            finally:
                signal.alarm(0)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            run["wall_s"] = time.perf_counter() - t0
            if compiled:
                skips = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
                run["cudagraph_skips_so_far"] = skips  # > 0: some step ran without CUDA graphs
            log(f"{name}: {run['status']} in {run['wall_s']:.0f}s")
            save()
        if compiled:
            torch._dynamo.reset()  # free compiled graphs and CUDA graph pools before the next model
    save()
    log(f"done in {record['total_s']:.0f}s: {out}")
    return 0 if all(r["status"] == "ok" for r in record["runs"]) else 1


def write_summary(record: dict, path: Path) -> None:
    env = record["environment"]
    lines = [f"# layerboost GPU decode run ({env['gpu'] or env['cpu']}, torch {env['torch']}, "
             f"transformers {env['transformers']}, {env['dtype']})", "",
             f"command: `{record['command']}`; total {record['total_s']:.0f} s"
             + (f"; copy bandwidth {record['copy_gbps']:,.0f} GB/s (read + write)"
                if "copy_gbps" in record else ""), ""]
    for run in record["runs"]:
        lines += [f"## {run['name']}: {run['status']}" + (f" ({run['wall_s']:.0f} s)" if "wall_s" in run else ""), ""]
        if "table" in run:
            lines += [f"hybrid layers: {run['kinds']} (S softmax, W swa, - none)", "", "```", run["table"], "```", ""]
    path.write_text("\n".join(lines) + "\n")


def _runs(record: dict, kind: str) -> list[dict]:
    return [r for r in record["runs"] if r["benchmark"] == kind and r["status"] == "ok"]


def plot_latency(record: dict, path: Path) -> None:
    """Per shape: ms per decode step at the end of each length, and memory, base/hybrid x eager/compiled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs(record, "latency")
    shapes = sorted({r["shape"] for r in runs})
    if not shapes:
        return
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 4 * len(shapes)), squeeze=False)
    for (ax1, ax2), shape in zip(axes, shapes):
        for r in (r for r in runs if r["shape"] == shape):
            mode = "compiled" if r["compile"] else "eager"
            for n, style in (("base", "-"), ("hybrid", "--")):
                rs = [x for x in r["data"]["results"] if x["model"] == n]
                xs = [x["decode_len"] for x in rs]
                ax1.plot(xs, [x["ms_per_step_at_end"]["median"] for x in rs], style, marker="o", label=f"{n} {mode}")
                if not r["compile"]:
                    key = "gpu_peak_bytes" if "gpu_peak_bytes" in rs[0] else "cache_bytes_held"
                    ax2.plot(xs, [x[key] / 2**30 for x in rs], style, marker="o", label=f"{n} ({key})")
        ax1.set(title=f"{shape}: decode step at the end of L", xlabel="decode length L", ylabel="ms / step")
        ax2.set(title=f"{shape}: memory", xlabel="decode length L", ylabel="GiB")
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(record: dict, path: Path) -> None:
    """Per shape and context: tokens/s per concurrency level, base/hybrid x eager/compiled (0: did not fit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs(record, "throughput")
    panels = sorted({(r["shape"], r["context"]) for r in runs})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (shape, context) in zip(axes[0], panels):
        bars = [(f"{n} {'compiled' if r['compile'] else 'eager'}", n, r) for r in runs
                if (r["shape"], r["context"]) == (shape, context) for n in ("base", "hybrid")]
        levels = sorted({x["concurrency"] for _, _, r in bars for x in r["data"]["results"]})
        width = 0.8 / max(len(bars), 1)
        for j, (label, n, r) in enumerate(bars):
            vals = [next((x.get("tokens_per_s", 0.0) for x in r["data"]["results"]
                          if x["model"] == n and x["concurrency"] == c), 0.0) for c in levels]
            ax.bar([i + (j - (len(bars) - 1) / 2) * width for i in range(len(levels))], vals, width, label=label)
        ax.set_xticks(range(len(levels)), [str(c) for c in levels])
        ax.set(title=f"{shape}, context {context}", xlabel="concurrency (0 = did not fit)", ylabel="tokens/s")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
