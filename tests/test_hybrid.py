"""Numerical parity of hybrid models against the original (tiny random models, fp32, CPU)."""

import copy

import pytest
import torch

import layerboost as lb
from layerboost import HybridCache, LayerPlan, LayerSpec, expected_cache_bytes
from layerboost.kinds.linear_swa import LinearSlidingWindowAttention

from conftest import tiny_model

T = 40
W = 8


def converted(base, kinds, window=W):
    m = copy.deepcopy(base)
    lb.convert(m, LayerPlan.from_kinds(kinds, window=window))
    return m


def ids(batch=2, length=T, vocab=128, seed=1):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def activate_linear(model, seed=0):
    """Make linear attention matter: gate 0.5 and random feature maps (init hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            if isinstance(layer.self_attn, LinearSlidingWindowAttention):
                a = layer.self_attn
                a.gate.zero_()
                for fm in (a.feature_map_q, a.feature_map_k):
                    fm.weight.add_(0.3 * torch.randn(fm.weight.shape, generator=g))
                    fm.bias.add_(0.3 * torch.randn(fm.bias.shape, generator=g))


def test_all_softmax_plan_replaces_nothing(arch):
    """softmax is the original attention: an all-softmax plan keeps every layer's own module (nothing to compare
    numerically; the other kinds' parity tests below compare real replacements)."""
    m = tiny_model(arch)
    before = [layer.self_attn for layer in m.model.layers]
    record = lb.convert(m, LayerPlan.from_kinds(["softmax"] * 4, window=W))
    assert all(r.old == r.new for r in record)
    assert all(layer.self_attn is a for layer, a in zip(m.model.layers, before))


@torch.no_grad()
def test_swa_wider_than_sequence_is_full_attention(arch):
    base = tiny_model(arch)
    x = ids()
    m = converted(base, ["swa"] * 4, window=T)
    assert (m(x).logits - base(x).logits).abs().max() <= 1e-5


@torch.no_grad()
def test_swa_equals_explicit_banded_mask(arch):
    base = tiny_model(arch)
    x = ids()
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    band = ((j <= i) & (j > i - 5))[None, None].expand(2, 1, T, T)
    ref = base(x, attention_mask=band).logits  # transformers passes a 4D mask through unchanged
    m = converted(base, ["swa"] * 4, window=5)
    out = m(x).logits
    assert (out - ref).abs().max() <= 1e-5
    assert (out - base(x).logits).abs().max() > 1e-2  # the window really changes the output


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_none_equals_zeroed_attention_output(arch, layer):
    base = tiny_model(arch)
    x = ids()
    handle = base.model.layers[layer].self_attn.register_forward_hook(
        lambda mod, inp, out: (torch.zeros_like(out[0]),) + tuple(out[1:])
    )
    ref = base(x).logits
    handle.remove()
    kinds = ["softmax"] * 4
    kinds[layer] = "none"
    m = converted(base, kinds)
    assert not any(n.startswith(f"model.layers.{layer}.self_attn") for n, _ in m.named_parameters())
    assert (m(x).logits - ref).abs().max() <= 1e-5
    assert (m(x).logits - base(x).logits).abs().max() > 1e-3


def decode_token_by_token(model, x, prefill):
    cache = HybridCache(model.layerboost_plan)
    out = model(x[:, :prefill], cache=cache, use_cache=True)
    logits = [out.logits]
    for t in range(prefill, x.shape[1]):
        out = model(x[:, t : t + 1], cache=out.cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, 1), out.cache


PLANS = {
    "softmax": ["softmax"] * 4,
    "swa": ["swa"] * 4,
    "linear_swa": ["linear_swa"] * 4,
    "none": ["none"] * 4,
    "mixed": ["none", "swa", "linear_swa", "softmax"],
}


@torch.no_grad()
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("prefill", [1, 13])
def test_cached_decoding_equals_full_forward(arch, plan, prefill):
    base = tiny_model(arch)
    m = converted(base, PLANS[plan])
    activate_linear(m)
    x = ids()
    full = m(x, use_cache=False).logits
    inc, cache = decode_token_by_token(m, x, prefill)
    assert cache.get_seq_length() == T  # > W: decoding went past the window
    assert (inc - full).abs().max() <= 1e-4


@torch.no_grad()
def test_linear_swa_uses_old_tokens_and_starts_close_to_swa():
    base = tiny_model("llama")
    x = ids(length=64)
    swa = converted(base, ["swa"] * 4)(x).logits
    lin = converted(base, ["linear_swa"] * 4)
    fresh = lin(x).logits
    none = converted(base, ["none"] * 4)(x).logits
    # a fresh linear_swa is much closer to swa than removing attention is
    assert (fresh - swa).abs().max() < 0.1 * (none - swa).abs().max()
    activate_linear(lin)
    assert (lin(x).logits - swa).abs().max() > 1e-3  # and its linear branch does contribute


@torch.no_grad()
def test_cache_memory_matches_formula():
    base = tiny_model("llama")
    kinds = ["none", "swa", "linear_swa", "softmax"]
    m = converted(base, kinds)
    x = ids(batch=3, length=30)
    _, cache = decode_token_by_token(m, x, prefill=5)
    layers = cache.layers
    assert layers[0].keys is None and layers[0].nbytes() == 0
    assert layers[1].keys.shape[-2] == W and layers[2].keys.shape[-2] == W
    assert layers[3].keys.shape[-2] == 30
    assert layers[2].state.dtype == torch.float32 and layers[2].state.shape == (3, 4, 32, 16)
    assert cache.nbytes() == expected_cache_bytes(m.layerboost_plan, m.config, batch=3, seq_len=30)
    assert cache.get_seq_length(0) == 30  # read from an attention-free layer 0


def left_pad(seqs, pad=0):
    n = max(len(s) for s in seqs)
    x = torch.full((len(seqs), n), pad)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, n - len(s):] = torch.tensor(s)
        mask[r, n - len(s):] = 1
    return x, mask


@torch.no_grad()
@pytest.mark.parametrize("arch_name", ["llama", "qwen3"])
def test_generate_left_padded_with_none_layer0_equals_reforward(arch_name):
    base = tiny_model(arch_name)
    m = converted(base, ["none", "swa", "linear_swa", "softmax"], window=6)
    activate_linear(m)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (12, 5, 9)]
    x, mask = left_pad(seqs)
    new = 14
    out = m.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, do_sample=False,
                     pad_token_id=0, eos_token_id=None)
    # reference: full re-forward of the padded batch at every step, positions as generate sets them
    ref, ref_mask = x.clone(), mask.clone()
    for _ in range(new):
        pos = (ref_mask.cumsum(-1) - 1).clamp(min=0)
        logits = m(ref, attention_mask=ref_mask, position_ids=pos, use_cache=False).logits[:, -1]
        ref = torch.cat([ref, logits.argmax(-1, keepdim=True)], 1)
        ref_mask = torch.cat([ref_mask, torch.ones_like(ref_mask[:, :1])], 1)
    assert torch.equal(out, ref)
    # and each row equals generating it alone, unpadded
    for r, s in enumerate(seqs):
        alone = m.generate(input_ids=torch.tensor([s]), max_new_tokens=new, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
        assert alone[0, len(s):].tolist() == out[r, x.shape[1]:].tolist()


@torch.no_grad()
def test_default_forward_and_generate_use_hybrid_cache():
    m = converted(tiny_model("llama"), ["none", "swa", "linear_swa", "softmax"])
    out = m(ids(), use_cache=True)
    assert isinstance(out.cache, HybridCache)
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="HybridCache"):
        cache = DynamicCache()
        cache.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
        m(ids(), cache=cache, use_cache=True)


def test_convert_rejects_bad_input():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(lb.UnsupportedModelError, match="supported model_type values: llama"):
        lb.convert(gpt2, LayerPlan.uniform("none", 2))
    base = tiny_model("llama")
    with pytest.raises(lb.PlanError, match="3 layers but the model has 4"):
        lb.convert(copy.deepcopy(base), LayerPlan.uniform("none", 3))
    m = converted(base, ["softmax"] * 4)
    with pytest.raises(lb.UnsupportedModelError, match="already a layerboost hybrid"):
        lb.convert(m, LayerPlan.uniform("none", 4))


def test_replacement_record():
    m = tiny_model("llama")
    orig_q = m.model.layers[1].self_attn.q_proj
    rec = lb.convert(m, LayerPlan((LayerSpec("softmax"), LayerSpec("swa", 4), LayerSpec("linear_swa", 4), LayerSpec("none"))))
    assert [(r.layer, r.kind, r.old, r.new) for r in rec] == [
        (0, "softmax", "LlamaAttention", "LlamaAttention"),
        (1, "swa", "LlamaAttention", "SlidingWindowAttention"),
        (2, "linear_swa", "LlamaAttention", "LinearSlidingWindowAttention"),
        (3, "none", "LlamaAttention", "NoAttention"),
    ]
    assert m.model.layers[1].self_attn.q_proj is orig_q  # projections are reused, not copied


# ---- linear_swa against a plain per-query reference ------------------------------------------------

def _reference_linear_swa(attn, x, pe):
    """y_i = (a sum_{i-W<j<=i} e^{s_ij - m_i} v_j + g sum_{j<=i-W} phi_q(q_i).phi_k(k_j) v_j) / (same without v),
    m_i the max window score (as LoLCATs), one query at a time from the formula (no masks, no matmul tricks)."""
    q, k, v = attn.qkv(x, pe)  # (B, nh, T, hs), (B, nkv, T, hs), (B, nkv, T, hs)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    a, g = attn.mix_factors()
    b, nh, t, hs = q.shape
    y = torch.zeros(b, nh, t, hs)
    for bi in range(b):
        for h in range(nh):
            fq = attn.feature_map_q(q[bi:bi + 1, h:h + 1].contiguous().expand(1, nh, t, hs))[0, h]
            fk = attn.feature_map_k(k[bi:bi + 1, h:h + 1].contiguous().expand(1, nh, t, hs))[0, h]
            for i in range(t):
                num, den = torch.zeros(hs), torch.zeros(())
                m_i = max(float(q[bi, h, i] @ k[bi, h, j]) * attn.scaling for j in range(max(0, i - attn.window + 1), i + 1))
                for j in range(i + 1):
                    if j > i - attn.window:
                        w = a[h] * torch.exp(q[bi, h, i] @ k[bi, h, j] * attn.scaling - m_i)
                    else:
                        w = g[h] * (fq[i] @ fk[j])
                    num, den = num + w * v[bi, h, j], den + w
                y[bi, h, i] = num / den
    return attn.o_proj(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("mix,length", [("gate", 12), ("lolcats", 12), ("lolcats", 7), ("gate", 13)])
@torch.no_grad()
def test_linear_swa_matches_plain_reference(mix, length):
    """Window 4: 7 tokens take the all-pairs form, 12 and 13 (a partial last block) the blocked one."""
    base = tiny_model("llama", layers=1)
    m = copy.deepcopy(base)
    lb.convert(m, LayerPlan((LayerSpec("linear_swa", 4, 8, mix),)))
    activate_linear(m)
    attn = m.model.layers[0].self_attn
    with torch.no_grad():
        attn.gate.copy_(torch.linspace(-1, 1, attn.gate.numel()))  # per-head factors differ
    x = torch.randn(2, length, 64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(length)[None]
    pe = m.model.rotary_emb(x, position_ids=pos)
    got = attn(hidden_states=x, position_embeddings=pe, attention_mask=None)[0]
    ref = _reference_linear_swa(attn, x, pe)
    assert (got - ref).abs().max() <= 1e-5
    # the factors weigh the terms as documented: gate scales the linear term, lolcats the window term
    a, g = attn.mix_factors()
    s = torch.sigmoid(attn.gate)
    assert torch.equal(a, torch.ones_like(s) if mix == "gate" else s) and torch.equal(g, s if mix == "gate" else torch.ones_like(s))


@pytest.mark.parametrize("length,window", [(50, 4), (64, 8), (9, 4)])
def test_blocked_linear_swa_equals_all_pairs_with_gradients(length, window):
    """The long-prefill form (blocks of `window` queries, running state) against the all-pairs form:
    same outputs and same gradients for q, k, v, the feature maps' outputs and both mix factors."""
    from layerboost.kinds.linear_swa import _all_pairs_linear_swa, _blocked_linear_swa
    g = torch.Generator().manual_seed(1)
    b, nh, hs, f = 2, 3, 8, 10

    def leaf(*shape, positive=False):
        x = torch.randn(*shape, generator=g)
        return (x.softmax(-1) if positive else x).requires_grad_()

    q, k, v = leaf(b, nh, length, hs), leaf(b, nh, length, hs), leaf(b, nh, length, hs)
    fq, fk = leaf(b, nh, length, f, positive=True), leaf(b, nh, length, f, positive=True)
    fw, fl = (torch.rand(1, nh, 1, 1, generator=g).add(0.1).requires_grad_() for _ in range(2))
    inputs = (q, k, v, fq, fk, fw, fl)
    w_out = torch.randn(b, nh, length, hs, generator=g)
    outs = []
    for terms in (_all_pairs_linear_swa, _blocked_linear_swa):
        num, den = terms(q, k, v, fq, fk, fw, fl, window, hs ** -0.5)
        y = num / den
        grads = torch.autograd.grad((y * w_out).sum(), inputs)
        outs.append((y.detach(), grads))
    (y0, g0), (y1, g1) = outs
    assert y0.shape == y1.shape == (b, nh, length, hs)
    assert (y0 - y1).abs().max() <= 1e-5
    for a, c in zip(g0, g1):
        assert (a - c).abs().max() <= 1e-4 * (1 + a.abs().max())
    # the older keys matter here, so a blocked form that dropped its running state would fail
    num, den = _all_pairs_linear_swa(q, k, v, fq, fk, fw, fl * 0, window, hs ** -0.5)
    assert (num / den - y0).abs().max() > 1e-3


@torch.no_grad()
def test_linear_swa_gate_to_minus_infinity_is_swa():
    base = tiny_model("llama")
    x = ids()
    lin = converted(base, ["linear_swa"] * 4)
    activate_linear(lin)
    for layer in lin.model.layers:
        layer.self_attn.gate.fill_(-1e4)  # sigmoid(gate) = 0: the linear term vanishes
    swa = converted(base, ["swa"] * 4)
    assert (lin(x).logits - swa(x).logits).abs().max() <= 1e-5
    # and with a live gate it differs (so the check above can fail)
    activate_linear(lin)
    assert (lin(x).logits - swa(x).logits).abs().max() > 1e-3


def test_mix_is_validated_and_saved(tmp_path):
    with pytest.raises(lb.plan.PlanError, match="mix must be one of"):
        LayerPlan((LayerSpec("linear_swa", 4, None, "bogus"),))
    with pytest.raises(lb.plan.PlanError, match="'mix' only applies"):
        LayerPlan((LayerSpec("swa", 4, None, "gate"),))
    p = LayerPlan((LayerSpec("linear_swa", 4, 8, "lolcats"), LayerSpec("none")))
    p.save(tmp_path / "p.json")
    assert LayerPlan.load(tmp_path / "p.json") == p
