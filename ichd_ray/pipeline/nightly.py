"""Nightly rescoring of an archive: incremental index, a plan of studies to score, one committed run.

One night, under a lease on ``OUT/_lease.json`` (another run on the same OUT exits with code 75)::

    list the archive --diff against the last committed index (etag, else size + mtime)-->
        unchanged objects keep their header row; new/changed ones are read (headers only, Ray tasks);
        objects gone are kept with deleted = true
    --series rule over the whole index--> per study a fingerprint of its live objects
    --plan--> a study is scored when it is new, its fingerprint changed since its last committed score,
              the model version differs from the one that scored it, or --full
    --ScoringRun on the planned studies--> slices / studies / errors + index + scored, one commit

The run id is ``nightly-<UTC date>-<model version>`` (``--run-id`` overrides it). The first attempt of a
run id stores its plan and index snapshot under ``OUT/plans/run_id=<id>/``; a re-run of the same id
reuses them, so it scores the same studies and replaces its own output. Nothing is visible until the
runs object is written, so a killed run leaves nothing behind and its studies stay due.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ichd_ray.config.job import JobConfig
from ichd_ray.io import config_files, storage
from ichd_ray.io.lease import DEFAULT_TTL, LeaseKeeper, lease_uri
from ichd_ray.io.results import connect
from ichd_ray.models.bundle import load_bundle_config
from ichd_ray.pipeline.index import MANIFEST_SCHEMA, list_inputs, read_headers_on_ray, read_manifest, select_series, write_manifest
from ichd_ray.pipeline.score import ScoringRun

__all__ = [
    "INDEX_SCHEMA",
    "SCORED_TABLE_SCHEMA",
    "NightlyPlan",
    "diff_listing",
    "study_fingerprints",
    "plan_studies",
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


# ------------------------------------------------------------------------------- pure functions


def _changed(old: pd.Series, new: dict[str, Any]) -> bool:
    """An object changed when its ETag differs (both known), else when size or mtime differs."""
    if old.get("etag") and new.get("etag"):
        return old["etag"] != new["etag"]
    return old.get("size") != new.get("size") or not _same_mtime(old.get("mtime"), new.get("mtime"))


def _same_mtime(a: Any, b: Any) -> bool:
    if a is None or b is None or (isinstance(a, float) and np.isnan(a)) or (isinstance(b, float) and np.isnan(b)):
        return a is None and b is None
    return abs(float(a) - float(b)) < 1e-6


def diff_listing(previous: pd.DataFrame | None, listing: list[dict[str, Any]]) -> tuple[pd.DataFrame, list[dict[str, Any]], pd.DataFrame]:
    """Split today's listing against the last committed index.

    Args:
        previous: The last committed index (``INDEX_SCHEMA`` columns) or None on the first night.
        listing: ``{uri, size, mtime, etag}`` per object in the archive now.

    Returns:
        (unchanged, to_read, deleted): index rows still valid as they are; listing entries that are new
        or changed (their headers must be read); index rows whose object is gone (marked deleted).
    """
    if previous is None or previous.empty:
        return pd.DataFrame(columns=INDEX_SCHEMA.names), list(listing), pd.DataFrame(columns=INDEX_SCHEMA.names)
    live = previous[~previous["deleted"].astype(bool)].set_index("uri", drop=False)
    seen, to_read, unchanged_uris = set(), [], []
    for entry in listing:
        uri = entry["uri"]
        seen.add(uri)
        if uri in live.index and not _changed(live.loc[uri], entry):
            unchanged_uris.append(uri)
        else:
            to_read.append(entry)
    unchanged = live.loc[unchanged_uris].reset_index(drop=True)
    deleted = previous[~previous["uri"].isin(seen)].copy()
    deleted["deleted"] = True
    return unchanged, to_read, deleted.reset_index(drop=True)


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _number(value: Any, digits: int) -> str:
    """The same text whether the column came back as int, float or object (a Parquet round trip)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return f"{float(value):.{digits}f}"


def study_fingerprints(index: pd.DataFrame) -> pd.Series:
    """sha256 per study over its live objects' (uri, etag, size, mtime): any added, removed or replaced
    object changes it. Deleted rows and objects without a study are ignored."""
    live = index[~index["deleted"].astype(bool) & index["study_uid"].notna()]
    out = {}
    for study_uid, group in live.sort_values("uri").groupby("study_uid", sort=True):
        text = "\n".join(f"{r.uri}|{_text(r.etag)}|{_number(r.size, 0)}|{_number(r.mtime, 6)}" for r in group.itertuples())
        out[study_uid] = hashlib.sha256(text.encode()).hexdigest()
    return pd.Series(out, dtype=object, name="fingerprint")


def plan_studies(
    index: pd.DataFrame, scored: pd.DataFrame | None, model_version: str, full: bool = False
) -> pd.DataFrame:
    """The studies to score tonight and why.

    Args:
        index: Tonight's index (after the series rule).
        scored: Latest committed ``scored`` row per study (``study_uid``, ``fingerprint``, ``model_version``).
        model_version: The bundle's version.
        full: Score every study.

    Returns:
        DataFrame ``study_uid, fingerprint, reason`` (reason: full | new | model | changed), by study.
    """
    selected = index[index["selected"].astype(bool) & ~index["deleted"].astype(bool)]
    fingerprints = study_fingerprints(index)
    last = scored.set_index("study_uid") if scored is not None and len(scored) else pd.DataFrame(columns=["fingerprint", "model_version"])
    rows = []
    for study_uid in sorted(selected["study_uid"].unique()):
        fp = fingerprints[study_uid]
        if full:
            reason = "full"
        elif study_uid not in last.index:
            reason = "new"
        elif last.loc[study_uid, "model_version"] != model_version:
            reason = "model"
        elif last.loc[study_uid, "fingerprint"] != fp:
            reason = "changed"
        else:
            continue
        rows.append({"study_uid": study_uid, "fingerprint": fp, "reason": reason})
    return pd.DataFrame(rows, columns=["study_uid", "fingerprint", "reason"])


def nightly_run_id(model_version: str, now: dt.datetime | None = None) -> str:
    """``nightly-<UTC date>-<model version>``: the same night and model give the same id."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"nightly-{now:%Y%m%d}-{model_version}"


# ------------------------------------------------------------------------------------- the run


@dataclass
class NightlyPlan:
    run_id: str
    model_version: str
    index: pd.DataFrame
    plan: pd.DataFrame
    new_objects: list[str]
    deleted_objects: int
    reused: bool
    previous_run: dict[str, Any] | None = None
    estimated_seconds: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    storage_retries: int = 0  # S3 retries the index stage spent


def _read_parquet(uri: str, storage_config) -> pd.DataFrame:
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri, storage_config))).to_pandas()


def _write_parquet(df: pd.DataFrame | pa.Table, uri: str, storage_config, schema: pa.Schema | None = None) -> None:
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue(), storage_config)


def _committed(out_uri: str, storage_config) -> tuple[pd.DataFrame | None, pd.DataFrame | None, dict | None]:
    """(last committed index, latest committed scored row per study, newest committed run) from OUT."""
    if not storage.list_files(storage.join(out_uri, "runs"), config=storage_config):
        return None, None, None
    con = connect(out_uri, storage_config)
    runs = con.sql("SELECT * FROM runs ORDER BY finished_at DESC").to_arrow_table().to_pandas()
    previous_run = runs.iloc[0].to_dict() if len(runs) else None
    index = scored = None
    tables = set(con.sql("SELECT table_name FROM information_schema.tables").to_arrow_table().column(0).to_pylist())
    if "latest_index" in tables:
        index = con.sql("SELECT * EXCLUDE (run_id), run_id FROM latest_index").to_arrow_table().to_pandas()
    if "latest_scored" in tables:
        scored = con.sql("SELECT study_uid, fingerprint, model_version FROM latest_scored").to_arrow_table().to_pandas()
    return index, scored, previous_run


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
) -> NightlyPlan:
    """Index the archive incrementally and decide what to score (writes nothing)."""
    bundle_config, _ = load_bundle_config(bundle_uri, storage_config)
    model_version = bundle_config.version_id
    run_id = run_id or nightly_run_id(model_version, now)
    previous_index, scored, previous_run = _committed(out_uri, storage_config)
    plan_prefix = storage.join(out_uri, "plans", f"run_id={run_id}")
    if storage.exists(storage.join(plan_prefix, "plan.parquet"), storage_config):
        # A re-run of this night: the same studies as the first attempt, whatever changed since.
        index = _read_parquet(storage.join(plan_prefix, "index.parquet"), storage_config)
        plan = _read_parquet(storage.join(plan_prefix, "plan.parquet"), storage_config)
        meta = json.loads(storage.read_bytes(storage.join(plan_prefix, "meta.json"), storage_config))
        return NightlyPlan(run_id, model_version, index, plan, meta["new_objects"], meta["deleted_objects"], True, previous_run)

    entries = list_inputs(archive_uri, job.index, storage_config)
    listing = [{"uri": e.uri, "size": e.size, "mtime": e.mtime, "etag": e.etag} for e in entries]
    unchanged, to_read, deleted = diff_listing(previous_index, listing)
    fresh = read_headers_on_ray(to_read, job.index, storage_config)
    # Header-level reasons come back from read_headers; the series rule is redone over every live object.
    live = pd.concat([unchanged[MANIFEST_SCHEMA.names], fresh[MANIFEST_SCHEMA.names]], ignore_index=True)
    header_reasons = live["reason"].where(~live["reason"].isin(["duplicate", "other_series"]))
    live = live.assign(reason=header_reasons, message=live["message"].where(header_reasons.notna()))
    live = select_series(live, job.index.preferred_thickness_mm)
    live["deleted"] = False
    index = pd.concat([live, deleted.drop(columns=["run_id"], errors="ignore")], ignore_index=True)
    index["run_id"] = run_id
    plan = plan_studies(index, scored, model_version, full=full)
    return NightlyPlan(
        run_id, model_version, index, plan, [e["uri"] for e in to_read], len(deleted), False, previous_run,
        storage_retries=fresh.attrs["storage_retries"],
    )


def _estimate_seconds(plan: NightlyPlan) -> float | None:
    rate = (plan.previous_run or {}).get("slices_per_s")
    if not rate:
        return None
    n = plan.index[plan.index["study_uid"].isin(plan.plan["study_uid"]) & plan.index["selected"].astype(bool)].shape[0]
    return n / float(rate)


def format_plan(plan: NightlyPlan) -> str:
    reasons = plan.plan["reason"].value_counts().to_dict()
    live = plan.index[~plan.index["deleted"].astype(bool)]
    lines = [
        f"nightly run {plan.run_id}" + (" (re-run: the first attempt's plan)" if plan.reused else ""),
        f"  archive: {len(live)} objects ({len(plan.new_objects)} new or changed, {plan.deleted_objects} deleted), "
        f"{live.loc[live['selected'].astype(bool), 'study_uid'].nunique()} studies",
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
) -> NightlyResult:
    """One night (Ray must be initialised). Raises :class:`ichd_ray.io.lease.LeaseHeld` when another run
    holds OUT's lease; a dry run takes no lease and writes nothing. The lease is a heartbeat: ``lease_ttl``
    (None: :data:`ichd_ray.io.lease.DEFAULT_TTL`, 5 min) renewed every third of it, so a killed run's lease
    lapses within ``lease_ttl``, or at once for a re-run on the same host."""
    job = job or JobConfig()
    sc = storage_config or config_files.storage_config(job.storage)
    started = time.perf_counter()
    if dry_run:
        plan = make_plan(archive_uri, bundle_uri, out_uri, job=job, run_id=run_id, full=full, storage_config=sc, now=now)
        plan.estimated_seconds = _estimate_seconds(plan)
        return NightlyResult(plan, None, time.perf_counter() - started)

    with LeaseKeeper(lease_uri(out_uri), ttl=lease_ttl or DEFAULT_TTL, storage_config=sc) as keeper:
        plan = make_plan(archive_uri, bundle_uri, out_uri, job=job, run_id=run_id, full=full, storage_config=sc, now=now)
        plan_prefix = storage.join(out_uri, "plans", f"run_id={plan.run_id}")
        if not plan.reused:  # written before any scoring: a re-run of this id repeats exactly this plan
            _write_parquet(plan.index, storage.join(plan_prefix, "index.parquet"), sc, INDEX_SCHEMA)
            storage.write_bytes(
                storage.join(plan_prefix, "meta.json"),
                json.dumps({"new_objects": plan.new_objects, "deleted_objects": plan.deleted_objects}).encode(),
                sc,
            )
            _write_parquet(plan.plan, storage.join(plan_prefix, "plan.parquet"), sc)

        # Inputs of this run: every object of a planned study, plus new/changed objects that belong to no
        # study (so each bad file is reported once, the night it appears).
        index = plan.index[~plan.index["deleted"].astype(bool)]
        new = set(plan.new_objects)
        rows = index[index["study_uid"].isin(plan.plan["study_uid"]) | (index["study_uid"].isna() & index["uri"].isin(new))]
        manifest_uri = storage.join(plan_prefix, "manifest.parquet")
        write_manifest(rows[MANIFEST_SCHEMA.names], manifest_uri, sc)
        scored = plan.plan.assign(run_id=plan.run_id, model_version=plan.model_version)[SCORED_TABLE_SCHEMA.names]
        run = ScoringRun(bundle_uri, out_uri, job=job, run_id=plan.run_id, progress=progress, storage_config=sc,
                         max_reject_fraction=max_reject_fraction, kind="nightly", storage_retries=plan.storage_retries)
        done = run.score(read_manifest(manifest_uri, sc))
        run.write_table("index", pa.Table.from_pandas(plan.index.assign(run_id=plan.run_id)[INDEX_SCHEMA.names],
                                                      schema=INDEX_SCHEMA, preserve_index=False))
        # Only studies that got a prediction count as scored: a failed one stays due.
        run.write_table("scored", pa.Table.from_pandas(scored[scored["study_uid"].isin(done.study_uids)],
                                                       schema=SCORED_TABLE_SCHEMA, preserve_index=False))
        keeper.check()  # a lost lease stops the run uncommitted: another run owns OUT now
        summary = run.commit()
    return NightlyResult(plan, summary, time.perf_counter() - started)
