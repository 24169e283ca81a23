"""S3 that misbehaves: a fault-injecting proxy (tests/s3_proxy.py) in front of the moto server.

At a set fault rate (503 SlowDown, 500, resets, slow answers, writes whose answer is lost) a run must
finish with the same output as a clean run, its retries bounded and counted in ``runs``; past the
retry budget, or against a read-only bucket, it must fail with nothing committed and a clear message,
and the next run must succeed.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
from s3_proxy import FaultPolicy, FaultProxy

from ichd_ray.io import storage
from ichd_ray.config.job import JobConfig, ScoreConfig
from ichd_ray.models.bundle import init_bundle
from ichd_ray.io.results import query
from ichd_ray.pipeline.score import score_job
from ichd_ray.synthetic.generate import SynthConfig, generate

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

SYNTH = SynthConfig(studies=3, slices=4, size=32, seed=21, compressed_fraction=0.0, bad_files=2)
JOB = JobConfig(score=ScoreConfig(studies_per_batch=2, studies_per_task=1, cnn_chunk=4, device="cpu"))
SLICES = "SELECT sop_uid, study_uid, uri, slice_index, p_any, p_subdural, p_epidural FROM slices ORDER BY sop_uid"
STUDIES = "SELECT study_uid, n_slices, n_slices_rejected, p_any, flagged FROM studies ORDER BY study_uid"
ERRORS = "SELECT uri, stage, reason FROM errors ORDER BY uri"


def _relative(frame: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """URIs without the archive prefix, so runs over two copies of the archive compare."""
    if "uri" in frame:
        frame = frame.assign(uri=frame["uri"].str.replace(prefix, "", regex=False))
    return frame.reset_index(drop=True)


@pytest.fixture(scope="module")
def s3_inputs(s3_server, tmp_path_factory):
    """An archive and a bundle on moto, and a clean run's output to compare with."""
    bucket = "faults"
    storage.boto3_client(s3_server.config).create_bucket(Bucket=bucket)
    archive = f"s3://{bucket}/archive"
    generate(archive, SYNTH, storage_config=s3_server.config)
    local = tmp_path_factory.mktemp("fault-bundle") / "v1"
    init_bundle(str(local), "test_resnet", folds=1, input_size=32, seed=3)
    bundle = f"s3://{bucket}/models/v1"
    for p in local.iterdir():
        storage.write_bytes(f"{bundle}/{p.name}", p.read_bytes(), s3_server.config)
    return bucket, archive, bundle


@pytest.fixture(scope="module")
def clean(ray_session, s3_server, s3_inputs):
    bucket, archive, bundle = s3_inputs
    out = f"s3://{bucket}/clean"
    summary = score_job(archive, bundle, out, job=JOB, run_id="clean", storage_config=s3_server.config)
    assert summary.status == "succeeded" and summary.storage_retries == 0
    return {sql: _relative(query(out, sql, s3_server.config), archive) for sql in (SLICES, STUDIES, ERRORS)}


def _through(proxy: FaultProxy, config: storage.StorageConfig) -> storage.StorageConfig:
    return dataclasses.replace(config, endpoint_url=proxy.endpoint_url)


def test_faults_at_a_set_rate_give_the_clean_output_with_retries_counted(ray_session, s3_server, s3_inputs, clean):
    bucket, archive, bundle = s3_inputs
    policy = FaultPolicy(rate=0.12, seed=7)
    with FaultProxy(s3_server.endpoint_url, policy) as proxy:
        out = f"s3://{bucket}/faulty"
        summary = score_job(archive, bundle, out, job=JOB, run_id="faulty", storage_config=_through(proxy, s3_server.config))
    assert summary.status == "succeeded", summary.problems
    print(f"fault rate {policy.rate}: {policy.requests} requests, injected {dict(policy.injected)}, "
          f"retries counted {summary.storage_retries}, {summary.seconds:.1f} s")
    assert sum(policy.injected.values()) >= 5 and set(policy.injected) >= {"slowdown", "internal", "reset"}, policy.injected
    # every injected fault (but a slow answer) was answered by one retry, and the runs row counts them:
    # all but those of the commit itself and the clean-up after it, which the row cannot contain
    commit = next(i for i, (method, path, _) in enumerate(policy.log) if method == "PUT" and "/runs/" in path)
    assert summary.storage_retries == sum(f not in (None, "slow") for _, _, f in policy.log[:commit])
    run = query(out, "SELECT n_storage_retries FROM runs", s3_server.config)
    assert run["n_storage_retries"].iloc[0] == summary.storage_retries
    for sql, expected in clean.items():
        pd.testing.assert_frame_equal(_relative(query(out, sql, s3_server.config), archive), expected)


def test_past_the_retry_budget_the_run_stops_uncommitted_and_the_next_succeeds(ray_session, s3_server, s3_inputs, clean):
    bucket, archive, bundle = s3_inputs
    out = f"s3://{bucket}/budget"
    # every read of an archive object is throttled: the decode tasks exhaust their retries
    policy = FaultPolicy(rate=1.0, faults=("slowdown",), methods=("GET",), path_contains="/archive/")
    manifest = f"s3://{bucket}/budget-manifest.parquet"
    from ichd_ray.pipeline.index import build_manifest, write_manifest

    write_manifest(build_manifest(archive, JOB.index, s3_server.config), manifest, s3_server.config)
    with FaultProxy(s3_server.endpoint_url, policy) as proxy:
        with pytest.raises(storage.StorageUnavailable, match=r"/archive/.*unavailable after 5 attempts: SlowDown"):
            score_job(None, bundle, out, job=JOB, run_id="budget", manifest_uri=manifest, storage_config=_through(proxy, s3_server.config))
    assert policy.injected["slowdown"] >= storage.S3_MAX_ATTEMPTS
    assert not storage.list_files(f"{out}/runs", config=s3_server.config)  # nothing committed
    summary = score_job(None, bundle, out, job=JOB, run_id="budget", manifest_uri=manifest, storage_config=s3_server.config)
    assert summary.status == "succeeded"
    for sql, expected in clean.items():
        pd.testing.assert_frame_equal(_relative(query(out, sql, s3_server.config), archive), expected)
    # the failed attempt's partial files are gone once the re-run committed
    attempts = {e.uri.split("/attempt=")[1].split("/")[0] for e in storage.list_files(f"{out}/slices", config=s3_server.config)}
    assert attempts == {summary.attempt}


def test_a_read_only_bucket_fails_clearly_with_nothing_visible(ray_session, s3_server, s3_inputs, clean):
    bucket, archive, bundle = s3_inputs
    out = f"s3://{bucket}/readonly"
    policy = FaultPolicy(read_only=True)
    with FaultProxy(s3_server.endpoint_url, policy) as proxy:
        with pytest.raises(PermissionError, match=r"Access denied \(AccessDenied\): s3://faults/readonly/"):
            score_job(archive, bundle, out, job=JOB, run_id="ro", storage_config=_through(proxy, s3_server.config))
    assert policy.injected["read_only"] >= 1
    assert not storage.list_files(out, config=s3_server.config)  # not one object was written
    summary = score_job(archive, bundle, out, job=JOB, run_id="ro", storage_config=s3_server.config)
    assert summary.status == "succeeded"
    pd.testing.assert_frame_equal(_relative(query(out, SLICES, s3_server.config), archive), clean[SLICES])


def test_nightly_through_faults_commits_what_a_clean_night_does(ray_session, s3_server, s3_inputs):
    from ichd_ray.pipeline.nightly import nightly

    bucket, archive, bundle = s3_inputs
    clean_out, faulty_out = f"s3://{bucket}/night-clean", f"s3://{bucket}/night-faulty"
    run = dict(job=JOB, max_reject_fraction=0.5, lease_ttl=None)
    clean_night = nightly(archive, bundle, clean_out, run_id="n1", storage_config=s3_server.config, **run)
    assert clean_night.summary.status == "succeeded"
    # lease puts, plan and index writes, DuckDB reads of the last commit: all through the faults
    policy = FaultPolicy(rate=0.1, seed=11)
    with FaultProxy(s3_server.endpoint_url, policy) as proxy:
        faulty = nightly(archive, bundle, faulty_out, run_id="n1", storage_config=_through(proxy, s3_server.config), **run)
        again = nightly(archive, bundle, faulty_out, run_id="n2", storage_config=_through(proxy, s3_server.config), **run)
    print(f"nightly at fault rate {policy.rate}: {policy.requests} requests, injected {dict(policy.injected)}, "
          f"retries counted {faulty.summary.storage_retries} + {again.summary.storage_retries}")
    assert faulty.summary.status == "succeeded" and sum(policy.injected.values()) >= 3
    assert again.plan.plan.empty and again.summary.status == "succeeded"  # the second night: nothing changed
    for sql in (SLICES, STUDIES, ERRORS, "SELECT study_uid, n_slices, p_any FROM latest_studies ORDER BY study_uid"):
        got = query(faulty_out, sql, s3_server.config)
        want = query(clean_out, sql, s3_server.config)
        pd.testing.assert_frame_equal(got, want)
    assert not storage.exists(f"{faulty_out}/_lease.json", s3_server.config)  # released
