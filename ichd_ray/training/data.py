"""Training data: the labelled, fold-assigned manifest, a decoded slice cache, and the Ray Data stages
that feed Ray Train (random study-then-slice sampling with augmentation; whole held-out studies).

Work layout (``WORK`` defaults to ``<bundle>-work``; every piece is reused when a run resumes)::
    WORK/train_manifest.parquet              index manifest + fold + y_<class> labels (written once)
    WORK/cache/<size>-<key>/<study>.u8       uint8 [T, 3, size, size] per study, slices in z order
    WORK/cache/<size>-<key>/index.parquet    the studies the cache holds (written last: it marks completion)

``<key>`` is the first 16 hex digits of the cache's key (:func:`cache_key`: size, windows, preprocessing
and the manifest's sha256): a cache made otherwise is never read.

Pixels are decoded and windowed once, into the cache, at the bundle's input size; every epoch then
reads single slices from it with one ranged read each (a 128-px slice is 48 KiB, a 512-px one 768 KiB)
instead of decoding DICOMs again. Nothing pixel-sized is ever shuffled.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from ichd_ray import CLASSES
from ichd_ray.training.keys import cache_fields, stage_key
from ichd_ray.evaluation.labels import labels_for, parse_labels
from ichd_ray.io import storage
from ichd_ray.models.bundle import DEFAULT_PREPROCESSING
from ichd_ray.pipeline.index import build_manifest, study_table, to_arrow
from ichd_ray.pipeline.decode import decode_memory, decode_studies
from ichd_ray.training.augment import AugmentConfig, augment_batch
from ichd_ray.training.folds import assign_folds, assignment_sha256

__all__ = [
    "TrainingSet",
    "prepare_training_set",
    "build_cache",
    "sample_slices",
    "sampler_inputs",
    "cache_key",
    "train_dataset",
    "held_out_batches",
    "load_training_set",
]

logger = logging.getLogger(__name__)

LABEL_COLUMNS = [f"y_{c}" for c in CLASSES]
MANIFEST_NAME = "train_manifest.parquet"


@dataclass
class TrainingSet:
    """The labelled studies of a training run.

    Attributes:
        manifest: Slice-level index manifest plus ``fold`` (-1 for rows not used) and ``y_<class>``.
        studies: One dict per study: study_uid, series_uid, fold, uris, sop_uids, positions,
            slice_indices, labels ([T][6] ints), in z order.
        manifest_sha256: sha256 of the written manifest object (recorded in the bundle).
        dropped: Human-readable reasons for studies left out (unlabelled slices).
    """

    manifest: pd.DataFrame
    studies: list[dict[str, Any]]
    manifest_sha256: str
    dropped: list[str]

    @property
    def folds(self) -> int:
        return int(self.manifest["fold"].max()) + 1

    @property
    def folds_sha256(self) -> str:
        """sha256 of the fold assignment (study -> fold), what every training stage is split by."""

        return assignment_sha256({s["study_uid"]: s["fold"] for s in self.studies})

    def studies_in(self, fold: int, held_out: bool) -> list[dict[str, Any]]:
        return [s for s in self.studies if (s["fold"] == fold) == held_out]


def _studies_from_manifest(manifest: pd.DataFrame) -> list[dict[str, Any]]:
    used = manifest[manifest["fold"] >= 0]
    labels = used.set_index("sop_uid")[LABEL_COLUMNS]
    folds = used.groupby("study_uid")["fold"].first()
    studies = study_table(used)
    for s in studies:
        s["fold"] = int(folds[s["study_uid"]])
        s["labels"] = labels.loc[s["sop_uids"]].to_numpy(dtype=np.int64).tolist()
    return studies


def prepare_training_set(
    data_uri: str,
    labels_uri: str,
    work_uri: str,
    *,
    folds: int,
    fold_seed: int,
    index_config,
    storage_config: storage.StorageConfig | None = None,
) -> TrainingSet:
    """Index the data, attach labels, assign folds by patient; written once to ``WORK``.

    A second call with the same ``work_uri`` reads the stored manifest back (the folds never move
    between stages or resumed runs); asking it for a different K or seed is an error.

    Raises:
        ValueError: No labelled study, or the stored manifest was made with other fold settings.
    """

    uri = storage.join(work_uri, MANIFEST_NAME)
    wanted = {"folds": folds, "fold_seed": fold_seed, "data_uri": data_uri, "labels_uri": labels_uri}
    if storage.exists(uri, storage_config):
        raw = storage.read_bytes(uri, storage_config)
        table = pq.read_table(pa.BufferReader(raw))
        stored = json.loads((table.schema.metadata or {}).get(b"ichd_ray", b"{}"))
        changed = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: stored {a!r}, asked {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{uri} was made with other settings ({detail}); use a new --work folder")
        return load_training_set(work_uri, storage_config)

    manifest = build_manifest(data_uri, index_config, storage_config)
    labels = parse_labels(storage.read_bytes(labels_uri, storage_config), name=labels_uri)
    selected = manifest["selected"].astype(bool).to_numpy()
    y = np.zeros((len(manifest), len(CLASSES)), dtype=np.int64)
    found = np.zeros(len(manifest), dtype=bool)
    if selected.any():
        y_sel, found_sel = labels_for(manifest.loc[selected, "sop_uid"].tolist(), labels)
        y[selected], found[selected] = y_sel, found_sel
    # A study with an unlabelled slice is left out whole: a gap would change its sequence.
    unlabelled = manifest.loc[selected & ~found, "study_uid"].unique()
    dropped = [f"study {s}: slices without labels in {labels_uri}" for s in unlabelled]
    usable = selected & ~manifest["study_uid"].isin(unlabelled).to_numpy()
    if not usable.any():
        raise ValueError(f"no labelled study: none of the selected slices under {data_uri} has a label in {labels_uri}")

    per_study = (
        pd.DataFrame({"study_uid": manifest["study_uid"], "patient_hash": manifest["patient_hash"], "any": y[:, -1]})[usable]
        .groupby("study_uid", as_index=False)
        .agg(patient_hash=("patient_hash", "first"), any=("any", "max"))
    )
    fold_of = assign_folds(per_study, folds, seed=fold_seed)
    manifest = manifest.copy()
    manifest["fold"] = np.where(usable, manifest["study_uid"].map(fold_of).fillna(-1), -1).astype(np.int64)
    for i, col in enumerate(LABEL_COLUMNS):
        manifest[col] = np.where(found, y[:, i], 0).astype(np.uint8)

    table = to_arrow(manifest)
    table = table.append_column("fold", pa.array(manifest["fold"].to_numpy(), pa.int64()))
    for col in LABEL_COLUMNS:
        table = table.append_column(col, pa.array(manifest[col].to_numpy(), pa.uint8()))
    meta = {**wanted, "dropped": json.dumps(dropped)}
    table = table.replace_schema_metadata({b"ichd_ray": json.dumps(meta).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    raw = sink.getvalue()
    storage.write_bytes(uri, raw, storage_config)
    manifest = table.to_pandas()
    return TrainingSet(manifest, _studies_from_manifest(manifest), _sha256(raw), dropped)


def load_training_set(work_uri: str, storage_config: storage.StorageConfig | None = None) -> TrainingSet:
    """The training set a CNN stage wrote to ``WORK`` (the sequence stage starts from it)."""
    uri = storage.join(work_uri, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(uri, storage_config)
    except FileNotFoundError:
        raise FileNotFoundError(f"no training manifest at {uri}: run `ichd-ray train cnn` (or `train all`) first") from None
    table = pq.read_table(pa.BufferReader(raw))
    stored = json.loads((table.schema.metadata or {}).get(b"ichd_ray", b"{}"))
    manifest = table.to_pandas()
    return TrainingSet(manifest, _studies_from_manifest(manifest), _sha256(raw), json.loads(stored.get("dropped", "[]")))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------- slice cache


def cache_key(training_set: TrainingSet, size: int, windows: list[dict]):
    """The cache's :class:`ichd_ray.training.keys.StageKey`: what it is decoded with, and from which manifest."""

    return stage_key("cache", cache_fields(size, windows), {"manifest_sha256": training_set.manifest_sha256})


def cache_prefix(work_uri: str, size: int, key: str) -> str:
    return storage.join(work_uri, "cache", f"{size}-{key[:16]}")


def cache_studies(batch: pa.Table, *, size: int, windows: list[dict], rsna_fix: bool, cache_uri: str,
                  storage_config: dict | None) -> pa.Table:
    """Decode a batch of studies (the scoring job's decode stage) and write each one's pixels to the cache."""

    decoded = decode_studies(batch, size=size, windows=windows, rsna_fix=rsna_fix, storage_config=storage_config)
    config = storage.StorageConfig.on_worker(storage_config)
    images = decoded.column("images")
    rows = decoded.drop_columns(["images"]).to_pylist()
    out = []
    for i, r in enumerate(rows):
        uri = storage.join(cache_uri, f"{r['study_uid']}.u8")
        if r["n_images"]:
            storage.write_bytes(uri, images[i].as_buffer(), config)
        out.append({"study_uid": r["study_uid"], "cache_uri": uri, "n": r["n_images"], "sop_uids": r["sop_uids"], "failures": r["failures"]})
    return pa.Table.from_pylist(out)


def build_cache(
    training_set: TrainingSet,
    work_uri: str,
    *,
    size: int,
    windows: list[dict],
    studies_per_task: int,
    cpus_per_task: float,
    storage_config: storage.StorageConfig | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Decode every training study once into ``WORK/cache/<size>-<key>/`` (Ray tasks); reused when a
    cache of the same key (:func:`cache_key`) is complete.

    Returns:
        (studies, failures): the training studies with ``cache_uri`` and only the slices that decoded
        (labels and positions filtered alike; a study with no slice left is dropped), and one
        ``{uri, stage, reason, message}`` per slice that failed.
    """


    key = cache_key(training_set, size, windows).key
    prefix = cache_prefix(work_uri, size, key)
    index_uri = storage.join(prefix, "index.parquet")
    stored = None
    if storage.exists(index_uri, storage_config):
        stored = pq.read_table(pa.BufferReader(storage.read_bytes(index_uri, storage_config)))
        if json.loads((stored.schema.metadata or {}).get(b"ichd_ray", b"{}")).get("key") != key:
            stored = None  # a prefix collision or a hand-copied folder: decode again
    if stored is not None:
        index = stored.to_pylist()
    else:
        items = [{k: s[k] for k in ("study_uid", "series_uid", "uris", "sop_uids", "positions", "slice_indices")} for s in training_set.studies]
        longest = max(len(s["uris"]) for s in items)
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / studies_per_task)))
        ds = ds.map_batches(
            cache_studies,
            batch_size=studies_per_task,
            batch_format="pyarrow",
            fn_kwargs={"size": size, "windows": windows, "rsna_fix": bool(DEFAULT_PREPROCESSING["rsna_fix"]), "cache_uri": prefix, "storage_config": storage_config.for_workers() if storage_config else None},
            num_cpus=cpus_per_task,
            memory=decode_memory(studies_per_task, longest, len(windows), size),
        )
        index = ds.take_all()
        sink = io.BytesIO()
        table = pa.Table.from_pylist(index)
        pq.write_table(table.replace_schema_metadata({b"ichd_ray": json.dumps({"key": key}).encode()}), sink)
        storage.write_bytes(index_uri, sink.getvalue(), storage_config)  # last: marks the cache complete
    by_study = {r["study_uid"]: r for r in index}
    studies, failures = [], []
    for s in training_set.studies:
        r = by_study[s["study_uid"]]
        failures += json.loads(r["failures"])
        decoded = set(r["sop_uids"])
        keep = [i for i, sop in enumerate(s["sop_uids"]) if sop in decoded]
        if not keep:
            continue
        studies.append(
            {
                **{k: s[k] for k in ("study_uid", "series_uid", "fold")},
                "cache_uri": r["cache_uri"],
                "n": len(keep),
                "sop_uids": [s["sop_uids"][i] for i in keep],
                "positions": [s["positions"][i] for i in keep],
                "slice_indices": [s["slice_indices"][i] for i in keep],
                "labels": [s["labels"][i] for i in keep],
            }
        )
    return studies, failures


# ------------------------------------------------------------------------------ Ray Data stages


def _read_slices(uris: list[str], indices: np.ndarray, slice_bytes: int, config) -> list[bytes]:
    def one(j: int) -> bytes:
        return storage.read_bytes(uris[j], config, offset=int(indices[j]) * slice_bytes, length=slice_bytes)

    if all(storage.parse_uri(u)[0] == "file" for u in uris):
        return [one(j) for j in range(len(uris))]
    with ThreadPoolExecutor(max_workers=16) as pool:  # S3: latency-bound GETs overlap
        return list(pool.map(one, range(len(uris))))


def sample_slices(
    batch: dict[str, np.ndarray],
    *,
    cache_uris: list[str],
    lengths: list[int],
    label_offsets: list[int],
    labels: np.ndarray,
    size: int,
    augment: dict,
    seed: list[int],
    samples_per_id: int = 1,
    storage_config: dict | None,
) -> dict[str, np.ndarray]:
    """``samples_per_id`` training samples per row id: a random study, then a random slice of it (1st
    place's sampler: every study weighs the same however many slices it has), read from the cache and
    augmented.

    Each id's draws (study, slice, augmentation) come from ``np.random.default_rng([*seed, id])`` and
    from nothing else, so an id gives the same samples however the rows are batched, which task runs
    them and in which order they arrive: with ``seed`` = (config seed, fold, epoch, rank) and one id
    per training step, a run is reproducible and every epoch still sees new samples.
    """

    config = AugmentConfig.from_dict(augment)
    ids = np.asarray(batch["id"], dtype=np.int64)
    n = len(ids) * samples_per_id
    slice_bytes = 3 * size * size
    storage_cfg = storage.StorageConfig.on_worker(storage_config)
    lengths_ = np.asarray(lengths)
    study = np.empty(n, np.int64)
    slice_idx = np.empty(n, np.int64)
    rngs = []
    for i, one in enumerate(ids):
        rng = np.random.default_rng([*(int(s) for s in seed), int(one)])
        part = slice(i * samples_per_id, (i + 1) * samples_per_id)
        study[part] = rng.integers(0, len(lengths), size=samples_per_id)
        slice_idx[part] = (rng.random(samples_per_id) * lengths_[study[part]]).astype(np.int64)
        rngs.append(rng)
    raw = _read_slices([cache_uris[i] for i in study], slice_idx, slice_bytes, storage_cfg)
    images = np.frombuffer(b"".join(raw), np.uint8).reshape(n, 3, size, size)
    images = np.concatenate(
        [augment_batch(images[i * samples_per_id : (i + 1) * samples_per_id], config, rng) for i, rng in enumerate(rngs)]
    ) if n else images.copy()
    y = labels[np.asarray(label_offsets)[study] + slice_idx].astype(np.float32)
    return {"image": images, "label": y}


def held_out_batches(studies: list[dict[str, Any]], *, size: int, storage_config: dict | None, max_slices: int = 128):
    """Whole held-out studies from the cache, in the order given, as batches of at most ``max_slices``
    slices (whole studies; a longer study is one batch): ``{"image": uint8 [n, 3, S, S], "label": float32
    [n, 6]}``. ``studies``: ``{cache_uri, n, labels}`` (labels: n x 6). Validation: no augmentation."""
    config = storage.StorageConfig.on_worker(storage_config)
    images, labels, n = [], [], 0
    for study in studies:
        count = int(study["n"])
        if images and n + count > max_slices:
            yield {"image": np.concatenate(images), "label": np.concatenate(labels)}
            images, labels, n = [], [], 0
        images.append(np.frombuffer(storage.read_bytes(str(study["cache_uri"]), config), np.uint8).reshape(count, 3, size, size))
        labels.append(np.asarray(study["labels"], dtype=np.float32).reshape(count, len(CLASSES)))
        n += count
    if images:
        yield {"image": np.concatenate(images), "label": np.concatenate(labels)}


def sampler_inputs(studies: list[dict[str, Any]]) -> dict[str, Any]:
    """What :func:`train_dataset` draws from: the studies' cache objects, lengths and labels."""
    lengths = [int(s["n"]) for s in studies]
    return {
        "cache_uris": [s["cache_uri"] for s in studies],
        "lengths": lengths,
        "label_offsets": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64).tolist(),
        "labels": np.concatenate([np.asarray(s["labels"], dtype=np.uint8) for s in studies]),
    }


def train_dataset(inputs: dict[str, Any], *, steps: int, batch_size: int, size: int, augment: dict, seed: list[int],
                  cpus_per_task: float, storage_config: dict | None):
    """``steps`` batches of ``batch_size`` random slices, in step order (one epoch of one worker).

    Row ``i`` is step ``i``; its samples depend only on ``seed`` and ``i`` (:func:`sample_slices`), and
    the dataset keeps its order (``preserve_order``, on this dataset's own context), so the batches and
    their order are the same on every run. ``inputs``: :func:`sampler_inputs`.
    """

    ds = ray.data.range(steps, override_num_blocks=max(1, steps))
    ds.context.execution_options.preserve_order = True  # a copy of the process's context: nothing else changes
    return ds.map_batches(
        sample_slices,
        batch_size=1,
        fn_kwargs={**inputs, "size": size, "augment": augment, "seed": list(seed), "samples_per_id": batch_size,
                   "storage_config": storage_config},
        num_cpus=cpus_per_task,
    )
