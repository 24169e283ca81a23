import pytest

from ichd_ray.config.job import ConfigError, JobConfig, from_dict, load_job_config


def test_defaults_validate_and_hash_stably():
    a, b = JobConfig().validate(), from_dict({})
    assert a == b and a.sha256() == b.sha256()
    assert from_dict({"score": {"num_actors": 2}}).sha256() != a.sha256()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"score": {"device": "tpu"}}, "score.device: expected one of ['auto', 'cpu', 'cuda'], got 'tpu'"),
        ({"scor": {}}, "config: unknown field(s) ['scor']"),
        ({"score": {"num_actor": 1}}, "score: unknown field(s) ['num_actor']; allowed:"),
        ({"score": {"num_actors": 0}}, "score.num_actors: expected an integer >= 1, got 0"),
        ({"score": {"num_actors": "2"}}, "score.num_actors: expected an integer, got '2'"),
        ({"score": {"write_embeddings": "yes"}}, "score.write_embeddings: expected true or false"),
        ({"index": {"exclude_suffixes": ".csv"}}, "index.exclude_suffixes: expected a list of strings"),
        ({"storage": {"endpoint_url": "127.0.0.1:9000"}}, "storage.endpoint_url: expected an http:// or https:// URL"),
        ({"score": {"cpus_per_actor": 0}}, "score.cpus_per_actor: expected a number > 0"),
    ],
)
def test_bad_fields_name_themselves(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert message in str(info.value)


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


def test_docs_config_md_is_generated_from_the_models():
    """docs/config.md is the models' own reference: regenerate it with
    ``python -m ichd_ray.config.reference > docs/config.md`` when a field changes."""
    from pathlib import Path

    from ichd_ray.config.reference import markdown_reference

    path = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert path.read_text() == markdown_reference()
    # every field appears with its default
    assert "| `score.num_actors` | `1` | >= 1 |" in path.read_text()
    assert "| `cnn.augment.hflip_p` | `0.5` |" in path.read_text()


def test_int_for_float_is_a_float_and_bools_are_not_numbers():
    job = from_dict({"score": {"num_gpus_per_actor": 1}})
    assert job.score.num_gpus_per_actor == 1.0 and isinstance(job.score.num_gpus_per_actor, float)
    assert job.to_dict()["score"]["num_gpus_per_actor"] == 1.0
    with pytest.raises(ConfigError, match=r"score\.cpus_per_actor: expected a number, got True"):
        from_dict({"score": {"cpus_per_actor": True}})
