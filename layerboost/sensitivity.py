"""Layer sensitivity (the paper's Eq. 3): the benchmark drop when one layer's attention is removed.

For each decoder layer i, the model with only layer i changed (`none`, or `swa` with a window) is
scored on the same multiple-choice items as the unmodified model, with the evaluator's requests
and scoring rules. sensitivity_i = mean over tasks of (base score - variant score).

Exact prefix reuse: layers < i are the same in the base and in variant i, so the hidden states
entering layer i are computed once, by running the base model one layer further after each
variant; that same pass, run to the end, gives the base scores. Variant i then runs only layers
>= i (plus the final norm and the LM head, evaluated at the continuation positions only). Cost:
L + L(L+1)/2 layer passes instead of L(L+1) (~0.53x for L=30), plus one LM-head read per variant.
Memory: the hidden states entering the current layer are kept for every scored sequence,
tokens x hidden_size x 4 bytes (fp32), e.g. ~0.5 GB for 1000 items of SmolLM2-135M.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .attention import attention_kind, build_attention
from .corpus import CALIBRATION_BYTES
from .evaluate import common_prefix_len
from .kinds import kind
from .plan import RANKINGS, LayerSpec
from .runner import DecoderRunner
from .surgery import decoder_parts
from .util import write_json

SCHEMA_VERSION = 1


class AnalysisError(RuntimeError):
    """A sensitivity file or analysis folder that cannot be used as asked; the message says what to do."""


def load_sensitivity(path) -> dict:
    """The result `analyze` wrote to sensitivity.json.

    Raises:
        AnalysisError: the file is missing, unreadable, or not a sensitivity result.
    """
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"sensitivity file {path} does not exist: run `layerboost analyze --out DIR` and pass "
                            "DIR/sensitivity.json")
    try:
        res = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnalysisError(f"{path} is not readable JSON ({e}): pass the sensitivity.json `layerboost analyze` wrote") from e
    if not isinstance(res, dict) or res.get("schema_version") != SCHEMA_VERSION or not isinstance(res.get("sensitivity"), list):
        raise AnalysisError(f"{path} is not a sensitivity result (no 'sensitivity' list, schema_version {SCHEMA_VERSION}): "
                            "pass the sensitivity.json `layerboost analyze` wrote")
    return res


def check_analysis_dir(out, settings: dict) -> None:
    """Refuse an `out` folder holding an analysis made with other settings, so it is never overwritten;
    with the same settings the analysis resumes there. Only the keys of `settings` the folder recorded
    (in sensitivity.json or layers/fingerprint.json) are compared.

    Raises:
        AnalysisError: naming the settings that differ.
    """
    for f in (Path(out) / "sensitivity.json", Path(out) / "layers" / "fingerprint.json"):
        if not f.is_file():
            continue
        try:
            old = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if not isinstance(old, dict) or f.name == "sensitivity.json" and "sensitivity" not in old:
            raise AnalysisError(f"{f} exists but is not an analysis result: refusing to overwrite it; choose another --out")
        diff = [k for k, v in settings.items() if k in old and old[k] != json.loads(json.dumps(v))]
        if diff:
            raise AnalysisError(f"{out} holds another analysis ({', '.join(f'{k} {old[k]!r}' for k in diff)}; now "
                                f"{', '.join(f'{settings[k]!r}' for k in diff)}): refusing to overwrite it; "
                                "choose another --out, or repeat its settings to resume it")


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


# ---- a batched, layer-by-layer forward ------------------------------------------------------------


@dataclass
class _Seqs:
    """Rows to score, right-padded and batched by length, and where each request reads its log-probs."""

    ids: list[torch.Tensor]  # per batch: (B, T) token ids
    pos: list[torch.Tensor]  # per batch: (B, T) position ids
    segs: list[torch.Tensor | None]  # per batch: (B, T) segment ids (0 = shared by all), None = plain causal
    reads: list[tuple[int, int, list[int], list[int]]]  # per request: (batch, row, positions, target tokens)
    n_tokens: int


def _pack(items: list[PackedItem], batch_tokens: int, share_context: bool = True) -> _Seqs:
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
    return _Seqs(ids, pos, segs, reads, sum(len(r[0]) for r in rows))


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


def _loglikelihoods(runner: LayerRunner, seqs: _Seqs, hidden: list[torch.Tensor], ctx: list, start: int) -> list[float]:
    """Per-request loglikelihood, running layers `start`.. on the given hidden states."""
    per_batch_out = []
    for b, h in enumerate(hidden):
        for i in range(start, len(runner.layers)):
            h = runner.layer(i, h, ctx[b])
        per_batch_out.append(h)
    return _read(runner, seqs, per_batch_out)


def _read(runner: LayerRunner, seqs: _Seqs, outs: list[torch.Tensor]) -> list[float]:
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


# ---- metrics ------------------------------------------------------------------------------------


PLAN_SCORES = ("drop", "margin", "kl", "cosine")
PROXY_SCORES = ("kl", "cosine")  # measured on calibration text, not on labelled items


def plan_scores(result: dict, score: str, ranking: str = "auto", thresholds: bool = False) -> list[float]:
    """Per-layer scores a plan is chosen from (higher = more sensitive, keeps softmax):

    `drop`: average accuracy drop when the layer's attention is removed (the paper's Eq. 3);
    `margin`: drop of the mean gold-answer margin (continuous; fewer ties on few items);
    `kl`: KL(base || variant) of next-token distributions on calibration text (proxy);
    `cosine`: 1 - cos(x, x + attn(x)) on calibration text (LLM-Drop's importance).

    `ranking`: "one-shot" scores each layer removed alone; "iterative" ranks by the analysis' iterative
    history of the same signal (`iterative_scores`; the comparison's best signal, docs/experiments/selection-signals.md);
    "auto" is iterative where the result holds that history, else one-shot (`ranking_used` names it).
    `thresholds`: the policy compares scores with thresholds (`PlanPolicy.thresholds`), so one-shot.
    """
    if ranking_used(result, score, ranking, thresholds) == "iterative":
        return iterative_scores(result["iterative"]["history"], result["n_layers"])
    if score in PROXY_SCORES:
        if score not in result.get("proxies", {}):
            raise AnalysisError(f"score {score!r} needs the proxies: run analyze without --no-proxies, or use --score drop")
        return result["proxies"][score]
    key = "sensitivity_margin" if score == "margin" else "sensitivity"
    if key not in result:
        raise AnalysisError(f"this sensitivity result has no {key!r} (written by an older layerboost?): run analyze again")
    return result[key]


def ranking_used(result: dict, score: str, ranking: str = "auto", thresholds: bool = False) -> str:
    """"iterative" or "one-shot": the ranking `plan_scores` uses for these arguments. A threshold policy
    ranks one-shot (its thresholds are in one-shot units); auto ranks iteratively where `result` holds an
    iterative history of `score`.

    Raises:
        AnalysisError: unknown score or ranking, or "iterative" asked of a threshold policy or of a result
            without that history.
    """
    if score not in PLAN_SCORES:
        raise AnalysisError(f"score must be one of {', '.join(PLAN_SCORES)}, not {score!r}")
    if ranking not in RANKINGS:
        raise AnalysisError(f"ranking must be one of {', '.join(RANKINGS)}, not {ranking!r}")
    if thresholds:
        if ranking == "iterative":
            raise AnalysisError("ranking 'iterative' cannot serve thresholds (softmax_above / none_below), which are "
                                "in one-shot score units: rank one-shot or auto, or choose the plan by counts")
        return "one-shot"
    it = result.get("iterative") or {}
    has = it.get("score") == score and bool(it.get("history"))
    if ranking == "iterative" and not has:
        found = (f"its iterative history ranks by {it.get('score', 'an older analysis signal')!r}" if it.get("history")
                 else "it has no iterative history")
        raise AnalysisError(f"ranking 'iterative' by {score!r}: {found}; run analyze --iterative K --score {score}, "
                            "or rank one-shot")
    return "iterative" if has and ranking != "one-shot" else "one-shot"


def auto_measures(policy) -> bool:
    """Whether the iterative mode's `auto` measures any step (as many as the plan's attention-free layers):
    not where the plan will not use the history (ranking "one-shot"; threshold policies, whose thresholds
    are in one-shot units), nor for the item signals (margin, drop: each step would repeat the whole item
    pass; ask with a count)."""
    return policy.ranking != "one-shot" and not policy.thresholds and policy.score in PROXY_SCORES


def iterative_steps_for(policy, config=None, iterative="auto"):
    """The `iterative_steps` argument of `analyze`: a count as given, or for "auto" a function of the one-shot
    result: the attention-free layers `policy` places from the one-shot scores where `auto_measures`, else 0."""
    from .plan import make_plan

    if iterative != "auto":
        return iterative

    def steps(result: dict) -> int:
        if not auto_measures(policy):
            return 0
        return make_plan(policy, plan_scores(result, policy.score, "one-shot"), config).counts()["none"]

    return steps


def iterative_problems(policy, iterative, n_layers: int | None = None, n_none: int | None = None) -> list[str]:
    """What the iterative mode `iterative` ("auto" or a count) and `policy.ranking` cannot do, found before
    any work: more steps than layers, or an iterative ranking that will get no history. `n_layers` and
    `n_none` (the plan's attention-free count, from `make_plan` on any scores) are checked when known."""
    out = []
    if iterative != "auto" and n_layers is not None and iterative > n_layers:
        out.append(f"{iterative} iterative steps, but the model has {n_layers} layers: ask for at most {n_layers}")
    if policy.ranking != "iterative" or policy.thresholds:
        return out  # a threshold policy with ranking iterative: its own check (PlanPolicy, ranking_used)
    if iterative == 0 or (iterative == "auto" and (not auto_measures(policy) or n_none == 0)):
        out.append("ranking 'iterative' needs the iterative history, and the iterative mode measures no step here "
                   "(auto: as many as the plan's attention-free layers, for the kl and cosine scores only): "
                   "ask for a count of steps > 0, or rank one-shot or auto")
    return out


def iterative_scores(history: list[dict], n_layers: int) -> list[float]:
    """Plan scores from an iterative removal of K layers: the layers still there keep the last step's
    scores (each measured with the first K - 1 removed layers removed, the step that chose the K-th); the
    removed layers rank below all of them, in removal order (the first removed is the least sensitive).
    A removed layer's value is min(0, lowest remaining score) - (steps left when it was removed): a rank,
    not a measurement."""
    removed = [h["removed"] for h in history]
    last = {int(k): v for k, v in history[-1]["drops"].items()} if history else {}
    remaining = [last[i] for i in range(n_layers) if i not in removed]
    floor = min([0.0, *remaining])
    out = [last.get(i, 0.0) for i in range(n_layers)]
    for k, i in enumerate(removed):
        out[i] = floor - (len(removed) - k)
    return out


def item_scores(items: list[PackedItem], lls: list[float]) -> dict[str, list[float]]:
    """Per item: correct (0/1) under the task's column, and the gold margin (gold score - best other),
    with the evaluator's own prediction rule."""
    from .evaluate import ItemScore, item_predictions

    correct, margin, k = [], [], 0
    for it in items:
        n = len(it.continuations)
        p = item_predictions(it.source, ItemScore(tuple(lls[k : k + n]), ()))
        k += n
        key = "_norm" if it.metric == "acc_norm" else ""
        correct.append(float(p["pred" + key] == it.gold))
        margin.append(p["margin" + key])
    return {"correct": correct, "margin": margin}


def _mean_se(x: list[float]) -> tuple[float, float]:
    """Mean and its standard error (lm-eval's, as the evaluator reports it; 0 for one item)."""
    from .evaluate.metrics import mean_stderr

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
        m, se = _mean_se(d_acc)
        mm, mse = _mean_se(d_mar)
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


# ---- the analysis -------------------------------------------------------------------------------


@dataclass
class LayerResult:
    layer: int
    variant: str
    seconds: float
    drop: float
    drop_ci95: list[float]
    drop_rel: float | None
    margin_drop: float
    margin_drop_ci95: list[float]
    tasks: dict = field(default_factory=dict)


class Store:
    """Per-layer results on disk, written as each layer finishes (atomic), for resuming."""

    def __init__(self, out_dir: Path | None, fingerprint: dict):
        self.dir = Path(out_dir) / "layers" if out_dir else None
        self.fingerprint = fingerprint
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
            fp = self.dir / "fingerprint.json"
            if fp.is_file() and json.loads(fp.read_text()) != fingerprint:
                raise AnalysisError(
                    f"{self.dir} holds results of a different analysis (model, items or variants changed): "
                    "use another --out folder or delete it"
                )
            write_json(fp, fingerprint)

    def get(self, name: str):
        if self.dir and (self.dir / f"{name}.json").is_file():
            return json.loads((self.dir / f"{name}.json").read_text())
        return None

    def put(self, name: str, data) -> None:
        if self.dir:
            write_json(self.dir / f"{name}.json", data)


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
    seqs = _pack(items, batch_tokens, share_context=share)
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
        base = base_scores(_loglikelihoods(runner, seqs, hidden, ctx, 0))
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
                    lls = _loglikelihoods(runner, seqs, hidden, ctx, i)
                else:
                    lls = _loglikelihoods(runner, seqs, [e[0] for e in embedded], ctx, 0)
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
        base = base_scores(_read(runner, seqs, hidden))
    results = {}
    for (i, v), r in raw.items():
        res = LayerResult(i, v.kind if v.kind == "none" else f"{v.kind}{v.window}", r["seconds"],
                          **compare_scores(items, base, item_scores(items, r["loglikelihoods"])))
        results[(i, v)] = asdict(res) | {"loglikelihoods": r["loglikelihoods"]}
    return {"base": base, "layers": [results[k] for k in todo], "n_tokens": seqs.n_tokens}


# ---- cheap proxies --------------------------------------------------------------------------------


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

    base_lp = reference if reference is not None else base_logprobs(runner, calib, batch)
    hidden, at, out = [e[0] for e in emb], 0, {}
    for i in tqdm(sorted(layers), desc="KL proxy", disable=not progress, dynamic_ncols=True):
        for b in range(len(hidden)):
            for j in range(at, i):
                hidden[b] = runner.layer(j, hidden[b], ctx[b])
        at = i
        total, count = 0.0, 0
        with variant(runner, i, LayerSpec("none")):
            for b, h in enumerate(hidden):
                lp = logp(finish(h, b, i))
                total += (base_lp[b].exp() * (base_lp[b] - lp)).sum().item()
                count += lp.shape[0] * lp.shape[1]
        out[i] = total / count
    return [out[i] for i in layers]


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


# ---- interactions: iterative removal ---------------------------------------------------------------


@torch.no_grad()
def iterative_removal(model: nn.Module, items: list[PackedItem], steps: int, *, batch_tokens: int = 8192,
                      score: str = "margin_drop", out_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Remove the least sensitive layer's attention, re-measure the remaining layers on the modified
    model, and repeat `steps` times. Each step is saved (and resumed) under out_dir/iterative/step_k.
    `score` is the per-layer key ranked: "margin_drop" (default: on few items the accuracy "drop" ties
    most layers at 0 and once removed layer 0, the costliest layer by KL, first) or "drop".

    Returns:
        one dict per step: the layer removed, its drop when removed, and all remaining layers' drops.
    """
    def measure(step, remaining, removed):
        sub = Path(out_dir) / "iterative" / f"step_{step:02d}" if out_dir else None
        res = layer_sensitivity(model, items, layers=remaining, batch_tokens=batch_tokens, out_dir=sub,
                                fingerprint={"n_items": len(items), "removed": removed}, progress=progress)
        return {r["layer"]: r[score] for r in res["layers"]}

    return _remove_greedily(LayerRunner(model), steps, measure)


def _remove_greedily(runner: LayerRunner, steps: int, measure) -> list[dict]:
    """The loop of both iterative signals: score every remaining layer (`measure(step, remaining, removed)`,
    with the layers removed so far removed), remove the lowest (ties: the lower index), repeat."""
    if steps > len(runner.layers):
        raise AnalysisError(f"{steps} iterative steps, but the model has {len(runner.layers)} layers: ask for at most "
                            f"{len(runner.layers)}")
    removed: list[int] = []
    history = []
    with contextlib.ExitStack() as stack:
        for step in range(steps):
            remaining = [i for i in range(len(runner.layers)) if i not in removed]
            scores = measure(step, remaining, list(removed))
            pick = min(remaining, key=lambda i: (scores[i], i))
            history.append({"step": step, "removed": pick, "drop": scores[pick], "drops": scores,
                            "removed_before": list(removed)})
            removed.append(pick)
            stack.enter_context(variant(runner, pick, LayerSpec("none")))
    return history


@torch.no_grad()
def iterative_proxy(model: nn.Module, calib: torch.Tensor, steps: int, *, score: str, batch: int = 4,
                    out_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Iterative removal ranked by a proxy on calibration text: remove the layer that scores lowest, keep
    it removed, re-measure every remaining layer, repeat `steps` times.

    `kl`: KL(original || model with the candidate removed too), always against the original model, so
    step k ranks the cost of the k+1 removals together. `cosine`: 1 - cos(x, x + attn(x)) of each
    remaining layer in the model as it is now (LLM-Drop's iterative dropping). Each step is saved (and
    resumed) as out_dir/iterative_<score>/step_k.json.

    Returns:
        one dict per step: the layer removed, its score, and every remaining layer's score (as `iterative_removal`).
    """
    if score not in PROXY_SCORES:
        raise AnalysisError(f"iterative_proxy: score must be kl or cosine, not {score!r}")
    runner = LayerRunner(model)
    reference = base_logprobs(runner, calib, batch) if score == "kl" else None

    def proxy(remaining):
        if score == "kl":
            return kl_proxy(model, calib, layers=remaining, batch=batch, progress=progress, reference=reference)
        cos = cosine_proxy(model, calib, batch=batch)
        return [cos[i] for i in remaining]

    def measure(step, remaining, removed):
        f = Path(out_dir) / f"iterative_{score}" / f"step_{step:02d}.json" if out_dir else None
        saved = json.loads(f.read_text()) if f is not None and f.is_file() else None
        if saved is not None and saved["removed_before"] == removed and saved["n_calib"] == list(calib.shape):
            return {int(k): v for k, v in saved["drops"].items()}
        scores = dict(zip(remaining, proxy(remaining)))
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            write_json(f, {"removed_before": removed, "drops": {str(k): v for k, v in scores.items()},
                           "n_calib": list(calib.shape)})
        return scores

    return _remove_greedily(runner, steps, measure)


def remove_iteratively(model: nn.Module, score: str, steps: int, *, items: list[PackedItem] | None = None,
                       calib: torch.Tensor | None = None, out_dir: str | Path | None = None, batch_tokens: int = 8192,
                       progress: bool = True) -> list[dict]:
    """Iterative removal by the signal `score` (any of PLAN_SCORES): the KL or cosine proxy on `calib`, or the
    gold-margin / accuracy drop on `items`."""
    if score in PROXY_SCORES:
        return iterative_proxy(model, calib, steps, score=score, out_dir=out_dir, progress=progress)
    key = {"drop": "drop", "margin": "margin_drop"}[score]
    return iterative_removal(model, items, steps, batch_tokens=batch_tokens, score=key, out_dir=out_dir, progress=progress)


def ranking_disagreements(one_shot: dict[int, float], history: list[dict]) -> list[dict]:
    """Steps where iterative removal picks another layer than the one-shot ranking would (the least
    sensitive one-shot layer among those not yet removed)."""
    out = []
    for h in history:
        left = [i for i in one_shot if i not in h["removed_before"]]
        expected = min(left, key=lambda i: (one_shot[i], i))
        if expected != h["removed"]:
            out.append({"step": h["step"], "one_shot": expected, "iterative": h["removed"],
                        "one_shot_drop": one_shot[expected], "iterative_drop": h["drop"]})
    return out


# ---- the `analyze` stage ----------------------------------------------------------------------------


def calibration_tokens(tokenizer, data_dir=None, n_seqs: int = 8, seq_len: int = 256) -> torch.Tensor:
    """(n_seqs, seq_len) token ids of held-out prose (corpus/wikipedia_paragraphs.txt, never an eval split).

    Raises:
        FileNotFoundError: the corpus file is missing (names the path and how to point at it).
    """
    from .data import resolve_data_dir

    root = resolve_data_dir(data_dir)
    path = (root / "corpus" / "wikipedia_paragraphs.txt") if root else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"calibration text {path or 'corpus/wikipedia_paragraphs.txt'} not found: pass --data-dir or set "
            "LAYERBOOST_DATA_DIR to a folder holding corpus/wikipedia_paragraphs.txt"
        )
    from .corpus import row_prefix

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


def _check_steps(steps):
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise AnalysisError(f"iterative_steps must be a count >= 0 or a function of the one-shot result (for the "
                            f"CLI's auto: iterative_steps_for(policy, config)), not {steps!r}")
    return steps


def _proxies(model, calib: torch.Tensor, drops: list[float], margin: list[float], progress: bool) -> dict:
    """The KL and cosine proxies of every layer on the calibration rows, and their rank agreement with the drop."""
    kl = kl_proxy(model, calib, progress=progress)
    cos = cosine_proxy(model, calib)
    return {"calibration": {"sequences": calib.shape[0], "length": calib.shape[1],
                            "file": "corpus/wikipedia_paragraphs.txt"},
            "kl": kl, "cosine": cos,
            "spearman_vs_drop": {"kl": spearman(kl, drops), "cosine": spearman(cos, drops),
                                 "margin": spearman(margin, drops)}}


def analyze(
    model,
    tokenizer,
    tasks: list[str],
    *,
    out_dir: str | Path,
    limit: int | float | None = 200,
    seed: int = 0,
    data_dir=None,
    swa_window: int | None = None,
    proxies: bool = True,
    calib_seqs: int = 8,
    calib_len: int = 256,
    iterative_steps=0,
    iterative_score: str = "kl",
    batch_tokens: int = 8192,
    reuse_prefix: bool = True,
    progress: bool = True,
    selection_size: int = 100,
    selection_seed: int = 0,
) -> dict:
    """Full sensitivity analysis; writes `out_dir/sensitivity.json` (resumable per layer) and returns it.

    Items come from the selection partition of each split (`evaluate.Partition`: `selection_size`
    documents per task, seeded by `selection_seed`), which evaluation of a comparison never scores;
    `limit` subsamples within it. The output records the partition and the document ids used.

    `iterative_steps`: removals of the iterative mode by `iterative_score` (0: none), or a function of the
    one-shot result that returns them (the CLI and `run` pass the plan's attention-free layer count).
    """
    from .evaluate import Partition, prepare_tasks

    if not callable(iterative_steps):
        _check_steps(iterative_steps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    part = Partition("selection", selection_size, selection_seed)
    prepared = prepare_tasks(tokenizer, tasks, data_dir=data_dir, limit=limit, seed=seed, partition=part)
    items = items_from_tasks(prepared)
    variants = (LayerSpec("none"),) + ((LayerSpec("swa", swa_window),) if swa_window else ())
    fingerprint = {"model": getattr(model.config, "_name_or_path", ""), "tasks": tasks, "limit": limit, "seed": seed,
                   "n_items": len(items), "variants": [v.to_dict() for v in variants], "partition": part.to_dict()}
    check_analysis_dir(out, fingerprint)  # another analysis in `out` is never overwritten
    res = layer_sensitivity(model, items, variants=variants, batch_tokens=batch_tokens, out_dir=out,
                            fingerprint=fingerprint, reuse_prefix=reuse_prefix, progress=progress)
    n_layers = len(decoder_parts(model)[1])
    rows = [r for r in res["layers"] if r["variant"] == "none"]
    drops = [r["drop"] for r in rows]
    result = {
        "schema_version": SCHEMA_VERSION,
        "model": fingerprint["model"],
        "n_layers": n_layers,
        "tasks": tasks,
        "limit": limit,
        "seed": seed,
        "items_per_task": {pt.task.name: len(pt.requests) for pt in prepared},
        "partition": part.to_dict(),
        "doc_ids": {pt.task.name: pt.doc_ids for pt in prepared},
        "data_sources": {pt.task.name: pt.source for pt in prepared},
        "columns": {pt.task.name: pt.task.column for pt in prepared},
        "n_tokens": res["n_tokens"],
        "base": {t: res["layers"][0]["tasks"][t]["base"] for t in res["layers"][0]["tasks"]},
        "layers": [{k: v for k, v in r.items() if k != "loglikelihoods"} for r in res["layers"]],
        "sensitivity": drops,
        "sensitivity_margin": [r["margin_drop"] for r in rows],
        "timing": {"layers_seconds": sum(r["seconds"] for r in res["layers"])},
    }
    if proxies:
        t1 = time.perf_counter()
        result["proxies"] = _proxies(model, calibration_tokens(tokenizer, data_dir, calib_seqs, calib_len), drops,
                                     result["sensitivity_margin"], progress)
        result["timing"]["proxies_seconds"] = time.perf_counter() - t1
    if callable(iterative_steps):
        iterative_steps = _check_steps(iterative_steps(result))
    if iterative_steps:
        t1 = time.perf_counter()
        proxy = iterative_score in PROXY_SCORES
        calib = calibration_tokens(tokenizer, data_dir, calib_seqs, calib_len) if proxy else None
        hist = remove_iteratively(model, iterative_score, iterative_steps, items=items, calib=calib, out_dir=out,
                                  batch_tokens=batch_tokens, progress=progress)
        proxies = result.get("proxies", {})
        one_shot = {"drop": drops, "margin": result["sensitivity_margin"], "kl": proxies.get("kl"),
                    "cosine": proxies.get("cosine")}[iterative_score]
        result["iterative"] = {
            "history": [{k: (v if k != "drops" else {str(a): b for a, b in v.items()}) for k, v in h.items()}
                        for h in hist],
            "score": iterative_score,
            "disagreements": ranking_disagreements(dict(enumerate(one_shot)), hist) if one_shot is not None else [],
        }
        result["timing"]["iterative_seconds"] = time.perf_counter() - t1
    result["timing"]["total_seconds"] = time.perf_counter() - t0
    write_json(out / "sensitivity.json", result)
    return result


def sensitivity_table(result: dict, plan=None) -> str:
    """One row per layer: drop (points) with its 95% interval, margin drop, proxies, planned kind."""
    p = result.get("proxies", {})
    rows = [f"{'layer':>5} {'drop(pts)':>10} {'95% CI':>17} {'rel%':>7} {'margin':>8}"
            + (f" {'KL':>8} {'1-cos':>7}" if p else "") + ("  plan" if plan else "")]
    none_rows = [r for r in result["layers"] if r["variant"] == "none"]
    for r in none_rows:
        i = r["layer"]
        lo, hi = r["drop_ci95"]
        rel = f"{100 * r['drop_rel']:>7.1f}" if r["drop_rel"] is not None else f"{'n/a':>7}"
        row = (f"{i:>5} {100 * r['drop']:>10.2f} {f'[{100 * lo:.1f}, {100 * hi:.1f}]':>17} "
               f"{rel} {r['margin_drop']:>8.3f}")
        if p:
            row += f" {p['kl'][i]:>8.4f} {p['cosine'][i]:>7.4f}"
        if plan:
            row += f"  {plan[i].kind}"
        rows.append(row)
    if p:
        s = p["spearman_vs_drop"]
        rows.append(f"Spearman vs drop: KL {s['kl']:.2f}, 1-cos {s['cosine']:.2f}, margin {s['margin']:.2f}")
    return "\n".join(rows)
