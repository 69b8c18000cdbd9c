"""Healing throughput (tokens/hour) on SmolLM2-135M: a naive peft + KD loop against layerboost.heal's steps.

    naive       separate fp32 teacher copy + converted student with LoRA r=16 on q/k/v/o of every layer;
                full-vocabulary logits of both, F.kl_div, backward, AdamW (what FACTS.md measured)
    ours-same   layerboost.heal's stage-2 step with the naive run's LoRA targets (sharing + chunked KD only)
    ours        layerboost.heal's stage-2 step with its default LoRA targets (modified layers +- 1, attn + MLP)
    stage1      layerboost.heal's stage-1 step (attention transfer)
    mix         the default budget split (attn_fraction of tokens in stage 1, the rest in stage 2)

The variants run interleaved on the same batches (warm-up excluded, medians over repeats), so the shared
machine's load hits them alike; the ratios are printed last. Timing goes to stderr, results to stdout.

    python scripts/bench_heal.py [--repeats 5] [--batch 4] [--seq 256] [--threads 2]
    python scripts/bench_heal.py --precisions fp32 bf16   # layerboost's two stages in each precision, interleaved
    python scripts/bench_heal.py --precisions fp32 bf16w --allocators glibc jemalloc   # ... under each allocator
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from layerboost.util import allocator

RETAIN = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # jemalloc keeps freed pages instead of returning them


def hand_plan(n: int, window: int):
    """About 1/3 each: softmax on layers 0, 3, 6, ...; swa on 1, 4, ...; none on 2, 5, ... (layer 0 stays softmax)."""
    from layerboost import LayerPlan

    return LayerPlan.from_kinds([("softmax", "swa", "none")[i % 3] for i in range(n)], window=window)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=None, help="training text (default: <data-dir>/corpus/novels)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "bf16w", "fp16"],
                    help="instead of the naive comparison: layerboost's stage-1 and stage-2 steps in each of these "
                         "precisions (autocast; LoRA weights, optimizer state and losses stay float32)")
    ap.add_argument("--allocators", nargs="+", choices=["glibc", "jemalloc", "jemalloc-retain", "tcmalloc"],
                    help="with --precisions: run them under each C allocator (one worker process each, preloaded), "
                         "taking turns round by round; jemalloc-retain never returns freed memory to the kernel "
                         f"(MALLOC_CONF={RETAIN})")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.allocators and not args.precisions:
        ap.error("--allocators needs --precisions")
    if args.allocators and not args.worker:
        return allocator_study(args)
    torch.set_num_threads(args.threads)

    import layerboost as lb
    from layerboost.corpus import PackedRows, documents
    from layerboost.data import default_data_dir
    from layerboost.heal import HealConfig, attn_step, build_hybrid, kd_step, stage_params
    from peft import LoraConfig, get_peft_model

    base, tok = lb.load_model(args.model)
    n_layers = base.config.num_hidden_layers
    plan = hand_plan(n_layers, args.window)
    data = args.data or str(default_data_dir() / "corpus" / "novels")
    stream = PackedRows(lambda: documents(data, seed=0), tok, args.seq, seed=0)
    batches = [torch.stack([next(stream) for _ in range(args.batch)]) for _ in range(args.repeats + 1)]
    n_tok = args.batch * args.seq

    # naive: two full copies
    teacher = copy.deepcopy(base).eval()
    student = copy.deepcopy(base)
    lb.convert(student, plan)
    names = [n for n, m in student.named_modules()
             if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")]
    torch.manual_seed(0)
    student = get_peft_model(student, LoraConfig(r=16, lora_alpha=32, target_modules=names))
    student.train()
    opt_n = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)

    def naive(ids):
        with torch.no_grad():
            t = teacher(input_ids=ids, use_cache=False).logits
        s = student(input_ids=ids, use_cache=False).logits
        loss = F.kl_div(F.log_softmax(s.float(), -1).flatten(0, 1), F.log_softmax(t.float(), -1).flatten(0, 1),
                        log_target=True, reduction="batchmean")
        loss.backward()
        opt_n.step()
        opt_n.zero_grad(set_to_none=True)

    def ours_factory(cfg, precision="fp32"):
        m = copy.deepcopy(base)
        if precision == "bf16w":  # frozen weights stored in bf16 (LoRA masters stay fp32), bf16 autocast
            m, precision = m.to(torch.bfloat16), "bf16"
        h = build_hybrid(m, plan, cfg)
        h.peft_model.train()
        steps = {}
        for stage in ("attn", "kd"):
            params = stage_params(h, stage, cfg)
            opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)

            def step(ids, stage=stage, params=params, opt=opt):
                for p in h.peft_model.parameters():
                    p.requires_grad_(False)
                for p in params:
                    p.requires_grad_(True)
                if stage == "kd":
                    kd_step(h, ids, ids.numel(), ids.numel(), cfg, precision)
                else:
                    attn_step(h, ids, ids.numel(), precision)
                opt.step()
                opt.zero_grad(set_to_none=True)

            steps[stage] = step
        return steps

    cfg = HealConfig(tokens=1000, seq_len=args.seq, batch_size=args.batch, progress=False)
    if args.precisions:
        return precision_study(args, cfg, ours_factory, batches, n_tok, plan)
    same = ours_factory(HealConfig(tokens=1000, seq_len=args.seq, lora_layers="all",
                                   lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), progress=False))
    ours = ours_factory(cfg)
    variants = {"naive": naive, "ours-same": same["kd"], "ours": ours["kd"], "stage1": ours["attn"]}
    times = {k: [] for k in variants}
    for r, ids in enumerate(batches):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn(ids)
            dt = time.perf_counter() - t
            if r > 0:  # the first round is warm-up
                times[name].append(dt)
            print(f"round {r} {name:10s} {dt:6.2f} s", file=sys.stderr, flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    tph = {k: n_tok / v * 3600 for k, v in med.items()}
    f = cfg.attn_fraction
    tph["mix"] = 3600 / (f * med["stage1"] / n_tok + (1 - f) * med["ours"] / n_tok)
    res = {"model": args.model, "plan": plan.counts(), "batch": [args.batch, args.seq], "threads": args.threads,
           "repeats": args.repeats, "median_step_s": med, "tokens_per_hour": tph,
           "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}}
    print(f"model {args.model}, plan {plan.counts()}, batch {args.batch}x{args.seq}, {args.threads} threads, "
          f"medians of {args.repeats}")
    for k in ("naive", "ours-same", "ours", "stage1", "mix"):
        s = f"{med[k]:6.2f} s/step" if k in med else " " * 11
        print(f"{k:10s} {s}  {tph[k] / 1e6:5.2f}M tokens/hour")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    print(f"ratio ours/naive {tph['ours'] / tph['naive']:.2f}x, ours-same/naive {tph['ours-same'] / tph['naive']:.2f}x, "
          f"mix/naive {tph['mix'] / tph['naive']:.2f}x")
    return 0


def precision_study(args, cfg, ours_factory, batches, n_tok, plan) -> int:
    """Stage-1 and stage-2 steps of layerboost.heal in each precision, on the same batches, interleaved."""
    variants = {}
    for p in args.precisions:
        steps = ours_factory(cfg, p)
        variants[f"stage1 {p}"], variants[f"stage2 {p}"] = steps["attn"], steps["kd"]

    def one_round(ids) -> dict:
        t = {}
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(ids)
            t[name] = time.perf_counter() - t0
        return t

    one_round(batches[0])  # warm-up
    if args.worker:  # one round per line on stdin, its times as one JSON line on stdout
        print(json.dumps({"ready": allocator(), "plan": plan.counts()}), flush=True)
        for line in sys.stdin:
            print(json.dumps(one_round(batches[int(line)])), flush=True)
        return 0
    times = {k: [] for k in variants}
    for ids in batches[1:]:
        for k, v in one_round(ids).items():
            times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model}, plan {plan.counts()}, batch {args.batch}x{args.seq}, {args.threads} threads, "
          f"allocator {allocator()}, medians of {args.repeats} interleaved steps")
    for k, v in med.items():
        print(f"{k:12s} {v:6.2f} s/step  {n_tok / v:7.0f} tokens/s")
    ref = args.precisions[0]
    for p in args.precisions[1:]:
        print(f"{p} / {ref}: stage 1 {med[f'stage1 {ref}'] / med[f'stage1 {p}']:.2f}x, "
              f"stage 2 {med[f'stage2 {ref}'] / med[f'stage2 {p}']:.2f}x tokens/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"median_step_s": med, "batch": [args.batch, args.seq], "threads": args.threads,
                       "repeats": args.repeats, "torch": torch.__version__, "allocator": allocator()}, fh, indent=1)
    return 0


def allocator_study(args) -> int:
    """The precision study under each C allocator: one worker process per allocator (LD_PRELOAD cannot change
    inside a process), all on the same batches, taking turns round by round so that the machine's load hits
    them alike."""
    import subprocess

    argv = [a for a in sys.argv[1:] if a != "--worker"]
    i = argv.index("--allocators")
    j = i + 1
    while j < len(argv) and not argv[j].startswith("--"):
        j += 1
    argv = argv[:i] + argv[j:] + ["--worker"]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}  # each worker sets its own
    workers = {}
    for a in args.allocators:
        lib, conf = a.split("-")[0], {"MALLOC_CONF": RETAIN} if a.endswith("-retain") else {}
        preload = {} if lib == "glibc" else {"LD_PRELOAD": find_library(lib)}
        workers[a] = subprocess.Popen([sys.executable, __file__, *argv], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env={**env, **preload, **conf})
    for a, w in workers.items():
        ready = json.loads(w.stdout.readline() or "{}")
        got, plan_counts = ready.get("ready"), ready.get("plan")
        if got != a.split("-")[0]:
            raise SystemExit(f"error: the {a} worker runs with allocator {got!r} (is lib{a.split('-')[0]} installed?)")
    times = {a: {} for a in workers}
    for r in range(1, args.repeats + 1):
        for a, w in workers.items():
            w.stdin.write(f"{r}\n")
            w.stdin.flush()
            for k, v in json.loads(w.stdout.readline()).items():
                times[a].setdefault(k, []).append(v)
            print(f"round {r} {a}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times[a].items()),
                  file=sys.stderr, flush=True)
    for w in workers.values():
        w.stdin.close()
        w.wait()
    n_tok = args.batch * args.seq
    med = {a: {k: statistics.median(v) for k, v in t.items()} for a, t in times.items()}
    print(f"model {args.model}, plan {plan_counts}, batch {args.batch}x{args.seq}, {args.threads} threads, "
          f"medians of {args.repeats} steps, interleaved across precisions and allocators")
    for a, m in med.items():
        for k, v in m.items():
            print(f"{a:9s} {k:12s} {v:6.2f} s/step  {n_tok / v:7.0f} tokens/s")
    ref, first = args.precisions[0], args.allocators[0]
    for a in args.allocators:
        for p in args.precisions[1:]:
            print(f"{a}: {p} / {ref}: stage 1 {med[a][f'stage1 {ref}'] / med[a][f'stage1 {p}']:.2f}x, "
                  f"stage 2 {med[a][f'stage2 {ref}'] / med[a][f'stage2 {p}']:.2f}x tokens/s")
    for a in args.allocators[1:]:
        print(f"{a} / {first}: " + ", ".join(f"{k} {med[first][k] / med[a][k]:.2f}x" for k in med[a]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"median_step_s": med, "step_s": times, "batch": [args.batch, args.seq],
                       "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                       "command": " ".join(sys.argv)}, fh, indent=1)
    return 0


def find_library(name: str) -> str:
    """The path of lib<name>.so for LD_PRELOAD."""
    import glob

    for pattern in (f"/usr/lib/*/lib{name}.so*", f"/usr/lib/lib{name}.so*", f"/usr/local/lib/lib{name}.so*"):
        if found := sorted(glob.glob(pattern)):
            return found[0]
    raise SystemExit(f"error: lib{name} is not installed (e.g. apt-get install libjemalloc2), or drop it from "
                     "--allocators")


if __name__ == "__main__":
    sys.exit(main())
