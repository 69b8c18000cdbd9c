"""Bad input through the real CLI: one `error:` line naming the problem and the fix, exit status 2,
no traceback, and nothing a user made overwritten. Tiny models and files, so each case takes seconds."""

import json
import shutil

import pytest
import yaml

import layerboost as lb
from layerboost.cli import build_parser, main

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w2")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 4-layer model folder (context 512), a plan for it, and a data dir with a small piqa split."""
    d = tmp_path_factory.mktemp("cli")
    tiny_model("llama", layers=4).save_pretrained(d / "model")
    tokenizer().save_pretrained(d / "model")
    lb.LayerPlan.from_kinds(["softmax", "swa", "none", "softmax"], window=8).save(d / "plan.json")
    (d / "data" / "piqa").mkdir(parents=True)
    (d / "data" / "piqa" / "validation.jsonl").write_text(
        "".join(json.dumps({"goal": f"w{5 + i}", "sol1": "w6 w7", "sol2": "w8", "label": i % 2}) + "\n" for i in range(8)))
    (d / "data" / "corpus").mkdir()
    (d / "data" / "corpus" / "a.txt").write_text("w5 w6 w7 w8\n\n" * 200)
    return d


def fails(capsys, argv, *fragments):
    """Run the CLI; it must exit 2, its stderr must end in its one `error:` line holding every fragment
    (progress lines may come before it), and no traceback may be printed."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    assert lines and lines[-1].startswith("error: ") and sum(ln.startswith("error:") for ln in lines) == 1, err[-3000:]
    for f in fragments:
        assert f in lines[-1], lines[-1]
    return lines[-1]


# ---- models ------------------------------------------------------------------------------------------


def test_missing_local_folder_fails_at_once(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online, a hub id would be tried for a minute
    import socket

    tried = []

    def connect(sock, address):
        tried.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    fails(capsys, ["generate", "--model", "runs/healed", "--prompt", "w5"], "'runs/healed' does not exist", "model folder")
    fails(capsys, ["eval", "--model", tmp_path / "nowhere", "--tasks", "piqa"], "does not exist")
    assert tried == []  # a path is never looked up on the hub (no connection attempted)


def test_folder_without_config_json(files, tmp_path, capsys):
    shutil.copytree(files / "model", tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    fails(capsys, ["eval", "--model", tmp_path / "m", "--tasks", "piqa", "--data-dir", files / "data"],
          "has no config.json", "restore it")


# ---- tasks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, fragments", [
    ("", ("holds no documents",)),
    ('{"question": "w5", "choices": ["w6", "w7"], "answer": 0}\n', ("document 1 has no field 'label'",)),
])
def test_task_data_empty_or_wrong_schema(files, tmp_path, capsys, data, fragments):
    (tmp_path / "t.jsonl").write_text(data)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"name": "t", "data": "t.jsonl", "prompt": "{question}",
                                                     "choices": "choices", "gold": "label"}))
    fails(capsys, ["eval", "--model", files / "model", "--tasks", tmp_path / "t.yaml"], *fragments)


def test_task_definition_empty(files, tmp_path, capsys):
    (tmp_path / "t.yaml").write_text("")
    fails(capsys, ["eval", "--model", files / "model", "--tasks", tmp_path / "t.yaml"], "task definition lacks")


# ---- sensitivity and plans ---------------------------------------------------------------------------


def test_sensitivity_file_missing_or_wrong(files, tmp_path, capsys):
    fails(capsys, ["plan", "--sensitivity", tmp_path / "nope.json", "--softmax", "2", "--swa", "1",
                   "--out", tmp_path / "p.json"], "does not exist", "layerboost analyze")
    fails(capsys, ["plan", "--sensitivity", files / "plan.json", "--softmax", "2", "--swa", "1",
                   "--out", tmp_path / "p.json"], "is not a sensitivity result")


def analyze_args(files, out, *more):
    return ["analyze", "--model", files / "model", "--tasks", "piqa", "--limit", "4", "--data-dir", files / "data",
            "--selection-size", "4", "--no-proxies", "--score", "margin", "--window", "8", "--out", out, *more]


def test_analyze_proxy_score_needs_the_proxies(files, tmp_path, capsys):
    args = analyze_args(files, tmp_path / "a")
    args[args.index("--score") + 1] = "kl"  # the default score is the KL proxy, which --no-proxies skips
    fails(capsys, args, "--score kl ranks layers by a proxy that --no-proxies skips")
    assert not (tmp_path / "a" / "layers").exists()


def written_analysis(path, iterative):
    """A sensitivity.json whose one-shot and iterative KL rankings disagree (layers 2 and 4 swap places)."""
    from layerboost import sensitivity as S

    path.write_text(json.dumps({
        "schema_version": S.SCHEMA_VERSION, "n_layers": 5, "sensitivity": [0.0] * 5, "sensitivity_margin": [0.0] * 5,
        "proxies": {"kl": [0.9, 0.2, 0.5, 0.1, 0.3], "cosine": [0.1] * 5}, "iterative": iterative}))
    return path


HISTORY = [{"step": 0, "removed": 3, "scores": {"0": 0.9, "1": 0.2, "2": 0.5, "3": 0.1, "4": 0.3}},
           {"step": 1, "removed": 1, "scores": {"0": 1.2, "1": 0.25, "2": 0.6, "4": 0.7}}]


def test_plan_ranks_by_the_iterative_history_unless_told_otherwise(tmp_path, capsys):
    sens = written_analysis(tmp_path / "s.json", {"score": "kl", "history": HISTORY})

    def plan(*more):
        assert main(["plan", "--sensitivity", str(sens), "--out", str(tmp_path / "p.json"), *more]) == 0
        out = capsys.readouterr().out
        (tmp_path / "p.json").rename(tmp_path / f"p{len(list(tmp_path.glob('p*.json')))}.json")
        return lb.LayerPlan.load(sorted(tmp_path.glob("p*.json"))[-1]).kinds, out

    kinds, out = plan("--softmax", "1", "--none", "3")  # auto: the history (removed 3, then 1; then 2 < 4)
    assert kinds == ["softmax", "none", "none", "none", "swa"] and "ranked by kl, iterative" in out
    kinds, out = plan("--softmax", "1", "--none", "3", "--ranking", "one-shot")  # one-shot: 4 (0.3) < 2 (0.5)
    assert kinds == ["softmax", "none", "swa", "none", "none"] and "ranked by kl, one-shot" in out
    # thresholds are in one-shot units: auto ranks one-shot (the iterative scores would make layer 4 softmax)
    kinds, out = plan("--softmax-above", "0.65", "--none-below", "0.25")
    assert kinds == ["softmax", "none", "swa", "none", "swa"] and "ranked by kl, one-shot" in out
    fails(capsys, ["plan", "--sensitivity", sens, "--softmax-above", "0.65", "--none-below", "0.25", "--ranking",
                   "iterative", "--out", tmp_path / "x.json"], "cannot serve thresholds")
    old = written_analysis(tmp_path / "old.json", {"history": HISTORY})  # written before histories named their score
    fails(capsys, ["plan", "--sensitivity", old, "--none", "3", "--softmax", "1", "--ranking", "iterative",
                   "--out", tmp_path / "x.json"], "older analysis", "--iterative K --score kl")
    assert not (tmp_path / "x.json").exists()


def test_analyze_iterative_ranking_needs_the_history(files, tmp_path, capsys):
    fails(capsys, analyze_args(files, tmp_path / "a", "--ranking", "iterative", "--iterative", "0"),
          "ranking 'iterative' needs the iterative history", "ask for a count of steps > 0")
    fails(capsys, analyze_args(files, tmp_path / "a", "--ranking", "iterative"),  # auto: no steps for --score margin
          "--iterative auto / --ranking iterative", "measures no step here")
    fails(capsys, analyze_args(files, tmp_path / "a", "--iterative", "some"), "'some' is not a number")
    fails(capsys, analyze_args(files, tmp_path / "a", "--iterative", "9"), "9 iterative steps, but the model has 4 layers")
    assert not (tmp_path / "a" / "layers").exists()


def test_analyze_checks_the_policy_before_the_analysis(files, tmp_path, capsys):
    fails(capsys, analyze_args(files, tmp_path / "a", "--softmax", "2"), "give at least two of the counts")
    fails(capsys, analyze_args(files, tmp_path / "a", "--softmax", "5", "--swa", "0"), "add up to the 4 layers")
    fails(capsys, analyze_args(files, tmp_path / "a", "--window", "1000", "--softmax", "2", "--swa", "1"),
          "window 1000 is longer than the model's context of 512")
    assert not (tmp_path / "a" / "sensitivity.json").exists() and not (tmp_path / "a" / "layers").exists()


def test_analyze_never_overwrites_another_analysis(files, tmp_path, capsys):
    out = tmp_path / "a"
    out.mkdir()
    other = {"schema_version": 1, "model": "someone/else", "tasks": ["arc_easy"], "limit": 4, "seed": 0,
             "sensitivity": [0.1, 0.2, 0.3, 0.4]}
    (out / "sensitivity.json").write_text(json.dumps(other))
    fails(capsys, analyze_args(files, out), "holds files layerboost did not record writing (sensitivity.json)", "--force")
    # --force passes the folder's owner check; the analysis' own check still refuses another analysis
    fails(capsys, analyze_args(files, out, "--force"), "holds another analysis", "tasks", "another --out")
    other["tasks"] = ["piqa"]  # same settings, another model: found once the model is loaded, before any scoring
    (out / "sensitivity.json").write_text(json.dumps(other))
    fails(capsys, analyze_args(files, out, "--force"), "holds another analysis", "model 'someone/else'")
    assert json.loads((out / "sensitivity.json").read_text()) == other
    assert not (out / "layers").exists()


# ---- output folders ----------------------------------------------------------------------------------


def test_unwritable_out_found_before_the_work(files, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    fails(capsys, ["eval", "--model", files / "model", "--tasks", "piqa", "--limit", "2", "--data-dir", files / "data",
                   "--out", tmp_path / "file" / "res.json"], "cannot be created", "is a file")
    fails(capsys, analyze_args(files, tmp_path / "file" / "a", "--softmax", "2", "--swa", "1"), "cannot be created")
    fails(capsys, ["convert", "--model", files / "model", "--plan", files / "plan.json", "--out", tmp_path / "file"],
          "is a file")
    assert (tmp_path / "file").read_text() == "mine"


def test_convert_keeps_an_existing_model(files, tmp_path, capsys):
    shutil.copytree(files / "model", tmp_path / "m")
    before = (tmp_path / "m" / "config.json").read_text()
    fails(capsys, ["convert", "--model", files / "model", "--plan", files / "plan.json", "--out", tmp_path / "m"],
          "holds files layerboost did not record writing (config.json", "--force")
    assert (tmp_path / "m" / "config.json").read_text() == before


def test_window_longer_than_context(files, tmp_path, capsys):
    lb.LayerPlan.from_kinds(["softmax", "swa", "none", "softmax"], window=4096).save(tmp_path / "p.json")
    fails(capsys, ["convert", "--model", files / "model", "--plan", tmp_path / "p.json", "--out", tmp_path / "o"],
          "window 4096 is longer than the model's context of 512")
    assert not (tmp_path / "o").exists()


# ---- heal --------------------------------------------------------------------------------------------


def heal_args(files, out, data, *more):
    return ["heal", "--model", files / "model", "--plan", files / "plan.json", "--data", data, "--out", out,
            "--tokens", "256", "--seq-len", "16", "--batch-size", "2", "--no-progress", "--data-dir", files / "data", *more]


def test_heal_resume_on_an_empty_folder(files, tmp_path, capsys):
    (tmp_path / "h").mkdir()
    fails(capsys, heal_args(files, tmp_path / "h", files / "data" / "corpus", "--resume"),
          "holds no heal checkpoint", "drop --resume")
    assert list((tmp_path / "h").iterdir()) == []


def test_heal_refuses_an_evaluation_split_under_another_name(files, tmp_path, capsys):
    shutil.copy(files / "data" / "piqa" / "validation.jsonl", tmp_path / "my_text.txt")
    fails(capsys, heal_args(files, tmp_path / "h", tmp_path / "my_text.txt"), "evaluation split", "a copy of",
          "validation.jsonl")
    assert not (tmp_path / "h").exists()


# ---- run ---------------------------------------------------------------------------------------------


def run_config(files, tmp_path, **changes):
    cfg = {"model": str(files / "model"), "out": str(tmp_path / "run"), "data_dir": str(files / "data"),
           "tasks": ["piqa"], "plan": {"policy": "counts", "softmax": 2, "swa": 1, "none": 1, "window": 8}}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        cfg.setdefault(section, {})[name] = value
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    return ["run", tmp_path / "run.yaml"]


@pytest.mark.parametrize("changes, fragments", [
    ({"heal__options": {"seq_lenn": 64}}, ("heal.options: unknown setting(s) ['seq_lenn']",)),
    ({"heal__options": {"seq_len": 1, "lr": -1}}, ("seq_len must be >= 2", "lr must be a finite number > 0")),
    ({"eval__limit": -1}, ("eval.limit must be >= 1",)),
    ({"analyze__limit": 0}, ("analyze.limit must be >= 1",)),
    ({"bench__latency": {"batch": 0}}, ("bench.latency.batch must be an integer >= 1, got 0",)),
    ({"bench__latency": {"lengths": "lots"}}, ("bench.latency.lengths must be a count >= 1 or a non-empty list",)),
    ({"bench__latency": {"lengths": [512, "x"]}, "bench__throughput": {"compile": "yes"}},
     ("bench.latency.lengths must be", "bench.throughput.compile must be true or false")),
    ({"plan__softmax": 10}, ("plan:", "add up to the 4 layers")),
    ({"plan__window": 100_000}, ("window 100000 is longer than the model's context of 512",)),
    ({"analyze__iterative": -2, "plan__ranking": "best"}, ("analyze.iterative must be auto or a count >= 0, got -2",
                                                          "ranking 'best' must be one of auto, iterative, one-shot")),
    ({"analyze__iterative": 0, "plan__ranking": "iterative"}, ("ranking 'iterative' needs the iterative history",)),
    ({"plan__ranking": "iterative", "plan__none": 0, "plan__swa": 2},  # auto: as many steps as none layers, here 0
     ("analyze.iterative / plan.ranking", "measures no step here")),
    ({"analyze__iterative": 9}, ("9 iterative steps, but the model has 4 layers",)),
    ({"plan__keep_retrieval": 1}, ("plan.keep_retrieval 1 needs analyze.retrieval: true",)),
    ({"analyze__retrieval": True, "analyze__retrieval_seed": 0}, ("analyze.retrieval_seed 0 draws the trials",)),
    ({"plan__policy": "thresholds", "plan__softmax_above": 0.5, "plan__none_below": 0.1, "plan__ranking": "iterative"},
     ("cannot serve thresholds",)),
])
def test_run_validates_the_whole_config_before_any_stage(files, tmp_path, capsys, changes, fragments):
    fails(capsys, run_config(files, tmp_path, **changes), *fragments)
    assert not (tmp_path / "run").exists()


def test_a_refused_config_leaves_the_run_folder_as_it_was(files, tmp_path, capsys):
    from layerboost.outputs import claim

    with claim(tmp_path / "run", "run", {"x": 1}):  # a run folder with its config.yaml
        (tmp_path / "run" / "config.yaml").write_text("mine: 1\n")
    fails(capsys, run_config(files, tmp_path, bench__latency={"lengths": "lots"}), "bench.latency.lengths")
    assert (tmp_path / "run" / "config.yaml").read_text() == "mine: 1\n"


# ---- bench -------------------------------------------------------------------------------------------

BENCH = ["--random-config", "tiny", "--threads", "1", "--window", "8", "--prompt", "8"]


def test_bench_latency_has_a_memory_guard(capsys):
    fails(capsys, ["bench", "latency", *BENCH, "--batch", "2", "--lengths", "8", "--memory-budget-gb", "1e-6"],
          "more than the memory budget", "--memory-budget-gb")


def test_memory_budget_must_be_positive(capsys):
    fails(capsys, ["bench", "throughput", *BENCH, "--concurrency", "2", "--output", "4", "--memory-budget-gb", "0"],
          "--memory-budget-gb", "must be a finite number > 0")


# ---- the handler itself, and shared options ------------------------------------------------------------


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, monkeypatch):
    from layerboost.cli import plan as plan_command
    from layerboost.sensitivity import AnalysisError

    argv = ["plan", "--sensitivity", str(tmp_path / "nope.json"), "--softmax", "1", "--swa", "1"]
    with pytest.raises(AnalysisError):
        main(["--debug", *argv])

    def buggy(args):
        return {}["bug"]

    monkeypatch.setattr(plan_command, "run", buggy)
    with pytest.raises(KeyError):  # not a user's mistake: not turned into an `error:` line
        main(argv)


SUBCOMMANDS = [["convert"], ["generate"], ["eval"], ["analyze"], ["heal"], ["bench", "latency"], ["bench", "throughput"]]


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=" ".join)
def test_shared_options_are_spelled_and_defaulted_alike(cmd, capsys):
    assert main([*cmd, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE auto (cuda if available, else cpu), cpu, cuda, cuda:N (default: auto)" in text
    if cmd != ["heal"]:
        assert "fp32, bf16, fp16 are accepted too) (default: float32)" in text


@pytest.mark.parametrize("cmd", [["eval"], ["analyze"]], ids=" ".join)
def test_limit_means_the_same_everywhere(cmd, capsys):
    base = [*cmd, "--model", "m", "--out", "o"]
    parse = build_parser().parse_args
    assert parse([*base, "--limit", "0"]).limit is None
    assert parse([*base, "--limit", "50"]).limit == 50 and parse([*base, "--limit", "0.5"]).limit == 0.5
    assert parse([*base, "--dtype", "bf16"]).dtype == "bfloat16"
    assert main([*base, "--limit", "-1"]) == 2
    assert capsys.readouterr().err.startswith(f"error: layerboost {cmd[0]}: argument --limit")


def test_help_shows_every_default(capsys):
    assert main(["analyze", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for part in ("--limit LIMIT", "(default: 200)", "padded tokens per forward (default: 8192)", "(default: kv)"):
        assert part in text


def test_eval_mmlu_per_subject(files, tmp_path, capsys):
    """--mmlu-per-subject takes N items from every subject (the other tasks keep --limit), and says so in the JSON;
    N < 1 is one error line."""
    d = tmp_path / "data"
    shutil.copytree(files / "data", d)
    (d / "mmlu").mkdir()
    (d / "mmlu" / "test.jsonl").write_text("".join(
        json.dumps({"question": f"w{5 + i % 7}", "subject": s, "choices": ["w6", "w7", "w8", "w9"], "answer": i % 4}) + "\n"
        for s in ("alpha", "beta", "gamma") for i in range(5)))
    out = tmp_path / "res.json"
    assert main([str(a) for a in ["eval", "--model", files / "model", "--tasks", "piqa,mmlu", "--mmlu-per-subject", "2",
                                  "--data-dir", d, "--out", out, "--per-item", "--no-progress"]]) == 0
    res = json.loads(out.read_text())
    assert res["mmlu_per_subject"] == 2 and res["tasks"]["mmlu"]["n"] == 6 and res["tasks"]["piqa"]["n"] == 8
    fails(capsys, ["eval", "--model", files / "model", "--tasks", "mmlu", "--mmlu-per-subject", "0", "--data-dir", d],
          "--mmlu-per-subject must be at least 1")


def test_compare_rows_option(tmp_path, capsys):
    from layerboost.cli.options import config_with_overrides
    from layerboost.workflows.compare import CompareConfig

    args = build_parser().parse_args(["compare", "--rows", "base, layerboost", "--out", str(tmp_path / "c")])
    cfg = config_with_overrides(CompareConfig, args)
    assert cfg.rows == ["base", "layerboost"] and cfg.softmax == CompareConfig.load("compare").softmax
    fails(capsys, ["compare", "--rows", "base,magic", "--out", tmp_path / "d"], "unknown row 'magic'")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("argv,fragments", [
    (["generate", "--prompt", ""], ["--prompt", "is empty"]),
    (["generate", "--prompt", "w5", "--temperature", "-1"], ["--temperature", "must be a finite number >= 0"]),
    (["generate", "--prompt", "w5", "--max-new-tokens", "100000000"], ["exceed the model's context of 512"]),
    (["eval", "--tasks", ""], ["names no task"]),
    (["eval", "--tasks", " , "], ["names no task"]),
])
def test_empty_and_impossible_requests_fail_in_one_line(files, capsys, argv, fragments):
    fails(capsys, [*argv, "--model", files / "model"] + (["--data-dir", files / "data"] if argv[0] == "eval" else []),
          *fragments)


@pytest.mark.parametrize("argv", [["latency", "--batch", "0"], ["latency", "--prompt", "-3"], ["latency", "--repeats", "0"],
                                  ["throughput", "--output", "0"]])
def test_bench_counts_must_be_positive(capsys, argv):
    fails(capsys, ["bench", *argv, "--model", "smollm2-135m"], "must be a finite number > 0")


def test_heal_refuses_a_budget_below_one_step_and_a_plan_folder(files, tmp_path, capsys):
    common = ["heal", "--model", files / "model", "--data", files / "data" / "corpus", "--out", tmp_path / "h"]
    fails(capsys, [*common, "--plan", files / "plan.json", "--tokens", "10"], "less than one training row")
    assert not (tmp_path / "h").exists()
    fails(capsys, [*common, "--plan", files], "is a folder", "plan.json")


@pytest.mark.parametrize("argv, fragments", [
    (["plan", "--sensitivity", "S", "--softmax", "10", "--fractions", "0.3,0.3"], ("--fractions and --softmax/--swa/--none",
                                                                                 "give one")),
    (["plan", "--sensitivity", "S", "--softmax-above", "nan", "--none-below", "0"], ("must be a finite number",)),
    (["plan", "--sensitivity", "S", "--speedup", "inf"], ("must be a finite number > 0",)),
    (["eval", "--model", "M", "--batch-size", "0"], ("must be a finite number > 0",)),
    (["eval", "--model", "M", "--batch-size", "-3"], ("must be a finite number > 0",)),
    (["generate", "--model", "M", "--prompt", "x", "--temperature", "nan"], ("must be a finite number >= 0",)),
    (["generate", "--model", "M", "--prompt", "x", "--temperature", "inf"], ("must be a finite number >= 0",)),
    (["bench", "latency", "--model", "M", "--sample-steps", "-1"], ("must be a finite number >= 0",)),
    (["bench", "latency", "--model", "M", "--warmup", "-1"], ("must be a finite number >= 0",)),
    (["bench", "latency", "--model", "M", "--profile", "-1"], ("must be a finite number >= 0",)),
    (["bench", "latency", "--model", "M", "--chunk", "0"], ("must be a finite number > 0",)),
    (["analyze", "--model", "M", "--out", "o", "--windows", "64,64"], ("distinct whole numbers",)),
    (["analyze", "--model", "M", "--out", "OUT", "--speedup", "1.5"], ("then run `layerboost plan",)),
    (["analyze", "--model", "M", "--out", "OUT", "--softmax", "2", "--none", "1", "--keep-retrieval", "1"],
     ("--keep-retrieval 1 keeps the layers the retrieval signal ranks highest: add --retrieval",)),
    (["analyze", "--model", "M", "--out", "OUT", "--retrieval", "--retrieval-seed", "0"], ("seed 0 draws the trials",)),
    (["analyze", "--model", "M", "--out", "OUT", "--retrieval", "--retrieval-window", "4096"],
     ("is not below --retrieval-len 2048",)),
    (["plan", "--sensitivity", "S", "--softmax", "2", "--none", "1", "--keep-retrieval", "1", "--score", "drop"],
     ("keep_retrieval needs the retrieval signal: analyze with --retrieval",)),
])
def test_numbers_out_of_range_and_mixed_policies_are_refused(capsys, tmp_path, argv, fragments):
    """Found by issue 36's probe: each of these ran (or dropped an option) instead of one error line."""
    if argv[0] == "plan":
        (tmp_path / "S").write_text(json.dumps({"schema_version": 2, "sensitivity": [0.0] * 4, "layers": []}))
        argv = [a if a != "S" else str(tmp_path / "S") for a in argv] + ["--out", str(tmp_path / "p.json")]
    argv = [a if a != "OUT" else str(tmp_path / "a") for a in argv]
    fails(capsys, argv, *fragments)


def test_plan_refuses_a_model_other_than_the_analysed_one(capsys, tmp_path, files):
    (tmp_path / "S").write_text(json.dumps({"schema_version": 2, "sensitivity": [0.0] * 30, "layers": []}))
    fails(capsys, ["plan", "--sensitivity", tmp_path / "S", "--softmax", "2", "--none", "1", "--model", files / "model",
                   "--score", "drop", "--out", tmp_path / "p.json"], "analysed a model of 30 layers", "has 4")


# ---- issue 36: what used to end in a traceback or an unclear line ------------------------------------------


def test_bad_text_and_empty_paths_are_one_line(files, tmp_path, capsys, monkeypatch):
    gen = ["generate", "--model", files / "model", "--max-new-tokens", "2"]
    fails(capsys, [*gen, "--prompt", "w5\udcff"], "--prompt", "not UTF-8")  # the byte \xff, as Python reads it
    fails(capsys, convert_args(files, str(tmp_path / "x\udcffy")), "--out", "not UTF-8")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.chdir(tmp_path)
    fails(capsys, ["generate", "--model", "", "--prompt", "w5"], "--model is empty")
    fails(capsys, convert_args(files, ""), "--out is empty")
    fails(capsys, ["eval", "--model", files / "model", "--tasks", "piqa", "--out", ""], "--out is empty")
    assert list(tmp_path.iterdir()) == []  # nothing written into "."


def convert_args(files, out):
    return ["convert", "--model", files / "model", "--plan", files / "plan.json", "--out", out]


def test_generate_temperature_and_prompt_length(files, capsys):
    gen = ["generate", "--model", files / "model", "--prompt"]
    fails(capsys, [*gen, "w5", "--temperature", "1e-300"], "too small to sample with", "give 0 for greedy")
    fails(capsys, [*gen, " ".join(["w5"] * 600)], "the prompt is 600 tokens", "context is 512", "shorten the prompt")
    fails(capsys, [*gen, " ".join(["w5"] * 500), "--max-new-tokens", "20"], "ask for at most 12 new tokens")


def test_eval_selection_size_zero(files, capsys):
    fails(capsys, ["eval", "--model", files / "model", "--tasks", "piqa", "--data-dir", files / "data",
                   "--partition", "evaluation", "--selection-size", "0"], "--selection-size", "> 0")


@pytest.mark.parametrize("content, fragment", [(None, "cannot be read"), ("{not json", "is not valid JSON"),
                                               ('{"base": 0.5}', "no accuracy for 'hybrid'")])
def test_bench_eval_json_checked_before_measuring(files, tmp_path, capsys, monkeypatch, content, fragment):
    import layerboost.cli.bench as bench_cli

    if content is not None:
        (tmp_path / "acc.json").write_text(content)
    monkeypatch.setattr(bench_cli, "load_models", lambda *a, **k: pytest.fail("measured before reading --eval-json"))
    fails(capsys, ["bench", "throughput", *BENCH, "--concurrency", "2", "--output", "2", "--eval-json",
                   tmp_path / "acc.json", "--out", tmp_path / "b"], "--eval-json", fragment)
    assert not (tmp_path / "b").exists()


def test_heal_hub_data_offline(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(capsys, heal_args(files, tmp_path / "h", "hub:wikitext"), "streamed from the Hugging Face hub", "offline",
          "local file")
    assert not (tmp_path / "h").exists()


def test_a_hybrid_gguf_as_model_says_which_gguf_files_are_read(files, tmp_path, capsys):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "h.gguf"), "deci")  # what `export --format gguf` writes for none layers
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for argv in (["generate", "--model", tmp_path / "h.gguf", "--prompt", "w5"],
                 ["eval", "--model", tmp_path / "h.gguf", "--tasks", "piqa", "--data-dir", files / "data"]):
        fails(capsys, argv, "architecture 'deci'", "--model reads GGUF files of plain", "pass its folder")
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "a .gguf file of a plain" in " ".join(help_text.split())


def test_killed_convert_folder_says_rerun_convert(files, tmp_path, capsys):
    out = tmp_path / "m"
    assert main([str(a) for a in convert_args(files, out)]) == 0
    capsys.readouterr()
    (out / "tokenizer.json").unlink()  # killed before the tokenizer was written
    m = json.loads((out / ".layerboost.json").read_text())
    m["parts"]["convert"].update(state="running", pid=999999)  # no such process
    (out / ".layerboost.json").write_text(json.dumps(m))
    fails(capsys, ["generate", "--model", out, "--prompt", "w5"], "is incomplete", "`layerboost convert`",
          "was killed", "run it again")


def test_a_failed_heal_does_not_block_the_corrected_rerun(files, tmp_path, capsys):
    from layerboost.outputs import read_manifest

    out = tmp_path / "h"
    line = fails(capsys, heal_args(files, out, files / "data" / "corpus", "--attn-lr", "1e30"), "the heal diverged",
                 "--attn-lr", "the same --out is fine")
    assert "--resume" not in line and "checkpoint" not in line
    assert read_manifest(out)["parts"]["heal"]["state"] == "failed"
    assert main([str(a) for a in heal_args(files, out, files / "data" / "corpus")]) == 0, capsys.readouterr().err
    assert read_manifest(out)["parts"]["heal"]["state"] == "complete"


def test_run_checks_the_heldout_text_before_the_first_stage(files, tmp_path, capsys):
    fails(capsys, run_config(files, tmp_path), "held-out tokens asked for", "eval.heldout_tokens")
    assert not (tmp_path / "run").exists()


def test_empty_run_config(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("")
    fails(capsys, ["run", tmp_path / "empty.yaml", "--out", tmp_path / "r"], "is empty", "default.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    fails(capsys, ["run", tmp_path / "list.yaml", "--out", tmp_path / "r"], "not a mapping of settings")


def test_interrupted_heal_names_resume(files, tmp_path):
    import argparse

    from layerboost.cli import interrupted

    args = argparse.Namespace(command="heal", resume=False, out=str(tmp_path / "h"))
    assert "run the same command again to start it" in interrupted(args)
    (tmp_path / "h" / "heal_state" / "checkpoint").mkdir(parents=True)
    (tmp_path / "h" / "heal_state" / "checkpoint" / "state.json").write_text("{}")
    assert "with --resume to continue" in interrupted(args)
    assert "again to resume" in interrupted(argparse.Namespace(command="heal", resume=True, out=args.out))


def test_switch_help_says_what_passing_it_does(capsys):
    sub = build_parser()._subparsers._group_actions[0].choices
    heal_help = {a.option_strings[0]: a.help for a in sub["heal"]._actions if a.option_strings}
    for flag in ("--no-progress", "--no-attn-lora", "--no-attn-distill", "--no-train-attention-params",
                 "--no-teacher-cache-blocks"):
        assert heal_help[flag].startswith("turn off what is on by default: "), heal_help[flag]
    text = sub["heal"].format_help()
    assert "(default: True)" not in text
    latency = sub["bench"]._subparsers._group_actions[0].choices["latency"].format_help()
    description = latency.split("options:")[0].split("\n\n", 1)[1]  # after the usage lines
    assert len(description.splitlines()) < 6 and "module by module" not in latency, description
