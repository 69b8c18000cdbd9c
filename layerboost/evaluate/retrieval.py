"""Long-context retrieval, two families of trials asked for at the end of a long prompt:

- `passkey`: a 5-digit pass key hidden in repeated filler text (Mohtashami & Jaggi, 2023, as every later
  long-context study uses it).
- `needle`: a fact line ("Marta's locker number is 48213.") placed between the sentences of real prose and asked
  for after it. Reported trials read WikiText-2 test articles (an evaluation split, never trained on); trials that
  choose layers (`source="selection"`) read the novels of the distillation corpus outside its held-out blocks, so
  the two never share text.

Each trial is scored as a multiple-choice item through the same prefix-shared scorer as the accuracy tasks: the
prompt runs once, then the true key and `distractors` other random keys are scored as continuations. Three scores:

- `acc`: the true key has the highest log-likelihood among the keys (chance: 1 / (distractors + 1)); small
  differences show here first, and a 135M model scores well above chance.
- `exact`: the true key is the greedy decode (every one of its tokens is the argmax given the ones before), what a
  user asking for the key gets back.
- `margin`: the true key's log-likelihood minus the best distractor's (nats), the continuous measure for paired tests.

Trials are a pure function of (tokenizer, family, source, length, trials, seed): the key, the distractors and the
needle's depth are drawn from `random.Random(f"{family}:...:{seed}:{length}:{trial}")`. Reported numbers use
seed 0 (`source="evaluation"`); anything that chooses layers uses another seed and the selection source (the
outputs record both). Healing's synthetic retrieval rows (corpus.retrieval_rows) use other templates again.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

from .requests import MCItem, encode_items

FAMILIES = ("passkey", "needle")
ANSWER_ROOM = 8  # tokens kept free for the answer: a trial of `length` fits a model whose context is `length`
SOURCES = ("evaluation", "selection")

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
NAMES = ("Alice", "Bernard", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ingrid", "Jonas", "Keiko",
         "Luis", "Marta", "Nils", "Olga", "Pavel")
THINGS = ("locker", "room", "ticket", "badge", "account", "parcel")
FACT = "{name}'s {thing} number is {key}."
FACT_QUESTION = "\n\nQuestion: What is {name}'s {thing} number?\nAnswer: {name}'s {thing} number is"


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
    """One prompt of about `length` - ANSWER_ROOM tokens (within one filler sentence) with the needle at a random
    depth: prompt and answer fit in `length`."""
    rnd = random.Random(f"passkey:{seed}:{length}:{trial}")
    keys = _keys(rnd, distractors + 1)
    depth = rnd.uniform(0.05, 0.95)
    needle = NEEDLE.format(key=keys[0])

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    fixed = n_tokens(INTRO + needle + QUESTION)
    per = n_tokens(FILLER * 20) / 20
    room = length - ANSWER_ROOM
    reps = max(2, int((room - fixed) / per))
    while reps > 2 and n_tokens(INTRO + FILLER * reps + needle + QUESTION) > room:
        reps -= 1
    at = round(depth * reps)
    text = INTRO + FILLER * at + needle + FILLER * (reps - at) + QUESTION
    return Trial(length, trial, keys[0], tuple(keys[1:]), at / reps, text)


@lru_cache(maxsize=4)
def _wikitext_articles(data_dir) -> tuple[str, ...]:
    from ..data import load_dataset_docs, split_wikitext_documents

    raw = load_dataset_docs("wikitext", data_dir).docs[0]["text"]
    return tuple(d for d in split_wikitext_documents(raw) if d.strip())


@lru_cache(maxsize=4)
def _novel_blocks(data_dir) -> tuple[tuple[str, int], ...]:
    """(novel path, 64 KiB block) of corpus/novels that training may read: not held out, not the front matter."""
    from ..corpus import HELDOUT_BLOCK, is_heldout_block
    from ..data import resolve_data_dir

    root = resolve_data_dir(data_dir)
    folder = (root / "corpus" / "novels") if root else None
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(f"selection text {folder or 'corpus/novels'} not found: pass --data-dir or set "
                                "LAYERBOOST_DATA_DIR to a folder holding corpus/novels/*.txt")
    return tuple((str(f), b) for f in sorted(folder.glob("*.txt"))
                 for b in range(1, f.stat().st_size // HELDOUT_BLOCK) if not is_heldout_block(f.name, b))


def _prose(source: str, data_dir, rnd: random.Random, chars: int) -> str:
    """About `chars` characters of contiguous real text: consecutive WikiText-2 test articles from a random one
    (evaluation), or one 64 KiB novel block outside the held-out ones (selection; enough for ~12k tokens)."""
    from ..corpus import HELDOUT_BLOCK

    if source == "evaluation":
        arts = _wikitext_articles(data_dir)
        i, text = rnd.randrange(len(arts)), ""
        while len(text) < chars:
            text += arts[i % len(arts)] + "\n"
            i += 1
        return text
    path, block = rnd.choice(_novel_blocks(data_dir))
    with open(path, "rb") as fh:
        fh.seek(block * HELDOUT_BLOCK)
        text = fh.read(HELDOUT_BLOCK).decode("utf-8", errors="ignore")
    return text[text.find("\n\n") + 2:]  # from a paragraph start


def make_needle_trial(tokenizer, length: int, trial: int, seed: int = 0, distractors: int = 9, *,
                      source: str = "evaluation", data_dir=None) -> Trial:
    """One prompt of at most `length` tokens: sentences of real prose with a fact line between two of them at a
    random depth, then the question."""
    if source not in SOURCES:
        raise ValueError(f"source {source!r} must be one of {', '.join(SOURCES)}")
    rnd = random.Random(f"needle:{source}:{seed}:{length}:{trial}")
    keys = _keys(rnd, distractors + 1)
    name, thing = rnd.choice(NAMES), rnd.choice(THINGS)
    depth = rnd.uniform(0.05, 0.95)
    fact, question = FACT.format(name=name, thing=thing, key=keys[0]), FACT_QUESTION.format(name=name, thing=thing)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    sentences = [x for x in re.split(r"(?<=[.!?])\s+", _prose(source, data_dir, rnd, 6 * length + 2000)) if x.strip()]
    room = length - ANSWER_ROOM
    budget, sizes, total = room - n_tokens(fact + question) - 8, [], 0
    for x in sentences:
        sizes.append(n_tokens(x) + 1)
        total += sizes[-1]
        if total > budget:
            sizes.pop()
            break
    k = len(sizes)

    def build(k: int) -> tuple[str, int]:
        at = round(depth * k)
        return " ".join(sentences[:at] + [fact] + sentences[at:k]) + question, at

    text, at = build(k)
    while k > 1 and n_tokens(text) > room:
        k -= 1
        text, at = build(k)
    while k < len(sentences) and n_tokens(build(k + 1)[0]) <= room:  # sentence counts overestimate the joined text
        k += 1
        text, at = build(k)
    return Trial(length, trial, keys[0], tuple(keys[1:]), at / max(k, 1), text)


def retrieval_items(tokenizer, family: str, length: int, trials: int, seed: int = 0, distractors: int = 9, *,
                    source: str = "evaluation", data_dir=None) -> list[MCItem]:
    """The trials of one family and length as multiple-choice items: choice 0 is the true key."""
    if family not in FAMILIES:
        raise ValueError(f"retrieval family {family!r} must be one of {', '.join(FAMILIES)}")
    out = []
    for t in range(trials):
        tr = (make_trial(tokenizer, length, t, seed, distractors) if family == "passkey" else
              make_needle_trial(tokenizer, length, t, seed, distractors, source=source, data_dir=data_dir))
        keys = (tr.key,) + tr.distractors
        out.append(MCItem(f"{family}_{length}", t, (tr.text,) * len(keys), tuple(" " + k for k in keys), keys, 0,
                          f"{tr.depth:.2f}"))
    return out


def passkey_items(tokenizer, length: int, trials: int, seed: int = 0, distractors: int = 9) -> list[MCItem]:
    """The pass-key trials of one length as multiple-choice items: choice 0 is the true key."""
    return retrieval_items(tokenizer, "passkey", length, trials, seed, distractors)


def score_retrieval(model, tokenizer, family: str = "passkey", lengths=(1024, 2048, 4096, 8192), trials: int = 50,
                    seed: int = 0, distractors: int = 9, batch_size: int = 1, progress: bool = True, *,
                    source: str = "evaluation", data_dir=None) -> dict:
    """Retrieval of one family at each length: acc / exact / margin per length with every trial's numbers (for
    paired tests). Lengths beyond the model's context are refused."""
    from .scoring import model_max_length, score_requests
    from .tasks import TaskError

    limit = model_max_length(model, tokenizer)
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise TaskError(f"retrieval length(s) {too_long} do not fit the model's context of {limit} tokens: use lengths "
                        f"up to {limit}")
    out = {"family": family, "source": source, "seed": seed, "trials": trials, "distractors": distractors,
           "chance": 1 / (distractors + 1), "lengths": {}}
    for n in lengths:
        items = retrieval_items(tokenizer, family, n, trials, seed, distractors, source=source, data_dir=data_dir)
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


def settings_problems(lengths, trials) -> list[str]:
    """What is wrong with a config's eval.retrieval_lengths / eval.retrieval_trials (run and compare)."""
    out = []
    if not isinstance(lengths, list) or any(not isinstance(n, int) or isinstance(n, bool) or n < 16 for n in lengths):
        out.append(f"eval.retrieval_lengths must be a list of token counts >= 16, got {lengths!r}")
    if trials < 1:
        out.append(f"eval.retrieval_trials must be >= 1, got {trials}")
    return out


def score_families(model, tokenizer, lengths, trials: int, data_dir=None) -> dict:
    """{family: score_retrieval(...)} of every family at `lengths`, seed 0 (what run and compare report)."""
    return {f: score_retrieval(model, tokenizer, f, lengths, trials, seed=0, data_dir=data_dir) for f in FAMILIES}


def paired(a: dict, b: dict) -> dict:
    """a against b (two score_retrieval results of one family, the same trials), per length both scored: McNemar on
    the trials' `acc`, and a paired bootstrap of their margins."""
    from ..stats import mcnemar, paired_bootstrap

    def col(r, n, key):
        return [t[key] for t in r["lengths"][n]["trials"]]

    return {n: {"acc": mcnemar(col(a, n, "acc"), col(b, n, "acc")),
                "margin": paired_bootstrap(col(a, n, "margin"), col(b, n, "margin"))}
            for n in a["lengths"] if n in b["lengths"]}


def score_passkey(model, tokenizer, lengths=(1024, 2048, 4096, 8192), trials: int = 50, seed: int = 0,
                  distractors: int = 9, batch_size: int = 1, progress: bool = True) -> dict:
    """Pass-key retrieval (`score_retrieval` of the passkey family)."""
    return score_retrieval(model, tokenizer, "passkey", lengths, trials, seed, distractors, batch_size, progress)


def format_retrieval(res: dict) -> str:
    what = {"passkey": "pass key in filler", "needle": "fact in prose"}[res.get("family", "passkey")]
    lines = [f"{what} ({res['trials']} trials per length, {res['distractors']} distractor keys, chance "
             f"{res['chance']:.0%}, seed {res['seed']})", f"{'length':>7} {'acc':>6} {'exact':>6} {'margin':>8}"]
    for n, r in res["lengths"].items():
        lines.append(f"{n:>7} {r['acc']:>6.0%} {r['exact']:>6.0%} {r['margin']:>8.2f}")
    return "\n".join(lines)
