"""Result-table rows of a block of scored studies, and the Ray Data task that writes one part file.

Its own module, apart from :mod:`ichd_ray.pipeline.score`, because Ray ships these functions to the
write tasks by reference: a worker imports the module that defines them, and ``pipeline.score`` pulls in
torch and timm (the model actor's imports, ~5.4 s on this project's 2-core VM) where these need
pyarrow only (bench/score.py: 7-12 s of every ``score_job`` call went to that before the move).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ichd_ray import CLASSES
from ichd_ray.io import storage
from ichd_ray.io.tables import EMBEDDINGS_SCHEMA, SLICES_SCHEMA, STUDIES_SCHEMA, table_prefix, write_table

__all__ = ["slices_rows", "studies_rows", "embeddings_rows", "write_part"]


def slices_rows(batch: pa.Table, *, run_id: str, model_version: str) -> pa.Table:
    out: dict[str, list] = {name: [] for name in SLICES_SCHEMA.names}
    for r in batch.to_pylist():
        probs = np.asarray(r["slice_probs"], np.float32).reshape(-1, len(CLASSES))
        for j, uri in enumerate(r["uris"]):
            out["run_id"].append(run_id)
            out["model_version"].append(model_version)
            out["study_uid"].append(r["study_uid"])
            out["series_uid"].append(r["series_uid"])
            out["sop_uid"].append(r["sop_uids"][j])
            out["uri"].append(uri)
            out["slice_index"].append(r["slice_indices"][j])
            out["position_z"].append(r["positions"][j])
            for c, name in enumerate(CLASSES):
                out[f"p_{name}"].append(float(probs[j, c]))
    return pa.Table.from_pydict(out, schema=SLICES_SCHEMA)


def studies_rows(batch: pa.Table, *, run_id: str, model_version: str, thresholds: list[float]) -> pa.Table:
    out: dict[str, list] = {name: [] for name in STUDIES_SCHEMA.names}
    for r in batch.to_pylist():
        if not r["uris"]:
            continue
        out["run_id"].append(run_id)
        out["model_version"].append(model_version)
        out["study_uid"].append(r["study_uid"])
        out["series_uid"].append(r["series_uid"])
        out["n_slices"].append(len(r["uris"]))
        out["n_slices_rejected"].append(len(json.loads(r["failures"])))
        for c, name in enumerate(CLASSES):
            out[f"p_{name}"].append(r["study_probs"][c])
        out["flagged"].append(any(p >= t for p, t in zip(r["study_probs"], thresholds)))
    return pa.Table.from_pydict(out, schema=STUDIES_SCHEMA)


def embeddings_rows(batch: pa.Table, *, run_id: str, model_version: str) -> pa.Table:
    out: dict[str, list] = {name: [] for name in EMBEDDINGS_SCHEMA.names}
    for r in batch.to_pylist():
        if not r["embed_dim"]:
            continue
        emb = np.asarray(r["embeddings"], np.float16).reshape(len(r["uris"]), r["embed_dim"])
        logits = np.asarray(r["cnn_logits"], np.float32).reshape(len(r["uris"]), len(CLASSES))
        for j in range(len(r["uris"])):
            out["run_id"].append(run_id)
            out["model_version"].append(model_version)
            out["study_uid"].append(r["study_uid"])
            out["sop_uid"].append(r["sop_uids"][j])
            out["slice_index"].append(r["slice_indices"][j])
            out["position_z"].append(r["positions"][j])
            out["embedding"].append(emb[j].tolist())
            out["cnn_logits"].append(logits[j].tolist())
    return pa.Table.from_pydict(out, schema=EMBEDDINGS_SCHEMA)


def write_part(
    batch: pa.Table,
    *,
    build: Callable[..., pa.Table],
    build_kwargs: dict[str, Any],
    out_uri: str,
    table: str,
    run_id: str,
    attempt: str,
    storage_config: dict | None,
) -> pa.Table:
    """Build one table's rows for a block of scored studies and write them as one part file, through
    :mod:`ichd_ray.io.storage` (so its bounded S3 retries are counted). The part is named by the studies it
    holds: a task Ray retries after its write rewrites the same object, never a second copy."""
    rows = build(batch, **build_kwargs)
    before = storage.retry_count()
    if rows.num_rows:
        studies = "\n".join(sorted(set(batch.column("study_uid").to_pylist())))
        part = "part-" + hashlib.sha256(studies.encode()).hexdigest()[:16]
        try:
            write_table(rows, out_uri, table, run_id, attempt, part=part, storage_config=storage.StorageConfig.on_worker(storage_config))
        except OSError as exc:
            if exc.errno is None:
                raise
            # Ray Data rewrites an OSError's filename with its retry note on the way to the driver:
            # the URI travels in the message instead.
            raise type(exc)(exc.errno, f"{exc.strerror}: {exc.filename or table_prefix(out_uri, table, run_id, attempt)}") from None
    return pa.table({"rows": pa.array([rows.num_rows], pa.int64()), "storage_retries": pa.array([storage.retry_count() - before], pa.int64())})
