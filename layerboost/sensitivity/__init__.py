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

The package, module by module: store (files), items (the layer pass on items), proxies, iterative,
ranking (scores and rankings a plan uses), analysis (`analyze`)."""

from .store import SCHEMA1_KEYS, SCHEMA_VERSION, AnalysisError, load_sensitivity, check_analysis_dir, LayerResult, Store
from .items import PackedItem, items_from_tasks, Seqs, pack, LayerRunner, variant, loglikelihoods, read_outputs, item_scores, mean_se, compare_scores, layer_sensitivity
from .proxies import base_logprobs, kl_proxy, cosine_proxy, spearman, calibration_tokens
from .iterative import iterative_removal, iterative_proxy, remove_iteratively, ranking_disagreements, check_steps
from .ranking import PLAN_SCORES, PROXY_SCORES, plan_scores, ranking_used, auto_measures, iterative_steps_for, iterative_problems, iterative_scores
from .analysis import analyze, sensitivity_table

__all__ = ["AnalysisError", "LayerResult", "LayerRunner", "PLAN_SCORES", "PROXY_SCORES", "PackedItem", "SCHEMA1_KEYS", "SCHEMA_VERSION", "Seqs", "Store", "analyze", "auto_measures", "base_logprobs", "calibration_tokens", "check_analysis_dir", "check_steps", "compare_scores", "cosine_proxy", "item_scores", "items_from_tasks", "iterative_problems", "iterative_proxy", "iterative_removal", "iterative_scores", "iterative_steps_for", "kl_proxy", "layer_sensitivity", "load_sensitivity", "loglikelihoods", "mean_se", "pack", "plan_scores", "ranking_disagreements", "ranking_used", "read_outputs", "remove_iteratively", "sensitivity_table", "spearman", "variant"]
