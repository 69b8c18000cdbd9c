"""GPU check: base vs hybrid latency, memory and throughput on random-weight Llama-3.2-1B and
Llama-3.1-8B shapes in bf16, for a lent GPU machine that cannot download anything (< 8 minutes on
one H100/H200-class GPU). Every run is `python -m layerboost.bench ...` in its own process; JSON,
PNG plots and tables land in OUT, with OUT/summary.md collecting the tables and the commands.

    python scripts/gpu_check.py --out gpu_results           # on the GPU machine
    python scripts/gpu_check.py --out /tmp/smoke --smoke     # CPU smoke test: tiny model, tiny sizes

Runs (hybrid: thirds of none / swa (window 64) / softmax, softmax first and last):
    latency     batch 16, prompt 128, decode lengths 1k..32k, sampled (16 steps at each length, 3 repeats)
    latency     llama-1b only: decode every token to 2k (the "full" method, checks the sampled estimate)
    throughput  concurrency 50/100/200, prompt 1024, output 256, batched prefill
    throughput  llama-8b: prompt 16384, output 64, shared prefill: where the base runs out of memory
A run past its time limit is recorded as such and the script goes on; the script stops starting
runs when --budget-s is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HYB = ["--hybrid-kinds", "none,swa,softmax", "--window", "64"]


def runs(smoke: bool) -> list[tuple[str, list[str]]]:
    if smoke:
        m = ["--random-config", "tiny", "--dtype", "fp32", "--device", "cpu", "--threads", "1", "--window", "8",
             "--hybrid-kinds", "none,swa,softmax"]
        return [
            ("tiny-latency", ["latency", *m, "--batch", "2", "--prompt", "8", "--lengths", "16,32",
                              "--sample-steps", "4", "--repeats", "2", "--profile", "2"]),
            ("tiny-latency-full", ["latency", *m, "--batch", "2", "--prompt", "8", "--lengths", "8,16", "--repeats", "1"]),
            ("tiny-throughput", ["throughput", *m, "--concurrency", "2,4,8", "--prompt", "16", "--output", "4",
                                 "--prefill", "batched"]),
            ("tiny-throughput-long", ["throughput", *m, "--concurrency", "2,4,8", "--prompt", "64", "--output", "4",
                                      "--prefill", "shared", "--memory-budget-gb", "0.0004"]),
        ]
    out = []
    for name in ("llama-1b", "llama-8b"):
        m = ["--random-config", name, "--dtype", "bf16", "--device", "cuda", *HYB]
        out.append((f"{name}-latency", ["latency", *m, "--batch", "16", "--prompt", "128",
                                        "--lengths", "1024,2048,4096,8192,16384,32768", "--sample-steps", "16",
                                        "--repeats", "3", "--profile", "4"]))
        if name == "llama-1b":
            out.append((f"{name}-latency-full", ["latency", *m, "--batch", "16", "--prompt", "128",
                                                 "--lengths", "1024,2048", "--repeats", "1", "--chunk", "128"]))
        out.append((f"{name}-throughput", ["throughput", *m, "--concurrency", "50,100,200", "--prompt", "1024",
                                           "--output", "256", "--prefill", "batched", "--repeats", "2"]))
    m8 = ["--random-config", "llama-8b", "--dtype", "bf16", "--device", "cuda", *HYB]
    out.append(("llama-8b-throughput-long", ["throughput", *m8, "--concurrency", "50,100,200", "--prompt", "16384",
                                             "--output", "64", "--prefill", "shared"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for JSON, PNG and summary.md")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test with a tiny model")
    ap.add_argument("--budget-s", type=float, default=450, help="start no run after this many seconds (default 450)")
    ap.add_argument("--run-timeout-s", type=float, default=240, help="kill a run after this many seconds")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = [f"# layerboost GPU check ({'smoke, CPU' if args.smoke else 'GPU'})", ""]
    record = []
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for name, argv in runs(args.smoke):
        elapsed = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "layerboost.bench", *argv, "--out", str(out / name)]
        shown = "python -m layerboost.bench " + " ".join(argv) + f" --out {out / name}"
        if elapsed > args.budget_s:
            record.append({"run": name, "status": "skipped (time budget spent)", "command": shown})
            summary += [f"## {name}: skipped, the time budget was spent", ""]
            continue
        print(f"[{elapsed:6.1f}s] {name}", file=sys.stderr, flush=True)
        t1 = time.perf_counter()
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=min(args.run_timeout_s, max(30.0, args.budget_s + 60 - elapsed)))
            status = "ok" if res.returncode == 0 else f"failed (exit {res.returncode})"
            stdout, stderr = res.stdout, res.stderr
        except subprocess.TimeoutExpired as e:
            status = "timed out"
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        (out / f"{name}.log").write_text(stderr)
        wall = time.perf_counter() - t1
        record.append({"run": name, "status": status, "wall_s": wall, "command": shown})
        summary += [f"## {name}: {status} ({wall:.0f} s)", "", "```", shown, "", stdout.strip() or stderr[-3000:], "```", ""]
        print(f"         {status} in {wall:.0f}s", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0
    summary.append(f"total wall time: {total:.0f} s")
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    (out / "runs.json").write_text(json.dumps({"total_s": total, "runs": record}, indent=1) + "\n")
    print("\n".join(summary))
    return 0 if all(r["status"] == "ok" for r in record) else 1


if __name__ == "__main__":
    sys.exit(main())
