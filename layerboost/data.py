"""Benchmark data: one loader for local copies in the Hugging Face dataset schemas and the hub.

Local copies live under a data directory laid out like `../shared/data` (e.g.
`piqa/validation.jsonl`, `mmlu/test.jsonl`, `wikitext/wiki.test.raw`). The directory comes
from the `data_dir` argument (`--data-dir`), else `$LAYERBOOST_DATA_DIR`, else
`<repo>/../shared/data` when it exists. Without a local copy the hub dataset is loaded with
`datasets` unless `HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE` is set; every failure raises
`DataNotFoundError` naming the missing file and both ways to fix it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .util import hub_offline

REPO_ROOT = Path(__file__).resolve().parents[1]


class DataNotFoundError(FileNotFoundError):
    """A benchmark split is neither on disk nor loadable from the hub; the message says how to fix it."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where one evaluation split lives, locally and on the hub.

    Attributes:
        name: our key (`piqa`, `arc_easy`, ...).
        local_file: path relative to the data directory.
        hub_path: `datasets.load_dataset` path.
        hub_name: dataset config name, if any.
        hub_split: split to read from the hub.
        kind: `jsonl` (one document per line) or `text` (one raw text file).
    """

    name: str
    local_file: str
    hub_path: str
    hub_name: str | None
    hub_split: str
    kind: str = "jsonl"


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        DatasetSpec("piqa", "piqa/validation.jsonl", "piqa", None, "validation"),
        DatasetSpec("arc_easy", "arc_easy/test.jsonl", "allenai/ai2_arc", "ARC-Easy", "test"),
        DatasetSpec("arc_challenge", "arc_challenge/test.jsonl", "allenai/ai2_arc", "ARC-Challenge", "test"),
        DatasetSpec("winogrande", "winogrande/validation.jsonl", "winogrande", "winogrande_xl", "validation"),
        DatasetSpec("mmlu", "mmlu/test.jsonl", "cais/mmlu", "all", "test"),
        DatasetSpec("mmlu_dev", "mmlu/dev.jsonl", "cais/mmlu", "all", "dev"),
        DatasetSpec("hellaswag", "hellaswag/validation.jsonl", "Rowan/hellaswag", None, "validation"),
        DatasetSpec("wikitext", "wikitext/wiki.test.raw", "wikitext", "wikitext-2-raw-v1", "test", kind="text"),
    ]
}


@dataclass
class LoadedData:
    """Documents of one split and where they came from.

    Attributes:
        docs: list of dicts in the HF schema (for `text` datasets: one dict `{"text": ...}`).
        source: the local file path, or `hub:<path>[/<name>]:<split>`.
    """

    docs: list[dict]
    source: str


def default_data_dir() -> Path | None:
    """`$LAYERBOOST_DATA_DIR` if set, else `<repo>/../shared/data` if it exists, else None."""
    env = os.environ.get("LAYERBOOST_DATA_DIR")
    if env:
        return Path(env).expanduser()
    shared = REPO_ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The explicit `data_dir` if given, else `default_data_dir()`."""
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def evaluation_files(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Resolved paths of the evaluation-split files present in a data directory.

    Training/healing code must refuse these files as training data.

    Args:
        data_dir: the data directory; None uses `default_data_dir()`.

    Returns:
        Existing files among the known evaluation splits (empty when there is no directory).
    """
    root = resolve_data_dir(data_dir)
    if root is None:
        return []
    files = [root / spec.local_file for spec in DATASETS.values()]
    return [f.resolve() for f in files if f.is_file()]


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file (blank lines skipped).

    Raises:
        ValueError: a line is not valid JSON (the message gives file and line number).
    """
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from e
    return docs


def _missing_message(spec: DatasetSpec, root: Path | None, reason: str) -> str:
    where = (
        f"{root / spec.local_file} does not exist"
        if root is not None
        else f"no data directory is set, so the local file <data-dir>/{spec.local_file} was not looked for"
    )
    hub = spec.hub_path + (f" (config {spec.hub_name!r}, split {spec.hub_split!r})" if spec.hub_name else f" (split {spec.hub_split!r})")
    return (
        f"cannot load the {spec.name!r} data: {where}, and {reason}. Fix it either way: "
        f"(1) point --data-dir or LAYERBOOST_DATA_DIR at a directory holding {spec.local_file} "
        f"(Hugging Face schema of {spec.hub_path}); or (2) go online (unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) "
        f"so that the hub dataset {hub} is downloaded with `datasets`."
    )


def _load_hub(spec: DatasetSpec) -> list[dict]:
    import datasets  # heavy import: only when the hub is actually needed

    ds = datasets.load_dataset(spec.hub_path, spec.hub_name, split=spec.hub_split)
    if spec.kind == "text":
        # The hub `wikitext` rows are the raw file's lines, each with its trailing newline.
        return [{"text": "".join(ds["text"])}]
    return [dict(row) for row in ds]


def load_dataset_docs(name: str, data_dir: str | os.PathLike | None = None) -> LoadedData:
    """Load one evaluation split: the local copy if present, else the hub.

    Args:
        name: a key of `DATASETS`, e.g. `piqa`, `mmlu`, `wikitext`.
        data_dir: data directory; None uses `default_data_dir()`.

    Returns:
        The documents and their source. `text` datasets give one document `{"text": raw}`.

    Raises:
        KeyError: unknown dataset name.
        DataNotFoundError: no local file, and the hub is offline or failed.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[name]
    root = resolve_data_dir(data_dir)
    if root is not None and (root / spec.local_file).is_file():
        path = root / spec.local_file
        if spec.kind == "text":
            return LoadedData([{"text": path.read_text(encoding="utf-8")}], str(path))
        return LoadedData(load_jsonl(path), str(path))
    if hub_offline():
        raise DataNotFoundError(_missing_message(spec, root, "the hub is disabled (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)"))
    try:
        docs = _load_hub(spec)
    except Exception as e:  # any hub/network failure: report it with the fixes
        raise DataNotFoundError(_missing_message(spec, root, f"loading it from the hub failed ({type(e).__name__}: {e})")) from e
    source = f"hub:{spec.hub_path}" + (f"/{spec.hub_name}" if spec.hub_name else "") + f":{spec.hub_split}"
    return LoadedData(docs, source)


def split_wikitext_documents(raw: str) -> list[str]:
    """Split a raw WikiText file into articles exactly like `EleutherAI/wikitext_document_level`.

    A new document starts at each top-level heading line (` = Title = `); the text before the
    first heading is dropped when blank, and the final document is always kept.

    Args:
        raw: the whole `wiki.*.raw` text.

    Returns:
        The documents (`page` fields), lines joined with newlines.
    """
    pages, current = [], []
    lines = raw.split("\n")
    for line in lines:
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.strip().endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages
