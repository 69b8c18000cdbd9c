"""GGUF export: the file read back with the `gguf` package's own reader (fast, tiny random models), and the
exports run in the pinned, patched llama.cpp (slow: SmolLM2, greedy tokens and perplexity against layerboost).

The engine tests need engines/llama.cpp/build.sh. Without the build they skip with one line saying so,
except when LAYERBOOST_REQUIRE_LLAMA_CPP=1 (set by .ci/run), where a missing build fails them.
"""

import copy
import json
import os

import numpy as np
import pytest
import torch

import layerboost as lb
from layerboost import LayerPlan
from layerboost.export_gguf import GGUFExportError, gguf_arch, write_gguf

from conftest import tiny_model

VOCAB = 300
W = 8


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained in memory (GPT-2 pre-tokenizer), vocab 300."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog, again and again"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


def hybrid(kinds, window=W, arch="llama", tied=False):
    m = tiny_model(arch, vocab=VOCAB)
    if tied:
        m.config.tie_word_embeddings = True
        m.lm_head.weight = m.model.embed_tokens.weight
    lb.convert(m, LayerPlan.from_kinds(list(kinds), window=window))
    return m


def read(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def _unrope(rows: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of the export's q/k row order, written independently: llama.cpp row 2i / 2i+1 of a head are HF rows
    i / i + d/2 of that head (interleaved pairs vs rotate-half halves)."""
    d = rows.shape[0] // heads
    out = np.empty_like(rows)
    for h in range(heads):
        for i in range(d // 2):
            out[h * d + i] = rows[h * d + 2 * i]
            out[h * d + d // 2 + i] = rows[h * d + 2 * i + 1]
    return out


@pytest.mark.parametrize("kinds,arch", [
    (["softmax"] * 4, "llama"),
    (["softmax", "none", "softmax", "none"], "deci"),
    (["softmax", "swa", "swa", "softmax"], "granite_swa"),
    (["softmax", "swa", "none", "softmax"], "layerboost-deci"),
])
def test_keys_arrays_and_tensors_read_back(tmp_path, tokenizer, kinds, arch):
    m = hybrid(kinds)
    assert gguf_arch(m.layerboost_plan) == arch
    path = write_gguf(m, tokenizer, tmp_path / "m.gguf", "f32")
    f, t = read(path)
    cfg = m.config
    assert f["general.architecture"] == arch
    assert f[f"{arch}.block_count"] == 4 and f[f"{arch}.embedding_length"] == 64
    assert f[f"{arch}.rope.dimension_count"] == 16 and f[f"{arch}.rope.freq_base"] == cfg.rope_parameters["rope_theta"]
    attends = [k != "none" for k in kinds]
    heads = f[f"{arch}.attention.head_count"]
    if "deci" in arch:
        assert heads == [4 if a else 0 for a in attends]
        assert f[f"{arch}.attention.head_count_kv"] == [2 if a else 0 for a in attends]
    else:
        assert heads == 4 and f[f"{arch}.attention.head_count_kv"] == 2
    if "swa" in kinds:
        assert f[f"{arch}.attention.sliding_window"] == W
        assert f[f"{arch}.attention.sliding_window_pattern"] == [k == "swa" for k in kinds]
    else:
        assert f"{arch}.attention.sliding_window" not in f
    # tensors: attention weights exactly for the layers that attend, sinks only for granite_swa
    for i, a in enumerate(attends):
        for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"):
            assert (f"blk.{i}.{name}.weight" in t) == a, (i, name)
        assert (f"blk.{i}.attn_sinks.weight" in t) == (arch == "granite_swa" and a)
        for name in ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down"):
            assert f"blk.{i}.{name}.weight" in t
    assert [int(x) for x in t["blk.0.attn_k.weight"].shape] == [64, 32]  # ggml order: (in, out)
    assert [int(x) for x in t["token_embd.weight"].shape] == [64, VOCAB]
    # values: embeddings as written, q/k rows in llama.cpp's rope order
    sd = m.state_dict()
    np.testing.assert_array_equal(t["token_embd.weight"].data, sd["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(t["output.weight"].data, sd["lm_head.weight"].numpy())
    np.testing.assert_array_equal(_unrope(np.array(t["blk.0.attn_q.weight"].data), 4),
                                  sd["model.layers.0.self_attn.q_proj.weight"].numpy())
    np.testing.assert_array_equal(_unrope(np.array(t["blk.0.attn_k.weight"].data), 2),
                                  sd["model.layers.0.self_attn.k_proj.weight"].numpy())
    if arch == "granite_swa":
        assert f["granite_swa.logit_scale"] == 1.0 and f["granite_swa.residual_scale"] == 1.0
        assert np.all(np.array(t["blk.1.attn_sinks.weight"].data) == -30000.0)


def test_tokenizer_and_chat_template_inside(tmp_path, tokenizer):
    f, _ = read(write_gguf(hybrid(["softmax"] * 4), tokenizer, tmp_path / "m.gguf"))
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == VOCAB
    vocab = tokenizer.get_vocab()
    assert all(f["tokenizer.ggml.tokens"][i] == tok for tok, i in vocab.items())
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if not isinstance(m, str) else m for m in merges]
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert f["tokenizer.ggml.token_type"][tokenizer.eos_token_id] == 3  # CONTROL
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == tokenizer.chat_template


@pytest.mark.parametrize("gguf_type,ggml_type", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_types_and_tied_embeddings(tmp_path, tokenizer, gguf_type, ggml_type):
    m = hybrid(["softmax", "none", "softmax", "none"], tied=True)
    f, t = read(write_gguf(m, tokenizer, tmp_path / "m.gguf", gguf_type))
    assert f["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[gguf_type]
    assert "output.weight" not in t  # tied: llama.cpp reuses token_embd
    assert t["blk.0.attn_q.weight"].tensor_type.name == ggml_type
    assert t["blk.0.ffn_norm.weight"].tensor_type.name == "F32"  # norms stay float32


@pytest.mark.parametrize("kinds,window,expect", [
    (["none", "softmax", "softmax", "softmax"], W, "layer 0 is none"),
    (["softmax", "linear_swa", "softmax", "softmax"], W, "no linear attention"),
    (["swa", "none", "swa", "none"], W, "keep one softmax layer"),  # the context could not be created
])
def test_plans_the_engine_cannot_run_are_refused_before_writing(tmp_path, tokenizer, kinds, window, expect):
    m = hybrid(kinds, window=window)
    with pytest.raises(GGUFExportError, match=expect):
        write_gguf(m, tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_windows_with_none_layers_get_a_name_only_the_patched_llama_cpp_knows(tmp_path, tokenizer):
    """A file of swa + none layers is written as layerboost-deci: a stock llama.cpp does not know the name, so it
    refuses the file instead of running deci with every token in view (what it did with such files named deci)."""
    from pathlib import Path

    import gguf

    from layerboost.export_gguf import DECI_SWA, describe

    m = hybrid(["softmax", "swa", "none", "softmax"])
    with pytest.raises(GGUFExportError, match="stock llama.cpp, which would attend to every token"):
        write_gguf(m, tokenizer, tmp_path / "d.gguf", arch="deci")
    with pytest.raises(GGUFExportError, match="is for plans of sliding windows and none layers"):
        write_gguf(hybrid(["softmax", "none", "softmax", "none"]), tokenizer, tmp_path / "d.gguf", arch=DECI_SWA)
    path = write_gguf(m, tokenizer, tmp_path / "m.gguf")
    assert read(path)[0]["general.architecture"] == DECI_SWA and "a stock llama.cpp refuses it" in describe(path)
    # Stock llama.cpp's architectures: the gguf package's list (kept in step with llama.cpp's) lacks the name, and
    # the patch is what registers it, on lines it adds
    assert DECI_SWA not in gguf.MODEL_ARCH_NAMES.values() and "deci" in gguf.MODEL_ARCH_NAMES.values()
    patch = (Path(lb.__file__).parents[1] / "engines/llama.cpp/deci-sliding-window.patch").read_text().splitlines()
    named = [line for line in patch if f'"{DECI_SWA}"' in line]
    assert named and all(line.startswith("+") for line in named)


def test_several_windows_and_unknown_tokenizers_are_refused(tmp_path, tokenizer):
    m = tiny_model("llama", vocab=VOCAB)
    plan = LayerPlan.from_kinds(["softmax", "swa", "swa", "softmax"], window=W)
    plan = LayerPlan(layers=(plan.layers[0], plan.layers[1], lb.LayerSpec("swa", window=4), plan.layers[3]),
                     num_layers=4)
    lb.convert(m, plan)
    with pytest.raises(GGUFExportError, match="several windows"):
        write_gguf(m, tokenizer, tmp_path / "m.gguf")
    odd = copy.deepcopy(tokenizer)
    from tokenizers import pre_tokenizers

    odd.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(GGUFExportError, match="--tokenizer-pre"):
        write_gguf(hybrid(["softmax"] * 4), odd, tmp_path / "m.gguf")
    write_gguf(hybrid(["softmax"] * 4), odd, tmp_path / "m.gguf", tokenizer_pre="gpt-2")  # the user names it
    assert (tmp_path / "m.gguf").is_file()
    with pytest.raises(GGUFExportError, match="not 'gemma3'"):  # a Llama is never written as another family
        write_gguf(hybrid(["softmax"] * 4), tokenizer, tmp_path / "g.gguf", arch="gemma3")
    with pytest.raises(GGUFExportError, match="model_type 'qwen2'"):
        write_gguf(tiny_model("qwen2", vocab=VOCAB), tokenizer, tmp_path / "q.gguf")


# ---- in the engine -----------------------------------------------------------------------------------

SMOL_PLANS = {  # SmolLM2-135M, 30 layers; window 64; layer 0 keeps softmax (llama.cpp reads head sizes there)
    "base": None,
    "softmax+none": ["softmax"] * 20 + ["none"] * 10,
    "softmax+swa": ["softmax", "swa"] * 15,
    "default": (["softmax", "swa", "none"] * 10),
}
WINDOW = 64


def _llama_cpp():
    from layerboost.llama_cpp import LlamaCppMissing, tool

    try:
        tool("llama-server"), tool("llama-perplexity")
    except LlamaCppMissing as e:
        if os.environ.get("LAYERBOOST_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smol():
    _llama_cpp()
    from layerboost.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def wikitext():
    from layerboost.data import default_data_dir

    root = default_data_dir()
    if root is None or not (root / "wikitext/wiki.test.raw").is_file():
        pytest.skip("WikiText-2 not found: set LAYERBOOST_DATA_DIR to the shared data folder")
    return root / "wikitext/wiki.test.raw"


def _model(smol, name):
    model, _ = smol
    if SMOL_PLANS[name] is None:
        return model
    m = copy.deepcopy(model)
    lb.convert(m, LayerPlan.from_kinds(SMOL_PLANS[name], window=WINDOW))
    return m


TIE = 0.005  # logits this close count as a tie: float32 sums in another order move log-probabilities by ~2e-4


def compare_greedy(server, model, ids: list[int], n: int) -> tuple[int, int]:
    """Greedy tokens of llama.cpp against layerboost's engine on the same prompt ids.

    Every token must be equal, except where layerboost's best two logits tie (within TIE) and llama.cpp took the
    other one of the two; the comparison then goes on from llama.cpp's token. Returns (tokens compared, ties).
    """
    from layerboost.engine import Engine

    eng = Engine(model, batch_size=1, max_seq_len=len(ids) + n + 1)
    compared, ties = 0, 0
    while n > 0:
        theirs = server.greedy(ids, n)
        ours = eng.generate(torch.tensor([ids]), n)[0, len(ids):].tolist()
        k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if k is None:
            return compared + n, ties
        with torch.no_grad():
            logits = model(torch.tensor([ids + ours[:k]])).logits[0, -1]
        gap = (logits[ours[k]] - logits[theirs[k]]).item()
        assert gap < TIE, f"token {compared + k}: llama.cpp took {theirs[k]}, {gap:.4f} below layerboost's {ours[k]}"
        ties += 1
        ids, n, compared = ids + theirs[:k + 1], n - k - 1, compared + k + 1
    return compared, ties


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOL_PLANS))
def test_llama_cpp_generates_layerboosts_greedy_tokens(tmp_path, smol, wikitext, name):
    """Prompts of 100 tokens plus 60 generated run well past the window (64): llama.cpp's greedy tokens are
    layerboost's, but for near-ties (at most one per prompt)."""
    from layerboost.llama_cpp import serve

    model, tok = smol
    m = _model(smol, name)
    path = write_gguf(m, tok, tmp_path / f"{name}.gguf", "f32")
    lines = [ln.strip() for ln in wikitext.read_text().splitlines() if len(ln.strip()) > 400]
    with serve(path, ctx=512, kv_type="f32", flash_attn="off") as server:
        assert server.tokenize(lines[0][:300]) == tok(lines[0][:300])["input_ids"]
        for line in lines[:3]:
            compared, ties = compare_greedy(server, m, tok(line)["input_ids"][:100], 60)
            assert compared == 60 and ties <= 1


@pytest.mark.slow
def test_llama_cpp_keeps_layerboosts_tokens_after_its_window_cache_wraps(tmp_path, smol, wikitext):
    """With micro-batches of 64, llama.cpp's sliding-window cache holds 256 cells (PAD256(window + micro-batch)):
    a prompt of 600 tokens and 40 more generated overwrite its cells twice over. The tokens stay layerboost's."""
    from layerboost import speed as S
    from layerboost.llama_cpp import serve

    _, tok = smol
    m = _model(smol, "default")
    path = write_gguf(m, tok, tmp_path / "default.gguf", "f32")
    cells = S.Geometry("llama.cpp", ubatch=64).kv_cells(lb.LayerSpec("swa", window=WINDOW), 1024)
    ids = tok(" ".join(ln.strip() for ln in wikitext.read_text().splitlines()[:400]))["input_ids"][:600]
    assert cells == 256 and len(ids) == 600 > 2 * cells
    with serve(path, ctx=1024, kv_type="f32", flash_attn="off", extra=["-ub", "64", "-b", "64"]) as server:
        compared, ties = compare_greedy(server, m, ids, 40)
    assert compared == 40 and ties <= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOL_PLANS))
def test_llama_cpp_perplexity_equals_layerboosts(tmp_path, smol, wikitext, name):
    """llama-perplexity on 4 chunks of 256 tokens equals layerboost's on the same chunks (relative 5e-4)."""
    from layerboost.llama_cpp import perplexity, reference_perplexity

    _, tok = smol
    m = _model(smol, name)
    path = write_gguf(m, tok, tmp_path / f"{name}.gguf", "f32")
    text = tmp_path / "text.txt"
    text.write_text(wikitext.read_text()[:20000])
    ids = tok(text.read_text())["input_ids"]
    ours = reference_perplexity(m, ids, ctx=256, chunks=4)
    theirs = perplexity(path, text, ctx=256, chunks=4, kv_type="f32", flash_attn="off")
    assert abs(theirs - ours) / ours < 5e-4, (theirs, ours)


@pytest.mark.slow
def test_serve_stage_writes_both_files_and_measures_them_in_llama_cpp(tmp_path, tokenizer):
    """`run`'s last step for target llama.cpp, on tiny models: two GGUF files and a decode table."""
    from layerboost.llama_cpp import serve_stage

    _llama_cpp()
    base, hyb = tiny_model("llama", vocab=VOCAB), hybrid(["softmax", "swa", "none", "softmax"])
    rec = serve_stage(base, tokenizer, hyb, tmp_path / "serve", depths=(0, 256))
    assert set(rec["decode_tok_s"]) == {"base", "hybrid"}
    assert all(v > 0 for by in rec["decode_tok_s"].values() for v in by.values())
    assert "deci-sliding-window.patch" in rec["needs"] and "| 256 | " in rec["table"]
    f, _ = read(rec["files"]["hybrid"])
    assert f["layerboost-deci.attention.sliding_window_pattern"] == [False, True, False, False]
    assert read(rec["files"]["base"])[0]["general.architecture"] == "llama"


# ---- Gemma 3 -----------------------------------------------------------------------------------------

GEMMA_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2


def spm_tokenizer():
    """A byte-fallback BPE tokenizer shaped like Gemma's: specials, 256 byte tokens, a few pieces and merges."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"])}
    vocab.update({f"<0x{b:02X}>": 4 + b for b in range(256)})
    for piece in ["\u2581", "t", "h", "e", "th", "the", "\u2581the"]:
        vocab[piece] = len(vocab)
    merges = [("t", "h"), ("th", "e"), ("\u2581", "the")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    return tok


def gemma_hybrid(window=4):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                           max_position_embeddings=512, sliding_window=8, layer_types=GEMMA_TYPES,
                           attn_implementation="sdpa", pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    lb.convert(m, LayerPlan(tuple(lb.LayerSpec("swa", window) if t == "sliding_attention" else lb.LayerSpec("softmax")
                                  for t in GEMMA_TYPES)))
    return m


def test_gemma3_keys_norms_and_sentencepiece_vocab_read_back(tmp_path):
    m, tok = gemma_hybrid(), spm_tokenizer()
    f, t = read(write_gguf(m, tok, tmp_path / "g.gguf", "f32"))
    cfg = m.config
    assert f["general.architecture"] == "gemma3" and f["gemma3.block_count"] == 6
    assert f["gemma3.attention.sliding_window"] == 4
    assert f["gemma3.attention.sliding_window_pattern"] == [x == "sliding_attention" for x in GEMMA_TYPES]
    assert f["gemma3.rope.freq_base"] == cfg.rope_parameters["full_attention"]["rope_theta"]
    assert f["gemma3.rope.freq_base_swa"] == cfg.rope_parameters["sliding_attention"]["rope_theta"]
    assert f["gemma3.attention.key_length"] == 16
    sd = m.state_dict()
    for hf, ours in (("input_layernorm", "attn_norm"), ("self_attn.q_norm", "attn_q_norm"),
                     ("post_feedforward_layernorm", "post_ffw_norm"), ("pre_feedforward_layernorm", "ffn_norm")):
        np.testing.assert_array_equal(t[f"blk.2.{ours}.weight"].data, (sd[f"model.layers.2.{hf}.weight"] + 1).numpy())
    np.testing.assert_array_equal(t["blk.0.attn_q.weight"].data, sd["model.layers.0.self_attn.q_proj.weight"].numpy())
    assert "output.weight" not in t  # tied
    # the vocabulary as llama.cpp's sentencepiece tokenizer reads it: merges ranked by score
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is False
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    score = dict(zip(tokens, scores))
    assert score["th"] == 0 and score["the"] == -1 and score["\u2581the"] == -2 and score["t"] == -3
    assert types[tokens.index("<0x41>")] == 6 and types[1] == 3 and types[3] == 2  # BYTE, CONTROL, UNKNOWN
    assert f["tokenizer.ggml.bos_token_id"] == 2 and f["tokenizer.ggml.add_bos_token"] is False


def test_gemma3_plans_llama_cpp_cannot_run_are_refused(tmp_path):
    tok = spm_tokenizer()
    m = gemma_hybrid()
    m.layerboost_plan = LayerPlan(tuple(lb.LayerSpec("swa", 4) if i != 2 else lb.LayerSpec("swa", 4)
                                        for i in range(6)))  # a global layer planned swa: its rotary table moves
    with pytest.raises(GGUFExportError, match=r"layers \[2, 5\] change type"):
        write_gguf(m, tok, tmp_path / "g.gguf")
    m.layerboost_plan = LayerPlan(tuple(lb.LayerSpec("none") if i == 1 else s
                                        for i, s in enumerate(gemma_hybrid().layerboost_plan.layers)))
    with pytest.raises(GGUFExportError, match="gemma3 runs softmax and swa layers only"):
        write_gguf(m, tok, tmp_path / "g.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_gemma3_hybrid_in_llama_cpp_generates_layerboosts_tokens(tmp_path, wikitext):
    """Gemma 3 270M with its local windows narrowed 512 -> 128: tokens, greedy tokens past the window and
    perplexity equal layerboost's in llama.cpp's own gemma3."""
    from layerboost.llama_cpp import perplexity, reference_perplexity, serve

    _llama_cpp()
    model, tok = lb.load_model("gemma3-270m")
    lb.convert(model, LayerPlan(tuple(lb.LayerSpec("swa", 128) if s.kind == "swa" else s
                                      for s in lb.plan.native_plan(model).layers)))
    path = write_gguf(model, tok, tmp_path / "gemma.gguf", "f32")
    lines = [ln.strip() for ln in wikitext.read_text().splitlines() if len(ln.strip()) > 600]
    with serve(path, ctx=512, kv_type="f32", flash_attn="off") as server:
        for line in lines[:3]:
            assert server.tokenize(line) == tok(line, add_special_tokens=False)["input_ids"]
        for line in lines[:2]:
            compared, ties = compare_greedy(server, model, tok(line)["input_ids"][:150], 40)
            assert compared == 40 and ties <= 1
    text = tmp_path / "text.txt"
    text.write_text(wikitext.read_text()[:12000])
    ids = tok(text.read_text())["input_ids"]  # Gemma adds a BOS in front, as llama-perplexity does
    assert ids[0] == tok.bos_token_id
    ours = reference_perplexity(model, ids, ctx=256, chunks=3, bos=tok.bos_token_id)
    theirs = perplexity(path, text, ctx=256, chunks=3, kv_type="f32", flash_attn="off")
    assert abs(theirs - ours) / ours < 5e-4, (theirs, ours)


def test_cli_export_gguf_writes_a_file_and_refuses_in_one_line(tmp_path, tokenizer, capsys):
    from layerboost.cli import main

    m = hybrid(["softmax", "swa", "none", "softmax"])
    lb.save(m, tmp_path / "hybrid", tokenizer=tokenizer)
    out = tmp_path / "h.gguf"
    assert main(["export", "--model", str(tmp_path / "hybrid"), "--format", "gguf", "--dtype", "q8_0",
                 "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}" in said and "deci-sliding-window.patch" in said
    assert read(out)[1]["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    # an existing file is never replaced; a folder name, an unknown type and a non-GGUF dtype fail in one line
    for args, expect in ((["--out", str(out)], "exists: choose a new file name"),
                         (["--out", str(tmp_path / "folder")], "ending in .gguf"),
                         (["--out", str(tmp_path / "x.gguf"), "--dtype", "q4_0"], "invalid choice")):
        assert main(["export", "--model", str(tmp_path / "hybrid"), "--format", "gguf", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert expect in err and len(err.splitlines()) <= 2, err
    assert main(["export", "--model", str(tmp_path / "hybrid"), "--format", "deci", "--dtype", "q8_0",
                 "--out", str(tmp_path / "d")]) == 2
    assert "is for GGUF files" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type,tol", [("f16", 1e-3), ("bf16", 5e-3), ("q8_0", 5e-2)])
def test_llama_cpp_runs_each_gguf_type_of_the_default_plan(tmp_path, smol, wikitext, gguf_type, tol):
    """The default plan written as f16, bf16 and q8_0 loads and scores the perplexity of layerboost's float32
    model within the rounding of its type (measured: f16 2e-4, bf16 1.5e-3, q8_0 1.9e-2 relative; the bounds
    leave about 3x, docs/experiments/exports.md)."""
    from layerboost.llama_cpp import perplexity, reference_perplexity

    _, tok = smol
    m = _model(smol, "default")
    path = write_gguf(m, tok, tmp_path / f"default-{gguf_type}.gguf", gguf_type)
    text = tmp_path / "text.txt"
    text.write_text(wikitext.read_text()[:20000])
    ours = reference_perplexity(m, tok(text.read_text())["input_ids"], ctx=256, chunks=4)
    theirs = perplexity(path, text, ctx=256, chunks=4, kv_type="f32", flash_attn="off")  # llama.cpp's defaults
    assert abs(theirs - ours) / ours < tol, (theirs, ours)


@pytest.mark.slow
def test_the_built_llama_cpp_has_no_amx_kernels_and_runs_q8_0_with_its_defaults(tmp_path, tokenizer):
    """build.sh leaves out llama.cpp's AMX kernels, which die on the first prompt of a q8_0 file on CPUs with AMX:
    the tools report no AMX_INT8, and a q8_0 hybrid answers a prompt of a few hundred tokens with default flags."""
    import subprocess

    from layerboost.llama_cpp import tool

    _llama_cpp()
    path = write_gguf(hybrid(["softmax", "swa", "none", "softmax"]), tokenizer, tmp_path / "q8.gguf", "q8_0")
    for threads in ("1", "2"):
        cmd = [str(tool("llama-completion")), "-m", str(path), "-p", "the cat sat on the mat " * 20, "-n", "8",
               "-t", threads, "-no-cnv", "--temp", "0"]
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "system_info" in done.stderr and "AMX_INT8 = 1" not in done.stderr
