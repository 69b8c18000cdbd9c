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
