"""ichd_ray.training.keys: each stage is keyed by the fields it reads and its inputs' keys."""

from ichd_ray.io.config_files import load_train_config
from ichd_ray.training.augment import AugmentConfig


def test_training_keys_follow_the_fields_each_stage_reads():
    """A field changes the key of the stage that reads it and of every stage downstream, nothing
    upstream; resource fields change no key."""
    from ichd_ray.training.keys import training_keys

    def keys(overrides=None):
        k = training_keys(load_train_config("demo", None, overrides), manifest_sha256="m" * 64, folds_sha256="f" * 64)
        return {"cache": k["cache"].key, **{s: [x.key for x in k[s]] for s in ("cnn", "embeddings", "sequence")}}

    def changed(a, b):
        return {s for s in a if a[s] != b[s]}

    base = keys()
    assert len(set(base["cnn"])) == 3  # one per fold
    assert changed(base, keys({"cnn": {"lr": 1e-2}})) == {"cnn", "embeddings", "sequence"}
    assert changed(base, keys({"cnn": {"augment": {"hflip_p": 0.0}}})) == {"cnn", "embeddings", "sequence"}
    assert changed(base, keys({"sequence": {"lr": 1e-2}})) == {"sequence"}
    assert changed(base, keys({"score": {"device": "cpu"}})) == {"embeddings", "sequence"}
    assert changed(base, keys({"data": {"input_size": 64}})) == {"cache", "cnn", "embeddings", "sequence"}
    resources = {"cnn": {"cpus_per_worker": 1.0, "torch_threads": 1, "max_failures": 0, "cpus_per_data_task": 1.0},
                 "sequence": {"cpus_per_worker": 1.0, "checkpoint_every": 2}, "data": {"studies_per_task": 2},
                 "score": {"num_actors": 2, "studies_per_batch": 2}}
    assert changed(base, keys(resources)) == set()
    # Resolved: the augmentation defaults spelled out are the defaults.
    assert keys({"cnn": {"augment": AugmentConfig().to_dict()}}) == base
    other = training_keys(load_train_config("demo"), manifest_sha256="m" * 64, folds_sha256="g" * 64)
    assert other["cache"].key == base["cache"] and other["cnn"][0].key != base["cnn"][0]


def test_the_cache_is_built_under_the_planned_key():
    """build_cache names its folder with the key the plan (and the bundle's provenance) records."""
    import pandas as pd

    from ichd_ray.dicom.windowing import DEFAULT_WINDOWS
    from ichd_ray.training.data import TrainingSet, cache_key
    from ichd_ray.training.keys import training_keys

    cfg = load_train_config("demo")
    ts = TrainingSet(pd.DataFrame({"fold": [0]}), [], "m" * 64, [])
    planned = training_keys(cfg, manifest_sha256=ts.manifest_sha256, folds_sha256="f" * 64)["cache"]
    assert cache_key(ts, cfg.data.input_size, [w.to_dict() for w in DEFAULT_WINDOWS]) == planned
