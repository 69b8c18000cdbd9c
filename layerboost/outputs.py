"""Output folders and files: who wrote them, one writer at a time, nothing a user made overwritten.

Every command that writes claims its output first (`claim`), before any work:

- a folder gets a manifest, `.layerboost.json`: the command, the model and, per part of the command (`bench
  latency` and `bench throughput` share a folder), its settings and their hash, its command line, its state
  (`running`, `complete`, `failed`, `interrupted`) and, once done, the files written. A folder that holds other files,
  or a manifest of another command or of other settings, is refused with one line naming the owner and
  the fix (`--force`, another `--out`, or `--resume` where the command resumes).
- a file (a plan, a results JSON) records the same in its own `written_by` key; an existing file without it,
  or written by another command or settings, is refused the same way (a file that cannot hold the key, a GGUF
  export, is never replaced without --force). While a command writes it, a file is locked like a folder, by
  `.NAME.lock` beside it, removed at the end.
- a path inside a folder that another command owns (a run's eval/ results, a model's folder) is refused.
- one writer per folder: an advisory lock (`fcntl.flock` on `.layerboost.lock`, holding the writer's pid and
  command) is taken before the checks and held until the command ends; a second command on the same
  folder fails at once naming the holder. The kernel drops the lock when its process dies, so the lock of a
  killed command is taken over without a stale-lock problem.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .util import UsageError, check_writable, write_json

MANIFEST = ".layerboost.json"
LOCK = ".layerboost.lock"
OWN_FILES = {MANIFEST, LOCK}


class OutputError(UsageError):
    """An output path that belongs to something else, or that another command is writing."""


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def written_by(command: str, settings: dict) -> dict:
    """What a file records about its writer (its `written_by` key)."""
    return {"command": command, "settings_hash": settings_hash(settings)}


def read_manifest(folder: str | os.PathLike) -> dict | None:
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text())
        return m if isinstance(m, dict) and "command" in m else None
    except (OSError, ValueError):
        return None


def _owner_line(m: dict) -> str:
    return f"`layerboost {m['command']}`" + (f" (model {m['model']})" if m.get("model") else "")


def _differs(old: dict, settings: dict, defaults: dict | None = None, extends: dict | None = None) -> list[str]:
    """Names of the settings that differ from a manifest's (all of them when it does not list its settings).

    defaults: each option's default; an option the manifest does not list (added since it was written) had that
        value then. extends: {switch: the settings it governs} of measurements that only add to an output (analyze
        --retrieval): while the manifest's switch is off, turning it on and its settings differ in nothing.
    """
    prev = old.get("settings")
    if not isinstance(prev, dict):
        return sorted(settings)
    norm = json.loads(json.dumps(defaults or {}, default=str))
    new = json.loads(json.dumps(settings, default=str))
    skip = {k for switch, governed in (extends or {}).items() if not prev.get(switch, norm.get(switch))
            for k in (switch, *governed)}
    return sorted(k for k in (set(prev) | set(new)) - skip if prev.get(k, norm.get(k)) != new.get(k, norm.get(k)))


def _check_enclosing(path: Path, command: str) -> None:
    """Raise OutputError when the nearest folder above `path` with a manifest names another command."""
    for parent in path.absolute().parents:
        m = read_manifest(parent)
        if m is not None:
            if m["command"] != command:
                raise OutputError(f"--out {path} is inside {parent}, which {_owner_line(m)} wrote: write it outside "
                                  "that folder, or pass --force")
            return


def check_folder(out: Path, command: str, settings: dict, resume_hint: str, force: bool, key: str | None = None,
                 defaults: dict | None = None, extends: dict | None = None, replace_failed: bool = False) -> None:
    """Raise OutputError unless `out` is new, empty, or this command's with these settings (or force). `key` (default
    `command`) names the part of a command that owns its own settings, e.g. `bench latency` beside `bench throughput`
    in one bench folder; `defaults` and `extends`: see `_differs`; replace_failed: a part that failed (and left
    nothing to resume) may be replaced by other settings."""
    if force:
        return
    _check_enclosing(out, command)
    if not out.is_dir():
        return
    m = read_manifest(out)
    if m is None:
        others = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES)
        if others:
            raise OutputError(f"--out {out} holds files layerboost did not record writing ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}): choose a new or empty folder, or pass --force "
                              "to write there anyway")
        return
    if m["command"] != command:
        raise OutputError(f"--out {out} was written by {_owner_line(m)}, not by `layerboost {command}`: choose another "
                          "--out, or pass --force to replace its results")
    mine = m.get("parts", {}).get(key or command)
    if mine is not None and replace_failed and mine.get("state") == "failed":
        return  # a failed attempt that cannot be resumed: the corrected command replaces it
    diff = _differs(mine, settings, defaults, extends) if mine is not None else []
    if mine is not None and mine.get("settings_hash") != settings_hash(settings) and diff:
        raise OutputError(f"--out {out} holds a `layerboost {key or command}` made with other settings "
                          f"({', '.join(diff[:6])} differ): {resume_hint}choose another --out, or pass --force to "
                          "replace it")


def check_file(path: Path, command: str, settings: dict, force: bool, marked: bool = True) -> None:
    """Raise OutputError unless `path` is new, or a JSON file this command wrote with these settings (or force).
    marked=False: a file that cannot record its writer (a .gguf), never replaced without force."""
    check_writable(path, folder=False)
    if force:
        return
    _check_enclosing(path, command)
    if not path.exists() and not path.is_symlink():
        return
    if not marked:
        raise OutputError(f"--out {path} exists: choose a new file name, or pass --force to replace it")
    try:
        mark = json.loads(path.read_text()).get("written_by")
    except (OSError, ValueError, AttributeError):
        mark = None
    if not isinstance(mark, dict) or mark.get("command") != command:
        raise OutputError(f"--out {path} already exists and was not written by `layerboost {command}`: choose another "
                          "--out, or pass --force to overwrite it")
    if mark.get("settings_hash") != settings_hash(settings):
        raise OutputError(f"--out {path} was written by `layerboost {command}` with other settings: choose another "
                          "--out, or pass --force to overwrite it")


@contextmanager
def folder_lock(out: Path, command: str) -> Iterator[None]:
    """Hold the advisory lock of `out` (created if needed) for the duration; fail at once if it is held."""
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out / LOCK, out, command):
        yield


def file_lock_path(path: Path) -> Path:
    """The lock of an output file: a hidden file beside it, there only while a command writes the file."""
    return path.with_name(f".{path.name}.lock")


@contextmanager
def file_lock(path: Path, command: str) -> Iterator[None]:
    """Hold the lock of output file `path` for the duration (fail at once if it is held); the lock file goes at
    the end. A contender that opened the lock file just before its holder removed it finds it gone and tries
    again, so two writers never both hold it."""
    lock = file_lock_path(path)
    for _ in range(100):
        with _lock(lock, path, command) as fd:
            if _same_file(fd, lock):
                try:
                    yield
                finally:
                    lock.unlink(missing_ok=True)  # still holding it: the next writer opens a new file
                return
    raise OutputError(f"--out {path}: could not take its lock {lock}: remove that file if no command is writing there")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), path.stat())
    except FileNotFoundError:
        return False


@contextmanager
def _lock(lock: Path, out: Path, command: str) -> Iterator[int]:
    """flock `lock` (created if needed) and write the holder's line into it; fail at once if another holds it."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"--out {out} is being written by {_holder(fd)}: wait for it to finish, or choose "
                              "another --out") from None
        line = f"pid {os.getpid()} (layerboost {command})\n".encode()
        os.pwrite(fd, line, 0)  # the first line names the holder at once; then the rest of an older line goes
        os.ftruncate(fd, len(line))
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """The lock file's first line, once it names a live process: the holder writes it just after taking the lock,
    so a contender that comes in between (reading nothing, or a dead holder's line) waits a moment for it."""
    for _ in range(40):
        line = os.pread(fd, 4096, 0).decode(errors="replace").split("\n")[0].strip()
        m = re.match(r"pid (\d+) ", line)
        if m and alive(int(m.group(1))):
            return line
        time.sleep(0.025)
    return "another process"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _files(out: Path) -> dict[str, int]:
    """{relative path: mtime_ns} of the files under `out`, the manifest and lock excepted."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and p.name not in OWN_FILES}


@contextmanager
def claim_file(path: str | os.PathLike, command: str, settings: dict, force: bool = False,
               marked: bool = True) -> Iterator[Path]:
    """Own output file `path` for `command` while the block runs: the checks of `check_file` (before and again
    under the lock), and the file's lock, so that a second command writing the same file fails at once."""
    path = Path(path)
    check_file(path, command, settings, force, marked)
    made = [p for p in path.absolute().parents if not p.exists()]  # the folders this claim creates
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(path, command):
            check_file(path, command, settings, force, marked)  # a writer may have finished in between
            yield path
    finally:
        for folder in made:  # refused or failed before writing: no trace
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


@contextmanager
def claim(out: str | os.PathLike, command: str, settings: dict, *, model: str | None = None, force: bool = False,
          resume_hint: str = "", key: str | None = None, defaults: dict | None = None,
          extends: dict | None = None, replace_failed: bool = False) -> Iterator[Path]:
    """Own folder `out` for `command` while the block runs: the checks of `check_folder` (before and again under
    the lock), the lock, and the manifest. Its `parts` record each command key's settings, argv, state
    (`running`, then `complete` with the files written, or `failed` / `interrupted`)."""
    out, key = Path(out), key or command
    check_writable(out)
    check_folder(out, command, settings, resume_hint, force, key, defaults, extends, replace_failed)  # before its lock
    created = not out.exists()
    try:
        yield from _claimed(out, command, settings, model, force, resume_hint, key, defaults, extends, replace_failed)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):  # refused or failed before writing: no trace
            out.rmdir()


def _claimed(out: Path, command: str, settings: dict, model, force: bool, resume_hint: str, key: str, defaults=None,
             extends=None, replace_failed=False):
    with folder_lock(out, command):
        check_folder(out, command, settings, resume_hint, force, key, defaults, extends,
                     replace_failed)  # a writer may have finished
        settings = json.loads(json.dumps(settings, default=str))
        old = read_manifest(out)
        manifest = old if old is not None and old["command"] == command else {"command": command, "model": model,
                                                                               "parts": {}}
        before = _files(out)
        previous = manifest.setdefault("parts", {}).get(key)
        part = {"settings": settings, "settings_hash": settings_hash(settings), "argv": sys.argv[1:],
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "state": "running", "pid": os.getpid()}
        manifest["parts"][key] = part
        write_json(out / MANIFEST, manifest)
        try:
            yield out
        except BaseException as e:
            if any(before.get(f) != t for f, t in _files(out).items()):
                part["state"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            elif previous is not None:  # nothing written: the folder stays as it was
                manifest["parts"][key] = previous
            else:
                del manifest["parts"][key]
            if manifest["parts"]:
                write_json(out / MANIFEST, manifest)
            else:  # a command refused before writing anything leaves no trace
                (out / MANIFEST).unlink(missing_ok=True)
            raise
        finally:
            if not (out / MANIFEST).exists():
                (out / LOCK).unlink(missing_ok=True)
        part.update(state="complete", finished=datetime.datetime.now().isoformat(timespec="seconds"),
                    files=sorted(f for f, t in _files(out).items() if before.get(f) != t))  # written or rewritten
        write_json(out / MANIFEST, manifest)
