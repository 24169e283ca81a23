"""Training building blocks without Ray: config, the slice sampler, sequence batches
(checkpoints: test_checkpoint.py; the lr schedule: test_schedule.py)."""

import hashlib
import json

import numpy as np
import pytest

from ichd_ray import CLASSES
from ichd_ray.training.augment import AugmentConfig
from ichd_ray.config.job import ConfigError
from ichd_ray.config.recipes import load_recipe
from ichd_ray.config.train import load_train_config
from ichd_ray.training.data import held_out_batches, sample_slices
from ichd_ray.training.sequence import _window, pad_studies


def test_yaml_overrides_and_errors_name_the_field(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("cnn:\n  epochs: 7\n  augment: {hflip_p: 0.0}\nsequence:\n  proj_dims: [64, 32]\n")
    cfg = load_train_config("demo", str(path), {"data": {"folds": 4}})
    assert (cfg.cnn.epochs, cfg.data.folds, cfg.sequence.proj_dims) == (7, 4, (64, 32))
    assert cfg.cnn.augment == AugmentConfig(hflip_p=0.0)  # resolved: the rest are the defaults
    assert cfg.cnn.backbone == load_recipe("demo").sections()["cnn"]["backbone"]  # the rest of the recipe stays
    for text, field in [
        ("cnn:\n  epochs: 0\n", "cnn.epochs"),
        ("cnn:\n  backbone: not_a_net\n", "cnn.backbone"),
        ("cnn:\n  augment: {rotate_deg: 500}\n", "cnn.augment"),
        ("data:\n  folds: 1\n", "data.folds"),
        ("sequence:\n  rnn: transformer\n", "sequence"),
        ("cnn:\n  epoch: 3\n", "unknown field"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_train_config("demo", str(path))
    with pytest.raises(ConfigError, match="recipe: expected one of"):
        load_train_config("huge")


def _write_cache(tmp_path, lengths, size=8):
    """Study i, slice j has every pixel = 10*i + j; its labels are one-hot (i + j) % 6."""
    uris, labels = [], []
    for i, n in enumerate(lengths):
        pixels = np.zeros((n, 3, size, size), np.uint8)
        for j in range(n):
            pixels[j] = 10 * i + j
            labels.append(np.eye(len(CLASSES), dtype=np.uint8)[(i + j) % 6])
        path = tmp_path / f"s{i}.u8"
        path.write_bytes(pixels.tobytes())
        uris.append(str(path))
    return uris, np.stack(labels)


def _sample(uris, lengths, labels, ids, seed=(0, 0, 0, 0), per_id=1, augment=None):
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    return sample_slices(
        {"id": np.asarray(ids)}, cache_uris=uris, lengths=lengths, label_offsets=offsets, labels=labels, size=8,
        augment=augment if augment is not None else AugmentConfig.none().to_dict(), seed=list(seed), samples_per_id=per_id,
        storage_config=None,
    )


def test_sampler_reads_the_right_slice_with_its_label(tmp_path):
    lengths = [2, 3, 5]
    uris, labels = _write_cache(tmp_path, lengths)
    out = _sample(uris, lengths, labels, np.arange(40), per_id=10)
    assert out["image"].shape == (400, 3, 8, 8) and out["image"].dtype == np.uint8
    values = out["image"][:, 0, 0, 0].astype(int)
    study, slice_ = values // 10, values % 10
    assert (slice_ < np.asarray(lengths)[study]).all()
    expected = np.eye(len(CLASSES))[(study + slice_) % 6]
    np.testing.assert_array_equal(out["label"], expected)
    # A study is drawn first, then a slice: each study gets about a third of the draws, whatever its length.
    counts = np.bincount(study, minlength=3) / 400
    assert np.all(np.abs(counts - 1 / 3) < 0.1)


def test_sampler_draws_depend_on_seed_and_id_only(tmp_path):
    """Same seed and step -> the same batch, however the ids are grouped into calls (so however Ray
    Data batches them or orders the tasks); another epoch (seed) or step -> other samples."""
    lengths = [4, 7, 5]
    uris, labels = _write_cache(tmp_path, lengths)
    augment = AugmentConfig().to_dict()  # the default augmentation: random flips, affine, intensity, erasing
    whole = _sample(uris, lengths, labels, [0, 1, 2, 3], seed=(0, 1, 2, 0), per_id=6, augment=augment)
    parts = [_sample(uris, lengths, labels, ids, seed=(0, 1, 2, 0), per_id=6, augment=augment) for ids in ([2, 3], [0], [1])]
    joined = {k: np.concatenate([parts[1][k], parts[2][k], parts[0][k]]) for k in whole}
    for k in whole:
        np.testing.assert_array_equal(whole[k], joined[k])
    again = _sample(uris, lengths, labels, [0, 1, 2, 3], seed=(0, 1, 2, 0), per_id=6, augment=augment)
    np.testing.assert_array_equal(whole["image"], again["image"])
    other_epoch = _sample(uris, lengths, labels, [0, 1, 2, 3], seed=(0, 1, 3, 0), per_id=6, augment=augment)
    assert not np.array_equal(whole["image"], other_epoch["image"])
    assert not np.array_equal(whole["image"][:6], whole["image"][6:12])  # each step its own draws


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

    from ichd_ray.training.keys import training_keys
    from ichd_ray.training.data import TrainingSet, cache_key
    from ichd_ray.dicom.windowing import DEFAULT_WINDOWS

    cfg = load_train_config("demo")
    ts = TrainingSet(pd.DataFrame({"fold": [0]}), [], "m" * 64, [])
    planned = training_keys(cfg, manifest_sha256=ts.manifest_sha256, folds_sha256="f" * 64)["cache"]
    assert cache_key(ts, cfg.data.input_size, [w.to_dict() for w in DEFAULT_WINDOWS]) == planned


def test_a_fold_is_done_only_under_its_own_key(tmp_path):
    import json

    from ichd_ray.training.cnn import cnn_weights_uri, finished_fold

    key, other = "a" * 64, "a" * 16 + "b" * 48  # same 16-digit prefix: the same file name
    uri = cnn_weights_uri(str(tmp_path), 0, key)
    assert uri.endswith(f"fold0-{'a' * 16}.safetensors") and uri == cnn_weights_uri(str(tmp_path), 0, other)
    assert finished_fold(uri, key, None) is None
    (tmp_path / "cnn").mkdir()
    open(uri, "wb").close()
    open(uri.replace(".safetensors", ".json"), "w").write(json.dumps({"key": key, "history": []}))
    assert finished_fold(uri, key, None)["key"] == key
    assert finished_fold(uri, other, None) is None


def test_sequence_shares_follow_study_order_not_arrival():
    from ichd_ray.training.sequence import _shares

    rows = [{"study_uid": u} for u in ["c", "a", "e", "b", "d"]]
    assert _shares(rows, 2, equal=True) == [0, 0, -1, 1, 1]  # a0 b1 c0 d1; e left out: equal steps
    assert _shares(rows, 2, equal=False) == [0, 0, 0, 1, 1]
    assert _shares(rows[::-1], 2, equal=True) == [1, 1, -1, 0, 0]  # the same per study
    assert _shares(rows, 1, equal=True) == [0] * 5


def test_held_out_batches_keep_study_and_slice_order_in_whole_studies(tmp_path):
    uris, labels = _write_cache(tmp_path, [2, 3, 4])
    studies = [{"cache_uri": u, "n": n, "labels": labels[a:a + n].tolist()} for u, n, a in zip(uris, [2, 3, 4], [0, 2, 5])]
    batches = list(held_out_batches(studies, size=8, storage_config=None, max_slices=5))
    assert [b["image"][:, 0, 0, 0].tolist() for b in batches] == [[0, 1, 10, 11, 12], [20, 21, 22, 23]]
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)
    # a study longer than the limit is one batch of its own, never split
    assert [len(b["image"]) for b in held_out_batches(studies, size=8, storage_config=None, max_slices=1)] == [2, 3, 4]
    assert list(held_out_batches([], size=8, storage_config=None)) == []


def test_sequence_batches_pad_and_window():
    rng = np.random.default_rng(0)
    studies = []
    for n in (3, 5):
        studies.append({
            "emb": rng.standard_normal((n, 4)).astype(np.float16),
            "logits": rng.standard_normal((n, 6)).astype(np.float32),
            "positions": np.arange(n) * 5.0,
            "labels": (np.arange(n)[:, None] + np.arange(6)[None] == 4).astype(np.uint8),
        })
    emb, logits, dz, mask, y, study_y = pad_studies(studies)
    assert emb.shape == (2, 5, 4) and mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert dz[1].tolist() == [0, 5, 5, 5, 5] and dz[0, 3:].tolist() == [0, 0]
    np.testing.assert_array_equal(study_y.numpy(), np.stack([s["labels"].max(0) for s in studies]))
    window = _window(studies[1], 2, rng)
    assert len(window["emb"]) == 2
    start = int(np.where((studies[1]["emb"] == window["emb"][0]).all(axis=1))[0][0])
    np.testing.assert_array_equal(window["labels"], studies[1]["labels"][start : start + 2])
    assert _window(studies[0], 24, rng) is studies[0]  # shorter than the window: whole study
