"""The comparison folder, row by row: shared inputs once, then each row's continuous measures and accuracy,
each written as soon as it is measured so a killed run resumes where it stopped."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import yaml

from ...util import dtype_name, parse_dtype, read_json, resolve_device, write_json
from ..run import ConfigError
from .config import ACCURACY_ONLY, CURVE_ROWS, CompareConfig, split_seed
from .paired import task_items
from .rows import iterative_plan, plan_hash, row_plans
from .table import write_comparison


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data, default=str)


class Comparison:
    """The comparison folder: shared inputs (analysis, prepared items, held-out rows) and one JSON per row."""

    def __init__(self, cfg: CompareConfig, log=print):
        from ...models import load_model

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
        from ...heal import HealConfig

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
        from ...sensitivity import analyze, load_sensitivity

        f = self.dir / "analyze" / "sensitivity.json"
        if f.is_file():
            return load_sensitivity(f)
        c = self.cfg
        self.log(f"[analyze] selection partition: {c.selection_size} documents per task (seed {c.selection_seed})")
        return analyze(self.base, self.tok, c.tasks, out_dir=self.dir / "analyze", limit=c.analyze_limit, seed=0,
                       data_dir=c.data_dir, proxies=True, calib_seqs=c.calib_seqs, selection_size=c.selection_size,
                       selection_seed=c.selection_seed)

    def prepared(self):
        from ...evaluate import Partition, prepare_task

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
        from ...corpus import heldout_rows
        from ..run import heal_data

        if not hasattr(self, "_heldout"):
            e = self.cfg.eval
            self._heldout = heldout_rows(self.tok, heal_data(self.cfg.heal.data, self.cfg.data_dir), e.heldout_tokens,
                                         e.heldout_seq_len)
        return self._heldout

    # ---- one row ---------------------------------------------------------------------------------
    def model_for(self, name: str, plan, heal_mode: str | None):
        """The row's model: the base, a converted copy, or the healed hybrid (healing resumes)."""
        from ... import convert, load
        from ...heal import heal
        from ..run import heal_data

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
            res = read_json(f)
            if res is None:
                res = {**task_items(model, self.tok, prep, self.cfg.eval.batch_size),
                       "mmlu_per_subject": self.cfg.eval.mmlu_per_subject if prep.task.name == "mmlu" else None,
                       "dtype": dtype_name(next(model.parameters()).dtype)}
                _write(f, res)
            out[prep.task.name] = res
        return out

    def retrieval_row(self, model) -> dict:
        """{"retrieval": {family: score_retrieval(...)}} at eval.retrieval_lengths (empty when none are asked for)."""
        from ...evaluate.retrieval import score_families

        e = self.cfg.eval
        if not e.retrieval_lengths:
            return {}
        return {"retrieval": score_families(model, self.tok, e.retrieval_lengths, e.retrieval_trials, self.cfg.data_dir)}

    def wikitext_row(self, name: str, model) -> dict:
        from ...evaluate import perplexity_metrics, score_rolling

        f = self.dir / "rows" / name / "wikitext.json"
        res = read_json(f)
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
        from ...bench import bench_latency, hybrid_of

        b = self.cfg.bench
        if not b.enabled:
            return None
        if plan is None:
            return {"speedup": 1.0, "kv_ratio": 1.0}
        f = self.dir / "bench" / f"{plan_hash(plan)}.json"
        res = read_json(f)
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
        from ...quality import heldout_metrics

        f = self.dir / "rows" / f"{name}.json"
        done = read_json(f)
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
            res.update(self.retrieval_row(model))
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
        it_plan = iterative_plan(self.base, self.tok, c, self.dir / "iterative") if "signal_iterative" in c.rows else None
        plans = row_plans(c, sens, self.base.config, it_plan)
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


def compare(config: str | CompareConfig | None = None, log=print) -> Path:
    """Run (or resume) a comparison; returns the path of comparison.md."""
    cfg = config if isinstance(config, CompareConfig) else CompareConfig.load(config)
    return Comparison(cfg, log).run()
