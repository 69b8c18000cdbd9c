"""Files of an analysis: the result's schema, reading it, the per-layer store that makes it resumable, and
the check that an output folder holds no other analysis."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..util import write_json


SCHEMA_VERSION = 2
# schema 1 called every iterative score a "drop", KL and cosine too; schema 2 says "score"
SCHEMA1_KEYS = {"drop": "score", "drops": "scores", "one_shot_drop": "one_shot_score", "iterative_drop": "iterative_score"}


class AnalysisError(RuntimeError):
    """A sensitivity file or analysis folder that cannot be used as asked; the message says what to do."""


def load_sensitivity(path) -> dict:
    """The result `analyze` wrote to sensitivity.json.

    Raises:
        AnalysisError: the file is missing, unreadable, or not a sensitivity result.
    """
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"sensitivity file {path} does not exist: run `layerboost analyze --out DIR` and pass "
                            "DIR/sensitivity.json")
    try:
        res = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnalysisError(f"{path} is not readable JSON ({e}): pass the sensitivity.json `layerboost analyze` wrote") from e
    if not isinstance(res, dict) or res.get("schema_version") not in (1, SCHEMA_VERSION) \
            or not isinstance(res.get("sensitivity"), list):
        raise AnalysisError(f"{path} is not a sensitivity result (no 'sensitivity' list, schema_version 1 or "
                            f"{SCHEMA_VERSION}): pass the sensitivity.json `layerboost analyze` wrote")
    if res["schema_version"] == 1 and "iterative" in res:
        it = res["iterative"]
        it["history"] = [schema1_renamed(h) for h in it.get("history", [])]
        it["disagreements"] = [schema1_renamed(d) for d in it.get("disagreements", [])]
    res["schema_version"] = SCHEMA_VERSION
    return res


def schema1_renamed(entry: dict) -> dict:
    """An iterative step (a history entry, a step file, a disagreement) with schema 1's key names renamed."""
    return {SCHEMA1_KEYS.get(k, k): v for k, v in entry.items()}


RESULT_KEYS = {"window_costs", "retrieval"}  # sensitivity.json keys that hold results, named like settings


def check_analysis_dir(out, settings: dict) -> None:
    """Refuse an `out` folder holding an analysis made with other settings, so it is never overwritten;
    with the same settings the analysis resumes there. Only the keys of `settings` the folder recorded
    (in sensitivity.json or layers/fingerprint.json) are compared.

    Raises:
        AnalysisError: naming the settings that differ.
    """
    for f in (Path(out) / "sensitivity.json", Path(out) / "layers" / "fingerprint.json"):
        if not f.is_file():
            continue
        try:
            old = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if not isinstance(old, dict) or f.name == "sensitivity.json" and "sensitivity" not in old:
            raise AnalysisError(f"{f} exists but is not an analysis result: refusing to overwrite it; choose another --out")
        results = RESULT_KEYS if f.name == "sensitivity.json" else set()  # there, these hold results: fingerprint.json
        diff = [k for k, v in settings.items() if k in old and k not in results and old[k] != json.loads(json.dumps(v))]
        if diff:
            raise AnalysisError(f"{out} holds another analysis ({', '.join(f'{k} {old[k]!r}' for k in diff)}; now "
                                f"{', '.join(f'{settings[k]!r}' for k in diff)}): refusing to overwrite it; "
                                "choose another --out, or repeat its settings to resume it")


@dataclass
class LayerResult:
    layer: int
    variant: str
    seconds: float
    drop: float
    drop_ci95: list[float]
    drop_rel: float | None
    margin_drop: float
    margin_drop_ci95: list[float]
    tasks: dict = field(default_factory=dict)


class Store:
    """Per-layer results on disk, written as each layer finishes (atomic), for resuming."""

    def __init__(self, out_dir: Path | None, fingerprint: dict):
        self.dir = Path(out_dir) / "layers" if out_dir else None
        self.fingerprint = fingerprint
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
            fp = self.dir / "fingerprint.json"
            if fp.is_file() and json.loads(fp.read_text()) != fingerprint:
                raise AnalysisError(
                    f"{self.dir} holds results of a different analysis (model, items or variants changed): "
                    "use another --out folder or delete it"
                )
            write_json(fp, fingerprint)

    def get(self, name: str):
        if self.dir and (self.dir / f"{name}.json").is_file():
            return json.loads((self.dir / f"{name}.json").read_text())
        return None

    def put(self, name: str, data) -> None:
        if self.dir:
            write_json(self.dir / f"{name}.json", data)
