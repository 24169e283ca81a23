-- Views over nightly runs (loaded when OUT has an index table). Committed attempts only, like views.sql.

CREATE OR REPLACE VIEW index_rows AS
SELECT t.* EXCLUDE (attempt)
FROM read_parquet('{root}/index/*/*/*.parquet', hive_partitioning = true, union_by_name = true) AS t
JOIN runs AS r ON t.run_id = r.run_id AND t.attempt = r.attempt;

-- The archive as the newest succeeded nightly run saw it (deleted = true: gone since an earlier night).
-- latest_* views show succeeded runs only: a failed night's objects are read again the next night.
CREATE OR REPLACE VIEW latest_index AS
SELECT i.*
FROM index_rows AS i
WHERE i.run_id = (
    SELECT r.run_id FROM runs AS r
    WHERE r.run_id IN (SELECT DISTINCT run_id FROM index_rows) AND r.status = 'succeeded'
    ORDER BY r.finished_at DESC LIMIT 1
);

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

-- Newest succeeded prediction per study, minus studies whose every object is gone from the archive.
CREATE OR REPLACE VIEW latest_studies AS
SELECT s.*, r.finished_at
FROM studies AS s
JOIN runs AS r ON s.run_id = r.run_id
WHERE r.status = 'succeeded' AND s.study_uid NOT IN (
    SELECT study_uid FROM latest_index WHERE study_uid IS NOT NULL
    GROUP BY study_uid HAVING bool_and(deleted)
)
QUALIFY row_number() OVER (PARTITION BY s.study_uid ORDER BY r.finished_at DESC, s.run_id DESC) = 1;
