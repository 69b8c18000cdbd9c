import json
import subprocess
import sys

import pytest
import torch

import layerboost as lb
from layerboost import LayerSpec
from layerboost import plan as P
from layerboost import sensitivity as S
from layerboost.evaluate import prepare_tasks, score_requests

from conftest import tiny_model


@pytest.fixture(scope="module")
def tok():
    return lb.load_model("smollm2-135m")[1]


@pytest.fixture(scope="module")
def prepared(tok):
    return prepare_tasks(tok, ["piqa", "arc_challenge", "mmlu"], limit=4, seed=0)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", layers=4, vocab=len(tok))


@pytest.mark.slow
@torch.no_grad()
def test_prefix_reuse_is_exact(model, prepared):
    items = S.items_from_tasks(prepared)
    v = (LayerSpec("none"), LayerSpec("swa", 4))
    a = S.layer_sensitivity(model, items, variants=v, progress=False, batch_tokens=512)
    b = S.layer_sensitivity(model, items, variants=v, progress=False, reuse_prefix=False, batch_tokens=512)
    # the same log-likelihoods up to float sums in another order (a shared prefix is computed once): 1e-4 nats,
    # while every variant moves some item by far more than that (the tolerance still tells right from wrong)
    tol = 1e-4

    def gap(x, y):
        return max(abs(p - q) for p, q in zip(x, y))

    for ra, rb in zip(a["layers"], b["layers"]):
        assert gap(ra["loglikelihoods"], rb["loglikelihoods"]) <= tol
    assert max(gap(r["loglikelihoods"], a["base"]["loglikelihoods"]) for r in a["layers"]) > 100 * tol  # variants bite
    assert gap(a["base"]["loglikelihoods"], b["base"]["loglikelihoods"]) <= tol


@torch.no_grad()
def test_packed_context_equals_one_row_per_choice(model, tok):
    """One packed row per item (shared context once, a segment mask per choice) scores like one row per choice."""
    items = S.items_from_tasks(prepare_tasks(tok, ["piqa", "arc_easy", "winogrande", "mmlu"], limit=3, seed=1))
    runner = S.LayerRunner(model)
    out = {}
    for share in (True, False):
        seqs = S.pack(items, 512, share_context=share)
        emb = [runner.embed(x, p, g) for x, p, g in zip(seqs.ids, seqs.pos, seqs.segs)]
        out[share] = S.loglikelihoods(runner, seqs, [e[0] for e in emb], [e[1] for e in emb], 0), seqs.n_tokens
    assert max(abs(a - b) for a, b in zip(out[True][0], out[False][0])) <= 1e-4
    assert out[True][1] < 0.8 * out[False][1]  # the contexts really are computed once
    # a model with a windowed layer is scored one row per choice (swa windows by row index)
    m = tiny_model("llama", layers=4, vocab=len(tok))
    lb.convert(m, lb.LayerPlan.from_kinds(["softmax", "swa", "softmax", "softmax"], window=4))
    assert S.LayerRunner(m).windowed() and not S.LayerRunner(model).windowed()


@torch.no_grad()
def test_variant_equals_converted_model_and_evaluator(model, prepared):
    """Variant i scores like a model converted with layer i = none, scored by the evaluator."""
    import copy

    items = S.items_from_tasks(prepared)
    res = S.layer_sensitivity(model, items, layers=[2], progress=False)
    base_eval = [ll for sc in score_requests(model, [r for pt in prepared for r in pt.requests], progress=False)
                 for ll in sc.logliks]
    assert max(abs(x - y) for x, y in zip(res["base"]["loglikelihoods"], base_eval)) <= 1e-4
    m = copy.deepcopy(model)
    lb.convert(m, lb.LayerPlan.from_kinds(["softmax", "softmax", "none", "softmax"]))
    conv = [ll for sc in score_requests(m, [r for pt in prepared for r in pt.requests], progress=False)
            for ll in sc.logliks]
    assert max(abs(x - y) for x, y in zip(res["layers"][0]["loglikelihoods"], conv)) <= 1e-4


def test_drop_and_interval_math():
    base = {"correct": [1, 1, 0, 1], "margin": [1.0, 2.0, -1.0, 0.5]}
    var = {"correct": [0, 1, 0, 0], "margin": [-1.0, 1.0, -1.0, -0.5]}

    class It:
        def __init__(self, t):
            self.task = t

    items = [It("a"), It("a"), It("b"), It("b")]
    c = S.compare_scores(items, base, var)
    assert c["tasks"]["a"]["drop"] == 0.5 and c["tasks"]["b"]["drop"] == 0.5
    assert c["drop"] == 0.5 and c["drop_ci95"][0] < 0.5 < c["drop_ci95"][1]
    assert c["tasks"]["a"]["drop_rel"] == 0.5 and c["tasks"]["b"]["drop_rel"] == 1.0
    assert c["margin_drop"] == pytest.approx((1.5 + 0.5) / 2)
    # a task the base model gets all wrong has no relative drop: None (valid JSON, equal after a
    # save/load round trip), never NaN
    zero = S.compare_scores(items[:2], {"correct": [0, 0], "margin": [0.0, 0.0]}, {"correct": [0, 0], "margin": [0.0, 0.0]})
    assert zero["tasks"]["a"]["drop_rel"] is None and zero["drop_rel"] is None
    assert json.loads(json.dumps(zero)) == zero


def test_resume_skips_finished_layers(model, prepared, tmp_path, monkeypatch):
    items = S.items_from_tasks(prepared)
    full = S.layer_sensitivity(model, items, progress=False, out_dir=tmp_path / "full")
    # "kill" the run after two layers have been written
    real_put, calls = S.Store.put, {"n": 0}

    def dying_put(self, name, data):
        real_put(self, name, data)
        calls["n"] += 1
        if calls["n"] == 2:  # layers 0 and 1 (the base scores come last, from the same pass)
            raise KeyboardInterrupt

    monkeypatch.setattr(S.Store, "put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        S.layer_sensitivity(model, items, progress=False, out_dir=tmp_path / "run")
    monkeypatch.setattr(S.Store, "put", real_put)
    built = []
    from layerboost.sensitivity import items as layer_pass  # where layer_sensitivity looks `variant` up

    real_variant = layer_pass.variant
    monkeypatch.setattr(layer_pass, "variant", lambda r, i, spec: built.append(i) or real_variant(r, i, spec))
    resumed = S.layer_sensitivity(model, items, progress=False, out_dir=tmp_path / "run")
    assert built == [2, 3]  # layers 0 and 1 were not redone
    strip = lambda res: [{k: v for k, v in r.items() if k != "seconds"} for r in res["layers"]]
    assert strip(resumed) == strip(full)
    with pytest.raises(RuntimeError, match="different analysis"):
        S.layer_sensitivity(model, items[:3], progress=False, out_dir=tmp_path / "run")


def test_proxies_and_spearman(model, tok):
    calib = S.calibration_tokens(tok, n_seqs=2, seq_len=32)
    assert calib.shape == (2, 32)
    kl = S.kl_proxy(model, calib, progress=False)
    cos = S.cosine_proxy(model, calib)
    assert len(kl) == len(cos) == 4 and all(k > 0 for k in kl) and all(0 < c < 2 for c in cos)
    assert S.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert S.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert S.spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)


def test_iterative_removal(model, prepared):
    items = S.items_from_tasks(prepared)
    hist = S.iterative_removal(model, items, 2, progress=False)  # ranks by the gold-margin drop by default
    assert len(hist) == 2 and hist[0]["removed"] != hist[1]["removed"]
    for h in hist:  # each step removes the layer whose removal costs the least margin, ties to the lowest index
        assert h["removed"] == min(h["scores"], key=lambda i: (h["scores"][i], i))
    assert hist[0]["removed"] not in hist[1]["scores"]  # re-measured without the removed layer
    assert len(hist[1]["scores"]) == len(hist[0]["scores"]) - 1
    by_drop = S.iterative_removal(model, items, 1, score="drop", progress=False)
    assert by_drop[0]["scores"] != hist[0]["scores"]  # another key: accuracy drops, not margins
    one_shot = {int(k): v for k, v in hist[0]["scores"].items()}
    dis = S.ranking_disagreements(one_shot, hist)
    assert all(d["step"] == 1 for d in dis)  # step 0 follows the one-shot ranking by construction


SCORES = [0.05, 0.001, 0.02, 0.0, 0.03, 0.01]


def test_plan_by_counts_and_fractions():
    plan = P.plan_by_counts(SCORES, softmax=2, swa=2, window=16)
    assert plan.kinds == ["softmax", "none", "swa", "none", "softmax", "swa"]
    assert plan[2].window == 16
    assert P.plan_by_fractions(SCORES, 1 / 3, 1 / 3, window=16) == plan
    with pytest.raises(lb.PlanError, match="add up"):
        P.plan_by_counts(SCORES, softmax=4, swa=4, none=0)


def test_plan_by_thresholds_and_budget():
    plan = P.plan_by_thresholds(SCORES, softmax_above=0.03, none_below=0.005)
    assert plan.kinds == ["softmax", "none", "swa", "none", "softmax", "swa"]
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=2)
    plan = P.plan_by_budget(SCORES, cfg, budget=0.35, context=4096, window=64)
    assert P.relative_cost(plan, cfg, 4096) <= 0.35
    assert plan.kinds[0] == "softmax" and plan.kinds[4] == "softmax"  # the two most sensitive kept
    assert plan.counts()["softmax"] == 2
    tight = P.plan_by_budget(SCORES, cfg, budget=0.005, context=4096, window=64)
    assert tight.counts()["softmax"] == 0 and tight.counts()["none"] >= 1
    assert P.relative_cost(tight, cfg, 4096) <= 0.005
    assert P.relative_cost(tight, cfg, 4096, "decode") < 1


@pytest.mark.slow
def test_cli_analyze_and_plan(tmp_path, tok, model):
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    run = lambda *a: subprocess.run([sys.executable, "-m", "layerboost.cli", *a], capture_output=True, text=True)
    r = run("analyze", "--model", str(tmp_path / "m"), "--tasks", "piqa,arc_easy", "--limit", "4",
            "--out", str(tmp_path / "a"), "--calib-seqs", "2", "--softmax", "2", "--swa", "1",
            "--score", "cosine", "--iterative", "2")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "a" / "sensitivity.json").read_text())
    hist = res["iterative"]["history"]  # LLM-Drop's iterative dropping: the cosine proxy re-measured
    assert res["iterative"]["score"] == "cosine" and len(hist) == 2
    assert hist[0]["scores"] == pytest.approx({str(i): c for i, c in enumerate(res["proxies"]["cosine"])})  # = one-shot
    assert len(list((tmp_path / "a" / "iterative_cosine").glob("step_*.json"))) == 2
    assert len(res["sensitivity"]) == 4 and set(res["proxies"]["spearman_vs_drop"]) == {"kl", "cosine", "margin"}
    assert (tmp_path / "a" / "sensitivity.png").stat().st_size > 1000
    assert lb.LayerPlan.load(tmp_path / "a" / "plan.json").counts() == {"softmax": 2, "swa": 1, "linear_swa": 0, "none": 1}
    assert "Spearman" in r.stdout
    # the plan ranks by the iterative history by default: the first layer removed loses its attention
    assert lb.LayerPlan.load(tmp_path / "a" / "plan.json")[hist[0]["removed"]].kind == "none"
    assert "layers ranked by cosine, iterative" in r.stdout
    sens = str(tmp_path / "a" / "sensitivity.json")
    r = run("plan", "--sensitivity", sens, "--fractions", "0.5,0.25", "--score", "cosine", "--out", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    assert lb.LayerPlan.load(tmp_path / "p.json").kinds == P.plan_by_fractions(
        S.iterative_scores(hist, 4), 0.5, 0.25).kinds
    r = run("plan", "--sensitivity", sens, "--fractions", "0.5,0.25", "--ranking", "one-shot", "--score", "kl",
            "--out", str(tmp_path / "p1.json"))
    assert r.returncode == 0 and "ranked by kl, one-shot" in r.stdout, r.stderr
    assert lb.LayerPlan.load(tmp_path / "p1.json") == P.plan_by_fractions(res["proxies"]["kl"], 0.5, 0.25)
    r = run("plan", "--sensitivity", sens, "--fractions", "0.5,0.25", "--ranking", "iterative", "--score", "kl",
            "--out", str(tmp_path / "p2.json"))
    assert r.returncode != 0 and "ranks by 'cosine'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p2.json").exists()


def test_iterative_ranking_puts_removed_layers_first_in_order():
    # step 0 removed layer 3, step 1 layer 1 (re-measured with 3 removed); the last step's scores rank the rest
    hist = [{"removed": 3, "scores": {"0": 0.9, "1": 0.2, "2": 0.5, "3": 0.1, "4": 0.3}},
            {"removed": 1, "scores": {"0": 1.2, "1": 0.25, "2": 0.6, "4": 0.7}}]
    scores = S.iterative_scores(hist, 5)
    order = sorted(range(5), key=lambda i: scores[i])  # least sensitive first
    assert order == [3, 1, 2, 4, 0]  # removal order, then by the last step (2 < 4 there, 4 < 2 one-shot)
    assert [scores[i] for i in (0, 2, 4)] == [1.2, 0.6, 0.7]
    assert P.plan_by_counts(scores, 1, 2, 2).kinds == ["softmax", "none", "swa", "none", "swa"]
    assert P.plan_by_counts(scores, 1, 3, 1).kinds[3] == "none"  # fewer none than removals: the first removed
    one_shot = [0.9, 0.2, 0.5, 0.1, 0.3]
    res = {"n_layers": 5, "proxies": {"kl": one_shot, "cosine": [0.0] * 5}, "iterative": {"score": "kl", "history": hist}}
    assert S.plan_scores(res, "kl") == scores and S.ranking_used(res, "kl") == "iterative"
    assert S.plan_scores(res, "kl", "one-shot") == one_shot
    assert S.plan_scores(res, "cosine") == [0.0] * 5 and S.ranking_used(res, "cosine") == "one-shot"
    with pytest.raises(S.AnalysisError, match="ranks by 'kl'.*--iterative K --score cosine"):
        S.plan_scores(res, "cosine", "iterative")
    with pytest.raises(S.AnalysisError, match="no iterative history"):
        S.plan_scores({"n_layers": 5, "proxies": {"kl": one_shot}}, "kl", "iterative")


def test_iterative_steps_default_to_the_plans_attention_free_count():
    res = {"n_layers": 6, "proxies": {"kl": SCORES, "cosine": SCORES}, "sensitivity": SCORES}
    steps = lambda **k: S.iterative_steps_for(P.PlanPolicy(**k))(res)
    assert steps(policy="counts", softmax=2, swa=1) == 3
    assert steps(policy="fractions", fractions=[0.5, 0.25]) == 1  # 3 softmax, round(1.5) = 2 swa, 1 none
    assert steps(policy="counts", softmax=2, swa=1, ranking="one-shot") == 0  # the plan will not read it
    assert steps(policy="thresholds", softmax_above=0.03, none_below=0.005) == 0  # thresholds: one-shot units
    assert steps(policy="counts", softmax=2, swa=1, score="cosine") == 3
    assert steps(policy="counts", softmax=2, swa=1, score="margin") == 0  # would repeat the item pass per step


@torch.no_grad()
def test_iterative_kl_against_brute_force(tmp_path, one_thread):
    """Each step's KL is KL(original || the model with every layer removed so far and the candidate removed),
    recomputed here by converting copies and running the HF forward; steps resume from their files."""
    import copy

    m = tiny_model("llama", layers=5, seed=3)
    calib = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(4))
    hist = S.iterative_proxy(m, calib, 2, score="kl", batch=2, out_dir=tmp_path, progress=False)
    base = torch.log_softmax(m(calib).logits.float(), -1)

    def kl_without(layers):
        v = copy.deepcopy(m)
        lb.convert(v, lb.LayerPlan(tuple(LayerSpec("none") if i in layers else LayerSpec("softmax") for i in range(5))))
        lp = torch.log_softmax(v(calib).logits.float(), -1)
        return (base.exp() * (base - lp)).sum(-1).mean().item()

    first = hist[0]["removed"]
    for i, v in hist[0]["scores"].items():
        assert v == pytest.approx(kl_without({i}), rel=1e-4, abs=1e-6)
    assert first == min(hist[0]["scores"], key=hist[0]["scores"].get)
    assert hist[1]["removed_before"] == [first] and first not in hist[1]["scores"]
    for i, v in hist[1]["scores"].items():
        assert v == pytest.approx(kl_without({first, i}), rel=1e-4, abs=1e-6)
    again = S.iterative_proxy(m, calib, 2, score="kl", batch=2, out_dir=tmp_path, progress=False)  # read back
    assert [h["removed"] for h in again] == [h["removed"] for h in hist]
    assert sorted(p.name for p in (tmp_path / "iterative_kl").iterdir()) == ["step_00.json", "step_01.json"]


@torch.no_grad()
def test_iterative_steps_resume_from_their_files_in_either_schema(tmp_path, one_thread):
    """A step file is read back, not re-measured: one rewritten in schema 1 ("drops") with other scores
    changes the next run's picks to those scores."""
    m = tiny_model("llama", layers=5, seed=3)
    calib = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(4))
    hist = S.iterative_proxy(m, calib, 2, score="kl", batch=2, out_dir=tmp_path, progress=False)
    f = tmp_path / "iterative_kl" / "step_00.json"
    saved = json.loads(f.read_text())
    other = max(saved["scores"], key=saved["scores"].get)  # the most sensitive layer, made the least
    fake = {k: (-1.0 if k == other else v) for k, v in saved["scores"].items()}
    f.write_text(json.dumps({"removed_before": [], "drops": fake, "n_calib": saved["n_calib"]}))
    again = S.iterative_proxy(m, calib, 1, score="kl", batch=2, out_dir=tmp_path, progress=False)
    assert int(other) != hist[0]["removed"] and again[0]["removed"] == int(other) and again[0]["score"] == -1.0


def test_schema1_analysis_reads_as_the_current_schema(tmp_path):
    """Schema 1 called every iterative score a "drop"; such a file loads with schema 2's names and ranks alike."""
    hist = [{"step": 0, "removed": 3, "score": 0.1, "scores": {"0": 0.9, "1": 0.2, "2": 0.5, "3": 0.1, "4": 0.3},
             "removed_before": []},
            {"step": 1, "removed": 1, "score": 0.25, "scores": {"0": 1.2, "1": 0.25, "2": 0.6, "4": 0.7},
             "removed_before": [3]}]
    dis = [{"step": 1, "one_shot": 4, "iterative": 1, "one_shot_score": 0.3, "iterative_score": 0.25}]
    res = {"schema_version": S.SCHEMA_VERSION, "n_layers": 5, "sensitivity": [0.0] * 5,
           "proxies": {"kl": [0.9, 0.2, 0.5, 0.1, 0.3], "cosine": [0.1] * 5},
           "iterative": {"score": "kl", "history": hist, "disagreements": dis}}
    old_names = {v: k for k, v in S.SCHEMA1_KEYS.items()}
    old = {**res, "schema_version": 1,
           "iterative": {"score": "kl", "history": [{old_names.get(k, k): v for k, v in h.items()} for h in hist],
                         "disagreements": [{old_names.get(k, k): v for k, v in d.items()} for d in dis]}}
    assert "drops" in old["iterative"]["history"][0] and "one_shot_drop" in old["iterative"]["disagreements"][0]
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(res))
    loaded = S.load_sensitivity(tmp_path / "old.json")
    assert loaded == S.load_sensitivity(tmp_path / "new.json") == res
    assert S.plan_scores(loaded, "kl") == S.iterative_scores(hist, 5)
    (tmp_path / "future.json").write_text(json.dumps({**res, "schema_version": 3}))
    with pytest.raises(S.AnalysisError, match="schema_version 1 or 2"):
        S.load_sensitivity(tmp_path / "future.json")


@torch.no_grad()
def test_iterative_cosine_against_hf_forward(tmp_path, one_thread):
    """Each step's score is 1 - cos(x, x + attn(x)) of every remaining layer in the model with the layers
    removed so far removed, recomputed here from hooks on a converted copy's HF forward."""
    import copy

    m = tiny_model("llama", layers=5, seed=5)
    calib = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(6))
    hist = S.iterative_proxy(m, calib, 3, score="cosine", batch=2, out_dir=tmp_path, progress=False)

    def cosines_without(removed):
        v = copy.deepcopy(m)
        lb.convert(v, lb.LayerPlan(tuple(LayerSpec("none") if i in removed else LayerSpec("softmax") for i in range(5))))
        got, xs = {}, {}
        hooks = [layer.register_forward_pre_hook(lambda mod, a, kw, i=i: xs.__setitem__(i, kw.get("hidden_states",
                 a[0] if a else None)), with_kwargs=True) for i, layer in enumerate(v.model.layers)]
        hooks += [layer.self_attn.register_forward_hook(lambda mod, a, out, i=i: got.__setitem__(
                  i, 1 - torch.nn.functional.cosine_similarity(xs[i], xs[i] + out[0], dim=-1).mean().item()))
                  for i, layer in enumerate(v.model.layers)]
        v(calib)
        for h in hooks:
            h.remove()
        return got

    removed = []
    for h in hist:
        ref = cosines_without(set(removed))
        assert h["removed_before"] == removed and set(h["scores"]) == set(range(5)) - set(removed)
        for i, val in h["scores"].items():
            assert val == pytest.approx(ref[i], rel=1e-4, abs=1e-6), (h["step"], i)
        assert h["removed"] == min(h["scores"], key=lambda i: (h["scores"][i], i))
        removed.append(h["removed"])
    first_alone = S.cosine_proxy(m, calib, batch=2)
    assert hist[1]["scores"] != {i: first_alone[i] for i in hist[1]["scores"]}  # re-measured, not the one-shot scores
    assert sorted(p.name for p in (tmp_path / "iterative_cosine").iterdir()) == [f"step_0{k}.json" for k in range(3)]


@torch.no_grad()
def test_window_costs_against_whole_converted_models(model, tok, tmp_path, one_thread):
    """kl_variants' per-layer KL equals KL computed from scratch on a model converted with that one layer changed; a
    window as long as the rows is exact (KL 0); long rows are contiguous novel text outside the held-out blocks."""
    import copy

    from layerboost.corpus import HELDOUT_BLOCK, is_heldout_block
    from layerboost.sensitivity.proxies import kl_variants, long_calibration_tokens
    from layerboost.sensitivity.store import Store

    calib = long_calibration_tokens(tok, n_seqs=2, seq_len=64)
    assert calib.shape == (2, 64) and not torch.equal(calib[0], calib[1])
    specs = [LayerSpec("none"), LayerSpec("swa", 8), LayerSpec("swa", 64)]
    store = Store(tmp_path, {"test": 1})
    got = kl_variants(model, calib, specs, batch=1, progress=False, store=store)
    base = torch.log_softmax(model(calib).logits.float(), -1)
    for i in (0, 2):
        for spec, name in zip(specs, ("none", "swa:8", "swa:64")):
            plan = lb.LayerPlan(tuple(spec if j == i else LayerSpec("softmax") for j in range(4)))
            m = copy.deepcopy(model)
            lb.convert(m, plan)
            lp = torch.log_softmax(m(calib).logits.float(), -1)
            ref = (base.exp() * (base - lp)).sum(-1).mean().item()
            assert got[name][i] == pytest.approx(ref, rel=1e-3, abs=1e-6)
    assert max(got["swa:64"]) < 1e-6 < min(got["swa:8"])
    # a rerun reads every layer back from the store instead of measuring
    assert kl_variants(model, calib, specs, batch=1, progress=False, store=store) == got
    from layerboost.data import resolve_data_dir

    first = sorted((resolve_data_dir(None) / "corpus" / "novels").glob("*.txt"))[0]
    where = first.read_bytes().find(tok.decode(calib[0, 8:40]).encode())
    assert where > 0 and not is_heldout_block(first.name, where // HELDOUT_BLOCK)
