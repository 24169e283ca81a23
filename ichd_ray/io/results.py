"""Reading results: DuckDB over committed runs (local or S3), and the end-of-run summary.

S3 goes through DuckDB's fsspec registration (s3fs with our StorageConfig), so no DuckDB network
extension is downloaded.
"""

from __future__ import annotations

from typing import Any

import duckdb

from ichd_ray.io import storage
from ichd_ray.io.tables import views_sql
from ichd_ray.reasons import reason_class

__all__ = ["connect", "query", "format_summary"]


def connect(out_uri: str, storage_config: storage.StorageConfig | None = None):
    """A DuckDB connection with the views of :func:`ichd_ray.io.tables.views_sql` over OUT."""

    con = duckdb.connect()
    scheme, _ = storage.parse_uri(out_uri)
    if scheme == "s3":
        con.register_filesystem(storage.fsspec_filesystem(out_uri, storage_config))

    def as_read(uri: str) -> str:  # DuckDB reads s3:// through fsspec, local files by path
        return uri if scheme == "s3" else storage.parse_uri(uri)[1]

    root = as_read(out_uri)
    # The nightly views need the index and scored tables to exist (DuckDB fails on an empty glob).
    files = {t: [as_read(e.uri) for e in storage.list_files(storage.join(out_uri, t), suffix=".parquet", config=storage_config)]
             for t in ("index", "index_studies", "scored")}
    nightly = bool(files["index"] and files["scored"])
    con.execute(views_sql(root))
    if nightly:
        # Which runs' index rows make up the archive now is read from the runs table first.
        runs = con.sql("SELECT run_id, attempt, kind, status, finished_at FROM runs").to_arrow_table().to_pylist()
        con.execute(views_sql(root, nightly=True, runs=runs, files=files))
    return con


def query(out_uri: str, sql: str, storage_config: storage.StorageConfig | None = None):
    """Run SQL against the views; returns a pandas DataFrame."""
    return connect(out_uri, storage_config).execute(sql).df()


def format_summary(summary: Any) -> str:
    """The lines printed at the end of a scoring run, with a query to paste."""
    def by_reason(outcome: str) -> str:
        found = {r: n for r, n in summary.reasons.items() if reason_class(r) == outcome}
        return ", ".join(f"{r} {n}" for r, n in sorted(found.items())) or "none"

    outcomes = summary.outcomes or {}
    root = summary.out_uri.rstrip("/")
    lines = [
        f"run {summary.run_id} (attempt {summary.attempt}): {summary.status}",
        f"  inputs {summary.n_inputs} = scored slices {summary.n_slices_scored} + rejected {summary.n_rejected}",
        f"  studies scored {summary.n_studies}; {summary.slices_per_s:.1f} slices/s over {summary.seconds:.1f} s",
        f"  rejected: faults {outcomes.get('fault', 0)} ({by_reason('fault')}); "
        f"selected out {outcomes.get('selection', 0)} ({by_reason('selection')}); "
        f"skipped {outcomes.get('skip', 0)} ({by_reason('skip')})",
        f"  tables: {root}/{{slices,studies,errors}}/run_id={summary.run_id}/  committed by {summary.run_uri}",
        "  query it (DuckDB):",
        f"    ichd-ray results {root} --sql \"SELECT study_uid, n_slices, round(p_any, 3) AS p_any, flagged "
        f"FROM studies WHERE run_id = '{summary.run_id}' ORDER BY p_any DESC LIMIT 10\"",
    ]
    return "\n".join(lines)
