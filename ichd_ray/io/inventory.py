"""An S3 Inventory report as the archive's listing: what the nightly job diffs, without ListObjects.

Listing 40 M objects with ListObjectsV2 takes hours of paginated requests; AWS S3 Inventory writes the
same list daily (or weekly) as CSV, ORC or Parquet files into a destination bucket. :func:`read_inventory`
turns one such report into the table the nightly diff takes (:data:`INVENTORY_LISTING_SCHEMA`, identical
to ``ichd_ray.pipeline.incremental.LISTING_SCHEMA``, which this lower layer may not import), holding
exactly the rows :func:`ichd_ray.io.storage.list_files` would give for the same bucket state:

* only objects under the archive prefix, with directory semantics (``s3://b/ct`` covers ``ct/...``, not
  ``ct2/...``), without directory markers (keys ending in ``/``) or the temporaries of in-flight atomic
  writes (:data:`~ichd_ray.io.storage.TEMP_SUFFIX`); a prefix with nothing under it that is itself an
  object gives that one object, as ``list_files`` does;
* ``uri`` = ``s3://<bucket>/<key>`` with the key decoded (CSV inventories URL-encode keys in the
  ``application/x-www-form-urlencoded`` style: ``+`` is a space and ``%2B`` a plus; Parquet and ORC keys
  are written as they are), ``size`` in bytes, ``mtime`` in epoch seconds, ``etag`` without quotes;
  a field the inventory configuration leaves out (Size, LastModifiedDate, ETag are optional) is null,
  and the diff then falls back to what is there;
* of a versioned inventory (``IncludedObjectVersions = All``), only current versions that are not delete
  markers.

The report's format is AWS's (Amazon S3 User Guide, "Locating your inventory list" / "Amazon S3
inventory list"): ``<dest-prefix>/<source-bucket>/<config-id>/YYYY-MM-DDTHH-MMZ/manifest.json`` names
the source bucket, the destination bucket's ARN, ``creationTimestamp`` (epoch milliseconds, as a string),
``fileFormat`` (``CSV``, ``ORC`` or ``Parquet``), ``fileSchema`` (the columns, in file order: a
comma-separated list for CSV, a ``message s3.inventory {...}`` or ``struct<...>`` schema otherwise) and
the data files (``key`` relative to the destination bucket, ``size``, ``MD5checksum``). A
``manifest.checksum`` next to it holds the MD5 of ``manifest.json``. CSV data files are gzip-compressed,
without a header row, every field quoted.

An inventory that is not exactly what the manifest describes is refused with :class:`InventoryError`
(naming the manifest, and the data file and row where there is one), never read in part: a listing that
silently lacks objects would mark their studies deleted. Storage failures (access denied, S3 not
answering) are raised as :mod:`ichd_ray.io.storage` raises them, since they say nothing about the report.

The inventory is a snapshot taken around ``creationTimestamp`` (and eventually consistent: objects
written just before may be missing), so a caller refuses one older than its last committed run with
:func:`check_fresh`. Whether the inventory configuration's own prefix filter covers the archive cannot be
seen from the report; an inventory filtered to a narrower prefix lists fewer objects.

Data files are read a few at a time (``workers``), each whole (its MD5 is checked before any row is
trusted), decoded with pyarrow and filtered to the archive prefix before the next ones are kept, so
memory holds a few data files plus the rows that stay. CSV keys are URL-decoded in Python only where a
``%`` makes it necessary; the ``+`` to space step is vectorised.

Why one module of ~700 lines: the manifest checks, the three formats' decoding and the prefix rule are
one contract (the listing equals ``list_files``'s, or the report is refused); split apart, each part
would have to restate which rows the others may drop.
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.orc as paorc
import pyarrow.parquet as pq

from ichd_ray.io import storage
from ichd_ray.io.storage import StorageConfig

__all__ = [
    "INVENTORY_LISTING_SCHEMA",
    "FILE_FORMATS",
    "InventoryError",
    "ManifestFile",
    "Manifest",
    "Inventory",
    "parse_manifest",
    "read_inventory",
    "check_fresh",
]

#: The listing's columns; the same as ``ichd_ray.pipeline.incremental.LISTING_SCHEMA`` (a test checks it).
INVENTORY_LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()), ("etag", pa.string())])

#: ``fileFormat`` values of AWS manifests, as AWS spells them.
FILE_FORMATS = ("CSV", "ORC", "Parquet")

#: Fields of manifest.json that every AWS manifest has and this module needs.
_REQUIRED_FIELDS = ("sourceBucket", "destinationBucket", "version", "creationTimestamp", "fileFormat", "fileSchema", "files")
_ARN_RE = re.compile(r"^arn:[A-Za-z0-9-]+:s3:::([^/:]+)$")
# The columns this module reads, by canonical name: a fileSchema name lower-cased without underscores, so
# that CSV's "LastModifiedDate" and Parquet/ORC's "last_modified_date" (or "ETag" and "e_tag") are one.
_WANTED = ("bucket", "key", "islatest", "isdeletemarker", "size", "lastmodifieddate", "etag")
_PARQUET_FIELD_RE = re.compile(r"^\s*(?:required|optional|repeated)\s+\w+\s+([A-Za-z_][A-Za-z0-9_]*)")
_SIZE_RE = r"^[0-9]+$"
# Inventory CSV dates look like 2016-11-06T21:32:43.000Z; any ISO 8601 instant with a zone parses.
_DATE_RE = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CSV_BLOCK_BYTES = 8 << 20
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_DEFAULT_WORKERS = 4


class InventoryError(ValueError):
    """The inventory report cannot be trusted as the archive's listing; the message names the manifest
    and the reason (and the data file and row where there is one)."""


@dataclass(frozen=True)
class ManifestFile:
    """One data file of an inventory, as manifest.json lists it.

    Attributes:
        key: Object key relative to the destination bucket.
        size: Size in bytes.
        md5: MD5 of the file's bytes, lower-case hex.
    """

    key: str
    size: int
    md5: str


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest.json.

    Attributes:
        uri: Where it was read from.
        source_bucket: The bucket the inventory lists.
        destination_bucket: The bucket the report was written to (name, from its ARN).
        version: The manifest format's version (AWS writes ``2016-11-30``).
        created: ``creationTimestamp``: when the inventory began scanning the bucket (UTC, tz-aware).
        file_format: ``CSV``, ``ORC`` or ``Parquet``.
        columns: The data files' columns in file order, as fileSchema names them.
        files: The data files.
    """

    uri: str
    source_bucket: str
    destination_bucket: str
    version: str
    created: dt.datetime
    file_format: str
    columns: tuple[str, ...]
    files: tuple[ManifestFile, ...]


@dataclass(frozen=True)
class Inventory:
    """An inventory report read as the archive's listing.

    Attributes:
        listing: :data:`INVENTORY_LISTING_SCHEMA` rows of the objects under the archive prefix, sorted by uri.
        created: The manifest's ``creationTimestamp`` (UTC, tz-aware).
        source_bucket: The bucket the inventory lists (the archive's).
        manifest_uri: The manifest.json it was read from.
        files: Data files read.
        rows: Rows in those files, before keeping the archive's current objects.
        file_format: ``CSV``, ``ORC`` or ``Parquet``.
    """

    listing: pa.Table
    created: dt.datetime
    source_bucket: str
    manifest_uri: str
    files: int
    rows: int
    file_format: str


@dataclass(frozen=True)
class _Scope:
    """What to keep: keys under ``prefix`` (all when empty), or the object at ``exact`` if none are."""

    bucket: str
    prefix: str
    exact: str | None


def _fail(manifest_uri: str, reason: str) -> InventoryError:
    return InventoryError(f"inventory {manifest_uri}: {reason}")


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


def parse_manifest(text: bytes | str, manifest_uri: str) -> Manifest:
    """Parse and check a manifest.json as AWS writes it.

    Args:
        text: The file's content.
        manifest_uri: Where it was read from (named in errors).

    Returns:
        Manifest: The parsed manifest.

    Raises:
        InventoryError: Not JSON, a required field missing or of the wrong type, an unknown fileFormat,
            a fileSchema without Key (or with a column twice), a destinationBucket that is not an S3 ARN.
    """
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(manifest_uri, f"manifest.json is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _fail(manifest_uri, "manifest.json is not a JSON object")
    missing = [name for name in _REQUIRED_FIELDS if name not in doc]
    if missing:
        raise _fail(manifest_uri, f"manifest.json lacks required field(s) {', '.join(missing)}")
    for name in ("sourceBucket", "destinationBucket", "version", "fileFormat", "fileSchema"):
        if not isinstance(doc[name], str) or not doc[name]:
            raise _fail(manifest_uri, f"manifest.json field {name} must be a non-empty string, got {doc[name]!r}")
    arn = _ARN_RE.match(doc["destinationBucket"])
    if arn is None:
        raise _fail(manifest_uri, f"destinationBucket {doc['destinationBucket']!r} is not an S3 bucket ARN (arn:aws:s3:::name)")
    file_format = doc["fileFormat"]
    if file_format not in FILE_FORMATS:
        raise _fail(manifest_uri, f"unknown fileFormat {file_format!r}; expected one of {', '.join(FILE_FORMATS)}")
    columns = _schema_columns(doc["fileSchema"], file_format, manifest_uri)
    return Manifest(
        uri=manifest_uri,
        source_bucket=doc["sourceBucket"],
        destination_bucket=arn.group(1),
        version=doc["version"],
        created=_creation_time(doc["creationTimestamp"], manifest_uri),
        file_format=file_format,
        columns=columns,
        files=_manifest_files(doc["files"], manifest_uri),
    )


def _creation_time(value: Any, manifest_uri: str) -> dt.datetime:
    # AWS writes epoch milliseconds as a JSON string ("1514944800000"); a number is accepted too.
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not text.isdigit():
        raise _fail(manifest_uri, f"creationTimestamp must be epoch milliseconds, got {value!r}")
    return _EPOCH + dt.timedelta(milliseconds=int(text))  # exact: no float rounding of the milliseconds


def _manifest_files(value: Any, manifest_uri: str) -> tuple[ManifestFile, ...]:
    if not isinstance(value, list):
        raise _fail(manifest_uri, f"manifest.json field files must be a list, got {type(value).__name__}")
    out = []
    for i, entry in enumerate(value):
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("key"), str) and entry["key"]
            and isinstance(entry.get("size"), int) and not isinstance(entry["size"], bool) and entry["size"] >= 0
            and isinstance(entry.get("MD5checksum"), str) and re.fullmatch(r"[0-9A-Fa-f]{32}", entry["MD5checksum"])
        )
        if not ok:
            raise _fail(manifest_uri, f"files[{i}] must have key, size and MD5checksum, got {entry!r}")
        out.append(ManifestFile(entry["key"], entry["size"], entry["MD5checksum"].lower()))
    return tuple(out)


def _schema_columns(schema: str, file_format: str, manifest_uri: str) -> tuple[str, ...]:
    """The column names of a fileSchema, in file order."""
    if file_format == "CSV":
        names = [name.strip() for name in schema.split(",")]
    elif file_format == "Parquet":
        body = re.fullmatch(r"\s*message\s+\S+\s*\{(.*)\}\s*", schema, re.DOTALL)
        if body is None:
            raise _fail(manifest_uri, f"Parquet fileSchema is not a 'message ... {{...}}' schema: {schema!r}")
        names = []
        for field in filter(str.strip, body.group(1).split(";")):
            m = _PARQUET_FIELD_RE.match(field)
            if m is None:
                raise _fail(manifest_uri, f"cannot read the Parquet fileSchema field {field.strip()!r}")
            names.append(m.group(1))
    else:
        body = re.fullmatch(r"\s*struct<(.*)>\s*", schema, re.DOTALL)
        if body is None:
            raise _fail(manifest_uri, f"ORC fileSchema is not a 'struct<...>' schema: {schema!r}")
        names = [field.split(":", 1)[0].strip() for field in _split_top_level(body.group(1))]
    if any(not name for name in names):
        raise _fail(manifest_uri, f"fileSchema has an empty column name: {schema!r}")
    canonical = [_canonical(name) for name in names]
    twice = sorted({name for name, c in zip(names, canonical) if canonical.count(c) > 1})
    if twice:
        raise _fail(manifest_uri, f"fileSchema names a column twice: {', '.join(twice)}")
    if "key" not in canonical:
        raise _fail(manifest_uri, f"fileSchema has no Key column: {schema!r}")
    return tuple(names)


def _split_top_level(text: str) -> list[str]:
    """Split ORC struct fields on the commas outside ``<...>`` (a field type may be a nested struct)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def _canonical(name: str) -> str:
    return name.replace("_", "").lower()


def _verify_checksum(manifest_bytes: bytes, checksum_uri: str, manifest_uri: str, config: StorageConfig | None) -> None:
    """Check manifest.json against manifest.checksum, where AWS wrote one (it lands after the manifest)."""
    try:
        expected = storage.read_bytes(checksum_uri, config).decode("ascii", "replace").strip().lower()
    except FileNotFoundError:
        return
    actual = hashlib.md5(manifest_bytes, usedforsecurity=False).hexdigest()
    if expected != actual:
        raise _fail(manifest_uri, f"manifest.json has MD5 {actual} but {checksum_uri} says {expected!r}: "
                                  "the manifest is corrupt or was replaced while being read")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_inventory(
    manifest_uri: str,
    archive_uri: str,
    storage_config: StorageConfig | None = None,
    *,
    files_root: str | None = None,
    workers: int = _DEFAULT_WORKERS,
) -> Inventory:
    """Read an S3 Inventory report as the listing of the archive prefix.

    Args:
        manifest_uri: The report's manifest.json (``s3://dest/<prefix>/<bucket>/<config>/<time>/manifest.json``,
            or a local copy of the destination bucket's tree).
        archive_uri: The archive prefix, ``s3://bucket[/prefix]``; its bucket must be the inventory's source.
        storage_config: S3 settings; None means :meth:`StorageConfig.from_env`.
        files_root: Where the data file keys are relative to. Default: the bucket the manifest is in
            (``s3://<bucket>``); for a local manifest, the directory whose tree holds the manifest's
            key (found from the data file keys).
        workers: Data files read at once (each is held whole while it is checked and decoded).

    Returns:
        Inventory: The listing (:data:`INVENTORY_LISTING_SCHEMA`, sorted by uri; empty if nothing is
        under the prefix) and the report's creation time.

    Raises:
        InventoryError: The report is not one this archive can be listed from: a missing or malformed
            manifest, a checksum mismatch, another source bucket, a data file missing or not of the
            manifest's size and MD5, a malformed row, a key listed twice.
        PermissionError: Access denied to the manifest or a data file.
        StorageUnavailable: S3 kept failing.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    scope = _archive_scope(archive_uri, manifest_uri)
    try:
        manifest_bytes = storage.read_bytes(manifest_uri, storage_config)
    except FileNotFoundError:
        raise _fail(manifest_uri, "no manifest.json at this URI") from None
    _verify_checksum(manifest_bytes, _sibling(manifest_uri, "manifest.checksum"), manifest_uri, storage_config)
    manifest = parse_manifest(manifest_bytes, manifest_uri)
    if manifest.source_bucket != scope.bucket:
        raise _fail(manifest_uri, f"it lists bucket {manifest.source_bucket!r}, not the archive's bucket "
                                  f"{scope.bucket!r} ({archive_uri})")
    root = files_root if files_root is not None else _default_root(manifest)
    read_one = _reader(manifest, scope, storage_config)
    tables, exact, rows = [], [], 0
    for under, at, n in _in_order(read_one, [(f, storage.join(root, f.key)) for f in manifest.files], workers):
        tables.append(under)
        exact.append(at)
        rows += n
    listing = pa.concat_tables(tables) if tables else _empty()
    if listing.num_rows == 0 and exact:
        listing = pa.concat_tables(exact)  # nothing under the prefix: the prefix may name one object
    listing = listing.sort_by("uri")
    _refuse_duplicates(listing, manifest_uri)
    return Inventory(listing.cast(INVENTORY_LISTING_SCHEMA), manifest.created, manifest.source_bucket, manifest_uri,
                     len(manifest.files), rows, manifest.file_format)


def check_fresh(inventory: Inventory, last_run_started: dt.datetime | None) -> None:
    """Refuse an inventory created before the last committed run started: it would miss what changed since.

    Args:
        inventory: The inventory to use.
        last_run_started: When the last committed run started (tz-aware); None when there is none.

    Raises:
        InventoryError: The inventory is older than that run.
        ValueError: ``last_run_started`` is naive (a local time would be compared as if it were UTC).
    """
    if last_run_started is None:
        return
    if last_run_started.tzinfo is None or last_run_started.utcoffset() is None:
        raise ValueError(f"last_run_started must be timezone-aware, got {last_run_started!r}")
    if inventory.created < last_run_started:
        raise InventoryError(
            f"inventory {inventory.manifest_uri} was created {inventory.created.isoformat()}, before the last "
            f"committed run started {last_run_started.astimezone(dt.timezone.utc).isoformat()}: it would miss what changed since"
        )


def _archive_scope(archive_uri: str, manifest_uri: str) -> _Scope:
    scheme, path = storage.parse_uri(archive_uri)
    if scheme != "s3":
        raise _fail(manifest_uri, f"an S3 inventory lists an S3 bucket; the archive {archive_uri} is not s3://")
    bucket, _, key = path.partition("/")
    # The same prefix rule as storage.list_files: "ct" and "ct/" both mean the keys under "ct/".
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    return _Scope(bucket, prefix, key if key and not key.endswith("/") else None)


def _sibling(uri: str, name: str) -> str:
    head, sep, _ = uri.rpartition("/")
    return f"{head}{sep}{name}"


def _default_root(manifest: Manifest) -> str:
    """Where the data file keys start: the manifest's bucket, or for a local copy the directory that
    holds the destination bucket's tree."""
    scheme, path = storage.parse_uri(manifest.uri)
    if scheme == "s3":
        return "s3://" + path.partition("/")[0]
    if not manifest.files:
        return os.path.dirname(path)
    # <root>/<dest-prefix>/<source>/<config>/<time>/manifest.json; data keys start <dest-prefix>/<source>/<config>/.
    config_dir = os.path.dirname(os.path.dirname(path))
    parts = manifest.files[0].key.split("/")
    for j in range(len(parts) - 1, 0, -1):
        tail = "/" + "/".join(parts[:j])
        if config_dir.endswith(tail):
            root = config_dir[: -len(tail)] or "/"
            return "file://" + root if manifest.uri[:7].lower() == "file://" else root
    raise _fail(manifest.uri, f"cannot tell where data file {manifest.files[0].key!r} lies relative to this local "
                              "manifest; pass files_root")


def _in_order(read_one: Callable, items: list, workers: int):
    """``read_one`` over ``items`` with up to ``workers`` at once, results in order. On the first failure
    the files not yet started are cancelled, rather than read to no purpose."""
    if workers == 1 or len(items) <= 1:
        for item in items:
            yield read_one(*item)
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inventory")
    pending: collections.deque = collections.deque()
    try:
        it = iter(items)
        for item in it:
            pending.append(pool.submit(read_one, *item))
            if len(pending) >= workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(read_one, *nxt))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _reader(manifest: Manifest, scope: _Scope, config: StorageConfig | None) -> Callable:
    def read_one(entry: ManifestFile, uri: str) -> tuple[pa.Table, pa.Table, int]:
        try:
            data = storage.read_bytes(uri, config)
        except FileNotFoundError:
            raise _fail(manifest.uri, f"data file {uri} is missing") from None
        if len(data) != entry.size:
            raise _fail(manifest.uri, f"data file {uri} has {len(data)} bytes, the manifest says {entry.size}: "
                                      "a partial or replaced inventory")
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if md5 != entry.md5:
            raise _fail(manifest.uri, f"data file {uri} has MD5 {md5}, the manifest says {entry.md5}: "
                                      "a corrupt or replaced inventory")
        try:
            return _select_file(_batches(data, manifest, uri), manifest, scope, uri)
        except (pa.ArrowException, OSError, EOFError) as exc:
            # Undecodable despite the right MD5: the manifest's format or schema does not fit the file.
            raise _fail(manifest.uri, f"cannot decode data file {uri} as {manifest.file_format}: {exc}") from None

    return read_one


def _batches(data: bytes, manifest: Manifest, uri: str):
    """(first row number, canonical columns) per batch of a data file."""
    if manifest.file_format == "CSV":
        yield from _csv_batches(data, manifest, uri)
        return
    columns = [name for name in manifest.columns if _canonical(name) in _WANTED]
    if manifest.file_format == "Parquet":
        source = pq.ParquetFile(pa.BufferReader(data))
        present = set(source.schema_arrow.names)
        batches = source.iter_batches(batch_size=1 << 16, columns=columns)
    else:
        source = paorc.ORCFile(pa.BufferReader(data))
        present = set(source.schema.names)
        batches = (source.read_stripe(i, columns=columns) for i in range(source.nstripes))
    lacking = [name for name in columns if name not in present]
    if lacking:
        raise _fail(manifest.uri, f"data file {uri} lacks column(s) {', '.join(lacking)} that fileSchema lists")
    first = 1
    for batch in batches:
        yield first, _columnar(batch, manifest, uri, first)
        first += batch.num_rows


def _csv_batches(data: bytes, manifest: Manifest, uri: str):
    bad: list = []

    def on_bad_row(row) -> str:
        bad.append(row)
        return "skip"

    def refuse_bad() -> None:
        if bad:
            row = bad[0]
            raise _fail(manifest.uri, f"data file {uri} row {row.number}: {row.actual_columns} fields where fileSchema "
                                      f"has {row.expected_columns}: {row.text[:200]!r}")

    wanted = [name for name in manifest.columns if _canonical(name) in _WANTED]
    stream = pa.CompressedInputStream(pa.BufferReader(data), "gzip") if data[:2] == b"\x1f\x8b" else pa.BufferReader(data)
    try:
        reader = pacsv.open_csv(
            stream,
            # One thread: pyarrow numbers the rows (for errors) only then; files are read in parallel instead.
            read_options=pacsv.ReadOptions(column_names=list(manifest.columns), use_threads=False, block_size=_CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_bad_row),
            # Strings as written: every value is checked here, not guessed by pyarrow's type inference.
            convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in wanted}, include_columns=wanted,
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            return  # a data file of no rows (an empty bucket)
        raise
    first = 1
    for batch in reader:
        refuse_bad()
        yield first, _csv_columns(batch, manifest, uri, first)
        first += batch.num_rows
    refuse_bad()


def _row_error(manifest: Manifest, uri: str, first: int, mask: pa.Array, what: str, column: pa.Array) -> None:
    """Raise naming the first row where ``mask`` is true (null counts as true), if any."""
    mask = pc.fill_null(mask, True)
    if pc.any(mask).as_py():
        i = pc.index(mask, True).as_py()
        raise _fail(manifest.uri, f"data file {uri} row {first + i}: {what}: {column[i].as_py()!r}")


def _csv_columns(batch: pa.RecordBatch, manifest: Manifest, uri: str, first: int) -> dict[str, pa.Array]:
    """Check and convert one batch of CSV strings to typed canonical columns."""
    raw = {_canonical(name): batch.column(name) for name in batch.schema.names}
    out: dict[str, pa.Array] = {}
    if "bucket" in raw:
        out["bucket"] = raw["bucket"]
    keys = raw["key"]
    _row_error(manifest, uri, first, pc.equal(keys, ""), "empty Key", keys)
    out["key"] = _decode_keys(keys, manifest, uri, first)
    for flag in ("islatest", "isdeletemarker"):
        if flag in raw:
            lowered = pc.utf8_lower(raw[flag])
            _row_error(manifest, uri, first, pc.invert(pc.is_in(lowered, pa.array(["true", "false"]))),
                       f"{flag} is not true or false", raw[flag])
            out[flag] = pc.equal(lowered, "true")
    if "size" in raw:
        size = _empty_to_null(raw["size"])
        _row_error(manifest, uri, first, pc.invert(pc.match_substring_regex(size, _SIZE_RE)).fill_null(False),
                   "Size is not a byte count", size)
        out["size"] = size.cast(pa.int64())
    if "lastmodifieddate" in raw:
        date = _empty_to_null(raw["lastmodifieddate"])
        _row_error(manifest, uri, first, pc.invert(pc.match_substring_regex(date, _DATE_RE)).fill_null(False),
                   "LastModifiedDate is not an ISO 8601 time", date)
        out["mtime"] = _epoch_seconds(date.cast(pa.timestamp("ns", tz="UTC")))
    if "etag" in raw:
        out["etag"] = pc.utf8_trim(_empty_to_null(raw["etag"]), '"')
    return out


def _decode_keys(keys: pa.Array, manifest: Manifest, uri: str, first: int) -> pa.Array:
    """URL-decode CSV keys as AWS encodes them (form encoding: ``+`` is a space, ``%2B`` a plus).

    The ``+`` step is vectorised; only keys holding a ``%`` go through Python's ``unquote``, strictly:
    an escape that is not ``%XX`` or bytes that are not UTF-8 mean a key this module would get wrong."""
    spaced = pc.replace_substring(keys, "+", " ")
    escaped = pc.match_substring(spaced, "%")
    if not pc.any(escaped).as_py():
        return spaced
    indices = pc.indices_nonzero(escaped).to_pylist()
    decoded = []
    for i in indices:
        text = spaced[i].as_py()
        try:
            if _BAD_ESCAPE_RE.search(text):
                raise ValueError("a % that starts no %XX escape")
            decoded.append(unquote(text, errors="strict"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _fail(manifest.uri, f"data file {uri} row {first + i}: Key {keys[i].as_py()!r} is not URL-encoded "
                                      f"UTF-8 ({exc})") from None
    return pc.replace_with_mask(spaced, escaped, pa.array(decoded, pa.string()))


def _columnar(batch: pa.RecordBatch, manifest: Manifest, uri: str, first: int) -> dict[str, pa.Array]:
    """Check and convert one batch of a Parquet or ORC data file (typed already; keys not encoded)."""
    raw = {_canonical(name): batch.column(name) for name in batch.schema.names}
    out: dict[str, pa.Array] = {}
    if "bucket" in raw:
        out["bucket"] = raw["bucket"].cast(pa.string())
    keys = raw["key"].cast(pa.string())
    _row_error(manifest, uri, first, pc.or_kleene(pc.is_null(keys), pc.equal(keys, "")), "empty key", keys)
    out["key"] = keys
    for flag in ("islatest", "isdeletemarker"):
        if flag in raw:
            values = raw[flag].cast(pa.bool_())
            _row_error(manifest, uri, first, pc.is_null(values), f"{flag} is null", values)
            out[flag] = values
    if "size" in raw:
        out["size"] = raw["size"].cast(pa.int64())
    if "lastmodifieddate" in raw:
        column = raw["lastmodifieddate"]
        if pa.types.is_timestamp(column.type):
            # Naive timestamps (ORC's) are UTC, as AWS writes them.
            out["mtime"] = _epoch_seconds(column.cast(pa.timestamp("ns", tz=column.type.tz)))
        elif pa.types.is_integer(column.type):
            out["mtime"] = pc.divide(column.cast(pa.float64()), 1000.0)  # TIMESTAMP_MILLIS stored as plain int64
        else:
            raise _fail(manifest.uri, f"data file {uri}: last_modified_date has type {column.type}, not a timestamp")
    if "etag" in raw:
        out["etag"] = pc.utf8_trim(raw["etag"].cast(pa.string()), '"')
    return out


def _empty_to_null(values: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)


def _epoch_seconds(ts: pa.Array) -> pa.Array:
    # Via whole microseconds: ~1.7e15 is exact in a float64, as nanoseconds (~1.7e18) would not be.
    micros = ts.cast(pa.timestamp("us", tz=ts.type.tz), safe=False).cast(pa.int64())
    return pc.divide(micros.cast(pa.float64()), 1e6)


def _select_file(batches, manifest: Manifest, scope: _Scope, uri: str) -> tuple[pa.Table, pa.Table, int]:
    """The current objects of one data file under the prefix, and at the exact key; and its row count."""
    under, exact, rows = [], [], 0
    for first, cols in batches:
        n = len(cols["key"])
        rows += n
        if "bucket" in cols:
            _row_error(manifest, uri, first, pc.not_equal(cols["bucket"], scope.bucket),
                       f"Bucket is not the manifest's sourceBucket {scope.bucket!r}", cols["bucket"])
        keys = cols["key"]
        # Directory markers and in-flight temporaries are not objects of the archive (storage.list_files).
        listed = pc.invert(pc.or_(pc.ends_with(keys, "/"), pc.ends_with(keys, storage.TEMP_SUFFIX)))
        if "islatest" in cols:  # an all-versions report: only the current version, if not a delete marker
            listed = pc.and_(listed, cols["islatest"])
        if "isdeletemarker" in cols:
            listed = pc.and_(listed, pc.invert(cols["isdeletemarker"]))
        table = pa.table({
            "uri": pc.binary_join_element_wise(f"s3://{scope.bucket}/", keys, ""),
            "size": cols.get("size", pa.nulls(n, pa.int64())),
            "mtime": cols.get("mtime", pa.nulls(n, pa.float64())),
            "etag": cols.get("etag", pa.nulls(n, pa.string())),
        })
        under.append(table.filter(pc.and_(listed, pc.starts_with(keys, scope.prefix)) if scope.prefix else listed))
        if scope.exact is not None:
            exact.append(table.filter(pc.and_(listed, pc.equal(keys, scope.exact))))
    return (pa.concat_tables(under) if under else _empty(), pa.concat_tables(exact) if exact else _empty(), rows)


def _empty() -> pa.Table:
    return INVENTORY_LISTING_SCHEMA.empty_table()


def _refuse_duplicates(listing: pa.Table, manifest_uri: str) -> None:
    """A key listed twice as current means a broken report (or two reports' files in one manifest)."""
    if listing.num_rows < 2:
        return
    uris = listing.column("uri")
    same = pc.equal(uris.slice(1), uris.slice(0, listing.num_rows - 1))
    if pc.any(same).as_py():
        raise _fail(manifest_uri, f"{uris[pc.index(same, True).as_py()].as_py()} is listed more than once as a current object")
