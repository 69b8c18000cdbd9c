"""Task definitions, copied from lm-eval 0.4.13's task YAMLs: prompts, choices, gold answers, data files."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "winogrande", "mmlu")

# ---- Task definitions (copied from lm-eval 0.4.13's task YAMLs) ----


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
