"""Pass-key retrieval (evaluate/retrieval.py): the trials, the scores against an independent full forward, refusals,
and the real base model well above chance."""

import pytest
import torch
import torch.nn.functional as F

import layerboost as lb
from layerboost.evaluate.retrieval import make_trial, passkey_items, score_passkey
from layerboost.evaluate.tasks import TaskError

from conftest import tiny_model


@pytest.fixture(scope="module")
def tok():
    return lb.load_model("smollm2-135m")[1]


def test_trials_are_seeded_sized_and_hold_one_needle(tok):
    a, b = make_trial(tok, 1024, 3, seed=0), make_trial(tok, 1024, 3, seed=0)
    assert a == b and make_trial(tok, 1024, 3, seed=1).key != a.key
    n = len(tok(a.text, add_special_tokens=False)["input_ids"])
    assert 1024 - 48 < n <= 1024 - 8  # room for the answer: prompt and key fit in 1024
    assert a.text.count(a.key) == 2 and all(d not in a.text for d in a.distractors)
    assert len(set(a.distractors) | {a.key}) == 10 and 0 <= a.depth <= 1
    depths = [make_trial(tok, 512, t).depth for t in range(20)]
    assert min(depths) < 0.3 and max(depths) > 0.7  # needles spread through the context
    items = passkey_items(tok, 256, 2)
    assert items[0].gold == 0 and items[0].continuations[0] == " " + make_trial(tok, 256, 0).key


@torch.no_grad()
def test_scores_match_a_full_forward(tok, one_thread):
    model = tiny_model("llama", layers=2, vocab=len(tok))
    res = score_passkey(model, tok, lengths=(128,), trials=3, progress=False)
    rows = res["lengths"]["128"]["trials"]
    for row, item in zip(rows, passkey_items(tok, 128, 3)):
        lls, greedy = [], []
        for ctx, cont in zip(item.contexts, item.continuations):
            c = tok(ctx, add_special_tokens=False)["input_ids"]
            k = tok(ctx + cont, add_special_tokens=False)["input_ids"][len(c):]
            ids = torch.tensor([c + k])
            lp = F.log_softmax(model(ids).logits[0, len(c) - 1:-1].double(), -1)
            lls.append(lp[torch.arange(len(k)), torch.tensor(k)].sum().item())
            greedy.append(bool((lp.argmax(-1) == torch.tensor(k)).all()))
        assert row["margin"] == pytest.approx(lls[0] - max(lls[1:]), abs=1e-3)
        assert row["acc"] == int(lls[0] > max(lls[1:])) and row["exact"] == int(greedy[0])
    assert res["chance"] == 0.1 and res["lengths"]["128"]["acc"] == sum(r["acc"] for r in rows) / 3
    with pytest.raises(TaskError, match="do not fit the model's context of 512"):
        score_passkey(model, tok, lengths=(1024,), trials=1, progress=False)
    full = score_passkey(model, tok, lengths=(512,), trials=1, progress=False)["lengths"]["512"]  # the whole context
    assert full["trials"][0]["tokens"] <= 512 - 8


@pytest.mark.slow
def test_the_base_model_retrieves_well_above_chance():
    model, tok = lb.load_model("smollm2-135m")
    res = score_passkey(model, tok, lengths=(512,), trials=10, progress=False)["lengths"]["512"]
    assert res["acc"] >= 0.8 and res["exact"] >= 0.5


def test_needle_trials_place_a_fact_in_real_prose_disjoint_between_evaluation_and_selection(tok):
    from layerboost.evaluate.retrieval import FACT_QUESTION, make_needle_trial, retrieval_items

    ev = [make_needle_trial(tok, 1024, t) for t in range(6)]
    sel = [make_needle_trial(tok, 1024, t, seed=1, source="selection") for t in range(6)]
    assert ev[0] == make_needle_trial(tok, 1024, 0) and ev[0].key != sel[0].key
    for tr in ev + sel:
        n = len(tok(tr.text, add_special_tokens=False)["input_ids"])
        assert 800 < n <= 1024 - 8 and tr.text.count(tr.key) == 1 and all(d not in tr.text for d in tr.distractors)
        assert tr.text.rstrip().endswith("number is") and "Question: What is" in tr.text
    # evaluation reads WikiText-2 test (its " @-@ " / " = Title = " layout), selection the novels outside held-out
    # blocks: no sentence of one appears in the other
    ev_text = " ".join(t.text.split("\n\nQuestion")[0] for t in ev)
    assert "@" in ev_text or " = " in ev_text
    for t in sel:
        body = t.text.split("\n\nQuestion")[0]
        sentences = [s for s in body.split(". ") if len(s) > 60 and t.key not in s]
        assert sentences and not any(s in ev_text for s in sentences)
    depths = [make_needle_trial(tok, 512, t).depth for t in range(20)]
    assert min(depths) < 0.3 and max(depths) > 0.7
    items = retrieval_items(tok, "needle", 512, 2)
    assert items[0].continuations[0] == " " + make_needle_trial(tok, 512, 0).key and items[0].gold == 0
    with pytest.raises(ValueError, match="family 'nope'"):
        retrieval_items(tok, "nope", 512, 1)


def test_synthetic_retrieval_rows_keep_length_ask_for_their_own_fact_and_never_use_evaluation_templates(tok):
    import random

    from layerboost.corpus import retrieval_row, retrieval_rows
    from layerboost.evaluate.retrieval import FACT, NEEDLE, QUESTION

    prose = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 40)
    row = tok(prose, add_special_tokens=False)["input_ids"][:256]
    out = retrieval_row(row, tok, random.Random(3))
    text = tok.decode(out)
    assert len(out) == len(row) and out != row
    key = text.split("code is ")[1][:5]
    assert key.isdigit() and text.endswith(f"code was {key}.") and text.count(key) == 2
    assert "pass key" not in text and "number is" not in text  # not the evaluation templates
    assert NEEDLE.split("{")[0] not in text and QUESTION.strip() not in text
    assert FACT.split("}")[-2].split("{")[0] not in text  # "'s " ... " number is "
    assert retrieval_row(row[:20], tok, random.Random(0)) == row[:20]  # too short to hold it: unchanged
    f = retrieval_rows(tok, 0.25, seed=0)
    changed = [f(row, n) != row for n in range(200)]
    assert 0.15 < sum(changed) / 200 < 0.35 and [f(row, n) for n in range(5)] == [f(row, n) for n in range(5)]


def test_the_retrieval_signal_finds_the_one_layer_that_can_see_the_needle(tok, one_thread):
    """A tiny model whose attention output is zero in every layer but layer 2: only layer 2 can carry the needle
    forward, so only it scores, `alone` equals `drop` there, and both match forwards of converted models."""
    from layerboost.sensitivity.retrieval import retrieval_signal
    from layerboost.surgery import convert
    from layerboost.plan import LayerPlan, LayerSpec
    import copy

    model = tiny_model("llama", layers=4, vocab=len(tok))
    for i in (0, 1, 3):
        torch.nn.init.zeros_(model.model.layers[i].self_attn.o_proj.weight)
    rows = [(list(range(5, 5 + 120)), [40, 41, 42]), (list(range(200, 300)), [7, 8])]
    res = retrieval_signal(model, tok, window=16, rows=rows, progress=False)
    assert max(abs(res["alone"][i]) for i in (0, 1, 3)) < 1e-4 and max(abs(res["drop"][i]) for i in (0, 1, 3)) < 1e-4
    assert abs(res["alone"][2]) > 1e-3 and res["alone"][2] == pytest.approx(res["drop"][2], abs=1e-4)

    def ll(m, prompt, answer):
        lp = F.log_softmax(m(torch.tensor([prompt + answer])).logits[0].double(), -1)
        return sum(lp[len(prompt) - 1 + k, t].item() for k, t in enumerate(answer))

    def converted(kinds):
        m = copy.deepcopy(model)
        convert(m, LayerPlan(tuple(LayerSpec("swa", 16) if k == "swa" else LayerSpec("softmax") for k in kinds)))
        return m

    plain = tiny_model("llama", layers=4, vocab=len(tok), seed=1)  # a reference on a model with no zeroed layer
    model = plain
    res = retrieval_signal(model, tok, window=16, rows=rows, progress=False)
    with torch.no_grad():
        for i in range(4):
            alone = [ll(converted(["swa"] * i + ["softmax"] + ["swa"] * (3 - i)), p, a) - ll(converted(["swa"] * 4), p, a)
                     for p, a in rows]
            drop = [ll(model, p, a) - ll(converted(["softmax"] * i + ["swa"] + ["softmax"] * (3 - i)), p, a)
                    for p, a in rows]
            assert res["alone"][i] == pytest.approx(sum(alone) / 2, abs=1e-3)
            assert res["drop"][i] == pytest.approx(sum(drop) / 2, abs=1e-3)
    with pytest.raises(ValueError, match="do not exceed the window"):
        retrieval_signal(model, tok, window=128, rows=rows, progress=False)
    with pytest.raises(ValueError, match="seed 0 draws the trials"):
        retrieval_signal(model, tok, seed=0, progress=False)
