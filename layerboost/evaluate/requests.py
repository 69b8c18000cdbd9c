"""Items and requests: documents to multiple-choice items, seeded stratified samples, the selection /
evaluation partition, and tokenisation exactly as lm-eval's HFLM does it."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data import LoadedData, load_dataset_docs, load_jsonl, split_wikitext_documents
from .tasks import MCTask, PerplexityTask, TaskError, get_task


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
