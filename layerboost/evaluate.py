"""Zero-shot benchmarks scored exactly like lm-evaluation-harness 0.4.x, but faster.

What is identical to lm-eval 0.4.13 (`tests/test_lm_eval_parity.py` checks it against lm-eval):
prompts (task YAMLs `piqa`, `arc_easy`, `arc_challenge`, `winogrande`, `mmlu` 0-shot with its
per-subject description, `hellaswag` with its preprocessing), the target delimiter `" "`,
HFLM's tokenisation (trailing context whitespace moved into the continuation, context and
context+continuation encoded separately, BOS only where the tokenizer adds it, left
truncation to the model's max length), `acc`, `acc_norm` (log-likelihood divided by the
character length of the choice string: lm-eval's `len(choice)`, i.e. bytes for ASCII text),
their standard errors (sample std / sqrt(n); MMLU pooled over subjects), and `wikitext`
rolling-window word/byte perplexity and bits per byte.

What is faster: each item's shared token prefix (the context, and any common start of the
choices) goes through the model once with a KV cache, then all choices' remaining tokens go in
one batched call on the repeated cache; items of similar prefix length are batched together
(the batch's shortest prefix is the shared part, so no attention mask or position ids are ever
needed: this works for any causal LM whose cache supports `batch_repeat_interleave`, converted
hybrid models included); items whose choices are single tokens (MMLU) need one right-padded
forward and no cache; logits are projected only where a continuation token is scored.
`method="naive"` scores every choice on its own, like lm-eval (the reference). A model that
returns no repeatable cache is scored the naive way, with a warning.

Typical use::

    results = evaluate(model, tok, ["piqa", "arc_easy"], limit=100)
    print(format_table(results))

Many models on the same items (sensitivity analysis)::

    prepared = prepare_tasks(tok, ["piqa"], limit=200)
    for model in variants:
        scores = score_requests(model, prepared[0].requests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import LoadedData, load_dataset_docs, load_jsonl, resolve_data_dir, split_wikitext_documents

PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "winogrande", "mmlu")

# ----------------------------------------------------------------------------------------------
# Task definitions (copied from lm-eval 0.4.13's task YAMLs)
# ----------------------------------------------------------------------------------------------


class TaskError(ValueError):
    """A task name, task definition or task data that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class MCTask:
    """A zero-shot multiple-choice task in lm-eval's `multiple_choice` form.

    Attributes:
        name: task name.
        dataset: a key of `layerboost.data.DATASETS`, or a JSONL path (user tasks).
        column: metric quoted in tables (`acc` or `acc_norm`).
        context: doc -> prompt text (unused when `partial`).
        choices: doc -> lm-eval's `doc_to_choice` strings (for `partial` tasks: the contexts).
        gold: doc -> index of the correct choice.
        partial_target: doc -> the continuation shared by all contexts (WinoGrande partial scoring).
        description: doc -> text put before the prompt (MMLU's subject line), or None.
        process_doc: doc -> doc applied after loading (HellaSwag preprocessing), or None.
        stratum: doc -> label used for stratified subsampling (default: the gold index).
        group: doc -> sub-task name for pooled aggregation (MMLU subject), or None.
        target_delimiter: text between context and continuation.
    """

    name: str
    dataset: str
    column: str
    choices: Callable[[dict], list[str]]
    gold: Callable[[dict], int]
    context: Callable[[dict], str] | None = None
    partial_target: Callable[[dict], str] | None = None
    description: Callable[[dict], str] | None = None
    process_doc: Callable[[dict], dict] | None = None
    stratum: Callable[[dict], str] | None = None
    group: Callable[[dict], str] | None = None
    target_delimiter: str = " "


@dataclass(frozen=True)
class PerplexityTask:
    """A rolling log-likelihood task (lm-eval `loglikelihood_rolling`), e.g. WikiText-2."""

    name: str
    dataset: str


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag_doc(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        **doc,
        "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [_hellaswag_preprocess(e) for e in doc["endings"]],
        "gold": int(doc["label"]),
    }


def _winogrande_choices(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def _winogrande_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def _mmlu_context(doc: dict) -> str:
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def _arc_task(name: str, column: str) -> MCTask:
    return MCTask(
        name=name,
        dataset=name,
        column=column,
        context=lambda d: f"Question: {d['question']}\nAnswer:",
        choices=lambda d: list(d["choices"]["text"]),
        gold=lambda d: list(d["choices"]["label"]).index(d["answerKey"]),
    )


TASKS: dict[str, MCTask | PerplexityTask] = {
    "piqa": MCTask(
        name="piqa",
        dataset="piqa",
        column="acc",
        context=lambda d: f"Question: {d['goal']}\nAnswer:",
        choices=lambda d: [d["sol1"], d["sol2"]],
        gold=lambda d: int(d["label"]),
    ),
    "arc_easy": _arc_task("arc_easy", "acc"),
    "arc_challenge": _arc_task("arc_challenge", "acc_norm"),
    "winogrande": MCTask(
        name="winogrande",
        dataset="winogrande",
        column="acc",
        choices=_winogrande_choices,
        gold=lambda d: {"1": 0, "2": 1}[d["answer"]],
        partial_target=_winogrande_target,
    ),
    "mmlu": MCTask(
        name="mmlu",
        dataset="mmlu",
        column="acc",
        context=_mmlu_context,
        choices=lambda d: ["A", "B", "C", "D"],
        gold=lambda d: int(d["answer"]),
        description=lambda d: f"The following are multiple choice questions (with answers) about {d['subject'].replace('_', ' ')}.\n\n",
        stratum=lambda d: d["subject"],
        group=lambda d: d["subject"],
    ),
    "hellaswag": MCTask(
        name="hellaswag",
        dataset="hellaswag",
        column="acc_norm",
        context=lambda d: d["query"],
        choices=lambda d: d["choices"],
        gold=lambda d: d["gold"],
        process_doc=_hellaswag_doc,
    ),
    "wikitext": PerplexityTask(name="wikitext", dataset="wikitext"),
}


def _format_field(template: str, doc: dict) -> str:
    try:
        return template.format(**doc)
    except (KeyError, IndexError) as e:
        raise ValueError(f"template {template!r} needs field {e} missing from document {doc}") from e


def load_task_spec(path: str | os.PathLike) -> MCTask:
    """Build a user multiple-choice task from a small YAML/JSON definition.

    The definition has: `name`; `data` (JSONL file, relative to the definition); `prompt`
    (a `str.format` template over the document's fields, e.g. "Question: {question}\\nAnswer:");
    `choices` (a field holding a list, or a list of templates such as ["{sol1}", "{sol2}"]);
    `gold` (a field holding the correct index, or the correct choice's text); and optionally
    `metric` (`acc` default, or `acc_norm`), `target_delimiter` (" "), `stratify` (field for
    stratified subsampling).

    Args:
        path: the `.yaml`, `.yml` or `.json` file.

    Returns:
        The task; its `dataset` is the JSONL file's absolute path.

    Raises:
        TaskError: the file or its data file does not exist or cannot be read, a required key is missing,
            or `metric` is unknown.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task definition {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TaskError(f"{path} is not a readable YAML/JSON task definition ({e})") from e
    spec = spec if isinstance(spec, dict) else {}
    missing = [k for k in ("name", "data", "prompt", "choices", "gold") if k not in spec]
    if missing:
        raise TaskError(f"{path}: task definition lacks {missing} (needs name, data, prompt, choices, gold)")
    data = (path.parent / str(spec["data"])).resolve()
    if not data.is_file():
        raise TaskError(f"{path}: data file {data} does not exist")
    metric = spec.get("metric", "acc")
    if metric not in ("acc", "acc_norm"):
        raise TaskError(f"{path}: metric must be acc or acc_norm, not {metric!r}")
    prompt, choices_spec, gold_field = spec["prompt"], spec["choices"], spec["gold"]

    def choices(d: dict) -> list[str]:
        if isinstance(choices_spec, list):
            return [_format_field(t, d) for t in choices_spec]
        return [str(c) for c in d[choices_spec]]

    def gold(d: dict) -> int:
        value = d[gold_field]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{path}: gold field {gold_field!r} must be an index or a choice text, got {value!r}")
        if isinstance(value, int):
            return value
        opts = choices(d)
        if value not in opts:
            raise ValueError(f"{path}: gold {value!r} is not one of the choices {opts}")
        return opts.index(value)

    stratify = spec.get("stratify")
    return MCTask(
        name=str(spec["name"]),
        dataset=str(data),
        column=metric,
        context=lambda d: _format_field(prompt, d),
        choices=choices,
        gold=gold,
        stratum=(lambda d: str(d[stratify])) if stratify else None,
        target_delimiter=spec.get("target_delimiter", " "),
    )


def get_task(name: str | MCTask | PerplexityTask) -> MCTask | PerplexityTask:
    """A registered task by name, a user task from a `.yaml`/`.yml`/`.json` definition, or the task itself.

    Raises:
        TaskError: unknown name, or a definition file that cannot be used.
    """
    if isinstance(name, (MCTask, PerplexityTask)):
        return name
    if name.endswith((".yaml", ".yml", ".json")):
        return load_task_spec(name)
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {sorted(TASKS)} or a task definition .yaml/.json file")
    return TASKS[name]


# ----------------------------------------------------------------------------------------------
# Items and requests
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question as (context, continuation) string pairs, one per choice."""

    task: str
    doc_id: int
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]  # lm-eval's doc_to_choice strings: their lengths normalise acc_norm
    gold: int
    stratum: str
    group: str | None = None


@dataclass(frozen=True)
class MCRequest:
    """An `MCItem` tokenised like lm-eval's HFLM: token ids of each choice's context and continuation."""

    item: MCItem
    context_tokens: tuple[tuple[int, ...], ...]
    continuation_tokens: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class RollingRequest:
    """One perplexity document: tokens to score, word and byte counts of the original page."""

    doc_id: int
    tokens: tuple[int, ...]
    words: int
    bytes: int


@dataclass(frozen=True)
class ItemScore:
    """Per-choice log-likelihoods of one item and whether each continuation is the greedy decode."""

    logliks: tuple[float, ...]
    greedy: tuple[bool, ...]


@dataclass
class PreparedTask:
    """A task's selected items and tokenised requests, reusable on any model with the same tokenizer.

    Attributes:
        task: the task definition.
        source: where its data came from.
        n_total: documents in the full split.
        doc_ids: indices of the selected documents in the split.
        items: `MCItem`s (multiple choice) or None (perplexity).
        requests: `MCRequest`s or `RollingRequest`s, aligned with `doc_ids`.
        partition: which part of the split the items come from (see `Partition`), or None (all of it).
    """

    task: MCTask | PerplexityTask
    source: str
    n_total: int
    doc_ids: list[int]
    items: list[MCItem] | None
    requests: list
    partition: dict | None = None


def build_items(task: MCTask, docs: Sequence[dict], doc_ids: Sequence[int] | None = None) -> list[MCItem]:
    """Turn (already processed) documents into `MCItem`s exactly as lm-eval builds its requests.

    Args:
        task: the task.
        docs: documents (after `task.process_doc`).
        doc_ids: their indices in the split (default 0..n-1).

    Returns:
        One item per document.

    Raises:
        ValueError: the gold index is out of range.
    """
    items = []
    for i, doc in enumerate(docs):
        choices = task.choices(doc)
        gold = task.gold(doc)
        if not 0 <= gold < len(choices):
            raise ValueError(f"{task.name} doc {i}: gold index {gold} not in 0..{len(choices) - 1}")
        desc = task.description(doc) if task.description else ""
        delim = task.target_delimiter
        if task.partial_target is not None:
            contexts = tuple(desc + c for c in choices)
            conts = (delim + task.partial_target(doc),) * len(choices)
        else:
            contexts = (desc + task.context(doc),) * len(choices)
            conts = tuple(delim + c for c in choices)
        items.append(
            MCItem(
                task=task.name,
                doc_id=doc_ids[i] if doc_ids is not None else i,
                contexts=contexts,
                continuations=conts,
                choices=tuple(choices),
                gold=gold,
                stratum=task.stratum(doc) if task.stratum else str(gold),
                group=task.group(doc) if task.group else None,
            )
        )
    return items


def stratified_subsample(strata: Sequence[str], limit: int | float | None, seed: int, key: str = "") -> list[int]:
    """Seeded stratified sample of indices, proportional to stratum sizes (largest remainder).

    Args:
        strata: stratum label of each element.
        limit: number of elements (int), a fraction in (0, 1) (float), or None for all.
        seed: random seed; with `key` it fully determines the sample.
        key: extra seed material (e.g. the task name) so tasks get independent samples.

    Returns:
        Sorted indices of the sample (all indices when `limit` is None or >= len(strata)).

    Raises:
        ValueError: limit is not positive.
    """
    n = len(strata)
    if limit is None:
        return list(range(n))
    k = int(math.ceil(limit * n)) if isinstance(limit, float) and limit < 1 else int(limit)
    if k <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if k >= n:
        return list(range(n))
    rng = random.Random(f"{seed}:{key}")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    names = sorted(groups)
    quotas = {g: k * len(groups[g]) / n for g in names}
    alloc = {g: int(quotas[g]) for g in names}
    # Largest remainders get the leftover slots; random tie-breaks avoid favouring early strata.
    order = sorted(names, key=lambda g: (-(quotas[g] - alloc[g]), rng.random()))
    for g in order[: k - sum(alloc.values())]:
        alloc[g] += 1
    chosen = [i for g in names for i in rng.sample(groups[g], alloc[g])]
    return sorted(chosen)


class HFLMTokenizer:
    """Tokenisation identical to lm-eval 0.4.13 HFLM (`tok_encode`, `_encode_pair`, empty contexts)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # HFLM.prefix_token_id: BOS if the tokenizer has one, else EOS.
        self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._bos_str = tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None

    def encode(self, strings: Sequence[str]) -> list[list[int]]:
        """`HFLM.tok_encode` for many strings (default special tokens, none if the string starts with BOS)."""
        out: list[list[int] | None] = [None] * len(strings)
        for special in (True, False):
            idx = [i for i, s in enumerate(strings) if special != bool(self._bos_str and s.startswith(self._bos_str))]
            if idx:
                kwargs = {} if special else {"add_special_tokens": False}
                enc = self.tokenizer([strings[i] for i in idx], **kwargs)["input_ids"]
                for i, e in zip(idx, enc):
                    out[i] = list(e)
        return out  # type: ignore[return-value]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """`HFLM.loglikelihood`'s encoding of (context, continuation) pairs.

        Raises:
            ValueError: a continuation encodes to no tokens (lm-eval asserts the same).
        """
        moved = []
        for ctx, cont in pairs:
            n_spaces = len(ctx) - len(ctx.rstrip())
            if n_spaces > 0:  # trailing context whitespace belongs to the continuation
                ctx, cont = ctx[:-n_spaces], ctx[-n_spaces:] + cont
            moved.append((ctx, cont))
        unique = sorted({s for c, k in moved if c for s in (c, c + k)})
        enc = dict(zip(unique, self.encode(unique)))
        empty_conts = sorted({k for c, k in moved if not c})
        enc_plain = dict(zip(empty_conts, [list(e) for e in self.tokenizer(empty_conts, add_special_tokens=False)["input_ids"]])) if empty_conts else {}
        result = []
        for (ctx, cont), (orig_ctx, orig_cont) in zip(moved, pairs):
            if not orig_ctx:
                cont_enc = enc_plain[cont]
                if cont_enc and cont_enc[0] == self.prefix_token_id:
                    ctx_enc, cont_enc = cont_enc[:1], cont_enc[1:]
                else:
                    ctx_enc = [self.prefix_token_id]
            else:
                ctx_enc = enc[ctx]
                cont_enc = enc[ctx + cont][len(ctx_enc) :]
            if not cont_enc:
                raise ValueError(f"continuation {orig_cont!r} after context {orig_ctx[-80:]!r} has no tokens")
            result.append((ctx_enc, cont_enc))
        return result


def encode_items(tokenizer, items: Sequence[MCItem]) -> list[MCRequest]:
    """Tokenise items like HFLM does.

    Args:
        tokenizer: a Hugging Face tokenizer.
        items: items from `build_items`.

    Returns:
        One `MCRequest` per item.
    """
    enc = HFLMTokenizer(tokenizer)
    pairs = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
    encoded = enc.encode_pairs(pairs)
    out, pos = [], 0
    for it in items:
        n = len(it.contexts)
        chunk = encoded[pos : pos + n]
        pos += n
        out.append(MCRequest(it, tuple(tuple(c) for c, _ in chunk), tuple(tuple(k) for _, k in chunk)))
    return out


def wikitext_detokenizer(string: str) -> str:
    """lm-eval's `wikitext_detokenizer` (WikiText markup back to plain text)."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def _load_docs(task: MCTask | PerplexityTask, data_dir) -> LoadedData:
    if Path(task.dataset).is_absolute():  # user tasks point at their JSONL file
        return LoadedData(load_jsonl(task.dataset), task.dataset)
    return load_dataset_docs(task.dataset, data_dir)


def load_task_docs(task: MCTask | PerplexityTask, data_dir=None) -> tuple[list[dict], str]:
    """The task's documents (processed) and their source; WikiText is split into articles.

    Raises:
        DataNotFoundError: see `layerboost.data.load_dataset_docs`.
        TaskError: the data is not JSON lines, holds no documents, or a document lacks what the task reads.
    """
    try:
        loaded = _load_docs(task, data_dir)
    except ValueError as e:  # a line that is not JSON
        raise TaskError(f"task {task.name!r}: {e}") from e
    if isinstance(task, PerplexityTask):
        return [{"page": p} for p in split_wikitext_documents(loaded.docs[0]["text"])], loaded.source
    if not loaded.docs:
        raise TaskError(f"{loaded.source} holds no documents: task {task.name!r} needs one JSON object per line")
    docs = []
    for i, d in enumerate(loaded.docs):  # every document once, so a bad one is named before any model work
        try:
            docs.append(task.process_doc(d) if task.process_doc else d)
            build_items(task, docs[-1:])
            if task.stratum:
                task.stratum(docs[-1])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            what = f"has no field {e}" if isinstance(e, KeyError) else f"does not fit ({type(e).__name__}: {e})"
            raise TaskError(f"{loaded.source}: document {i + 1} {what} for task {task.name!r}; "
                            "give documents with the fields the task definition reads") from e
    return docs, loaded.source


@dataclass(frozen=True)
class Partition:
    """Selection items (layer choice, any tuning) and evaluation items (reported) of a split, disjoint.

    The selection part is a seeded stratified sample of `size` documents per task (key
    `selection:<task>`), drawn before any other sampling; the evaluation part is every other document.
    `analyze` draws from `part="selection"`, a comparison reports `part="evaluation"`.

    Args:
        part: "selection" or "evaluation".
        size: documents per task reserved for selection.
        seed: the partition's seed (independent of the subsample seed).
    """

    part: str
    size: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.part not in ("selection", "evaluation"):
            raise ValueError(f"partition part must be selection or evaluation, got {self.part!r}")
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"partition size must be a positive integer, got {self.size!r}")

    def ids(self, task_name: str, strata: Sequence[str]) -> list[int]:
        """Sorted document indices of this part."""
        chosen = set(stratified_subsample(strata, self.size, self.seed, f"selection:{task_name}"))
        if len(chosen) >= len(strata):
            raise TaskError(f"task {task_name!r} has {len(strata)} documents: a selection partition of {self.size} "
                            "leaves nothing to evaluate; use a smaller selection size")
        return [i for i in range(len(strata)) if (i in chosen) == (self.part == "selection")]

    def to_dict(self) -> dict:
        return {"part": self.part, "size": self.size, "seed": self.seed}


def per_stratum_sample(strata: Sequence[str], k: int, seed: int, key: str = "") -> list[int]:
    """Seeded sample of `k` indices from every stratum (all of a smaller stratum), sorted."""
    rng = random.Random(f"{seed}:{key}:per_stratum")
    groups: dict[str, list[int]] = {}
    for i, st in enumerate(strata):
        groups.setdefault(st, []).append(i)
    return sorted(i for g in sorted(groups) for i in rng.sample(groups[g], min(k, len(groups[g]))))


def prepare_task(
    tokenizer, task: str | MCTask | PerplexityTask, *, data_dir=None, limit: int | float | None = None, seed: int = 0, docs=None,
    partition: Partition | None = None, per_stratum: int | None = None,
) -> PreparedTask:
    """Load, subsample and tokenise one task.

    Args:
        tokenizer: Hugging Face tokenizer of the models to score.
        task: task name, definition file, or task object.
        data_dir: data directory (None: default).
        limit: items per task (int), fraction (float < 1), or None for the full split (or partition).
        seed: subsample seed.
        docs: optional (docs, source) already loaded by `load_task_docs`.
        partition: take the items from this part of the split only (multiple-choice tasks).
        per_stratum: instead of `limit`, this many items from every stratum (MMLU: per subject).

    Returns:
        The prepared task, reusable across models sharing the tokenizer.
    """
    task = get_task(task)
    all_docs, source = docs if docs is not None else load_task_docs(task, data_dir)
    if isinstance(task, PerplexityTask):
        ids = stratified_subsample(["doc"] * len(all_docs), limit, seed, task.name)
        enc = HFLMTokenizer(tokenizer)
        pages = [all_docs[i]["page"] for i in ids]
        toks = enc.encode([wikitext_detokenizer(p) for p in pages])
        reqs = [
            RollingRequest(i, tuple(t), len(re.split(r"\s+", p)), len(p.encode("utf-8"))) for i, t, p in zip(ids, toks, pages)
        ]
        return PreparedTask(task, source, len(all_docs), ids, None, reqs)
    strata = [task.stratum(d) if task.stratum else str(task.gold(d)) for d in all_docs]
    pool = partition.ids(task.name, strata) if partition is not None else list(range(len(all_docs)))
    pool_strata = [strata[i] for i in pool]
    if per_stratum is not None:
        picked = per_stratum_sample(pool_strata, per_stratum, seed, task.name)
    else:
        picked = stratified_subsample(pool_strata, limit, seed, task.name)
    ids = [pool[j] for j in picked]
    if not ids:
        raise TaskError(f"task {task.name!r} has no items to score: its {len(all_docs)} documents leave none in the "
                        f"{partition.part if partition else 'chosen'} part (give more documents or a smaller selection size)")
    items = build_items(task, [all_docs[i] for i in ids], ids)
    return PreparedTask(task, source, len(all_docs), ids, items, encode_items(tokenizer, items),
                        partition.to_dict() if partition is not None else None)


def prepare_tasks(tokenizer, tasks: Sequence[str | MCTask | PerplexityTask], **kwargs) -> list[PreparedTask]:
    """`prepare_task` for each task (same keyword arguments)."""
    return [prepare_task(tokenizer, t, **kwargs) for t in tasks]


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def model_max_length(model, tokenizer=None, default: int = 2048) -> int:
    """lm-eval's `resolve_max_length`: config n_positions / max_position_embeddings / n_ctx, tokenizer, 2048."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml != int(1e30):  # transformers' VERY_LARGE_INTEGER means "unset"
        return int(mml)
    return default


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _accepts(model, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class _Choice:
    """One choice as scored: model input tokens, first scored logit position, target tokens."""

    slot: tuple[int, int]  # (request index, choice index)
    inp: list[int]
    first: int  # logit position that predicts the first continuation token
    targets: list[int]


def _choices_of(requests: Sequence[MCRequest], max_length: int) -> list[list[_Choice]]:
    out = []
    for ri, req in enumerate(requests):
        row = []
        for ci, (ctx, cont) in enumerate(zip(req.context_tokens, req.continuation_tokens)):
            if len(cont) > max_length:
                raise ValueError(f"{req.item.task} doc {req.item.doc_id}: continuation longer than the model's {max_length} tokens")
            full = list(ctx + cont)[-(max_length + 1) :]  # lm-eval: left-truncate to max_length + 1
            inp = full[:-1]
            row.append(_Choice((ri, ci), inp, len(inp) - len(cont), list(cont)))
        out.append(row)
    return out


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


@dataclass
class _Unit:
    """Choices of one item whose model inputs all start with `prefix` (at least one token)."""

    prefix: list[int]
    members: list[_Choice]

    @property
    def max_suffix(self) -> int:
        return max(len(m.inp) - len(self.prefix) for m in self.members)


def _units(choices: list[list[_Choice]]) -> list[_Unit]:
    units = []
    for row in choices:
        p = common_prefix_len([c.inp for c in row])
        if p == 0:  # choices differ from the first token: nothing to share
            units.extend(_Unit(c.inp, [c]) for c in row)
        else:
            units.append(_Unit(row[0].inp[:p], row))
    return units


@dataclass
class _Batch:
    """Units scored together.

    `single`: every member's input is the whole prefix (e.g. one-token MMLU answers), so one
    right-padded forward without cache scores them all (padding is after every scored position,
    so the causal mask already hides it). `shared`: the first `p` tokens (the shortest prefix in
    the batch) go through the model once per unit, then each member's remaining tokens run in one
    right-padded call on the cache repeated per member.
    """

    mode: str
    units: list[_Unit]
    p: int


def _slack(p: int) -> int:
    # how much longer than the batch's shortest a prefix may be: a little padding or repeated
    # prefix work buys bigger (much more efficient on CPU) matrix products
    return max(2, p // 8)


def _batches(units: list[_Unit], batch_size: int, max_tokens: int) -> list[_Batch]:
    """Group units of similar prefix length (and equal choice count), longest first, within a token budget."""
    batches = []
    single = sorted((u for u in units if u.max_suffix == 0), key=lambda u: -len(u.prefix))
    i = 0
    while i < len(single):
        top = len(single[i].prefix)  # longest in the batch: sets the padded width
        j = i + 1
        while j < len(single) and j - i < batch_size and (j - i + 1) * top <= max_tokens and top - len(single[j].prefix) <= _slack(top):
            j += 1
        batches.append(_Batch("single", single[i:j], top))
        i = j
    shared = sorted((u for u in units if u.max_suffix > 0), key=lambda u: (len(u.members), len(u.prefix)))
    i = 0
    while i < len(shared):
        k, p = len(shared[i].members), len(shared[i].prefix)  # shortest prefix: the shared part

        def width(u: _Unit) -> int:
            return len(u.prefix) - p + u.max_suffix

        s, j = width(shared[i]), i + 1
        while j < len(shared) and j - i < batch_size and len(shared[j].members) == k and len(shared[j].prefix) - p <= _slack(p):
            s2 = max(s, width(shared[j]))
            if (j - i + 1) * max(p, k * s2) > max_tokens:
                break
            s, j = s2, j + 1
        batches.append(_Batch("shared", shared[i:j], p))
        i = j
    batches.sort(key=lambda b: -max(len(m.inp) for u in b.units for m in u.members))  # longest first
    return batches


def _gather(logp: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """Sum of target log-probs over rows of `logp` [n, V] and whether each target is the argmax."""
    t = torch.tensor(targets, device=logp.device)
    ll = logp.gather(-1, t.unsqueeze(-1)).sum()
    greedy = bool((logp.argmax(-1) == t).all())
    return float(ll), greedy


class CacheUnsupportedError(RuntimeError):
    """The model's forward returns no KV cache that can be repeated across choices."""


def _forward_last(model, ids: torch.Tensor, keep: int, keep_arg: bool, **kwargs) -> tuple[torch.Tensor, object]:
    """Log-probs [B, keep, V] of the last `keep` positions, and the model output."""
    out = model(input_ids=ids, **({"logits_to_keep": keep} if keep_arg else {}), **kwargs)
    return F.log_softmax(out.logits[:, -keep:].float(), dim=-1), out


@torch.inference_mode()
def _score_batch(model, batch: _Batch, device, keep_arg: bool, cache_arg: bool) -> list[tuple[tuple[int, int], float, bool]]:
    p = batch.p
    results = []
    if batch.mode == "single":
        first = min(m.first for u in batch.units for m in u.members)
        keep = p - first  # logit positions first .. p-1 cover every row's scored positions
        ids = torch.tensor([u.prefix + [u.prefix[-1]] * (p - len(u.prefix)) for u in batch.units], device=device)
        logp, _ = _forward_last(model, ids, keep, keep_arg, use_cache=False)
        for b, u in enumerate(batch.units):
            for m in u.members:
                results.append((m.slot, *_gather(logp[b, m.first - first : len(m.inp) - first], m.targets)))
        return results
    k = len(batch.units[0].members)
    first = min(m.first for u in batch.units for m in u.members)
    keep = max(1, p - first)
    ids = torch.tensor([u.prefix[:p] for u in batch.units], device=device)
    logp1, out = _forward_last(model, ids, keep, keep_arg, use_cache=True)  # logit positions p-keep .. p-1
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)  # transformers 5.x renamed it
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise CacheUnsupportedError(f"{type(model).__name__} returned no repeatable KV cache ({type(cache).__name__})")
    cache.batch_repeat_interleave(k)
    s = max(len(m.inp) - p for u in batch.units for m in u.members)
    rows = []
    for u in batch.units:
        for m in u.members:
            suf = m.inp[p:]
            rows.append(suf + [u.prefix[-1]] * (s - len(suf)))  # right padding: never attended by real tokens
    out2 = model(input_ids=torch.tensor(rows, device=device), use_cache=True, **{"cache" if cache_arg else "past_key_values": cache})
    logp2 = F.log_softmax(out2.logits.float(), dim=-1)  # logit positions p .. p+s-1
    for b, u in enumerate(batch.units):
        for j, m in enumerate(u.members):
            end = len(m.inp)  # scored logit positions: m.first .. end-1
            parts = []
            if m.first < p:
                parts.append(logp1[b, m.first - (p - keep) : min(end, p) - (p - keep)])
            if end > p:
                parts.append(logp2[b * k + j, max(m.first, p) - p : end - p])
            logp = parts[0] if len(parts) == 1 else torch.cat(parts)
            results.append((m.slot, *_gather(logp, m.targets)))
    return results


@torch.inference_mode()
def _score_naive_batch(model, batch: list[_Choice], device) -> list[tuple[tuple[int, int], float, bool]]:
    width = max(len(c.inp) for c in batch)
    ids = torch.tensor([c.inp + [0] * (width - len(c.inp)) for c in batch], device=device)  # right padding, like lm-eval
    logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    return [(c.slot, *_gather(logp[i, c.first : len(c.inp)], c.targets)) for i, c in enumerate(batch)]


def score_requests(
    model,
    requests: Sequence[MCRequest],
    *,
    batch_size: int = 32,
    max_batch_tokens: int = 4096,
    method: str = "prefix",
    progress: bool = True,
    desc: str = "scoring",
) -> list[ItemScore]:
    """Log-likelihood of every choice of every request (lm-eval's `loglikelihood` semantics).

    Args:
        model: any Hugging Face causal LM (in eval mode).
        requests: from `encode_items` / `prepare_task`; can be reused across models.
        batch_size: most items per forward call.
        max_batch_tokens: most tokens per forward call (a single item may exceed it).
        method: `prefix` (shared prefix computed once, KV cache repeated for the choices) or
            `naive` (every choice scored on its own, as lm-eval does).
        progress: show a progress bar (items/s).
        desc: progress bar label.

    Returns:
        One `ItemScore` per request, in order.

    Raises:
        ValueError: unknown method, or a continuation longer than the model's context.
    """
    if method not in ("prefix", "naive"):
        raise ValueError(f"method must be 'prefix' or 'naive', not {method!r}")
    device = _model_device(model)
    choices = _choices_of(requests, model_max_length(model))
    remaining = [len(row) for row in choices]
    lls = [[0.0] * len(row) for row in choices]
    greedy = [[False] * len(row) for row in choices]
    bar = tqdm(total=len(requests), desc=desc, unit="item", disable=not progress, dynamic_ncols=True)

    def record(results):
        for (ri, ci), ll, g in results:
            lls[ri][ci], greedy[ri][ci] = ll, g
            remaining[ri] -= 1
            if remaining[ri] == 0:
                bar.update(1)

    try:
        if method == "prefix":
            keep_arg, cache_arg = _accepts(model, "logits_to_keep"), _accepts(model, "cache")
            batches = _batches(_units(choices), batch_size, max_batch_tokens)
            for i, batch in enumerate(batches):
                try:
                    record(_score_batch(model, batch, device, keep_arg, cache_arg))
                except CacheUnsupportedError as e:
                    warnings.warn(f"{e}; scoring the remaining choices one by one (slower)", stacklevel=2)
                    rest = [m for b in batches[i:] for u in b.units for m in u.members]
                    _run_naive(model, rest, device, batch_size, max_batch_tokens, record)
                    break
        else:
            _run_naive(model, [c for row in choices for c in row], device, batch_size, max_batch_tokens, record)
    finally:
        bar.close()
    return [ItemScore(tuple(a), tuple(g)) for a, g in zip(lls, greedy)]


def _run_naive(model, flat: list[_Choice], device, batch_size: int, max_tokens: int, record) -> None:
    flat = sorted(flat, key=lambda c: -len(c.inp))  # longest first, like lm-eval
    i = 0
    while i < len(flat):
        n = max(1, min(batch_size, max_tokens // len(flat[i].inp)))
        record(_score_naive_batch(model, flat[i : i + n], device))
        i += n


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[tuple[list[int], int]]:
    """lm-eval's disjoint rolling windows (`get_rolling_token_windows`, context_len=1).

    Args:
        tokens: the document's tokens (all are predicted).
        prefix_token: token that conditions the first prediction (BOS, else EOS).
        max_length: model context length.

    Returns:
        (model input, number of trailing positions scored) per window; the scored targets are
        the input shifted by one, ending with the window's last token.
    """
    windows, predicted, n = [], 0, len(tokens)
    if n == 0:
        return windows
    first = min(max_length, n)
    windows.append(([prefix_token] + list(tokens[:first]), first))
    predicted = first
    while predicted < n:
        pred_len = min(n - predicted, max_length)
        end = predicted + pred_len
        windows.append((list(tokens[max(0, end - max_length - 1) : end]), pred_len))
        predicted += pred_len
    return windows


@torch.inference_mode()
def score_rolling(
    model, tokenizer, requests: Sequence[RollingRequest], *, max_length: int | None = None, progress: bool = True, desc: str = "perplexity"
) -> list[float]:
    """Total log-likelihood of each document over lm-eval's rolling windows.

    Args:
        model: Hugging Face causal LM.
        tokenizer: its tokenizer (for the prefix token).
        requests: documents from `prepare_task` on a perplexity task.
        max_length: window length (default: lm-eval's, the model's max context).
        progress: show a progress bar.
        desc: progress bar label.

    Returns:
        Summed log-likelihood of every token of each document.
    """
    device = _model_device(model)
    max_length = max_length or model_max_length(model, tokenizer)
    prefix = HFLMTokenizer(tokenizer).prefix_token_id
    keep_arg = _accepts(model, "logits_to_keep")
    totals = []
    for req in tqdm(requests, desc=desc, unit="doc", disable=not progress, dynamic_ncols=True):
        total = 0.0
        for seq, n_pred in rolling_windows(req.tokens, prefix, max_length):
            ids = torch.tensor([seq[:-1]], device=device)
            kwargs = {"logits_to_keep": n_pred} if keep_arg else {}
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits[0, -n_pred:]
            targets = torch.tensor(seq[-n_pred:], device=device)
            for s in range(0, n_pred, 1024):  # chunked log-softmax bounds memory on long windows
                lp = F.log_softmax(logits[s : s + 1024].float(), dim=-1)
                total += float(lp.gather(-1, targets[s : s + 1024, None]).sum())
        totals.append(total)
    return totals


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's `mean_stderr`: sample standard deviation / sqrt(n); None when n < 2."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_sample_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """lm-eval's pooled stderr of a size-weighted group mean (MMLU over its subjects)."""
    var = sum((n - 1) * se**2 * n for n, se in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, like np.argmax


def item_predictions(item: MCItem, score: ItemScore) -> dict:
    """Predictions and margins of one item.

    Returns:
        `pred` (argmax log-likelihood), `pred_norm` (argmax of log-likelihood / len(choice)),
        `margin` and `margin_norm`: gold score minus the best other choice's score (> 0 iff correct
        without ties).
    """
    norm = [ll / len(c) for ll, c in zip(score.logliks, item.choices)]
    out = {}
    for key, vals in (("", score.logliks), ("_norm", norm)):
        others = [v for i, v in enumerate(vals) if i != item.gold]
        out["pred" + key] = _argmax(vals)
        out["margin" + key] = vals[item.gold] - max(others) if others else float("inf")
    return out


def mc_metrics(task: MCTask, items: Sequence[MCItem], scores: Sequence[ItemScore]) -> dict:
    """acc, acc_norm and their stderrs, with lm-eval's group pooling when the task has groups.

    Returns:
        {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "column", "subtasks"?}.
    """
    preds = [item_predictions(it, sc) for it, sc in zip(items, scores)]
    res: dict = {"column": task.column, "n": len(items)}
    for metric, key in (("acc", "pred"), ("acc_norm", "pred_norm")):
        vals = [float(p[key] == it.gold) for p, it in zip(preds, items)]
        res[metric] = sum(vals) / len(vals)
        if task.group is None:
            res[f"{metric}_stderr"] = mean_stderr(vals)
            continue
        groups: dict[str, list[float]] = {}
        for v, it in zip(vals, items):
            groups.setdefault(it.group, []).append(v)
        subtasks = res.setdefault("subtasks", {})
        for g, gv in sorted(groups.items()):
            subtasks.setdefault(g, {"n": len(gv)})
            subtasks[g][metric] = sum(gv) / len(gv)
            subtasks[g][f"{metric}_stderr"] = mean_stderr(gv)
        ses = [subtasks[g][f"{metric}_stderr"] for g in sorted(groups)]
        # lm-eval: pooled over sub-tasks, "N/A" (here None) if any sub-task has fewer than 2 items
        res[f"{metric}_stderr"] = None if None in ses else pooled_sample_stderr(ses, [len(groups[g]) for g in sorted(groups)])
    return res


def perplexity_metrics(requests: Sequence[RollingRequest], logliks: Sequence[float]) -> dict:
    """lm-eval's word_perplexity, byte_perplexity, bits_per_byte, plus token perplexity."""
    ll = sum(logliks)
    words = sum(r.words for r in requests)
    nbytes = sum(r.bytes for r in requests)
    ntok = sum(len(r.tokens) for r in requests)
    return {
        "column": "word_perplexity",
        "n": len(requests),
        "word_perplexity": math.exp(-ll / words),
        "byte_perplexity": math.exp(-ll / nbytes),
        "bits_per_byte": -ll / nbytes / math.log(2),
        "token_perplexity": math.exp(-ll / ntok),
        "tokens": ntok,
    }


# ----------------------------------------------------------------------------------------------
# Top-level API
# ----------------------------------------------------------------------------------------------


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        lb = version("layerboost")
    except PackageNotFoundError:  # run from a checkout that is not installed
        lb = "unknown"
    return {"layerboost": lb, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str | MCTask | PerplexityTask],
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    max_batch_tokens: int = 4096,
    method: str = "prefix",
    progress: bool = True,
    per_item: bool = False,
    prepared: Sequence[PreparedTask] | None = None,
    wikitext_max_length: int | None = None,
) -> dict:
    """Evaluate a causal LM on benchmarks, scored like lm-eval 0.4.x.

    Args:
        model: any Hugging Face causal LM (converted or not), in eval mode.
        tokenizer: its tokenizer.
        tasks: names (`piqa`, `arc_easy`, `arc_challenge`, `winogrande`, `mmlu`, `hellaswag`,
            `wikitext`), user task definition files, or task objects.
        data_dir: local data directory (None: `$LAYERBOOST_DATA_DIR` or `../shared/data`).
        limit: items per task (stratified, seeded); None for full splits.
        seed: subsample seed.
        batch_size: most items per forward call.
        max_batch_tokens: most tokens per forward call.
        method: `prefix` (fast) or `naive` (per choice, like lm-eval).
        progress: show progress bars.
        per_item: include per-item log-likelihoods, predictions and gold margins.
        prepared: already prepared tasks (skips loading and tokenising; `tasks` is then ignored).
        wikitext_max_length: rolling-window length of perplexity tasks (None: the model's context, as lm-eval).

    Returns:
        JSON-able dict: `tasks` (per task: metrics, stderrs, n, n_total, column, time_s, data),
        `average` (mean of each task's paper column over multiple-choice tasks), `settings`,
        `versions`, `total_time_s`.

    Raises:
        DataNotFoundError: a task's data is missing and the hub is unavailable.
        KeyError: unknown task.
    """
    t0 = time.perf_counter()
    model.eval()
    if prepared is None:
        prepared = prepare_tasks(tokenizer, tasks, data_dir=data_dir, limit=limit, seed=seed)
    out_tasks = {}
    for prep in prepared:
        t1 = time.perf_counter()
        name = prep.task.name
        if isinstance(prep.task, PerplexityTask):
            lls = score_rolling(model, tokenizer, prep.requests, max_length=wikitext_max_length, progress=progress, desc=name)
            res = perplexity_metrics(prep.requests, lls)
            res["max_length"] = wikitext_max_length
        else:
            scores = score_requests(
                model, prep.requests, batch_size=batch_size, max_batch_tokens=max_batch_tokens, method=method, progress=progress, desc=name
            )
            res = mc_metrics(prep.task, prep.items, scores)
            if per_item:
                res["items"] = [
                    {"doc_id": it.doc_id, "gold": it.gold, "logliks": list(sc.logliks), **item_predictions(it, sc)}
                    for it, sc in zip(prep.items, scores)
                ]
        res.update(n_total=prep.n_total, time_s=round(time.perf_counter() - t1, 3), data=prep.source)
        if prep.partition is not None:
            res["partition"] = prep.partition
        out_tasks[name] = res
    mc = {k: v for k, v in out_tasks.items() if v["column"] in ("acc", "acc_norm")}
    average = None
    if mc:
        ses = [v[f"{v['column']}_stderr"] for v in mc.values()]
        average = {
            "value": sum(v[v["column"]] for v in mc.values()) / len(mc),
            # tasks are independent samples: stderr of an unweighted mean of k task means
            "stderr": None if None in ses else math.sqrt(sum(s**2 for s in ses)) / len(mc),
            "columns": {k: v["column"] for k, v in mc.items()},
        }
    return {
        "tasks": out_tasks,
        "average": average,
        "settings": {"limit": limit, "seed": seed, "batch_size": batch_size, "method": method, "data_dir": str(resolve_data_dir(data_dir))},
        "versions": _versions(),
        "total_time_s": round(time.perf_counter() - t0, 3),
    }


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(results: dict) -> str:
    """A readable table of `evaluate` results: one row per task with its paper column, then the average."""
    lines = [
        f"{'task':<16} {'metric':<16} {'value':>8} {'stderr':>8} {'n':>6} {'time_s':>8}",
        "-" * 67,
    ]
    for name, r in results["tasks"].items():
        col = r["column"]
        lines.append(f"{name:<16} {col:<16} {_fmt(r[col]):>8} {_fmt(r.get(col + '_stderr')):>8} {r['n']:>6} {r['time_s']:>8.1f}")
        if col == "word_perplexity":
            for extra in ("byte_perplexity", "bits_per_byte", "token_perplexity"):
                lines.append(f"{'':<16} {extra:<16} {_fmt(r[extra]):>8}")
    avg = results.get("average")
    if avg:
        cols = ", ".join(f"{k}={v}" for k, v in avg["columns"].items())
        lines.append("-" * 67)
        lines.append(f"{'average':<16} {'paper columns':<16} {_fmt(avg['value']):>8} {_fmt(avg['stderr']):>8}")
        lines.append(f"(columns: {cols}; acc_norm = log-likelihood / choice length in characters, as lm-eval)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI glue (called from layerboost/cli.py)
# ----------------------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `layerboost eval` options to a parser."""
    from .cli import add_device_dtype, add_limit

    parser.add_argument("--model", required=True, help="smollm2-135m, a .gguf file, an HF or layerboost folder, or a hub id")
    parser.add_argument(
        "--tasks",
        default=",".join(PAPER_TASKS),
        help=f"comma-separated tasks ({', '.join(TASKS)}) or task definition .yaml/.json files (default: {','.join(PAPER_TASKS)})",
    )
    add_limit(parser, None)
    parser.add_argument("--data-dir", default=None, help="local data directory (default: $LAYERBOOST_DATA_DIR or ../shared/data)")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--batch-size", type=int, default=32, help="most items per forward call")
    parser.add_argument("--seed", type=int, default=0, help="subsample seed")
    add_device_dtype(parser)
    parser.add_argument("--method", default="prefix", choices=["prefix", "naive"], help="naive: score each choice alone (lm-eval's way)")
    parser.add_argument("--per-item", action="store_true", help="include per-item log-likelihoods and margins in the JSON")
    parser.add_argument("--partition", default="all", choices=["all", "evaluation", "selection"],
                        help="score the whole split, or only the evaluation (or selection) part of the seeded "
                             "selection/evaluation partition that `analyze` and `compare` use")
    parser.add_argument("--selection-size", type=int, default=100, help="documents per task in the selection part")
    parser.add_argument("--selection-seed", type=int, default=0, help="seed of the partition")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_eval_cli(args: argparse.Namespace) -> int:
    """Run `layerboost eval`: load the data, then the model, evaluate, print a table, write JSON.

    Returns:
        0 on success. A missing model or data, a bad task or an unwritable --out raises before any scoring
        (`layerboost.cli.main` prints it as one `error:` line).
    """
    from .cli import check_writable
    from .models import load_model

    limit = args.limit
    tasks = [get_task(t.strip()) for t in args.tasks.split(",") if t.strip()]
    if args.out:
        check_writable(args.out, folder=False)  # before the work, not after it
    docs = [load_task_docs(t, args.data_dir) for t in tasks]  # fail on missing data before the slow model load
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    part = None if args.partition == "all" else Partition(args.partition, args.selection_size, args.selection_seed)
    prepared = [prepare_task(tok, t, limit=limit, seed=args.seed, docs=d, partition=part if isinstance(t, MCTask) else None)
                for t, d in zip(tasks, docs)]
    results = evaluate(
        model,
        tok,
        tasks,
        data_dir=args.data_dir,
        limit=limit,
        seed=args.seed,
        batch_size=args.batch_size,
        method=args.method,
        progress=not args.no_progress,
        per_item=args.per_item,
        prepared=prepared,
    )
    plan = getattr(model.config, "layerboost_plan", None)
    results = {
        "model": args.model,
        "plan": plan if isinstance(plan, (dict, list, str, type(None))) else str(plan),
        "dtype": args.dtype,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        **results,
    }
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"results written to {args.out}")
    return 0
