"""`layerboost compare`: the paper's comparison table, reproduced at equal budgets on disjoint items.

Rows (all hybrids share the plan counts and the healing token budget):

    base             the original model
    converted        the sensitivity plan, unhealed
    layerboost       the sensitivity plan, healed: attention transfer, then LoRA logit distillation
    no_attn_distill  the same plan, healed by logit distillation alone ("w/o Attn. Distill.")
    random           "w/o Layer. Select.": the same counts placed at random; every seed is measured
                     unhealed on held-out text (rows random_s<seed>) and the seed with the median
                     unhealed KL is healed
    pattern          "w/o Layer. Select.": the counts interleaved (softmax, swa, none, ...), healed
    lolcats          a linearization baseline in the LoLCATs manner: every layer linear_swa
                     (window 64, feature dim 64, a learned factor on the window term, the linear term
                     unscaled), healed; lolcats_gate: the same with layerboost's gated linear term
    llm_drop         attention dropping in the LLM-Drop manner: the `none` count chosen by the cosine
                     proxy, every other layer softmax, healed
    signal_<s>       row 3 with its layers chosen by another signal s (drop, margin, kl, cosine,
                     iterative), healed; skipped when s gives row 3's plan
    <row>_seed<N>    a healed row again with healing seed N (LoRA init and training-text order):
                     continuous measures only, so the table shows how much healing itself varies

Selection (the sensitivity analysis) reads only the selection partition of each split; every row is
scored on the evaluation partition (every other item; MMLU: a stated number per subject), so no
layer is chosen on a reported item. Each row gets accuracy with standard errors and per-item
correctness and gold margins, WikiText-2 word perplexity, KL(base || row), next-token agreement and
perplexity on held-out text that neither healing nor calibration reads, and decode speed and KV
bytes measured side by side with the base. Rows are compared with paired tests over the same items
(McNemar, paired bootstrap). Everything is written under `out/` and resumes row by row (and inside a
row: healing and each task) after a kill.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..evaluate.tasks import PAPER_TASKS
from .run import ConfigError, config_from_dict, load_config, shipped_configs
from ..util import UsageError, dtype_name, parse_dtype, resolve_device, write_json

ROWS = ("base", "converted", "layerboost", "no_attn_distill", "random", "pattern", "lolcats", "lolcats_gate",
        "llm_drop", "signal_margin", "signal_drop", "signal_cosine")
SIGNALS = ("drop", "margin", "kl", "cosine", "iterative")
CURVE_ROWS = ("layerboost", "no_attn_distill")  # rows whose healing is probed on held-out text
HEALED = ("layerboost", "no_attn_distill", "pattern", "lolcats", "lolcats_gate", "llm_drop")  # rows `_seed<N>` may repeat


def split_seed(row: str) -> tuple[str, int | None]:
    """"layerboost_seed1" -> ("layerboost", 1); any other row name -> (name, None)."""
    m = re.fullmatch(r"(.+)_seed(\d+)", row)
    return (m.group(1), int(m.group(2))) if m else (row, None)


@dataclass
class CompareHeal:
    tokens: str | int = "200k"
    data: str = "corpus"  # relative to the data dir, or a path
    probe_at: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 1.0])
    probe_tokens: int = 4096  # held-out tokens each healing-curve point reads
    options: dict = field(default_factory=dict)  # layerboost.heal.HealConfig fields, same for every row


# eval settings read only by the multiple-choice pass (phase 2): they may change until a row is scored
ACCURACY_ONLY = ("multiple_choice", "limit", "mmlu_per_subject", "seed", "batch_size", "dtype")


@dataclass
class CompareEval:
    multiple_choice: bool = True  # false: rows get only the continuous measures (a quick first look)
    limit: int | None = None  # items per task from the evaluation partition; None = all of it
    mmlu_per_subject: int | None = 20  # MMLU: this many items per subject instead of `limit`
    seed: int = 0
    batch_size: int = 32
    wikitext_docs: int | None = None  # WikiText-2 test documents; None = all
    wikitext_max_length: int | None = None  # rolling window; None = the model's context (lm-eval's)
    heldout_tokens: int = 16384
    heldout_seq_len: int = 512
    dtype: str | None = None  # weights of the multiple-choice pass only; None = the config's dtype


@dataclass
class CompareBench:
    enabled: bool = True
    batch: int = 16
    prompt: int = 64
    length: int = 1024  # decode length; speed is read at context prompt + length
    sample_steps: int = 4
    repeats: int = 2


@dataclass
class CompareConfig:
    model: str = "smollm2-135m"
    out: str = "runs/compare-smollm2-135m"
    data_dir: str | None = None
    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS))
    dtype: str = "float32"
    threads: int | None = None
    selection_size: int = 100  # documents per task reserved for selection
    selection_seed: int = 0
    analyze_limit: int | None = None  # items per task of the selection partition the analysis scores
    calib_seqs: int = 8
    iterative_limit: int | None = 10  # items per task for the (costly) iterative signal
    score: str = "kl"  # the signal of row 3, one-shot (the signal_iterative row ranks iteratively by it)
    softmax: int = 10
    swa: int = 10
    none: int = 10
    window: int = 64
    linear_window: int = 64
    linear_feature_dim: int = 64
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    heal: CompareHeal = field(default_factory=CompareHeal)
    eval: CompareEval = field(default_factory=CompareEval)
    bench: CompareBench = field(default_factory=CompareBench)

    @property
    def accuracy_dtype(self) -> str:
        """The weights' dtype in the multiple-choice pass."""
        return self.eval.dtype or self.dtype

    @classmethod
    def load(cls, path_or_name: str | None) -> "CompareConfig":
        """A YAML file or a shipped config name (`compare`, `compare-quick`); None = `compare`."""
        return load_config(cls, path_or_name or "compare", [n for n in shipped_configs() if n.startswith("compare")])

    @classmethod
    def from_dict(cls, data: dict) -> "CompareConfig":
        return config_from_dict(cls, data, "comparison config")

    def problems(self) -> list[str]:
        from ..evaluate import get_task
        from ..heal import HealConfig, HealConfigError
        from ..sensitivity import PLAN_SCORES

        out = []
        for t in self.tasks:
            try:
                if get_task(t).__class__.__name__ != "MCTask":
                    out.append(f"tasks: {t!r} is not a multiple-choice task (WikiText is always measured)")
            except (KeyError, ValueError, FileNotFoundError) as e:
                out.append(f"tasks: {e}")
        for k, r in enumerate(self.rows):
            base, seed = split_seed(r)
            if seed is not None and (base not in HEALED and not base.startswith("signal_") or base not in self.rows[:k]):
                out.append(f"rows: {r!r} repeats a healed row listed before it with another healing seed "
                           f"({', '.join(HEALED)}, signal_<s>)")
            elif base not in ROWS and not (base.startswith("signal_") and base[7:] in SIGNALS):
                out.append(f"rows: unknown row {r!r}; known: {', '.join(ROWS)}, signal_<{'|'.join(SIGNALS)}>, "
                           "<healed row>_seed<N>")
        if self.score not in PLAN_SCORES:
            out.append(f"score: {self.score!r} must be one of {', '.join(PLAN_SCORES)}")
        if min(self.softmax, self.swa, self.none) < 0:
            out.append("softmax, swa and none must be >= 0")
        for k in ("selection_size", "window", "linear_window", "linear_feature_dim", "calib_seqs"):
            if getattr(self, k) < 1:
                out.append(f"{k} must be >= 1, got {getattr(self, k)}")
        for k, v in (("analyze_limit", self.analyze_limit), ("iterative_limit", self.iterative_limit),
                     ("eval.limit", self.eval.limit), ("eval.mmlu_per_subject", self.eval.mmlu_per_subject),
                     ("eval.wikitext_docs", self.eval.wikitext_docs),
                     ("eval.wikitext_max_length", self.eval.wikitext_max_length)):
            if v is not None and v < 1:
                out.append(f"{k} must be >= 1 or null, got {v}")
        if self.eval.heldout_tokens < 2 or self.eval.heldout_seq_len < 2:
            out.append("eval.heldout_tokens and eval.heldout_seq_len must be >= 2")
        if "random" in self.rows and len(self.random_seeds) < 1:
            out.append("random_seeds: give at least one seed (3 give a median seed to heal)")
        try:
            self.dtype = dtype_name(self.dtype)
        except UsageError as e:
            out.append(f"dtype: {e}")
        if self.eval.dtype is not None:
            try:
                self.eval.dtype = dtype_name(self.eval.dtype)
            except UsageError as e:
                out.append(f"eval.dtype: {e}")
        if any(not 0 <= f <= 1 for f in self.heal.probe_at):
            out.append("heal.probe_at: fractions of the budget in [0, 1]")
        try:
            HealConfig(tokens=self.heal.tokens, **self.heal.options)
        except HealConfigError as e:
            out.append(f"heal: {e}")
        except TypeError as e:
            out.append(f"heal.options: {e} (known: {', '.join(f.name for f in dataclasses.fields(HealConfig))})")
        return out


# ---- the rows -------------------------------------------------------------------------------------


def _plan_hash(plan) -> str:
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _row_plans(cfg: CompareConfig, sens: dict, n_layers: int, iterative_plan=None) -> dict:
    """name -> (plan or None, heal mode or None, description) for every row to run, in order."""
    from .. import plan as P
    from ..plan import LayerPlan, LayerSpec
    from ..sensitivity import plan_scores

    def by(score):  # one-shot: the iterative signal is its own row
        return P.plan_by_counts(plan_scores(sens, score, "one-shot"), cfg.softmax, cfg.swa, cfg.none, cfg.window)

    main = by(cfg.score)
    rows: dict = {}
    for r in cfg.rows:
        if r == "base":
            rows[r] = (None, None, "the original model")
        elif r == "converted":
            rows[r] = (main, None, f"sensitivity plan ({cfg.score}), unhealed")
        elif r == "layerboost":
            rows[r] = (main, "both", f"sensitivity plan ({cfg.score}), attention transfer + logit distillation")
        elif r == "no_attn_distill":
            rows[r] = (main, "kd", f"sensitivity plan ({cfg.score}), logit distillation only")
        elif r == "random":
            for s in cfg.random_seeds:
                rows[f"random_s{s}"] = (P.plan_random(n_layers, cfg.softmax, cfg.swa, cfg.none, s, cfg.window), None,
                                        f"random placement, seed {s}, unhealed (held-out text only)")
            rows["random"] = ("median", "both", "random placement (seed with the median unhealed KL), healed")
        elif r == "pattern":
            rows[r] = (P.plan_pattern(n_layers, cfg.softmax, cfg.swa, cfg.none, cfg.window), "both",
                       "interleaved pattern, healed")
        elif r in ("lolcats", "lolcats_gate"):
            mix = "lolcats" if r == "lolcats" else "gate"
            spec = LayerSpec("linear_swa", cfg.linear_window, cfg.linear_feature_dim, mix)
            rows[r] = (LayerPlan((spec,) * n_layers), "both",
                       f"every layer linear_swa (window {cfg.linear_window}, feature dim {cfg.linear_feature_dim}, "
                       f"mix {mix}), healed")
        elif r == "llm_drop":
            scores = plan_scores(sens, "cosine", "one-shot")
            rows[r] = (P.plan_by_counts(scores, n_layers - cfg.none, 0, cfg.none, cfg.window), "both",
                       f"{cfg.none} attention-free layers by the cosine proxy, the rest softmax, healed")
        elif split_seed(r)[1] is not None:
            base, seed = split_seed(r)
            plan, mode, desc = rows[base]
            rows[r] = (plan, mode, f"{desc}; healing seed {seed} (continuous measures only)")
        elif r.startswith("signal_"):
            sig = r[len("signal_"):]
            plan = iterative_plan if sig == "iterative" else by(sig)
            if plan == main:
                rows[r] = ("same", None, f"signal {sig}: same plan as layerboost")
            else:
                rows[r] = (plan, "both", f"sensitivity plan ({sig}), healed")
    return rows


def iterative_plan(model, tok, cfg: CompareConfig, out: Path):
    """Row 3 with the iterative signal: remove the least sensitive layer's attention, re-measure, repeat
    `none` times (LLM-Drop-style interactions); the rest ranked by the last step's scores. The signal is row
    3's: a proxy on calibration text (cosine, KL), else the margin or accuracy drop on `iterative_limit` items."""
    from .. import plan as P
    from ..evaluate import Partition, prepare_tasks
    from ..sensitivity import PROXY_SCORES, calibration_tokens, items_from_tasks, iterative_scores, remove_iteratively

    items = calib = None
    if cfg.score in PROXY_SCORES:  # the proxy re-measured after each removal, on the analysis' calibration text
        calib = calibration_tokens(tok, cfg.data_dir, cfg.calib_seqs)
    else:
        part = Partition("selection", cfg.selection_size, cfg.selection_seed)
        items = items_from_tasks(prepare_tasks(tok, cfg.tasks, data_dir=cfg.data_dir, limit=cfg.iterative_limit,
                                               seed=0, partition=part))
    hist = remove_iteratively(model, cfg.score, cfg.none, items=items, calib=calib, out_dir=out)
    scores = iterative_scores(hist, len(model.model.layers))
    return P.plan_by_counts(scores, cfg.softmax, cfg.swa, cfg.none, cfg.window)


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data, default=str)


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


class Comparison:
    """The comparison folder: shared inputs (analysis, prepared items, held-out rows) and one JSON per row."""

    def __init__(self, cfg: CompareConfig, log=print):
        from ..models import load_model

        self.cfg, self.log = cfg, log
        self.dir = Path(cfg.out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_config()  # before the model load: a folder made with other settings is refused at once
        self.dtype = parse_dtype(cfg.dtype)
        self.device = resolve_device("auto")
        self.base, self.tok = load_model(cfg.model, dtype=self.dtype, device=self.device)
        self.base.eval()

    def _check_config(self) -> None:
        """A folder made with other settings is never mixed into: refuse, naming the fix."""
        from ..heal import HealConfig

        f = self.dir / "config.yaml"
        mine = dataclasses.asdict(self.cfg)
        mine.pop("rows")  # adding rows later is fine
        # every healing setting, defaults included: rows healed by another recipe must not be mixed in
        resolved = HealConfig(tokens=self.cfg.heal.tokens, **self.cfg.heal.options).to_dict()
        mine["heal_resolved"] = {k: v for k, v in resolved.items() if k not in ("progress", "checkpoint_every", "device")}
        if f.is_file():
            old = yaml.safe_load(f.read_text()) or {}
            old.pop("rows", None)
            if "heal_resolved" in old:  # settings a heal's resume key drops (HealConfig.REMOVED) drop out here too
                old["heal_resolved"] = HealConfig.upgrade_key({"config": old["heal_resolved"]})["config"]
            new = json.loads(json.dumps(mine))
            defaults = json.loads(json.dumps(dataclasses.asdict(CompareConfig())))
            for k, v in old.items():  # settings added since read as their defaults
                if isinstance(v, dict) and isinstance(defaults.get(k), dict):
                    old[k] = {**defaults[k], **v}
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff == ["eval"] and not any((self.dir / "rows").glob("*/eval_*.json")):
                changed = sorted(k for k in new["eval"] if old["eval"].get(k) != new["eval"][k])
                if set(changed) <= set(ACCURACY_ONLY):  # nothing measured depends on them yet
                    self.log(f"[config] accuracy settings changed before any row was scored: {', '.join(changed)}")
                    diff = []
            if diff:
                raise ConfigError(f"{self.dir} holds a comparison made with other settings ({', '.join(diff)}): "
                                  "use another `out`, or restore those settings to resume it")
        f.write_text(yaml.safe_dump({**dataclasses.asdict(self.cfg), "heal_resolved": mine["heal_resolved"]},
                                    sort_keys=False))

    # ---- shared inputs ---------------------------------------------------------------------------
    def analysis(self) -> dict:
        from ..sensitivity import analyze

        f = self.dir / "analyze" / "sensitivity.json"
        if f.is_file():
            return json.loads(f.read_text())
        c = self.cfg
        self.log(f"[analyze] selection partition: {c.selection_size} documents per task (seed {c.selection_seed})")
        return analyze(self.base, self.tok, c.tasks, out_dir=self.dir / "analyze", limit=c.analyze_limit, seed=0,
                       data_dir=c.data_dir, proxies=True, calib_seqs=c.calib_seqs, selection_size=c.selection_size,
                       selection_seed=c.selection_seed)

    def prepared(self):
        from ..evaluate import Partition, prepare_task

        if not hasattr(self, "_prepared"):
            c, e = self.cfg, self.cfg.eval
            part = Partition("evaluation", c.selection_size, c.selection_seed)
            self._prepared = [
                prepare_task(self.tok, t, data_dir=c.data_dir, limit=e.limit, seed=e.seed, partition=part,
                             per_stratum=e.mmlu_per_subject if t == "mmlu" else None)
                for t in c.tasks]
            self._wikitext = prepare_task(self.tok, "wikitext", data_dir=c.data_dir, limit=e.wikitext_docs, seed=e.seed)
        return self._prepared

    def heldout(self):
        from ..corpus import heldout_rows
        from .run import heal_data

        if not hasattr(self, "_heldout"):
            e = self.cfg.eval
            self._heldout = heldout_rows(self.tok, heal_data(self.cfg.heal.data, self.cfg.data_dir), e.heldout_tokens,
                                         e.heldout_seq_len)
        return self._heldout

    # ---- one row ---------------------------------------------------------------------------------
    def model_for(self, name: str, plan, heal_mode: str | None):
        """The row's model: the base, a converted copy, or the healed hybrid (healing resumes)."""
        from .. import convert, load
        from ..heal import heal
        from .run import heal_data

        if plan is None:
            return self.base, None
        if heal_mode is None:
            m = copy.deepcopy(self.base)
            convert(m, plan)
            return m.eval(), None
        c = self.cfg
        out = self.dir / "rows" / name / "healed"
        if not (out / "heal.json").is_file():
            self.log(f"[{name}] healing {c.heal.tokens} tokens ({'attention transfer + ' if heal_mode == 'both' else ''}"
                     "logit distillation)")
            probe = None
            if name in CURVE_ROWS:
                n = max(1, c.heal.probe_tokens // c.eval.heldout_seq_len)
                probe = self.heldout()[:n]
            opts = dict(c.heal.options)
            opts.setdefault("data_dir", c.data_dir)
            if split_seed(name)[1] is not None:
                opts["seed"] = split_seed(name)[1]
            heal(copy.deepcopy(self.base), plan, data=heal_data(c.heal.data, c.data_dir), out=out,
                 tokens=c.heal.tokens, attn_distill=heal_mode == "both", tokenizer=self.tok, resume=True,
                 probe_rows=probe, probe_at=tuple(c.heal.probe_at), **opts)
        summary = json.loads((out / "heal.json").read_text())
        log = out / "heal_state" / "log.jsonl"
        lines = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
        info = {"tokens": summary["config"]["tokens"], "stage_tokens": summary["stage_tokens"],
                "steps": sum(1 for x in lines if not x.get("probe")),
                "curve": [x for x in lines if x.get("probe")]}
        return load(out, dtype=self.dtype, device=self.device).eval(), info

    def evaluate_row(self, name: str, model) -> dict:
        """Accuracy per task (resumable per task) with per-item correctness and gold margins."""
        out = {}
        for prep in self.prepared():
            f = self.dir / "rows" / name / f"eval_{prep.task.name}.json"
            res = _read(f)
            if res is None:
                res = {**task_items(model, self.tok, prep, self.cfg.eval.batch_size),
                       "mmlu_per_subject": self.cfg.eval.mmlu_per_subject if prep.task.name == "mmlu" else None,
                       "dtype": dtype_name(next(model.parameters()).dtype)}
                _write(f, res)
            out[prep.task.name] = res
        return out

    def wikitext_row(self, name: str, model) -> dict:
        from ..evaluate import perplexity_metrics, score_rolling

        f = self.dir / "rows" / name / "wikitext.json"
        res = _read(f)
        if res is None:
            self.prepared()
            t0 = time.perf_counter()
            reqs = self._wikitext.requests
            lls = score_rolling(model, self.tok, reqs, max_length=self.cfg.eval.wikitext_max_length, desc="wikitext")
            res = {**perplexity_metrics(reqs, lls), "max_length": self.cfg.eval.wikitext_max_length,
                   "doc_logliks": lls, "time_s": round(time.perf_counter() - t0, 1)}
            _write(f, res)
        return res

    def bench_plan(self, plan) -> dict | None:
        """Decode ms/step at the end, tokens/s and KV bytes, plan vs base side by side (cached per plan)."""
        from ..bench import bench_latency, hybrid_of

        b = self.cfg.bench
        if not b.enabled:
            return None
        if plan is None:
            return {"speedup": 1.0, "kv_ratio": 1.0}
        f = self.dir / "bench" / f"{_plan_hash(plan)}.json"
        res = _read(f)
        if res is None:
            hyb = hybrid_of(self.base, plan)
            lat = bench_latency(self.base, hyb, batch=b.batch, prompt=b.prompt, lengths=[b.length], repeats=b.repeats,
                                sample_steps=b.sample_steps)
            base_r, hyb_r = (next(x for x in lat["results"] if x["model"] == m) for m in ("base", "hybrid"))
            res = {"plan": plan.to_dict(), "context": b.prompt + b.length, "batch": b.batch,
                   "speedup": lat["ratios"][0]["speedup_at_end"],
                   "base_ms_per_step": base_r["ms_per_step_at_end"]["median"],
                   "ms_per_step": hyb_r["ms_per_step_at_end"]["median"],
                   "kv_bytes": hyb_r["cache_bytes_theory"], "base_kv_bytes": base_r["cache_bytes_theory"],
                   "kv_ratio": hyb_r["cache_bytes_theory"] / base_r["cache_bytes_theory"]}
            _write(f, res)
        return res

    def row(self, name: str, plan, heal_mode: str | None, description: str, light: bool = False) -> dict:
        """Phase 1 of a row: healing and the continuous measures (held-out text, WikiText-2, speed)."""
        from ..quality import heldout_metrics

        f = self.dir / "rows" / f"{name}.json"
        done = _read(f)
        if done is not None:
            if "bench" in done and plan is not None and self.cfg.bench.enabled:
                bench = self.bench_plan(plan)  # a deleted speed file is measured again (e.g. on a quiet machine)
                if bench != done["bench"]:  # rows sharing a plan take the new measurement too
                    done["bench"] = bench
                    _write(f, done)
            self.log(f"[{name}] done before, skipped")
            return done
        self.log(f"[{name}] {description}")
        t0 = time.perf_counter()
        model, heal_info = self.model_for(name, plan, heal_mode)
        res = {"name": name, "description": description, "plan": plan.to_dict() if plan is not None else None,
               "counts": plan.counts() if plan is not None else None, "heal_mode": heal_mode, "heal": heal_info}
        res["heldout"] = heldout_metrics(self.base, model, self.heldout())
        self.log(f"[{name}] held-out KL {res['heldout']['kl']:.4f}, agreement {res['heldout']['agree']:.3f}, "
                 f"ppl {res['heldout']['ppl']:.2f}")
        if not light:
            res["wikitext"] = self.wikitext_row(name, model)
            res["bench"] = self.bench_plan(plan)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        _write(f, res)
        return res

    def accuracy_row(self, res: dict, plan, heal_mode: str | None) -> dict:
        """Phase 2 of a row: multiple-choice accuracy on every evaluation-partition item (resumable per task)."""
        name = res["name"]
        if "eval" in res:
            return res
        self.log(f"[{name}] multiple-choice evaluation")
        t0 = time.perf_counter()
        model, _ = self.model_for(name, plan, heal_mode)  # a healed row's weights are read back from its folder
        dtype = parse_dtype(self.cfg.accuracy_dtype)
        if next(model.parameters()).dtype != dtype:
            model = (copy.deepcopy(model) if model is self.base else model).to(dtype)
        res["eval"] = self.evaluate_row(name, model)
        cols = [v[v["column"]] for v in res["eval"].values()]
        res["average"] = sum(cols) / len(cols)
        res["eval_seconds"] = round(time.perf_counter() - t0, 1)
        _write(self.dir / "rows" / f"{name}.json", res)
        return res

    # ---- all rows --------------------------------------------------------------------------------
    def run(self) -> Path:
        """Every row's continuous measures first (the cheap, sensitive ones), then every row's accuracy
        (about an hour a row on 2 CPU cores); comparison.md is rewritten after each step, so a partial
        table is readable while the rest runs."""
        import torch

        c = self.cfg
        if c.threads:
            torch.set_num_threads(c.threads)
        sens = self.analysis()
        n_layers = sens["n_layers"]
        it_plan = iterative_plan(self.base, self.tok, c, self.dir / "iterative") if "signal_iterative" in c.rows else None
        plans = _row_plans(c, sens, n_layers, it_plan)
        results, todo = {}, []
        for name, (plan, mode, desc) in plans.items():
            if plan == "same":
                results[name] = {"name": name, "description": desc, "same_as": "layerboost"}
                continue
            if plan == "median":  # the random seed whose unhealed held-out KL is the median
                seeds = {s: results[f"random_s{s}"]["heldout"]["kl"] for s in c.random_seeds}
                med = sorted(seeds, key=lambda s: (seeds[s], s))[(len(seeds) - 1) // 2]
                plan = plans[f"random_s{med}"][0]
                desc += f": seed {med}"
            light = name.startswith("random_s")
            results[name] = self.row(name, plan, mode, desc, light=light)
            if not light and split_seed(name)[1] is None:
                todo.append((name, plan, mode))
        md = write_comparison(self.dir, results, c, sens)
        if c.eval.multiple_choice:
            for name, plan, mode in todo:
                results[name] = self.accuracy_row(results[name], plan, mode)
                md = write_comparison(self.dir, results, c, sens)
        self.log(f"[report] {md}")
        return md


# ---- the report ------------------------------------------------------------------------------------


def task_items(model, tok, prep, batch_size: int) -> dict:
    """One prepared task's accuracy, with its items as {doc_id, correct, margin} in the task's own column (acc or
    acc_norm): what the paired tests read."""
    from ..evaluate import evaluate

    r = evaluate(model, tok, [], prepared=[prep], batch_size=batch_size, per_item=True,
                 progress=True)["tasks"][prep.task.name]
    key = "_norm" if r["column"] == "acc_norm" else ""
    r["items"] = [{"doc_id": it["doc_id"], "correct": int(it["pred" + key] == it["gold"]),
                   "margin": it["margin" + key]} for it in r.pop("items")]
    return r


def pooled_items(row: dict) -> tuple[list[float], list[float], list[str], list[tuple]]:
    """Pooled per-item (correct, margin, task, key) of a row, in a fixed order."""
    correct, margin, task, keys = [], [], [], []
    for t in sorted(row["eval"]):
        for it in row["eval"][t]["items"]:
            correct.append(it["correct"])
            margin.append(it["margin"] if math.isfinite(it["margin"]) else 0.0)
            task.append(t)
            keys.append((t, it["doc_id"]))
    return correct, margin, task, keys


def significance(a: dict, b: dict) -> dict:
    """Paired tests of row a against row b: over the same items (when both were evaluated) and the same
    held-out rows."""
    from ..stats import mcnemar, paired_bootstrap

    out = {"heldout_kl": paired_bootstrap(a["heldout"]["kl_rows"], b["heldout"]["kl_rows"])}
    if "eval" in a and "eval" in b:
        ca, ma, ta, ka = pooled_items(a)
        cb, mb, _, kb = pooled_items(b)
        if ka != kb:
            raise ValueError(f"rows {a['name']} and {b['name']} were scored on different items")
        out.update(mcnemar=mcnemar(ca, cb),
                   accuracy=paired_bootstrap(ca, cb, strata=ta),  # difference of the average over tasks
                   margin=paired_bootstrap(ma, mb, strata=ta))
    return out


def _fmt_sig(s: dict, what: str) -> str:
    if what not in s:
        return "-"
    d = s[what]
    return f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] p={d['p']:.3g}"


def _counts(per_task: dict) -> str:
    return ", ".join(f"{t} {n}" for t, n in per_task.items())


def write_comparison(out: Path, results: dict, cfg: CompareConfig, sens: dict) -> Path:
    full = {n: r for n, r in results.items() if "eval" in r}
    tasks = list(cfg.tasks) if full else []
    lines = [f"# Comparison: `{cfg.model}`", ""]
    any_row = next(iter(full.values()), None)
    if any_row:
        evaluated = ("evaluation: every other item (" + ", ".join(f"{t} {any_row['eval'][t]['n']}" for t in tasks)
                     + (f"; MMLU {cfg.eval.mmlu_per_subject} per subject" if "mmlu" in tasks and cfg.eval.mmlu_per_subject
                        else "") + f"; weights in {cfg.accuracy_dtype})")
    else:
        evaluated = "no multiple-choice evaluation (eval.multiple_choice: false)"
    lines += [
        f"Selection (sensitivity analysis): {_counts(sens['items_per_task'])} items from the selection partition "
        f"({cfg.selection_size} documents per task, seed {cfg.selection_seed}); {evaluated}. Plans: "
        f"{cfg.softmax} softmax / {cfg.swa} swa (window {cfg.window}) / {cfg.none} none; healing budget "
        f"{cfg.heal.tokens} tokens for every healed row. Held-out text: {cfg.eval.heldout_tokens} tokens that "
        "neither healing nor calibration reads; WikiText-2: "
        f"{cfg.eval.wikitext_docs or 'all'} test documents, windows of {cfg.eval.wikitext_max_length or 'the model context'}"
        f" tokens; healing, held-out text and WikiText-2 in {cfg.dtype}.", ""]
    head = "| row" + "".join(f" | {t} ({any_row['eval'][t]['column']})" for t in tasks)
    head += " | avg | WikiText ppl | held-out KL | agree | held-out ppl | speed (x base) | KV (x base) |"
    lines += [head, "|" + "---|" * (len(tasks) + 8)]
    for n, r in results.items():
        if "same_as" in r:
            lines.append(f"| {n} | same plan as {r['same_as']} |" + " |" * (len(tasks) + 6))
            continue
        h = r["heldout"]
        cells = []
        for t in tasks:
            if "eval" in r:
                v = r["eval"][t]
                se = v.get(f"{v['column']}_stderr")
                cells.append(f"{100 * v[v['column']]:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * v[v['column']]:.1f}")
            else:
                cells.append("-")
        avg = f"{100 * r['average']:.1f}" if "average" in r else "-"
        wt = f"{r['wikitext']['word_perplexity']:.2f}" if "wikitext" in r else "-"
        b = r.get("bench") or {}
        sp = f"{b['speedup']:.2f}" if b else "-"
        kv = f"{b['kv_ratio']:.3f}" if b else "-"
        cells += [avg, wt, f"{h['kl']:.4f}", f"{h['agree']:.3f}", f"{h['ppl']:.2f}", sp, kv]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracy in percent ± standard error. KL(base || row) in nats per token; agree: share of "
              "positions where both pick the same next token. Speed: decode ms per step of the base over the row's "
              f"at context {cfg.bench.prompt + cfg.bench.length}, batch {cfg.bench.batch}, measured side by side; "
              "KV: cache bytes at that context.", ""]
    # significance against layerboost and against base
    sig = {}
    measured = {n: r for n, r in results.items() if "heldout" in r and not n.startswith("random_s")}
    for ref in ("layerboost", "base"):
        if ref not in measured:
            continue
        lines += [f"## Paired tests against `{ref}`", "",
                  "| row | right only here / only in ref (McNemar p) | avg accuracy diff [95% CI] p | "
                  "gold margin diff [95% CI] p | held-out KL diff [95% CI] p |", "|---|---|---|---|---|"]
        for n, r in measured.items():
            if n == ref:
                continue
            s = significance(r, measured[ref])
            sig[f"{n}_vs_{ref}"] = s
            m = s.get("mcnemar")
            mc = f"{m['a_only']} / {m['b_only']} (p={m['p']:.3g})" if m else "-"
            lines.append(f"| {n} | {mc} | {_fmt_sig(s, 'accuracy')} | {_fmt_sig(s, 'margin')} | "
                         f"{_fmt_sig(s, 'heldout_kl')} |")
        lines += ["", "A difference is significant at the 5% level when p < 0.05 (the interval excludes 0); "
                  "bootstrap over items within each task (10,000 resamples), held-out KL over held-out rows.", ""]
    randoms = {n: r["heldout"]["kl"] for n, r in results.items() if n.startswith("random_s")}
    if randoms:
        lines += ["Unhealed random placements, held-out KL: "
                  + ", ".join(f"{n} {v:.4f}" for n, v in randoms.items())
                  + (f"; the sensitivity plan unhealed: {results['converted']['heldout']['kl']:.4f}"
                     if "converted" in results else "") + ".", ""]
    figs = plot_comparison(out, results)
    lines += [f"![{p.stem}]({p.name})" for p in figs] + [""]
    lines += ["## Rows", ""] + [f"- `{n}`: {r['description']}" + (f" ({r['seconds']:.0f} s)" if "seconds" in r else "")
                                for n, r in results.items()] + [""]
    _write(out / "comparison.json", {"rows": results, "significance": sig, "config": dataclasses.asdict(cfg)})
    path = out / "comparison.md"
    path.write_text("\n".join(lines))
    return path


def plot_comparison(out: Path, results: dict) -> list[Path]:
    """Accuracy vs decode speed (paper Fig. 2 style) and the healing curves (held-out KL and ppl vs tokens)."""
    from .report import pyplot

    plt = pyplot()
    paths = []
    pts = [(n, r) for n, r in results.items() if "eval" in r and r.get("bench")]
    if pts:
        fig, ax = plt.subplots(figsize=(5.5, 4), dpi=150)
        for n, r in pts:
            ax.scatter(r["bench"]["speedup"], 100 * r["average"], s=24)
            ax.annotate(n, (r["bench"]["speedup"], 100 * r["average"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("decode speed vs base (x)")
        ax.set_ylabel("average accuracy (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "accuracy_vs_speed.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    curves = {n: r["heal"]["curve"] for n, r in results.items() if r.get("heal") and r["heal"].get("curve")}
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=150)
        for n, c in curves.items():
            x = [p["tokens"] for p in c]
            axes[0].plot(x, [p["kl"] for p in c], marker="o", label=n)
            axes[1].plot(x, [p["ppl"] for p in c], marker="o", label=n)
        ref = next(iter(curves.values()))[0]["ppl_teacher"]
        axes[1].axhline(ref, color="black", lw=0.7, ls="--", label="base")
        axes[0].set_ylabel("held-out KL(base || student), nats/token")
        axes[1].set_ylabel("held-out perplexity")
        for ax in axes:
            ax.set_xlabel("healing tokens")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "healing_curves.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def compare(config: str | CompareConfig | None = None, log=print) -> Path:
    """Run (or resume) a comparison; returns the path of comparison.md."""
    cfg = config if isinstance(config, CompareConfig) else CompareConfig.load(config)
    return Comparison(cfg, log).run()


__all__ = ["CompareConfig", "Comparison", "compare", "significance", "write_comparison"]
