"""Nightly rescoring of an archive: incremental index, a plan of studies to score, one committed run.

One night, under a lease on ``OUT/_lease.json`` (another run on the same OUT exits with code 75)::

    list the archive --diff against the last committed index (etag, else size + mtime)-->
        new/changed objects are read (headers only, Ray tasks); objects gone get a deleted = true row
    --series rule over the touched studies only--> their fingerprints (index_studies rows)
    --plan (latest row of every study vs latest_scored)--> a study is scored when it is new, its
              fingerprint changed since its last committed score, the model version differs from the
              one that scored it, or --full
    --ScoringRun on the planned studies--> slices / studies / errors + index and index_studies (what
              changed tonight: O(changes), not O(archive)) + scored, one commit

The table work is :func:`ichd_ray.pipeline.incremental.plan_night` in DuckDB over the committed Parquet
(views that overlay each night's changes on the newest compaction: :mod:`ichd_ray.pipeline.compact`).
The run id is ``nightly-<UTC date>-<model version>`` (``--run-id`` overrides it). The first attempt of a
run id stores its plan and index snapshot under ``OUT/plans/run_id=<id>/``; a re-run of the same id
reuses them, so it scores the same studies and replaces its own output. Nothing is visible until the
runs object is written, so a killed run leaves nothing behind and its studies stay due.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ichd_ray.config.job import JobConfig
from ichd_ray.io import config_files, storage
from ichd_ray.io.lease import DEFAULT_TTL, LeaseKeeper, lease_uri
from ichd_ray.io.results import connect
from ichd_ray.models.bundle import load_bundle_config
from ichd_ray.io.tables import STUDY_INDEX_SCHEMA
from ichd_ray.pipeline.incremental import plan_night, planned_rows
from ichd_ray.io.inventory import check_fresh, read_inventory
from ichd_ray.pipeline.index import MANIFEST_SCHEMA, EmptyInput, list_inputs_table, read_headers_on_ray, read_manifest, to_arrow, write_manifest
from ichd_ray.pipeline.score import ScoringRun

__all__ = [
    "INDEX_SCHEMA",
    "SCORED_TABLE_SCHEMA",
    "NightlyPlan",
    "nightly_run_id",
    "nightly",
    "EXIT_LEASE_HELD",
]

logger = logging.getLogger(__name__)

#: Exit code when another run holds the lease (EX_TEMPFAIL: try again later).
EXIT_LEASE_HELD = 75


def _index_schema() -> pa.Schema:
    return pa.schema(list(MANIFEST_SCHEMA) + [("deleted", pa.bool_()), ("run_id", pa.string())])


INDEX_SCHEMA = _index_schema()
#: Schema of the committed nightly ``scored`` table: which fingerprint of each study a run scored with
#: which model version, and why (see :func:`plan_studies`); the next night's plan reads it back.
SCORED_TABLE_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model_version", pa.string()),
        ("study_uid", pa.string()),
        ("fingerprint", pa.string()),
        ("reason", pa.string()),
    ]
)


def nightly_run_id(model_version: str, now: dt.datetime | None = None) -> str:
    """``nightly-<UTC date>-<model version>``: the same night and model give the same id."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"nightly-{now:%Y%m%d}-{model_version}"


# ------------------------------------------------------------------------------------- the run


@dataclass
class NightlyPlan:
    run_id: str
    model_version: str
    index: pa.Table  # INDEX_SCHEMA: tonight's changes (rows of touched studies, deleted = true per object gone)
    studies: pa.Table  # STUDY_INDEX_SCHEMA: the touched studies' rows
    plan: pd.DataFrame
    rows: pa.Table  # MANIFEST_SCHEMA: what tonight scores (every object of a planned study, new objects of none)
    new_objects: list[str]
    deleted_objects: int
    reused: bool
    previous_run: dict[str, Any] | None = None
    estimated_seconds: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    storage_retries: int = 0  # S3 retries the index stage spent


def _read_parquet(uri: str, storage_config) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri, storage_config)))


def _write_parquet(df: pd.DataFrame | pa.Table, uri: str, storage_config, schema: pa.Schema | None = None) -> None:
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue(), storage_config)


_EMPTY_SCORED = pa.schema([("study_uid", pa.string()), ("fingerprint", pa.string()), ("model_version", pa.string())])


def _committed(out_uri: str, storage_config, memory_gb: float) -> tuple[duckdb.DuckDBPyConnection, dict | None]:
    """A DuckDB connection holding what :func:`plan_night` reads from OUT (``previous``: the last
    committed index's live rows, ``previous_studies``, ``last_scored``; views over the committed Parquet,
    read lazily), and the newest committed nightly run."""
    first_night = not storage.list_files(storage.join(out_uri, "runs"), config=storage_config)
    con = duckdb.connect() if first_night else connect(out_uri, storage_config)
    # A night's joins and window functions spill to disk past this, instead of growing the driver.
    con.execute(f"SET memory_limit = '{memory_gb:g}GB'")
    con.execute(f"SET temp_directory = '{tempfile.gettempdir()}/ichd-ray-duckdb'")
    tables = set() if first_night else set(
        con.sql("SELECT table_name FROM information_schema.tables").to_arrow_table().column(0).to_pylist())
    columns = ", ".join(f'"{c}"' for c in INDEX_SCHEMA.names)
    if "latest_index" in tables:
        con.execute(f"CREATE TEMP VIEW previous AS SELECT {columns} FROM latest_index WHERE NOT deleted")
    else:
        con.register("previous", INDEX_SCHEMA.empty_table())
    if "latest_study_index" in tables:
        con.execute("CREATE TEMP VIEW previous_studies AS SELECT * FROM latest_study_index")
    else:
        con.register("previous_studies", STUDY_INDEX_SCHEMA.empty_table())
    if "latest_scored" in tables:
        con.execute("CREATE TEMP VIEW last_scored AS SELECT study_uid, fingerprint, model_version FROM latest_scored")
    else:
        con.register("last_scored", _EMPTY_SCORED.empty_table())
    previous_run = None
    if not first_night:
        runs = con.sql("SELECT * FROM runs WHERE kind IS DISTINCT FROM 'compaction' ORDER BY finished_at DESC LIMIT 1")
        found = runs.to_arrow_table().to_pylist()
        previous_run = found[0] if found else None
    return con, previous_run


_PLAN_FILES = ("index.parquet", "studies.parquet", "manifest.parquet", "meta.json", "plan.parquet")


def make_plan(
    archive_uri: str,
    bundle_uri: str,
    out_uri: str,
    *,
    job,
    run_id: str | None = None,
    full: bool = False,
    storage_config: storage.StorageConfig | None = None,
    now: dt.datetime | None = None,
    inventory_uri: str | None = None,
) -> NightlyPlan:
    """Index the archive incrementally and decide what to score (writes nothing). With ``inventory_uri``
    (an S3 Inventory report's ``manifest.json``) tonight's listing is that report, refused when it is
    older than the last committed run; else the archive is listed (in parallel over its prefixes)."""
    bundle_config, _ = load_bundle_config(bundle_uri, storage_config)
    model_version = bundle_config.version_id
    run_id = run_id or nightly_run_id(model_version, now)
    con, previous_run = _committed(out_uri, storage_config, job.index.table_memory_gb)
    plan_prefix = storage.join(out_uri, "plans", f"run_id={run_id}")
    if all(storage.exists(storage.join(plan_prefix, f), storage_config) for f in _PLAN_FILES):
        # A re-run of this night: the same studies as the first attempt, whatever changed since.
        meta = json.loads(storage.read_bytes(storage.join(plan_prefix, "meta.json"), storage_config))
        return NightlyPlan(
            run_id, model_version,
            _read_parquet(storage.join(plan_prefix, "index.parquet"), storage_config).cast(INDEX_SCHEMA),
            _read_parquet(storage.join(plan_prefix, "studies.parquet"), storage_config).cast(STUDY_INDEX_SCHEMA),
            _read_parquet(storage.join(plan_prefix, "plan.parquet"), storage_config).to_pandas(),
            to_arrow(read_manifest(storage.join(plan_prefix, "manifest.parquet"), storage_config)),
            meta["new_objects"], meta["deleted_objects"], True, previous_run, counts=meta["counts"])

    if inventory_uri:
        inventory = read_inventory(inventory_uri, archive_uri, storage_config)
        check_fresh(inventory, previous_run["started_at"] if previous_run else None)
        if not inventory.listing.num_rows:  # as for a listing: never mark a whole archive deleted
            raise EmptyInput(f"inventory {inventory_uri} lists no objects under {archive_uri}")
        listing = inventory.listing
    else:
        listing = list_inputs_table(archive_uri, job.index, storage_config)  # Ray tasks over key prefixes
    con.register("listing", listing)
    retries = []

    def read_headers(rows: pa.Table) -> pa.Table:
        fresh = read_headers_on_ray(rows.to_pylist(), job.index, storage_config)
        retries.append(fresh.attrs["storage_retries"])
        return to_arrow(fresh)

    night = plan_night(con, read_headers, model_version=model_version, run_id=run_id, index_schema=INDEX_SCHEMA,
                       preferred_thickness_mm=job.index.preferred_thickness_mm, full=full)
    return NightlyPlan(
        run_id, model_version, night.index, night.studies, night.plan.to_pandas(),
        planned_rows(con, night).select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA),
        night.read.column("uri").to_pylist(), night.deleted, False, previous_run,
        counts=night.counts, storage_retries=sum(retries),
    )


def _estimate_seconds(plan: NightlyPlan) -> float | None:
    rate = (plan.previous_run or {}).get("slices_per_s")
    if not rate:
        return None
    return plan.counts["planned_slices"] / float(rate)


def format_plan(plan: NightlyPlan) -> str:
    reasons = plan.plan["reason"].value_counts().to_dict()
    lines = [
        f"nightly run {plan.run_id}" + (" (re-run: the first attempt's plan)" if plan.reused else ""),
        f"  archive: {plan.counts['objects']} objects ({len(plan.new_objects)} new or changed, {plan.deleted_objects} deleted), "
        f"{plan.counts['studies']} studies",
        f"  to score: {len(plan.plan)} studies" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})" if reasons else ""),
    ]
    estimate = _estimate_seconds(plan)
    if estimate is not None:
        lines.append(f"  estimated scoring time: {estimate:.0f} s at the last run's {plan.previous_run['slices_per_s']:.1f} slices/s")
    for row in plan.plan.head(20).itertuples():
        lines.append(f"    {row.study_uid}: {row.reason}")
    if len(plan.plan) > 20:
        lines.append(f"    ... and {len(plan.plan) - 20} more")
    return "\n".join(lines)


@dataclass
class NightlyResult:
    plan: NightlyPlan
    summary: Any  # ichd_ray.pipeline.score.RunSummary, None for a dry run
    seconds: float


def nightly(
    archive_uri: str,
    bundle_uri: str,
    out_uri: str,
    *,
    job=None,
    run_id: str | None = None,
    full: bool = False,
    dry_run: bool = False,
    max_reject_fraction: float = 0.05,
    lease_ttl: dt.timedelta | None = None,
    storage_config: storage.StorageConfig | None = None,
    now: dt.datetime | None = None,
    progress: bool = False,
    inventory_uri: str | None = None,
) -> NightlyResult:
    """One night (Ray must be initialised). Raises :class:`ichd_ray.io.lease.LeaseHeld` when another run
    holds OUT's lease; a dry run takes no lease and writes nothing. The lease is a heartbeat: ``lease_ttl``
    (None: :data:`ichd_ray.io.lease.DEFAULT_TTL`, 5 min) renewed every third of it, so a killed run's lease
    lapses within ``lease_ttl``, or at once for a re-run on the same host."""
    job = job or JobConfig()
    sc = storage_config or config_files.storage_config(job.storage)
    started = time.perf_counter()
    if dry_run:
        plan = make_plan(archive_uri, bundle_uri, out_uri, job=job, run_id=run_id, full=full, storage_config=sc, now=now,
                         inventory_uri=inventory_uri)
        plan.estimated_seconds = _estimate_seconds(plan)
        return NightlyResult(plan, None, time.perf_counter() - started)

    with LeaseKeeper(lease_uri(out_uri), ttl=lease_ttl or DEFAULT_TTL, storage_config=sc) as keeper:
        plan = make_plan(archive_uri, bundle_uri, out_uri, job=job, run_id=run_id, full=full, storage_config=sc, now=now,
                         inventory_uri=inventory_uri)
        plan_prefix = storage.join(out_uri, "plans", f"run_id={plan.run_id}")
        manifest_uri = storage.join(plan_prefix, "manifest.parquet")
        if not plan.reused:  # written before any scoring, plan.parquet last: a re-run repeats exactly this plan
            _write_parquet(plan.index, storage.join(plan_prefix, "index.parquet"), sc)
            _write_parquet(plan.studies, storage.join(plan_prefix, "studies.parquet"), sc)
            write_manifest(plan.rows, manifest_uri, sc)
            storage.write_bytes(
                storage.join(plan_prefix, "meta.json"),
                json.dumps({"new_objects": plan.new_objects, "deleted_objects": plan.deleted_objects,
                            "counts": plan.counts}).encode(),
                sc,
            )
            _write_parquet(plan.plan, storage.join(plan_prefix, "plan.parquet"), sc)
        scored = plan.plan.assign(run_id=plan.run_id, model_version=plan.model_version)[SCORED_TABLE_SCHEMA.names]
        run = ScoringRun(bundle_uri, out_uri, job=job, run_id=plan.run_id, progress=progress, storage_config=sc,
                         max_reject_fraction=max_reject_fraction, kind="nightly", storage_retries=plan.storage_retries)
        done = run.score(read_manifest(manifest_uri, sc))
        run.write_table("index", plan.index)  # tonight's changes; every row is this run's, a re-run's too
        run.write_table("index_studies", plan.studies)
        # Only studies that got a prediction count as scored: a failed one stays due.
        run.write_table("scored", pa.Table.from_pandas(scored[scored["study_uid"].isin(done.study_uids)],
                                                       schema=SCORED_TABLE_SCHEMA, preserve_index=False))
        keeper.check()  # a lost lease stops the run uncommitted: another run owns OUT now
        summary = run.commit()
    return NightlyResult(plan, summary, time.perf_counter() - started)
