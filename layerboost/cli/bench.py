"""`layerboost bench` / `python -m layerboost.bench`: arguments, memory checks, and the call of a benchmark."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..plan import LayerPlan
from ..util import check_writable, environment, parse_dtype
from ..bench.measure import bench_latency, bench_throughput, log
from ..bench.models import RANDOM_CONFIGS, SCHEMA_VERSION, load_models
from ..bench.output import latency_table, read_accuracy, save_result, throughput_table
from .options import add_device_dtype, model_fits, positive


def _package_doc() -> str:
    """The package docstring (what every benchmark measures and how), for --help."""
    from ..bench import __doc__ as doc

    return doc


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
    src.add_argument("--model", help="smollm2-135m (embedded), a .gguf file of a plain model (not a hybrid's), or a "
                     "local HF folder (the base model)")
    src.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS),
                     help="a random-weight model with a real checkpoint's shape (speed does not depend on weights)")

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
    p.add_argument("--warmup", type=positive(zero=True), default=None, help="decode steps per model before measuring (excluded)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on a GPU); compile time is reported apart")
    p.add_argument("--out", help="folder for the JSON and PNG plots")
    p.add_argument("--force", action="store_true",
                   help="write into --out even when another command, other settings or other files own it")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `latency` and `throughput` sub-commands to `parser` (the `layerboost bench` parser)."""
    sub = parser.add_subparsers(dest="bench_command", required=True)

    lat = sub.add_parser("latency", help="decode latency and memory vs decode length (batch 16), base vs hybrid",
                         description="Decode latency and memory of the base model and its hybrid at each decode "
                         "length, measured alternately in one process (warm-up excluded, median of --repeats). How "
                         "each number is measured: `python -m layerboost.bench --help`.")
    _common(lat)
    lat.add_argument("--batch", type=positive(), default=16, help="sequences decoded together")
    lat.add_argument("--prompt", type=positive(), default=128, help="prompt tokens")
    lat.add_argument("--lengths", type=_ints, default=None,
                     help="decode lengths (default CPU 512,1024,2048,4096; GPU 1024,...,32768)")
    lat.add_argument("--repeats", type=positive(), default=3, help="measured repeats (median, min, max)")
    lat.add_argument("--sample-steps", type=positive(zero=True), default=0,
                     help="0: decode every token (default); S: time S steps at each length and estimate totals")
    lat.add_argument("--chunk", type=positive(), default=64, help="full method: steps per model turn")
    lat.add_argument("--profile", type=positive(zero=True), default=0, metavar="STEPS",
                     help="profile STEPS decode steps per model at the longest context")
    thr = sub.add_parser("throughput", help="tokens/s at concurrency 50/100/200, base vs hybrid",
                         description="Generated tokens per second of the base model and its hybrid at each "
                         "concurrency level, measured alternately in one process. How each number is measured: "
                         "`python -m layerboost.bench --help`.")
    _common(thr)
    thr.add_argument("--concurrency", type=_ints, default=[50, 100, 200], help="sequences in flight per level")
    thr.add_argument("--prompt", type=positive(), default=None, help="prompt tokens (default 1024)")
    thr.add_argument("--output", type=positive(), default=None, help="generated tokens per sequence (default CPU 16, GPU 256)")
    thr.add_argument("--prefill", choices=["shared", "batched"], default=None,
                     help="shared: one prompt copied into every row (CPU default); batched: C prompts (GPU default)")
    thr.add_argument("--repeats", type=positive(), default=1, help="decode repeats per level (median)")
    thr.add_argument("--eval-json", help="accuracy per model ({'base': 0.5, 'hybrid': 0.48}) for a Figure 2 plot")


def run_bench_cli(args) -> int:
    """Run `layerboost bench latency|throughput` from parsed arguments; prints the table, writes JSON/PNG."""
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.out:
        check_writable(args.out)
    if args.model:
        model_fits(args.model, LayerPlan.load(args.plan) if args.plan else None, (args.window,))
    accuracy = read_accuracy(args.eval_json) if getattr(args, "eval_json", None) else None  # before measuring
    budget = None  # CPU: the caches must fit this (GPU: out-of-memory is caught and recorded)
    if not gpu:
        if args.memory_budget_gb is not None:
            budget = int(args.memory_budget_gb * 2**30)
        else:
            import psutil

            budget = psutil.virtual_memory().available // 2
    t0 = time.perf_counter()
    base, hybrid, desc = load_models(args.model, random_config=args.random_config, layers=args.layers, dtype=args.dtype,
                                     device=args.device, plan=args.plan, hybrid_kinds=args.hybrid_kinds,
                                     window=args.window)
    log(f"models ready in {time.perf_counter() - t0:.1f}s; hybrid layers: {desc['kinds']} "
         "(S softmax, W swa, L linear_swa, - none)")
    env = environment(device, parse_dtype(args.dtype))
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
    table = save_result(Path(args.out), args.bench_command, out, accuracy) if args.out else table
    if args.out:
        log(f"wrote {Path(args.out) / (args.bench_command + '.json')} and plots")
    print(f"{desc['name']} | {env['device']} {env['gpu'] or env['cpu']} | {env['dtype']} | threads {env['threads']} | "
          f"torch {env['torch']} | transformers {env['transformers']}")
    print(f"hybrid plan: {desc['kinds']} (S softmax, W swa, L linear_swa, - none; window {args.window})")
    print(table)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerboost.bench", description=_package_doc(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    return run_bench_cli(parser.parse_args(argv))


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="decode latency, memory and throughput: hybrid vs base in one run",
                       description="Benchmarks that measure the base model and its hybrid alternately in one process.")
    add_bench_arguments(p)
    p.set_defaults(func=run_bench_cli, writes="folder")
