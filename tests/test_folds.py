"""Folds: grouped by patient, stratified on `any`, deterministic, independent of input order."""

import numpy as np
import pandas as pd
import pytest

from ichd_ray.training.folds import assign_folds, assignment_sha256


def _studies(n_patients=30, per_patient=2, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for s in range(per_patient):
            rows.append({"study_uid": f"1.2.{p}.{s}", "patient_hash": f"h{p:03d}", "any": int(rng.random() < 0.4)})
    return pd.DataFrame(rows)


def test_patients_never_span_folds_and_every_fold_has_positives():
    studies = _studies()
    fold = assign_folds(studies, 5, seed=1)
    assert sorted(fold.unique()) == [0, 1, 2, 3, 4]
    joined = studies.set_index("study_uid").join(fold)
    assert (joined.groupby("patient_hash")["fold"].nunique() == 1).all()
    positives = joined.groupby("fold")["any"].sum()
    assert (positives > 0).all()
    # Stratified: each fold's positive rate within 0.2 of the overall one (30 patients, 12 studies per fold).
    assert (joined.groupby("fold")["any"].mean() - joined["any"].mean()).abs().max() < 0.2


def test_deterministic_and_order_independent():
    studies = _studies()
    a = assign_folds(studies, 3, seed=7)
    b = assign_folds(studies.sample(frac=1.0, random_state=3), 3, seed=7)
    pd.testing.assert_series_equal(a.sort_index(), b.sort_index())
    c = assign_folds(studies, 3, seed=8)
    assert not a.sort_index().equals(c.sort_index())


def test_missing_patient_is_its_own_group_and_single_class_works():
    studies = pd.DataFrame({"study_uid": ["a", "b", "c", "d"], "patient_hash": [None, None, "p", "p"], "any": [0, 0, 0, 0]})
    fold = assign_folds(studies, 2)
    assert fold["c"] == fold["d"]
    assert set(fold) == {0, 1}


@pytest.mark.parametrize(
    "table, folds, message",
    [
        (pd.DataFrame({"study_uid": ["a"], "any": [0]}), 2, "patient_hash"),
        (_studies(n_patients=2), 3, "at least 3 patients"),
        (_studies(), 1, "folds must be"),
        (pd.DataFrame({"study_uid": ["a", "a"], "patient_hash": ["p", "q"], "any": [0, 1]}), 2, "more than once"),
    ],
)
def test_errors(table, folds, message):
    with pytest.raises(ValueError, match=message):
        assign_folds(table, folds)


def test_assignment_hash_names_the_split_not_its_order():
    fold = assign_folds(_studies(), 3, seed=7)
    digest = assignment_sha256(fold.to_dict())
    assert len(digest) == 64 and digest == assignment_sha256(dict(reversed(list(fold.to_dict().items()))))
    moved = fold.copy()
    moved.iloc[0] = (moved.iloc[0] + 1) % 3
    assert assignment_sha256(moved.to_dict()) != digest
