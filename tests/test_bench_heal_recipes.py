"""scripts/bench_heal_recipes.py: recipe parsing, the plan variants, the time-to-target and equal-time
interpolation (against hand-computed values), and a smoke run of the whole script."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import layerboost as lb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_heal_recipes as B  # noqa: E402


def test_parse_recipe():
    assert B.parse_recipe("current") == ("current", {})
    assert B.parse_recipe("x:lr=3e-3,tokens=67k,attn_distill=false") == (
        "x", {"lr": 3e-3, "tokens": "67k", "attn_distill": False})
    assert B.parse_recipe("y:lora_targets=q_proj;v_proj") == ("y", {"lora_targets": ["q_proj", "v_proj"]})
    with pytest.raises(SystemExit, match="not key=value"):
        B.parse_recipe("z:lr")
    with pytest.raises(SystemExit, match="unknown recipe"):
        B.parse_recipe("nosuch")


def test_recipe_plan_replaces_only_none_layers():
    plan = lb.LayerPlan.from_kinds(["softmax", "swa", "none"] * 2, window=8)
    assert B.recipe_plan(plan, None) is plan
    same = B.recipe_plan(plan, "none")
    assert same.kinds == plan.kinds and same.layers[1].window == 8


def test_time_to_target_and_kl_at_equal_time():
    pts = [{"kl": 1.0, "train_s": 0.0}, {"kl": 0.5, "train_s": 10.0}, {"kl": 0.25, "train_s": 30.0}]
    assert B.time_to(pts, 1.0) == 0.0
    # linear in log KL: 0.5 -> 0.25 over 10 -> 30 s; sqrt(0.5 * 0.25) is half way in log terms
    assert B.time_to(pts, math.sqrt(0.125)) == pytest.approx(20.0)
    assert B.time_to(pts, 0.2) is None  # never reached
    assert B.kl_at(pts, 5.0) == pytest.approx(math.sqrt(0.5))
    assert B.kl_at(pts, 100.0) == 0.25  # after the run ended: its last KL


@pytest.mark.slow
def test_smoke_run_writes_the_record(tmp_path):
    out = tmp_path / "r"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_heal_recipes.py"), "--smoke", "--threads", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads((out / "recipes.json").read_text())
    assert set(rec["results"]) == {"current", "block"} and (out / "recipes.png").stat().st_size > 0
    cur = rec["summary"]["recipes"]["current"]
    assert cur["time_ratio_vs_current"] == 1.0 and cur["final_kl"] == rec["summary"]["target_kl"]
    assert "target: held-out KL" in res.stdout
