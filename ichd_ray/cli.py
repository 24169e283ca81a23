"""``ichd-ray`` command line: one sub-command per workflow.

Arguments are validated before any work starts; a bad value fails at once naming the flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _storage_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("storage (default: the standard AWS variables)")
    group.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    group.add_argument("--region", help="S3 region")


def _storage_config(args: argparse.Namespace):
    from ichd_ray.storage import StorageConfig

    overrides = {k: v for k, v in (("endpoint_url", args.endpoint_url), ("region", args.region)) if v}
    return StorageConfig.from_env(**overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ichd-ray", description="Intracranial hemorrhage detection on head CT, on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="write a synthetic head-CT study set with labels")
    synth.add_argument("out", help="destination: local path, file:// or s3:// prefix")
    synth.add_argument("--studies", type=_positive_int, default=20)
    synth.add_argument("--slices", type=_positive_int, default=32, help="nominal slices per study (+-20%%)")
    synth.add_argument("--size", type=_positive_int, default=512, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--compressed-fraction", type=_fraction, default=0.15)
    synth.add_argument("--bad-files", type=int, default=0, help="invalid objects to add (for testing)")
    synth.add_argument("--workers", type=_positive_int, default=max(1, os.cpu_count() or 1))
    _storage_args(synth)

    index = sub.add_parser("index", help="read headers only and write a manifest (one row per object)")
    index.add_argument("input", help="prefix to list (local, file://, s3://) or a .txt/.parquet list of URIs")
    index.add_argument("--out", required=True, help="manifest Parquet to write")
    index.add_argument("--config", help="job YAML (see ichd_ray/config.py)")
    _storage_args(index)

    score = sub.add_parser("score", help="score every study under INPUT with a model bundle")
    score.add_argument("input", nargs="?", help="prefix to list, or a .txt/.parquet list of URIs")
    score.add_argument("--model", required=True, help="model bundle URI")
    score.add_argument("--out", required=True, help="output prefix for the result tables")
    score.add_argument("--run-id", help="default: score-<UTC timestamp>; re-using one replaces that run")
    score.add_argument("--manifest", help="use this manifest instead of indexing INPUT")
    score.add_argument("--config", help="job YAML (see ichd_ray/config.py)")
    score.add_argument("--write-embeddings", action="store_true", default=None)
    score.add_argument("--num-actors", type=_positive_int)
    score.add_argument("--num-gpus-per-actor", type=float)
    score.add_argument("--device", choices=["auto", "cpu", "cuda"])
    score.add_argument("--no-progress", action="store_true")
    _storage_args(score)

    model = sub.add_parser("model", help="model bundles")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    init = model_sub.add_parser("init", help="write an untrained bundle (or one from local timm weights)")
    init.add_argument("out", help="bundle URI (folder or prefix)")
    init.add_argument("--backbone", required=True, help="timm model name, e.g. densenet121, resnet10t")
    init.add_argument("--weights", help="local .safetensors of pretrained timm weights for the backbone")
    init.add_argument("--folds", type=_positive_int, default=1)
    init.add_argument("--input-size", type=_positive_int, default=256)
    init.add_argument("--seed", type=int, default=0)
    _storage_args(init)

    results = sub.add_parser("results", help="query committed result tables with DuckDB")
    results.add_argument("out", help="output prefix of a scoring run")
    results.add_argument("--sql", default="SELECT run_id, status, model_version, n_studies, n_slices_scored, n_rejected, finished_at FROM runs ORDER BY finished_at DESC")
    _storage_args(results)

    demo = sub.add_parser("demo", help="the embedded default: synthesise a small set, write a bundle, score it on local Ray")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--studies", type=_positive_int, default=12)
    demo.add_argument("--slices", type=_positive_int, default=32)
    demo.add_argument("--dicom-size", type=_positive_int, default=512, help="synthetic image side")
    demo.add_argument("--size", type=_positive_int, default=256, help="network input side")
    demo.add_argument("--backbone", default="resnet10t", help="timm backbone of the demo bundle")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workers", type=_positive_int, default=max(1, os.cpu_count() or 1))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        from ichd_ray.synth import SynthConfig, generate

        if args.size < 32 or args.slices < 3:
            print("ichd-ray synth: --size must be >= 32 and --slices >= 3", file=sys.stderr)
            return 2
        cfg = SynthConfig(
            studies=args.studies,
            slices=args.slices,
            size=args.size,
            seed=args.seed,
            compressed_fraction=args.compressed_fraction,
            bad_files=args.bad_files,
        )
        summary = generate(args.out, cfg, workers=args.workers, storage_config=_storage_config(args))
        summary.pop("config")
        print(json.dumps(summary, indent=2))
        return 0
    if args.command in ("index", "score"):
        return _index_or_score(args)
    if args.command == "model":
        from ichd_ray.models.bundle import init_bundle

        config = init_bundle(
            args.out,
            args.backbone,
            folds=args.folds,
            input_size=args.input_size,
            weights_path=args.weights,
            seed=args.seed,
            storage_config=_storage_config(args),
        )
        print(f"wrote bundle {args.out}: version {config.version_id}, backbone {config.backbone}, {config.folds} fold(s)")
        return 0
    if args.command == "results":
        import pandas as pd

        from ichd_ray.report import query

        with pd.option_context("display.max_rows", 200, "display.width", 200, "display.max_columns", 30):
            print(query(args.out, args.sql, _storage_config(args)).to_string(index=False))
        return 0
    if args.command == "demo":
        from ichd_ray.demo import DemoConfig, run_demo

        summary = run_demo(
            DemoConfig(
                out=args.out,
                studies=args.studies,
                slices=args.slices,
                dicom_size=args.dicom_size,
                input_size=args.size,
                backbone=args.backbone,
                seed=args.seed,
                workers=args.workers,
            )
        )
        return 0 if summary.status == "succeeded" else 1
    raise AssertionError(args.command)


def _index_or_score(args: argparse.Namespace) -> int:
    from ichd_ray.config import ConfigError, load_job_config

    storage_overrides = {"endpoint_url": args.endpoint_url, "region": args.region}
    score_overrides = {}
    if args.command == "score":
        score_overrides = {
            "write_embeddings": args.write_embeddings,
            "num_actors": args.num_actors,
            "num_gpus_per_actor": args.num_gpus_per_actor,
            "device": args.device,
        }
    try:  # validated before Ray starts
        job = load_job_config(args.config, {"storage": storage_overrides, "score": score_overrides})
    except (ConfigError, FileNotFoundError) as exc:
        print(f"ichd-ray {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.command == "score" and not (args.input or args.manifest):
        print("ichd-ray score: give INPUT or --manifest", file=sys.stderr)
        return 2

    from ichd_ray.ray_session import init_ray

    init_ray(job.ray)
    if args.command == "index":
        from ichd_ray.manifest import build_manifest, write_manifest

        sc = job.storage.storage_config()
        manifest = build_manifest(args.input, job.index, sc)
        write_manifest(manifest, args.out, sc)
        counts = manifest["reason"].fillna("selected").value_counts().to_dict()
        studies = manifest.loc[manifest["selected"].astype(bool), "study_uid"].nunique()
        print(f"indexed {len(manifest)} objects, {studies} studies -> {args.out}")
        print("  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return 0

    from ichd_ray.report import format_summary
    from ichd_ray.score import score_job

    from ichd_ray.models.bundle import BundleError

    try:
        summary = score_job(
            args.input,
            args.model,
            args.out,
            job=job,
            run_id=args.run_id,
            manifest_uri=args.manifest,
            progress=not args.no_progress,
        )
    except (ConfigError, BundleError) as exc:
        print(f"ichd-ray score: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0 if summary.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
