"""bench/gpu.py at toy size on the CPU: every phase runs and reports finite, positive figures, also on a
machine with torch and timm but neither Ray nor pydicom (nor pyarrow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "gpu.py"
TOY = ["--toy", "--device", "cpu", "--threads", "1"]

# Runs a script as on a GPU machine where some top-level packages are not installed: the path finder
# (site-packages) does not find them, so `import` raises ModuleNotFoundError and find_spec gives None.
BLOCKER = """
import importlib.machinery, runpy, sys
blocked = set(sys.argv[1].split(","))
path_find_spec = importlib.machinery.PathFinder.find_spec.__func__
def find_spec(cls, name, path=None, target=None):
    if name.partition(".")[0] in blocked:
        return None
    return path_find_spec(cls, name, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
WITHOUT_RAY_PYDICOM = ("ray", "pydicom")
BARE_GPU_BOX = ("ray", "pydicom", "pyarrow", "pandas", "fsspec", "boto3", "botocore", "duckdb", "scipy", "moto", "sklearn")


def _run(args: list[str], blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH), *args]
    if blocked:
        cmd = [sys.executable, "-c", BLOCKER, ",".join(blocked), str(BENCH), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_report(report: dict, *, compiled: bool = False) -> None:
    assert report["device"] == "cpu" and report["torch"] and report["timm"] and report["device_name"]
    assert report["arch"] == "test_resnet" and report["size"] == 32
    expected = {"bare_fp32", "bare_bf16", "scorer", "train_step"} | ({"bare_bf16_compiled"} if compiled else set())
    assert set(report["phases"]) == expected
    for name, phase in report["phases"].items():
        assert "error" not in phase and "skipped" not in phase, (name, phase)
        assert phase["finite"] is True, name
        assert phase["iters"] >= 1 and _positive(phase["seconds"]), (name, phase)
        assert _positive(phase.get("slices_per_s", phase.get("samples_per_s"))), (name, phase)
    train = report["phases"]["train_step"]
    assert train["backend"] == "gloo" and train["world_size"] == 1
    assert math.isfinite(train["loss"]) and math.isfinite(train["first_loss"]) and _positive(train["steps_per_s"])
    if compiled:
        assert report["phases"]["bare_bf16_compiled"]["backend"] == "eager"
        assert report["phases"]["bare_bf16_compiled"]["compile_s"] >= 0


def test_toy_bench_on_cpu(tmp_path):
    out = tmp_path / "toy.json"
    proc = _run([*TOY, "--compile", "--compile-backend", "eager", "--out", str(out)])
    report = json.loads(out.read_text())
    _check_report(report, compiled=True)
    assert report["data_source"] == "random"
    for name in report["phases"]:
        assert f"| {name} |" in proc.stdout  # the markdown table


@pytest.mark.parametrize("blocked", [WITHOUT_RAY_PYDICOM, BARE_GPU_BOX], ids=["no_ray_pydicom", "torch_timm_numpy_only"])
def test_bench_runs_on_batches_prepared_elsewhere_without_ray_or_pydicom(tmp_path, blocked):
    batches = tmp_path / "batches"
    _run([*TOY, "--prepare", str(batches)])  # the CPU machine: synthetic DICOM -> ichd_ray.dicom.preprocess
    meta = json.loads((batches / "meta.json").read_text())
    assert meta["source"] == "synthetic_dicom" and meta["size"] == 32 and len(meta["studies"]) == 2

    out = tmp_path / "gpu.json"
    _run([*TOY, "--batches", str(batches), "--out", str(out)], blocked=blocked)
    report = json.loads(out.read_text())
    _check_report(report)
    assert report["data_source"] == "synthetic_dicom" and report["studies"] == [len(s["positions"]) for s in meta["studies"]]
    assert not set(report["imported"]) & set(blocked)
    assert (report["storage_stubbed"] is not None) == ("pyarrow" in blocked)

    # Preparing where pydicom is missing falls back to random pixels, and says so.
    fallback = tmp_path / "random"
    _run([*TOY, "--prepare", str(fallback)], blocked=blocked)
    assert json.loads((fallback / "meta.json").read_text())["source"] == "random"
