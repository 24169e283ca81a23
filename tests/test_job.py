"""ichd_ray.config.job: the scoring/nightly job config; strict types, errors that name the field."""

import pytest

from ichd_ray.config.job import ConfigError, JobConfig, from_dict


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


def test_int_for_float_is_a_float_and_bools_are_not_numbers():
    job = from_dict({"score": {"num_gpus_per_actor": 1}})
    assert job.score.num_gpus_per_actor == 1.0 and isinstance(job.score.num_gpus_per_actor, float)
    assert job.to_dict()["score"]["num_gpus_per_actor"] == 1.0
    with pytest.raises(ConfigError, match=r"score\.cpus_per_actor: expected a number, got True"):
        from_dict({"score": {"cpus_per_actor": True}})
