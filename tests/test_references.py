"""Hand-written maths against independent references: the analytic distillation gradient against autograd,
and linear_swa against a plain per-query loop (and against swa when its linear term is switched off)."""

import math

import pytest
import torch
import torch.nn.functional as F

from layerboost import heal as H
from layerboost.heal import losses as L
from layerboost.kinds.linear_swa import LinearSlidingWindowAttention
from layerboost.kinds.swa import SlidingWindowAttention
from layerboost.plan import LayerSpec

from conftest import tiny_model


@pytest.mark.parametrize("tau,ce_weight,bias", [(1.0, 0.0, False), (2.0, 0.5, True), (0.7, 1.0, False)])
def test_kd_gradient_equals_autograd(tau, ce_weight, bias):
    """loss = tau^2 * sum KL(softmax(zt/tau) || softmax(zs/tau)) / n_kl + ce_weight * sum CE(zs, y) / n_ce,
    written with torch's own kl_div and cross_entropy, differentiated by autograd."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 12, 30
    hs, ht = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g)
    b = torch.randn(v, generator=g) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    n_kl, n_ce = n + 3, int((labels >= 0).sum()) + 2  # global counts (other processes' positions) differ from n
    kl_sum, ce_sum, grad = L._kd_chunks(hs, ht, labels, w, b, tau, ce_weight, n_kl, n_ce, 8)

    x = hs.clone().requires_grad_()
    zs, zt = F.linear(x, w, b), F.linear(ht, w, b)
    kl = F.kl_div((zs / tau).log_softmax(-1), (zt / tau).log_softmax(-1), log_target=True, reduction="sum")
    ce = F.cross_entropy(zs, labels, ignore_index=-100, reduction="sum")
    (tau**2 * kl / n_kl + ce_weight * ce / n_ce).backward()
    assert kl_sum.item() == pytest.approx(kl.item(), rel=1e-5)
    if ce_weight:
        assert ce_sum.item() == pytest.approx(ce.item(), rel=1e-5)
    torch.testing.assert_close(grad, x.grad, atol=1e-6, rtol=1e-5)


# ---- linear_swa -----------------------------------------------------------------------------------


def _rope(x, cos, sin):  # x (nh, T, hs); cos, sin (T, hs)
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


def linear_swa_reference(attn: LinearSlidingWindowAttention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """One sequence x (T, D), one query at a time:
    y_i = (a sum_{i-W<j<=i} e^{s_ij - m_i} v_j + g sum_{j<=i-W} (phi_q(q_i) . phi_k(k_j)) v_j) / (same with v_j = 1)."""
    t = x.shape[0]
    nh, hs, w = attn.config.num_attention_heads, attn.head_dim, attn.spec.window
    nkv = attn.config.num_key_value_heads
    q = (x @ attn.q_proj.weight.T).view(t, nh, hs).transpose(0, 1)
    k = (x @ attn.k_proj.weight.T).view(t, nkv, hs).transpose(0, 1)
    v = (x @ attn.v_proj.weight.T).view(t, nkv, hs).transpose(0, 1)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    gate = torch.sigmoid(attn.gate)
    a, g = (torch.ones(nh), gate) if attn.mix == "gate" else (gate, torch.ones(nh))
    out = torch.zeros(t, nh, hs)
    for h in range(nh):
        kv = h // (nh // nkv)  # grouped-query: query head h reads key/value head h // groups
        zq = q[h] @ attn.feature_map_q.weight[h] + attn.feature_map_q.bias[h]
        zk = k[kv] @ attn.feature_map_k.weight[h] + attn.feature_map_k.bias[h]
        fq = torch.cat([zq.softmax(-1), (-zq).softmax(-1)], -1)
        fk = torch.cat([zk.softmax(-1), (-zk).softmax(-1)], -1)
        for i in range(t):
            win = [j for j in range(t) if i - w < j <= i]
            old = [j for j in range(t) if j <= i - w]
            s = torch.stack([q[h, i] @ k[kv, j] * attn.scaling for j in win])
            e = torch.exp(s - s.max())
            num = a[h] * sum(e[c] * v[kv, j] for c, j in enumerate(win))
            den = a[h] * e.sum()
            for j in old:
                lin = fq[i] @ fk[j]
                num = num + g[h] * lin * v[kv, j]
                den = den + g[h] * lin
            out[i, h] = num / den
    return out.reshape(t, nh * hs) @ attn.o_proj.weight.T


@pytest.mark.parametrize("mix", ["gate", "lolcats"])
@torch.no_grad()
def test_linear_swa_equals_a_plain_loop(mix, one_thread):
    torch.manual_seed(0)
    model = tiny_model("llama", layers=1)
    orig = model.model.layers[0].self_attn
    attn = LinearSlidingWindowAttention(orig, LayerSpec("linear_swa", 3, mix=mix))
    for p in (attn.feature_map_q.weight, attn.feature_map_q.bias, attn.feature_map_k.weight, attn.feature_map_k.bias):
        p.add_(0.3 * torch.randn_like(p))  # away from the identity init
    attn.gate.copy_(torch.randn_like(attn.gate))
    t = 9
    x = torch.randn(1, t, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(x, torch.arange(t)[None])
    got = attn(x, position_embeddings=(cos, sin))[0][0]
    ref = linear_swa_reference(attn, x[0], cos[0], sin[0])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert not math.isclose(got.norm().item(), SlidingWindowAttention(orig, LayerSpec("swa", 3))(
        x, position_embeddings=(cos, sin))[0][0].norm().item(), rel_tol=1e-4)  # the linear term matters here


@torch.no_grad()
def test_linear_swa_with_gate_at_minus_infinity_is_swa(one_thread):
    model = tiny_model("qwen3", layers=1)
    orig = model.model.layers[0].self_attn
    attn = LinearSlidingWindowAttention(orig, LayerSpec("linear_swa", 4))
    attn.gate.fill_(-math.inf)
    x = torch.randn(2, 11, model.config.hidden_size)
    pe = model.model.rotary_emb(x, torch.arange(11)[None])
    swa = SlidingWindowAttention(orig, LayerSpec("swa", 4))
    torch.testing.assert_close(attn(x, position_embeddings=pe)[0], swa(x, position_embeddings=pe)[0], atol=1e-6, rtol=1e-5)
