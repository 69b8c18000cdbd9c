"""`layerboost plan`: a layer plan from a sensitivity.json."""

from __future__ import annotations

from ..util import UsageError, check_writable
from .options import add_force, policy_from_args, policy_args


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="turn a sensitivity.json into a layer plan",
                       description="Choose each layer's kind from its sensitivity by counts, fractions, thresholds, "
                       "or a KV-cache / decode-cost budget; print the plan table and write plan JSON.")
    p.add_argument("--sensitivity", required=True, help="sensitivity.json from `layerboost analyze`")
    p.add_argument("--out", default="plan.json", help="plan JSON to write")
    p.add_argument("--model", help="model (for --budget: layer sizes; checks the plan fits it)")
    p.add_argument("--gguf-type", default="f32", choices=["f32", "f16", "bf16", "q8_0"],
                   help="--speedup: the GGUF weight type the speed model was calibrated for")
    p.add_argument("--threads", type=int, default=2, help="--speedup: threads of the speed model (llama.cpp's or torch's)")
    policy_args(p)
    add_force(p, "file")
    p.set_defaults(func=run)


def run(args) -> int:
    import layerboost as lb
    from ..models import model_config
    from ..plan import check_fits
    from ..sensitivity import load_sensitivity, plan_scores, ranking_used
    from ..sensitivity.retrieval import retrieval_scores

    sens = load_sensitivity(args.sensitivity)
    policy = policy_from_args(args)
    if policy is None:
        raise UsageError("give a policy: --softmax/--swa/--none counts, --fractions, --softmax-above/--none-below, or --budget")
    check_writable(args.out, folder=False)
    if args.budget is not None and not args.model:
        raise UsageError("--budget needs --model (or a config folder) to know the layer sizes")
    config = model_config(args.model, hub=True) if args.model else None
    n = len(sens["sensitivity"])
    if config is not None and n != config.num_hidden_layers:
        raise UsageError(f"{args.sensitivity} analysed a model of {n} layers, --model {args.model} has "
                         f"{config.num_hidden_layers}: plan with the model that was analysed")
    if policy.policy == "speed":  # placed by window costs, not by a ranking of --score
        return _by_target(args, policy, sens, config)
    used = ranking_used(sens, args.score, args.ranking, policy.thresholds)
    scores = plan_scores(sens, args.score, used)
    plan = lb.plan.make_plan(policy, scores, config, log=print, retrieval=retrieval_scores(sens, policy))
    if config is not None:
        check_fits(plan, config)
    plan.save(args.out, extra={"written_by": args.written_by})
    print(plan.table(scores))
    print(f"layers ranked by {args.score}, {used}" + (" (removed layers first, in removal order: their score is a "
                                                      "rank below every measured one)" if used == "iterative" else ""))
    if config is not None:
        from ..plan import relative_cost

        print(f"relative KV cache at {args.context} tokens: {relative_cost(plan, config, args.context, 'kv'):.3f}; "
              f"relative decode bytes/token: {relative_cost(plan, config, args.context, 'decode'):.3f}")
    print(f"wrote {args.out}")
    return 0


def _by_target(args, policy, sens: dict, config) -> int:
    """The speed policy: search, print the pick and the predicted frontier around it, write the plan."""
    from .. import speed as S
    from ..plan import plan_by_target
    from ..sensitivity.retrieval import retrieval_scores

    if config is None:
        raise UsageError("--speedup / --kv-budget need --model (its shape keys the speed model and sizes the cache)")
    costs = (sens.get("window_costs") or {}).get("kl")
    if costs is None:
        raise UsageError(f"{args.sensitivity} holds no window costs: analyze with --windows (e.g. 64,256,1024)")
    speed, geometry = S.for_policy(policy, config, model=args.model, gguf_type=args.gguf_type, threads=args.threads)
    pick, front = plan_by_target(costs, policy, speed, geometry, config, retrieval_scores(sens, policy))
    pick.plan.save(args.out, extra={"written_by": args.written_by, "predicted": {
        "loss": pick.loss, "speedup": pick.speedup, "kv": pick.kv, "context": policy.context,
        "sequences": policy.parallel, "target": policy.target, "build": policy.build}})
    print(pick.plan.table())
    if policy.keep_retrieval:  # the trade: what keeping them costs in predicted loss
        import dataclasses

        from ..plan import kept_for_retrieval

        free = plan_by_target(costs, dataclasses.replace(policy, keep_retrieval=0), speed, geometry, config)[0]
        print(f"softmax kept for retrieval in layers {kept_for_retrieval(retrieval_scores(sens, policy), policy.keep_retrieval)}"
              f"; without them kept the pick would be {free.label()} at quality loss {free.loss:.4f}")
    speed_txt = f"decode {pick.speedup:.2f}x the base's, " if pick.speedup is not None else ""
    print(f"predicted at {policy.context} tokens ({policy.target}{', stock build' if policy.build == 'stock' else ''}): "
          f"{speed_txt}KV cache {pick.kv:.3f}x the base's; quality loss {pick.loss:.4f} (summed per-layer KL on "
          f"{sens['window_costs']['calibration']['length']}-token rows)")
    at = next((i for i, p in enumerate(front) if p is pick), 0)
    near = front[max(0, at - 5):at + 6]
    print("the predicted frontier near it (plan, loss, speedup, KV):")
    for p in near:
        print(f"  {p.label():<14} {p.loss:8.4f} " + (f"{p.speedup:6.2f}x " if p.speedup is not None else "")
              + f"{p.kv:6.3f}" + ("  <- picked" if p is pick else ""))
    print(f"wrote {args.out}")
    return 0
