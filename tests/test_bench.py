"""`layerboost bench`: the real CLI on a tiny random model, plus plan layout and random configs."""

import json

import pytest
import torch

from layerboost import LayerPlan, PlanError
from layerboost.bench import RANDOM_CONFIGS, hybrid_of, hybrid_plan, interleave, parse_kinds, random_model
from layerboost.cli.bench import main
from layerboost.bench.measure import _interp
from layerboost.engine import Engine


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["--random-config", "tiny", "--threads", "1", "--window", "8"]


@pytest.mark.slow
def test_latency_cli_full(tmp_path, capsys):
    out = tmp_path / "lat"
    assert main(["latency", *TINY, "--hybrid-kinds", "none:2,swa:2,softmax:2", "--batch", "2", "--prompt", "8",
                 "--lengths", "8,16", "--repeats", "2", "--warmup", "1", "--chunk", "4", "--profile", "2",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-1].startswith("hybrid/base at L=16: time per token")
    data = json.loads((out / "latency.json").read_text())
    assert (out / "latency.png").stat().st_size > 1000 and (out / "latency.txt").is_file()
    env = data["environment"]
    assert {"torch", "transformers", "cpu", "threads", "dtype", "device"} <= set(env) and env["threads"] == 1
    assert data["model"]["kinds"] == "SW-W-S" and data["method"] == "full"
    assert len(data["results"]) == 4 and len(data["ratios"]) == 2
    for r in data["results"]:
        assert r["total_s"]["n"] == 2 and r["total_s"]["min"] <= r["total_s"]["median"] <= r["total_s"]["max"]
        assert r["cache_bytes_held"] == r["cache_bytes_theory"]  # measured buffers == the formula
    base16 = next(r for r in data["results"] if r["model"] == "base" and r["decode_len"] == 16)
    # 6 layers * (K+V) * B 2 * nkv 2 * 24 tokens * hs 16 * 4 bytes
    assert base16["cache_bytes_theory"] == 6 * 2 * 2 * 2 * 24 * 16 * 4
    assert data["ratios"][-1]["cache_ratio"] == pytest.approx((2 * 24 + 2 * 8) / (6 * 24))
    assert set(data["profile"]) == {"base", "hybrid"} and data["profile"]["base"]["top_ops"]
    # roofline: weights (tiny ties its embedding: every parameter is read once) + caches at prompt + L
    weights = sum(p.numel() * 4 for p in random_model("tiny").parameters())
    assert base16["step_bytes"] == weights + base16["cache_bytes_theory"]
    assert base16["achieved_gbps"] == pytest.approx(base16["step_bytes"] / base16["ms_per_step_at_end"]["median"] / 1e6)
    assert "copy_bw_fraction" not in base16 and data["compile"] is False and set(data["warmup_s"]) == {"base", "hybrid"}
    q = data["ratios"][-1]
    hyb16 = next(r for r in data["results"] if r["model"] == "hybrid" and r["decode_len"] == 16)
    assert q["step_bytes_ratio"] == hyb16["step_bytes"] / base16["step_bytes"] < 1
    assert "GB/s" in table[2] and "bytes predict" in table[-2]


def test_latency_cli_sampled(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["latency", *TINY, "--hybrid-kinds", "linear_swa:2,none:2,softmax", "--batch", "2", "--prompt", "8",
                 "--lengths", "16,32", "--repeats", "1", "--warmup", "1", "--sample-steps", "4", "--out", str(out)]) == 0
    data = json.loads((out / "latency.json").read_text())
    assert data["method"] == "sampled" and len(data["samples_ms_per_step"]) == 2 * 3  # at L = 4, 16, 32
    assert all(r["total_s"]["median"] > 0 for r in data["results"])


@pytest.mark.slow
def test_throughput_cli_records_what_does_not_fit(tmp_path, capsys):
    out = tmp_path / "thr"
    (tmp_path / "eval.json").write_text(json.dumps({"base": 0.5, "hybrid": {"accuracy": 0.45}}))
    # tiny, fp32: 256 B per token per attention layer; prompt 8 + output 4 = 12 tokens.
    # C=4: base 6 layers -> 73,728 B > budget 64,424 B; hybrid (2 softmax, 2 swa of 8) -> 40,960 B fits.
    assert main(["throughput", *TINY, "--concurrency", "2,4", "--prompt", "8", "--output", "4", "--warmup", "1",
                 "--memory-budget-gb", "0.00006", "--eval-json", str(tmp_path / "eval.json"), "--out", str(out)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-1].startswith("hybrid/base throughput: C=2 ")
    data = json.loads((out / "throughput.json").read_text())
    assert (out / "throughput.png").stat().st_size > 1000
    status = {(r["model"], r["concurrency"]): r["status"] for r in data["results"]}
    assert status == {("base", 2): "ok", ("hybrid", 2): "ok", ("base", 4): "exceeds_memory_budget", ("hybrid", 4): "ok"}
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert all(r["tokens_per_s"] > 0 and r["prefill"] == "shared" for r in ok)
    assert "throughput_ratio" in data["ratios"][0] and "throughput_ratio" not in data["ratios"][1]
    assert all(r["achieved_gbps"] > 0 and r["step_bytes"] > r["cache_bytes_theory"] for r in ok)
    assert 0 < data["ratios"][0]["step_bytes_ratio"] < 1 and "bytes predict" in table[-3]


@pytest.mark.slow  # compiles a 3-layer base and hybrid: ~30 s with a warm inductor cache, ~45 s cold
def test_compiled_cli_latency_and_throughput(tmp_path, capsys):
    args = [*TINY, "--layers", "3", "--hybrid-kinds", "none:1,linear_swa:1,softmax:1", "--compile"]
    assert main(["latency", *args, "--batch", "2", "--prompt", "8", "--lengths", "8,16", "--sample-steps", "4",
                 "--repeats", "1", "--out", str(tmp_path / "lat")]) == 0
    # same batch and buffer size (20 + 4 = 8 + 16): the throughput engines reuse what latency compiled
    assert main(["throughput", *args, "--concurrency", "2", "--prompt", "20", "--output", "4",
                 "--out", str(tmp_path / "thr")]) == 0
    assert "compile + warm-up (excluded)" in capsys.readouterr().out
    lat = json.loads((tmp_path / "lat" / "latency.json").read_text())
    thr = json.loads((tmp_path / "thr" / "throughput.json").read_text())
    assert lat["compile"] and thr["compile"] and min(lat["warmup_s"].values()) > 0
    assert all(r["status"] == "ok" and r["warmup_s"] > 0 and r["achieved_gbps"] > 0 for r in thr["results"])


@pytest.mark.slow  # ~50 s: six tiny runs, three of them compiled
def test_gpu_decode_script_smoke(tmp_path):
    """scripts/gpu_decode.py end to end on CPU with tiny shapes (the GPU run itself needs a GPU)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "scripts" / "gpu_decode.py"), "--smoke", "--out", str(tmp_path)],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(r["benchmark"], r["compile"], r["status"]) for r in data["runs"]] == [
        ("latency", False, "ok"), ("throughput", False, "ok"), ("throughput", False, "ok"),
        ("latency", True, "ok"), ("throughput", True, "ok"), ("throughput", True, "ok")]
    assert all(r["data"]["results"][0]["achieved_gbps"] > 0 for r in data["runs"])
    assert (tmp_path / "latency.png").stat().st_size > 1000 and (tmp_path / "throughput.png").stat().st_size > 1000
    assert "tiny latency compiled: ok" in (tmp_path / "summary.md").read_text()


def test_kinds_layout():
    assert parse_kinds("none:10,swa:10,softmax:10", 30) == {"none": 10, "swa": 10, "softmax": 10}
    assert parse_kinds("none,swa,softmax", 16) == {"none": 5, "swa": 5, "softmax": 6}
    kinds = interleave({"none": 10, "swa": 10, "softmax": 10})
    assert kinds[0] == kinds[-1] == "softmax" and [kinds.count(k) for k in ("none", "swa", "softmax")] == [10, 10, 10]
    assert max(len(run) for run in "".join(k[1] for k in kinds).replace("o", " ").split()) <= 3  # spread out
    for bad in ("none:10,swa:10", "bogus:3,softmax", "none:x,softmax", "none:2,none:3,softmax"):
        with pytest.raises(PlanError):
            parse_kinds(bad, 30)
    plan = hybrid_plan(6, "linear_swa:3,softmax", window=5)
    assert plan.kinds.count("linear_swa") == 3 and plan[1].window == 5


def test_random_config_shapes_and_shared_weights():
    assert {"llama-1b", "llama-8b", "qwen2-7b", "smollm2-135m"} <= set(RANDOM_CONFIGS)
    m = random_model("tiny", num_layers=3)
    assert m.config.num_hidden_layers == 3 and torch.isfinite(m.model.rotary_emb.inv_freq).all()
    assert m.model.layers[0].input_layernorm.weight.eq(1).all()
    h = hybrid_of(m, LayerPlan.from_kinds(["softmax", "none", "swa"], window=4))
    assert h.model.embed_tokens.weight is m.model.embed_tokens.weight  # no copy of the weights
    assert getattr(m, "layerboost_plan", None) is None  # the base stays a base
    x = torch.randint(3, 200, (1, 6))
    ref = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False, eos_token_id=None,
                     pad_token_id=0)
    assert torch.equal(Engine(m, 1, 11).generate(x, 5), ref)


def test_interp_matches_numpy_semantics():
    x = torch.tensor([0.0, 1.0, 2.5, 4.0, 9.0], dtype=torch.float64)
    got = _interp(x, [1.0, 4.0], [10.0, 40.0])
    assert got.tolist() == [10.0, 10.0, 25.0, 40.0, 40.0]


def test_environment_names_the_allocator():
    """Benchmarks record the C allocator (on CPU it changes the speed): glibc's malloc unless one is preloaded."""
    import glob
    import os
    import subprocess
    import sys

    probe = [sys.executable, "-c", "from layerboost.util import allocator; print(allocator())"]
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == "glibc"
    libs = glob.glob("/usr/lib/*/libjemalloc.so*") + glob.glob("/usr/lib/libjemalloc.so*")
    if not libs:
        pytest.skip("libjemalloc is not installed here (the glibc case above ran)")
    out = subprocess.run(probe, env={**env, "LD_PRELOAD": libs[0]}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "jemalloc"
