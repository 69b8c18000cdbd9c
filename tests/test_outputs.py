"""Output folders and files (outputs.py) through the real CLI: a command refuses, before any work, to write into
what another command, other settings or the user made; one writer per folder, real concurrent processes included;
Ctrl-C and the remaining raw failures end in one line. Tiny models: each case takes seconds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerboost.cli import main
from layerboost.outputs import LOCK, MANIFEST, claim, folder_lock, read_manifest

from test_cli_errors import files, fails, heal_args  # noqa: F401  (the `files` fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
CLI = [sys.executable, "-m", "layerboost.cli"]


def ok(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def corpus(files):
    """Enough text for the heals below (the fixture's corpus holds 50 rows of 16 tokens)."""
    import random

    rng = random.Random(0)
    f = files / "big.txt"
    f.write_text("\n\n".join(" ".join(f"w{rng.randrange(5, 120)}" for _ in range(80)) for _ in range(400)))
    return f


def convert(files, out, *more):
    return ["convert", "--model", files / "model", "--plan", files / "plan.json", "--out", out, *more]


def plan_args(files, out, *more):
    return ["plan", "--sensitivity", files / "sens.json", "--score", "drop", "--softmax", "2", "--swa", "1", "--out", out,
            *more]


@pytest.fixture(scope="module")
def sens(files):
    (files / "sens.json").write_text(json.dumps({"schema_version": 1, "model": "m", "tasks": ["piqa"], "limit": 4,
                                                 "seed": 0, "sensitivity": [0.4, 0.1, 0.05, 0.3]}))
    return files / "sens.json"


def fake_run_folder(path: Path) -> None:
    """A folder owned by `layerboost run`, as a run leaves it (its manifest, a plan, eval results)."""
    with claim(path, "run", {"model": "m"}):
        (path / "eval").mkdir()
        (path / "plan.json").write_text('{"layers": ["softmax"]}')
        (path / "eval" / "healed.json").write_text('{"tasks": {}}')


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != LOCK}


# ---- what each command writes is recorded; a rerun with the same settings is seamless --------------


def test_convert_records_its_folder_and_reruns(files, tmp_path, capsys):
    out = tmp_path / "m"
    ok(capsys, convert(files, out))
    m = read_manifest(out)
    part = m["parts"]["convert"]
    assert m["command"] == "convert" and part["state"] == "complete" and "config.json" in part["files"]
    ok(capsys, convert(files, out))  # the same command and settings: allowed
    fails(capsys, convert(files, out, "--dtype", "bfloat16"), "made with other settings (dtype differ)", "--force")
    ok(capsys, convert(files, out, "--dtype", "bfloat16", "--force"))
    assert read_manifest(out)["parts"]["convert"]["settings"]["dtype"] == "bfloat16"


# ---- overwrites that used to succeed --------------------------------------------------------------


def test_convert_onto_a_run_folder(files, tmp_path, capsys):
    fake_run_folder(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    fails(capsys, convert(files, tmp_path / "run"), "was written by `layerboost run`", "another --out", "--force")
    assert snapshot(tmp_path / "run") == before


def test_eval_into_a_run_folder(files, tmp_path, capsys):
    fake_run_folder(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    fails(capsys, ["eval", "--model", files / "model", "--tasks", "piqa", "--data-dir", files / "data",
                   "--out", tmp_path / "run" / "eval" / "healed.json"], "is inside", "`layerboost run`")
    assert snapshot(tmp_path / "run") == before


def test_eval_file_is_its_own(files, tmp_path, capsys):
    out = tmp_path / "res.json"
    args = ["eval", "--model", files / "model", "--tasks", "piqa", "--data-dir", files / "data", "--no-progress",
            "--out", out]
    ok(capsys, args)
    assert json.loads(out.read_text())["written_by"]["command"] == "eval"
    ok(capsys, args)  # its own file, the same settings
    fails(capsys, [*args, "--limit", "2"], "was written by `layerboost eval` with other settings", "--force")
    (tmp_path / "mine.json").write_text("my notes")
    fails(capsys, [*args[:-1], tmp_path / "mine.json"], "was not written by `layerboost eval`")
    assert (tmp_path / "mine.json").read_text() == "my notes"


def test_plan_never_overwrites_what_it_did_not_write(files, sens, tmp_path, capsys, monkeypatch):
    ok(capsys, convert(files, tmp_path / "m"))
    config = (tmp_path / "m" / "config.json").read_bytes()
    fails(capsys, plan_args(files, tmp_path / "m" / "config.json"), "is inside", "`layerboost convert`")
    assert (tmp_path / "m" / "config.json").read_bytes() == config
    monkeypatch.chdir(tmp_path)  # the default --out plan.json
    Path("plan.json").write_text("someone's plan")
    fails(capsys, ["plan", "--sensitivity", sens, "--score", "drop", "--softmax", "2", "--swa", "1"], "plan.json already exists",
          "not written by `layerboost plan`", "--force")
    assert Path("plan.json").read_text() == "someone's plan"
    ok(capsys, plan_args(files, "p.json"))
    ok(capsys, plan_args(files, "p.json"))  # its own file with the same settings
    fails(capsys, plan_args(files, "p.json", "--window", "4"), "with other settings")
    ok(capsys, plan_args(files, "p.json", "--window", "4", "--force"))
    assert json.loads(Path("p.json").read_text())["layers"][1]["window"] == 4


def test_analyze_onto_a_hybrid_folder(files, tmp_path, capsys):
    ok(capsys, convert(files, tmp_path / "m"))
    before = snapshot(tmp_path / "m")
    fails(capsys, ["analyze", "--model", files / "model", "--tasks", "piqa", "--limit", "4", "--data-dir", files / "data",
                   "--no-proxies", "--score", "margin", "--out", tmp_path / "m"], "was written by `layerboost convert`")
    assert snapshot(tmp_path / "m") == before


def test_bench_into_a_run_folder_and_heal_into_a_model(files, tmp_path, capsys):
    fake_run_folder(tmp_path / "run")
    fails(capsys, ["bench", "latency", "--model", files / "model", "--plan", files / "plan.json",
                   "--out", tmp_path / "run" / "bench"], "is inside", "`layerboost run`")
    ok(capsys, convert(files, tmp_path / "m"))
    before = snapshot(tmp_path / "m")
    fails(capsys, heal_args(files, tmp_path / "m", files / "data" / "corpus"), "was written by `layerboost convert`")
    assert snapshot(tmp_path / "m") == before


def test_run_into_a_folder_of_the_users_files(files, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "plan.json").write_text("my plan")
    fails(capsys, ["run", "default", "--model", files / "model", "--data-dir", files / "data", "--out", tmp_path / "mine"],
          "holds files layerboost did not record writing (plan.json)", "--force")
    assert (tmp_path / "mine" / "plan.json").read_text() == "my plan"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["plan.json"]


def test_a_refused_command_leaves_no_trace(files, tmp_path, capsys):
    """A command that fails before writing (here a plan too long for the model) leaves neither a folder nor a
    manifest, so the corrected command may then use the same --out."""
    import layerboost as lb

    lb.LayerPlan.from_kinds(["softmax"] * 5).save(tmp_path / "p5.json")
    fails(capsys, ["convert", "--model", files / "model", "--plan", tmp_path / "p5.json", "--out", tmp_path / "o"],
          "5 layers")
    assert not (tmp_path / "o").exists()
    ok(capsys, convert(files, tmp_path / "o"))


# ---- one writer per folder -------------------------------------------------------------------------


HOLD = """
import sys, time
from pathlib import Path
from layerboost.outputs import folder_lock
with folder_lock(Path(sys.argv[1]), "heal"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.slow  # starts processes
def test_a_second_writer_fails_at_once_naming_the_holder(files, tmp_path, capsys):
    out = tmp_path / "m"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        fails(capsys, convert(files, out), f"is being written by pid {holder.pid} (layerboost heal)", "wait for it")
        assert holder.poll() is None  # refused while the holder still holds it: the writer did not wait for the lock
    finally:
        holder.kill()
        holder.wait()
    ok(capsys, convert(files, out))  # the holder died: its lock is gone with it (the file stays, naming a dead pid)


def test_a_stale_lock_file_is_taken_over(files, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / LOCK).write_text("pid 999999 (layerboost convert)\n")  # left by a killed command; no process holds it
    ok(capsys, convert(files, out))
    assert (out / LOCK).read_text().startswith(f"pid {os.getpid()} ")


def test_a_contender_waits_for_the_holder_to_name_itself(tmp_path):
    """Between taking the lock and writing its line the holder leaves the file empty or still naming a dead
    holder: the contender reads again until the line names a live process, else says "another process"."""
    import threading

    from layerboost.outputs import _holder

    f = tmp_path / LOCK
    f.write_text("pid 999999 (layerboost convert) and the rest of a longer dead line\n")
    fd = os.open(f, os.O_RDWR)
    try:
        assert _holder(fd) == "another process"  # a dead pid is never named
        line = f"pid {os.getpid()} (layerboost heal)\n".encode()
        late = threading.Timer(0.2, lambda: (os.pwrite(fd, line, 0), os.ftruncate(fd, len(line))))
        late.start()
        assert _holder(fd) == f"pid {os.getpid()} (layerboost heal)"
        late.join()
    finally:
        os.close(fd)


@pytest.mark.slow  # starts processes
def test_two_converts_race(files, tmp_path):
    """Two real processes a moment apart: each ends in success or in the one-line lock error, never both half
    written; the folder ends complete with one owner."""
    out = tmp_path / "m"
    procs = [subprocess.Popen([*CLI, *map(str, convert(files, out))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for code, err in results:
        assert code == 0 or (code == 2 and err.strip().splitlines()[-1].startswith("error: --out")
                             and "is being written by pid" in err), err[-2000:]
        assert "Traceback" not in err
    assert read_manifest(out)["parts"]["convert"]["state"] == "complete"
    import layerboost as lb

    lb.load(out)


@pytest.mark.slow  # starts processes
def test_two_heals_race(files, corpus, tmp_path):
    """The second heal on a folder another heal is writing fails at once; the first finishes with a log of
    one run (steps 1..n once each)."""
    out = tmp_path / "h"
    argv = [*CLI, *map(str, heal_args(files, out, corpus, "--tokens", "16k", "--checkpoint-every", "1"))]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until the first holds the lock
            if (out / LOCK).is_file() and str(first.pid) in (out / LOCK).read_text():
                break
            time.sleep(0.1)
        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"is being written by pid {first.pid}" in second.stderr, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        first.kill()
    steps = [json.loads(x) for x in (out / "heal_state" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["stage"] == "kd"] == list(range(1, 1 + sum(r["stage"] == "kd" for r in steps)))
    assert read_manifest(out)["parts"]["heal"]["state"] == "complete"


# ---- Ctrl-C, --debug, negative values ---------------------------------------------------------------


@pytest.mark.slow  # starts processes
def test_ctrl_c_during_heal_is_one_line_and_resumes(files, corpus, tmp_path):
    out = tmp_path / "h"
    argv = [*CLI, *map(str, heal_args(files, out, corpus, "--tokens", "8192", "--checkpoint-every", "1"))]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "heal_state" / "log.jsonl"
    for _ in range(1200):
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    code, err = p.wait(timeout=120), p.stderr.read()
    assert code == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: interrupted"), err[-2000:]
    assert (out / "heal_state" / "checkpoint" / "state.json").is_file()
    assert read_manifest(out)["parts"]["heal"]["state"] == "interrupted"
    done = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_manifest(out)["parts"]["heal"]["state"] == "complete"


def test_debug_anywhere_and_negative_values(files, tmp_path, capsys):
    fails(capsys, heal_args(files, tmp_path / "h", files / "data" / "corpus", "--tokens", "-5k"), "tokens")
    with pytest.raises(Exception, match="less than one training row"):
        main([str(a) for a in heal_args(files, tmp_path / "h", files / "data" / "corpus", "--tokens", "10", "--debug")])
    assert not (tmp_path / "h").exists()


# ---- damaged or foreign inputs: one line each ---------------------------------------------------------


def damaged_copy(files, tmp_path, damage):
    import shutil

    m = tmp_path / "m"
    shutil.copytree(files / "model", m)
    damage(m)
    return m


@pytest.mark.parametrize("damage, fragments", [
    (lambda m: (m / "tokenizer.json").unlink(), ("cannot load the tokenizer of", "copy the tokenizer files")),
    (lambda m: (m / "config.json").write_text((m / "config.json").read_text()[:40]), ("cannot load the model in", "config.json", "restore the folder")),
    (lambda m: (m / "config.json").write_text(json.dumps({**json.loads((m / "config.json").read_text()),
                                                           "model_type": "mine", "auto_map": {
                                                               "AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}})),
     ("asks to run its own model code", "never runs a checkpoint's code")),
])
def test_damaged_model_folders(files, tmp_path, capsys, damage, fragments):
    m = damaged_copy(files, tmp_path, damage)
    fails(capsys, ["generate", "--model", m, "--prompt", "w5"], *fragments)


def test_custom_code_is_refused_in_one_line(files, tmp_path, capsys):
    """A known model_type whose auto_map points to the checkpoint's own code: transformers' refusal is one line."""
    def damage(m):
        cfg = json.loads((m / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MineForCausalLM", "AutoConfig": "modeling_mine.MineConfig"}
        (m / "config.json").write_text(json.dumps(cfg))
        (m / "modeling_mine.py").write_text("raise SystemExit('this code must never run')\n")
    m = damaged_copy(files, tmp_path, damage)
    code = main(["generate", "--model", str(m), "--prompt", "w5", "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "must never run" not in out + err
    assert code == 0 or (code == 2 and "never runs a checkpoint's code" in err), err[-2000:]


def test_heal_refuses_a_hybrid_before_loading(files, tmp_path, capsys):
    ok(capsys, convert(files, tmp_path / "m"))
    fails(capsys, ["heal", "--model", tmp_path / "m", "--plan", files / "plan.json", "--data", files / "data" / "corpus",
                   "--out", tmp_path / "h", "--tokens", "256"], "is already a layerboost hybrid", "original model")
    assert not (tmp_path / "h").exists()


def test_foreign_optimizer_state_is_refused_in_one_line(files, corpus, tmp_path, capsys):
    out = tmp_path / "h"
    args = heal_args(files, out, corpus, "--tokens", "1024", "--checkpoint-every", "1")
    ok(capsys, args)
    ck = out / "heal_state" / "checkpoint"
    assert ck.is_dir()
    (out / "heal.json").unlink()  # as if killed before the end, with someone else's optimizer.pt in the checkpoint

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    import torch

    torch.save({"optimizer": Evil()}, ck / "optimizer.pt")
    fails(capsys, [*args, "--resume"], "is corrupt or incomplete")
    assert "code ran" not in capsys.readouterr().out


def test_heal_says_when_it_takes_the_papers_budget(files, tmp_path, capsys):
    args = heal_args(files, tmp_path / "h", files / "data" / "corpus")
    del args[args.index("--tokens"):args.index("--tokens") + 2]
    code = main([str(a) for a in [*args, "--seq-len", "1"]])  # stops before any work, having said the budget
    err = capsys.readouterr().err
    assert code == 2 and "healing the paper's budget of 10M tokens" in err and "seq_len must be >= 2" in err, err


def test_lm_eval_adapter_offline_and_missing_path(files, tmp_path, capsys, monkeypatch):
    from layerboost import lm_eval_adapter as A

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert A.main(["--model", "layerboost", "--model_args", f"path={tmp_path / 'nowhere'}", "--tasks", "piqa"]) == 2
    assert "does not exist" in capsys.readouterr().err
    argv = A.prepare_argv(["--model", "layerboost", "--model_args", f"path={files / 'model'}", "--tasks", "piqa,hellaswag",
                           "--data-dir", str(files / "data")])
    assert "--data-dir" not in argv
    tasks, include = argv[argv.index("--tasks") + 1], Path(argv[argv.index("--include_path") + 1])
    assert tasks == "lb_piqa,hellaswag"  # hellaswag ships no local data: lm-eval's own task, untouched
    assert (include / "lb_piqa.yaml").is_file() and len((include / "lb_piqa.jsonl").read_text().splitlines()) == 8


def test_options_added_since_and_added_measurements_extend_an_output(tmp_path):
    """A folder recorded before an option existed resumes when the option is at its default (it had that value
    then); a measurement that only adds (analyze --retrieval) extends an output made without it; anything else that
    differs is still refused."""
    from layerboost.outputs import OutputError

    out = tmp_path / "a"
    with claim(out, "analyze", {"limit": 10}):
        (out / "sensitivity.json").write_text("{}")
    defaults = {"limit": 200, "keep_retrieval": 0, "retrieval": False, "retrieval_len": 2048}
    extends = {"retrieval": ("retrieval_len", "keep_retrieval")}
    with claim(out, "analyze", {"limit": 10, "keep_retrieval": 0, "retrieval": False, "retrieval_len": 2048},
               defaults=defaults, extends=extends):
        pass
    with claim(out, "analyze", {"limit": 10, "keep_retrieval": 2, "retrieval": True, "retrieval_len": 4096},
               defaults=defaults, extends=extends):
        pass
    assert read_manifest(out)["parts"]["analyze"]["settings"]["retrieval_len"] == 4096  # recorded from now on
    with pytest.raises(OutputError, match=r"\(retrieval_len differ\)"):  # measured with 4096: 2048 is another
        with claim(out, "analyze", {"limit": 10, "keep_retrieval": 2, "retrieval": True, "retrieval_len": 2048},
                   defaults=defaults, extends=extends):
            pass
    with pytest.raises(OutputError, match=r"\(limit differ\)"):
        with claim(out, "analyze", {"limit": 11, "keep_retrieval": 2, "retrieval": True, "retrieval_len": 4096},
                   defaults=defaults, extends=extends):
            pass
    with pytest.raises(OutputError, match=r"\(keep_retrieval, retrieval, retrieval_len differ\)"):  # no defaults
        with claim(out, "analyze", {"limit": 10}):
            pass


# ---- issue 36: export, eval and report take the same rules ----------------------------------------


@pytest.fixture(scope="module")
def gguf_hybrid(files):
    """A saved hybrid whose byte-level BPE tokenizer a GGUF file can hold."""
    import layerboost as lb
    from test_gguf import hybrid, tokenizer

    lb.save(hybrid(["softmax", "swa", "none", "softmax"]), files / "gguf_hybrid", tokenizer=tokenizer.__wrapped__())
    return files / "gguf_hybrid"


def export_args(model, out, fmt="gguf", *more):
    return ["export", "--model", model, "--format", fmt, "--out", out, *more]


def race(argvs, timeout=300):
    """Start every command at once as real processes; their (exit status, stderr)."""
    procs = [subprocess.Popen([*CLI, *map(str, a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in argvs]
    return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]


@pytest.mark.slow  # starts processes
def test_two_gguf_exports_to_one_path_race(gguf_hybrid, tmp_path):
    out = tmp_path / "h.gguf"
    results = race([export_args(gguf_hybrid, out)] * 2)
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert "Traceback" not in err and ("is being written by pid" in err or "exists: choose a new file name" in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.gguf"]  # no lock or part left


@pytest.mark.slow  # starts processes
def test_two_evals_with_other_settings_to_one_file_race(files, tmp_path):
    out = tmp_path / "r.json"
    args = ["eval", "--model", files / "model", "--tasks", "piqa", "--data-dir", files / "data", "--no-progress",
            "--out", out]
    results = race([[*args, "--limit", "4"], [*args, "--limit", "6"]])
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert "Traceback" not in err and ("is being written by pid" in err or "with other settings" in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_export_claims_its_output(files, gguf_hybrid, tmp_path, capsys):
    fake_run_folder(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    fails(capsys, export_args(gguf_hybrid, tmp_path / "run" / "h.gguf"), "is inside", "`layerboost run`")
    ok(capsys, convert(files, tmp_path / "m"))
    fails(capsys, export_args(gguf_hybrid, tmp_path / "m", "transformers"), "was written by `layerboost convert`")
    assert snapshot(tmp_path / "run") == before
    out = tmp_path / "h.gguf"
    ok(capsys, export_args(gguf_hybrid, out))
    first = out.read_bytes()
    fails(capsys, export_args(gguf_hybrid, out, "gguf", "--dtype", "f16"), "exists: choose a new file name", "--force")
    assert out.read_bytes() == first
    ok(capsys, export_args(gguf_hybrid, out, "gguf", "--dtype", "f16", "--force"))
    assert out.read_bytes() != first


def test_export_into_a_folder_it_cannot_write(gguf_hybrid, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing; /proc refuses everyone
        where = Path("/proc/self")
    else:
        where = tmp_path / "ro"
        where.mkdir(mode=0o555)
    fails(capsys, export_args(gguf_hybrid, where / "h.gguf"), "is not writable", "choose a folder you can write to")


def test_a_killed_exports_part_goes_with_the_next_export(gguf_hybrid, tmp_path, capsys):
    (tmp_path / ".h.gguf.999999.part").write_bytes(b"half a file")  # left by a killed export (no such pid)
    ok(capsys, export_args(gguf_hybrid, tmp_path / "h.gguf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.gguf"]


def test_weights_have_the_mode_of_every_other_file(files, tmp_path, capsys):
    ok(capsys, convert(files, tmp_path / "m"))
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir() if p.name != LOCK}
    assert len(set(modes.values())) == 1, modes


def test_report_keeps_an_edited_report_and_never_writes_through_a_link(tmp_path, capsys):
    run = tmp_path / "run"
    fake_run_folder(run)
    (run / "stages").mkdir()
    ok(capsys, ["report", "--run", run])
    ok(capsys, ["report", "--run", run])  # its own report, unchanged: rewritten
    report = run / "report.md"
    report.write_text(report.read_text().replace("# layerboost run report", "# my notes on this run"))
    fails(capsys, ["report", "--run", run], "report.md was edited since layerboost wrote it", "--force")
    assert report.read_text().startswith("# my notes")
    ok(capsys, ["report", "--run", run, "--force"])
    assert report.read_text().startswith("# layerboost run report")
    target = tmp_path / "elsewhere.md"
    target.write_text("someone's file")
    report.unlink()
    report.symlink_to(target)
    fails(capsys, ["report", "--run", run], "report.md is a link", "--force")
    ok(capsys, ["report", "--run", run, "--force"])
    assert target.read_text() == "someone's file" and not report.is_symlink()
