"""Training configuration: one typed object for ``ichd-ray train``, validated before Ray starts.

Every field, default and bound is in docs/config.md (generated from these models). A run's config is
model defaults <- a recipe (``ichd_ray/recipes/NAME.yaml``, :mod:`ichd_ray.config.recipes`) <- a YAML
file (``--config train.yaml``, by section) <- CLI flags; a bad field fails at once with its dotted name
(``cnn.lr: expected a number > 0, got -1``).

Each training artifact is keyed by the fields its stage reads (:func:`ichd_ray.training.keys.training_keys`): changing
``cnn.lr`` retrains the CNNs, the embeddings and the sequence models; ``sequence.lr`` the sequence
models only; a resource field (CPUs, threads, ``max_failures``, ``checkpoint_every``) nothing.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StrictFloat, StrictInt, field_validator

from ichd_ray.config.job import (
    ConfigError,
    IndexConfig,
    JobConfig,
    RaySection,
    ScoreConfig,
    Section,
    SectionedConfig,
    StorageSection,
    validate_config,
)
from ichd_ray.config.recipes import load_recipe

__all__ = [
    "AugmentConfig",
    "DataSection",
    "CnnSection",
    "SequenceSection",
    "TrainConfig",
    "train_config",
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


# `rnn` names a class of ichd_ray.models.sequence.RNN_TYPES; the model's hyper-parameters from this
# section: ichd_ray.models.sequence.sequence_config.
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
        return JobConfig(index=self.index, score=self.score.model_copy(update={"write_embeddings": True}),
                         storage=self.storage, ray=self.ray)


def train_config(recipe: str = "demo", sections: dict[str, Any] | None = None, overrides: dict | None = None) -> TrainConfig:
    """A recipe by name, then parsed YAML ``sections`` (a ``--config`` file), then ``{"section": {"field":
    value}}`` overrides; validated. (From a file: :func:`ichd_ray.io.config_files.load_train_config`.)

    Raises:
        ConfigError: Unknown recipe or a bad field (named with its section).
    """
    data = load_recipe(recipe).sections()
    for section, values in (sections or {}).items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping, got {values!r}")
        data[section] = {**data.get(section, {}), **values}
    for section, values in (overrides or {}).items():
        data[section] = {**data.get(section, {}), **{k: v for k, v in values.items() if v is not None}}
    return validate_config(TrainConfig, data)
