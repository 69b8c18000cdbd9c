"""The comparison's settings: its rows, signals and sections, validated before any work starts."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ...evaluate.tasks import PAPER_TASKS
from ...util import UsageError, dtype_name
from ..run import config_from_dict, load_config, shipped_configs

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
    retrieval_lengths: list[int] = field(default_factory=list)  # pass key and fact-in-prose at these lengths; [] = skip
    retrieval_trials: int = 50  # per family and length (seed 0, evaluation text)


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
        from ...evaluate import get_task
        from ...heal import HealConfig, HealConfigError
        from ...sensitivity import PLAN_SCORES

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
        from ...evaluate.retrieval import settings_problems

        out += settings_problems(self.eval.retrieval_lengths, self.eval.retrieval_trials)
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
