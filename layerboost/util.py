"""Small helpers every stage shares, each written once: dtype and device names, output-path checks,
atomic writes, and the environment a measurement records."""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class UsageError(ValueError):
    """Arguments or settings that cannot work together or with the files they name; the message says the fix."""


def dtype_name(value: str | torch.dtype) -> str:
    """`float32` / `bfloat16` / `float16`, or their aliases fp32 / bf16 / fp16 -> the canonical name; a
    torch.dtype -> its name (`torch.bfloat16` -> `bfloat16`)."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    name = DTYPE_ALIASES.get(value, value)
    if name not in DTYPES:
        raise UsageError(f"dtype {value!r} is not known: use one of {', '.join(list(DTYPES) + list(DTYPE_ALIASES))}")
    return name


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A dtype name (or alias, or a torch.dtype) -> torch.dtype."""
    return value if isinstance(value, torch.dtype) else DTYPES[dtype_name(value)]


def resolve_device(value: str) -> str:
    """`auto` (cuda if available, else cpu), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise UsageError(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{value!r}: CUDA is not available here; use --device cpu (or auto)")
    return value


def version() -> str:
    """layerboost's version, as installed (pyproject.toml is its one home)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("layerboost")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set: nothing may be fetched from the hub."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# ---- output paths ---------------------------------------------------------------------------------


def check_writable(path, what: str = "--out", folder: bool = True) -> None:
    """Fail now, before any work, if `path` (a folder, or a file with folder=False) cannot be written.

    Raises:
        UsageError: the path or its nearest existing parent is of the wrong kind or not writable.
    """
    p = Path(path).expanduser().absolute()
    if p.exists() and p.is_dir() != folder:
        raise UsageError(f"{what} {path} is a {'file' if folder else 'folder'}; give a {'folder' if folder else 'file'} path")
    parent = p if folder and p.is_dir() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path} cannot be created: {parent} is a file, not a folder; choose another {what}")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise UsageError(f"{what} {path} is not writable ({e.strerror} in {parent}): choose a folder you can write to") from e


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write `data` (text, bytes, or a function that writes the file it is given) to a temporary file beside
    `path`, then rename it over `path`: a killed writer leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if callable(data):
        data(tmp)
    elif isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike):
    """The JSON in `path`, or None when there is no such file (a result not written yet)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def usual_modes(folder: str | os.PathLike) -> None:
    """Give the files directly in `folder` the mode a plain `open()` gives under this umask (0644 under the usual
    022): safetensors writes its weights 0600, which left a model's weights the one file others could not read."""
    mask = os.umask(0)
    os.umask(mask)
    for f in Path(folder).iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)


def write_json(path: str | os.PathLike, obj, indent: int | None = 1, **kwargs) -> Path:
    """`obj` as JSON, written atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


# ---- environment ----------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def allocator() -> str:
    """The C allocator this process uses: a preloaded jemalloc/tcmalloc/mimalloc, else the C library's malloc.
    On CPU it sets the speed: glibc returns freed large buffers to the kernel, and on this project's VM the page
    faults of re-touching them took more than half of a healing step (docs/experiments/healing.md)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: no preload to detect
        return "system"
    return next((a for a in _ALLOCATORS if f"lib{a}" in maps), "glibc")


def environment(device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict:
    """What a measurement ran on: date, versions, CPU, threads, RAM, GPU."""
    import psutil
    import transformers

    device = torch.device(device)
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "layerboost": version(),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "allocator": allocator(), "device": str(device),
           "dtype": None if dtype is None else dtype_name(dtype), "gpu": None,
           "ram_bytes": psutil.virtual_memory().total, "ram_available_bytes": psutil.virtual_memory().available}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env
