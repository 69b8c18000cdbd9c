"""scripts/heal_schedule.py: its selection slice never reads the reported held-out rows; its pick follows the written rule."""

import importlib.util
from pathlib import Path

import torch

from layerboost.corpus import heldout_rows
from layerboost.data import default_data_dir

spec = importlib.util.spec_from_file_location("heal_schedule", Path(__file__).parents[1] / "scripts" / "heal_schedule.py")
S = importlib.util.module_from_spec(spec)
spec.loader.exec_module(S)


class ByteTok:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


def test_selection_slice_follows_the_reported_rows_without_overlap():
    data, tok, seq = default_data_dir() / "corpus", ByteTok(), 128
    reported = heldout_rows(tok, data, 1000, seq)  # 8 rows, the last one partly past 1,000 tokens
    sel = S.selection_rows(tok, data, 1000, 1024, seq)
    both = heldout_rows(tok, data, 8 * seq + 1024, seq)
    assert reported.shape == (8, seq) and sel.shape == (8, seq)
    assert torch.equal(both[:8], reported) and torch.equal(both[8:], sel)
    body = lambda r: tuple(r[1:].tolist())  # rows share the prefix token; compare the text after it
    assert not {body(r) for r in reported} & {body(r) for r in sel}


def test_every_arm_is_a_valid_heal_config_and_the_default_is_the_default():
    from layerboost.heal import HealConfig

    for arm in S.ARMS.values():
        HealConfig(tokens="1M", **arm)
    d = HealConfig(tokens="1M")
    assert S.ARMS[S.DEFAULT_ARM] == {"schedule": d.schedule, "lr": d.lr}


def test_the_pick_must_beat_the_default_by_more_than_the_seed_spread_with_p_below_005():
    ends = {"cosine_3e-3": {"kl": 0.30}, "a": {"kl": 0.25}, "b": {"kl": 0.26}, "c": {"kl": 0.2999}, "d": {"kl": 0.20}}
    tests = {"a": {"diff": -0.05, "p": 0.001}, "b": {"diff": -0.04, "p": 0.001},
             "c": {"diff": -0.0001, "p": 0.001},  # significant but inside the seed spread
             "d": {"diff": -0.10, "p": 0.2}}      # the lowest KL but not significant
    assert S.choose(ends, tests) == "a"
    assert S.choose(ends, {k: tests[k] for k in ("c", "d")}) == "cosine_3e-3"
    assert S.choose(ends, {"b": tests["b"], "c": tests["c"]}) == "b"
