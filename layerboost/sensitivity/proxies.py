"""Cheap proxies on calibration text: KL(base || variant) and the cosine similarity of each layer's input and
output (LLM-Drop), their rank agreement, and the calibration rows."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..corpus import CALIBRATION_BYTES
from ..plan import LayerSpec, cost_key
from .items import LayerRunner, variant


@torch.no_grad()
def base_logprobs(runner: LayerRunner, calib: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Next-token log-probabilities (fp32) of the model as it is now, per chunk of `batch` rows of `calib`."""
    return [torch.log_softmax(runner.logits(runner.run(*runner.embed(calib[i : i + batch]))).float(), dim=-1)
            for i in range(0, len(calib), batch)]


@torch.no_grad()
def kl_proxy(model: nn.Module, calib: torch.Tensor, *, layers: list[int] | None = None, batch: int = 4,
             progress: bool = True, reference: list[torch.Tensor] | None = None) -> list[float]:
    """Mean KL(base || variant) of next-token distributions on calibration text, per layer (`none`),
    with the same prefix reuse. calib: (N, T) token ids without padding. `reference`: the base's
    log-probabilities per chunk of `batch` rows (default: the model as it is now)."""
    return kl_variants(model, calib, [LayerSpec("none")], layers=layers, batch=batch, progress=progress,
                       reference=reference)["none"]


@torch.no_grad()
def kl_variants(model: nn.Module, calib: torch.Tensor, specs: list[LayerSpec], *, layers: list[int] | None = None,
                batch: int = 4, progress: bool = True, reference: list[torch.Tensor] | None = None,
                store=None, desc: str = "KL proxy") -> dict[str, list[float]]:
    """Mean KL(base || model with one layer as `spec`) per variant and layer: the hidden states entering layer i
    are computed once and every variant of layer i is finished from them. `store` (a sensitivity Store): each
    layer's values are saved as it finishes and read back on a rerun."""
    runner = LayerRunner(model)
    layers = list(range(len(runner.layers))) if layers is None else layers
    chunks = [calib[i : i + batch] for i in range(0, len(calib), batch)]
    emb = [runner.embed(c) for c in chunks]
    ctx = [e[1] for e in emb]

    def logp(h):
        return torch.log_softmax(runner.logits(h).float(), dim=-1)

    def finish(h, b, start):
        for j in range(start, len(runner.layers)):
            h = runner.layer(j, h, ctx[b])
        return h

    names = [cost_key(s) for s in specs]
    done = {i: store.get(f"kl_variants_{i}") for i in layers} if store is not None else {}
    todo = [i for i in sorted(layers) if done.get(i) is None]
    base_lp = (reference if reference is not None else base_logprobs(runner, calib, batch)) if todo else []
    hidden, at, out = [e[0] for e in emb], 0, {i: v for i, v in done.items() if v is not None}
    for i in tqdm(todo, desc=desc, disable=not progress, dynamic_ncols=True):
        for b in range(len(hidden)):
            for j in range(at, i):
                hidden[b] = runner.layer(j, hidden[b], ctx[b])
        at = i
        row = {}
        for name, spec in zip(names, specs):
            total, count = 0.0, 0
            with variant(runner, i, spec):
                for b, h in enumerate(hidden):
                    lp = logp(finish(h, b, i))
                    total += (base_lp[b].exp() * (base_lp[b] - lp)).sum().item()
                    count += lp.shape[0] * lp.shape[1]
            row[name] = total / count
        out[i] = row
        if store is not None:
            store.put(f"kl_variants_{i}", row)
    return {name: [out[i][name] for i in layers] for name in names}


@torch.no_grad()
def cosine_proxy(model: nn.Module, calib: torch.Tensor, *, batch: int = 4) -> list[float]:
    """Per layer, 1 - cos(x, x + attn(x)) (attn(x) as the residual stream receives it): how much the attention
    sublayer changes the residual stream (LLM-Drop's importance score; higher = more important). One base forward with hooks."""
    runner = LayerRunner(model)
    sums = [0.0] * len(runner.layers)
    count = 0
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(runner.layers):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])))

        def after_attn(m, args, out, i=i, block=block):
            x, y = inputs[i], out[0]
            if runner.arch.attn_out_norm:  # what the residual stream receives (Gemma 3 normalises the output)
                y = getattr(block, runner.arch.attn_out_norm)(y)
            sums[i] += torch.nn.functional.cosine_similarity(x, x + y, dim=-1).sum().item()

        handles.append(block.self_attn.register_forward_hook(after_attn))
    try:
        for s in range(0, len(calib), batch):
            h, ctx = runner.embed(calib[s : s + batch])
            for i in range(len(runner.layers)):
                h = runner.layer(i, h, ctx)
            count += calib[s : s + batch].numel()
    finally:
        for hd in handles:
            hd.remove()
    return [1.0 - v / count for v in sums]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else float("nan")


def calibration_tokens(tokenizer, data_dir=None, n_seqs: int = 8, seq_len: int = 256) -> torch.Tensor:
    """(n_seqs, seq_len) token ids of held-out prose (corpus/wikipedia_paragraphs.txt, never an eval split).

    Raises:
        FileNotFoundError: the corpus file is missing (names the path and how to point at it).
    """
    from ..data import resolve_data_dir

    root = resolve_data_dir(data_dir)
    path = (root / "corpus" / "wikipedia_paragraphs.txt") if root else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"calibration text {path or 'corpus/wikipedia_paragraphs.txt'} not found: pass --data-dir or set "
            "LAYERBOOST_DATA_DIR to a folder holding corpus/wikipedia_paragraphs.txt"
        )
    from ..corpus import row_prefix

    prefix = row_prefix(tokenizer)  # Gemma: BOS first, as its own texts begin
    width = seq_len - len(prefix)
    need = n_seqs * width
    text, ids = "", []
    with path.open(encoding="utf-8") as f:
        while len(ids) < need:
            chunk = f.read(50_000)
            if not chunk:
                raise ValueError(f"{path} holds fewer than {need} tokens")
            if len((text + chunk).encode()) > CALIBRATION_BYTES:  # beyond it, text may be held out for evaluation
                raise ValueError(f"{n_seqs} x {seq_len} calibration tokens need more than the first "
                                 f"{CALIBRATION_BYTES} bytes of {path}, which are reserved for calibration: ask for fewer")
            text += chunk
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([prefix + ids[r * width : (r + 1) * width] for r in range(n_seqs)])


def long_calibration_tokens(tokenizer, data_dir=None, n_seqs: int = 4, seq_len: int = 2048) -> torch.Tensor:
    """(n_seqs, seq_len) token ids of contiguous prose, one row per novel of corpus/novels (sorted by name), read from
    the first 64 KiB block after the front matter that is not held out for evaluation (corpus.is_heldout_block):
    long-range text on which a sliding window of W differs from softmax at every position past W.

    Raises:
        FileNotFoundError: corpus/novels is missing.
        ValueError: fewer usable novels than rows.
    """
    from ..corpus import HELDOUT_BLOCK, is_heldout_block, row_prefix
    from ..data import resolve_data_dir

    root = resolve_data_dir(data_dir)
    folder = (root / "corpus" / "novels") if root else None
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(f"long calibration text {folder or 'corpus/novels'} not found: pass --data-dir or set "
                                "LAYERBOOST_DATA_DIR to a folder holding corpus/novels/*.txt")
    prefix = row_prefix(tokenizer)
    width = seq_len - len(prefix)
    rows = []
    for f in sorted(folder.glob("*.txt")):
        blocks = (f.stat().st_size // HELDOUT_BLOCK) - 1  # whole blocks after block 0
        b = next((b for b in range(1, blocks + 1) if not is_heldout_block(f.name, b)), None)
        if b is None:
            continue
        with open(f, "rb") as fh:
            fh.seek(b * HELDOUT_BLOCK)
            text = fh.read(HELDOUT_BLOCK).decode("utf-8", errors="ignore")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= width:
            rows.append(prefix + ids[:width])
        if len(rows) == n_seqs:
            return torch.tensor(rows)
    raise ValueError(f"{folder} gives {len(rows)} rows of {seq_len} contiguous tokens, fewer than the {n_seqs} asked for: "
                     "ask for fewer or shorter rows")
