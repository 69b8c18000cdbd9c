"""Engine targets: one record each (layerboost/targets.py); the kinds a target runs come from the kinds' records."""

import pytest

from layerboost import kinds as K
from layerboost.plan import LayerPlan, LayerSpec, PlanError, PlanPolicy, make_plan
from layerboost.targets import TARGETS, Target, by_format, register, target_problems, unregister


def plan_of(*specs):
    return LayerPlan(tuple(specs))


S, W8, W16, N = LayerSpec("softmax"), LayerSpec("swa", 8), LayerSpec("swa", 16), LayerSpec("none")


def test_a_target_runs_exactly_the_kinds_its_format_writes():
    for target in TARGETS.values():
        for name, record in K.KINDS.items():
            spec = LayerSpec(name, 8) if record.windowed else LayerSpec(name)
            problems = target.problems(plan_of(S, spec, S))
            writes = target.format is None or record.export_as(target.format) is not None
            assert (problems == []) == writes, (target.name, name, problems)
            if not writes:  # the advice is the kind's own
                assert problems == [f"layers [1] are {name}: " + record.refusal(target.format, target.kinds())]


def test_each_rule_is_the_records_flag():
    llama, hf, deci = TARGETS["llama.cpp"], TARGETS["transformers"], TARGETS["deci"]
    assert llama.problems(plan_of(N, S, S)) == [
        "layer 0 is none: llama.cpp reads head sizes from layer 0; keep attention there"]
    assert "keep one softmax layer" in " ".join(llama.problems(plan_of(W8, N, W8)))
    for t in (llama, hf):
        assert t.problems(plan_of(S, W8, W16)) == [f"the plan has several windows [8, 16]: {t.name} holds one "
                                                   "window per model; re-plan with one window"]
    assert deci.problems(plan_of(N, S, N)) == [] and TARGETS["layerboost"].problems(plan_of(N, W8, W16)) == []
    assert by_format("gguf") is llama and target_problems(plan_of(N, S), "deci") == []


def test_a_toy_target_is_one_record_and_every_planner_obeys_it():
    toy = Target("toy-engine", "transformers", one_window=True, attention_in_layer0=True)
    register(toy)
    try:
        with pytest.raises(ValueError, match="exists"):
            register(toy)
        scores = [0.1, 5.0, 0.2, 3.0]  # layer 0 least sensitive: the toy target still keeps attention there
        plan = make_plan(PlanPolicy(softmax=2, swa=2, none=0, window=8, target="toy-engine"), scores)
        assert plan[0].kind != "none" and plan.counts()["swa"] == 2
        with pytest.raises(PlanError, match="toy-engine"):  # it runs no none layer: the plan is refused, named
            make_plan(PlanPolicy(softmax=2, swa=1, none=1, window=8, target="toy-engine"), scores)
        assert PlanPolicy(softmax=2, swa=2, none=0, target="toy-engine").problems() == []
    finally:
        unregister("toy-engine")
    assert "toy-engine" not in TARGETS
    assert any("target 'toy-engine'" in p for p in PlanPolicy(softmax=2, swa=2, none=0, target="toy-engine").problems())
    with pytest.raises(ValueError, match="format 'onnx'"):
        register(Target("x", "onnx"))
