"""The attention-free kinds `bias` and `linear`: parity with the original model whose attention output is
replaced by the same function (forward hooks, an independent reference), equality with `none` at init,
cached decoding, cache bytes, cost, save/load."""

import copy

import pytest
import torch

import layerboost as lb
from layerboost import LayerPlan, LayerSpec, PlanError, expected_cache_bytes
from layerboost.attention import BiasAttention, LinearMapAttention
from layerboost.plan import relative_cost

from conftest import tiny_model
from test_hybrid import activate_linear, decode_token_by_token, ids, left_pad

W = 8


def converted(base, specs):
    m = copy.deepcopy(base)
    lb.convert(m, LayerPlan(tuple(specs)))
    return m


def randomize(model, seed=0):
    """Trained-looking bias vectors and linear maps (at init they equal none, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            if isinstance(a, BiasAttention):
                a.bias.copy_(0.5 * torch.randn(a.bias.shape, generator=g))
            if isinstance(a, LinearMapAttention):
                a.up.weight.copy_(0.5 * torch.randn(a.up.weight.shape, generator=g))


@torch.no_grad()
def test_fresh_bias_and_linear_equal_none(arch):
    base = tiny_model(arch)
    x = ids()
    none = converted(base, [LayerSpec("none"), LayerSpec("softmax"), LayerSpec("none"), LayerSpec("softmax")])
    new = converted(base, [LayerSpec("bias"), LayerSpec("softmax"), LayerSpec("linear", rank=4), LayerSpec("softmax")])
    assert torch.equal(new(x).logits, none(x).logits)
    randomize(new)
    assert (new(x).logits - none(x).logits).abs().max() > 1e-2  # so the check above can fail


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_parity_with_replaced_attention_output(arch, layer):
    """bias: the original model with layer `layer`'s attention output replaced by the vector; linear: by
    up(down(h)) of the attention's own input (the input-normed hidden state)."""
    base = tiny_model(arch)
    x = ids()
    for spec in (LayerSpec("bias"), LayerSpec("linear", rank=3)):
        specs = [LayerSpec("softmax")] * 4
        specs[layer] = spec
        m = converted(base, specs)
        randomize(m, seed=layer)
        a = m.model.layers[layer].self_attn
        if spec.kind == "bias":
            def fn(h, a=a):
                return a.bias.expand_as(h).clone()
        else:
            def fn(h, a=a):
                return h @ a.down.weight.T @ a.up.weight.T
        hook = base.model.layers[layer].self_attn.register_forward_hook(
            lambda mod, args, kwargs, out: (fn(kwargs["hidden_states"]),) + tuple(out[1:]), with_kwargs=True)
        try:
            ref = base(x).logits
        finally:
            hook.remove()
        assert (m(x).logits - ref).abs().max() <= 1e-5, spec.kind
        assert sum(p.numel() for p in a.parameters()) == (64 if spec.kind == "bias" else 2 * 64 * 3)


PLANS = {
    "bias": [LayerSpec("bias")] * 4,
    "linear": [LayerSpec("linear")] * 4,
    "mixed": [LayerSpec("bias"), LayerSpec("swa", W), LayerSpec("linear", rank=4), LayerSpec("linear_swa", W)],
}


@torch.no_grad()
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("prefill", [1, 13])
def test_cached_decoding_equals_full_forward(arch, plan, prefill):
    m = converted(tiny_model(arch), PLANS[plan])
    randomize(m)
    activate_linear(m)
    x = ids()
    full = m(x, use_cache=False).logits
    inc, cache = decode_token_by_token(m, x, prefill)
    assert cache.get_seq_length() == x.shape[1]  # read from a bias layer 0
    assert (inc - full).abs().max() <= 1e-4


@torch.no_grad()
def test_generate_left_padded_bias_layer0_equals_reforward():
    m = converted(tiny_model("llama"), PLANS["mixed"])
    randomize(m)
    activate_linear(m)
    g = torch.Generator().manual_seed(3)
    x, mask = left_pad([torch.randint(1, 128, (n,), generator=g).tolist() for n in (12, 5, 9)])
    out = m.generate(input_ids=x, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                     eos_token_id=None)
    ref, ref_mask = x.clone(), mask.clone()
    for _ in range(10):
        pos = (ref_mask.cumsum(-1) - 1).clamp(min=0)
        logits = m(ref, attention_mask=ref_mask, position_ids=pos, use_cache=False).logits[:, -1]
        ref = torch.cat([ref, logits.argmax(-1, keepdim=True)], 1)
        ref_mask = torch.cat([ref_mask, torch.ones_like(ref_mask[:, :1])], 1)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_cache_holds_nothing_for_them():
    m = converted(tiny_model("llama"), PLANS["mixed"])
    _, cache = decode_token_by_token(m, ids(batch=3, length=30), prefill=5)
    assert cache.layers[0].nbytes() == 0 and cache.layers[2].nbytes() == 0
    assert cache.nbytes() == expected_cache_bytes(m.layerboost_plan, m.config, batch=3, seq_len=30) > 0
    by_kind = cache.nbytes_by_kind()
    assert by_kind["bias"] == by_kind["linear"] == 0


@torch.no_grad()
def test_decode_method_is_the_sublayer_output():
    """What a decode engine calls for these kinds: `self_attn.decode(input_layernorm(h))`, nothing cached."""
    m = converted(tiny_model("llama"), PLANS["mixed"])
    randomize(m)
    h = torch.randn(2, 1, 64)
    for i in (0, 2):
        layer = m.model.layers[i]
        via_forward = layer.self_attn(hidden_states=layer.input_layernorm(h))[0]
        assert torch.equal(layer.self_attn.decode(layer.input_layernorm(h)), via_forward)
    assert isinstance(m.model.layers[0].input_layernorm, torch.nn.Identity)  # bias drops the norm, like none
    assert not isinstance(m.model.layers[2].input_layernorm, torch.nn.Identity)  # linear reads it


@torch.no_grad()
def test_save_load_roundtrip(tmp_path):
    m = converted(tiny_model("qwen3"), PLANS["mixed"])
    randomize(m)
    lb.save(m, tmp_path / "h")
    r = lb.load(tmp_path / "h")
    assert r.layerboost_plan == m.layerboost_plan and r.layerboost_plan[2].rank == 4
    x = ids()
    assert torch.equal(r(x).logits, m(x).logits)
    assert torch.equal(r.model.layers[0].self_attn.bias, m.model.layers[0].self_attn.bias)
    assert torch.equal(r.generate(x[:, :5], max_new_tokens=6, do_sample=False),
                       m.generate(x[:, :5], max_new_tokens=6, do_sample=False))


def test_plan_fields_and_cost():
    with pytest.raises(PlanError, match="'rank' only applies to 'linear'"):
        LayerPlan((LayerSpec("bias", rank=2),))
    with pytest.raises(PlanError, match="rank must be a positive integer"):
        LayerPlan((LayerSpec("linear", rank=0),))
    assert LayerPlan.from_dict({"layers": [{"kind": "linear", "rank": 2}, "bias"]}).layers[0].rank == 2
    cfg = tiny_model("llama").config
    costs = {k: relative_cost(LayerPlan((LayerSpec(k, W if k == "swa" else None),) * 4), cfg, 256, "decode")
             for k in ("none", "bias", "linear", "swa", "softmax")}
    assert costs["none"] < costs["bias"] < costs["linear"] < costs["swa"] < costs["softmax"] == 1
    for k in ("none", "bias", "linear"):
        assert relative_cost(LayerPlan((LayerSpec(k),) * 4), cfg, 256, "kv") == 0


@torch.no_grad()
def test_engine_greedy_equals_generate():
    """The decode engine adds `self_attn.decode(input_layernorm(h))` for these kinds, nothing cached."""
    from layerboost.engine import Engine

    m = converted(tiny_model("llama"), PLANS["mixed"])
    randomize(m)
    activate_linear(m)
    x = ids(length=6)
    ref = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False, eos_token_id=None,
                     pad_token_id=0)
    assert torch.equal(Engine(m, batch_size=2, max_seq_len=22).generate(x, 16), ref)
