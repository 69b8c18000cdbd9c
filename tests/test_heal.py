"""Healing on tiny random models: stage 1 lowers the attention MSE, stage 2 lowers the KL, exact
resume after SIGKILL, 2-process data parallel == 1 process, merge-and-reload equality, budgets, data refusal.

This file doubles as the child-process entry point for the kill and multi-process tests:
    python tests/test_heal.py OUT_DIR JSON_OPTIONS
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import ByteTok, tiny_model  # noqa: E402

import layerboost as lb  # noqa: E402
from layerboost.corpus import PackedRows, TrainingDataError, documents, parse_tokens  # noqa: E402
from layerboost.cli.heal import add_heal_arguments  # noqa: E402
from layerboost.heal import (HealConfig, HealConfigError, attention_mse,  # noqa: E402
                             build_hybrid, distill_kl, heal, merge_and_save)
from layerboost.heal.train import lr_at  # noqa: E402

KINDS = ["softmax", "swa", "none", "linear_swa"]
WINDOW = 8
TEXT = (Path(os.environ.get("LAYERBOOST_DATA_DIR", HERE.parent.parent / "shared" / "data"))
        / "corpus" / "novels" / "Anon_Clara_1864.txt")


pytestmark = pytest.mark.usefixtures("one_thread")


def _plan():
    return lb.LayerPlan.from_kinds(KINDS, window=WINDOW)


def _corpus(tmp: Path) -> Path:
    """A 200 KB training file: a real novel when the shared corpus exists, else generated prose."""
    f = tmp / "train.txt"
    if not f.exists():
        if TEXT.is_file():
            f.write_bytes(TEXT.read_bytes()[:200_000])
        else:
            words = "the of and a to in was he she it that his her with as had for not but at on said".split()
            g = torch.Generator().manual_seed(0)
            idx = torch.randint(len(words), (40_000,), generator=g).tolist()
            f.write_text("\n\n".join(" ".join(words[i] for i in idx[j:j + 80]) for j in range(0, len(idx), 80)))
    return f


FAST = dict(seq_len=64, batch_size=4, progress=False, checkpoint_every=0, lora_rank=4, lora_alpha=8)


def _heal(tmp, out, tokens, **opts):
    return heal(tiny_model("llama", layers=4), _plan(), data=_corpus(tmp), out=tmp / out, tokens=tokens,
                tokenizer=ByteTok(), **{**FAST, **opts})


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "heal_state" / "log.jsonl").read_text().splitlines()]


def _heldout(n=4, t=64) -> torch.Tensor:
    text = _corpus_text()[-20_000:]
    ids = ByteTok()(text)["input_ids"]
    return torch.tensor(ids[: n * t]).view(n, t)


def _corpus_text() -> str:
    return TEXT.read_text(errors="replace")[200_000:260_000] if TEXT.is_file() else "held out text " * 2000


# ---- configuration and data --------------------------------------------------------------------------


def test_parse_tokens():
    assert parse_tokens("10M") == 10_000_000
    assert parse_tokens("1.5M") == 1_500_000
    assert parse_tokens("200k") == 200_000
    assert parse_tokens(5000) == 5000
    for bad in ("abc", "0", "-3k", "1.00001k"):
        with pytest.raises(ValueError):
            parse_tokens(bad)


def test_config_reports_every_problem():
    with pytest.raises(HealConfigError) as e:
        HealConfig(tokens="x", seq_len=0, lr=-1, precision="fp8", lora_layers="some")
    msg = str(e.value)
    for word in ("tokens", "seq_len", "lr", "precision", "lora_layers"):
        assert word in msg
    assert HealConfig(tokens="200k").stage_tokens == {"attn": 50_000, "kd": 150_000}
    assert HealConfig(tokens="200k", attn_distill=False).stage_tokens == {"attn": 0, "kd": 200_000}


def test_resume_keys_of_earlier_versions_still_match():
    """A key recorded when `fsdp` existed (always false then) equals today's key after upgrade_key; a key that
    recorded the removed setting with another value does not."""
    plan = lb.LayerPlan.from_kinds(KINDS, window=8)
    key = json.loads(json.dumps(HealConfig(tokens="10k").resume_key("d", plan, "m")))
    old = json.loads(json.dumps(key))
    old["config"]["fsdp"] = False
    assert old != key and HealConfig.upgrade_key(old) == key
    other = json.loads(json.dumps(key))
    other["config"]["fsdp"] = True
    assert HealConfig.upgrade_key(other) != key


def test_learning_rate_schedules():
    """Values read off each shape by hand: 10 steps, 2 of warm-up (0.5, 1.0 of the peak), then 8 steps from the
    peak toward 10% of it (step k of 8 after warm-up: cosine 0.1 + 0.45 (1 + cos(pi k / 8)), linear 1 - 0.9 k / 8)."""
    peak = 2.0
    for schedule in ("cosine", "linear", "constant"):
        assert [lr_at(s, 10, peak, 0.2, schedule) for s in (0, 1, 2)] == pytest.approx([1.0, 2.0, 2.0])
    assert lr_at(6, 10, peak, 0.2, "cosine") == pytest.approx(peak * 0.55)  # halfway: cos(pi/2) = 0
    assert lr_at(4, 10, peak, 0.2, "cosine") == pytest.approx(peak * (0.1 + 0.45 * (1 + 2 ** -0.5)))
    assert lr_at(6, 10, peak, 0.2, "linear") == pytest.approx(peak * 0.55)
    assert lr_at(4, 10, peak, 0.2, "linear") == pytest.approx(peak * (1 - 0.9 * 2 / 8))
    assert lr_at(9, 10, peak, 0.2, "linear") == pytest.approx(peak * (1 - 0.9 * 7 / 8))
    assert lr_at(10, 10, peak, 0.2, "cosine") == lr_at(50, 10, peak, 0.2, "linear") == pytest.approx(0.2)
    assert {lr_at(s, 10, peak, 0.2, "constant") for s in range(2, 12)} == {peak}
    with pytest.raises(HealConfigError, match="schedule must be one of cosine, linear, constant"):
        HealConfig(tokens="10k", schedule="step")
    assert "schedule" not in HealConfig(tokens="10k").to_dict()  # the first recipe's value: old keys still match
    assert HealConfig(tokens="10k", schedule="linear").to_dict()["schedule"] == "linear"


def test_schedule_shapes_stage_2_only(tmp_path):
    out = _heal(tmp_path, "o", 1280, attn_fraction=0.4, schedule="constant", warmup=0.0, lr=2e-3, attn_lr=1e-3)
    log = _log(out)
    attn = [r["lr"] for r in log if r.get("stage") == "attn"]
    kd = [r["lr"] for r in log if r.get("stage") == "kd"]
    assert len(attn) == 2 and len(kd) == 3
    assert attn[0] == pytest.approx(1e-3) and attn[1] == pytest.approx(1e-3 * 0.55)  # stage 1: cosine
    assert kd == pytest.approx([2e-3] * 3)


def test_cli_arguments_build_a_config():
    import argparse

    p = argparse.ArgumentParser()
    add_heal_arguments(p)
    a = p.parse_args(["--model", "m", "--plan", "p.json", "--data", "d", "--out", "o", "--tokens", "1.5M",
                      "--no-attn-distill", "--lora-targets", "q_proj,v_proj"])
    assert a.tokens == "1.5M" and a.attn_distill is False and a.lora_targets == "q_proj,v_proj" and a.seq_len == 256


def test_every_heal_setting_is_an_option_with_its_default():
    """The CLI's heal options are made from HealConfig's fields: each one is reachable, with HealConfig's default and
    its help text, and a value given on the command line arrives in the config."""
    import argparse
    import dataclasses

    p = argparse.ArgumentParser()
    add_heal_arguments(p)
    a = p.parse_args(["--model", "m", "--plan", "p.json", "--data", "d", "--out", "o", "--tokens", "1M"])
    fields = dataclasses.fields(HealConfig)
    assert len(fields) >= 38 and all(f.metadata.get("help") for f in fields)
    built = HealConfig(**{f.name: getattr(a, f.name) for f in fields})
    assert built == HealConfig(tokens="1M", device=built.device)  # every default, device resolved by its option
    a = p.parse_args(["--model", "m", "--plan", "p.json", "--data", "d", "--out", "o", "--tokens", "1M", "--warmup", "0.2",
                      "--no-train-attention-params", "--max-grad-norm", "0", "--shuffle-rows", "8", "--weights-dtype",
                      "bfloat16", "--precision", "bf16"])
    c = HealConfig(**{f.name: getattr(a, f.name) for f in fields})
    assert (c.warmup, c.train_attention_params, c.max_grad_norm, c.shuffle_rows, c.weights_dtype) == (
        0.2, False, 0.0, 8, "bfloat16")
    helps = p.format_help()
    assert "--segment-chars" in helps and "share of each stage's steps" in helps


def test_refuses_evaluation_splits(tmp_path):
    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    (data / "piqa" / "validation.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n')
    (data / "corpus").mkdir()
    (data / "corpus" / "a.txt").write_text("some prose\n" * 100)
    for bad in (data / "piqa" / "validation.jsonl", data):
        with pytest.raises(TrainingDataError, match="evaluation split"):
            heal(tiny_model(), _plan(), data=bad, out=tmp_path / "o", tokens=1000, tokenizer=ByteTok(),
                 data_dir=str(data), progress=False)
    with pytest.raises(TrainingDataError, match="evaluation split"):
        documents("hub:cais/mmlu:all:test", seed=0)
    assert next(iter(documents(str(data / "corpus"), seed=0, data_dir=str(data)))).startswith("some prose")


def test_packing_is_deterministic_and_resumable(tmp_path):
    f = _corpus(tmp_path)

    def rows(seed):
        return PackedRows(lambda: documents(str(f), seed=seed, segment_chars=2000), ByteTok(), 64, seed, 16)

    a = [next(rows(0)) for _ in range(1)]
    r1, r2 = rows(0), rows(0)
    first = [next(r1) for _ in range(40)]
    r2.skip(25)
    assert all(torch.equal(x, next(r2)) for x in first[25:])
    assert all(len(x) == 64 for x in first) and torch.equal(a[0], first[0])
    assert not torch.equal(torch.stack(first[:10]), torch.stack([next(rows(1)) for _ in range(10)]))


def test_synthetic_retrieval_rows_resume_and_reach_the_heal(tmp_path):
    from layerboost.corpus import retrieval_rows

    f, tok = _corpus(tmp_path), ByteTok()

    def rows():
        return PackedRows(lambda: documents(str(f), seed=0, segment_chars=2000), tok, 128, 0, 16,
                          retrieval_rows(tok, 0.5, seed=0))

    r1, r2 = rows(), rows()
    first = [next(r1) for _ in range(30)]
    r2.skip(12)
    assert all(torch.equal(x, next(r2)) for x in first[12:]) and all(len(x) == 128 for x in first)
    asked = [tok.decode(x.tolist()) for x in first]
    assert 6 <= sum("code is" in t and t.rstrip().endswith(".") and "code was" in t for t in asked) <= 24
    assert "retrieval_share" not in HealConfig().to_dict()  # earlier runs' resume keys still match
    plan = _plan()
    assert HealConfig(retrieval_share=0.1).resume_key("d", plan, "m") != HealConfig().resume_key("d", plan, "m")
    with pytest.raises(HealConfigError, match="retrieval_share must be in"):
        HealConfig(retrieval_share=1.5)
    out = _heal(tmp_path, "o", 600, retrieval_share=0.5)
    assert json.loads((out / "heal_state" / "config.json").read_text())["config"]["retrieval_share"] == 0.5


def test_rows_no_longer_than_the_window_are_named():
    from layerboost.heal.config import window_note

    plan = lb.LayerPlan.from_kinds(["softmax", "swa", "none", "swa"], window=512)
    assert "never reach past the plan's window of 512" in window_note(HealConfig(seq_len=512), plan)
    assert "--seq-len 2048" in window_note(HealConfig(seq_len=256), plan)
    assert window_note(HealConfig(seq_len=513), plan) is None
    assert window_note(HealConfig(seq_len=64), lb.LayerPlan.from_kinds(["softmax", "none"])) is None


def test_budget_stops_exactly(tmp_path):
    out = _heal(tmp_path, "o", 1000, attn_fraction=0.3)
    log = _log(out)
    by_stage = {s: [r for r in log if r["stage"] == s] for s in ("attn", "kd")}
    assert by_stage["attn"][-1]["tokens"] == 300 and by_stage["kd"][-1]["tokens"] == 700
    assert [r["step"] for r in by_stage["kd"]] == [1, 2, 3]  # 256 + 256 + 188 tokens
    assert lb.load(out).layerboost_plan.kinds == KINDS


# ---- the two stages ------------------------------------------------------------------------------------


def test_stage1_reduces_attention_mse(tmp_path):
    ids = _heldout()
    teacher = tiny_model("llama", layers=4)
    unhealed = tiny_model("llama", layers=4)
    lb.convert(unhealed, _plan())
    windowed = [1, 3]
    before = attention_mse(teacher, unhealed, ids, windowed)
    out = _heal(tmp_path, "o", 16_000, attn_fraction=1.0, attn_lr=3e-3)
    after = attention_mse(teacher, lb.load(out), ids, windowed)
    for i in windowed:
        assert after[i] < 0.8 * before[i], (before, after)
    log = [r for r in _log(out) if r["stage"] == "attn"]
    assert sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])


@pytest.mark.slow
def test_stage2_reduces_kl(tmp_path):
    ids = _heldout()
    teacher = tiny_model("llama", layers=4)
    unhealed = tiny_model("llama", layers=4)
    lb.convert(unhealed, _plan())
    before = distill_kl(teacher, unhealed, ids)
    out = _heal(tmp_path, "o", 16_000, attn_distill=False, lr=3e-3)
    after = distill_kl(teacher, lb.load(out), ids)
    assert after < 0.8 * before, (before, after)


def test_merge_and_reload_equals_unmerged(tmp_path):
    torch.manual_seed(1)
    h = build_hybrid(tiny_model("llama", layers=4), _plan(), HealConfig(tokens=1000, lora_rank=4))
    with torch.no_grad():  # a trained-looking adapter and gate so a no-op merge cannot pass
        for name, p in h.peft_model.named_parameters():
            if "lora_B" in name or name.endswith(".gate"):
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(1, 128, (2, 40))
    h.peft_model.eval()
    with torch.no_grad():
        unmerged = h.peft_model(input_ids=ids, use_cache=False).logits
        with h.teacher():
            teacher = h.peft_model(input_ids=ids, use_cache=False).logits
    ref = tiny_model("llama", layers=4)
    with torch.no_grad():
        assert torch.allclose(teacher, ref(input_ids=ids).logits, atol=1e-5)  # teacher mode == original model
    merged = merge_and_save(h, tmp_path / "m")
    reloaded = lb.load(tmp_path / "m")
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, use_cache=False).logits
        reloaded_logits = reloaded(input_ids=ids, use_cache=False).logits
    assert torch.allclose(unmerged, merged_logits, atol=1e-4)
    assert torch.allclose(merged_logits, reloaded_logits, atol=1e-6)
    assert not torch.allclose(unmerged, teacher, atol=1e-3)


def test_snapshots_at_probes_rebuild_the_model_at_each_point(tmp_path):
    """heal(snapshots=True) saves the trainable parameters at every probe; loading the last one into a fresh
    hybrid and merging gives the saved healed model, loading the first one gives the unhealed conversion."""
    from layerboost.heal import load_snapshot
    from layerboost.surgery import CheckpointError

    out = _heal(tmp_path, "o", 1024, attn_fraction=0.25, probe_rows=_heldout(2, 32), probe_at=(0.0, 0.5, 1.0),
                snapshots=True, precision="bf16")
    probes = [r for r in _log(out) if r.get("probe")]
    snaps = out / "heal_state" / "snapshots"
    assert [p["snapshot"] for p in probes] == [f"{p['tokens']}.safetensors" for p in probes]
    assert [p["tokens"] for p in probes][0] == 0 and probes[-1]["tokens"] == 1024
    ids = torch.randint(1, 128, (2, 40))
    cfg = HealConfig(tokens=1024, **{**FAST, "attn_fraction": 0.25})
    with torch.no_grad():
        healed = lb.load(out)(input_ids=ids, use_cache=False).logits
        unhealed = tiny_model("llama", layers=4)
        lb.convert(unhealed, _plan())
        unhealed = unhealed(input_ids=ids, use_cache=False).logits
    for name, want in ((probes[-1]["snapshot"], healed), (probes[0]["snapshot"], unhealed)):
        h = build_hybrid(tiny_model("llama", layers=4), _plan(), cfg)
        load_snapshot(snaps / name, h)
        with torch.no_grad():
            got = h.peft_model.merge_and_unload()(input_ids=ids, use_cache=False).logits
        assert torch.allclose(got, want, atol=1e-4), (name, (got - want).abs().max())
    assert not torch.allclose(healed, unhealed, atol=1e-3)
    other = build_hybrid(tiny_model("llama", layers=4), _plan(), HealConfig(tokens=1024, **{**FAST, "lora_rank": 2}))
    with pytest.raises(CheckpointError, match="another model, plan or LoRA settings"):
        load_snapshot(snaps / probes[-1]["snapshot"], other)


def test_bf16_weights_train_fp32_adapters(tmp_path):
    """weights_dtype bfloat16: frozen weights of student and teacher in bf16, the trainable parameters in fp32
    (peft's LoRA and the kinds' own), the healed model saved in bf16; it heals (KL falls); fp32 precision refused."""
    import layerboost.heal.train as T

    seen = {}
    orig = T._fp32_masters

    def spy(h):
        orig(h)
        seen["trainable"] = {p.dtype for p in T.heal_params(h).values()}
        seen["frozen"] = {p.dtype for n, p in h.peft_model.named_parameters() if "mlp.up_proj.base_layer" in n}

    T._fp32_masters = spy
    try:
        out = _heal(tmp_path, "o", 4096, weights_dtype="bfloat16", precision="bf16", probe_rows=_heldout(2, 32),
                    probe_at=(0.0, 1.0), lr=3e-3)
    finally:
        T._fp32_masters = orig
    assert seen == {"trainable": {torch.float32}, "frozen": {torch.bfloat16}}
    assert next(lb.load(out).parameters()).dtype == torch.bfloat16
    probes = [r for r in _log(out) if r.get("probe")]
    assert probes[-1]["kl"] < probes[0]["kl"]
    with pytest.raises(HealConfigError, match="set precision bf16"):
        HealConfig(weights_dtype="bfloat16", precision="fp32")


# ---- long-job behaviour (child processes) ---------------------------------------------------------------


def _child(out: Path, opts: dict, env: dict | None = None) -> subprocess.Popen:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, str(HERE / "test_heal.py"), str(out), json.dumps(opts)], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _child_main(out: str, opts: str) -> None:
    o = json.loads(opts)
    torch.set_num_threads(o.pop("threads", 1))
    tmp = Path(o.pop("tmp"))
    heal(tiny_model("llama", layers=4), _plan(), data=_corpus(tmp), out=out, tokenizer=ByteTok(), **o)


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_loss_curve(tmp_path):
    opts = dict(FAST, tokens=40_000, attn_fraction=0.1, checkpoint_every=3, tmp=str(tmp_path), threads=1)
    _corpus(tmp_path)
    killed = tmp_path / "killed"
    p = _child(killed, opts)
    state = killed / "heal_state" / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:  # kill once stage 2 has a mid-stage checkpoint
        try:
            s = json.loads(state.read_text())
            if s["stage"] == "kd" and s["step"] >= 6:
                break
        except (OSError, json.JSONDecodeError, KeyError):
            pass  # not written yet, or read mid-write: poll again (the assertions after the kill check the run)
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed: raise its budget\n" + p.stdout.read()
    p.send_signal(signal.SIGKILL)
    p.wait()
    at_kill = _log(killed)
    ck = json.loads(state.read_text())
    assert at_kill[-1]["step"] - ck["step"] <= opts["checkpoint_every"] or at_kill[-1]["stage"] != "kd"
    with pytest.raises(FileExistsError):
        _child_main(str(killed), json.dumps({k: v for k, v in opts.items()}))
    ref = tmp_path / "ref"
    _child_main(str(ref), json.dumps(opts))
    _child_main(str(killed), json.dumps({**opts, "resume": True}))
    a, b = _log(ref), _log(killed)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x["stage"], x["step"], x["tokens"]) == (y["stage"], y["step"], y["tokens"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-9)
    ra, rb = lb.load(ref), lb.load(killed)
    for (n, t), (_, u) in zip(ra.state_dict().items(), rb.state_dict().items()):
        assert torch.allclose(t, u, atol=1e-6), n


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = _heal(tmp_path, "o", 600, checkpoint_every=1)
    (out / "heal_state" / "checkpoint" / "params.safetensors").write_bytes(b"garbage")
    with pytest.raises(lb.CheckpointError, match="corrupt"):
        _heal(tmp_path, "o", 600, checkpoint_every=1, resume=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(out: Path, opts: dict, world: int = 2) -> list[subprocess.Popen]:
    port = _free_port()
    return [_child(out, opts, {"WORLD_SIZE": str(world), "RANK": str(r), "LOCAL_RANK": str(r),
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(world)]


def _same_run(a: Path, b: Path) -> None:
    """Two heals agree: the same steps, losses within 1e-4 relative (float sums in another order: the gradients
    of 2 processes are summed by FSDP2), weights within 1e-5; and healing changed the weights by far more."""
    la, lb_ = _log(a), _log(b)
    assert [(r["stage"], r["tokens"]) for r in la] == [(r["stage"], r["tokens"]) for r in lb_]
    for x, y in zip(la, lb_):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-8)
    sa, sb = lb.load(a).state_dict(), lb.load(b).state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
    base = tiny_model("llama", layers=4).state_dict()
    moved = max((sa[k] - base[k]).abs().max().item() for k in base if k in sa and "mlp" in k)
    assert moved > 1e-3  # the MLP adapters trained (a rank that skipped them would still match within 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["replicate", "shard"])
def test_two_processes_match_one(tmp_path, parallel):
    """FSDP2 under 2 processes (replicated, or sharded: each rank holds half of every layer) == 1 process with
    the same global batch; the budget's last step gives the ranks unequal rows (and micro-batches)."""
    opts = dict(FAST, tokens=3000, attn_fraction=0.4, tmp=str(tmp_path), threads=1)
    _corpus(tmp_path)
    procs = _ranks(tmp_path / "ddp", {**opts, "batch_size": 2, "parallel": parallel})
    _child_main(str(tmp_path / "single"), json.dumps(opts))
    for p in procs:
        assert p.wait(timeout=180) == 0, p.stdout.read()
    _same_run(tmp_path / "single", tmp_path / "ddp")
    assert json.loads((tmp_path / "ddp" / "heal.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_killed_two_process_heal_resumes(tmp_path):
    """Both ranks of a sharded heal killed mid-stage-2; rerun with --resume, the result equals an uninterrupted
    single-process heal (the checkpoint holds full tensors: any world size resumes any other)."""
    opts = dict(FAST, tokens=6000, attn_fraction=0.2, checkpoint_every=2, tmp=str(tmp_path), threads=1,
                parallel="shard")
    _corpus(tmp_path)
    killed = tmp_path / "killed"
    procs = _ranks(killed, {**opts, "batch_size": 2})
    state = killed / "heal_state" / "checkpoint" / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline and all(p.poll() is None for p in procs):
        with contextlib.suppress(OSError, json.JSONDecodeError, KeyError):  # a state file caught mid-write
            s = json.loads(state.read_text())
            if s["stage"] == "kd" and s["step"] >= 4:
                break
        time.sleep(0.02)
    assert all(p.poll() is None for p in procs), "the run finished before it could be killed: raise its budget"
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (killed / "heal.json").exists()
    for p in _ranks(killed, {**opts, "batch_size": 2, "resume": True}):
        assert p.wait(timeout=180) == 0, p.stdout.read()
    _child_main(str(tmp_path / "ref"), json.dumps(opts))
    _same_run(tmp_path / "ref", killed)


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])


def test_the_cpu_allocator_note(monkeypatch):
    """`layerboost heal` on CPU with glibc's malloc names jemalloc and its memory risk (with the way back from a
    kill); nothing on CUDA or once it is loaded."""
    import layerboost.cli.heal as cli

    monkeypatch.setattr(cli, "allocator", lambda: "glibc")
    note = cli.allocator_note("cpu")
    assert "LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1" in note
    assert "memory limit" in note and "--resume" in note and "\n" not in note
    assert cli.allocator_note("cuda:0") is None
    monkeypatch.setattr(cli, "allocator", lambda: "jemalloc")
    assert cli.allocator_note("cpu") is None


def test_the_long_budget_schedule_note():
    """A stage 2 of 1M tokens or more on the default schedule is told what the schedule study measured; a
    shorter one, or one that already chose its schedule or rate, is not."""
    import layerboost.cli.heal as cli
    from layerboost.heal import HealConfig

    note = cli.schedule_note(HealConfig(tokens="2M"))  # stage 2: 75% of 2M
    assert "--schedule linear" in note and "\n" not in note
    assert cli.schedule_note(HealConfig(tokens="1M")) is None  # stage 2 is 750k
    assert cli.schedule_note(HealConfig(tokens="1M", attn_distill=False)) is not None
    assert cli.schedule_note(HealConfig(tokens="2M", schedule="linear")) is None
    assert cli.schedule_note(HealConfig(tokens="2M", lr=1e-3)) is None


def test_hints_link_to_sections_that_exist(monkeypatch):
    """The heal hints quote no numbers; they link to the section that holds them, and that section exists."""
    import re

    import layerboost.cli.heal as cli
    from layerboost.heal import HealConfig

    doc = Path(__file__).resolve().parents[1] / cli.HEALING_DOC
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in
               re.findall(r"^#+ (.+)$", doc.read_text(), flags=re.M)}
    monkeypatch.setattr(cli, "allocator", lambda: "glibc")
    for note in (cli.allocator_note("cpu"), cli.schedule_note(HealConfig(tokens="2M"))):
        assert cli.HEALING_DOC in note and note.split("#")[-1].rstrip(")") in anchors


def test_a_diverging_heal_stops_and_saves_no_model(tmp_path):
    """A loss that goes to NaN / inf ends the heal with HealDivergedError before anything is saved as healed; a
    non-finite learning rate or clipping norm is refused before any work."""
    from layerboost.heal.config import HealDivergedError

    with pytest.raises(HealDivergedError, match="the heal diverged: stage kd step"):
        _heal(tmp_path, "o", 4096, attn_distill=False, lr=1e30, max_grad_norm=0.0)
    assert not (tmp_path / "o" / "heal.json").exists() and not (tmp_path / "o" / "model.safetensors").exists()
    for bad in ({"lr": float("inf")}, {"max_grad_norm": float("nan")}, {"attn_lr": float("nan")}):
        with pytest.raises(HealConfigError, match="finite"):
            HealConfig(tokens=1000, **bad)


def test_heal_starts_from_the_converted_student(tmp_path, capsys):
    """The student is a converted model saved by `convert` (here with linear_swa feature maps and gate moved off
    their initial values), the original the teacher: the step-0 probe is the student's KL to the original, not a
    fresh conversion's."""
    from layerboost.cli import main
    from layerboost.quality import heldout_metrics

    plan = lb.LayerPlan.from_kinds(["softmax", "linear_swa", "none", "softmax"], window=WINDOW)
    student = tiny_model("llama", layers=4)
    lb.convert(student, plan)
    from layerboost.kinds import own_parameters

    g = torch.Generator().manual_seed(123)  # the student's own parameters are not what a fresh conversion gives
    with torch.no_grad():
        for _, p in own_parameters(student):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    assert own_parameters(student)
    lb.save(student, tmp_path / "converted", tokenizer=None)
    rows = _heldout()
    want = heldout_metrics(tiny_model("llama", layers=4), student, rows)["kl"]
    out = heal(tiny_model("llama", layers=4), plan, data=_corpus(tmp_path), out=tmp_path / "h", tokens=256,
               tokenizer=ByteTok(), student=tmp_path / "converted", probe_rows=rows, probe_at=(0.0,), **FAST)
    first = next(r for r in _log(out) if r.get("probe"))
    assert first["tokens"] == 0 and first["kl"] == pytest.approx(want, rel=1e-5)
    fresh = heal(tiny_model("llama", layers=4), plan, data=_corpus(tmp_path), out=tmp_path / "f", tokens=256,
                 tokenizer=ByteTok(), probe_rows=rows, probe_at=(0.0,), **FAST)
    assert next(r for r in _log(fresh) if r.get("probe"))["kl"] != pytest.approx(want, rel=1e-3)
    with pytest.raises(HealConfigError, match="another plan"):
        heal(tiny_model("llama", layers=4), _plan(), data=_corpus(tmp_path), out=tmp_path / "x", tokens=256,
             tokenizer=ByteTok(), student=tmp_path / "converted", **FAST)
    # the command line: --student of a plain folder, and neither --plan nor --student, each one line
    base = ["heal", "--model", "x", "--data", str(_corpus(tmp_path)), "--tokens", "1k", "--out", str(tmp_path / "c")]
    assert main(base + ["--student", str(tmp_path)]) == 2
    assert "is not a folder `layerboost convert` wrote" in capsys.readouterr().err
    assert main(base) == 2 and "give --plan" in capsys.readouterr().err
