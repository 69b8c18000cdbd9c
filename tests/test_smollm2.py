"""End to end on the real embedded SmolLM2-135M-Instruct (loads from the installed wheel)."""

import json
import subprocess
import sys

import pytest
import torch

import layerboost as lb
from layerboost import LayerPlan

pytestmark = pytest.mark.slow

MIXED = ["softmax", "none", "swa"] * 10  # 10 none, 10 swa (window 64), 10 softmax


@pytest.fixture(scope="module")
def smol():
    return lb.load_model("smollm2-135m")


@torch.no_grad()
def test_convert_generate_save_reload(smol, tmp_path):
    model, tok = smol
    import copy

    m = copy.deepcopy(model)
    lb.convert(m, LayerPlan.from_kinds(MIXED, window=64))
    tok.padding_side = "left"
    enc = tok(["The capital of France is", "One, two, three,"], return_tensors="pt", padding=True)
    out = m.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, enc["input_ids"].shape[1] + 8)
    lb.save(m, tmp_path / "h", tokenizer=tok)
    r, rtok = lb.load_model(str(tmp_path / "h"))
    assert r.layerboost_plan == m.layerboost_plan
    x = enc["input_ids"]
    assert torch.equal(r(x, attention_mask=enc["attention_mask"]).logits, m(x, attention_mask=enc["attention_mask"]).logits)
    assert torch.equal(r.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id), out)
    # the saved hybrid drops the q/k/v/o and input norm of the 10 attention-free layers
    n_none = sum(p.numel() for i in range(1, 30, 3) for p in model.model.layers[i].self_attn.parameters())
    n_none += sum(model.model.layers[i].input_layernorm.weight.numel() for i in range(1, 30, 3))
    assert sum(p.numel() for p in r.parameters()) == sum(p.numel() for p in model.parameters()) - n_none


def test_cli_convert_and_generate(tmp_path):
    plan = LayerPlan.from_kinds(MIXED, window=64)
    plan.save(tmp_path / "plan.json")
    run = lambda *a: subprocess.run([sys.executable, "-m", "layerboost.cli", *a], capture_output=True, text=True)
    r = run("convert", "--model", "smollm2-135m", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "h"))
    assert r.returncode == 0, r.stderr
    assert "replaced attention in 20 of 30 layers" in r.stdout
    assert json.loads((tmp_path / "h" / "plan.json").read_text())["layers"][2] == {"kind": "swa", "window": 64}
    r = run("generate", "--model", str(tmp_path / "h"), "--prompt", "Hello", "--prompt", "Water is",
            "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("---") == 2
    bad = tmp_path / "bad.json"
    LayerPlan.uniform("none", 29).save(bad)
    r = run("convert", "--model", "smollm2-135m", "--plan", str(bad), "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and "29 layers but the model has 30" in r.stderr


@pytest.mark.slow
def test_the_embedded_model_is_named_alike_on_its_first_and_later_loads(tmp_path, monkeypatch):
    """The first load dequantises the embedded GGUF into the cache; every load names the model by that copy, so an
    output that records the model (an analysis, a heal's resume key) matches when the same command runs again."""
    monkeypatch.setenv("LAYERBOOST_CACHE", str(tmp_path / "cache"))
    first, tok1 = lb.load_model("smollm2-135m")
    again, tok2 = lb.load_model("smollm2-135m")
    assert first.config._name_or_path == again.config._name_or_path == tok1.name_or_path == tok2.name_or_path
    assert first.config._name_or_path.startswith(str(tmp_path / "cache"))
