"""ichd_ray.io.results: the end-of-run summary text, and DuckDB queries over runs committed with the
module's own writers (ichd_ray.io.tables), on local disk."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from ichd_ray import CLASSES
from ichd_ray.io.results import connect, format_summary, query
from ichd_ray.io.tables import ERRORS_SCHEMA, SLICES_SCHEMA, STUDIES_SCHEMA, commit_run, write_table
from ichd_ray.pipeline.score import RunSummary

pytestmark = pytest.mark.timeout(60)

T0 = dt.datetime(2026, 11, 23, 2, 0, 0, tzinfo=dt.timezone.utc)
P = [f"p_{c}" for c in CLASSES]


# ----------------------------------------------------------------------------------- summary


def test_format_summary_lines():
    summary = RunSummary(
        run_id="score-20261123T020000Z",
        attempt="20261123T020000Z-1a2b3c",
        status="succeeded",
        n_inputs=105,
        n_slices_scored=96,
        n_rejected=9,
        n_studies=3,
        seconds=12.0,
        slices_per_s=8.0,
        reasons={"truncated": 2, "not_dicom": 1, "other_series": 4, "localizer": 1, "excluded": 1},
        outcomes={"fault": 3, "selection": 5, "skip": 1},
        out_uri="s3://results/out/",
        run_uri="s3://results/out/runs/run_id=score-20261123T020000Z/run.parquet",
    )
    assert format_summary(summary).splitlines() == [
        "run score-20261123T020000Z (attempt 20261123T020000Z-1a2b3c): succeeded",
        "  inputs 105 = scored slices 96 + rejected 9",
        "  studies scored 3; 8.0 slices/s over 12.0 s",
        "  rejected: faults 3 (not_dicom 1, truncated 2); selected out 5 (localizer 1, other_series 4); "
        "skipped 1 (excluded 1)",
        "  tables: s3://results/out/{slices,studies,errors}/run_id=score-20261123T020000Z/  committed by "
        "s3://results/out/runs/run_id=score-20261123T020000Z/run.parquet",
        "  query it (DuckDB):",
        '    ichd-ray results s3://results/out --sql "SELECT study_uid, n_slices, round(p_any, 3) AS p_any, flagged '
        "FROM studies WHERE run_id = 'score-20261123T020000Z' ORDER BY p_any DESC LIMIT 10\"",
    ]


def test_format_summary_without_rejections():
    summary = RunSummary("r1", "a1", "failed", 0, 0, 0, 0, 0.5, 0.0, out_uri="/out", run_uri="/out/runs/run_id=r1/run.parquet")
    lines = format_summary(summary).splitlines()
    assert lines[0] == "run r1 (attempt a1): failed"
    assert lines[2] == "  studies scored 0; 0.0 slices/s over 0.5 s"
    assert lines[3] == "  rejected: faults 0 (none); selected out 0 (none); skipped 0 (none)"


def test_format_summary_refuses_an_unknown_reason():
    summary = RunSummary("r1", "a1", "succeeded", 1, 0, 1, 0, 1.0, 0.0, reasons={"cosmic_ray": 1}, out_uri="/out")
    with pytest.raises(ValueError, match="unknown reason code 'cosmic_ray'"):
        format_summary(summary)


# ------------------------------------------------------------------------------------- query


def _studies(run_id: str, p_any: dict[str, float]) -> pa.Table:
    rows = [
        {"run_id": run_id, "model_version": "v1", "study_uid": uid, "series_uid": uid + ".1", "n_slices": 2,
         "n_slices_rejected": 0, **{p: 0.0 for p in P[:-1]}, "p_any": p, "flagged": p >= 0.5}
        for uid, p in p_any.items()
    ]
    return pa.Table.from_pylist(rows, schema=STUDIES_SCHEMA)


def _slices(run_id: str, uids: list[str]) -> pa.Table:
    rows = [
        {"run_id": run_id, "model_version": "v1", "study_uid": uid, "series_uid": uid + ".1", "sop_uid": f"{uid}.1.{i}",
         "uri": f"/archive/{uid}/{i}.dcm", "slice_index": i, "position_z": 5.0 * i, **{p: 0.25 for p in P}}
        for uid in uids for i in range(2)
    ]
    return pa.Table.from_pylist(rows, schema=SLICES_SCHEMA)


def _run(out: str, run_id: str, attempt: str, p_any: dict[str, float], *, status: str = "succeeded",
         finished: dt.datetime = T0, errors: tuple[dict, ...] = (), commit: bool = True) -> None:
    """A run as the scoring job leaves it: its tables under an attempt, then (if ``commit``) the runs row."""
    write_table(_slices(run_id, list(p_any)), out, "slices", run_id, attempt)
    write_table(_studies(run_id, p_any), out, "studies", run_id, attempt)
    write_table(pa.Table.from_pylist([{"run_id": run_id, **e} for e in errors], schema=ERRORS_SCHEMA),
                out, "errors", run_id, attempt)
    if commit:
        commit_run(out, {"run_id": run_id, "attempt": attempt, "status": status, "model_version": "v1",
                         "started_at": finished - dt.timedelta(minutes=5), "finished_at": finished})


@pytest.fixture
def out(tmp_path) -> str:
    """Two committed runs (the newer one failed), a crashed attempt of the first, and an uncommitted run,
    under a folder whose name has a quote in it."""
    root = str(tmp_path / "o'brien" / "out")
    _run(root, "r1", "a1", {"s1": 0.9, "s2": 0.1}, finished=T0,
         errors=({"uri": "/archive/x.txt", "stage": "index", "reason": "excluded", "message": "suffix .txt"},))
    _run(root, "r1", "a0", {"s1": 0.0, "s9": 0.0}, commit=False)  # an older attempt the commit superseded
    _run(root, "r2", "b1", {"s1": 0.2}, status="failed", finished=T0 + dt.timedelta(days=1))
    _run(root, "r3", "c1", {"s3": 0.7}, commit=False)  # still in flight (or crashed): invisible
    return root


def test_query_sees_committed_attempts_only(out):
    runs = query(out, "SELECT run_id, attempt, status FROM runs ORDER BY run_id")
    assert runs.to_dict("records") == [
        {"run_id": "r1", "attempt": "a1", "status": "succeeded"},
        {"run_id": "r2", "attempt": "b1", "status": "failed"},
    ]
    studies = query(out, "SELECT run_id, study_uid, p_any FROM studies ORDER BY run_id, study_uid")
    assert [tuple(r) for r in studies.itertuples(index=False)] == [
        ("r1", "s1", pytest.approx(0.9)), ("r1", "s2", pytest.approx(0.1)), ("r2", "s1", pytest.approx(0.2))]
    assert query(out, "SELECT count(*) AS n FROM slices")["n"].item() == 6  # r1: 2 studies x 2, r2: 1 x 2
    errors = query(out, "SELECT run_id, uri, reason FROM errors")
    assert errors.to_dict("records") == [{"run_id": "r1", "uri": "/archive/x.txt", "reason": "excluded"}]


def test_latest_studies_skips_failed_runs(out):
    latest = query(out, "SELECT study_uid, run_id, p_any, flagged FROM latest_studies ORDER BY study_uid")
    # s1's newest answer is from the failed r2, so the latest one is still r1's
    assert [tuple(r) for r in latest.itertuples(index=False)] == [
        ("s1", "r1", pytest.approx(0.9), True), ("s2", "r1", pytest.approx(0.1), False)]


def test_connect_accepts_file_uris_and_has_no_nightly_views(out):
    con = connect("file://" + out)
    assert con.execute("SELECT count(*) FROM studies").fetchone() == (3,)
    views = {row[0] for row in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert views == {"runs", "slices", "studies", "errors", "latest_studies"}  # no index/scored tables here
