"""Proof of identity with lm-evaluation-harness 0.4.13 (a dev dependency): run lm-eval itself
on local copies of 32 items of each task, with lm-eval's own task YAMLs (only the dataset
location is overridden), against a tiny random model, and compare per-item log-likelihoods,
chosen answers, accuracies and standard errors with `layerboost.evaluate`.

Also checks the `layerboost` lm-eval model adapter end to end.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before lm_eval/datasets read them at import
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from layerboost import data as D  # noqa: E402
from layerboost import evaluate as E  # noqa: E402
from layerboost import lm_eval_adapter as A  # noqa: E402

N_ITEMS = 32
TOL = 1e-4
DATA = D.default_data_dir()
pytestmark = [pytest.mark.skipif(
    DATA is None or not (DATA / "mmlu" / "test.jsonl").is_file(), reason="needs the local benchmark copies (../shared/data)"
), pytest.mark.slow]  # runs lm-evaluation-harness itself


def tiny_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.02, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    from layerboost.models import load_model

    return load_model("smollm2-135m")[1]


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok))


def _hellaswag_docs(n: int) -> list[dict]:
    """HellaSwag-schema items built from ARC questions (no local HellaSwag copy), with the
    `[title]`/`[step]` markup and spacing that lm-eval's preprocessing rewrites."""
    arc = D.load_dataset_docs("arc_easy").docs[:n]
    docs = []
    for i, d in enumerate(arc):
        endings = [t + (" [step] more" if j == 1 else "") for j, t in enumerate(d["choices"]["text"])]
        docs.append({
            "ind": i, "activity_label": "Science", "ctx_a": d["question"] + " [title] Think.", "ctx_b": "the answer is",
            "ctx": "", "endings": endings, "source_id": "x", "split": "val", "split_type": "indomain",
            "label": str(d["choices"]["label"].index(d["answerKey"])),
        })
    return docs


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    """Select items, write lm-eval task copies of them; prepare our requests on the same docs."""
    tmp = tmp_path_factory.mktemp("parity")
    prepared: dict[str, E.PreparedTask] = {}
    selected: dict[str, list[dict]] = {}
    for name in ("piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag", "mmlu"):
        task = E.TASKS[name]
        if name == "hellaswag":
            raw, source = _hellaswag_docs(N_ITEMS), "synthetic"
        else:
            loaded = D.load_dataset_docs(task.dataset)
            raw, source = loaded.docs, loaded.source
        docs = [task.process_doc(d) for d in raw] if task.process_doc else raw
        prepared[name] = E.prepare_task(tok, task, limit=N_ITEMS, seed=0, docs=(docs, source))
        selected[name] = [raw[i] for i in prepared[name].doc_ids]  # lm-eval gets the unprocessed documents
    mapping = A.write_local_tasks(selected, tmp, prefix="lbp_")
    return tmp, prepared, mapping


@pytest.fixture(scope="module")
def lm_eval_run(setup, model, tok):
    tmp, _, mapping = setup
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    tm = TaskManager(include_path=str(tmp), include_defaults=False)
    names = A.task_names_to_run(mapping, prefix="lbp_")
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, log_samples=True, bootstrap_iters=100)


@pytest.mark.parametrize("name", ["piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag", "mmlu"])
def test_per_item_logliks_and_choices_match_lm_eval(setup, lm_eval_run, model, name):
    _, prepared, mapping = setup
    prep = prepared[name]
    assert len(prep.items) >= 30
    ours = E.score_requests(model, prep.requests, batch_size=8, progress=False)
    checked = 0
    for lm_task, positions in mapping[name]:
        samples = sorted(lm_eval_run["samples"][lm_task], key=lambda s: s["doc_id"])
        assert len(samples) == len(positions)
        for s, pos in zip(samples, positions):
            theirs = [float(r[0][0]) for r in s["resps"]]
            mine = ours[pos].logliks
            item = prep.items[pos]
            assert len(theirs) == len(mine), f"{name} item {pos}: number of choices"
            diff = max(abs(a - b) for a, b in zip(theirs, mine))
            assert diff <= TOL, f"{name} item {pos}: |loglik diff| {diff:.2e}"
            pred = E.item_predictions(item, ours[pos])
            assert pred["pred"] == int(max(range(len(theirs)), key=lambda i: (theirs[i], -i)))
            assert s["acc"] == float(pred["pred"] == item.gold)
            if "acc_norm" in s:
                assert s["acc_norm"] == float(pred["pred_norm"] == item.gold)
            checked += 1
    assert checked == len(prep.items)

    # aggregate metrics and standard errors, as lm-eval reports them
    mine = E.mc_metrics(prep.task, prep.items, ours)
    res = lm_eval_run["results"]["lbp_mmlu" if name == "mmlu" else f"lbp_{name}"]
    if name != "mmlu":
        assert mine["acc"] == pytest.approx(res["acc,none"])
        assert mine["acc_stderr"] == pytest.approx(res["acc_stderr,none"])
        if "acc_norm,none" in res:
            assert mine["acc_norm"] == pytest.approx(res["acc_norm,none"])
            assert mine["acc_norm_stderr"] == pytest.approx(res["acc_norm_stderr,none"])
    else:
        assert mine["acc"] == pytest.approx(res["acc,none"])
        if res["acc_stderr,none"] == "N/A":  # a subject with a single item
            assert mine["acc_stderr"] is None
        else:
            assert mine["acc_stderr"] == pytest.approx(res["acc_stderr,none"])


def test_wikitext_perplexity_matches_lm_eval(tmp_path, tok, model):
    """Rolling windows (short max_length so documents span many windows) and word/byte perplexity."""
    raw = D.load_dataset_docs("wikitext").docs[0]["text"]
    pages = [p[:1500] for p in D.split_wikitext_documents(raw)[:3]]
    A.write_local_tasks({"wikitext": [{"page": p} for p in pages]}, tmp_path, prefix="lbp_")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=64)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["lbp_wikitext"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=0,
    )["results"]["lbp_wikitext"]
    prep = E.prepare_task(tok, "wikitext", docs=([{"page": p} for p in pages], "test"))
    mine = E.perplexity_metrics(prep.requests, E.score_rolling(model, tok, prep.requests, max_length=64, progress=False))
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert mine[key] == pytest.approx(out[f"{key},none"], rel=1e-5), key


def test_wikitext_split_into_articles():
    """One document per top-level heading: 62 in the WikiText-2 test split, as in EleutherAI/wikitext_document_level."""
    raw = D.load_dataset_docs("wikitext").docs[0]["text"]
    assert len(D.split_wikitext_documents(raw)) == 62


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tok, model):
    path = tmp_path_factory.mktemp("saved") / "m"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_layerboost_model_adapter(setup, saved_model, model):
    """`model="layerboost", model_args="path=DIR"` (registered by importing the adapter) gives our scores."""
    tmp, prepared, _ = setup
    out = lm_eval.simple_evaluate(
        model="layerboost", model_args=f"path={saved_model}", tasks=["lbp_piqa"], limit=10, batch_size=4, device="cpu",
        task_manager=TaskManager(include_path=str(tmp), include_defaults=False), log_samples=True, bootstrap_iters=0,
    )
    assert out["config"]["model"] == "layerboost"
    ours = E.score_requests(model, prepared["piqa"].requests[:10], progress=False)
    assert len(out["samples"]["lbp_piqa"]) == 10
    for s in out["samples"]["lbp_piqa"]:
        theirs = [float(r[0][0]) for r in s["resps"]]
        assert max(abs(a - b) for a, b in zip(theirs, ours[s["doc_id"]].logliks)) <= TOL


def test_adapter_command_line(setup, saved_model):
    """The documented command: `python -m layerboost.lm_eval_adapter --model layerboost --model_args path=DIR ...`."""
    import subprocess
    import sys

    tmp, _, _ = setup
    cmd = [sys.executable, "-m", "layerboost.lm_eval_adapter", "--model", "layerboost", "--model_args", f"path={saved_model}",
           "--tasks", "lbp_winogrande", "--include_path", str(tmp), "--limit", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lbp_winogrande" in proc.stdout and "acc" in proc.stdout and "layerboost" in proc.stdout
