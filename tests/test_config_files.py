"""ichd_ray.io.config_files: --config YAML read from local files and storage URIs, then validated."""

import pytest

from ichd_ray.config.job import ConfigError
from ichd_ray.io import storage
from ichd_ray.io.config_files import load_job_config, load_train_config, read_yaml_sections, storage_config


def test_yaml_file_and_flag_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("score:\n  num_actors: 3\n  cnn_chunk: 16\nindex:\n  files_per_task: 10\n")
    job = load_job_config(str(path), {"score": {"num_actors": 1, "device": None}})
    assert (job.score.num_actors, job.score.cnn_chunk, job.score.device) == (1, 16, "auto")
    assert job.index.files_per_task == 10
    path.write_text("score: [1, 2]\n")
    with pytest.raises(ConfigError, match="score: expected a mapping"):
        load_job_config(str(path))
    path.write_text("score: {num_actors: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_config(str(path))


def test_a_config_on_s3_reads_like_a_local_one(s3_bucket, tmp_path, monkeypatch):
    """`--config s3://...`: read with the standard AWS variables, the same config as the local copy."""
    bucket, config = s3_bucket
    text = "cnn:\n  epochs: 2\nsequence:\n  hidden: 8\n"
    uri = f"s3://{bucket}/configs/train.yaml"
    storage.write_bytes(uri, text.encode(), config)
    (tmp_path / "train.yaml").write_text(text)
    for name, value in (("AWS_ENDPOINT_URL", config.endpoint_url), ("AWS_REGION", "us-east-1"),
                        ("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    assert read_yaml_sections(uri) == {"cnn": {"epochs": 2}, "sequence": {"hidden": 8}}
    assert load_train_config("demo", uri) == load_train_config("demo", str(tmp_path / "train.yaml"))
    assert load_train_config("demo", uri).cnn.epochs == 2
    with pytest.raises(FileNotFoundError):
        load_job_config(str(tmp_path / "missing.yaml"))


def test_bytes_that_are_not_text_are_named():
    with pytest.raises(ConfigError, match="x.yaml: not valid YAML"):
        from ichd_ray.config.job import parse_yaml_sections

        parse_yaml_sections(b"\xff\xfe\x00bad", "x.yaml")


def test_the_storage_section_fills_the_rest_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    cfg = load_job_config(None, {"storage": {"endpoint_url": "http://127.0.0.1:9"}})
    sc = storage_config(cfg.storage)
    assert (sc.endpoint_url, sc.region) == ("http://127.0.0.1:9", "eu-west-1")
