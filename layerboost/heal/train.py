"""The healing loop: stage budgets, learning-rate schedule, micro-batches, probes, checkpoints and resume (`heal`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..corpus import PackedRows, TrainingDataError, documents, retrieval_rows
from ..plan import LayerPlan
from ..surgery import CheckpointError, save
from ..teacher_cache import TeacherCache, model_fingerprint
from ..util import write_json
from .checkpoint import (find_checkpoint, full_params, load_checkpoint, load_optimizer, load_params, save_checkpoint,
                         save_snapshot)
from .config import HealConfig, HealConfigError, HealDivergedError, STAGES, STATE_SCHEMA, window_note
from .dist import Dist, all_reduce, barrier, distribute, reshard, setup_dist
from .losses import probe
from .stages import STAGE
from .student import Hybrid, build_hybrid, heal_params


def lr_at(step: int, total: int, peak: float, warmup: float, schedule: str = "cosine") -> float:
    """The learning rate of step `step` (from 0) of `total`: linear warm-up over `warmup` of the steps, then
    `peak` decayed to 10% of it by a cosine or a straight line, or held (constant)."""
    w = math.ceil(warmup * total)
    if step < w:
        return peak * (step + 1) / w
    frac = min(1.0, (step - w) / max(1, total - w))
    decay = {"cosine": 0.5 * (1 + math.cos(math.pi * frac)), "linear": 1 - frac, "constant": 1.0}[schedule]
    return peak * (0.1 + 0.9 * decay)


def _micro_batch_spans(rows: list[torch.Tensor], size: int) -> Iterator[tuple[int, int]]:
    """(i, j): consecutive rows of equal length, at most `size` per batch (only a budget's last row is shorter)."""
    i = 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and j - i < size and len(rows[j]) == len(rows[i]):
            j += 1
        yield i, j
        i = j


@dataclass
class _Run:
    h: Hybrid
    cfg: HealConfig
    dist: Dist
    stream: PackedRows
    work: Path
    precision: str
    log_lines: int = 0
    state: dict = field(default_factory=dict)
    probe_rows: torch.Tensor | None = None
    probe_at: list[int] = field(default_factory=list)  # total tokens (both stages) at which to probe
    offset: int = 0  # tokens of earlier stages
    cache: TeacherCache | None = None
    train_s: float = 0.0  # seconds spent in training steps, all stages and sessions (no probes, no checkpoints)
    snapshots: bool = False  # save the trainable parameters at every probe (heal_state/snapshots/<tokens>.safetensors)
    stop_requested: bool = False  # Ctrl-C was pressed: stop after the running step

    def maybe_probe(self, before: int, after: int) -> None:
        """Probe held-out text at every point of `probe_at` in (before, after] (0 is probed when before == -1)."""
        if self.probe_rows is None:
            return
        for at in self.probe_at:
            if before < at <= after or (before == -1 and at == 0):
                t0 = time.perf_counter()
                # always in fp32: what a probe reads must not depend on the training precision
                rec = {"probe": True, "tokens": after if at else 0, **probe(self.h, self.probe_rows, "fp32")}
                rec["probe_s"] = round(time.perf_counter() - t0, 3)
                rec["train_s"] = round(self.train_s, 3)
                if self.snapshots:
                    rec["snapshot"] = save_snapshot(self.work, self.h, rec["tokens"], self.dist).name
                self.log(rec)

    def log(self, record: dict) -> None:
        if self.dist.main:
            with open(self.work / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self.log_lines += 1


def _train_stage(run: _Run, stage: str, n_tokens: int, resume: dict | None) -> None:
    """One stage to `n_tokens`: its parameters, optimiser and schedule; a step, its log line, its probes and
    checkpoints, until the budget is spent (or Ctrl-C asks to stop)."""
    cfg, h, d = run.cfg, run.h, run.dist
    params, opt, scaler, peak = _stage_optimiser(run, stage)
    step_tokens = cfg.batch_size * cfg.grad_accum * d.world * cfg.seq_len
    total = math.ceil(n_tokens / step_tokens)
    step, done = 0, 0
    if resume is not None:
        load_optimizer(opt, resume["_opt"]["optimizer"])
        if scaler is not None and resume["_opt"]["scaler"] is not None:
            scaler.load_state_dict(resume["_opt"]["scaler"])
        step, done = resume["step"], resume["tokens"]
    bar = None
    if cfg.progress and d.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, initial=done, unit="tok", unit_scale=True, desc=f"heal {stage}", file=sys.stderr,
                   dynamic_ncols=True, smoothing=0.1)
    t_start = time.perf_counter()
    while done < n_tokens:
        t_step = time.perf_counter()
        first_row = run.stream.position
        rows = _step_rows(run, min(step_tokens, n_tokens - done))
        n_global = sum(len(r) for r in rows)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, peak, cfg.warmup, STAGE[stage].schedule(cfg))
        stats, den = _step_gradients(run, stage, rows, first_row, scaler)
        if scaler is not None:
            scaler.unscale_(opt)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        done += n_global
        rec = {"stage": stage, "step": step, "tokens": done, **_step_losses(run, stage, stats, den, rows),
               "lr": opt.param_groups[0]["lr"]}
        run.train_s += time.perf_counter() - t_step
        rec["elapsed_s"] = round(time.perf_counter() - t_start, 3)
        rec["train_s"] = round(run.train_s, 3)
        run.log(rec)
        if math.isnan(rec["loss"]) or (scaler is None and math.isinf(rec["loss"])):  # diverged: stop before a checkpoint or a saved model can hold it
            kept = find_checkpoint(run.work)
            raise HealDivergedError(
                f"the heal diverged: stage {stage} step {step} has loss {rec['loss']} (learning rate "
                f"{rec['lr']:.3g}); no healed model was saved"
                + (f" (the last checkpoint, {kept}, is from before)" if kept is not None else "")
                + f". Start again with a lower {STAGE[stage].lr_flag()}"
                + (" in a new --out" if kept is not None else " (the same --out is fine)"))
        run.maybe_probe(run.offset + done - n_global, run.offset + done)
        if bar is not None:
            bar.update(n_global)
            bar.set_postfix(loss=f"{rec['loss']:.4g}", step=f"{step}/{total}")
        last = done >= n_tokens
        stop = _interrupted(run)
        if last or stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            nxt = STAGES[STAGES.index(stage) + 1] if last else stage
            state = {"schema_version": STATE_SCHEMA, "stage": nxt, "step": 0 if last else step,
                     "tokens": 0 if last else done, "position": run.stream.position, "log_lines": run.log_lines,
                     "train_s": run.train_s}
            save_checkpoint(run.work, h, opt, scaler, state, d)
            barrier(d)
        if stop:  # Ctrl-C: the step that was running finished and is checkpointed
            if bar is not None:
                bar.close()
            raise KeyboardInterrupt
    if bar is not None:
        bar.close()


def _stage_optimiser(run: _Run, stage: str):
    """(the stage's trainable parameters, AdamW over them, a grad scaler for fp16 or None, the peak lr); only
    those parameters require gradients."""
    cfg, h, d = run.cfg, run.h, run.dist
    reshard(d)  # the modules hold their sharded parameters, which the optimiser must hold too
    params = STAGE[stage].params(h, cfg)
    for p in heal_params(h).values():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise HealConfigError(f"stage {stage!r} has nothing to train (a plan with only `none` layers and attn_lora off?)")
    peak = STAGE[stage].peak_lr(cfg)
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=cfg.weight_decay, foreach=False)
    scaler = torch.amp.GradScaler(d.device.type) if run.precision == "fp16" else None
    return params, opt, scaler, peak


def _step_rows(run: _Run, need: int) -> list[torch.Tensor]:
    """The next `need` tokens of the stream as rows (the budget's last row cut short)."""
    rows, have = [], 0
    while have < need:
        try:
            r = next(run.stream)
        except StopIteration:
            raise TrainingDataError(
                f"the training data ran out after {run.stream.position} rows of {run.cfg.seq_len} tokens, before the "
                f"budget of {run.cfg.tokens} tokens: give more data or a smaller --tokens") from None
        rows.append(r[: need - have])
        have += len(rows[-1])
    return rows


def _step_gradients(run: _Run, stage: str, rows: list[torch.Tensor], first_row: int, scaler):
    """This rank's share of a step's rows through the stage's loss, backward into the trainable parameters
    (FSDP2 sums the ranks' gradients); returns (the step's loss statistics summed over ranks, the block stage's
    normalisers or None)."""
    cfg, h, d = run.cfg, run.h, run.dist
    n_global = sum(len(r) for r in rows)
    n_ce = n_global - len(rows)
    scale = scaler.get_scale() if scaler is not None else 1.0
    mine = rows[d.rank::d.world]
    ids = list(range(first_row, first_row + len(rows)))[d.rank::d.world]  # stream rows: the cache's keys
    batches = [(torch.stack(mine[i:j]).to(d.device), ids[i:j]) for i, j in _micro_batch_spans(mine, cfg.batch_size)]
    n_real = len(batches)
    if d.world > 1:  # every rank runs as many micro-batches as the busiest (FSDP2's collectives pair up);
        # the extra ones repeat the step's first row with weight 0
        most = max(len(list(_micro_batch_spans(rows[r::d.world], cfg.batch_size))) for r in range(d.world))
        batches += [(rows[0][None].to(d.device), None)] * (most - n_real)
    stats, den = STAGE[stage].step(h, batches, n_real, n_global, n_ce, cfg, run.precision, d, scale, run.cache)
    all_reduce(stats, d)
    return stats, den


def _step_losses(run: _Run, stage: str, stats: torch.Tensor, den, rows: list[torch.Tensor]) -> dict:
    """A step's log fields from its summed statistics: the loss, and per layer or per term what makes it."""
    return STAGE[stage].losses(run.h, run.cfg, stats, den, sum(len(r) for r in rows), len(rows))


def _interrupted(run: _Run) -> bool:
    """Whether Ctrl-C was pressed (on any rank) since the last step."""
    flag = torch.tensor([float(run.stop_requested)])
    return bool(all_reduce(flag, run.dist).item() > 0)


@contextlib.contextmanager
def _stop_at_step_end(run: _Run):
    """The first Ctrl-C asks the loop to stop after the running step (and its checkpoint); a second one stops at
    once. Python would otherwise raise KeyboardInterrupt wherever it lands, also inside a finaliser that swallows it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask(signum, frame):
        run.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    old = signal.signal(signal.SIGINT, ask)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def merge_and_save(h: Hybrid, out: str | os.PathLike, tokenizer=None) -> nn.Module:
    """Merge the LoRA adapters into the weights and save a plain hybrid that `layerboost.load` reads.

    Returns:
        the merged model (the adapters are gone from `h.peft_model` afterwards).
    """
    merged = h.peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    merged.eval()
    save(merged, out, tokenizer=tokenizer)
    return merged


def _check_cache_space(cache: TeacherCache, h: Hybrid, cfg: HealConfig, budgets: dict) -> None:
    """Raise before training when the targets this run may write do not fit the cache's disk (upper bound:
    fp32 boundaries; files already there are counted as new)."""
    d = h.decoder.config.hidden_size
    n_bound = len({j for i in h.modified for j in (i, i + 1)}) if cfg.teacher_cache_blocks else 0
    need = budgets.get("block", 0) * n_bound * 4 * d
    need += budgets["kd"] * (8 * cfg.kd_topk if cfg.kd_topk else 4 * d)
    free = shutil.disk_usage(cache.dir).free
    if need > 0.9 * free:
        raise HealConfigError(
            f"the teacher cache may need {need / 1e9:.1f} GB and {cache.dir} has {free / 1e9:.1f} GB free: set "
            "teacher_cache_blocks=False (block targets are 4 D bytes per token per layer boundary), a smaller "
            "budget, or another teacher_cache folder")


def _fp32_masters(h: Hybrid) -> None:
    """Trainable parameters in fp32 whatever the frozen weights' dtype (peft keeps LoRA in fp32 already; a kind's
    own parameters are made in the model's dtype)."""
    for p in heal_params(h).values():
        if p.dtype != torch.float32:
            p.data = p.data.float()


def _resolve_precision(p: str, device: torch.device) -> str:
    if p == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if p == "fp16" and device.type != "cuda":
        raise HealConfigError("precision fp16 needs a CUDA device; use fp32 (or bf16) on CPU")
    return p


def _student_state(path, plan: LayerPlan) -> dict:
    """The float32 state dict of the converted model in `path`, whose plan must be `plan`."""
    from ..surgery import load, plan_of

    m = load(path, dtype=torch.float32)
    if plan_of(m) is None or plan_of(m).layers != plan.layers:
        raise HealConfigError(f"the student {path} was converted to another plan than the one given: convert the "
                              "original to this plan, or heal with the student's plan")
    return m.state_dict()


def heal(model_or_name, plan: LayerPlan | str | os.PathLike, *, data: str | os.PathLike, out: str | os.PathLike,
         tokens: int | str | None = None, attn_distill: bool = True, tokenizer=None, resume: bool = False,
         config: HealConfig | None = None, probe_rows: torch.Tensor | None = None,
         probe_at: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0), snapshots: bool = False,
         student: str | os.PathLike | None = None, **options) -> Path:
    """Convert the model to `plan`, heal it by distillation from the original, save the merged hybrid in `out`.

    Args:
        model_or_name: the original model (converted in place) or a name for `load_model`.
        plan: a `LayerPlan` or a plan JSON file.
        data: text file(s)/folder, or `hub:PATH[:CONFIG][:SPLIT]`; evaluation splits are refused.
        out: output folder: the healed hybrid (readable by `layerboost.load`), `heal.json`, and
            `heal_state/` (log.jsonl with one line per step, the latest checkpoint).
        tokens: total budget (`10M`, `1.5M`, `200k`); default: the paper's 10M.
        attn_distill: run stage 1 (attention transfer) before stage 2.
        tokenizer: needed when `model_or_name` is a model object.
        resume: continue from the checkpoint in `out/heal_state`.
        config / **options: a `HealConfig`, or its fields as keyword arguments.
        probe_rows: held-out token rows (B, T): when given, KL(teacher || student), next-token agreement and
            perplexity on them are logged (`"probe": true` lines of log.jsonl) at the fractions `probe_at` of
            the budget, so a healing curve can be drawn. Probes run in fp32 whatever the training precision.
        snapshots: also save the trainable parameters at every probe (`heal_state/snapshots/<tokens>.safetensors`,
            read back by `load_snapshot`), so the model at each point of the curve can be evaluated later.
        student: a folder `convert` wrote from this original and `plan` (run's `converted/`): healing starts from
            its weights (the kinds' own parameters as that conversion drew them), the original staying the teacher.

    Returns:
        `out`, the saved hybrid's folder.

    Raises:
        HealConfigError, TrainingDataError, CheckpointError, FileExistsError (out holds a run and resume is off).
    """
    cfg = _settings(config, tokens, attn_distill, options)
    d = setup_dist(cfg.device, cfg.parallel)
    out = Path(out)
    work = out / "heal_state"
    model_name = model_or_name if isinstance(model_or_name, (str, os.PathLike)) else type(model_or_name).__name__
    model, tokenizer, original = _load_original(model_or_name, tokenizer, cfg, d)
    if not isinstance(plan, LayerPlan):
        plan = LayerPlan.load(plan)
    note = window_note(cfg, plan)
    if note and d.main:
        print(note, file=sys.stderr)
    key = cfg.resume_key(str(data), plan, str(model_name))
    student_state = _student_state(student, plan) if student is not None else None
    if student is not None:
        key["student"] = str(student)
    ck = _checkpoint_to_resume(out, key, resume)

    # The stream is checked (eval splits refused) before any model work.
    def docs():
        return documents(str(data), seed=cfg.seed, data_dir=cfg.data_dir, segment_chars=cfg.segment_chars)

    docs()  # raises now for missing data or evaluation splits, before the model is touched
    stream = PackedRows(docs, tokenizer, cfg.seq_len, cfg.seed, cfg.shuffle_rows,
                        retrieval_rows(tokenizer, cfg.retrieval_share, cfg.seed) if cfg.retrieval_share else None)
    precision = _resolve_precision(cfg.precision, d.device)
    if cfg.weights_dtype == "bfloat16" and precision != "bf16":
        raise HealConfigError(f"weights_dtype bfloat16 computes in bf16, but precision resolves to {precision} here: "
                              "set precision bf16")
    vocab = model.get_output_embeddings().weight.shape[0]
    if cfg.kd_topk > vocab:
        raise HealConfigError(f"kd_topk {cfg.kd_topk} is larger than the vocabulary ({vocab})")
    cache = _teacher_cache(cfg, data, model, tokenizer, precision, d) if cfg.teacher_cache else None
    h = build_hybrid(model, plan, cfg, student_state)
    del student_state
    _fp32_masters(h)
    distribute(h, d)  # FSDP2 units when several processes run (a no-op for one)
    h.peft_model.to(d.device)
    for attn, norm in h.originals.values():
        attn.to(d.device)
        norm.to(d.device)
    h.peft_model.train()  # LoRA dropout; the base model has no dropout of its own at p=0
    state = None
    if ck is not None:
        state = load_checkpoint(ck, h)
        stream.skip(state["position"])
    _start_log(work, key, state, d)
    run = _Run(h, cfg, d, stream, work, precision, log_lines=state["log_lines"] if state else 0,
               probe_rows=probe_rows, probe_at=sorted({round(f * cfg.tokens) for f in probe_at}),
               cache=cache, train_s=state.get("train_s", 0.0) if state else 0.0, snapshots=snapshots)
    t0 = time.perf_counter()
    budgets = dict(cfg.stage_tokens)  # {local stage, "kd"}, in order
    if cfg.local == "attn" and not h.windowed:  # no swa / linear_swa layer: stage 1 has nothing to transfer
        budgets = {"attn": 0, "kd": cfg.tokens}
    if cache is not None:
        _check_cache_space(cache, h, cfg, budgets)
    _run_stages(run, budgets, state)
    seconds = time.perf_counter() - t0
    _save_healed(h, d, out, tokenizer, original if original is not None else model_or_name, plan, cfg)
    if d.main:
        summary = {"schema_version": STATE_SCHEMA, "model": str(model_name), "data": str(data), "plan": plan.to_dict(),
                   "config": cfg.to_dict(), "stage_tokens": budgets, "processes": d.world,
                   "seconds_this_session": round(seconds, 1), "train_s": round(run.train_s, 3),
                   "teacher_cache": cache.summary() if cache is not None else None, "torch": torch.__version__}
        write_json(out / "heal.json", summary)
    barrier(d)
    return out


def _settings(config: HealConfig | None, tokens, attn_distill: bool, options: dict) -> HealConfig:
    """heal()'s settings: `config`, or its fields from the keyword arguments; a budget below one row refused."""
    if config is None:
        config = HealConfig(**({"tokens": tokens} if tokens is not None else {}), attn_distill=attn_distill, **options)
    elif tokens is not None or options:
        config = dataclasses.replace(config, **({"tokens": tokens} if tokens is not None else {}), **options)
    if config.tokens < config.seq_len:  # not one training row: the "healed" model would be the converted one
        raise HealConfigError(f"tokens {config.tokens} is less than one training row (seq_len {config.seq_len} "
                              "tokens): give a larger budget, e.g. 200k")
    return config


def _load_original(model_or_name, tokenizer, cfg: HealConfig, d: Dist):
    """(model, tokenizer, a CPU copy of the model for rank 0's final merge when several processes got a model
    object, else None). Sharded: the whole model is read into CPU memory and only the shards go to the device."""
    from ..models import load_model

    load_to = torch.device("cpu") if d.world > 1 and d.mode == "shard" else d.device
    weights = getattr(torch, cfg.weights_dtype)
    if isinstance(model_or_name, (str, os.PathLike)):
        model, tokenizer = load_model(str(model_or_name), dtype=weights, device=load_to)
        return model, tokenizer, None
    if tokenizer is None:
        raise HealConfigError("pass tokenizer= when heal gets a model object")
    model = model_or_name.to(load_to, weights)
    return model, tokenizer, (copy.deepcopy(model).cpu() if d.world > 1 and d.main else None)


def _checkpoint_to_resume(out: Path, key: dict, resume: bool) -> Path | None:
    """The checkpoint to continue (None: start afresh); a run in `out` without `resume`, or made with other
    settings, is refused."""
    work = out / "heal_state"
    ck = find_checkpoint(work)
    if ck is not None and not resume:
        raise FileExistsError(f"{out} already holds a heal run ({ck}); pass --resume to continue it or choose another --out")
    if resume and ck is not None:
        old = json.loads((work / "config.json").read_text()) if (work / "config.json").is_file() else None
        old = HealConfig.upgrade_key(old)
        if old != json.loads(json.dumps(key)):
            diff = sorted(k for k in key["config"] if old and old.get("config", {}).get(k) != key["config"][k])
            raise CheckpointError(f"{work} was made with other settings ({diff or 'data/plan/model'} differ): "
                                  "resume with the same settings or start a new --out")
    return ck if resume else None


def _teacher_cache(cfg: HealConfig, data, model, tokenizer, precision: str, d: Dist) -> TeacherCache:
    """The shared teacher cache, keyed by everything the teacher's targets depend on (the original weights,
    before surgery)."""
    src = Path(str(data))
    return TeacherCache(cfg.teacher_cache, {
        "architecture": type(model).__name__, "weights": model_fingerprint(model),
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "data": str(src.resolve()) if src.exists() else str(data), "seq_len": cfg.seq_len, "seed": cfg.seed,
        "shuffle_rows": cfg.shuffle_rows, "segment_chars": cfg.segment_chars, "precision": precision,
        **({"retrieval_share": cfg.retrieval_share} if cfg.retrieval_share else {}),
        "device": d.device.type, "attn_implementation": model.config._attn_implementation})


def _start_log(work: Path, key: dict, state: dict | None, d: Dist) -> None:
    """Rank 0 records the resume key and cuts the log back to the checkpoint's lines."""
    if d.main:
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(json.dumps(key, indent=1))
        log = work / "log.jsonl"
        keep = state["log_lines"] if state else 0
        lines = log.read_text().splitlines(keepends=True)[:keep] if log.is_file() else []
        log.write_text("".join(lines))
    barrier(d)


def _run_stages(run: _Run, budgets: dict[str, int], state: dict | None) -> None:
    """Each stage with a budget in turn, from the checkpoint's stage and step; Ctrl-C stops after a step."""
    stage = state["stage"] if state else next((s for s, n in budgets.items() if n > 0), "kd")
    if state is None:
        run.maybe_probe(-1, 0)
    offset = 0
    with _stop_at_step_end(run):
        for s, n in budgets.items():
            if STAGES.index(stage) <= STAGES.index(s):
                run.offset = offset
                if n > 0:
                    _train_stage(run, s, n, state if state and state["stage"] == s and state["step"] > 0 else None)
                stage = STAGES[STAGES.index(s) + 1]
            offset += n


def _save_healed(h: Hybrid, d: Dist, out: Path, tokenizer, original, plan: LayerPlan, cfg: HealConfig) -> None:
    """The merged hybrid in `out`. Several processes: the shards gathered, merged by rank 0 into an unsharded
    copy of the original (`original`: that copy, or the model's name to load it from)."""
    if d.world == 1:
        merge_and_save(h, out, tokenizer)
        return
    params = full_params(h, d)
    if not d.main:
        return
    if isinstance(original, (str, os.PathLike)):
        from ..models import load_model

        original, _ = load_model(str(original), dtype=getattr(torch, cfg.weights_dtype), device="cpu")
    h0 = build_hybrid(original, plan, cfg)
    _fp32_masters(h0)
    load_params(params, h0, "the ranks' gathered parameters")
    merge_and_save(h0, out, tokenizer)
