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
    assert 1024 - 40 < n <= 1024
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


@pytest.mark.slow
def test_the_base_model_retrieves_well_above_chance():
    model, tok = lb.load_model("smollm2-135m")
    res = score_passkey(model, tok, lengths=(512,), trials=10, progress=False)["lengths"]["512"]
    assert res["acc"] >= 0.8 and res["exact"] >= 0.5
