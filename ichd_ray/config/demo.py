"""Settings of ``ichd-ray demo``: synthesise an archive, train the ``demo`` preset, score, evaluate."""

from __future__ import annotations

import os

from pydantic import Field

from ichd_ray.config.job import Section

__all__ = ["DemoConfig"]


class DemoConfig(Section):
    """Args:
    out: output folder: ``out/archive`` (DICOM), ``out/model`` (bundle), ``out/model-work``,
        ``out/results`` (tables).
    studies: number of synthetic studies.
    slices: nominal slices per study.
    dicom_size: synthetic image side (pixels).
    config: training YAML overriding the ``demo`` preset.
    seed: synthetic set seed.
    workers: processes for synthesis.
    """

    out: str = Field("demo_out", description="output folder")
    studies: int = Field(60, ge=1, description="synthetic studies")
    slices: int = Field(24, ge=1, description="nominal slices per study")
    dicom_size: int = Field(256, ge=16, description="synthetic image side (pixels)")
    config: str | None = Field(None, description="training YAML overriding the demo recipe")
    seed: int = Field(0, description="synthetic set seed")
    workers: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1), ge=1, description="synthesis processes")
