"""AWS-shaped S3 Inventory reports for tests: the files S3 itself would deliver, laid out on a (moto) server.

moto does not run inventory configurations, so :func:`write_inventory` plays the part of S3: it takes the
source bucket's objects from a real ListObjectsV2 (or ListObjectVersions, for a versioned report) and
writes, into the destination bucket, what the Amazon S3 User Guide ("Locating your inventory list",
"Amazon S3 inventory list") describes::

    <dest-prefix>/<source-bucket>/<config-id>/YYYY-MM-DDTHH-MMZ/manifest.json
    <dest-prefix>/<source-bucket>/<config-id>/YYYY-MM-DDTHH-MMZ/manifest.checksum   (MD5 of manifest.json)
    <dest-prefix>/<source-bucket>/<config-id>/hive/dt=YYYY-MM-DD-HH-MM/symlink.txt
    <dest-prefix>/<source-bucket>/<config-id>/data/<uuid>.csv.gz | .parquet | .orc

CSV data files are gzip-compressed, have no header, quote every field and URL-encode keys the way S3
does (form encoding: a space is ``+``, a plus ``%2B``, ``/`` left as is); Parquet (Snappy) and ORC (ZLIB)
files carry the snake_case columns with their types and keys as they are. The manifest lists every data
file with its size and MD5.

:func:`build_inventory` is the pure half (objects in, ``{key: bytes}`` out), for writing a report
anywhere (a local directory for a benchmark); :func:`rewrite_data_file` and :func:`put_manifest` let a
test damage one part of a report while keeping the rest consistent.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import random
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.orc as paorc
import pyarrow.parquet as pq

from ichd_ray.io.storage import StorageConfig, boto3_client

__all__ = [
    "DEFAULT_FIELDS",
    "VERSION_FIELDS",
    "BuiltInventory",
    "WrittenInventory",
    "encode_key",
    "list_source_objects",
    "build_inventory",
    "write_inventory",
    "rewrite_data_file",
    "put_manifest",
]

#: A typical "current versions" configuration: Key is always there, the rest are optional fields.
DEFAULT_FIELDS = ("Bucket", "Key", "Size", "LastModifiedDate", "ETag", "StorageClass")
#: What IncludedObjectVersions = All adds, after Key (AWS's order).
VERSION_FIELDS = ("VersionId", "IsLatest", "IsDeleteMarker")

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_EXTENSIONS = {"CSV": "csv.gz", "Parquet": "parquet", "ORC": "orc"}
# Parquet/ORC types per column (snake_case); any other column is a string.
_TYPES = {
    "is_latest": pa.bool_(),
    "is_delete_marker": pa.bool_(),
    "is_multipart_uploaded": pa.bool_(),
    "size": pa.int64(),
    "last_modified_date": pa.timestamp("ms", tz="UTC"),
    "object_lock_retain_until_date": pa.timestamp("ms", tz="UTC"),
}


@dataclass(frozen=True)
class BuiltInventory:
    """A report's files, before they are written.

    Attributes:
        manifest_key: Key of manifest.json in the destination bucket.
        files: Every file of the report by key (manifest.json, manifest.checksum, symlink.txt, data files).
        data_keys: The data files' keys, in manifest order.
        manifest: manifest.json as a dict.
    """

    manifest_key: str
    files: dict[str, bytes]
    data_keys: tuple[str, ...]
    manifest: dict[str, Any]


@dataclass(frozen=True)
class WrittenInventory:
    """A report written to S3.

    Attributes:
        dest_bucket: The destination bucket.
        manifest_uri: ``s3://dest/.../manifest.json``: what :func:`ichd_ray.io.inventory.read_inventory` takes.
        manifest_key: Its key.
        data_keys: The data files' keys, in manifest order.
        manifest: manifest.json as written.
        created: The creationTimestamp written (whole milliseconds, UTC).
    """

    dest_bucket: str
    manifest_uri: str
    manifest_key: str
    data_keys: tuple[str, ...]
    manifest: dict[str, Any]
    created: dt.datetime

    def data_uri(self, index: int = 0) -> str:
        """The ``s3://`` URI of data file ``index``."""
        return f"s3://{self.dest_bucket}/{self.data_keys[index]}"


def encode_key(key: str) -> str:
    """A key as S3 Inventory writes it in CSV: form URL-encoding of the UTF-8 bytes, ``/`` kept.

    Args:
        key: The object key.

    Returns:
        str: e.g. ``ct/a b+c.dcm`` -> ``ct/a+b%2Bc.dcm``.
    """
    return quote_plus(key, safe="/")


def _client(target: Any) -> Any:
    return boto3_client(target) if target is None or isinstance(target, StorageConfig) else target


def list_source_objects(target: Any, bucket: str, *, versions: bool = False) -> list[dict[str, Any]]:
    """The source bucket's objects as S3 lists them, the rows an inventory of it would have.

    Args:
        target: A :class:`StorageConfig` or a botocore S3 client.
        bucket: The source bucket.
        versions: List every version and delete marker (ListObjectVersions) instead of the current objects.

    Returns:
        list[dict]: boto3's ``Contents`` (or ``Versions`` and ``DeleteMarkers``, the latter with
        ``IsDeleteMarker: True``) entries.
    """
    client = _client(target)
    out: list[dict[str, Any]] = []
    if not versions:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out.extend(page.get("Contents", ()))
        return out
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
        out.extend({**v, "IsDeleteMarker": False} for v in page.get("Versions", ()))
        out.extend({**m, "IsDeleteMarker": True} for m in page.get("DeleteMarkers", ()))
    return out


def _snake(name: str) -> str:
    """CSV field name -> Parquet/ORC column name (``LastModifiedDate`` -> ``last_modified_date``)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _value(field: str, obj: dict[str, Any], bucket: str) -> Any:
    """One field of one object, typed (None where S3 leaves it empty: a delete marker has no size)."""
    marker = bool(obj.get("IsDeleteMarker"))
    etag = (obj.get("ETag") or "").strip('"') or None
    return {
        "bucket": bucket,
        "key": obj["Key"],
        "version_id": obj.get("VersionId"),
        "is_latest": bool(obj.get("IsLatest", True)),
        "is_delete_marker": marker,
        "size": None if marker else int(obj["Size"]),
        "last_modified_date": obj.get("LastModified"),
        "e_tag": None if marker else etag,
        "storage_class": None if marker else obj.get("StorageClass", "STANDARD"),
        "is_multipart_uploaded": None if marker else "-" in (etag or ""),
        "encryption_status": None if marker else "SSE-S3",
    }.get(_snake(field))


def _csv_text(field: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        utc = value.astimezone(dt.timezone.utc)
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    return encode_key(value) if field == "Key" else str(value)


def _csv_file(rows: list[dict[str, Any]], fields: Sequence[str], bucket: str) -> bytes:
    lines = []
    for obj in rows:
        cells = (_csv_text(f, _value(f, obj, bucket)).replace('"', '""') for f in fields)
        lines.append(",".join(f'"{c}"' for c in cells) + "\n")
    return gzip.compress("".join(lines).encode("utf-8"), mtime=0)


def _columnar_table(rows: list[dict[str, Any]], fields: Sequence[str], bucket: str) -> pa.Table:
    columns = {}
    for field in fields:
        name = _snake(field)
        columns[name] = pa.array([_value(field, obj, bucket) for obj in rows], _TYPES.get(name, pa.string()))
    return pa.table(columns)


def _file_schema(fmt: str, fields: Sequence[str]) -> str:
    """The manifest's fileSchema, written the way AWS writes it for each format."""
    if fmt == "CSV":
        return ", ".join(fields)
    if fmt == "ORC":
        orc_type = {pa.bool_(): "boolean", pa.int64(): "bigint"}
        cells = (f"{_snake(f)}:{orc_type.get(_TYPES.get(_snake(f)), 'timestamp' if 'date' in _snake(f) else 'string')}"
                 for f in fields)
        return "struct<" + ",".join(cells) + ">"
    cells = []
    for f in fields:
        name = _snake(f)
        kind = _TYPES.get(name, pa.string())
        required = "required" if name in ("bucket", "key") else "optional"
        if kind == pa.bool_():
            cells.append(f"{required} boolean {name};")
        elif kind == pa.int64():
            cells.append(f"{required} int64 {name};")
        elif pa.types.is_timestamp(kind):
            cells.append(f"{required} int64 {name} (TIMESTAMP_MILLIS);")
        else:
            cells.append(f"{required} binary {name} (UTF8);")
    return "message s3.inventory { " + " ".join(cells) + " }"


def _data_file(fmt: str, rows: list[dict[str, Any]], fields: Sequence[str], bucket: str) -> bytes:
    if fmt == "CSV":
        return _csv_file(rows, fields, bucket)
    sink = io.BytesIO()
    if fmt == "Parquet":
        pq.write_table(_columnar_table(rows, fields, bucket), sink, compression="snappy")
    else:
        paorc.write_table(_columnar_table(rows, fields, bucket), sink, compression="zlib")
    return sink.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _manifest_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=4).encode("utf-8")


def build_inventory(
    source_bucket: str,
    dest_bucket: str,
    objects: Iterable[dict[str, Any]],
    *,
    dest_prefix: str = "inventory",
    fmt: str = "CSV",
    fields: Sequence[str] = DEFAULT_FIELDS,
    config_id: str = "daily",
    created: dt.datetime | None = None,
    files: int = 1,
    shuffle_seed: int | None = 0,
) -> BuiltInventory:
    """The files of an inventory report of ``objects`` (pure: nothing is written).

    Args:
        source_bucket: The bucket the report lists.
        dest_bucket: The bucket it is delivered to (named in the manifest as an ARN).
        objects: boto3-shaped entries (``Key``, ``Size``, ``LastModified``, ``ETag``; for versioned
            reports ``VersionId``, ``IsLatest``, ``IsDeleteMarker``).
        dest_prefix: The configuration's destination prefix ("" for none).
        fmt: ``CSV``, ``Parquet`` or ``ORC``.
        fields: The columns, as CSV fileSchema names them (``Bucket``, ``Key``, ``Size``, ...), in file order.
        config_id: The inventory configuration's id.
        created: The creationTimestamp (default: now); kept to whole milliseconds, as AWS writes it.
        files: Data files to spread the rows over (0 gives a manifest with no files).
        shuffle_seed: Shuffle the rows with this seed (S3 promises no order); None keeps the given order.

    Returns:
        BuiltInventory: The keys and contents.
    """
    if fmt not in _EXTENSIONS:
        raise ValueError(f"fmt must be one of {', '.join(_EXTENSIONS)}, got {fmt!r}")
    created = (created or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    created = created.replace(microsecond=created.microsecond // 1000 * 1000)
    rows = list(objects)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    base = "/".join(p for p in (dest_prefix.strip("/"), source_bucket, config_id) if p)
    out: dict[str, bytes] = {}
    listed = []
    for i in range(files):
        chunk = rows[i * len(rows) // files: (i + 1) * len(rows) // files]
        key = f"{base}/data/{uuid.uuid4()}.{_EXTENSIONS[fmt]}"
        out[key] = _data_file(fmt, chunk, fields, source_bucket)
        listed.append({"key": key, "size": len(out[key]), "MD5checksum": _md5(out[key])})
    doc = {
        "sourceBucket": source_bucket,
        "destinationBucket": f"arn:aws:s3:::{dest_bucket}",
        "version": "2016-11-30",
        "creationTimestamp": str((created - _EPOCH) // dt.timedelta(milliseconds=1)),
        "fileFormat": fmt,
        "fileSchema": _file_schema(fmt, fields),
        "files": listed,
    }
    manifest_key = f"{base}/{created:%Y-%m-%dT%H-%M}Z/manifest.json"
    out[manifest_key] = _manifest_bytes(doc)
    out[manifest_key.removesuffix(".json") + ".checksum"] = _md5(out[manifest_key]).encode("ascii")
    out[f"{base}/hive/dt={created:%Y-%m-%d-%H-%M}/symlink.txt"] = "".join(
        f"s3://{dest_bucket}/{f['key']}\n" for f in listed).encode("utf-8")
    return BuiltInventory(manifest_key, out, tuple(f["key"] for f in listed), doc)


def write_inventory(
    target: Any,
    source_bucket: str,
    dest_bucket: str,
    dest_prefix: str = "inventory",
    objects: Iterable[dict[str, Any]] | None = None,
    fmt: str = "CSV",
    fields: Sequence[str] = DEFAULT_FIELDS,
    config_id: str = "daily",
    created: dt.datetime | None = None,
    files: int = 1,
    shuffle_seed: int | None = 0,
) -> WrittenInventory:
    """Deliver an inventory report of ``source_bucket`` into ``dest_bucket``, as S3 would.

    Args:
        target: A :class:`StorageConfig` (e.g. the moto fixture's) or a botocore S3 client.
        source_bucket: The bucket to inventory.
        dest_bucket: Where the report goes (must exist; may be the source bucket).
        dest_prefix: The destination prefix ("" for none).
        objects: The rows; default: a real listing of the source bucket now, every version when
            ``fields`` holds a version field (see :func:`list_source_objects`).
        fmt: ``CSV``, ``Parquet`` or ``ORC``.
        fields: The columns in CSV fileSchema names, in file order (:data:`DEFAULT_FIELDS`;
            add :data:`VERSION_FIELDS` for an all-versions report).
        config_id: The inventory configuration's id.
        created: The creationTimestamp (default: now).
        files: Data files to spread the rows over.
        shuffle_seed: Row shuffle seed; None keeps listing order.

    Returns:
        WrittenInventory: Where the manifest and data files are.
    """
    client = _client(target)
    if objects is None:
        objects = list_source_objects(client, source_bucket, versions=any(f in VERSION_FIELDS for f in fields))
    built = build_inventory(source_bucket, dest_bucket, objects, dest_prefix=dest_prefix, fmt=fmt, fields=fields,
                            config_id=config_id, created=created, files=files, shuffle_seed=shuffle_seed)
    # Data files first and the checksum last, the order in which S3 delivers a report.
    for key in sorted(built.files, key=lambda k: (k.endswith("manifest.checksum"), k == built.manifest_key)):
        client.put_object(Bucket=dest_bucket, Key=key, Body=built.files[key])
    created_at = _EPOCH + dt.timedelta(milliseconds=int(built.manifest["creationTimestamp"]))
    return WrittenInventory(dest_bucket, f"s3://{dest_bucket}/{built.manifest_key}", built.manifest_key,
                            built.data_keys, built.manifest, created_at)


def put_manifest(target: Any, written: WrittenInventory, doc: dict[str, Any], *, checksum: bool = True) -> WrittenInventory:
    """Replace a report's manifest.json (and its manifest.checksum, to match, or remove it).

    Args:
        target: A :class:`StorageConfig` or a botocore S3 client.
        written: The report.
        doc: The new manifest.json content.
        checksum: Write a matching manifest.checksum; False deletes it.

    Returns:
        WrittenInventory: The report with the new manifest.
    """
    client = _client(target)
    body = _manifest_bytes(doc)
    client.put_object(Bucket=written.dest_bucket, Key=written.manifest_key, Body=body)
    checksum_key = written.manifest_key.removesuffix(".json") + ".checksum"
    if checksum:
        client.put_object(Bucket=written.dest_bucket, Key=checksum_key, Body=_md5(body).encode("ascii"))
    else:
        client.delete_object(Bucket=written.dest_bucket, Key=checksum_key)
    return replace(written, manifest=doc)


def rewrite_data_file(target: Any, written: WrittenInventory, index: int, data: bytes, *,
                      fix_manifest: bool = True) -> WrittenInventory:
    """Replace data file ``index`` with ``data`` (e.g. a hand-written CSV, gzip it yourself).

    Args:
        target: A :class:`StorageConfig` or a botocore S3 client.
        written: The report.
        index: Which data file (manifest order).
        data: Its new bytes.
        fix_manifest: Update the manifest's size and MD5 (and checksum) to match, so only the content is
            new; False leaves the manifest describing the old file (a corrupt or partial report).

    Returns:
        WrittenInventory: The report as it now is.
    """
    client = _client(target)
    client.put_object(Bucket=written.dest_bucket, Key=written.data_keys[index], Body=data)
    if not fix_manifest:
        return written
    doc = json.loads(json.dumps(written.manifest))
    doc["files"][index].update(size=len(data), MD5checksum=_md5(data))
    return put_manifest(client, written, doc)
