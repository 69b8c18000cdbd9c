"""`layerboost run`: analyze -> plan -> convert -> heal -> eval -> bench -> report in one run folder.

Each stage writes its outputs into the run folder plus `stages/<stage>.json` holding a hash of the
settings it depends on (its own and its upstream stages'). A stage whose record exists with the
same hash is skipped, so a killed run resumes at the stage it was in; analyze and heal also
resume inside themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..evaluate.tasks import PAPER_TASKS
from ..outputs import settings_hash
from ..plan import LayerPlan, PlanError, PlanPolicy, make_plan
from ..util import UsageError, dtype_name, environment, parse_dtype, resolve_device, write_json

CONFIG_DIR = Path(__file__).parents[1] / "configs"
STAGES = ("analyze", "plan", "convert", "heal", "eval", "bench", "serve", "report")


class ConfigError(ValueError):
    """A run config is invalid; the message lists every problem."""


@dataclass
class AnalyzeConfig:
    limit: int | None = 20  # items per task; None = full splits
    seed: int = 0
    swa_window: int | None = None
    proxies: bool = True
    calib_seqs: int = 4
    iterative: int | str = "auto"  # removals re-measured by plan.score; auto: the plan's attention-free count
    batch_tokens: int = 8192
    selection_size: int = 100  # documents per task reserved for analysis; eval scores only the others
    selection_seed: int = 0
    windows: list[int] | None = None  # each layer as swa at these windows and as none, on long rows (analyze
                                      # --windows); the speed policy needs them (default there: its own, or 64/256/1024)
    long_seqs: int = 4
    long_len: int = 2048
    retrieval: bool = False  # each layer's part in long-context retrieval (analyze --retrieval); plan.keep_retrieval
    retrieval_len: int = 2048
    retrieval_trials: int = 8
    retrieval_window: int = 64
    retrieval_seed: int = 1  # not 0: seed 0 draws the trials eval reports

    def retrieval_settings(self) -> dict | None:
        """analyze's `retrieval` argument (None: not measured)."""
        return dict(length=self.retrieval_len, trials=self.retrieval_trials, window=self.retrieval_window,
                    seed=self.retrieval_seed) if self.retrieval else None


PlanConfig = PlanPolicy  # the run config's `plan:` section


@dataclass
class RunHeal:
    enabled: bool = True
    data: str = "corpus"  # relative to the data dir, a path, or a hub dataset
    tokens: str | int = "200k"
    attn_distill: bool = True
    options: dict = field(default_factory=dict)  # passed to layerboost.heal.HealConfig


@dataclass
class EvalConfig:
    limit: int | None = 100  # items per task from the evaluation partition (never the analysis' items)
    seed: int = 0
    batch_size: int = 32
    heldout_tokens: int = 4096  # held-out text for KL(base || model), agreement and perplexity; 0 = skip
    heldout_seq_len: int = 512  # tokens per held-out row: a window of W is invisible on rows of W tokens or fewer
    wikitext_docs: int | None = 8  # WikiText-2 test documents for word perplexity; 0 = skip, null = all
    wikitext_max_length: int | None = None  # rolling window (null: the model's context, as lm-eval)
    retrieval_lengths: list[int] = field(default_factory=list)  # pass key and fact-in-prose at these prompt lengths
    retrieval_trials: int = 20  # per family and length (seed 0, evaluation text); [] lengths = skip


@dataclass
class BenchConfig:
    enabled: bool = True
    latency: dict = field(default_factory=dict)  # passed to layerboost.bench.bench_latency
    throughput: dict = field(default_factory=dict)  # passed to layerboost.bench.bench_throughput


@dataclass
class RunConfig:
    model: str = "smollm2-135m"
    out: str = "runs/smollm2-135m"
    data_dir: str | None = None
    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS))
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None
    # the speed policy's llama.cpp speed model, when this machine has none cached: auto measures one before the plan
    # (the calibration plans at depths 0 and plan.context, one round: about 3 min on 2 cores); never refuses instead
    calibrate: str = "auto"
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    heal: RunHeal = field(default_factory=RunHeal)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    # ---- loading and validation ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return config_from_dict(cls, data, "run config")

    @classmethod
    def load(cls, path_or_name: str | None) -> "RunConfig":
        """A YAML file, or the name of a shipped config (`default`, `paper`); None = `default`."""
        return load_config(cls, path_or_name or "default", [n for n in shipped_configs() if not n.startswith("compare")])

    def problems(self) -> list[str]:
        from ..evaluate import get_task

        out = []
        for t in self.tasks:
            try:
                get_task(t)
            except (KeyError, ValueError, FileNotFoundError) as e:
                out.append(f"tasks: {e}")
        p = self.plan
        out += [f"plan: {m}" for m in p.problems()]
        if self.calibrate not in ("auto", "never"):
            out.append(f"calibrate must be auto or never, got {self.calibrate!r}")
        try:
            self.dtype = dtype_name(self.dtype)
        except UsageError as e:
            out.append(f"dtype: {e}")
        for k in ("limit", "wikitext_max_length"):
            v = getattr(self.eval, k)
            if v is not None and v < 1:
                out.append(f"eval.{k} must be >= 1 or null, got {v}")
        if self.eval.wikitext_docs is not None and self.eval.wikitext_docs < 0:
            out.append(f"eval.wikitext_docs must be >= 0 or null, got {self.eval.wikitext_docs}")
        if self.eval.heldout_tokens < 0:
            out.append(f"eval.heldout_tokens must be >= 0, got {self.eval.heldout_tokens}")
        if self.eval.heldout_seq_len < 2:
            out.append(f"eval.heldout_seq_len must be >= 2 tokens, got {self.eval.heldout_seq_len}")
        from ..evaluate.retrieval import settings_problems

        out += settings_problems(self.eval.retrieval_lengths, self.eval.retrieval_trials)
        from ..sensitivity import PLAN_SCORES, PROXY_SCORES

        if p.score not in PLAN_SCORES:
            out.append(f"plan.score: {p.score!r} must be one of {', '.join(PLAN_SCORES)}")
        if p.score in PROXY_SCORES and not self.analyze.proxies:
            out.append(f"plan.score: {p.score!r} needs analyze.proxies: true")
        import inspect

        from ..bench import bench_latency, bench_throughput

        for name, fn in (("latency", bench_latency), ("throughput", bench_throughput)):
            params = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                      if k not in ("base", "hybrid", "device")}
            for key in sorted(set(getattr(self.bench, name)) - set(params)):
                out.append(f"bench.{name}.{key}: unknown setting (known: {', '.join(sorted(params))})")
            for key, v in getattr(self.bench, name).items():
                if key in params:
                    out += [f"bench.{name}.{key} {m}, got {v!r}" for m in _option_problems(v, params[key], key)]
        a = self.analyze
        if a.iterative != "auto" and (not isinstance(a.iterative, int) or isinstance(a.iterative, bool) or a.iterative < 0):
            out.append(f"analyze.iterative must be auto or a count >= 0, got {a.iterative!r}")
        elif not p.problems():
            from ..sensitivity import iterative_problems

            out += [f"analyze.iterative / plan.ranking: {m}" for m in iterative_problems(p, a.iterative)]
        for key, v, low in (("analyze.limit", a.limit, 1), ("analyze.swa_window", a.swa_window, 1),
                            ("analyze.calib_seqs", a.calib_seqs, 1),
                            ("analyze.batch_tokens", a.batch_tokens, 1), ("analyze.selection_size", a.selection_size, 1),
                            ("eval.batch_size", self.eval.batch_size, 1), ("threads", self.threads, 1),
                            ("plan.context", p.context, 1), ("analyze.retrieval_len", a.retrieval_len, 2),
                            ("analyze.retrieval_trials", a.retrieval_trials, 1),
                            ("analyze.retrieval_window", a.retrieval_window, 1)):
            if v is not None and v < low:
                out.append(f"{key} must be >= {low}, got {v}")
        if p.keep_retrieval and not a.retrieval:
            out.append(f"plan.keep_retrieval {p.keep_retrieval} needs analyze.retrieval: true (the signal it keeps "
                       "layers by)")
        if a.retrieval and a.retrieval_seed == 0:
            out.append("analyze.retrieval_seed 0 draws the trials eval reports: choose layers with another seed")
        if a.retrieval and a.retrieval_window >= a.retrieval_len:
            out.append(f"analyze.retrieval_window {a.retrieval_window} must be below analyze.retrieval_len "
                       f"{a.retrieval_len}")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError:
                out.append(f"device: {self.device!r} is not a device: use auto, cpu, cuda or cuda:N")
        return out + self._heal_problems()

    def _heal_problems(self) -> list[str]:
        """heal.options against layerboost.heal.HealConfig: names and values, before any stage runs."""
        from ..heal import HealConfig as Settings
        from ..heal import HealConfigError

        own = {"tokens", "attn_distill", "data_dir"}  # set by heal.tokens, heal.attn_distill and data_dir
        known = {f.name for f in dataclasses.fields(Settings)} - own
        unknown = sorted(set(self.heal.options) - known)
        if unknown:
            return [f"heal.options: unknown setting(s) {unknown} (known: {', '.join(sorted(known))})"]
        try:
            Settings(tokens=self.heal.tokens, attn_distill=self.heal.attn_distill, **self.heal.options)
        except HealConfigError as e:
            return ["heal: " + ln.strip().removeprefix("- ") for ln in str(e).splitlines()[1:]]
        except (TypeError, ValueError) as e:
            return [f"heal.options: {e}"]
        return []

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _option_problems(v, default, key: str) -> list[str]:
    """A bench option's value against its default's type: counts (>= 1; >= 0 for warm-up, sampling and
    profiling steps), lists of counts, flags and names."""
    low = 0 if key in ("warmup", "sample_steps", "profile_steps") else 1

    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= low

    if isinstance(default, bool):
        return [] if isinstance(v, bool) else ["must be true or false"]
    if isinstance(default, (list, tuple)):
        ok = count(v) or (isinstance(v, list) and v and all(count(x) for x in v))
        return [] if ok else [f"must be a count >= {low} or a non-empty list of them"]
    if isinstance(default, str):
        return [] if isinstance(v, str) and v else ["must be a name"]
    if default is None and v is None:
        return []
    return [] if count(v) else [f"must be an integer >= {low}" + (" or null" if default is None else "")]


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_from_dict(cls, data: dict, what: str):
    """A config dataclass from a dict; every problem (unknown keys, types, `problems()`) reported at once."""
    problems: list[str] = []
    cfg = _build(cls, data or {}, "", problems)
    problems += cfg.problems()
    if problems:
        raise ConfigError(f"invalid {what}:\n  - " + "\n  - ".join(problems))
    return cfg


def load_config(cls, path_or_name: str, shipped: list[str]):
    """`cls.from_dict` of a YAML file, or of the shipped config of that name (one of `shipped`)."""
    path = Path(path_or_name)
    if not path.is_file() and path_or_name in shipped:
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        raise ConfigError(f"config {path_or_name!r} not found (a YAML path, or a shipped name: {shipped})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        raise ConfigError(f"config {path} is empty: write its settings (start from a copy of {CONFIG_DIR / 'default.yaml'}), "
                          "or give no config to run the shipped default")
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} holds a YAML {type(data).__name__}, not a mapping of settings (model: ..., "
                          f"plan: ...): start from a copy of {CONFIG_DIR / 'default.yaml'}")
    return cls.from_dict(data)


def _build(cls, data: Any, where: str, problems: list[str]):
    """Dataclass from a dict, recording unknown keys and wrong types instead of stopping at the first."""
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        problems.append(f"{where or 'config'}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value, key = data[name], f"{where}{name}"
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            kwargs[name] = _build(f.default_factory, value, key + ".", problems)
            continue
        if not _type_ok(f.type, value):
            problems.append(f"{key}: {value!r} is not a {f.type}")
            continue
        kwargs[name] = value
    return cls(**kwargs)


def _type_ok(annotation: str, value) -> bool:
    if value is None:
        return "None" in annotation
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool), "str": lambda v: isinstance(v, str),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "bool": lambda v: isinstance(v, bool),
              "dict": lambda v: isinstance(v, dict), "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
              "list[float]": lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) for x in v),
              "list[int]": lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)}
    return any(checks[t](value) for t in (a.strip() for a in annotation.split("|")) if t in checks)


# ---- stage bookkeeping ----------------------------------------------------------------------------


def _iterative_inputs(c: RunConfig) -> list:
    """The plan settings the analysis' iterative mode depends on: its score, and (auto) the settings that set
    the plan's attention-free count. None with the mode off, so such a run's analyze hash stays as it was."""
    if not c.analyze.iterative:
        return []
    keys = ["score", "ranking", "policy", "softmax", "swa", "none", "fractions", "softmax_above", "none_below"]
    if c.plan.policy == "budget":
        keys += ["budget", "budget_measure", "context", "window", "kind"]
    return [[k, getattr(c.plan, k)] for k in keys]


class Run:
    """The run folder and its stage records."""

    def __init__(self, cfg: RunConfig, log=print):
        self.cfg, self.log = cfg, log
        self.dir = Path(cfg.out)
        (self.dir / "stages").mkdir(parents=True, exist_ok=True)
        self.hashes: dict[str, str] = {}

    def stage_hash(self, stage: str) -> str:
        c = self.cfg
        own = {
            "analyze": [c.model, c.tasks, c.data_dir, c.analyze] + _iterative_inputs(c),
            "plan": [c.plan],
            "convert": [],
            "heal": [c.heal, c.data_dir],
            "eval": [c.eval, c.tasks, c.data_dir],
            "bench": [c.bench],
            "serve": [c.plan.target],
            "report": [],
        }[stage]
        upstream = [self.hashes[s] for s in STAGES[: STAGES.index(stage)] if s in self.hashes]
        return settings_hash([c.model, c.dtype, own, upstream])

    def record(self, stage: str) -> dict | None:
        f = self.dir / "stages" / f"{stage}.json"
        if not f.is_file():
            return None
        rec = json.loads(f.read_text())
        return rec if rec.get("hash") == self.hashes.get(stage) else None

    def run_stage(self, stage: str, fn) -> dict:
        self.hashes[stage] = self.stage_hash(stage)
        rec = self.record(stage)
        if rec is not None:
            self.log(f"[{stage}] up to date, skipped ({rec['seconds']:.0f} s when it ran)")
            return rec
        self.log(f"[{stage}] running")
        t0 = time.perf_counter()
        outputs = fn() or {}
        rec = {"hash": self.hashes[stage], "seconds": time.perf_counter() - t0, "outputs": outputs,
               "environment": environment(resolve_device(self.cfg.device), parse_dtype(self.cfg.dtype))}
        write_json(self.dir / "stages" / f"{stage}.json", rec, default=str)
        self.log(f"[{stage}] done in {rec['seconds']:.0f} s")
        return rec


def check_before_work(cfg: RunConfig) -> None:
    """What would otherwise fail only after earlier stages ran: the run folder, the model, the plan against
    the model's layers and context (read from its config.json), and the healing / held-out text.

    Raises:
        ConfigError, ModelLoadError, TrainingDataError, UsageError: naming the problem.
    """
    from ..util import check_writable
    from ..corpus import check_heldout, documents
    from ..models import model_config
    from ..plan import check_fits

    try:
        resolve_device(cfg.device)
    except UsageError as e:
        raise ConfigError(f"device: {e}") from e
    check_writable(cfg.out)
    config = model_config(cfg.model)
    if config is not None:
        from ..sensitivity import iterative_problems

        n = config.num_hidden_layers
        try:
            if cfg.plan.policy == "speed":  # placed after the analysis; what it needs is checked now
                check_fits(None, config, (cfg.analyze.swa_window, *analyze_windows(cfg)))
                if not needs_calibration(cfg, config):  # (which reads the llama.cpp build: the tools are there)
                    speed_model(cfg, config)
                plan = LayerPlan.uniform("softmax", n)
            else:
                plan = make_plan(cfg.plan, [0.0] * n, config,
                                 retrieval=[0.0] * n if cfg.plan.keep_retrieval else None)
                check_fits(plan, config, (cfg.analyze.swa_window,))
        except PlanError as e:
            raise ConfigError(f"plan: {e} ({cfg.model} has {n} layers)") from e
        problems = iterative_problems(cfg.plan, cfg.analyze.iterative, n, plan.counts()["none"])
        if problems:
            raise ConfigError("analyze.iterative / plan.ranking: " + "; ".join(problems))
    if cfg.heal.enabled or cfg.eval.heldout_tokens:
        documents(heal_data(cfg.heal.data, cfg.data_dir), seed=0, data_dir=cfg.data_dir)
    if cfg.eval.heldout_tokens:  # eval reads it after healing: too little text must fail now
        check_heldout(heal_data(cfg.heal.data, cfg.data_dir), cfg.eval.heldout_tokens, cfg.eval.heldout_seq_len)


def analyze_windows(cfg: RunConfig) -> list[int]:
    """The windows analyze measures each layer at: analyze.windows, else for the speed policy its candidates (or
    64 / 256 / 1024), else none."""
    if cfg.analyze.windows:
        return list(cfg.analyze.windows)
    return list(cfg.plan.windows or (64, 256, 1024)) if cfg.plan.policy == "speed" else []


def needs_calibration(cfg: RunConfig, config) -> bool:
    """Whether the run measures a llama.cpp speed model before its plan (calibrate auto, a speedup target in
    llama.cpp, none cached for this machine, build, model shape and weight type)."""
    from .. import speed as S

    p = cfg.plan
    if cfg.calibrate != "auto" or p.policy != "speed" or p.speedup is None or p.target != "llama.cpp":
        return False
    return S.cached(S.llama_cpp_key(config, "f32", cfg.threads or 2)) is None


def speed_model(cfg: RunConfig, config, log=None, model=None, tokenizer=None, work: Path | None = None):
    """(speed model, cache geometry) of the speed policy's target (speed.for_policy; both None for other policies).
    With `model` and `work` given and `needs_calibration`, the llama.cpp speed model is measured first (depths 0
    and plan.context, one round) and cached.

    Raises:
        PlanError: a speedup target with no calibrated model (naming the command that calibrates it).
    """
    from .. import speed as S
    from ..llama_cpp import LlamaCppMissing

    if cfg.plan.policy != "speed":
        return None, None
    if model is not None and work is not None and needs_calibration(cfg, config):
        (log or print)(f"[plan] no llama.cpp speed model for this machine yet: measuring one (the calibration plans "
                       f"at depths 0 and {cfg.plan.context}, one round; `layerboost speed calibrate` measures more)")
        try:
            S.calibrate_llama_cpp(model, tokenizer, work, depths=(0, cfg.plan.context), rounds=1, threads=cfg.threads or 2,
                                  log=log or print)
        except LlamaCppMissing as e:
            raise PlanError(str(e)) from e
        for f in work.glob("*.gguf"):  # the calibration plans' files (GBs): the fitted model is cached, they are done
            f.unlink()
    try:
        return S.for_policy(cfg.plan, config, model=cfg.model, threads=cfg.threads or 2)
    except (S.SpeedModelError, LlamaCppMissing) as e:
        raise PlanError(str(e)) from e


# ---- the pipeline -----------------------------------------------------------------------------------


def run(cfg: RunConfig, log=print) -> Path:
    """Run (or resume) every stage of `cfg`; returns the path of report.md."""
    import copy

    import torch

    from .. import convert, load_model, save
    from .report import plot_sensitivity, table_scores, write_report
    from ..bench import bench_side_by_side
    from ..sensitivity import analyze, iterative_steps_for, load_sensitivity, plan_scores, ranking_used
    from ..sensitivity.retrieval import retrieval_scores

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_before_work(cfg)
    r = Run(cfg, log)
    (r.dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dtype, device = parse_dtype(cfg.dtype), resolve_device(cfg.device)
    cache: dict = {}

    def base():
        if "base" not in cache:
            cache["base"] = load_model(cfg.model, dtype=dtype, device=device)
        return cache["base"]

    def do_analyze():
        model, tok = base()
        a = cfg.analyze
        analyze(model, tok, cfg.tasks, out_dir=r.dir / "analyze", limit=a.limit, seed=a.seed, data_dir=cfg.data_dir,
                swa_window=a.swa_window, proxies=a.proxies, calib_seqs=a.calib_seqs,
                iterative_steps=iterative_steps_for(cfg.plan, model.config, a.iterative),
                batch_tokens=a.batch_tokens, selection_size=a.selection_size, selection_seed=a.selection_seed,
                iterative_score=cfg.plan.score, windows=tuple(analyze_windows(cfg)), long_seqs=a.long_seqs,
                long_len=a.long_len, retrieval=a.retrieval_settings())
        return {"sensitivity": str(r.dir / "analyze" / "sensitivity.json")}

    r.run_stage("analyze", do_analyze)
    sens = load_sensitivity(r.dir / "analyze" / "sensitivity.json")

    def do_plan():
        p = cfg.plan
        used = ranking_used(sens, p.score, p.ranking, p.thresholds)
        scores = plan_scores(sens, p.score, used)
        config = base()[0].config
        costs = (sens.get("window_costs") or {}).get("kl")
        speed, geometry = speed_model(cfg, config, log=log, model=base()[0], tokenizer=base()[1],
                                      work=r.dir / "speed")
        plan = make_plan(p, scores, config, log=log, costs=costs, speed=speed, geometry=geometry,
                         retrieval=retrieval_scores(sens, p))
        plan.save(r.dir / "plan.json")
        plot_sensitivity(sens, plan, r.dir / "sensitivity.png", score=p.score, ranking=used)
        log(plan.table(table_scores(scores, p.score, used)))  # the score that chose it
        log(f"(layers ranked by {p.score}, {used})")
        return {"plan": str(r.dir / "plan.json"), "counts": plan.counts()}

    r.run_stage("plan", do_plan)
    plan = LayerPlan.load(r.dir / "plan.json")

    def do_convert():
        model, tok = base()
        hybrid = copy.deepcopy(model)
        record = convert(hybrid, plan)
        save(hybrid, r.dir / "converted", tokenizer=tok)
        return {"model": str(r.dir / "converted"), "replaced": sum(x.old != x.new for x in record)}

    r.run_stage("convert", do_convert)

    heal_rec = r.run_stage("heal", lambda: _heal_stage(r, plan))

    models = {"base": None, "converted": r.dir / "converted"}
    if not heal_rec["outputs"].get("skipped"):
        models["healed"] = Path(heal_rec["outputs"]["model"])
    r.run_stage("eval", lambda: _eval_stage(r, models, base))

    def do_bench():
        b = cfg.bench
        if not b.enabled:
            return {"skipped": True}
        acc = None
        if (r.dir / "eval" / "base.json").is_file():
            ev = {n: json.loads(f.read_text()) for n in ("base", "healed", "converted")
                  if (f := r.dir / "eval" / f"{n}.json").is_file()}
            hyb = ev.get("healed") or ev.get("converted")
            acc = {"base": ev["base"]["average"]["value"], "hybrid": hyb["average"]["value"]} if hyb else None
        return bench_side_by_side(base()[0], plan, r.dir / "bench", b.latency, b.throughput, accuracy=acc)

    r.run_stage("bench", do_bench)
    if cfg.plan.target == "llama.cpp":  # the export, and llama.cpp's own speed of base and hybrid
        from ..llama_cpp import serve_stage

        served = heal_rec["outputs"].get("model") or str(r.dir / "converted")
        r.run_stage("serve", lambda: serve_stage(base()[0], base()[1], load_model(served, dtype=torch.float32)[0],
                                                 r.dir / "serve", threads=cfg.threads or 2))
    r.run_stage("report", lambda: {"report": str(write_report(r.dir))})
    return r.dir / "report.md"


def _heal_stage(r: Run, plan) -> dict:
    """Heal the converted model (RUN/converted, the student) from the original (the teacher) into RUN/heal
    (resuming inside; a folder made with other settings starts over)."""
    import shutil

    from ..heal import heal

    cfg, h = r.cfg, r.cfg.heal
    if not h.enabled:
        return {"skipped": True}
    work, mark = r.dir / "heal", r.dir / "heal.stage_hash"
    if work.exists() and (not mark.is_file() or mark.read_text() != r.hashes["heal"]):
        shutil.rmtree(work)  # made with other settings: its checkpoints cannot be resumed
    mark.write_text(r.hashes["heal"])
    out = heal(cfg.model, plan, data=heal_data(h.data, cfg.data_dir), tokens=h.tokens, out=work,
               attn_distill=h.attn_distill, data_dir=cfg.data_dir, resume=True, student=r.dir / "converted",
               **h.options)
    return {"model": str(out)}


def _eval_stage(r: Run, models: dict[str, Path | None], base) -> dict:
    """Accuracy, WikiText-2 and held-out KL of each model (None: the base, `base()` loads it once) into
    RUN/eval/<name>.json; a model finished before an interruption is kept."""
    from ..corpus import heldout_rows
    from ..evaluate import Partition, evaluate, prepare_task
    from ..models import load_model
    from ..quality import heldout_metrics

    cfg, e = r.cfg, r.cfg.eval
    (r.dir / "eval").mkdir(exist_ok=True)
    done, todo = {}, {}
    for name, path in models.items():
        f = r.dir / "eval" / f"{name}.json"
        if f.is_file() and json.loads(f.read_text()).get("stage_hash") == r.hashes["eval"]:
            done[name] = str(f)  # finished before an interruption
        else:
            todo[name] = path
    if not todo:
        return done
    # Items and held-out rows are prepared once: converted and healed models keep the base's tokenizer.
    tok = base()[1]
    part = Partition("evaluation", cfg.analyze.selection_size, cfg.analyze.selection_seed)
    prepared = [prepare_task(tok, t, data_dir=cfg.data_dir, limit=e.limit, seed=e.seed, partition=part)
                for t in cfg.tasks]
    if e.wikitext_docs != 0:
        prepared.append(prepare_task(tok, "wikitext", data_dir=cfg.data_dir, limit=e.wikitext_docs, seed=e.seed))
    rows = (heldout_rows(tok, heal_data(cfg.heal.data, cfg.data_dir), e.heldout_tokens, e.heldout_seq_len)
            if e.heldout_tokens else None)
    dtype, device = parse_dtype(cfg.dtype), resolve_device(cfg.device)
    for name, path in todo.items():
        model = base()[0] if path is None else load_model(str(path), dtype=dtype, device=device)[0]
        res = evaluate(model, tok, [], prepared=prepared, batch_size=e.batch_size, per_item=True,
                       wikitext_max_length=e.wikitext_max_length)
        for t in res["tasks"].values():  # keep the mean gold margin under the task's column, not every item
            items = t.pop("items", None)
            if items:
                key = "margin_norm" if t["column"] == "acc_norm" else "margin"
                finite = [it[key] for it in items if math.isfinite(it[key])]
                t["mean_margin"] = sum(finite) / len(finite)
        if rows is not None:
            res["heldout"] = {k: v for k, v in heldout_metrics(base()[0], model, rows).items()
                              if k not in ("kl_rows", "nll_rows")}
        if e.retrieval_lengths:
            from ..evaluate.retrieval import score_families

            res["retrieval"] = score_families(model, tok, e.retrieval_lengths, e.retrieval_trials, cfg.data_dir)
        res["model"], res["stage_hash"] = str(path or cfg.model), r.hashes["eval"]
        f = r.dir / "eval" / f"{name}.json"
        f.write_text(json.dumps(res, indent=1))
        done[name] = str(f)
    return {n: done[n] for n in models}


def heal_data(data: str, data_dir) -> str:
    """`corpus` (or any relative name) resolves inside the data dir when it exists there."""
    from ..data import resolve_data_dir

    root = resolve_data_dir(data_dir)
    if root is not None and (root / data).exists():
        return str(root / data)
    return data
