"""The whole pipeline on a tiny random model: artefacts exist, agree with each other, and resume."""

import json

import pytest
import torch
import yaml

import layerboost as lb
from layerboost.workflows import run as R
from layerboost import sensitivity as S

from conftest import tiny_model


def test_shipped_configs_parse():
    for name in ("default", "paper"):
        cfg = R.RunConfig.load(name)
        assert cfg.tasks == ["piqa", "arc_easy", "arc_challenge", "winogrande", "mmlu"]
    assert R.RunConfig.load(None).model == "smollm2-135m"


def test_config_errors_reported_together(tmp_path):
    with pytest.raises(R.ConfigError) as e:
        R.RunConfig.from_dict({"modell": "x", "tasks": ["piqa", "nope"], "plan": {"policy": "magic", "window": 0},
                               "analyze": {"limit": "many"}, "bench": {"latency": {"sampel_steps": 4}}})
    msg = str(e.value)
    for part in ("unknown key(s) ['modell']", "unknown task 'nope'", "'magic' is not one of", "window must be > 0",
                 "analyze.limit", "bench.latency.sampel_steps: unknown setting"):
        assert part in msg
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(R.ConfigError, match="not valid YAML"):
        R.RunConfig.load(str(tmp_path / "bad.yaml"))
    with pytest.raises(R.ConfigError, match="shipped name"):
        R.RunConfig.load("nonexistent")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = lb.load_model("smollm2-135m")[1]
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", layers=4, vocab=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_config(model_dir, out):
    return R.RunConfig.from_dict({
        "model": str(model_dir), "out": str(out), "tasks": ["piqa", "arc_easy"], "threads": 2,
        "analyze": {"limit": 4, "calib_seqs": 2, "retrieval": True, "retrieval_len": 96, "retrieval_trials": 1,
                    "retrieval_window": 8},
        "plan": {"policy": "counts", "softmax": 2, "swa": 1, "none": 1, "window": 8, "keep_retrieval": 1},
        "heal": {"tokens": 2048, "options": {"seq_len": 64, "batch_size": 2, "checkpoint_every": 2, "progress": False}},
        "eval": {"limit": 4, "wikitext_docs": 1, "wikitext_max_length": 64, "heldout_tokens": 128,
                 "heldout_seq_len": 32, "retrieval_lengths": [96], "retrieval_trials": 2},
        "bench": {"latency": {"batch": 2, "prompt": 8, "lengths": [8, 16], "repeats": 1, "warmup": 1},
                  "throughput": {"concurrency": [2, 4], "prompt": 8, "output": 4}},
    })


@pytest.mark.slow
def test_pipeline_artefacts_consistent_and_resumable(tiny_dir, tmp_path, monkeypatch):
    import layerboost.heal as H

    cfg = tiny_config(tiny_dir, tmp_path / "run")
    real_heal = H.heal

    def killed_heal(*a, **k):
        raise KeyboardInterrupt("killed mid-heal")

    monkeypatch.setattr(H, "heal", killed_heal)
    logs = []
    with pytest.raises(KeyboardInterrupt):
        R.run(cfg, log=logs.append)
    assert "[analyze] done" in " ".join(logs) and not (tmp_path / "run" / "stages" / "heal.json").exists()
    analyze_rec = (tmp_path / "run" / "stages" / "analyze.json").read_text()

    monkeypatch.setattr(H, "heal", real_heal)
    logs = []
    report = R.run(cfg, log=logs.append)
    text = " | ".join(logs)
    for stage in ("analyze", "plan", "convert"):
        assert f"[{stage}] up to date, skipped" in text  # resumed: analysis not redone
    assert "[heal] running" in text and "[report] done" in text
    assert (tmp_path / "run" / "stages" / "analyze.json").read_text() == analyze_rec

    d = tmp_path / "run"
    for f in ("report.md", "sensitivity.png", "plan.json", "config.yaml", "analyze/sensitivity.json",
              "converted/model.safetensors", "heal/model.safetensors", "eval/base.json", "eval/converted.json",
              "eval/healed.json", "bench/latency.json", "bench/throughput.json", "bench/latency.png",
              "bench/throughput.png"):
        assert (d / f).is_file(), f
    for png in [d / "sensitivity.png", *d.glob("bench/*.png")]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the report copies numbers from the stage outputs
    md = report.read_text()
    # every stage ran here: one machine in the environment section, as the stages recorded it
    assert "| machine 1, " in md and "machine 2" not in md and f"torch {torch.__version__}" in md
    plan = lb.LayerPlan.load(d / "plan.json")
    assert plan.counts() == {"softmax": 2, "swa": 1, "linear_swa": 0, "none": 1}
    sens = json.loads((d / "analyze" / "sensitivity.json").read_text())
    # the default ranking: the KL proxy re-measured after each removal, for the plan's one attention-free layer
    hist = sens["iterative"]["history"]
    assert cfg.analyze.iterative == "auto" and sens["iterative"]["score"] == "kl" and len(hist) == 1
    assert hist[0]["scores"] == pytest.approx({str(i): v for i, v in enumerate(sens["proxies"]["kl"])})
    scores = S.iterative_scores(hist, 4)
    assert cfg.plan.score == "kl" and plan.table(scores) in md  # the score that chose the plan
    assert "then 1 layer removed one at a time by the kl score" in md and "nats/token, iterative." in md
    kept = lb.plan.kept_for_retrieval(sens["retrieval"]["alone"], 1)  # the retrieving layer keeps softmax
    assert len(kept) == 1 and plan[kept[0]].kind == "softmax" and sens["retrieval"]["rows"] == 2
    ranked = [v + (100.0 if i in kept else 0.0) for i, v in enumerate(scores)]
    removed = hist[0]["removed"]
    assert plan == lb.plan.plan_by_counts(ranked, 2, 1, 1, 8)
    assert plan[removed].kind == ("softmax" if removed in kept else "none")
    assert "KL(base || variant)" in md and "128 tokens in rows of 32 tokens" in md
    for name in ("base", "converted", "healed"):
        ev = json.loads((d / "eval" / f"{name}.json").read_text())
        assert f"| {name} | " in md and f"{100 * ev['average']['value']:.1f} |" in md
        # continuous measures next to accuracy; evaluation items come from the evaluation partition
        assert f"{ev['heldout']['kl']:.4f} | {ev['heldout']['agree']:.3f} |" in md
        assert ev["heldout"]["seq_len"] == 32 and ev["heldout"]["tokens"] == 4 * 32  # rows of heldout_seq_len
        assert f"| {name} | {ev['tasks']['wikitext']['word_perplexity']:.2f} |" in md
        assert ev["tasks"]["piqa"]["partition"]["part"] == "evaluation"
        r = ev["retrieval"]["needle"]["lengths"]["96"]
        assert r["trials"][0]["tokens"] <= 96 and f"{100 * r['acc']:.1f} / {100 * r['exact']:.1f}" in md
    assert json.loads((d / "eval" / "base.json").read_text())["heldout"]["kl"] == pytest.approx(0, abs=1e-6)
    assert json.loads((d / "eval" / "converted.json").read_text())["heldout"]["kl"] > 1e-4
    lat = json.loads((d / "bench" / "latency.json").read_text())
    assert lat["table"] in md
    # the healed model loads and differs from the unhealed conversion
    healed, conv = lb.load(d / "heal"), lb.load(d / "converted")
    x = torch.randint(1, 1000, (1, 12))
    assert not torch.equal(healed(x).logits, conv(x).logits)
    # a finished run is all skipped
    logs = []
    R.run(cfg, log=logs.append)
    stage_lines = [l for l in logs if l.startswith("[")]
    served = [s for s in R.STAGES if s != "serve"]  # serve runs for plan.target llama.cpp only
    assert len(stage_lines) == len(served) and all(l.endswith(")") and "up to date, skipped" in l for l in stage_lines)
    assert yaml.safe_load((d / "config.yaml").read_text())["model"] == str(tiny_dir)


def test_analyze_stage_is_stale_when_what_the_iterative_mode_removes_changes(tiny_dir, tmp_path):
    def analyze_hash(**changes):
        cfg = tiny_config(tiny_dir, tmp_path / "run")
        for key, value in changes.items():
            section, name = key.split("__")
            setattr(getattr(cfg, section), name, value)
        return R.Run(cfg).stage_hash("analyze")

    base = analyze_hash()
    assert analyze_hash(plan__score="cosine") != base  # the iterative mode re-measures plan.score
    assert analyze_hash(plan__none=2, plan__swa=0) != base  # auto: as many steps as the plan's none count
    assert analyze_hash(plan__window=16) == base  # the counts policy's none count does not depend on the window
    one_shot = analyze_hash(analyze__iterative=0)
    assert analyze_hash(analyze__iterative=0, plan__none=2, plan__swa=0, plan__score="cosine") == one_shot


def test_speed_policy_in_the_run_config(tiny_dir, tmp_path, monkeypatch):
    """The run config takes the speed policy: analyze then measures its windows, and a speedup target with no
    calibrated speed model is refused before any work, naming the command that calibrates it."""
    from layerboost import speed as SP

    monkeypatch.setenv("LAYERBOOST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(SP, "llama_cpp_build", lambda: {"version": "test", "binary": "x", "patch": None})
    data = tiny_config(tiny_dir, tmp_path / "run").to_dict()
    data["plan"] = {"policy": "speed", "speedup": 1.5, "context": 256, "target": "llama.cpp", "windows": [8, 16]}
    data["calibrate"] = "never"
    cfg = R.RunConfig.from_dict(data)
    assert R.analyze_windows(cfg) == [8, 16]
    with pytest.raises(R.ConfigError, match="layerboost speed calibrate --model"):
        R.check_before_work(cfg)
    # calibrate auto (the default): no refusal; the plan stage measures the model first, at the plan's context
    data["calibrate"] = "auto"
    cfg = R.RunConfig.from_dict(data)
    R.check_before_work(cfg)
    from layerboost.models import model_config

    config, calls = model_config(str(tiny_dir)), []

    def fake_calibrate(model, tok, work, *, depths, rounds, threads, log):
        calls.append((depths, rounds))
        work.mkdir(parents=True, exist_ok=True)
        (work / "plan-f32.gguf").write_bytes(b"GGUF")  # what calibration writes, gigabytes of it in a real run
        from test_speed import synthetic_records

        key = SP.llama_cpp_key(model.config, "f32", threads)
        fitted = SP.SpeedModel.fit("llama.cpp", key, SP.Geometry("llama.cpp"), synthetic_records())
        fitted.save(SP.key_path(key))

    monkeypatch.setattr(SP, "calibrate_llama_cpp", fake_calibrate)
    assert R.needs_calibration(cfg, config)
    speed, _ = R.speed_model(cfg, config, log=lambda m: None, model=lb.load_model(str(tiny_dir))[0], tokenizer=None,
                             work=tmp_path / "speed")
    assert calls == [((0, 256), 1)] and speed is not None and not R.needs_calibration(cfg, config)
    assert list((tmp_path / "speed").glob("*.gguf")) == []  # the fitted model is cached; its files are removed
    with pytest.raises(R.ConfigError, match="calibrate must be auto or never"):
        R.RunConfig.from_dict({**data, "calibrate": "sometimes"})
    data["plan"] = {"policy": "speed", "kv_budget": 0.5, "target": "layerboost"}
    cfg = R.RunConfig.from_dict(data)
    assert R.analyze_windows(cfg) == [64, 256, 1024] and R.speed_model(cfg, None) == (None, None)
    with pytest.raises(R.ConfigError, match="window 1024 is longer than the model's context of 512"):
        R.check_before_work(cfg)
    data["plan"]["windows"] = [8, 16]
    R.check_before_work(R.RunConfig.from_dict(data))

    data["plan"]["target"] = "llama.cpp"  # a KV budget there is counted in llama.cpp's cache cells, as plan does
    speed, geometry = R.speed_model(R.RunConfig.from_dict(data), model_config(str(tiny_dir)))
    assert speed is None and geometry.engine == "llama.cpp" and geometry.cells
    data["plan"] = {"policy": "speed", "speedup": "fast"}
    with pytest.raises(R.ConfigError, match="speedup"):
        R.RunConfig.from_dict(data)
