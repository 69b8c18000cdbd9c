import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def tiny_model(arch: str = "llama", layers: int = 4, seed: int = 0, vocab: int = 128, layer_types=None,
               window: int = 8):
    """A tiny random fp32 model of a real architecture (GQA: 4 query heads, 2 kv heads).

    gemma3: full attention in every layer unless `layer_types` says which layers slide natively (`window`),
    an attention scale of 24**-0.5 (query_pre_attn_scalar, not head_dim) and random norm weights, so the
    sandwich norms, the scaled embedding and both rotary tables all matter.
    """
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  attn_implementation="sdpa", pad_token_id=0)
    cls, cfg = {
        "llama": (LlamaForCausalLM, lambda: LlamaConfig(**common)),
        "mistral": (MistralForCausalLM, lambda: MistralConfig(**common, sliding_window=None)),
        "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**common, use_sliding_window=False)),
        "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**common, head_dim=16)),
        "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=24, sliding_window=window,
            layer_types=layer_types or ["full_attention"] * layers, eos_token_id=None, bos_token_id=None)),
    }[arch]
    torch.manual_seed(seed)
    model = cls(cfg()).eval()
    # Random init gives near-uniform attention; sharpen q/k so windows and positions matter.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
        if arch == "gemma3":  # Gemma's norms start at 0 (scale 1 + w): make every one of them count
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(-0.5, 0.5)
    return model


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


class ByteTok:
    """Bytes as token ids (1..127; 0 is EOS) so text fits a 128-token tiny model (heal's tokenizer in tests)."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(127, b) or 1 for b in text.encode()]}

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")

    def save_pretrained(self, path):
        with open(os.path.join(path, "bytetok.json"), "w") as f:
            f.write("{}")


@pytest.fixture
def clone():
    return copy.deepcopy


@pytest.fixture
def one_thread():
    """One torch thread for tiny models: two threads spin and run 10-30x slower on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
