"""A node dies (issue 9, "Faults to survive"): a 2-node Ray cluster on this machine, the worker node's
raylet SIGKILLed mid-run.

Scoring finishes with the clean run's output; training resumes from its checkpoint and finishes. Each
scenario runs ``tests/fault_scripts/node_kill.py`` in its own process, with its own cluster and temp
dir (the session's ``ray_session`` is never touched), and everything that process started is killed
afterwards, found by a tag in its environment. The kill comes from the script's watcher (the raylet's
pid, when the node is seen running the work in question), never from a hook in the code under test.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from fault_scripts.proc_tree import run_tagged
from fault_scripts.tables import assert_same_tables, committed_tables, run_row

pytestmark = [pytest.mark.slow]

SCRIPT = Path(__file__).parent / "fault_scripts" / "node_kill.py"


def _run_script(root: Path, *args: str, timeout: float) -> dict:
    # Ray's own temp dir: short (its socket paths must stay under 108 bytes) and removed afterwards.
    ray_tmp = tempfile.mkdtemp(prefix="ichd-nk-", dir="/tmp")
    try:
        proc, leftovers = run_tagged([sys.executable, str(SCRIPT), *args[:1], str(root), *args[1:]], timeout=timeout,
                                     extra_env={"NODE_KILL_RAY_TMP": ray_tmp})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    result_file = root / f"{args[0]}.json"
    assert proc.returncode == 0 and result_file.exists(), (
        f"node_kill.py {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    result = json.loads(result_file.read_text())
    result["leftover_processes"] = leftovers
    result["task_retries_reported"] = _retries_reported(proc.stdout + proc.stderr)
    return result


def _figures(name: str, result: dict, capsys) -> None:
    """One line of figures for BENCHMARKS.md (shown whatever pytest captures)."""
    section = result.get("fault") or result.get("train") or {}
    keep = ("seconds", "kill_after_s", "after_kill_s", "node_marked_dead_s", "replacement_added_s", "running_on_node_at_kill",
            "actor_restarts", "status")
    figures = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in section.items() if k in keep}
    figures.update({k: result[k] for k in ("nodes_before", "nodes_after", "task_retries_reported", "leftover_processes") if k in result})
    if "clean" in result:
        figures["clean_seconds"] = round(result["clean"]["seconds"], 1)
        figures["warmup_seconds"] = round(result["warmup_seconds"], 1)
    if "folds" in section:
        figures["fold_seconds"] = [round(f["seconds"], 1) for f in section["folds"]]
        figures["fold0_resumed_from"] = [h["resumed_from_epoch"] for h in section["folds"][0]["history"]]
    with capsys.disabled():
        print(f"\n[{name}] {json.dumps(figures, default=str)}")


def _retries_reported(output: str) -> int:
    """Tasks Ray reported as failed and retried ("... will be retried"), counting its deduplicated repeats."""
    n = 0
    for line in output.splitlines():
        if "will be retried" in line:
            repeated = re.search(r"\[repeated (\d+)x", line)
            n += int(repeated.group(1)) if repeated else 1
    return n


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", ["decode", "write"])
def test_scoring_survives_the_worker_node_dying(tmp_path, variant, capsys):
    """``decode``: the worker node dies while a decode task runs there, and the head finishes the run.
    ``write``: all work is on the worker node (a head with 0 CPUs); it dies while the tables are being
    written, after the scored blocks were materialized in its object store; a replacement node joins.
    Either way: the run succeeds and commits exactly the clean run's slices, studies and errors."""
    root = tmp_path / "nk"
    result = _run_script(root, "score", variant, timeout=260)
    _figures(f"node dies: scoring, {variant}", result, capsys)
    fault = result["fault"]
    assert fault["killed"], f"the node was never killed: {fault.get('error')}"
    assert "exception" not in fault, fault.get("traceback")
    assert result["clean"]["status"] == "succeeded"
    assert fault["status"] == "succeeded" and not fault["problems"]
    assert result["nodes_before"] == 2
    if variant == "decode":
        assert any("decode_studies" in t for t in fault["running_on_node_at_kill"])
        assert result["nodes_after"] == 1  # finished on the head alone
    else:
        assert fault["replacement_added_s"] > 0 and result["nodes_after"] == 2

    clean_out, fault_out = str(root / "out_clean"), str(root / "out_fault")
    clean, faulted = committed_tables(clean_out, "clean"), committed_tables(fault_out, "fault")
    assert len(clean["slices"]) == result["clean"]["n_slices"] > 0
    assert_same_tables(faulted, clean)
    assert run_row(fault_out, "fault") == run_row(clean_out, "clean")
    # at rest one attempt per table: nothing of a lost task's first try is left beside the committed one
    for table in ("slices", "studies", "errors"):
        assert len(list((root / "out_fault" / table / "run_id=fault").iterdir())) == 1


@pytest.mark.timeout(420)
def test_training_resumes_from_its_checkpoint_when_the_worker_node_dies(tmp_path, capsys):
    """The Ray Train worker runs on the worker node (it asks for more CPUs than the head has); the node's
    raylet is SIGKILLed once epoch 0's checkpoint is written, a replacement node joins, and fold 0
    resumes there from that checkpoint and finishes; fold 1 trains as usual."""
    root = tmp_path / "nk"
    result = _run_script(root, "train", timeout=380)
    _figures("node dies: training", result, capsys)
    train = result["train"]
    assert train["killed"], f"the node was never killed: {train.get('error')}"
    assert "exception" not in train, train.get("traceback")
    assert any("RayTrainWorker" in t for t in train["running_on_node_at_kill"])
    assert train["replacement_added_s"] > 0

    fold0, fold1 = train["folds"]
    epochs = [h["epoch"] for h in fold0["history"]]
    assert epochs == [0, 1]
    # epoch 0 ran before the kill; what ran after started from a checkpoint, not from scratch
    assert fold0["history"][0]["resumed_from_epoch"] is None
    resumed = [h["resumed_from_epoch"] for h in fold0["history"][1:]]
    assert resumed[0] is not None and resumed[0] >= 0, fold0["history"]
    assert all(r == resumed[0] for r in resumed)
    assert [h["epoch"] for h in fold1["history"]] == [0, 1]
    for fold in (fold0, fold1):
        assert all(math.isfinite(h["val_weighted_log_loss"]) and math.isfinite(h["train_loss"]) for h in fold["history"])
        assert Path(fold["weights_uri"]).exists()
