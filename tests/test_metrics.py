import math

import numpy as np
import pytest
from sklearn.metrics import f1_score as sk_f1
from sklearn.metrics import log_loss, roc_auc_score

from ichd_ray.evaluation.metrics import (
    CLASS_WEIGHTS,
    choose_thresholds,
    confusion,
    consecutive_positive,
    f1_score,
    per_class_auc,
    sensitivity_specificity,
    study_labels,
    weighted_log_loss,
)


@pytest.fixture
def predictions():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 6)) < 0.2).astype(float)
    y[:, 5] = y[:, :5].max(axis=1)
    p = np.clip(0.7 * y + 0.3 * rng.random((200, 6)), 0, 1)
    p[0, 0] = 0.0  # exercises the clipping
    return y, p


def test_weighted_log_loss_matches_sklearn_on_clipped_probabilities(predictions):
    y, p = predictions
    clipped = np.clip(p, 1e-15, 1 - 1e-15)
    per_class = [log_loss(y[:, c], clipped[:, c], labels=[0, 1]) for c in range(6)]
    expected = float(np.dot(per_class, CLASS_WEIGHTS) / sum(CLASS_WEIGHTS))
    assert weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-12)


def test_weighted_log_loss_hand_value_and_any_counts_twice():
    y = np.array([[1, 0, 0, 0, 0, 1]], float)
    p = np.full((1, 6), 0.5)
    assert weighted_log_loss(y, p) == pytest.approx(math.log(2))
    p_any_wrong = p.copy()
    p_any_wrong[0, 5] = 0.25  # -log(0.25) on `any`, weight 2
    expected = (5 * math.log(2) + 2 * -math.log(0.25)) / 7
    assert weighted_log_loss(y, p_any_wrong) == pytest.approx(expected)
    with pytest.raises(ValueError, match="0 or 1"):
        weighted_log_loss(y * 0.5, p)


def test_auc_matches_sklearn_with_ties(predictions):
    y, p = predictions
    p = np.round(p, 1)  # many ties
    auc = per_class_auc(y, p)
    for c, name in enumerate(auc):
        assert auc[name] == pytest.approx(roc_auc_score(y[:, c], p[:, c]))
    assert math.isnan(per_class_auc(np.zeros((3, 6)), np.ones((3, 6)))["any"])


def test_sensitivity_specificity_hand_values():
    y = np.zeros((4, 6))
    y[:2, 5] = 1
    p = np.zeros((4, 6))
    p[:, 5] = [0.9, 0.4, 0.6, 0.1]
    out = sensitivity_specificity(y, p, [0.5] * 6)["any"]
    assert out == {"sensitivity": 0.5, "specificity": 0.5}


def test_confusion_of_binary_calls():
    out = confusion([1, 1, 1, 0, 0], [1, 0, 0, 1, 0])
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (1, 1, 2, 1)
    assert out["sensitivity"] == pytest.approx(1 / 3) and out["specificity"] == 0.5
    out = confusion([0, 0], [0, 1])
    assert math.isnan(out["sensitivity"]) and out["specificity"] == 0.5
    # the same counts sensitivity_specificity gives at a threshold
    y = np.array([[1.0], [1.0], [0.0], [0.0]])
    p = np.array([[0.9], [0.2], [0.6], [0.1]])
    by_threshold = sensitivity_specificity(y, p, [0.5], classes=["x"])["x"]
    out = confusion(y[:, 0], p[:, 0] >= 0.5)
    assert (out["sensitivity"], out["specificity"]) == (by_threshold["sensitivity"], by_threshold["specificity"])
    with pytest.raises(ValueError, match="same length"):
        confusion([1, 0], [1])


def test_study_level_and_eth_rule():
    labels = np.array([[0, 1], [1, 0], [0, 0], [0, 0]])
    ids, studies = study_labels(labels, np.array(["b", "a", "b", "a"]))
    assert ids.tolist() == ["a", "b"] and studies.tolist() == [[1, 0], [0, 1]]
    assert consecutive_positive([0, 1, 1, 1, 0])
    assert not consecutive_positive([1, 1, 0, 1, 1])
    assert consecutive_positive([1, 1], run=2)


def test_f1_and_thresholds(predictions):
    y, p = predictions
    assert f1_score(y[:, 5], p[:, 5] >= 0.5) == pytest.approx(sk_f1(y[:, 5], p[:, 5] >= 0.5))
    assert math.isnan(f1_score([0, 0], [0, 0]))
    thresholds = choose_thresholds(y, p)
    assert len(thresholds) == 6 and all(0 < t < 1 for t in thresholds)
    # the chosen threshold is at least as good as 0.5 on the data it was chosen on
    for c in range(6):
        assert f1_score(y[:, c], p[:, c] >= thresholds[c]) >= f1_score(y[:, c], p[:, c] >= 0.5)
    y[:, 0] = 0
    assert choose_thresholds(y, p)[0] == 0.5
