"""Computed (not measured) GPU memory per rank for healing the default plan (thirds of softmax, swa, none) of
Llama 3 8B and 70B on 8 GPUs, in each `--parallel` mode, with bf16 weights.

    weights    the student's frozen weights, plus the teacher's attention that `none` layers dropped
               (swa layers share their projections with the teacher); replicate: all of them on every rank;
               shard: decoder layers split over the ranks (embeddings, final norm and LM head stay whole),
               plus one layer gathered at a time
    adapters   LoRA r=16 on q/k/v/o/gate/up/down of every layer (the default `neighbours` covers all layers of
               an interleaved plan) in fp32, with AdamW's two moments and the gradient: 16 bytes per parameter
    logits     one KL chunk (kl_chunk 1024 positions x vocabulary): teacher and student log-probabilities, the
               gradient and one temporary in fp32
    activations  what backward keeps for one micro-batch of 4 x 256 tokens through every layer, bf16, without
               activation checkpointing (about 10 hidden-size and 3 MLP-size vectors per token and layer; rough)

    python scripts/heal_memory.py
"""

from __future__ import annotations

MODELS = {  # public configs: hidden, layers, heads, kv heads, head dim, MLP size, vocabulary, tied embeddings
    "Llama 3 8B": dict(d=4096, n=32, h=32, kv=8, hd=128, ff=14336, v=128256, tied=False),
    "Llama 3 70B": dict(d=8192, n=80, h=64, kv=8, hd=128, ff=28672, v=128256, tied=False),
}
GB = 1e9


def sizes(c: dict) -> dict:
    attn = c["d"] * c["h"] * c["hd"] * 2 + c["d"] * c["kv"] * c["hd"] * 2  # q, o; k, v
    mlp = 3 * c["d"] * c["ff"]
    layer = attn + mlp + 2 * c["d"]
    embed = c["v"] * c["d"] * (1 if c["tied"] else 2)
    none = c["n"] // 3  # the default plan's attention-free layers
    r = 16
    lora_layer = r * (2 * (c["d"] + c["h"] * c["hd"]) + 2 * (c["d"] + c["kv"] * c["hd"]) + 3 * (c["d"] + c["ff"]))
    return dict(attn=attn, layer=layer, layers=c["n"] * layer - none * attn, teacher_extra=none * attn,
                embed=embed, lora=c["n"] * lora_layer)


def table(world: int = 8) -> str:
    rows = ["| model | mode | weights | adapters + AdamW | logits chunk | activations (rough) | total per GPU |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for name, c in MODELS.items():
        s = sizes(c)
        logits = 4 * 1024 * c["v"] * 4
        acts = 1024 * (10 * c["d"] + 3 * c["ff"]) * 2 * c["n"]
        adapters = 16 * s["lora"]
        for mode in ("replicate", "shard"):
            frozen = (s["layers"] + s["teacher_extra"]) * 2
            weights = s["embed"] * 2 + (frozen if mode == "replicate" else frozen / world + s["layer"] * 2)
            adapt = adapters if mode == "replicate" else adapters / world
            total = weights + adapt + logits + acts
            rows.append(f"| {name} | {mode} | {weights / GB:.1f} GB | {adapt / GB:.2f} GB | {logits / GB:.1f} GB | "
                        f"{acts / GB:.1f} GB | **{total / GB:.0f} GB** |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(f"computed for 8 GPUs, bf16 weights, micro-batch 4 x 256 tokens (not measured)\n\n{table()}")
