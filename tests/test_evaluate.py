"""Fast unit tests of layerboost.evaluate and layerboost.data (tiny random model, real tokenizer)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from layerboost import data as D
from layerboost import evaluate as E

DATA = D.default_data_dir()
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "piqa" / "validation.jsonl").is_file(), reason="no ../shared/data")


@pytest.fixture(scope="module")
def tok():
    from layerboost.models import load_model

    return load_model("smollm2-135m")[1]  # the real SmolLM2 tokenizer (model load is cached, ~2 s)


def tiny_model(vocab: int, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=kw.pop("max_pos", 2048), initializer_range=0.1,
        tie_word_embeddings=False, **kw,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok))


# ---- formats ---------------------------------------------------------------------------------


def test_piqa_arc_mmlu_formats():
    piqa = E.build_items(E.TASKS["piqa"], [{"goal": "Open a jar", "sol1": "twist", "sol2": "hit", "label": 1}])[0]
    assert piqa.contexts == ("Question: Open a jar\nAnswer:",) * 2
    assert piqa.continuations == (" twist", " hit") and piqa.gold == 1
    arc = {"question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    it = E.build_items(E.TASKS["arc_challenge"], [arc])[0]
    assert it.contexts[0] == "Question: Q?\nAnswer:" and it.gold == 2 and it.continuations == (" a", " b", " c")
    assert E.TASKS["arc_challenge"].column == "acc_norm" and E.TASKS["arc_easy"].column == "acc"
    mm = {"question": " What? ", "subject": "high_school_physics", "choices": ["w", "x", "y", "z"], "answer": 3}
    it = E.build_items(E.TASKS["mmlu"], [mm])[0]
    assert it.contexts[0] == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    )
    assert it.continuations == (" A", " B", " C", " D") and it.gold == 3 and it.group == "high_school_physics"


def test_winogrande_partial_scoring():
    doc = {"sentence": "Tom gave Bob a gift because _ was kind.", "option1": "Tom", "option2": "Bob", "answer": "1"}
    it = E.build_items(E.TASKS["winogrande"], [doc])[0]
    assert it.contexts == ("Tom gave Bob a gift because Tom", "Tom gave Bob a gift because Bob")
    assert it.continuations == (" was kind.", " was kind.") and it.gold == 0
    assert it.choices == it.contexts  # lm-eval's doc_to_choice for winogrande are the contexts


def test_hellaswag_preprocess():
    doc = {"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she", "label": "2",
           "endings": ["bakes [title] it.", "eats  it", "[step] waits.", "x"]}
    it = E.build_items(E.TASKS["hellaswag"], [E.TASKS["hellaswag"].process_doc(doc)])[0]
    assert it.contexts[0] == "Baking: She mixes flour. Then she"
    assert it.choices == ("bakes. it.", "eats it", " waits.", "x") and it.gold == 2


def test_user_task_definition(tmp_path):
    (tmp_path / "items.jsonl").write_text(
        json.dumps({"q": "2+2", "opts": ["3", "4"], "ans": "4", "kind": "math"}) + "\n"
        + json.dumps({"q": "sky", "opts": ["blue", "red"], "ans": 0, "kind": "nature"}) + "\n"
    )
    spec = tmp_path / "task.yaml"
    spec.write_text('name: mine\ndata: items.jsonl\nprompt: "Q: {q}\\nA:"\nchoices: opts\ngold: ans\nmetric: acc_norm\nstratify: kind\n')
    task = E.get_task(str(spec))
    docs, source = E.load_task_docs(task)
    items = E.build_items(task, docs)
    assert source.endswith("items.jsonl") and task.column == "acc_norm"
    assert [it.gold for it in items] == [1, 0] and items[0].contexts[0] == "Q: 2+2\nA:" and items[1].stratum == "nature"
    spec.write_text("name: bad\ndata: items.jsonl\n")
    with pytest.raises(ValueError, match="lacks"):
        E.get_task(str(spec))


# ---- tokenisation like HFLM ------------------------------------------------------------------


def test_encode_pair_moves_trailing_space(tok):
    enc = E.HFLMTokenizer(tok)
    (ctx, cont), = enc.encode_pairs([("Question: hi\nAnswer: ", "yes")])
    whole = tok.encode("Question: hi\nAnswer: yes")
    assert ctx == tok.encode("Question: hi\nAnswer:") and ctx + cont == whole
    (ctx, cont), = enc.encode_pairs([("", " hello")])  # empty context: BOS (else EOS) conditions it
    assert ctx == [tok.bos_token_id] and cont == tok.encode(" hello", add_special_tokens=False)


# ---- scorer ----------------------------------------------------------------------------------


def _synthetic_items(n: int, seed: int = 0) -> list[E.MCItem]:
    rng = random.Random(seed)
    words = "the cat dog ran sat on a mat quickly blue red green house tree river stone".split()
    items = []
    for i in range(n):
        ctx = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        k = rng.randint(1, 4)
        conts = [" " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(k)]
        if i % 7 == 3:  # MMLU-style: one-token answers, scored from the context's last position only
            items.append(E.MCItem("syn", i, (ctx,) * 4, (" A", " B", " C", " D"), ("A", "B", "C", "D"), 1, "s"))
        elif i % 5 == 0:  # partial-style item: contexts differ, continuation shared
            items.append(E.MCItem("syn", i, tuple(ctx + c for c in conts), (" end.",) * k, tuple(conts), 0, "s"))
        else:
            items.append(E.MCItem("syn", i, (ctx,) * k, tuple(conts), tuple(conts), rng.randrange(k), "s"))
    return items


def naive_reference(model, req: E.MCRequest) -> list[float]:
    """Straight from the definition: one unbatched forward per choice."""
    out = []
    for ctx, cont in zip(req.context_tokens, req.continuation_tokens):
        ids = torch.tensor([list(ctx + cont)[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        out.append(sum(float(logp[p, t]) for p, t in zip(pos, cont)))
    return out


@pytest.mark.parametrize("batch_size", [1, 7])
def test_prefix_scorer_equals_naive(tok, model, batch_size):
    reqs = E.encode_items(tok, _synthetic_items(40))
    fast = E.score_requests(model, reqs, batch_size=batch_size, progress=False)
    naive = E.score_requests(model, reqs, method="naive", batch_size=batch_size, progress=False)
    for r, f, n in zip(reqs, fast, naive):
        ref = naive_reference(model, r)
        assert max(abs(a - b) for a, b in zip(f.logliks, ref)) < 1e-4
        assert max(abs(a - b) for a, b in zip(n.logliks, ref)) < 1e-4
        assert f.greedy == n.greedy


def test_prefix_scorer_on_converted_hybrid_model(tok):
    """Converted models (sliding-window, linear and no-attention layers with their hybrid cache)
    score the same with the shared-prefix cache as choice by choice; windows are shorter than
    the items so the cache path really matters."""
    from layerboost import plan as plan_mod
    from layerboost import surgery
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.1,
    )).eval()
    S = plan_mod.LayerSpec
    surgery.convert(model, plan_mod.LayerPlan([S("softmax"), S("swa", window=4), S("linear_swa", window=3), S("none")]))
    reqs = E.encode_items(tok, _synthetic_items(30))
    fast = E.score_requests(model, reqs, batch_size=7, progress=False)
    naive = E.score_requests(model, reqs, method="naive", batch_size=1, progress=False)
    assert max(abs(a - b) for f, n in zip(fast, naive) for a, b in zip(f.logliks, n.logliks)) < 1e-4


def test_scorer_left_truncates_like_lm_eval(tok):
    model = tiny_model(len(tok), max_pos=8)
    item = E.MCItem("t", 0, ("a b c d e f g h i j k",) * 2, (" l m", " n"), (" l m", " n"), 0, "s")
    req = E.encode_items(tok, [item])[0]
    got = E.score_requests(model, [req], progress=False)[0].logliks
    for ctx, cont, ll in zip(req.context_tokens, req.continuation_tokens, got):
        ids = torch.tensor([list(ctx + cont)[-9:][:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        ref = sum(float(logp[8 - len(cont) + j, t]) for j, t in enumerate(cont))
        assert abs(ll - ref) < 1e-4


class _NoCacheLM(torch.nn.Module):
    """Wraps a model but returns no cache: the scorer must warn and fall back to per-choice scoring."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, **kw):
        out = self.inner(input_ids=input_ids, use_cache=False)
        return type("Out", (), {"logits": out.logits, "cache": None})()


def test_no_cache_model_falls_back_with_warning(tok, model):
    reqs = E.encode_items(tok, _synthetic_items(6))
    with pytest.warns(UserWarning, match="one by one"):
        got = E.score_requests(_NoCacheLM(model), reqs, progress=False)
    ref = E.score_requests(model, reqs, method="naive", progress=False)
    assert all(abs(a - b) < 1e-4 for g, r in zip(got, ref) for a, b in zip(g.logliks, r.logliks))


def test_rolling_windows_cover_every_token_once():
    toks = list(range(10, 33))
    wins = E.rolling_windows(toks, prefix_token=1, max_length=5)
    predicted = [t for seq, n in wins for t in seq[-n:]]
    assert predicted == toks
    assert wins[0][0][0] == 1 and all(len(seq) - 1 <= 5 for seq, _ in wins)
    assert all(len(seq) == 6 for seq, _ in wins[1:])  # later windows keep a full context


# ---- metrics ---------------------------------------------------------------------------------


def test_metrics_acc_norm_and_stderr():
    task = E.TASKS["piqa"]
    items = [E.MCItem("piqa", i, ("c", "c"), (" a", " bbbb"), ("a", "bbbb"), g, "s") for i, g in enumerate([1, 0, 1])]
    scores = [E.ItemScore((-2.0, -3.0), (False, False))] * 3  # acc picks 0; acc_norm picks 1 (-2/1 < -3/4)
    m = E.mc_metrics(task, items, scores)
    assert m["acc"] == pytest.approx(1 / 3) and m["acc_norm"] == pytest.approx(2 / 3)
    sd = math.sqrt(((1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert m["acc_stderr"] == pytest.approx(sd / math.sqrt(3))
    p = E.item_predictions(items[0], scores[0])
    assert p["margin"] == pytest.approx(-1.0) and p["margin_norm"] == pytest.approx(-0.75 + 2.0)


def test_group_stderr_is_pooled_like_lm_eval():
    ses, sizes = [0.1, 0.05], [10, 30]
    expected = math.sqrt(((9 * 0.01 * 10) + (29 * 0.0025 * 30)) / (40 - 2) / 40)
    assert E.pooled_sample_stderr(ses, sizes) == pytest.approx(expected)
    assert E.mean_stderr([1.0]) is None


def test_stratified_subsample_deterministic_and_proportional():
    strata = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    s1 = E.stratified_subsample(strata, 20, seed=3, key="t")
    assert s1 == E.stratified_subsample(strata, 20, seed=3, key="t") and len(s1) == 20
    assert s1 != E.stratified_subsample(strata, 20, seed=4, key="t")
    counts = {g: sum(strata[i] == g for i in s1) for g in "abc"}
    assert counts == {"a": 12, "b": 6, "c": 2}
    assert E.stratified_subsample(strata, None, 0) == list(range(100))
    assert len(E.stratified_subsample(strata, 0.1, 0)) == 10


# ---- data ------------------------------------------------------------------------------------


def test_missing_data_error_names_file_and_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(D.DataNotFoundError) as e:
        D.load_dataset_docs("hellaswag", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "hellaswag" / "validation.jsonl") in msg
    assert "--data-dir" in msg and "LAYERBOOST_DATA_DIR" in msg and "Rowan/hellaswag" in msg


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERBOOST_DATA_DIR", str(tmp_path))
    assert D.default_data_dir() == tmp_path
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text("{}\n")
    assert D.evaluation_files() == [(tmp_path / "piqa" / "validation.jsonl").resolve()]


def test_wikitext_document_split():
    raw = " \n = A = \n \n text a \n = = Sub = = \n more \n = B = \n text b \n"
    pages = D.split_wikitext_documents(raw)
    assert len(pages) == 2 and pages[0].startswith(" = A = ") and "= = Sub = =" in pages[0]
    assert pages[1].startswith(" = B = ")


@needs_data
def test_local_data_loads_and_evaluate_runs(tok, model):
    res = E.evaluate(model, tok, ["piqa", "arc_challenge", "mmlu"], limit=8, progress=False, per_item=True)
    assert set(res["tasks"]) == {"piqa", "arc_challenge", "mmlu"}
    assert res["tasks"]["piqa"]["n"] == 8 and res["tasks"]["piqa"]["n_total"] == 1838
    assert res["average"]["columns"]["arc_challenge"] == "acc_norm"
    assert len(res["tasks"]["mmlu"]["items"]) == 8 and "margin" in res["tasks"]["mmlu"]["items"][0]
    json.dumps(res)
    table = E.format_table(res)
    assert "arc_challenge" in table and "acc_norm" in table and "average" in table


@torch.no_grad()
def test_rolling_perplexity_projects_the_head_in_chunks(tok):
    """score_rolling takes the LM head out of the model and projects 1,024 positions at a time (a whole
    window of logits is 34 GB for Gemma 3's context and vocabulary); the log-likelihoods equal one full
    forward's, and the head is back in place afterwards."""
    from layerboost.evaluate.requests import RollingRequest

    model = tiny_model(len(tok))
    head = model.lm_head
    seen = []
    hook = head.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0]))
    tokens = torch.randint(3, len(tok), (2500,), generator=torch.Generator().manual_seed(0)).tolist()
    got = E.score_rolling(model, tok, [RollingRequest(doc_id=0, tokens=tokens, words=1, bytes=1)],
                          max_length=2048, progress=False)[0]
    hook.remove()
    assert model.lm_head is head and max(seen) <= 1024 and sum(seen) == 2500
    # reference: the model's own forward, full logits, over the same two rolling windows
    ref = 0.0
    for seq, n_pred in E.rolling_windows(tokens, tok.bos_token_id or tok.eos_token_id, 2048):
        lp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0, -n_pred:].float(), -1)
        ref += float(lp.gather(-1, torch.tensor(seq[-n_pred:])[:, None]).sum())
    assert got == pytest.approx(ref, rel=1e-5)
