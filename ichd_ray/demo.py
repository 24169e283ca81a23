"""The embedded default job: synthesise a small study set, write a model bundle, score it on local Ray.

This is what ``make demo`` runs on a fresh machine (local Ray, local files, no cluster): the same
``synth`` -> ``model init`` -> ``score`` steps a user runs from the README, with the summary and a
DuckDB query at the end. The bundle is untrained until the training stage exists, so its
probabilities show the pipeline, not a diagnosis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ichd_ray import storage
from ichd_ray.synth import SynthConfig, generate

__all__ = ["DemoConfig", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Args:
    out: output folder: ``out/archive`` (DICOM), ``out/model`` (bundle), ``out/results`` (tables).
    studies: number of synthetic studies.
    slices: nominal slices per study.
    dicom_size: synthetic image side (pixels).
    input_size: network input side.
    backbone: timm backbone of the demo bundle.
    seed: synthetic set seed.
    workers: processes for synthesis.
    """

    out: str = "demo_out"
    studies: int = 12
    slices: int = 32
    dicom_size: int = 512
    input_size: int = 256
    backbone: str = "resnet10t"
    seed: int = 0
    workers: int = max(1, os.cpu_count() or 1)


def run_demo(cfg: DemoConfig):
    """Synthesise, write a bundle, score; prints and returns the run summary."""
    from ichd_ray.config import JobConfig
    from ichd_ray.models.bundle import init_bundle
    from ichd_ray.ray_session import init_ray
    from ichd_ray.report import format_summary
    from ichd_ray.score import score_job

    # Synthetic patients only: a fixed salt keeps the demo quiet; real runs set their own.
    os.environ.setdefault("ICHD_PATIENT_SALT", "ichd-ray-demo")
    archive = storage.join(cfg.out, "archive")
    model = storage.join(cfg.out, "model")
    results = storage.join(cfg.out, "results")
    print(f"[1/3] synthesising {cfg.studies} head-CT studies ({cfg.slices} slices, {cfg.dicom_size}px) into {archive}")
    synth = generate(
        archive,
        SynthConfig(studies=cfg.studies, slices=cfg.slices, size=cfg.dicom_size, seed=cfg.seed, bad_files=min(3, cfg.studies)),
        workers=cfg.workers,
    )
    print(f"      {synth['slices']} slices + {synth['bad_files']} bad files, {synth['bytes'] / 1e6:.1f} MB in {synth['seconds']} s")
    print(f"[2/3] writing an untrained {cfg.backbone} bundle ({cfg.input_size}px input) to {model}")
    bundle = init_bundle(model, cfg.backbone, input_size=cfg.input_size, seed=cfg.seed, overwrite=True)
    print(f"      version {bundle.version_id}")
    print("[3/3] scoring on local Ray (index -> decode + window on CPU tasks -> CNN + sequence model on an actor)")
    init_ray()
    summary = score_job(archive, model, results, job=JobConfig(), run_id="demo", progress=False)
    print()
    print(format_summary(summary))
    print(f"\nlabels for comparison: {storage.join(archive, 'labels.csv')} (RSNA format)")
    return summary
