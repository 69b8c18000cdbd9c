"""Teacher targets computed once and kept on disk, per row of the packed training stream.

Healing asks the teacher (the original model) for the same things every time it sees a row: the hidden
states at layer boundaries (block-wise local distillation), the final hidden state (exact logit
distillation) or the top-k next-token log-probabilities (top-k logit distillation). A `TeacherCache`
stores them under a folder named by a hash of everything they depend on, so every stage, every row of
a comparison and every resumed run with the same key reads them instead of running the teacher again.

    <root>/<key hash>/key.json                        the key (checked on open)
    <root>/<key hash>/h{j:03d}/{row:08d}.safetensors    {"h": (T, D)}   hidden state at boundary j (the
                                                      input of layer j; j = L: the last layer's output,
                                                      before the final norm), dtype as computed
    <root>/<key hash>/top{k}_t{tau}/{row:08d}.safetensors
                                                      {"logp": (T, k) fp32, "idx": (T, k) int32}: the
                                                      teacher's k most likely next tokens, log-probs at tau

Rows are positions in the packed stream, a pure function of (data, tokenizer, seq_len, seed, shuffle,
segments); the teacher's outputs also depend on its weights (a fingerprint), precision, device type and
attention implementation: all of it is in the key. Only full-length rows are written; a budget's last,
shorter row reads the prefix of a stored row (the teacher is causal) or is computed. Files are written
atomically (temporary name, then rename), so concurrent processes and killed runs leave no partial file.

Size per 1M tokens: a boundary 4 D bytes per token in fp32 (SmolLM2-135M, D = 576: 2.3 GB); top-k 8 k
bytes per token (k = 64: 0.5 GB).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .surgery import CheckpointError
from .util import atomic_write, write_json

SCHEMA = 1


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha1 over parameter names, shapes and 64 evenly spaced values of each: tells different weights apart cheaply."""
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def boundary_name(j: int) -> str:
    return f"h{j:03d}"


def topk_name(k: int, temperature: float) -> str:
    return f"top{k}_t{temperature:g}"


class TeacherCache:
    """Teacher targets on disk, one safetensors file per (target, stream row).

    Args:
        root: the cache root; the targets go to `root/<hash of key>/`.
        key: everything the targets depend on (JSON-serialisable; must contain `seq_len`).

    Raises:
        CheckpointError: the folder holds a key.json that differs from `key` (a hash collision or an edit).
    """

    def __init__(self, root: str | os.PathLike, key: dict):
        self.key = {"schema": SCHEMA, **key}
        blob = json.dumps(self.key, sort_keys=True)
        self.dir = Path(root) / hashlib.sha1(blob.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seq_len = int(key["seq_len"])
        self.hits = self.misses = 0  # (row, target) pairs read / computed
        kf = self.dir / "key.json"
        if not kf.is_file():
            write_json(kf, self.key, sort_keys=True)
        if json.loads(kf.read_text()) != json.loads(blob):
            raise CheckpointError(f"{kf} holds another key than this run's: delete {self.dir} or use another cache root")

    def file(self, name: str, row: int) -> Path:
        return self.dir / name / f"{row:08d}.safetensors"

    def load(self, name: str, rows: list[int], t: int, device) -> dict[str, torch.Tensor] | None:
        """The target `name` of stream rows `rows`, first `t` positions, stacked: {tensor: (B, t, ...)} on
        `device`; None when any row is missing (nothing is read then)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        files = [self.file(name, r) for r in rows]
        if not files or not all(f.is_file() for f in files):
            return None
        try:
            parts = [load_file(f) for f in files]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"teacher cache file unreadable ({e}); delete {self.dir / name} and run again") from e
        self.hits += len(rows)
        return {k: torch.stack([p[k][:t] for p in parts]).to(device, non_blocking=True) for k in parts[0]}

    def save(self, name: str, rows: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Store {tensor: (B, T, ...)} for stream rows `rows` (B of them); rows shorter than seq_len are not stored."""
        from safetensors.torch import save_file

        self.misses += len(rows)
        t = next(iter(tensors.values())).shape[1]
        if t != self.seq_len:
            return
        (self.dir / name).mkdir(exist_ok=True)
        cpu = {k: v.detach().to("cpu") for k, v in tensors.items()}  # one device -> host copy per tensor
        for b, r in enumerate(rows):
            f = self.file(name, r)
            if not f.is_file():
                atomic_write(f, lambda p, b=b: save_file({k: v[b].contiguous() for k, v in cpu.items()}, p))

    def summary(self) -> dict:
        return {"dir": str(self.dir), "row_targets_read": self.hits, "row_targets_computed": self.misses}
