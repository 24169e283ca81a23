import datetime as dt
import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ichd_ray import CLASSES
from ichd_ray.evaluate import (
    evaluate,
    evaluate_predictions,
    format_table,
    read_predictions,
)
from ichd_ray.labels import parse_labels
from ichd_ray.outputs import (
    ERRORS_SCHEMA,
    SLICES_SCHEMA,
    STUDIES_SCHEMA,
    commit_run,
    write_table,
)

P = [f"p_{c}" for c in CLASSES]


def make_case(study_slices: dict[str, list[set[str]]]) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Slices (probabilities 0) and RSNA labels for studies given as the positive subtypes per slice."""
    records, lines, truth = [], ["ID,Label"], []
    for study, slices in study_slices.items():
        for i, positives in enumerate(slices):
            sop = f"1.2.{study}.{i}"
            y = [int(c in positives) for c in CLASSES[:5]]
            y.append(max(y))
            truth.append(y)
            lines += [f"ID_{sop}_{c},{v}" for c, v in zip(CLASSES, y)]
            records.append({"study_uid": study, "series_uid": f"{study}.1", "sop_uid": sop, "slice_index": i})
    frame = pd.DataFrame(records)
    frame[P] = 0.0
    return frame, parse_labels("\n".join(lines)), np.array(truth, dtype=float)


@pytest.fixture
def case():
    return make_case(
        {
            "s1": [set(), {"subdural"}, {"subdural"}, {"subdural", "epidural"}, set()],
            "s2": [set(), set(), set(), set()],
            "s3": [set(), {"intraparenchymal"}, {"intraparenchymal", "intraventricular"}, set()],
            "s4": [{"subarachnoid"}, set(), set()],
        }
    )


def test_perfect_predictions(case):
    slices, labels, y = case
    slices[P] = y
    r = evaluate_predictions(slices, labels)
    assert r["slice"]["n"] == 16 and r["study"]["n"] == 4 and r["n_unlabelled"] == 0
    assert r["slice"]["weighted_log_loss"] < 1e-12
    assert r["study"]["weighted_log_loss"] < 1e-12
    for level in ("slice", "study"):
        for c in CLASSES:
            assert r[level]["per_class"][c]["auc"] == 1.0
            assert r[level]["per_class"][c]["sensitivity"] == 1.0
            assert r[level]["per_class"][c]["specificity"] == 1.0
    assert r["slice"]["per_class"]["any"]["positives"] == 6
    assert r["study"]["per_class"]["any"]["positives"] == 3
    assert r["study"]["per_class"]["epidural"]["positives"] == 1
    json.dumps(r, allow_nan=False)  # plain JSON


def test_constant_prevalence_log_loss_by_hand(case):
    slices, labels, y = case
    prevalence = y.mean(axis=0)
    slices[P] = prevalence
    r = evaluate_predictions(slices, labels)
    # per class: binary entropy of the prevalence; weights 1,1,1,1,1,2 over 7
    entropy = [-(q * math.log(q) + (1 - q) * math.log(1 - q)) for q in prevalence]
    expected = (sum(entropy[:5]) + 2 * entropy[5]) / 7
    assert r["slice"]["weighted_log_loss"] == pytest.approx(expected, rel=1e-9)
    assert r["slice"]["per_class"]["subdural"]["log_loss"] == pytest.approx(entropy[4], rel=1e-9)
    assert prevalence[5] == 6 / 16  # any: 6 of 16 slices positive
    assert all(r["slice"]["per_class"][c]["auc"] == 0.5 for c in CLASSES)  # all ties


def test_study_level_takes_max_over_slices():
    slices, labels, _ = make_case({"a": [set(), {"epidural"}], "b": [set(), set()]})
    slices["p_any"] = [0.1, 0.8, 0.3, 0.2]
    slices["p_epidural"] = [0.7, 0.1, 0.2, 0.2]
    r = evaluate_predictions(slices, labels)
    # study any: a -> 0.8 (positive), b -> 0.3 (negative); epidural: a -> 0.7, b -> 0.2
    p_study = np.array([[0.7, 0, 0, 0, 0, 0.8], [0.2, 0, 0, 0, 0, 0.3]])
    y_study = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], float)
    clipped = np.clip(p_study, 1e-15, 1 - 1e-15)
    per = -(y_study * np.log(clipped) + (1 - y_study) * np.log(1 - clipped))
    expected = float((per * [1, 1, 1, 1, 1, 2]).sum() / (2 * 7))
    assert r["study"]["weighted_log_loss"] == pytest.approx(expected)
    assert r["study"]["per_class"]["any"]["auc"] == 1.0
    assert r["study"]["per_class"]["epidural"]["sensitivity"] == 1.0
    assert r["slice"]["per_class"]["epidural"]["auc"] == 0.0  # the slice-level call is on the wrong slice
    assert r["study"]["per_class"]["subdural"]["auc"] is None  # no positives: undefined, JSON null


def test_eth_rule_needs_three_consecutive_slices():
    slices, labels, _ = make_case(
        {
            "two": [set(), {"subdural"}, {"subdural"}, set(), set(), set()],
            "three": [set(), {"subdural"}, {"subdural"}, {"subdural"}, set(), set()],
            "gap": [set(), set(), set(), set(), set(), set()],
        }
    )
    p_any = {
        "two": [0.1, 0.9, 0.9, 0.1, 0.1, 0.1],  # 2 in a row: not called
        "three": [0.1, 0.9, 0.9, 0.9, 0.1, 0.1],  # 3 in a row: called
        "gap": [0.9, 0.9, 0.1, 0.9, 0.9, 0.1],  # 4 positives but never 3 consecutive: not called
    }
    slices["p_any"] = np.concatenate([p_any[s] for s in ("two", "three", "gap")])
    r = evaluate_predictions(slices.sample(frac=1.0, random_state=0), labels)  # order comes from slice_index
    eth = r["eth"]
    assert (eth["tp"], eth["fp"], eth["fn"], eth["tn"]) == (1, 0, 1, 1)
    assert eth["f1"] == pytest.approx(2 / 3)
    assert eth["n"] == 3 and eth["min_consecutive"] == 3 and eth["threshold"] == 0.5
    # at a threshold above the scores nothing is called: F1 0 (there are positives to find)
    r = evaluate_predictions(slices, labels, thresholds=[0.5] * 5 + [0.95])
    assert r["eth"]["f1"] == 0.0 and r["eth"]["threshold"] == 0.95


def test_unlabelled_slices_are_counted_and_excluded(case):
    slices, labels, y = case
    slices[P] = y
    extra = pd.DataFrame(
        {"study_uid": ["s2", "s9"], "series_uid": ["s2.1", "s9.1"], "sop_uid": ["7.7.7", "8.8.8"], "slice_index": [9, 0]}
    )
    extra[P] = 1.0  # maximally wrong if they were counted as negatives
    r = evaluate_predictions(pd.concat([slices, extra], ignore_index=True), labels)
    assert r["n_slices"] == 18 and r["n_unlabelled"] == 2
    assert r["slice"]["n"] == 16 and r["study"]["n"] == 4  # s9 has no labelled slice at all
    assert r["slice"]["weighted_log_loss"] < 1e-12


def test_errors(case):
    slices, labels, _ = case
    with pytest.raises(ValueError, match="none of the 2 predicted slices has a label"):
        evaluate_predictions(slices.assign(sop_uid=["x"] * len(slices)).head(2), labels)
    with pytest.raises(ValueError, match="lack column"):
        evaluate_predictions(slices.drop(columns="p_any"), labels)
    with pytest.raises(ValueError, match="6 thresholds"):
        evaluate_predictions(slices, labels, thresholds=[0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_predictions(slices.assign(p_any=np.nan), labels)


def test_format_table_lists_every_class(case):
    slices, labels, y = case
    slices[P] = np.clip(y * 0.8 + 0.1, 0, 1)
    r = evaluate_predictions(slices, labels)
    text = format_table(r)
    lines = text.splitlines()
    for c in CLASSES:
        assert any(line.startswith(c) for line in lines)
    assert "weighted log loss" in text and "ETH patient level" in text
    # s3 (2 positive slices) and s4 (1) are missed by the 3-consecutive rule: TP 1, FN 2
    assert "F1 0.500  (TP 1, FP 0, FN 2, TN 1)" in text
    assert "unlabelled" in text
    r["study"]["per_class"]["epidural"]["auc"] = None
    assert format_table(r)  # undefined values print as '-'


# ---- reading a committed run ------------------------------------------------------------------


def slice_rows(run_id: str, sops: list[str], p: float) -> pa.Table:
    rows = [
        {
            "run_id": run_id,
            "model_version": "m1",
            "study_uid": "st1",
            "series_uid": "se1",
            "sop_uid": sop,
            "uri": f"/data/{sop}.dcm",
            "slice_index": i,
            "position_z": float(5 * i),
            **{c: p for c in P},
        }
        for i, sop in enumerate(sops)
    ]
    return pa.Table.from_pylist(rows, schema=SLICES_SCHEMA)


def run_row(run_id: str, attempt: str, finished_hour: int) -> dict:
    t = dt.datetime(2026, 1, 1, finished_hour, tzinfo=dt.timezone.utc)
    return {
        "run_id": run_id,
        "attempt": attempt,
        "model_version": "m1",
        "bundle_uri": "/bundle",
        "bundle_sha256": "0" * 64,
        "code_version": "0.1.0",
        "config_sha256": "1" * 64,
        "config_json": "{}",
        "started_at": t - dt.timedelta(minutes=5),
        "finished_at": t,
        "status": "succeeded",
        "n_inputs": 3,
        "n_slices_scored": 3,
        "n_rejected": 0,
        "n_studies": 1,
        "slices_per_s": 1.0,
    }


@pytest.fixture
def out_dir(tmp_path):
    out = str(tmp_path / "out")
    sops = ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    # r1: the committed attempt a1, plus an in-flight attempt a2 that must stay invisible
    write_table(slice_rows("r1", sops, 0.2), out, "slices", "r1", "a1", part="part-0")
    write_table(slice_rows("r1", sops, 0.9), out, "slices", "r1", "a2", part="part-0")
    commit_run(out, run_row("r1", "a1", finished_hour=10))
    # r2: committed later, with other scores
    write_table(slice_rows("r2", sops[::-1], 0.7), out, "slices", "r2", "b1", part="part-0")
    commit_run(out, run_row("r2", "b1", finished_hour=12))
    # r3: written but never committed
    write_table(slice_rows("r3", sops, 0.5), out, "slices", "r3", "c1", part="part-0")
    # a real run also writes (possibly empty) studies and errors tables; the views need them
    for run_id, attempt in (("r1", "a1"), ("r2", "b1")):
        write_table(STUDIES_SCHEMA.empty_table(), out, "studies", run_id, attempt)
        write_table(ERRORS_SCHEMA.empty_table(), out, "errors", run_id, attempt)
    labels = tmp_path / "labels.csv"
    lines = ["ID,Label"] + [f"ID_{s}_{c},0" for s in sops for c in CLASSES]
    labels.write_text("\n".join(lines) + "\n")
    return out, str(labels)


def test_read_predictions_only_sees_the_committed_attempt(out_dir):
    out, _ = out_dir
    r1 = read_predictions(out, "r1")
    assert len(r1) == 3
    assert (r1["run_id"] == "r1").all()
    assert np.allclose(r1[P].to_numpy(), 0.2)  # a1, never the uncommitted a2 (0.9)
    assert r1["slice_index"].tolist() == [0, 1, 2]
    assert {"study_uid", "sop_uid", "series_uid", "uri", "position_z", "model_version"} <= set(r1.columns)
    assert "attempt" not in r1.columns

    newest = read_predictions(out)  # r2 finished last
    assert (newest["run_id"] == "r2").all() and np.allclose(newest["p_any"], 0.7)

    with pytest.raises(FileNotFoundError, match="no committed run 'r3'"):
        read_predictions(out, "r3")  # data written, never committed


def test_read_predictions_without_any_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing committed there"):
        read_predictions(str(tmp_path))


def test_evaluate_end_to_end_writes_json(out_dir, tmp_path):
    out, labels = out_dir
    target = tmp_path / "eval" / "r1.json"
    result = evaluate(out, labels, str(target), run_id="r1", thresholds=[0.1] * 6)
    assert result["run_id"] == "r1" and result["model_version"] == "m1"
    assert result["slice"]["n"] == 3 and result["n_unlabelled"] == 0
    # all labels 0, p = 0.2 everywhere: log loss -log(0.8) on every element
    assert result["slice"]["weighted_log_loss"] == pytest.approx(-math.log(0.8), rel=1e-6)
    assert result["slice"]["per_class"]["any"]["specificity"] == 0.0  # 0.2 >= 0.1 on every slice
    assert result["eth"]["fp"] == 1 and result["eth"]["f1"] == 0.0
    assert json.loads(target.read_text()) == result
    assert evaluate(out, labels, None)["run_id"] == "r2"
