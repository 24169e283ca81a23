"""Output leases: keep two runs of the nightly job from writing the same output prefix at once.

A lease is one small JSON object, conventionally ``<output prefix>/_lease.json`` (:func:`lease_uri`)::

    {"holder": "worker-3:4711:1a2b3c4d", "nonce": "<16 hex>", "ttl_seconds": 300.0,
     "acquired_at": ..., "renewed_at": ..., "expires_at": ...,            (UTC ISO-8601)
     "process": {"host": ..., "pid": 4711, "start": <ticks>, "boot_id": ..., "pid_ns": "pid:[...]"}}

It is a heartbeat: a run calls :func:`acquire` before writing, :func:`renew` every third of the TTL
while working (:class:`LeaseKeeper` does both, renewing in a background thread) and :func:`release` at
the end. The TTL is short (:data:`DEFAULT_TTL`, 5 minutes), so a holder that dies without a word
(SIGKILL, the OOM killer, a lost node or pod) blocks the next run for at most that long, on any host.
On the holder's own host the next run need not wait: when the recorded process is gone (no such pid,
a zombie, or the pid now belongs to a process that started at another time) the lease is taken over at
once. "The same host" means the same host name, kernel boot (``boot_id``) and pid namespace, so a pid
in another container or pod is never looked up here. A live holder is never displaced: it keeps
renewing, and its pid is alive.

Every change is a compare-and-swap, so two processes never both believe they hold the lease:

* S3: create with ``PUT If-None-Match: *``; take over an expired or dead holder's lease, or renew, with
  ``PUT If-Match: <etag read>``; release with ``DELETE If-Match: <etag>``. A 412 (or the 409
  ``ConditionalRequestConflict`` of a concurrent conditional write) means someone else got there first.
* Local paths and ``file://``: create with ``O_CREAT|O_EXCL``; the conditional operations compare the
  file's content (its sha256 is the "etag") and ``os.replace``/``unlink`` it while holding an
  ``fcntl.flock`` on the sibling ``<lease>.lock`` file. That lock file stays behind on purpose:
  deleting a lock file while others may have it open breaks mutual exclusion.

Lost responses: a conditional request whose response never arrived may have landed all the same. Its
retry (botocore's, or ours after botocore gave up) then fails its condition against our own write.
Each acquisition carries a random ``nonce``; finding our holder id and nonce in the lease means the
write was ours, so acquire, renew and release stay idempotent under retries.

Expiry compares the reader's clock with the writer's ``expires_at``, so hosts need roughly synchronised
clocks (NTP); keep ``ttl`` far above any skew. A lease whose body cannot be parsed counts as expired
(with a warning), so a truncated or corrupt object cannot block runs forever.

Why one module of ~1,000 lines: it is one protocol, a compare-and-swap state machine (acquire, renew,
take over, release) on two backends that must behave identically, plus the holder-liveness checks that
only the protocol uses; reading it in one place is how its guarantees are reviewed.
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
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Protocol, Union

from ichd_ray.io.storage import (
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
    "HolderProcess",
    "Lease",
    "LeaseHeld",
    "LeaseKeeper",
    "LeaseLost",
    "acquire",
    "default_holder",
    "lease_uri",
    "release",
    "renew",
    "this_process",
]

logger = logging.getLogger(__name__)

UriLike = Union[str, "os.PathLike[str]"]

#: Lease lifetime without renewal: at most how long a dead holder blocks the next run on another host.
DEFAULT_TTL = timedelta(minutes=5)
#: A keeper renews this many times per TTL by default (every ``ttl / 3``).
RENEWALS_PER_TTL = 3
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
class HolderProcess:
    """The process holding a lease, as written in it: enough to tell, on its own host, whether it still runs.

    Attributes:
        host: Host name (a Kubernetes pod's name).
        pid: Process id, in the holder's pid namespace.
        start: The process's start time in clock ticks after boot (``/proc/<pid>/stat`` field 22), so a
            later process that reuses the pid is not taken for the holder; None where unknown.
        boot_id: The kernel boot (``/proc/sys/kernel/random/boot_id``); None where unknown.
        pid_ns: The pid namespace (``/proc/self/ns/pid``, e.g. ``"pid:[4026531836]"``); None where unknown.
    """

    host: str
    pid: int
    start: int | None = None
    boot_id: str | None = None
    pid_ns: str | None = None

    def shares_pids_with(self, other: HolderProcess) -> bool:
        """Whether a pid in ``other`` means the same process here: same host, kernel boot and pid
        namespace, all known. Containers on one host have their own pid namespaces; pods their own hosts."""
        return (
            self.host == other.host
            and self.boot_id is not None
            and self.boot_id == other.boot_id
            and self.pid_ns is not None
            and self.pid_ns == other.pid_ns
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> HolderProcess | None:
        """Parse a ``process`` entry; None when it is absent or malformed (nothing is concluded from it)."""
        if not isinstance(doc, dict):
            return None
        host, pid, start = doc.get("host"), doc.get("pid"), doc.get("start")
        boot_id, pid_ns = doc.get("boot_id"), doc.get("pid_ns")
        if not isinstance(host, str) or type(pid) is not int or pid <= 0:
            return None
        if start is not None and type(start) is not int:
            return None
        if not all(v is None or isinstance(v, str) for v in (boot_id, pid_ns)):
            return None
        return cls(host, pid, start, boot_id, pid_ns)


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
        nonce: Random per acquisition (kept across renewals): a lease body with our holder and nonce
            was written by us, even when the response to that write was lost.
        process: The holding process, as written in the lease.
    """

    uri: str
    holder: str
    expires_at: datetime
    etag: str
    storage_config: StorageConfig | None = None
    acquired_at: datetime | None = None
    nonce: str = ""
    process: HolderProcess | None = None


_THIS_PROCESS: tuple[int, HolderProcess] | None = None


def this_process() -> HolderProcess:
    """The calling process as a lease holder (computed once per pid, so a forked child gets its own).

    Returns:
        HolderProcess: Host name, pid, and on Linux its start time, the kernel boot id and pid namespace.
    """
    global _THIS_PROCESS
    pid = os.getpid()
    if _THIS_PROCESS is None or _THIS_PROCESS[0] != pid:
        try:
            stat = _proc_stat(pid)
        except FileNotFoundError:
            stat = None
        process = HolderProcess(
            host=socket.gethostname(),
            pid=pid,
            start=stat[1] if stat else None,
            boot_id=_read_text("/proc/sys/kernel/random/boot_id"),
            pid_ns=_readlink("/proc/self/ns/pid"),
        )
        _THIS_PROCESS = (pid, process)
    return _THIS_PROCESS[1]


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in ticks) of a pid from ``/proc/<pid>/stat``; None if it cannot be read.

    Raises:
        FileNotFoundError: No such process (visible to us).
    """
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            raise
        return None  # no procfs here
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces and ')'.
    fields = text.rsplit(")", 1)[-1].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _is_dead(process: HolderProcess | None) -> bool:
    """True only when certain that the holder process no longer runs: it shares our pid space (same
    host, boot and pid namespace) and its pid is gone, a zombie, or now another process's."""
    if process is None or not this_process().shares_pids_with(process):
        return False
    try:
        os.kill(process.pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return True
    except PermissionError:
        signalled = False  # exists, another user's; /proc may hide it (hidepid)
    except OSError:
        return False
    else:
        signalled = True
    try:
        stat = _proc_stat(process.pid)
    except FileNotFoundError:
        return signalled  # it existed a moment ago: it exited in between
    if stat is None:
        return False
    state, start = stat
    if state in ("Z", "X"):
        return True  # killed, not yet reaped by its parent
    return process.start is not None and start != process.start


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
    nonce: str = ""
    ttl: timedelta | None = None
    process: HolderProcess | None = None

    def encode(self) -> bytes:
        doc = {
            "holder": self.holder,
            "nonce": self.nonce,
            "ttl_seconds": self.ttl.total_seconds() if self.ttl is not None else None,
            "acquired_at": _format_time(self.acquired_at),
            "expires_at": _format_time(self.expires_at),
            "renewed_at": _format_time(self.renewed_at),
            "process": self.process.to_json() if self.process is not None else None,
        }
        return (json.dumps(doc, sort_keys=True) + "\n").encode("utf-8")

    def written_by(self, holder: str, nonce: str) -> bool:
        """Whether this body is from the acquisition ``(holder, nonce)``: written by us, whichever of our
        requests landed. (Bodies from before nonces existed have none: then the holder id decides.)"""
        return self.holder == holder and self.nonce == nonce


def _decode(data: bytes, uri: str) -> _Record | None:
    """Parse a lease body; None (with a warning) when it is unreadable, which callers treat as expired.

    Args:
        data: The raw body.
        uri: Lease URI, for the warning.

    Returns:
        _Record | None: The record, or None for a corrupt body. A malformed ``process`` entry only
        loses the same-host fast path (the lease then lapses with its TTL).
    """
    try:
        doc = json.loads(data.decode("utf-8"))
        holder = doc["holder"]
        if not isinstance(holder, str) or not holder:
            raise ValueError("holder must be a non-empty string")
        nonce = doc.get("nonce") or ""
        if not isinstance(nonce, str):
            raise TypeError("nonce must be a string")
        ttl_seconds = doc.get("ttl_seconds")
        return _Record(
            holder=holder,
            expires_at=_parse_time(doc["expires_at"]),
            acquired_at=_parse_time(doc["acquired_at"]) if doc.get("acquired_at") else None,
            renewed_at=_parse_time(doc["renewed_at"]) if doc.get("renewed_at") else None,
            nonce=nonce,
            ttl=timedelta(seconds=float(ttl_seconds)) if ttl_seconds is not None else None,
            process=HolderProcess.from_json(doc.get("process")),
        )
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError, OverflowError) as exc:
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


class _Uncertain(OSError):
    """A lease request got no answer (connection lost, timeout, 5xx after botocore's retries): it may or
    may not have been applied. Callers retry; the nonce tells them afterwards whether it was."""


def _transport_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return (BotoConnectionError, HTTPClientError)


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
            raise self._failure(exc, "create") from None
        except _transport_errors() as exc:
            raise self._failure(exc, "create") from None

    def read(self) -> tuple[bytes, str] | None:
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=self._key)
            with response["Body"] as body:
                return body.read(), response["ETag"]
        except _client_error_type() as exc:
            if _client_error_code(exc) in _MISSING_KEY_CODES:
                return None
            raise self._failure(exc, "read") from None
        except _transport_errors() as exc:
            raise self._failure(exc, "read") from None

    def replace(self, body: bytes, etag: str) -> str | None:
        try:
            return self._put(body, IfMatch=etag)
        except _client_error_type() as exc:
            # 404: If-Match on a key that is gone (released or deleted meanwhile) is a failed condition too.
            if _client_error_code(exc) in _CONFLICT_CODES | _MISSING_KEY_CODES:
                return None
            raise self._failure(exc, "replace") from None
        except _transport_errors() as exc:
            raise self._failure(exc, "replace") from None

    def delete(self, etag: str) -> bool:
        if not _supports_conditional_delete(self._client):
            return self._compare_then_delete(etag)
        try:
            self._client.delete_object(Bucket=self._bucket, Key=self._key, IfMatch=etag)
            return True
        except _client_error_type() as exc:
            code = _client_error_code(exc)
            if code in _MISSING_KEY_CODES:
                return True  # also a retry after our own delete landed
            if code in _CONFLICT_CODES:
                return False
            raise self._failure(exc, "delete") from None
        except _transport_errors() as exc:
            raise self._failure(exc, "delete") from None

    def _compare_then_delete(self, etag: str) -> bool:
        # Only for a botocore without DeleteObject IfMatch: a takeover landing between this read and
        # the delete would be deleted. The window is one round trip, against a lease that has to be
        # expired (or its holder dead) for a takeover to happen at all.
        current = self.read()
        if current is None:
            return True
        if current[1] != etag:
            return False
        try:
            self._client.delete_object(Bucket=self._bucket, Key=self._key)
        except (_client_error_type(), *_transport_errors()) as exc:
            raise self._failure(exc, "delete") from None
        return True

    def _put(self, body: bytes, **condition: str) -> str:
        response = self._client.put_object(
            Bucket=self._bucket, Key=self._key, Body=body, ContentType="application/json", **condition
        )
        return response["ETag"]

    def _failure(self, exc: Exception, what: str) -> Exception:
        """The exception to raise for a failed request: :class:`_Uncertain` when it got no definite answer."""
        response = getattr(exc, "response", None)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
        transient = not isinstance(exc, _client_error_type()) or _client_error_code(exc) in ("RequestTimeout", "SlowDown")
        if transient or (isinstance(status, int) and status >= 500):
            effect = "" if what == "read" else "; it may have been applied"
            return _Uncertain(f"lease {self._uri}: {what} got no answer ({type(exc).__name__}: {exc}){effect}")
        return _translate_s3_error(exc, self._uri)


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
    """Take the lease at ``uri``, or take over one whose holder is gone: expired, or dead on this host.

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
        LeaseHeld: Another holder's lease has not expired and its process is alive or elsewhere (or it
            won a race for a stale one).
        ValueError: Non-positive ttl, naive ``now``, or an S3 URI that names no object.
        FileNotFoundError: The S3 bucket does not exist.
        PermissionError: Access denied.
        OSError: The store kept failing to answer.
    """
    text = os.fspath(uri)
    holder = holder or default_holder()
    _check_ttl(ttl)
    now = _now(now)
    nonce = uuid.uuid4().hex[:16]
    process = this_process()
    body = _Record(holder, now + ttl, now, now, nonce, ttl, process).encode()
    store = _store_for(text, storage_config)

    def held(etag: str, how: str) -> Lease:
        logger.info("lease %s %s by %s", text, how, holder)
        return Lease(text, holder, now + ttl, etag, storage_config, acquired_at=now, nonce=nonce, process=process)

    last_seen: _Record | None = None
    uncertain: _Uncertain | None = None
    for attempt in range(_MAX_ATTEMPTS):
        if uncertain is not None:
            time.sleep(min(2.0, 0.1 * 2**attempt))
        uncertain = None
        try:
            etag = store.create(body)
            if etag is not None:
                return held(etag, "acquired")
            current = store.read()
            if current is None:
                continue  # released between our create and our read: create again
            data, stale_etag = current
            seen = _decode(data, text)
            if seen is not None and seen.written_by(holder, nonce):
                # Our own create or takeover landed; its response was lost (and the retry failed its condition).
                return held(stale_etag, "acquired")
            last_seen = seen
            why = _stale(seen, now)
            if why is None:
                assert seen is not None
                raise LeaseHeld(seen.holder, seen.expires_at, text)
            etag = store.replace(body, stale_etag)
            if etag is not None:
                return held(etag, f"taken over from {why}")
            # Someone changed it between our read and our write; the next round reads who.
        except _Uncertain as exc:
            logger.warning("%s; trying again", exc)
            uncertain = exc
    if uncertain is not None:
        raise OSError(f"lease {text}: no answer after {_MAX_ATTEMPTS} attempts ({uncertain})") from uncertain
    if last_seen is not None:
        raise LeaseHeld(last_seen.holder, last_seen.expires_at, text)
    raise OSError(f"lease {text}: gave up after {_MAX_ATTEMPTS} contended attempts")


def _stale(seen: _Record | None, now: datetime) -> str | None:
    """Why a lease found in place may be taken over (its previous holder, in words), or None: it is held."""
    if seen is None:
        return "an unreadable lease"
    if now >= seen.expires_at:
        return f"expired {seen.holder}"
    if _is_dead(seen.process):
        assert seen.process is not None
        return f"{seen.holder}, whose process {seen.process.pid} on this host is gone"
    return None


def renew(lease: Lease, ttl: timedelta = DEFAULT_TTL, now: datetime | None = None) -> Lease:
    """Extend a held lease to ``now + ttl``, only if it is still ours (our holder id and nonce).

    Args:
        lease: The lease as last returned by :func:`acquire` or :func:`renew`.
        ttl: New lifetime from ``now``.
        now: Current time (aware); None means the system clock.

    Returns:
        Lease: The renewed lease (new ``expires_at`` and ``etag``); use it from now on.

    Raises:
        LeaseLost: Someone took it over or deleted it.
        ValueError: Non-positive ttl or naive ``now``.
        OSError: No answer from the store (the renewal may have landed: renewing again sorts it out).
    """
    _check_ttl(ttl)
    now = _now(now)
    acquired_at = lease.acquired_at or now
    process = lease.process or this_process()
    body = _Record(lease.holder, now + ttl, acquired_at, now, lease.nonce, ttl, process).encode()
    store = _store_for(lease.uri, lease.storage_config)
    etag = lease.etag
    for _ in range(_MAX_ATTEMPTS):
        new_etag = store.replace(body, etag)
        if new_etag is not None:
            break
        current = store.read()
        if current is None:
            raise _lost(lease, current, "it was deleted before renewal")
        data, etag = current
        if data == body:
            new_etag = etag  # our retried write had landed already
            break
        seen = _decode(data, lease.uri)
        if seen is None or not seen.written_by(lease.holder, lease.nonce):
            raise _lost(lease, current, "it was taken over before renewal")
        # An earlier write of ours whose response was lost landed after all: renew over it.
    else:
        raise OSError(f"lease {lease.uri}: renewal gave up after {_MAX_ATTEMPTS} contended attempts")
    logger.info("lease %s renewed by %s", lease.uri, lease.holder)
    return dataclasses.replace(lease, expires_at=now + ttl, etag=new_etag, acquired_at=acquired_at, process=process)


def release(lease: Lease) -> None:
    """Delete a held lease, only if it is still ours. Releasing a lease that is gone is a no-op.

    Args:
        lease: The lease as last returned by :func:`acquire` or :func:`renew`.

    Raises:
        LeaseLost: Someone else holds it now; their lease is left untouched.
        OSError: No answer from the store (the lease then lapses with its TTL, or is taken over at
            once on this host once this process has exited).
    """
    store = _store_for(lease.uri, lease.storage_config)
    for _ in range(_MAX_ATTEMPTS):
        current = store.read()
        if current is None:
            logger.info("lease %s of %s already gone", lease.uri, lease.holder)
            return
        data, etag = current
        if etag != lease.etag:
            seen = _decode(data, lease.uri)
            # Ours with another etag: a later renewal through another Lease object, or one whose response was lost.
            if seen is None or not seen.written_by(lease.holder, lease.nonce):
                raise _lost(lease, current, "someone else holds it; left in place")
        if store.delete(etag):
            logger.info("lease %s released by %s", lease.uri, lease.holder)
            return
        # Changed between our read and our delete: the next round reads by whom.
    raise _lost(lease, store.read(), "it kept changing while releasing; left in place")


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
    """Hold a lease for the duration of a ``with`` block, renewing it in a daemon thread (a heartbeat).

    Acquires on enter (raising :class:`LeaseHeld` if someone else holds it), renews every
    ``interval`` (default ``ttl / 3``) and, on exit, stops the thread and releases. A renewal that
    finds the lease taken over is recorded; :meth:`check` then raises it, so call ``check()`` before
    committing outputs. Other renewal errors (a network blip) are logged and retried sooner than the
    interval: until ``expires_at`` passes, nobody else can have taken the lease. A process killed
    outright leaves its lease behind: it lapses after ``ttl``, or at once for a run on the same host.

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
            interval: Time between renewals (timedelta or seconds); None means ``ttl / 3``. Must be
                shorter than ``ttl``.
            storage_config: S3 settings; None means :meth:`StorageConfig.from_env`.

        Raises:
            ValueError: Non-positive ttl, or an interval not in (0, ttl).
        """
        _check_ttl(ttl)
        seconds = ttl.total_seconds() / RENEWALS_PER_TTL if interval is None else _seconds(interval)
        if not 0 < seconds < ttl.total_seconds():
            raise ValueError(f"renewal interval must be in (0, ttl={ttl}), got {seconds}s")
        self._uri = os.fspath(uri)
        self._holder = holder or default_holder()
        self._ttl = ttl
        self._interval = seconds
        self._config = storage_config
        self._guard = threading.Lock()
        self._renewing = threading.Lock()  # one renewal at a time: the thread's or check()'s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease: Lease | None = None
        self._lost: LeaseLost | None = None

    @property
    def ttl(self) -> timedelta:
        return self._ttl

    @property
    def interval(self) -> float:
        """Seconds between renewals."""
        return self._interval

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
        """Raise unless this keeper holds the lease, confirmed by a renewal just now.

        Call it right before a commit: the renewal gives the commit a whole ``ttl`` of margin. When the
        store does not answer, the lease counts as held only while at least one ``interval`` is left.

        Raises:
            LeaseLost: It was taken over or deleted, or it is about to expire and cannot be renewed.
        """
        lost = self.lost
        if lost is not None:
            raise lost
        try:
            self._renew()
        except LeaseLost:
            raise
        except Exception as exc:  # noqa: BLE001 - judged by the time left, below
            lease = self.lease
            left = (lease.expires_at - datetime.now(timezone.utc)).total_seconds()
            if left < self._interval:
                raise LeaseLost(lease.uri, lease.holder, None,
                                f"it could not be renewed ({type(exc).__name__}: {exc}) and expires in {left:.0f} s") from exc
            logger.warning("lease %s not renewed before the check (%s: %s); %.0f s left", lease.uri,
                           type(exc).__name__, exc, left)

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
        only delays the next run until it expires (on this host: until this process has exited).
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

    def _renew(self) -> None:
        """One renewal; a LeaseLost is recorded (and raised)."""
        with self._renewing:
            try:
                renewed = renew(self.lease, self._ttl)
            except LeaseLost as exc:
                with self._guard:
                    self._lost = exc
                raise
            with self._guard:
                if self._lease is not None:
                    self._lease = renewed

    def _run(self) -> None:
        wait = self._interval
        while not self._stop.wait(wait):
            try:
                self._renew()
            except LeaseLost as exc:
                logger.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - transient; retried soon, long before expiry
                logger.warning("lease %s renewal failed (%s: %s); retrying", self._uri, type(exc).__name__, exc)
                wait = self._interval / RENEWALS_PER_TTL
                continue
            wait = self._interval


def _seconds(value: timedelta | float) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
