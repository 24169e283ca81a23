"""ichd_ray.pipeline.compact: a compaction folds committed nightly changes into one snapshot, drops the
tombstones, changes nothing a reader sees otherwise, and deletes superseded files one compaction later.
Committed runs are written by hand with the commit protocol's own functions (no Ray needed)."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pytest

from ichd_ray.io import storage
from ichd_ray.io.lease import LeaseHeld, acquire, release
from ichd_ray.io.results import query
from ichd_ray.io.tables import STUDY_INDEX_SCHEMA, commit_run, write_table
from ichd_ray.pipeline.compact import compact_index
from ichd_ray.pipeline.nightly import INDEX_SCHEMA

T0 = dt.datetime(2026, 12, 1, 2, 0, tzinfo=dt.timezone.utc)


def _row(uri: str, study: str | None, run_id: str, deleted: bool = False, etag: str = "e") -> dict:
    return {c: None for c in INDEX_SCHEMA.names} | {
        "uri": uri, "size": 10, "mtime": 1.0, "etag": etag, "study_uid": study, "series_uid": f"{study}.1",
        "sop_uid": f"{uri}.sop", "patient_hash": "h", "position": 0.0, "selected": study is not None and not deleted,
        "slice_index": 0 if study else None, "deleted": deleted, "run_id": run_id}


def _study(study: str, run_id: str, fingerprint: str | None, n: int, deleted: bool = False) -> dict:
    return {"run_id": run_id, "study_uid": study, "fingerprint": fingerprint, "n_objects": n, "n_selected": n, "deleted": deleted}


def _commit(out: str, run_id: str, hours: int, index: list[dict], studies: list[dict], status: str = "succeeded") -> None:
    """One nightly run as nightly() commits it: its index changes, study rows, scored and studies tables."""
    attempt = f"a-{run_id}"
    write_table(pa.Table.from_pylist(index, schema=INDEX_SCHEMA), out, "index", run_id, attempt)
    write_table(pa.Table.from_pylist(studies, schema=STUDY_INDEX_SCHEMA), out, "index_studies", run_id, attempt)
    write_table(pa.table({"run_id": [run_id], "model_version": ["v1"], "study_uid": ["s1"], "fingerprint": ["f"],
                          "reason": ["new"]}), out, "scored", run_id, attempt)
    for table in ("slices", "studies", "errors"):
        write_table(pa.table({"run_id": pa.array([], pa.string()), "study_uid": pa.array([], pa.string())}), out, table, run_id, attempt)
    commit_run(out, {"run_id": run_id, "attempt": attempt, "kind": "nightly", "status": status, "model_version": "v1",
                     "started_at": T0 + dt.timedelta(hours=hours), "finished_at": T0 + dt.timedelta(hours=hours, minutes=5),
                     "config_json": json.dumps({}), "problems": "[]"})


@pytest.fixture
def out(tmp_path):
    out = str(tmp_path / "out")
    # Night 1: three objects of two studies and a file of none.
    _commit(out, "n1", 1, [_row("a", "s1", "n1"), _row("b", "s1", "n1"), _row("c", "s2", "n1"), _row("z", None, "n1")],
            [_study("s1", "n1", "f1", 2), _study("s2", "n1", "f2", 1)])
    # Night 2: b replaced, c gone (s2 with it).
    _commit(out, "n2", 25, [_row("a", "s1", "n2"), _row("b", "s1", "n2", etag="e2"), _row("c", "s2", "n2", deleted=True)],
            [_study("s1", "n2", "f1b", 2), _study("s2", "n2", None, 0, deleted=True)])
    # Night 3 failed: what it saw does not count.
    _commit(out, "n3", 49, [_row("a", "s1", "n3", deleted=True)], [_study("s1", "n3", None, 0, deleted=True)], status="failed")
    return out


LIVE = "SELECT uri, etag, coalesce(study_uid, '-') AS study_uid, deleted FROM latest_index ORDER BY uri"


def test_the_views_overlay_each_nights_changes(out):
    rows = query(out, LIVE).values.tolist()
    assert rows == [["a", "e", "s1", False], ["b", "e2", "s1", False], ["c", "e", "s2", True], ["z", "e", "-", False]]
    studies = query(out, "SELECT study_uid, coalesce(fingerprint, '-'), deleted FROM latest_study_index ORDER BY study_uid").values.tolist()
    assert studies == [["s1", "f1b", False], ["s2", "-", True]]


def test_a_compaction_drops_tombstones_and_keeps_everything_else(out):
    before = query(out, LIVE)
    done = compact_index(out, now=T0 + dt.timedelta(days=3))
    assert (done.objects, done.studies, done.tombstones, done.runs_folded, done.files_deleted) == (3, 2, 1, 2, 0)
    after = query(out, LIVE)
    assert after.values.tolist() == before[~before["deleted"]].values.tolist()
    assert query(out, "SELECT kind, status FROM runs WHERE run_id = 'compaction-20261204T020000Z'").values.tolist() == [
        ["compaction", "succeeded"]]
    # the deleted study keeps its row, so its results stay hidden
    assert query(out, "SELECT deleted FROM latest_study_index WHERE study_uid = 's2'")["deleted"].tolist() == [True]
    # a night after it overlays the snapshot
    _commit(out, "n4", 100, [_row("d", "s1", "n4")], [_study("s1", "n4", "f1c", 3)])
    assert query(out, LIVE)["uri"].tolist() == ["a", "b", "d", "z"]
    # the next compaction deletes what the first one superseded (nights 1-3), keeps what it read
    second = compact_index(out, now=T0 + dt.timedelta(days=5))
    assert second.files_deleted == 6  # index + index_studies of n1, n2, n3
    left = {e.uri.split("/run_id=")[1].split("/")[0] for e in storage.list_files(f"{out}/index")}
    assert left == {"compaction-20261204T020000Z", "n4", "compaction-20261206T020000Z"}
    assert query(out, LIVE)["uri"].tolist() == ["a", "b", "d", "z"]


def test_a_compaction_waits_for_the_lease_and_needs_a_nightly_run(out, tmp_path):
    holder = acquire(storage.join(out, "_lease.json"), holder="other-host:1:nightly")
    with pytest.raises(LeaseHeld):
        compact_index(out)
    release(holder)
    assert query(out, "SELECT count(*) AS n FROM runs WHERE kind = 'compaction'")["n"].iloc[0] == 0
    empty = str(tmp_path / "empty")
    storage.write_bytes(storage.join(empty, "keep.txt"), b"x")
    with pytest.raises(ValueError, match="no succeeded nightly run to compact"):
        compact_index(empty)
