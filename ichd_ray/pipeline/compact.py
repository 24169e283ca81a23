"""``ichd-ray compact OUT``: fold the nightly index's per-night changes into one snapshot.

A nightly run commits only what changed (:func:`ichd_ray.pipeline.incremental.plan_night`), so the
``latest_index`` view overlays more small change sets each night. A compaction is a run of its own
(``kind = 'compaction'``) under OUT's lease and the commit protocol: it writes the archive as the views
see it now (live objects only: tombstones expire here) and every study's latest row, then commits its
runs object; from that moment the views start from it. Until the commit readers see the old state,
after it the new one, and never a mix. The files it supersedes are deleted one compaction later, so a
query that listed them just before the commit can still read them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass

from ichd_ray import __version__
from ichd_ray.io import storage
from ichd_ray.io.lease import DEFAULT_TTL, LeaseKeeper, lease_uri
from ichd_ray.io.results import connect
from ichd_ray.io.tables import STUDY_INDEX_SCHEMA, commit_run, new_attempt_id, overlay_runs, table_prefix, write_table

__all__ = ["Compaction", "compact_index"]

logger = logging.getLogger(__name__)


@dataclass
class Compaction:
    """What :func:`compact_index` did.

    Attributes:
        run_id: The compaction's run id (``compaction-<UTC time>``).
        objects: Live objects in the snapshot.
        studies: Study rows in the snapshot (deleted studies included: they keep hiding their results).
        tombstones: Deleted-object rows dropped.
        runs_folded: Nightly runs whose changes the snapshot replaces.
        files_deleted: Objects of runs superseded by the compaction before this one, deleted.
    """

    run_id: str
    objects: int
    studies: int
    tombstones: int
    runs_folded: int
    files_deleted: int


def compact_index(
    out_uri: str,
    *,
    storage_config: storage.StorageConfig | None = None,
    lease_ttl: dt.timedelta | None = None,
    now: dt.datetime | None = None,
) -> Compaction:
    """Write the current index as one snapshot and commit it (see the module docstring).

    Args:
        out_uri: OUT of nightly runs.
        storage_config: S3 settings; None: from the environment.
        lease_ttl: The lease's time to live (None: :data:`ichd_ray.io.lease.DEFAULT_TTL`).
        now: The run id's time (tests).

    Raises:
        ichd_ray.io.lease.LeaseHeld: Another run is writing OUT.
        ValueError: OUT holds no succeeded nightly run.
    """
    started = dt.datetime.now(dt.timezone.utc)
    run_id = f"compaction-{(now or started):%Y%m%dT%H%M%SZ}"
    with LeaseKeeper(lease_uri(out_uri), ttl=lease_ttl or DEFAULT_TTL, storage_config=storage_config) as keeper:
        if not storage.list_files(storage.join(out_uri, "runs"), suffix=".parquet", config=storage_config):
            raise ValueError(f"{out_uri}: no succeeded nightly run to compact (no runs at all)")
        con = connect(out_uri, storage_config)
        tables = set(con.sql("SELECT table_name FROM information_schema.tables").to_arrow_table().column(0).to_pylist())
        runs = con.sql("SELECT run_id, attempt, kind, status, finished_at FROM runs").to_arrow_table().to_pylist()
        state = overlay_runs(runs)
        if "latest_index" not in tables or not state:
            raise ValueError(f"{out_uri}: no succeeded nightly run to compact")
        index = con.sql("SELECT * FROM latest_index WHERE NOT deleted ORDER BY uri").to_arrow_table()
        tombstones = con.execute("SELECT count(*) FROM latest_index WHERE deleted").fetchall()[0][0]
        studies = con.sql("SELECT * FROM latest_study_index ORDER BY study_uid").to_arrow_table().cast(STUDY_INDEX_SCHEMA)
        attempt = new_attempt_id()
        write_table(index, out_uri, "index", run_id, attempt, storage_config=storage_config)
        write_table(studies, out_uri, "index_studies", run_id, attempt, storage_config=storage_config)
        keeper.check()  # a lost lease stops here, uncommitted: another run owns OUT now
        commit_run(out_uri, {
            "run_id": run_id, "attempt": attempt, "code_version": __version__, "config_json": json.dumps({}),
            "started_at": started, "finished_at": dt.datetime.now(dt.timezone.utc), "status": "succeeded",
            "n_inputs": 0, "n_slices_scored": 0, "n_rejected": 0, "n_faults": 0, "n_selected_out": 0,
            "n_skipped": 0, "n_studies": 0, "n_storage_retries": 0, "slices_per_s": 0.0, "kind": "compaction",
            "problems": json.dumps([]),
        }, storage_config)
        deleted = _delete_superseded(out_uri, runs, storage_config)
    logger.info("compaction %s: %d objects, %d studies, %d tombstones dropped, %d runs folded, %d files deleted",
                run_id, index.num_rows, studies.num_rows, tombstones, len(state), deleted)
    return Compaction(run_id, index.num_rows, studies.num_rows, tombstones, len(state), deleted)


def _delete_superseded(out_uri: str, runs: list[dict], storage_config) -> int:
    """Index files of the runs that finished before the *previous* compaction (failed ones too): two
    snapshots old, no reader can still need them. The runs rows stay, so history keeps its record."""
    bases = [r["finished_at"] for r in runs if r.get("kind") == "compaction" and r.get("status") == "succeeded"]
    if not bases:
        return 0
    old = {r["run_id"] for r in runs if r.get("kind") in ("nightly", "compaction") and r["finished_at"] < max(bases)}
    deleted = 0
    for run_id in sorted(old):
        for table in ("index", "index_studies"):
            deleted += storage.delete_prefix(table_prefix(out_uri, table, run_id), storage_config)
    return deleted
