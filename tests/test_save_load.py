import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import layerboost as lb
from layerboost import CheckpointError, LayerPlan
from layerboost.surgery import HYBRID_MODEL_TYPE

from conftest import tiny_model
from test_hybrid import activate_linear, ids


@pytest.fixture
def saved(tmp_path):
    m = tiny_model("llama")
    lb.convert(m, LayerPlan.from_kinds(["none", "swa", "linear_swa", "softmax"], window=8))
    activate_linear(m)
    lb.save(m, tmp_path / "hybrid")
    return m, tmp_path / "hybrid"


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_roundtrip_identical_logits(tmp_path, arch):
    m = tiny_model(arch)
    lb.convert(m, LayerPlan.from_kinds(["none", "swa", "linear_swa", "softmax"], window=8))
    activate_linear(m)
    m.save_pretrained(tmp_path / "h")  # the plain HF call works too
    assert not list(tmp_path.glob("h/*.bin")) and not list(tmp_path.glob("h/*.pt"))
    r = lb.load(tmp_path / "h")
    assert r.layerboost_plan == m.layerboost_plan
    x = ids()
    assert torch.equal(r(x).logits, m(x).logits)
    assert torch.equal(r.generate(x[:, :5], max_new_tokens=6, do_sample=False),
                       m.generate(x[:, :5], max_new_tokens=6, do_sample=False))


@torch.no_grad()
def test_bf16_roundtrip_keeps_dtype_and_logits(tmp_path):
    """A bf16 hybrid (every kind, trained-looking parameters) saves and loads in bf16 bit for bit; loading it as
    fp32 upcasts the same weights."""
    m = tiny_model("qwen2", layers=4)
    lb.convert(m, LayerPlan.from_kinds(["none", "swa", "linear_swa", "softmax"], window=8))
    activate_linear(m)
    torch.manual_seed(1)
    for p in m.model.layers[2].self_attn.parameters():  # linear_swa's own parameters leave their init too
        p.add_(0.1 * torch.randn_like(p))
    m = m.to(torch.bfloat16)
    lb.save(m, tmp_path / "h")
    r = lb.load(tmp_path / "h")
    assert {p.dtype for p in r.parameters()} == {torch.bfloat16}
    assert r.state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), m.state_dict().values()))
    x = ids()
    # `m.to(bf16)` also rounded its rotary table (a buffer) to bf16, the loaded model keeps it in fp32 as
    # transformers builds it: logits agree to bf16 precision, not bit for bit
    torch.testing.assert_close(r(x).logits.float(), m(x).logits.float(), atol=3e-2, rtol=3e-2)
    assert torch.equal(lb.load(tmp_path / "h")(x).logits, r(x).logits)
    up = lb.load(tmp_path / "h", dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), up.named_parameters()):
        assert n1 == n2 and p2.dtype == torch.float32 and torch.equal(p1.float(), p2)


def test_plan_json_written(saved):
    _, d = saved
    assert LayerPlan.load(d / "plan.json").kinds == ["none", "swa", "linear_swa", "softmax"]
    assert json.loads((d / "config.json").read_text())["layerboost_plan"]["layers"][1] == {"kind": "swa", "window": 8}


def test_corrupt_weights(saved):
    _, d = saved
    (d / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        lb.load(d)


def test_missing_weights_file(saved):
    _, d = saved
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        lb.load(d)


def test_mismatched_weights(saved):
    _, d = saved
    state = load_file(d / "model.safetensors")
    del state["model.layers.2.self_attn.gate"]
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        lb.load(d)
    assert "model.layers.2.self_attn.gate" in str(e.value) and "model.layers.0.self_attn.q_proj.weight" in str(e.value)


def test_mismatched_plan(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["layerboost_plan"]["layers"][0] = {"kind": "softmax"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing weights"):
        lb.load(d)


def test_plain_model_folder_is_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="plain transformers model"):
        lb.load(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no config.json"):
        lb.load(tmp_path)


@pytest.mark.slow
def test_plain_transformers_refuses_a_saved_hybrid(saved, tmp_path):
    """config.json names a model_type of its own, so transformers stops (naming layerboost.load) instead of
    building a Llama with random weights in the changed layers; checked in a process without layerboost."""
    import os
    import subprocess
    import sys

    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == HYBRID_MODEL_TYPE and cfg["architectures"] == ["LayerboostHybridForCausalLM"]
    assert cfg["layerboost_model_type"] == "llama" and cfg["layerboost_architectures"] == ["LlamaForCausalLM"]
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\nexcept ValueError as e:\n    print(e)\n"
            "else:\n    print('LOADED')\nassert 'layerboost' not in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LOADED" not in res.stdout and "layerboost.load" in res.stdout


@torch.no_grad()
def test_load_reads_tagged_and_older_folders(saved, tmp_path):
    m, d = saved
    x = ids()
    assert torch.equal(lb.load(d)(x).logits, m(x).logits)
    # a folder from before the tag: the base model_type next to the plan
    old = tmp_path / "old"
    old.mkdir()
    for f in d.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((old / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = cfg.pop("layerboost_model_type"), cfg.pop("layerboost_architectures")
    (old / "config.json").write_text(json.dumps(cfg))
    r = lb.load(old)
    assert r.config.model_type == "llama" and r.layerboost_plan == m.layerboost_plan
    assert torch.equal(r(x).logits, m(x).logits)
