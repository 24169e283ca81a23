"""ichd_ray.training.data without Ray: the slice sampler and the held-out batches read from the cache."""

import numpy as np

from ichd_ray import CLASSES
from ichd_ray.training.augment import AugmentConfig
from ichd_ray.training.data import held_out_batches, sample_slices


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


def test_held_out_batches_keep_study_and_slice_order_in_whole_studies(tmp_path):
    uris, labels = _write_cache(tmp_path, [2, 3, 4])
    studies = [{"cache_uri": u, "n": n, "labels": labels[a:a + n].tolist()} for u, n, a in zip(uris, [2, 3, 4], [0, 2, 5])]
    batches = list(held_out_batches(studies, size=8, storage_config=None, max_slices=5))
    assert [b["image"][:, 0, 0, 0].tolist() for b in batches] == [[0, 1, 10, 11, 12], [20, 21, 22, 23]]
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)
    # a study longer than the limit is one batch of its own, never split
    assert [len(b["image"]) for b in held_out_batches(studies, size=8, storage_config=None, max_slices=1)] == [2, 3, 4]
    assert list(held_out_batches([], size=8, storage_config=None)) == []
