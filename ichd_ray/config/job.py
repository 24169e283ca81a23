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
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator

__all__ = [
    "ConfigError",
    "Section",
    "IndexConfig",
    "ScoreConfig",
    "StorageSection",
    "RaySection",
    "JobConfig",
    "job_config",
    "parse_yaml_sections",
    "from_dict",
    "validate_config",
]


class ConfigError(ValueError):
    """A configuration field is missing, unknown or out of range; the message names it."""


class Section(BaseModel):
    """A frozen config section: strict types (``"2"`` is not an integer, ``1`` is not ``true``),
    unknown fields refused. Lists may stand for tuples (YAML and JSON have no tuples)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: Dotted path of this section when validated on its own (its errors name it so). Built directly
    #: (``IndexConfig(header_bytes=1)``), a section raises pydantic's ValidationError (also a ValueError).
    error_prefix: typing.ClassVar[tuple[str, ...]] = ()


# A YAML list is accepted where a tuple is declared; its items stay strict.
StrList = Annotated[tuple[StrictStr, ...], Field(strict=False)]


class IndexConfig(Section):
    header_bytes: int = Field(65536, ge=1024, description="first bytes read per object; more only when a header is longer")
    files_per_task: int = Field(256, ge=1, description="objects per index task")
    exclude_suffixes: StrList = Field((".csv", ".json", ".txt", ".md", ".parquet", ".yaml", ".yml"),
                                      description="keys ending so are not DICOM candidates")
    preferred_thickness_mm: float = Field(5.0, gt=0, description="series rule: thickness nearest this, then most slices")
    table_memory_gb: float = Field(2.0, gt=0, description="nightly: memory DuckDB may use for the night's table work "
                                                          "(diff, series rule, plan) before it spills to disk")


Device = Literal["auto", "cpu", "cuda"]
DEVICES = typing.get_args(Device)


class ScoreConfig(Section):
    num_actors: int = Field(1, ge=1, description="fixed pool of model actors")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="1 on GPU clusters")
    cpus_per_actor: float = Field(0.5, gt=0, description="fractional: a whole CPU per actor can starve the read tasks")
    cpus_per_decode_task: float = Field(
        1.0, gt=0, description="CPU decode tasks; keep it != cpus_per_actor on CPU-only clusters, else Ray Data fuses "
                               "decode into the model actor (BENCHMARKS.md)")
    reserve_operator_resources: bool = Field(
        False, description="Ray Data's per-operator reservation: off lets decode tasks use every CPU the fixed actor "
                           "pool leaves (36% -> 66% here)")
    studies_per_batch: int = Field(4, ge=1, description="studies per actor call")
    studies_per_task: int = Field(6, ge=1, description="studies per CPU decode task (>= 0.25 s of work)")
    cnn_chunk: int = Field(64, ge=1, description="slices per CNN forward pass (bounds memory for long studies)")
    device: Device = Field("auto", description="where the model runs; auto: cuda when the actor has a GPU")
    write_embeddings: bool = Field(False, description="also write the CNN embeddings table")


class StorageSection(Section):
    endpoint_url: str | None = Field(None, description="S3 endpoint; null: AWS_ENDPOINT_URL, else AWS")
    region: str | None = Field(None, description="null: AWS_REGION / AWS_DEFAULT_REGION")

    @field_validator("endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value



class RaySection(Section):
    address: str | None = Field(None, description='null: local Ray; "auto": the running cluster')
    num_cpus: int | None = Field(None, ge=1, description="local Ray only")
    autoscaling: bool = Field(False, description="true where nodes come on demand (KubeRay autoscaler): a pool "
                                                  "larger than the cluster right now waits instead of failing")


class SectionedConfig(Section):
    """A config made of sections: its JSON and hash."""

    def validate(self):  # kept for callers of the dataclass era: construction already validated
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        """Hash of the resolved config (sorted JSON): identifies it in run and bundle metadata."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def with_overrides(self, overrides: dict[str, dict[str, Any]]):
        """Apply ``{"section": {"field": value}}`` (None values skipped) and validate."""
        merged = self.to_dict()
        for section, values in overrides.items():
            merged.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
        return validate_config(type(self), merged)


class JobConfig(SectionedConfig):
    index: IndexConfig = IndexConfig()
    score: ScoreConfig = ScoreConfig()
    storage: StorageSection = StorageSection()
    ray: RaySection = RaySection()


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _kind(annotation: Any) -> str:
    """What a value of ``annotation`` is, in words: "an integer", "a number", "a list of strings"..."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _kind(args[0])
    if origin is tuple:
        return "a list of " + {"an integer": "integers", "a number": "numbers"}.get(_kind(args[0]), "strings")
    if origin is not None and args and origin is not Literal:
        return _kind(args[0])
    return {int: "an integer", float: "a number", bool: "true or false"}.get(annotation, "a value")


def _describe(error: dict[str, Any], annotation: Any) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "expected a mapping"
    if kind == "literal_error":
        return f"expected one of {list(typing.get_args(annotation))}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"expected {_kind(annotation)} {_BOUNDS[kind]} {bound}"
    if kind in ("too_short", "too_long"):
        return f"expected {_kind(annotation)} with {error['msg'].split('should have ')[-1]}"
    if kind == "value_error":
        return error["msg"].removeprefix("Value error, ")
    if kind.endswith("_type") and annotation is not None:
        return f"expected {_kind(annotation)}"
    return "expected " + error["msg"].removeprefix("Input should be ")


def _annotation_at(model: type[BaseModel] | None, path: tuple) -> Any:
    annotation: Any = model
    for name in path:
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)) or name not in annotation.model_fields:
            return None
        annotation = annotation.model_fields[name].annotation
    return annotation


def config_error(exc: ValidationError, model: type[BaseModel], source: str = "", prefix: tuple = ()) -> ConfigError:
    """One ConfigError naming every bad field by its dotted name, the value and what is allowed."""
    lines: list[str] = []
    unknown: dict[tuple, list[str]] = {}
    for error in exc.errors():
        loc = prefix + tuple(str(p) for p in error["loc"] if not isinstance(p, int))
        if error["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(loc[-1])
            continue
        if error["type"] == "value_error" and isinstance(error.get("ctx", {}).get("error"), ConfigError):
            lines.append(str(error["ctx"]["error"]))  # a nested section's own error, already dotted
            continue
        if error["type"] == "missing" and error["loc"] and isinstance(error["loc"][-1], str):  # a field, not a list item
            lines.append(f"{'.'.join(loc)}: required")
            continue
        annotation = _annotation_at(model, loc[len(prefix):])
        lines.append(f"{'.'.join(loc) or 'config'}: {_describe(error, annotation)}, got {error['input']!r}")
    for parent, names in unknown.items():
        allowed = _fields_at(model, parent[len(prefix):])
        lines.append(f"{'.'.join(parent) or 'config'}: unknown field(s) {sorted(names)}; allowed: {allowed}")
    return ConfigError((f"{source}: " if source else "") + "; ".join(lines))


def _fields_at(model: type[BaseModel] | None, path: tuple) -> list[str]:
    annotation = _annotation_at(model, path)
    return sorted(annotation.model_fields) if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def validate_config(model: type[BaseModel], data: Any, source: str = "", prefix: tuple = ()):
    """``model`` built from ``data`` or a :class:`ConfigError` naming each bad field.

    Args:
        source: The file the data came from, named first in the message.
        prefix: Dotted path of ``data`` inside a larger config (e.g. ``("augment",)``).
    """
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise config_error(exc, model, source, prefix) from None


def from_dict(data: dict[str, Any]) -> JobConfig:
    return validate_config(JobConfig, data or {})


def parse_yaml_sections(data: bytes | str, source: str) -> dict[str, Any]:
    """A config YAML's text as ``{section: mapping}``; anything else is a ConfigError naming ``source``.
    (Reading the file is the io layer's: :func:`ichd_ray.io.config_files.read_yaml_sections`.)"""
    try:
        parsed = yaml.safe_load(data.decode("utf-8") if isinstance(data, bytes) else data) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    return parsed


def job_config(sections: dict[str, Any] | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> JobConfig:
    """The job config of parsed YAML ``sections``, then flag ``overrides``; validated."""
    config = from_dict(sections or {})
    return config.with_overrides(overrides) if overrides else config
