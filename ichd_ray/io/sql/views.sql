-- ichd-ray result views for DuckDB: committed attempts only.
-- A data file is visible only when runs/run_id=<id>/run.parquet names its attempt, so a crashed or
-- in-flight run never shows through these views. {root} is the OUT prefix (local path or s3://...).

CREATE OR REPLACE VIEW runs AS
SELECT * FROM read_parquet('{root}/runs/*/run.parquet', hive_partitioning = false, union_by_name = true);

CREATE OR REPLACE VIEW slices AS
SELECT t.* EXCLUDE (attempt)
FROM read_parquet('{root}/slices/*/*/*.parquet', hive_partitioning = true, union_by_name = true) AS t
JOIN runs AS r ON t.run_id = r.run_id AND t.attempt = r.attempt;

CREATE OR REPLACE VIEW studies AS
SELECT t.* EXCLUDE (attempt)
FROM read_parquet('{root}/studies/*/*/*.parquet', hive_partitioning = true, union_by_name = true) AS t
JOIN runs AS r ON t.run_id = r.run_id AND t.attempt = r.attempt;

CREATE OR REPLACE VIEW errors AS
SELECT t.* EXCLUDE (attempt)
FROM read_parquet('{root}/errors/*/*/*.parquet', hive_partitioning = true, union_by_name = true) AS t
JOIN runs AS r ON t.run_id = r.run_id AND t.attempt = r.attempt;

-- The newest prediction per study from a run that succeeded (by the run's finished_at). A failed run's
-- rows stay in `studies` (join runs for its status) but never become the latest answer.
CREATE OR REPLACE VIEW latest_studies AS
SELECT s.*, r.finished_at
FROM studies AS s
JOIN runs AS r ON s.run_id = r.run_id
WHERE r.status = 'succeeded'
QUALIFY row_number() OVER (PARTITION BY s.study_uid ORDER BY r.finished_at DESC, s.run_id DESC) = 1;
