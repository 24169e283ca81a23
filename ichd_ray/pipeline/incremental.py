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

from ichd_ray.io.tables import STUDY_INDEX_SCHEMA

__all__ = [
    "AXIAL_MIN_NORMAL_Z",
    "LISTING_SCHEMA",
    "STUDY_INDEX_SCHEMA",
    "PLAN_SCHEMA",
    "select_series",
    "study_fingerprints",
    "study_rows",
    "plan_from_studies",
    "NightTables",
    "plan_night",
    "planned_rows",
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


def study_rows(index: pa.Table, run_id: str) -> pa.Table:
    """:data:`STUDY_INDEX_SCHEMA` rows of every study with a live object in ``index`` (INDEX_SCHEMA
    columns), by study."""
    con = _connect(idx=index.select(["uri", "size", "mtime", "etag", "study_uid", "deleted", "selected"]),
                   fp=study_fingerprints(index))
    out = con.sql("""
        SELECT $run AS run_id, study_uid, f.fingerprint, count(*) AS n_objects,
               count(*) FILTER (selected) AS n_selected, false AS deleted
        FROM idx JOIN fp f USING (study_uid) WHERE NOT deleted
        GROUP BY study_uid, f.fingerprint ORDER BY study_uid""", params={"run": run_id}).to_arrow_table()
    return out.cast(STUDY_INDEX_SCHEMA)


def plan_from_studies(studies: pa.Table, scored: pa.Table | None, model_version: str, full: bool = False) -> pa.Table:
    """The plan (:data:`PLAN_SCHEMA`) from the latest row of each study (:data:`STUDY_INDEX_SCHEMA`): a
    study with a selected live object is scored when ``full``, never scored (``new``), scored by another
    model version (``model``) or at another fingerprint (``changed``)."""
    if scored is None:
        scored = pa.table({"study_uid": pa.array([], pa.string()), "fingerprint": pa.array([], pa.string()),
                           "model_version": pa.array([], pa.string())})
    con = _connect(st=studies.select(["study_uid", "fingerprint", "n_selected", "deleted"]),
                   scored=scored.select(["study_uid", "fingerprint", "model_version"]))
    return con.sql("""
        SELECT study_uid, c.fingerprint,
               CASE WHEN $full THEN 'full'
                    WHEN s.study_uid IS NULL THEN 'new'
                    WHEN s.model_version IS DISTINCT FROM $version THEN 'model'
                    WHEN s.fingerprint IS DISTINCT FROM c.fingerprint THEN 'changed' END AS reason
        FROM st c LEFT JOIN scored s USING (study_uid)
        WHERE NOT c.deleted AND c.n_selected > 0 AND reason IS NOT NULL ORDER BY study_uid
    """, params={"full": bool(full), "version": model_version}).to_arrow_table().cast(PLAN_SCHEMA)


@dataclass
class NightTables:
    """What :func:`plan_night` decided; every table but ``plan`` is what tonight *changed*.

    Attributes:
        index: Tonight's index rows to commit (INDEX_SCHEMA): every object of a study touched tonight
            (new, changed or gone objects, or sharing a SOP UID with one), new or changed objects of no
            study, and a ``deleted`` row for each object gone. Everything else is as last committed.
        studies: :data:`STUDY_INDEX_SCHEMA` rows of the touched studies (``deleted``: none left), and on
            the first night after an index without them, of every study.
        plan: ``study_uid, fingerprint, reason`` of the studies to score (:data:`PLAN_SCHEMA`).
        read: The listing rows whose headers were read tonight (new or changed objects).
        deleted: How many objects of the last index are gone tonight.
        counts: ``objects`` (live tonight), ``studies`` (with a selected object), ``planned_slices``.
    """

    index: pa.Table
    studies: pa.Table
    plan: pa.Table
    read: pa.Table
    deleted: int
    counts: dict[str, int]


def plan_night(
    con: duckdb.DuckDBPyConnection,
    read_headers: Callable[[pa.Table], pa.Table],
    *,
    model_version: str,
    run_id: str,
    preferred_thickness_mm: float,
    index_schema: pa.Schema,
    full: bool = False,
) -> NightTables:
    """One night's table work, in O(what changed) beyond two scans of the last index.

    ``con`` holds four relations (tables or views, e.g. over Parquet, read lazily by DuckDB):
    ``listing`` (tonight's objects, :data:`LISTING_SCHEMA`), ``previous`` (the last committed index's
    live rows: INDEX_SCHEMA, ``deleted`` false), ``previous_studies`` (the latest
    :data:`STUDY_INDEX_SCHEMA` row of every study; empty on the first night, or when the index was
    written before that table existed: then it is computed from ``previous`` once) and ``last_scored``
    (latest committed ``study_uid, fingerprint, model_version``).

    Steps: a full outer join of listing and last index keeps only the differences (new, changed, gone);
    ``read_headers`` reads the new and changed ones (listing rows -> manifest rows, e.g. Ray tasks); the
    touched studies are closed over shared SOP UIDs (the duplicate rule spans studies), and the series
    rule is redone over their objects only; their fingerprints and tonight's study rows follow, and the
    plan joins the latest study rows with ``last_scored``.

    Args:
        con: The connection holding the four relations.
        read_headers: Reads the headers of the given listing rows; returns manifest columns.
        model_version: The bundle's version.
        run_id: Tonight's run id (the rows written tonight carry it).
        preferred_thickness_mm: The series rule's thickness.
        index_schema: The index's schema (the manifest's columns, ``deleted``, ``run_id``).
        full: Plan every study.
    """
    manifest_columns = [c for c in index_schema.names if c not in ("deleted", "run_id")]
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _diff AS
        SELECT l.uri, l.size, l.mtime, l.etag, p.uri AS prev_uri, p.study_uid AS prev_study, p.sop_uid AS prev_sop
        FROM listing l FULL OUTER JOIN (SELECT uri, size, mtime, etag, study_uid, sop_uid FROM previous) p ON p.uri = l.uri
        WHERE l.uri IS NULL OR p.uri IS NULL OR NOT ({_UNCHANGED})""")
    to_read = con.sql("SELECT uri, size, mtime, etag FROM _diff WHERE uri IS NOT NULL ORDER BY uri").to_arrow_table()
    fresh = read_headers(to_read.cast(LISTING_SCHEMA)).select(manifest_columns)
    con.register("_fresh", fresh)
    # The studies and SOP UIDs whose rows can change tonight, closed over both (a duplicate SOP UID in an
    # untouched study can flip which copy is kept): usually one round finds nothing more.
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _studies AS
        SELECT DISTINCT s AS study_uid FROM (SELECT prev_study AS s FROM _diff UNION ALL SELECT study_uid FROM _fresh)
        WHERE s IS NOT NULL""")
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _sops AS
        SELECT DISTINCT s AS sop_uid FROM (SELECT prev_sop AS s FROM _diff UNION ALL SELECT sop_uid FROM _fresh)
        WHERE s IS NOT NULL""")
    while True:
        con.execute("""
            CREATE OR REPLACE TEMP TABLE _hit AS SELECT DISTINCT study_uid, sop_uid FROM previous
            WHERE study_uid IN (SELECT study_uid FROM _studies) OR sop_uid IN (SELECT sop_uid FROM _sops)""")
        grown = con.execute("""
            INSERT INTO _studies SELECT DISTINCT study_uid FROM _hit
            WHERE study_uid IS NOT NULL AND study_uid NOT IN (SELECT study_uid FROM _studies)""").fetchall()[0][0]
        grown += con.execute("""
            INSERT INTO _sops SELECT DISTINCT sop_uid FROM _hit
            WHERE sop_uid IS NOT NULL AND sop_uid NOT IN (SELECT sop_uid FROM _sops)""").fetchall()[0][0]
        if not grown:
            break
    columns = ", ".join(f'"{c}"' for c in manifest_columns)
    kept = con.sql(f"""
        SELECT {columns} FROM previous
        WHERE (study_uid IN (SELECT study_uid FROM _studies) OR sop_uid IN (SELECT sop_uid FROM _sops))
          AND uri NOT IN (SELECT prev_uri FROM _diff WHERE prev_uri IS NOT NULL)""").to_arrow_table()
    live = select_series(pa.concat_tables([kept.cast(fresh.schema), fresh]), preferred_thickness_mm)
    con.register("_live", live)
    index = con.sql("""
        SELECT *, false AS deleted, $run AS run_id FROM _live
        UNION ALL BY NAME
        SELECT * REPLACE (true AS deleted, $run AS run_id) FROM previous
        WHERE uri IN (SELECT prev_uri FROM _diff WHERE uri IS NULL)
        ORDER BY deleted, uri""", params={"run": run_id}).to_arrow_table().select(index_schema.names).cast(index_schema)
    con.register("_index", index)
    touched = study_rows(index, run_id)
    con.register("_touched", touched)
    # Touched studies with no live object left are deleted; on the first night after an index without
    # study rows, every study is written once.
    backfill = not con.execute("SELECT count(*) FROM previous_studies").fetchall()[0][0]
    studies = con.sql("""
        SELECT * FROM _touched
        UNION ALL BY NAME
        SELECT $run AS run_id, study_uid, NULL AS fingerprint, 0 AS n_objects, 0 AS n_selected, true AS deleted
        FROM _studies WHERE study_uid NOT IN (SELECT study_uid FROM _touched)
            AND study_uid IN (SELECT study_uid FROM previous_studies UNION ALL SELECT study_uid FROM previous)
        ORDER BY study_uid""", params={"run": run_id}).to_arrow_table().cast(STUDY_INDEX_SCHEMA)
    if backfill:
        untouched = con.sql("SELECT * FROM previous WHERE study_uid NOT IN (SELECT study_uid FROM _studies)").to_arrow_table()
        studies = pa.concat_tables([studies, study_rows(untouched.cast(index_schema), run_id)]).sort_by("study_uid")
    con.register("_study_rows", studies)
    current = con.sql("""
        SELECT study_uid, fingerprint, n_selected, deleted FROM previous_studies
        WHERE study_uid NOT IN (SELECT study_uid FROM _study_rows)
        UNION ALL BY NAME SELECT study_uid, fingerprint, n_selected, deleted FROM _study_rows""").to_arrow_table()
    plan = plan_from_studies(current, con.sql("SELECT * FROM last_scored").to_arrow_table(), model_version, full=full)
    con.register("_current", current)
    con.register("_plan", plan)
    objects, n_studies, slices = con.execute("""
        SELECT (SELECT count(*) FROM listing),
               (SELECT count(*) FROM _current WHERE NOT deleted AND n_selected > 0),
               (SELECT coalesce(sum(n_selected), 0) FROM _current WHERE study_uid IN (SELECT study_uid FROM _plan))
        """).fetchall()[0]
    deleted = con.execute("SELECT count(*) FROM _diff WHERE uri IS NULL").fetchall()[0][0]
    return NightTables(index, studies, plan, to_read, deleted,
                       {"objects": objects, "studies": n_studies, "planned_slices": int(slices)})


def planned_rows(con: duckdb.DuckDBPyConnection, night: NightTables) -> pa.Table:
    """The index rows to score tonight (INDEX_SCHEMA, by URI): every live object of a planned study (from
    tonight's rows for a touched study, else from ``previous`` in ``con``) and the new or changed objects
    of no study, so each bad file is reported once, the night it appears."""
    con.register("_night", night.index)
    con.register("_plan", night.plan)
    con.register("_read", night.read.select(["uri"]))
    schema = night.index.schema
    return con.sql("""
        SELECT * FROM _night WHERE NOT deleted AND (study_uid IN (SELECT study_uid FROM _plan)
                                                  OR (study_uid IS NULL AND uri IN (SELECT uri FROM _read)))
        UNION ALL BY NAME
        SELECT * FROM previous WHERE study_uid IN (SELECT study_uid FROM _plan)
            AND study_uid NOT IN (SELECT study_uid FROM _night WHERE study_uid IS NOT NULL)
        ORDER BY uri""").to_arrow_table().select(schema.names).cast(schema)
