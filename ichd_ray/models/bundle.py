"""Model bundles: the unit that training writes and scoring reads, on any storage URI.

A bundle is a folder (or S3 prefix) holding, for K folds, one CNN and one sequence model each::

    config.json
    cnn_fold0.safetensors   seq_fold0.safetensors
    cnn_fold1.safetensors   seq_fold1.safetensors   ...

``config.json`` records everything needed to rebuild the models and to feed them the pixels they were
trained on (backbone, input size, windows, normalisation, sequence hyper-parameters, preprocessing),
plus thresholds, training metadata and the sha256 of every weights file. Weights are written first and
``config.json`` last, so a reader that sees the config sees complete weights; the loader verifies each
file's sha256 against the config, so the sha256 of ``config.json`` (``LoadedBundle.bundle_sha256``) pins
the whole bundle. Weights are safetensors only: no pickles are ever read.

Why one module of ~650 lines: the bundle is a file format; its schema (:class:`BundleConfig`), the
writer, the verifying reader and the untrained-bundle builder change together when the format does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Mapping, Sequence

import safetensors.torch
import timm
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, ValidationError, ValidationInfo, field_validator, model_validator
from torch import nn

from ichd_ray import CLASSES
from ichd_ray.config.job import ConfigError, Section, config_error, validate_config

from ichd_ray.io import storage
from ichd_ray.models.sequence import SequenceConfig, SequenceModel
from ichd_ray.models.slice_cnn import SliceCNN
from ichd_ray.io.storage import StorageConfig
from ichd_ray.dicom.windowing import DEFAULT_NORMALIZATION, DEFAULT_WINDOWS, Normalization, WindowSpec

__all__ = [
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "DEFAULT_PREPROCESSING",
    "BundleError",
    "BundleConfig",
    "LoadedBundle",
    "cnn_filename",
    "seq_filename",
    "new_version_id",
    "save_bundle",
    "load_bundle",
    "load_bundle_config",
    "init_bundle",
]

#: Version of the bundle layout and of ``config.json``'s schema this code reads and writes.
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"

#: How slices become network input, beyond windows / size / normalisation (see ichd_ray.dicom.preprocess).
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "resize": "area",
    "rsna_fix": True,
    "pixel_dtype": "uint8",
    "slice_order": "position_along_normal",
}

#: What this code can do for each preprocessing key: scoring applies the bundle's values exactly, so a
#: bundle asking for anything else is refused when it is read, never approximated.
SUPPORTED_PREPROCESSING: dict[str, tuple[Any, ...]] = {
    "resize": ("area",),
    "rsna_fix": (True, False),
    "pixel_dtype": ("uint8",),
    "slice_order": ("position_along_normal",),
}

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Keys a config.json may lack (bundles written before they existed); absent means None.
_OPTIONAL_CONFIG_KEYS = ("slice_thresholds",)


class BundleError(ValueError):
    """A bundle is invalid, incomplete, corrupt, or does not match what a job expects."""


def cnn_filename(fold: int) -> str:
    """Weights file of fold ``fold``'s CNN."""
    return f"cnn_fold{fold}.safetensors"


def seq_filename(fold: int) -> str:
    """Weights file of fold ``fold``'s sequence model."""
    return f"seq_fold{fold}.safetensors"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def new_version_id(backbone: str, now: datetime | None = None) -> str:
    """``<backbone>-<UTC timestamp>-<8 hex>``, safe in paths and URIs (other characters become ``-``)."""
    stamp = (now or _utc_now()).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", backbone).strip("-.") or "model"
    return f"{name}-{stamp}-{secrets.token_hex(4)}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _windows(value: Any) -> Any:
    """``{name, level, width}`` mappings (config.json) become :class:`WindowSpec`; instances pass."""
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected a list of {name, level, width}")
    return tuple(w if isinstance(w, WindowSpec) else WindowSpec(**validate_config(_WindowFields, w, prefix=("windows", str(i))).model_dump())
                 for i, w in enumerate(value))


def _normalization(value: Any) -> Any:
    if isinstance(value, Normalization):
        value = value.to_dict()
    return Normalization(**validate_config(_NormalizationFields, value, prefix=("normalization",)).model_dump())


class _WindowFields(Section):
    name: StrictStr
    level: float
    width: float = Field(gt=0)


class _NormalizationFields(Section):
    mean: Annotated[tuple[float, float, float], Field(strict=False)]
    std: Annotated[tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]], Field(strict=False)]


Thresholds = dict[str, float]


class BundleConfig(BaseModel):
    """Contents of a bundle's ``config.json``, validated on construction (strict types, unknown keys
    refused; an error names the field, its value and what is allowed).

    Args:
        backbone: timm model name of the CNNs.
        embed_dim: Width of the CNN embeddings (the backbone's ``num_features``).
        input_size: Side of the square network input in pixels.
        folds: Number K of (CNN, sequence model) pairs.
        windows: The CT windows (``WindowSpec`` or ``{name, level, width}``), one per input channel.
        normalization: Per-channel mean/std the CNNs apply to ``x / 255`` (or ``{mean, std}``).
        classes: Output order; must be :data:`ichd_ray.CLASSES`.
        sequence: Sequence model hyper-parameters.
        thresholds: The study head's decision threshold per class in (0, 1), chosen on its out-of-fold
            study outputs: ``flagged`` is any class at or above its threshold. None means 0.5 for each.
        slice_thresholds: Per-class thresholds in (0, 1) chosen on the out-of-fold slice outputs, for
            what is read per slice (slice calls, the ETH rule). None: not recorded (a bundle trained
            before they were chosen, or an untrained one); evaluation then says it defaults to 0.5.
        weights: ``{filename: sha256}`` of the weights files; filled in by :func:`save_bundle`.
        training: Free-form JSON metadata about how the weights were made (may be empty).
        preprocessing: Further preprocessing settings (see :data:`DEFAULT_PREPROCESSING`); None means those.
        version_id: Bundle identifier; empty means a new ``<backbone>-<UTC timestamp>-<8 hex>``.
        created_at: ISO 8601 UTC creation time; empty means now.
        format_version: Schema version; must be :data:`FORMAT_VERSION`.

    Raises:
        BundleError: A field is invalid; the message names it and what is allowed.
    """

    # validate_default: the None defaults of thresholds and preprocessing are filled in like given ones.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)

    # Field order is config.json's key order (to_dict), and validation order: folds before weights.
    format_version: Literal[1] = FORMAT_VERSION
    version_id: str = Field("", pattern=_VERSION_RE.pattern)
    created_at: str = ""
    backbone: StrictStr
    input_size: int = Field(256, ge=1)
    windows: Annotated[tuple[WindowSpec, ...], BeforeValidator(_windows)] = DEFAULT_WINDOWS
    normalization: Annotated[Normalization, BeforeValidator(_normalization)] = DEFAULT_NORMALIZATION
    embed_dim: int = Field(ge=1)
    classes: Annotated[tuple[StrictStr, ...], Field(strict=False)] = CLASSES
    folds: int = Field(1, ge=1)
    sequence: SequenceConfig = SequenceConfig()
    thresholds: Thresholds | None = None
    slice_thresholds: Thresholds | None = None
    preprocessing: dict[str, Any] | None = None
    training: dict[str, Any] = {}
    weights: dict[str, str] = {}

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise BundleError(str(config_error(exc, type(self)))) from None

    @model_validator(mode="before")
    @classmethod
    def _identity(cls, data: Any) -> Any:
        """An empty version_id / created_at means a new one / now."""
        if isinstance(data, dict):
            backbone = data.get("backbone")
            if not data.get("version_id"):
                data = {**data, "version_id": new_version_id(backbone if isinstance(backbone, str) else "model")}
            if not data.get("created_at"):
                data = {**data, "created_at": _utc_now().isoformat().replace("+00:00", "Z")}
        return data

    @field_validator("created_at")
    @classmethod
    def _iso_time(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("expected an ISO 8601 time") from None
        return value

    @field_validator("backbone")
    @classmethod
    def _timm_model(cls, value: str) -> str:
        if not timm.is_model(value):
            raise ValueError("not a timm model (see timm.list_models())")
        return value

    @field_validator("windows")
    @classmethod
    def _three_windows(cls, windows: tuple[WindowSpec, ...]) -> tuple[WindowSpec, ...]:
        names = [w.name for w in windows]
        if len(windows) != 3:
            raise ValueError("expected 3 windows (one per input channel)")
        if len(set(names)) != 3:
            raise ValueError(f"expected distinct names, got {names}")
        return windows

    @field_validator("classes")
    @classmethod
    def _model_outputs(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        if classes != CLASSES:
            missing = [c for c in CLASSES if c not in classes]
            extra = [c for c in classes if c not in CLASSES]
            detail = f"missing {missing}" if missing else f"unknown {extra}" if extra else "wrong order"
            raise ValueError(f"expected {list(CLASSES)} in this order (the models' outputs): {detail}")
        return classes

    @field_validator("thresholds", mode="before")
    @classmethod
    def _half_each(cls, value: Any) -> Any:
        return {c: 0.5 for c in CLASSES} if value is None else value

    @field_validator("thresholds", "slice_thresholds")
    @classmethod
    def _one_per_class(cls, thresholds: Thresholds | None) -> Thresholds | None:
        if thresholds is None:
            return None
        missing = [c for c in CLASSES if c not in thresholds]
        extra = sorted(set(thresholds) - set(CLASSES))
        if missing or extra:
            raise ValueError(f"need one per class of {list(CLASSES)}: " + (f"missing {missing}" if missing else f"unknown {extra}"))
        outside = [c for c in CLASSES if not 0.0 < thresholds[c] < 1.0]
        if outside:
            raise ValueError(f"each must be in (0, 1), not so for {outside}")
        return {c: float(thresholds[c]) for c in CLASSES}

    @field_validator("preprocessing", mode="before")
    @classmethod
    def _default_preprocessing(cls, value: Any) -> Any:
        return dict(DEFAULT_PREPROCESSING) if value is None else value

    @field_validator("preprocessing")
    @classmethod
    def _supported_preprocessing(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, setting in value.items():
            allowed = SUPPORTED_PREPROCESSING.get(key)
            if allowed is None:
                raise ConfigError(f"preprocessing.{key}: unknown setting; known: {sorted(SUPPORTED_PREPROCESSING)}")
            # `is` for booleans: 1 == True would let a number through
            if not any(setting is a if isinstance(a, bool) else setting == a for a in allowed):
                raise ConfigError(f"preprocessing.{key}: {setting!r} is not supported; this code does {list(allowed)}")
        missing = sorted(set(SUPPORTED_PREPROCESSING) - set(value))
        if missing:  # what the weights were trained with is not known: refuse rather than guess
            raise ConfigError(f"preprocessing is missing {missing}; a bundle records every one of {sorted(SUPPORTED_PREPROCESSING)}")
        return _json_copy(value)

    @field_validator("training")
    @classmethod
    def _json_training(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _json_copy(value)

    @field_validator("weights")
    @classmethod
    def _weights_of_these_folds(cls, weights: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        folds = info.data.get("folds")
        if folds is None:  # folds itself is invalid: that error is the one to read
            return weights
        allowed = _expected_files(folds)
        for name, digest in weights.items():
            if name not in allowed:
                raise ValueError(f"unexpected file {name!r}; with folds={folds} allowed: {allowed}")
            if not _SHA256_RE.match(digest):
                raise ValueError(f"{name}: expected a lowercase hex sha256")
        return {name: weights[name] for name in allowed if name in weights}

    @property
    def expected_files(self) -> list[str]:
        """The weights filenames a complete bundle with this many folds holds."""
        return _expected_files(self.folds)

    def replace(self, **changes: Any) -> BundleConfig:
        """A copy with ``changes`` applied, validated like a new one."""
        return type(self)(**{**dict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``config.json``."""
        data = self.model_dump(mode="json")
        if data["slice_thresholds"] is None:  # only when recorded: older bundles keep their config.json
            del data["slice_thresholds"]
        return data

    def to_json(self) -> bytes:
        """``config.json`` bytes (UTF-8, indented, stable key order)."""
        return (json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BundleConfig:
        """Parse ``config.json``'s mapping; every key is required (but ``slice_thresholds``, which bundles
        written before it existed lack) and unknown keys are refused.

        Raises:
            BundleError: A key is missing, unknown or invalid; the message names it.
        """
        if not isinstance(data, Mapping):
            raise BundleError(f"config must be a JSON object, got {type(data).__name__}")
        missing = [k for k in cls.model_fields if k not in data and k not in _OPTIONAL_CONFIG_KEYS]
        if missing:
            raise BundleError(f"config is missing key(s) {missing}")
        return cls(**data)

    @classmethod
    def from_json(cls, raw: bytes | str) -> BundleConfig:
        """Parse ``config.json`` bytes."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise BundleError(f"{CONFIG_NAME} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def build_cnn(self) -> SliceCNN:
        """A CNN with this config's architecture and normalisation (randomly initialised)."""
        return SliceCNN(
            self.backbone, len(self.classes), mean=self.normalization.mean, std=self.normalization.std
        )

    def build_sequence(self) -> SequenceModel:
        """A sequence model with this config's hyper-parameters (randomly initialised)."""
        return SequenceModel.from_config(self.embed_dim, self.sequence, len(self.classes))


def _expected_files(folds: int) -> list[str]:
    return [name for k in range(folds) for name in (cnn_filename(k), seq_filename(k))]


def _json_copy(value: dict[str, Any]) -> dict[str, Any]:
    """A JSON round trip validates and deep-copies: later edits to the caller's dict don't leak in."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"expected JSON-serialisable values: {exc}") from None


@dataclass
class LoadedBundle:
    """A verified bundle with its models built, in eval mode.

    Attributes:
        uri: Where it was loaded from.
        config: Its parsed ``config.json``.
        models: One (CNN, sequence model) pair per fold, fold order.
        bundle_sha256: sha256 of the ``config.json`` bytes; it pins every weights file too.
    """

    uri: str
    config: BundleConfig
    models: list[tuple[SliceCNN, SequenceModel]]
    bundle_sha256: str

    @property
    def device(self) -> torch.device:
        """Device of the models' parameters."""
        return next(self.models[0][0].parameters()).device


def _weights_bytes(module: nn.Module, metadata: Mapping[str, str]) -> bytes:
    # Cloned to CPU: safetensors refuses tensors that share storage (e.g. cuDNN's flattened RNN weights).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    # One metadata entry holding sorted JSON: safetensors writes its metadata map in hash order, which
    # would make equal weights give different bytes (and sha256) from run to run.
    return safetensors.torch.save(tensors, metadata={"ichd_ray": json.dumps(dict(metadata), sort_keys=True)})


def _check_models(config: BundleConfig, cnns: Sequence[SliceCNN], seqs: Sequence[SequenceModel]) -> None:
    if len(cnns) != config.folds or len(seqs) != config.folds:
        raise BundleError(f"folds={config.folds} needs {config.folds} CNNs and sequence models, got {len(cnns)} and {len(seqs)}")
    norm = (config.normalization.mean, config.normalization.std)
    for k, (cnn, seq) in enumerate(zip(cnns, seqs)):
        if not isinstance(cnn, SliceCNN) or not isinstance(seq, SequenceModel):
            raise BundleError(f"fold {k}: need a SliceCNN and a SequenceModel, got {type(cnn).__name__}, {type(seq).__name__}")
        checks = [
            ("backbone", cnn.backbone_name, config.backbone),
            ("embed_dim", cnn.num_features, config.embed_dim),
            ("classes", cnn.num_classes, len(config.classes)),
            ("normalization", tuple(tuple(round(v, 6) for v in t) for t in cnn.normalization),
             tuple(tuple(round(v, 6) for v in t) for t in norm)),
            ("sequence", seq.config, config.sequence),
            ("embed_dim (sequence)", seq.embed_dim, config.embed_dim),
            ("classes (sequence)", seq.num_classes, len(config.classes)),
        ]
        for name, got, want in checks:
            if got != want:
                raise BundleError(f"fold {k}: model {name} is {got!r} but the config says {want!r}")


def save_bundle(
    uri: str | os.PathLike[str],
    config: BundleConfig,
    cnns: Sequence[SliceCNN],
    seqs: Sequence[SequenceModel],
    storage_config: StorageConfig | None = None,
    *,
    overwrite: bool = False,
) -> BundleConfig:
    """Write a bundle: the weights files first, then ``config.json`` naming their sha256.

    Args:
        uri: Bundle folder or prefix (local path, ``file://`` or ``s3://``).
        config: The bundle's config; its ``weights`` are replaced by the hashes of what is written.
        cnns: One CNN per fold, matching the config's backbone, embed_dim and normalisation.
        seqs: One sequence model per fold, matching the config's ``sequence`` block.
        storage_config: S3 settings; None means :meth:`StorageConfig.from_env`.
        overwrite: Replace an existing bundle at ``uri``; by default that is an error, since a bundle
            is identified by its content and others may be reading it.

    Returns:
        BundleConfig: The config as written (with ``weights`` filled in).

    Raises:
        BundleError: The models don't match the config, or a bundle exists and ``overwrite`` is False.
    """
    uri = os.fspath(uri)
    _check_models(config, cnns, seqs)
    config_uri = storage.join(uri, CONFIG_NAME)
    if not overwrite and storage.exists(config_uri, storage_config):
        raise BundleError(f"a bundle already exists at {uri} (pass overwrite=True to replace it)")
    hashes: dict[str, str] = {}
    for k, (cnn, seq) in enumerate(zip(cnns, seqs)):
        meta = {"bundle_format": str(FORMAT_VERSION), "fold": str(k)}
        for name, module, kind in ((cnn_filename(k), cnn, "cnn"), (seq_filename(k), seq, "sequence")):
            data = _weights_bytes(module, {**meta, "kind": kind})
            storage.write_bytes(storage.join(uri, name), data, storage_config)
            hashes[name] = _sha256(data)
    final = config.replace(weights=hashes)
    storage.write_bytes(config_uri, final.to_json(), storage_config)
    return final


def _read_verified(uri: str, name: str, expected: str, storage_config: StorageConfig | None) -> dict[str, torch.Tensor]:
    try:
        data = storage.read_bytes(storage.join(uri, name), storage_config)
    except FileNotFoundError:
        raise BundleError(f"bundle {uri}: weights file {name} is missing") from None
    digest = _sha256(data)
    if digest != expected:
        raise BundleError(
            f"bundle {uri}: weights file {name} has sha256 {digest}, but {CONFIG_NAME} says {expected} "
            "(corrupt or replaced file)"
        )
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise BundleError(f"bundle {uri}: weights file {name} is not valid safetensors: {exc}") from None


def _load_into(module: nn.Module, state: Mapping[str, torch.Tensor], uri: str, name: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"bundle {uri}: weights file {name} does not fit the configured model: {exc}") from None


def load_bundle_config(
    uri: str | os.PathLike[str], storage_config: StorageConfig | None = None
) -> tuple[BundleConfig, str]:
    """Read and validate only a bundle's ``config.json`` (cheap: for drivers that plan a job).

    Args:
        uri: Bundle folder or prefix (local path, ``file://`` or ``s3://``).
        storage_config: S3 settings; None means :meth:`StorageConfig.from_env`.

    Returns:
        tuple[BundleConfig, str]: The config and the sha256 of the ``config.json`` bytes.

    Raises:
        BundleError: No ``config.json``, an invalid one, or one that lacks a weights sha256.
    """
    uri = os.fspath(uri)
    try:
        raw = storage.read_bytes(storage.join(uri, CONFIG_NAME), storage_config)
    except FileNotFoundError:
        raise BundleError(f"no bundle at {uri}: {CONFIG_NAME} not found") from None
    try:
        config = BundleConfig.from_json(raw)
    except BundleError as exc:
        raise BundleError(f"bundle {uri}: {exc}") from None
    unlisted = [name for name in config.expected_files if name not in config.weights]
    if unlisted:
        raise BundleError(f"bundle {uri}: {CONFIG_NAME} lists no sha256 for {unlisted}")
    return config, _sha256(raw)


def load_bundle(
    uri: str | os.PathLike[str],
    storage_config: StorageConfig | None = None,
    device: str | torch.device = "cpu",
) -> LoadedBundle:
    """Read, verify and build a bundle.

    Args:
        uri: Bundle folder or prefix (local path, ``file://`` or ``s3://``).
        storage_config: S3 settings; None means :meth:`StorageConfig.from_env`.
        device: Where the models go.

    Returns:
        LoadedBundle: Config, per-fold (CNN, sequence model) pairs in eval mode, and ``bundle_sha256``.

    Raises:
        BundleError: No ``config.json``, an invalid config, a missing weights file or one whose sha256
            differs from the config's (the message names the file), or weights that don't fit.
    """
    uri = os.fspath(uri)
    config, bundle_sha256 = load_bundle_config(uri, storage_config)

    # Reads overlap (S3 latency); building and loading the modules stays on this thread.
    names = config.expected_files
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        states = list(pool.map(lambda n: _read_verified(uri, n, config.weights[n], storage_config), names))
    by_name = dict(zip(names, states))

    models: list[tuple[SliceCNN, SequenceModel]] = []
    for k in range(config.folds):
        cnn = config.build_cnn()
        if cnn.num_features != config.embed_dim:
            raise BundleError(
                f"bundle {uri}: backbone {config.backbone} gives {cnn.num_features}-d embeddings, config says {config.embed_dim}"
            )
        seq = config.build_sequence()
        _load_into(cnn, by_name.pop(cnn_filename(k)), uri, cnn_filename(k))
        _load_into(seq, by_name.pop(seq_filename(k)), uri, seq_filename(k))
        models.append((cnn.to(device).eval(), seq.to(device).eval()))
    return LoadedBundle(uri=uri, config=config, models=models, bundle_sha256=bundle_sha256)


def _derived_seed(seed: int, kind: str, fold: int) -> int:
    """An independent torch seed per (seed, model kind, fold), stable across runs and platforms."""
    digest = hashlib.sha256(f"{seed}:{kind}:{fold}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_bundle(
    uri: str | os.PathLike[str],
    backbone: str,
    *,
    folds: int = 1,
    input_size: int = 256,
    weights_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sequence: SequenceConfig | Mapping[str, Any] | None = None,
    windows: Sequence[WindowSpec] = DEFAULT_WINDOWS,
    normalization: Normalization = DEFAULT_NORMALIZATION,
    thresholds: Mapping[str, float] | None = None,
    training: Mapping[str, Any] | None = None,
    storage_config: StorageConfig | None = None,
    overwrite: bool = False,
    preprocessing: Mapping[str, Any] | None = None,
) -> BundleConfig:
    """Write an untrained bundle, so scoring runs end to end before any training exists.

    Every model is initialised from a seed derived from (``seed``, kind, fold), so the same arguments
    always give the same weights bytes. With ``weights_path`` the CNN backbones start from those local
    timm weights (heads and sequence models stay seeded-random).

    Args:
        uri: Bundle folder or prefix.
        backbone: timm model name.
        folds: Number of (CNN, sequence model) pairs.
        input_size: Network input side.
        weights_path: Local ``.safetensors`` timm weights for the backbone, or None.
        seed: Initialisation seed.
        sequence: Sequence hyper-parameters (``SequenceConfig`` or its dict); None means the defaults.
        windows: CT windows, channel order.
        normalization: CNN input normalisation (pass the backbone's own for pretrained weights whose
            statistics differ from ImageNet's).
        thresholds: Per-class thresholds; None means 0.5.
        training: Extra metadata merged into the ``training`` block.
        storage_config: S3 settings; None means :meth:`StorageConfig.from_env`.
        overwrite: Replace an existing bundle at ``uri``.
        preprocessing: Settings over :data:`DEFAULT_PREPROCESSING` (e.g. ``{"rsna_fix": False}``).

    Returns:
        BundleConfig: The config as written.
    """
    # Every argument is validated before any model is built; embed_dim is the backbone's, known once built.
    config = BundleConfig(
        backbone=backbone,
        embed_dim=1,
        input_size=input_size,
        folds=folds,
        windows=windows,
        normalization=normalization,
        sequence=SequenceConfig() if sequence is None else sequence,
        thresholds=thresholds,
        preprocessing={**DEFAULT_PREPROCESSING, **(preprocessing or {})},
    )
    seq_config = config.sequence
    meta: dict[str, Any] = {"state": "untrained", "seed": seed}
    if weights_path is not None:
        sha = hashlib.sha256()
        with open(weights_path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
        meta.update(state="pretrained_backbone", pretrained={"file": os.path.basename(weights_path), "sha256": digest})
    meta.update(training or {})

    cnns, seqs = [], []
    # fork_rng keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        for k in range(folds):
            torch.manual_seed(_derived_seed(seed, "cnn", k))
            cnns.append(
                SliceCNN(backbone, len(CLASSES), pretrained_path=weights_path, mean=config.normalization.mean, std=config.normalization.std)
            )
            torch.manual_seed(_derived_seed(seed, "sequence", k))
            seqs.append(SequenceModel.from_config(cnns[0].num_features, seq_config, len(CLASSES)))
    config = config.replace(embed_dim=cnns[0].num_features, training=meta)
    return save_bundle(uri, config, cnns, seqs, storage_config, overwrite=overwrite)
