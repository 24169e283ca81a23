"""The embedded default job: synthesise a small study set, window every slice, print a summary.

This is what ``make demo`` runs on a fresh machine (local files, no cluster). Later stages (scoring,
training) extend it; the pieces it calls are the ones the pipelines use: :func:`ichd_ray.synth.generate`
and :func:`ichd_ray.preprocess.preprocess_slice`.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from ichd_ray import storage
from ichd_ray.dicom import DicomError, load_slice
from ichd_ray.preprocess import preprocess_slice
from ichd_ray.synth import SynthConfig, generate
from ichd_ray.windowing import window_slice

__all__ = ["DemoConfig", "window_studies", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Args:
    out: output folder (synthetic DICOMs under ``out/studies``).
    studies: number of synthetic studies.
    slices: nominal slices per study.
    dicom_size: synthetic image side (pixels).
    input_size: network input side after windowing.
    seed: synthetic set seed.
    workers: processes.
    """

    out: str = "demo_out"
    studies: int = 12
    slices: int = 32
    dicom_size: int = 512
    input_size: int = 256
    seed: int = 0
    workers: int = max(1, os.cpu_count() or 1)


def _window_study(args: tuple[list[str], int]) -> dict:
    """Window one study's files; per file either a uint8 array summary or a rejection."""
    uris, size = args
    ok, errors, brain_means = [], [], {}
    for uri in uris:
        try:
            x = preprocess_slice(uri, size)
        except DicomError as exc:
            errors.append((uri, exc.reason, exc.message))
            continue
        except OSError as exc:
            errors.append((uri, "read_error", str(exc)))
            continue
        ok.append(uri)
        brain_means[os.path.basename(uri)[: -len(".dcm")]] = float(x[0].mean())
    return {"ok": ok, "errors": errors, "brain_means": brain_means}


def window_studies(uris: list[str], size: int, workers: int) -> dict:
    """Window every file, grouped by study folder so each task has enough work (>= 0.25 s)."""
    by_study: dict[str, list[str]] = defaultdict(list)
    for uri in uris:
        by_study[uri.rsplit("/", 2)[-2]].append(uri)
    jobs = [(files, size) for _, files in sorted(by_study.items())]
    started = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_window_study, jobs))
    else:
        results = [_window_study(job) for job in jobs]
    seconds = time.perf_counter() - started
    merged: dict = {"ok": [], "errors": [], "brain_means": {}, "seconds": seconds}
    for res in results:
        merged["ok"] += res["ok"]
        merged["errors"] += res["errors"]
        merged["brain_means"].update(res["brain_means"])
    return merged


def _labels_any(labels_csv: bytes) -> dict[str, int]:
    """SOPInstanceUID -> any-label from an RSNA-format labels file."""
    out = {}
    for row in csv.DictReader(io.StringIO(labels_csv.decode())):
        image, subtype = row["ID"].rsplit("_", 1)
        if subtype == "any":
            out[image[len("ID_") :]] = int(row["Label"])
    return out


def run_demo(cfg: DemoConfig) -> dict:
    """Synthesise, window, summarise. Returns the numbers it prints."""
    # Synthetic patients only: a fixed salt keeps the demo quiet; real runs set their own.
    os.environ.setdefault("ICHD_PATIENT_SALT", "ichd-ray-demo")
    data_uri = storage.join(cfg.out, "studies")
    print(f"[1/2] synthesising {cfg.studies} head-CT studies ({cfg.slices} slices, {cfg.dicom_size}px) into {data_uri}")
    synth = generate(
        data_uri,
        SynthConfig(
            studies=cfg.studies, slices=cfg.slices, size=cfg.dicom_size, seed=cfg.seed, bad_files=min(3, cfg.studies)
        ),
        workers=cfg.workers,
    )
    print(f"      {synth['slices']} slices + {synth['bad_files']} bad files, {synth['bytes'] / 1e6:.1f} MB in {synth['seconds']} s")

    uris = [entry.uri for entry in storage.list_files(data_uri, suffix=".dcm")]
    print(f"[2/2] windowing {len(uris)} objects to uint8 [3, {cfg.input_size}, {cfg.input_size}] on {cfg.workers} processes")
    res = window_studies(uris, cfg.input_size, cfg.workers)

    # the fast path against the float reference, on a few slices
    sample = res["ok"][:: max(1, len(res["ok"]) // 5)][:5]
    max_diff = max(
        int(np.abs(preprocess_slice(u, cfg.input_size).astype(int) - window_slice(load_slice(u).hu, cfg.input_size)).max())
        for u in sample
    )
    labels = _labels_any(storage.read_bytes(storage.join(data_uri, "labels.csv")))
    pos = [v for k, v in res["brain_means"].items() if labels.get(k) == 1]
    neg = [v for k, v in res["brain_means"].items() if labels.get(k) == 0]
    reasons = Counter(reason for _, reason, _ in res["errors"])

    errors_uri = storage.join(cfg.out, "errors.csv")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["uri", "reason", "message"])
    writer.writerows(res["errors"])
    storage.write_bytes(errors_uri, buf.getvalue().encode())

    rate = len(res["ok"]) / res["seconds"] if res["seconds"] else float("nan")
    print()
    print(f"windowed   {len(res['ok'])} slices in {res['seconds']:.2f} s ({rate:.0f} slices/s)")
    print(f"rejected   {len(res['errors'])}: " + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())))
    for uri, reason, message in res["errors"]:
        print(f"           {reason:<20} {uri}: {message[:80]}")
    print(f"reference  max |fast - float reference| over {len(sample)} slices = {max_diff} (uint8 levels)")
    if pos and neg:
        print(
            f"signal     mean brain-window level: {np.mean(pos):.1f} on slices with blood ({len(pos)}), "
            f"{np.mean(neg):.1f} without ({len(neg)})"
        )
    print(f"files      DICOMs {data_uri}, labels {storage.join(data_uri, 'labels.csv')}, errors {errors_uri}")
    return {
        "windowed": len(res["ok"]),
        "rejected": dict(reasons),
        "slices_per_s": rate,
        "max_reference_diff": max_diff,
        "synth": synth,
    }
