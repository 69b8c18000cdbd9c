"""`layerboost convert`: convert a model to a hybrid following a plan."""

from __future__ import annotations

from ..util import DTYPES
from .options import model_fits, add_force, model_args


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a model to a hybrid following a layer plan and save it",
                       description="Replace each decoder layer's attention as plan.json says; save safetensors + plan.")
    model_args(p)
    p.add_argument("--plan", required=True, help="plan JSON: {'schema_version': 1, 'layers': [{'kind': ...}, ...]}")
    p.add_argument("--out", required=True, help="output folder")
    add_force(p, "folder")
    p.set_defaults(func=run)


def run(args) -> int:
    import layerboost as lb

    plan = lb.LayerPlan.load(args.plan)
    model_fits(args.model, plan)
    model, tok = lb.load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    record = lb.convert(model, plan)
    lb.save(model, args.out, tokenizer=tok)
    print(plan.table())
    changed = sum(r.old != r.new for r in record)
    print(f"replaced attention in {changed} of {len(record)} layers; saved to {args.out}")
    return 0
