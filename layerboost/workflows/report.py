"""Figures and the run report (PNG via matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

from ..kinds import KINDS
from ..util import UsageError, atomic_write, read_json


def _span(counts: dict) -> str:
    """Items per task as "10" when all tasks have the same count, else "min-max"."""
    if not counts:
        return "?"
    lo, hi = min(counts.values()), max(counts.values())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


SCORE_LABELS = {"drop": "avg. accuracy drop (points)", "margin": "gold-margin drop (nats)",
                "kl": "KL(base || variant), nats/token", "cosine": "1 - cos(x, x + attn(x))"}


def table_scores(scores: list[float], score: str, ranking: str) -> list[float]:
    """Plan scores as the plan table prints them: the one-shot accuracy drop in points, the rest as measured
    (an iterative ranking's removed layers carry ranks, not measurements: they stay as they are)."""
    return [100 * s for s in scores] if score == "drop" and ranking == "one-shot" else list(scores)


def plot_sensitivity(result: dict, plan, path: str | Path, score: str = "drop", ranking: str = "auto") -> Path:
    """Bar chart of each layer's sensitivity under `score` and `ranking` (those the plan was chosen by),
    coloured by the planned kind (paper Fig. 4); the one-shot accuracy drop carries its 95% interval. With
    an iterative ranking of K removals, the bars are the last step's scores (measured with the first K - 1
    removed) and removed layers are labelled r1, r2, ... in removal order."""
    from ..sensitivity import plan_scores, ranking_used

    plt = pyplot()
    rows = [r for r in result["layers"] if r["variant"] == "none"]
    x = [r["layer"] for r in rows]
    iterative = ranking_used(result, score, ranking) == "iterative"
    vals = plan_scores(result, score, ranking)
    removed = [h["removed"] for h in result["iterative"]["history"]] if iterative else []
    scale = 100 if score == "drop" else 1
    y = [0.0 if i in removed else scale * vals[i] for i in x]
    ci = score == "drop" and not iterative
    lo = [100 * (r["drop"] - r["drop_ci95"][0]) for r in rows]
    hi = [100 * (r["drop_ci95"][1] - r["drop"]) for r in rows]
    colours = [KINDS[plan[i].kind].colour if plan is not None else "#777777" for i in x]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(x) + 2), 3.6), dpi=150)
    ax.bar(x, y, color=colours, yerr=[lo, hi] if ci else None, capsize=1.5, error_kw={"elinewidth": 0.6, "alpha": 0.6})
    top = max([abs(v) for v in y] + [1e-9])
    for k, i in enumerate(removed):
        ax.text(i, 0.02 * top, f"r{k + 1}", ha="center", va="bottom", fontsize=6, color=colours[x.index(i)])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(SCORE_LABELS[score] + (f"\nwith {len(removed) - 1} layers removed" if iterative else ""), fontsize=8)
    n = result.get("items_per_task", {})
    what = (f"{', '.join(result['tasks'])}; {_span(n)} items/task" if score in ("drop", "margin")
            else "calibration text")
    ax.set_title(f"Attention removal sensitivity ({what}{'; iterative' if iterative else ''})", fontsize=8)
    ax.set_xticks(x)
    ax.tick_params(axis="x", labelsize=6)
    if plan is not None:
        from matplotlib.patches import Patch

        used = [k for k in KINDS if any(plan[i].kind == k for i in x)]
        ax.legend(handles=[Patch(color=KINDS[k].colour, label=k) for k in used], fontsize=7, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _sensitivity(run_dir: Path) -> dict | None:
    from ..sensitivity import load_sensitivity

    f = run_dir / "analyze" / "sensitivity.json"
    return load_sensitivity(f) if f.is_file() else None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def accuracy_table(evals: dict[str, dict]) -> list[str]:
    """Markdown rows: one per model, accuracy per task (with stderr) and the average."""
    names = [n for n in evals if evals[n]]
    if not names:
        return ["(no evaluation results)"]
    first = evals[names[0]]
    tasks = [t for t, v in first["tasks"].items() if v.get("column") in ("acc", "acc_norm")]
    head = "| model | " + " | ".join(f"{t} ({first['tasks'][t]['column']})" for t in tasks) + " | average |"
    rows = [head, "|" + "---|" * (len(tasks) + 2)]
    for n in names:
        ev = evals[n]
        cells = []
        for t in tasks:
            v = ev["tasks"][t]
            col = v["column"]
            se = v.get(f"{col}_stderr")
            cells.append(f"{_pct(v[col])} ± {_pct(se)}" if se is not None else _pct(v[col]))
        avg = ev.get("average") or {}
        rows.append(f"| {n} | " + " | ".join(cells) + f" | {_pct(avg.get('value'))} |")
    n_items = {t: first["tasks"][t]["n"] for t in tasks}
    rows.append("")
    rows.append("Items per task: " + ", ".join(f"{t} {n}" for t, n in n_items.items())
                + ". Values are percentages ± standard error.")
    return rows


def quality_table(evals: dict[str, dict]) -> list[str]:
    """Markdown rows of the continuous measures that see what a few hundred items cannot."""
    names = [n for n in evals if evals[n]]
    if not names:
        return []
    first = evals[names[0]]
    mc = [t for t, v in first["tasks"].items() if v.get("column") in ("acc", "acc_norm")]
    rows = [r"| model | WikiText-2 word ppl | held-out KL(base \|\| model) | next-token agreement | held-out ppl | "
            "mean gold margin |", "|---|---|---|---|---|---|"]
    for n in names:
        ev = evals[n]
        wt, h = ev["tasks"].get("wikitext"), ev.get("heldout")
        margins = [ev["tasks"][t]["mean_margin"] for t in mc if "mean_margin" in ev["tasks"][t]]
        rows.append(f"| {n} | {wt['word_perplexity']:.2f} |" if wt else f"| {n} | - |")
        rows[-1] += (f" {h['kl']:.4f} | {h['agree']:.3f} | {h['ppl']:.2f} |" if h else " - | - | - |")
        rows[-1] += f" {sum(margins) / len(margins):.3f} |" if margins else " - |"
    notes = []
    if first["tasks"].get("wikitext"):
        w = first["tasks"]["wikitext"]
        notes.append(f"WikiText-2: {w['n']} test documents, rolling windows of "
                     f"{w.get('max_length') or 'the model context'} tokens")
    if first.get("heldout"):
        per_row = f" in rows of {first['heldout']['seq_len']} tokens" if first["heldout"].get("seq_len") else ""
        notes.append(f"held-out text: {first['heldout']['tokens']} tokens{per_row} of the training corpus that healing "
                     "and calibration never read")
    notes.append("gold margin: gold-answer log-likelihood minus the best other choice's, averaged over tasks (nats)")
    return rows + ["", "; ".join(notes) + "."]


def retrieval_table(results: dict[str, dict], first: str = "model") -> list[str]:
    """Markdown lines of long-context retrieval (eval.retrieval_lengths): per model (a run's evaluations, a
    comparison's rows: anything holding a "retrieval" result), family and length, the share of trials whose true key
    beats every distractor and the share answered exactly (greedy)."""
    names = [n for n in results if results[n] and results[n].get("retrieval")]
    if not names:
        return []
    fam = results[names[0]]["retrieval"]
    cols = [(f, n) for f, r in fam.items() for n in r["lengths"]]
    rows = [f"| {first} | " + " | ".join(f"{f} {n}" for f, n in cols) + " |", "|---|" + "---|" * len(cols)]
    for name in names:
        r = results[name]["retrieval"]
        rows.append(f"| {name} | " + " | ".join(f"{_pct(r[f]['lengths'][n]['acc'])} / {_pct(r[f]['lengths'][n]['exact'])}"
                                                 for f, n in cols) + " |")
    any_r = next(iter(fam.values()))
    return ["Long-context retrieval (true key ranked first among it and "
            f"{any_r['distractors']} distractors / greedy answer exact, percent; {any_r['trials']} trials per cell, "
            f"chance {_pct(any_r['chance'])}): passkey hides a key in filler text, needle a fact in WikiText-2 prose.",
            ""] + rows + [""]


def _plan_ranking(cfg: dict, sens: dict) -> tuple[str, str]:
    """The score and the ranking ("iterative" / "one-shot") the run's plan was chosen by."""
    from ..plan import PlanPolicy
    from ..sensitivity import ranking_used

    policy = PlanPolicy(**(cfg.get("plan") or {"score": "drop"}))
    return policy.score, ranking_used(sens, policy.score, policy.ranking, policy.thresholds)


REPORT_MARK = "<!-- written by layerboost; sha256 of the text above: {} -->"


def _mark(text: str) -> str:
    import hashlib

    return REPORT_MARK.format(hashlib.sha256(text.encode()).hexdigest()[:16])


def report_changed(path: Path) -> str | None:
    """Why `path` (a run's report.md) is not layerboost's to rewrite: a link, a file without layerboost's last
    line, or one whose text changed since (edited); None when it is missing or as written."""
    if path.is_symlink():
        return f"{path} is a link (to {os.readlink(path)})"
    if not path.exists():
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return f"{path} is not a report layerboost wrote"
    body, _, last = text.rstrip("\n").rpartition("\n")
    if not last.startswith(REPORT_MARK.split("{")[0]):
        return f"{path} is not a report layerboost wrote (or an older layerboost, without its last line)"
    if last != _mark(body + "\n"):
        return f"{path} was edited since layerboost wrote it"
    return None


def write_report(run_dir: str | Path, force: bool = True) -> Path:
    """Build `report.md` in a run folder from the JSON each stage wrote (numbers are copied, not recomputed).
    The file ends in a line with the hash of its text, so a report edited since is known (`report_changed`);
    it is replaced (never written through a link), and with force=False refused when `report_changed`.

    Raises:
        UsageError: force=False and report.md is a link, edited, or not layerboost's.
    """
    d = Path(run_dir)
    why = None if force else report_changed(d / "report.md")
    if why:
        raise UsageError(f"{why}: move it away, or pass --force to replace it")
    text = report_text(d)
    return atomic_write(d / "report.md", text + _mark(text) + "\n")


def report_text(d: Path) -> str:
    """report.md's text, from the stage outputs in run folder `d`."""
    import yaml

    lines = [f"# layerboost run report: `{d.name}`", ""]
    cfg_path = d / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    lines += [f"Model: `{cfg.get('model', '?')}`; tasks: {', '.join(cfg.get('tasks', []))}.", ""]
    if cfg:
        lines += ["<details><summary>config</summary>", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(),
                  "```", "", "</details>", ""]
    sens = _sensitivity(d)
    lines += ["## 1. Layer sensitivity", ""]
    if sens:
        n, score, used = sens["items_per_task"], *_plan_ranking(cfg, sens)
        steps = len(sens["iterative"]["history"]) if used == "iterative" else 0
        lines += [f"Each layer's attention removed alone: accuracy and gold-margin drop on {_span(n)} selection items "
                  f"per task (seed {sens['seed']})" + (", KL and cosine proxies on calibration text" if "proxies" in sens
                                                       else "")
                  + (f"; then {steps} layer{'s' * (steps != 1)} removed one at a time by the {score} score, re-measured after each"
                     if steps else "") + f" ({sens['timing']['total_seconds']:.0f} s). The figure shows the score "
                  f"the plan was chosen by: {SCORE_LABELS[score]}, {used}.", ""]
        if (d / "sensitivity.png").is_file():
            lines += ["![sensitivity](sensitivity.png)", ""]
        if "proxies" in sens:
            s = sens["proxies"]["spearman_vs_drop"]
            lines += [f"Spearman rank correlation with the accuracy drop: KL proxy {s['kl']:.2f}, "
                      f"1-cosine proxy {s['cosine']:.2f}, log-likelihood margin drop {s['margin']:.2f}.", ""]
    else:
        lines += ["(not run)", ""]

    plan_path = d / "plan.json"
    lines += ["## 2. Plan", ""]
    if plan_path.is_file():
        from ..plan import LayerPlan
        from ..sensitivity import plan_scores

        plan = LayerPlan.load(plan_path)
        score, used = _plan_ranking(cfg, sens) if sens else ((cfg.get("plan") or {}).get("score", "drop"), "one-shot")
        scores = plan_scores(sens, score, used) if sens else None
        note = ("; iterative: re-measured after each removal, the removed layers ranked first in removal order "
                "(their value is a rank below every measured score)" if used == "iterative" else "")
        lines += ["```", plan.table(table_scores(scores, score, used) if scores else None), "```", "",
                  f"(score, used to choose the plan and shown in the figure: {SCORE_LABELS[score]}{note})", ""]
    else:
        lines += ["(not run)", ""]

    lines += ["## 3. Accuracy", ""]
    evals = {n: read_json(d / "eval" / f"{n}.json") for n in ("base", "converted", "healed")}
    lines += accuracy_table(evals) + [""]
    lines += quality_table(evals) + [""]
    lines += retrieval_table(evals)
    heal = read_json(d / "heal" / "heal.json")
    if heal:
        st = heal.get("stage_tokens", {})
        local = (f"{st['block']:,} tokens of block-wise local distillation" if "block" in st
                 else f"{st.get('attn', 0):,} tokens of attention transfer")
        lines += [f"Healing: {local} (stage 1), {st.get('kd', 0):,} "
                  f"tokens of LoRA logit distillation (stage 2), on `{heal.get('data')}`.", ""]

    lines += ["## 4. Speed and memory", ""]
    for name, title in (("latency", "Decode latency and memory vs decode length"), ("throughput", "Throughput")):
        b = read_json(d / "bench" / f"{name}.json")
        if not b:
            continue
        lines += [f"### {title}", ""]
        if b.get("table"):
            lines += ["```", b["table"], "```", ""]
        for png in sorted((d / "bench").glob(f"{name}*.png")):
            lines += [f"![{png.stem}](bench/{png.name})", ""]
    served = (read_json(d / "stages" / "serve.json") or {}).get("outputs")
    if served:
        lines += ["### In llama.cpp", "", f"GGUF files: `{served['files']['base']}`, `{served['files']['hybrid']}` "
                  f"({served['needs']})", ""]
        lines += [served["table"], "", f"llama-bench decode of 64 tokens after each context, {served['threads']} threads, "
                  "flash attention on, base and hybrid alternating (median of 2 rounds).", ""] if served.get("table") \
            else [f"Not measured: {served['skipped']}", ""]
    lines += ["## 5. Time per stage", "", "| stage | seconds | ran on |", "|---|---|---|"]
    envs = []
    for st in ("analyze", "plan", "convert", "heal", "eval", "bench", "serve"):
        rec = read_json(d / "stages" / f"{st}.json")
        if rec:
            env = rec.get("environment")
            machine = None if env is None else {k: v for k, v in env.items() if k not in ("date", "ram_available_bytes")}
            if machine is not None and machine not in envs:
                envs.append(machine)
            where = "?" if env is None else f"machine {envs.index(machine) + 1}, {env['date']}"
            lines.append(f"| {st} | {rec['seconds']:.1f} | {where} |")
    lines += ["", "## 6. Environment (as each stage recorded it)", ""]
    for k, env in enumerate(envs, 1):
        lines += [f"- machine {k}: {env['platform']}, {env['cpu']}, {env['threads']} torch threads, "
                  f"{env['device']} {env['dtype']}, GPU {env['gpu'] or 'none'}; Python {env['python']}, "
                  f"torch {env['torch']}, transformers {env['transformers']}, layerboost {env['layerboost']}"]
    if not envs:
        lines.append("- not recorded (stage records written before layerboost recorded environments)")
    lines.append("")
    return "\n".join(lines)
