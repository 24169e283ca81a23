"""Stage 2: out-of-fold CNN embeddings, through the scoring job itself.

Fold k's CNN never saw fold k's studies, so its embeddings and logits of those studies are what the
sequence model will see at scoring time on new data. Each fold runs :func:`ichd_ray.pipeline.score.score_job`
(the same decode tasks and model actors as production scoring, ``write_embeddings`` on) with a
one-fold bundle holding CNN k, over a manifest of fold k's studies. Output per fold:
``WORK/embed/fold<k>-<key>/out/embeddings/...`` (study, SOP, slice index, z, float16 embedding, CNN
logits), committed like any scoring run, and skipped when a run finds it committed under the same key
(:func:`ichd_ray.training.keys.training_keys`: CNN k's key, the embedding fields, the manifest). The run
keeps Ray Data's order (``preserve_order``), so the CNN sees the same batches every time and the
embeddings are reproducible to the bit.
"""

from __future__ import annotations

import logging

import pandas as pd
import pyarrow.parquet as pq
import ray.data
import safetensors.torch

from ichd_ray.dicom.windowing import DEFAULT_NORMALIZATION, DEFAULT_WINDOWS
from ichd_ray.io import storage
from ichd_ray.io.tables import read_run, table_prefix
from ichd_ray.models.bundle import (
    BundleConfig,
    BundleError,
    load_bundle_config,
    save_bundle,
)
from ichd_ray.models.sequence import SequenceModel, sequence_config
from ichd_ray.models.slice_cnn import SliceCNN
from ichd_ray.pipeline.index import MANIFEST_SCHEMA, write_manifest
from ichd_ray.pipeline.score import score_job

__all__ = ["embed_fold", "embeddings_done", "embeddings_uri", "read_embeddings"]

logger = logging.getLogger(__name__)

RUN_ID = "oof"


def _fold_prefix(work_uri: str, fold: int, key: str) -> str:
    return storage.join(work_uri, "embed", f"fold{fold}-{key[:16]}")


def embeddings_uri(work_uri: str, fold: int, key: str) -> str:
    """The scoring output folder of fold ``fold``'s embedding run under ``key``."""
    return storage.join(_fold_prefix(work_uri, fold, key), "out")


def embeddings_done(work_uri: str, fold: int, key: str, storage_config: storage.StorageConfig | None = None) -> bool:
    """Whether fold ``fold``'s embeddings under ``key`` are committed (its bundle names the same key)."""

    run = read_run(embeddings_uri(work_uri, fold, key), RUN_ID, storage_config)
    if run is None or run["status"] != "succeeded":
        return False
    try:
        config, _ = load_bundle_config(storage.join(_fold_prefix(work_uri, fold, key), "bundle"), storage_config=storage_config)
    except (BundleError, FileNotFoundError):
        return False
    return dict(config.training).get("key") == key


def read_embeddings(out_uri: str, storage_config: storage.StorageConfig | None = None) -> pd.DataFrame:
    """The committed embeddings of an embedding run (only the attempt its runs object names)."""

    run = read_run(out_uri, RUN_ID, storage_config)
    if run is None:
        raise FileNotFoundError(f"{out_uri}: no committed embedding run {RUN_ID!r}")
    fs, path = storage.filesystem(table_prefix(out_uri, "embeddings", RUN_ID, run["attempt"]), storage_config)
    return pq.read_table(path, filesystem=fs, partitioning=None).to_pandas()


def embed_fold(
    training_set,
    fold: int,
    cfg,
    work_uri: str,
    cnn_weights_uri: str,
    *,
    key: str,
    storage_config: storage.StorageConfig | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Embed fold ``fold``'s studies with CNN ``fold`` (out-of-fold); returns the embeddings table.

    Args:
        training_set: :class:`ichd_ray.training.data.TrainingSet`.
        fold: Which fold (and which CNN).
        cfg: :class:`ichd_ray.config.train.TrainConfig` (its ``score`` section sizes the actor pool).
        work_uri: Work folder.
        cnn_weights_uri: CNN ``fold``'s safetensors weights.
        key: The embedding run's key (``training_keys(...)["embeddings"][fold].key``).
        storage_config: Driver storage settings.
        progress: Ray Data progress bars.
    """



    prefix = _fold_prefix(work_uri, fold, key)
    out_uri = embeddings_uri(work_uri, fold, key)
    if embeddings_done(work_uri, fold, key, storage_config):
        return read_embeddings(out_uri, storage_config)

    bundle_uri = storage.join(prefix, "bundle")
    cnn = SliceCNN(cfg.cnn.backbone, mean=DEFAULT_NORMALIZATION.mean, std=DEFAULT_NORMALIZATION.std)
    cnn.load_state_dict(safetensors.torch.load(storage.read_bytes(cnn_weights_uri, storage_config)), strict=True)
    config = BundleConfig(
        backbone=cfg.cnn.backbone,
        embed_dim=cnn.num_features,
        input_size=cfg.data.input_size,
        folds=1,
        windows=DEFAULT_WINDOWS,
        normalization=DEFAULT_NORMALIZATION,
        sequence=sequence_config(cfg.sequence),
        training={"state": "oof-embedding", "fold": fold, "key": key},
        version_id=f"oof-fold{fold}",
    )
    seq = SequenceModel.from_config(cnn.num_features, config.sequence)  # unused: only the CNN outputs matter here
    save_bundle(bundle_uri, config, [cnn], [seq], storage_config, overwrite=True)

    manifest = training_set.manifest
    rows = manifest[(manifest["fold"] == fold)][MANIFEST_SCHEMA.names]
    manifest_uri = storage.join(prefix, "manifest.parquet")
    write_manifest(rows, manifest_uri, storage_config)
    # In order: the model actors then see the same batches of studies (the same CNN chunks) every run,
    # and a chunk's composition can change a float's last bit.
    ctx = ray.data.DataContext.get_current()
    preserve_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        summary = score_job(
            None, bundle_uri, out_uri, job=cfg.job_config(), run_id=RUN_ID, manifest_uri=manifest_uri,
            progress=progress, storage_config=storage_config,
        )
    finally:
        ctx.execution_options.preserve_order = preserve_order
    if summary.n_rejected:
        logger.warning("embedding fold %d: %d slice(s) could not be embedded: %s", fold, summary.n_rejected, summary.reasons)
    return read_embeddings(out_uri, storage_config)
