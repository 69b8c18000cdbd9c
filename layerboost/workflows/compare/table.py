"""comparison.md and comparison.json: the table, the paired tests against `layerboost` and the base, the rows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ...util import write_json
from ..report import retrieval_table
from .config import CompareConfig
from .paired import significance
from .plots import plot_comparison

def _fmt_sig(s: dict, what: str) -> str:
    if what not in s:
        return "-"
    d = s[what]
    return f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] p={d['p']:.3g}"


def _counts(per_task: dict) -> str:
    return ", ".join(f"{t} {n}" for t, n in per_task.items())


def write_comparison(out: Path, results: dict, cfg: CompareConfig, sens: dict) -> Path:
    full = {n: r for n, r in results.items() if "eval" in r}
    tasks = list(cfg.tasks) if full else []
    lines = [f"# Comparison: `{cfg.model}`", ""]
    any_row = next(iter(full.values()), None)
    if any_row:
        evaluated = ("evaluation: every other item (" + ", ".join(f"{t} {any_row['eval'][t]['n']}" for t in tasks)
                     + (f"; MMLU {cfg.eval.mmlu_per_subject} per subject" if "mmlu" in tasks and cfg.eval.mmlu_per_subject
                        else "") + f"; weights in {cfg.accuracy_dtype})")
    else:
        evaluated = "no multiple-choice evaluation (eval.multiple_choice: false)"
    lines += [
        f"Selection (sensitivity analysis): {_counts(sens['items_per_task'])} items from the selection partition "
        f"({cfg.selection_size} documents per task, seed {cfg.selection_seed}); {evaluated}. Plans: "
        f"{cfg.softmax} softmax / {cfg.swa} swa (window {cfg.window}) / {cfg.none} none; healing budget "
        f"{cfg.heal.tokens} tokens for every healed row. Held-out text: {cfg.eval.heldout_tokens} tokens that "
        "neither healing nor calibration reads; WikiText-2: "
        f"{cfg.eval.wikitext_docs or 'all'} test documents, windows of {cfg.eval.wikitext_max_length or 'the model context'}"
        f" tokens; healing, held-out text and WikiText-2 in {cfg.dtype}.", ""]
    head = "| row" + "".join(f" | {t} ({any_row['eval'][t]['column']})" for t in tasks)
    head += " | avg | WikiText ppl | held-out KL | agree | held-out ppl | speed (x base) | KV (x base) |"
    lines += [head, "|" + "---|" * (len(tasks) + 8)]
    for n, r in results.items():
        if "same_as" in r:
            lines.append(f"| {n} | same plan as {r['same_as']} |" + " |" * (len(tasks) + 6))
            continue
        h = r["heldout"]
        cells = []
        for t in tasks:
            if "eval" in r:
                v = r["eval"][t]
                se = v.get(f"{v['column']}_stderr")
                cells.append(f"{100 * v[v['column']]:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * v[v['column']]:.1f}")
            else:
                cells.append("-")
        avg = f"{100 * r['average']:.1f}" if "average" in r else "-"
        wt = f"{r['wikitext']['word_perplexity']:.2f}" if "wikitext" in r else "-"
        b = r.get("bench") or {}
        sp = f"{b['speedup']:.2f}" if b else "-"
        kv = f"{b['kv_ratio']:.3f}" if b else "-"
        cells += [avg, wt, f"{h['kl']:.4f}", f"{h['agree']:.3f}", f"{h['ppl']:.2f}", sp, kv]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracy in percent ± standard error. KL(base || row) in nats per token; agree: share of "
              "positions where both pick the same next token. Speed: decode ms per step of the base over the row's "
              f"at context {cfg.bench.prompt + cfg.bench.length}, batch {cfg.bench.batch}, measured side by side; "
              "KV: cache bytes at that context.", ""]
    retrieval = retrieval_table(results, "row")
    lines += ["## Long-context retrieval", ""] + retrieval if retrieval else []
    # significance against layerboost and against base
    sig = {}
    measured = {n: r for n, r in results.items() if "heldout" in r and not n.startswith("random_s")}
    for ref in ("layerboost", "base"):
        if ref not in measured:
            continue
        lines += [f"## Paired tests against `{ref}`", "",
                  "| row | right only here / only in ref (McNemar p) | avg accuracy diff [95% CI] p | "
                  "gold margin diff [95% CI] p | held-out KL diff [95% CI] p |", "|---|---|---|---|---|"]
        for n, r in measured.items():
            if n == ref:
                continue
            s = significance(r, measured[ref])
            sig[f"{n}_vs_{ref}"] = s
            m = s.get("mcnemar")
            mc = f"{m['a_only']} / {m['b_only']} (p={m['p']:.3g})" if m else "-"
            lines.append(f"| {n} | {mc} | {_fmt_sig(s, 'accuracy')} | {_fmt_sig(s, 'margin')} | "
                         f"{_fmt_sig(s, 'heldout_kl')} |")
        retr = [(n, f, k) for n, r in measured.items() if n != ref
                for f, per in significance(r, measured[ref]).items() if f in ("passkey", "needle") for k in per]
        if retr:
            lines += ["", "| row | retrieval at length | right only here / only in ref (McNemar p) | margin diff [95% CI] p |",
                      "|---|---|---|---|"]
            for n, f, k in retr:
                t = sig[f"{n}_vs_{ref}"][f][k]
                m = t["acc"]
                lines.append(f"| {n} | {f} {k} | {m['a_only']} / {m['b_only']} (p={m['p']:.3g}) | "
                             f"{t['margin']['diff']:+.3f} [{t['margin']['ci95'][0]:+.3f}, {t['margin']['ci95'][1]:+.3f}] "
                             f"p={t['margin']['p']:.3g} |")
        lines += ["", "A difference is significant at the 5% level when p < 0.05 (the interval excludes 0); "
                  "bootstrap over items within each task (10,000 resamples), held-out KL over held-out rows.", ""]
    randoms = {n: r["heldout"]["kl"] for n, r in results.items() if n.startswith("random_s")}
    if randoms:
        lines += ["Unhealed random placements, held-out KL: "
                  + ", ".join(f"{n} {v:.4f}" for n, v in randoms.items())
                  + (f"; the sensitivity plan unhealed: {results['converted']['heldout']['kl']:.4f}"
                     if "converted" in results else "") + ".", ""]
    figs = plot_comparison(out, results)
    lines += [f"![{p.stem}]({p.name})" for p in figs] + [""]
    lines += ["## Rows", ""] + [f"- `{n}`: {r['description']}" + (f" ({r['seconds']:.0f} s)" if "seconds" in r else "")
                                for n, r in results.items()] + [""]
    write_json(out / "comparison.json", {"rows": results, "significance": sig, "config": dataclasses.asdict(cfg)},
               default=str)
    path = out / "comparison.md"
    path.write_text("\n".join(lines))
    return path
