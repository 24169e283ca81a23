"""ichd_ray.training.sequence without Ray: rank shares in study order, padded batches and windows."""

import numpy as np

from ichd_ray.training.sequence import _window, pad_studies


def test_sequence_shares_follow_study_order_not_arrival():
    from ichd_ray.training.sequence import _shares

    rows = [{"study_uid": u} for u in ["c", "a", "e", "b", "d"]]
    assert _shares(rows, 2, equal=True) == [0, 0, -1, 1, 1]  # a0 b1 c0 d1; e left out: equal steps
    assert _shares(rows, 2, equal=False) == [0, 0, 0, 1, 1]
    assert _shares(rows[::-1], 2, equal=True) == [1, 1, -1, 0, 0]  # the same per study
    assert _shares(rows, 1, equal=True) == [0] * 5


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
