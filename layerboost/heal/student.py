"""The student and its teacher in one network: the converted model with LoRA adapters, and the original
attention modules kept aside to run the teacher pass (`Hybrid`, `build_hybrid`, trainable parameters per stage)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..kinds import ORIGINAL, kind, own_parameters
from ..plan import LayerPlan, native_plan
from ..runner import DecoderRunner
from ..surgery import architecture, convert, decoder_parts, plan_of
from .config import HealConfig, HealConfigError


class _Record(nn.Module):
    """Wraps a teacher attention module and keeps its input and output (stage-1 targets)."""

    def __init__(self, attn: nn.Module, store: dict, idx: int):
        super().__init__()
        self.attn, self.store, self.idx = attn, store, idx

    def forward(self, hidden_states, **kwargs):
        out = self.attn(hidden_states=hidden_states, **kwargs)
        self.store[self.idx] = (hidden_states, out[0])
        return out


@dataclass
class Hybrid:
    """The student (converted model with LoRA) and everything needed to run it as its own teacher.

    Attributes:
        peft_model: the `peft` model around the converted hybrid.
        layers: the decoder layers (shared by teacher and student).
        originals: layer -> (original attention, original input norm), for every modified layer;
            kept outside the module tree so they are neither trained nor saved.
        prefix: layers [0, prefix) are identical in teacher and student (no change, no adapters).
        windowed: modified layers of a windowed kind (stage 1 trains their attention).
        runner: embeds rows and runs layers i..j (the same layers serve as teacher and student).
    """

    peft_model: nn.Module
    decoder: nn.Module
    layers: nn.ModuleList
    lm_head: nn.Module
    plan: LayerPlan
    originals: dict[int, tuple[nn.Module, nn.Module]]
    prefix: int
    windowed: list[int]
    lora_layers: list[int]
    runner: DecoderRunner
    adapter_layers: list[nn.Module] = field(default_factory=list)

    @property
    def modified(self) -> list[int]:
        """Layers whose kind is not the original's (the block stage's layers)."""
        return sorted(self.originals)

    @contextlib.contextmanager
    def teacher(self, record: dict | None = None):
        """Adapters off and the original attention back in every modified layer (record: stage-1 targets)."""
        saved = {}
        try:
            # peft's `disable_adapter()` does the same but costs ~35 ms per call (it scans the whole model
            # and reads its status); flipping the flag every LoRA layer reads is all it needs.
            for mod in self.adapter_layers:
                mod._disable_adapters = True
            for i, (attn, norm) in self.originals.items():
                layer = self.layers[i]
                saved[i] = (layer.self_attn, layer.input_layernorm)
                if record is not None and i in self.windowed:
                    attn = _Record(attn, record, i)
                layer.self_attn, layer.input_layernorm = attn, norm
            yield
        finally:
            for mod in self.adapter_layers:
                mod._disable_adapters = False
            for i, (attn, norm) in saved.items():
                self.layers[i].self_attn, self.layers[i].input_layernorm = attn, norm

    def embed(self, input_ids: torch.Tensor):
        """Embeddings and the layers' context (rotary tables, positions, mask) for full causal rows."""
        return self.runner.embed(input_ids)

    def run(self, x: torch.Tensor, start: int, end: int, ctx: dict) -> torch.Tensor:
        return self.runner.run(x, ctx, start, end)

    def teacher_boundaries(self, x0: torch.Tensor, ctx: dict, need: list[int]) -> dict[int, torch.Tensor]:
        """Teacher hidden states (B, T, D) at layer boundaries `need` (j: the input of layer j, len(layers): the
        last output), from x0 = the input of layer `prefix` (shared with the student). Call under no_grad."""
        if min(need) < self.prefix:
            raise ValueError(f"boundaries {need} start before the first layer that differs ({self.prefix})")
        out = {self.prefix: x0} if self.prefix in need else {}
        x = x0
        with self.teacher():
            for j in range(self.prefix, max(need)):
                x = self.run(x, j, j + 1, ctx)
                if j + 1 in need:
                    out[j + 1] = x
        return out


def _lora_layer_indices(cfg: HealConfig, plan: LayerPlan) -> list[int]:
    n = len(plan)
    modified = [i for i, s in enumerate(plan.layers) if s.kind != ORIGINAL]
    if cfg.lora_layers == "all":
        return list(range(n))
    if cfg.lora_layers == "modified":
        return modified
    if cfg.lora_layers == "neighbours":
        return sorted({j for i in modified for j in range(i - cfg.neighbours, i + cfg.neighbours + 1) if 0 <= j < n})
    idx = sorted({int(x) for x in str(cfg.lora_layers).split(",")})
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise HealConfigError(f"lora_layers {bad} are outside the model's {n} layers")
    return idx


def build_hybrid(model: nn.Module, plan: LayerPlan, cfg: HealConfig, student: dict | None = None) -> Hybrid:
    """Convert `model` (the original, in place), add LoRA with peft, and keep the teacher's attention aside.
    `student`: the state dict of the converted model to start from (a `convert` output: its kinds' own parameters
    as that conversion drew them), loaded after the conversion; None: the conversion's own.

    Raises:
        HealConfigError: the model is already converted (the teacher's attention would be gone), or `student`
            does not fit the converted model.
    """
    import peft
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if plan_of(model) is not None:
        raise HealConfigError("heal needs the original model (the teacher); this one is already a layerboost hybrid")
    decoder, layers = decoder_parts(model)
    arch = architecture(model)
    if arch.final_softcap and getattr(model.config, arch.final_softcap, None):
        raise ValueError(f"heal's distillation losses compute logits without {arch.final_softcap} "
                         f"({getattr(model.config, arch.final_softcap)}); this model cannot be healed yet")
    plan = LayerPlan(plan.layers, num_layers=len(layers))
    native = native_plan(model).layers  # a layer planned as the original has it (Gemma 3's swa 512) is not modified
    originals = {i: (layers[i].self_attn, layers[i].input_layernorm) for i, s in enumerate(plan.layers) if s != native[i]}
    if not originals:
        raise ValueError("the plan changes no layer: there is nothing to heal")
    torch.manual_seed(cfg.seed)  # a kind that initialises parameters at random draws them from the seed
    convert(model, plan)
    if student is not None:
        missing, unexpected = model.load_state_dict(student, strict=False)
        if missing or unexpected:
            raise HealConfigError(f"the student does not fit the original converted to the plan: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}; give the converted model of this original and plan")
    for p in model.parameters():
        p.requires_grad_(False)

    lora_layers = _lora_layer_indices(cfg, plan)
    layers_path = next(n for n, m in model.named_modules() if m is layers)
    targets = []
    for i in lora_layers:
        for name, mod in layers[i].named_modules():
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.lora_targets:
                targets.append(f"{layers_path}.{i}.{name}")
    if not targets:
        raise HealConfigError(
            f"no nn.Linear named {list(cfg.lora_targets)} in layers {lora_layers}: nothing would get LoRA adapters"
        )
    torch.manual_seed(cfg.seed)  # LoRA A init
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none")
    peft_model = get_peft_model(model, lcfg)
    first_diff = min(list(originals) + lora_layers)
    windowed = [i for i, s in enumerate(plan.layers) if kind(s.kind).windowed and i in originals]
    adapter_layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    if not all(isinstance(getattr(m, "_disable_adapters", None), bool) and m.disable_adapters is m._disable_adapters
               for m in adapter_layers):
        raise RuntimeError(f"this peft version ({peft.__version__}) keeps LoRA's on/off switch elsewhere; "
                           "layerboost.heal needs updating")
    return Hybrid(peft_model, decoder, layers, model.get_output_embeddings(), plan, originals, first_diff, windowed,
                  lora_layers, DecoderRunner(model), adapter_layers)


def lora_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    from peft.tuners.lora import LoraLayer

    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, LoraLayer):
            for sub in (mod.lora_A, mod.lora_B):
                for pname, p in sub.named_parameters():
                    out.append((f"{name}.{'lora_A' if sub is mod.lora_A else 'lora_B'}.{pname}", p))
    return out


def heal_params(h: Hybrid) -> dict[str, nn.Parameter]:
    """Every parameter healing can change (LoRA A/B everywhere + the kinds' own parameters): the checkpoint."""
    return dict(lora_params(h.peft_model) + own_parameters(h.peft_model))
