"""The nightly index's table work in DuckDB: diff a listing, select series, fingerprint and plan studies.

Each step is one SQL statement over Arrow tables (DuckDB runs it vectorised, on every core, spilling to
disk past its memory limit), so a night's cost grows with rows, not with Python iterations: no loop
per object or per study. The rules are the ones documented in :mod:`ichd_ray.pipeline.index` (series
selection) and :mod:`ichd_ray.pipeline.nightly` (diff, fingerprint, plan); the test file checks every
function against the pandas implementation they replace, row for row and byte for byte (a different
fingerprint would rescore a whole archive on upgrade).

Inputs are ``pyarrow.Table`` (or anything DuckDB scans: a pandas DataFrame, a Parquet relation);
outputs are ``pyarrow.Table``. Pure: no storage, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import duckdb
import pyarrow as pa

__all__ = [
    "AXIAL_MIN_NORMAL_Z",
    "LISTING_SCHEMA",
    "diff_listing",
    "select_series",
    "study_fingerprints",
    "plan_studies",
    "night_index",
    "NightTables",
    "plan_night",
]

#: A series whose slice normal is further than 35 degrees from z is not axial.
AXIAL_MIN_NORMAL_Z = math.cos(math.radians(35))

#: One row per listed object.
LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()), ("etag", pa.string())])

# An object is unchanged when both ETags are known and equal, or (an ETag missing) size and mtime agree.
# An unknown mtime agrees with nothing, so such an object's header is read again each night: nothing to
# compare is not taken for "the same" (the pandas code did this too, by way of NaN != None).
_UNCHANGED = """
    CASE WHEN coalesce(p.etag, '') <> '' AND coalesce(l.etag, '') <> '' THEN p.etag = l.etag
         ELSE p.size IS NOT DISTINCT FROM l.size AND coalesce(abs(p.mtime - l.mtime) < 1e-6, false)
    END
"""


def _connect(**tables: Any) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for name, table in tables.items():
        con.register(name, table)
    return con


def diff_listing(previous: pa.Table, listing: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Split tonight's listing against the last committed index.

    Args:
        previous: The last committed index (``uri, size, mtime, etag, ..., deleted``); an empty table
            of its schema on the first night.
        listing: ``uri, size, mtime, etag`` per object in the archive now (:data:`LISTING_SCHEMA`).

    Returns:
        (unchanged, to_read, deleted): index rows still valid as they are (listing order); listing rows
        that are new or changed, whose headers must be read (listing order); index rows whose object is
        gone, ``deleted`` set (index order). Deleted rows already in ``previous`` stay deleted.
    """
    con = _connect(previous=previous, listing=listing.select(LISTING_SCHEMA.names))
    con.execute("CREATE TEMP TABLE l AS SELECT *, row_number() OVER () AS _pos FROM listing")
    con.execute("CREATE TEMP TABLE p AS SELECT *, row_number() OVER () AS _pos FROM previous")
    unchanged = con.sql(f"""
        SELECT p.* EXCLUDE (_pos) FROM l JOIN p ON p.uri = l.uri AND NOT p.deleted
        WHERE {_UNCHANGED} ORDER BY l._pos""").to_arrow_table()
    to_read = con.sql(f"""
        SELECT l.uri, l.size, l.mtime, l.etag FROM l LEFT JOIN p ON p.uri = l.uri AND NOT p.deleted
        WHERE p.uri IS NULL OR NOT ({_UNCHANGED}) ORDER BY l._pos""").to_arrow_table()
    deleted = con.sql("""
        SELECT * EXCLUDE (_pos) REPLACE (true AS deleted) FROM p
        WHERE NOT EXISTS (SELECT 1 FROM l WHERE l.uri = p.uri) ORDER BY _pos""").to_arrow_table()
    return unchanged.cast(previous.schema), to_read.cast(LISTING_SCHEMA), deleted.cast(previous.schema)


def select_series(headers: pa.Table, preferred_thickness_mm: float = 5.0) -> pa.Table:
    """The series rule of :mod:`ichd_ray.pipeline.index`: ``reason``, ``message``, ``selected`` and
    ``slice_index`` filled in, rows in URI order.

    Args:
        headers: One row per object with the manifest's columns (``reason`` set where the header was
            rejected); ``selected``, ``slice_index`` and the rule's own reasons (``duplicate``,
            ``other_series``), if present, are recomputed, so last night's rows can be passed again.
        preferred_thickness_mm: The series whose median SliceThickness is nearest wins.
    """
    columns = [c for c in headers.column_names if c not in ("selected", "slice_index")]
    con = _connect(headers=headers.select(columns))
    rule = f"(rule: thickness nearest {preferred_thickness_mm:g} mm, then most slices)"
    out = con.sql(f"""
        WITH ordered AS (  -- reasons of the rule itself are recomputed: a night passes last night's rows again
            SELECT * REPLACE (
                       CASE WHEN reason IN ('duplicate', 'other_series') THEN NULL ELSE reason END AS reason,
                       CASE WHEN reason IN ('duplicate', 'other_series') THEN NULL ELSE message END AS message),
                   row_number() OVER (ORDER BY uri) AS _row
            FROM headers
        ), duplicates AS (  -- a SOP UID seen twice among accepted objects keeps its first (by URI)
            SELECT * REPLACE (
                CASE WHEN _dup THEN 'duplicate' ELSE reason END AS reason,
                CASE WHEN _dup THEN 'SOPInstanceUID also in ' || _first ELSE message END AS message)
            FROM (SELECT *,
                         reason IS NULL AND sop_uid IS NOT NULL
                             AND row_number() OVER (PARTITION BY sop_uid, reason IS NULL ORDER BY uri) > 1 AS _dup,
                         first_value(uri) OVER (PARTITION BY sop_uid, reason IS NULL ORDER BY uri) AS _first
                  FROM ordered)
        ), axial AS (
            SELECT * REPLACE (
                CASE WHEN _off THEN 'other_series' ELSE reason END AS reason,
                CASE WHEN _off THEN 'not an axial series (slice normal more than 35 degrees from z)' ELSE message END AS message)
            FROM (SELECT *, reason IS NULL AND normal_z IS NOT NULL AND normal_z < $axial AS _off FROM duplicates)
        ), series AS (  -- per study, the series nearest the preferred thickness, then most slices, then lowest UID
            SELECT study_uid, series_uid,
                   row_number() OVER (PARTITION BY study_uid ORDER BY
                       coalesce(abs(median(slice_thickness) - $preferred), 'inf'::DOUBLE), count(*) DESC, series_uid) AS _rank
            FROM axial WHERE reason IS NULL AND study_uid IS NOT NULL AND series_uid IS NOT NULL
            GROUP BY study_uid, series_uid
        ), chosen AS (
            SELECT study_uid, series_uid AS _chosen FROM series WHERE _rank = 1
        ), ranked AS (
            SELECT a.*, c._chosen,
                   a.reason IS NULL AND c._chosen IS NOT NULL AND a.series_uid IS NOT NULL AS _in_study,
                   a.series_uid = c._chosen AS _is_chosen
            FROM axial a LEFT JOIN chosen c ON a.study_uid = c.study_uid AND a.reason IS NULL
        )
        SELECT * EXCLUDE (_row, _dup, _first, _off, _chosen, _in_study, _is_chosen) REPLACE (
                   CASE WHEN _in_study AND NOT _is_chosen THEN 'other_series' ELSE reason END AS reason,
                   CASE WHEN _in_study AND NOT _is_chosen
                        THEN 'study ' || study_uid || ' scored with series ' || _chosen || ' {rule}'
                        ELSE message END AS message),
               coalesce(_in_study AND _is_chosen, false) AS selected,
               CASE WHEN _in_study AND _is_chosen THEN
                   (row_number() OVER (PARTITION BY study_uid, _in_study AND _is_chosen
                                       ORDER BY position NULLS LAST, instance_number NULLS LAST, sop_uid NULLS LAST, uri) - 1)::INTEGER
               END AS slice_index
        FROM ranked ORDER BY _row
    """, params={"axial": AXIAL_MIN_NORMAL_Z, "preferred": float(preferred_thickness_mm)}).to_arrow_table()
    return out.cast(pa.schema([*(headers.schema.field(c) for c in columns),
                               pa.field("selected", pa.bool_()), pa.field("slice_index", pa.int32())]))


# The text hashed per object: uri|etag|size|mtime, numbers printed as today's pandas code printed them.
_OBJECT_LINE = """uri || '|' || coalesce(etag, '') || '|' || coalesce(printf('%.0f', size::DOUBLE), '')
                  || '|' || coalesce(printf('%.6f', mtime), '')"""


def study_fingerprints(index: pa.Table) -> pa.Table:
    """``study_uid, fingerprint``: sha256 per study over its live objects' (uri, etag, size, mtime) in URI
    order, so any added, removed or replaced object changes it. Deleted rows and rows without a study
    are ignored. Sorted by study."""
    con = _connect(idx=index.select(["uri", "size", "mtime", "etag", "study_uid", "deleted"]))
    return con.sql(f"""
        SELECT study_uid, sha256(string_agg({_OBJECT_LINE}, chr(10) ORDER BY uri)) AS fingerprint
        FROM idx WHERE NOT deleted AND study_uid IS NOT NULL
        GROUP BY study_uid ORDER BY study_uid""").to_arrow_table()


PLAN_SCHEMA = pa.schema([("study_uid", pa.string()), ("fingerprint", pa.string()), ("reason", pa.string())])


def plan_studies(index: pa.Table, scored: pa.Table | None, model_version: str, full: bool = False) -> pa.Table:
    """The studies to score tonight and why: ``study_uid, fingerprint, reason`` by study, reason one of
    ``full`` (``full``), ``new`` (never scored), ``model`` (scored by another model version) or
    ``changed`` (its fingerprint differs from the one last scored); studies none of these are left out.

    Args:
        index: Tonight's index (after the series rule): a study is a candidate when it has a selected,
            live object.
        scored: Latest committed ``scored`` row per study (``study_uid, fingerprint, model_version``).
        model_version: The bundle's version.
        full: Score every study.
    """
    if scored is None:
        scored = pa.table({"study_uid": pa.array([], pa.string()), "fingerprint": pa.array([], pa.string()),
                           "model_version": pa.array([], pa.string())})
    con = _connect(idx=index.select(["uri", "size", "mtime", "etag", "study_uid", "deleted", "selected"]),
                   scored=scored.select(["study_uid", "fingerprint", "model_version"]),
                   fingerprints=study_fingerprints(index))
    out = con.sql("""
        WITH candidates AS (SELECT DISTINCT study_uid FROM idx WHERE selected AND NOT deleted),
        decided AS (
            SELECT c.study_uid, f.fingerprint,
                   CASE WHEN $full THEN 'full'
                        WHEN s.study_uid IS NULL THEN 'new'
                        WHEN s.model_version IS DISTINCT FROM $version THEN 'model'
                        WHEN s.fingerprint IS DISTINCT FROM f.fingerprint THEN 'changed' END AS reason
            FROM candidates c JOIN fingerprints f USING (study_uid) LEFT JOIN scored s USING (study_uid))
        SELECT * FROM decided WHERE reason IS NOT NULL ORDER BY study_uid
    """, params={"full": bool(full), "version": model_version}).to_arrow_table()
    return out.cast(PLAN_SCHEMA)


def night_index(live: pa.Table, deleted: pa.Table, run_id: str, schema: pa.Schema) -> pa.Table:
    """Tonight's index (``schema``: the manifest's columns, ``deleted``, ``run_id``): the live objects
    after the series rule, then the deleted ones, every row of this run."""
    con = _connect(live=live, gone=deleted)
    return con.sql("""
        SELECT *, false AS deleted, $run AS run_id FROM live
        UNION ALL BY NAME SELECT * REPLACE ($run AS run_id) FROM gone""", params={"run": run_id}).to_arrow_table().select(
        schema.names).cast(schema)


@dataclass
class NightTables:
    """What :func:`plan_night` decided.

    Attributes:
        index: Tonight's index, every object (deleted ones flagged).
        plan: ``study_uid, fingerprint, reason`` of the studies to score (:data:`PLAN_SCHEMA`).
        read: The listing rows whose headers were read tonight (new or changed objects).
        deleted: How many objects of the last index are gone tonight.
    """

    index: pa.Table
    plan: pa.Table
    read: pa.Table
    deleted: int


def plan_night(
    previous: pa.Table,
    listing: pa.Table,
    scored: pa.Table | None,
    read_headers: Callable[[pa.Table], pa.Table],
    *,
    model_version: str,
    run_id: str,
    preferred_thickness_mm: float,
    full: bool = False,
) -> NightTables:
    """One night's table work: diff the listing against the last index, read the headers of what is new
    or changed (``read_headers``: listing rows -> manifest rows, e.g. Ray tasks), redo the series rule
    over the live objects, build tonight's index and the plan.

    Args:
        previous: The last committed index (an empty table of its schema on the first night).
        listing: Tonight's objects (:data:`LISTING_SCHEMA`).
        scored: Latest committed ``scored`` row per study, or None.
        read_headers: Reads the headers of the given listing rows; returns manifest columns.
        model_version: The bundle's version.
        run_id: Tonight's run id (every index row carries it).
        preferred_thickness_mm: The series rule's thickness.
        full: Plan every study.
    """
    unchanged, to_read, deleted = diff_listing(previous, listing)
    manifest_columns = [c for c in previous.column_names if c not in ("deleted", "run_id")]
    fresh = read_headers(to_read).select(manifest_columns).cast(unchanged.select(manifest_columns).schema)
    live = select_series(pa.concat_tables([unchanged.select(manifest_columns), fresh]), preferred_thickness_mm)
    index = night_index(live, deleted, run_id, previous.schema)
    return NightTables(index, plan_studies(index, scored, model_version, full=full), to_read, deleted.num_rows)
