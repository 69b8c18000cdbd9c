"""Run GGUF exports in llama.cpp's own tools: find them, serve a file, generate, score perplexity, benchmark.

The tools are the ones engines/llama.cpp/build.sh builds (the pinned llama.cpp with the deci sliding-window
patch) in `$LAYERBOOST_LLAMA_CPP/bin` (default ~/.cache/layerboost/llama.cpp/bin). Everything here talks to
those programs through their command lines and llama-server's HTTP API: nothing of llama.cpp is imported.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

class LlamaCppMissing(RuntimeError):
    """The llama.cpp tools are not built where layerboost looks for them."""


def tools_dir() -> Path:
    return Path(os.environ.get("LAYERBOOST_LLAMA_CPP", Path.home() / ".cache/layerboost/llama.cpp")) / "bin"


def tool(name: str) -> Path:
    """Path of one llama.cpp program; LlamaCppMissing (one line with the fix) when it is not built."""
    path = tools_dir() / name
    if not os.access(path, os.X_OK):
        raise LlamaCppMissing(f"{name} not found in {tools_dir()}: build the pinned, patched llama.cpp with "
                              "engines/llama.cpp/build.sh (or point LAYERBOOST_LLAMA_CPP at its folder)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running llama-server on one GGUF file (use `serve()`)."""

    def __init__(self, url: str):
        self.url = url

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def tokenize(self, text: str) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": False})["tokens"]

    def completion(self, prompt_ids: list[int], n: int, n_probs: int = 0) -> dict:
        """llama-server's /completion answer for `n` greedy tokens after `prompt_ids` (end-of-text does not stop
        it): `tokens`, and with `n_probs` the log-probabilities of the top `n_probs` tokens at each step."""
        body = {"prompt": list(prompt_ids), "n_predict": n, "temperature": 0.0, "top_k": 1, "samplers": ["top_k"],
                "ignore_eos": True, "cache_prompt": False, "return_tokens": True}
        if n_probs:
            body.update(n_probs=n_probs, post_sampling_probs=False)
        return self._post("/completion", body)

    def greedy(self, prompt_ids: list[int], n: int) -> list[int]:
        """`n` greedy tokens after `prompt_ids` (token ids in, token ids out)."""
        return self.completion(prompt_ids, n)["tokens"]


@contextmanager
def serve(gguf: str | os.PathLike, ctx: int = 2048, threads: int = 2, flash_attn: str = "on", kv_type: str = "f16",
          extra=()):
    """Start llama-server on `gguf` (one slot; `extra`: more of its flags), yield a `Server`, stop it afterwards.

    kv_type, flash_attn: comparisons with layerboost's float32 need kv_type "f32" and flash_attn "off": llama.cpp's
    CPU flash-attention kernel and its default f16 cache round to half precision (log-probabilities of SmolLM2
    then differ by up to ~5e-3 from float32; with f32 and no flash attention by ~2e-4).
    """
    port = _free_port()
    cmd = [str(tool("llama-server")), "-m", str(gguf), "-c", str(ctx), "-t", str(threads), "-np", "1",
           "-fa", flash_attn, "-ctk", kv_type, "-ctv", kv_type, "--host", "127.0.0.1", "--port", str(port),
           "--no-webui", *extra]
    log = tempfile.NamedTemporaryFile("w", prefix="llama-server-", suffix=".log", delete=False)  # kept for errors
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    ok = False
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}: see {log.name}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"llama-server did not come up in 120 s: see {log.name}")
            time.sleep(0.2)
        yield Server(url)
        ok = True
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if ok:  # the log is kept (and named in the error) only when something failed
            os.unlink(log.name)


def perplexity(gguf: str | os.PathLike, text_file: str | os.PathLike, ctx: int, chunks: int,
               threads: int = 2, kv_type: str = "f16", flash_attn: str = "on", extra=()) -> float:
    """llama-perplexity's final estimate over the first `chunks` chunks of `ctx` tokens of `text_file`."""
    cmd = [str(tool("llama-perplexity")), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
           "--chunks", str(chunks), "-t", str(threads), "-ctk", kv_type, "-ctv", kv_type, "-fa", flash_attn, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if out.returncode or not found:
        raise RuntimeError(f"llama-perplexity failed ({out.returncode}): {(out.stdout + out.stderr)[-2000:]}")
    return float(found.group(1))


def reference_perplexity(model, token_ids: list[int], ctx: int, chunks: int, bos: int | None = None) -> float:
    """layerboost's perplexity computed the way llama-perplexity scores chunks: each chunk of `ctx` tokens is run
    alone and the second half of its tokens is scored (the first half is context). `token_ids`: the text as
    llama-perplexity tokenizes it, with a BOS in front when the model adds one; `bos`: that BOS id, which
    llama-perplexity also writes over each chunk's first token (None when the model adds none)."""
    import torch
    import torch.nn.functional as F

    first, nll, count = ctx // 2, 0.0, 0
    with torch.no_grad():
        for c in range(chunks):
            ids = torch.tensor(token_ids[c * ctx:(c + 1) * ctx]).unsqueeze(0)
            if ids.shape[1] < ctx:
                raise ValueError(f"the text holds {len(token_ids)} tokens, fewer than {chunks} chunks of {ctx}")
            if bos is not None:
                ids[0, 0] = bos
            logits = model(ids).logits[0, first:ctx - 1].double()
            nll += F.cross_entropy(logits, ids[0, first + 1:ctx], reduction="sum").item()
            count += ctx - 1 - first
    return float(torch.tensor(nll / count).exp())


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def bench(gguf: str | os.PathLike, depths=(0,), n_gen: int = 128, n_prompt: int = 0, reps: int = 3,
          threads: int = 2, flash_attn: int = 1, extra=()) -> list[dict]:
    """llama-bench rows (its JSONL output): decode of `n_gen` tokens after `depths` tokens of context, and
    prompt processing of `n_prompt` tokens when given."""
    cmd = [str(tool("llama-bench")), "-m", str(gguf), "-t", str(threads), "-fa", str(flash_attn), "-r", str(reps),
           "-p", str(n_prompt), "-n", str(n_gen), "-d", ",".join(map(str, depths)), "-o", "jsonl", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"llama-bench failed ({out.returncode}): {out.stderr[-2000:]}")
    return _json_lines(out.stdout)


def batched_bench(gguf: str | os.PathLike, parallel=(1, 4, 8, 16), n_prompt: int = 512, n_gen: int = 64,
                  threads: int = 2, ctx: int | None = None, flash_attn: str = "on", extra=()) -> list[dict]:
    """llama-batched-bench rows (JSONL): `parallel` sequences of `n_prompt` prompt tokens and `n_gen` new tokens
    each, decoded together."""
    ctx = ctx or max(parallel) * (n_prompt + n_gen)
    cmd = [str(tool("llama-batched-bench")), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512",
           "-npp", str(n_prompt), "-ntg", str(n_gen), "-npl", ",".join(map(str, parallel)), "-t", str(threads),
           "-fa", flash_attn, "--output-format", "jsonl", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"llama-batched-bench failed ({out.returncode}): {out.stderr[-2000:]}")
    return _json_lines(out.stdout)


def side_by_side(files: dict[str, Path], depths=(0, 1024, 4096), rounds: int = 2, n_gen: int = 64,
                 threads: int = 2) -> dict:
    """llama-bench decode tokens/s of each file at each depth, the files alternating round by round (so drift
    of the machine hits each alike); the median of the rounds."""
    import statistics

    got: dict = {name: {d: [] for d in depths} for name in files}
    for _ in range(rounds):
        for name, path in files.items():
            for r in bench(path, depths=depths, n_gen=n_gen, reps=1, threads=threads):
                got[name][r["n_depth"]].append(r["avg_ts"])
    return {name: {d: statistics.median(v) for d, v in by.items()} for name, by in got.items()}


def serve_stage(base_model, tokenizer, hybrid, out_dir: str | os.PathLike, gguf_type: str = "f32",
                depths=(0, 1024, 4096), threads: int = 2) -> dict:
    """`run`'s last step for target llama.cpp: the base and the hybrid as GGUF files, and their decode speed in
    llama.cpp side by side. Without the built tools the files are still written and the reason is returned."""
    from .export_gguf import describe, write_gguf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"base": out / f"base-{gguf_type}.gguf", "hybrid": out / f"hybrid-{gguf_type}.gguf"}
    for name, model in (("base", base_model), ("hybrid", hybrid)):  # written anew: a rerun follows a changed hybrid
        write_gguf(model, tokenizer, files[name], gguf_type)
    rec = {"files": {k: str(v) for k, v in files.items()}, "needs": describe(files["hybrid"])}
    try:
        speed = side_by_side(files, depths=depths, threads=threads)
    except LlamaCppMissing as e:
        return {**rec, "skipped": str(e)}
    lines = ["| context | base tok/s | hybrid tok/s | hybrid / base |", "|---|---|---|---|"]
    lines += [f"| {d} | {speed['base'][d]:.1f} | {speed['hybrid'][d]:.1f} | {speed['hybrid'][d] / speed['base'][d]:.2f}x |"
              for d in depths]
    return {**rec, "decode_tok_s": speed, "table": "\n".join(lines), "threads": threads}
