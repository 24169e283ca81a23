"""Nightly cost model: measured index and scoring rates, and a sizing for a 1 M-study archive.

    python bench/nightly.py --archive /tmp/ichd-bench-train/data --write
    python bench/nightly.py --scale 1e5,1e6,1e7 --changed 0,0.01 [--engine duckdb,pandas] --write

``--scale``: the table work of a night at archive scale, on synthesised indexes (no files); see
``bench/nightly_scale.py``.

Three nights on one archive with one bundle, on local Ray:
  1. first night: every object's header is read, every study scored (index objects/s, slices/s);
  2. nothing changed: listing + diff only, nothing scored (the incremental index's fixed cost);
  3. the same archive with a new model version: everything rescored, headers not read again.
The figures and a worked sizing for 1 M studies (~40 M slices) per night go to BENCHMARKS.md (--write).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", help="a synthetic (or any) DICOM archive")
    parser.add_argument("--scale", help="comma-separated object counts (e.g. 1e5,1e6,1e7): the table work alone")
    parser.add_argument("--changed", default="0,0.01", help="with --scale: fractions of studies changed")
    parser.add_argument("--engine", default="duckdb", help="with --scale: duckdb (today) and/or pandas (before issue 11)")
    parser.add_argument("--root", default="/tmp/ichd-bench-nightly")
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.scale:
        return scale(args)
    if not args.archive:
        parser.error("--archive (or --scale) is required")

    os.environ.setdefault("ICHD_PATIENT_SALT", "bench")
    import ray
    import ray.data

    from ichd_ray.config.job import JobConfig
    from ichd_ray.models.bundle import init_bundle
    from ichd_ray.pipeline.nightly import make_plan, nightly

    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    v1, v2 = str(root / "v1"), str(root / "v2")
    init_bundle(v1, args.backbone, input_size=args.input_size, seed=1)
    init_bundle(v2, args.backbone, input_size=args.input_size, seed=2)
    out = str(root / "out")
    job = JobConfig().with_overrides({"score": {"device": "cpu"}})
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    day = dt.datetime(2026, 11, 1, 2, tzinfo=dt.timezone.utc)

    rows = []
    for night, bundle, label in ((1, v1, "first night: read every header, score everything"),
                                 (2, v1, "no change: list + diff, score nothing"),
                                 (3, v2, "new model version: rescore everything, no header reads")):
        now = day + dt.timedelta(days=night)
        t0 = time.perf_counter()
        plan = make_plan(args.archive, bundle, out, job=job, now=now)  # the index pass alone, timed
        index_s = time.perf_counter() - t0
        result = nightly(args.archive, bundle, out, job=job, now=now, max_reject_fraction=1.0)
        s = result.summary
        objects = plan.counts["objects"]
        rows.append((label, objects, len(plan.new_objects), index_s, len(plan.plan), s.n_slices_scored, s.seconds, result.seconds))
        print(rows[-1], file=sys.stderr)

    first, unchanged, rescore = rows
    header_rate = first[2] / first[3]
    diff_rate = unchanged[1] / unchanged[3]
    score_rate = rescore[5] / rescore[6]
    cpus = os.cpu_count()
    lines = [
        f"Machine: {platform.machine()}, {cpus} CPUs, no GPU; {dt.date.today()}; local files; bundle {args.backbone} at {args.input_size}px (CPU).",
        f"Command: `python bench/nightly.py --archive {args.archive} --write`.",
        "",
        "| night | objects | headers read | index pass | studies scored | slices scored | score_job | whole run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, objects, read, index_s, studies, slices, score_s, total_s in rows:
        lines.append(f"| {label} | {objects} | {read} | {index_s:.1f} s | {studies} | {slices} | {score_s:.1f} s | {total_s:.1f} s |")
    lines += [
        "",
        f"- Index, headers read (ranged GET of 64 KiB + parse, Ray tasks): **{header_rate:.0f} objects/s** on {cpus} CPUs "
        f"({header_rate / cpus:.0f} per CPU).",
        f"- Index, nothing changed (listing + diff against the committed index): **{diff_rate:.0f} objects/s**.",
        f"- Scoring on CPU ({args.backbone}, one 0.5-CPU actor): **{score_rate:.1f} slices/s** whole `score_job`, "
        "fixed start-up included.",
        "",
        "Worked sizing, 1 M studies ≈ 40 M slices, on GPU nodes (g5.xlarge-like: 4 vCPU + 1 GPU, or 16 vCPU + 1 GPU):",
        "",
        "- Decode + window is CPU work: 1,283–1,342 slices/s per core measured for 512² uncompressed input",
        "  (`bench/preprocess.py`), 78–81% of that reached through Ray at 96 studies (`bench/score.py`): take",
        "  ~1,000 slices/s per core. A full rescoring (new model) of 40 M slices needs 40,000 core-seconds ≈",
        "  11 core-hours of decode: a 16-vCPU GPU node decodes ~16,000 slices/s.",
        "- The GPU stage was not measured (this task was not lent a GPU). With R slices/s per GPU for the",
        "  bundle's CNN + sequence model, a full rescoring takes 40 M / R GPU-seconds: 11.1 GPU-hours at",
        "  R = 1,000, 5.6 at R = 2,000, 2.8 at R = 4,000 (e.g. 8 GPUs: 83, 42 or 21 min). Measure R with",
        "  `bench/score.py` on the GPU node before sizing; the CPU side above keeps up with R up to ~16,000",
        "  per 16-vCPU node.",
        f"- A normal night scores only new and changed studies (say 1% = 400 k slices: 400 k / R GPU-seconds), "
        f"but lists and diffs every object: 40 M objects at the {diff_rate:.0f} objects/s measured here "
        f"= {40e6 / diff_rate / 3600:.1f} h on one driver at this small archive's rate, fixed costs included; the table",
        "  work itself is DuckDB over the committed Parquet (`--scale`: 6.5 s for an unchanged night over 10^7",
        "  objects), so at this scale the listing (S3 LIST: 1,000 keys per request, or an S3 Inventory) dominates.",
        f"- New objects' headers: {header_rate / cpus:.0f} objects/s per CPU here (local disk); on S3 each is one",
        "  ranged GET, so the rate is set by S3 latency, not measured here: measure it on the cluster before sizing.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        from benchmarks_md import write_section

        write_section("nightly", "Nightly cost model (`bench/nightly.py`)", text)
    return 0


def scale(args) -> int:
    from nightly_scale import run_scale, table

    sizes = [int(float(x)) for x in args.scale.split(",")]
    changed = [float(x) for x in args.changed.split(",")]
    results = run_scale(sizes, changed, args.engine.split(","), check=True)
    text = "\n".join([
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; {dt.date.today()}. "
        f"Command: `python bench/nightly.py --scale {args.scale} --changed {args.changed} --engine {args.engine}`.",
        "",
        table(results),
    ])
    print(text)
    if args.write:
        from benchmarks_md import write_section

        write_section(f"nightly-scale-{args.engine.replace(',', '-')}", f"Nightly table work at scale (`bench/nightly.py --scale`, {args.engine})", text)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
