"""Augmentation micro-benchmark: ``augment_batch`` on a batch of 64 uint8 slices, 128 and 256 px.

Moved here from ``ichd_ray.training.augment._benchmark`` (benchmark code stays out of the package).
Prints batches/s and slices/s (median and best over ``--repeats`` timed calls, after one warm-up).

    python bench/augment.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ichd_ray.training.augment import AugmentConfig, augment_batch


def run(repeats: int = 20, batch_size: int = 64, sizes: tuple[int, ...] = (128, 256)) -> list[dict]:
    """Time ``augment_batch`` per size; returns one dict per size (median and best seconds per batch)."""
    config = AugmentConfig(erase_p=0.5)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; config {config.to_dict()}")
    rows = []
    for size in sizes:
        batch = rng.integers(0, 256, (batch_size, 3, size, size), dtype=np.uint8)
        augment_batch(batch, config, rng)  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            augment_batch(batch, config, rng)
            seconds.append(time.perf_counter() - start)
        median, best = float(np.median(seconds)), min(seconds)
        print(
            f"B={batch_size} S={size}: {1 / median:.1f} batches/s median ({batch_size / median:.0f} slices/s, "
            f"{median * 1e3:.1f} ms), {1 / best:.1f} best ({best * 1e3:.1f} ms) over {repeats}"
        )
        rows.append({"size": size, "batch": batch_size, "median_s": median, "best_s": best})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per size (default 20)")
    args = parser.parse_args(argv)
    run(args.repeats)


if __name__ == "__main__":
    main()
