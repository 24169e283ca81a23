-- Views over nightly runs (loaded when OUT has an index table). Committed attempts only, like views.sql.
-- A nightly run writes only what changed (index: the rows of the studies it touched, a deleted = true
-- row per object gone; index_studies: one row per touched study); `ichd-ray compact` writes a snapshot
-- of the whole archive (tombstones dropped) that later nights overlay. {index_files} and {index_runs}
-- (and the study ones) are filled in from the runs table when the views are created.

-- Every committed index row: each nightly run's changes, each compaction's snapshot.
CREATE OR REPLACE VIEW index_rows AS
SELECT t.* EXCLUDE (attempt)
FROM read_parquet('{root}/index/*/*/*.parquet', hive_partitioning = true, union_by_name = true) AS t
JOIN runs AS r ON t.run_id = r.run_id AND t.attempt = r.attempt;

-- The archive as the succeeded nightly runs saw it: the newest compaction's snapshot (_order 0), then
-- each later succeeded run's changes in the order they finished; the newest row of an object wins
-- (deleted = true: gone since an earlier night, until a compaction drops it). A failed night's rows are
-- not in it, so its objects are read again the next night.
CREATE OR REPLACE VIEW latest_index AS
{latest_index};

-- The latest row of every study (fingerprint of its live objects, counts, deleted when none is left).
CREATE OR REPLACE VIEW latest_study_index AS
{latest_study_index};

-- Which studies each nightly run scored, their fingerprint (the objects they were scored from) and why.
CREATE OR REPLACE VIEW scored AS
SELECT t.* EXCLUDE (attempt)
FROM read_parquet('{root}/scored/*/*/*.parquet', hive_partitioning = true, union_by_name = true) AS t
JOIN runs AS r ON t.run_id = r.run_id AND t.attempt = r.attempt;

-- A failed run's studies are not in it, so they stay due.
CREATE OR REPLACE VIEW latest_scored AS
SELECT s.*, r.finished_at
FROM scored AS s
JOIN runs AS r ON s.run_id = r.run_id
WHERE r.status = 'succeeded'
QUALIFY row_number() OVER (PARTITION BY s.study_uid ORDER BY r.finished_at DESC, s.run_id DESC) = 1;

-- Newest succeeded prediction per study, minus studies whose every object is gone from the archive
-- (a deleted study row; or, for an index written before study rows existed, only tombstones left).
CREATE OR REPLACE VIEW latest_studies AS
SELECT s.*, r.finished_at
FROM studies AS s
JOIN runs AS r ON s.run_id = r.run_id
WHERE r.status = 'succeeded' AND s.study_uid NOT IN (
    SELECT study_uid FROM latest_study_index WHERE deleted
    UNION ALL
    SELECT study_uid FROM latest_index WHERE study_uid IS NOT NULL
    GROUP BY study_uid HAVING bool_and(deleted)
)
QUALIFY row_number() OVER (PARTITION BY s.study_uid ORDER BY r.finished_at DESC, s.run_id DESC) = 1;
