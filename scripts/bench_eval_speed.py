"""Wall time of `layerboost.evaluate` against lm-evaluation-harness on the same items and model.

Both runs score the same seeded stratified subsample (default 100 items of each task) with the
same model object and thread count: lm-eval runs its own task YAMLs on local copies of the
items (`layerboost.lm_eval_adapter.write_local_tasks`) with `HFLM`; ours runs `evaluate`,
including its data loading and tokenisation. The script checks that the chosen answers are
identical and prints both wall times and, last, the ratio ours / lm-eval. Not a test.

    python scripts/bench_eval_speed.py --limit 100 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,winogrande,mmlu")
    ap.add_argument("--limit", type=int, default=100, help="items per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="ours: items per forward call")
    ap.add_argument("--lm-eval-batch-size", type=int, default=1, help="lm-eval HFLM batch size (its default is 1)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from layerboost import evaluate as E
    from layerboost import lm_eval_adapter as A
    from layerboost.models import load_model

    tasks = args.tasks.split(",")
    model, tok = load_model(args.model)
    with torch.inference_mode():  # warm-up so neither run pays first-call costs
        model(input_ids=torch.tensor([tok.encode("warm up the model")]), use_cache=False)

    # the same documents for both
    selected, doc_ids = {}, {}
    for name in tasks:
        task = E.get_task(name)
        if not isinstance(task, E.MCTask):
            ap.error(f"{name}: only multiple-choice tasks are compared")
        docs, _ = E.load_task_docs(task, args.data_dir)  # processed docs keep their raw fields for lm-eval
        strata = [task.stratum(d) if task.stratum else str(task.gold(d)) for d in docs]
        doc_ids[name] = E.stratified_subsample(strata, args.limit, args.seed, name)
        selected[name] = [docs[i] for i in doc_ids[name]]
    tmp = tempfile.mkdtemp(prefix="bench_eval_")
    mapping = A.write_local_tasks(selected, tmp)

    def run_ours() -> tuple[dict, float]:
        t0 = time.perf_counter()
        res = E.evaluate(model, tok, tasks, data_dir=args.data_dir, limit=args.limit, seed=args.seed,
                         batch_size=args.batch_size, per_item=True, progress=False)
        return res, time.perf_counter() - t0

    # ours runs before and after lm-eval and the mean is used, so a change in machine load
    # during the benchmark does not favour either side
    ours, t_before = run_ours()
    t0 = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.lm_eval_batch_size)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=A.task_names_to_run(mapping), log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=tmp, include_defaults=False),
    )
    t_lm = time.perf_counter() - t0

    _, t_after = run_ours()
    t_ours = (t_before + t_after) / 2

    identical, max_diff = True, 0.0
    print(f"{'task':<15} {'items':>5} {'ours':>7} {'lm-eval':>7} {'max|dll|':>9}  same answers")
    for name in tasks:
        items = ours["tasks"][name]["items"]
        assert [it["doc_id"] for it in items] == doc_ids[name]
        same, diff, theirs_acc = 0, 0.0, 0.0
        for lm_task, positions in mapping[name]:
            for s in sorted(out["samples"][lm_task], key=lambda s: s["doc_id"]):
                it = items[positions[s["doc_id"]]]
                theirs = [float(r[0][0]) for r in s["resps"]]
                diff = max(diff, max(abs(a - b) for a, b in zip(theirs, it["logliks"])))
                agree = max(range(len(theirs)), key=lambda i: (theirs[i], -i)) == it["pred"]
                if "acc_norm" in s:  # lm-eval's length-normalised choice must agree too
                    agree &= s["acc_norm"] == float(it["pred_norm"] == it["gold"])
                same += int(agree)
                theirs_acc += s["acc"]
        identical &= same == len(items)
        max_diff = max(max_diff, diff)
        print(f"{name:<15} {len(items):>5} {ours['tasks'][name]['acc']:>7.4f} {theirs_acc / len(items):>7.4f} {diff:>9.1e}  {same}/{len(items)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
          f"load average (1/5/15 min) at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"predictions identical: {identical} (max |loglik diff| {max_diff:.1e})")
    print(f"lm-eval {lm_eval.__version__} HFLM batch_size={args.lm_eval_batch_size}: {t_lm:.1f} s")
    print(f"layerboost evaluate batch_size={args.batch_size}: {t_ours:.1f} s (mean of {t_before:.1f} s before and {t_after:.1f} s after lm-eval)")
    print(f"ratio (layerboost / lm-eval wall time): {t_ours / t_lm:.3f}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
