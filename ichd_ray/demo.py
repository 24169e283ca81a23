"""The embedded default job: synthesise a study set, train on it, score it, evaluate, on local Ray.

This is what ``make demo`` runs on a fresh machine (local Ray, local files, no cluster): the same
``synth`` -> ``train all --recipe demo`` -> ``score`` -> ``evaluate`` steps a user runs from the README,
ending with where the Parquet is and how to query it. The scored set is the training set itself (the
demo shows the system; the honest out-of-fold figures are the training table it prints first).
"""

from __future__ import annotations

import logging
import os
import time

import ray.data

from ichd_ray.config.demo import DemoConfig
from ichd_ray.config.recipes import load_recipe
from ichd_ray.io.config_files import load_train_config
from ichd_ray.evaluation.evaluate import evaluate, format_table
from ichd_ray.io import storage
from ichd_ray.io.results import format_summary
from ichd_ray.pipeline.ray_session import init_ray
from ichd_ray.pipeline.score import score_job
from ichd_ray.synthetic.generate import SynthConfig, generate
from ichd_ray.training.recipe import train_all

__all__ = ["DemoConfig", "run_demo"]


def run_demo(cfg: DemoConfig):
    """Synthesise, train, score, evaluate; prints each step and returns the scoring run summary."""
    started = time.perf_counter()
    # Synthetic patients only: a fixed salt keeps the demo quiet; real runs set their own.
    os.environ.setdefault("ICHD_PATIENT_SALT", "ichd-ray-demo")
    train_cfg = load_train_config("demo", cfg.config)
    archive = storage.join(cfg.out, "archive")
    labels = storage.join(archive, "labels.csv")
    model = storage.join(cfg.out, "model")
    results = storage.join(cfg.out, "results")
    print(f"[1/4] synthesising {cfg.studies} head-CT studies ({cfg.slices} slices, {cfg.dicom_size}px) into {archive}")
    synth = generate(
        archive,
        SynthConfig(studies=cfg.studies, slices=cfg.slices, size=cfg.dicom_size, seed=cfg.seed, bad_files=3),
        workers=cfg.workers,
    )
    print(f"      {synth['slices']} slices + {synth['bad_files']} bad files, {synth['bytes'] / 1e6:.1f} MB in {synth['seconds']} s")

    init_ray(train_cfg.ray)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray.data", "ray.train"):  # the demo prints its own progress lines
        logging.getLogger(name).setLevel(logging.WARNING)
    print(f"[2/4] training (recipe demo: {train_cfg.data.folds} folds, {train_cfg.cnn.backbone} at {train_cfg.data.input_size}px) on local Ray")
    trained = train_all(archive, labels, model, train_cfg, overwrite=True,
                        recipe={**load_recipe("demo").provenance(), "config_file": cfg.config}, log=lambda line: print("   " + line))
    print()
    print("\n".join("      " + line for line in trained.table.splitlines()))
    print(f"      bundle {model}: version {trained.version_id} ({trained.seconds:.0f} s)")

    print("[3/4] scoring the archive with the trained bundle (decode on CPU tasks -> CNN + sequence on an actor)")
    summary = score_job(archive, model, results, job=train_cfg.job_config().with_overrides({"score": {"write_embeddings": False}}),
                        run_id="demo", progress=False)
    print("\n".join("      " + line for line in format_summary(summary).splitlines()))

    print("[4/4] evaluating the scored run against the labels")
    # The bundle's slice thresholds on slices, its study thresholds on the studies table.
    result = evaluate(results, labels, storage.join(results, "evaluation", "demo.json"), run_id="demo", model=model)
    print("\n".join("      " + line for line in format_table(result).splitlines()))
    print(f"\ndone in {time.perf_counter() - started:.0f} s. The result Parquet is under {results}/ (slices, studies, errors, runs);")
    print(f"query it:  ichd-ray results {results} --sql \"SELECT study_uid, p_any, flagged FROM studies ORDER BY p_any DESC LIMIT 10\"")
    print("DuckDB/pandas/Athena: the views in ichd_ray/io/sql/views.sql read only committed runs (README: Result tables)")
    return summary

