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

from .config import ROWS, SIGNALS, CompareBench, CompareConfig, CompareEval, CompareHeal, split_seed
from .paired import pooled_items, significance, task_items
from .rows import iterative_plan, row_plans
from .runner import Comparison, compare
from .table import write_comparison

__all__ = ["ROWS", "SIGNALS", "CompareBench", "CompareConfig", "CompareEval", "CompareHeal", "Comparison", "compare",
           "iterative_plan", "pooled_items", "row_plans", "significance", "split_seed", "task_items", "write_comparison"]
