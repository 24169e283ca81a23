"""Result tables and the commit protocol that keeps half-written runs invisible.

Layout under OUT (Hive-style, plain Arrow types)::

    OUT/slices/run_id=<id>/attempt=<a>/part-*.parquet
    OUT/studies/run_id=<id>/attempt=<a>/part-*.parquet
    OUT/errors/run_id=<id>/attempt=<a>/part-*.parquet
    OUT/embeddings/run_id=<id>/attempt=<a>/part-*.parquet     (optional)
    OUT/runs/run_id=<id>/run.parquet                          (one object per run id)

Protocol: every invocation writes its data under a fresh ``attempt``; when all its tables are written it
PUTs ``runs/run_id=<id>/run.parquet`` in one request (atomic on S3; rename on local disk). That object
names the committed attempt. Only then are the run id's other attempts deleted, so at rest a glob sees
one copy; readers that go through :func:`views_sql` join on the runs object and never see a crashed or
in-flight attempt, even in the moment before clean-up.

Files carry ``run_id`` as a column as well as in the path. DuckDB: ``hive_partitioning = true`` (the
shipped views do); pandas/pyarrow: ``pd.read_parquet(OUT + "/slices", partitioning=None)``, or go
through :func:`ichd_ray.io.results.query`.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import uuid
from importlib import resources
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ichd_ray import CLASSES

from ichd_ray.io import storage

__all__ = [
    "SLICES_SCHEMA",
    "STUDIES_SCHEMA",
    "ERRORS_SCHEMA",
    "EMBEDDINGS_SCHEMA",
    "RUNS_SCHEMA",
    "STUDY_INDEX_SCHEMA",
    "overlay_runs",
    "DATA_TABLES",
    "new_attempt_id",
    "table_prefix",
    "write_table",
    "commit_run",
    "read_run",
    "remove_other_attempts",
    "views_sql",
]

_P = [(f"p_{c}", pa.float32()) for c in CLASSES]
SLICES_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model_version", pa.string()),
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        ("sop_uid", pa.string()),
        ("uri", pa.string()),
        ("slice_index", pa.int32()),
        ("position_z", pa.float64()),
        *_P,
    ]
)
STUDIES_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model_version", pa.string()),
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        ("n_slices", pa.int32()),
        ("n_slices_rejected", pa.int32()),  # slices of the chosen series that failed to read or decode
        *_P,
        ("flagged", pa.bool_()),
    ]
)
ERRORS_SCHEMA = pa.schema(
    [("run_id", pa.string()), ("uri", pa.string()), ("stage", pa.string()), ("reason", pa.string()), ("message", pa.string())]
)
EMBEDDINGS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model_version", pa.string()),
        ("study_uid", pa.string()),
        ("sop_uid", pa.string()),
        ("slice_index", pa.int32()),
        ("position_z", pa.float64()),
        ("embedding", pa.list_(pa.float16())),
        ("cnn_logits", pa.list_(pa.float32())),  # the embedding fold's CNN logits (6, CLASSES order)
    ]
)
RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("attempt", pa.string()),
        ("model_version", pa.string()),
        ("bundle_uri", pa.string()),
        ("bundle_sha256", pa.string()),
        ("code_version", pa.string()),
        ("config_sha256", pa.string()),
        ("config_json", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()),
        ("n_inputs", pa.int64()),
        ("n_slices_scored", pa.int64()),
        ("n_rejected", pa.int64()),  # = n_faults + n_selected_out + n_skipped (ichd_ray.reasons)
        ("n_faults", pa.int64()),
        ("n_selected_out", pa.int64()),
        ("n_skipped", pa.int64()),
        ("n_studies", pa.int64()),
        ("n_storage_retries", pa.int64()),  # S3 requests retried (bounded: ichd_ray.io.storage.S3_MAX_ATTEMPTS)
        ("slices_per_s", pa.float64()),
        ("kind", pa.string()),  # score | nightly
        ("problems", pa.string()),  # JSON list: why the run is failed ([] when it succeeded)
    ]
)
#: One row per study per night it changed (the ``index_studies`` table): the fingerprint of its live
#: objects, how many there are and how many the series rule selected; ``deleted`` when none is left.
#: The plan reads the latest row of every study, so a night never fingerprints untouched studies again.
STUDY_INDEX_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("study_uid", pa.string()),
    ("fingerprint", pa.string()),
    ("n_objects", pa.int64()),
    ("n_selected", pa.int64()),
    ("deleted", pa.bool_()),
])


#: Tables written under an attempt (``index`` and ``scored``: nightly runs only).
DATA_TABLES = ("slices", "studies", "errors", "embeddings", "index", "index_studies", "scored")


def new_attempt_id(now: dt.datetime | None = None) -> str:
    """Sortable and unique: ``20261123T124500Z-1a2b3c``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def table_prefix(out_uri: str, table: str, run_id: str, attempt: str | None = None) -> str:
    parts = [table, f"run_id={run_id}"] + ([f"attempt={attempt}"] if attempt else [])
    return storage.join(out_uri, *parts)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_table(rows: pa.Table, out_uri: str, table: str, run_id: str, attempt: str, part: str = "part-00000", storage_config=None) -> str:
    """Write one part file (whole-object write) of a data table; returns its URI."""
    uri = storage.join(table_prefix(out_uri, table, run_id, attempt), f"{part}.parquet")
    storage.write_bytes(uri, _parquet_bytes(rows), storage_config)
    return uri


def commit_run(out_uri: str, run_row: dict[str, Any], storage_config=None) -> str:
    """The commit point: one PUT of ``runs/run_id=<id>/run.parquet`` naming the attempt."""
    table = pa.Table.from_pylist([run_row], schema=RUNS_SCHEMA)
    uri = storage.join(out_uri, "runs", f"run_id={run_row['run_id']}", "run.parquet")
    storage.write_bytes(uri, _parquet_bytes(table), storage_config)
    return uri


def read_run(out_uri: str, run_id: str, storage_config=None) -> dict[str, Any] | None:
    uri = storage.join(out_uri, "runs", f"run_id={run_id}", "run.parquet")
    try:
        data = storage.read_bytes(uri, storage_config)
    except FileNotFoundError:
        return None
    return pq.read_table(pa.BufferReader(data)).to_pylist()[0]


def remove_other_attempts(out_uri: str, run_id: str, keep: str, storage_config=None) -> int:
    """Delete this run id's attempts other than ``keep``; returns objects deleted."""
    deleted = 0
    for table in DATA_TABLES:
        prefix = table_prefix(out_uri, table, run_id)
        attempts = {
            e.uri[len(prefix) :].lstrip("/").split("/", 1)[0]
            for e in storage.list_files(prefix, config=storage_config)
        }
        scheme, path = storage.parse_uri(prefix)
        if scheme == "file" and os.path.isdir(path):  # an attempt killed before its first file is a bare folder
            attempts |= set(os.listdir(path))
        for name in sorted(attempts):
            if name.startswith("attempt=") and name != f"attempt={keep}":
                deleted += storage.delete_prefix(storage.join(prefix, name), storage_config)
    return deleted


def views_sql(out_uri: str, nightly: bool = False, runs: list[dict] | None = None,
              files: dict[str, list[str]] | None = None) -> str:
    """DuckDB views over committed attempts only, with ``{root}`` filled in: ``runs``, ``slices``,
    ``studies``, ``errors``, ``latest_studies``; with ``nightly`` (OUT holds nightly runs) also
    ``index_rows``, ``latest_index``, ``latest_study_index``, ``scored``, ``latest_scored`` and a
    ``latest_studies`` without the studies whose objects are all gone from the archive. The optional
    embeddings are read directly.

    Args:
        out_uri: OUT as DuckDB reads it (a local path or ``s3://...``).
        nightly: Add the nightly views.
        runs: The runs table's rows (``run_id, attempt, kind, status, finished_at``), to find which runs'
            index rows make up the archive now (:func:`overlay_runs`); None: none do.
        files: The Parquet files of the ``index`` and ``index_studies`` tables, as DuckDB reads them.
    """
    names = ["sql/views.sql"] + (["sql/nightly_views.sql"] if nightly else [])
    text = "\n".join(resources.files("ichd_ray.io").joinpath(f).read_text() for f in names)
    if nightly:
        files = files or {}
        text = text.replace("{latest_index}", _latest_rows_sql(
            "uri", _overlay_files(runs or [], files.get("index", [])),
            "SELECT * EXCLUDE (attempt) FROM read_parquet('{root}/index/*/*/*.parquet', hive_partitioning = true, "
            "union_by_name = true) WHERE false"))
        text = text.replace("{latest_study_index}", _latest_rows_sql(
            "study_uid", _overlay_files(runs or [], files.get("index_studies", [])),
            "SELECT " + ", ".join(f"NULL::{_DUCKDB_TYPES[f.type]} AS {f.name}" for f in STUDY_INDEX_SCHEMA) + " WHERE false"))
    root = out_uri.rstrip("/")
    return text.replace("{root}", root.replace("'", "''"))


_DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.bool_(): "BOOLEAN"}


def overlay_runs(runs: list[dict]) -> list[tuple[str, str, int]]:
    """``(run_id, attempt, order)`` of the committed runs whose ``index``/``index_studies`` rows make up
    the archive now: the newest succeeded compaction (order 0, a snapshot) and every succeeded nightly run
    that finished after it (1, 2, ... by ``finished_at``, each overlaying the ones before). Failed runs
    are left out, so what they saw is seen again the next night."""
    done = [r for r in runs if r.get("status") == "succeeded" and r.get("kind") in ("nightly", "compaction")]
    done.sort(key=lambda r: (r["finished_at"], r["run_id"]))
    bases = [i for i, r in enumerate(done) if r["kind"] == "compaction"]
    start = bases[-1] if bases else None
    out = [] if start is None else [(done[start]["run_id"], done[start]["attempt"], 0)]
    later = done[start + 1:] if start is not None else done
    return out + [(r["run_id"], r["attempt"], n) for n, r in enumerate((r for r in later if r["kind"] == "nightly"), 1)]


def _overlay_files(runs: list[dict], files: list[str]) -> list[tuple[str, int]]:
    """(file, order) for each file of a run in :func:`overlay_runs`; a run without files wrote no rows."""
    order = {(run_id, attempt): n for run_id, attempt, n in overlay_runs(runs)}
    out = []
    for f in files:
        parts = dict(p.split("=", 1) for p in f.split("/") if p.startswith(("run_id=", "attempt=")))
        key = (parts.get("run_id"), parts.get("attempt"))
        if key in order:
            out.append((f, order[key]))
    return sorted(out)


def _latest_rows_sql(key: str, files: list[tuple[str, int]], empty: str) -> str:
    """The newest row per ``key`` over a snapshot (order 0) overlaid by later runs' changes: the snapshot's
    rows no later run touched (an anti join against the small changes) plus the latest change of each."""
    if not files:
        return empty
    quoted = ", ".join("'" + f.replace("'", "''") + "'" for f, _ in files)
    orders = ", ".join("('" + f.replace("'", "''") + f"', {n})" for f, n in files)
    return f"""WITH state AS (
    SELECT t.* EXCLUDE (attempt, filename), o._order
    FROM read_parquet([{quoted}], hive_partitioning = true, union_by_name = true, filename = true) AS t
    JOIN (VALUES {orders}) AS o(filename, _order) ON t.filename = o.filename
), changes AS (
    SELECT * FROM state WHERE _order > 0
    QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY _order DESC) = 1
)
SELECT b.* EXCLUDE (_order) FROM (SELECT * FROM state WHERE _order = 0) AS b ANTI JOIN changes AS c ON b.{key} = c.{key}
UNION ALL BY NAME
SELECT * EXCLUDE (_order) FROM changes"""
