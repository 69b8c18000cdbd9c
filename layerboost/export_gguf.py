"""GGUF export: one file llama.cpp loads as it is, with weights, tokenizer and chat template inside.

Written with the `gguf` package (no converter script, no remote code). Each plan goes to the llama.cpp
architecture that computes exactly what layerboost computes:

    llama        every layer softmax (the base model)
    deci         softmax + none: a layer with 0 heads has no attention and no cache (stock llama.cpp)
    granite_swa  softmax + swa: per-layer sliding windows (stock llama.cpp). Its attention sinks are written
                 as a logit of -30000 per head, which is an exact zero weight, and its multipliers as 1
    layerboost-deci  softmax + swa + none: deci's layers with `attention.sliding_window` and a per-layer
                 `attention.sliding_window_pattern`, under a name that only the llama.cpp patched by
                 engines/llama.cpp/deci-sliding-window.patch registers (engines/llama.cpp/build.sh): a stock
                 llama.cpp refuses the file (unknown architecture) instead of running it with every token in view
    gemma3       Gemma 3 plans of softmax + swa (stock llama.cpp): the per-layer pattern from the plan, one
                 window; llama.cpp gives sliding layers the local rotary table, so every layer keeps its type

Windows: llama.cpp hides key p0 from query p1 when p1 - p0 >= n_swa, so a query sees the last n_swa tokens,
itself included: layerboost's `swa` window W is written unchanged. llama.cpp has one window per model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .kinds import KINDS
from .targets import TARGETS

# What llama.cpp holds for a layer, as each kind's record names it for the "gguf" format
FULL, SLIDING, EMPTY = "full_attention", "sliding_attention", "no_attention"


def layer_types(plan) -> list[str | None]:
    """Each layer's llama.cpp type (FULL, SLIDING or EMPTY: 0 heads), None where llama.cpp has none."""
    return [KINDS[s.kind].export_as("gguf") for s in plan.layers]


def _windows(plan) -> list[int]:
    return sorted({s.window for s, t in zip(plan.layers, layer_types(plan)) if t == SLIDING})


GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DECI_SWA = "layerboost-deci"  # deci with per-layer windows: registered by the patched build only
DECI_ARCHS = ("deci", DECI_SWA)  # per-layer head counts: a layer of 0 heads has no attention and no cache
LLAMA_ARCHS = ("llama", "granite_swa", *DECI_ARCHS)  # what a Llama / Mistral model can be written as
SINK_LOGIT = -30000.0  # exp(-30000 - max) is 0 in float32: a sink that takes no weight

# llama.cpp `tokenizer.ggml.pre` names of the Hugging Face pre-tokenizers recognised here, keyed by the
# pre-tokenizer's JSON (tokenizer.json). Anything else needs `tokenizer_pre=` (the name llama.cpp's
# convert_hf_to_gguf.py reports for that tokenizer): a wrong guess would split text differently.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
KNOWN_PRE_TOKENIZERS = {
    json.dumps(_BYTE_LEVEL, sort_keys=True): "gpt-2",
    json.dumps({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
               sort_keys=True): "smollm",
}


class GGUFExportError(ValueError):
    """The model cannot be written exactly as a GGUF llama.cpp runs; nothing was written."""


def gguf_arch(plan, model_type: str = "llama") -> str:
    """The llama.cpp architecture a plan of a `model_type` model exports to (see the module docstring)."""
    if model_type == "gemma3_text":
        return "gemma3"
    types = set(layer_types(plan))
    if types == {FULL}:
        return "llama"
    if SLIDING in types:
        return DECI_SWA if EMPTY in types else "granite_swa"
    return "deci"


def describe(path: str | os.PathLike) -> str:
    """One line on what a written GGUF file needs: its architecture and the llama.cpp that runs it."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    arch = fields["general.architecture"].contents()
    window = fields.get(f"{arch}.attention.sliding_window")
    if arch == DECI_SWA:
        return (f"architecture {DECI_SWA} (deci with sliding windows): runs in llama.cpp with engines/llama.cpp/deci-"
                "sliding-window.patch (engines/llama.cpp/build.sh); a stock llama.cpp refuses it (unknown architecture)")
    if arch == "deci" and window is not None:  # written before the name layerboost-deci
        return ("architecture deci with sliding windows: runs in llama.cpp with engines/llama.cpp/deci-sliding-"
                "window.patch (engines/llama.cpp/build.sh); stock llama.cpp would attend to every token: export again")
    return f"architecture {arch}: runs in stock llama.cpp (tested with the version engines/llama.cpp/build.sh pins)"


def problems(model: nn.Module, gguf_type: str, arch: str | None = None) -> list[str]:
    """Everything that stops an exact GGUF export of `model`, one line each (empty: it exports)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if gguf_type not in GGUF_TYPES:
        return [f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}"]
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return ["the model still holds LoRA adapters (peft): merge them first (model.merge_and_unload())"]
    plan = getattr(model, "layerboost_plan", None)
    cfg = model.config
    if cfg.model_type not in ("llama", "mistral", "gemma3_text"):
        return [f"GGUF export writes Llama, Mistral and Gemma 3 models, not model_type {cfg.model_type!r}"]
    if cfg.model_type == "gemma3_text":
        return _gemma3_problems(model, plan, gguf_type, arch)
    out = []
    if plan is not None:
        chosen = arch or gguf_arch(plan)
        if arch is not None and arch not in LLAMA_ARCHS:
            return [f"a {cfg.model_type} model is written as {', '.join(LLAMA_ARCHS)}, not {arch!r}"]
        types = layer_types(plan)
        out += TARGETS["llama.cpp"].problems(plan)  # kinds, layer 0, a softmax beside none, one window
        if chosen == "llama" and set(types) != {FULL}:
            out.append("the llama architecture holds softmax layers only: leave the architecture to choose itself")
        if chosen == "deci" and SLIDING in types:
            out.append(f"deci has no sliding windows in a stock llama.cpp, which would attend to every token: leave the "
                       f"architecture to choose itself ({DECI_SWA}, which only the patched llama.cpp runs)")
        if chosen == DECI_SWA and not (SLIDING in types and EMPTY in types):
            out.append(f"{DECI_SWA} is for plans of sliding windows and none layers: leave the architecture to choose "
                       "itself")
        if chosen == "granite_swa" and EMPTY in types:
            out.append(f"granite_swa has no layer without attention: use {DECI_SWA} for plans with none")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        out.append(f"rope_type {rope.get('rope_type')!r} is not written yet: only the default rotary embedding")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        out.append("attention or MLP biases are not written to GGUF")
    if cfg.hidden_act != "silu":
        out.append(f"hidden_act {cfg.hidden_act!r}: llama.cpp's Llama architectures run silu MLPs")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size and (plan is None or gguf_arch(plan) in DECI_ARCHS):
        out.append(f"head_dim {head_dim} x {cfg.num_attention_heads} heads != hidden_size: deci reads no head size")
    return out + _q8_problems(model, gguf_type)


def _q8_problems(model: nn.Module, gguf_type: str) -> list[str]:
    if gguf_type != "q8_0":
        return []
    odd = sorted({n for n, p in model.named_parameters() if p.dim() == 2 and p.shape[1] % 32})
    return [f"q8_0 packs rows in blocks of 32 values; {odd[0]} has rows of another length: use f16 or bf16"] if odd else []


def _gemma3_problems(model: nn.Module, plan, gguf_type: str, arch: str | None) -> list[str]:
    from .plan import native_plan

    cfg = model.config
    out = []
    if arch not in (None, "gemma3"):
        out.append(f"a Gemma 3 model exports to the gemma3 architecture, not {arch}")
    plan = plan or native_plan(cfg)
    kinds, types = [s.kind for s in plan.layers], layer_types(plan)
    out += TARGETS["llama.cpp"].window_problems(plan)
    bad = [i for i, t in enumerate(types) if t not in (FULL, SLIDING)]
    if bad:
        out.append(f"layers {bad} are {kinds[bad[0]]}: llama.cpp's gemma3 runs softmax and swa layers only; re-plan "
                   "them as swa or softmax")
    rope = cfg.rope_parameters
    moved = [i for i, t in enumerate(types) if t in (FULL, SLIDING) and t != cfg.layer_types[i]
             and rope["sliding_attention"] != rope["full_attention"]]
    if moved:
        out.append(f"layers {moved} change type (full <-> sliding), but llama.cpp's gemma3 rotates sliding layers with "
                   "the local table and full layers with the global one: keep each layer's type (a smaller window on "
                   "a sliding layer exports)")
    if cfg.query_pre_attn_scalar != cfg.head_dim:
        out.append(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} != head_dim {cfg.head_dim}: llama.cpp's gemma3 "
                   "scales queries by head_dim")
    if getattr(cfg, "attn_logit_softcapping", None):
        out.append("attention logit soft-capping is not in llama.cpp's gemma3")
    if cfg.hidden_activation != "gelu_pytorch_tanh":
        out.append(f"hidden_activation {cfg.hidden_activation!r}: llama.cpp's gemma3 runs the tanh GELU")
    full = rope["full_attention"]
    if full.get("rope_type", "default") not in ("default", "linear") or \
            rope["sliding_attention"].get("rope_type", "default") != "default":
        out.append(f"rope types {full.get('rope_type')!r} / {rope['sliding_attention'].get('rope_type')!r}: only "
                   "default, and linear scaling on the global layers, are written")
    return out + _q8_problems(model, gguf_type)


def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, gguf_type: str = "f32",
               arch: str | None = None, tokenizer_pre: str | None = None, tmp: str | os.PathLike | None = None) -> Path:
    """Write `model` (a layerboost hybrid or a plain Llama/Mistral) and `tokenizer` as one GGUF file, through
    the temporary file `tmp` (default `.NAME.<pid>.part` beside it), renamed into place at the end.

    Raises:
        GGUFExportError: the model, plan or tokenizer cannot be written exactly (one problem per line);
            nothing was written.
    """
    import gguf

    found = problems(model, gguf_type, arch)
    if tokenizer is None:
        found.append("no tokenizer: llama.cpp needs the vocabulary inside the file")
    pre = tokenizer_pre
    if not found and model.config.model_type != "gemma3_text" and pre is None:
        try:
            pre = pre_tokenizer_name(tokenizer)
        except GGUFExportError as e:
            found.append(str(e))
    if found:
        raise GGUFExportError("\n".join(found))
    from .plan import native_plan

    plan = getattr(model, "layerboost_plan", None) or native_plan(model.config)
    arch = arch or gguf_arch(plan, model.config.model_type)
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.{os.getpid()}.part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        if arch == "gemma3":
            _write_gemma3_config(writer, model.config, plan, gguf_type)
            _write_spm_vocab(writer, tokenizer, model.config.vocab_size)
            _write_gemma3_tensors(writer, model, gguf_type)
        else:
            _write_config(writer, model.config, plan, arch, gguf_type)
            _write_vocab(writer, tokenizer, model.config.vocab_size, pre)
            _write_tensors(writer, model, plan, arch, gguf_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---- metadata -----------------------------------------------------------------------------------------

_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16


def _write_common(w, cfg, plan, gguf_type: str, head_dim: int) -> None:
    """The keys every architecture here writes alike: sizes, norm epsilon, and the plan's window and pattern."""
    w.add_name(str(getattr(cfg, "_name_or_path", "") or "layerboost hybrid").rstrip("/").split("/")[-1])
    w.add_file_type(_FILE_TYPES[gguf_type])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_vocab_size(cfg.vocab_size)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    windows = _windows(plan)
    if windows:
        w.add_sliding_window(windows[0])
        w.add_sliding_window_pattern([t == SLIDING for t in layer_types(plan)])


def _write_config(w, cfg, plan, arch: str, gguf_type: str) -> None:
    n = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attends = [t != EMPTY for t in layer_types(plan)]
    _write_common(w, cfg, plan, gguf_type, head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    if arch in DECI_ARCHS:
        w.add_head_count([cfg.num_attention_heads if a else 0 for a in attends])
        w.add_head_count_kv([cfg.num_key_value_heads if a else 0 for a in attends])
        w.add_feed_forward_length([cfg.intermediate_size] * n)
    else:
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_feed_forward_length(cfg.intermediate_size)
    if arch == "granite_swa":  # Granite's multipliers, all neutral
        w.add_logit_scale(1.0)
        w.add_residual_scale(1.0)
        w.add_embedding_scale(1.0)
        w.add_attention_scale(1.0 / head_dim ** 0.5)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a Hugging Face fast tokenizer whose pre-tokenizer is recognised."""
    state = _tokenizer_json(tokenizer)
    key = json.dumps(state.get("pre_tokenizer"), sort_keys=True)
    if key not in KNOWN_PRE_TOKENIZERS:
        raise GGUFExportError(
            f"the tokenizer's pre-tokenizer ({key[:120]}) is not one layerboost recognises: pass the llama.cpp name "
            "for it (--tokenizer-pre NAME; llama.cpp's convert_hf_to_gguf.py prints it as 'tokenizer.ggml.pre')")
    return KNOWN_PRE_TOKENIZERS[key]


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"{type(tokenizer).__name__} is not a fast (tokenizer.json) tokenizer: GGUF export "
                              "reads the vocabulary and merges from one")
    return json.loads(backend.to_str())


def _write_vocab(w, tokenizer, vocab_size: int, pre: str) -> None:
    import gguf

    state = _tokenizer_json(tokenizer)
    model = state["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFExportError(f"tokenizer model {model.get('type')} (byte_fallback {model.get('byte_fallback')}): GGUF "
                              "export writes byte-level BPE tokenizers (GPT-2 style) only")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    _write_specials(w, tokenizer)


def _write_specials(w, tokenizer) -> None:
    """Special token ids, whether a BOS / EOS is added to each text (what the tokenizer itself does), and the
    chat template."""
    for name, setter in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                         ("unk", w.add_unk_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            setter(int(token_id))
    probe = tokenizer("a")["input_ids"]
    w.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]))
    w.add_add_eos_token(bool(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]))
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)


# ---- tensors ------------------------------------------------------------------------------------------


def _rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k rows from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs (rope type NORM)."""
    out_dim = w.shape[0]
    return w.reshape(heads, 2, out_dim // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add(w, name: str, t: torch.Tensor, gguf_type: str) -> None:
    import gguf

    data = t.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or gguf_type == "f32":  # norms, sinks and f32 files stay float32
        w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif gguf_type == "f16":
        w.add_tensor(name, data.astype(np.float16))
    else:
        qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _write_tensors(w, model: nn.Module, plan, arch: str, gguf_type: str) -> None:
    cfg = model.config
    state = model.state_dict()
    _add(w, "token_embd.weight", state["model.embed_tokens.weight"], gguf_type)
    _add(w, "output_norm.weight", state["model.norm.weight"], gguf_type)
    if not cfg.tie_word_embeddings:
        _add(w, "output.weight", state["lm_head.weight"], gguf_type)
    for i, t in enumerate(layer_types(plan)):
        p = f"model.layers.{i}."
        if t != EMPTY:  # attends: q/k/v/o and the input norm
            _add(w, f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"], gguf_type)
            _add(w, f"blk.{i}.attn_q.weight", _rope_rows(state[p + "self_attn.q_proj.weight"], cfg.num_attention_heads),
                 gguf_type)
            _add(w, f"blk.{i}.attn_k.weight", _rope_rows(state[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads),
                 gguf_type)
            _add(w, f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"], gguf_type)
            _add(w, f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"], gguf_type)
            if arch == "granite_swa":
                _add(w, f"blk.{i}.attn_sinks.weight", torch.full((cfg.num_attention_heads,), SINK_LOGIT), gguf_type)
        _add(w, f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"], gguf_type)
        _add(w, f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"], gguf_type)
        _add(w, f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"], gguf_type)
        _add(w, f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"], gguf_type)


# ---- Gemma 3 ------------------------------------------------------------------------------------------


def _write_gemma3_config(w, cfg, plan, gguf_type: str) -> None:
    rope = cfg.rope_parameters
    _write_common(w, cfg, plan, gguf_type, cfg.head_dim)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(rope["full_attention"]["rope_theta"]))
    w.add_rope_freq_base_swa(float(rope["sliding_attention"]["rope_theta"]))
    if rope["full_attention"].get("rope_type") == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["full_attention"]["factor"]))
    if getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def _write_gemma3_tensors(w, model: nn.Module, gguf_type: str) -> None:
    """Gemma's RMSNorm scales by (1 + weight), llama.cpp's by weight: every norm is written plus one. q/k keep
    their order (Gemma rotates halves, as llama.cpp's gemma3 does)."""
    cfg, state = model.config, model.state_dict()
    _add(w, "token_embd.weight", state["model.embed_tokens.weight"], gguf_type)
    _add(w, "output_norm.weight", state["model.norm.weight"] + 1, gguf_type)
    if not cfg.tie_word_embeddings:
        _add(w, "output.weight", state["lm_head.weight"], gguf_type)
    names = {"input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, ours in names.items():
            t = state[f"model.layers.{i}.{hf}.weight"]
            _add(w, f"blk.{i}.{ours}.weight", t + 1 if "norm" in hf else t, gguf_type)


def _write_spm_vocab(w, tokenizer, vocab_size: int) -> None:
    """A byte-fallback BPE tokenizer (Gemma's) as llama.cpp's sentencepiece vocabulary ("llama").

    llama.cpp's sentencepiece tokenizer merges, again and again, the adjacent pair whose joined text is the
    token with the highest score; a Hugging Face BPE merges the pair ranked first. Each token made by a merge
    gets minus that merge's rank as its score, so the two merge in the same order.
    """
    import gguf

    state = _tokenizer_json(tokenizer)
    model = state["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise GGUFExportError(f"tokenizer model {model.get('type')} (byte_fallback {model.get('byte_fallback')}): a "
                              "Gemma 3 export writes byte-fallback BPE tokenizers only")
    rank = {}
    for r, m in enumerate(model["merges"]):
        a, b = m.split(" ") if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]"), scores.append(-1e9), types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t)
        scores.append(-float(rank.get(t, len(rank))))
        if i in added and added[i].special:
            types.append(gguf.TokenType.UNKNOWN if t == tokenizer.unk_token else gguf.TokenType.CONTROL)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(False)
    _write_specials(w, tokenizer)
