"""S3 fault rates vs retries and wall time: score_job through the fault proxy (tests/s3_proxy.py).

    .venv/bin/python bench/faults.py [--rates 0 0.05 0.1 0.2] [--studies 8] [--write]

One moto server on 127.0.0.1, one archive of distinct synthetic studies, one bundle; for each fault rate
a scoring run through the proxy (503 SlowDown, 500, resets, slow answers, lost write answers drawn
uniformly), checked against the clean run's slices and studies, with the retries it counted and its
wall time. With ``--write`` the table goes to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the proxy is a test fixture; the bench reuses it as is
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks_md import write_section  # noqa: E402
from s3_proxy import FaultPolicy, FaultProxy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()

    os.environ.setdefault("ICHD_PATIENT_SALT", "bench-salt")
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    import ray
    from moto.server import ThreadedMotoServer

    from ichd_ray.io import storage
    from ichd_ray.config.job import JobConfig, ScoreConfig
    from ichd_ray.models.bundle import init_bundle
    from ichd_ray.io.results import query
    from ichd_ray.pipeline.score import score_job
    from ichd_ray.synthetic.generate import SynthConfig, generate

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address  # moto binds port 0 to a free one
    endpoint = f"http://{host}:{port}"
    config = storage.StorageConfig(endpoint_url=endpoint, region="us-east-1", access_key_id="testing", secret_access_key="testing")
    storage.boto3_client(config).create_bucket(Bucket="bench")
    archive = "s3://bench/archive"
    generate(archive, SynthConfig(studies=args.studies, slices=args.slices, size=64, seed=args.seed, bad_files=2), storage_config=config)
    with tempfile.TemporaryDirectory() as tmp:
        init_bundle(f"{tmp}/v1", "test_resnet", input_size=32, seed=1)
        for p in Path(tmp, "v1").iterdir():
            storage.write_bytes(f"s3://bench/models/v1/{p.name}", p.read_bytes(), config)
    bundle = "s3://bench/models/v1"
    job = JobConfig(score=ScoreConfig(studies_per_batch=2, studies_per_task=2, cnn_chunk=8, device="cpu"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    sql = "SELECT sop_uid, p_any, p_subdural FROM slices ORDER BY sop_uid"
    rows, reference = [], None
    for rate in args.rates:
        policy = FaultPolicy(rate=rate, seed=int(rate * 1000) + 1)
        with FaultProxy(endpoint, policy) as proxy:
            started = time.perf_counter()
            summary = score_job(archive, bundle, f"s3://bench/out-{rate}", job=job, run_id="bench",
                                storage_config=dataclasses.replace(config, endpoint_url=proxy.endpoint_url))
            seconds = time.perf_counter() - started
        slices = query(f"s3://bench/out-{rate}", sql, config)
        reference = slices if reference is None else reference
        same = slices.equals(reference)
        rows.append((rate, policy.requests, dict(policy.injected), summary.storage_retries, seconds, summary.status, same))
        print(rows[-1], file=sys.stderr)
    ray.shutdown()
    server.stop()

    lines = [
        f"{dt.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, no GPU; `.venv/bin/python bench/faults.py "
        f"--rates {' '.join(str(r) for r in args.rates)} --studies {args.studies} --slices {args.slices}`: "
        f"score_job on the moto server through the fault proxy, {args.studies} distinct studies × ~{args.slices} slices "
        "at 64 px + 2 bad files + 3 side files, test_resnet at 32 px. Faults drawn uniformly from 503 SlowDown, 500, "
        "connection reset, a 0.3 s slow answer, and a write whose answer is dropped after it landed.",
        "",
        "| fault rate | requests | faults injected | retries counted in `runs` | wall time | status | slices equal the clean run |",
        "|---|---|---|---|---|---|---|",
    ]
    base = rows[0][4]
    for rate, requests, injected, retries, seconds, status, same in rows:
        mix = ", ".join(f"{k} {v}" for k, v in sorted(injected.items())) or "none"
        lines.append(f"| {rate:.0%} | {requests} | {sum(injected.values())} ({mix}) | {retries} | {seconds:.1f} s "
                     f"({seconds / base - 1:+.0%}) | {status} | {'yes' if same else 'NO'} |")
    lines += [
        "",
        "Retries counted are botocore's, from the bundle read to the last part file; those of the commit PUT and "
        "the clean-up after it cannot be in the row they write. A slow answer needs no retry. Past "
        f"{storage.S3_MAX_ATTEMPTS} attempts a request raises `StorageUnavailable` and the run stops "
        "uncommitted (`tests/test_fault_s3.py`).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("faults-s3", "S3 faults: retries and wall time (`bench/faults.py`)", text)


if __name__ == "__main__":
    main()
