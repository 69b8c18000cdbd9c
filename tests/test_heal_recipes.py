"""The block-wise local stage, top-k logit distillation and the teacher cache (tiny random models):
top-k with k = V is the exact loss, cached targets equal fresh ones, the block stage lowers every modified
block's error (none layers included), exact resume and 2 processes == 1 with the block recipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import tiny_model  # noqa: E402
from test_heal import FAST, ByteTok, _child, _child_main, _corpus, _free_port, _log  # noqa: E402

import layerboost as lb  # noqa: E402
from layerboost import heal as H
from layerboost.heal import losses as L  # noqa: E402
from layerboost.heal import train  # noqa: E402
from layerboost.teacher_cache import TeacherCache, boundary_name, topk_name  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ["softmax", "swa", "none", "linear_swa", "none", "swa"]


def _plan(kinds=KINDS):
    return lb.LayerPlan.from_kinds(kinds, window=8)


def _heal(tmp, out, tokens, kinds=KINDS, **opts):
    return H.heal(tiny_model("llama", layers=len(kinds)), _plan(kinds), data=_corpus(tmp), out=tmp / out,
                  tokens=tokens, tokenizer=ByteTok(), **{**FAST, **opts})


# ---- top-k KL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau,ce", [(1.0, 0.0), (2.0, 0.5)])
def test_topk_with_full_vocabulary_is_the_exact_loss(tau, ce):
    g = torch.Generator().manual_seed(0)
    n, d, v = 50, 16, 40
    hs, ht, w = (torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(v, d, generator=g))
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    args = (labels, w, None, tau, ce, n, n - 7, 16)
    kl, ce_sum, grad = L._kd_chunks(hs, ht, *args)
    full = L._teacher_topk(ht, w, None, tau, v, 16)
    kl_k, ce_k, grad_k = L._kd_chunks(hs, full, *args)
    assert kl_k == pytest.approx(kl.item(), rel=1e-5) and ce_k == ce_sum
    assert torch.allclose(grad_k, grad, atol=1e-6)
    # fewer tokens: the grouped KL is a lower bound of the exact one, and its gradient is the autograd one
    top = L._teacher_topk(ht, w, None, tau, 8, 16)
    kl_8, _, grad_8 = L._kd_chunks(hs, top, *args)
    assert 0 < kl_8 < kl
    z = (hs @ w.T / tau).requires_grad_()
    q = z.log_softmax(-1)
    s = torch.zeros(n, v, dtype=torch.bool).scatter_(1, top[1].long(), True)
    p = top[0].exp()
    r = 1 - p.sum(-1)
    ref = (p * (top[0] - q.gather(1, top[1].long()))).sum() + (r * (r.log() - q.masked_fill(s, -torch.inf).logsumexp(-1))).sum()
    ref.backward()
    assert kl_8 == pytest.approx(ref.item(), rel=1e-5)
    g_ref = (z.grad * tau / n) @ w  # d (tau^2 KL / n) / d hs without CE
    _, _, grad_8_no_ce = L._kd_chunks(hs, top, labels, w, None, tau, 0.0, n, n - 7, 16)
    assert torch.allclose(grad_8_no_ce, g_ref, atol=1e-6)


# ---- teacher cache -----------------------------------------------------------------------------------


def test_cached_targets_equal_fresh_ones(tmp_path):
    torch.manual_seed(0)
    cfg = H.HealConfig(tokens=1000, lora_rank=4, kd_topk=16, seq_len=24)
    h = H.build_hybrid(tiny_model("llama", layers=6), _plan(), cfg)
    ids = torch.randint(1, 128, (3, 24))
    rows = [7, 8, 9]
    cache = TeacherCache(tmp_path / "tc", {"seq_len": 24})
    need = sorted({j for i in h.modified for j in (i, i + 1)})
    with torch.no_grad():
        x, ctx = h.embed(ids)
        x0 = h.run(x, 0, h.prefix, ctx)
        fresh = h.teacher_boundaries(x0, ctx, need)
        with h.teacher():  # the teacher, run the plain way
            plain = h.run(x, 0, len(h.layers), ctx)
        assert torch.equal(h.teacher_boundaries(x0, ctx, [len(h.layers)])[len(h.layers)], plain)
        for j in need:
            cache.save(boundary_name(j), rows, {"h": fresh[j]})
            assert torch.equal(cache.load(boundary_name(j), rows, 24, "cpu")["h"], fresh[j])
        assert torch.equal(cache.load(boundary_name(need[0]), rows[1:], 10, "cpu")["h"], fresh[need[0]][1:, :10])
        assert cache.load(boundary_name(need[0]), [7, 10], 24, "cpu") is None  # row 10 was never stored
        for topk in (16, 0):  # top-k targets, then the exact path's final hidden state
            c = H.HealConfig(tokens=1000, lora_rank=4, kd_topk=topk, seq_len=24)
            new = L._kd_targets(h, x0, ctx, c, rows, None)
            first = L._kd_targets(h, x0, ctx, c, rows, cache)  # computed and stored
            again = L._kd_targets(h, x0, ctx, c, rows, cache)  # read back
            name = topk_name(16, 1.0) if topk else boundary_name(len(h.layers))
            assert cache.file(name, 8).is_file()
            for a, b, f in zip(*(t if isinstance(t, tuple) else (t,) for t in (new, first, again))):
                assert torch.equal(a, b) and torch.equal(a, f)
    assert cache.hits > 0 and cache.misses > 0
    with pytest.raises(lb.CheckpointError, match="another key"):
        (cache.dir / "key.json").write_text(json.dumps({"seq_len": 5}))
        TeacherCache(tmp_path / "tc", {"seq_len": 24})


@pytest.mark.slow
def test_runs_share_the_cache_and_match_an_uncached_run(tmp_path):
    opts = dict(local="block", block_fraction=0.5, kd_topk=32, teacher_cache=str(tmp_path / "tc"))
    a = _heal(tmp_path, "a", 2000, **opts)
    b = _heal(tmp_path, "b", 2000, **opts)  # a second row of a comparison: every full row is read back
    c = _heal(tmp_path, "c", 2000, **{**opts, "teacher_cache": None})
    sa, sb = (json.loads((o / "heal.json").read_text())["teacher_cache"] for o in (a, b))
    assert sa["row_targets_read"] == 0 and sb["row_targets_read"] > 0
    assert sb["row_targets_computed"] == sa["row_targets_computed"] - sb["row_targets_read"]  # only short rows again
    for x, y, z in zip(_log(a), _log(b), _log(c)):
        # cached targets are the computed ones: the same loss up to float sums in another order
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-9)
        assert x["loss"] == pytest.approx(z["loss"], rel=1e-5, abs=1e-9)


def test_cache_space_is_checked_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(10**6, 10**6, 1000))
    with pytest.raises(H.HealConfigError, match="teacher_cache_blocks=False"):
        _heal(tmp_path, "o", 2000, local="block", teacher_cache=str(tmp_path / "tc"))


# ---- the block stage ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_block_stage_lowers_every_modified_block_error(tmp_path):
    out = _heal(tmp_path, "o", 12_000, local="block", block_fraction=1.0, block_lr=3e-3)
    log = [r for r in _log(out) if r.get("stage") == "block"]
    assert set(log[0]["rel"]) == {"1", "2", "3", "4", "5"}  # swa, none, linear_swa, none, swa
    first = {k: sum(r["rel"][k] for r in log[:5]) for k in log[0]["rel"]}
    last = {k: sum(r["rel"][k] for r in log[-5:]) for k in log[0]["rel"]}
    assert all(last[k] < first[k] for k in first), (first, last)
    hyb = lb.load(out)
    assert (hyb.model.layers[3].self_attn.gate + 4).abs().max() > 0  # linear_swa's own parameters trained too
    assert json.loads((out / "heal.json").read_text())["stage_tokens"] == {"block": 12_000, "kd": 0}


def test_config_of_the_recipes():
    assert H.HealConfig(tokens="200k", local="block", block_fraction=0.3).stage_tokens == {"block": 60_000, "kd": 140_000}
    with pytest.raises(H.HealConfigError) as e:
        H.HealConfig(local="layer", block_fraction=2, kd_topk=-1, block_lr=0)
    for word in ("local", "block_fraction", "kd_topk", "block_lr"):
        assert word in str(e.value)
    key = H.HealConfig().resume_key("d", _plan(), "m")["config"]
    assert "local" not in key and "kd_topk" not in key  # runs made before these settings still resume
    assert not {"local", "block_fraction", "block_lr", "kd_topk", "teacher_cache", "teacher_cache_blocks"} & set(
        H.HealConfig().to_dict())  # and comparisons recorded before them still match
    assert H.HealConfig(**H.HealConfig(local="block", kd_topk=8).to_dict()) == H.HealConfig(local="block", kd_topk=8)
    assert H.HealConfig(local="block").resume_key("d", _plan(), "m")["config"]["local"] == "block"


@pytest.mark.slow
def test_block_recipe_resumes_exactly(tmp_path, monkeypatch):
    """Stopped right after its 3rd checkpoint (mid block stage), then resumed: the same log and weights."""
    opts = dict(local="block", block_fraction=0.5, checkpoint_every=2, kd_topk=16, teacher_cache=str(tmp_path / "tc"))
    ref = _heal(tmp_path, "ref", 4000, **{**opts, "teacher_cache": None})
    save, calls = train.save_checkpoint, []

    def stop_after_third(*a, **k):
        save(*a, **k)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", stop_after_third)
    with pytest.raises(KeyboardInterrupt):
        _heal(tmp_path, "cut", 4000, **opts)
    monkeypatch.setattr(train, "save_checkpoint", save)
    assert json.loads((tmp_path / "cut" / "heal_state" / "checkpoint" / "state.json").read_text())["stage"] == "block"
    out = _heal(tmp_path, "cut", 4000, resume=True, **opts)
    a, b = _log(ref), _log(out)
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-9)
    assert b[-1]["train_s"] > b[-2]["train_s"] > 0
    sa, sb = lb.load(ref).state_dict(), lb.load(out).state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


@pytest.mark.slow
def test_block_recipe_two_processes_match_one(tmp_path):
    """The block stage's normaliser is all-reduced before any backward: 2 processes == 1 with the same global batch."""
    opts = dict(FAST, tokens=2000, local="block", block_fraction=0.6, tmp=str(tmp_path), threads=1)
    _corpus(tmp_path)
    port = _free_port()
    procs = [_child(tmp_path / "ddp", {**opts, "batch_size": 2},
                    {"WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port)}) for r in range(2)]
    _child_main(str(tmp_path / "single"), json.dumps(opts))
    for p in procs:
        assert p.wait(timeout=180) == 0, p.stdout.read()
    a, b = _log(tmp_path / "single"), _log(tmp_path / "ddp")
    assert [(r["stage"], r["tokens"]) for r in a] == [(r["stage"], r["tokens"]) for r in b]
    assert any(r["stage"] == "block" for r in a)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-8)
    sa, sb = lb.load(tmp_path / "single").state_dict(), lb.load(tmp_path / "ddp").state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
