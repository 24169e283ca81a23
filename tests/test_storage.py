"""ichd_ray.io.storage against the local filesystem and a moto S3 server."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ichd_ray.io import storage
from ichd_ray.io.storage import FileEntry, StorageConfig

pytestmark = pytest.mark.timeout(120)

AWS_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


@pytest.fixture
def clean_aws_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _table() -> pa.Table:
    return pa.table({"image_id": ["ID_a", "ID_b", "ID_c"], "p_any": [0.1, 0.9, 0.5]})


# ---------------------------------------------------------------------------------------- URIs


def test_parse_uri_local_and_s3(tmp_path, monkeypatch):
    assert storage.parse_uri("s3://bucket/dir/x.dcm") == ("s3", "bucket/dir/x.dcm")
    assert storage.parse_uri("s3://bucket") == ("s3", "bucket")
    assert storage.parse_uri("S3://bucket/k") == ("s3", "bucket/k")
    assert storage.parse_uri(str(tmp_path / "a")) == ("file", str(tmp_path / "a"))
    assert storage.parse_uri(tmp_path / "a") == ("file", str(tmp_path / "a"))
    assert storage.parse_uri(f"file://{tmp_path}/a") == ("file", str(tmp_path / "a"))
    assert storage.parse_uri(f"file://localhost{tmp_path}/a") == ("file", str(tmp_path / "a"))
    monkeypatch.chdir(tmp_path)
    assert storage.parse_uri("rel/x.parquet") == ("file", str(tmp_path / "rel" / "x.parquet"))


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("gs://bucket/key", "unsupported URI scheme 'gs'"),
        ("http://example.com/x", "unsupported URI scheme 'http'"),
        ("s3:///key", "without a bucket"),
        ("s3://", "without a bucket"),
        ("file://otherhost/x", "remote host"),
        ("", "empty URI"),
    ],
)
def test_parse_uri_errors_name_the_uri(uri, fragment):
    with pytest.raises(ValueError) as info:
        storage.parse_uri(uri)
    assert fragment in str(info.value)
    if uri:
        assert repr(uri) in str(info.value)


def test_join_keeps_scheme():
    assert storage.join("s3://b/x", "y", "z.dcm") == "s3://b/x/y/z.dcm"
    assert storage.join("s3://b/x/", "/y/", "z.dcm") == "s3://b/x/y/z.dcm"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.join("file:///tmp/a", "b", "", "c") == "file:///tmp/a/b/c"
    assert storage.join("file:///", "x") == "file:///x"
    assert storage.join("s3://b/x") == "s3://b/x"


# ------------------------------------------------------------------------------------ config


def test_config_repr_hides_secrets():
    cfg = StorageConfig(
        endpoint_url="http://minio:9000",
        access_key_id="AKIAEXAMPLEKEYID",
        secret_access_key="super-secret-value",
        session_token="session-token-value",
    )
    text = repr(cfg)
    assert "super-secret-value" not in text
    assert "session-token-value" not in text
    assert "AKIAEXAMPLEKEYID" not in text
    assert "http://minio:9000" in text and "***" in text
    assert str(cfg) == text
    assert "super-secret-value" not in f"{cfg}"


def test_config_from_env(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    clean_aws_env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "env-key")
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    cfg = StorageConfig.from_env()
    assert cfg == StorageConfig("http://127.0.0.1:9000", "eu-west-1", "env-key", "env-secret", None, False)

    # The S3-specific endpoint and AWS_REGION win; explicit values win over the environment.
    clean_aws_env.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.com")
    clean_aws_env.setenv("AWS_REGION", "eu-central-1")
    assert StorageConfig.from_env().endpoint_url == "https://s3.example.com"
    assert StorageConfig.from_env().region == "eu-central-1"
    cfg = StorageConfig.from_env(region="us-west-2", access_key_id="k", secret_access_key="s")
    assert (cfg.region, cfg.access_key_id, cfg.secret_access_key) == ("us-west-2", "k", "s")

    # Anonymous access ignores the environment's credentials.
    anon = StorageConfig.from_env(anonymous=True)
    assert anon.anonymous and anon.access_key_id is None and anon.secret_access_key is None

    with pytest.raises(TypeError, match="bogus"):
        StorageConfig.from_env(bogus=1)


def test_config_from_env_empty(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "")
    assert StorageConfig.from_env() == StorageConfig()


def test_config_validation():
    with pytest.raises(ValueError, match="both"):
        StorageConfig(access_key_id="k")
    with pytest.raises(ValueError, match="anonymous"):
        StorageConfig(access_key_id="k", secret_access_key="s", anonymous=True)
    with pytest.raises(ValueError, match="endpoint_url"):
        StorageConfig(endpoint_url="minio:9000")
    with pytest.raises(ValueError, match="path"):
        StorageConfig(endpoint_url="http://minio:9000/some/path")
    with pytest.raises(ValueError) as info:
        StorageConfig(endpoint_url="http://user:pw-secret@minio:9000")
    assert "pw-secret" not in str(info.value)


def test_config_dict_round_trip(clean_aws_env):
    cfg = StorageConfig("http://h:1", "us-east-1", "key", "secret", "token", False)
    d = cfg.to_dict()
    assert d["secret_access_key"] == "secret"
    assert StorageConfig.from_dict(d) == cfg
    assert hash(StorageConfig.from_dict(d)) == hash(cfg)

    public = cfg.to_dict(include_secrets=False)
    assert public["access_key_id"] is public["secret_access_key"] is public["session_token"] is None
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "worker-key")
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    rebuilt = StorageConfig.from_env(**public)
    assert (rebuilt.endpoint_url, rebuilt.access_key_id, rebuilt.secret_access_key) == (
        "http://h:1",
        "worker-key",
        "worker-secret",
    )
    with pytest.raises(TypeError):
        StorageConfig.from_dict({"nope": 1})


# ------------------------------------------------------------------------------------- local


@pytest.mark.parametrize("style", ["path", "file"])
def test_local_round_trip(tmp_path, style):
    base = str(tmp_path) if style == "path" else f"file://{tmp_path}"
    uri = storage.join(base, "deep", "er", "x.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")  # creates the parents
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"hello"
    assert storage.read_bytes(uri, length=3, offset=1) == b"ell"
    with pytest.raises(ValueError, match="needs a length"):
        storage.read_bytes(uri, offset=1)
    storage.write_bytes(uri, memoryview(b"replaced"))
    assert storage.read_bytes(uri) == b"replaced"
    assert (tmp_path / "deep" / "er" / "x.bin").read_bytes() == b"replaced"


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "data.bin"
    for i in range(5):
        storage.write_bytes(str(target), bytes([i]) * 1000)
    assert sorted(os.listdir(tmp_path / "out")) == ["data.bin"]
    assert target.read_bytes() == b"\x04" * 1000
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_local_failed_write_leaves_old_content(tmp_path, monkeypatch):
    target = tmp_path / "data.bin"
    storage.write_bytes(str(target), b"old")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        storage.write_bytes(str(target), b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_local_missing_file_names_uri(tmp_path):
    for uri in (str(tmp_path / "nope.dcm"), f"file://{tmp_path}/nope.dcm"):
        with pytest.raises(FileNotFoundError) as info:
            storage.read_bytes(uri)
        assert uri in str(info.value)


def test_local_list_files(tmp_path):
    storage.write_bytes(str(tmp_path / "b.dcm"), b"12345")
    storage.write_bytes(str(tmp_path / "a.txt"), b"1")
    storage.write_bytes(str(tmp_path / "sub" / "c.dcm"), b"123")
    storage.write_bytes(str(tmp_path / "sub" / "deeper" / "d.dcm"), b"")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / f".x.abc{storage.TEMP_SUFFIX}").write_bytes(b"in flight")
    before = time.time()

    entries = storage.list_files(str(tmp_path))
    assert [e.uri for e in entries] == [
        str(tmp_path / "a.txt"),
        str(tmp_path / "b.dcm"),
        str(tmp_path / "sub" / "c.dcm"),
        str(tmp_path / "sub" / "deeper" / "d.dcm"),
    ]
    assert [e.size for e in entries] == [1, 5, 3, 0]
    assert all(e.etag is None for e in entries)
    assert all(isinstance(e.mtime, float) and abs(e.mtime - before) < 60 for e in entries)

    dcm = storage.list_files(str(tmp_path), suffix=".dcm")
    assert [os.path.basename(e.uri) for e in dcm] == ["b.dcm", "c.dcm", "d.dcm"]
    flat = storage.list_files(str(tmp_path) + "/", recursive=False)
    assert [os.path.basename(e.uri) for e in flat] == ["a.txt", "b.dcm"]
    both = storage.list_files(str(tmp_path), suffix=(".txt", ".dcm"), recursive=False)
    assert len(both) == 2

    # file:// prefixes give file:// URIs that read back.
    file_entries = storage.list_files(f"file://{tmp_path}/sub")
    assert [e.uri for e in file_entries] == [f"file://{tmp_path}/sub/c.dcm", f"file://{tmp_path}/sub/deeper/d.dcm"]
    assert storage.read_bytes(file_entries[0].uri) == b"123"

    # A single file lists as itself; a missing prefix lists as nothing.
    single = storage.list_files(str(tmp_path / "b.dcm"))
    assert single == [FileEntry(str(tmp_path / "b.dcm"), 5, single[0].mtime, None)]
    assert storage.list_files(str(tmp_path / "missing")) == []


def test_local_delete_prefix(tmp_path):
    for name in ("p/a", "p/b/c", "px/keep"):
        storage.write_bytes(str(tmp_path / name), b"x")
    assert storage.delete_prefix(str(tmp_path / "p")) == 2
    assert not (tmp_path / "p").exists()
    assert (tmp_path / "px" / "keep").exists()
    assert storage.delete_prefix(str(tmp_path / "p")) == 0
    with pytest.raises(ValueError, match="root"):
        storage.delete_prefix("/")


def test_local_pyarrow_filesystem_reads_write_bytes(tmp_path):
    sink = pa.BufferOutputStream()
    pq.write_table(_table(), sink)
    uri = f"file://{tmp_path}/t/table.parquet"
    storage.write_bytes(uri, sink.getvalue().to_pybytes())

    fs, path = storage.filesystem(uri)
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "t" / "table.parquet")
    assert pq.read_table(path, filesystem=fs).equals(_table())

    out_fs, out_path = storage.filesystem(str(tmp_path / "t" / "copy.parquet"))
    pq.write_table(_table(), out_path, filesystem=out_fs)
    data = storage.read_bytes(str(tmp_path / "t" / "copy.parquet"))
    assert pq.read_table(pa.BufferReader(data)).equals(_table())


def test_fsspec_local(tmp_path):
    fs = storage.fsspec_filesystem(str(tmp_path))
    storage.write_bytes(str(tmp_path / "f.bin"), b"abc")
    assert fs.cat_file(str(tmp_path / "f.bin")) == b"abc"


# ---------------------------------------------------------------------------------------- S3


def test_s3_round_trip(s3_bucket):
    bucket, cfg = s3_bucket
    uri = f"s3://{bucket}/dir/x.dcm"
    assert not storage.exists(uri, cfg)
    storage.write_bytes(uri, b"\x00DICM" * 100, cfg)
    assert storage.exists(uri, cfg)
    assert storage.exists(f"s3://{bucket}/dir", cfg)  # a prefix with objects counts as a directory
    assert storage.exists(f"s3://{bucket}", cfg)
    assert not storage.exists(f"s3://{bucket}/di", cfg)
    assert storage.read_bytes(uri, cfg) == b"\x00DICM" * 100
    assert storage.read_bytes(uri, cfg, length=4, offset=6) == b"DICM"  # one ranged GET from an offset
    storage.write_bytes(uri, bytearray(b"v2"), cfg)
    assert storage.read_bytes(uri, cfg) == b"v2"


def test_s3_missing_object_names_uri(s3_bucket):
    bucket, cfg = s3_bucket
    uri = f"s3://{bucket}/nope/ID_missing.dcm"
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(uri, cfg)
    assert uri in str(info.value)
    no_bucket = "s3://no-such-bucket-xyz/k"
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(no_bucket, cfg)
    assert no_bucket in str(info.value)
    assert not storage.exists(no_bucket, cfg)
    assert not storage.exists("s3://no-such-bucket-xyz", cfg)


def test_s3_list_files(s3_bucket):
    bucket, cfg = s3_bucket
    base = f"s3://{bucket}/ds"
    storage.write_bytes(f"{base}/b.dcm", b"12345", cfg)
    storage.write_bytes(f"{base}/a.txt", b"1", cfg)
    storage.write_bytes(f"{base}/sub/c.dcm", b"123", cfg)
    storage.write_bytes(f"s3://{bucket}/dsx/not-under-ds.dcm", b"x", cfg)
    storage.boto3_client(cfg).put_object(Bucket=bucket, Key="ds/marker/", Body=b"")  # directory marker

    entries = storage.list_files(base, config=cfg)
    assert [e.uri for e in entries] == [f"{base}/a.txt", f"{base}/b.dcm", f"{base}/sub/c.dcm"]
    assert [e.size for e in entries] == [1, 5, 3]
    assert all(isinstance(e.mtime, float) and abs(e.mtime - time.time()) < 300 for e in entries)
    head = storage.boto3_client(cfg).head_object(Bucket=bucket, Key="ds/b.dcm")
    assert entries[1].etag == head["ETag"].strip('"')
    assert all(e.etag and '"' not in e.etag for e in entries)

    assert [e.uri for e in storage.list_files(base + "/", suffix=".dcm", config=cfg)] == [
        f"{base}/b.dcm",
        f"{base}/sub/c.dcm",
    ]
    assert [e.uri for e in storage.list_files(base, recursive=False, config=cfg)] == [
        f"{base}/a.txt",
        f"{base}/b.dcm",
    ]
    assert len(storage.list_files(f"s3://{bucket}", config=cfg)) == 4
    assert [e.uri for e in storage.list_files(f"{base}/b.dcm", config=cfg)] == [f"{base}/b.dcm"]
    assert storage.list_files(f"{base}/missing", config=cfg) == []
    with pytest.raises(FileNotFoundError, match="no-such-bucket-xyz"):
        storage.list_files("s3://no-such-bucket-xyz/p", config=cfg)


def test_s3_list_files_paginates(s3_bucket, monkeypatch):
    bucket, cfg = s3_bucket
    client = storage.boto3_client(cfg)
    for i in range(10):
        client.put_object(Bucket=bucket, Key=f"many/{i:05d}.dcm", Body=b"x")

    # Pages of 3 keys (instead of putting 1000+ objects) make listing and deleting span 4 pages.
    real_get_paginator = client.get_paginator
    pages_seen = []

    class SmallPages:
        def __init__(self, name):
            self._paginator = real_get_paginator(name)

        def paginate(self, **kwargs):
            for page in self._paginator.paginate(PaginationConfig={"PageSize": 3}, **kwargs):
                pages_seen.append(len(page.get("Contents", ())))
                yield page

    monkeypatch.setattr(client, "get_paginator", SmallPages)
    entries = storage.list_files(f"s3://{bucket}/many", config=cfg)
    assert pages_seen == [3, 3, 3, 1]
    assert [e.uri for e in entries] == [f"s3://{bucket}/many/{i:05d}.dcm" for i in range(10)]
    assert storage.delete_prefix(f"s3://{bucket}/many", cfg) == 10
    monkeypatch.undo()
    assert storage.list_files(f"s3://{bucket}/many", config=cfg) == []


def test_s3_delete_prefix(s3_bucket):
    bucket, cfg = s3_bucket
    for key in ("p/a", "p/b/c", "px/keep"):
        storage.write_bytes(f"s3://{bucket}/{key}", b"x", cfg)
    assert storage.delete_prefix(f"s3://{bucket}/p", cfg) == 2
    assert [e.uri for e in storage.list_files(f"s3://{bucket}", config=cfg)] == [f"s3://{bucket}/px/keep"]
    assert storage.delete_prefix(f"s3://{bucket}/p/", cfg) == 0
    with pytest.raises(ValueError, match="whole bucket"):
        storage.delete_prefix(f"s3://{bucket}/", cfg)


def test_s3_pyarrow_filesystem_reads_write_bytes(s3_bucket):
    bucket, cfg = s3_bucket
    sink = pa.BufferOutputStream()
    pq.write_table(_table(), sink)
    uri = f"s3://{bucket}/preds/part-0.parquet"
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), cfg)

    fs, path = storage.filesystem(uri, cfg)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{bucket}/preds/part-0.parquet"
    assert storage.filesystem(f"s3://{bucket}/other", cfg)[0] is fs  # cached per config
    assert pq.read_table(path, filesystem=fs).equals(_table())

    # And the other direction: pyarrow writes, the boto3-based functions see it.
    pq.write_table(_table(), f"{bucket}/preds/part-1.parquet", filesystem=fs)
    listed = storage.list_files(f"s3://{bucket}/preds", suffix=".parquet", config=cfg)
    assert [e.uri.rsplit("/", 1)[1] for e in listed] == ["part-0.parquet", "part-1.parquet"]
    data = storage.read_bytes(f"s3://{bucket}/preds/part-1.parquet", cfg)
    assert pq.read_table(pa.BufferReader(data)).equals(_table())


def test_fsspec_s3(s3_bucket):
    bucket, cfg = s3_bucket
    storage.write_bytes(f"s3://{bucket}/f/x.bin", b"abc", cfg)
    fs = storage.fsspec_filesystem(f"s3://{bucket}", cfg)
    _, path = storage.parse_uri(f"s3://{bucket}/f/x.bin")
    assert fs.cat_file(path) == b"abc"
    with fs.open(f"{bucket}/f/y.bin", "wb") as fh:
        fh.write(b"from fsspec")
    assert storage.read_bytes(f"s3://{bucket}/f/y.bin", cfg) == b"from fsspec"


def test_absolute_makes_local_paths_absolute_in_their_own_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("work/cache/a.u8") == str(tmp_path / "work/cache/a.u8")
    assert storage.absolute("file://" + str(tmp_path / "x")) == "file://" + str(tmp_path / "x")
    assert storage.absolute("s3://bucket/work/a.u8") == "s3://bucket/work/a.u8"
