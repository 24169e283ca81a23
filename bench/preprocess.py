"""Per-slice CPU stage on one core: ``preprocess_slice(bytes, 256)`` against a naive reference.

Naive reference = what most RSNA kernels do: ``dcmread`` -> ``pixel_array`` -> float64 HU ->
three ``np.clip`` windows -> area resize to 256 (windowing before resizing, as they do; the
resize is the fastest plain-numpy block mean, so the baseline is not handicapped). Both run in the same process, pinned to one core, on
the same in-memory bytes (no storage I/O), interleaved in rounds so drift hits both alike.

    python bench/preprocess.py [--slices 200] [--rounds 3] [--write]

``--write`` replaces the preprocess section of BENCHMARKS.md with this run's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ICHD_PATIENT_SALT", "bench")

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from ichd_ray.dicom.preprocess import preprocess_slice  # noqa: E402
from ichd_ray.synthetic.generate import SynthConfig, plan_study, render_slice, slice_dataset  # noqa: E402
from ichd_ray.dicom.windowing import DEFAULT_WINDOWS, area_resize, window_slice  # noqa: E402
from ichd_ray.dicom.read import load_slice  # noqa: E402

from benchmarks_md import write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


def naive(data: bytes, size: int) -> np.ndarray:
    ds = pydicom.dcmread(io.BytesIO(data))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    x = np.stack([np.clip((hu - (w.level - w.width / 2)) / w.width, 0, 1) * 255 for w in DEFAULT_WINDOWS])
    k = x.shape[1] // size
    if k * size != x.shape[1]:
        return np.rint(np.stack([area_resize(c, size) for c in x])).astype(np.uint8)
    # block mean from strided views: the fastest plain-numpy resize (reshape().mean() is ~5x slower)
    acc = sum(x[:, i::k, j::k] for i in range(k) for j in range(k))
    return np.rint(acc / (k * k)).astype(np.uint8)


def synthetic_slices(n: int, encoding: str, syntax: str, size: int = 512) -> list[bytes]:
    cfg = SynthConfig(studies=1, slices=max(n, 3), size=size, seed=42, slice_jitter=0.0)
    plan = dataclasses.replace(plan_study(cfg, 0, 0), encoding=encoding, transfer_syntax=syntax)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        hu, _ = render_slice(plan, i, cfg.difficulty, rng)
        buf = io.BytesIO()
        slice_dataset(plan, i, hu, cfg.seed).save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def rate(fn, slices: list[bytes], size: int) -> float:
    started = time.perf_counter()
    for data in slices:
        fn(data, size)
    return len(slices) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    n_compressed = max(10, args.slices // 10)
    cases = [
        ("synthetic int16, uncompressed", synthetic_slices(args.slices, "int16", pydicom.uid.ExplicitVRLittleEndian), True),
        ("synthetic 12-bit unsigned, uncompressed", synthetic_slices(args.slices, "uint12", pydicom.uid.ExplicitVRLittleEndian), True),
        ("synthetic 12-bit wrapped (RSNA fix), uncompressed", synthetic_slices(args.slices, "uint12_wrapped", pydicom.uid.ExplicitVRLittleEndian), False),
        ("real CT 693_UNCR.dcm (14-bit signed)", [Path(get_testdata_file("693_UNCR.dcm")).read_bytes()] * args.slices, True),
        ("synthetic int16, RLE lossless", synthetic_slices(n_compressed, "int16", pydicom.uid.RLELossless), True),
        ("synthetic int16, JPEG 2000 lossless", synthetic_slices(n_compressed, "int16", pydicom.uid.JPEG2000Lossless), True),
        ("synthetic int16, JPEG-LS lossless", synthetic_slices(n_compressed, "int16", pydicom.uid.JPEGLSLossless), True),
    ]
    rows = []
    for label, slices, naive_applies in cases:
        # same output (+-1) as the float reference, checked on the first slice
        ref = window_slice(load_slice(slices[0]).hu, args.size)
        assert np.abs(preprocess_slice(slices[0], args.size).astype(int) - ref).max() <= 1, label
        for fn in (preprocess_slice, naive):
            fn(slices[0], args.size)  # warm caches (LUTs, imports)
        fast, slow = [], []
        for _ in range(args.rounds):
            fast.append(rate(preprocess_slice, slices, args.size))
            if naive_applies:  # the naive path has no RSNA fix: its output would be wrong there
                slow.append(rate(naive, slices, args.size))
        rows.append((label, len(slices), np.median(fast), np.median(slow) if slow else None))
        naive_text = f"{rows[-1][3]:,.0f}" if slow else "n/a"
        print(f"{label:<52} n={len(slices):<4} preprocess_slice {rows[-1][2]:>7,.0f}/s   naive {naive_text:>7}/s", flush=True)

    table = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'}), one core used; "
        f"Python {platform.python_version()}, numpy {np.__version__}, pydicom {pydicom.__version__}.  ",
        f"Date: {dt.date.today().isoformat()}. Command: `python bench/preprocess.py --slices {args.slices} --rounds {args.rounds}` "
        f"(median of {args.rounds} rounds; 512x512 input -> uint8 [3, {args.size}, {args.size}]; bytes in memory).",
        "",
        "| input (512x512) | slices | `preprocess_slice` slices/s | naive slices/s | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, n, fast, slow in rows:
        speed = f"{fast / slow:.1f}x" if slow else "n/a"
        table.append(f"| {label} | {n} | {fast:,.0f} | {f'{slow:,.0f}' if slow else 'n/a (no RSNA fix)'} | {speed} |")
    text = "\n".join(table)
    print()
    print(text)
    if args.write:
        write_section("preprocess", "CPU preprocess stage (`bench/preprocess.py`)", text)

if __name__ == "__main__":
    main()
