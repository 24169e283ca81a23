"""The training workflow: folds -> CNN per fold -> out-of-fold embeddings -> sequence model per fold ->
bundle, with out-of-fold metrics against a prior-only baseline.

``ichd-ray train all`` runs :func:`train_all`; ``train cnn`` and ``train sequence`` run its two halves.
Every stage writes its result under ``WORK`` and skips work it finds done, so re-running the same
command after a crash resumes where it stopped: the manifest and folds are read back, cached studies
are not decoded again, a finished fold is not retrained, and a fold in progress resumes from its last
Ray Train checkpoint (same ``RunConfig(name, storage_path)``).

"Done" means done *for this config*: every artifact (cache, CNN k, embeddings k, sequence model k) is
named by its key (:func:`ichd_ray.training.keys.training_keys`: the config fields its stage reads and
its inputs' keys), so a changed ``cnn.lr`` retrains the CNNs, the embeddings and the sequence models
and keeps the cache, and a changed ``sequence.lr`` retrains the sequence models only. Artifacts of
other keys are left in place (switching a field back reuses them; delete them to reclaim space). The
bundle's ``training`` block records per fold each stage's key, config hash and weights' sha256.

Every random draw is seeded from the config (``cnn.seed``, ``sequence.seed``, fold, epoch, rank), so
the same config, data and CPU machine give the same weights and out-of-fold metrics.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import pandas as pd
import safetensors.torch

from ichd_ray import CLASSES, __version__
from ichd_ray.training.keys import training_keys
from ichd_ray.dicom.windowing import DEFAULT_NORMALIZATION, DEFAULT_WINDOWS
from ichd_ray.io import storage
from ichd_ray.models.bundle import BundleConfig, save_bundle
from ichd_ray.models.sequence import SequenceModel, sequence_config
from ichd_ray.models.slice_cnn import SliceCNN
from ichd_ray.training.cnn import cnn_weights_uri, finished_fold, train_cnn_fold
from ichd_ray.training.data import build_cache, cache_prefix, load_training_set, prepare_training_set
from ichd_ray.training.embed import embed_fold, embeddings_done, embeddings_uri
from ichd_ray.training.oof import format_metrics, out_of_fold_metrics
from ichd_ray.training.sequence import sequence_rows, train_sequence_fold

__all__ = ["TrainResult", "default_work_uri", "train_cnn_stage", "train_sequence_stage", "train_all", "format_metrics"]


def default_work_uri(out_uri: str) -> str:
    """``<bundle>-work``: beside the bundle, never inside it (the cache is far bigger than the weights)."""
    return out_uri.rstrip("/") + "-work"


@dataclass
class TrainResult:
    """What a training run made. ``stages``: per stage what ran and what was reused, by key:
    ``{"cache": {"key", "reused"}, "cnn" | "embeddings" | "sequence": [{"fold", "key", "reused"}, ...]}``."""

    bundle_uri: str
    version_id: str
    metrics: dict[str, Any]
    table: str
    seconds: float
    stages: dict[str, Any] = field(default_factory=dict)


def train_all(
    data_uri: str,
    labels_uri: str,
    out_uri: str,
    cfg,
    *,
    work_uri: str | None = None,
    storage_config: storage.StorageConfig | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
    overwrite: bool = False,
    recipe: dict | None = None,
) -> TrainResult:
    """Folds -> CNN -> embeddings -> sequence -> bundle at ``out_uri`` (Ray must be initialised).

    Args:
        recipe: where ``cfg`` came from (``{"name", "sha256", "config_file"}``), recorded in the bundle.
    """
    work_uri = work_uri or default_work_uri(out_uri)
    started = time.perf_counter()
    log(f"[1/2] CNN stage: {cfg.data.folds} folds of {cfg.cnn.backbone} at {cfg.data.input_size}px (work: {work_uri})")
    cnn = train_cnn_stage(data_uri, labels_uri, work_uri, cfg, storage_config=storage_config, log=log)
    log("[2/2] sequence stage: out-of-fold embeddings through the scoring actors, then one sequence model per fold")
    result = train_sequence_stage(
        work_uri, out_uri, cfg, storage_config=storage_config, log=log, progress=progress, overwrite=overwrite,
        provenance={"data_uri": data_uri, "labels_uri": labels_uri, "cnn_stage_seconds": cnn["seconds"], "recipe": recipe},
    )
    stages = {
        "cache": {"key": cnn["cache"]["key"], "reused": cnn["cache"]["reused"]},
        "cnn": [{"fold": s["fold"], "key": s["key"], "reused": s["reused"]} for s in cnn["folds"]],
        **result.stages,
    }
    return replace(result, seconds=time.perf_counter() - started, stages=stages)


def _windows_and_norm():
    return [w.to_dict() for w in DEFAULT_WINDOWS], DEFAULT_NORMALIZATION.to_dict()


def _keys(ts, cfg) -> dict[str, Any]:
    """Every artifact's key for this config and training set (:func:`ichd_ray.training.keys.training_keys`)."""
    return training_keys(cfg, manifest_sha256=ts.manifest_sha256, folds_sha256=ts.folds_sha256)


def _training_set(data_uri, labels_uri, work_uri, cfg, storage_config):
    return prepare_training_set(
        data_uri, labels_uri, work_uri, folds=cfg.data.folds, fold_seed=cfg.data.fold_seed,
        index_config=cfg.index, storage_config=storage_config,
    )


def train_cnn_stage(
    data_uri: str,
    labels_uri: str,
    work_uri: str,
    cfg,
    *,
    storage_config: storage.StorageConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Index + labels + folds, the decoded cache, then one CNN per fold (Ray must be initialised)."""
    started = time.perf_counter()
    ts = _training_set(data_uri, labels_uri, work_uri, cfg, storage_config)
    keys = _keys(ts, cfg)
    counts = pd.Series([s["fold"] for s in ts.studies]).value_counts().sort_index().tolist()
    log(f"  data: {len(ts.studies)} labelled studies, folds by patient: {counts} studies"
        + (f"; {len(ts.dropped)} left out (unlabelled slices)" if ts.dropped else ""))
    windows, norm = _windows_and_norm()
    cache_uri = cache_prefix(work_uri, cfg.data.input_size, keys["cache"].key)
    cache_reused = storage.exists(storage.join(cache_uri, "index.parquet"), storage_config)
    studies, failures = build_cache(
        ts, work_uri, size=cfg.data.input_size, windows=windows, studies_per_task=cfg.data.studies_per_task,
        cpus_per_task=cfg.data.cpus_per_decode_task, storage_config=storage_config,
    )
    n_slices = sum(s["n"] for s in studies)
    log(f"  cache {keys['cache'].short}{' (reused)' if cache_reused else ''}: {n_slices} slices at {cfg.data.input_size}px"
        + (f"; {len(failures)} could not be decoded:" if failures else ""))
    for f in failures[:5]:
        log(f"    {f['uri']}: {f['reason']} ({f['message']})")
    folds = []
    for k in range(cfg.data.folds):
        key = keys["cnn"][k]
        summary = train_cnn_fold(studies, k, cfg, work_uri, key=key.key, normalization=norm, storage_config=storage_config)
        last = summary["history"][-1]
        log(f"  cnn fold {k} {key.short}{' (reused)' if summary['reused'] else ''}: {last['epoch'] + 1} epochs, "
            f"val weighted log loss {last.get('val_weighted_log_loss', float('nan')):.4f}, {last.get('train_samples_per_s', 0):.0f} samples/s")
        folds.append(summary)
    return {
        "folds": folds, "studies": len(studies), "slices": n_slices, "decode_failures": failures, "seconds": time.perf_counter() - started,
        "cache": {"key": keys["cache"].key, "uri": cache_uri, "reused": cache_reused},
    }


def train_sequence_stage(
    work_uri: str,
    out_uri: str,
    cfg,
    *,
    storage_config: storage.StorageConfig | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
) -> TrainResult:
    """Out-of-fold embeddings (scoring actors), one sequence model per fold, metrics, the bundle."""
    started = time.perf_counter()
    ts = load_training_set(work_uri, storage_config)
    if ts.folds != cfg.data.folds:
        raise ValueError(f"{work_uri} holds {ts.folds} folds but data.folds is {cfg.data.folds}")
    keys = _keys(ts, cfg)
    tables, cnn_summaries, embedded = [], [], []
    for k in range(cfg.data.folds):
        uri = cnn_weights_uri(work_uri, k, keys["cnn"][k].key)
        cnn_summary = finished_fold(uri, keys["cnn"][k].key, storage_config)
        if cnn_summary is None:
            raise FileNotFoundError(f"CNN fold {k} has no weights for this config at {uri}: run `ichd-ray train cnn` first")
        cnn_summaries.append(cnn_summary)
        key = keys["embeddings"][k]
        t0 = time.perf_counter()
        embedded.append(not embeddings_done(work_uri, k, key.key, storage_config))
        tables.append(embed_fold(ts, k, cfg, work_uri, uri, key=key.key, storage_config=storage_config, progress=progress))
        log(f"  embeddings fold {k} {key.short}{'' if embedded[-1] else ' (reused)'}: {len(tables[-1])} slices out of fold "
            f"({time.perf_counter() - t0:.0f} s)")
    rows = sequence_rows(pd.concat(tables, ignore_index=True), ts.manifest)
    seq_summaries = []
    for k in range(cfg.data.folds):
        key = keys["sequence"][k]
        summary = train_sequence_fold(rows, k, cfg, work_uri, key=key.key, storage_config=storage_config)
        last = summary["history"][-1]
        log(f"  sequence fold {k} {key.short}{' (reused)' if summary['reused'] else ''}: {last['epoch'] + 1} epochs, "
            f"val weighted log loss {last.get('val_weighted_log_loss', float('nan')):.4f}")
        seq_summaries.append(summary)

    metrics = out_of_fold_metrics(rows, ts.manifest, cfg, [s["weights_uri"] for s in seq_summaries], storage_config)
    thresholds, slice_thresholds = metrics["thresholds"], metrics["slice_thresholds"]

    # The bundle: CNN k and sequence model k of this config's keys, written like any bundle; per fold
    # the keys and the sha256 of the very bytes loaded, so the bundle names the weights it holds.
    cnns, seqs, folds = [], [], []
    embed_dim = int(rows[0]["dim"])  # the CNNs' embedding width, as the embedding stage wrote it
    for k in range(cfg.data.folds):
        cnn_bytes = storage.read_bytes(cnn_summaries[k]["weights_uri"], storage_config)
        cnn = SliceCNN(cfg.cnn.backbone, len(CLASSES))
        cnn.load_state_dict(safetensors.torch.load(cnn_bytes))
        seq_bytes = storage.read_bytes(seq_summaries[k]["weights_uri"], storage_config)
        seq = SequenceModel.from_config(embed_dim, sequence_config(cfg.sequence), len(CLASSES))
        seq.load_state_dict(safetensors.torch.load(seq_bytes))
        cnns.append(cnn)
        seqs.append(seq)
        folds.append({
            "fold": k,
            "cnn": {**keys["cnn"][k].to_dict(), "run": cnn_summaries[k].get("run"), "weights_uri": cnn_summaries[k]["weights_uri"],
                    "weights_sha256": hashlib.sha256(cnn_bytes).hexdigest()},
            "embeddings": {**keys["embeddings"][k].to_dict(), "uri": embeddings_uri(work_uri, k, keys["embeddings"][k].key)},
            "sequence": {**keys["sequence"][k].to_dict(), "run": seq_summaries[k].get("run"), "weights_uri": seq_summaries[k]["weights_uri"],
                         "weights_sha256": hashlib.sha256(seq_bytes).hexdigest()},
        })
    training = {
        "state": "trained",
        "code_version": __version__,
        "config": cfg.to_dict(),
        "config_sha256": cfg.sha256(),
        "manifest_uri": storage.join(work_uri, "train_manifest.parquet"),
        "manifest_sha256": ts.manifest_sha256,
        "studies_per_fold": pd.Series([r["fold"] for r in rows]).value_counts().sort_index().tolist(),
        "metrics": _compact(metrics),
        "cnn_history": [s["history"] for s in cnn_summaries],
        "sequence_history": [s["history"] for s in seq_summaries],
        "cache": keys["cache"].to_dict(),
        "stage_fields": keys["fields"],
        "folds": folds,
        **(provenance or {}),
    }
    windows, norm = _windows_and_norm()
    config = BundleConfig(
        backbone=cfg.cnn.backbone,
        embed_dim=embed_dim,
        input_size=cfg.data.input_size,
        folds=cfg.data.folds,
        sequence=sequence_config(cfg.sequence),
        thresholds=thresholds,
        slice_thresholds=slice_thresholds,
        training=training,
    )
    written = save_bundle(out_uri, config, cnns, seqs, storage_config, overwrite=overwrite)
    storage.write_bytes(storage.join(work_uri, "metrics.json"), json.dumps(_compact(metrics), indent=1).encode(), storage_config)
    stages = {
        "embeddings": [{"fold": k, "key": keys["embeddings"][k].key, "reused": not embedded[k]} for k in range(cfg.data.folds)],
        "sequence": [{"fold": k, "key": s["key"], "reused": s["reused"]} for k, s in enumerate(seq_summaries)],
    }
    return TrainResult(out_uri, written.version_id, metrics, format_metrics(metrics), time.perf_counter() - started, stages)


def _compact(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (NaN -> None)."""
    return json.loads(json.dumps(metrics, default=float).replace("NaN", "null"))
