"""Multiple-choice scoring in float32 against bfloat16 weights: wall time and what changes.

Scores the same evaluation-partition items (the split minus `compare`'s selection partition) with the
same model loaded once per dtype, one after the other in one process, and prints per dtype the wall
time and each task's accuracy, then per task the predictions that differ from float32 and the largest
change of a gold margin, and last the time ratio float32 / bfloat16. Not a test.

    python scripts/bench_eval_dtype.py --model runs/compare-smollm2-135m/rows/layerboost/healed --limit 200
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a model name or a (layerboost) folder")
    ap.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,winogrande,mmlu")
    ap.add_argument("--limit", type=int, default=200, help="items per task (seeded, stratified)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import layerboost as lb
    from layerboost.evaluate import Partition, evaluate, prepare_task

    tok = lb.load_model(args.model)[1]
    part = Partition("evaluation", 100, 0)  # compare's default partition: selection items are never scored
    preps = [prepare_task(tok, t, data_dir=args.data_dir, limit=args.limit, seed=0, partition=part)
             for t in args.tasks.split(",")]
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"model {args.model}; items: " + ", ".join(f"{p.task.name} {len(p.items)}" for p in preps))
    res, secs = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = lb.load_model(args.model, dtype=dtype)[0].eval()
        t0 = time.perf_counter()
        res[dtype] = evaluate(model, tok, [], prepared=preps, batch_size=args.batch_size, per_item=True,
                              progress=False)["tasks"]
        secs[dtype] = time.perf_counter() - t0
        print(f"{str(dtype):15s} {secs[dtype]:7.1f} s  " + "  ".join(
            f"{t} {v[v['column']]:.4f}" for t, v in res[dtype].items()))
    for t, v in res[torch.float32].items():
        key = "_norm" if v["column"] == "acc_norm" else ""
        a, b = v["items"], res[torch.bfloat16][t]["items"]
        flips = sum(x["pred" + key] != y["pred" + key] for x, y in zip(a, b))
        dm = max(abs(x["margin" + key] - y["margin" + key]) for x, y in zip(a, b))
        print(f"{t}: {flips} of {len(a)} predictions differ; largest gold-margin change {dm:.4f}")
    print(f"float32 / bfloat16 wall time: {secs[torch.float32] / secs[torch.bfloat16]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
