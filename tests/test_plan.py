import json

import pytest

from layerboost import LayerPlan, LayerSpec, PlanError


def test_roundtrip_json(tmp_path):
    plan = LayerPlan.from_kinds(["softmax", "swa", "linear_swa", "none"], window=16)
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["schema_version"] == 1
    assert data["layers"][1] == {"kind": "swa", "window": 16}
    assert "window" not in data["layers"][0]
    assert LayerPlan.load(tmp_path / "p.json") == plan
    assert plan.counts() == {"softmax": 1, "swa": 1, "linear_swa": 1, "none": 1}


def test_every_problem_reported_at_once():
    with pytest.raises(PlanError) as e:
        LayerPlan((LayerSpec("mlp"), LayerSpec("swa", 0), LayerSpec("swa"), LayerSpec("none", 8)), num_layers=5)
    msg = str(e.value)
    assert "unknown kind 'mlp'" in msg and "softmax, swa, linear_swa, none" in msg
    assert "window must be > 0" in msg
    assert "needs an integer 'window'" in msg
    assert "takes no 'window'" in msg
    assert "4 layers but the model has 5" in msg


def test_from_dict_errors():
    with pytest.raises(PlanError, match="schema_version 7"):
        LayerPlan.from_dict({"schema_version": 7, "layers": ["softmax"]})
    with pytest.raises(PlanError, match="unknown field"):
        LayerPlan.from_dict({"layers": [{"kind": "swa", "window": 4, "size": 3}]})
    with pytest.raises(PlanError, match="'layers' list"):
        LayerPlan.from_dict(["softmax"])
    assert LayerPlan.from_dict({"layers": ["none", {"kind": "swa", "window": 3}]}).kinds == ["none", "swa"]


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        LayerPlan.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        LayerPlan.load(tmp_path / "bad.json")


def test_table_lists_layers():
    t = LayerPlan.from_kinds(["softmax", "swa"], window=8).table(scores=[0.5, 0.25])
    assert "swa" in t and "0.2500" in t and "total: 1 softmax, 1 swa" in t


def test_target_llama_cpp_keeps_attention_in_layer_0_and_refuses_what_it_cannot_run():
    from layerboost.plan import PlanError, PlanPolicy, make_plan, target_problems

    scores = [0.0, 5.0, 4.0, 3.0, 2.0, 1.0]  # layer 0 the least sensitive: the plain ranking drops its attention
    free = make_plan(PlanPolicy("counts", softmax=2, swa=2, none=2, window=8), scores)
    assert free.layers[0].kind == "none"
    assert target_problems(free, "llama.cpp") == [
        "layer 0 is none: llama.cpp reads head sizes from layer 0; keep attention there"]
    served = make_plan(PlanPolicy("counts", softmax=2, swa=2, none=2, window=8, target="llama.cpp"), scores)
    assert [s.kind for s in served.layers] == ["softmax", "softmax", "swa", "swa", "none", "none"]
    assert target_problems(served, "llama.cpp") == []
    with pytest.raises(PlanError, match="runs no linear_swa"):
        make_plan(PlanPolicy("counts", softmax=2, swa=2, none=2, kind="linear_swa", target="llama.cpp"), scores)
    with pytest.raises(PlanError, match="no layer without attention"):
        make_plan(PlanPolicy("counts", softmax=2, swa=2, none=2, target="transformers"), scores)
    ok = make_plan(PlanPolicy("counts", softmax=3, swa=3, none=0, target="transformers"), scores)
    assert {s.kind for s in ok.layers} == {"softmax", "swa"}
    with pytest.raises(PlanError, match="target 'vllm' must be one of"):
        make_plan(PlanPolicy("counts", softmax=3, swa=3, none=0, target="vllm"), scores)


def test_a_plan_whose_layers_are_not_a_list_is_one_clear_error():
    for bad in ({"schema_version": 1, "layers": None}, {"schema_version": 1, "layers": "swa"}, {"layers": 3}, []):
        with pytest.raises(PlanError, match="a JSON object with a 'layers' list"):
            LayerPlan.from_dict(bad)
