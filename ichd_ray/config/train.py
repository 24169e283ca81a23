"""Training configuration: one typed object for ``ichd-ray train``, validated before Ray starts.

Every field, default and bound is in docs/config.md (generated from these models). A preset (``demo``
or ``rsna``) gives every value; a YAML file (``--config train.yaml``) overrides any of them by section,
and a bad field fails at once with its dotted name::

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
      augment: {}                  # AugmentConfig fields (below); {} = its defaults
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
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StrictFloat, StrictInt, field_validator

from ichd_ray.config.job import (
    ConfigError,
    IndexConfig,
    RaySection,
    ScoreConfig,
    Section,
    SectionedConfig,
    StorageSection,
    read_yaml_sections,
    validate_config,
)

__all__ = [
    "AugmentConfig",
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

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# (low, high); a YAML list stands for the pair, its items stay strict numbers.
Pair = Annotated[tuple[StrictFloat | StrictInt, StrictFloat | StrictInt], Field(strict=False)]


def _pair(value: tuple, name: str, low: float, high: float, allowed: str, low_open: bool = False) -> tuple[float, float]:
    a, b = float(value[0]), float(value[1])
    if not ((low < a if low_open else low <= a) and a <= b <= high):
        raise ValueError(f"expected {allowed}")
    return a, b


class AugmentConfig(Section):
    """What :func:`ichd_ray.training.augment.augment_batch` does; the defaults follow the RSNA 2019
    winners (flip, +-30 deg).

    Args:
        hflip_p: probability of a left-right flip, in [0, 1].
        vflip_p: probability of an up-down flip, in [0, 1].
        rotate_deg: rotation drawn uniformly in ``[-rotate_deg, rotate_deg]`` degrees, in [0, 180].
        scale: ``(low, high)`` isotropic scale drawn uniformly, ``0 < low <= high <= 10``;
            above 1 enlarges the content.
        shift: shift on each axis drawn uniformly in ``[-shift, shift]`` as a fraction of that
            side, in [0, 1]; positive moves the content right / down.
        affine_p: probability that a sample is warped (rotation, scale and shift together), in [0, 1].
        brightness: additive offset drawn uniformly in ``[-brightness, brightness]`` as a fraction
            of 255, in [0, 1].
        contrast: ``(low, high)`` factor around the image's per-channel mean, ``0 <= low <= high <= 10``.
        intensity_p: probability that brightness and contrast are applied, in [0, 1].
        erase_p: probability of erasing one rectangle (set to 0), in [0, 1].
        erase_area: ``(low, high)`` area fraction of the erased rectangle, ``0 < low <= high <= 1``.
    """

    hflip_p: Probability = Field(0.5, description="probability of a left-right flip")
    vflip_p: Probability = Field(0.0, description="probability of an up-down flip")
    rotate_deg: float = Field(30.0, ge=0.0, le=180.0, description="rotation in [-rotate_deg, rotate_deg] degrees")
    scale: Pair = Field((0.9, 1.1), description="(low, high) isotropic scale, 0 < low <= high <= 10")
    shift: float = Field(0.1, ge=0.0, le=1.0, description="shift per axis as a fraction of the side")
    affine_p: Probability = Field(0.8, description="probability that rotation, scale and shift are applied")
    brightness: float = Field(0.1, ge=0.0, le=1.0, description="additive offset as a fraction of 255")
    contrast: Pair = Field((0.9, 1.1), description="(low, high) factor around the per-channel mean, 0 <= low <= high <= 10")
    intensity_p: Probability = Field(0.5, description="probability that brightness and contrast are applied")
    erase_p: Probability = Field(0.0, description="probability of erasing one rectangle")
    error_prefix: ClassVar[tuple[str, ...]] = ("augment",)

    erase_area: Pair = Field((0.02, 0.2), description="(low, high) area fraction erased, 0 < low <= high <= 1")

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple) -> tuple[float, float]:
        return _pair(v, "scale", 0.0, 10.0, "a pair (low, high) with 0 < low <= high <= 10", low_open=True)

    @field_validator("contrast")
    @classmethod
    def _contrast(cls, v: tuple) -> tuple[float, float]:
        return _pair(v, "contrast", 0.0, 10.0, "a pair (low, high) with 0 <= low <= high <= 10")

    @field_validator("erase_area")
    @classmethod
    def _erase_area(cls, v: tuple) -> tuple[float, float]:
        return _pair(v, "erase_area", 0.0, 1.0, "a pair (low, high) with 0 < low <= high <= 1", low_open=True)

    @classmethod
    def none(cls) -> "AugmentConfig":
        """A config that changes nothing: every probability 0 and every range neutral."""
        return cls(hflip_p=0.0, vflip_p=0.0, rotate_deg=0.0, scale=(1.0, 1.0), shift=0.0, affine_p=0.0,
                   brightness=0.0, contrast=(1.0, 1.0), intensity_p=0.0, erase_p=0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly dict (pairs as lists); :meth:`from_dict` reads it back."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any) -> "AugmentConfig":
        """Build from a mapping; missing fields take the defaults, unknown fields are rejected."""
        if isinstance(data, cls):
            return data
        return validate_config(cls, data, prefix=cls.error_prefix)


class DataSection(Section):
    folds: int = Field(5, ge=2, description="K: folds by patient, stratified on `any`")
    fold_seed: int = Field(0, description="seed of the fold assignment")
    input_size: int = Field(256, ge=16, le=1024, description="network input side; the cache is decoded at this size once")
    studies_per_task: int = Field(6, ge=1, description="studies per CPU decode task when building the cache")
    cpus_per_decode_task: float = Field(1.0, gt=0)


class _TrainLoop(Section):
    """Fields both training loops have (a shared schema, no shared behaviour)."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP); gloo on CPU, nccl on GPU")
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional on small machines: a whole CPU can starve the data tasks")
    max_failures: int = Field(3, ge=-1, description="worker failures tolerated (-1: no limit); each resumes from the last checkpoint")
    seed: int = Field(0, ge=0, description="every random draw derives from it")


class CnnSection(_TrainLoop):
    backbone: str = Field("densenet121", description="a timm model name (timm.list_models())")
    pretrained_path: str | None = Field(None, description="local timm .safetensors weights (nothing is downloaded)")
    epochs: int = Field(10, ge=1)
    samples_per_study: int = Field(4, ge=1, description="epoch = this x training studies (1st place: a study, then a slice)")
    batch_size: int = Field(32, ge=1, description="per worker")
    lr: float = Field(5e-4, gt=0, description="AdamW peak")
    weight_decay: float = Field(2e-5, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="linear warm-up, then cosine to min_lr_fraction x lr")
    min_lr_fraction: float = Field(0.02, ge=0, le=1)
    drop_rate: float = Field(0.0, ge=0, lt=1)
    torch_threads: int = Field(0, ge=0, description="0: torch's default")
    cpus_per_data_task: float = Field(0.5, gt=0, description="Ray Data tasks that read, augment and batch slices")
    augment: AugmentConfig = Field(AugmentConfig(), description="augmentation; {} = the defaults")

    @field_validator("backbone")
    @classmethod
    def _timm_model(cls, name: str) -> str:
        # Lazy: importing timm costs ~1 s of CLI start-up; only a train config needs it.
        import timm

        if not timm.is_model(name):
            raise ValueError("expected a timm model name (timm.list_models())")
        return name


#: Recurrent layers a sequence model may use (the classes: ichd_ray.models.sequence.RNN_TYPES).
RNN_NAMES = ("gru", "lstm")


class SequenceSection(_TrainLoop):
    rnn: Literal["gru", "lstm"] = Field("gru", description="1st-place model 1: BiGRU + skip head")
    hidden: int = Field(96, ge=1)
    num_layers: int = Field(2, ge=1)
    proj_dims: Annotated[tuple[Annotated[StrictInt, Field(gt=0)], ...], Field(strict=False, min_length=1)] = Field(
        (512, 128), description="per-slice projection widths")
    dropout: float = Field(0.3, ge=0, lt=1)
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(16, ge=1, description="studies per step")
    window: int = Field(24, ge=2, description="random sub-sequence length while training (full studies at inference)")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(1, ge=1, description="validate + checkpoint every N epochs (and after the last)")

    def sequence_config(self):
        """The model's hyper-parameters as :class:`ichd_ray.models.sequence.SequenceConfig`."""
        # Lazy: the config layer sits below models; only training calls this.
        from ichd_ray.models.sequence import SequenceConfig

        return SequenceConfig(tuple(self.proj_dims), self.hidden, self.num_layers, self.rnn, self.dropout)


class TrainConfig(SectionedConfig):
    data: DataSection = DataSection()
    cnn: CnnSection = CnnSection()
    sequence: SequenceSection = SequenceSection()
    score: ScoreConfig = ScoreConfig()
    index: IndexConfig = IndexConfig()
    storage: StorageSection = StorageSection()
    ray: RaySection = RaySection()

    def job_config(self):
        """The scoring job config the embedding stage runs with (embeddings on)."""
        from ichd_ray.config.job import JobConfig

        return JobConfig(index=self.index, score=self.score.model_copy(update={"write_embeddings": True}),
                         storage=self.storage, ray=self.ray)


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
    return validate_config(TrainConfig, data)


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
    from ichd_ray.dicom.windowing import DEFAULT_NORMALIZATION, DEFAULT_WINDOWS

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
