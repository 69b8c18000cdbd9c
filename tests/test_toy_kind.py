"""A kind defined in this file alone: registered, then run through convert, heal, the engine, save/load and the
exports' refusal. `scaled_swa` is swa times one learned scalar, so its own parameter must train and be saved."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import layerboost as lb
from layerboost import kinds as K
from layerboost.attention import attention_kind
from layerboost.engine import Engine
from layerboost.export import ExportError
from layerboost.heal import HealConfig, build_hybrid, heal
from layerboost.heal.stages import stage_params
from layerboost.heal.student import heal_params
from layerboost.kinds.common import attention_weight_elements
from layerboost.kinds.swa import SlidingWindowAttention, WindowKV, WindowLayer, window_tokens

from conftest import ByteTok, tiny_model

NAME = "scaled_swa"
WINDOW = 4
KINDS = ["softmax", NAME, "none", NAME]


class ScaledWindowAttention(SlidingWindowAttention):
    """swa's output times a learned scalar `scale` (starts at 1)."""

    OWN = ("scale",)

    def __init__(self, orig: nn.Module, spec):
        super().__init__(orig, spec)
        self.scale = nn.Parameter(torch.ones((), device=orig.q_proj.weight.device))

    def forward(self, hidden_states, **kwargs):
        out, weights = super().forward(hidden_states, **kwargs)
        return out * self.scale, weights


class ScaledWindowKV(WindowKV):
    """swa's ring and decode step, the output times the module's scale."""

    def step(self, attn, *args):
        return super().step(attn, *args) * attn.scale


TOY = K.Kind(NAME, "swa times a learned scalar", module=ScaledWindowAttention, cache="window",
             cache_layer=lambda spec: WindowLayer(spec.window), decode_buffers=ScaledWindowKV,
             cached_tokens=window_tokens, weight_elements=attention_weight_elements, options=("window",),
             letter="X", colour="#123456")


@pytest.fixture
def toy():
    K.register(TOY)
    yield TOY
    K.unregister(NAME)


def converted(scale: float | None = None):
    m = tiny_model("llama", layers=4)
    lb.convert(m, lb.LayerPlan.from_kinds(KINDS, window=WINDOW))
    if scale is not None:
        with torch.no_grad():
            for layer in m.model.layers:
                if isinstance(layer.self_attn, ScaledWindowAttention):
                    layer.self_attn.scale.fill_(scale)
    return m.eval()


def test_the_registry_knows_it(toy):
    assert NAME in K.WINDOWED and NAME in K.NAMES and NAME not in K.CACHELESS
    assert lb.LayerSpec(NAME).problems()  # windowed: a window is required
    with pytest.raises(ValueError, match="taken"):
        K.register(toy)
    with pytest.raises(KeyError, match="known kinds: softmax, swa, linear_swa, none, scaled_swa"):
        K.kind("nope")


@torch.no_grad()
def test_convert_and_the_engine(toy, one_thread):
    """Converted: its module in layers 1 and 3; the engine's logits, prompt and every decoded token (past the
    window), equal the full forward's over the same tokens; the scale matters (a plain swa model differs)."""
    m = converted(scale=0.5)
    assert [attention_kind(layer.self_attn) for layer in m.model.layers] == KINDS
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    out = Engine(m, batch_size=2, max_seq_len=32).generate(ids, 10)
    e = Engine(m, batch_size=2, max_seq_len=32)
    steps = [e.prefill(ids)] + [e.decode_one_token(out[:, j : j + 1]) for j in range(6, 15)]
    full = m(out).logits
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 5:15], atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.stack(steps, 1).argmax(-1), out[:, 6:])
    plain = tiny_model("llama", layers=4)
    lb.convert(plain, lb.LayerPlan.from_kinds([k.replace(NAME, "swa") for k in KINDS], window=WINDOW))
    assert (plain(out).logits - full).abs().max() > 1e-3


def test_heal_trains_and_saves_its_parameter(toy, tmp_path, one_thread):
    plan = lb.LayerPlan.from_kinds(KINDS, window=WINDOW)
    cfg = HealConfig(tokens="1k", lora_rank=4, lora_alpha=8)
    h = build_hybrid(tiny_model("llama", layers=4), plan, cfg)
    scales = {n: p for n, p in heal_params(h).items() if n.endswith(".scale")}  # checkpointed
    assert len(scales) == 2 and all(".layers.1." in n or ".layers.3." in n for n in scales)
    assert h.windowed == [1, 3]  # stage 1 transfers its attention, and trains its scale there
    assert {id(p) for p in scales.values()} <= {id(p) for p in stage_params(h, "attn", cfg)}

    words = "the of and a to in was he she it that his her with as had for not but at on said".split()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(words), (6_000,), generator=g).tolist()
    (tmp_path / "train.txt").write_text("\n\n".join(" ".join(words[i] for i in idx[j:j + 60])
                                                   for j in range(0, len(idx), 60)))
    out = heal(tiny_model("llama", layers=4), plan, data=tmp_path / "train.txt", out=tmp_path / "healed",
               tokens=2048, tokenizer=ByteTok(), seq_len=32, batch_size=4, progress=False, checkpoint_every=0,
               lora_rank=4, lora_alpha=8)
    healed = lb.load(out)
    trained = [layer.self_attn.scale.item() for layer in healed.model.layers if attention_kind(layer.self_attn) == NAME]
    assert len(trained) == 2 and all(s != 1.0 for s in trained)  # trained, saved and read back
    lb.save(healed, tmp_path / "again")
    again = lb.load(tmp_path / "again")
    ids = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, healed(ids).logits)


@pytest.mark.parametrize("fmt", ["transformers", "deci", "gguf"])
def test_every_export_refuses_it(toy, tmp_path, fmt):
    target = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    with pytest.raises(ExportError, match=rf"layers \[1, 3\] are {NAME}: the {fmt} format has no {NAME} layer; "
                                          r"re-plan those layers as (\w+ or )*\w+"):
        lb.export(converted(), target, format=fmt)
    assert not target.exists()


def test_a_parameter_not_named_in_own_is_refused(toy):
    class Unnamed(ScaledWindowAttention):
        OWN = ()

    K.register(dataclasses.replace(toy, name="unnamed", module=Unnamed, letter="U", colour="#654321"))
    try:
        with pytest.raises(TypeError, match=r"\['scale'\].*neither the original attention's nor named in its OWN"):
            lb.convert(tiny_model("llama", layers=2), lb.LayerPlan.from_kinds(["softmax", "unnamed"], window=WINDOW))
    finally:
        K.unregister("unnamed")
