"""The comparison: disjoint selection/evaluation items, paired statistics, plan baselines, and every
row end to end on a tiny random model (resuming row by row)."""

import json
import random

import yaml

import pytest

import layerboost as lb
from layerboost.workflows import compare as C
from layerboost.workflows.compare.config import CURVE_ROWS
from layerboost.workflows.compare.rows import plan_hash
from layerboost.workflows.run import ConfigError
from layerboost import plan as P
from layerboost.evaluate import Partition, prepare_task
from layerboost.stats import mcnemar, paired_bootstrap

from conftest import tiny_model


# ---- statistics against independent references ---------------------------------------------------

def test_mcnemar_exact_matches_binomial_by_hand():
    # 8 discordant pairs, 1 vs 7: p = 2 * (C(8,0) + C(8,1)) / 2^8 = 18 / 256
    a = [1] * 7 + [0] * 1 + [1] * 5
    b = [0] * 7 + [1] * 1 + [1] * 5
    r = mcnemar(a, b)
    assert (r["a_only"], r["b_only"]) == (7, 1)
    assert r["p"] == pytest.approx(18 / 256)
    assert mcnemar(a, a)["p"] == 1.0
    with pytest.raises(ValueError):
        mcnemar([1, 0], [1])


def test_paired_bootstrap_detects_shift_and_not_noise():
    rng = random.Random(0)
    x = [rng.gauss(0, 1) for _ in range(400)]
    shifted = [v + 0.3 + rng.gauss(0, 0.1) for v in x]
    noise = [v + rng.gauss(0, 0.1) for v in x]
    r = paired_bootstrap(shifted, x, n_resamples=2000)
    assert r["diff"] == pytest.approx(0.3, abs=0.03) and r["ci95"][0] > 0 and r["p"] < 0.01
    r0 = paired_bootstrap(noise, x, n_resamples=2000)
    assert r0["ci95"][0] < 0 < r0["ci95"][1] and r0["p"] > 0.05
    # strata: the statistic is the unweighted mean of the per-stratum means
    r2 = paired_bootstrap([1, 1, 1, 0], [0, 0, 0, 0], strata=["a", "a", "a", "b"], n_resamples=200)
    assert r2["diff"] == pytest.approx(0.5)


# ---- selection vs evaluation items ---------------------------------------------------------------

@pytest.mark.parametrize("task", ["piqa", "arc_challenge", "winogrande", pytest.param("mmlu", marks=pytest.mark.slow)])
def test_selection_and_evaluation_partitions_are_disjoint_and_cover_the_split(task):
    tok = lb.load_model("smollm2-135m")[1]
    sel = prepare_task(tok, task, partition=Partition("selection", 50, 3))
    ev = prepare_task(tok, task, partition=Partition("evaluation", 50, 3))
    assert len(sel.doc_ids) == 50 and not set(sel.doc_ids) & set(ev.doc_ids)
    assert sorted(sel.doc_ids + ev.doc_ids) == list(range(sel.n_total))
    # a subsample of the selection part stays inside it (what `analyze --limit` scores)
    sub = prepare_task(tok, task, limit=10, partition=Partition("selection", 50, 3))
    assert set(sub.doc_ids) <= set(sel.doc_ids)
    # another partition seed gives another partition
    assert set(prepare_task(tok, task, partition=Partition("selection", 50, 4)).doc_ids) != set(sel.doc_ids)


@pytest.mark.slow
def test_mmlu_per_subject_sample():
    tok = lb.load_model("smollm2-135m")[1]
    p = prepare_task(tok, "mmlu", per_stratum=20, partition=Partition("evaluation", 100, 0))
    subjects = {}
    for it in p.items:
        subjects[it.group] = subjects.get(it.group, 0) + 1
    assert len(subjects) == 57 and min(subjects.values()) == 20 == max(subjects.values())


# ---- held-out text -------------------------------------------------------------------------------

def test_heldout_text_never_reaches_training(tmp_path, monkeypatch):
    import layerboost.corpus as corpus
    from layerboost.corpus import HELDOUT_BLOCK, _file_documents, heldout_rows, is_heldout_block

    monkeypatch.setattr(corpus, "HELDOUT_EVERY", 5)  # more held-out blocks in a small file

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    f = tmp_path / "book.txt"
    # 1.4 MB of numbered paragraphs so every block has distinct content
    f.write_text("".join(f"{i} " + " ".join(rng.choice(words) for _ in range(30)) + "\n\n" for i in range(7500)))
    held = [b for b in range(f.stat().st_size // HELDOUT_BLOCK + 1) if is_heldout_block("book.txt", b)]
    assert len(held) >= 2 and any(b > 0 for b in held)
    data = f.read_bytes()
    train = "".join(_file_documents([f], seed=0, segment_chars=4096)).encode()
    for b in held:
        chunk = data[b * HELDOUT_BLOCK + 100:b * HELDOUT_BLOCK + 300]  # a piece from inside the held-out block
        assert chunk not in train
    tok = lb.load_model("smollm2-135m")[1]
    rows = heldout_rows(tok, f, 300, 64)
    assert rows.shape == (5, 64)
    assert tok.decode(rows[0][:20]) in data.decode()


# ---- plan baselines ------------------------------------------------------------------------------

def test_random_and_pattern_plans_keep_counts():
    for seed in range(3):
        p = P.plan_random(30, 10, 10, 10, seed)
        assert p.counts()["softmax"] == p.counts()["swa"] == p.counts()["none"] == 10
    assert P.plan_random(30, 10, 10, 10, 0) != P.plan_random(30, 10, 10, 10, 1)
    assert P.plan_pattern(6, 2, 2, 2).kinds == ["softmax", "swa", "none"] * 2
    with pytest.raises(P.PlanError):
        P.plan_pattern(6, 2, 2, 1)


def test_config_errors_listed_together():
    with pytest.raises(ConfigError) as e:
        C.CompareConfig.from_dict({"rows": ["base", "magic"], "score": "vibes", "heal": {"options": {"lr": -1}},
                                   "eval": {"limit": 0}})
    msg = str(e.value)
    for part in ("unknown row 'magic'", "score: 'vibes'", "lr must be a finite number > 0", "eval.limit must be >= 1"):
        assert part in msg
    with pytest.raises(ConfigError) as e:  # a seed row repeats a healed row listed before it
        C.CompareConfig.from_dict({"rows": ["layerboost_seed1", "layerboost", "random", "random_seed2"]})
    assert str(e.value).count("repeats a healed row listed before it") == 2
    assert C.CompareConfig.from_dict({"rows": ["base", "signal_iterative"], "score": "cosine"}).score == "cosine"
    for name in ("compare", "compare-quick"):  # every shipped comparison config parses
        assert C.CompareConfig.load(name).rows[0] == "base"
    assert not C.CompareConfig.load("compare-quick").eval.multiple_choice


# ---- every row end to end ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = lb.load_model("smollm2-135m")[1]
    d = tmp_path_factory.mktemp("tiny")
    m = tiny_model("llama", layers=6, vocab=len(tok))
    m.config.max_position_embeddings = 256
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_compare(model_dir, out, rows=None):
    return C.CompareConfig.from_dict({
        "model": str(model_dir), "out": str(out), "tasks": ["piqa", "arc_easy"], "threads": 1,
        "selection_size": 8, "analyze_limit": 4, "calib_seqs": 2, "iterative_limit": 2,
        "softmax": 2, "swa": 2, "none": 2, "window": 8, "linear_window": 8, "linear_feature_dim": 8,
        "random_seeds": [0, 1, 2], "rows": rows or list(C.ROWS) + ["signal_iterative", "layerboost_seed1"],
        "heal": {"tokens": 512, "probe_tokens": 256,
                 "options": {"seq_len": 64, "batch_size": 2, "checkpoint_every": 1, "progress": False}},
        "eval": {"limit": 6, "wikitext_docs": 1, "wikitext_max_length": 128, "heldout_tokens": 256,
                 "heldout_seq_len": 64},
        "bench": {"batch": 2, "prompt": 8, "length": 8, "sample_steps": 2, "repeats": 1},
    })


@pytest.mark.slow
def test_every_row_end_to_end_and_resume(tiny_dir, tmp_path, one_thread):
    out = tmp_path / "cmp"
    md = C.compare(tiny_compare(tiny_dir, out), log=lambda *a: None)
    res = json.loads((out / "comparison.json").read_text())["rows"]
    for name in ("base", "converted", "layerboost", "no_attn_distill", "random_s0", "random_s1", "random_s2",
                 "random", "pattern", "lolcats", "lolcats_gate", "llm_drop"):
        assert name in res, name
    full = [n for n, r in res.items() if "eval" in r]
    # every fully measured row was scored on the same evaluation items, none of them a selection item
    sens = json.loads((out / "analyze" / "sensitivity.json").read_text())
    ids = {n: {t: [it["doc_id"] for it in res[n]["eval"][t]["items"]] for t in ("piqa", "arc_easy")} for n in full}
    assert all(ids[n] == ids["base"] for n in full)
    for t in ("piqa", "arc_easy"):
        assert not set(ids["base"][t]) & set(sens["doc_ids"][t]) and len(ids["base"][t]) == 6
    # base vs itself: KL 0, agreement 1; a hybrid differs
    assert res["base"]["heldout"]["kl"] == pytest.approx(0, abs=1e-6) and res["base"]["heldout"]["agree"] == 1
    assert res["converted"]["heldout"]["kl"] > 1e-4
    # equal budgets and counts; the ablation has no attention-transfer stage
    healed = [n for n in full if res[n]["heal"]]
    assert {res[n]["heal"]["tokens"] for n in healed} == {512}
    assert res["no_attn_distill"]["heal"]["stage_tokens"]["attn"] == 0 < res["layerboost"]["heal"]["stage_tokens"]["attn"]
    for n in ("converted", "layerboost", "random", "pattern"):
        assert res[n]["counts"] == {"softmax": 2, "swa": 2, "linear_swa": 0, "none": 2}
    assert res["lolcats"]["counts"]["linear_swa"] == 6 and res["llm_drop"]["counts"] == {
        "softmax": 4, "swa": 0, "linear_swa": 0, "none": 2}
    # another healing seed: the same plan and budget, continuous measures only, a different result
    seeded, lb_row = res["layerboost_seed1"], res["layerboost"]
    assert seeded["plan"] == lb_row["plan"] and seeded["heal"]["tokens"] == 512 and "wikitext" in seeded
    assert "eval" not in seeded and seeded["heldout"]["kl"] != lb_row["heldout"]["kl"]
    # the healed random row is the median-KL seed's plan
    kls = sorted((res[f"random_s{s}"]["heldout"]["kl"], s) for s in range(3))
    assert res["random"]["plan"] == res[f"random_s{kls[1][1]}"]["plan"]
    # healing curves: probes at 0 and at the end for rows 3 and 4; healing lowers held-out KL here
    for n in CURVE_ROWS:
        curve = res[n]["heal"]["curve"]
        assert [p["tokens"] for p in curve][0] == 0 and curve[-1]["tokens"] == 512
        assert curve[0]["kl"] == pytest.approx(res["converted"]["heldout"]["kl"], rel=1e-3)
    text = md.read_text()
    assert "Paired tests against `layerboost`" in text and "McNemar" in text
    assert (out / "accuracy_vs_speed.png").is_file() and (out / "healing_curves.png").is_file()
    # a rerun resumes everything: no row is recomputed
    (out / "rows" / "pattern.json").unlink()
    speed = out / "bench" / f"{plan_hash(lb.LayerPlan.from_dict(res['converted']['plan']))}.json"
    speed.unlink()  # deleted speed files are measured again (e.g. on a quiet machine), nothing else is
    seen = []
    C.compare(tiny_compare(tiny_dir, out), log=seen.append)
    assert speed.is_file()
    again = json.loads(speed.read_text())
    for n in ("converted", "layerboost", "no_attn_distill"):  # every row of that plan shows the new measurement
        assert json.loads((out / "rows" / f"{n}.json").read_text())["bench"] == again
    assert any("[pattern] interleaved" in s for s in seen)
    assert sum("done before, skipped" in s for s in seen) == len(res) - 1 - sum("same_as" in r for r in res.values())
    # continuous measures only: every row still gets held-out KL with paired tests, no accuracy columns
    quick = tiny_compare(tiny_dir, tmp_path / "quick", rows=["base", "converted", "pattern"])
    quick.eval.multiple_choice = False
    quick.eval.retrieval_lengths, quick.eval.retrieval_trials = [96], 3
    qmd = C.compare(quick, log=lambda *a: None).read_text()
    assert "piqa" not in qmd.split("## Paired")[0].split("| row")[1] and "| pattern | - | - | - |" in qmd
    qres = json.loads((tmp_path / "quick" / "comparison.json").read_text())
    r = qres["rows"]["pattern"]["retrieval"]["needle"]["lengths"]["96"]
    assert "## Long-context retrieval" in qmd and f"| {100 * r['acc']:.1f} / {100 * r['exact']:.1f} |" in qmd
    assert "| pattern | needle 96 |" in qmd and qres["significance"]["pattern_vs_base"]["passkey"]["96"]["acc"]["p"] <= 1
    # other settings in the same folder are refused
    cfg = tiny_compare(tiny_dir, out)
    cfg.window = 4
    with pytest.raises(ConfigError, match="other settings"):
        C.compare(cfg)


@pytest.mark.slow
def test_accuracy_dtype_changes_until_a_row_is_scored(tiny_dir, tmp_path, one_thread):
    """eval.dtype sets the weights of the multiple-choice pass only; accuracy-only settings may change
    until a row is scored, then they are refused like every other setting."""
    import torch

    out = tmp_path / "cmp"
    cfg = tiny_compare(tiny_dir, out, rows=["base", "converted"])
    cfg.eval.multiple_choice = False
    C.compare(cfg, log=lambda *a: None)  # phase 1 only (fp32)
    kl = json.loads((out / "rows" / "converted.json").read_text())["heldout"]["kl"]
    # a config file written before eval.dtype existed: the missing setting reads as its default
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["eval"]["dtype"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    cfg = tiny_compare(tiny_dir, out, rows=["base", "converted"])
    cfg.eval.dtype = "bfloat16"
    seen = []
    cmp = C.Comparison(cfg, seen.append)
    md = cmp.run().read_text()
    assert any("accuracy settings changed before any row was scored: dtype, multiple_choice" in s for s in seen)
    assert next(cmp.base.parameters()).dtype == torch.float32  # the base itself is never cast
    for row in ("base", "converted"):
        r = json.loads((out / "rows" / f"{row}.json").read_text())
        assert {v["dtype"] for v in r["eval"].values()} == {"bfloat16"} and "eval" in r
    assert json.loads((out / "rows" / "converted.json").read_text())["heldout"]["kl"] == kl  # phase 1 kept
    assert "weights in bfloat16" in md and "held-out text and WikiText-2 in float32" in md
    # once a row is scored, changing them mixes two settings in one table: refused
    cfg = tiny_compare(tiny_dir, out, rows=["base", "converted"])
    with pytest.raises(ConfigError, match=r"other settings \(eval\)"):
        C.compare(cfg, log=lambda *a: None)


def test_comparison_plans_are_placed_as_every_plan_is():
    """Rows are placed through plan.make_plan: on a model whose local layers slide natively (Gemma 3), no row asks
    such a layer for softmax or a wider window, the sensitivity rows included (issue 37)."""
    from layerboost.workflows.compare.rows import row_plans

    types = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    config = tiny_model("gemma3", layers=6, layer_types=types, window=8).config
    kl = [0.6, 0.1, 0.9, 0.2, 0.5, 0.8]
    sens = {"n_layers": 6, "sensitivity": [0.0] * 6, "sensitivity_margin": [0.0] * 6,
            "proxies": {"kl": kl, "cosine": kl[::-1]}}
    cfg = tiny_compare("unused", "unused", rows=["base", "converted", "pattern", "random", "lolcats", "llm_drop"])
    cfg.window = 16  # wider than the native window of 8
    for name, (plan, mode, desc) in row_plans(cfg, sens, config).items():
        if plan is None or isinstance(plan, str):  # the base; "median": the random seed chosen after measuring
            continue
        for i, spec in enumerate(plan.layers):
            if types[i] == "sliding_attention":
                assert spec.kind != "softmax" and (spec.window or 0) <= 8, (name, i, spec)
