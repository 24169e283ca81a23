"""ichd_ray.io.lease on local files and on moto's S3 server (which enforces conditional writes)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from botocore.exceptions import ClientError

from ichd_ray.io import storage
from ichd_ray.io.lease import (
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
from ichd_ray.io.storage import StorageConfig

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
    monkeypatch.setattr("ichd_ray.io.lease._supports_conditional_delete", lambda client: False)
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
    with caplog.at_level(logging.WARNING, logger="ichd_ray.io.lease"):
        lease = acquire(uri, holder="run-b", storage_config=config)
    assert "unreadable" in caplog.text
    assert _holder_now(uri, config) == "run-b"
    release(lease)


def test_lease_body_is_json(target: Target) -> None:
    uri, config = target
    lease = acquire(uri, holder="run-a", ttl=HOUR, storage_config=config, now=T0)
    body = json.loads(storage.read_bytes(uri, config))
    process = body.pop("process")
    assert re.fullmatch(r"[0-9a-f]{16}", body.pop("nonce"))
    assert body == {
        "holder": "run-a",
        "acquired_at": "2026-11-24T02:00:00.000000Z",
        "expires_at": "2026-11-24T03:00:00.000000Z",
        "renewed_at": "2026-11-24T02:00:00.000000Z",
        "ttl_seconds": 3600.0,
    }
    # Who holds it, precisely enough to tell on this host whether that process still runs.
    assert process["host"] == socket.gethostname() and process["pid"] == os.getpid()
    assert set(process) == {"host", "pid", "start", "boot_id", "pid_ns"}
    assert isinstance(process["start"], int) and process["boot_id"] and process["pid_ns"].startswith("pid:[")
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


# ------------------------------------------------------------------ dead holders and heartbeats
#
# A holder that dies without a Python exception (SIGKILL, the OOM killer) never releases its lease.
# On the same host the next run sees the holder's pid gone and takes over at once (still a
# compare-and-swap); elsewhere the short TTL lapses because nobody renews it. A live holder keeps it.

_HOLDER_SCRIPT = """
import json, sys, time
from datetime import timedelta
from ichd_ray.io.lease import LeaseKeeper, acquire
from ichd_ray.io.storage import StorageConfig
uri, cfg, ttl, mode = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
config = StorageConfig.from_dict(cfg) if cfg else None
if mode == "keeper":
    LeaseKeeper(uri, ttl=timedelta(seconds=ttl), storage_config=config).__enter__()
else:
    acquire(uri, ttl=timedelta(seconds=ttl), storage_config=config)
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder_process():
    """Start a separate Python process that takes the lease (``mode`` acquire: once; keeper: and renews
    it) and reports once it holds it. Processes still running at teardown are killed."""
    import subprocess
    import sys

    started: list[subprocess.Popen] = []

    def start(uri: str, config: StorageConfig | None, ttl_s: float, mode: str = "acquire") -> subprocess.Popen:
        cfg = json.dumps(config.to_dict() if config is not None else None)
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER_SCRIPT, uri, cfg, str(ttl_s), mode],
            stdout=subprocess.PIPE, text=True,
        )
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip(), "the holder process did not take the lease"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _sigkill(proc, reap: bool = True) -> None:
    """SIGKILL a holder; without ``reap`` it stays a zombie (killed, not yet waited for by its parent)."""
    import signal

    os.kill(proc.pid, signal.SIGKILL)
    if reap:
        proc.wait()
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return
        time.sleep(0.01)
    raise AssertionError("the killed holder did not become a zombie")


def _record(uri: str, config: StorageConfig | None) -> dict:
    return json.loads(storage.read_bytes(uri, config))


def _rewrite(uri: str, config: StorageConfig | None, **process: object) -> dict:
    """Change fields of the stored lease's holder process (a fixture's stand-in for another holder)."""
    body = _record(uri, config)
    body["process"] = {**body["process"], **process}
    storage.write_bytes(uri, json.dumps(body).encode(), config)
    return body


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_a_killed_holder_on_this_host_is_taken_over_at_once(target: Target, holder_process, reap: bool) -> None:
    uri, config = target
    proc = holder_process(uri, config, ttl_s=3600)
    with pytest.raises(LeaseHeld):
        acquire(uri, holder="rerun", storage_config=config)  # alive: never displaced
    _sigkill(proc, reap=reap)
    lease = acquire(uri, holder="rerun", storage_config=config)  # at once, an hour before it expires
    assert _holder_now(uri, config) == "rerun"
    release(lease)


def test_a_reused_pid_is_not_mistaken_for_the_holder(target: Target, holder_process) -> None:
    """The record names the holder's process start time: another process with the same pid is not it."""
    uri, config = target
    proc = holder_process(uri, config, ttl_s=3600)
    stored = _record(uri, config)["process"]
    assert stored["pid"] == proc.pid and stored["start"] > 0
    _rewrite(uri, config, start=stored["start"] + 1)  # the same pid, another process
    lease = acquire(uri, holder="rerun", storage_config=config)
    assert _holder_now(uri, config) == "rerun"
    release(lease)


def test_a_dead_holder_on_another_host_lapses_only_with_its_ttl(target: Target, holder_process) -> None:
    uri, config = target
    proc = holder_process(uri, config, ttl_s=3600)
    _sigkill(proc)
    # The same pid number on another host (or kernel, or pid namespace) says nothing about our pids.
    for other in ({"host": "other-pod-7"}, {"boot_id": "00000000-0000-0000-0000-000000000000"}, {"pid_ns": "pid:[1]"}):
        _rewrite(uri, config, **other)
        expires_at = datetime.fromisoformat(_record(uri, config)["expires_at"].replace("Z", "+00:00"))
        with pytest.raises(LeaseHeld):
            acquire(uri, holder="rerun", storage_config=config, now=expires_at - timedelta(seconds=1))
    lease = acquire(uri, holder="rerun", storage_config=config, now=expires_at)
    assert _holder_now(uri, config) == "rerun"
    release(lease)


def test_a_live_renewing_holder_is_never_displaced(target: Target, holder_process, monkeypatch) -> None:
    """A keeper in another process renewing a 3 s lease keeps it for more than three TTLs, as seen from
    this host and from another one (where only its renewals keep it); killed, it is taken over at once."""
    from ichd_ray.io import lease as lease_module

    uri, config = target
    ttl = 3.0
    proc = holder_process(uri, config, ttl_s=ttl, mode="keeper")
    holder = _holder_now(uri, config)
    here = lease_module.this_process()
    elsewhere = dataclasses.replace(here, host="other-pod-7")
    deadline = time.monotonic() + 3.5 * ttl
    tries = 0
    while time.monotonic() < deadline:
        for identity in (here, elsewhere):
            monkeypatch.setattr(lease_module, "this_process", lambda identity=identity: identity)
            with pytest.raises(LeaseHeld):
                acquire(uri, holder="intruder", ttl=timedelta(seconds=ttl), storage_config=config)
            tries += 1
        time.sleep(0.25)
    monkeypatch.setattr(lease_module, "this_process", lambda: here)
    assert tries > 10 and _holder_now(uri, config) == holder
    assert _record(uri, config)["renewed_at"] > _record(uri, config)["acquired_at"]
    _sigkill(proc)
    lease = acquire(uri, holder="rerun", storage_config=config)
    release(lease)


def test_keeper_renews_every_third_of_its_ttl() -> None:
    keeper = LeaseKeeper("unused/_lease.json", ttl=timedelta(seconds=9))
    assert keeper.interval == pytest.approx(3.0)


# ----------------------------------------------------------------------------- lost responses
#
# A conditional request whose response is lost may have landed. botocore retries it (the retry then
# fails its condition against our own write), or gives up, and the lease module tries again later: in
# both cases finding our own holder id and nonce in the lease means we hold it.


def _botocore_attempts(config: StorageConfig) -> int:
    """How many times storage's botocore client sends one request at most (botocore's ``max_attempts``
    option counts the retries after the first)."""
    return storage.boto3_client(config).meta.config.retries["total_max_attempts"]


@pytest.fixture
def lost_responses(s3_bucket: tuple[str, StorageConfig], monkeypatch: pytest.MonkeyPatch):
    """``drop(method, key, n)``: the next ``n`` matching requests reach the server, but their responses
    are lost (a connection closed after the request was processed). botocore retries them at once."""
    import botocore.retries.standard
    import urllib3
    from botocore.exceptions import ConnectionClosedError

    bucket, config = s3_bucket
    client = storage.boto3_client(config)
    http = urllib3.PoolManager()
    pending: dict[tuple[str, str], int] = {}
    seen: list[tuple[str, str, int]] = []
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, context: 0)

    def handler(request, **kwargs):
        method, path = request.method, request.url.split("?", 1)[0]
        key = path.split(f"/{bucket}/", 1)[-1]
        if pending.get((method, key), 0) <= 0:
            return None
        pending[(method, key)] -= 1
        body = request.body.read() if hasattr(request.body, "read") else request.body
        response = http.request(method, request.url, body=body, headers=dict(request.headers.items()), retries=False)
        seen.append((method, key, response.status))
        raise ConnectionClosedError(endpoint_url=request.url)

    events = [f"before-send.s3.{op}" for op in ("PutObject", "DeleteObject")]
    for event in events:
        client.meta.events.register(event, handler)

    class Faults:
        def drop(self, method: str, key: str, n: int = 1) -> None:
            pending[(method, key)] = pending.get((method, key), 0) + n

        @property
        def dropped(self) -> list[tuple[str, str, int]]:
            return list(seen)

    yield bucket, config, Faults(), _botocore_attempts(config)
    for event in events:
        client.meta.events.unregister(event, handler)


def test_create_whose_every_response_was_lost_is_still_ours(lost_responses) -> None:
    bucket, config, faults, attempts = lost_responses
    uri = lease_uri(f"s3://{bucket}/out")
    faults.drop("PUT", "out/_lease.json", n=attempts)  # every attempt botocore makes: it gives up
    lease = acquire(uri, holder="run-a", storage_config=config)
    assert [status for _, _, status in faults.dropped] == [200] + [412] * (attempts - 1)
    assert _holder_now(uri, config) == "run-a"
    renewed = renew(lease)  # the etag it holds is the stored one
    release(renewed)
    assert _holder_now(uri, config) is None


def test_renewal_whose_every_response_was_lost_is_still_ours(lost_responses) -> None:
    bucket, config, faults, attempts = lost_responses
    uri = lease_uri(f"s3://{bucket}/out")
    lease = acquire(uri, holder="run-a", storage_config=config)
    faults.drop("PUT", "out/_lease.json", n=attempts)
    with pytest.raises(Exception) as info:
        renew(lease, now=datetime.now(timezone.utc) + timedelta(seconds=1))
    assert not isinstance(info.value, LeaseLost)  # we cannot know whether it landed: an error, not a loss
    # The keeper tries again at its next interval with the etag it had; the write that did land is ours.
    later = datetime.now(timezone.utc) + timedelta(seconds=2)
    renewed = renew(lease, now=later)
    assert _record(uri, config)["renewed_at"] == later.isoformat(timespec="microseconds").replace("+00:00", "Z")
    release(renewed)
    assert _holder_now(uri, config) is None


def test_keeper_survives_a_renewal_whose_responses_were_lost(lost_responses) -> None:
    bucket, config, faults, attempts = lost_responses
    uri = lease_uri(f"s3://{bucket}/out")
    with LeaseKeeper(uri, holder="keeper", ttl=timedelta(seconds=3), interval=0.2, storage_config=config) as keeper:
        faults.drop("PUT", "out/_lease.json", n=attempts)
        deadline = time.monotonic() + 10
        while len(faults.dropped) < attempts and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)  # a few more renewals
        assert keeper.lost is None
        keeper.check()
        assert _holder_now(uri, config) == "keeper"
    assert _holder_now(uri, config) is None and keeper.lost is None


def test_release_whose_response_was_lost(lost_responses) -> None:
    bucket, config, faults, attempts = lost_responses
    uri = lease_uri(f"s3://{bucket}/out")
    lease = acquire(uri, holder="run-a", storage_config=config)
    faults.drop("DELETE", "out/_lease.json", n=1)
    release(lease)
    assert [status for _, _, status in faults.dropped] == [204]
    assert _holder_now(uri, config) is None
