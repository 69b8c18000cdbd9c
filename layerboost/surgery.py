"""Model surgery: turn a pretrained model into a hybrid by replacing attention modules, and
save / load hybrids (safetensors + the plan inside config.json; no pickles, no remote code).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .util import version
from .attention import build_attention
from .cache import install_cache_hook
from .compat import detach_gguf_quantizer
from .kinds import kind
from .plan import NATIVE_WINDOW_KEY, LayerPlan, check_native, native_window
from .util import usual_modes, write_json

@dataclass(frozen=True)
class Architecture:
    """What layerboost needs to know of a decoder family. Every family has `self_attn` with q/k/v/o_proj,
    `head_dim`, `scaling`, `num_key_value_groups`, `layer_idx`, and adds the attention output to the residual.

    Attributes:
        layers: attribute path of the decoder layer list.
        mlp_in_norm: the MLP's input norm (Llama: post_attention_layernorm; Gemma 3: pre_feedforward_layernorm).
        attn_out_norm, mlp_out_norm: norms on the attention / MLP output before the residual add (Gemma 3's
            "sandwich" norms), or None.
        rope_per_layer_type: the rotary module takes the layer type (Gemma 3: local layers use another theta).
        final_softcap: config attribute of a tanh cap on the logits (Gemma), or None.
    """

    layers: str = "model.layers"
    mlp_in_norm: str = "post_attention_layernorm"
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    rope_per_layer_type: bool = False
    final_softcap: str | None = None


# model_type -> its Architecture
ARCHITECTURES = {
    "llama": Architecture(),
    "mistral": Architecture(),
    "qwen2": Architecture(),
    "qwen3": Architecture(),
    "gemma3_text": Architecture(mlp_in_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
                                mlp_out_norm="post_feedforward_layernorm", rope_per_layer_type=True,
                                final_softcap="final_logit_softcapping"),
}
SUPPORTED_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class UnsupportedModelError(ValueError):
    """The model's architecture or settings are not ones `convert` knows."""


class CheckpointError(RuntimeError):
    """A saved hybrid is missing, corrupt or does not match its plan."""


@dataclass(frozen=True)
class Replacement:
    layer: int
    kind: str
    window: int | None
    old: str
    new: str


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def architecture(model_or_config) -> Architecture:
    """The `Architecture` record of a model (or config).

    Raises:
        UnsupportedModelError: unknown architecture.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"layerboost does not know the architecture {model_type!r} ({type(model_or_config).__name__}); "
            f"supported model_type values: {', '.join(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[model_type]
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModelError(f"{model_type} with attn_logit_softcapping is not supported (layerboost's "
                                    "attention kinds do not cap attention scores)")
    return arch


def decoder_parts(model: nn.Module):
    """`(decoder_model, layers)` of a supported causal LM.

    Raises:
        UnsupportedModelError: unknown architecture.
    """
    path = architecture(model).layers
    return _get(model, path.rsplit(".", 1)[0]), _get(model, path)


def convert(model: nn.Module, plan: LayerPlan) -> list[Replacement]:
    """Give each decoder layer of `model` the attention kind `plan` names, in place.

    New modules reuse the original projections and the model's rotary embeddings; `none`
    layers also drop their input norm (its output would be unused). The plan is stored in
    `model.config.layerboost_plan` so `save_pretrained` writes it, and a pre-hook makes every
    forward/generate use a `HybridCache`.

    Returns:
        what was replaced, one `Replacement` per layer (also kept as `model.layerboost_replacements`).

    Raises:
        UnsupportedModelError: unknown architecture, attention implementation, or an already converted model.
        PlanError: the plan does not fit the model.
    """
    decoder, layers = decoder_parts(model)
    if getattr(model.config, "layerboost_plan", None) is not None or hasattr(model, "layerboost_plan"):
        raise UnsupportedModelError("this model is already a layerboost hybrid: convert the original model instead")
    impl = model.config._attn_implementation
    if impl not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"attention implementation {impl!r} is not supported by hybrid layers; load the model with "
            f"attn_implementation in {SUPPORTED_ATTN_IMPLEMENTATIONS}"
        )
    plan = LayerPlan(plan.layers, num_layers=len(layers))  # validates the length
    check_native(plan, model.config)
    record = []
    for i, (layer, spec) in enumerate(zip(layers, plan.layers)):
        old = layer.self_attn
        new = build_attention(old, spec)
        layer.self_attn = new
        if not kind(spec.kind).reads_input:  # none: the output does not depend on the normed input
            layer.input_layernorm = nn.Identity()
        record.append(Replacement(i, spec.kind, spec.window, type(old).__name__, type(new).__name__))
    if any(native_window(model.config, i) for i in range(len(layers))):
        # Every layer that slid natively is now a layerboost module that applies its own window, and the
        # HF forward hands layers their mask by layer type: lift the config's window so every mask is
        # causal + padding only (a sliding mask would hide linear_swa's older tokens). Kept for export.
        setattr(model.config, NATIVE_WINDOW_KEY, getattr(model.config, NATIVE_WINDOW_KEY, None) or model.config.sliding_window)
        model.config.sliding_window = max(model.config.max_position_embeddings, model.config.sliding_window)
    model.config.layerboost_plan = plan.to_dict()
    model.config.layerboost_version = version()
    model.layerboost_plan = plan
    model.layerboost_replacements = record
    model._layerboost_hook = install_cache_hook(decoder, plan)
    return record


def plan_of(model: nn.Module) -> LayerPlan | None:
    return getattr(model, "layerboost_plan", None)


# ---- save / load --------------------------------------------------------------------------------


# A saved hybrid names a model_type that transformers does not know, so plain
# `AutoModelForCausalLM.from_pretrained(DIR)` (and `lm_eval --model hf`) stops with "... has model type
# `layerboost-hybrid (load with layerboost.load)` but Transformers does not recognize this architecture"
# instead of building the base architecture with random weights in the changed layers. The base model's
# model_type and architectures are kept under `layerboost_model_type` / `layerboost_architectures`;
# `load` puts them back. Folders written before this tag (base model_type + layerboost_plan) still load.
HYBRID_MODEL_TYPE = "layerboost-hybrid (load with layerboost.load)"
HYBRID_ARCHITECTURE = "LayerboostHybridForCausalLM"


def save(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a hybrid: config.json (with the plan, tagged as above), safetensors weights, plan.json, tokenizer."""
    out = Path(out_dir)
    detach_gguf_quantizer(model)
    model.save_pretrained(out)
    if plan_of(model) is not None:
        plan_of(model).save(out / "plan.json")
        _tag_config(out / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    usual_modes(out)
    return out


def _tag_config(path: Path) -> None:
    data = json.loads(path.read_text())
    data["layerboost_model_type"] = data["model_type"]
    data["layerboost_architectures"] = data.get("architectures")
    data["model_type"], data["architectures"] = HYBRID_MODEL_TYPE, [HYBRID_ARCHITECTURE]
    write_json(path, data, indent=2, sort_keys=True)


def read_config(path: str | Path):
    """The base model's transformers config stored in a saved hybrid's config.json (tagged or older folders).

    Raises:
        CheckpointError: no readable config.json, or a model_type transformers does not know.
    """
    from transformers import CONFIG_MAPPING

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} has no config.json: not a saved model folder")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg} could not be read: {e}") from e
    if data.get("model_type") == HYBRID_MODEL_TYPE:
        data["model_type"] = data.pop("layerboost_model_type", None)
        data["architectures"] = data.pop("layerboost_architectures", None)
    if data.get("model_type") not in CONFIG_MAPPING:
        raise CheckpointError(f"{cfg}: model_type {data.get('model_type')!r} is not one transformers knows")
    try:
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg} could not be read: {e}") from e


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the checkpoint is incomplete; save it again with layerboost.save")
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}); the file is corrupt, save it again") from e
    return state


def load(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a hybrid saved by `save` / `save_pretrained`: same modules, same weights, same logits.

    Raises:
        CheckpointError: missing/corrupt files, missing or unexpected weights, or no plan in config.json.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = read_config(path)
    plan_data = getattr(config, "layerboost_plan", None)
    if plan_data is None:
        raise CheckpointError(
            f"{path} is a plain transformers model (no layerboost_plan in config.json): load it with "
            "layerboost.load_model or convert it first"
        )
    plan = LayerPlan.from_dict(plan_data)
    del config.layerboost_plan
    state = _read_state_dict(path)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    convert(model, plan)
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not match its plan: missing weights {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected weights {result.unexpected_keys[:8]}; the files were changed or saved from another model"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    _rebuild_rotary(model)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: no values for {leftover[:8]}")
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def _rebuild_rotary(model: nn.Module) -> None:
    """Computed buffers are not saved: recompute them off the meta device (rotary inverse frequencies,
    Gemma's embedding scale)."""
    decoder, _ = decoder_parts(model)
    rot = decoder.rotary_emb
    decoder.rotary_emb = type(rot)(config=model.config)
    emb = decoder.embed_tokens
    if hasattr(emb, "scalar_embed_scale"):
        emb.embed_scale = torch.tensor(emb.scalar_embed_scale)
