"""The whole analysis (`analyze`): the layer pass, the proxies and the iterative mode, written to one
sensitivity.json; and its table."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..plan import LayerSpec
from ..surgery import decoder_parts
from ..util import write_json
from .store import SCHEMA_VERSION, Store, check_analysis_dir
from .items import items_from_tasks, layer_sensitivity
from .proxies import calibration_tokens, cosine_proxy, kl_proxy, kl_variants, long_calibration_tokens, spearman
from .iterative import check_steps, ranking_disagreements, remove_iteratively
from .ranking import PROXY_SCORES


def _proxies(model, calib: torch.Tensor, drops: list[float], margin: list[float], progress: bool) -> dict:
    """The KL and cosine proxies of every layer on the calibration rows, and their rank agreement with the drop."""
    kl = kl_proxy(model, calib, progress=progress)
    cos = cosine_proxy(model, calib)
    return {"calibration": {"sequences": calib.shape[0], "length": calib.shape[1],
                            "file": "corpus/wikipedia_paragraphs.txt"},
            "kl": kl, "cosine": cos,
            "spearman_vs_drop": {"kl": spearman(kl, drops), "cosine": spearman(cos, drops),
                                 "margin": spearman(margin, drops)}}


def window_costs(model, tokenizer, windows: list[int], data_dir, seqs: int, length: int, store, progress: bool) -> dict:
    """Each layer as none and as swa at each window: KL(model || variant) per token on `seqs` contiguous rows of
    `length` tokens (`long_calibration_tokens`): the per-layer, per-kind costs the speed policy
    (plan.plan_by_target) places layers by."""
    t0 = time.perf_counter()
    calib = long_calibration_tokens(tokenizer, data_dir, seqs, length)
    specs = [LayerSpec("none")] + [LayerSpec("swa", w) for w in windows]
    kl = kl_variants(model, calib, specs, batch=1, progress=progress, store=store, desc="window costs")
    return {"calibration": {"sequences": seqs, "length": length, "files": "corpus/novels (first block not held out)"},
            "windows": list(windows), "kl": kl, "seconds": time.perf_counter() - t0}


def analyze(
    model,
    tokenizer,
    tasks: list[str],
    *,
    out_dir: str | Path,
    limit: int | float | None = 200,
    seed: int = 0,
    data_dir=None,
    swa_window: int | None = None,
    proxies: bool = True,
    calib_seqs: int = 8,
    calib_len: int = 256,
    iterative_steps=0,
    iterative_score: str = "kl",
    batch_tokens: int = 8192,
    reuse_prefix: bool = True,
    progress: bool = True,
    selection_size: int = 100,
    selection_seed: int = 0,
    windows: tuple[int, ...] = (), long_seqs: int = 4, long_len: int = 2048,
    retrieval: dict | None = None,
) -> dict:
    """Full sensitivity analysis; writes `out_dir/sensitivity.json` (resumable per layer) and returns it.

    Items come from the selection partition of each split (`evaluate.Partition`: `selection_size`
    documents per task, seeded by `selection_seed`), which evaluation of a comparison never scores;
    `limit` subsamples within it. The output records the partition and the document ids used.

    `iterative_steps`: removals of the iterative mode by `iterative_score` (0: none), or a function of the
    one-shot result that returns them (the CLI and `run` pass the plan's attention-free layer count).

    `windows`: also measure each layer as swa at these windows and as none on long rows (`window_costs`).
    `retrieval`: also measure each layer's part in long-context retrieval (`retrieval.retrieval_signal`'s keyword
    arguments: length, trials, window, seed), kept in its own store (out_dir/retrieval), so an existing analysis
    rerun with it resumes and adds it.
    """
    from ..evaluate import Partition, prepare_tasks

    if not callable(iterative_steps):
        check_steps(iterative_steps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    part = Partition("selection", selection_size, selection_seed)
    prepared = prepare_tasks(tokenizer, tasks, data_dir=data_dir, limit=limit, seed=seed, partition=part)
    items = items_from_tasks(prepared)
    variants = (LayerSpec("none"),) + ((LayerSpec("swa", swa_window),) if swa_window else ())
    fingerprint = {"model": getattr(model.config, "_name_or_path", ""), "tasks": tasks, "limit": limit, "seed": seed,
                   "n_items": len(items), "variants": [v.to_dict() for v in variants], "partition": part.to_dict()}
    fingerprint |= {"window_costs": {"windows": sorted(windows), "seqs": long_seqs, "length": long_len}} if windows else {}
    check_analysis_dir(out, fingerprint)  # another analysis in `out` is never overwritten
    res = layer_sensitivity(model, items, variants=variants, batch_tokens=batch_tokens, out_dir=out,
                            fingerprint=fingerprint, reuse_prefix=reuse_prefix, progress=progress)
    n_layers = len(decoder_parts(model)[1])
    rows = [r for r in res["layers"] if r["variant"] == "none"]
    drops = [r["drop"] for r in rows]
    result = {
        "schema_version": SCHEMA_VERSION,
        "model": fingerprint["model"],
        "n_layers": n_layers,
        "tasks": tasks,
        "limit": limit,
        "seed": seed,
        "items_per_task": {pt.task.name: len(pt.requests) for pt in prepared},
        "partition": part.to_dict(),
        "doc_ids": {pt.task.name: pt.doc_ids for pt in prepared},
        "data_sources": {pt.task.name: pt.source for pt in prepared},
        "columns": {pt.task.name: pt.task.column for pt in prepared},
        "n_tokens": res["n_tokens"],
        "base": {t: res["layers"][0]["tasks"][t]["base"] for t in res["layers"][0]["tasks"]},
        "layers": [{k: v for k, v in r.items() if k != "loglikelihoods"} for r in res["layers"]],
        "sensitivity": drops,
        "sensitivity_margin": [r["margin_drop"] for r in rows],
        "timing": {"layers_seconds": sum(r["seconds"] for r in res["layers"])},
    }
    if proxies:
        t1 = time.perf_counter()
        result["proxies"] = _proxies(model, calibration_tokens(tokenizer, data_dir, calib_seqs, calib_len), drops,
                                     result["sensitivity_margin"], progress)
        result["timing"]["proxies_seconds"] = time.perf_counter() - t1
    if windows:  # per-layer, per-kind costs on long rows
        result["window_costs"] = window_costs(model, tokenizer, sorted(windows), data_dir, long_seqs, long_len, Store(out, fingerprint), progress)
    if retrieval:
        from .retrieval import retrieval_signal

        fp = {"model": fingerprint["model"], "retrieval": retrieval}
        result["retrieval"] = retrieval_signal(model, tokenizer, **retrieval, data_dir=data_dir, progress=progress,
                                               store=Store(out / "retrieval", fp))
    if callable(iterative_steps):
        iterative_steps = check_steps(iterative_steps(result))
    if iterative_steps:
        t1 = time.perf_counter()
        calib = calibration_tokens(tokenizer, data_dir, calib_seqs, calib_len) if iterative_score in PROXY_SCORES else None
        result["iterative"] = _iterative(model, result, iterative_score, iterative_steps, items, calib, out,
                                         batch_tokens, progress)
        result["timing"]["iterative_seconds"] = time.perf_counter() - t1
    result["timing"]["total_seconds"] = time.perf_counter() - t0
    write_json(out / "sensitivity.json", result)
    return result


def _iterative(model, result: dict, score: str, steps: int, items, calib, out: Path, batch_tokens: int,
               progress: bool) -> dict:
    """The iterative mode's history (`steps` removals by `score`) and where it disagrees with the one-shot ranking."""
    hist = remove_iteratively(model, score, steps, items=items, calib=calib, out_dir=out, batch_tokens=batch_tokens,
                              progress=progress)
    proxies = result.get("proxies", {})
    one_shot = {"drop": result["sensitivity"], "margin": result["sensitivity_margin"], "kl": proxies.get("kl"),
                "cosine": proxies.get("cosine")}[score]
    return {
        "history": [{k: (v if k != "scores" else {str(a): b for a, b in v.items()}) for k, v in h.items()}
                    for h in hist],
        "score": score,
        "disagreements": ranking_disagreements(dict(enumerate(one_shot)), hist) if one_shot is not None else [],
    }


def sensitivity_table(result: dict, plan=None) -> str:
    """One row per layer: drop (points) with its 95% interval, margin drop, proxies, planned kind."""
    p = result.get("proxies", {})
    rows = [f"{'layer':>5} {'drop(pts)':>10} {'95% CI':>17} {'rel%':>7} {'margin':>8}"
            + (f" {'KL':>8} {'1-cos':>7}" if p else "") + ("  plan" if plan else "")]
    none_rows = [r for r in result["layers"] if r["variant"] == "none"]
    for r in none_rows:
        i = r["layer"]
        lo, hi = r["drop_ci95"]
        rel = f"{100 * r['drop_rel']:>7.1f}" if r["drop_rel"] is not None else f"{'n/a':>7}"
        row = (f"{i:>5} {100 * r['drop']:>10.2f} {f'[{100 * lo:.1f}, {100 * hi:.1f}]':>17} "
               f"{rel} {r['margin_drop']:>8.3f}")
        if p:
            row += f" {p['kl'][i]:>8.4f} {p['cosine'][i]:>7.4f}"
        if plan:
            row += f"  {plan[i].kind}"
        rows.append(row)
    if p:
        s = p["spearman_vs_drop"]
        rows.append(f"Spearman vs drop: KL {s['kl']:.2f}, 1-cos {s['cosine']:.2f}, margin {s['margin']:.2f}")
    return "\n".join(rows)
