"""What a run committed, read through the views, without its run-time columns: two runs of the same
inputs must give equal frames."""

from __future__ import annotations

import pandas as pd

#: Columns that differ between runs of the same inputs by design.
RUN_TIME_COLUMNS = {"run_id", "attempt", "started_at", "finished_at", "slices_per_s", "seconds", "config_json",
                    "config_sha256", "n_storage_retries"}
_ORDER = {"slices": ["sop_uid", "uri"], "studies": ["study_uid"], "errors": ["uri", "stage", "reason"]}


def committed_tables(out: str, run_id: str) -> dict[str, pd.DataFrame]:
    """``slices``, ``studies`` and ``errors`` of ``run_id`` as the views show them, sorted, minus the
    run-time columns."""
    from ichd_ray.io.results import query

    tables = {}
    for table, order in _ORDER.items():
        frame = query(out, f"SELECT * FROM {table} WHERE run_id = '{run_id}'")
        frame = frame.drop(columns=[c for c in frame.columns if c in RUN_TIME_COLUMNS])
        tables[table] = frame.sort_values(order).reset_index(drop=True)
    return tables


def run_row(out: str, run_id: str) -> dict:
    """The runs row of ``run_id`` (counts and status), minus the run-time columns."""
    from ichd_ray.io.results import query

    frame = query(out, f"SELECT * FROM runs WHERE run_id = '{run_id}'")
    assert len(frame) == 1, frame
    row = frame.iloc[0].to_dict()
    return {k: v for k, v in row.items() if k not in RUN_TIME_COLUMNS}


def assert_same_tables(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame]) -> None:
    """Equal tables: the same rows and columns, probabilities to 1e-6."""
    for table in want:
        assert list(got[table].columns) == list(want[table].columns), table
        assert len(got[table]) == len(want[table]), (table, len(got[table]), len(want[table]))
        pd.testing.assert_frame_equal(got[table], want[table], check_exact=False, rtol=0, atol=1e-6, obj=table)
