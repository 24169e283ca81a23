"""What each training stage is keyed by: the resolved config fields it reads and its inputs' keys.

A changed field retrains its stage and every stage downstream of it, and nothing else
(:func:`training_keys`); the bundle records each stage's key, fields and config hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ichd_ray.config.train import TrainConfig
from ichd_ray.dicom.windowing import DEFAULT_NORMALIZATION, DEFAULT_WINDOWS
from ichd_ray.models.bundle import DEFAULT_PREPROCESSING

__all__ = ["STAGE_VERSIONS", "StageKey", "canonical_sha256", "cache_fields", "stage_fields", "stage_key", "training_keys"]


# ------------------------------------------------------------------------ what each stage is keyed by
#
# Every training artifact (the decoded cache, CNN k, fold k's out-of-fold embeddings, sequence model k)
# lives under a path holding its key: the sha256 of the resolved config fields its stage reads (the
# stage's ``config_sha256``) and of the keys and hashes of its inputs. A finished artifact is reused only
# when its key matches, so a changed field retrains that stage and every stage downstream of it, and
# nothing else. Fields that only place or size the work (CPUs, threads, retries, checkpoint cadence,
# studies per task) are left out: changing them reuses what is done. Artifacts of other keys stay where
# they are (switching a field back reuses them); delete WORK, or the stale keyed files, to reclaim space.

#: Bump a stage's number when its code changes what it makes from the same config and inputs: every
#: artifact of that stage (and downstream) is then made again.
STAGE_VERSIONS: dict[str, int] = {"cache": 1, "cnn": 1, "embeddings": 1, "sequence": 1}

#: Per stage, the fields of its config section that change what it makes (the rest are resources).
_CNN_FIELDS = ("backbone", "epochs", "samples_per_study", "batch_size", "lr", "weight_decay", "warmup_fraction",
               "min_lr_fraction", "drop_rate", "num_workers", "use_gpu", "seed")
_SEQUENCE_FIELDS = ("rnn", "hidden", "num_layers", "proj_dims", "dropout", "epochs", "batch_size", "window", "lr",
                    "weight_decay", "num_workers", "use_gpu", "seed")


def canonical_sha256(value: Any) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys, no whitespace, no NaN)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class StageKey:
    """The identity of one training artifact.

    Attributes:
        stage: ``cache``, ``cnn``, ``embeddings`` or ``sequence``.
        fold: The fold (None for the cache).
        config_sha256: sha256 of the stage's config fields (:func:`stage_fields`).
        inputs: Keys and hashes of what the stage reads besides its config.
        key: sha256 of stage, fold, config_sha256 and inputs: the artifact's name.
    """

    stage: str
    fold: int | None
    config_sha256: str
    inputs: dict
    key: str

    @property
    def short(self) -> str:
        """The first 16 hex digits: what paths and Ray Train run names carry."""
        return self.key[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "config_sha256": self.config_sha256, "inputs": dict(self.inputs)}


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_fields(size: int, windows: list[dict]) -> dict[str, Any]:
    """What the decoded cache is made with: input size, windows, the bundle's preprocessing."""
    fields_ = {"input_size": size, "windows": list(windows), "preprocessing": dict(DEFAULT_PREPROCESSING)}
    return json.loads(json.dumps({"stage": "cache", "version": STAGE_VERSIONS["cache"], **fields_}))


def stage_fields(cfg: TrainConfig, stage: str) -> dict[str, Any]:
    """The resolved config fields ``stage`` reads, as JSON (what its ``config_sha256`` hashes)."""
    pixels = cache_fields(cfg.data.input_size, [w.to_dict() for w in DEFAULT_WINDOWS])
    if stage == "cache":
        return pixels
    if stage == "cnn":
        cnn = cfg.cnn.model_dump(mode="json")
        fields_ = {name: cnn[name] for name in _CNN_FIELDS}
        fields_["augment"] = cfg.cnn.augment.to_dict()  # resolved: {} == the defaults
        # The pretrained start by content, not by path.
        fields_["pretrained_sha256"] = _file_sha256(cfg.cnn.pretrained_path) if cfg.cnn.pretrained_path else None
        fields_["input_size"] = cfg.data.input_size
        fields_["normalization"] = DEFAULT_NORMALIZATION.to_dict()
    elif stage == "embeddings":
        # The scoring job decodes the DICOMs again (not the cache) and runs CNN k on score.device.
        fields_ = {**{k: pixels[k] for k in ("input_size", "windows", "preprocessing")},
                   "normalization": DEFAULT_NORMALIZATION.to_dict(), "device": cfg.score.device}
    elif stage == "sequence":
        seq = cfg.sequence.model_dump(mode="json")
        fields_ = {name: seq[name] for name in _SEQUENCE_FIELDS}
    else:
        raise ValueError(f"unknown training stage {stage!r}; known: {sorted(STAGE_VERSIONS)}")
    return json.loads(json.dumps({"stage": stage, "version": STAGE_VERSIONS[stage], **fields_}))


def stage_key(stage: str, fields_: dict[str, Any], inputs: dict[str, Any], fold: int | None = None) -> StageKey:
    """The key of ``stage``'s artifact for fold ``fold`` from its config fields and its inputs."""
    config_sha256 = canonical_sha256(fields_)
    inputs = json.loads(json.dumps(inputs))
    key = canonical_sha256({"stage": stage, "fold": fold, "config_sha256": config_sha256, "inputs": inputs})
    return StageKey(stage, fold, config_sha256, inputs, key)


def training_keys(cfg: TrainConfig, *, manifest_sha256: str, folds_sha256: str) -> dict[str, Any]:
    """Every artifact's key for a run, before anything is trained: keys chain on keys, so the whole
    plan follows from the config, the training manifest and the fold assignment.

    Returns:
        ``{"cache": StageKey, "cnn": [StageKey per fold], "embeddings": [...], "sequence": [...]}``;
        also ``"fields"``: each stage's config fields.
    """
    fields_ = {stage: stage_fields(cfg, stage) for stage in STAGE_VERSIONS}
    cache = stage_key("cache", fields_["cache"], {"manifest_sha256": manifest_sha256})
    folds = range(cfg.data.folds)
    cnn = [stage_key("cnn", fields_["cnn"], {"cache": cache.key, "folds_sha256": folds_sha256}, k) for k in folds]
    embeddings = [stage_key("embeddings", fields_["embeddings"], {"cnn": cnn[k].key, "manifest_sha256": manifest_sha256}, k)
                  for k in folds]
    # Sequence model k trains on every other fold's embeddings and validates on fold k's.
    sequence = [stage_key("sequence", fields_["sequence"], {"embeddings": [e.key for e in embeddings], "folds_sha256": folds_sha256}, k)
                for k in folds]
    return {"cache": cache, "cnn": cnn, "embeddings": embeddings, "sequence": sequence, "fields": fields_}
