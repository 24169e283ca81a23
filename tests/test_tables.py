"""ichd_ray.io.tables: the result schemas, the attempt layout, the commit row and the DuckDB views text."""

from __future__ import annotations

import datetime as dt
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ichd_ray import CLASSES
from ichd_ray.io.tables import (
    DATA_TABLES,
    EMBEDDINGS_SCHEMA,
    ERRORS_SCHEMA,
    RUNS_SCHEMA,
    SLICES_SCHEMA,
    STUDIES_SCHEMA,
    commit_run,
    new_attempt_id,
    read_run,
    remove_other_attempts,
    table_prefix,
    overlay_runs,
    views_sql,
    write_table,
)

pytestmark = pytest.mark.timeout(60)

T0 = dt.datetime(2026, 11, 23, 12, 45, 0, tzinfo=dt.timezone.utc)
P = [f"p_{c}" for c in CLASSES]


def _run_row(**overrides) -> dict:
    row = {
        "run_id": "r1",
        "attempt": "20261123T124500Z-abc123",
        "model_version": "v7",
        "bundle_uri": "s3://models/ich/v7",
        "bundle_sha256": "ab" * 32,
        "code_version": "0.1.0",
        "config_sha256": "cd" * 32,
        "config_json": '{"score": {"actors": 1}}',
        "started_at": T0,
        "finished_at": T0 + dt.timedelta(seconds=90),
        "status": "succeeded",
        "n_inputs": 12,
        "n_slices_scored": 10,
        "n_rejected": 2,
        "n_faults": 1,
        "n_selected_out": 1,
        "n_skipped": 0,
        "n_studies": 2,
        "n_storage_retries": 3,
        "slices_per_s": 10 / 90,
        "kind": "score",
        "problems": "[]",
    }
    row.update(overrides)
    return row


def _slices(run_id: str = "r1", n: int = 2) -> pa.Table:
    rows = [
        {"run_id": run_id, "model_version": "v7", "study_uid": "1.2.3", "series_uid": "1.2.3.1", "sop_uid": f"1.2.3.1.{i}",
         "uri": f"s3://archive/1.2.3/{i}.dcm", "slice_index": i, "position_z": 5.0 * i, **{p: 0.125 * (i + 1) for p in P}}
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=SLICES_SCHEMA)


# ------------------------------------------------------------------------------------- schemas


def test_probability_columns_follow_the_class_order():
    for schema in (SLICES_SCHEMA, STUDIES_SCHEMA):
        probs = [f for f in schema if f.name.startswith("p_")]
        assert [f.name for f in probs] == P  # epidural ... subdural, any: RSNA order
        assert {f.type for f in probs} == {pa.float32()}
    assert SLICES_SCHEMA.names[:8] == ["run_id", "model_version", "study_uid", "series_uid", "sop_uid", "uri",
                                       "slice_index", "position_z"]
    assert STUDIES_SCHEMA.field("flagged").type == pa.bool_()
    assert STUDIES_SCHEMA.field("n_slices_rejected").type == pa.int32()
    assert ERRORS_SCHEMA.names == ["run_id", "uri", "stage", "reason", "message"]
    assert EMBEDDINGS_SCHEMA.field("embedding").type == pa.list_(pa.float16())
    assert EMBEDDINGS_SCHEMA.field("cnn_logits").type == pa.list_(pa.float32())


def test_runs_schema_counts_and_times():
    assert RUNS_SCHEMA.names[:2] == ["run_id", "attempt"]
    for name in ("started_at", "finished_at"):
        assert RUNS_SCHEMA.field(name).type == pa.timestamp("us", tz="UTC")
    counts = [f.name for f in RUNS_SCHEMA if f.name.startswith("n_")]
    assert counts == ["n_inputs", "n_slices_scored", "n_rejected", "n_faults", "n_selected_out", "n_skipped",
                      "n_studies", "n_storage_retries"]
    assert {RUNS_SCHEMA.field(n).type for n in counts} == {pa.int64()}
    assert DATA_TABLES == ("slices", "studies", "errors", "embeddings", "index", "index_studies", "scored")


# -------------------------------------------------------------------------------------- layout


def test_attempt_ids_are_sortable_and_unique():
    a = new_attempt_id(T0)
    assert re.fullmatch(r"20261123T124500Z-[0-9a-f]{6}", a)
    assert new_attempt_id(T0) != a  # same second, different suffix
    later = new_attempt_id(T0 + dt.timedelta(seconds=1))
    assert sorted([later, a]) == [a, later]


def test_table_prefix_is_hive_style():
    assert table_prefix("s3://b/out", "slices", "r1", "a1") == "s3://b/out/slices/run_id=r1/attempt=a1"
    assert table_prefix("s3://b/out/", "errors", "r1") == "s3://b/out/errors/run_id=r1"
    assert table_prefix("/data/out", "studies", "night-1", None) == "/data/out/studies/run_id=night-1"


def test_write_table_writes_one_part_under_the_attempt(tmp_path):
    out = str(tmp_path / "out")
    uri = write_table(_slices(n=3), out, "slices", "r1", "a1")
    assert uri == f"{out}/slices/run_id=r1/attempt=a1/part-00000.parquet"
    uri2 = write_table(_slices(n=1), out, "slices", "r1", "a1", part="part-00001")
    assert uri2.endswith("/attempt=a1/part-00001.parquet")
    back = pq.read_table(uri)
    assert back.schema.equals(SLICES_SCHEMA)
    assert back.column("sop_uid").to_pylist() == ["1.2.3.1.0", "1.2.3.1.1", "1.2.3.1.2"]
    assert back.column("p_any").to_pylist() == [0.125, 0.25, 0.375]
    assert pq.ParquetFile(uri).metadata.row_group(0).column(0).compression == "ZSTD"
    assert sorted(os.listdir(tmp_path / "out" / "slices" / "run_id=r1" / "attempt=a1")) == [
        "part-00000.parquet", "part-00001.parquet"]


# -------------------------------------------------------------------------------------- commit


def test_commit_run_then_read_run_round_trips_the_row(tmp_path):
    out = f"file://{tmp_path}/out"
    assert read_run(out, "r1") is None  # nothing committed yet
    uri = commit_run(out, _run_row())
    assert uri == f"{out}/runs/run_id=r1/run.parquet"
    assert pq.read_table(str(tmp_path / "out" / "runs" / "run_id=r1" / "run.parquet")).schema.equals(RUNS_SCHEMA)
    assert read_run(out, "r1") == _run_row()  # timestamps come back as aware UTC datetimes
    assert read_run(out, "r2") is None

    # A re-commit of the same run id replaces the row (one object per run id).
    commit_run(out, _run_row(attempt="a2", status="failed", problems='["too many faults"]'))
    row = read_run(out, "r1")
    assert (row["attempt"], row["status"], row["problems"]) == ("a2", "failed", '["too many faults"]')
    assert os.listdir(tmp_path / "out" / "runs") == ["run_id=r1"]


def test_commit_run_fills_missing_fields_with_nulls_and_refuses_bad_types(tmp_path):
    out = str(tmp_path)
    commit_run(out, {"run_id": "r1", "attempt": "a1", "status": "succeeded"})
    row = read_run(out, "r1")
    assert row["attempt"] == "a1" and row["n_inputs"] is None and row["finished_at"] is None
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        commit_run(out, _run_row(n_inputs="twelve"))
    assert read_run(out, "r1")["attempt"] == "a1"  # the failed commit wrote nothing


def test_remove_other_attempts_keeps_only_the_committed_one(tmp_path):
    out = str(tmp_path / "out")
    for attempt in ("a1", "a2"):
        write_table(_slices(), out, "slices", "r1", attempt)
        write_table(ERRORS_SCHEMA.empty_table(), out, "errors", "r1", attempt)
    write_table(_slices(), out, "slices", "r1", "a3", part="part-00001")
    write_table(_slices("r2"), out, "slices", "r2", "a1")  # another run id: untouched
    (tmp_path / "out" / "studies" / "run_id=r1" / "attempt=a4").mkdir(parents=True)  # killed before its first file

    deleted = remove_other_attempts(out, "r1", keep="a2")
    assert deleted == 3  # slices a1, a3 and errors a1 (the bare folder held no file)
    assert os.listdir(tmp_path / "out" / "slices" / "run_id=r1") == ["attempt=a2"]
    assert os.listdir(tmp_path / "out" / "errors" / "run_id=r1") == ["attempt=a2"]
    assert os.listdir(tmp_path / "out" / "studies" / "run_id=r1") == []
    assert os.listdir(tmp_path / "out" / "slices" / "run_id=r2") == ["attempt=a1"]
    assert remove_other_attempts(out, "r1", keep="a2") == 0


# --------------------------------------------------------------------------------------- views


def test_views_sql_fills_the_root():
    text = views_sql("s3://bucket/out/")
    assert "{root}" not in text
    assert "read_parquet('s3://bucket/out/runs/*/run.parquet'" in text
    assert "read_parquet('s3://bucket/out/slices/*/*/*.parquet'" in text
    views = re.findall(r"CREATE OR REPLACE VIEW (\w+)", text)
    assert views == ["runs", "slices", "studies", "errors", "latest_studies"]
    nightly = re.findall(r"CREATE OR REPLACE VIEW (\w+)", views_sql("s3://bucket/out", nightly=True))
    assert nightly == views + ["index_rows", "latest_index", "latest_study_index", "scored", "latest_scored", "latest_studies"]


def test_the_index_state_starts_at_the_newest_compaction_and_leaves_failed_runs_out():
    at = lambda h: dt.datetime(2026, 12, 1, h, tzinfo=dt.timezone.utc)  # noqa: E731
    runs = [
        {"run_id": "n1", "attempt": "a1", "kind": "nightly", "status": "succeeded", "finished_at": at(1)},
        {"run_id": "n2", "attempt": "a2", "kind": "nightly", "status": "failed", "finished_at": at(2)},
        {"run_id": "s3", "attempt": "a3", "kind": "score", "status": "succeeded", "finished_at": at(3)},
        {"run_id": "n4", "attempt": "a4", "kind": "nightly", "status": "succeeded", "finished_at": at(4)},
    ]
    assert overlay_runs(runs) == [("n1", "a1", 1), ("n4", "a4", 2)]
    runs += [
        {"run_id": "c5", "attempt": "a5", "kind": "compaction", "status": "succeeded", "finished_at": at(5)},
        {"run_id": "n7", "attempt": "a7", "kind": "nightly", "status": "succeeded", "finished_at": at(7)},
        {"run_id": "n6", "attempt": "a6", "kind": "nightly", "status": "succeeded", "finished_at": at(6)},
    ]
    assert overlay_runs(runs) == [("c5", "a5", 0), ("n6", "a6", 1), ("n7", "a7", 2)]


def test_views_sql_escapes_a_quote_in_the_root():
    text = views_sql("/data/o'brien/out")
    assert "read_parquet('/data/o''brien/out/runs/*/run.parquet'" in text
    assert "o'brien" not in text  # no unescaped quote could end the string literal
    assert text.count("'/data/o''brien/out/") == text.count("read_parquet(") == 4  # every glob, escaped

