"""The quality-speed frontier (issue 35): plans chosen by a target speed beside fixed families, each healed the same
budget, then measured. Resumable phase by phase and row by row; rerun the same phase to continue.

    python scripts/frontier.py plans --sensitivity S.json --out runs/frontier      # the rows' plan files
    python scripts/frontier.py heal --out runs/frontier [--rows a,b]                # heal each row in turn (resumes)
    python scripts/frontier.py evaluate --out runs/frontier [--rows base,a]        # quality of the base and each healed row
    python scripts/frontier.py bench --out runs/frontier                            # llama.cpp decode, quiet cores only
    python scripts/frontier.py status --out runs/frontier

Rows: the planner's picks at 1.3 / 1.5 / 1.7 / 1.9x predicted llama.cpp decode at 4,096 tokens (patched build) and
1.5x for stock llama.cpp, and fixed families placed by the one-shot KL proxy of the same analysis (the ranking every
earlier plan used): 10/10/10 at windows 64 / 256 / 1024, softmax + swa (10/20 w256, 5/25 w512), softmax + none
(20/10, 15/15), and the LLM-Drop layout (10 none by the cosine proxy, 20 softmax). Layer 0 keeps softmax in every
family (llama.cpp reads head sizes there). Every row is healed with the same settings (HEAL below).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from layerboost import speed as S
from layerboost.models import model_config
from layerboost.plan import LayerPlan, Pick, PlanPolicy, make_plan, plan_by_target, summed_cost
from layerboost.sensitivity import load_sensitivity
from layerboost.util import write_json

MODEL = "smollm2-135m"
CONTEXT = 4096
TOKENS = "200k"
# 2048-token rows: a window of up to 1024 differs from softmax on half of every row; bf16 weights and autocast
# (measured harmless: +0.0006 KL at 200k tokens, 1.8x faster, docs/experiments/healing.md)
HEAL = ["--tokens", TOKENS, "--seq-len", "2048", "--batch-size", "1", "--precision", "bf16",
        "--weights-dtype", "bfloat16", "--seed", "0", "--checkpoint-every", "10"]
PICKS = {"pick-1.3": (1.3, "patched"), "pick-1.5": (1.5, "patched"), "pick-1.7": (1.7, "patched"),
         "pick-1.9": (1.9, "patched"), "pick-1.5-stock": (1.5, "stock")}
FAMILIES = {  # name -> (softmax, swa, none, window, score the layers are ranked by)
    "third-w64": (10, 10, 10, 64, "kl"), "third-w256": (10, 10, 10, 256, "kl"), "third-w1024": (10, 10, 10, 1024, "kl"),
    "swa-10-20-w256": (10, 20, 0, 256, "kl"), "swa-5-25-w512": (5, 25, 0, 512, "kl"),
    "none-20-10": (20, 0, 10, 64, "kl"), "none-15-15": (15, 0, 15, 64, "kl"),
    "llm-drop": (20, 0, 10, 64, "cosine"),
}


def make_plans(args) -> int:
    sens = load_sensitivity(args.sensitivity)
    config = model_config(MODEL)
    costs = sens["window_costs"]["kl"]
    speed = S.require(S.llama_cpp_key(config, "f32", 2), f"layerboost speed calibrate --model {MODEL}")
    base = LayerPlan.uniform("softmax", config.num_hidden_layers)
    out = Path(args.out) / "plans"
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, (target, build) in PICKS.items():
        pol = PlanPolicy("speed", speedup=target, context=CONTEXT, target="llama.cpp", build=build)
        rows[name] = (plan_by_target(costs, pol, speed, config=config)[0].plan, {"policy": "speed", "speedup": target,
                                                                                  "build": build})
    for name, (s, w, n, window, score) in FAMILIES.items():
        pol = PlanPolicy("counts", softmax=s, swa=w, none=n, window=window, target="llama.cpp", ranking="one-shot",
                         score=score)
        rows[name] = (make_plan(pol, sens["proxies"][score], config),
                      {"policy": "counts", "counts": [s, w, n], "window": window, "ranking": f"one-shot {score}"})
    for name, (plan, how) in rows.items():
        path = out / f"{name}.json"
        pred = {"loss": summed_cost(plan, costs), "speedup_4096": speed.speedup(plan, base, CONTEXT),
                "speedup_8192": speed.speedup(plan, base, 8192), "kv_4096": None}
        if path.exists() and LayerPlan.load(path) != plan:
            print(f"{path} holds another plan: kept (delete it to place the row again)", file=sys.stderr)
            continue
        plan.save(path, extra={"row": name, "how": how, "predicted": pred, "sensitivity": args.sensitivity})
        c = plan.counts()
        print(f"{name:<16} {c['softmax']:>2}/{c['swa']:>2}/{c['none']:>2} predicted {pred['speedup_4096']:.2f}x @4096 "
              f"loss {pred['loss']:.3f}")
    return 0


def heal(args) -> int:
    root = Path(args.out)
    names = args.rows.split(",") if args.rows else sorted(p.stem for p in (root / "plans").glob("*.json"))
    for name in names:
        folder = root / "heal" / name
        if (folder / "heal.json").exists():  # heal writes it last
            continue
        cmd = ["layerboost", "heal", "--model", MODEL, "--plan", str(root / "plans" / f"{name}.json"),
               "--data", args.data, "--out", str(folder), *HEAL, "--no-progress"]
        if folder.exists():  # a killed heal: continue from its last checkpoint (heal_state/)
            cmd.append("--resume")
        print(" ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode:
            print(f"{name}: heal failed", file=sys.stderr)
            return 1
    return 0


HELDOUT_TOKENS = 16 * 2048  # held-out KL on 16 rows of 2,048 contiguous tokens
PASSKEY_LENGTHS = (1024, 2048, 4096, 8192)
ACC_ITEMS = 500  # seeded items of the evaluation partition per task (MMLU: 20 per subject), each row the same


def evaluate(args) -> int:
    """Every measure of the base and each healed row, one file per (model, measure), so a killed evaluation resumes:
    held-out KL on long rows, WikiText-2 (every document, 2,048-token windows, float32), accuracy on the evaluation
    partition (bfloat16, per item, 500 seeded items per task and MMLU 20 per subject), retrieval (bfloat16; `--families`: pass key in filler, and a fact in
    WikiText-2 prose; 50 trials per length, seed 0)."""
    import copy

    import layerboost as lb
    from layerboost.corpus import heldout_rows
    from layerboost.evaluate import Partition, perplexity_metrics, prepare_task, score_rolling
    from layerboost.evaluate.retrieval import score_retrieval
    from layerboost.quality import heldout_metrics
    from layerboost.util import read_json
    from layerboost.workflows.compare import task_items

    root = Path(args.out)
    base, tok = lb.load_model(MODEL)
    # --smoke: the same code on a few items (checks the phase in a minute; its files are not results)
    heldout_tokens, lengths, trials, limit, docs = ((2 * 256, (256,), 2, 4, 1) if args.smoke else
                                                    (HELDOUT_TOKENS, PASSKEY_LENGTHS, 50, ACC_ITEMS, None))
    rows = args.rows.split(",") if args.rows else ["base"] + sorted(
        p.parent.name for p in (root / "heal").glob("*/heal.json"))
    part = Partition("evaluation", 100, 0)
    tasks = None
    heldout = None
    for name in rows:
        folder = root / "eval" / name
        folder.mkdir(parents=True, exist_ok=True)
        model = copy.deepcopy(base) if name == "base" else lb.load(root / "heal" / name)
        model.eval()
        if read_json(folder / "heldout.json") is None:
            heldout = heldout if heldout is not None else heldout_rows(tok, args.data, heldout_tokens,
                                                                       256 if args.smoke else 2048)
            write_json(folder / "heldout.json", {**heldout_metrics(base, model.float(), heldout),
                                                 "rows": list(heldout.shape)})
        if read_json(folder / "wikitext.json") is None:
            wiki = prepare_task(tok, "wikitext", limit=docs, seed=0)
            lls = score_rolling(model.float(), tok, wiki.requests, max_length=2048, desc="wikitext")
            write_json(folder / "wikitext.json", {**perplexity_metrics(wiki.requests, lls), "doc_logliks": lls,
                                                  "dtype": "float32", "max_length": 2048})
        if tasks is None:
            tasks = [prepare_task(tok, t, limit=limit, seed=0, partition=part,
                                  per_stratum=(1 if args.smoke else 20) if t == "mmlu" else None)
                     for t in ("piqa", "arc_easy", "arc_challenge", "winogrande", "mmlu")]
        acc_model = model.to(torch.bfloat16)
        for family in args.families.split(","):  # 50 trials per length, seed 0, evaluation text
            if read_json(folder / f"{family}.json") is None:
                write_json(folder / f"{family}.json", {**score_retrieval(acc_model, tok, family, lengths, trials,
                                                                         seed=0), "dtype": "bfloat16"})
        for prep in tasks:
            if read_json(folder / f"{prep.task.name}.json") is None:
                write_json(folder / f"{prep.task.name}.json", {**task_items(acc_model, tok, prep, batch_size=32),
                                                               "partition": part.to_dict(), "dtype": "bfloat16"})
        print(f"[frontier] evaluated {name}", file=sys.stderr, flush=True)
    return 0


def bench(args) -> int:
    """llama.cpp decode of the base and every row's plan at depths 0 / 4,096 / 8,192 (needs quiet cores): one f32
    GGUF per plan, written from the converted base (decode speed depends on the tensors' shapes and types, which
    healing leaves as they are: LoRA is merged), measured depth-major with the plans alternating (speed.
    measure_llama_cpp, as calibration), `--rounds` sweeps of llama-bench's 2 repetitions, the median."""
    import layerboost as lb
    from layerboost.export_gguf import describe

    root = Path(args.out)
    base, tok = lb.load_model(MODEL)
    plans = {"base": LayerPlan.uniform("softmax", base.config.num_hidden_layers)}
    plans |= {p.stem: LayerPlan.load(p) for p in sorted((root / "plans").glob("*.json"))}
    files = S.write_plan_ggufs(base, tok, plans, root / "gguf", "f32")
    depths = (0, 4096, 8192)
    recs = S.measure_llama_cpp(files, plans, depths, rounds=args.rounds, threads=2,
                               log=lambda m: print(m, file=sys.stderr, flush=True))
    tok_s = {(r["name"], r["bench_depth"]): r["tok_s"] for r in recs}
    out = {name: {"tok_s": {d: tok_s[name, d] for d in depths},
                  "x_base": {d: tok_s[name, d] / tok_s["base", d] for d in depths},
                  "file": str(files[name]), "runs_in": describe(files[name])} for name in plans}
    write_json(root / "bench.json", {"depths": list(depths), "rounds": args.rounds, "n_gen": 64, "reps": 2,
                                     "machine": S.machine(), "llama_cpp": S.llama_cpp_build(),
                                     "records": recs, "rows": out})
    for name, r in out.items():
        print(f"{name:<16} " + " ".join(f"{r['x_base'][d]:.2f}x" for d in depths) + f"  ({r['runs_in']})")
    return 0


def _row_measures(ev: Path, base: dict | None) -> dict:
    """One row's measures from its eval folder, with paired tests against the base's (`base`: the base's raw files)."""
    from layerboost.evaluate.retrieval import paired
    from layerboost.stats import mcnemar, paired_bootstrap
    from layerboost.util import read_json

    wiki, held = read_json(ev / "wikitext.json"), read_json(ev / "heldout.json")
    out = {"wikitext": wiki and wiki["word_perplexity"], "heldout_kl": held and held["kl"]}
    acc = {t: read_json(ev / f"{t}.json") for t in ("piqa", "arc_easy", "arc_challenge", "winogrande", "mmlu")}
    if all(acc.values()):
        out["accuracy"] = {t: a[a["column"]] for t, a in acc.items()}
        out["accuracy"]["average"] = sum(out["accuracy"].values()) / len(acc)
    for family in ("passkey", "needle"):
        r = read_json(ev / f"{family}.json")
        if r:
            out[family] = {n: {k: v[k] for k in ("acc", "exact", "margin")} for n, v in r["lengths"].items()}
    if base is None:
        return out
    tests = {}
    if wiki and base.get("wikitext"):  # per document: nats per word, hybrid minus base
        a, b = wiki["doc_logliks"], base["wikitext"]["doc_logliks"]
        tests["wikitext_nll"] = paired_bootstrap([-x for x in a], [-x for x in b])
    if held and base.get("heldout"):
        tests["heldout_kl"] = paired_bootstrap(held["kl_rows"], [0.0] * len(held["kl_rows"]))
    if all(acc.values()) and all(base.get(t) for t in acc):
        ca = [it["correct"] for t in acc for it in acc[t]["items"]]
        cb = [it["correct"] for t in acc for it in base[t]["items"]]
        strata = [t for t in acc for _ in acc[t]["items"]]
        tests["accuracy"] = {**paired_bootstrap(ca, cb, strata=strata), "mcnemar": mcnemar(ca, cb)}
    for family in ("passkey", "needle"):
        r, rb = read_json(ev / f"{family}.json"), base.get(family)
        if r and rb:
            tests[family] = paired(r, rb)
    out["vs_base"] = tests
    return out


def _goals(rows: dict, base: dict) -> dict:
    """The issue's goals, each met or not with its numbers (None: not measured yet)."""
    from layerboost.stats import paired_bootstrap
    from layerboost.util import read_json

    def fast(r, at=1.5):
        return (r.get("decode_x_base") or {}).get("4096", 0) >= at

    picks = {n: r for n, r in rows.items() if n.startswith("pick-") and fast(r) and r.get("heldout_kl") is not None}
    goal1 = {}
    for n, r in picks.items():
        acc_d = (r.get("vs_base", {}).get("accuracy") or {})
        pk4 = (r.get("passkey") or {}).get("4096", {}).get("acc")
        bpk4 = (base.get("passkey") or {}).get("4096", {}).get("acc")
        goal1[n] = {"decode_4096": r["decode_x_base"]["4096"], "wikitext_x_base": r.get("wikitext_x_base"),
                    "heldout_kl": r["heldout_kl"], "accuracy_diff": acc_d.get("diff"), "accuracy_ci95": acc_d.get("ci95"),
                    "passkey_4096": pk4, "base_passkey_4096": bpk4,
                    "met": bool(r.get("wikitext_x_base") is not None and r["wikitext_x_base"] <= 1.2
                                and r["heldout_kl"] <= 0.10 and acc_d.get("diff") is not None and acc_d["diff"] >= -0.005
                                and pk4 is not None and bpk4 is not None and pk4 >= bpk4 - 0.05)}
    goal2 = {}
    root = rows.get("_root")
    for n, r in picks.items():
        x = r["decode_x_base"]["4096"]
        fam = {m: q for m, q in rows.items() if m.startswith("third-") and q.get("decode_x_base", {}).get("4096")
               and abs(q["decode_x_base"]["4096"] / x - 1) <= 0.03 and q.get("heldout_kl") is not None}
        for m in fam:
            ea, eb = Path(root) / "eval" / n, Path(root) / "eval" / m
            wa, wb = read_json(ea / "wikitext.json"), read_json(eb / "wikitext.json")
            ha, hb = read_json(ea / "heldout.json"), read_json(eb / "heldout.json")
            t_w = paired_bootstrap([-v for v in wa["doc_logliks"]], [-v for v in wb["doc_logliks"]]) if wa and wb else None
            t_k = paired_bootstrap(ha["kl_rows"], hb["kl_rows"])
            goal2[f"{n} vs {m}"] = {"wikitext_nll": t_w, "heldout_kl": t_k,
                                    "met": bool(t_w and t_w["diff"] < 0 and t_w["p"] < 0.05 and t_k["diff"] < 0
                                                and t_k["p"] < 0.05)}
    return {"pick_at_1.5x_near_base": goal1 or None, "pick_beats_equal_speed_10_10_10": goal2 or None}


def _table(rows: dict, base: dict) -> str:
    """The frontier as a markdown table (the base first), fastest at 4,096 tokens first."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    pk = lambda r, n: f(((r.get("passkey") or {}).get(n) or {}).get("acc"), ".0%")  # noqa: E731
    head = ("| row | plan | decode x base @0 / 4096 / 8192 (predicted @4096) | WikiText-2 ppl (x base) | held-out KL | "
            "accuracy avg | pass key 1k / 2k / 4k / 8k |\n|---|---|---|---|---|---|---|\n")
    lines = [f"| base | 30 softmax | 1 / 1 / 1 | {f(base.get('wikitext'), '.2f')} | 0 | "
             f"{f((base.get('accuracy') or {}).get('average'), '.1%')} | "
             + " / ".join(pk(base, n) for n in ("1024", "2048", "4096", "8192")) + " |"]
    order = sorted(rows.items(), key=lambda kv: -(kv[1]["decode_x_base"].get("4096") or kv[1]["predicted"]["speedup_4096"]))
    for n, r in order:
        x = r["decode_x_base"]
        build = "" if not r.get("runs_in") else " (stock)" if "runs in stock" in r["runs_in"] else " (patched)"
        lines.append(f"| {n} | `{r['plan']}` {r['label']}{build} | {f(x.get('0'), '.2f')} / {f(x.get('4096'), '.2f')} / "
                     f"{f(x.get('8192'), '.2f')} ({r['predicted']['speedup_4096']:.2f}) | {f(r.get('wikitext'), '.2f')} "
                     f"({f(r.get('wikitext_x_base'), '.2f')}) | {f(r.get('heldout_kl'), '.3f')} | "
                     f"{f((r.get('accuracy') or {}).get('average'), '.1%')} | "
                     + " / ".join(pk(r, m) for m in ("1024", "2048", "4096", "8192")) + " |")
    return head + "\n".join(lines) + "\n"


def report(args) -> int:
    """The frontier table and figure from what is measured so far: WikiText-2 ratio to the base and long-row
    held-out KL against measured llama.cpp decode at 4,096 tokens, the frontier (no row both faster and better)
    drawn; every row's accuracy and retrieval with paired tests against the base; how well the predicted loss ranks
    the healed held-out KL (Spearman over the rows); the goals met or not. Raw numbers in frontier.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerboost.sensitivity import spearman
    from layerboost.util import read_json

    root, docs = Path(args.out), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    bench_rows = (read_json(root / "bench.json") or {}).get("rows", {})
    ev_base = root / "eval" / "base"
    base_raw = {k: read_json(ev_base / f"{k}.json") for k in ("wikitext", "heldout", "passkey", "needle", "piqa",
                                                              "arc_easy", "arc_challenge", "winogrande", "mmlu")}
    base = _row_measures(ev_base, None)
    rows = {}
    for p in sorted((root / "plans").glob("*.json")):
        d, plan = json.loads(p.read_text()), LayerPlan.load(p)
        x = bench_rows.get(p.stem, {})
        m = _row_measures(root / "eval" / p.stem, base_raw) if (root / "eval" / p.stem).is_dir() else {}
        rows[p.stem] = {"plan": "".join({"softmax": "S", "swa": "W", "none": "-"}[k] for k in plan.kinds),
                        "label": Pick(plan, 0.0, None, 0.0).label(), "how": d.get("how"), "predicted": d["predicted"],
                        "decode_x_base": {str(k): v for k, v in x.get("x_base", {}).items()},
                        "runs_in": x.get("runs_in"), "healed": (root / "heal" / p.stem / "heal.json").is_file(), **m,
                        "wikitext_x_base": m["wikitext"] / base["wikitext"] if m.get("wikitext") and base.get("wikitext")
                        else None}
    have = [r for r in rows.values() if r.get("heldout_kl") is not None]
    rho = {"heldout_kl": spearman([r["predicted"]["loss"] for r in have], [r["heldout_kl"] for r in have]),
           "wikitext": spearman([r["predicted"]["loss"] for r in have if r["wikitext_x_base"]],
                                [r["wikitext_x_base"] for r in have if r["wikitext_x_base"]])} if len(have) > 2 else None
    goals = _goals({**rows, "_root": str(root)}, base)
    errs = [r["predicted"][f"speedup_{d}"] / r["decode_x_base"][d] - 1 for r in rows.values() for d in ("4096", "8192")
            if r["decode_x_base"].get(d)]
    for r in rows.values():
        r["speedup_error"] = {d: r["predicted"][f"speedup_{d}"] / r["decode_x_base"][d] - 1
                              for d in ("4096", "8192") if r["decode_x_base"].get(d)}
    goals["speed_model_within_5pct"] = ({"median_abs": sorted(map(abs, errs))[len(errs) // 2], "max_abs": max(map(abs, errs)),
                                         "within_5pct": sum(abs(e) <= 0.05 for e in errs), "of": len(errs),
                                         "met": all(abs(e) <= 0.05 for e in errs)} if errs else None)
    write_json(docs / "frontier.json", {"base": {**base, "decode_tok_s": bench_rows.get("base", {}).get("tok_s")},
                                        "rows": rows, "spearman_predicted_loss": rho, "goals": goals,
                                        "bench": {k: v for k, v in (read_json(root / "bench.json") or {}).items()
                                                  if k not in ("rows", "records")}})
    (docs / "frontier-table.md").write_text(_table(rows, base))
    pts = [(r["decode_x_base"].get("4096"), r, n) for n, r in rows.items()
           if r["decode_x_base"].get("4096") and r.get("wikitext_x_base")]
    if pts:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, label in ((axes[0], "wikitext_x_base", "WikiText-2 word perplexity (x base)"),
                               (axes[1], "heldout_kl", "held-out KL(base || row), 2,048-token rows (nats/token)")):
            xs = sorted(((x, r[key], n) for x, r, n in pts if r.get(key) is not None), reverse=True)
            ax.scatter([p[0] for p in xs], [p[1] for p in xs], c=["C1" if n.startswith("pick") else "C0" for *_, n in xs])
            for x, y, n in xs:
                ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            front, best = [], float("inf")
            for x, y, n in xs:  # fastest first: on the frontier when nothing faster is better
                if y < best:
                    front.append((x, y))
                    best = y
            ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", label="frontier")
            ax.set_xlabel("llama.cpp decode at 4,096 tokens (x base, measured)")
            ax.set_ylabel(label)
            ax.legend()
        fig.suptitle("SmolLM2-135M hybrids healed 200k tokens each (orange: the planner's picks)")
        fig.tight_layout()
        fig.savefig(docs / "frontier.png", dpi=150)
    print(json.dumps({"rows": len(rows), "with_speed_and_quality": len(pts), "spearman": rho,
                      "goals": {k: (None if v is None else v["met"] if "met" in v else {n: g["met"] for n, g in v.items()})
                                for k, v in goals.items()}}))
    return 0


def status(args) -> int:
    root = Path(args.out)
    for p in sorted((root / "plans").glob("*.json")):
        d = json.loads(p.read_text())
        done = (root / "heal" / p.stem / "heal.json").exists()
        print(f"{p.stem:<16} predicted {d['predicted']['speedup_4096']:.2f}x loss {d['predicted']['loss']:.3f} "
              f"heal {'done' if done else 'pending'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("plans")
    p.add_argument("--sensitivity", required=True)
    p.add_argument("--out", required=True)
    h = sub.add_parser("heal")
    h.add_argument("--out", required=True)
    h.add_argument("--rows")
    h.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"))
    e = sub.add_parser("evaluate")
    e.add_argument("--out", required=True)
    e.add_argument("--rows")
    e.add_argument("--families", default="passkey", help="retrieval families (passkey,needle)")
    e.add_argument("--smoke", action="store_true", help="a few items of each measure, to check the phase")
    e.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"))
    b = sub.add_parser("bench")
    b.add_argument("--out", required=True)
    b.add_argument("--rounds", type=int, default=2)
    r = sub.add_parser("report")
    r.add_argument("--out", required=True)
    r.add_argument("--docs", default="docs/frontier-smollm2-135m")
    s = sub.add_parser("status")
    s.add_argument("--out", required=True)
    args = ap.parse_args()
    return {"plans": make_plans, "heal": heal, "evaluate": evaluate, "bench": bench, "report": report, "status": status}[args.phase](args)


if __name__ == "__main__":
    raise SystemExit(main())
