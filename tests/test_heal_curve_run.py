"""scripts/heal_curve.py end to end on a tiny model: heal both rows, evaluate, rate, report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import layerboost as lb
from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_curve_phases_end_to_end(tmp_path):
    tok = lb.load_model("smollm2-135m")[1]
    model_dir = tmp_path / "tiny"
    m = tiny_model("llama", layers=6, vocab=len(tok))
    m.config.max_position_embeddings = 512
    m.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out, docs = tmp_path / "curve", tmp_path / "docs"

    def phase(*argv):
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "heal_curve.py"), *argv, "--model", str(model_dir),
                              "--out", str(out), "--smoke", "--window", "8", "--precision", "fp32", "--threads", "1",
                              "--tasks", "piqa,arc_easy"], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    phase("heal")
    with pytest.raises(AssertionError, match="give budgets above 0 and below the curve's 4096 tokens"):
        phase("budgets", "--at", "1024,4096")
    phase("budgets", "--rows", "no_attn")  # complete heals at 1024 and 3072 tokens
    phase("evaluate")
    phase("rate")
    # a comparison row to pair with (here the base's own results, written as a comparison row is)
    base = {f.stem: json.loads(f.read_text()) for f in (out / "eval" / "base").glob("*.json")}
    row = tmp_path / "rows" / "twin.json"
    row.parent.mkdir()
    row.write_text(json.dumps({"name": "twin", "eval": {t: r for t, r in base.items() if t != "wikitext"},
                               "wikitext": base["wikitext"]}))
    phase("report", "--docs", str(docs), "--against", str(row))
    rec = json.loads((out / "curve.json").read_text())
    last = {r: max(p["tokens"] for p in rec["curves"][r]) for r in ("attn", "no_attn")}
    # every accuracy point of each row, and the base, scored on the same items; WikiText-2 at every snapshot
    for r in ("attn", "no_attn"):
        for t in (1024, 2048, last[r]):
            assert {"piqa", "arc_easy", "wikitext", "heldout"} <= set(rec["evaluations"][f"{r}_{t}"])
    # a snapshot merged into a model gives the probe's held-out KL again
    assert rec["snapshot_checks"] and all(c["abs_diff"] < 1e-4 for c in rec["snapshot_checks"].values())
    pair = rec["tests"][f"attn_{last['attn']} vs no_attn_{last['no_attn']}"]
    assert {"heldout_kl_per_row", "accuracy", "mcnemar", "wikitext_loglik_per_doc"} <= set(pair)
    assert "heldout_kl_per_row" not in rec["tests"][f"attn_{last['attn']} vs base"]  # the base has no KL to itself
    for r in ("attn", "no_attn"):  # paired with the comparison row exactly as with the base it copies
        t = rec["tests"]
        assert t[f"{r}_{last[r]} vs comparison twin"] == t[f"{r}_{last[r]} vs base"]
        assert {"accuracy", "wikitext_loglik_per_doc"} <= set(t[f"{r}_{last[r]} vs comparison twin"])
    # complete heals: each has its own schedule (its end differs from the long row's point at the same tokens),
    # is evaluated, paired with that point, and with the row's end gives the law of complete heals
    for t in (1024, 3072):
        e = rec["evaluations"][f"no_attn_complete_{t}"]
        assert {"wikitext", "heldout"} == set(e) and rec["snapshot_checks"][f"no_attn_complete_{t}"]["abs_diff"] < 1e-4
        assert "heldout_kl_per_row" in rec["tests"][f"no_attn_complete_{t} vs no_attn_{t}"]
    # the last step of a 3-step heal runs at a lower rate than the 3rd of 4 (at 1024 tokens both took one step at
    # the same rate: the same model)
    assert (rec["evaluations"]["no_attn_complete_3072"]["heldout"]["kl"] !=
            pytest.approx(rec["evaluations"]["no_attn_3072"]["heldout"]["kl"], rel=1e-3))
    law = rec["answers"]["no_attn"]["WikiText-2 word perplexity, complete heals"]
    assert [t for t, _ in law["x_base"]] == [1024, 3072, last["no_attn"]]
    assert "WikiText-2 word perplexity, complete heals" not in rec["answers"]["attn"]
    rates = json.loads((docs / "rates.json").read_text())
    assert rates["allocator"] in ("glibc", "jemalloc", "tcmalloc", "mimalloc", "system")
    assert (docs / "curve.png").stat().st_size > 1000 and (docs / "no_attn_log.jsonl").is_file()
