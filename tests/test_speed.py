"""The speed model (layerboost/speed.py) and the target planner (plan.plan_by_target): fits against known costs,
the engine's cache geometry, the exact placement against brute force, constraints and refusals, the CLI."""

import itertools
import json
import random
from pathlib import Path

import pytest

from layerboost import speed as S
from layerboost.plan import (LayerPlan, LayerSpec, PlanError, PlanPolicy, _placements, frontier, plan_by_target,
                             summed_cost)

RECORDED = Path(__file__).resolve().parents[1] / "docs" / "speed-model-smollm2-135m"
TRUE = {"arch:llama": 0.020, "arch:deci": 0.021, "arch:granite_swa": 0.0215, "attn": 5e-4, "tok": 1e-7, "cell": 5e-8}


def true_tok_s(plan, depth, geometry=S.Geometry("llama.cpp")):
    return 1 / sum(TRUE[k] * v for k, v in geometry.features(plan, depth).items())


def synthetic_records(noise=0.0, seed=0):
    rnd = random.Random(seed)
    return [{"name": name, "plan": p.to_dict(), "depth": d + 16, "bench_depth": d, "parallel": 1,
             "tok_s": true_tok_s(p, d + 16) * (1 + rnd.gauss(0, noise))}
            for name, p in S.calibration_plans(30, "llama.cpp").items() for d in (0, 1024, 2048, 4096, 8192)]


def test_fit_recovers_the_costs_and_predicts_plans_it_never_saw():
    model = S.SpeedModel.fit("llama.cpp", {"engine": "llama.cpp"}, S.Geometry("llama.cpp"), synthetic_records())
    for k, v in TRUE.items():
        assert model.coef["1"][k] == pytest.approx(v, rel=1e-6)
    noisy = S.SpeedModel.fit("llama.cpp", {"engine": "llama.cpp"}, S.Geometry("llama.cpp"), synthetic_records(0.01))
    for name, plan in S.validation_plans(30).items():
        assert name and all(S.LayerPlan.from_dict(plan.to_dict()) == plan for _ in [0])
        for d in (1024, 4096, 8192):
            assert noisy.tok_s(plan, d) == pytest.approx(true_tok_s(plan, d), rel=0.02)
    assert not set(map(str, S.validation_plans(30).values())) & set(map(str, S.calibration_plans(30, "llama.cpp").values()))


def test_fit_keeps_costs_non_negative_and_refuses_too_few_measurements():
    recs = synthetic_records()
    for r in recs:  # a machine where masked cells cost nothing: the fit must not go negative to absorb noise
        plan = LayerPlan.from_dict(r["plan"])
        f = S.Geometry("llama.cpp").features(plan, r["depth"])
        r["tok_s"] = 1 / sum(TRUE[k] * v for k, v in f.items() if k != "cell") * (1 + 0.003 * (hash(r["name"]) % 3 - 1))
    model = S.SpeedModel.fit("llama.cpp", {"engine": "llama.cpp"}, S.Geometry("llama.cpp"), recs)
    assert all(v >= 0 for k, v in model.coef["1"].items() if not k.startswith("arch:"))
    with pytest.raises(S.SpeedModelError, match="cannot fit"):
        S.SpeedModel.fit("llama.cpp", {"engine": "llama.cpp"}, S.Geometry("llama.cpp"), recs[:5])
    with pytest.raises(S.SpeedModelError, match="--parallel 4"):
        model.tok_s(LayerPlan.uniform("softmax", 30), 1024, parallel=4)


def test_llama_cpp_geometry_matches_its_cache_sizes():
    g = S.Geometry("llama.cpp")
    swa64, swa1024, full, none = LayerSpec("swa", 64), LayerSpec("swa", 1024), LayerSpec("softmax"), LayerSpec("none")
    # llama.cpp's window cache: PAD256(W * n_seq + n_ubatch) cells (768 for W = 64, 1536 for W = 1024)
    assert g.kv_cells(swa64, 4096) == 768 and g.kv_cells(swa1024, 8192) == 1536 and g.kv_cells(swa64, 300) == 512
    assert g.kv_cells(full, 4096) == 4096 and g.kv_cells(none, 4096) == 0
    assert g.scanned(swa64, 4096, 1) == 768 and g.read(swa64, 4096) == 64 and g.scanned(full, 1000, 1) == 1024
    exact = S.Geometry("layerboost", cells=False)
    assert exact.kv_cells(swa64, 4096) == 64 and "cell" not in exact.features(LayerPlan((swa64,)), 100)
    assert g.features(LayerPlan((full, swa64, none)), 2000) == {"arch:deci": 1.0, "attn": 2.0, "tok": 2064.0,
                                                                   "cell": 2048.0 + 768.0}


def test_model_saves_loads_and_caches_by_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERBOOST_CACHE", str(tmp_path))
    key = {"engine": "llama.cpp", "machine": {"cpu": "x"}, "type": "f32"}
    model = S.SpeedModel.fit("llama.cpp", key, S.Geometry("llama.cpp"), synthetic_records())
    assert S.cached(key) is None
    model.save(S.key_path(key))
    again = S.cached(key)
    plan = S.validation_plans(30)["5/25 w512"]
    assert again.tok_s(plan, 4096) == model.tok_s(plan, 4096)
    assert S.cached({**key, "type": "f16"}) is None
    with pytest.raises(S.SpeedModelError, match="calibrate it first with `layerboost speed calibrate`"):
        S.require({**key, "type": "f16"}, "layerboost speed calibrate")


# ---- the recorded calibration of this project's machine ------------------------------------------------------


@pytest.mark.skipif(not (RECORDED / "calibration.json").is_file(), reason="no recorded calibration")
def test_recorded_calibration_predicts_the_recorded_held_out_plans():
    fitted = S.SpeedModel.load(RECORDED / "calibration.json")
    check = json.loads((RECORDED / "check.json").read_text())
    base = LayerPlan.uniform("softmax", 30)
    rows = S.check_against(fitted, check["records"], base)
    held = [r for r in rows if r["name"] != "base"]
    assert len({r["name"] for r in held}) >= 5 and {1024, 4096, 8192} <= {r["depth"] for r in held}
    for r, rec in zip(rows, check["rows"]):  # the committed table is what the committed fit predicts
        assert r["predicted"] == pytest.approx(rec["predicted"], rel=1e-9)
    assert max(abs(r["error"]) for r in held) == pytest.approx(max(abs(r["error"]) for r in check["rows"]
                                                                   if r["name"] != "base"))


# ---- the planner ------------------------------------------------------------------------------------------------


def random_costs(n, windows=(64, 256, 1024), seed=0):
    rnd = random.Random(seed)
    return {"none": [rnd.random() for _ in range(n)],
            **{f"swa:{w}": [rnd.random() * (64 / w) ** 0.5 for _ in range(n)] for w in windows}}


def test_placement_is_the_least_cost_assignment_for_every_count():
    n, costs = 6, random_costs(6, (64,), seed=3)
    got = {(p.counts()["softmax"], p.counts()["swa"]): loss for loss, p in _placements(costs, n, 64, True)}
    brute = {}
    for kinds in itertools.product(("softmax", "swa", "none"), repeat=n):
        if kinds[0] == "none":
            continue
        loss = sum(0 if k == "softmax" else costs["swa:64" if k == "swa" else "none"][i] for i, k in enumerate(kinds))
        key = (kinds.count("softmax"), kinds.count("swa"))
        brute[key] = min(brute.get(key, float("inf")), loss)
    for loss, plan in _placements(costs, n, 64, True):  # the planner's loss of any plan is its summed cost
        assert summed_cost(plan, costs) == pytest.approx(loss)
    assert summed_cost(LayerPlan.from_kinds(["softmax", "swa"] + ["none"] * 4, window=128), costs) is None
    assert got.keys() == brute.keys()
    for k in brute:
        assert got[k] == pytest.approx(brute[k])


@pytest.fixture
def fitted():
    return S.SpeedModel.fit("llama.cpp", {"engine": "llama.cpp"}, S.Geometry("llama.cpp"), synthetic_records())


def test_target_pick_meets_the_speed_at_least_loss(fitted):
    costs = random_costs(30)
    for target in (1.3, 1.5, 1.9):
        pol = PlanPolicy("speed", speedup=target, context=4096, target="llama.cpp")
        pick, front = plan_by_target(costs, pol, fitted)
        assert pick.speedup >= target and pick.plan.kinds[0] != "none"
        assert pick.speedup == pytest.approx(fitted.speedup(pick.plan, LayerPlan.uniform("softmax", 30), 4096))
        assert all(p.loss >= pick.loss - 1e-12 for p in front if p.speedup >= target)
        assert [p.speedup for p in front] == sorted(p.speedup for p in front)
    slow = plan_by_target(costs, PlanPolicy("speed", speedup=1.3, context=4096, target="llama.cpp"), fitted)[0]
    fast = plan_by_target(costs, PlanPolicy("speed", speedup=1.9, context=4096, target="llama.cpp"), fitted)[0]
    assert slow.loss < fast.loss


def test_stock_build_never_mixes_windows_with_none_and_kv_budget_holds(fitted):
    costs = random_costs(30)
    pol = PlanPolicy("speed", speedup=1.5, context=4096, target="llama.cpp", build="stock")
    pick, front = plan_by_target(costs, pol, fitted)
    assert all(not ({"swa", "none"} <= set(p.plan.kinds)) for p in front)
    patched = plan_by_target(costs, PlanPolicy("speed", speedup=1.5, context=4096, target="llama.cpp"), fitted)[0]
    assert patched.loss <= pick.loss
    kv = plan_by_target(costs, PlanPolicy("speed", kv_budget=0.3, context=4096, target="llama.cpp"), fitted)[0]
    assert kv.kv <= 0.3 and kv.speedup is not None
    only_kv = plan_by_target(costs, PlanPolicy("speed", kv_budget=0.5, context=4096), None)[0]  # layerboost: exact tokens
    assert only_kv.kv <= 0.5 and only_kv.speedup is None


def test_unreachable_targets_and_unmeasured_windows_are_refused(fitted):
    costs = random_costs(30)
    with pytest.raises(PlanError, match=r"no plan reaches 9x .* the largest reachable is 2\.\d\dx"):
        plan_by_target(costs, PlanPolicy("speed", speedup=9, context=4096, target="llama.cpp"), fitted)
    with pytest.raises(PlanError, match=r"largest reachable is 1\.\d\dx"):  # at no context, only projections to save
        plan_by_target(costs, PlanPolicy("speed", speedup=2, context=1, target="llama.cpp"), fitted)
    with pytest.raises(PlanError, match=r"window\(s\) \[512\] were not measured"):
        plan_by_target(costs, PlanPolicy("speed", speedup=1.2, context=4096, target="llama.cpp", windows=[512]), fitted)
    with pytest.raises(PlanError, match="analyze with --windows"):
        plan_by_target({}, PlanPolicy("speed", speedup=1.2, context=4096, target="llama.cpp"), fitted)
    assert "needs speedup" in " ".join(PlanPolicy("speed").problems())
    assert "build stock applies to target llama.cpp" in " ".join(PlanPolicy("speed", speedup=1.2, build="stock").problems())


def test_frontier_keeps_only_undominated_picks():
    from layerboost.plan import Pick

    plan = LayerPlan.uniform("softmax", 2)
    picks = [Pick(plan, 1.0, 1.5, 1), Pick(plan, 2.0, 1.4, 1), Pick(plan, 0.5, 1.2, 1), Pick(plan, 3.0, 2.0, 1)]
    assert [(p.loss, p.speedup) for p in frontier(picks)] == [(0.5, 1.2), (1.0, 1.5), (3.0, 2.0)]


def test_cli_plan_by_speed(tmp_path, monkeypatch, fitted, capsys):
    from layerboost.cli import main
    from layerboost.models import model_config

    monkeypatch.setenv("LAYERBOOST_CACHE", str(tmp_path / "cache"))
    config = model_config("smollm2-135m")
    monkeypatch.setattr(S, "llama_cpp_build", lambda: {"version": "test", "patch": None})
    key = S.llama_cpp_key(config, "f32", 2)
    S.SpeedModel(fitted.engine, key, fitted.geometry, fitted.coef, fitted.records).save(S.key_path(key))
    sens = {"schema_version": 2, "n_layers": 30, "sensitivity": [0.0] * 30, "layers": [], "model": "smollm2-135m",
            "window_costs": {"calibration": {"length": 2048}, "windows": [64, 256, 1024], "kl": random_costs(30)}}
    (tmp_path / "s.json").write_text(json.dumps(sens))
    argv = ["plan", "--sensitivity", str(tmp_path / "s.json"), "--model", "smollm2-135m", "--target", "llama.cpp",
            "--context", "4096", "--out", str(tmp_path / "p.json"), "--score", "drop", "--ranking", "one-shot"]
    assert main(argv + ["--speedup", "1.5"]) == 0
    out = capsys.readouterr().out
    assert "<- picked" in out and "predicted at 4096 tokens (llama.cpp)" in out
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["predicted"]["speedup"] >= 1.5 and len(saved["layers"]) == 30
    assert main(argv[:-2] + ["--out", str(tmp_path / "q.json"), "--speedup", "7"]) == 2
    assert "the largest reachable is" in capsys.readouterr().err
    assert main(argv[:-2] + ["--out", str(tmp_path / "r.json"), "--speedup", "1.5", "--gguf-type", "q8_0"]) == 2
    assert "layerboost speed calibrate --model smollm2-135m --type q8_0" in capsys.readouterr().err


def test_layerboost_engine_calibration_on_a_tiny_model(tmp_path, monkeypatch, one_thread):
    """The layerboost-engine calibration measures every calibration plan at every depth, fits and caches; the fitted
    model then predicts a plan it never saw (no accuracy claim: tiny models time mostly overhead)."""
    from conftest import tiny_model

    monkeypatch.setenv("LAYERBOOST_CACHE", str(tmp_path))
    model = tiny_model("llama", layers=4)
    fitted = S.calibrate_layerboost(model, depths=(0, 64, 128), rounds=1, log=lambda m: None)
    assert {r["name"] for r in fitted.records} == {"base", "none", "swa64", "swa1024"}
    assert len(fitted.records) == 12 and all(r["tok_s"] > 0 for r in fitted.records)
    assert S.cached(S.layerboost_key(model.config, "float32", device="cpu")) is not None
    plan = LayerPlan.from_kinds(["softmax", "swa", "none", "softmax"], window=16)
    assert fitted.tok_s(plan, 100) > 0 and "cell" not in fitted.coef["1"]


def test_speed_check_never_writes_over_a_file_it_did_not_make(tmp_path, capsys):
    from layerboost.cli import main

    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}\n')
    assert main(["speed", "check", "--model", "smollm2-135m", "--out", str(mine)]) == 2
    assert "error:" in capsys.readouterr().err and mine.read_text() == '{"mine": 1}\n'


def test_keep_retrieval_keeps_the_retrieving_layers_softmax_in_every_policy(fitted):
    from layerboost.plan import make_plan

    costs, n = random_costs(30), 30
    retrieval = [0.0] * n
    retrieval[7], retrieval[19], retrieval[25] = 3.0, 2.0, 1.0  # layers 7, 19 retrieve; 25 next
    pol = PlanPolicy("speed", speedup=1.5, context=4096, target="llama.cpp", keep_retrieval=2)
    pick, _ = plan_by_target(costs, pol, fitted, retrieval=retrieval)
    free = plan_by_target(costs, PlanPolicy("speed", speedup=1.5, context=4096, target="llama.cpp"), fitted)[0]
    assert pick.plan.kinds[7] == pick.plan.kinds[19] == "softmax" and pick.speedup >= 1.5
    assert pick.loss >= free.loss - 1e-12 and pick.loss == pytest.approx(summed_cost(pick.plan, costs))
    scores = [float(i) for i in range(n)]  # the counts policy ranks 7 and 19 low: kept softmax all the same
    plan = make_plan(PlanPolicy("counts", softmax=3, swa=10, none=17, keep_retrieval=2), scores, retrieval=retrieval)
    assert plan.kinds[7] == plan.kinds[19] == "softmax" and plan.counts()["softmax"] == 3
    with pytest.raises(PlanError, match="analyze with --retrieval"):
        make_plan(PlanPolicy("counts", softmax=3, swa=10, none=17, keep_retrieval=2), scores)
    assert "keeps more softmax layers than the 1" in " ".join(
        PlanPolicy("counts", softmax=1, swa=10, none=19, keep_retrieval=2).problems())
    with pytest.raises(PlanError, match=r"layers \[7, 19\] retrieve most but the policy placed them"):
        make_plan(PlanPolicy("thresholds", softmax_above=100, none_below=0, keep_retrieval=2), scores,
                  retrieval=retrieval)


def test_llama_cpp_plans_keep_a_softmax_layer_beside_none_layers(fitted):
    """A deci file of swa and none layers only fails to create its context in llama.cpp (measured: pick-1.7 of the
    frontier, 0/22/8): the planner never places one for llama.cpp and export refuses one."""
    from layerboost.plan import target_problems

    costs = random_costs(30)
    for target in (1.7, 1.9, 2.1):
        pick, front = plan_by_target(costs, PlanPolicy("speed", speedup=target, context=4096, target="llama.cpp"),
                                     fitted)
        assert all("softmax" in p.plan.kinds for p in front if "none" in p.plan.kinds)
    bad = LayerPlan.from_kinds(["swa"] * 22 + ["none"] * 8, window=512)
    assert "keep one softmax layer" in " ".join(target_problems(bad, "llama.cpp"))
    assert target_problems(LayerPlan.from_kinds(["swa"] * 30, window=512), "llama.cpp") == []
    assert target_problems(bad, "layerboost") == []



def test_plan_gguf_files_are_named_by_the_plan_so_a_replaced_plan_is_written_again(tmp_path, monkeypatch):
    import layerboost.export_gguf as G
    from conftest import tiny_model

    written = []
    monkeypatch.setattr(G, "write_gguf", lambda m, tok, path, t: (written.append(path), Path(path).write_bytes(b"x")))
    model = tiny_model()
    n = model.config.num_hidden_layers
    first = LayerPlan.from_dict({"layers": [{"kind": "softmax"}] + [{"kind": "swa", "window": 8}] * (n - 1)})
    again = LayerPlan.from_dict({"layers": [{"kind": "softmax"}] + [{"kind": "swa", "window": 16}] * (n - 1)})
    a = S.write_plan_ggufs(model, None, {"pick": first}, tmp_path, "f32")["pick"]
    assert S.write_plan_ggufs(model, None, {"pick": first}, tmp_path, "f32")["pick"] == a and len(written) == 1
    b = S.write_plan_ggufs(model, None, {"pick": again}, tmp_path, "f32")["pick"]
    assert b != a and len(written) == 2 and b.name.startswith("pick-")
