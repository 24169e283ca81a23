"""ichd_ray.io.inventory against AWS-shaped inventory reports on a moto S3 server (tests/inventory_factory.py).

The contract under test: an inventory of a bucket gives exactly what ``storage.list_files`` lists for the
same bucket state, and a report that is not what its manifest says is refused, naming what is wrong.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import uuid

import pytest
from inventory_factory import (
    DEFAULT_FIELDS,
    VERSION_FIELDS,
    build_inventory,
    encode_key,
    put_manifest,
    rewrite_data_file,
    write_inventory,
)

from ichd_ray.io import storage
from ichd_ray.io.inventory import (
    INVENTORY_LISTING_SCHEMA,
    Inventory,
    InventoryError,
    check_fresh,
    parse_manifest,
    read_inventory,
)
from ichd_ray.io.storage import boto3_client
from ichd_ray.pipeline.incremental import LISTING_SCHEMA

pytestmark = pytest.mark.timeout(120)

CREATED = dt.datetime(2024, 5, 7, 1, 0, 12, 345000, tzinfo=dt.timezone.utc)

#: Keys under the archive prefix ct/ that the listing must hold, decoded exactly.
ARCHIVE_KEYS = [
    "ct/plain/IM0001.dcm",
    "ct/with space/IM 0002.dcm",
    "ct/a+b/IM+0003.dcm",
    "ct/100%/IM%250004.dcm",  # a literal "%25" in the key must stay "%25", not become "%"
    "ct/ünïcødé/写真✓.dcm",
    "ct/x=y&z~/IM0005.dcm",
    "ct/deep/er/still/IM0006.dcm",
]
#: Keys the listing must not hold: outside the prefix, a sibling prefix, a directory marker, a temporary.
OTHER_KEYS = ["ct", "ct2/IM0007.dcm", "other/IM0008.dcm", "ctx.dcm", "ct/marker/", f"ct/.IM0009.dcm.1a2b{storage.TEMP_SUFFIX}"]


@pytest.fixture
def buckets(s3_bucket):
    """(source bucket, destination bucket, config): a fresh pair per test."""
    source, cfg = s3_bucket
    dest = f"inv-{uuid.uuid4().hex[:8]}"
    boto3_client(cfg).create_bucket(Bucket=dest)
    return source, dest, cfg


def _put(cfg, bucket: str, keys, body=lambda k: f"body of {k}".encode()) -> None:
    client = boto3_client(cfg)
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=body(key))


def _rows(inventory: Inventory) -> list[dict]:
    assert inventory.listing.schema.equals(INVENTORY_LISTING_SCHEMA)
    return inventory.listing.to_pylist()


def _listed(archive_uri: str, cfg) -> list[dict]:
    """What storage.list_files gives, as listing rows (temporaries of in-flight writes skipped by both)."""
    return [{"uri": e.uri, "size": e.size, "mtime": e.mtime, "etag": e.etag}
            for e in storage.list_files(archive_uri, config=cfg)]


def _assert_same(rows: list[dict], expected: list[dict]) -> None:
    assert [r["uri"] for r in rows] == [e["uri"] for e in expected]
    for row, exp in zip(rows, expected):
        assert (row["size"], row["etag"]) == (exp["size"], exp["etag"]), row["uri"]
        assert row["mtime"] == pytest.approx(exp["mtime"], abs=1e-3), row["uri"]


def _gz_rows(*rows: list[str]) -> bytes:
    return gzip.compress("".join(",".join(f'"{c}"' for c in row) + "\n" for row in rows).encode("utf-8"))


def _refused(manifest_uri: str, archive: str, cfg, *fragments: str) -> str:
    with pytest.raises(InventoryError) as info:
        read_inventory(manifest_uri, archive, cfg)
    message = str(info.value)
    assert manifest_uri in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ------------------------------------------------------------------------------------- schema


def test_listing_schema_is_the_pipelines():
    assert INVENTORY_LISTING_SCHEMA.equals(LISTING_SCHEMA, check_metadata=True)


# ---------------------------------------------------------------------------- same as listing


@pytest.mark.parametrize("fmt", ["CSV", "Parquet", "ORC"])
@pytest.mark.parametrize("files", [1, 3])
def test_inventory_equals_list_files_for_awkward_keys(buckets, fmt, files):
    source, dest, cfg = buckets
    _put(cfg, source, ARCHIVE_KEYS + OTHER_KEYS)
    written = write_inventory(cfg, source, dest, "reports/inv", fmt=fmt, files=files, created=CREATED)
    archive = f"s3://{source}/ct"

    inventory = read_inventory(written.manifest_uri, archive, cfg)

    rows = _rows(inventory)
    assert [r["uri"] for r in rows] == sorted(f"s3://{source}/{k}" for k in ARCHIVE_KEYS)
    _assert_same(rows, _listed(archive, cfg))
    assert all(len(r["etag"]) == 32 and '"' not in r["etag"] for r in rows)
    assert (inventory.files, inventory.rows, inventory.file_format) == (files, len(ARCHIVE_KEYS + OTHER_KEYS), fmt)
    assert (inventory.source_bucket, inventory.manifest_uri, inventory.created) == (source, written.manifest_uri, CREATED)
    # The trailing slash means the same prefix; the whole bucket is everything but markers and temporaries.
    assert _rows(read_inventory(written.manifest_uri, archive + "/", cfg)) == rows
    _assert_same(_rows(read_inventory(written.manifest_uri, f"s3://{source}", cfg)), _listed(f"s3://{source}", cfg))


def test_manifest_follows_the_aws_layout(buckets):
    source, dest, cfg = buckets
    _put(cfg, source, ["ct/a.dcm"])
    written = write_inventory(cfg, source, dest, "reports", created=CREATED)
    keys = sorted(e.uri.removeprefix(f"s3://{dest}/") for e in storage.list_files(f"s3://{dest}", config=cfg))
    base = f"reports/{source}/daily"
    assert keys[:3] == [f"{base}/2024-05-07T01-00Z/manifest.checksum", f"{base}/2024-05-07T01-00Z/manifest.json",
                        f"{base}/data/{written.data_keys[0].rsplit('/', 1)[1]}"]
    assert keys[3] == f"{base}/hive/dt=2024-05-07-01-00/symlink.txt"
    doc = json.loads(storage.read_bytes(written.manifest_uri, cfg))
    assert doc["creationTimestamp"] == "1715043612345" and doc["destinationBucket"] == f"arn:aws:s3:::{dest}"
    assert doc["fileSchema"] == "Bucket, Key, Size, LastModifiedDate, ETag, StorageClass"


def test_csv_keys_are_decoded_as_s3_encodes_them(buckets):
    """Form URL-encoding: "+" is a space, "%2B" a plus, "%25" a percent, UTF-8 bytes escaped. The rows are
    written by hand here, so a decoder and an encoder that share a mistake cannot hide it."""
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest, objects=[], fields=("Bucket", "Key", "Size"))
    rewrite_data_file(cfg, written, 0, _gz_rows(
        [source, "ct/a+b%2Bc%25d%C3%BC%E2%9C%93.dcm", "1"],
        [source, "ct/x%3Dy/z%2F.dcm", "2"],
        [source, "ct/%252B.dcm", "3"],
        [source, "ct/plain+.dcm", "4"],
        [source, "ct%2Fslash-encoded.dcm", "5"],
    ))

    rows = _rows(read_inventory(written.manifest_uri, f"s3://{source}/ct", cfg))

    assert {r["uri"]: r["size"] for r in rows} == {
        f"s3://{source}/ct/a b+c%dü✓.dcm": 1,
        f"s3://{source}/ct/x=y/z/.dcm": 2,
        f"s3://{source}/ct/%2B.dcm": 3,
        f"s3://{source}/ct/plain .dcm": 4,
        f"s3://{source}/ct/slash-encoded.dcm": 5,
    }
    assert [r["etag"] for r in rows] == [None] * 5 and [r["mtime"] for r in rows] == [None] * 5
    assert encode_key("ct/a b+c%dü✓.dcm") == "ct/a+b%2Bc%25d%C3%BC%E2%9C%93.dcm"


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_columns_are_found_by_the_file_schema_in_any_order(buckets, fmt):
    source, dest, cfg = buckets
    _put(cfg, source, ARCHIVE_KEYS)
    fields = ("StorageClass", "ETag", "LastModifiedDate", "EncryptionStatus", "Key", "Size", "Bucket")
    written = write_inventory(cfg, source, dest, fmt=fmt, fields=fields)
    _assert_same(_rows(read_inventory(written.manifest_uri, f"s3://{source}/ct", cfg)), _listed(f"s3://{source}/ct", cfg))


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_optional_fields_left_out_are_null(buckets, fmt):
    source, dest, cfg = buckets
    _put(cfg, source, ARCHIVE_KEYS)
    expected = _listed(f"s3://{source}/ct", cfg)
    without_etag = write_inventory(cfg, source, dest, "a", fmt=fmt, fields=("Bucket", "Key", "Size", "LastModifiedDate"))
    key_only = write_inventory(cfg, source, dest, "b", fmt=fmt, fields=("Key",))

    rows = _rows(read_inventory(without_etag.manifest_uri, f"s3://{source}/ct", cfg))
    _assert_same(rows, [{**e, "etag": None} for e in expected])
    assert [r["etag"] for r in rows] == [None] * len(ARCHIVE_KEYS)
    bare = _rows(read_inventory(key_only.manifest_uri, f"s3://{source}/ct", cfg))
    assert bare == [{"uri": e["uri"], "size": None, "mtime": None, "etag": None} for e in expected]


@pytest.mark.parametrize("fmt", ["CSV", "Parquet", "ORC"])
def test_versioned_inventory_keeps_current_objects_only(buckets, fmt):
    source, dest, cfg = buckets
    client = boto3_client(cfg)
    client.put_bucket_versioning(Bucket=source, VersioningConfiguration={"Status": "Enabled"})
    client.put_object(Bucket=source, Key="ct/a.dcm", Body=b"first")
    client.put_object(Bucket=source, Key="ct/a.dcm", Body=b"second, longer")  # a's old version stays
    client.put_object(Bucket=source, Key="ct/gone.dcm", Body=b"x")
    client.delete_object(Bucket=source, Key="ct/gone.dcm")  # latest is a delete marker
    client.put_object(Bucket=source, Key="ct/b.dcm", Body=b"b")
    fields = ("Bucket", "Key") + VERSION_FIELDS + ("Size", "LastModifiedDate", "ETag")
    written = write_inventory(cfg, source, dest, fmt=fmt, fields=fields)

    inventory = read_inventory(written.manifest_uri, f"s3://{source}/ct", cfg)

    rows = _rows(inventory)
    assert [(r["uri"], r["size"]) for r in rows] == [(f"s3://{source}/ct/a.dcm", 14), (f"s3://{source}/ct/b.dcm", 1)]
    _assert_same(rows, _listed(f"s3://{source}/ct", cfg))
    assert inventory.rows == 5  # two versions of a, gone and its delete marker, b


def test_a_prefix_that_is_an_object_lists_that_object(buckets):
    source, dest, cfg = buckets
    _put(cfg, source, ["ct/one.dcm", "ct/one.dcm.json", "ct/dir/x.dcm"])
    written = write_inventory(cfg, source, dest)
    for archive in (f"s3://{source}/ct/one.dcm", f"s3://{source}/ct/dir", f"s3://{source}/ct/missing"):
        _assert_same(_rows(read_inventory(written.manifest_uri, archive, cfg)), _listed(archive, cfg))
    assert len(_rows(read_inventory(written.manifest_uri, f"s3://{source}/ct/one.dcm", cfg))) == 1


@pytest.mark.parametrize("files", [0, 1])
def test_an_empty_inventory_is_an_empty_listing(buckets, files):
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest, files=files)
    inventory = read_inventory(written.manifest_uri, f"s3://{source}/ct", cfg)
    assert inventory.listing.num_rows == 0 and inventory.listing.schema.equals(INVENTORY_LISTING_SCHEMA)
    assert (inventory.files, inventory.rows) == (files, 0)


def test_nothing_under_the_prefix_is_an_empty_listing(buckets):
    source, dest, cfg = buckets
    _put(cfg, source, ["ct2/a.dcm", "other/b.dcm"])
    written = write_inventory(cfg, source, dest)
    inventory = read_inventory(written.manifest_uri, f"s3://{source}/ct", cfg)
    assert (inventory.listing.num_rows, inventory.rows) == (0, 2)


@pytest.mark.parametrize("style", ["path", "file"])
def test_a_local_copy_of_the_destination_bucket_reads_the_same(buckets, tmp_path, style):
    source, dest, cfg = buckets
    _put(cfg, source, ARCHIVE_KEYS)
    written = write_inventory(cfg, source, dest, "deep/prefix", files=2)
    for entry in storage.list_files(f"s3://{dest}", config=cfg):
        (tmp_path / entry.uri.removeprefix(f"s3://{dest}/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / entry.uri.removeprefix(f"s3://{dest}/")).write_bytes(storage.read_bytes(entry.uri, cfg))
    local = str(tmp_path / written.manifest_key)
    local = local if style == "path" else "file://" + local

    rows = _rows(read_inventory(local, f"s3://{source}/ct", cfg))

    assert rows == _rows(read_inventory(written.manifest_uri, f"s3://{source}/ct", cfg))
    assert len(rows) == len(ARCHIVE_KEYS)


def test_files_are_read_one_at_a_time_or_several(buckets):
    source, dest, cfg = buckets
    _put(cfg, source, [f"ct/s{i % 7}/IM{i:04d}.dcm" for i in range(60)])
    written = write_inventory(cfg, source, dest, files=6)
    one = read_inventory(written.manifest_uri, f"s3://{source}/ct", cfg, workers=1)
    several = read_inventory(written.manifest_uri, f"s3://{source}/ct", cfg, workers=3)
    assert one.listing.equals(several.listing) and one.listing.num_rows == 60
    with pytest.raises(ValueError, match="workers"):
        read_inventory(written.manifest_uri, f"s3://{source}/ct", cfg, workers=0)


# ------------------------------------------------------------------------------------ refusals


def test_refuses_another_source_bucket(buckets):
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest)
    _refused(written.manifest_uri, "s3://another-bucket/ct", cfg, repr(source), "'another-bucket'")


def test_refuses_a_local_archive(buckets, tmp_path):
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest)
    _refused(written.manifest_uri, str(tmp_path), cfg, "not s3://")


def test_refuses_a_missing_manifest(buckets):
    source, dest, cfg = buckets
    _refused(f"s3://{dest}/nothing/here/manifest.json", f"s3://{source}/ct", cfg, "no manifest.json")


def test_refuses_a_data_file_that_differs_from_the_manifest(buckets):
    source, dest, cfg = buckets
    _put(cfg, source, ARCHIVE_KEYS)
    written = write_inventory(cfg, source, dest, files=2)
    original = storage.read_bytes(written.data_uri(1), cfg)

    flipped = original[:-1] + bytes([original[-1] ^ 1])  # same size, other bytes
    rewrite_data_file(cfg, written, 1, flipped, fix_manifest=False)
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, written.data_uri(1), "MD5", written.manifest["files"][1]["MD5checksum"])

    rewrite_data_file(cfg, written, 1, original[: len(original) // 2], fix_manifest=False)  # a partial upload
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, written.data_uri(1), f"{len(original) // 2} bytes",
             f"says {len(original)}")


def test_refuses_a_missing_data_file(buckets):
    source, dest, cfg = buckets
    _put(cfg, source, ARCHIVE_KEYS)
    written = write_inventory(cfg, source, dest, files=3)
    boto3_client(cfg).delete_object(Bucket=dest, Key=written.data_keys[2])
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, written.data_uri(2), "missing")


def test_refuses_a_manifest_that_does_not_match_its_checksum(buckets):
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest)
    boto3_client(cfg).put_object(Bucket=dest, Key=written.manifest_key.replace(".json", ".checksum"), Body=b"0" * 32)
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, "manifest.checksum", "MD5")
    # Without a checksum file (not yet delivered, or a copy without it) the manifest is read as it is.
    put_manifest(cfg, written, written.manifest, checksum=False)
    assert read_inventory(written.manifest_uri, f"s3://{source}/ct", cfg).listing.num_rows == 0


@pytest.mark.parametrize("field", ["sourceBucket", "destinationBucket", "version", "creationTimestamp", "fileFormat",
                                   "fileSchema", "files"])
def test_refuses_a_manifest_without_a_required_field(buckets, field):
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest)
    doc = {k: v for k, v in written.manifest.items() if k != field}
    put_manifest(cfg, written, doc)
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, "lacks required field", field)


@pytest.mark.parametrize(("change", "fragments"), [
    ({"fileFormat": "JSON"}, ("unknown fileFormat 'JSON'",)),
    ({"fileFormat": "csv"}, ("unknown fileFormat 'csv'",)),
    ({"fileSchema": "Bucket, Size, LastModifiedDate, ETag"}, ("no Key column",)),
    ({"fileSchema": "Bucket, Key, Size, Key"}, ("twice", "Key")),
    ({"creationTimestamp": "2024-05-07T01:00:00Z"}, ("creationTimestamp", "epoch milliseconds")),
    ({"destinationBucket": "my-bucket"}, ("destinationBucket", "ARN")),
    ({"files": [{"key": "x.csv.gz", "size": 3}]}, ("files[0]", "MD5checksum")),
])
def test_refuses_a_malformed_manifest(buckets, change, fragments):
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest)
    put_manifest(cfg, written, {**written.manifest, **change})
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, *fragments)


def test_refuses_a_manifest_that_is_not_json(buckets):
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest)
    boto3_client(cfg).put_object(Bucket=dest, Key=written.manifest_key, Body=b"{not json")
    boto3_client(cfg).delete_object(Bucket=dest, Key=written.manifest_key.replace(".json", ".checksum"))
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, "not JSON")


@pytest.mark.parametrize(("bad_row", "fragments"), [
    (["{src}", "ct/b.dcm"], ("row 2", "2 fields", "has 3")),
    (["{src}", "ct/b.dcm", "3", "extra"], ("row 2", "4 fields")),
    (["{src}", "ct/b.dcm", "12x"], ("row 2", "Size is not a byte count", "'12x'")),
    (["{src}", "", "3"], ("row 2", "empty Key")),
    (["another-bucket", "ct/b.dcm", "3"], ("row 2", "Bucket is not the manifest's sourceBucket", "another-bucket")),
    (["{src}", "ct/100%.dcm", "3"], ("row 2", "not URL-encoded", "ct/100%.dcm")),
    (["{src}", "ct/%C3%28.dcm", "3"], ("row 2", "not URL-encoded", "%C3%28")),
])
def test_refuses_a_malformed_csv_row_naming_file_and_row(buckets, bad_row, fragments):
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest, objects=[], fields=("Bucket", "Key", "Size"))
    good = [source, "ct/a.dcm", "1"]
    rewrite_data_file(cfg, written, 0, _gz_rows(good, [c.format(src=source) for c in bad_row], good))
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, written.data_uri(0), *fragments)


def test_refuses_a_malformed_row_in_a_later_block(buckets):
    """Row numbers count across pyarrow's read blocks (large files are decoded in pieces)."""
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest, objects=[], fields=("Bucket", "Key", "Size"))
    rows = [[source, f"ct/{'x' * 200}/IM{i:06d}.dcm", str(i)] for i in range(60_000)]  # ~14 MB: two blocks
    rows[54_321] = [source, "ct/bad.dcm", "-1"]
    rewrite_data_file(cfg, written, 0, _gz_rows(*rows))
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, written.data_uri(0), "row 54322", "'-1'")


@pytest.mark.parametrize(("cells", "fragments"), [
    (["ct/a.dcm", "yes", "false"], ("row 1", "islatest is not true or false", "'yes'")),
    (["ct/a.dcm", "true", "2024-05-07"], ("row 1", "isdeletemarker")),
])
def test_refuses_bad_version_flags(buckets, cells, fragments):
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest, objects=[], fields=("Key", "IsLatest", "IsDeleteMarker"))
    rewrite_data_file(cfg, written, 0, _gz_rows(cells))
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, written.data_uri(0), *fragments)


def test_refuses_a_bad_date(buckets):
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest, objects=[], fields=("Key", "LastModifiedDate"))
    rewrite_data_file(cfg, written, 0, _gz_rows(["ct/a.dcm", "2024-05-07T01:00:00.000Z"], ["ct/b.dcm", "05/07/2024"]))
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, written.data_uri(0), "row 2", "LastModifiedDate", "05/07/2024")


def test_refuses_a_key_listed_twice(buckets):
    source, dest, cfg = buckets
    written = write_inventory(cfg, source, dest, objects=[], fields=("Key", "Size"), files=2)
    written = rewrite_data_file(cfg, written, 0, _gz_rows(["ct/a.dcm", "1"]))
    written = rewrite_data_file(cfg, written, 1, _gz_rows(["ct/a%2Edcm", "1"]))  # the same key, encoded otherwise
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, f"s3://{source}/ct/a.dcm", "more than once")


def test_refuses_a_data_file_not_in_the_manifests_format(buckets):
    source, dest, cfg = buckets
    _put(cfg, source, ["ct/a.dcm"])
    written = write_inventory(cfg, source, dest, fmt="Parquet")
    put_manifest(cfg, written, {**written.manifest, "fileFormat": "ORC",
                                "fileSchema": "struct<bucket:string,key:string,size:bigint>"})
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, written.data_uri(0), "cannot decode", "as ORC")


def test_refuses_a_columnar_file_without_a_listed_column(buckets):
    source, dest, cfg = buckets
    _put(cfg, source, ["ct/a.dcm"])
    written = write_inventory(cfg, source, dest, fmt="Parquet", fields=("Bucket", "Key"))
    schema = "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); optional int64 size; }"
    put_manifest(cfg, written, {**written.manifest, "fileSchema": schema})
    _refused(written.manifest_uri, f"s3://{source}/ct", cfg, written.data_uri(0), "lacks column(s) size")


# ----------------------------------------------------------------------------------- manifest


def test_parse_manifest_reads_each_formats_schema():
    base = {"sourceBucket": "src", "destinationBucket": "arn:aws:s3:::dst", "version": "2016-11-30",
            "creationTimestamp": "1514944800000", "files": [{"key": "k", "size": 1, "MD5checksum": "F" * 32}]}
    schemas = {
        "CSV": ("Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass",
                ("Bucket", "Key", "VersionId", "IsLatest", "IsDeleteMarker", "Size", "LastModifiedDate", "ETag", "StorageClass")),
        "ORC": (("struct<bucket:string,key:string,size:bigint,last_modified_date:timestamp,e_tag:string,"
                 "tags:struct<a:string,b:string>>"), ("bucket", "key", "size", "last_modified_date", "e_tag", "tags")),
        "Parquet": (("message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); "
                     "optional int64 size;  optional int64 last_modified_date (TIMESTAMP_MILLIS); optional binary e_tag (UTF8);}"),
                    ("bucket", "key", "size", "last_modified_date", "e_tag")),
    }
    for fmt, (schema, columns) in schemas.items():
        manifest = parse_manifest(json.dumps({**base, "fileFormat": fmt, "fileSchema": schema}), "s3://dst/m.json")
        assert manifest.columns == columns
        assert manifest.created == dt.datetime(2018, 1, 3, 2, 0, tzinfo=dt.timezone.utc)
        assert (manifest.source_bucket, manifest.destination_bucket, manifest.files[0].md5) == ("src", "dst", "f" * 32)


def test_build_inventory_is_pure_and_self_consistent():
    objects = [{"Key": "ct/a b.dcm", "Size": 3, "LastModified": CREATED, "ETag": '"abc"'}]
    built = build_inventory("src", "dst", objects, created=CREATED)
    manifest = parse_manifest(built.files[built.manifest_key], "s3://dst/" + built.manifest_key)
    data = built.files[built.data_keys[0]]
    assert manifest.files[0].size == len(data)
    assert gzip.decompress(data) == b'"src","ct/a+b.dcm","3","2024-05-07T01:00:12.345Z","abc","STANDARD"\n'
    assert manifest.columns == DEFAULT_FIELDS


# ----------------------------------------------------------------------------------- freshness


def _inventory(created: dt.datetime) -> Inventory:
    return Inventory(INVENTORY_LISTING_SCHEMA.empty_table(), created, "src", "s3://dst/inv/manifest.json", 0, 0, "CSV")


def test_check_fresh_refuses_an_inventory_older_than_the_last_run():
    inventory = _inventory(CREATED)
    started = CREATED + dt.timedelta(hours=3)
    with pytest.raises(InventoryError) as info:
        check_fresh(inventory, started)
    assert str(info.value) == (
        "inventory s3://dst/inv/manifest.json was created 2024-05-07T01:00:12.345000+00:00, before the last committed "
        "run started 2024-05-07T04:00:12.345000+00:00: it would miss what changed since"
    )
    # Another zone is the same instant.
    with pytest.raises(InventoryError):
        check_fresh(inventory, started.astimezone(dt.timezone(dt.timedelta(hours=-5))))


def test_check_fresh_accepts_a_newer_inventory_or_no_previous_run():
    inventory = _inventory(CREATED)
    check_fresh(inventory, None)
    check_fresh(inventory, CREATED)
    check_fresh(inventory, CREATED - dt.timedelta(seconds=1))
    with pytest.raises(ValueError, match="timezone-aware"):
        check_fresh(inventory, CREATED.replace(tzinfo=None))
