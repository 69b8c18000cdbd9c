"""Export a hybrid into a format other engines load without layerboost.

    transformers  softmax + swa plans (one window): a native transformers class that takes per-layer
                  windows from `config.layer_types` (full_attention / sliding_attention) + `sliding_window`
    deci          softmax + none plans: the DeciLM / Nemotron-NAS `block_configs` format (attention
                  `no_op` for none layers), which vLLM, SGLang, TensorRT-LLM and mlx-lm implement
    gguf          one file for llama.cpp, every plan of softmax, swa and none layers (export_gguf.py)

Anything a format cannot hold exactly is refused before a file is written, and the export is written
to a temporary file or folder (`.NAME.<pid>.part`) that is moved into place at the end, so a failed export
leaves nothing behind; the part a killed export left is removed by the next export to the same name.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .export_gguf import GGUF_TYPES, GGUFExportError, write_gguf
from .kinds import KINDS
from .targets import FORMATS, by_format
from .surgery import ARCHITECTURES, NATIVE_WINDOW_KEY
from .outputs import OWN_FILES
from .util import dtype_name, usual_modes

# Source model_type -> the native transformers class of the export (format "transformers").
# Llama and Mistral go to Ministral: MinistralForCausalLM has Llama's modules and weight names unchanged
# and applies `sliding_window` only to the layers `layer_types` marks sliding. The alternatives fail:
# LlamaForCausalLM ignores sliding_window in its mask (while its cache obeys it); MistralForCausalLM
# applies one window to every layer and ignores layer_types; Qwen2 hard-codes q/k/v biases (Llama weights
# would need added zero tensors); SmolLM3, GraniteSWA and Seed-OSS add NoPE layers, multipliers or biases.
# Engines: vLLM runs Ministral through its Transformers backend, which reads layer_types per layer (its
# native Llama/Mistral path reads them too); no engine was run here.
# Gemma 3 keeps its own class, whose layer_types also pick each layer's rotary table (local and global theta).
TRANSFORMERS_TARGETS = {"llama": "ministral", "mistral": "ministral", "qwen2": "qwen2", "qwen3": "qwen3",
                        "gemma3_text": "gemma3_text"}
DECI_SOURCES = ("llama", "mistral")  # DeciLM blocks are Llama blocks: no biases, no q/k norms

# The self-contained config class shipped with a deci export. transformers has no "nemotron-nas" type, and
# vLLM, SGLang and TensorRT-LLM read `config.block_configs[i].attention.no_op` as attributes, so they load
# it with --trust-remote-code (it is the only code in the folder; mlx-lm reads config.json directly).
DECI_CONFIG_CODE = '''"""DeciLM / Nemotron-NAS config from layerboost export: block_configs read as attributes."""
from transformers import LlamaConfig


class _Fields(dict):
    """A dict whose keys are also attributes (block.attention.no_op); stays plain JSON when saved."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [_Fields(attention=_Fields(b["attention"]), ffn=_Fields(b["ffn"]))
                              for b in block_configs or []]
        super().__init__(**kwargs)
        if not hasattr(self, "rope_theta"):  # transformers 5 keeps it in rope_parameters; older readers want it here
            self.rope_theta = self.rope_parameters["rope_theta"]
'''


class ExportError(ValueError):
    """The model or plan cannot be exported exactly in the asked format; nothing was written."""


def export(model_or_path, out_dir: str | os.PathLike, format: str = "transformers", tokenizer=None,
           dtype: torch.dtype | str = torch.float32, gguf_arch: str | None = None,
           tokenizer_pre: str | None = None, overwrite: bool = False) -> Path:
    """Write a converted hybrid in a format that loads without layerboost.

    Args:
        model_or_path: a converted model, or anything `layerboost.load_model` opens (a saved hybrid folder).
        out_dir: new folder (must not exist, or be empty); for "gguf" a new file name ending in .gguf.
        format: "transformers" (softmax + swa with one window), "deci" (softmax + none) or "gguf" (llama.cpp).
        tokenizer: saved with the export (when a path is given, the tokenizer found there is used).
        dtype: weights dtype when `model_or_path` is a path; for "gguf" the file's type, one of
            f32, f16, bf16, q8_0 (a torch dtype is taken as its name).
        gguf_arch, tokenizer_pre: "gguf" only: override the llama.cpp architecture chosen from the plan, and
            name the llama.cpp pre-tokenizer of a tokenizer layerboost does not recognise.
        overwrite: replace an existing file, or the files of the same names in a folder that holds others
            (`layerboost export --force`); by default an export never replaces a file.

    Returns:
        the output folder.

    Raises:
        ExportError: the format cannot hold this model or plan exactly, the model holds unmerged LoRA
            adapters, or `out_dir` is not an empty folder. Every problem found is listed, one per line.
    """
    out = Path(out_dir)
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; known formats: {', '.join(FORMATS)}")
    if format == "gguf":
        return _export_gguf(model_or_path, out, tokenizer, dtype, gguf_arch, tokenizer_pre, overwrite)
    if not isinstance(dtype, torch.dtype):
        raise ExportError(f"dtype {dtype!r} is for GGUF files: the {format} format writes float32, bfloat16 or float16")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file: choose a new output folder")
    if out.exists() and not overwrite and any(p.name not in OWN_FILES for p in out.iterdir()):
        raise ExportError(f"{out} exists and is not an empty folder: choose a new output folder")
    if isinstance(model_or_path, (str, os.PathLike)):
        from .models import load_model

        model, found_tok = load_model(str(model_or_path), dtype=dtype)
        tokenizer = found_tok if tokenizer is None else tokenizer
    else:
        model = model_or_path
    problems = _problems(model, format)
    if problems:
        raise ExportError("\n".join(problems))

    tmp = _part(out)
    try:
        (_write_transformers if format == "transformers" else _write_deci)(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        usual_modes(tmp)
        if out.exists():  # empty but for layerboost's manifest and lock, or overwrite
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
            tmp.rmdir()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _part(out: Path) -> Path:
    """This process's temporary name for `out`; the parts that killed exports left beside it are removed."""
    from .outputs import alive

    for old in out.parent.glob(f".{glob.escape(out.name)}.*.part"):
        pid = old.name[len(out.name) + 2:-len(".part")]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    return out.with_name(f".{out.name}.{os.getpid()}.part")


_GGUF_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _export_gguf(model_or_path, out: Path, tokenizer, dtype, arch, tokenizer_pre, overwrite: bool) -> Path:
    gguf_type = _GGUF_NAMES.get(dtype, dtype)
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"GGUF type {dtype!r} is not written; choose one of {', '.join(GGUF_TYPES)}")
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: a GGUF export is one file; give a name ending in .gguf")
    if out.is_dir():
        raise ExportError(f"{out} is a folder: a GGUF export is one file; give a new file name ending in .gguf")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists: choose a new file name (an export never replaces a file)")
    if not out.parent.is_dir():
        raise ExportError(f"folder {out.parent} does not exist: create it or choose another --out")
    if isinstance(model_or_path, (str, os.PathLike)):
        from .models import load_model

        model, found_tok = load_model(str(model_or_path), dtype=torch.float32)
        tokenizer = found_tok if tokenizer is None else tokenizer
    else:
        model = model_or_path
    try:
        return write_gguf(model, tokenizer, out, gguf_type, arch=arch, tokenizer_pre=tokenizer_pre, tmp=_part(out))
    except GGUFExportError as e:
        raise ExportError(str(e)) from None


# ---- checks -----------------------------------------------------------------------------------------


def _windows(plan) -> list[int]:
    """The windows of the layers transformers writes as sliding layers."""
    return sorted({s.window for s in plan.layers if KINDS[s.kind].export_as("transformers") == "sliding_attention"})


def _problems(model: nn.Module, fmt: str) -> list[str]:
    """Everything that stops an exact export of `model` in `fmt`, one line each."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return ["the model still holds LoRA adapters (peft): merge them first (model = model.merge_and_unload()) "
                "and export the merged model"]
    plan = getattr(model, "layerboost_plan", None)
    if plan is None:
        return ["the model is not a layerboost hybrid (no plan): convert it first (layerboost convert)"]
    cfg = model.config
    mtype = cfg.model_type
    sources = TRANSFORMERS_TARGETS if fmt == "transformers" else DECI_SOURCES
    if mtype not in sources:
        return [f"format {fmt!r} exports model_type {', '.join(sources)}, not {mtype!r}"
                + ("; use --format transformers for a plan without none layers" if fmt == "deci" else "")]
    out = []
    types = getattr(cfg, "layer_types", None)
    if fmt == "transformers" and ARCHITECTURES[mtype].rope_per_layer_type and types is not None:
        rope = cfg.rope_parameters
        moved = [i for i, s in enumerate(plan.layers) if KINDS[s.kind].export_as("transformers") not in (None, types[i])
                 and rope[types[i]] != rope[KINDS[s.kind].export_as("transformers")]]
        if moved:
            thetas = ", ".join(f"{t}: theta {r.get('rope_theta')}" for t, r in rope.items())
            out.append(f"layers {moved} change type (full <-> sliding), but {mtype} gives each layer type its own "
                       f"rotary table ({thetas}), so "
                       "the export would rotate them differently: keep those layers' own type (a smaller window on a "
                       "sliding layer exports)")
    out += by_format(fmt).problems(plan)  # the kinds it writes (from their records), one window
    windows = _windows(plan)
    if fmt == "transformers":
        if windows == [1]:
            out.append("window 1 cannot be exported: transformers' sliding cache keeps sliding_window - 1 tokens and "
                       "treats 0 as 'keep all' (generate then differs); use a window of at least 2")
        if mtype == "llama" and (getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)):
            out.append("this Llama has attention or MLP biases, which Ministral (the export class) does not have")
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if head_dim * cfg.num_attention_heads != cfg.hidden_size:
            out.append(f"head_dim {head_dim} x {cfg.num_attention_heads} heads != hidden_size {cfg.hidden_size}: "
                       "DeciLM readers derive head_dim as hidden_size / heads")
        if cfg.hidden_act != "silu":
            out.append(f"hidden_act {cfg.hidden_act!r}: DeciLM readers implement silu MLPs")
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            out.append("attention or MLP biases are not exported to the deci format")
        if _deci_intermediate(_ffn_mult(cfg), cfg.hidden_size) != cfg.intermediate_size:
            out.append(f"intermediate_size {cfg.intermediate_size} cannot be written as a DeciLM ffn_mult (readers "
                       "compute int(2 * ffn_mult * hidden_size / 3) rounded up to a multiple of 256)")
    return out


# ---- transformers -------------------------------------------------------------------------------------


def _write_transformers(model: nn.Module, out: Path) -> None:
    """The hybrid as a native model: same weights, `layer_types` from the plan, one `sliding_window`.

    Window mapping: transformers' `sliding_window=W` lets query i see keys j with i - W < j <= i
    (masking_utils.sliding_window_overlay: `kv_idx > q_idx - sliding_window`), i.e. the last W tokens
    including i itself, and its sliding cache keeps W - 1 past tokens for the new one: exactly layerboost's
    `swa` window W, so W is written unchanged.
    """
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    plan, src = model.layerboost_plan, model.config
    windows = set(_windows(plan))
    target_type = TRANSFORMERS_TARGETS[src.model_type]
    data = src.to_dict()
    dropped = ("model_type", "architectures", "layerboost_plan", "layerboost_version", "transformers_version",
               "_name_or_path", NATIVE_WINDOW_KEY)
    if target_type == "ministral":  # Llama-only fields (biases were checked to be off)
        dropped += ("attention_bias", "mlp_bias", "pretraining_tp")
    for key in dropped:
        data.pop(key, None)
    data["sliding_window"] = windows.pop() if windows else None
    data["layer_types"] = [KINDS[s.kind].export_as("transformers") for s in plan.layers]
    if target_type in ("qwen2", "qwen3"):
        data["use_sliding_window"] = data["sliding_window"] is not None
    if target_type == "gemma3_text":  # readers that place local layers by period (older vLLM) need the period too
        n = len(data["layer_types"])
        period = next((q for q in range(1, n + 1) if data["layer_types"] == [
            "sliding_attention" if (i + 1) % q else "full_attention" for i in range(n)]), None)
        if period is not None:
            data["sliding_window_pattern"] = period
    config = CONFIG_MAPPING[target_type].from_dict(data)
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(config)
    result = target.load_state_dict(model.state_dict(), strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:  # a bug here, not a user error: the two classes should match
        raise RuntimeError(f"{target_type} does not take these weights: missing {missing[:8]}, "
                           f"unexpected {result.unexpected_keys[:8]}")
    if config.tie_word_embeddings:
        target.tie_weights()
    target.generation_config = model.generation_config
    target.save_pretrained(out)


# ---- deci (Nemotron-NAS block_configs) ----------------------------------------------------------------


def _ffn_mult(cfg) -> float:
    return round(3 * cfg.intermediate_size / (2 * cfg.hidden_size), 6)  # readers round ffn_mult to 6 places


def _deci_intermediate(ffn_mult: float, hidden: int) -> int:
    """The MLP width every DeciLM reader derives from ffn_mult (vLLM, SGLang, TensorRT-LLM, mlx-lm agree)."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def deci_config(config, plan, dtype: torch.dtype) -> dict:
    """config.json of a deci export: Llama fields + one block_configs entry per layer (attention, ffn).

    Every field of the format's AttentionConfig / FFNConfig is written, so strict readers (mlx-lm builds
    dataclasses from these dicts) accept it; `none` layers get attention `no_op: true`.
    """
    rope = dict(config.rope_parameters)
    attention = dict(no_op=False, replace_with_linear=False, sparsify=None,
                     n_heads_in_group=config.num_attention_heads // config.num_key_value_heads, window_length=None,
                     num_sink_tokens=None, use_prefill_window_in_sink_attention=False, unshifted_sink=False)
    no_attention = {**attention, "no_op": True, "n_heads_in_group": None}
    ffn = dict(no_op=False, replace_with_linear=False, sparsify=None, ffn_mult=_ffn_mult(config))
    return {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig"},
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": rope.pop("rope_theta"),
        "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
        "use_cache": True,
        "torch_dtype": dtype_name(dtype),  # of the weights written
        "block_configs": [{"attention": no_attention if KINDS[s.kind].export_as("deci") == "no_op" else attention, "ffn": ffn}
                          for s in plan.layers],
    }


def _write_deci(model: nn.Module, out: Path) -> None:
    from huggingface_hub import save_torch_state_dict

    cfg = model.config
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(deci_config(cfg, model.layerboost_plan, model.dtype), indent=2) + "\n")
    (out / "configuration_decilm.py").write_text(DECI_CONFIG_CODE)
    save_torch_state_dict(state, out, metadata={"format": "pt"})
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
