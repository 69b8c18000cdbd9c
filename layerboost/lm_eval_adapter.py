"""lm-evaluation-harness model `layerboost`: run lm-eval itself on any model `load_model` reads.

`path` is anything `layerboost.models.load_model` accepts: a converted layerboost folder, a
Hugging Face folder, a `.gguf` file, `smollm2-135m`, or a hub id. Other `model_args` (e.g.
`batch_size`, `max_length`) go to lm-eval's `HFLM`, which scores the loaded model object.

How lm-eval finds it: lm-eval 0.4.13 has no plugin or entry-point discovery for models (its
registry only knows the built-in `MODEL_MAPPING` and classes registered by code that has been
imported), so the plain `lm_eval --model layerboost` cannot see this class. Use this module as
the command line instead; it registers the model and then runs lm-eval's own CLI unchanged::

    python -m layerboost.lm_eval_adapter run --model layerboost --model_args path=DIR --tasks piqa

(`run` is lm-eval's sub-command; the usual `lm_eval` flags such as `--include_path`, `--limit`,
`--batch_size`, `--output_path` work as usual.) From Python, import this module first::

    import lm_eval, layerboost.lm_eval_adapter
    lm_eval.simple_evaluate(model="layerboost", model_args="path=DIR", tasks=["piqa"])
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import lm_eval
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .models import load_model
from .util import UsageError, parse_dtype, resolve_device


@register_model("layerboost")
class LayerBoostLM(HFLM):
    """`HFLM` over a model loaded by `layerboost.models.load_model`.

    Args:
        path: model folder, `.gguf` file, embedded model name or hub id.
        dtype: `float32` (default; also for lm-eval's `auto`), `bfloat16` or `float16` (or fp32 / bf16 / fp16).
        device: torch device (default: CUDA if available, else CPU; an unavailable CUDA device
            falls back to the CPU with a warning, since lm-eval's CLI passes `cuda:0` by default).
        **kwargs: passed to `HFLM` (batch_size, max_length, ...).

    Raises:
        ValueError: unknown dtype.
        layerboost.models.ModelLoadError: the path cannot be loaded.
    """

    def __init__(self, path: str, dtype: str = "float32", device: str | None = None, **kwargs):
        try:  # lm-eval passes dtype "auto" unless told otherwise: float32 here
            torch_dtype = parse_dtype("float32" if str(dtype) == "auto" else str(dtype))
        except UsageError as e:
            raise ValueError(str(e)) from None
        device = str(device) if device else resolve_device("auto")
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes device="cuda:0" unless told otherwise; say so instead of crashing
            warnings.warn(f"device {device!r} requested but CUDA is unavailable: using the CPU (pass --device cpu)", stacklevel=2)
            device = "cpu"
        model, tok = load_model(str(path), dtype=torch_dtype, device=device)
        super().__init__(pretrained=model, tokenizer=tok, **kwargs)


LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


def official_task_yaml(task: str) -> Path:
    """lm-eval's own YAML for one of our task names (`mmlu_<subject>` for MMLU subjects).

    Raises:
        FileNotFoundError: lm-eval ships no such task.
    """
    if task.startswith("mmlu_"):
        path = LM_EVAL_TASKS / "mmlu" / "default" / f"{task}.yaml"
    elif task == "winogrande":  # the file name differs between lm-eval releases
        path = next((p for p in (LM_EVAL_TASKS / "winogrande").glob("*.yaml") if "task: winogrande" in p.read_text()), None)
    else:
        folder = "arc" if task.startswith("arc_") else task
        path = LM_EVAL_TASKS / folder / f"{task}.yaml"
    if path is None or not path.is_file():
        raise FileNotFoundError(f"lm-eval {lm_eval.__version__} has no task YAML for {task!r} under {LM_EVAL_TASKS}")
    return path


def _write_task(out_dir: Path, name: str, official: Path, docs: list[dict]) -> None:
    data = out_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    # lm-eval's own task definition; only where the documents come from is replaced
    (out_dir / f"{name}.yaml").write_text(
        f"include: {official}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\nfewshot_split: null\n"
    )


def write_local_tasks(selected: dict[str, list[dict]], out_dir: str | Path, prefix: str = "lb_") -> dict[str, list[tuple[str, list[int]]]]:
    """Write lm-eval task YAMLs that run lm-eval's official tasks on the given documents.

    Each task gets a JSONL copy of its documents and a YAML that includes lm-eval's own YAML
    (prompt, choices, metrics) with only the dataset replaced. MMLU documents are split into
    lm-eval's per-subject tasks (each with its subject description) under a size-weighted group
    `<prefix>mmlu`, as lm-eval's `mmlu` group aggregates them.

    Args:
        selected: our task name (`piqa`, `arc_easy`, `arc_challenge`, `winogrande`, `mmlu`,
            `hellaswag`, `wikitext`) -> raw documents in the HF schema (wikitext: `{"page": ...}`).
        out_dir: folder for the YAML and JSONL files (pass it as lm-eval's `include_path`).
        prefix: prefix of the generated task names.

    Returns:
        Our task name -> [(lm-eval task name, positions of its documents in `selected[task]`)];
        run `task_names_to_run(result)` with lm-eval.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, list[tuple[str, list[int]]]] = {}
    for task, docs in selected.items():
        if task != "mmlu":
            _write_task(out_dir, prefix + task, official_task_yaml(task), docs)
            mapping[task] = [(prefix + task, list(range(len(docs))))]
            continue
        by_subject: dict[str, list[int]] = {}
        for pos, d in enumerate(docs):
            by_subject.setdefault(d["subject"], []).append(pos)
        mapping[task] = []
        for subject, positions in sorted(by_subject.items()):
            name = f"{prefix}mmlu_{subject}"
            _write_task(out_dir, name, official_task_yaml(f"mmlu_{subject}"), [docs[p] for p in positions])
            mapping[task].append((name, positions))
        members = "".join(f"  - {n}\n" for n, _ in mapping[task])
        (out_dir / f"{prefix}mmlu_group.yaml").write_text(
            f"group: {prefix}mmlu\ntask:\n{members}aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
        )
    return mapping


def task_names_to_run(mapping: dict[str, list[tuple[str, list[int]]]], prefix: str = "lb_") -> list[str]:
    """lm-eval task names for a `write_local_tasks` result (the MMLU group instead of its subjects)."""
    return [f"{prefix}mmlu" if task == "mmlu" else pairs[0][0] for task, pairs in mapping.items()]


SHIPPED = ("piqa", "arc_easy", "arc_challenge", "winogrande", "mmlu")  # tasks whose data layerboost reads locally


def _option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _set_option(argv: list[str], name: str, value: str) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if not a.startswith(name + "="):
            out.append(a)
    return [*out, name, value]


def prepare_argv(argv: list[str]) -> list[str]:
    """lm-eval's arguments, checked and made to work offline: the model path must exist; with the hub offline
    (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or `--data-dir` given, the shipped tasks (piqa, arc_easy, arc_challenge,
    winogrande, mmlu) run lm-eval's own task definitions on the local data: their full evaluation splits are
    written as local task copies (`lb_<task>`) and `--include_path` points lm-eval at them.

    Raises:
        UsageError, ModelLoadError, DataNotFoundError: naming the problem and the fix.
    """
    from .data import default_data_dir
    from .evaluate import TASKS
    from .models import check_model_name
    from .util import hub_offline

    data_dir = _option(argv, "--data-dir")
    argv = [a for i, a in enumerate(argv) if a != "--data-dir" and not a.startswith("--data-dir=")
            and not (i > 0 and argv[i - 1] == "--data-dir")]
    margs = _option(argv, "--model_args") or ""
    path = dict(kv.split("=", 1) for kv in margs.split(",") if "=" in kv).get("path")
    if _option(argv, "--model") == "layerboost":
        if not path:
            raise UsageError("--model layerboost needs --model_args path=MODEL (a model folder, a .gguf file, or an "
                             "embedded name such as smollm2-135m)")
        check_model_name(path)
    tasks = [t.strip() for t in (_option(argv, "--tasks") or "").split(",") if t.strip()]
    local = [t for t in tasks if t in SHIPPED]
    if not local or not (hub_offline() or data_dir) or _option(argv, "--include_path"):
        return argv
    from .data import load_dataset_docs

    root = Path(data_dir) if data_dir else default_data_dir()
    out = Path.home() / ".cache" / "layerboost" / "lm_eval_tasks" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    selected = {t: load_dataset_docs(TASKS[t].dataset, data_dir=root).docs for t in local}
    mapping = write_local_tasks(selected, out)
    renamed = {t: n for t, n in zip(local, task_names_to_run(mapping))}
    print(f"layerboost: offline, the tasks {', '.join(local)} run lm-eval's definitions on {root} as "
          f"{', '.join(renamed.values())} (task copies in {out})", file=sys.stderr)
    argv = _set_option(argv, "--tasks", ",".join(renamed.get(t, t) for t in tasks))
    return _set_option(argv, "--include_path", str(out))


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the `layerboost` model registered (and `prepare_argv`'s checks and offline
    task copies). A mistake ends in one `error:` line, exit status 2."""
    from lm_eval.__main__ import cli_evaluate

    from .data import DataNotFoundError
    from .models import ModelLoadError

    try:
        argv = prepare_argv(list(sys.argv[1:] if argv is None else argv))
    except (UsageError, ModelLoadError, DataNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
