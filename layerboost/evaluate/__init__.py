"""Zero-shot benchmarks scored exactly like lm-evaluation-harness 0.4.x, but faster.

What is identical to lm-eval 0.4.13 (`tests/test_lm_eval_parity.py` checks it against lm-eval):
prompts (task YAMLs `piqa`, `arc_easy`, `arc_challenge`, `winogrande`, `mmlu` 0-shot with its
per-subject description, `hellaswag` with its preprocessing), the target delimiter `" "`,
HFLM's tokenisation (trailing context whitespace moved into the continuation, context and
context+continuation encoded separately, BOS only where the tokenizer adds it, left
truncation to the model's max length), `acc`, `acc_norm` (log-likelihood divided by the
character length of the choice string: lm-eval's `len(choice)`, i.e. bytes for ASCII text),
their standard errors (sample std / sqrt(n); MMLU pooled over subjects), and `wikitext`
rolling-window word/byte perplexity and bits per byte.

What is faster: each item's shared token prefix (the context, and any common start of the
choices) goes through the model once with a KV cache, then all choices' remaining tokens go in
one batched call on the repeated cache; items of similar prefix length are batched together
(the batch's shortest prefix is the shared part, so no attention mask or position ids are ever
needed: this works for any causal LM whose cache supports `batch_repeat_interleave`, converted
hybrid models included); items whose choices are single tokens (MMLU) need one right-padded
forward and no cache; logits are projected only where a continuation token is scored.
`method="naive"` scores every choice on its own, like lm-eval (the reference). A model that
returns no repeatable cache is scored the naive way, with a warning.

Typical use::

    results = evaluate(model, tok, ["piqa", "arc_easy"], limit=100)
    print(format_table(results))

Many models on the same items (sensitivity analysis)::

    prepared = prepare_tasks(tok, ["piqa"], limit=200)
    for model in variants:
        scores = score_requests(model, prepared[0].requests)

The package, module by module: tasks (definitions), requests (items, samples, partition, tokenising),
scoring (log-likelihoods, perplexity), metrics, api (`evaluate`). Its command line is layerboost.cli.evaluate.
"""

from .api import evaluate, format_table
from .metrics import item_predictions, mc_metrics, mean_stderr, perplexity_metrics, pooled_sample_stderr
from .requests import (HFLMTokenizer, ItemScore, MCItem, MCRequest, Partition, PreparedTask, RollingRequest,
                       build_items, encode_items, load_task_docs, per_stratum_sample, prepare_task, prepare_tasks,
                       stratified_subsample, wikitext_detokenizer)
from .scoring import (CacheUnsupportedError, common_prefix_len, model_max_length, rolling_windows, score_requests,
                      score_rolling)
from .tasks import PAPER_TASKS, TASKS, MCTask, PerplexityTask, TaskError, get_task, load_task_spec

__all__ = ["CacheUnsupportedError", "HFLMTokenizer", "ItemScore", "MCItem", "MCRequest", "MCTask", "PAPER_TASKS",
           "Partition", "PerplexityTask", "PreparedTask", "RollingRequest", "TASKS", "TaskError",
           "build_items", "common_prefix_len", "encode_items", "evaluate", "format_table",
           "get_task", "item_predictions", "load_task_docs", "load_task_spec", "mc_metrics", "mean_stderr",
           "model_max_length", "per_stratum_sample", "perplexity_metrics", "pooled_sample_stderr", "prepare_task",
           "prepare_tasks", "rolling_windows", "score_requests", "score_rolling",
           "stratified_subsample", "wikitext_detokenizer"]
