"""ichd_ray.lease on local files and on moto's S3 server (which enforces conditional writes)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from botocore.exceptions import ClientError

from ichd_ray import storage
from ichd_ray.lease import (
    Lease,
    LeaseHeld,
    LeaseKeeper,
    LeaseLost,
    acquire,
    default_holder,
    lease_uri,
    release,
    renew,
)
from ichd_ray.storage import StorageConfig

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 11, 24, 2, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)

Target = tuple[str, "StorageConfig | None"]


@pytest.fixture(params=["local", "s3"])
def target(request: pytest.FixtureRequest, tmp_path) -> Target:
    """A lease URI on each backend: ``(uri, storage_config)``."""
    if request.param == "local":
        return lease_uri(tmp_path / "out"), None
    bucket, config = request.getfixturevalue("s3_bucket")
    return lease_uri(f"s3://{bucket}/out"), config


def _holder_now(uri: str, config: StorageConfig | None) -> str | None:
    """Who the stored lease names, or None if there is no lease."""
    if not storage.exists(uri, config):
        return None
    return json.loads(storage.read_bytes(uri, config))["holder"]


# ------------------------------------------------------------------------- the endpoint itself


def test_moto_enforces_conditional_requests(s3_bucket: tuple[str, StorageConfig]) -> None:
    """The S3 tests below prove something only if the endpoint really evaluates the conditions."""
    bucket, config = s3_bucket
    client = storage.boto3_client(config)
    etag = client.put_object(Bucket=bucket, Key="k", Body=b"1")["ETag"]
    attempts = {
        "put If-None-Match": lambda: client.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*"),
        "put If-Match": lambda: client.put_object(Bucket=bucket, Key="k", Body=b"2", IfMatch='"0"'),
        "delete If-Match": lambda: client.delete_object(Bucket=bucket, Key="k", IfMatch='"0"'),
    }
    for name, attempt in attempts.items():
        with pytest.raises(ClientError) as info:
            attempt()
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412, name
    # The object is untouched, and a matching condition succeeds.
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"1"
    client.delete_object(Bucket=bucket, Key="k", IfMatch=etag)
    assert not storage.exists(f"s3://{bucket}/k", config)


# ------------------------------------------------------------------------------- acquire / held


def test_second_acquire_raises_lease_held(target: Target) -> None:
    uri, config = target
    first = acquire(uri, holder="run-a", ttl=HOUR, storage_config=config, now=T0)
    assert first.expires_at == T0 + HOUR and first.holder == "run-a" and first.etag

    with pytest.raises(LeaseHeld) as info:
        acquire(uri, holder="run-b", ttl=HOUR, storage_config=config, now=T0 + timedelta(minutes=59))
    held = info.value
    assert (held.holder, held.expires_at, held.uri) == ("run-a", T0 + HOUR, uri)
    assert str(held) == f"lease {uri} is held by run-a until 2026-11-24T03:00:00Z"
    assert _holder_now(uri, config) == "run-a"


def test_takeover_after_expiry_and_old_holder_loses(target: Target) -> None:
    uri, config = target
    first = acquire(uri, holder="run-a", ttl=HOUR, storage_config=config, now=T0)
    second = acquire(uri, holder="run-b", ttl=HOUR, storage_config=config, now=T0 + HOUR)
    assert second.etag != first.etag and second.expires_at == T0 + 2 * HOUR

    with pytest.raises(LeaseLost) as info:
        renew(first, ttl=HOUR, now=T0 + HOUR)
    assert info.value.current_holder == "run-b"
    with pytest.raises(LeaseLost):
        release(first)
    assert _holder_now(uri, config) == "run-b"  # the old holder's release left it alone

    renewed = renew(second, ttl=HOUR, now=T0 + HOUR + timedelta(minutes=30))
    assert renewed.expires_at == T0 + 2 * HOUR + timedelta(minutes=30) and renewed.etag != second.etag
    release(renewed)
    assert _holder_now(uri, config) is None


def _race_for_stale_lease(uri: str, config: StorageConfig | None, contenders: int) -> list[Lease | LeaseHeld]:
    """Leave an expired lease, then let ``contenders`` threads try to take it over at the same moment."""
    acquire(uri, holder="stale", ttl=HOUR, storage_config=config, now=T0)
    barrier = threading.Barrier(contenders)
    results: list[Lease | LeaseHeld | None] = [None] * contenders

    def contend(i: int) -> None:
        barrier.wait()
        try:
            results[i] = acquire(uri, holder=f"c{i}", ttl=HOUR, storage_config=config, now=T0 + 2 * HOUR)
        except LeaseHeld as exc:
            results[i] = exc

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def test_concurrent_takeovers_exactly_one_wins(target: Target) -> None:
    uri, config = target
    for round_ in range(5):  # a few rounds, since a lost race shows up only sometimes
        results = _race_for_stale_lease(uri, config, contenders=4)
        winners = [r for r in results if isinstance(r, Lease)]
        assert len(winners) == 1, f"round {round_}: {results}"
        winner = winners[0]
        assert all(isinstance(r, LeaseHeld) and r.holder == winner.holder for r in results if r is not winner)
        assert _holder_now(uri, config) == winner.holder
        release(winner)


def test_release_falls_back_to_compare_then_delete(
    s3_bucket: tuple[str, StorageConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a botocore that lacks DeleteObject IfMatch, release still never deletes another holder's lease."""
    bucket, config = s3_bucket
    uri = lease_uri(f"s3://{bucket}/out")
    monkeypatch.setattr("ichd_ray.lease._supports_conditional_delete", lambda client: False)
    first = acquire(uri, holder="run-a", ttl=HOUR, storage_config=config, now=T0)
    second = acquire(uri, holder="run-b", ttl=HOUR, storage_config=config, now=T0 + HOUR)
    with pytest.raises(LeaseLost):
        release(first)
    assert _holder_now(uri, config) == "run-b"
    release(second)
    assert _holder_now(uri, config) is None


def test_release_then_acquire_and_release_twice(target: Target) -> None:
    uri, config = target
    first = acquire(uri, holder="run-a", storage_config=config)
    release(first)
    release(first)  # already gone: a no-op
    second = acquire(uri, holder="run-b", storage_config=config)
    assert _holder_now(uri, config) == "run-b"
    release(second)
    with pytest.raises(LeaseLost):
        renew(first)  # renewing must not resurrect a released lease
    assert _holder_now(uri, config) is None


def test_corrupt_body_counts_as_expired(target: Target, caplog: pytest.LogCaptureFixture) -> None:
    uri, config = target
    storage.write_bytes(uri, b'{"holder": "half-writ', config)
    with caplog.at_level(logging.WARNING, logger="ichd_ray.lease"):
        lease = acquire(uri, holder="run-b", storage_config=config)
    assert "unreadable" in caplog.text
    assert _holder_now(uri, config) == "run-b"
    release(lease)


def test_lease_body_is_json(target: Target) -> None:
    uri, config = target
    lease = acquire(uri, holder="run-a", ttl=HOUR, storage_config=config, now=T0)
    body = json.loads(storage.read_bytes(uri, config))
    assert body == {
        "holder": "run-a",
        "acquired_at": "2026-11-24T02:00:00.000000Z",
        "expires_at": "2026-11-24T03:00:00.000000Z",
        "renewed_at": "2026-11-24T02:00:00.000000Z",
    }
    renewed = renew(lease, ttl=HOUR, now=T0 + timedelta(minutes=10))
    body = json.loads(storage.read_bytes(uri, config))
    assert body["acquired_at"] == "2026-11-24T02:00:00.000000Z"  # kept across renewals
    assert body["renewed_at"] == "2026-11-24T02:10:00.000000Z"
    assert body["expires_at"] == "2026-11-24T03:10:00.000000Z"
    release(renewed)


def test_local_file_uri_and_lock_file(tmp_path) -> None:
    uri = "file://" + str(tmp_path / "nested" / "dir" / "_lease.json")
    lease = acquire(uri, holder="run-a")
    path = tmp_path / "nested" / "dir" / "_lease.json"
    assert path.is_file() and (tmp_path / "nested" / "dir" / "_lease.json.lock").is_file()
    with pytest.raises(LeaseHeld):
        acquire(str(path), holder="run-b")  # the same file, named as a plain path
    release(lease)
    assert not path.exists()


# ------------------------------------------------------------------------------------ keeper


def test_keeper_renews_and_releases(target: Target) -> None:
    uri, config = target
    ttl = timedelta(seconds=1.2)
    with LeaseKeeper(uri, holder="keeper", ttl=ttl, interval=0.2, storage_config=config) as keeper:
        first_expiry = keeper.lease.expires_at
        with pytest.raises(LeaseHeld):
            acquire(uri, holder="intruder", storage_config=config)
        deadline = time.monotonic() + 5
        while keeper.lease.expires_at == first_expiry and time.monotonic() < deadline:
            time.sleep(0.05)
        assert keeper.lease.expires_at > first_expiry
        time.sleep(1.5)  # longer than ttl: only renewals keep it alive
        keeper.check()
        assert _holder_now(uri, config) == "keeper"
    assert _holder_now(uri, config) is None
    assert keeper.lost is None


def test_keeper_check_raises_after_takeover(target: Target) -> None:
    uri, config = target
    with LeaseKeeper(uri, holder="keeper", ttl=timedelta(seconds=5), interval=0.1, storage_config=config) as keeper:
        later = datetime.now(timezone.utc) + HOUR  # as seen by a host whose clock says it expired
        acquire(uri, holder="thief", storage_config=config, now=later)
        deadline = time.monotonic() + 5
        while keeper.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseLost) as info:
            keeper.check()
        assert info.value.current_holder == "thief"
    assert _holder_now(uri, config) == "thief"  # exit did not delete the new holder's lease


def test_keeper_exit_is_prompt(tmp_path) -> None:
    keeper = LeaseKeeper(tmp_path / "_lease.json", holder="keeper")  # default: renew every 30 min
    start = time.monotonic()
    with keeper:
        pass
    assert time.monotonic() - start < 2
    assert not (tmp_path / "_lease.json").exists()
    keeper.close()  # idempotent


# ------------------------------------------------------------------------------------ details


def test_exceptions_pickle_and_holder_format() -> None:
    held = pickle.loads(pickle.dumps(LeaseHeld("h", T0, "s3://b/_lease.json")))
    assert (held.holder, held.expires_at, held.uri) == ("h", T0, "s3://b/_lease.json")
    lost = pickle.loads(pickle.dumps(LeaseLost("u", "h", "other", "taken")))
    assert (lost.current_holder, str(lost)) == ("other", "lease u of h was lost: taken")
    assert re.fullmatch(r"[^:]+:\d+:[0-9a-f]{8}", default_holder())
    assert default_holder().split(":")[1] == str(os.getpid())


def test_rejects_bad_arguments(tmp_path) -> None:
    uri = str(tmp_path / "_lease.json")
    with pytest.raises(ValueError):
        acquire(uri, ttl=timedelta(0))
    with pytest.raises(ValueError):
        acquire(uri, now=datetime(2026, 1, 1))  # naive
    with pytest.raises(ValueError):
        LeaseKeeper(uri, ttl=timedelta(seconds=1), interval=2)
    with pytest.raises(ValueError):
        acquire("s3://bucket/prefix/")
