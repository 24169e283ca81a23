"""ichd_ray.pipeline.outputs: result rows from a scored block, one part file per block, and no torch in
the write tasks' imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ichd_ray import CLASSES
from ichd_ray.pipeline.outputs import slices_rows, studies_rows, write_part


def _block() -> pa.Table:
    probs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05]  # 2 slices x 6 classes
    return pa.Table.from_pylist([
        {"study_uid": "S1", "series_uid": "S1.1", "uris": ["a.dcm", "b.dcm"], "sop_uids": ["1", "2"], "slice_indices": [0, 1],
         "positions": [0.0, 5.0], "slice_probs": probs, "study_probs": [0.1, 0.2, 0.3, 0.4, 0.5, 0.9], "failures": "[]"},
        {"study_uid": "S2", "series_uid": "S2.1", "uris": [], "sop_uids": [], "slice_indices": [], "positions": [],
         "slice_probs": [], "study_probs": [], "failures": json.dumps([{"uri": "c.dcm", "stage": "decode", "reason": "truncated", "message": "x"}])},
    ])


def test_rows_carry_each_slice_and_study_with_its_probabilities():
    slices = slices_rows(_block(), run_id="r", model_version="v").to_pylist()
    assert [(r["uri"], r["slice_index"], r["position_z"]) for r in slices] == [("a.dcm", 0, 0.0), ("b.dcm", 1, 5.0)]
    assert [round(slices[1][f"p_{c}"], 3) for c in CLASSES] == [0.0, 0.0, 0.0, 0.0, 0.0, 0.05]
    studies = studies_rows(_block(), run_id="r", model_version="v", thresholds=[0.5] * 5 + [0.95]).to_pylist()
    assert [(r["study_uid"], r["n_slices"], r["flagged"]) for r in studies] == [("S1", 2, True)]  # S2 got no prediction
    assert not studies_rows(_block(), run_id="r", model_version="v", thresholds=[0.99] * 6).column("flagged")[0].as_py()


def test_a_part_is_named_by_its_studies_so_a_retried_task_rewrites_it(tmp_path):
    kwargs = dict(build=slices_rows, build_kwargs={"run_id": "r", "model_version": "v"}, out_uri=str(tmp_path), table="slices",
                  run_id="r", attempt="a", storage_config=None)
    for _ in range(2):
        assert write_part(_block(), **kwargs).column("rows").to_pylist() == [2]
    parts = list((tmp_path / "slices" / "run_id=r" / "attempt=a").glob("part-*.parquet"))
    assert len(parts) == 1 and pq.read_table(parts[0]).num_rows == 2


@pytest.mark.timeout(120)
def test_the_write_tasks_import_neither_torch_nor_timm():
    """Ray ships write_part to its tasks by reference: importing this module is each write task's start-up
    (bench/score.py: importing torch and timm there cost 7-12 s of every score_job call)."""
    code = "import sys, ichd_ray.pipeline.outputs, ichd_ray.pipeline.decode; print(sorted({'torch', 'timm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
