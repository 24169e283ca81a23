"""The decode stage: a batch of studies (object URIs in z order) -> uint8 [T, C, S, S] pixels per study.

One function for every caller that turns DICOM objects into network input: scoring and the out-of-fold
embeddings (``map_batches(decode_studies)`` before the model actors) and the training cache
(:func:`ichd_ray.training.data.cache_studies`). Runs in Ray Data CPU tasks; pure Python + numpy + pyarrow,
testable without Ray. A slice that cannot be read or decoded is left out of its study and reported, never
guessed; a store that stopped answering stops the run (it is not the object's fault).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from ichd_ray.dicom.preprocess import preprocess_slice
from ichd_ray.dicom.read import DicomError
from ichd_ray.dicom.windowing import windows_from_config
from ichd_ray.io import storage

__all__ = ["STUDY_FIELDS", "DECODED_SCHEMA", "DECODE_BASE_MEMORY", "decode_memory", "decode_studies"]

# What travels with a study through both stages: slices in z order, minus any that failed.
STUDY_FIELDS = [
    ("study_uid", pa.string()),
    ("series_uid", pa.string()),
    ("uris", pa.list_(pa.string())),
    ("sop_uids", pa.list_(pa.string())),
    ("positions", pa.list_(pa.float64())),
    ("slice_indices", pa.list_(pa.int32())),
]
#: Batch a decode task hands to the scoring actors: one row per study, its pixels in ``images``.
DECODED_SCHEMA = pa.schema(
    STUDY_FIELDS
    + [("n_images", pa.int32()), ("images", pa.large_binary()), ("failures", pa.string()), ("storage_retries", pa.int64())]
)

#: Memory a decode task needs beside its pixel buffer: pydicom's parse and one full-size decoded slice
#: (measured peak 127-155 MiB per task with 256-512 px DICOMs; Ray Data warned at the bare buffer size).
DECODE_BASE_MEMORY = 192 * 1024 * 1024


def decode_memory(studies_per_task: int, longest_study: int, channels: int, size: int) -> int:
    """Bytes to ask Ray for per decode task: the batch's pixel buffer and the block Ray copies from it."""
    return DECODE_BASE_MEMORY + 2 * studies_per_task * longest_study * channels * size * size


def decode_studies(
    batch: pa.Table, *, size: int, windows: list[dict], rsna_fix: bool, storage_config: dict | None
) -> pa.Table:
    """Read + decode + window every slice of each study to uint8 [T, 3, size, size], preprocessed as
    the bundle says (``rsna_fix``; the area resize is the only resize there is).

    A slice that cannot be read or decoded is left out of its study and reported in ``failures``
    (JSON list of {uri, stage, reason, message}); the rest of the study goes on.
    """
    specs = windows_from_config(windows)
    config = storage.StorageConfig.on_worker(storage_config)
    rows = batch.to_pylist()
    # One buffer for every slice of the batch, filled in place and handed to Arrow without a copy
    # (stacking, .tobytes() and from_pydict each copied every study's pixels: ~24% of a core).
    slice_bytes = len(specs) * size * size
    pixels = np.empty((sum(len(r["uris"]) for r in rows), len(specs), size, size), dtype=np.uint8)
    offsets = [0]
    filled = 0
    retries_before = storage.retry_count()
    out: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names if name != "images"}
    for row in rows:
        keep, failures = [], []
        for i, uri in enumerate(row["uris"]):
            try:
                data = storage.read_bytes(uri, config)
                preprocess_slice(data, size, windows=specs, name=uri, rsna_fix=rsna_fix, out=pixels[filled])
                filled += 1
                keep.append(i)
            except DicomError as exc:
                failures.append({"uri": uri, "stage": "decode", "reason": exc.reason, "message": exc.message})
            except storage.StorageUnavailable:
                raise  # the store, not this object: stop the run uncommitted rather than reject good slices
            except OSError as exc:
                failures.append({"uri": uri, "stage": "read", "reason": "read_error", "message": f"{type(exc).__name__}: {exc}"})
            except Exception as exc:  # a decoder bug must not take the study down
                failures.append({"uri": uri, "stage": "decode", "reason": "decode_error", "message": f"{type(exc).__name__}: {exc}"})
        offsets.append(filled * slice_bytes)
        out["study_uid"].append(row["study_uid"])
        out["series_uid"].append(row["series_uid"])
        for key in ("uris", "sop_uids", "positions", "slice_indices"):
            out[key].append([row[key][i] for i in keep])
        out["n_images"].append(len(keep))
        out["failures"].append(json.dumps(failures))
        out["storage_retries"].append(0)
    if rows:
        out["storage_retries"][0] = storage.retry_count() - retries_before
    images = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(),
        len(rows),
        [None, pa.py_buffer(np.asarray(offsets, dtype=np.int64)), pa.py_buffer(pixels[:filled].reshape(-1))],
    )
    columns = {name: pa.array(values, type=DECODED_SCHEMA.field(name).type) for name, values in out.items()}
    columns["images"] = images
    return pa.Table.from_pydict({name: columns[name] for name in DECODED_SCHEMA.names}, schema=DECODED_SCHEMA)
