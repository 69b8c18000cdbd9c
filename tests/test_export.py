"""Exports that load without layerboost: native transformers classes (checked in a process that never
imports layerboost) and the DeciLM / Nemotron-NAS block-config format (checked with a plain-torch reader
of that format written here, from config.json + safetensors only)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import layerboost as lb
from layerboost import LayerPlan, LayerSpec
from layerboost.export import ExportError, export

from conftest import ARCHS, tiny_model
from test_hybrid import ids, left_pad

W = 8  # window; prompts + generated tokens run well past it
KINDS = ["softmax", "swa", "swa", "softmax"]
NEW = 30


GEMMA_TYPES = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]


def hybrid(arch, kinds=KINDS, window=W):
    """gemma3: layers 1-2 slide natively (window 2W) and the plan narrows them to W: Gemma 3 picks a layer's
    rotary table by its type, so only plans that keep each layer's type export to its own class."""
    m = tiny_model(arch, layer_types=GEMMA_TYPES, window=2 * W) if arch == "gemma3" else tiny_model(arch)
    lb.convert(m, LayerPlan.from_kinds(kinds, window=window))
    return m


def deci_model(arch, tied, kinds=("none", "softmax", "none", "softmax")):
    """Tiny Llama / Mistral whose MLP width a DeciLM ffn_mult can express (hidden 64, intermediate 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa", pad_token_id=0,
                  tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    cfg = LlamaConfig(**common) if arch == "llama" else MistralConfig(**common, sliding_window=None)
    torch.manual_seed(3)
    m = (LlamaForCausalLM if arch == "llama" else MistralForCausalLM)(cfg).eval()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    lb.convert(m, LayerPlan.from_kinds(list(kinds)))
    return m


# What the process without layerboost does with each export: logits, greedy generation (plain and
# left-padded), and for deci folders the config as the engines read it (attributes of block_configs).
READER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    out = {}
    for name, job in jobs.items():
        inp = torch.load(job["inputs"])
        if job["kind"] == "transformers":
            m = AutoModelForCausalLM.from_pretrained(job["dir"]).eval()
            with torch.no_grad():
                gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=inp["new"])
                out[name] = dict(
                    cls=type(m).__name__, dtype=str(m.dtype),
                    logits=m(inp["x"]).logits,
                    greedy=m.generate(inp["x"][:, :5], attention_mask=torch.ones_like(inp["x"][:, :5]), **gen),
                    padded=m.generate(inp["padded"], attention_mask=inp["mask"], **gen))
        else:
            c = AutoConfig.from_pretrained(job["dir"], trust_remote_code=True)
            out[name] = dict(no_op=[b.attention.no_op for b in c.block_configs],
                             groups=[b.attention.n_heads_in_group for b in c.block_configs],
                             ffn_mult=[b.ffn.ffn_mult for b in c.block_configs],
                             has_ffn_mult=hasattr(c.block_configs[0].ffn, "ffn_mult"),
                             no_intermediate=not hasattr(c.block_configs[0].ffn, "intermediate_size"),
                             rope_theta=c.rope_theta)
    assert "layerboost" not in sys.modules, "the reader must not import layerboost"
    torch.save(out, sys.argv[2])
""")


def run_reader(jobs: dict, tmp) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    res = subprocess.run([sys.executable, "-c", READER, json.dumps(jobs), str(tmp / "out.pt")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(tmp / "out.pt")


@torch.no_grad()
def reference(m, x, padded, mask):
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=NEW)
    return dict(logits=m(x).logits,
                greedy=m.generate(x[:, :5], attention_mask=torch.ones_like(x[:, :5]), **gen),
                padded=m.generate(padded, attention_mask=mask, **gen))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every family exported (transformers format) and both deci exports, read back in one fresh process."""
    tmp = tmp_path_factory.mktemp("export")
    x = ids(length=24)
    padded, mask = left_pad([[5, 9, 13, 2, 7, 31, 4], [8, 3, 44]])
    torch.save(dict(x=x, padded=padded, mask=mask, new=NEW), tmp / "inputs.pt")
    jobs, refs, models = {}, {}, {}
    for arch in ARCHS:
        m = hybrid(arch)
        export(m, tmp / arch, format="transformers")
        jobs[arch] = dict(kind="transformers", dir=str(tmp / arch), inputs=str(tmp / "inputs.pt"))
        refs[arch] = reference(m, x, padded, mask)
    for arch, tied in (("llama", True), ("mistral", False)):
        name = f"deci-{arch}"
        models[name] = m = deci_model(arch, tied)
        export(m, tmp / name, format="deci")
        jobs[name] = dict(kind="deci", dir=str(tmp / name), inputs=str(tmp / "inputs.pt"))
    return tmp, refs, models, run_reader(jobs, tmp)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_export_matches_in_plain_transformers(exported, arch):
    tmp, refs, _, got = exported
    ref, out = refs[arch], got[arch]
    cfg = json.loads((tmp / arch / "config.json").read_text())
    assert out["cls"] == {"llama": "MinistralForCausalLM", "mistral": "MinistralForCausalLM",
                          "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[arch]
    assert cfg["sliding_window"] == W and "layerboost_plan" not in cfg
    assert cfg["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert out["dtype"] == "torch.float32"
    assert (out["logits"] - ref["logits"]).abs().max() <= 1e-5
    assert torch.equal(out["greedy"], ref["greedy"]) and out["greedy"].shape[1] == 5 + NEW  # 35 tokens > W
    assert torch.equal(out["padded"], ref["padded"])


def test_window_really_matters_in_the_export(exported):
    """A no-op window could not tell W from full attention: the same weights with full attention differ."""
    tmp, refs, _, _ = exported
    from transformers import AutoModelForCausalLM, MinistralConfig

    cfg = MinistralConfig.from_pretrained(tmp / "llama")
    cfg.layer_types = ["full_attention"] * 4
    full = AutoModelForCausalLM.from_pretrained(tmp / "llama", config=cfg).eval()
    with torch.no_grad():
        assert (full(ids(length=24)).logits - refs["llama"]["logits"]).abs().max() > 1e-2


# ---- deci: an independent reader of the format ------------------------------------------------------------


def read_deci(folder):
    cfg = json.loads((folder / "config.json").read_text())
    weights = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(f))
    return cfg, weights


def deci_logits(cfg, w, x):
    """DeciLM forward from the format's rules: per block, attention unless no_op (GQA with n_heads_in_group,
    RoPE from rope_theta, causal softmax), then the gated MLP of width ffn_mult * 2/3 * hidden rounded up to
    a multiple of 256 unless no_op; pre-norm RMSNorm residual blocks; tied head if tie_word_embeddings."""
    hidden, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd, (b, t) = hidden // nh, x.shape
    assert cfg["rope_scaling"] is None

    def norm(h, weight):
        return weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])

    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)  # fp32, as the engines do
    angles = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(v):  # (B, heads, T, hd)
        return v * cos + torch.cat([-v[..., hd // 2:], v[..., :hd // 2]], -1) * sin

    h = w["model.embed_tokens.weight"][x]
    for i, block in enumerate(cfg["block_configs"]):
        p, att, ffn = f"model.layers.{i}.", block["attention"], block["ffn"]
        if not att["no_op"]:
            nkv = nh // att["n_heads_in_group"]
            y = norm(h, w[p + "input_layernorm.weight"])
            q = (y @ w[p + "self_attn.q_proj.weight"].T).view(b, t, nh, hd).transpose(1, 2)
            k = (y @ w[p + "self_attn.k_proj.weight"].T).view(b, t, nkv, hd).transpose(1, 2)
            v = (y @ w[p + "self_attn.v_proj.weight"].T).view(b, t, nkv, hd).transpose(1, 2)
            q, k = rope(q), rope(k)
            k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
            s = (q @ k.transpose(-1, -2)) / hd ** 0.5
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, nh * hd)
            h = h + o @ w[p + "self_attn.o_proj.weight"].T
        if not ffn["no_op"]:
            width = int(2 * ffn["ffn_mult"] * hidden / 3)
            width += (256 - width % 256) % 256
            y = norm(h, w[p + "post_attention_layernorm.weight"])
            gate = y @ w[p + "mlp.gate_proj.weight"].T
            assert gate.shape[-1] == width
            h = h + (F.silu(gate) * (y @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    h = norm(h, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return h @ head.T


@pytest.mark.parametrize("name", ["deci-llama", "deci-mistral"])
def test_deci_export_read_back_independently(exported, name):
    tmp, _, models, got = exported
    m, folder = models[name], tmp / name
    cfg, w = read_deci(folder)
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    # per-layer kinds
    assert [b["attention"]["no_op"] for b in cfg["block_configs"]] == [True, False, True, False]
    assert all(b["attention"]["window_length"] is None for b in cfg["block_configs"])
    assert {b["attention"]["n_heads_in_group"] for b in cfg["block_configs"] if not b["attention"]["no_op"]} == {2}
    assert all(b["ffn"] == {"no_op": False, "replace_with_linear": False, "sparsify": None, "ffn_mult": 6.0}
               for b in cfg["block_configs"])
    # weights: exactly the model's, none layers without attention or input norm, no tied duplicate
    state = m.state_dict()
    expected = {k for k in state if not (k == "lm_head.weight" and cfg["tie_word_embeddings"])}
    assert set(w) == expected
    assert not any(k.startswith(("model.layers.0.self_attn", "model.layers.0.input_layernorm")) for k in w)
    assert all(torch.equal(w[k], state[k]) for k in w)
    # logits and greedy continuation (full recompute per token) equal the layerboost model's
    x = ids(length=24)
    with torch.no_grad():
        ref = m(x).logits
        assert (deci_logits(cfg, w, x) - ref).abs().max() <= 1e-5
        seq = x[:, :5]
        for _ in range(12):
            seq = torch.cat([seq, deci_logits(cfg, w, seq)[:, -1:].argmax(-1)], 1)
        assert torch.equal(seq, m.generate(x[:, :5], max_new_tokens=12, do_sample=False, pad_token_id=0,
                                           eos_token_id=None))
    # the shipped config class gives engines attribute access, in a process without layerboost
    read = got[name]
    assert read["no_op"] == [True, False, True, False] and read["groups"] == [None, 2, None, 2]
    assert read["ffn_mult"] == [6.0] * 4 and read["has_ffn_mult"] and read["no_intermediate"]
    assert read["rope_theta"] == 5000.0


# ---- refusals: one clear line each, nothing written --------------------------------------------------------


def refused(m, tmp_path, fmt, match):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=match) as e:
        export(m, out, format=fmt)
    assert not out.exists() and not list(tmp_path.glob(".out.*.part"))
    return str(e.value)


def test_refuses_several_windows(tmp_path):
    m = tiny_model("llama")
    lb.convert(m, LayerPlan((LayerSpec("swa", 8), LayerSpec("swa", 16), LayerSpec("softmax"), LayerSpec("softmax"))))
    msg = refused(m, tmp_path, "transformers", r"several windows \[8, 16\]")
    assert "\n" not in msg


def test_refuses_linear_swa(tmp_path):
    m = hybrid("llama", ["softmax", "linear_swa", "swa", "softmax"])
    refused(m, tmp_path, "transformers", r"layers \[1\] are linear_swa.*re-plan those layers as swa or softmax")
    m = tiny_model("llama")
    lb.convert(m, LayerPlan((LayerSpec("softmax"), LayerSpec("linear_swa", 8), LayerSpec("none"),
                             LayerSpec("softmax"))))
    refused(m, tmp_path, "deci", r"layers \[1\] are linear_swa")


def test_refuses_none_in_transformers_format(tmp_path):
    refused(hybrid("qwen3", ["none", "swa", "swa", "softmax"]), tmp_path, "transformers",
            r"layers \[0\] are none.*use --format deci")


def test_refuses_window_one(tmp_path):
    refused(hybrid("llama", window=1), tmp_path, "transformers", "window 1 cannot be exported")


def test_deci_refusals(tmp_path):
    # swa: no engine reading the format applies window_length
    refused(hybrid("llama", ["softmax", "swa", "softmax", "softmax"]), tmp_path, "deci",
            r"layers \[1\] are swa: the deci format's window_length is ignored")
    # an MLP width ffn_mult cannot express (intermediate 128 < 256), Qwen's biases / norms
    refused(hybrid("llama", ["none", "softmax", "softmax", "softmax"]), tmp_path, "deci", "intermediate_size 128")
    refused(hybrid("qwen2", ["none", "softmax", "softmax", "softmax"]), tmp_path, "deci",
            "format 'deci' exports model_type llama, mistral, not 'qwen2'; use --format transformers")


def test_gemma3_refuses_a_change_of_layer_type(tmp_path):
    """Gemma 3 picks each layer's rotary table by its type: a full layer turned swa would be rotated with the local
    theta by Gemma3ForCausalLM (and a sliding one turned softmax cannot be planned at all)."""
    m = tiny_model("gemma3", layer_types=GEMMA_TYPES, window=2 * W)
    lb.convert(m, LayerPlan.from_kinds(["swa", "swa", "swa", "softmax"], window=W))
    msg = refused(m, tmp_path, "transformers", r"layers \[0\] change type .*theta 10000.0.*theta 1000000.0")
    assert "\n" not in msg
    refused(m, tmp_path, "deci", "not 'gemma3_text'")
    with pytest.raises(lb.PlanError, match="layer 1 \\(softmax\\).*sliding window of 16"):
        lb.convert(tiny_model("gemma3", layer_types=GEMMA_TYPES, window=2 * W), LayerPlan.uniform("softmax", 4))


def test_refuses_unmerged_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(hybrid("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    refused(m, tmp_path, "transformers", r"still holds LoRA adapters \(peft\): merge them first")
    out = export(m.merge_and_unload(), tmp_path / "merged")  # merged: exports
    assert (out / "config.json").is_file()


def test_refuses_non_empty_out_and_plain_models(tmp_path):
    m = hybrid("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not an empty folder"):
        export(m, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    (tmp_path / "out" / "keep.txt").unlink()
    export(m, tmp_path / "out")  # an empty folder is fine
    refused(tiny_model("llama"), tmp_path / "out", "transformers", "not a layerboost hybrid")
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export(m, tmp_path / "x", format="onnx")
    with pytest.raises(ExportError, match="ending in .gguf"):  # a GGUF export is one file
        export(m, tmp_path / "x", format="gguf")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w2")


def test_cli_export_from_saved_folder(tmp_path, capsys):
    from layerboost.cli import main

    m = hybrid("llama")
    lb.save(m, tmp_path / "hybrid", tokenizer=tiny_tokenizer())
    assert main(["export", "--model", str(tmp_path / "hybrid"), "--format", "transformers",
                 "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "tokenizer.json").is_file()  # the tokenizer goes with the export
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["model_type"] == "ministral"
    assert main(["export", "--model", str(tmp_path / "hybrid"), "--format", "deci", "--out", str(tmp_path / "d")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "are swa" in errors[0] and "; intermediate_size" in errors[0]  # every problem, one line
    assert not (tmp_path / "d").exists()
