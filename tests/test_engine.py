"""The static-shape decode engine: greedy tokens == model.generate (eager and compiled), logits == the HF
forward, masked slots invisible, memory and roofline bytes."""

import copy

import pytest
import torch

import layerboost as lb
from layerboost import LayerPlan, LayerSpec, expected_cache_bytes
from layerboost.engine import CompileError, Engine
from layerboost.kinds.softmax import FullKV
from layerboost.kinds.swa import WindowKV
from layerboost.plan import relative_cost

from conftest import tiny_model
from test_hybrid import activate_linear

W = 4


pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = ["none", "linear_swa", "swa", "softmax"]  # layer 0 without attention, every kind once


def hybrid(base, kinds=MIXED, window=W, mix=None):
    m = copy.deepcopy(base)
    plan = LayerPlan.from_kinds(kinds, window=window)
    if mix is not None:
        plan = LayerPlan(tuple(LayerSpec(s.kind, s.window, mix=mix) if s.kind == "linear_swa" else s
                               for s in plan.layers))
    lb.convert(m, plan)
    activate_linear(m)  # a linear_swa gate of 0.5 and random feature maps, so the state matters
    return m


def prompt(batch=2, length=6, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference(m, x, n):
    return m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0)


@torch.no_grad()
@pytest.mark.parametrize("kinds", [None, MIXED], ids=["base", "mixed"])
def test_greedy_equals_generate(arch, kinds):
    base = tiny_model(arch)
    m = base if kinds is None else hybrid(base, kinds)
    x = prompt()
    ref = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                     eos_token_id=None, pad_token_id=0)
    out = Engine(m, batch_size=2, max_seq_len=x.shape[1] + 16).generate(x, 16)
    assert torch.equal(out, ref)


@torch.no_grad()
@pytest.mark.parametrize("mix", ["gate", "lolcats"])
def test_linear_swa_mixes_equal_generate(mix):
    """Both linear_swa mixes, window 4 < prompt 6, so keys are folded into the state from the prefill on."""
    m = hybrid(tiny_model("llama"), ["none", "linear_swa", "swa", "linear_swa"], mix=mix)
    assert {m.model.layers[i].self_attn.mix for i in (1, 3)} == {mix}
    x = prompt()
    assert torch.equal(Engine(m, 2, 22).generate(x, 16), reference(m, x, 16))


@torch.no_grad()
@pytest.mark.parametrize("kinds", [None, MIXED], ids=["base", "mixed"])
def test_masked_slots_are_invisible(kinds):
    """Buffers larger than needed, prompt 2 < window 4 (ring slots still empty), unwritten slots full of
    garbage: the mask hides them, at the full span and at a shorter one."""
    base = tiny_model("llama")
    m = base if kinds is None else hybrid(base, kinds)
    x = prompt(length=2)
    ref = reference(m, x, 12)
    g = torch.Generator().manual_seed(0)
    for span in (40, 16):
        e = Engine(m, 2, 40)
        first = e.prefill(x).argmax(-1, keepdim=True)
        for c in e.caches:
            if c is not None:  # slots no token has reached yet: full positions >= 2, ring slots >= 2
                c.k[:, :, 2:] = 1e3 * torch.randn(c.k[:, :, 2:].shape, generator=g)
                c.v[:, :, 2:] = 1e3 * torch.randn(c.v[:, :, 2:].shape, generator=g)
        e.span = span
        out = torch.cat([x, first, e.decode_n_tokens(first, 11)], dim=1)
        assert torch.equal(out, ref), span
    assert isinstance(e.caches[-1], FullKV) and e.pos == 13
    e.span = 13
    with pytest.raises(ValueError, match="span 13"):
        e.decode_one_token(first)


@pytest.mark.slow  # ~12 s with a warm inductor cache, ~45 s cold on 2 busy cores
def test_compiled_decode_equals_eager_and_is_static():
    """torch.compile (inductor, CPU): tokens == eager engine == model.generate for every kind (layer 0
    `none`, linear_swa, swa window 4 < prompt 6, softmax); after the first step, decoding across the
    windows' wrap-around recompiles nothing (no shape or guard depends on the position)."""
    m = hybrid(tiny_model("llama"))
    x = prompt()
    with torch.no_grad():
        ref = reference(m, x, 10)
        assert torch.equal(Engine(m, 2, 16).generate(x, 10), ref)
        e = Engine(m, 2, 16, compile=True)
        first = e.prefill(x).argmax(-1, keepdim=True)
        second = e.decode_one_token(first).argmax(-1, keepdim=True)  # compiles
        with torch._dynamo.config.patch(error_on_recompile=True):
            rest = e.decode_n_tokens(second, 8)  # positions 7 .. 14: the rings wrap, linear_swa folds
    assert torch.equal(torch.cat([x, first, second, rest], dim=1), ref)


@pytest.mark.slow
def test_compile_failure_raises_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing cached: inductor must compile
    e = Engine(tiny_model("llama", layers=1), 1, 8, compile=True)
    tok = e.prefill(prompt(batch=1, length=3)).argmax(-1, keepdim=True)
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}):
        with pytest.raises(CompileError, match="could not compile the decode step on cpu"):
            e.decode_one_token(tok)


@torch.no_grad()
def test_step_bytes_are_weights_plus_caches_and_match_relative_cost():
    base = tiny_model("llama")  # untied embedding: the step gathers B rows of it and reads every other weight
    plan = LayerPlan.from_kinds(["softmax", "none", "swa", "softmax"], window=4)
    m = copy.deepcopy(base)
    lb.convert(m, plan)
    eb, eh = Engine(base, 1, 32), Engine(m, 1, 32)
    for model, e in ((base, eb), (m, eh)):  # `none` layers hold no q/k/v/o and no input norm
        params = sum(p.numel() * 4 for p in model.parameters()) - model.model.embed_tokens.weight.numel() * 4
        assert e.weight_bytes() == params
        assert e.step_bytes(30) == params + expected_cache_bytes(e.plan, model.config, 1, 30)
    assert Engine(m, 3, 32).step_bytes(30) == params + expected_cache_bytes(plan, m.config, 3, 30)
    # plan.relative_cost(measure="decode") models the same bytes at batch 1, leaving out the LM head and norms
    rest = [e.step_bytes(30) - sum(p.numel() * 4 for n, p in e.model.named_parameters()
                                   if "norm" in n or "lm_head" in n) for e in (eb, eh)]
    assert rest[1] / rest[0] == pytest.approx(relative_cost(plan, base.config, 30, "decode"), rel=1e-12)
    assert rest[1] < rest[0]


@torch.no_grad()
def test_decode_logits_equal_forward():
    """Teacher-forced: the engine's logits at every decoded position == the full-sequence forward's."""
    m = hybrid(tiny_model("qwen3"), ["linear_swa", "softmax", "none", "swa"])
    x = prompt(length=24)
    ref = m(x).logits  # (B, T, V)
    e = Engine(m, 2, 24)
    logits = [e.prefill(x[:, :5])]
    for t in range(5, 24):
        logits.append(e.decode_one_token(x[:, t : t + 1]))
    got = torch.stack(logits, dim=1)  # positions 4 .. 23
    assert (got - ref[:, 4:]).abs().max() <= 1e-4


@torch.no_grad()
def test_held_bytes_match_formula_and_buffers_are_static():
    m = hybrid(tiny_model("llama"))
    e = Engine(m, 2, 30)
    allocated = e.cache_bytes()
    e.generate(prompt(), 20)
    assert e.pos == 25
    assert e.held_bytes() == expected_cache_bytes(m.layerboost_plan, m.config, 2, 25)
    assert e.cache_bytes() == allocated  # nothing grew
    base = Engine(tiny_model("llama"), 2, 30)
    base.generate(prompt(), 20)
    assert base.held_bytes() == expected_cache_bytes(LayerPlan.uniform("softmax", 4), m.config, 2, 25)


@torch.no_grad()
def test_shared_prompt_broadcasts_to_every_row():
    m = hybrid(tiny_model("llama"))
    x = prompt(batch=1)
    e = Engine(m, 3, 20)
    logits = e.prefill(x)
    assert logits.shape[0] == 1
    tok = logits.argmax(-1, keepdim=True).expand(3, 1).contiguous()
    out = e.decode_n_tokens(tok, 8)
    one = Engine(m, 1, 20).generate(x, 9)[:, 6:]
    assert torch.equal(out, one[:, 1:].expand(3, -1))


def test_clear_errors():
    m = tiny_model("llama")
    e = Engine(m, 2, 10)
    x = prompt()
    with pytest.raises(ValueError, match="padding"):
        e.prefill(x, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="batch 2"):
        e.prefill(prompt(batch=3))
    with pytest.raises(ValueError, match="max_seq_len"):
        e.generate(x, 20)


@torch.no_grad()
def test_native_sliding_window_models(one_thread):
    """An original model that slides natively (Mistral's sliding_window; Gemma 3's local layers) decodes with
    ring buffers of its own window, equal to its own HF generate past the window; converting it keeps those
    layers at most that wide."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    mis = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, sliding_window=6,
                                           attn_implementation="sdpa")).eval()
    gem = tiny_model("gemma3", layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                     window=6)
    for m in (mis, gem):
        x = torch.randint(3, 64, (2, 10))
        e = Engine(m, 2, 32)
        assert [s.kind for s in e.plan.layers].count("swa") >= 2 and isinstance(e.caches[0], WindowKV)
        assert torch.equal(e.generate(x, 16), m.generate(x, max_new_tokens=16, do_sample=False))
        with pytest.raises(lb.PlanError, match="sliding window of 6"):
            lb.convert(copy.deepcopy(m), lb.LayerPlan.uniform("softmax", m.config.num_hidden_layers))


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_engine_equals_generate():
    pytest.importorskip("gguf")
    try:
        model, tok = lb.load_model("smollm2-135m")
    except lb.models.ModelLoadError as e:
        pytest.skip(str(e))
    m = copy.deepcopy(model)
    lb.convert(m, LayerPlan.from_kinds(["softmax", "none", "swa"] * 10, window=8))
    x = torch.tensor([tok(s)["input_ids"][:5] for s in ("The capital of France is", "One, two, three, four,")])
    for mm in (model, m):
        ref = mm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert torch.equal(Engine(mm, 2, 17).generate(x, 12), ref)
