"""The static-cache decode engine: greedy tokens == model.generate, logits == the HF forward, memory."""

import copy

import pytest
import torch

import layerboost as lb
from layerboost import LayerPlan, UnsupportedModelError, expected_cache_bytes
from layerboost.engine import Engine

from conftest import tiny_model
from test_hybrid import activate_linear

W = 4


pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = ["none", "linear_swa", "swa", "softmax"]  # layer 0 without attention, every kind once


def hybrid(base, kinds=MIXED, window=W):
    m = copy.deepcopy(base)
    lb.convert(m, LayerPlan.from_kinds(kinds, window=window))
    activate_linear(m)  # a linear_swa gate of 0.5 and random feature maps, so the state matters
    return m


def prompt(batch=2, length=6, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


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
    from transformers import MistralConfig, MistralForCausalLM

    mis = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, sliding_window=16))
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        Engine(mis, 1, 8)


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
