"""`layerboost analyze`: layer sensitivity."""

from __future__ import annotations

from pathlib import Path

import torch

from ..util import DTYPES, UsageError, check_writable
from .options import add_limit, int_list, positive, iterative_steps, model_fits, add_force, model_args, policy_from_args, policy_args


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="layer sensitivity: benchmark drop when each layer's attention is removed",
                       description="For each decoder layer, score the model with only that layer's attention removed "
                       "(and optionally windowed) on the tasks; write sensitivity.json, sensitivity.png and plan.json "
                       "to --out. Per-layer results are saved as they finish: re-running resumes. MEMORY: the hidden "
                       "states entering the current layer are kept for every scored sequence (tokens x hidden x 4 "
                       "bytes, ~0.5 GB for 1000 items on SmolLM2-135M); lower --limit to bound it.")
    model_args(p)
    p.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,winogrande,mmlu",
                   help="comma-separated task names or task definition .yaml/.json files")
    add_limit(p, 200)
    p.add_argument("--seed", type=int, default=0, help="subsample seed")
    p.add_argument("--selection-size", type=positive(), default=100,
                   help="documents per task reserved for selection (analysis); evaluation of a comparison never scores them")
    p.add_argument("--selection-seed", type=int, default=0, help="seed of the selection partition")
    p.add_argument("--data-dir", help="local data folder (default: $LAYERBOOST_DATA_DIR or ../shared/data)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--swa-window", type=positive(), help="also measure each layer with a sliding window of this size")
    p.add_argument("--windows", type=int_list, default=(),
                   help="also measure each layer as swa at each of these windows (comma-separated, e.g. 64,256,1024) "
                        "and as none, by KL on long contiguous rows: the costs `plan --speedup` places layers by "
                        "(SmolLM2-135M, 4 windows, 4 rows of 2048 tokens: at most 40 min on 2 CPU cores)")
    p.add_argument("--long-calib-seqs", type=positive(), default=4, help="rows of contiguous novel text for --windows")
    p.add_argument("--long-calib-len", type=positive(), default=2048,
                   help="tokens per --windows row (a window of W only differs from softmax past W tokens)")
    p.add_argument("--retrieval", action="store_true",
                   help="also measure each layer's part in long-context retrieval: the true key's log-likelihood with "
                        "only that layer global among windowed ones, on pass-key and fact-in-prose trials of selection "
                        "text (never the reported ones); plan --keep-retrieval K keeps softmax in the top K "
                        "(SmolLM2-135M, 2 x 8 trials of 2048 tokens: about 10 min on 2 CPU cores)")
    p.add_argument("--retrieval-len", type=positive(), default=2048, help="--retrieval: prompt length in tokens")
    p.add_argument("--retrieval-trials", type=positive(), default=8, help="--retrieval: trials per family")
    p.add_argument("--retrieval-window", type=positive(), default=64,
                   help="--retrieval: the window every other layer gets while one layer keeps global attention")
    p.add_argument("--retrieval-seed", type=int, default=1,
                   help="--retrieval: trial seed (not 0: seed 0 draws the trials eval reports)")
    p.add_argument("--no-proxies", action="store_true", help="skip the KL and cosine proxies")
    p.add_argument("--calib-seqs", type=positive(), default=8, help="calibration sequences (x256 tokens) for the proxies")
    p.add_argument("--iterative", type=iterative_steps, default="auto", metavar="K",
                   help="remove layers one at a time K times by --score, re-measuring the rest after each (the "
                        "plan then ranks by it, see --ranking); auto (default): as many as the plan's attention-free "
                        "layers for the kl and cosine scores (none for margin and drop, whose every step repeats "
                        "the item pass, for --ranking one-shot and for the threshold policy); 0: one-shot only. Costs about "
                        "one KL-proxy pass over the remaining layers per step (SmolLM2-135M, 10 steps, 8 calibration "
                        "sequences: about 20 min on 2 CPU cores)")
    p.add_argument("--batch-tokens", type=positive(), default=8192, help="padded tokens per forward")
    p.add_argument("--naive", action="store_true", help="recompute every layer for every variant (for checking)")
    p.add_argument("--threads", type=positive(), help="torch CPU threads (default: torch's)")
    policy_args(p)
    add_force(p, "folder")
    # --retrieval adds a measurement (its own store): an analysis made without it is extended, not refused
    p.set_defaults(func=run, extends={"retrieval": ("retrieval_len", "retrieval_trials", "retrieval_window",
                                                    "retrieval_seed", "keep_retrieval")})


def run(args) -> int:
    import json

    import layerboost as lb
    from ..evaluate import Partition, get_task
    from ..plan import check_fits
    from ..workflows.report import plot_sensitivity
    from ..sensitivity import PROXY_SCORES, analyze, check_analysis_dir, iterative_problems, iterative_steps_for
    from ..sensitivity import plan_scores, ranking_used, sensitivity_table

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        get_task(t)
    check_writable(args.out)
    if args.no_proxies and args.score in PROXY_SCORES:
        raise UsageError(f"--score {args.score} ranks layers by a proxy that --no-proxies skips: drop --no-proxies, "
                         "or choose --score margin or drop")
    if args.keep_retrieval and not args.retrieval:
        raise UsageError(f"--keep-retrieval {args.keep_retrieval} keeps the layers the retrieval signal ranks highest: "
                         "add --retrieval")
    if args.retrieval and args.retrieval_seed == 0:
        raise UsageError("--retrieval-seed 0 draws the trials eval reports: choose layers with another seed (e.g. 1)")
    if args.retrieval and args.retrieval_window >= args.retrieval_len:
        raise UsageError(f"--retrieval-window {args.retrieval_window} is not below --retrieval-len "
                         f"{args.retrieval_len}: a window only differs from softmax past its width")
    part = Partition("selection", args.selection_size, args.selection_seed).to_dict()
    check_analysis_dir(args.out, {"tasks": tasks, "limit": args.limit, "seed": args.seed, "partition": part})
    policy = policy_from_args(args)
    if policy is not None and policy.policy == "speed":
        raise UsageError("--speedup / --kv-budget place a plan from window costs and a speed model: analyze with --windows, "
                         "then run `layerboost plan --sensitivity OUT/sensitivity.json --speedup ...`")
    policy = policy or lb.plan.PlanPolicy(  # no policy given: thirds, --window and --kind apply
        "fractions", fractions=[1 / 3, 1 / 3], window=args.window, kind=args.kind,
        score=args.score, ranking=args.ranking, target=args.target)

    def policy_fits(config):  # the plan policy and the iterative mode, tried on the model's layers before the analysis
        n = config.num_hidden_layers
        plan = lb.plan.make_plan(policy, [0.0] * n, config, retrieval=[0.0] * n if policy.keep_retrieval else None)
        check_fits(plan, config, (args.window, args.swa_window, *args.windows))
        problems = iterative_problems(policy, args.iterative, n, plan.counts()["none"])
        if problems:
            raise UsageError(f"--iterative {args.iterative} / --ranking {args.ranking}: " + "; ".join(problems))

    config = model_fits(args.model)
    if config is not None:
        policy_fits(config)
    model, tok = lb.load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    if config is None:
        policy_fits(model.config)
    res = analyze(model, tok, tasks, out_dir=args.out, limit=args.limit, seed=args.seed,
                  data_dir=args.data_dir, swa_window=args.swa_window, proxies=not args.no_proxies,
                  calib_seqs=args.calib_seqs, iterative_steps=iterative_steps_for(policy, model.config, args.iterative),
                  batch_tokens=args.batch_tokens,
                  reuse_prefix=not args.naive, selection_size=args.selection_size, selection_seed=args.selection_seed,
                  iterative_score=args.score, windows=tuple(args.windows), long_seqs=args.long_calib_seqs,
                  long_len=args.long_calib_len,
                  retrieval=dict(length=args.retrieval_len, trials=args.retrieval_trials, window=args.retrieval_window,
                                 seed=args.retrieval_seed) if args.retrieval else None)
    used = ranking_used(res, args.score, args.ranking, policy.thresholds)
    scores = plan_scores(res, args.score, used)
    from ..sensitivity.retrieval import retrieval_scores

    plan = lb.plan.make_plan(policy, scores, model.config, log=print, retrieval=retrieval_scores(res, policy))
    plan.save(Path(args.out) / "plan.json")
    plot_sensitivity(res, plan, Path(args.out) / "sensitivity.png", score=args.score, ranking=used)
    print(sensitivity_table(res, plan))
    if "iterative" in res:
        print("iterative removal order:", [h["removed"] for h in res["iterative"]["history"]],
              "| disagreements with one-shot:", json.dumps(res["iterative"]["disagreements"]))
    print(f"plan: layers ranked by {args.score}, {used}")
    print(f"wrote {args.out}/sensitivity.json, sensitivity.png, plan.json "
          f"({res['timing']['total_seconds']:.0f} s)")
    return 0
