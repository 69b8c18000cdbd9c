"""Speed and memory of each plan family in llama.cpp itself: base against hybrids, measured side by side.

    python scripts/bench_llama_cpp.py --out docs/llama-cpp-smollm2-135m [--types f32 q8_0] [--reps 3]

Needs the tools of engines/llama.cpp/build.sh and quiet cores (nothing else running). Models: SmolLM2-135M as
`llama` (the base), the same base weights as `deci` (the architecture's own cost), and three hybrids with the
default counts: softmax + none (20/10, deci), softmax + swa (20/10, granite_swa), and the default 10/10/10
(deci with per-layer windows, patched llama.cpp); window 64, layers by a fixed interleave (speed does not depend
on which layers, and these are unhealed: only speed and memory are read here). Rounds alternate the models, so
drift of the machine hits every model alike.

Measured: llama-bench decode (tg64 by default) after 0/1024/4096/8192 tokens of context and prompt processing (pp512);
llama-batched-bench with 1/4/8/16 parallel sequences (512-token prompts, 64 new tokens each); the KV cache
llama.cpp allocates for a 4096- and an 8192-token context and the process's peak RSS (llama-completion).
Flash attention is on everywhere (llama.cpp's CPU default `auto` turns it on; without it V rows are padded).
q8_0 runs with llama.cpp's defaults: engines/llama.cpp/build.sh leaves out the AMX kernels that crashed on
CPUs with AMX (SIGSEGV in ggml_backend_amx_mul_mat as soon as a batch of tokens was processed).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import layerboost as lb
from layerboost import LayerPlan
from layerboost.export_gguf import write_gguf
from layerboost.llama_cpp import batched_bench, bench, tool
from layerboost.models import load_model

DEPTHS = [0, 1024, 4096, 8192]
PARALLEL = [1, 4, 8, 16]
WINDOW = 64
N = 30


def families() -> dict[str, tuple[list[str] | None, str | None]]:
    """name -> (plan kinds or None for the base, forced gguf architecture)."""
    third = ["softmax", "swa", "none"] * 10
    return {
        "base": (None, None),
        "base-as-deci": (None, "deci"),
        "softmax+none": (["softmax", "softmax", "none"] * 10, None),
        "softmax+swa": (["softmax", "softmax", "swa"] * 10, None),
        "default": (third, None),
    }


def kv_and_rss(gguf: Path, ctx: int, extra=()) -> dict:
    """KV bytes llama.cpp allocates for a `ctx` context (its own log lines) and the peak RSS of a short run."""
    cmd = ["/usr/bin/time", "-v", str(tool("llama-completion")), "-m", str(gguf), "-c", str(ctx), "-n", "8",
           "-p", "The", "-t", "2", "-fa", "on", "-no-cnv", "--no-warmup", "-s", "1", "-v", "-fit", "off", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    log = out.stdout + out.stderr
    # e.g. "llama_kv_cache: size =   90.00 MiB (  4096 cells,  30 layers,  1/1 seqs), K (f16):   45.00 MiB, ..."
    sizes = [(float(m.group(1)), int(m.group(2)), int(m.group(3)))
             for m in re.finditer(r"llama_kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells, +(\d+) layers", log)]
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    if out.returncode or not sizes or not rss:
        raise RuntimeError(f"llama-completion on {gguf} failed: {log[-1500:]}")
    return {"ctx": ctx, "kv_mib": round(sum(s[0] for s in sizes), 2),
            "caches": [{"mib": s[0], "cells": s[1], "layers": s[2]} for s in sizes],
            "rss_mib": round(int(rss.group(1)) / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--types", nargs="+", default=["f32", "q8_0"])
    ap.add_argument("--reps", type=int, default=2, help="rounds; each runs every model once per test")
    ap.add_argument("--n-gen", type=int, default=64, help="tokens decoded per llama-bench test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-batched", action="store_true")
    ap.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    ap.add_argument("--parallel", type=int, nargs="+", default=list(PARALLEL))
    args = ap.parse_args()
    DEPTHS[:], PARALLEL[:] = args.depths, args.parallel
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    started = time.time()
    model, tok = load_model("smollm2-135m")
    for gtype in args.types:
        for name, (kinds, arch) in families().items():
            if name == "base-as-deci" and gtype != args.types[0]:  # the architecture's own cost: one type is enough
                continue
            path = out / "gguf" / f"{name}-{gtype}.gguf"
            path.parent.mkdir(exist_ok=True)
            if not path.exists():
                m = model
                if kinds is not None:
                    m = copy.deepcopy(model)
                    lb.convert(m, LayerPlan.from_kinds(kinds, window=WINDOW))
                write_gguf(m, tok, path, gtype, arch=arch)
            files[(name, gtype)] = path
    del model
    rows: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                              "python": sys.version.split()[0]},
                  "command": " ".join(sys.argv), "window": WINDOW, "reps": args.reps, "n_gen": args.n_gen, "results": {}}
    for (name, gtype), path in files.items():
        rows["results"][f"{name}/{gtype}"] = {"decode": {d: [] for d in DEPTHS}, "pp512": [], "batched": {},
                                               "memory": [kv_and_rss(path, 4096), kv_and_rss(path, 8192)]}
    for rep in range(args.reps):
        for (name, gtype), path in files.items():
            res = rows["results"][f"{name}/{gtype}"]
            for r in bench(path, depths=DEPTHS, n_gen=args.n_gen, n_prompt=512, reps=1, threads=args.threads):
                if r["n_gen"] > 0:
                    res["decode"][r["n_depth"]].append(r["avg_ts"])
                elif r["n_depth"] == 0:
                    res["pp512"].append(r["avg_ts"])
            if not args.skip_batched:
                for r in batched_bench(path, parallel=PARALLEL, threads=args.threads):
                    res["batched"].setdefault(r["pl"], []).append(r["speed_tg"])
            (out / "llama_cpp_bench.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")  # so far
            print(f"round {rep + 1}/{args.reps} {name}/{gtype}: decode {[round(v[-1], 1) for v in res['decode'].values()]} "
                  f"tok/s", flush=True)
    rows["wall_s"] = round(time.time() - started)
    (out / "llama_cpp_bench.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    (out / "llama_cpp_bench.md").write_text(table(rows, args.types))
    print(table(rows, args.types))
    return 0


def table(rows: dict, types) -> str:
    med = statistics.median
    lines = [f"llama.cpp (pinned + deci sliding-window patch), SmolLM2-135M, {rows['machine']['threads']} threads, "
             f"flash attention on, {rows['reps']} alternating round(s) (median), decode of {rows['n_gen']} tokens; "
             "ratios are model / base of the same type; KV as llama.cpp allocates it (f16 cache)\n"]
    head = ("| model | type | " + " | ".join(f"decode d{d}" for d in DEPTHS) + " | pp512 | "
            + " | ".join(f"batched x{p}" for p in PARALLEL) + " | KV@4096 MiB | KV@8192 MiB | RSS@8192 MiB |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for gtype in types:
        base = rows["results"][f"base/{gtype}"]
        for name in families():
            if f"{name}/{gtype}" not in rows["results"]:
                continue
            r = rows["results"][f"{name}/{gtype}"]
            cells = []
            for d in DEPTHS:
                v, b = med(r["decode"][d]), med(base["decode"][d])
                cells.append(f"{v:.1f} ({v / b:.2f}x)")
            v, b = med(r["pp512"]), med(base["pp512"])
            cells.append(f"{v:.0f} ({v / b:.2f}x)")
            for p in PARALLEL:
                if r["batched"].get(p):
                    v, b = med(r["batched"][p]), med(base["batched"][p])
                    cells.append(f"{v:.1f} ({v / b:.2f}x)")
                else:
                    cells.append("-")
            for i in (0, 1):
                kv, kb = r["memory"][i]["kv_mib"], base["memory"][i]["kv_mib"]
                cells.append(f"{kv:.1f} ({kv / kb:.2f}x)")
            cells.append(f"{r['memory'][1]['rss_mib']:.0f}")
            lines.append(f"| {name} | {gtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
