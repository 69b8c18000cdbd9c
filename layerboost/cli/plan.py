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
    policy_args(p)
    add_force(p, "file")
    p.set_defaults(func=run)


def run(args) -> int:
    import layerboost as lb
    from ..models import model_config
    from ..plan import check_fits
    from ..sensitivity import load_sensitivity, plan_scores, ranking_used

    sens = load_sensitivity(args.sensitivity)
    policy = policy_from_args(args)
    if policy is None:
        raise UsageError("give a policy: --softmax/--swa/--none counts, --fractions, --softmax-above/--none-below, or --budget")
    used = ranking_used(sens, args.score, args.ranking, policy.thresholds)
    scores = plan_scores(sens, args.score, used)
    check_writable(args.out, folder=False)
    if args.budget is not None and not args.model:
        raise UsageError("--budget needs --model (or a config folder) to know the layer sizes")
    config = model_config(args.model, hub=True) if args.model else None
    plan = lb.plan.make_plan(policy, scores, config, log=print)
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
