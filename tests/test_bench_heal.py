"""scripts/bench_heal.py --allocators: worker processes per C allocator taking turns on the same batches."""

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli_errors import files  # noqa: F401  (the `files` fixture: a tiny model folder and a corpus)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_allocator_study_runs_each_allocator_in_its_worker(files, tmp_path):  # noqa: F811
    allocators = ["glibc"] + (["jemalloc-retain"] if glob.glob("/usr/lib/*/libjemalloc.so*") else [])
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_heal.py"), "--model", str(files / "model"),
                          "--data", str(files / "data" / "corpus"), "--batch", "2", "--seq", "16", "--window", "8",
                          "--repeats", "2", "--threads", "1", "--precisions", "fp32", "bf16",
                          "--allocators", *allocators, "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert set(rec["median_step_s"]) == set(allocators)
    for a in allocators:  # every worker timed both stages in both precisions, one step per round
        assert set(rec["step_s"][a]) == {"stage1 fp32", "stage2 fp32", "stage1 bf16", "stage2 bf16"}
        assert all(len(v) == 2 and min(v) > 0 for v in rec["step_s"][a].values())
        assert f"{a}: bf16 / fp32: stage 1" in res.stdout
    if len(allocators) == 2:
        assert "jemalloc-retain / glibc: stage1 fp32" in res.stdout


def test_a_missing_allocator_is_one_line():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_heal

    with pytest.raises(SystemExit, match="libnosuch is not installed"):
        bench_heal.find_library("nosuch")
