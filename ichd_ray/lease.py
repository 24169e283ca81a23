"""Output leases: keep two runs of the nightly job from writing the same output prefix at once.

A lease is one small JSON object, conventionally ``<output prefix>/_lease.json`` (:func:`lease_uri`):
``{"holder", "acquired_at", "expires_at", "renewed_at"}`` with UTC ISO-8601 times. A run calls
:func:`acquire` before writing, :func:`renew` while working (:class:`LeaseKeeper` does both, renewing
in a background thread) and :func:`release` at the end. A crashed run's lease simply expires, so
the next run can take it over; ``ttl`` bounds how long a crash blocks the next run.

Every change is a compare-and-swap, so two processes never both believe they hold the lease:

* S3: create with ``PUT If-None-Match: *``; take over an expired lease, or renew, with
  ``PUT If-Match: <etag read>``; release with ``DELETE If-Match: <etag>``. A 412 (or the 409
  ``ConditionalRequestConflict`` of a concurrent conditional write) means someone else got there first.
* Local paths and ``file://``: create with ``O_CREAT|O_EXCL``; the conditional operations compare the
  file's content (its sha256 is the "etag") and ``os.replace``/``unlink`` it while holding an
  ``fcntl.flock`` on the sibling ``<lease>.lock`` file. That lock file stays behind on purpose:
  deleting a lock file while others may have it open breaks mutual exclusion.

Expiry compares the reader's clock with the writer's ``expires_at``, so hosts need roughly synchronised
clocks (NTP); keep ``ttl`` far above any skew. A lease whose body cannot be parsed counts as expired
(with a warning), so a truncated or corrupt object cannot block runs forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Protocol, Union

from ichd_ray.storage import (
    TEMP_SUFFIX,
    StorageConfig,
    _client_error_code,
    _client_error_type,
    _translate_s3_error,
    boto3_client,
    join,
    parse_uri,
)

__all__ = [
    "DEFAULT_TTL",
    "LEASE_NAME",
    "Lease",
    "LeaseHeld",
    "LeaseKeeper",
    "LeaseLost",
    "acquire",
    "default_holder",
    "lease_uri",
    "release",
    "renew",
]

logger = logging.getLogger(__name__)

UriLike = Union[str, "os.PathLike[str]"]

#: Lease lifetime without renewal: how long a crashed run blocks the next one.
DEFAULT_TTL = timedelta(hours=2)
#: File name of the lease inside an output prefix (see :func:`lease_uri`).
LEASE_NAME = "_lease.json"

# Rounds of create / read / take over before giving up; each lost round means another process
# changed the lease in between, so more than a couple only happens under pathological contention.
_MAX_ATTEMPTS = 8
_CONFLICT_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


# --------------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------------


class LeaseHeld(Exception):
    """Another holder has a live lease on the URI (the CLI exits 75, EX_TEMPFAIL, on it).

    Attributes:
        holder: The current holder's id string.
        expires_at: When its lease expires unless renewed (aware UTC datetime).
        uri: The lease URI.
    """

    def __init__(self, holder: str, expires_at: datetime, uri: str) -> None:
        # All fields go to Exception.args so the exception pickles (Ray ships exceptions between processes).
        super().__init__(holder, expires_at, uri)
        self.holder = holder
        self.expires_at = expires_at
        self.uri = uri

    def __str__(self) -> str:
        return f"lease {self.uri} is held by {self.holder} until {_format_seconds(self.expires_at)}"


class LeaseLost(Exception):
    """A holder found on renew/release (or :meth:`LeaseKeeper.check`) that the lease is no longer its own.

    Attributes:
        uri: The lease URI.
        holder: The holder that lost it.
        current_holder: Who holds it now; None if it is gone or unreadable.
        reason: What happened, in words.
    """

    def __init__(self, uri: str, holder: str, current_holder: str | None, reason: str) -> None:
        super().__init__(uri, holder, current_holder, reason)
        self.uri = uri
        self.holder = holder
        self.current_holder = current_holder
        self.reason = reason

    def __str__(self) -> str:
        return f"lease {self.uri} of {self.holder} was lost: {self.reason}"


@dataclass(frozen=True)
class Lease:
    """A lease this process holds. Frozen: :func:`renew` returns a new one with the new expiry and etag.

    Attributes:
        uri: The lease object or file, e.g. ``s3://bucket/out/_lease.json``.
        holder: This holder's id (see :func:`default_holder`); never contains credentials.
        expires_at: Expiry written in the lease (aware UTC datetime).
        etag: S3 ETag of the object as we wrote it, or sha256 hex of the local file's content.
        storage_config: S3 settings used for every operation on it; None means
            :meth:`StorageConfig.from_env`. Its repr masks secrets.
        acquired_at: When this holder first acquired it (kept across renewals).
    """

    uri: str
    holder: str
    expires_at: datetime
    etag: str
    storage_config: StorageConfig | None = None
    acquired_at: datetime | None = None


def default_holder() -> str:
    """A holder id unique to this process: ``host:pid:uuid8``.

    Returns:
        str: E.g. ``"worker-3:4711:1a2b3c4d"``. The random part keeps ids unique across pid reuse and
        containers that share a hostname.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease_uri(output_prefix: UriLike) -> str:
    """The conventional lease URI for an output prefix.

    Args:
        output_prefix: Output directory or S3 prefix.

    Returns:
        str: ``<output_prefix>/_lease.json``.
    """
    return join(output_prefix, LEASE_NAME)


# --------------------------------------------------------------------------------------------------
# Lease bodies
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """The content of a lease body."""

    holder: str
    expires_at: datetime
    acquired_at: datetime | None = None
    renewed_at: datetime | None = None

    def encode(self) -> bytes:
        doc = {
            "holder": self.holder,
            "acquired_at": _format_time(self.acquired_at),
            "expires_at": _format_time(self.expires_at),
            "renewed_at": _format_time(self.renewed_at),
        }
        return (json.dumps(doc, sort_keys=True) + "\n").encode("utf-8")


def _decode(data: bytes, uri: str) -> _Record | None:
    """Parse a lease body; None (with a warning) when it is unreadable, which callers treat as expired.

    Args:
        data: The raw body.
        uri: Lease URI, for the warning.

    Returns:
        _Record | None: The record, or None for a corrupt body.
    """
    try:
        doc = json.loads(data.decode("utf-8"))
        holder = doc["holder"]
        if not isinstance(holder, str) or not holder:
            raise ValueError("holder must be a non-empty string")
        return _Record(
            holder=holder,
            expires_at=_parse_time(doc["expires_at"]),
            acquired_at=_parse_time(doc["acquired_at"]) if doc.get("acquired_at") else None,
            renewed_at=_parse_time(doc["renewed_at"]) if doc.get("renewed_at") else None,
        )
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        logger.warning("lease %s has an unreadable body (%s); treating it as expired", uri, type(exc).__name__)
        return None


def _format_time(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    # Microseconds, so renewals a fraction of a second apart stay distinguishable.
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _format_seconds(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: Any) -> datetime:
    if not isinstance(text, str):
        raise TypeError("timestamp must be a string")
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    # A writer that left out the offset still meant UTC: that is what this module writes.
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    return now.astimezone(timezone.utc)


def _check_ttl(ttl: timedelta) -> None:
    if ttl <= timedelta(0):
        raise ValueError(f"lease ttl must be positive, got {ttl}")


# --------------------------------------------------------------------------------------------------
# Stores: the four conditional operations, on S3 and on local files
# --------------------------------------------------------------------------------------------------


class _Store(Protocol):
    def create(self, body: bytes) -> str | None:
        """Write ``body`` only if nothing exists; its etag, or None if something does."""

    def read(self) -> tuple[bytes, str] | None:
        """The current body and etag, or None if there is none."""

    def replace(self, body: bytes, etag: str) -> str | None:
        """Write ``body`` only if the current etag is ``etag``; the new etag, or None if it changed or is gone."""

    def delete(self, etag: str) -> bool:
        """Delete only if the current etag is ``etag``: True if deleted or already gone, False if it changed."""


def _store_for(uri: str, config: StorageConfig | None) -> _Store:
    scheme, path = parse_uri(uri)
    if scheme == "file":
        return _LocalStore(path)
    return _S3Store(uri, path, config)


class _S3Store:
    """Conditional requests against one S3 key (S3 evaluates the condition atomically with the write)."""

    def __init__(self, uri: str, path: str, config: StorageConfig | None) -> None:
        self._uri = uri
        self._bucket, _, self._key = path.partition("/")
        if not self._key or self._key.endswith("/"):
            raise ValueError(f"a lease URI must name an object, got {uri!r}")
        self._client = boto3_client(config)

    def create(self, body: bytes) -> str | None:
        try:
            return self._put(body, IfNoneMatch="*")
        except _client_error_type() as exc:
            if _client_error_code(exc) in _CONFLICT_CODES:
                return None
            raise _translate_s3_error(exc, self._uri) from None

    def read(self) -> tuple[bytes, str] | None:
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=self._key)
            with response["Body"] as body:
                return body.read(), response["ETag"]
        except _client_error_type() as exc:
            if _client_error_code(exc) in _MISSING_KEY_CODES:
                return None
            raise _translate_s3_error(exc, self._uri) from None

    def replace(self, body: bytes, etag: str) -> str | None:
        try:
            return self._put(body, IfMatch=etag)
        except _client_error_type() as exc:
            # 404: If-Match on a key that is gone (released or deleted meanwhile) is a failed condition too.
            if _client_error_code(exc) in _CONFLICT_CODES | _MISSING_KEY_CODES:
                return None
            raise _translate_s3_error(exc, self._uri) from None

    def delete(self, etag: str) -> bool:
        if not _supports_conditional_delete(self._client):
            return self._compare_then_delete(etag)
        try:
            self._client.delete_object(Bucket=self._bucket, Key=self._key, IfMatch=etag)
            return True
        except _client_error_type() as exc:
            code = _client_error_code(exc)
            if code in _MISSING_KEY_CODES:
                return True
            if code in _CONFLICT_CODES:
                return False
            raise _translate_s3_error(exc, self._uri) from None

    def _compare_then_delete(self, etag: str) -> bool:
        # Only for a botocore without DeleteObject IfMatch: a takeover landing between this read and
        # the delete would be deleted. The window is one round trip, against a lease that has to be
        # expired for a takeover to happen at all.
        current = self.read()
        if current is None:
            return True
        if current[1] != etag:
            return False
        self._client.delete_object(Bucket=self._bucket, Key=self._key)
        return True

    def _put(self, body: bytes, **condition: str) -> str:
        response = self._client.put_object(
            Bucket=self._bucket, Key=self._key, Body=body, ContentType="application/json", **condition
        )
        return response["ETag"]


def _supports_conditional_delete(client: Any) -> bool:
    """Whether this botocore knows ``IfMatch`` on DeleteObject (added to the S3 model in 2024)."""
    shape = client.meta.service_model.operation_model("DeleteObject").input_shape
    return "IfMatch" in shape.members


class _LocalStore:
    """Conditional operations on a local file, serialised by an flock on ``<path>.lock``.

    flock locks belong to the open file description, so they exclude threads of one process as well
    as other processes (and, on Linux, other NFS clients, where flock is emulated with POSIX locks).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock_path = path + ".lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def create(self, body: bytes) -> str | None:
        # Under the lock, so no reader (they all take it) sees the file between creation and write.
        with self._locked():
            try:
                fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return None
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(body)
            except BaseException:
                os.unlink(self._path)  # don't leave an empty lease behind for others to take over
                raise
        return _sha256(body)

    def read(self) -> tuple[bytes, str] | None:
        with self._locked():
            return self._read_unlocked()

    def replace(self, body: bytes, etag: str) -> str | None:
        with self._locked():
            current = self._read_unlocked()
            if current is None or current[1] != etag:
                return None
            self._write_unlocked(body)
        return _sha256(body)

    def delete(self, etag: str) -> bool:
        with self._locked():
            current = self._read_unlocked()
            if current is None:
                return True
            if current[1] != etag:
                return False
            os.unlink(self._path)
        return True

    def _read_unlocked(self) -> tuple[bytes, str] | None:
        try:
            with open(self._path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return data, _sha256(data)

    def _write_unlocked(self, body: bytes) -> None:
        # Temp file + rename: a crash mid-write leaves the old lease, never a truncated one.
        directory, name = os.path.split(self._path)
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(body)
            os.replace(tmp, self._path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------------


def acquire(
    uri: UriLike,
    holder: str | None = None,
    ttl: timedelta = DEFAULT_TTL,
    storage_config: StorageConfig | None = None,
    now: datetime | None = None,
) -> Lease:
    """Take the lease at ``uri``, or take over an expired one.

    Args:
        uri: Lease object or file (local path, ``file://`` or ``s3://``), e.g. :func:`lease_uri` of
            the output prefix.
        holder: This holder's id; None means :func:`default_holder`.
        ttl: Lifetime without renewal.
        storage_config: S3 settings; None means :meth:`StorageConfig.from_env`.
        now: Current time (aware); None means the system clock. Tests inject it to expire leases.

    Returns:
        Lease: The lease now held.

    Raises:
        LeaseHeld: Another holder's lease has not expired (or it won a race for an expired one).
        ValueError: Non-positive ttl, naive ``now``, or an S3 URI that names no object.
        FileNotFoundError: The S3 bucket does not exist.
        PermissionError: Access denied.
    """
    text = os.fspath(uri)
    holder = holder or default_holder()
    _check_ttl(ttl)
    now = _now(now)
    body = _Record(holder, expires_at=now + ttl, acquired_at=now, renewed_at=now).encode()
    store = _store_for(text, storage_config)

    def held(etag: str) -> Lease:
        return Lease(text, holder, now + ttl, etag, storage_config, acquired_at=now)

    last_seen: _Record | None = None
    for _ in range(_MAX_ATTEMPTS):
        etag = store.create(body)
        if etag is not None:
            logger.info("lease %s acquired by %s", text, holder)
            return held(etag)
        current = store.read()
        if current is None:
            continue  # released between our create and our read: create again
        data, stale_etag = current
        if data == body:
            # Our own write already landed: botocore retried a request whose response was lost.
            logger.info("lease %s acquired by %s", text, holder)
            return held(stale_etag)
        last_seen = _decode(data, text)
        if last_seen is not None and now < last_seen.expires_at:
            raise LeaseHeld(last_seen.holder, last_seen.expires_at, text)
        etag = store.replace(body, stale_etag)
        if etag is not None:
            previous = last_seen.holder if last_seen is not None else "an unreadable lease"
            logger.info("lease %s taken over by %s from expired %s", text, holder, previous)
            return held(etag)
        # Someone changed it between our read and our write; the next round reads who.
    if last_seen is not None:
        raise LeaseHeld(last_seen.holder, last_seen.expires_at, text)
    raise OSError(f"lease {text}: gave up after {_MAX_ATTEMPTS} contended attempts")


def renew(lease: Lease, ttl: timedelta = DEFAULT_TTL, now: datetime | None = None) -> Lease:
    """Extend a held lease to ``now + ttl``, only if it is still exactly the one we wrote.

    Args:
        lease: The lease as last returned by :func:`acquire` or :func:`renew`.
        ttl: New lifetime from ``now``.
        now: Current time (aware); None means the system clock.

    Returns:
        Lease: The renewed lease (new ``expires_at`` and ``etag``); use it from now on.

    Raises:
        LeaseLost: Someone took it over or deleted it.
        ValueError: Non-positive ttl or naive ``now``.
    """
    _check_ttl(ttl)
    now = _now(now)
    acquired_at = lease.acquired_at or now
    body = _Record(lease.holder, expires_at=now + ttl, acquired_at=acquired_at, renewed_at=now).encode()
    store = _store_for(lease.uri, lease.storage_config)
    etag = store.replace(body, lease.etag)
    if etag is None:
        current = store.read()
        if current is None or current[0] != body:
            raise _lost(lease, current, "it was taken over or deleted before renewal")
        etag = current[1]  # our retried write had landed already
    logger.info("lease %s renewed by %s", lease.uri, lease.holder)
    return dataclasses.replace(lease, expires_at=now + ttl, etag=etag, acquired_at=acquired_at)


def release(lease: Lease) -> None:
    """Delete a held lease, only if it is still ours. Releasing a lease that is gone is a no-op.

    Args:
        lease: The lease as last returned by :func:`acquire` or :func:`renew`.

    Raises:
        LeaseLost: Someone else holds it now; their lease is left untouched.
    """
    store = _store_for(lease.uri, lease.storage_config)
    current = store.read()
    if current is None:
        logger.info("lease %s of %s already gone", lease.uri, lease.holder)
        return
    data, etag = current
    if etag != lease.etag:
        record = _decode(data, lease.uri)
        # Same holder, other etag: our own later renewal through another Lease object; still ours.
        if record is None or record.holder != lease.holder:
            raise _lost(lease, current, "someone else holds it; left in place")
    if not store.delete(etag):
        raise _lost(lease, store.read(), "it was taken over while releasing; left in place")
    logger.info("lease %s released by %s", lease.uri, lease.holder)


def _lost(lease: Lease, current: tuple[bytes, str] | None, reason: str) -> LeaseLost:
    """A LeaseLost naming whoever holds the lease now (None when gone or unreadable)."""
    record = _decode(current[0], lease.uri) if current is not None else None
    current_holder = record.holder if record is not None else None
    if current_holder is not None:
        reason = f"{reason} (now held by {current_holder})"
    return LeaseLost(lease.uri, lease.holder, current_holder, reason)


# --------------------------------------------------------------------------------------------------
# Keeper
# --------------------------------------------------------------------------------------------------


class LeaseKeeper:
    """Hold a lease for the duration of a ``with`` block, renewing it in a daemon thread.

    Acquires on enter (raising :class:`LeaseHeld` if someone else holds it), renews every
    ``interval`` (default ``ttl / 4``) and, on exit, stops the thread and releases. A renewal that
    finds the lease taken over is recorded; :meth:`check` then raises it, so call ``check()`` before
    committing outputs. Other renewal errors (a network blip) are logged and retried at the next
    interval: until ``expires_at`` passes, nobody else can have taken the lease.

    Example::

        with LeaseKeeper(lease_uri(out), storage_config=cfg) as keeper:
            write_outputs()
            keeper.check()
            commit()
    """

    def __init__(
        self,
        uri: UriLike,
        holder: str | None = None,
        ttl: timedelta = DEFAULT_TTL,
        interval: timedelta | float | None = None,
        storage_config: StorageConfig | None = None,
    ) -> None:
        """Configure (nothing happens until ``__enter__``).

        Args:
            uri: Lease URI (see :func:`acquire`).
            holder: This holder's id; None means :func:`default_holder`.
            ttl: Lifetime per acquisition/renewal.
            interval: Time between renewals (timedelta or seconds); None means ``ttl / 4``. Must be
                shorter than ``ttl``.
            storage_config: S3 settings; None means :meth:`StorageConfig.from_env`.

        Raises:
            ValueError: Non-positive ttl, or an interval not in (0, ttl).
        """
        _check_ttl(ttl)
        seconds = ttl.total_seconds() / 4 if interval is None else _seconds(interval)
        if not 0 < seconds < ttl.total_seconds():
            raise ValueError(f"renewal interval must be in (0, ttl={ttl}), got {seconds}s")
        self._uri = os.fspath(uri)
        self._holder = holder or default_holder()
        self._ttl = ttl
        self._interval = seconds
        self._config = storage_config
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease: Lease | None = None
        self._lost: LeaseLost | None = None

    @property
    def lease(self) -> Lease:
        """The current lease (updated by each renewal)."""
        with self._guard:
            if self._lease is None:
                raise RuntimeError("LeaseKeeper has not acquired its lease; use it as a context manager")
            return self._lease

    @property
    def lost(self) -> LeaseLost | None:
        """The LeaseLost a renewal or the final release ran into, if any."""
        with self._guard:
            return self._lost

    def check(self) -> None:
        """Raise if this keeper can no longer be sure it holds the lease.

        Raises:
            LeaseLost: A renewal found it taken over, or it expired because renewals kept failing.
        """
        lease = self.lease
        lost = self.lost
        if lost is not None:
            raise lost
        if datetime.now(timezone.utc) >= lease.expires_at:
            raise LeaseLost(lease.uri, lease.holder, None, "it expired before it could be renewed")

    def __enter__(self) -> LeaseKeeper:  # noqa: PYI034 - typing.Self needs 3.11; not meant to be subclassed
        lease = acquire(self._uri, self._holder, self._ttl, self._config)
        with self._guard:
            self._lease = lease
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"lease-keeper:{self._holder}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop renewing and release the lease (unless it was lost). Safe to call twice.

        Release errors are logged, not raised: the work is done by then, and an unreleased lease
        only delays the next run until it expires.
        """
        self._stop.set()
        if self._thread is not None:
            # The thread wakes from Event.wait at once; at worst it finishes one renewal request.
            self._thread.join()
            self._thread = None
        with self._guard:
            lease, lost, self._lease = self._lease, self._lost, None
        if lease is None or lost is not None:
            return
        try:
            release(lease)
        except LeaseLost as exc:
            logger.warning("%s", exc)
            with self._guard:
                self._lost = exc
        except Exception as exc:  # noqa: BLE001 - see docstring
            logger.warning("lease %s of %s not released (%s: %s); it expires at %s", lease.uri,
                           lease.holder, type(exc).__name__, exc, _format_seconds(lease.expires_at))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                renewed = renew(self.lease, self._ttl)
            except LeaseLost as exc:
                logger.error("%s", exc)
                with self._guard:
                    self._lost = exc
                return
            except Exception as exc:  # noqa: BLE001 - transient; retried next interval
                logger.warning("lease %s renewal failed (%s: %s); retrying", self._uri, type(exc).__name__, exc)
                continue
            with self._guard:
                self._lease = renewed


def _seconds(value: timedelta | float) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
