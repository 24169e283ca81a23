"""Training configuration: one typed object for ``ichd-ray train``, validated before Ray starts.

A preset (``demo`` or ``rsna``) gives every value; a YAML file (``--config train.yaml``) overrides any of
them by section, and a bad field fails at once with its dotted name::

    data:
      folds: 5                     # K: folds by patient, stratified on `any`
      fold_seed: 0
      input_size: 512              # network input side; the cache is decoded at this size once
      studies_per_task: 6          # studies per CPU decode task when building the cache
      cpus_per_decode_task: 1.0
    cnn:
      backbone: densenet121
      pretrained_path: null        # local timm .safetensors weights (nothing is downloaded)
      epochs: 10
      samples_per_study: 4         # epoch = this x training studies (1st place: pick a study, then a slice)
      batch_size: 32               # per worker
      lr: 0.0005                   # AdamW peak
      weight_decay: 0.00002
      warmup_fraction: 0.05        # linear warm-up, then cosine to min_lr_fraction x lr
      min_lr_fraction: 0.02
      drop_rate: 0.0
      num_workers: 1               # Ray Train workers (DDP); gloo on CPU, nccl on GPU
      use_gpu: true
      cpus_per_worker: 4.0         # fractional on small machines: a whole CPU can starve the data tasks
      torch_threads: 0             # 0: torch's default
      cpus_per_data_task: 1.0      # Ray Data tasks that read, augment and batch slices
      max_failures: 3              # worker failures tolerated; each resumes from the last checkpoint
      seed: 0                      # init, samples, augmentation, dropout: all drawn from (seed, fold, epoch, rank)
      augment: {}                  # ichd_ray.training.augment.AugmentConfig fields; {} = its defaults
    sequence:
      rnn: gru                     # 1st-place model 1: BiGRU + skip head
      hidden: 96
      num_layers: 2
      proj_dims: [512, 128]
      dropout: 0.3
      epochs: 40
      batch_size: 16               # studies per step
      window: 24                   # random sub-sequence length while training (full studies at inference)
      lr: 0.0003
      weight_decay: 0.0
      num_workers: 1
      use_gpu: false
      cpus_per_worker: 0.5
      max_failures: 3
      seed: 0                      # init, shuffles, windows, dropout
      checkpoint_every: 1          # validate + checkpoint every N epochs (and after the last)
    score: {...}                   # the embedding stage reuses the scoring job's actors (see config.py)
    index: {...}
    storage: {...}
    ray: {...}

Each training artifact is keyed by the fields its stage reads (:func:`training_keys`): changing
``cnn.lr`` retrains the CNNs, the embeddings and the sequence models; ``sequence.lr`` the sequence
models only; a resource field (CPUs, threads, ``max_failures``, ``checkpoint_every``) nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


from ichd_ray.config.job import (
    ConfigError,
    IndexConfig,
    RaySection,
    ScoreConfig,
    SectionedConfig,
    StorageSection,
    _coerce,
    _require,
    read_yaml_sections,
)

__all__ = [
    "DataSection",
    "CnnSection",
    "SequenceSection",
    "TrainConfig",
    "PRESETS",
    "load_train_config",
    "STAGE_VERSIONS",
    "StageKey",
    "canonical_sha256",
    "cache_fields",
    "stage_fields",
    "stage_key",
    "training_keys",
]


@dataclass(frozen=True)
class DataSection:
    folds: int = 5
    fold_seed: int = 0
    input_size: int = 256
    studies_per_task: int = 6
    cpus_per_decode_task: float = 1.0

    def validate(self, prefix: str = "data") -> None:
        _require(self.folds >= 2, f"{prefix}.folds", "an integer >= 2", self.folds)
        _require(16 <= self.input_size <= 1024, f"{prefix}.input_size", "an integer in [16, 1024]", self.input_size)
        _require(self.studies_per_task >= 1, f"{prefix}.studies_per_task", "an integer >= 1", self.studies_per_task)
        _require(self.cpus_per_decode_task > 0, f"{prefix}.cpus_per_decode_task", "a number > 0", self.cpus_per_decode_task)


def _common_train_checks(section: Any, prefix: str) -> None:
    _require(section.epochs >= 1, f"{prefix}.epochs", "an integer >= 1", section.epochs)
    _require(section.batch_size >= 1, f"{prefix}.batch_size", "an integer >= 1", section.batch_size)
    _require(section.lr > 0, f"{prefix}.lr", "a number > 0", section.lr)
    _require(section.weight_decay >= 0, f"{prefix}.weight_decay", "a number >= 0", section.weight_decay)
    _require(section.num_workers >= 1, f"{prefix}.num_workers", "an integer >= 1", section.num_workers)
    _require(section.cpus_per_worker > 0, f"{prefix}.cpus_per_worker", "a number > 0 (fractional is fine)", section.cpus_per_worker)
    _require(section.max_failures >= -1, f"{prefix}.max_failures", "an integer >= -1 (-1: no limit)", section.max_failures)
    _require(section.seed >= 0, f"{prefix}.seed", "an integer >= 0 (every random draw derives from it)", section.seed)


@dataclass(frozen=True)
class CnnSection:
    backbone: str = "densenet121"
    pretrained_path: str | None = None
    epochs: int = 10
    samples_per_study: int = 4
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 2e-5
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.02
    drop_rate: float = 0.0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    torch_threads: int = 0
    cpus_per_data_task: float = 0.5
    max_failures: int = 3
    seed: int = 0
    augment: dict = field(default_factory=dict)

    def validate(self, prefix: str = "cnn") -> None:
        import timm

        from ichd_ray.training.augment import AugmentConfig

        _require(timm.is_model(self.backbone), f"{prefix}.backbone", "a timm model name (timm.list_models())", self.backbone)
        _common_train_checks(self, prefix)
        _require(self.samples_per_study >= 1, f"{prefix}.samples_per_study", "an integer >= 1", self.samples_per_study)
        _require(0 <= self.warmup_fraction < 1, f"{prefix}.warmup_fraction", "a number in [0, 1)", self.warmup_fraction)
        _require(0 <= self.min_lr_fraction <= 1, f"{prefix}.min_lr_fraction", "a number in [0, 1]", self.min_lr_fraction)
        _require(0 <= self.drop_rate < 1, f"{prefix}.drop_rate", "a number in [0, 1)", self.drop_rate)
        _require(self.torch_threads >= 0, f"{prefix}.torch_threads", "an integer >= 0", self.torch_threads)
        _require(self.cpus_per_data_task > 0, f"{prefix}.cpus_per_data_task", "a number > 0", self.cpus_per_data_task)
        try:
            AugmentConfig.from_dict(self.augment)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{prefix}.augment: {exc}") from None


@dataclass(frozen=True)
class SequenceSection:
    rnn: str = "gru"
    hidden: int = 96
    num_layers: int = 2
    proj_dims: tuple[int, ...] = (512, 128)
    dropout: float = 0.3
    epochs: int = 40
    batch_size: int = 16
    window: int = 24
    lr: float = 3e-4
    weight_decay: float = 0.0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    max_failures: int = 3
    seed: int = 0
    checkpoint_every: int = 1

    def model_config(self):
        from ichd_ray.models.sequence import SequenceConfig

        return SequenceConfig(tuple(self.proj_dims), self.hidden, self.num_layers, self.rnn, self.dropout)

    def validate(self, prefix: str = "sequence") -> None:
        try:
            self.model_config()
        except ValueError as exc:
            raise ConfigError(f"{prefix}: {exc}") from None
        _common_train_checks(self, prefix)
        _require(self.window >= 2, f"{prefix}.window", "an integer >= 2", self.window)
        _require(self.checkpoint_every >= 1, f"{prefix}.checkpoint_every", "an integer >= 1", self.checkpoint_every)


@dataclass(frozen=True)
class TrainConfig(SectionedConfig):
    data: DataSection = field(default_factory=DataSection)
    cnn: CnnSection = field(default_factory=CnnSection)
    sequence: SequenceSection = field(default_factory=SequenceSection)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    storage: StorageSection = field(default_factory=StorageSection)
    ray: RaySection = field(default_factory=RaySection)

    def job_config(self):
        """The scoring job config the embedding stage runs with (embeddings on)."""
        from ichd_ray.config.job import JobConfig

        score = {**asdict(self.score), "write_embeddings": True}
        return JobConfig(
            index=self.index, score=ScoreConfig(**score), storage=self.storage, ray=self.ray
        ).validate()


#: Named starting points; ``--config`` overrides them field by field.
PRESETS: dict[str, dict[str, Any]] = {
    # Small and CPU-friendly: what `make demo` trains on a 2-core laptop in a few minutes.
    "demo": {
        "data": {"folds": 3, "input_size": 128, "studies_per_task": 6},
        "cnn": {
            # timm's smallest ResNet (0.37 M parameters, 96-d embeddings): on 2 CPU cores it trains ~3x
            # more steps than resnet10t in the same time and, measured on the synthetic set, reached a
            # lower held-out loss (BENCHMARKS.md); MobileNet/LCNet trained from scratch did worse.
            "backbone": "test_resnet",
            "epochs": 5,
            "samples_per_study": 36,
            "batch_size": 32,
            "lr": 3e-3,
            "weight_decay": 1e-4,
            "warmup_fraction": 0.05,
            "num_workers": 1,
            "use_gpu": False,
            "cpus_per_worker": 0.5,
            "torch_threads": 2,
            "cpus_per_data_task": 0.5,
        },
        "sequence": {"epochs": 30, "batch_size": 8, "window": 24, "lr": 1e-3, "proj_dims": [96, 64], "hidden": 64,
                     "checkpoint_every": 5},
        "score": {"num_actors": 1, "cpus_per_actor": 0.5, "studies_per_batch": 4},
    },
    # The seeds' full recipe for GPU clusters (1st place: densenet121 at 512, 5 folds, BiGRU model 1).
    "rsna": {
        "data": {"folds": 5, "input_size": 512, "studies_per_task": 6},
        "cnn": {
            "backbone": "densenet121",
            "epochs": 10,
            "samples_per_study": 4,
            "batch_size": 32,
            "lr": 5e-4,
            "weight_decay": 2e-5,
            "num_workers": 4,
            "use_gpu": True,
            "cpus_per_worker": 4.0,
            "cpus_per_data_task": 1.0,
        },
        "sequence": {"epochs": 40, "batch_size": 32, "window": 24, "lr": 3e-4, "use_gpu": True, "cpus_per_worker": 2.0},
        "score": {"num_actors": 4, "num_gpus_per_actor": 1.0, "cpus_per_actor": 2.0, "device": "cuda"},
        "ray": {"address": "auto"},
    },
}


def load_train_config(preset: str = "demo", path_or_uri: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Preset, then the YAML file, then ``{"section": {"field": value}}`` overrides; validated.

    Raises:
        ConfigError: Unknown preset, invalid YAML, or a bad field (named with its section).
    """
    if preset not in PRESETS:
        raise ConfigError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    data = json.loads(json.dumps(PRESETS[preset]))
    if path_or_uri:
        for section, values in read_yaml_sections(path_or_uri).items():
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a mapping, got {values!r}")
            data[section] = {**data.get(section, {}), **values}
    for section, values in (overrides or {}).items():
        data[section] = {**data.get(section, {}), **{k: v for k, v in values.items() if v is not None}}
    return _coerce(TrainConfig, data, "").validate()


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
    from ichd_ray.models.bundle import DEFAULT_PREPROCESSING

    fields_ = {"input_size": size, "windows": list(windows), "preprocessing": dict(DEFAULT_PREPROCESSING)}
    return json.loads(json.dumps({"stage": "cache", "version": STAGE_VERSIONS["cache"], **fields_}))


def stage_fields(cfg: "TrainConfig", stage: str) -> dict[str, Any]:
    """The resolved config fields ``stage`` reads, as JSON (what its ``config_sha256`` hashes)."""
    from ichd_ray.training.augment import AugmentConfig
    from ichd_ray.dicom.windowing import DEFAULT_NORMALIZATION, DEFAULT_WINDOWS

    pixels = cache_fields(cfg.data.input_size, [w.to_dict() for w in DEFAULT_WINDOWS])
    if stage == "cache":
        return pixels
    if stage == "cnn":
        cnn = asdict(cfg.cnn)
        fields_ = {name: cnn[name] for name in _CNN_FIELDS}
        fields_["augment"] = AugmentConfig.from_dict(cfg.cnn.augment).to_dict()  # resolved: {} == the defaults
        # The pretrained start by content, not by path.
        fields_["pretrained_sha256"] = _file_sha256(cfg.cnn.pretrained_path) if cfg.cnn.pretrained_path else None
        fields_["input_size"] = cfg.data.input_size
        fields_["normalization"] = DEFAULT_NORMALIZATION.to_dict()
    elif stage == "embeddings":
        # The scoring job decodes the DICOMs again (not the cache) and runs CNN k on score.device.
        fields_ = {**{k: pixels[k] for k in ("input_size", "windows", "preprocessing")},
                   "normalization": DEFAULT_NORMALIZATION.to_dict(), "device": cfg.score.device}
    elif stage == "sequence":
        seq = asdict(cfg.sequence)
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


def training_keys(cfg: "TrainConfig", *, manifest_sha256: str, folds_sha256: str) -> dict[str, Any]:
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
