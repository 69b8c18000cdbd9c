"""The kind registry: every record is complete, and a new kind needs nothing but its record (and module)."""

import dataclasses

import pytest
import torch

import layerboost as lb
from layerboost import kinds as K
from layerboost.attention import attention_kind, build_attention
from layerboost.bench import kinds_string
from layerboost.cache import HybridCache, expected_cache_bytes
from layerboost.engine import Engine
from layerboost.kinds.linear_swa import LinearWindowLayer
from layerboost.kinds.none import EmptyLayer
from layerboost.kinds.softmax import FullLayer
from layerboost.kinds.swa import WindowLayer
from layerboost.plan import LayerSpec, relative_cost

from conftest import tiny_model

CACHE_CLASSES = {"full": FullLayer, "window": WindowLayer, "linear_window": LinearWindowLayer, None: EmptyLayer}


def spec_of(name: str) -> LayerSpec:
    return LayerSpec(name, 4 if "window" in K.kind(name).options else None)


@pytest.mark.parametrize("name", list(K.KINDS))
def test_every_record_is_complete(name):
    from layerboost.cache import make_cache_layer

    r = K.kind(name)
    orig = tiny_model("llama", layers=1).model.layers[0].self_attn
    mod = build_attention(orig, spec_of(name))
    assert (mod is orig) == (r.module is None)
    assert attention_kind(mod) == name
    assert isinstance(make_cache_layer(spec_of(name)), CACHE_CLASSES[r.cache])
    assert set(r.options) <= {f.name for f in dataclasses.fields(LayerSpec)} - {"kind"}
    assert r.windowed == ("window" in r.options)


def test_letters_and_colours_are_unique():
    assert len({r.letter for r in K.KINDS.values()}) == len(K.KINDS)
    assert len({r.colour for r in K.KINDS.values()}) == len(K.KINDS)


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(KeyError, match="known kinds: softmax, swa"):
        K.kind("sparse")
    assert "unknown kind 'sparse'" in LayerSpec("sparse").problems()[0]


@torch.no_grad()
def test_a_new_kind_needs_only_its_record(monkeypatch, one_thread):
    """A record named `ring` that reuses the swa module: validation, convert, generate with the HF cache, the
    engine's buffers, the byte formulas, letters and counts all follow from the record alone."""
    ring = dataclasses.replace(K.kind("swa"), name="ring", letter="R", colour="#000000")
    monkeypatch.setitem(K.KINDS, "ring", ring)
    kinds = ["softmax", "ring", "none", "softmax"]
    plan = lb.LayerPlan.from_kinds(kinds, window=4)
    ref_plan = lb.LayerPlan.from_kinds([k.replace("ring", "swa") for k in kinds], window=4)
    assert plan.layers[1] == LayerSpec("ring", 4) and plan.counts()["ring"] == 1
    assert kinds_string(plan) == "SR-S"
    m, ref = tiny_model("llama", layers=4), tiny_model("llama", layers=4)
    lb.convert(m, plan)
    lb.convert(ref, ref_plan)
    assert attention_kind(m.model.layers[1].self_attn) == "ring"
    for model in (m, ref):  # no early stop: every sequence runs the full 8 tokens
        model.generation_config.eos_token_id = None
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m(ids).logits, ref(ids).logits)
    cache = HybridCache(plan)
    out = m.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=cache)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=HybridCache(ref_plan)))
    assert cache.nbytes() == expected_cache_bytes(plan, m.config, 2, out.shape[1] - 1)
    assert torch.equal(Engine(m, batch_size=2, max_seq_len=32).generate(ids, 8), out)
    assert relative_cost(plan, m.config, 1024) == relative_cost(ref_plan, m.config, 1024)


@torch.no_grad()
def test_a_new_cacheless_kind_decodes_like_none(monkeypatch, one_thread):
    """A cacheless record other than `none` (here a copy of it) has no engine buffers: the engine skips its
    attention sublayer, and generate, engine and HF alike, equals the `none` model's."""
    zero = dataclasses.replace(K.kind("none"), name="zero", letter="z", colour="#111111")
    monkeypatch.setitem(K.KINDS, "zero", zero)
    m, ref = tiny_model("qwen2", layers=3), tiny_model("qwen2", layers=3)
    lb.convert(m, lb.LayerPlan.from_kinds(["zero", "softmax", "zero"]))
    lb.convert(ref, lb.LayerPlan.from_kinds(["none", "softmax", "none"]))
    engine = Engine(m, batch_size=2, max_seq_len=24)
    assert [c is None for c in engine.caches] == [True, False, True]
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    for model in (m, ref):
        model.generation_config.eos_token_id = None
    want = ref.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=HybridCache(ref.layerboost_plan))
    assert torch.equal(engine.generate(ids, 6), want)
    assert torch.equal(m.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=HybridCache(m.layerboost_plan)), want)
