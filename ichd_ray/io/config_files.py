"""Config files on any storage URI: the YAML of ``--config`` read through :mod:`ichd_ray.io.storage`, then
validated by the config layer (which does no I/O of its own)."""

from __future__ import annotations

from typing import Any

from ichd_ray.config.job import JobConfig, StorageSection, job_config, parse_yaml_sections
from ichd_ray.config.train import TrainConfig, train_config
from ichd_ray.io import storage

__all__ = ["read_yaml_sections", "load_job_config", "load_train_config", "storage_config"]


def read_yaml_sections(path_or_uri: str) -> dict[str, Any]:
    """A config YAML (local path or storage URI) as ``{section: mapping}``; anything else is a ConfigError."""
    return parse_yaml_sections(storage.read_bytes(path_or_uri), path_or_uri)


def load_job_config(path_or_uri: str | None, overrides: dict[str, dict[str, Any]] | None = None) -> JobConfig:
    """Read a YAML job config (local path or storage URI, or none), apply flag overrides, validate."""
    return job_config(read_yaml_sections(path_or_uri) if path_or_uri else None, overrides)


def load_train_config(recipe: str = "demo", path_or_uri: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """The recipe ``recipe``, overlaid by the YAML at ``path_or_uri`` (by section) and by ``overrides``."""
    return train_config(recipe, read_yaml_sections(path_or_uri) if path_or_uri else None, overrides)


def storage_config(section: StorageSection) -> storage.StorageConfig:
    """The storage settings a config's ``storage`` section names; unset fields come from the environment."""
    return storage.StorageConfig.from_env(**section.model_dump())
