"""The index stage: list objects, read headers only (in parallel on Ray), select one series per study.

One row per object: where it is (uri, size, mtime, etag), what it is (UIDs, hashed PatientID, position
along the slice normal, geometry, transfer syntax) and, when it cannot be scored, why (``reason``,
``message``). Grouping by study happens on this small table, never on pixels.

Series selection per study (pure function :func:`select_series`, documented rule):

1. only accepted CT images take part (localizers, derived images, other modalities were rejected by
   the header checks); a SOPInstanceUID seen twice keeps its first object (by URI) and the others get
   ``duplicate``;
2. a series whose slice normal is more than 35 degrees off the head's z axis is not axial:
   ``other_series``;
3. among the remaining series of a study, the one whose median SliceThickness is nearest
   ``preferred_thickness_mm`` (default 5 mm, the RSNA reconstructions) wins, then the one with most
   slices, then the lowest SeriesInstanceUID; the other series' objects get ``other_series``;
4. the chosen series is ordered by position along the slice normal (ties: InstanceNumber, then
   SOPInstanceUID) and numbered ``slice_index`` 0 = lowest position. Never by InstanceNumber or file
   name: a slice without ImagePositionPatient is rejected by the reader (``bad_header``).
"""

from __future__ import annotations

from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ichd_ray.config.job import IndexConfig
from ichd_ray.dicom.read import DicomError, IncompleteHeader, read_header, slice_normal
from ichd_ray.io import storage
from ichd_ray.pipeline import incremental
from ichd_ray.pipeline.incremental import LISTING_SCHEMA
from ichd_ray.pipeline.listing import list_archive

__all__ = [
    "MANIFEST_SCHEMA",
    "EmptyInput",
    "list_inputs",
    "list_inputs_table",
    "read_headers",
    "read_headers_on_ray",
    "excluded_rows",
    "is_excluded",
    "select_series",
    "build_manifest",
    "write_manifest",
    "read_manifest",
    "study_table",
]

MANIFEST_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.float64()),
        ("etag", pa.string()),
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        ("sop_uid", pa.string()),
        ("patient_hash", pa.string()),
        ("position", pa.float64()),
        ("instance_number", pa.int64()),
        ("rows", pa.int32()),
        ("cols", pa.int32()),
        ("pixel_spacing", pa.float64()),
        ("slice_thickness", pa.float64()),
        ("normal_z", pa.float64()),
        ("image_type", pa.string()),
        ("transfer_syntax", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("selected", pa.bool_()),
        ("slice_index", pa.int32()),
    ]
)


class EmptyInput(ValueError):
    """The input lists no objects: refused before anything is written."""


def list_inputs(
    input_uri: str, config: IndexConfig, storage_config: storage.StorageConfig | None = None
) -> list[storage.FileEntry]:
    """Every object under a prefix (or the URIs named in a manifest file: ``.txt`` one per line, or
    ``.parquet`` with a ``uri`` column). Side files are listed too: :func:`read_headers_on_ray` gives
    them the reason ``excluded``, so every listed object is accounted for."""
    if input_uri.endswith((".txt", ".parquet")) and storage.exists(input_uri, storage_config) and not input_uri.endswith("/"):
        uris = _uris_from_manifest(input_uri, storage_config)
        if not uris:
            raise EmptyInput(f"{input_uri} names no objects: nothing to index")
        return [_entry_of(uri, storage_config) for uri in uris]
    entries = storage.list_files(input_uri, config=storage_config)
    if not entries:
        # A mistyped prefix, or credentials that cannot list it: scoring "nothing" would commit an empty
        # succeeded run, and a nightly would mark every study of the archive deleted.
        raise EmptyInput(f"no objects under {input_uri}: check the prefix (and that these credentials can list it)")
    return entries


def list_inputs_table(
    input_uri: str, config: IndexConfig, storage_config: storage.StorageConfig | None = None
) -> pa.Table:
    """:func:`list_inputs` as a :data:`ichd_ray.pipeline.incremental.LISTING_SCHEMA` table; a prefix is
    listed in parallel over its key prefixes (:func:`ichd_ray.pipeline.listing.list_archive`), with the
    same refusal of an empty listing."""
    if input_uri.endswith((".txt", ".parquet")) and not input_uri.endswith("/") and storage.exists(input_uri, storage_config):
        entries = list_inputs(input_uri, config, storage_config)  # a file naming the objects
        return pa.Table.from_pylist([{"uri": e.uri, "size": e.size, "mtime": e.mtime, "etag": e.etag} for e in entries],
                                    schema=LISTING_SCHEMA)
    table = list_archive(input_uri, storage_config)
    if table.num_rows == 0:  # an empty listing would mark every object of the archive deleted
        raise EmptyInput(f"no objects under {input_uri}: check the prefix (and that these credentials can list it)")
    return table


def is_excluded(uri: str, exclude_suffixes) -> bool:
    """A side file by suffix (labels, notes, manifests): listed and counted, never read."""
    return uri.lower().endswith(tuple(s.lower() for s in exclude_suffixes))


def _uris_from_manifest(uri: str, storage_config) -> list[str]:
    if uri.endswith(".parquet"):
        fs, path = storage.filesystem(uri, storage_config)
        return [u for u in pq.read_table(path, filesystem=fs, columns=["uri"]).column("uri").to_pylist() if u]
    text = storage.read_bytes(uri, storage_config).decode("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _entry_of(uri: str, storage_config) -> storage.FileEntry:
    found = storage.list_files(uri, config=storage_config)
    match = [e for e in found if e.uri == uri]
    if match:
        return match[0]
    return storage.FileEntry(uri=uri, size=-1, mtime=None, etag=None)  # read fails later: read_error


def _header_row(entry: dict[str, Any], header_bytes: int, storage_config) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in MANIFEST_SCHEMA.names}
    row.update(uri=entry["uri"], size=entry["size"], mtime=entry["mtime"], etag=entry["etag"], selected=False)
    # PatientID is hashed here, where it is read, with this node's ICHD_PATIENT_SALT (a pod secret):
    # the salt never travels in a task definition.
    try:
        if entry["size"] == 0:
            meta = read_header(b"", name=entry["uri"])
        else:
            data = storage.read_bytes(entry["uri"], storage_config, length=header_bytes)
            size = entry["size"] if entry["size"] and entry["size"] > 0 else None
            try:
                meta = read_header(data, name=entry["uri"], total_size=size)
            except IncompleteHeader:  # a long header (big private tags): read the whole object
                meta = read_header(storage.read_bytes(entry["uri"], storage_config), name=entry["uri"])
    except DicomError as exc:
        row.update(reason=exc.reason, message=exc.message)
        return row
    except storage.StorageUnavailable:
        raise  # the store, not this object: the run stops uncommitted
    except OSError as exc:
        row.update(reason="read_error", message=f"{type(exc).__name__}: {exc}")
        return row
    except Exception as exc:  # never let one object stop the index
        row.update(reason="internal_error", message=f"{type(exc).__name__}: {exc}")
        return row
    normal = slice_normal(meta.image_orientation)
    normal_z = abs(normal[2]) if normal is not None else None
    row.update(
        study_uid=meta.study_uid,
        series_uid=meta.series_uid,
        sop_uid=meta.sop_uid,
        patient_hash=meta.patient_hash,
        position=meta.position,
        instance_number=meta.instance_number,
        rows=meta.rows,
        cols=meta.cols,
        pixel_spacing=meta.pixel_spacing[0] if meta.pixel_spacing else None,
        slice_thickness=meta.slice_thickness,
        normal_z=normal_z,
        image_type="\\".join(meta.image_type),
        transfer_syntax=meta.transfer_syntax,
    )
    return row


def read_headers(entries: Iterable[dict[str, Any]], header_bytes: int, storage_config=None) -> pd.DataFrame:
    """Header rows for a batch of listing entries (``uri``, ``size``, ``mtime``, ``etag``)."""
    rows = [_header_row(e, header_bytes, storage_config) for e in entries]
    return pd.DataFrame(rows, columns=MANIFEST_SCHEMA.names)


def excluded_rows(entries: Iterable[dict[str, Any]], exclude_suffixes) -> pd.DataFrame:
    """Manifest rows of side files: reason ``excluded`` (a skip, see :mod:`ichd_ray.reasons`)."""
    rows = []
    for e in entries:
        suffix = next(x for x in exclude_suffixes if e["uri"].lower().endswith(x.lower()))
        rows.append(
            {name: None for name in MANIFEST_SCHEMA.names}
            | {"uri": e["uri"], "size": e["size"], "mtime": e["mtime"], "etag": e["etag"], "selected": False}
            | {"reason": "excluded", "message": f"side file: suffix {suffix} is in index.exclude_suffixes"}
        )
    return pd.DataFrame(rows, columns=MANIFEST_SCHEMA.names)


def _read_header_chunk(chunk: list[dict[str, Any]], header_bytes: int, storage_config: dict | None) -> tuple[pd.DataFrame, int]:
    before = storage.retry_count()
    rows = read_headers(chunk, header_bytes, storage.StorageConfig.on_worker(storage_config))
    return rows, storage.retry_count() - before


def read_headers_on_ray(
    entries: list[dict[str, Any]], config: IndexConfig, storage_config: storage.StorageConfig | None = None
) -> pd.DataFrame:
    """Header rows for listing entries: side files by suffix on the driver (never read), the rest in
    Ray tasks of ``files_per_task`` objects. Task arguments carry no secret: storage settings without
    credentials, and no salt."""

    side = [e for e in entries if is_excluded(e["uri"], config.exclude_suffixes)]
    todo = [e for e in entries if not is_excluded(e["uri"], config.exclude_suffixes)]
    frames = [excluded_rows(side, config.exclude_suffixes)] if side else []
    if todo:
        task = ray.remote(num_cpus=0.5, max_retries=3)(_read_header_chunk)
        cfg_dict = storage_config.for_workers() if storage_config else None
        chunks = [todo[i : i + config.files_per_task] for i in range(0, len(todo), config.files_per_task)]
        try:
            results = ray.get([task.remote(chunk, config.header_bytes, cfg_dict) for chunk in chunks])
        except ray.exceptions.RayTaskError as exc:
            failure = storage.task_storage_error(exc)
            if failure is None:
                raise
            raise failure from None
        frames += [rows for rows, _ in results]
        retries = sum(n for _, n in results)
    else:
        retries = 0
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=MANIFEST_SCHEMA.names)
    out.attrs["storage_retries"] = retries  # S3 retries the tasks spent, for the run's count
    return out


def select_series(headers: pd.DataFrame, preferred_thickness_mm: float = 5.0) -> pd.DataFrame:
    """Apply the series rule (module docstring); returns the table with ``reason``, ``message``,
    ``selected`` and ``slice_index`` filled in, in URI order. Pure: no I/O. The rule itself is one SQL
    statement (:func:`ichd_ray.pipeline.incremental.select_series`), the same the nightly index runs."""
    return incremental.select_series(to_arrow(headers), preferred_thickness_mm).to_pandas()


def build_manifest(
    input_uri: str,
    config: IndexConfig,
    storage_config: storage.StorageConfig | None = None,
) -> pd.DataFrame:
    """List, read headers on Ray (``files_per_task`` objects per task) and select series."""
    entries = list_inputs(input_uri, config, storage_config)
    items = [{"uri": e.uri, "size": e.size, "mtime": e.mtime, "etag": e.etag} for e in entries]
    headers = read_headers_on_ray(items, config, storage_config)
    manifest = select_series(headers, config.preferred_thickness_mm)
    manifest.attrs["storage_retries"] = headers.attrs["storage_retries"]
    return manifest


def to_arrow(manifest: pd.DataFrame | pa.Table) -> pa.Table:
    """The manifest's columns as an Arrow table of :data:`MANIFEST_SCHEMA`."""
    if isinstance(manifest, pa.Table):
        return manifest.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    if "selected" not in manifest.columns:  # headers before the series rule
        manifest = manifest.assign(selected=False, slice_index=None)
    return pa.Table.from_pandas(manifest[MANIFEST_SCHEMA.names], schema=MANIFEST_SCHEMA, preserve_index=False)


def write_manifest(manifest: pd.DataFrame | pa.Table, uri: str, storage_config=None) -> None:
    """One Parquet object (written whole, so readers never see a partial manifest)."""

    sink = pa.BufferOutputStream()
    pq.write_table(to_arrow(manifest), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), storage_config)


def read_manifest(uri: str, storage_config=None) -> pd.DataFrame:
    table = pq.read_table(pa.BufferReader(storage.read_bytes(uri, storage_config)))
    missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{uri}: not an ichd-ray manifest (missing columns {sorted(missing)})")
    return table.to_pandas()


def study_table(manifest: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per selected study: its slice URIs, SOP UIDs and positions in z order."""
    selected = manifest[manifest["selected"].astype(bool)].sort_values(["study_uid", "slice_index"])
    studies = []
    for (study_uid, series_uid), group in selected.groupby(["study_uid", "series_uid"], sort=True):
        positions = group["position"].astype(float)
        if positions.isna().any():  # never invent a spacing: a manifest like this was not made by this code
            raise ValueError(f"study {study_uid}: a selected slice has no position (not an ichd-ray manifest?)")
        studies.append(
            {
                "study_uid": study_uid,
                "series_uid": series_uid,
                "uris": group["uri"].tolist(),
                "sop_uids": group["sop_uid"].tolist(),
                "positions": positions.tolist(),
                "slice_indices": group["slice_index"].astype(int).tolist(),
            }
        )
    return studies
