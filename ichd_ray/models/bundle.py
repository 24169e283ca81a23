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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import safetensors.torch
import timm
import torch
from torch import nn

from ichd_ray import CLASSES

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
_CONFIG_KEYS = (
    "format_version",
    "version_id",
    "created_at",
    "backbone",
    "input_size",
    "windows",
    "normalization",
    "embed_dim",
    "classes",
    "folds",
    "sequence",
    "thresholds",
    "preprocessing",
    "training",
    "weights",
)
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class BundleConfig:
    """Contents of a bundle's ``config.json``, validated on construction.

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

    backbone: str
    embed_dim: int
    input_size: int = 256
    folds: int = 1
    windows: tuple[WindowSpec, ...] = DEFAULT_WINDOWS
    normalization: Normalization = DEFAULT_NORMALIZATION
    classes: tuple[str, ...] = CLASSES
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    thresholds: Mapping[str, float] | None = None
    slice_thresholds: Mapping[str, float] | None = None
    weights: Mapping[str, str] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    preprocessing: Mapping[str, Any] | None = None
    version_id: str = ""
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.format_version != FORMAT_VERSION:
            raise BundleError(f"format_version {self.format_version!r} is not supported; this code reads {FORMAT_VERSION}")
        if not isinstance(self.backbone, str) or not self.backbone:
            raise BundleError(f"backbone must be a timm model name, got {self.backbone!r}")
        if not timm.is_model(self.backbone):
            raise BundleError(f"backbone {self.backbone!r} is not a timm model (see timm.list_models())")
        for name in ("embed_dim", "input_size", "folds"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise BundleError(f"{name} must be a positive int, got {value!r}")

        windows = tuple(self.windows)
        if len(windows) != 3 or not all(isinstance(w, (WindowSpec, Mapping)) for w in windows):
            raise BundleError(f"windows must be 3 windows (one per input channel), got {windows!r}")
        try:
            windows = tuple(WindowSpec(*_window_key(w)) for w in windows)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"windows: each needs name, level and width (> 0): {exc}") from None
        names = [w.name for w in windows]
        if len(set(names)) != len(names):
            raise BundleError(f"windows must have distinct names, got {names}")
        fix("windows", windows)

        norm = self.normalization
        if isinstance(norm, Mapping) and set(norm) == {"mean", "std"}:
            norm = Normalization(tuple(norm["mean"]), tuple(norm["std"]))
        if not isinstance(norm, Normalization):
            raise BundleError(f"normalization must be a Normalization or {{mean, std}}, got {norm!r}")
        if len(norm.mean) != 3 or len(norm.std) != 3 or not all(_is_number(v) for v in (*norm.mean, *norm.std)):
            raise BundleError(f"normalization.mean and .std need 3 numbers each, got {norm.mean!r}, {norm.std!r}")
        if not all(s > 0 for s in norm.std):
            raise BundleError(f"normalization.std must be > 0, got {norm.std!r}")
        fix("normalization", Normalization(tuple(map(float, norm.mean)), tuple(map(float, norm.std))))

        classes = tuple(self.classes)
        if classes != CLASSES:
            missing = [c for c in CLASSES if c not in classes]
            extra = [c for c in classes if c not in CLASSES]
            detail = f"missing {missing}" if missing else f"unknown {extra}" if extra else "wrong order"
            raise BundleError(f"classes must be {list(CLASSES)} in this order (the models' outputs), got {list(classes)}: {detail}")
        fix("classes", classes)

        if not isinstance(self.sequence, SequenceConfig):
            raise BundleError(f"sequence must be a SequenceConfig, got {type(self.sequence).__name__}")

        thresholds = {c: 0.5 for c in CLASSES} if self.thresholds is None else self.thresholds
        fix("thresholds", _check_thresholds("thresholds", thresholds))
        if self.slice_thresholds is not None:
            fix("slice_thresholds", _check_thresholds("slice_thresholds", self.slice_thresholds))

        weights = dict(self.weights)
        allowed = set(self.expected_files)
        for name, digest in weights.items():
            if name not in allowed:
                raise BundleError(f"weights: unexpected file {name!r}; with folds={self.folds} allowed: {self.expected_files}")
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise BundleError(f"weights[{name!r}] must be a lowercase hex sha256, got {digest!r}")
        fix("weights", {name: weights[name] for name in self.expected_files if name in weights})

        for name, default in (("training", {}), ("preprocessing", DEFAULT_PREPROCESSING)):
            value = getattr(self, name)
            value = dict(default) if value is None else value
            if not isinstance(value, Mapping):
                raise BundleError(f"{name} must be a mapping, got {type(value).__name__}")
            try:
                # A JSON round trip validates and deep-copies: later edits to the caller's dict don't leak in.
                fix(name, json.loads(json.dumps(dict(value), allow_nan=False)))
            except (TypeError, ValueError) as exc:
                raise BundleError(f"{name} must be JSON-serialisable: {exc}") from None
        for key, value in self.preprocessing.items():
            allowed = SUPPORTED_PREPROCESSING.get(key)
            if allowed is None:
                raise BundleError(f"preprocessing.{key}: unknown setting; known: {sorted(SUPPORTED_PREPROCESSING)}")
            # `is` for booleans: 1 == True would let a number through
            if not any(value is a if isinstance(a, bool) else value == a for a in allowed):
                raise BundleError(f"preprocessing.{key}: {value!r} is not supported; this code does {list(allowed)}")
        missing = sorted(set(SUPPORTED_PREPROCESSING) - set(self.preprocessing))
        if missing:  # what the weights were trained with is not known: refuse rather than guess
            raise BundleError(f"preprocessing is missing {missing}; a bundle records every one of {sorted(SUPPORTED_PREPROCESSING)}")

        if not self.version_id:
            fix("version_id", new_version_id(self.backbone))
        elif not isinstance(self.version_id, str) or not _VERSION_RE.match(self.version_id):
            raise BundleError(f"version_id must match {_VERSION_RE.pattern}, got {self.version_id!r}")
        if not self.created_at:
            fix("created_at", _utc_now().isoformat().replace("+00:00", "Z"))
        else:
            try:
                datetime.fromisoformat(self.created_at)
            except (TypeError, ValueError):
                raise BundleError(f"created_at must be an ISO 8601 time, got {self.created_at!r}") from None

    @property
    def expected_files(self) -> list[str]:
        """The weights filenames a complete bundle with this many folds holds."""
        return [name for k in range(self.folds) for name in (cnn_filename(k), seq_filename(k))]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``config.json``."""
        return {
            "format_version": self.format_version,
            "version_id": self.version_id,
            "created_at": self.created_at,
            "backbone": self.backbone,
            "input_size": self.input_size,
            "windows": [w.to_dict() for w in self.windows],
            "normalization": self.normalization.to_dict(),
            "embed_dim": self.embed_dim,
            "classes": list(self.classes),
            "folds": self.folds,
            "sequence": self.sequence.to_dict(),
            "thresholds": dict(self.thresholds),
            # Only when recorded, so a bundle without them keeps the config.json it always had.
            **({} if self.slice_thresholds is None else {"slice_thresholds": dict(self.slice_thresholds)}),
            "preprocessing": dict(self.preprocessing),
            "training": dict(self.training),
            "weights": dict(self.weights),
        }

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
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"format_version {version!r} is not supported; this code reads {FORMAT_VERSION}")
        missing = [k for k in _CONFIG_KEYS if k not in data]
        if missing:
            raise BundleError(f"config is missing key(s) {missing}")
        unknown = sorted(set(data) - set(_CONFIG_KEYS) - set(_OPTIONAL_CONFIG_KEYS))
        if unknown:
            raise BundleError(f"config has unknown key(s) {unknown}; allowed: {[*_CONFIG_KEYS, *_OPTIONAL_CONFIG_KEYS]}")

        items = data["windows"]
        if not isinstance(items, list):
            raise BundleError(f"windows must be a list of {{name, level, width}}, got {items!r}")
        windows = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or set(item) != {"name", "level", "width"}:
                raise BundleError(f"windows[{i}] must have exactly the keys name, level, width, got {item!r}")
            if not isinstance(item["name"], str) or not _is_number(item["level"]) or not _is_number(item["width"]):
                raise BundleError(f"windows[{i}]: name must be a string, level and width numbers, got {item!r}")
            try:
                windows.append(WindowSpec(item["name"], float(item["level"]), float(item["width"])))
            except ValueError as exc:
                raise BundleError(f"windows[{i}]: {exc}") from None

        norm = data["normalization"]
        if not isinstance(norm, Mapping) or set(norm) != {"mean", "std"}:
            raise BundleError(f"normalization must be {{mean: [3 numbers], std: [3 numbers]}}, got {norm!r}")
        if not isinstance(norm["mean"], list) or not isinstance(norm["std"], list):
            raise BundleError(f"normalization.mean and .std must be lists, got {norm!r}")

        seq = data["sequence"]
        if not isinstance(seq, Mapping):
            raise BundleError(f"sequence must be an object, got {seq!r}")
        try:
            sequence = SequenceConfig.from_dict(seq)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"sequence: {exc}") from None

        for key in ("thresholds", "weights"):
            if not isinstance(data[key], Mapping):
                raise BundleError(f"{key} must be an object, got {data[key]!r}")
        slice_thresholds = data.get("slice_thresholds")
        if slice_thresholds is not None and not isinstance(slice_thresholds, Mapping):
            raise BundleError(f"slice_thresholds must be an object, got {slice_thresholds!r}")
        if not isinstance(data["classes"], list):
            raise BundleError(f"classes must be a list, got {data['classes']!r}")
        for key in ("version_id", "created_at"):
            if not isinstance(data[key], str) or not data[key]:
                raise BundleError(f"{key} must be a non-empty string, got {data[key]!r}")

        return cls(
            backbone=data["backbone"],
            embed_dim=data["embed_dim"],
            input_size=data["input_size"],
            folds=data["folds"],
            windows=tuple(windows),
            normalization=Normalization(tuple(norm["mean"]), tuple(norm["std"])),
            classes=tuple(data["classes"]),
            sequence=sequence,
            thresholds=data["thresholds"],
            slice_thresholds=slice_thresholds,
            weights=data["weights"],
            training=data["training"],
            preprocessing=data["preprocessing"],
            version_id=data["version_id"],
            created_at=data["created_at"],
            format_version=version,
        )

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


def _check_thresholds(name: str, thresholds: Mapping[str, float]) -> dict[str, float]:
    """One threshold in (0, 1) per class of :data:`CLASSES`, as floats in class order."""
    if not isinstance(thresholds, Mapping):
        raise BundleError(f"{name} must be a mapping of class -> threshold, got {thresholds!r}")
    missing = [c for c in CLASSES if c not in thresholds]
    if missing:
        raise BundleError(f"{name}: missing class(es) {missing}; need one per class of {list(CLASSES)}")
    extra = sorted(set(thresholds) - set(CLASSES))
    if extra:
        raise BundleError(f"{name}: unknown class(es) {extra}; allowed: {list(CLASSES)}")
    for c in CLASSES:
        value = thresholds[c]
        if not _is_number(value) or not 0.0 < value < 1.0:
            raise BundleError(f"{name}[{c!r}] must be a number in (0, 1), got {value!r}")
    return {c: float(thresholds[c]) for c in CLASSES}


def _window_key(window: WindowSpec | Mapping[str, Any]) -> tuple[str, float, float]:
    if isinstance(window, WindowSpec):
        return (window.name, float(window.level), float(window.width))
    return (str(window["name"]), float(window["level"]), float(window["width"]))


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
    final = replace(config, weights=hashes)
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
    if not _is_int(folds) or folds < 1:
        raise BundleError(f"folds must be a positive int, got {folds!r}")
    if not timm.is_model(backbone):
        raise BundleError(f"backbone {backbone!r} is not a timm model (see timm.list_models())")
    if sequence is None:
        seq_config = SequenceConfig()
    elif isinstance(sequence, SequenceConfig):
        seq_config = sequence
    else:
        try:
            seq_config = SequenceConfig.from_dict(sequence)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"sequence: {exc}") from None
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
                SliceCNN(backbone, len(CLASSES), pretrained_path=weights_path, mean=normalization.mean, std=normalization.std)
            )
            torch.manual_seed(_derived_seed(seed, "sequence", k))
            seqs.append(SequenceModel.from_config(cnns[0].num_features, seq_config, len(CLASSES)))
    config = BundleConfig(
        backbone=backbone,
        embed_dim=cnns[0].num_features,
        input_size=input_size,
        folds=folds,
        windows=tuple(windows),
        normalization=normalization,
        sequence=seq_config,
        thresholds=thresholds,
        training=meta,
        preprocessing={**DEFAULT_PREPROCESSING, **(preprocessing or {})},
    )
    return save_bundle(uri, config, cnns, seqs, storage_config, overwrite=overwrite)
