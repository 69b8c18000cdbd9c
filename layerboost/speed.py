"""A speed model of a serving engine: what one decode step costs per layer kind against context length, fitted
to a handful of benchmark runs on this machine, so that any plan's decode tokens/s at depth L is predicted
without building it.

One decode step of a plan at depth L (the tokens already in the cache), N sequences decoded together, costs

    t = c[arch] + c_attn * (layers that attend) + c_tok * sum(tokens each attending layer reads)
                                                + c_cell * sum(cache cells each attending layer scans)

`c[arch]` holds everything every plan pays (embedding, the MLPs, the LM head) for the file's architecture
(llama.cpp runs the same weights 3-9% slower as `deci` than as `llama`); `c_attn` the q/k/v/o projections of a
layer that attends; `c_tok` the attention over the keys a query sees; `c_cell` the cache cells an engine walks
whether or not the mask hides them. A softmax layer reads L tokens; a swa layer min(L, W). llama.cpp scans
whole cache cells: its unified cache in steps of 256 (`cells_full`), a sliding-window layer's own cache of
PAD256(W * N + n_ubatch) cells (`cells_window`, measured: docs/experiments/speed.md). layerboost's engine
reads exactly what the mask keeps (cells = tokens), so its model has no `c_cell`. Each N has its own
coefficients: batching changes what is memory-bound.

A fit is keyed by what its numbers depend on (machine, engine build, model shape, weight type, threads,
flash attention, micro-batch) and cached under `~/.cache/layerboost/speed/` (`LAYERBOOST_CACHE`), so one
calibration serves every later plan on the same machine and build.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import kinds as K
from .plan import LayerPlan, LayerSpec

SCHEMA_VERSION = 1
ENGINES = ("llama.cpp", "layerboost")
PAD = 256  # llama.cpp sizes and scans its caches in steps of 256 cells (flash attention on)


class SpeedModelError(ValueError):
    """No speed model fits the request (none calibrated, or the request is outside what was calibrated)."""


def _pad(n: int, to: int = PAD) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class Geometry:
    """What the engine scans per layer: `ubatch` is llama.cpp's micro-batch (its window caches hold W * N +
    ubatch cells); `cells` False for an engine that reads only the unmasked keys (layerboost's)."""

    engine: str
    ubatch: int = 512
    cells: bool = True
    model_type: str = "llama"

    def read(self, spec: LayerSpec, depth: int) -> int:
        """Keys one query of this layer attends to at `depth`: what the kind caches (0 for a layer without attention)."""
        return K.kind(spec.kind).cached_tokens(spec, depth)

    def scanned(self, spec: LayerSpec, depth: int, parallel: int) -> int:
        """Cache cells the engine walks for one query (masked cells included)."""
        if spec.kind == "none":
            return 0
        if not self.cells:
            return self.read(spec, depth)
        full = _pad(max(depth, 1))
        return min(full, _pad(spec.window * parallel + self.ubatch)) if spec.window else full

    def kv_cells(self, spec: LayerSpec, context: int, parallel: int = 1) -> int:
        """Cache cells the engine allocates for this layer at a `context` per sequence, all sequences together."""
        if spec.kind == "none" or not self.cells:
            return parallel * self.read(spec, context)
        full = _pad(context * parallel)
        return min(full, _pad(spec.window * parallel + self.ubatch)) if spec.window else full

    def features(self, plan: LayerPlan, depth: int, parallel: int = 1) -> dict[str, float]:
        """The model's regressors for one decode step of `plan` at `depth` (see the module docstring)."""
        from .export_gguf import DECI_SWA, gguf_arch

        arch = gguf_arch(plan, self.model_type) if self.engine == "llama.cpp" else "layerboost"
        arch = "deci" if arch == DECI_SWA else arch  # the same graph as deci, windows on: one overhead
        attending = [s for s in plan.layers if s.kind != "none"]
        out = {f"arch:{arch}": 1.0, "attn": float(len(attending)),
               "tok": float(sum(self.read(s, depth) for s in attending))}
        if self.cells:
            out["cell"] = float(sum(self.scanned(s, depth, parallel) for s in attending))
        return out


def _solve(rows: list[dict[str, float]], y: list[float], names: list[str]) -> dict[str, float]:
    """Least squares with every coefficient >= 0: a negative coefficient's regressor is dropped and the rest refitted
    (an active set; a negative cost has no physical reading). Rows are weighted by 1 / y so that the fit is in
    relative error, the unit the predictions are judged in."""
    import numpy as np

    active = list(names)
    while True:
        X = np.array([[r.get(n, 0.0) / t for n in active] for r, t in zip(rows, y)])
        coef, *_ = np.linalg.lstsq(X, np.ones(len(y)), rcond=None)
        negative = [n for n, c in zip(active, coef) if c < 0 and not n.startswith("arch:")]
        if not negative:
            return {n: float(c) for n, c in zip(active, coef)} | {n: 0.0 for n in names if n not in active}
        active.remove(min(negative, key=lambda n: coef[active.index(n)]))


@dataclass
class SpeedModel:
    """Fitted decode-step costs of one engine on one machine for one model shape (see the module docstring).

    Attributes:
        key: what the numbers depend on (machine, engine build, model shape, type, threads, ...).
        coef: parallel sequences (as a string, JSON keys) -> regressor -> seconds.
        records: the calibration measurements the fit used ({"plan", "depth", "parallel", "tok_s"}).
    """

    engine: str
    key: dict
    geometry: Geometry
    coef: dict[str, dict[str, float]] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    # ---- fitting ------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, engine: str, key: dict, geometry: Geometry, records: list[dict]) -> "SpeedModel":
        """Fit one coefficient set per parallel level to `records` (tokens/s per sequence of plans at depths).

        Raises:
            SpeedModelError: a parallel level with fewer measurements than regressors.
        """
        model = cls(engine, key, geometry, {}, list(records))
        for n in sorted({r["parallel"] for r in records}):
            recs = [r for r in records if r["parallel"] == n]
            rows = [geometry.features(LayerPlan.from_dict(r["plan"]), r["depth"], n) for r in recs]
            names = sorted({k for row in rows for k in row})
            if len(recs) < len(names) + 2:
                raise SpeedModelError(f"{len(recs)} measurements at {n} parallel sequence(s) cannot fit "
                                      f"{len(names)} costs: calibrate more plans or depths")
            model.coef[str(n)] = _solve(rows, [1.0 / r["tok_s"] for r in recs], names)
        return model

    # ---- predicting -----------------------------------------------------------------------------------------
    def step_s(self, plan: LayerPlan, depth: int, parallel: int = 1) -> float:
        """Predicted seconds of one decode step (all `parallel` sequences) at `depth` tokens of context."""
        coef = self.coef.get(str(parallel))
        if coef is None:
            raise SpeedModelError(f"this speed model was calibrated at {', '.join(self.coef)} parallel sequence(s), "
                                  f"not {parallel}: calibrate with --parallel {parallel}")
        feats = self.geometry.features(plan, depth, parallel)
        missing = [f for f in feats if f not in coef]
        if missing:
            raise SpeedModelError(f"this speed model has no cost for {missing[0]} (no calibration plan of that "
                                  "architecture): recalibrate")
        return sum(coef[f] * v for f, v in feats.items())

    def tok_s(self, plan: LayerPlan, depth: int, parallel: int = 1) -> float:
        """Predicted decode tokens/s per sequence at `depth` (llama-bench's tg and batched-bench's S_TG / N)."""
        return 1.0 / self.step_s(plan, depth, parallel)

    def speedup(self, plan: LayerPlan, base: LayerPlan, depth: int, parallel: int = 1) -> float:
        return self.step_s(base, depth, parallel) / self.step_s(plan, depth, parallel)

    def kv_bytes(self, plan: LayerPlan, context: int, bytes_per_cell: int, parallel: int = 1) -> int:
        """KV-cache bytes the engine allocates for `plan` at `context` tokens per sequence."""
        return bytes_per_cell * sum(self.geometry.kv_cells(s, context, parallel) for s in plan.layers)

    def depths(self) -> list[int]:
        return sorted({r["depth"] for r in self.records})

    def residuals(self) -> list[dict]:
        """Each calibration record with the model's prediction and relative error."""
        out = []
        for r in self.records:
            p = self.tok_s(LayerPlan.from_dict(r["plan"]), r["depth"], r["parallel"])
            out.append({**r, "predicted": p, "error": p / r["tok_s"] - 1})
        return out

    # ---- storage ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "engine": self.engine, "key": self.key,
                "geometry": asdict(self.geometry), "coef": self.coef, "records": self.records}

    @classmethod
    def from_dict(cls, d: dict) -> "SpeedModel":
        if d.get("schema_version") != SCHEMA_VERSION:
            raise SpeedModelError(f"speed model schema {d.get('schema_version')} is not {SCHEMA_VERSION}: recalibrate")
        return cls(d["engine"], d["key"], Geometry(**d["geometry"]), d["coef"], d["records"])

    def save(self, path: str | os.PathLike) -> Path:
        from .util import write_json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SpeedModel":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise SpeedModelError(f"cannot read the speed model {path}: {e}") from e


# ---- keys and the cache ------------------------------------------------------------------------------------


def model_shape(config) -> dict:
    """The parts of a model's config that set its decode cost."""
    heads = config.num_attention_heads
    return {"model_type": config.model_type, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "heads": heads, "kv_heads": config.num_key_value_heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "intermediate": config.intermediate_size, "vocab": config.vocab_size}


def bytes_per_cell(config, kv_type: str = "f16") -> int:
    """Bytes one cached token takes in one layer (keys and values): llama.cpp's default cache is f16."""
    s = model_shape(config)
    return 2 * s["kv_heads"] * s["head_dim"] * {"f16": 2, "bf16": 2, "f32": 4, "float32": 4, "float16": 2}[kv_type]


def cache_dir() -> Path:
    root = os.environ.get("LAYERBOOST_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "layerboost") / "speed"


def key_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{key['engine']}-{digest}.json"


def machine() -> dict:
    from .util import cpu_name

    return {"cpu": cpu_name(), "cpu_count": os.cpu_count()}


def llama_cpp_build() -> dict:
    """The llama.cpp tools' build: llama-bench's version line, a digest of its binary (a rebuild from other sources
    or with other flags changes it) and of the patch engines/llama.cpp/build.sh applied."""
    import subprocess

    from .llama_cpp import tool, tools_dir

    bench = tool("llama-bench")
    out = subprocess.run([str(bench), "--version"], capture_output=True, text=True)
    version = (out.stdout + out.stderr).strip().splitlines()
    patch = tools_dir().parent / "applied.patch"
    return {"version": version[0] if version else "unknown",
            "binary": hashlib.sha256(bench.resolve().read_bytes()).hexdigest()[:16],
            "patch": hashlib.sha256(patch.read_bytes()).hexdigest()[:16] if patch.is_file() else None}


def llama_cpp_key(config, gguf_type: str = "f32", threads: int = 2, ubatch: int = 512) -> dict:
    return {"engine": "llama.cpp", "machine": machine(), "build": llama_cpp_build(), "model": model_shape(config),
            "type": gguf_type, "threads": threads, "flash_attn": True, "ubatch": ubatch}


def for_policy(policy, config, *, model: str, gguf_type: str = "f32", threads: int = 2):
    """(speed model, cache geometry) the speed policy `policy` needs for its target: the cached llama.cpp or
    layerboost-engine model when it asks for a speedup (None otherwise), and how the target allocates its cache
    (None: exactly the tokens each kind keeps). `model` names the model in the hint to calibrate.

    Raises:
        SpeedModelError: a speedup target with no calibrated model, or for an engine without a speed model.
        LlamaCppMissing: the llama.cpp tools (whose build keys the model) are not built.
    """
    if policy.target not in ("llama.cpp", "layerboost"):
        if policy.speedup is not None:
            raise SpeedModelError(f"target {policy.target} has no speed model: plan a speedup for llama.cpp or layerboost")
        return None, None
    geometry = Geometry("llama.cpp", model_type=config.model_type) if policy.target == "llama.cpp" else None
    if policy.speedup is None:
        return None, geometry
    if policy.target == "llama.cpp":
        key, hint = llama_cpp_key(config, gguf_type, threads), f"--type {gguf_type}"
    else:
        key, hint = layerboost_key(config, "float32", threads, "cpu"), f"--engine layerboost --threads {threads}"
    return require(key, f"layerboost speed calibrate --model {model} {hint}"), geometry


def cached(key: dict) -> SpeedModel | None:
    path = key_path(key)
    return SpeedModel.load(path) if path.is_file() else None


def require(key: dict, hint: str) -> SpeedModel:
    """The cached model of `key`, or SpeedModelError naming the command that calibrates it."""
    model = cached(key)
    if model is None:
        raise SpeedModelError(f"no {key['engine']} speed model for this machine, build and model shape "
                              f"(looked for {key_path(key)}): calibrate it first with `{hint}`")
    return model


# ---- calibration plans -------------------------------------------------------------------------------------


def calibration_plans(n_layers: int, engine: str) -> dict[str, LayerPlan]:
    """The few plans a calibration measures: the base, every layer but the first without attention, every layer but
    the first sliding at a small and a large window, and (llama.cpp) the base as `deci` and a softmax + swa
    plan (its own architecture, granite_swa). Layer 0 keeps softmax (llama.cpp reads head sizes there)."""
    S, N = LayerSpec("softmax"), LayerSpec("none")

    def rest(spec, last=None):  # softmax, then `spec` (the last layer `last` when given)
        return LayerPlan((S,) + (spec,) * (n_layers - 2) + (last or spec,))

    # On llama.cpp a plan of softmax + swa is written as granite_swa and one with none as deci (export_gguf), so the
    # swa plans end in one none layer to measure deci's windows, and granite_swa has a plan of its own.
    plans = {"base": LayerPlan.uniform("softmax", n_layers), "none": rest(N),
             "swa64": rest(LayerSpec("swa", 64), N), "swa1024": rest(LayerSpec("swa", 1024), N)}
    if engine == "llama.cpp":
        plans["base_deci"] = LayerPlan((S,) * (n_layers - 1) + (N,))  # the base's layers as a deci file
        plans["granite256"] = rest(LayerSpec("swa", 256))
    return plans


def validation_plans(n_layers: int) -> dict[str, LayerPlan]:
    """Plans no calibration uses, across the architectures and windows (their counts scale with `n_layers`)."""
    from .plan import spread

    def mix(s, w, none, window):
        k = spread({"softmax": s, "swa": w, "none": none}, pin_softmax_ends=False)
        return LayerPlan.from_kinds(k, window=window)

    third = n_layers // 3
    return {
        "10/10/10 w64": mix(third, third, n_layers - 2 * third, 64),
        "5/25 w512": mix(n_layers // 6, n_layers - n_layers // 6, 0, 512),
        "20/10 none": mix(n_layers - third, 0, third, None),
        "10/20 w256": mix(third, n_layers - third, 0, 256),
        "15/5/10 w1024": mix(n_layers // 2, n_layers // 6, n_layers - n_layers // 2 - n_layers // 6, 1024),
        "7/13/10 w128": mix(n_layers // 4, n_layers - n_layers // 4 - third, third, 128),
    }


# ---- measuring in llama.cpp ----------------------------------------------------------------------------------


def measure_llama_cpp(files: dict[str, Path], plans: dict[str, LayerPlan], depths, parallel=(1,), rounds: int = 2,
                      n_gen: int = 64, reps: int = 2, threads: int = 2, log=print) -> list[dict]:
    """Decode tokens/s per sequence of each file at each depth: llama-bench (tg n_gen, `reps` repetitions) for 1
    sequence, llama-batched-bench for more (prompts of `depth` tokens). The loop is depth-major: every file is
    measured at one depth before the next depth, and rounds repeat the whole sweep, so the minutes-long drift of a
    shared machine (8% between two llama-bench runs of the same file, measured) hits every plan at a depth alike.
    A record holds the median of every repetition of every round. Its depth is the mean depth of the decoded
    tokens (depth + n_gen / 2)."""
    from .llama_cpp import batched_bench, bench

    got: dict = {}
    many = [p for p in parallel if p > 1]
    for r in range(rounds):
        for d in depths:
            for name, path in files.items():
                if 1 in parallel:
                    for row in bench(path, depths=(d,), n_gen=n_gen, reps=reps, threads=threads):
                        got.setdefault((name, d, 1), []).extend(row.get("samples_ts") or [row["avg_ts"]])
                for row in batched_bench(path, parallel=many, n_prompt=max(d, 1), n_gen=n_gen, threads=threads) if many else ():
                    got.setdefault((name, d, row["pl"]), []).append(row["speed_tg"] / row["pl"])
            log(f"round {r + 1}/{rounds}: depth {d}")
    return [{"name": name, "plan": plans[name].to_dict(), "depth": d + n_gen // 2, "bench_depth": d, "parallel": p,
             "tok_s": statistics.median(v), "samples": v} for (name, d, p), v in sorted(got.items())]


def write_plan_ggufs(model, tokenizer, plans: dict[str, LayerPlan], folder: Path, gguf_type: str) -> dict[str, Path]:
    """One GGUF file per plan (the model converted, unhealed: speed does not depend on the weights). A file already
    there is reused: its name holds the plan's name, a digest of the model's shape and of the plan itself, and the
    type, so a folder shared by two models, or a plan placed again under its old name, never serves a stale file."""
    import copy

    from .export_gguf import write_gguf
    from .surgery import convert

    folder.mkdir(parents=True, exist_ok=True)
    shape = hashlib.sha256(json.dumps(model_shape(model.config), sort_keys=True).encode()).hexdigest()[:8]
    files = {}
    for name, plan in plans.items():
        layout = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:6]
        path = folder / (name.replace("/", "-").replace(" ", "_") + f"-{shape}{layout}-{gguf_type}.gguf")
        if not path.exists():
            m = model
            if set(plan.kinds) != {"softmax"}:
                m = copy.deepcopy(model)
                convert(m, plan)
            write_gguf(m, tokenizer, path, gguf_type)
        files[name] = path
    return files


def calibrate_llama_cpp(model, tokenizer, work: Path, *, depths=(0, 1024, 4096, 8192), parallel=(1,),
                        rounds: int = 2, gguf_type: str = "f32", threads: int = 2, log=print) -> SpeedModel:
    """Measure the calibration plans in llama.cpp, fit, cache and return the model."""
    key = llama_cpp_key(model.config, gguf_type, threads)
    plans = calibration_plans(model.config.num_hidden_layers, "llama.cpp")
    files = write_plan_ggufs(model, tokenizer, plans, work, gguf_type)
    records = measure_llama_cpp(files, plans, depths, parallel, rounds, threads=threads, log=log)
    fitted = SpeedModel.fit("llama.cpp", key, Geometry("llama.cpp", ubatch=key["ubatch"]), records)
    fitted.save(key_path(key))
    return fitted


def check_against(fitted: SpeedModel, records: list[dict], base: LayerPlan) -> list[dict]:
    """Predicted against measured tokens/s (and speedup over `base` measured in the same records) per record."""
    base_rec = {(r["depth"], r["parallel"]): r["tok_s"] for r in records if LayerPlan.from_dict(r["plan"]) == base}
    out = []
    for r in records:
        plan = LayerPlan.from_dict(r["plan"])
        pred = fitted.tok_s(plan, r["depth"], r["parallel"])
        row = {"name": r["name"], "depth": r["bench_depth"], "parallel": r["parallel"], "measured": r["tok_s"],
               "predicted": pred, "error": pred / r["tok_s"] - 1}
        b = base_rec.get((r["depth"], r["parallel"]))
        if b:
            row |= {"measured_speedup": r["tok_s"] / b, "predicted_speedup": fitted.speedup(plan, base, r["depth"],
                                                                                              r["parallel"])}
        out.append(row)
    return out


# ---- measuring in layerboost's own engine ------------------------------------------------------------------


def layerboost_key(config, dtype: str = "float32", threads: int | None = None, device: str = "cpu") -> dict:
    import torch

    return {"engine": "layerboost", "machine": machine(), "build": {"torch": torch.__version__}, "model": model_shape(config),
            "type": dtype, "threads": threads or torch.get_num_threads(), "device": device}


def measure_layerboost(model, plans: dict[str, LayerPlan], depths, parallel=(1,), rounds: int = 2, steps: int = 8,
                       log=print) -> list[dict]:
    """Decode tokens/s per sequence of each plan in layerboost's engine (`Engine`, static buffers), `steps` timed
    decode steps after `depth` positions (a step's cost depends on the span it reads, not on the values there, as
    `bench latency --sample-steps` measures). Plans alternate round by round; the median of the rounds. The
    model is converted to each plan in turn (a copy), so weights do not matter: speed is all that is read."""
    import copy

    from .bench.measure import random_prompt, timed_decode, timed_prefill
    from .engine import Engine
    from .surgery import convert

    device = next(model.parameters()).device
    tmax = max(depths) + steps + 1
    variants = {}
    for name, plan in plans.items():
        m = model
        if set(plan.kinds) != {"softmax"}:
            m = copy.deepcopy(model)
            convert(m, plan)
        variants[name] = m
    got: dict = {}
    for r in range(rounds):
        for n in parallel:
            for name, m in variants.items():
                e = Engine(m, n, tmax)
                token, _ = timed_prefill(e, random_prompt(m.config.vocab_size, n, 4, device), device)
                token, _ = timed_decode(e, token, 2, device)  # warm-up
                for d in depths:
                    e.span, e.pos = d + steps, d
                    token, dt = timed_decode(e, token, steps, device)
                    got.setdefault((name, d, n), []).append(steps / dt)
                del e
            log(f"round {r + 1}/{rounds}: {n} sequence(s)")
    return [{"name": name, "plan": plans[name].to_dict(), "depth": d + steps // 2, "bench_depth": d, "parallel": n,
             "tok_s": statistics.median(v), "samples": v} for (name, d, n), v in sorted(got.items())]


def calibrate_layerboost(model, *, depths=(0, 1024, 2048, 4096, 8192), parallel=(1,), rounds: int = 2,
                         log=print) -> SpeedModel:
    """Measure the calibration plans in layerboost's engine, fit, cache and return the model."""
    from .util import dtype_name

    p = next(model.parameters())
    key = layerboost_key(model.config, dtype_name(p.dtype), device=p.device.type)
    plans = calibration_plans(model.config.num_hidden_layers, "layerboost")
    records = measure_layerboost(model, plans, depths, parallel, rounds, log=log)
    fitted = SpeedModel.fit("layerboost", key, Geometry("layerboost", cells=False), records)
    fitted.save(key_path(key))
    return fitted
