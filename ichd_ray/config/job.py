"""Job configuration: typed, validated before Ray starts, stored with every run.

A YAML file (``--config job.yaml``) has one section per concern; command-line flags override it. A bad
field fails at once with its dotted name and what is allowed::

    index:
      header_bytes: 65536          # first bytes read per object; more only when a header is longer
      files_per_task: 256
      exclude_suffixes: [.csv, .json, .txt, .md, .parquet, .yaml]
      preferred_thickness_mm: 5.0  # series rule: thickness nearest this, then most slices
    score:
      num_actors: 1                # fixed pool of model actors
      num_gpus_per_actor: 0        # 1 on GPU clusters
      cpus_per_actor: 0.5          # fractional: a whole CPU per actor can starve the read tasks
      cpus_per_decode_task: 1.0    # CPU decode tasks; keep it != cpus_per_actor on CPU-only clusters,
                                   # else Ray Data fuses decode into the model actor (see BENCHMARKS.md)
      reserve_operator_resources: false  # Ray Data's per-operator reservation: off lets decode tasks
                                         # use every CPU the fixed actor pool leaves (36% -> 66% here)
      studies_per_batch: 4         # studies per actor call
      studies_per_task: 6          # studies per CPU decode task (>= 0.25 s of work)
      cnn_chunk: 64                # slices per CNN forward pass (bounds memory for long studies)
      device: auto                 # auto | cpu | cuda
      write_embeddings: false
    storage:
      endpoint_url: null           # else AWS_ENDPOINT_URL
      region: null
    ray:
      address: null                # null: local Ray; "auto": the running cluster
      num_cpus: null               # local Ray only
      autoscaling: false           # true where nodes come on demand (KubeRay autoscaler): a pool
                                   # larger than the cluster right now waits instead of failing
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

import yaml

__all__ = [
    "ConfigError",
    "IndexConfig",
    "ScoreConfig",
    "StorageSection",
    "RaySection",
    "JobConfig",
    "load_job_config",
    "from_dict",
]


class ConfigError(ValueError):
    """A configuration field is missing, unknown or out of range; the message names it."""


@dataclass(frozen=True)
class IndexConfig:
    header_bytes: int = 65536
    files_per_task: int = 256
    exclude_suffixes: tuple[str, ...] = (".csv", ".json", ".txt", ".md", ".parquet", ".yaml", ".yml")
    preferred_thickness_mm: float = 5.0

    def validate(self, prefix: str = "index") -> None:
        _require(self.header_bytes >= 1024, f"{prefix}.header_bytes", "an integer >= 1024", self.header_bytes)
        _require(self.files_per_task >= 1, f"{prefix}.files_per_task", "an integer >= 1", self.files_per_task)
        _require(self.preferred_thickness_mm > 0, f"{prefix}.preferred_thickness_mm", "a number > 0", self.preferred_thickness_mm)


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ScoreConfig:
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.5
    cpus_per_decode_task: float = 1.0
    reserve_operator_resources: bool = False
    studies_per_batch: int = 4
    studies_per_task: int = 6
    cnn_chunk: int = 64
    device: str = "auto"
    write_embeddings: bool = False

    def validate(self, prefix: str = "score") -> None:
        _require(self.num_actors >= 1, f"{prefix}.num_actors", "an integer >= 1", self.num_actors)
        _require(self.num_gpus_per_actor >= 0, f"{prefix}.num_gpus_per_actor", "a number >= 0", self.num_gpus_per_actor)
        _require(self.cpus_per_actor > 0, f"{prefix}.cpus_per_actor", "a number > 0 (fractional is fine)", self.cpus_per_actor)
        _require(self.cpus_per_decode_task > 0, f"{prefix}.cpus_per_decode_task", "a number > 0", self.cpus_per_decode_task)
        _require(self.studies_per_batch >= 1, f"{prefix}.studies_per_batch", "an integer >= 1", self.studies_per_batch)
        _require(self.studies_per_task >= 1, f"{prefix}.studies_per_task", "an integer >= 1", self.studies_per_task)
        _require(self.cnn_chunk >= 1, f"{prefix}.cnn_chunk", "an integer >= 1", self.cnn_chunk)
        _require(self.device in DEVICES, f"{prefix}.device", f"one of {list(DEVICES)}", self.device)


@dataclass(frozen=True)
class StorageSection:
    endpoint_url: str | None = None
    region: str | None = None

    def validate(self, prefix: str = "storage") -> None:
        if self.endpoint_url is not None:
            _require(
                self.endpoint_url.startswith(("http://", "https://")),
                f"{prefix}.endpoint_url",
                "an http:// or https:// URL",
                self.endpoint_url,
            )

    def storage_config(self):
        from ichd_ray.io.storage import StorageConfig

        overrides = {k: v for k, v in asdict(self).items() if v}
        return StorageConfig.from_env(**overrides)


@dataclass(frozen=True)
class RaySection:
    address: str | None = None
    num_cpus: int | None = None
    autoscaling: bool = False

    def validate(self, prefix: str = "ray") -> None:
        if self.num_cpus is not None:
            _require(self.num_cpus >= 1, f"{prefix}.num_cpus", "an integer >= 1 or null", self.num_cpus)


class SectionedConfig:
    """A config made of sections (dataclasses with ``validate(prefix)``): validation, JSON and hash."""

    def validate(self):
        for f in fields(self):
            getattr(self, f.name).validate(f.name)
        return self

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def sha256(self) -> str:
        """Hash of the resolved config (sorted JSON): identifies it in run and bundle metadata."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class JobConfig(SectionedConfig):
    index: IndexConfig = field(default_factory=IndexConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    storage: StorageSection = field(default_factory=StorageSection)
    ray: RaySection = field(default_factory=RaySection)

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> "JobConfig":
        """Apply ``{"section": {"field": value}}`` (None values skipped) and validate."""
        merged = self.to_dict()
        for section, values in overrides.items():
            merged.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
        return from_dict(merged)


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: expected {allowed}, got {value!r}")


def _coerce(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{prefix or 'config'}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        dotted = f"{prefix}.{name}" if prefix else name
        if is_dataclass(hint):
            values[name] = _coerce(hint, value, dotted)
        else:
            values[name] = _coerce_scalar(hint, value, dotted)
    return cls(**values)


def _coerce_scalar(hint: Any, value: Any, name: str) -> Any:
    text = str(hint)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must not be null")
    if "tuple" in text:
        element = typing.get_args(hint)[0] if typing.get_args(hint) else str
        if element is float:
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            if not ok:
                raise ConfigError(f"{name}: expected a list of numbers, got {value!r}")
            return tuple(float(v) for v in value)
        if element is int:
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            if not ok:
                raise ConfigError(f"{name}: expected a list of integers, got {value!r}")
            return tuple(value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        return tuple(value)
    if "dict" in text:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if "bool" in text:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if "int" in text and "float" not in text:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if "float" in text:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if "str" in text:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled type {hint} for {name}")


def from_dict(data: dict[str, Any]) -> JobConfig:
    return _coerce(JobConfig, data or {}, "").validate()


def read_yaml_sections(path_or_uri: str) -> dict[str, Any]:
    """A config YAML (local path or storage URI) as ``{section: mapping}``; anything else is a ConfigError."""
    from ichd_ray.io import storage

    try:
        data = yaml.safe_load(storage.read_bytes(path_or_uri).decode("utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path_or_uri}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path_or_uri}: expected a mapping of sections at the top level")
    return data


def load_job_config(path_or_uri: str | None, overrides: dict[str, dict[str, Any]] | None = None) -> JobConfig:
    """Read a YAML job config (local path or storage URI), apply flag overrides, validate."""
    config = from_dict(read_yaml_sections(path_or_uri) if path_or_uri else {})
    return config.with_overrides(overrides) if overrides else config

