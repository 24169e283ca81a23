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

    demo = sub.add_parser("demo", help="the embedded default: synthesise a small set and window it")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--studies", type=_positive_int, default=12)
    demo.add_argument("--slices", type=_positive_int, default=32)
    demo.add_argument("--dicom-size", type=_positive_int, default=512, help="synthetic image side")
    demo.add_argument("--size", type=_positive_int, default=256, help="network input side")
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
    if args.command == "demo":
        from ichd_ray.demo import DemoConfig, run_demo

        run_demo(
            DemoConfig(
                out=args.out,
                studies=args.studies,
                slices=args.slices,
                dicom_size=args.dicom_size,
                input_size=args.size,
                seed=args.seed,
                workers=args.workers,
            )
        )
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
