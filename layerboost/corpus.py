"""Training text for healing: stream plain-text files (or a hub dataset), tokenize, pack into
fixed-length rows, shuffle deterministically, and refuse evaluation splits.

Local files are cut into segments of about `segment_chars` characters at blank lines; the segment
list of every file is shuffled with the seed and segments are read (seek + read) and tokenized one
at a time, so memory stays small for big corpora. Each segment ends with EOS; the token stream is
packed into rows of `seq_len` tokens, and rows pass through a seeded shuffle buffer.

The stream is a pure function of (sources, tokenizer, seq_len, seed): a run that stopped after `n`
rows resumes by `skip(n)` (re-tokenizing what it skips, ~1M tokens/s).

Held-out text: one 64 KiB block in `HELDOUT_EVERY` of every local file (chosen by a hash of the
file name and block number, so the choice does not depend on paths or segment sizes) never enters
training; `heldout_rows` reads those blocks as the text on which KL to the base model and
perplexity are measured. The start of the calibration file is never held out.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from .util import hub_offline

TEXT_SUFFIXES = (".txt", ".text", ".md")
HUB_PREFIX = "hub:"


class TrainingDataError(ValueError):
    """The training data is missing, empty, or is an evaluation split."""


# ---- evaluation splits ---------------------------------------------------------------------------


def _evaluation_files(data_dir) -> set[Path]:
    from .data import evaluation_files

    out = set(evaluation_files(data_dir))
    out |= set(evaluation_files(None))  # also the default data dir: never train on what `eval` reads
    return out


def _eval_hub_datasets() -> set[str]:
    from .data import DATASETS

    return {s.hub_path for s in DATASETS.values()}


def _digest(f: Path) -> str:
    return hashlib.sha256(f.read_bytes()).hexdigest()


def refuse_evaluation_data(files: list[Path], data_dir=None) -> None:
    """Raise if any of `files` is an evaluation split (a file `layerboost eval` reads), by path or by content:
    a copy under another name is refused too (files of equal size are compared by SHA-256).

    Raises:
        TrainingDataError: listing every evaluation file found.
    """
    evals = _evaluation_files(data_dir)
    by_size: dict[int, list[Path]] = {}
    for e in evals:
        by_size.setdefault(e.stat().st_size, []).append(e)
    bad = sorted(str(f) for f in files if f.resolve() in evals)
    for f in files:
        same_size = by_size.get(f.stat().st_size, []) if f.resolve() not in evals else []
        copy_of = next((e for e in same_size if _digest(e) == _digest(f)), None)
        if copy_of is not None:
            bad.append(f"{f} (a copy of {copy_of})")
    if bad:
        raise TrainingDataError(
            "refusing to train on evaluation splits (they are what `layerboost eval` scores): "
            + ", ".join(bad)
            + ". Use the distillation corpus (e.g. <data-dir>/corpus) or your own text."
        )


# ---- sources ---------------------------------------------------------------------------------------


def text_files(data: str | os.PathLike, data_dir=None) -> list[Path]:
    """The text files `data` names (a file or a folder, searched recursively), sorted.

    Raises:
        TrainingDataError: nothing found, or an evaluation split among them.
    """
    path = Path(data).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        refuse_evaluation_data(files, data_dir)  # a folder holding eval splits is refused, not filtered
        files = [p for p in files if p.suffix in TEXT_SUFFIXES]
    else:
        raise TrainingDataError(f"training data {str(data)!r} is neither a file nor a folder")
    refuse_evaluation_data(files, data_dir)
    if not files:
        raise TrainingDataError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {path}")
    return files


def segment_index(files: list[Path], segment_chars: int = 8192) -> list[tuple[int, int, int]]:
    """(file number, byte offset, byte length) of segments of about `segment_chars`, cut at blank lines."""
    index = []
    for n, f in enumerate(files):
        data = f.read_bytes()
        start, size = 0, len(data)
        while start < size:
            end = min(size, start + segment_chars)
            if end < size:
                cut = data.rfind(b"\n\n", start + segment_chars // 2, end)
                end = cut + 2 if cut >= 0 else end
            index.append((n, start, end - start))
            start = end
    return index


# ---- held-out text ---------------------------------------------------------------------------------

HELDOUT_BLOCK = 1 << 16
HELDOUT_EVERY = 100
CALIBRATION_FILE, CALIBRATION_BYTES = "wikipedia_paragraphs.txt", 1 << 18  # sensitivity.calibration_tokens reads it


def _block_hash(name: str, block: int) -> int:
    return int(hashlib.sha256(f"{name}:{block}".encode()).hexdigest()[:12], 16)


def is_heldout_block(name: str, block: int) -> bool:
    """Whether bytes [block * 64 KiB, (block + 1) * 64 KiB) of the file called `name` are held out."""
    if name == CALIBRATION_FILE and block * HELDOUT_BLOCK < CALIBRATION_BYTES:
        return False
    return _block_hash(name, block) % HELDOUT_EVERY == 0


def overlaps_heldout(name: str, offset: int, length: int) -> bool:
    first, last = offset // HELDOUT_BLOCK, (offset + max(length, 1) - 1) // HELDOUT_BLOCK
    return any(is_heldout_block(name, b) for b in range(first, last + 1))


def row_prefix(tokenizer) -> list[int]:
    """[BOS] if the tokenizer starts every text with it, else []: packed rows then begin as the model's own
    texts do. Gemma 3 270M, measured on 2 x 254 calibration tokens: perplexity 21.0 after BOS, 76.6 without.
    SmolLM2's tokenizer adds no BOS, so its rows are unchanged."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def heldout_rows(tokenizer, data: str | os.PathLike, n_tokens: int, seq_len: int = 512) -> torch.Tensor:
    """(n_rows, seq_len) token ids of held-out text of the local files under `data` (training never sees it).

    Blocks are taken in a fixed hash order (mixing files), each tokenized and ended with EOS, packed
    into rows (each starting with `row_prefix`); `n_rows` = ceil(n_tokens / seq_len). Deterministic for
    the same files and tokenizer.

    Raises:
        TrainingDataError: no local files, or not enough held-out text.
    """
    files = text_files(data)
    blocks = sorted(((_block_hash(f.name, b), f, b) for f in files
                     for b in range((f.stat().st_size + HELDOUT_BLOCK - 1) // HELDOUT_BLOCK)
                     if b > 0 and is_heldout_block(f.name, b)), key=lambda x: x[0])  # block 0: front matter
    n_rows = -(-n_tokens // seq_len)
    prefix = row_prefix(tokenizer)
    width = seq_len - len(prefix)
    buf: list[int] = []
    for _, f, b in blocks:
        with open(f, "rb") as fh:
            fh.seek(b * HELDOUT_BLOCK)
            text = fh.read(HELDOUT_BLOCK).decode("utf-8", errors="ignore")
        buf += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(buf) >= n_rows * width:
            return torch.tensor([prefix + buf[r * width : (r + 1) * width] for r in range(n_rows)])
    raise TrainingDataError(f"{data} holds {len(buf)} held-out tokens, fewer than the {n_rows * width} asked for")


def check_heldout(data: str | os.PathLike, n_tokens: int, seq_len: int = 512) -> None:
    """Before any work: fail when the local files under `data` cannot give `heldout_rows` its `n_tokens`, without a
    tokenizer: a block of B bytes gives at most B tokens and an EOS, and a row prefix is shorter than 16 tokens.

    Raises:
        TrainingDataError: no local files, or too little held-out text for any tokenizer.
    """
    files = text_files(data)
    blocks = [(f, b) for f in files for b in range(1, (f.stat().st_size + HELDOUT_BLOCK - 1) // HELDOUT_BLOCK)
              if is_heldout_block(f.name, b)]
    most = sum(min(HELDOUT_BLOCK, f.stat().st_size - b * HELDOUT_BLOCK) + 1 for f, b in blocks)
    need = -(-n_tokens // seq_len) * (seq_len - 16)
    if most < need:
        raise TrainingDataError(f"{data} holds {len(blocks)} held-out blocks of {HELDOUT_BLOCK} bytes (at most {most} "
                                f"tokens), fewer than the {n_tokens} held-out tokens asked for: give more text, or "
                                "lower eval.heldout_tokens (0 skips the held-out measures)")


def _file_documents(files: list[Path], seed: int, segment_chars: int) -> Iterator[str]:
    index = [(n, o, ln) for n, o, ln in segment_index(files, segment_chars) if not overlaps_heldout(files[n].name, o, ln)]
    random.Random(seed).shuffle(index)
    handles: dict[int, object] = {}
    try:
        for n, offset, length in index:
            fh = handles.get(n)
            if fh is None:
                fh = handles[n] = open(files[n], "rb")  # noqa: SIM115 - closed in finally
            fh.seek(offset)
            text = fh.read(length).decode("utf-8", errors="replace")
            if text.strip():
                yield text
    finally:
        for fh in handles.values():
            fh.close()


def parse_hub_spec(data: str) -> tuple[str, str | None, str]:
    """`hub:path[:config][:split]` -> (path, config, split); split defaults to `train`."""
    parts = data[len(HUB_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise TrainingDataError(f"hub data must look like hub:PATH[:CONFIG][:SPLIT], got {data!r}")
    path = parts[0]
    config = parts[1] or None if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    return path, config, split


def _hub_documents(data: str, seed: int, text_field: str, buffer: int) -> Iterator[str]:
    path, config, split = parse_hub_spec(data)
    if path in _eval_hub_datasets() and split != "train":
        raise TrainingDataError(f"refusing to train on the evaluation split {split!r} of {path!r}")
    if hub_offline():  # hub data is streamed, which no offline cache serves
        raise TrainingDataError(f"training data {data!r} is streamed from the Hugging Face hub, which is offline here "
                                "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): pass a local file or folder of .txt, or go online")
    return _hub_stream(path, config, split, seed, text_field, buffer)


def _hub_stream(path, config, split, seed, text_field, buffer) -> Iterator[str]:
    import datasets  # heavy: only for hub data

    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=True).shuffle(seed=seed, buffer_size=buffer)
    except (ConnectionError, OSError) as e:  # unreachable, or no such dataset (DatasetNotFoundError is an OSError)
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise TrainingDataError(f"training data hub:{path} cannot be read from the Hugging Face hub ({reason}): check "
                                "its name, or pass a local file or folder of .txt") from None
    for row in ds:
        text = row[text_field]
        if text and text.strip():
            yield text


def documents(data: str, *, seed: int, data_dir=None, segment_chars: int = 8192, text_field: str = "text",
              hub_buffer: int = 10_000) -> Iterator[str]:
    """Text documents of `data` in a seeded order: local files/folders, or `hub:PATH[:CONFIG][:SPLIT]`.

    A string that is not an existing path and has no `hub:` prefix is read as a hub dataset too
    (split `train`), so `--data HuggingFaceFW/fineweb-edu` works for online users.
    """
    if str(data).startswith(HUB_PREFIX):
        return _hub_documents(str(data), seed, text_field, hub_buffer)
    if not Path(data).expanduser().exists() and not str(data).startswith((".", "/", "~")):
        if hub_offline():
            raise TrainingDataError(f"training data {str(data)!r} is not a local file or folder, and the hub is offline "
                                    "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) so it cannot be a hub dataset either")
        return _hub_documents(HUB_PREFIX + str(data), seed, text_field, hub_buffer)
    return _file_documents(text_files(data, data_dir), seed, segment_chars)


# ---- packing -----------------------------------------------------------------------------------------


class PackedRows:
    """An endless-until-exhausted iterator of (seq_len,) int64 rows; `position` = rows yielded so far.

    Args:
        docs_factory: a zero-argument callable that returns a fresh document iterator (same order each call).
        tokenizer: a Hugging Face tokenizer; its EOS token separates documents.
        seq_len: tokens per row.
        seed: seeds the row shuffle buffer.
        shuffle_rows: shuffle-buffer size in rows (0 or 1: no row shuffling).
        transform: (row, row number) -> a row of the same length (a pure function, so a resumed run sees the
            same rows), e.g. `retrieval_rows`.
    """

    def __init__(self, docs_factory, tokenizer, seq_len: int, seed: int, shuffle_rows: int = 256, transform=None):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.docs_factory, self.tok, self.seq_len = docs_factory, tokenizer, seq_len
        self.seed, self.shuffle_rows = seed, max(1, shuffle_rows)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise TrainingDataError("the tokenizer has no EOS token to separate documents")
        self.eos = eos
        self.position = 0
        self.transform = transform  # (row, row number) -> row of the same length, e.g. retrieval_rows
        self._it = self._rows()

    def _packed(self) -> Iterator[list[int]]:
        prefix = row_prefix(self.tok)
        width = self.seq_len - len(prefix)
        buf: list[int] = []
        for text in self.docs_factory():
            buf.extend(self.tok(text, add_special_tokens=False)["input_ids"])
            buf.append(self.eos)
            while len(buf) >= width:
                yield prefix + buf[:width]
                del buf[:width]

    def _rows(self) -> Iterator[list[int]]:
        rng = random.Random(f"rows:{self.seed}")
        pool: list[list[int]] = []
        for row in self._packed():
            pool.append(row)
            if len(pool) >= self.shuffle_rows:
                j = rng.randrange(len(pool))
                pool[j], pool[-1] = pool[-1], pool[j]
                yield pool.pop()
        rng.shuffle(pool)
        yield from pool

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        row = next(self._it)
        if self.transform is not None:
            row = self.transform(row, self.position)
        self.position += 1
        return torch.tensor(row, dtype=torch.long)

    def skip(self, n: int) -> None:
        """Advance `n` rows (used to resume); raises if the data runs out first."""
        for _ in range(n):
            try:
                next(self._it)
            except StopIteration:
                raise TrainingDataError(f"the data ran out after {self.position} rows while resuming") from None
            self.position += 1


# ---- synthetic retrieval rows (heal --retrieval-share) -----------------------------------------------
# A training row of real prose with a fact line placed at a random word boundary and asked for at its end, so the
# teacher's answer (it reads the fact from far back) is distilled into the hybrid. Built only from the row's own
# training text, with templates that no evaluation task uses (evaluate/retrieval.py asks for "pass key" and
# "<name>'s <thing> number").
TRAIN_NOUNS = ("harbour", "library", "garden", "station", "cellar", "tower", "bridge", "mill", "chapel", "market",
               "orchard", "quarry")
TRAIN_FACT = " Remember this: the {noun} code is {key}."
TRAIN_QUESTION = "\n\nWhat was the {noun} code? The {noun} code was {key}."


def retrieval_row(row: list[int], tokenizer, rnd: random.Random) -> list[int]:
    """`row` (same length) with a fact line inserted at a random word start and its question and answer at the end;
    the prose after the fact is cut to make room. A row too short to hold both comes back unchanged."""
    prefix = row_prefix(tokenizer)
    body = row[len(prefix):]
    key, noun = str(rnd.randint(10000, 99999)), rnd.choice(TRAIN_NOUNS)
    fact = tokenizer(TRAIN_FACT.format(noun=noun, key=key), add_special_tokens=False)["input_ids"]
    question = tokenizer(TRAIN_QUESTION.format(noun=noun, key=key), add_special_tokens=False)["input_ids"]
    keep = len(body) - len(fact) - len(question)
    if keep < 16:
        return row
    at = rnd.randrange(keep)
    while at < keep and not tokenizer.decode(body[at : at + 1]).startswith((" ", "\n")):
        at += 1  # a word start, so the fact reads as its own sentence
    return prefix + body[:at] + fact + body[at:keep] + question


def retrieval_rows(tokenizer, share: float, seed: int):
    """A PackedRows transform that turns a seeded `share` of the rows into `retrieval_row`s (a pure function of the
    row number and seed, so a resumed heal rebuilds the same rows)."""

    def transform(row: list[int], n: int) -> list[int]:
        rnd = random.Random(f"retrieval-row:{seed}:{n}")
        return retrieval_row(row, tokenizer, rnd) if rnd.random() < share else row

    return transform


def parse_tokens(value: str | int | float) -> int:
    """`10M`, `1.5M`, `200k`, `3B`, `5000` -> an int number of tokens.

    Raises:
        ValueError: not a positive count.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a token count: {value!r}")
    if isinstance(value, (int, float)):
        n = value
    else:
        s = str(value).strip().replace("_", "").replace(",", "")
        mult = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(s[-1:].lower(), 1)
        try:
            n = float(s[:-1] if mult != 1 else s) * mult
        except ValueError:
            raise ValueError(f"not a token count: {value!r} (use e.g. 10M, 1.5M, 200k or 5000)") from None
    if n != int(n) or n <= 0:
        raise ValueError(f"a token count must be a positive whole number, got {value!r}")
    return int(n)


__all__ = [
    "PackedRows",
    "row_prefix",
    "heldout_rows",
    "overlaps_heldout",
    "TrainingDataError",
    "documents",
    "parse_hub_spec",
    "parse_tokens",
    "refuse_evaluation_data",
    "retrieval_row",
    "retrieval_rows",
    "segment_index",
    "text_files",
]
