"""Gemma 3 as the second family: local layers that slide natively (their own window and rotary theta),
q/k norms, sandwich norms, a scaled embedding and an attention scale that is not head_dim**-0.5.

Every reference here is transformers' own Gemma3ForCausalLM (forward and generate) or a brute-force
recomputation; the generic per-family tests (conftest.ARCHS) also run a tiny Gemma 3 with full attention.
"""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

import layerboost as lb
from layerboost import LayerPlan, LayerSpec
from layerboost import sensitivity as S
from layerboost.engine import Engine
from layerboost.plan import PlanPolicy, cap_to_native, make_plan, native_plan
from layerboost.runner import DecoderRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_model  # noqa: E402
from test_hybrid import activate_linear, left_pad  # noqa: E402

W = 8  # the native window of the local layers; rows run well past it
TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2  # 2:1 local/global, like Gemma 3's 5:1


def gemma(seed=0, types=TYPES, window=W, attn="sdpa"):
    m = tiny_model("gemma3", layers=len(types), seed=seed, layer_types=types, window=window)
    if attn == "eager":
        m.set_attn_implementation("eager")
    return m


def ids(batch=2, length=30, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# A LayerBoost plan on Gemma: local layers narrowed (4), dropped (none) or linearised; a global layer windowed.
PLAN = LayerPlan((LayerSpec("swa", 4), LayerSpec("none"), LayerSpec("softmax"),
                  LayerSpec("linear_swa", 4, 8), LayerSpec("swa", W), LayerSpec("swa", 6)))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_native_plan_and_planning_caps():
    m = gemma()
    assert list(native_plan(m).kinds) == ["swa", "swa", "softmax"] * 2 and native_plan(m).layers[0].window == W
    # a policy that ranks local layers as softmax keeps them as they are (their own window), no wider
    scores = [5.0, 4.0, 0.0, 3.0, 2.0, 1.0]
    said = []
    plan = make_plan(PlanPolicy("counts", softmax=2, swa=2, none=2, window=16), scores, m.config, log=said.append)
    assert said == ["layers [0, 1, 3, 4] already slide in the original model (window 8): kept as they are where the "
                    "policy asked for more"]
    assert plan.layers[0] == LayerSpec("swa", W) and plan.layers[1] == LayerSpec("swa", W)  # softmax, swa 16 capped
    assert plan.layers[2] == LayerSpec("none")
    capped, which = cap_to_native(LayerPlan.from_kinds(["softmax"] * 6), m.config)
    assert which == [0, 1, 3, 4] and capped == native_plan(m)
    with pytest.raises(lb.PlanError, match=r"layer 0 \(softmax\), layer 1 \(swa 16\).*sliding window of 8"):
        lb.convert(gemma(), LayerPlan((LayerSpec("softmax"), LayerSpec("swa", 16))
                                      + (LayerSpec("softmax"),) * 4))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_runner_equals_gemma_forward_and_the_window_matters(attn):
    m, x = gemma(attn=attn), ids()
    r = DecoderRunner(m)
    h, ctx = r.embed(x)
    ref = m(x, use_cache=False).logits
    torch.testing.assert_close(r.logits(r.run(h, ctx)), ref, atol=1e-5, rtol=1e-5)
    # the same weights with every layer global differ: the local window and theta were really applied
    full = copy.deepcopy(m)
    full.config.layer_types = ["full_attention"] * len(TYPES)
    for layer in full.model.layers:
        layer.self_attn.sliding_window, layer.self_attn.layer_type = None, "full_attention"
    assert (full(x, use_cache=False).logits - ref).abs().max() > 1e-2
    # packed rows are refused for a model whose own layers slide by row index
    assert S.LayerRunner(m).windowed()


@torch.no_grad()
def test_native_plan_converts_to_the_same_model_and_engine():
    m, x = gemma(), ids(length=20)
    c = copy.deepcopy(m)
    lb.convert(c, native_plan(m))  # every local layer becomes layerboost's swa W
    torch.testing.assert_close(c(ids()).logits, m(ids()).logits, atol=1e-5, rtol=1e-5)
    gen = dict(max_new_tokens=24, do_sample=False)
    ref = m.generate(x, **gen)
    assert torch.equal(c.generate(x, **gen), ref)
    for model in (m, c):  # the engine on the original (ring buffers for the local layers) and on the copy
        assert torch.equal(Engine(model, 2, 48).generate(x, 24), ref)


@torch.no_grad()
def test_hybrid_forward_padding_generate_and_engine():
    m = gemma()
    lb.convert(m, PLAN)
    activate_linear(m)
    x = ids(length=28)
    full = m(x).logits
    runner = DecoderRunner(m)
    h, ctx = runner.embed(x)
    torch.testing.assert_close(runner.logits(runner.run(h, ctx)), full, atol=1e-5, rtol=1e-5)
    # left padding changes nothing for the real tokens (the masks carry padding only; windows are the modules')
    seqs = [x[0, :25].tolist(), x[1, :17].tolist()]
    padded, mask = left_pad(seqs)
    got = m(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    for r, s in enumerate(seqs):
        alone = m(torch.tensor([s])).logits[0]
        torch.testing.assert_close(got[r, -len(s):], alone, atol=1e-4, rtol=1e-4)
    ref = m.generate(x[:, :12], max_new_tokens=24, do_sample=False)
    assert torch.equal(Engine(m, 2, 40).generate(x[:, :12], 24), ref)


@torch.no_grad()
def test_kl_proxy_against_brute_force():
    """Sensitivity's KL proxy (prefix reuse through the runner) against converting a copy and running HF forward."""
    m = gemma()
    calib = ids(batch=3, length=24, seed=5)
    got = S.kl_proxy(m, calib, batch=2, progress=False)
    base = torch.log_softmax(m(calib).logits.float(), -1)
    for i in range(len(TYPES)):
        v = copy.deepcopy(m)
        plan = native_plan(m).layers
        lb.convert(v, LayerPlan(plan[:i] + (LayerSpec("none"),) + plan[i + 1:]))
        lp = torch.log_softmax(v(calib).logits.float(), -1)
        ref = (base.exp() * (base - lp)).sum(-1).mean().item()
        assert got[i] == pytest.approx(ref, rel=1e-4, abs=1e-6), i


@torch.no_grad()
def test_cosine_proxy_sees_what_the_residual_stream_receives():
    """LLM-Drop's 1 - cos(x, x + attn) with Gemma's post-attention norm applied, recomputed from HF's hidden
    states (layer inputs) and the layer's own modules."""
    m = gemma()
    calib = ids(batch=2, length=24, seed=7)
    got = S.cosine_proxy(m, calib, batch=2)
    hs = m(calib, output_hidden_states=True).hidden_states  # hs[i]: the input of layer i
    x0, ctx = DecoderRunner(m).embed(calib)
    for i, layer in enumerate(m.model.layers):
        kw = DecoderRunner(m).layer_ctx(i, ctx)
        a = layer.self_attn(hidden_states=layer.input_layernorm(hs[i]), **kw)[0]
        y = hs[i] + layer.post_attention_layernorm(a)
        ref = 1 - torch.nn.functional.cosine_similarity(hs[i], y, dim=-1).mean().item()
        assert got[i] == pytest.approx(ref, rel=1e-4, abs=1e-6), i
    assert min(got) > 1e-3  # the raw attention output alone would barely move Gemma's large residual stream


def test_save_load_keeps_the_native_window(tmp_path):
    m = gemma()
    lb.convert(m, PLAN)
    activate_linear(m)
    lb.save(m, tmp_path / "h")
    back = lb.load(tmp_path / "h")
    assert back.layerboost_plan == PLAN and lb.plan.native_plan(back).layers[0] == LayerSpec("swa", W)
    with torch.no_grad():
        torch.testing.assert_close(back(ids()).logits, m(ids()).logits, atol=1e-6, rtol=1e-6)


def test_heal_a_gemma_hybrid(tmp_path):
    """Both healing stages run on Gemma 3; layers planned as they are natively are not 'modified'."""
    from layerboost.heal import HealConfig, build_hybrid, distill_kl, heal

    from conftest import ByteTok
    from test_heal import _corpus, _heldout

    h = build_hybrid(gemma(), PLAN, HealConfig(tokens=1000, lora_rank=4))
    assert h.modified == [0, 1, 3, 5] and h.windowed == [0, 3, 5]  # layer 4 is swa 8 = its native self
    teacher, held = gemma(), _heldout()
    unhealed = gemma()
    lb.convert(unhealed, PLAN)
    out = heal(gemma(), PLAN, data=_corpus(tmp_path), out=tmp_path / "o", tokens=12_000, tokenizer=ByteTok(),
               seq_len=64, batch_size=4, progress=False, checkpoint_every=0, lora_rank=4, lora_alpha=8, lr=3e-3)
    assert distill_kl(teacher, lb.load(out), held) < 0.8 * distill_kl(teacher, unhealed, held)


# ---- the real model (Gemma 3 270M, 18 layers, 5 local (window 512) : 1 global) ------------------------------

READER = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
x = torch.load(sys.argv[2])
with torch.no_grad():
    out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, eos_token_id=None,
                     pad_token_id=0)
assert "layerboost" not in sys.modules
torch.save(dict(cls=type(m).__name__, out=out), sys.argv[3])
"""


@pytest.mark.slow
@torch.no_grad()
def test_gemma3_270m_end_to_end(tmp_path):
    """Past the native window (530-token prompt): the engine equals generate for the original and a hybrid;
    save/load keeps the logits; a plan that narrows the local layers exports to Gemma3ForCausalLM and
    generates the same tokens in a process without layerboost."""
    import os
    import subprocess

    pytest.importorskip("gguf")
    try:
        model, tok = lb.load_model("gemma3-270m")
    except lb.models.ModelLoadError as e:
        pytest.skip(str(e))
    assert native_plan(model).kinds.count("softmax") == 3 and native_plan(model).layers[0] == LayerSpec("swa", 512)
    text = " ".join(f"Item {i} of the list is the word number {i * 7 % 13}." for i in range(60))
    x = torch.tensor([tok(text)["input_ids"][:530]])
    assert x.shape[1] == 530
    gen = dict(attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, eos_token_id=None,
               pad_token_id=tok.pad_token_id)
    assert torch.equal(Engine(model, 1, 540).generate(x, 8), model.generate(x, **gen))
    # a hybrid: local layers narrowed to 128, two of them attention-free, one global layer windowed
    specs = list(native_plan(model).layers)
    specs = [LayerSpec("swa", 128) if s.kind == "swa" else s for s in specs]
    specs[3], specs[9], specs[11] = LayerSpec("none"), LayerSpec("none"), LayerSpec("swa", 128)
    hyb = copy.deepcopy(model)
    lb.convert(hyb, LayerPlan(tuple(specs)))
    ref = hyb.generate(x, **gen)
    assert torch.equal(Engine(hyb, 1, 540).generate(x, 8), ref)
    lb.save(hyb, tmp_path / "h", tokenizer=tok)
    back, _ = lb.load_model(str(tmp_path / "h"))
    torch.testing.assert_close(back(x[:, :300]).logits, hyb(x[:, :300]).logits, atol=1e-4, rtol=1e-4)
    del hyb, back
    # exportable: every layer keeps its type (Gemma 3 rotates local and global layers with different theta)
    narrow = copy.deepcopy(model)
    lb.convert(narrow, LayerPlan(tuple(LayerSpec("swa", 128) if s.kind == "swa" else s
                                       for s in native_plan(model).layers)))
    want = narrow.generate(x, **gen)
    lb.export(narrow, tmp_path / "hf", format="transformers", tokenizer=tok)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    res = subprocess.run([sys.executable, "-c", READER, str(tmp_path / "hf"), str(tmp_path / "x.pt"),
                          str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["cls"] == "Gemma3ForCausalLM" and torch.equal(got["out"], want)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())  # the period too, for readers that use it
    assert cfg["sliding_window"] == 128 and cfg["sliding_window_pattern"] == 6 and cfg["layer_types"][5] == "full_attention"
    assert (narrow(x).logits[0, -1] - model(x).logits[0, -1]).abs().max() > 1e-3  # the window of 128 is in effect


class BosTok:
    """Bytes as token ids (3..127), BOS 2 first unless add_special_tokens=False, EOS 1: a tokenizer that starts
    its texts with BOS, as Gemma's does."""

    bos_token_id, eos_token_id, pad_token_id = 2, 1, 0

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + b % 125 for b in text.encode()]
        return {"input_ids": ([2] if add_special_tokens else []) + ids}


def test_rows_start_with_bos_when_the_tokenizer_does(tmp_path, monkeypatch):
    """Healing rows, held-out rows and calibration rows begin with BOS for a BOS tokenizer (Gemma 3 270M:
    perplexity 21 after BOS, 77 without), and the text after it is the unbroken token stream."""
    from layerboost.corpus import PackedRows, heldout_rows, row_prefix

    class NoBos(BosTok):
        def __call__(self, text, add_special_tokens=True):
            return super().__call__(text, add_special_tokens=False)

    assert row_prefix(BosTok()) == [2] and row_prefix(NoBos()) == []
    docs = ["alpha beta gamma " * 20, "delta epsilon " * 30]
    stream = [t for d in docs for t in BosTok()(d, add_special_tokens=False)["input_ids"] + [1]]
    for tok, prefix in ((BosTok(), [2]), (NoBos(), [])):
        rows = [r.tolist() for r in PackedRows(lambda: iter(docs), tok, 16, seed=0, shuffle_rows=1)]
        assert all(r[: len(prefix)] == prefix and len(r) == 16 for r in rows)
        assert [t for r in rows for t in r[len(prefix):]] == stream[: len(rows) * (16 - len(prefix))]
    import layerboost.corpus as corpus

    monkeypatch.setattr(corpus, "HELDOUT_EVERY", 2)  # more held-out blocks in a small file
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("Some held-out words here. " * 30000)  # 780 KB: a dozen 64 KiB blocks
    held = heldout_rows(BosTok(), data, 64, 32)
    assert held.shape == (2, 32) and held[:, 0].tolist() == [2, 2] and (held[:, 1:] != 2).all()
    (tmp_path / "corpus" / "wikipedia_paragraphs.txt").write_text("Calibration text goes on. " * 400)
    calib = S.calibration_tokens(BosTok(), tmp_path, n_seqs=3, seq_len=20)
    assert calib.shape == (3, 20) and calib[:, 0].tolist() == [2, 2, 2] and (calib[:, 1:] != 2).all()
