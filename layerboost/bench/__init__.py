"""Efficiency benchmarks: decode latency, memory and throughput, base vs hybrid in one run.

    layerboost bench latency    --model smollm2-135m --hybrid-kinds none:10,swa:10,softmax:10 --window 64
    layerboost bench throughput --random-config llama-1b --dtype bf16 --concurrency 50,100,200

Both models decode with `layerboost.engine.Engine` (static-shape decode over preallocated buffers;
`--compile`: the step through `torch.compile`, CUDA graphs on a GPU), one after the other in the
same process, alternating: latency alternates in chunks of decode steps, throughput per
concurrency level (the order flips every level). Rules: warm-up excluded (and timed apart: with
`--compile` it includes compiling), the device is synchronised before every clock read, medians
over repeats with min and max, theoretical cache bytes next to the measured ones, ratios printed
last. Timing and progress go to stderr; the table goes to stdout, JSON and PNG plots to `--out`.

Roofline columns: `step MB` = the bytes one decode step must read (weights it uses + the caches
holding the context, `Engine.step_bytes`), `GB/s` = those bytes / the measured step time, and on
a GPU `%copy` = that over the device's copy bandwidth (1 GiB device-to-device copies, read +
write, measured once). The ratios put hybrid/base step time next to hybrid/base step bytes.

Latency methods (each timed run of steps reads a span of slots that ends where the run ends,
`Engine.span`: a step costs what it costs in an engine sized for that context):
    full     decode every token: one decode of the longest length per repeat, clock read at each
             requested length (the time to decode L tokens does not depend on decoding more later)
    sampled  (`--sample-steps S`) time S decode steps ending at each requested length (the engine
             jumps to that position; per-step cost does not depend on cache values), and estimate
             the total as the sum over every position of the per-step time interpolated linearly
             between the samples (attention is linear in the context, the rest is constant). For
             CPUs, where decoding 4096 tokens at batch 16 takes most of an hour per model.

Throughput: C sequences decoded as one static batch for `--output` tokens after a `--prompt`
token prompt: tokens/s = C * output / decode time (prefill reported separately, and end to end).
`--prefill shared` runs the prompt once at batch 1 and copies its cache into all C rows (decode
work is identical; the CPU default, where prefilling C long prompts would take minutes);
`batched` prefills all C prompts. A level that does not fit is recorded, not fatal: on a GPU a
`torch.OutOfMemoryError`; on the CPU the cache would exceed `--memory-budget-gb` (the run does not
allocate it, so a shared machine is never pushed into the kernel's OOM killer).

The package, module by module: models (what is measured), measure (how), output (tables, figures, files). Its command line is layerboost.cli.bench.
"""

from .measure import bench_latency, bench_throughput, copy_bandwidth_gbps, peak_rss_bytes, roofline, stats
from .models import (RANDOM_CONFIGS, SCHEMA_VERSION, BenchError, hybrid_of, hybrid_plan, interleave, kinds_string,
                     load_models, parse_kinds, random_model)
from .output import (bench_side_by_side, latency_table, plot_latency, plot_throughput, read_accuracy, save_result,
                     throughput_table)
from ..util import environment

__all__ = ["BenchError", "RANDOM_CONFIGS", "SCHEMA_VERSION", "bench_latency",
           "bench_side_by_side", "bench_throughput", "copy_bandwidth_gbps", "environment", "hybrid_of", "hybrid_plan",
           "interleave", "kinds_string", "latency_table", "load_models", "parse_kinds", "peak_rss_bytes",
           "plot_latency", "plot_throughput", "random_model", "read_accuracy", "roofline",
           "save_result", "stats", "throughput_table"]
