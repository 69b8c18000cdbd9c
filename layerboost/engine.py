"""A static-shape decode engine for base and hybrid models (gpt-fast style).

    engine = Engine(model, batch_size=16, max_seq_len=4224)         # compile=True: torch.compile the step
    tokens = engine.generate(input_ids, max_new_tokens=4096)        # greedy, == model.generate

`prefill` runs the prompt through the model's own decoder layers (so prompt processing is
exactly the HF forward) and copies what each layer keeps into preallocated buffers;
`decode_one_token` then runs one decode step, `_step(tokens, pos, span)`, over those buffers.
The position is a (1,) tensor that stays on the device, so no tensor shape depends on it and the
step never synchronises with the host: `torch.compile` (CUDA graphs on a GPU) captures it once.

    softmax     FullKV         (B, nkv, Tmax, hs) keys and values, token t written at slot t;
                               attention reads the first `span` slots under the mask slot <= t
    swa         WindowKV       a ring of W slots, token t at slot t % W; attention reads every
                               slot under the same mask (slot j is filled once t >= j)
    linear_swa  LinearWindowKV the ring + fp32 state S (B, nh, F, hs) and normaliser z (B, nh, F);
                               the key in the slot about to be overwritten (position t - W) is
                               folded into S, z first (times 0 while t < W: no branch on t)
    none        nothing        the layer's attention and input norm are skipped

`span` (default `max_seq_len`) is the number of slots the softmax layers read. It changes only
when the caller sets it; a step with span n costs what a step of an engine sized for n tokens
costs, so the benchmarks set it per decode length instead of reallocating (a compiled step
compiles once more for the second span it sees, then treats the span as symbolic).

Decoding reuses the model's embeddings, norms, MLPs, q/k/v/o projections (and Qwen3's
q_norm/k_norm), rotary tables and lm_head, so greedy tokens equal `model.generate(do_sample=False)`
(tests/test_engine.py), eager and compiled.

Shapes: B batch, T tokens, nh query heads, nkv key/value heads, G = nh // nkv, hs head size,
F linear-attention features. Prompts must have equal length (no padding): benchmarks use
equal-length prompts, and a padding mask raises `ValueError`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import LinearSlidingWindowAttention, repeat_kv
from .cache import FullLayer, HybridCache, LinearWindowLayer, WindowLayer, expected_cache_bytes
from .compat import apply_rope
from .kinds import kind
from .plan import LayerSpec, native_plan
from .runner import DecoderRunner
from .surgery import UnsupportedModelError, plan_of


class FullKV(nn.Module):
    """softmax layers: every token's keys and values, (B, nkv, Tmax, hs)."""

    def __init__(self, b, nkv, tmax, hs, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(b, nkv, tmax, hs, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(b, nkv, tmax, hs, dtype=dtype, device=device), persistent=False)

    def load(self, layer: FullLayer) -> None:
        n = layer.keys.shape[-2]
        self.k[:, :, :n].copy_(layer.keys)
        self.v[:, :, :n].copy_(layer.values)

    def held_bytes(self, n_tokens: int) -> int:
        return 2 * self.k[:, :, :n_tokens].numel() * self.k.element_size()


class WindowKV(nn.Module):
    """swa layers: a ring buffer of `slots` = min(W, Tmax) positions, token t at slot t % slots."""

    def __init__(self, b, nkv, slots, hs, dtype, device):
        super().__init__()
        self.slots = slots
        self.register_buffer("k", torch.zeros(b, nkv, slots, hs, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(b, nkv, slots, hs, dtype=dtype, device=device), persistent=False)

    def load(self, layer: WindowLayer) -> None:
        n = layer.keys.shape[-2]  # the last min(seen, W) tokens, oldest first
        pos = torch.arange(layer.seen - n, layer.seen, device=self.k.device)
        self.k[:, :, pos % self.slots] = layer.keys
        self.v[:, :, pos % self.slots] = layer.values

    def held_bytes(self, n_tokens: int) -> int:
        return 2 * self.k[:, :, : min(n_tokens, self.slots)].numel() * self.k.element_size()


class LinearWindowKV(WindowKV):
    """linear_swa layers: the ring plus the fp32 linear-attention state of every older token."""

    def __init__(self, b, nkv, slots, hs, dtype, device, nh, features):
        super().__init__(b, nkv, slots, hs, dtype, device)
        self.register_buffer("state", torch.zeros(b, nh, features, hs, dtype=torch.float32, device=device),
                             persistent=False)
        self.register_buffer("normalizer", torch.zeros(b, nh, features, dtype=torch.float32, device=device),
                             persistent=False)

    def load(self, layer: LinearWindowLayer) -> None:
        super().load(layer)
        if layer.state is None:
            self.state.zero_()
            self.normalizer.zero_()
        else:
            self.state.copy_(layer.state)
            self.normalizer.copy_(layer.normalizer)

    def held_bytes(self, n_tokens: int) -> int:
        return super().held_bytes(n_tokens) + (self.state.numel() + self.normalizer.numel()) * 4


class CompileError(RuntimeError):
    """torch.compile could not compile the decode step on this machine (no silent eager fallback)."""


class Engine:
    """Greedy prefill + static-shape decode of a base or layerboost hybrid model over preallocated buffers.

    Args:
        model: an HF causal LM (llama, mistral, qwen2, qwen3, gemma3_text), original (layers that slide
            natively get ring buffers of their window) or converted by `layerboost.convert`.
        batch_size: sequences decoded together (B).
        max_seq_len: prompt + generated tokens the buffers hold (Tmax).
        compile: wrap the decode step in `torch.compile` (fullgraph; mode "reduce-overhead", i.e.
            CUDA graphs, on CUDA; the default mode elsewhere). It compiles at the first decode step,
            once more at the second span (then symbolic), and again for each new batch size or
            Tmax (dynamo keeps module buffer shapes static); raises dynamo's process-wide
            recompile limit to 64.

    Raises:
        UnsupportedModelError: unknown architecture, or a kind without engine buffers.
        CompileError (at the first decode step): inductor cannot compile here.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_seq_len: int, compile: bool = False):
        self.model = model
        self.runner = DecoderRunner(model)  # the prefill runs the model's own layers through it
        self.decoder, self.layers = self.runner.decoder, self.runner.layers
        cfg = model.config
        self.plan = plan_of(model) or native_plan(model)  # the original model: its own windows where it slides
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hs = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.groups = self.nh // self.nkv
        arch = self.runner.arch
        # The decoder layer's norms around each sublayer (Gemma 3 also normalises each sublayer's output)
        self.norms = [(layer.input_layernorm, getattr(layer, arch.mlp_in_norm),
                       getattr(layer, arch.attn_out_norm) if arch.attn_out_norm else None,
                       getattr(layer, arch.mlp_out_norm) if arch.mlp_out_norm else None) for layer in self.layers]
        self.caches: list[nn.Module | None] = [self._make_cache(s, layer.self_attn) for s, layer
                                               in zip(self.plan.layers, self.layers)]
        # A cacheless kind other than `none` adds an output of its own (a function of the token's own state):
        # its module provides `self_attn.decode(x)`; `none` adds nothing and is skipped.
        self.own_output = [c is None and s.kind != "none" for s, c in zip(self.plan.layers, self.caches)]
        missing = [f"layer {i} ({s.kind})" for i, (s, own, layer) in enumerate(zip(self.plan.layers, self.own_output,
                   self.layers)) if own and not hasattr(layer.self_attn, "decode")]
        if missing:
            raise UnsupportedModelError("the engine cannot decode " + ", ".join(missing) + ": no self_attn.decode()")
        # Rotary tables for every position, computed once by the model's own rotary module: (1, Tmax, hs),
        # one pair per layer type where the family has several (`rope_of[i]` names layer i's)
        pos = torch.arange(max_seq_len, device=self.device)
        dummy = torch.empty(0, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            tables = self.runner.rotary(dummy, pos[None])
        self.rope = tables if isinstance(tables, dict) else {None: tables}
        self.rope_of = self.runner.layer_types or [None] * len(self.layers)
        self.slot_index = pos  # (Tmax,) slot numbers, compared with the position to build the masks
        self.input_pos = torch.zeros(1, dtype=torch.long, device=self.device)  # the step's position, on the device
        self._pos = 0  # the same position on the host: tokens held so far
        self.span = max_seq_len
        self.graphs = compile and self.device.type == "cuda"  # CUDA graphs replay into reused output buffers
        self._run = self._compile() if compile else self._step

    def _make_cache(self, spec: LayerSpec, attn):
        """Static buffers for the cache type of the layer's kind (kinds.py); None for cacheless kinds."""
        b, t, args = self.batch_size, self.max_seq_len, (self.dtype, self.device)
        cache = kind(spec.kind).cache
        if cache == "full":
            return FullKV(b, self.nkv, t, self.hs, *args)
        if cache == "window":
            return WindowKV(b, self.nkv, min(spec.window, t), self.hs, *args)
        if cache == "linear_window":
            features = attn.feature_map_q.weight.shape[-1] * 2
            return LinearWindowKV(b, self.nkv, min(spec.window, t), self.hs, *args, nh=self.nh, features=features)
        if cache is not None:
            raise UnsupportedModelError(f"the engine has no buffers for cache type {cache!r} (kind {spec.kind!r})")
        return None

    def _compile(self):
        if self.graphs:  # CUDA graphs need the tensors the step reads and writes at fixed addresses
            for t in [x for cs in self.rope.values() for x in cs] + [self.slot_index, self.input_pos] + [
                    b for c in self.caches if c is not None for b in c.buffers()]:
                torch._dynamo.mark_static_address(t)
        # Every engine compiles the same code object (`Engine._step`); each model structure, and each
        # first change of batch, Tmax or span, adds an entry to its one cache: allow more than dynamo's 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # fullgraph: a graph break, or hitting that limit, raises instead of running eagerly.
        return torch.compile(self._step, mode="reduce-overhead" if self.graphs else None, fullgraph=True)

    @property
    def pos(self) -> int:
        """Tokens held so far = the position of the next token. Setting it moves the device position too."""
        return self._pos

    @pos.setter
    def pos(self, value: int) -> None:
        self._pos = int(value)
        self.input_pos.fill_(self._pos)

    # ---- memory ---------------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        """Bytes of every preallocated cache buffer (what the engine holds, sized for Tmax)."""
        return sum(b.numel() * b.element_size() for c in self.caches if c is not None for b in c.buffers())

    def held_bytes(self, n_tokens: int | None = None) -> int:
        """Bytes of the buffers that hold tokens after `n_tokens` (default: now), linear states included."""
        n = self.pos if n_tokens is None else n_tokens
        return sum(c.held_bytes(n) for c in self.caches if c is not None)

    def weight_bytes(self) -> int:
        """Bytes of the parameters one decode step reads: every layer's MLP and post-attention norm,
        attention (or its own output module) and input norm unless the layer is `none`, the final norm and the LM head
        (a tied embedding counted once; the B embedding rows gathered are left out)."""
        mods = [self.decoder.norm, self.model.lm_head]
        for layer, cache, own, (in_norm, mlp_norm, attn_out, mlp_out) in zip(self.layers, self.caches, self.own_output,
                                                                           self.norms):
            mods += [layer.mlp, mlp_norm] + ([mlp_out] if mlp_out is not None else [])
            if cache is not None or own:
                mods += [layer.self_attn, in_norm] + ([attn_out] if attn_out is not None else [])
        params = {id(p): p for m in mods for p in m.parameters()}
        return sum(p.numel() * p.element_size() for p in params.values())

    def step_bytes(self, context: int) -> int:
        """Bytes one decode step must read at `context` tokens: `weight_bytes()` + the caches that
        hold `context` tokens (`expected_cache_bytes`, the formula the buffers are tested against)."""
        return self.weight_bytes() + expected_cache_bytes(self.plan, self.model.config, self.batch_size, context,
                                                          self.dtype)

    # ---- prefill --------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt (B, T) through the model's decoder layers, fill the buffers; logits (B, V) of the last token.

        A single prompt (1, T) is shared: computed once and copied into every row of the buffers
        (logits (1, V)); decoding then costs the same as for B distinct prompts.

        Raises:
            ValueError: wrong batch size, too long, or a padding mask (prompts must have equal length).
        """
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the engine decodes equal-length prompts only: the attention mask has padding; "
                             "use model.generate for padded batches")
        b, t = input_ids.shape
        if b not in (1, self.batch_size):
            raise ValueError(f"the engine was built for batch {self.batch_size}, got {b} prompts")
        if t >= self.max_seq_len:
            raise ValueError(f"a prompt of {t} tokens leaves no room to decode in max_seq_len={self.max_seq_len}")
        hc = HybridCache(self.plan)  # each layer module writes its own cache entry exactly as in HF forward
        h, ctx = self.runner.embed(input_ids)
        for i in range(len(self.layers)):
            h = self.runner.layer(i, h, ctx, cache=hc, use_cache=True)
            if self.caches[i] is not None:
                self.caches[i].load(hc.layers[i])
                hc.layers[i].reset()  # free the prompt's copy now
        self.pos = t
        return self.runner.logits(h[:, -1:])[:, 0]

    # ---- decode ---------------------------------------------------------------------------------
    def _qkv(self, attn, x, cos, sin):
        """q (B, nh, 1, hs), k and v (B, nkv, 1, hs) for one new token, RoPE applied."""
        b = x.shape[0]
        q = attn.q_proj(x).view(b, 1, self.nh, self.hs)
        k = attn.k_proj(x).view(b, 1, self.nkv, self.hs)
        v = attn.v_proj(x).view(b, self.nkv, 1, self.hs)  # T = 1: (B, 1, nkv, hs) has the same layout
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q.view(b, self.nh, 1, self.hs), k.view(b, self.nkv, 1, self.hs), cos, sin)
        return q, k, v

    def _attend(self, q, k, v, mask, scale):
        """Grouped softmax attention of one query per head over n slots: q (B, nh, 1, hs), k/v (B, nkv, n, hs),
        mask (n,) bool (True: the slot holds a visible token).

        The G query heads sharing a kv head become G query rows (no key/value copies).
        """
        b = q.shape[0]
        y = F.scaled_dot_product_attention(q.reshape(b, self.nkv, self.groups, self.hs), k, v,
                                           attn_mask=mask.view(1, 1, 1, -1), scale=scale)
        return y.reshape(b, 1, self.nh * self.hs)

    def _linear_attend(self, attn: LinearSlidingWindowAttention, cache: LinearWindowKV, q, mask):
        """LinearSlidingWindowAttention's formula for one query: weighted window softmax over the ring
        + the linear state."""
        b = q.shape[0]
        qg = q.reshape(b, self.nkv, self.groups, self.hs)  # (B, nkv, G, hs)
        s = torch.matmul(qg, cache.k.transpose(-1, -2)).float() * attn.scaling  # (B, nkv, G, slots)
        s = s.masked_fill(~mask, float("-inf"))  # the slot just written is always visible: no empty row
        a = torch.exp(s - s.amax(dim=-1, keepdim=True))
        fw, fl = (f[None, :, None, None] for f in attn.mix_factors())  # (1, nh, 1, 1) each
        num = fw * torch.matmul(a, cache.v.float()).view(b, self.nh, 1, self.hs)
        den = fw * a.sum(dim=-1).view(b, self.nh, 1, 1)
        fq = attn.feature_map_q(q)  # (B, nh, 1, F)
        num = num + fl * torch.matmul(fq, cache.state)
        den = den + fl * torch.matmul(fq, cache.normalizer.unsqueeze(-1))
        return (num / den).to(q.dtype).view(b, 1, self.nh * self.hs)

    def _fold(self, attn, cache: LinearWindowKV, slot, pos) -> None:
        """Fold the key leaving the window (position t - W, still in `slot`) into the fp32 state.

        Done every step, times 0 while t < W (the slot then holds nothing, or a key still in the window).
        """
        leaving = (pos >= attn.window).float()  # (1,)
        k_old = repeat_kv(cache.k.index_select(2, slot), self.groups)  # (B, nh, 1, hs)
        v_old = repeat_kv(cache.v.index_select(2, slot), self.groups).float()
        fk = attn.feature_map_k(k_old) * leaving  # (B, nh, 1, F)
        cache.state.add_(torch.matmul(fk.transpose(-1, -2), v_old))
        cache.normalizer.add_(fk[:, :, 0])

    def _attention(self, cache, attn, x, cos, sin, pos, valid, span: int):
        q, k, v = self._qkv(attn, x, cos, sin)
        if isinstance(cache, FullKV):
            cache.k.index_copy_(2, pos, k)
            cache.v.index_copy_(2, pos, v)
            return attn.o_proj(self._attend(q, cache.k[:, :, :span], cache.v[:, :, :span], valid[:span], attn.scaling))
        slot = pos % cache.slots  # (1,)
        if isinstance(cache, LinearWindowKV):
            self._fold(attn, cache, slot, pos)
        cache.k.index_copy_(2, slot, k)
        cache.v.index_copy_(2, slot, v)
        mask = valid[: cache.slots]  # ring slot j holds a token once t >= j
        if isinstance(cache, LinearWindowKV):
            return attn.o_proj(self._linear_attend(attn, cache, q, mask))
        return attn.o_proj(self._attend(q, cache.k, cache.v, mask, attn.scaling))

    def _step(self, tokens: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """tokens (B, 1) at position pos (1,) -> logits (B, V); writes the caches in place. No shape depends on pos."""
        h = self.decoder.embed_tokens(tokens)  # (B, 1, D)
        # (1, 1, hs) per layer type: broadcast over B
        rope = {t: (cos.index_select(1, pos), sin.index_select(1, pos)) for t, (cos, sin) in self.rope.items()}
        valid = self.slot_index <= pos  # (Tmax,): slot j holds a token (full: position j; ring: once t >= j)
        for layer, cache, own, rt, (in_norm, mlp_norm, attn_out, mlp_out) in zip(
                self.layers, self.caches, self.own_output, self.rope_of, self.norms):
            a = None
            if cache is not None:
                a = self._attention(cache, layer.self_attn, in_norm(h), *rope[rt], pos, valid, span)
            elif own:  # attention-free, with an output of its own; `none` layers: no input norm, nothing
                a = layer.self_attn.decode(in_norm(h))
            if a is not None:
                h = h + (a if attn_out is None else attn_out(a))
            m = layer.mlp(mlp_norm(h))
            h = h + (m if mlp_out is None else mlp_out(m))
        return self.runner.logits(h)[:, 0]

    @torch.no_grad()
    def decode_one_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1) at position `self.pos` -> logits (B, V); advances `self.pos`.

        Raises:
            ValueError: the position is past `span` (or `max_seq_len`).
            CompileError: compile=True and inductor cannot compile the step here.
        """
        if not self._pos < self.span <= self.max_seq_len:
            raise ValueError(f"position {self._pos} is past what the step reads: span {self.span}, "
                             f"buffers for max_seq_len={self.max_seq_len} tokens")
        if self.graphs:  # a new CUDA graph replay may overwrite the previous outputs; they were cloned
            torch.compiler.cudagraph_mark_step_begin()
        try:
            logits = self._run(tokens, self.input_pos, self.span)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            cause = e.inner_exception
            raise CompileError(f"torch.compile (inductor) could not compile the decode step on {self.device}: "
                               f"{type(cause).__name__}: {str(cause).strip()[:500]}; "
                               "run without --compile / compile=False") from e
        self.input_pos += 1
        self._pos += 1
        return logits.clone() if self.graphs else logits

    @torch.no_grad()
    def decode_n_tokens(self, token: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy-decode `n` tokens after `token` (B, 1); returns them (B, n) (written into `out` if given)."""
        out = torch.empty(self.batch_size, n, dtype=torch.long, device=self.device) if out is None else out
        for j in range(n):
            token = self.decode_one_token(token).argmax(dim=-1, keepdim=True)
            out[:, j : j + 1] = token
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy generation: prompt + `max_new_tokens` tokens, (B, T + max_new_tokens). No early stop at EOS."""
        t = input_ids.shape[1]
        if t + max_new_tokens > self.max_seq_len + 1:
            raise ValueError(f"{t} + {max_new_tokens} tokens do not fit max_seq_len={self.max_seq_len}")
        first = self.prefill(input_ids, attention_mask).argmax(dim=-1, keepdim=True)
        rest = self.decode_n_tokens(first, max_new_tokens - 1) if max_new_tokens > 1 else first[:, :0]
        return torch.cat([input_ids, first, rest], dim=1)


__all__ = ["CompileError", "Engine", "FullKV", "LinearWindowKV", "WindowKV"]
