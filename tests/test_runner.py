"""The one decoder runner: sensitivity, healing and the engine's prefill see the same causal model under
eager and sdpa attention, and the same logits as the model's own forward."""

import copy

import pytest
import torch

import layerboost as lb
from layerboost import LayerSpec
from layerboost import sensitivity as S
from layerboost.engine import Engine
from layerboost.heal import HealConfig, build_hybrid
from layerboost.runner import DecoderRunner, causal_mask, tree_mask

from conftest import tiny_model

KINDS = ["softmax", "swa", "none", "linear_swa", "softmax", "swa"]


def pair(arch="llama", plan=None):
    """The same tiny model under sdpa and under eager attention (optionally converted)."""
    sdpa = tiny_model(arch, layers=len(KINDS))
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager"
    if plan is not None:
        lb.convert(sdpa, plan)
        lb.convert(eager, plan)
    return sdpa, eager


def test_masks_against_explicit_loops():
    m = causal_mask(5, torch.float32, "cpu")[0, 0]
    for i in range(5):
        for j in range(5):
            assert (m[i, j] == 0) == (j <= i)
    segs = torch.tensor([[0, 0, 1, 1, 2, 2]])
    t = tree_mask(segs, torch.float32)[0, 0]
    for i in range(6):
        for j in range(6):
            visible = j <= i and (segs[0, j] == 0 or segs[0, j] == segs[0, i])
            assert (t[i, j] == 0) == bool(visible)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("converted", [False, True])
@torch.no_grad()
def test_runner_equals_model_forward_eager_and_sdpa(arch, converted, one_thread):
    plan = lb.LayerPlan.from_kinds(KINDS, window=4) if converted else None
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, m in zip(("sdpa", "eager"), pair(arch, plan)):
        r = DecoderRunner(m)
        x, ctx = r.embed(ids)
        logits[name] = r.logits(r.run(x, ctx))
        ref = m(ids, use_cache=False).logits
        torch.testing.assert_close(logits[name], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sensitivity_is_causal_under_eager(one_thread):
    """Scores of the same items agree under eager and sdpa (before the runner, eager layers got no mask at
    all in the analysis, so every position saw the future)."""
    from layerboost.evaluate import prepare_tasks

    tok = lb.load_model("smollm2-135m")[1]
    items = S.items_from_tasks(prepare_tasks(tok, ["piqa", "arc_easy"], limit=3, seed=0))
    sdpa = tiny_model("llama", layers=4, vocab=len(tok))
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    v = (LayerSpec("none"), LayerSpec("swa", 4))
    a = S.layer_sensitivity(sdpa, items, variants=v, progress=False, batch_tokens=512)
    b = S.layer_sensitivity(eager, items, variants=v, progress=False, batch_tokens=512)
    for ra, rb in zip([a["base"]] + a["layers"], [b["base"]] + b["layers"]):
        assert ra["loglikelihoods"] == pytest.approx(rb["loglikelihoods"], abs=1e-4)


@torch.no_grad()
def test_heal_teacher_and_student_agree_eager_and_sdpa(one_thread):
    plan = lb.LayerPlan.from_kinds(KINDS, window=4)
    ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    outs = []
    for m in pair():
        h = build_hybrid(m, plan, HealConfig(tokens=1024, lora_layers="modified"))
        x, ctx = h.embed(ids)
        x0 = h.run(x, 0, h.prefix, ctx)
        student = h.run(x0, h.prefix, len(h.layers), ctx)
        teacher = h.teacher_boundaries(x0, ctx, [len(h.layers)])[len(h.layers)]
        outs.append((student, teacher))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_engine_prefill_eager_and_sdpa(one_thread):
    plan = lb.LayerPlan.from_kinds(KINDS, window=4)
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    got = []
    for m in pair(plan=plan):
        got.append(Engine(m, batch_size=2, max_seq_len=16).prefill(ids))
        torch.testing.assert_close(got[-1], m(ids, use_cache=False).logits[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], got[1], atol=1e-5, rtol=1e-5)
