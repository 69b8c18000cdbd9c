"""Long-context retrieval: a pass key hidden in filler text (Mohtashami & Jaggi, 2023, as every later long-context
study uses it), asked for at the end.

Each trial is scored as a multiple-choice item through the same prefix-shared scorer as the accuracy tasks: the
prompt runs once, then the true key and `distractors` other random keys are scored as continuations. Two scores:

- `acc`: the true key has the highest log-likelihood among the keys (chance: 1 / (distractors + 1)); small
  differences show here first, and a 135M model scores well above chance.
- `exact`: the true key is the greedy decode (every one of its tokens is the argmax given the ones before), what a
  user asking for the key gets back.
- `margin`: the true key's log-likelihood minus the best distractor's (nats), the continuous measure for paired tests.

Trials are a pure function of (tokenizer, length, trials, seed): the key, the distractors and the needle's depth are
drawn from `random.Random(f"passkey:{seed}:{length}:{trial}")`. Evaluation uses seed 0; anything that chooses layers
must use another seed (the outputs record it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .requests import MCItem, encode_items

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Trial:
    length: int
    trial: int
    key: str
    distractors: tuple[str, ...]
    depth: float  # where the needle sits, as a fraction of the filler
    text: str


def _keys(rnd: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = str(rnd.randint(10000, 99999))
        if k not in keys:
            keys.append(k)
    return keys


def make_trial(tokenizer, length: int, trial: int, seed: int = 0, distractors: int = 9) -> Trial:
    """One prompt of about `length` tokens (within one filler sentence) with the needle at a random depth."""
    rnd = random.Random(f"passkey:{seed}:{length}:{trial}")
    keys = _keys(rnd, distractors + 1)
    depth = rnd.uniform(0.05, 0.95)
    needle = NEEDLE.format(key=keys[0])

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    fixed = n_tokens(INTRO + needle + QUESTION)
    per = n_tokens(FILLER * 20) / 20
    reps = max(2, int((length - fixed) / per))
    while reps > 2 and n_tokens(INTRO + FILLER * reps + needle + QUESTION) > length:
        reps -= 1
    at = round(depth * reps)
    text = INTRO + FILLER * at + needle + FILLER * (reps - at) + QUESTION
    return Trial(length, trial, keys[0], tuple(keys[1:]), at / reps, text)


def passkey_items(tokenizer, length: int, trials: int, seed: int = 0, distractors: int = 9) -> list[MCItem]:
    """The trials of one length as multiple-choice items: choice 0 is the true key."""
    out = []
    for t in range(trials):
        tr = make_trial(tokenizer, length, t, seed, distractors)
        keys = (tr.key,) + tr.distractors
        out.append(MCItem(f"passkey_{length}", t, (tr.text,) * len(keys), tuple(" " + k for k in keys), keys, 0,
                          f"{tr.depth:.2f}"))
    return out


def score_passkey(model, tokenizer, lengths=(1024, 2048, 4096, 8192), trials: int = 50, seed: int = 0,
                  distractors: int = 9, batch_size: int = 1, progress: bool = True) -> dict:
    """Pass-key retrieval at each length: acc / exact / margin per length with every trial's numbers (for paired
    tests). Lengths beyond the model's context are refused."""
    from .scoring import model_max_length, score_requests
    from .tasks import TaskError

    limit = model_max_length(model, tokenizer)
    too_long = [n for n in lengths if n + 8 > limit]
    if too_long:
        raise TaskError(f"pass-key length(s) {too_long} do not fit the model's context of {limit} tokens: use lengths "
                        f"up to {limit - 8}")
    out = {"seed": seed, "trials": trials, "distractors": distractors, "chance": 1 / (distractors + 1), "lengths": {}}
    for n in lengths:
        items = passkey_items(tokenizer, n, trials, seed, distractors)
        reqs = encode_items(tokenizer, items)
        scores = score_requests(model, reqs, batch_size=batch_size, method="prefix", progress=progress)
        rows = []
        for it, req, sc in zip(items, reqs, scores):
            best_other = max(sc.logliks[1:])
            rows.append({"trial": it.doc_id, "depth": float(it.stratum), "tokens": len(req.context_tokens[0]),
                         "acc": int(sc.logliks[0] > best_other), "exact": int(sc.greedy[0]),
                         "margin": sc.logliks[0] - best_other})
        k = len(rows)
        out["lengths"][str(n)] = {"acc": sum(r["acc"] for r in rows) / k, "exact": sum(r["exact"] for r in rows) / k,
                                  "margin": sum(r["margin"] for r in rows) / k, "trials": rows}
    return out


def format_passkey(res: dict) -> str:
    lines = [f"pass key ({res['trials']} trials per length, {res['distractors']} distractor keys, chance "
             f"{res['chance']:.0%}, seed {res['seed']})", f"{'length':>7} {'acc':>6} {'exact':>6} {'margin':>8}"]
    for n, r in res["lengths"].items():
        lines.append(f"{n:>7} {r['acc']:>6.0%} {r['exact']:>6.0%} {r['margin']:>8.2f}")
    return "\n".join(lines)
