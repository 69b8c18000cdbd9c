"""A static-shape decode engine for base and hybrid models (gpt-fast style).

    engine = Engine(model, batch_size=16, max_seq_len=4224)         # compile=True: torch.compile the step
    tokens = engine.generate(input_ids, max_new_tokens=4096)        # greedy, == model.generate

`prefill` runs the prompt through the model's own decoder layers (so prompt processing is
exactly the HF forward) and copies what each layer keeps into preallocated buffers;
`decode_one_token` then runs one decode step, `_step(tokens, pos, span)`, over those buffers.
The position is a (1,) tensor that stays on the device, so no tensor shape depends on it and the
step never synchronises with the host: `torch.compile` (CUDA graphs on a GPU) captures it once.

Each layer's buffers and decode step come from its kind (layerboost/kinds/<kind>.py: the record's
`decode_buffers`, e.g. softmax's FullKV, swa's ring); a kind without buffers (`none`) skips the layer's
attention sublayer and its input norm.

`span` (default `max_seq_len`) is the number of slots the softmax layers read. It changes only
when the caller sets it; a step with span n costs what a step of an engine sized for n tokens
costs, so the benchmarks set it per decode length instead of reallocating (a compiled step
compiles once more for the second span it sees, then treats the span as symbolic).

Decoding reuses the model's embeddings, norms, MLPs, q/k/v/o projections (and Qwen3's
q_norm/k_norm), rotary tables and lm_head, so greedy tokens equal `model.generate(do_sample=False)`
(tests/test_engine.py), eager and compiled.

Shapes: B batch, T tokens, nh query heads, nkv key/value heads, hs head size. Prompts must have equal
length (no padding): benchmarks use equal-length prompts, and a padding mask raises `ValueError`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .cache import HybridCache, expected_cache_bytes
from .kinds import kind
from .kinds.common import DecodeShape
from .plan import native_plan
from .runner import DecoderRunner
from .surgery import plan_of


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
        UnsupportedModelError: unknown architecture.
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
        arch = self.runner.arch
        # The decoder layer's norms around each sublayer (Gemma 3 also normalises each sublayer's output)
        self.norms = [(layer.input_layernorm, getattr(layer, arch.mlp_in_norm),
                       getattr(layer, arch.attn_out_norm) if arch.attn_out_norm else None,
                       getattr(layer, arch.mlp_out_norm) if arch.mlp_out_norm else None) for layer in self.layers]
        shape = DecodeShape(batch_size, max_seq_len, self.nh, self.nkv, self.hs, self.dtype, self.device)
        # Each layer's buffers and decode step, from its kind; None: the layer's attention sublayer is skipped
        self.caches: list[nn.Module | None] = [
            None if (make := kind(s.kind).decode_buffers) is None else make(s, layer.self_attn, shape)
            for s, layer in zip(self.plan.layers, self.layers)]
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
        attention and input norm where the layer's kind has decode buffers (not `none`), the final norm and the LM
        head (a tied embedding counted once; the B embedding rows gathered are left out)."""
        mods = [self.decoder.norm, self.model.lm_head]
        for layer, cache, (in_norm, mlp_norm, attn_out, mlp_out) in zip(self.layers, self.caches, self.norms):
            mods += [layer.mlp, mlp_norm] + ([mlp_out] if mlp_out is not None else [])
            if cache is not None:
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
    def _step(self, tokens: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """tokens (B, 1) at position pos (1,) -> logits (B, V); writes the caches in place. No shape depends on pos."""
        h = self.decoder.embed_tokens(tokens)  # (B, 1, D)
        # (1, 1, hs) per layer type: broadcast over B
        rope = {t: (cos.index_select(1, pos), sin.index_select(1, pos)) for t, (cos, sin) in self.rope.items()}
        valid = self.slot_index <= pos  # (Tmax,): slot j holds a token (full: position j; ring: once t >= j)
        for layer, cache, rt, (in_norm, mlp_norm, attn_out, mlp_out) in zip(
                self.layers, self.caches, self.rope_of, self.norms):
            if cache is not None:  # the kind's decode step; no buffers (`none`): no input norm, nothing
                a = cache.step(layer.self_attn, in_norm(h), *rope[rt], pos, valid, span)
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


__all__ = ["CompileError", "Engine"]
