"""One way to reach files for the whole project: local paths, ``file://`` URIs and ``s3://bucket/key``.

Every stage names its inputs and outputs by URI and goes through this module, so a job runs the same
against a laptop directory, MinIO, moto or AWS S3. Three client stacks are involved, each where it fits:

* :func:`filesystem` gives a ``pyarrow.fs.FileSystem`` plus the path inside it. That is what Ray Data
  (``ray.data.read_*(paths, filesystem=fs)``) and ``pyarrow.parquet`` use. S3 filesystems are cached
  per :class:`StorageConfig`, because building one sets up an AWS SDK client and a connection pool.
* :func:`boto3_client` gives a (cached, thread-safe) botocore S3 client. The small-object operations
  (:func:`read_bytes`, :func:`write_bytes`, :func:`exists`, :func:`list_files`, :func:`delete_prefix`)
  use it because it exposes exactly one request per call, ETags and error codes, and later conditional
  puts.
* :func:`fsspec_filesystem` gives an fsspec filesystem for libraries that want one (e.g. DuckDB).

Connection settings live in the frozen, hashable :class:`StorageConfig`. ``config=None`` everywhere means
:meth:`StorageConfig.from_env`; credentials left unset fall through to the SDKs' default chains (profile
files, instance metadata, web identity). ``to_dict``/``from_dict`` carry a config to Ray workers as plain
kwargs; its ``repr`` masks the secrets and nothing here logs them.

URI conventions: the scheme is ``file`` or ``s3``; anything without ``scheme://`` is a local path and is
made absolute. The rest of a URI is taken literally (no percent-decoding), so :func:`join` and the URIs
that :func:`list_files` returns round-trip. Prefixes in :func:`list_files` and :func:`delete_prefix`
have directory semantics on both backends: ``s3://b/x`` covers the keys under ``x/``, not ``xyz``.

Local writes are atomic: :func:`write_bytes` writes a temporary file in the target directory and renames
it into place with ``os.replace``, so readers never see a half-written file, as with S3 where an object
only appears once its upload completes. The temporary files end in :data:`TEMP_SUFFIX` and are skipped
by :func:`list_files`.

Why one module of ~1,100 lines: it is the project's single door to storage; the local and S3 backends
share the URI rules, atomic-write and retry policy and the error mapping that callers rely on being
the same on both.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import threading
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Any, Union
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = [
    "TEMP_SUFFIX",
    "StorageConfig",
    "FileEntry",
    "parse_uri",
    "filesystem",
    "fsspec_filesystem",
    "boto3_client",
    "read_bytes",
    "write_bytes",
    "exists",
    "list_files",
    "delete_prefix",
    "join",
    "absolute",
    "StorageUnavailable",
    "S3_MAX_ATTEMPTS",
    "retry_count",
    "unavailable_cause",
    "task_storage_error",
]

UriLike = Union[str, "os.PathLike[str]"]

#: Suffix of the temporary files behind atomic local writes; :func:`list_files` skips them.
TEMP_SUFFIX = ".ichd-tmp"

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_SUPPORTED = "a local path, file:// or s3://"
_MASK = "***"


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageConfig:
    """How to reach S3 (or an S3-compatible store). Frozen and hashable, so it can key caches.

    Every field may be left unset: the SDKs then use their own defaults and credential chains.

    Attributes:
        endpoint_url: ``http(s)://host[:port]`` of an S3-compatible endpoint (MinIO, moto); None for AWS.
        region: AWS region, e.g. ``us-east-1``.
        access_key_id: Access key id; set together with ``secret_access_key`` or not at all.
        secret_access_key: Secret access key (masked in ``repr``).
        session_token: Session token for temporary credentials (masked in ``repr``).
        anonymous: Send unsigned requests (public buckets); excludes explicit credentials.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    anonymous: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "anonymous":
                if not isinstance(value, bool):
                    raise TypeError(f"StorageConfig.anonymous must be a bool, got {type(value).__name__}")
            elif value is not None and not isinstance(value, str):
                raise TypeError(f"StorageConfig.{f.name} must be a str or None, got {type(value).__name__}")
            elif value == "":
                # Empty strings (typically from empty env vars) mean "unset"; normalise so equal
                # configs hash equally and the SDKs never see an empty endpoint or key.
                object.__setattr__(self, f.name, None)
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("StorageConfig needs both access_key_id and secret_access_key, or neither")
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("StorageConfig.session_token needs access_key_id and secret_access_key")
        if self.anonymous and self.access_key_id is not None:
            raise ValueError("StorageConfig.anonymous excludes explicit credentials")
        if self.endpoint_url is not None:
            _split_endpoint(self.endpoint_url)  # validate early, with a clear message

    def __repr__(self) -> str:
        # Secrets must never reach logs, tracebacks or the Ray dashboard through a repr.
        ak = self.access_key_id
        shown_ak = None if ak is None else (ak[:4] + _MASK if len(ak) > 8 else _MASK)
        return (
            f"StorageConfig(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"access_key_id={shown_ak!r}, "
            f"secret_access_key={None if self.secret_access_key is None else _MASK!r}, "
            f"session_token={None if self.session_token is None else _MASK!r}, "
            f"anonymous={self.anonymous!r})"
        )

    __str__ = __repr__

    @classmethod
    def from_env(cls, **overrides: Any) -> StorageConfig:
        """Build a config from explicit values, filling the unset ones from the standard AWS variables.

        Endpoint: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``. Region: ``AWS_REGION``, else
        ``AWS_DEFAULT_REGION``. Credentials: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
        ``AWS_SESSION_TOKEN`` (not read when ``anonymous=True``). Empty variables count as unset.

        Args:
            **overrides: Field values (see :class:`StorageConfig`); a value of None means "from the
                environment".

        Returns:
            StorageConfig: The merged config.

        Raises:
            TypeError: An override names no field.
            ValueError: The result is inconsistent (e.g. a key id without its secret).
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"StorageConfig.from_env got unknown field(s): {', '.join(unknown)}")

        def env(*keys: str) -> str | None:
            for key in keys:
                value = os.environ.get(key)
                if value:
                    return value
            return None

        anonymous = bool(overrides.get("anonymous") or False)
        values: dict[str, Any] = {
            "endpoint_url": env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            "region": env("AWS_REGION", "AWS_DEFAULT_REGION"),
            "anonymous": anonymous,
        }
        if not anonymous:
            values["access_key_id"] = env("AWS_ACCESS_KEY_ID")
            values["secret_access_key"] = env("AWS_SECRET_ACCESS_KEY")
            values["session_token"] = env("AWS_SESSION_TOKEN")
        explicit_keys = any(overrides.get(k) is not None for k in ("access_key_id", "secret_access_key"))
        if explicit_keys:
            # Explicit credentials replace the environment's as a set; mixing an explicit key id with
            # an env secret (or token) would silently pair credentials that don't belong together.
            values.update(access_key_id=None, secret_access_key=None, session_token=None)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self, *, include_secrets: bool = True) -> dict[str, Any]:
        """Plain kwargs for shipping the config to Ray workers.

        Args:
            include_secrets: With False, the secret key and session token are left out (and the key
                id too, since it must travel with its secret); a worker then rebuilds with
                ``StorageConfig.from_env(**d)`` and takes the credentials from its own environment.

        Returns:
            dict[str, Any]: Field name to value. Treat it as a secret when ``include_secrets`` is True.
        """
        d = asdict(self)
        if not include_secrets:
            for key in ("access_key_id", "secret_access_key", "session_token"):
                d[key] = None
        return d

    def for_workers(self) -> dict[str, Any]:
        """What travels to Ray workers (task and actor arguments): no credentials. Workers rebuild
        with :meth:`on_worker` and take credentials from their own environment or instance role,
        so secrets never sit in task arguments or the dashboard."""
        return self.to_dict(include_secrets=False)

    @classmethod
    def on_worker(cls, d: dict[str, Any] | None) -> StorageConfig:
        """Inverse of :meth:`for_workers`, filling credentials from the worker's environment."""
        return cls.from_env(**(d or {}))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> StorageConfig:
        """Inverse of :meth:`to_dict`.

        Args:
            d: Output of :meth:`to_dict`; None gives the empty config.

        Returns:
            StorageConfig: The config.

        Raises:
            TypeError: ``d`` has keys that are not fields.
        """
        if d is None:
            return cls()
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TypeError(f"StorageConfig.from_dict got unknown key(s): {', '.join(unknown)}")
        return cls(**d)


def _split_endpoint(endpoint_url: str) -> tuple[str, str]:
    """``http(s)://host[:port][/]`` -> (scheme, ``host[:port]``), as pyarrow wants them."""
    parts = urlsplit(endpoint_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"endpoint_url must look like http(s)://host[:port], got {endpoint_url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"endpoint_url must not carry a path or query, got {endpoint_url!r}")
    if "@" in parts.netloc:
        # Credentials in the URL would bypass masking; refuse without echoing them.
        raise ValueError("endpoint_url must not embed credentials")
    return parts.scheme, parts.netloc


def _resolve(config: StorageConfig | None) -> StorageConfig:
    return StorageConfig.from_env() if config is None else config


# --------------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------------


def parse_uri(uri: UriLike) -> tuple[str, str]:
    """Split a URI into scheme and filesystem path.

    Args:
        uri: A local path (relative or absolute, str or PathLike), ``file:///abs/path`` (host empty or
            ``localhost``) or ``s3://bucket/key``.

    Returns:
        tuple[str, str]: ``("file", absolute_local_path)`` or ``("s3", "bucket/key")``; for S3 the key
        part is kept as written (it may be empty or end in ``/``).

    Raises:
        ValueError: Unsupported scheme, ``s3://`` without a bucket, ``file://`` with a remote host, or
            an empty URI. The message names the URI.
    """
    text = os.fspath(uri)
    if not isinstance(text, str):
        raise TypeError(f"URI must be a str or PathLike of str, got {type(text).__name__}")
    if not text:
        raise ValueError("empty URI")
    m = _SCHEME_RE.match(text)
    if m is None:
        return "file", os.path.abspath(text)
    scheme = m.group(1).lower()
    rest = text[m.end():]
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise ValueError(f"file:// URI with a remote host is not supported: {text!r}")
        if not slash:
            raise ValueError(f"file:// URI without a path: {text!r}")
        return "file", os.path.abspath("/" + path)
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"s3:// URI without a bucket: {text!r}")
        return "s3", f"{bucket}/{key}" if key else bucket
    raise ValueError(f"unsupported URI scheme {scheme!r} in {text!r}; expected {_SUPPORTED}")


def join(uri: UriLike, *parts: str) -> str:
    """Append path parts to a URI with ``/``, keeping its scheme (a string operation, no I/O).

    ``join("s3://b/x", "y", "z.dcm") == "s3://b/x/y/z.dcm"``; ``join("/tmp/a", "b") == "/tmp/a/b"``.
    Leading and trailing slashes of the parts are dropped (parts are always relative) and empty parts
    are skipped; the base keeps its form (a relative local base stays relative).

    Args:
        uri: Base URI or local path.
        *parts: Path components to append.

    Returns:
        str: The joined URI.
    """
    out = os.fspath(uri)
    for part in parts:
        part = os.fspath(part).strip("/")
        if not part:
            continue
        out = out + part if out.endswith("/") else f"{out}/{part}"
    return out


def absolute(uri: UriLike) -> str:
    """The URI with a local path made absolute, in the form it was written (plain or ``file://``): what a
    process in another working directory (a Ray Train worker runs in its run's folder) can open. S3 URIs
    are returned as they are."""
    scheme, path = parse_uri(uri)
    return _local_uri(path, _local_style(uri)) if scheme == "file" else os.fspath(uri)


def _split_s3(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _local_style(uri: UriLike) -> bool:
    """Whether a local URI was written as ``file://`` (so derived URIs keep that form)."""
    return os.fspath(uri)[:7].lower() == "file://"


def _local_uri(path: str, file_style: bool) -> str:
    return "file://" + path if file_style else path


# --------------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------------

_LOCAL_FS = pafs.LocalFileSystem()


@functools.lru_cache(maxsize=16)
def _s3_filesystem(config: StorageConfig) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"anonymous": config.anonymous}
    if config.endpoint_url is not None:
        kwargs["scheme"], kwargs["endpoint_override"] = _split_endpoint(config.endpoint_url)
    if config.region is not None:
        kwargs["region"] = config.region
    if config.access_key_id is not None:
        kwargs.update(access_key=config.access_key_id, secret_key=config.secret_access_key)
        if config.session_token is not None:
            kwargs["session_token"] = config.session_token
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: UriLike, config: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for a URI, and the path to use with it.

    Pass both to Ray Data (``ray.data.read_parquet(path, filesystem=fs)``) or pyarrow
    (``pq.read_table(path, filesystem=fs)``). S3 filesystems are cached per config.

    Args:
        uri: Local path, ``file://`` or ``s3://`` URI.
        config: S3 settings; None means :meth:`StorageConfig.from_env`. Ignored for local URIs.

    Returns:
        tuple[pyarrow.fs.FileSystem, str]: ``(LocalFileSystem, absolute_path)`` or
        ``(S3FileSystem, "bucket/key")``.

    Raises:
        ValueError: Unsupported URI.
    """
    scheme, path = parse_uri(uri)
    if scheme == "file":
        return _LOCAL_FS, path
    return _s3_filesystem(_resolve(config)), path


def fsspec_filesystem(uri: UriLike, config: StorageConfig | None = None) -> Any:
    """An fsspec filesystem for a URI's scheme, for libraries that take fsspec (e.g. DuckDB).

    Paths to use with it are the second element of :func:`parse_uri` (``bucket/key`` for S3).

    Args:
        uri: Local path, ``file://`` or ``s3://`` URI (only the scheme matters).
        config: S3 settings; None means :meth:`StorageConfig.from_env`. Ignored for local URIs.

    Returns:
        fsspec.AbstractFileSystem: ``s3fs.S3FileSystem`` or fsspec's ``LocalFileSystem``.

    Raises:
        ValueError: Unsupported URI.
    """
    scheme, _ = parse_uri(uri)
    if scheme == "file":
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem()
    import s3fs

    cfg = _resolve(config)
    client_kwargs: dict[str, Any] = {}
    if cfg.endpoint_url is not None:
        client_kwargs["endpoint_url"] = cfg.endpoint_url
    if cfg.region is not None:
        client_kwargs["region_name"] = cfg.region
    # No listings cache and no shared instance: fsspec would otherwise hand back a filesystem whose cached
    # directory listings predate the last commit, and DuckDB views would miss new runs in a long-lived
    # process (the nightly job reads its own previous commits through them).
    return s3fs.S3FileSystem(
        skip_instance_cache=True,
        use_listings_cache=False,
        anon=cfg.anonymous,
        key=cfg.access_key_id,
        secret=cfg.secret_access_key,
        token=cfg.session_token,
        client_kwargs=client_kwargs,
    )


@functools.lru_cache(maxsize=16)
def _boto3_client(config: StorageConfig) -> Any:
    import boto3
    import botocore
    from botocore.config import Config

    options: dict[str, Any] = {
        # total_max_attempts counts the first try too (botocore's max_attempts counts only retries)
        "retries": {"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS},
        # Ray actors use thread pools; botocore's default of 10 connections would serialise them.
        "max_pool_connections": 32,
    }
    if config.anonymous:
        options["signature_version"] = botocore.UNSIGNED
    # A private session: boto3's default session is not thread-safe, the client it makes is.
    session = boto3.session.Session()
    client = session.client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        aws_session_token=config.session_token,
        config=Config(**options),
    )
    # Count requests and attempts, so a run can report the retries it needed (retry_count()).
    client.meta.events.register("before-call.s3", _RETRIES.call)
    client.meta.events.register("request-created.s3", _RETRIES.attempt)
    return client


def boto3_client(config: StorageConfig | None = None) -> Any:
    """A botocore S3 client for a config (cached per config; clients are thread-safe).

    Args:
        config: S3 settings; None means :meth:`StorageConfig.from_env`.

    Returns:
        botocore.client.S3: The client, with the config's endpoint, region and credentials.
    """
    return _boto3_client(_resolve(config))


def _client_error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class StorageUnavailable(Exception):
    """S3 kept failing (throttling, 5xx, resets, timeouts) after the client's bounded retries.

    Deliberately not an ``OSError``: an object that cannot be read is that object's ``read_error``,
    but a store that does not answer says nothing about the object, so the run stops uncommitted
    instead of rejecting good inputs."""

    def __init__(self, uri: str, detail: str) -> None:
        self.uri, self.detail = uri, detail
        super().__init__(f"{uri}: object storage unavailable after {S3_MAX_ATTEMPTS} attempts: {detail}")

    def __reduce__(self):  # keep the fields across Ray's pickling
        return (StorageUnavailable, (self.uri, self.detail))


#: Attempts per S3 request (botocore "standard" retries: exponential backoff with jitter).
S3_MAX_ATTEMPTS = 5
_UNAVAILABLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable",
     "500", "502", "503", "504"}
)


def unavailable_cause(exc: BaseException | None) -> StorageUnavailable | None:
    """The :class:`StorageUnavailable` behind an exception (Ray wraps a task's error), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, StorageUnavailable):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def task_storage_error(exc: BaseException) -> Exception | None:
    """The storage failure behind an error a Ray task raised, rebuilt for the driver, or None: a
    :class:`StorageUnavailable`, or the task's ``OSError`` as it was raised (Ray writes its own note into
    the copy's filename, so the URI travels in ``strerror``)."""
    cause = unavailable_cause(exc)
    if cause is not None:
        return StorageUnavailable(cause.uri, cause.detail)
    inner = getattr(exc, "cause", None)
    if isinstance(inner, OSError) and inner.errno is not None:
        return type(inner)(inner.errno, inner.strerror)
    return None


def _translate_s3_error(exc: Exception, uri: str) -> Exception:
    """Map a botocore error to the matching builtin exception, naming the URI (never credentials)."""
    from botocore.exceptions import BotoCoreError

    if isinstance(exc, BotoCoreError):  # connection reset, timeout, unparseable answer, after retries
        return StorageUnavailable(uri, f"{type(exc).__name__}: {exc}")
    code = _client_error_code(exc)
    # The URI is in the message as well as in .filename: Ray replaces .filename when it re-raises.
    if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
        return FileNotFoundError(errno.ENOENT, f"No such object ({code}): {uri}", uri)
    if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
        return PermissionError(errno.EACCES, f"Access denied ({code}): {uri}", uri)
    if code in _UNAVAILABLE_CODES:
        return StorageUnavailable(uri, f"{code}")
    return OSError(f"S3 request failed for {uri}: {exc}")


def _client_error_type() -> type[Exception]:
    from botocore.exceptions import ClientError

    return ClientError


def _s3_errors() -> tuple[type[Exception], ...]:
    """What a botocore call raises: service errors and transport errors (after retries)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


class _RetryCounter:
    """Per process: S3 requests made and attempts sent (botocore events), so retries = difference."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = self.attempts = 0

    def call(self, **_: Any) -> None:
        with self._lock:
            self.calls += 1

    def attempt(self, **_: Any) -> None:
        with self._lock:
            self.attempts += 1


_RETRIES = _RetryCounter()


def retry_count() -> int:
    """S3 retries this process has made so far (attempts beyond the first of each request). Take the
    difference around a piece of work to count its retries."""
    with _RETRIES._lock:
        return _RETRIES.attempts - _RETRIES.calls


# --------------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file (or S3 object) found by :func:`list_files`.

    Attributes:
        uri: Its URI, in the form of the listed prefix (``s3://``, ``file://`` or a plain path).
        size: Size in bytes.
        mtime: Modification time as epoch seconds, or None if unknown.
        etag: S3 ETag without quotes; None for local files.
    """

    uri: str
    size: int
    mtime: float | None
    etag: str | None


def read_bytes(
    uri: UriLike, config: StorageConfig | None = None, *, length: int | None = None, offset: int = 0
) -> bytes:
    """Read a whole file or object, or ``length`` bytes from ``offset`` (one ranged GET on S3).

    Args:
        uri: Local path, ``file://`` or ``s3://`` URI.
        config: S3 settings; None means :meth:`StorageConfig.from_env`.
        length: read at most this many bytes (headers without pixel data, one cached slice).
        offset: first byte to read; needs ``length`` when > 0.

    Returns:
        bytes: The content.

    Raises:
        FileNotFoundError: Missing file, object or bucket; the message names the URI.
        PermissionError: Access denied.
    """
    text = os.fspath(uri)
    if offset < 0 or (offset and length is None):
        raise ValueError(f"read_bytes({text}): offset must be >= 0 and needs a length, got offset={offset}, length={length}")
    scheme, path = parse_uri(text)
    if scheme == "file":
        try:
            with open(path, "rb") as fh:
                if offset:
                    fh.seek(offset)
                return fh.read() if length is None else fh.read(length)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "No such file", text) from None
    bucket, key = _split_s3(path)
    if not key:
        raise IsADirectoryError(errno.EISDIR, "Not an object (no key)", text)
    try:
        ranged = {} if length is None else {"Range": f"bytes={offset}-{offset + max(length, 1) - 1}"}
        response = boto3_client(config).get_object(Bucket=bucket, Key=key, **ranged)
        with response["Body"] as body:
            return body.read()
    except _s3_errors() as exc:
        raise _translate_s3_error(exc, text) from None


def _temp_path(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def _open_temp(path: str) -> tuple[str, int]:
    """Create the temporary sibling of ``path`` (and missing parents); returns (temp path, fd)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temp_path(path)
    # os.open with 0o666 honours the umask; tempfile.mkstemp would leave the result 0600.
    return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def write_bytes(uri: UriLike, data: Any, config: StorageConfig | None = None) -> None:
    """Write a whole file or object, replacing any existing one.

    Local: written to a temporary file in the target directory (parents are created) and renamed into
    place with ``os.replace``, so readers see the old content or the new, never a partial file. The
    rename makes the write atomic, not crash-durable (no fsync). S3: one PUT.

    Args:
        uri: Local path, ``file://`` or ``s3://`` URI.
        data: The content: bytes, bytearray or any buffer (memoryview, numpy array, pyarrow Buffer).
        config: S3 settings; None means :meth:`StorageConfig.from_env`.

    Raises:
        FileNotFoundError: The S3 bucket does not exist.
        PermissionError: Access denied.
    """
    text = os.fspath(uri)
    scheme, path = parse_uri(text)
    # Local files take any buffer as is; boto3 wants bytes, bytearray or a file (a pyarrow Buffer or
    # memoryview is copied once here).
    payload = data if isinstance(data, (bytes, bytearray)) or scheme == "file" else bytes(memoryview(data))
    if scheme == "file":
        tmp = None
        try:
            tmp, fd = _open_temp(path)
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
            os.replace(tmp, path)
        except BaseException as exc:
            if tmp is not None:
                _unlink_quietly(tmp)
            if isinstance(exc, OSError) and exc.errno is not None:
                # name the target, not our temporary sibling (a failed write names no file at all)
                raise type(exc)(exc.errno, exc.strerror, text) from None
            raise
        return
    bucket, key = _split_s3(path)
    if not key or key.endswith("/"):
        raise IsADirectoryError(errno.EISDIR, "Not an object key", text)
    try:
        boto3_client(config).put_object(Bucket=bucket, Key=key, Body=payload)
    except _s3_errors() as exc:
        raise _translate_s3_error(exc, text) from None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def exists(uri: UriLike, config: StorageConfig | None = None) -> bool:
    """Whether a file or directory exists at the URI.

    On S3 that is an object at the key, or any object under ``key/`` (a "directory"); a bare bucket
    URI asks whether the bucket exists.

    Args:
        uri: Local path, ``file://`` or ``s3://`` URI.
        config: S3 settings; None means :meth:`StorageConfig.from_env`.

    Returns:
        bool: True if it exists.

    Raises:
        PermissionError: S3 denied the request.
    """
    text = os.fspath(uri)
    scheme, path = parse_uri(text)
    if scheme == "file":
        return os.path.exists(path)
    bucket, key = _split_s3(path)
    client = boto3_client(config)
    client_error = _client_error_type()
    try:
        if not key:
            client.head_bucket(Bucket=bucket)
            return True
        if not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except client_error as exc:
                if not isinstance(_translate_s3_error(exc, text), FileNotFoundError):
                    raise
        response = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        return response.get("KeyCount", 0) > 0
    except _s3_errors() as exc:
        translated = _translate_s3_error(exc, text)
        if isinstance(translated, FileNotFoundError):
            return False
        raise translated from None


def list_files(
    prefix_uri: UriLike,
    suffix: str | tuple[str, ...] | None = None,
    recursive: bool = True,
    config: StorageConfig | None = None,
) -> list[FileEntry]:
    """List the files under a directory or S3 prefix, sorted by URI.

    The prefix has directory semantics (``s3://b/x`` lists ``x/...``, not ``xyz``). If nothing is under
    it but the prefix itself is a file or object, that one entry is returned, so a caller can accept
    either a file or a directory. A missing prefix gives an empty list. Directories, S3 directory
    markers (keys ending in ``/``) and the temporaries of in-flight atomic writes are excluded.

    Args:
        prefix_uri: Directory or prefix URI (local path, ``file://`` or ``s3://``).
        suffix: Keep only URIs ending with this (or one of these) suffix(es); case-sensitive.
        recursive: Descend into subdirectories.
        config: S3 settings; None means :meth:`StorageConfig.from_env`.

    Returns:
        list[FileEntry]: The entries, sorted by ``uri``.

    Raises:
        FileNotFoundError: The S3 bucket does not exist.
        PermissionError: Access denied.
    """
    text = os.fspath(prefix_uri)
    scheme, path = parse_uri(text)
    if scheme == "file":
        entries = _list_local(path, recursive, _local_style(text))
    else:
        entries = _list_s3(path, recursive, text, config)
    if suffix is not None:
        entries = [e for e in entries if e.uri.endswith(suffix)]
    entries.sort(key=lambda e: e.uri)
    return entries


def _list_local(root: str, recursive: bool, file_style: bool) -> list[FileEntry]:
    if os.path.isfile(root):
        st = os.stat(root)
        return [FileEntry(_local_uri(root, file_style), st.st_size, st.st_mtime, None)]
    out: list[FileEntry] = []
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            it = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue  # missing prefix, or a directory removed while walking
        with it:
            for entry in it:
                try:
                    if entry.is_dir():
                        # Not following directory symlinks avoids cycles; files behind symlinks count.
                        if recursive and not entry.is_symlink():
                            stack.append(entry.path)
                        continue
                    if not entry.is_file() or entry.name.endswith(TEMP_SUFFIX):
                        continue
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # removed between scandir and stat
                out.append(FileEntry(_local_uri(entry.path, file_style), st.st_size, st.st_mtime, None))
    return out


def _list_s3(path: str, recursive: bool, uri: str, config: StorageConfig | None) -> list[FileEntry]:
    bucket, key = _split_s3(path)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    client = boto3_client(config)
    params: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if not recursive:
        params["Delimiter"] = "/"
    out: list[FileEntry] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(**params):
            for obj in page.get("Contents", ()):
                if obj["Key"].endswith(("/", TEMP_SUFFIX)):
                    continue  # a directory marker, or the temporary of an in-flight write
                out.append(_s3_entry(bucket, obj["Key"], obj["Size"], obj.get("LastModified"), obj.get("ETag")))
        if not out and key and not key.endswith("/"):
            try:
                head = client.head_object(Bucket=bucket, Key=key)
            except _client_error_type() as exc:
                if not isinstance(_translate_s3_error(exc, uri), FileNotFoundError):
                    raise
            else:
                out.append(_s3_entry(bucket, key, head["ContentLength"], head.get("LastModified"), head.get("ETag")))
    except _s3_errors() as exc:
        raise _translate_s3_error(exc, uri) from None
    return out


def _s3_entry(bucket: str, key: str, size: int, last_modified: Any, etag: str | None) -> FileEntry:
    return FileEntry(
        uri=f"s3://{bucket}/{key}",
        size=int(size),
        mtime=last_modified.timestamp() if last_modified is not None else None,
        etag=etag.strip('"') if etag else None,
    )


# --------------------------------------------------------------------------------------------------
# Listing one level, and one prefix as Arrow (the pieces behind ichd_ray.pipeline.listing's fan-out)
# --------------------------------------------------------------------------------------------------

__all__ += ["FILE_TABLE_SCHEMA", "directory_uri", "list_level", "list_files_table", "files_table"]

#: The columns of :func:`files_table` and :func:`list_files_table`: one row per :class:`FileEntry`
#: (``mtime`` epoch seconds, ``etag`` without quotes); the same as the nightly listing's schema.
FILE_TABLE_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()), ("etag", pa.string())])


def directory_uri(prefix_uri: UriLike) -> str:
    """The prefix as :func:`list_files` reads it, in the literal form :func:`list_level` and
    :func:`list_files_table` take: an S3 prefix ends in exactly the ``/`` list_files adds
    (``s3://b/x``, ``s3://b/x/`` and ``s3://b/x//`` all give ``s3://b/x/``; a bucket gives ``s3://b/``).
    Local URIs are returned as written (local paths are normalised when opened).

    Args:
        prefix_uri: Directory or prefix URI (local path, ``file://`` or ``s3://``).

    Returns:
        str: The URI.
    """
    text = os.fspath(prefix_uri)
    scheme, path = parse_uri(text)
    if scheme == "file":
        return text
    bucket, key = _split_s3(path)
    return f"s3://{bucket}/" + (key.rstrip("/") + "/" if key.strip("/") else "")


def list_level(prefix_uri: UriLike, config: StorageConfig | None = None) -> tuple[list[FileEntry], list[str]]:
    """One level of a listing: the files directly under a prefix, and its child prefixes.

    On S3 that is one delimiter listing (``Delimiter='/'``, paginated: objects and CommonPrefixes both
    come 1,000 per page); locally one ``scandir``. The rules are :func:`list_files`'s: directory markers
    and the temporaries of in-flight local writes are skipped, directory symlinks are not children
    (never followed), and a local path that is a file gives that one entry. A prefix ending in ``/`` is
    taken literally, as the child prefixes this returns are (S3 keys may hold empty segments: the
    children of ``x/`` can include ``x//``, which must not be read as ``x/``); pass the top of a tree
    through :func:`directory_uri` first.

    Args:
        prefix_uri: Directory or prefix URI (local path, ``file://`` or ``s3://``).
        config: S3 settings; None means :meth:`StorageConfig.from_env`.

    Returns:
        tuple[list[FileEntry], list[str]]: The files at this level, sorted by URI, and the child
        prefixes as URIs ending in ``/``, sorted; together with the children's recursive listings they
        are exactly ``list_files(prefix_uri)``'s rows.

    Raises:
        FileNotFoundError: The S3 bucket does not exist.
        PermissionError: Access denied.
        StorageUnavailable: S3 kept failing after retries. A level is never returned in part.
    """
    text = os.fspath(prefix_uri)
    scheme, path = parse_uri(text)
    if scheme == "file":
        style = _local_style(text)
        entries = _list_local(path, False, style)
        children = []
        try:
            it = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            it = None  # missing prefix, or a file (its one entry is above)
        if it is not None:
            with it:
                for entry in it:
                    try:
                        # The directories _list_local descends into: not directory symlinks (cycles).
                        if entry.is_dir() and not entry.is_symlink():
                            children.append(_local_uri(entry.path, style) + "/")
                    except FileNotFoundError:
                        continue  # removed while scanning
    else:
        bucket, key = _split_s3(path)
        entries, children = [], []
        for page in _s3_list_pages(bucket, _literal_prefix(key), text, config, delimiter="/"):
            entries += _s3_page_entries(bucket, page)
            children += [f"s3://{bucket}/{p['Prefix']}" for p in page.get("CommonPrefixes", ())]
    entries.sort(key=lambda e: e.uri)
    children.sort()
    return entries, children


def list_files_table(prefix_uri: UriLike, config: StorageConfig | None = None) -> pa.Table:
    """``list_files(prefix_uri)`` (recursive, no suffix filter) as an Arrow table, sorted by URI.

    Arrow, because a Ray task listing part of a 40-million-object archive hands back four columns in
    one buffer each, not a Python object per file. A prefix ending in ``/`` is taken literally (see
    :func:`list_level`); any other form follows :func:`list_files` exactly, single-object case included.

    Args:
        prefix_uri: Directory or prefix URI (local path, ``file://`` or ``s3://``).
        config: S3 settings; None means :meth:`StorageConfig.from_env`.

    Returns:
        pyarrow.Table: :data:`FILE_TABLE_SCHEMA` rows.

    Raises:
        FileNotFoundError: The S3 bucket does not exist.
        PermissionError: Access denied.
        StorageUnavailable: S3 kept failing after retries. A listing is never returned in part.
    """
    text = os.fspath(prefix_uri)
    scheme, path = parse_uri(text)
    if scheme == "file":
        entries = _list_local(path, True, _local_style(text))
    else:
        bucket, key = _split_s3(path)
        if key.endswith("/"):
            entries = []
            for page in _s3_list_pages(bucket, key, text, config):
                entries += _s3_page_entries(bucket, page)
        else:
            entries = _list_s3(path, True, text, config)
    return files_table(entries).sort_by("uri")


def files_table(entries: list[FileEntry]) -> pa.Table:
    """File entries as an Arrow table of :data:`FILE_TABLE_SCHEMA`, in the order given.

    Args:
        entries: What :func:`list_files` or :func:`list_level` returned.

    Returns:
        pyarrow.Table: One row per entry.
    """
    return pa.table(
        [
            pa.array([e.uri for e in entries], pa.string()),
            pa.array([e.size for e in entries], pa.int64()),
            pa.array([e.mtime for e in entries], pa.float64()),
            pa.array([e.etag for e in entries], pa.string()),
        ],
        schema=FILE_TABLE_SCHEMA,
    )


def _literal_prefix(key: str) -> str:
    """list_files's prefix rule, except that a key ending in ``/`` is kept as it is (see list_level)."""
    if key.endswith("/"):
        return key
    return key + "/" if key else ""


def _s3_list_pages(bucket: str, prefix: str, uri: str, config: StorageConfig | None, delimiter: str | None = None):
    """ListObjectsV2 pages under an exact key prefix, through the one client (and retry policy) of this
    module; errors are translated as everywhere here, naming ``uri``."""
    params: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if delimiter is not None:
        params["Delimiter"] = delimiter
    try:
        page: dict[str, Any] = {}
        for page in boto3_client(config).get_paginator("list_objects_v2").paginate(**params):
            yield page
        if page.get("IsTruncated") and not page.get("NextContinuationToken"):
            # The paginator ends quietly on a truncated page without a token. A listing cut short would
            # make a nightly diff mark the missing objects deleted: fail instead.
            raise OSError(f"S3 listing of {uri} was cut short: a truncated page carried no continuation token")
    except _s3_errors() as exc:
        raise _translate_s3_error(exc, uri) from None


def _s3_page_entries(bucket: str, page: dict[str, Any]) -> list[FileEntry]:
    return [
        _s3_entry(bucket, obj["Key"], obj["Size"], obj.get("LastModified"), obj.get("ETag"))
        for obj in page.get("Contents", ())
        if not obj["Key"].endswith(("/", TEMP_SUFFIX))  # a directory marker, or an in-flight temporary
    ]


def delete_prefix(prefix_uri: UriLike, config: StorageConfig | None = None) -> int:
    """Delete everything under a directory or S3 prefix (directory semantics, see :func:`list_files`).

    A whole bucket or the filesystem root is refused, as a guard against a mistyped URI.

    Args:
        prefix_uri: Directory or prefix URI.
        config: S3 settings; None means :meth:`StorageConfig.from_env`.

    Returns:
        int: Number of files or objects deleted (S3 directory markers included). 0 if none existed.

    Raises:
        ValueError: The prefix is a bucket root or ``/``.
        OSError: S3 reported failures for some keys.
    """
    text = os.fspath(prefix_uri)
    scheme, path = parse_uri(text)
    if scheme == "file":
        if os.path.dirname(path) == path:
            raise ValueError(f"refusing to delete the filesystem root: {text!r}")
        if not os.path.isdir(path):
            return 0
        count = sum(len(files) for _, _, files in os.walk(path))
        shutil.rmtree(path)
        return count
    bucket, key = _split_s3(path)
    if not key.strip("/"):
        raise ValueError(f"refusing to delete a whole bucket: {text!r}")
    client = boto3_client(config)
    prefix = key.rstrip("/") + "/"
    deleted = 0
    try:
        # Deleting page by page is safe with list_objects_v2: continuation tokens are positional.
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", ())]
            if not keys:
                continue
            response = client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise OSError(
                    f"S3 failed to delete {len(errors)} object(s) under {text}, e.g. "
                    f"{first.get('Key')}: {first.get('Code')}"
                )
            deleted += len(keys)
    except _s3_errors() as exc:
        translated = _translate_s3_error(exc, text)
        if isinstance(translated, FileNotFoundError):
            return 0
        raise translated from None
    return deleted
