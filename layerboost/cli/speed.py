"""`layerboost speed`: the speed model of a serving engine (calibrate once per machine and build, check it on plans it
was not fitted to, predict a plan)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ..util import UsageError, check_writable
from .options import add_force, int_list, positive


def add_parser(sub) -> None:
    p = sub.add_parser("speed", help="speed model of llama.cpp on this machine: calibrate, check, predict",
                       description="Predict any plan's decode tokens/s at a context length without building it, from a "
                       "few llama-bench runs on this machine (layerboost/speed.py). `calibrate` measures six plans and "
                       "caches the fit per machine, llama.cpp build, model shape and weight type; `check` measures "
                       "plans the fit never saw and prints predicted against measured; `predict` prints a plan's "
                       "predicted speed and KV cache. Benchmarks need quiet cores: run nothing else meanwhile.")
    s = p.add_subparsers(dest="action", metavar="<action>", required=True)
    for name, text in (("calibrate", "measure the calibration plans in llama.cpp and cache the fit"),
                       ("check", "measure plans the fit never saw; predicted against measured"),
                       ("predict", "predicted decode speed and KV cache of a plan")):
        a = s.add_parser(name, help=text, description=text)
        a.add_argument("--model", required=True, help="smollm2-135m (embedded), a .gguf file, a local HF folder")
        a.add_argument("--engine", choices=["llama.cpp", "layerboost"], default="llama.cpp",
                       help="llama.cpp (the tools engines/llama.cpp/build.sh builds) or layerboost's own engine (float32, "
                            "on the CPU with --threads torch threads)")
        a.add_argument("--type", default="f32", choices=["f32", "f16", "bf16", "q8_0"], help="GGUF weight type")
        a.add_argument("--threads", type=positive(), default=2, help="llama.cpp threads")
        a.add_argument("--parallel", type=int_list, default=(1,),
                       help="parallel sequences (comma-separated; above 1 measured with llama-batched-bench)")
        if name != "predict":
            a.add_argument("--depths", type=int_list, default=None,
                           help="context depths measured (default: calibrate 0,1024,4096,8192; check 1024,4096,8192)")
            a.add_argument("--rounds", type=positive(), default=2, help="alternating rounds (median)")
            a.add_argument("--work", help="folder for the plans' GGUF files (default: a temporary one, removed after)")
        if name == "calibrate":
            a.add_argument("--force", action="store_true", help="measure again even when a fit is cached")
        if name == "check":
            a.add_argument("--plans", nargs="*", help="plan JSON files (default: six plans spanning the kinds, windows "
                           "and llama.cpp architectures, none of them calibrated on)")
            a.add_argument("--out", help="JSON file for the comparison (every measurement, prediction and error)")
            add_force(a, "file")
        if name == "predict":
            a.add_argument("--plan", required=True, help="plan JSON (plan.json of analyze / plan, or a hybrid's)")
            a.add_argument("--context", type=positive(), default=4096, help="tokens of context")
        a.set_defaults(func=run)


def run(args) -> int:
    from .. import speed as S
    from ..models import load_model, model_config

    config = model_config(args.model)
    if config is None:
        raise UsageError(f"--model {args.model}: give the embedded name, a .gguf file or a local folder (the speed model "
                         "is keyed by its shape)")
    if args.engine == "layerboost":
        import torch

        torch.set_num_threads(args.threads)
        key = S.layerboost_key(config, "float32", args.threads, "cpu")
    else:
        key = S.llama_cpp_key(config, args.type, args.threads)
    if args.action == "predict":
        return _predict(args, S, key, config)
    if args.action == "check" and args.out:
        check_writable(args.out, folder=False)
    fitted = S.cached(key)
    if args.action == "check" and fitted is None:
        raise S.SpeedModelError(f"no {args.engine} speed model for this machine and build: run `layerboost speed "
                                f"calibrate --model {args.model} --engine {args.engine}` first")
    if args.action == "calibrate" and fitted is not None and not args.force:
        print(f"cached: {S.key_path(key)} (--force to measure again)")
        _print_fit(fitted)
        return 0
    model, tok = load_model(args.model)
    work = Path(args.work) if args.work else Path(S.cache_dir()) / "work"
    try:
        if args.action == "calibrate":
            if args.engine == "layerboost":
                fitted = S.calibrate_layerboost(model, depths=args.depths or (0, 1024, 2048, 4096, 8192),
                                                parallel=args.parallel, rounds=args.rounds, log=_err)
            else:
                fitted = S.calibrate_llama_cpp(model, tok, work, depths=args.depths or (0, 1024, 4096, 8192),
                                               parallel=args.parallel, rounds=args.rounds, gguf_type=args.type,
                                               threads=args.threads, log=_err)
            print(f"wrote {S.key_path(key)}")
            _print_fit(fitted)
            return 0
        n = config.num_hidden_layers
        plans = {"base": S.LayerPlan.uniform("softmax", n)}
        if args.plans:
            plans |= {Path(p).stem: S.LayerPlan.load(p, num_layers=n) for p in args.plans}
        else:
            plans |= S.validation_plans(n)
        if args.engine == "layerboost":
            records = S.measure_layerboost(model, plans, args.depths or (1024, 4096, 8192), args.parallel, args.rounds,
                                           log=_err)
        else:
            files = S.write_plan_ggufs(model, tok, plans, work, args.type)
            del model
            records = S.measure_llama_cpp(files, plans, args.depths or (1024, 4096, 8192), args.parallel, args.rounds,
                                          threads=args.threads, log=_err)
        rows = S.check_against(fitted, records, plans["base"])
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'plan':<16} {'depth':>6} {'seqs':>4} {'measured':>9} {'predicted':>9} {'error':>7} {'x base meas':>11} "
          f"{'x base pred':>11}")
    for r in rows:
        print(f"{r['name']:<16} {r['depth']:>6} {r['parallel']:>4} {r['measured']:>9.2f} {r['predicted']:>9.2f} "
              f"{r['error']:>+7.1%} {r.get('measured_speedup', 0):>11.3f} {r.get('predicted_speedup', 0):>11.3f}")
    held = [r for r in rows if r["name"] != "base"]
    worst = max(held, key=lambda r: abs(r["error"]))
    print(f"largest error on plans the fit never saw: {worst['error']:+.1%} ({worst['name']} at {worst['depth']})")
    if args.out:
        from ..util import write_json

        write_json(args.out, {"key": key, "command": " ".join(sys.argv), "coef": fitted.coef, "rows": rows,
                              "records": records, "written_by": getattr(args, "written_by", None)})
        print(f"wrote {args.out}")
    return 0


def _predict(args, S, key, config) -> int:
    fitted = S.require(key, f"layerboost speed calibrate --model {args.model} --engine {args.engine}"
                       + (f" --type {args.type}" if args.engine == "llama.cpp" else ""))
    plan = S.LayerPlan.load(args.plan, num_layers=config.num_hidden_layers)
    base = S.LayerPlan.uniform("softmax", config.num_hidden_layers)
    cell = S.bytes_per_cell(config, "f16" if args.engine == "llama.cpp" else "f32")
    for n in args.parallel:
        t, b = fitted.tok_s(plan, args.context, n), fitted.tok_s(base, args.context, n)
        kv, kb = fitted.kv_bytes(plan, args.context, cell, n), fitted.kv_bytes(base, args.context, cell, n)
        print(f"{n} sequence(s) at {args.context} tokens in {args.engine}: {t:.1f} tok/s per sequence ({t / b:.2f}x the "
              f"base's {b:.1f}); KV cache {kv / 2**20:.1f} MiB ({kv / kb:.3f}x the base's, "
              f"{'f16' if args.engine == 'llama.cpp' else 'float32'})")
    return 0


def _print_fit(fitted) -> None:
    for n, coef in fitted.coef.items():
        print(f"{n} sequence(s): " + ", ".join(f"{k} {v * 1e3:.4g} ms" if k not in ("tok", "cell") else
                                              f"{k} {v * 1e6:.4g} us" for k, v in sorted(coef.items())))
    res = fitted.residuals()
    worst = max(res, key=lambda r: abs(r["error"]))
    print(f"{len(res)} calibration measurements; largest fit error {worst['error']:+.1%} ({worst['name']} at "
          f"{worst['bench_depth']})")
    print(f"depths measured (mean depth of the decoded tokens): {fitted.depths()}")


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
