"""ichd_ray.pipeline.listing (and the storage pieces under it) against a moto S3 server and local trees:
the parallel listing gives exactly ``storage.list_files``'s rows, really fans out, descends as
documented, paginates, and raises (naming the prefix) when a task's listing fails."""

from __future__ import annotations

import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

from ichd_ray.io import storage
from ichd_ray.pipeline.incremental import LISTING_SCHEMA
from ichd_ray.pipeline.listing import list_archive, list_archive_with_stats
from s3_proxy import FaultPolicy, FaultProxy

pytestmark = pytest.mark.timeout(120)

# Keys under the archive "ct/" (relative), with awkward names, at depths 0 to 3. Nine children, so the
# default min_prefixes (8) needs no descent.
AWKWARD = {
    "top.dcm": b"0",
    "a b/one+two.dcm": b"12",
    "a b/100%.dcm": b"123",
    "a b/sub dir/x+y%20z.dcm": b"1234",
    "ünïcødé/スライス 1.dcm": b"12345",
    "s1/x/mid.dcm": b"123456",
    "s1/x/y/deep.dcm": b"1234567",
    "s1/.late.dcm.0123456789ab" + storage.TEMP_SUFFIX: b"tmp",  # an in-flight write's temporary: never listed
    "s2/p.dcm": b"p",
    "s3/q.dcm": b"q",
    "s4/r/s.dcm": b"r",
    "s5/t.dcm": b"t",
    "s6/u.dcm": b"u",
    "s7/v.dcm": b"v",
}
# Next to the archive, never in it: a sibling prefix, a key sharing its first letters, the key "ct" itself.
SIBLINGS = {"ct2/other.dcm": b"o", "ctx.dcm": b"x"}


def _assert_same(table, entries: list[storage.FileEntry]) -> None:
    """The table has list_files's rows: uri, size and etag equal, mtime within 1e-3 s."""
    assert table.schema == LISTING_SCHEMA
    rows = table.to_pylist()
    assert [r["uri"] for r in rows] == [e.uri for e in entries]
    assert [(r["size"], r["etag"]) for r in rows] == [(e.size, e.etag) for e in entries]
    for row, entry in zip(rows, entries):
        assert row["mtime"] == pytest.approx(entry.mtime, abs=1e-3)


def _put_all(bucket: str, config: storage.StorageConfig, objects: dict[str, bytes]) -> None:
    client = storage.boto3_client(config)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()))


def _write_local(root, objects: dict[str, bytes]) -> None:
    for rel, data in objects.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)


@pytest.fixture
def s3_archive(s3_bucket):
    """The awkward archive on S3, plus what only S3 can hold: a directory marker, an empty key segment
    (``ct//``), an object named like the prefix (``ct``) and one under the marker's prefix."""
    bucket, config = s3_bucket
    objects = {f"ct/{k}": v for k, v in AWKWARD.items()} | SIBLINGS
    objects |= {"ct/s1/marker/": b"", "ct/s1/marker/in.dcm": b"m", "ct//empty-segment.dcm": b"e", "ct": b"c", "ct/": b""}
    _put_all(bucket, config, objects)
    return f"s3://{bucket}/ct", config


@pytest.fixture
def local_archive(tmp_path):
    """The awkward archive in a directory, plus an empty directory, a symlink to a file (listed) and a
    symlink to a directory (not followed, as list_files does)."""
    root = tmp_path / "ct"
    _write_local(root, AWKWARD)
    _write_local(tmp_path, SIBLINGS)
    (root / "s1" / "empty").mkdir()
    os.symlink(root / "s2" / "p.dcm", root / "s3" / "link-to-p.dcm")
    os.symlink(root / "s1", root / "s8-link-to-dir")
    return str(root)


# ------------------------------------------------------------------------------ the same rows, fanned out


@pytest.mark.parametrize("where", ["s3", "local", "file_uri"])
def test_parallel_listing_has_exactly_list_files_rows(request, ray_session, where):
    if where == "s3":
        uri, config = request.getfixturevalue("s3_archive")
    else:
        uri, config = request.getfixturevalue("local_archive"), None
        uri = "file://" + uri if where == "file_uri" else uri
    expected = storage.list_files(uri, config=config)
    assert len(expected) >= 13  # the archive is there, siblings are not
    assert not any("ct2/" in e.uri or "ctx" in e.uri or e.uri.endswith("/") for e in expected)

    table, stats = list_archive_with_stats(uri, config, prefixes_per_task=2)
    _assert_same(table, expected)
    assert stats.parallel and stats.depth == 1
    assert stats.prefixes >= 9 and stats.tasks == -(-stats.prefixes // 2) > 1  # the fan-out happened
    assert stats.objects == len(expected)
    # The other forms of the prefix read the same (directory semantics): a trailing slash changes nothing.
    _assert_same(list_archive(uri + "/", config, prefixes_per_task=3), expected)
    # Sequential on the driver, as without Ray.
    flat, flat_stats = list_archive_with_stats(uri, config, parallel=False)
    _assert_same(flat, expected)
    assert not flat_stats.parallel and flat_stats.tasks == 0


@pytest.mark.parametrize("where", ["s3", "local"])
def test_descends_until_min_prefixes_or_max_depth(request, ray_session, tmp_path, where):
    # 2 children, each with 5 grandchildren of 2 objects, and an object in each child and at the top.
    objects = {"top.dcm": b"t", "a/in-a.dcm": b"a", "b/in-b.dcm": b"b"}
    objects |= {f"{c}/g{g}/{i}.dcm": b"x" * i for c in "ab" for g in range(5) for i in range(2)}
    if where == "s3":
        bucket, config = request.getfixturevalue("s3_bucket")
        _put_all(bucket, config, {f"arch/{k}": v for k, v in objects.items()})
        uri = f"s3://{bucket}/arch"
    else:
        config, uri = None, str(tmp_path / "arch")
        _write_local(uri, objects)
    expected = storage.list_files(uri, config=config)
    assert len(expected) == 23

    def listed(**kwargs):
        table, stats = list_archive_with_stats(uri, config, **kwargs)
        _assert_same(table, expected)
        return stats.depth, stats.prefixes, stats.level_listings

    assert listed() == (2, 10, 3)  # 2 < min_prefixes=8: a and b listed by level, their 10 children in tasks
    assert listed(max_depth=1) == (1, 2, 1)  # never below the archive's children
    assert listed(min_prefixes=2) == (1, 2, 1)  # 2 children are enough
    assert listed(min_prefixes=11, max_depth=5) == (0, 0, 13)  # the third level has no prefixes: all listed by level
    assert listed(min_prefixes=1, prefixes_per_task=1)[1] == 2


@pytest.mark.timeout(240)
def test_pagination_in_levels_and_in_tasks(ray_session, s3_bucket):
    """1,050 entries under one child: 900 objects right in ``big/`` and 150 in folders of their own, so
    the level listing of ``big/`` spans two pages (objects and CommonPrefixes count alike), and a task
    listing ``big/`` recursively pages through 1,050 keys."""
    bucket, config = s3_bucket
    objects = {f"arch/big/{i:04d}.dcm": b"" for i in range(900)}
    objects |= {f"arch/big/d{i:04d}/x.dcm": b"" for i in range(150)}
    objects |= {"arch/small/one.dcm": b"1"}
    _put_all(bucket, config, objects)
    page = storage.boto3_client(config).list_objects_v2(Bucket=bucket, Prefix="arch/big/", Delimiter="/")
    assert page["IsTruncated"]  # the level of big/ really needs a second page
    uri = f"s3://{bucket}/arch"
    expected = storage.list_files(uri, config=config)
    assert len(expected) == 1051

    table, stats = list_archive_with_stats(uri, config, min_prefixes=1, prefixes_per_task=2)  # big/ in one task: 2 pages there
    _assert_same(table, expected)
    assert (stats.depth, stats.prefixes, stats.tasks) == (1, 2, 1)
    _, stats = list_archive_with_stats(uri, config, min_prefixes=1)  # by default about four tasks per slot
    assert (stats.prefixes, stats.tasks) == (2, 2)
    table, stats = list_archive_with_stats(uri, config, prefixes_per_task=25)  # descends into big/
    _assert_same(table, expected)
    assert (stats.depth, stats.prefixes, stats.tasks) == (2, 150, 6)


# ------------------------------------------------------------------------------ single object, empty


def test_single_object_and_empty_s3(ray_session, s3_archive):
    uri, config = s3_archive
    bucket_uri = uri.rsplit("/", 1)[0]
    for one in (f"{uri}/top.dcm", f"{uri}/a b/100%.dcm", f"{bucket_uri}/ctx.dcm"):
        _assert_same(list_archive(one, config), storage.list_files(one, config=config))
        assert list_archive(one, config).column("uri").to_pylist() == [one]
    for missing in (f"{uri}/nothing", f"{uri}/nothing/", f"{uri}/top"):
        table = list_archive(missing, config)
        assert table.num_rows == 0 and table.schema == LISTING_SCHEMA
    # The whole bucket: the archive and its siblings, ct and ct2 both
    _assert_same(list_archive(bucket_uri, config, prefixes_per_task=1), storage.list_files(bucket_uri, config=config))
    with pytest.raises(FileNotFoundError, match="no-such-bucket-xyz"):
        list_archive("s3://no-such-bucket-xyz/ct", config)


def test_single_object_and_empty_local(ray_session, local_archive, tmp_path):
    for one in (os.path.join(local_archive, "top.dcm"), "file://" + os.path.join(local_archive, "a b", "100%.dcm")):
        assert list_archive(one).column("uri").to_pylist() == [one]
        _assert_same(list_archive(one), storage.list_files(one))
    (tmp_path / "void").mkdir()
    for missing in (str(tmp_path / "nothing"), str(tmp_path / "void"), f"file://{tmp_path}/void/"):
        table = list_archive(missing)
        assert table.num_rows == 0 and table.schema == LISTING_SCHEMA


# ------------------------------------------------------------------------------ failures raise


class _DenyListing(FaultPolicy):
    """403 AccessDenied to every listing of one key prefix (and its descendants); everything else passes."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.denied = 0

    def _draw(self, method: str, path: str) -> str | None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        if method == "GET" and query.get("prefix", [""])[0].startswith(self.prefix):
            self.denied += 1
            return "read_only"  # the proxy's 403 AccessDenied
        return None


def test_a_failing_task_makes_the_listing_raise_naming_the_prefix(ray_session, s3_server, s3_archive):
    uri, config = s3_archive
    bucket = uri.split("/")[2]
    policy = _DenyListing("ct/s4/")
    with FaultProxy(s3_server.endpoint_url, policy) as proxy:
        via_proxy = storage.StorageConfig(**(config.to_dict() | {"endpoint_url": proxy.endpoint_url}))
        with pytest.raises(PermissionError, match=f"s3://{bucket}/ct/s4/"):
            list_archive(uri, via_proxy, prefixes_per_task=1)
        assert policy.denied >= 1  # refused in a task: the driver's level listing (prefix ct/) passed
        # Without that prefix the same proxy lists fine: the failure was the task's, and nothing else.
        _assert_same(list_archive(f"{uri}/s5", via_proxy), storage.list_files(f"{uri}/s5", config=config))
        # Denied on the driver's own level listing, when descending into s4/: raises too.
        with pytest.raises(PermissionError, match=f"s3://{bucket}/ct/s4"):
            list_archive(f"{uri}/s4", via_proxy)


def test_arguments_are_checked():
    for bad in ({"prefixes_per_task": 0}, {"max_depth": 0}, {"min_prefixes": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            list_archive("/nonexistent-archive", **bad)


# ------------------------------------------------------------------------------ the storage pieces


def test_list_level_and_list_files_table_s3(s3_archive):
    uri, config = s3_archive
    bucket = uri.split("/")[2]
    assert storage.directory_uri(uri) == storage.directory_uri(uri + "//") == f"s3://{bucket}/ct/"
    assert storage.directory_uri(f"s3://{bucket}") == f"s3://{bucket}/"
    entries, children = storage.list_level(storage.directory_uri(uri), config)
    assert [e.uri for e in entries] == [f"{uri}/top.dcm"]  # not the marker ct/, not ct, ct2/ or ctx.dcm
    assert children == [f"s3://{bucket}/ct/{c}/" for c in ("", "a b", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "ünïcødé")]
    # A child with an empty segment is taken literally: ct// is not ct/.
    assert storage.list_files_table(f"s3://{bucket}/ct//", config).column("uri").to_pylist() == [
        f"s3://{bucket}/ct//empty-segment.dcm"
    ]
    # A directory marker is not a file, but what is under its prefix is.
    entries, children = storage.list_level(f"s3://{bucket}/ct/s1/", config)
    assert [e.uri for e in entries] == []  # the temporary of an in-flight write is skipped, as locally
    assert children == [f"s3://{bucket}/ct/s1/marker/", f"s3://{bucket}/ct/s1/x/"]
    assert storage.list_level(f"s3://{bucket}/ct/s1/marker/", config)[0][0].uri.endswith("marker/in.dcm")
    # Without a trailing slash, list_files_table is list_files as Arrow, single-object case included.
    _assert_same(storage.list_files_table(uri, config), storage.list_files(uri, config=config))
    assert storage.list_files_table(f"{uri}/nothing", config).num_rows == 0
    _assert_same(storage.list_files_table(f"{uri}/top.dcm", config), storage.list_files(f"{uri}/top.dcm", config=config))
    assert storage.FILE_TABLE_SCHEMA == LISTING_SCHEMA
    with pytest.raises(FileNotFoundError, match="no-such-bucket-xyz"):
        storage.list_level("s3://no-such-bucket-xyz/ct/", config)


def test_list_level_local(local_archive):
    entries, children = storage.list_level(local_archive)
    assert [e.uri for e in entries] == [os.path.join(local_archive, "top.dcm")]
    # The symlink to a directory is not a child (list_files does not follow it); the empty directory is one.
    assert children == [os.path.join(local_archive, c) + "/" for c in ("a b", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "ünïcødé")]
    entries, children = storage.list_level(os.path.join(local_archive, "s1"))
    assert entries == []  # the temporary of an in-flight write is skipped
    assert children == [os.path.join(local_archive, "s1", c) + "/" for c in ("empty", "x")]
    file_entries, file_children = storage.list_level("file://" + local_archive)
    assert [e.uri for e in file_entries] == ["file://" + os.path.join(local_archive, "top.dcm")]
    assert file_children[0] == "file://" + os.path.join(local_archive, "a b") + "/"
    # A file is its own level; a missing path is empty.
    assert [e.uri for e in storage.list_level(os.path.join(local_archive, "top.dcm"))[0]] == [os.path.join(local_archive, "top.dcm")]
    assert storage.list_level(os.path.join(local_archive, "missing")) == ([], [])


def test_a_truncated_page_without_token_raises_not_a_partial_listing(s3_archive, monkeypatch):
    """botocore's paginator would end quietly there; a listing cut short must fail instead."""
    uri, config = s3_archive
    bucket = uri.split("/")[2]
    client = storage.boto3_client(config)

    class CutShort:
        def paginate(self, **kwargs):
            yield {"Contents": [{"Key": "ct/top.dcm", "Size": 1, "ETag": '"e"'}], "IsTruncated": True}

    monkeypatch.setattr(client, "get_paginator", lambda name: CutShort())
    with pytest.raises(OSError, match=f"listing of s3://{bucket}/ct/ was cut short"):
        storage.list_level(f"s3://{bucket}/ct/", config)
    with pytest.raises(OSError, match=f"listing of s3://{bucket}/ct/s1/ was cut short"):
        storage.list_files_table(f"s3://{bucket}/ct/s1/", config)
