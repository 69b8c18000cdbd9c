"""The layer pass on multiple-choice items (the paper's Eq. 3): items packed into rows, each layer's variant
scored with exact prefix reuse, per-item scores and their drops with confidence intervals."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..attention import attention_kind, build_attention
from ..evaluate import common_prefix_len
from ..kinds import kind
from ..plan import LayerSpec
from ..runner import DecoderRunner
from .store import LayerResult, Store


@dataclass
class PackedItem:
    """One multiple-choice request in token ids, as `evaluate.prepare_tasks` builds it."""

    task: str
    contexts: list[list[int]]
    continuations: list[list[int]]
    gold: int
    metric: str  # the task's reported column: "acc" or "acc_norm"
    source: object  # the evaluator's MCItem (choices, for acc_norm's length normalisation)


def items_from_tasks(prepared) -> list[PackedItem]:
    """Flatten `evaluate.PreparedTask`s (multiple-choice ones) into token-level items."""
    out = []
    for pt in prepared:
        if pt.items is None:
            raise ValueError(f"task {pt.task.name!r} is not multiple choice: sensitivity needs scored choices")
        for req in pt.requests:
            out.append(PackedItem(pt.task.name, [list(c) for c in req.context_tokens],
                              [list(c) for c in req.continuation_tokens], req.item.gold, pt.task.column, req.item))
    return out


@dataclass
class Seqs:
    """Rows to score, right-padded and batched by length, and where each request reads its log-probs."""

    ids: list[torch.Tensor]  # per batch: (B, T) token ids
    pos: list[torch.Tensor]  # per batch: (B, T) position ids
    segs: list[torch.Tensor | None]  # per batch: (B, T) segment ids (0 = shared by all), None = plain causal
    reads: list[tuple[int, int, list[int], list[int]]]  # per request: (batch, row, positions, target tokens)
    n_tokens: int


def pack(items: list[PackedItem], batch_tokens: int, share_context: bool = True) -> Seqs:
    """Rows to score, batched by length (longest first) within `batch_tokens` padded tokens.

    share_context=True: one row per item. The tokens all its choices' inputs start with come once,
    then each choice's remaining tokens, with position ids continuing from the shared part and a
    segment id per choice, so that (with the mask `runner.tree_mask` builds) a choice sees the shared part
    and itself only: the same log-likelihoods as scoring every choice alone, for the cost of one
    context. False: one row per distinct choice input (plain causal attention), for attention kinds
    that window by row index (`swa`, `linear_swa`).
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []  # (tokens, positions, segments)
    row_index: dict[tuple[int, ...], int] = {}
    reads_raw = []  # (row, positions, targets)
    for it in items:
        inputs = [(ctx + cont)[:-1] for ctx, cont in zip(it.contexts, it.continuations)]  # the last target is never an input
        if share_context:
            p = common_prefix_len(inputs)
            toks, pos, seg = list(inputs[0][:p]), list(range(p)), [0] * p
            r = len(rows)
            for j, (inp, ctx, cont) in enumerate(zip(inputs, it.contexts, it.continuations)):
                at = len(toks)  # where this choice's own tokens start in the row
                toks += inp[p:]
                pos += range(p, len(inp))
                seg += [j + 1] * (len(inp) - p)
                where = [u if u < p else at + u - p for u in range(len(ctx) - 1, len(inp))]
                reads_raw.append((r, where, cont))
            rows.append((toks, pos, seg))
        else:
            for inp, ctx, cont in zip(inputs, it.contexts, it.continuations):
                key = tuple(inp)
                if key not in row_index:
                    row_index[key] = len(rows)
                    rows.append((list(inp), list(range(len(inp))), [0] * len(inp)))
                reads_raw.append((row_index[key], list(range(len(ctx) - 1, len(inp))), cont))
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    batches, cur, cur_len = [], [], 0
    for r in order:  # longest first; a batch closes when full or when padding to its longest row would waste much
        n = len(rows[r][0])
        if cur and ((len(cur) + 1) * cur_len > batch_tokens or cur_len - n > max(4, cur_len // 8)):
            batches.append(cur)
            cur, cur_len = [], 0
        cur.append(r)
        cur_len = max(cur_len, n)
    if cur:
        batches.append(cur)
    where, ids, pos, segs = {}, [], [], []
    for b, group in enumerate(batches):
        t = max(len(rows[r][0]) for r in group)
        x = torch.zeros((len(group), t), dtype=torch.long)
        ps = torch.arange(t).repeat(len(group), 1)  # padding: any position, it is never read
        sg = torch.zeros((len(group), t), dtype=torch.long)  # padding: segment 0, sees only shared tokens and pads
        for i, r in enumerate(group):
            toks, p_, s_ = rows[r]
            x[i, : len(toks)], ps[i, : len(toks)], sg[i, : len(toks)] = torch.tensor(toks), torch.tensor(p_), torch.tensor(s_)
            where[r] = (b, i)
        ids.append(x)
        pos.append(ps)
        segs.append(sg if bool(sg.any()) else None)
    reads = [(*where[r], w, cont) for r, w, cont in reads_raw]
    return Seqs(ids, pos, segs, reads, sum(len(r[0]) for r in rows))


class LayerRunner(DecoderRunner):
    """The decoder runner on right-padded batches (padding sits after every scored position, so causal
    attention never reaches it; packed rows add a segment mask), with log-probabilities at scored positions."""

    def logprobs(self, h: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor):
        """log p(target) at the given (row, position) pairs; the LM head runs once per distinct position
        (the choices of a packed item, and MMLU's four letters, read the same position)."""
        where, inverse = torch.unique(rows * h.shape[1] + positions, return_inverse=True)
        logp = torch.log_softmax(self.logits(h.reshape(-1, h.shape[-1])[where]).float(), dim=-1)
        return logp[inverse, targets]

    def windowed(self) -> bool:
        """Whether any layer attends by row index (swa, linear_swa, an original layer that slides natively):
        packed rows would be wrong there."""
        return any(kind(attention_kind(b.self_attn)).windowed or self.native_window(i) for i, b in enumerate(self.layers))


@contextlib.contextmanager
def variant(runner: LayerRunner, layer: int, spec: LayerSpec):
    """Temporarily give one layer another attention kind (built from its original module)."""
    block = runner.layers[layer]
    orig = block.self_attn
    block.self_attn = build_attention(orig, spec)
    try:
        yield
    finally:
        block.self_attn = orig


def loglikelihoods(runner: LayerRunner, seqs: Seqs, hidden: list[torch.Tensor], ctx: list, start: int) -> list[float]:
    """Per-request loglikelihood, running layers `start`.. on the given hidden states."""
    per_batch_out = []
    for b, h in enumerate(hidden):
        for i in range(start, len(runner.layers)):
            h = runner.layer(i, h, ctx[b])
        per_batch_out.append(h)
    return read_outputs(runner, seqs, per_batch_out)


def read_outputs(runner: LayerRunner, seqs: Seqs, outs: list[torch.Tensor]) -> list[float]:
    by_batch: dict[int, list[tuple[int, int, int, int]]] = {}
    for r_idx, (b, row, positions, cont) in enumerate(seqs.reads):
        for p, tok in zip(positions, cont):
            by_batch.setdefault(b, []).append((r_idx, row, p, tok))
    total = [0.0] * len(seqs.reads)
    for b, entries in by_batch.items():
        e = torch.tensor([x[1:] for x in entries], device=runner.device)
        lp = runner.logprobs(outs[b], e[:, 0], e[:, 1], e[:, 2]).double().cpu().tolist()
        for (r_idx, *_), v in zip(entries, lp):
            total[r_idx] += v
    return total


def item_scores(items: list[PackedItem], lls: list[float]) -> dict[str, list[float]]:
    """Per item: correct (0/1) under the task's column, and the gold margin (gold score - best other),
    with the evaluator's own prediction rule."""
    from ..evaluate import ItemScore, item_predictions

    correct, margin, k = [], [], 0
    for it in items:
        n = len(it.continuations)
        p = item_predictions(it.source, ItemScore(tuple(lls[k : k + n]), ()))
        k += n
        key = "_norm" if it.metric == "acc_norm" else ""
        correct.append(float(p["pred" + key] == it.gold))
        margin.append(p["margin" + key])
    return {"correct": correct, "margin": margin}


def mean_se(x: list[float]) -> tuple[float, float]:
    """Mean and its standard error (lm-eval's, as the evaluator reports it; 0 for one item)."""
    from ..evaluate.metrics import mean_stderr

    return sum(x) / len(x), mean_stderr(x) or 0.0


def compare_scores(items: list[PackedItem], base: dict, var: dict) -> dict:
    """Drop of a variant against the base, per task and averaged, with paired 95% intervals."""
    tasks = sorted({it.task for it in items})
    per_task = {}
    for t in tasks:
        idx = [j for j, it in enumerate(items) if it.task == t]
        d_acc = [base["correct"][j] - var["correct"][j] for j in idx]
        d_mar = [base["margin"][j] - var["margin"][j] for j in idx]
        b_acc = sum(base["correct"][j] for j in idx) / len(idx)
        m, se = mean_se(d_acc)
        mm, mse = mean_se(d_mar)
        per_task[t] = {"n": len(idx), "base": b_acc, "score": b_acc - m, "drop": m, "drop_se": se,
                       "drop_rel": m / b_acc if b_acc > 0 else None, "margin_drop": mm, "margin_drop_se": mse}
    k = len(tasks)
    drop = sum(p["drop"] for p in per_task.values()) / k
    se = math.sqrt(sum(p["drop_se"] ** 2 for p in per_task.values())) / k
    mdrop = sum(p["margin_drop"] for p in per_task.values()) / k
    mse = math.sqrt(sum(p["margin_drop_se"] ** 2 for p in per_task.values())) / k
    base_avg = sum(p["base"] for p in per_task.values()) / k
    return {
        "drop": drop, "drop_ci95": [drop - 1.96 * se, drop + 1.96 * se],
        "drop_rel": drop / base_avg if base_avg > 0 else None,  # undefined: None, not NaN (valid JSON)
        "margin_drop": mdrop, "margin_drop_ci95": [mdrop - 1.96 * mse, mdrop + 1.96 * mse],
        "tasks": per_task,
    }


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    items: list[PackedItem],
    *,
    variants: tuple[LayerSpec, ...] = (LayerSpec("none"),),
    layers: list[int] | None = None,
    reuse_prefix: bool = True,
    batch_tokens: int = 8192,
    out_dir: str | Path | None = None,
    fingerprint: dict | None = None,
    progress: bool = True,
) -> dict:
    """Score the base model and, for each layer and variant, the model with only that layer changed.

    Args:
        model: a supported causal LM (unconverted, or a hybrid: variants then change one more layer).
        items: the multiple-choice items (see `PackedItem`).
        variants: attention kinds to try per layer (`none`, and e.g. `LayerSpec("swa", 64)`).
        layers: which layers (default: all).
        reuse_prefix: share the base hidden states entering each layer (exact; False = naive recompute).
        batch_tokens: padded tokens per forward batch.
        out_dir: if set, per-layer results are written there as they finish and reused on restart.

    Returns:
        {"base": per-item scores, "layers": [LayerResult dicts], "n_tokens": ...}
    """
    runner = LayerRunner(model)
    n_layers = len(runner.layers)
    layers = list(range(n_layers)) if layers is None else layers
    share = not runner.windowed() and not any(kind(v.kind).windowed for v in variants)
    seqs = pack(items, batch_tokens, share_context=share)
    store = Store(out_dir, fingerprint or {"n_items": len(items), "variants": [s.to_dict() for s in variants]})

    embedded = [runner.embed(x, p, g) for x, p, g in zip(seqs.ids, seqs.pos, seqs.segs)]
    ctx = [e[1] for e in embedded]
    hidden = [e[0] for e in embedded]  # base hidden states entering layer `at`
    at = 0

    def advance(to: int) -> None:  # run the base model on from layer `at` to layer `to`
        nonlocal at
        for b in range(len(hidden)):
            for j in range(at, to):
                hidden[b] = runner.layer(j, hidden[b], ctx[b])
        at = to

    def base_scores(lls: list[float]) -> dict:
        base = {"loglikelihoods": lls, **item_scores(items, lls)}
        store.put("base", base)
        return base

    base = store.get("base")
    if base is None and not reuse_prefix:
        base = base_scores(loglikelihoods(runner, seqs, hidden, ctx, 0))
    todo = [(i, v) for i in layers for v in variants]
    names = {(i, v): f"layer{i:03d}_{v.kind}{v.window or ''}" for i, v in todo}
    raw = {k: store.get(names[k]) for k in todo}  # {"seconds", "loglikelihoods"} per finished variant
    bar = tqdm(total=len(todo), desc="layers", unit="variant", disable=not progress, dynamic_ncols=True)
    bar.update(sum(r is not None for r in raw.values()))
    for i in sorted(set(i for i, _ in todo)):
        pending = [v for v in variants if raw[(i, v)] is None]
        if not pending:
            continue
        if reuse_prefix:
            advance(i)  # the base pass itself: when it reaches the last layer it gives the base scores
        for v in pending:
            t0 = time.perf_counter()
            with variant(runner, i, v):
                if reuse_prefix:
                    lls = loglikelihoods(runner, seqs, hidden, ctx, i)
                else:
                    lls = loglikelihoods(runner, seqs, [e[0] for e in embedded], ctx, 0)
            raw[(i, v)] = {"seconds": time.perf_counter() - t0, "loglikelihoods": lls}
            store.put(names[(i, v)], raw[(i, v)])
            bar.update(1)
            if base is not None:  # known up front when resuming or recomputing naively
                bar.set_postfix(layer=i, drop=f"{compare_scores(items, base, item_scores(items, lls))['drop']:+.3f}")
            else:
                bar.set_postfix(layer=i)
    bar.close()
    if base is None:
        advance(n_layers)
        base = base_scores(read_outputs(runner, seqs, hidden))
    results = {}
    for (i, v), r in raw.items():
        res = LayerResult(i, v.kind if v.kind == "none" else f"{v.kind}{v.window}", r["seconds"],
                          **compare_scores(items, base, item_scores(items, r["loglikelihoods"])))
        results[(i, v)] = asdict(res) | {"loglikelihoods": r["loglikelihoods"]}
    return {"base": base, "layers": [results[k] for k in todo], "n_tokens": seqs.n_tokens}
