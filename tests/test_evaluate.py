import datetime as dt
import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ichd_ray import CLASSES
from ichd_ray.evaluation import evaluate as ev
from ichd_ray.evaluation.evaluate import (
    evaluate,
    evaluate_predictions,
    format_table,
    read_predictions,
)
from ichd_ray.evaluation.labels import parse_labels
from ichd_ray.io.tables import (
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
    assert r["slice"]["n"] == 16 and r["study_max_of_slices"]["n"] == 4 and r["n_unlabelled"] == 0
    assert r["slice"]["weighted_log_loss"] < 1e-12
    assert r["study_max_of_slices"]["weighted_log_loss"] < 1e-12
    for level in ("slice", "study_max_of_slices"):
        for c in CLASSES:
            assert r[level]["per_class"][c]["auc"] == 1.0
            assert r[level]["per_class"][c]["sensitivity"] == 1.0
            assert r[level]["per_class"][c]["specificity"] == 1.0
    assert r["slice"]["per_class"]["any"]["positives"] == 6
    assert r["study_max_of_slices"]["per_class"]["any"]["positives"] == 3
    assert r["study_max_of_slices"]["per_class"]["epidural"]["positives"] == 1
    assert r["study_head"] is None  # no studies table given
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
    m = r["study_max_of_slices"]
    assert m["weighted_log_loss"] == pytest.approx(expected)
    assert m["per_class"]["any"]["auc"] == 1.0
    assert m["per_class"]["epidural"]["sensitivity"] == 1.0
    assert r["slice"]["per_class"]["epidural"]["auc"] == 0.0  # the slice-level call is on the wrong slice
    assert m["per_class"]["subdural"]["auc"] is None  # no positives: undefined, JSON null


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
    r = evaluate_predictions(slices, labels, slice_thresholds=[0.5] * 5 + [0.95])
    assert r["eth"]["f1"] == 0.0 and r["eth"]["threshold"] == 0.95
    # the ETH rule calls slices, so it runs at the slice `any` threshold, never the study head's
    r = evaluate_predictions(slices, labels, slice_thresholds=[0.5] * 6, study_thresholds=[0.5] * 5 + [0.95])
    assert r["eth"]["threshold"] == 0.5 and r["eth"]["f1"] == pytest.approx(2 / 3)


def test_unlabelled_slices_are_counted_and_excluded(case):
    slices, labels, y = case
    slices[P] = y
    extra = pd.DataFrame(
        {"study_uid": ["s2", "s9"], "series_uid": ["s2.1", "s9.1"], "sop_uid": ["7.7.7", "8.8.8"], "slice_index": [9, 0]}
    )
    extra[P] = 1.0  # maximally wrong if they were counted as negatives
    r = evaluate_predictions(pd.concat([slices, extra], ignore_index=True), labels)
    assert r["n_slices"] == 18 and r["n_unlabelled"] == 2
    assert r["slice"]["n"] == 16 and r["study_max_of_slices"]["n"] == 4  # s9 has no labelled slice at all
    assert r["slice"]["weighted_log_loss"] < 1e-12


def test_errors(case):
    slices, labels, _ = case
    with pytest.raises(ValueError, match="none of the 2 predicted slices has a label"):
        evaluate_predictions(slices.assign(sop_uid=["x"] * len(slices)).head(2), labels)
    with pytest.raises(ValueError, match="lack column"):
        evaluate_predictions(slices.drop(columns="p_any"), labels)
    with pytest.raises(ValueError, match="6 thresholds"):
        evaluate_predictions(slices, labels, slice_thresholds=[0.5])
    with pytest.raises(ValueError, match="6 thresholds"):
        evaluate_predictions(slices, labels, study_thresholds=[0.5] * 5 + [1.5])
    with pytest.raises(TypeError):  # one list for every level is what put study thresholds on slices
        evaluate_predictions(slices, labels, thresholds=[0.5] * 6)
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
    r["study_max_of_slices"]["per_class"]["epidural"]["auc"] = None
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


def study_rows(run_id: str, p_any: dict[str, float], flagged: dict[str, bool], model_version: str = "m1") -> pa.Table:
    """One studies row per study: every p_<class> of the study head = the given p, and its flagged."""
    rows = [
        {
            "run_id": run_id,
            "model_version": model_version,
            "study_uid": study,
            "series_uid": f"{study}.1",
            "n_slices": 3,
            **{c: p for c in P},
            "flagged": flagged[study],
        }
        for study, p in p_any.items()
    ]
    return pa.Table.from_pylist(rows, schema=STUDIES_SCHEMA)


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
    # a real run also writes its studies (the study head's p_* and flagged, here as by study thresholds
    # of 0.1) and (possibly empty) errors; a2's studies row is as invisible as its slices
    for run_id, attempt, p, flagged in (("r1", "a1", 0.3, True), ("r1", "a2", 0.95, False), ("r2", "b1", 0.6, True)):
        write_table(study_rows(run_id, {"st1": p}, {"st1": flagged}), out, "studies", run_id, attempt)
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
    result = evaluate(out, labels, str(target), run_id="r1", slice_thresholds=[0.1] * 6, study_thresholds=[0.5] * 6)
    assert result["run_id"] == "r1" and result["model_version"] == "m1"
    assert result["slice"]["n"] == 3 and result["n_unlabelled"] == 0
    # all labels 0, p = 0.2 everywhere: log loss -log(0.8) on every element
    assert result["slice"]["weighted_log_loss"] == pytest.approx(-math.log(0.8), rel=1e-6)
    assert result["slice"]["per_class"]["any"]["specificity"] == 0.0  # 0.2 >= 0.1 on every slice
    assert result["eth"]["fp"] == 1 and result["eth"]["f1"] == 0.0
    # the study head is the committed studies row of r1 (a1: p 0.3, flagged), never a2's (0.95)
    head = result["study_head"]
    assert head["n"] == 1 and head["n_unlabelled"] == 0
    assert head["weighted_log_loss"] == pytest.approx(-math.log(0.7), rel=1e-6)
    assert head["per_class"]["any"]["specificity"] == 1.0  # 0.3 < 0.5
    assert head["thresholds"]["values"] == {c: 0.5 for c in CLASSES}
    # flagged is scored as written (a false positive), and does not match thresholds of 0.5
    assert head["flagged"]["specificity"] == 0.0 and head["flagged"]["sensitivity"] is None
    assert head["flagged"]["fp"] == 1 and head["flagged"]["n_inconsistent"] == 1
    assert json.loads(target.read_text()) == result
    newest = evaluate(out, labels, None)
    assert newest["run_id"] == "r2"
    assert newest["study_head"]["weighted_log_loss"] == pytest.approx(-math.log(0.4), rel=1e-6)  # r2: p 0.6
    assert newest["study_head"]["flagged"]["fp"] == 1
    assert newest["study_head"]["flagged"]["n_inconsistent"] is None  # not checked against defaulted thresholds
    assert any("study thresholds defaulted to 0.5 (no bundle given)" in w for w in newest["warnings"])


def test_read_studies_only_sees_the_committed_attempt_of_the_run(out_dir):
    out, _ = out_dir
    slices, studies = ev.read_run(out, "r1")
    assert len(slices) == 3 and studies["study_uid"].tolist() == ["st1"]
    assert np.allclose(studies[P].to_numpy(), 0.3) and studies["flagged"].tolist() == [True]
    assert "attempt" not in studies.columns
    slices, studies = ev.read_run(out)
    assert (slices["run_id"] == "r2").all() and studies["run_id"].tolist() == ["r2"]


def test_a_labelled_study_without_a_studies_row_is_an_error(out_dir):
    out, labels = out_dir
    write_table(slice_rows("r4", ["1.2.3.1"], 0.2), out, "slices", "r4", "d1", part="part-0")
    write_table(STUDIES_SCHEMA.empty_table(), out, "studies", "r4", "d1")
    write_table(ERRORS_SCHEMA.empty_table(), out, "errors", "r4", "d1")
    commit_run(out, run_row("r4", "d1", finished_hour=14))
    with pytest.raises(ValueError, match=r"studies table has no row for 1 labelled stud.*'st1'"):
        evaluate(out, labels, None, run_id="r4")


# ---- thresholds: chosen where they are applied -------------------------------------------------


def studies_frame(p_any: dict[str, float], flagged: dict[str, bool], subtype: str = "subdural") -> pd.DataFrame:
    """A studies table: the study head's p_any and p_<subtype> as given, the other classes 0."""
    frame = pd.DataFrame({"study_uid": list(p_any)})
    frame[P] = 0.0
    frame["p_any"] = list(p_any.values())
    frame[f"p_{subtype}"] = list(p_any.values())
    frame["flagged"] = [flagged[s] for s in p_any]
    return frame


def test_slice_levels_use_slice_thresholds_and_the_study_head_the_study_thresholds():
    slices, labels, _ = make_case(
        {"a": [set(), {"epidural"}, {"epidural"}, {"epidural"}], "b": [set(), set(), set(), set()]}
    )
    slices["p_any"] = [0.1, 0.4, 0.4, 0.4, 0.3, 0.2, 0.1, 0.1]
    slice_t = [0.5] * 5 + [0.3]
    study_t = [0.5] * 5 + [0.6]
    studies = studies_frame({"a": 0.7, "b": 0.45}, {"a": True, "b": False}, subtype="epidural")
    r = evaluate_predictions(slices, labels, studies=studies, slice_thresholds=slice_t, study_thresholds=study_t)

    # slices at 0.3: a's 3 positives called (sens 3/3), b's first slice (0.3) a false positive (spec 4/5);
    # at the study threshold 0.6 they would be sens 0, spec 1
    assert r["slice"]["per_class"]["any"]["sensitivity"] == 1.0
    assert r["slice"]["per_class"]["any"]["specificity"] == pytest.approx(4 / 5)
    assert r["slice"]["thresholds"]["values"]["any"] == 0.3
    # max of slices (a 0.4, b 0.3) is a slice output: both >= 0.3
    m = r["study_max_of_slices"]["per_class"]["any"]
    assert (m["sensitivity"], m["specificity"]) == (1.0, 0.0)
    assert r["study_max_of_slices"]["thresholds"]["values"]["any"] == 0.3
    # ETH at 0.3: a has 3 consecutive (TP), b one (TN)
    assert (r["eth"]["tp"], r["eth"]["tn"], r["eth"]["f1"], r["eth"]["threshold"]) == (1, 1, 1.0, 0.3)
    # the study head (a 0.7, b 0.45) at 0.6: right; at 0.3 b would be a false positive
    head = r["study_head"]
    assert head["per_class"]["any"]["sensitivity"] == 1.0 and head["per_class"]["any"]["specificity"] == 1.0
    assert head["thresholds"]["values"]["any"] == 0.6
    assert head["flagged"] | {"n_inconsistent": 0} == head["flagged"]  # flagged is any(p >= study thresholds)
    assert (head["flagged"]["tp"], head["flagged"]["tn"]) == (1, 1)

    # the same probabilities at the study thresholds everywhere (what `evaluate --model` did): slices
    # miss every epidural slice and look perfect on specificity
    same = evaluate_predictions(slices, labels, studies=studies, slice_thresholds=study_t, study_thresholds=study_t)
    assert same["slice"]["per_class"]["any"]["sensitivity"] == 0.0
    assert same["slice"]["per_class"]["any"]["specificity"] == 1.0
    assert same["eth"]["tp"] == 0


def test_study_head_perfect_while_max_of_slices_is_wrong_and_vice_versa():
    slices, labels, _ = make_case(
        {
            "a": [set(), {"subdural"}],
            "b": [set(), set()],
            "c": [{"subdural"}, set()],
            "d": [set(), set()],
        }
    )
    slices["p_any"] = slices["p_subdural"] = [0.1, 0.2, 0.9, 0.1, 0.3, 0.2, 0.1, 0.8]  # max: a .2 b .9 c .3 d .8
    studies = studies_frame({"a": 0.9, "b": 0.1, "c": 0.8, "d": 0.2}, {"a": True, "b": False, "c": True, "d": False})
    r = evaluate_predictions(slices, labels, studies=studies)
    for c in ("any", "subdural"):
        m, h = r["study_max_of_slices"]["per_class"][c], r["study_head"]["per_class"][c]
        assert (m["auc"], m["sensitivity"], m["specificity"]) == (0.0, 0.0, 0.0)
        assert (h["auc"], h["sensitivity"], h["specificity"]) == (1.0, 1.0, 1.0)
        assert h["positives"] == 2
    loss = -(2 * math.log(0.9) + 2 * math.log(0.8)) / 4  # per class, for any and subdural; the rest ~0
    assert r["study_head"]["per_class"]["any"]["log_loss"] == pytest.approx(loss)
    assert r["study_head"]["weighted_log_loss"] == pytest.approx(3 * loss / 7, rel=1e-9)
    assert r["study_head"]["n"] == 4 and r["study_head"]["flagged"]["sensitivity"] == 1.0
    assert r["study_head"]["flagged"]["specificity"] == 1.0

    slices["p_any"] = slices["p_subdural"] = [0.1, 0.9, 0.1, 0.2, 0.8, 0.1, 0.3, 0.1]  # max: a .9 b .2 c .8 d .3
    studies = studies_frame({"a": 0.1, "b": 0.9, "c": 0.2, "d": 0.8}, {"a": False, "b": True, "c": False, "d": True})
    r = evaluate_predictions(slices, labels, studies=studies)
    m, h = r["study_max_of_slices"]["per_class"]["any"], r["study_head"]["per_class"]["any"]
    assert (m["auc"], m["sensitivity"], m["specificity"]) == (1.0, 1.0, 1.0)
    assert (h["auc"], h["sensitivity"], h["specificity"]) == (0.0, 0.0, 0.0)
    f = r["study_head"]["flagged"]
    assert (f["tp"], f["fp"], f["fn"], f["tn"], f["sensitivity"], f["specificity"]) == (0, 2, 2, 0, 0.0, 0.0)


def test_flagged_is_scored_as_written_and_checked_against_the_thresholds():
    slices, labels, _ = make_case({"a": [{"subdural"}], "b": [set()], "c": [set()]})
    # c's flag disagrees with its p (0.2 < 0.5 on every class): scored as written, counted, warned about
    studies = studies_frame({"a": 0.9, "b": 0.1, "c": 0.2}, {"a": True, "b": False, "c": True})
    r = evaluate_predictions(slices, labels, studies=studies, study_thresholds=[0.5] * 6)
    f = r["study_head"]["flagged"]
    assert (f["tp"], f["fp"], f["fn"], f["tn"]) == (1, 1, 0, 1)
    assert f["specificity"] == 0.5 and f["n_inconsistent"] == 1
    assert [w for w in r["warnings"] if "flagged" in w] == [
        "flagged disagrees with any(p_<class> >= study threshold) in 1 of 3 studies: "
        "the run was scored with other thresholds than given"
    ]
    # against thresholds no one chose (0.5 by default) there is nothing to check
    assert evaluate_predictions(slices, labels, studies=studies)["study_head"]["flagged"]["n_inconsistent"] is None
    # a studies row without labelled slices is left out and counted; duplicates and bad p are refused
    extra = studies_frame({"zz": 0.5}, {"zz": False})
    r = evaluate_predictions(slices, labels, studies=pd.concat([studies, extra], ignore_index=True))
    assert r["study_head"]["n"] == 3 and r["study_head"]["n_unlabelled"] == 1
    with pytest.raises(ValueError, match="more than one studies row.*'a'"):
        evaluate_predictions(slices, labels, studies=pd.concat([studies, studies.head(1)], ignore_index=True))
    with pytest.raises(ValueError, match=r"studies.*\[0, 1\]"):
        evaluate_predictions(slices, labels, studies=studies.assign(p_any=np.nan))
    with pytest.raises(ValueError, match="studies lack column.*flagged"):
        evaluate_predictions(slices, labels, studies=studies.drop(columns="flagged"))


def _write_bundle(path, thresholds: dict, slice_thresholds: dict | None, version_id: str = "m1") -> str:
    from ichd_ray.models.bundle import BundleConfig

    extra = {} if slice_thresholds is None else {"slice_thresholds": slice_thresholds}
    config = BundleConfig(
        backbone="test_resnet", embed_dim=96, folds=1, version_id=version_id, thresholds=thresholds,
        weights={"cnn_fold0.safetensors": "0" * 64, "seq_fold0.safetensors": "0" * 64}, **extra,
    )
    path.mkdir()
    (path / "config.json").write_bytes(config.to_json())
    return str(path)


def test_evaluate_with_an_old_bundle_defaults_slice_thresholds_loudly(out_dir, tmp_path):
    out, labels = out_dir
    # An old bundle: only the study head's thresholds (0.1 each), no slice_thresholds.
    bundle = _write_bundle(tmp_path / "old", {c: 0.1 for c in CLASSES}, None)
    result = evaluate(out, labels, None, run_id="r1", model=bundle)
    # slices (p 0.2, all negative) at the 0.5 default, not at the study threshold 0.1 (which gives spec 0)
    assert result["slice"]["per_class"]["any"]["specificity"] == 1.0
    assert result["eth"]["fp"] == 0 and result["eth"]["threshold"] == 0.5
    t = result["thresholds"]
    assert t["slice"]["defaulted"] is True and "no slice_thresholds" in t["slice"]["source"]
    assert t["study"]["defaulted"] is False and "m1" in t["study"]["source"] and "thresholds" in t["study"]["source"]
    assert result["slice"]["thresholds"] == t["slice"] and result["study_head"]["thresholds"] == t["study"]
    # the study head (p 0.3) at its own thresholds (0.1): a false positive, as `flagged` is
    assert result["study_head"]["per_class"]["any"]["specificity"] == 0.0
    assert result["study_head"]["flagged"]["fp"] == 1 and result["study_head"]["flagged"]["n_inconsistent"] == 0
    assert result["bundle"] == {"uri": bundle, "version_id": "m1"}
    assert result["warnings"] == [
        "slice thresholds defaulted to 0.5 (bundle m1 has no slice_thresholds (trained before they were chosen); "
        "its study thresholds are not applied to slices)"
    ]
    text = format_table(result)
    assert "WARNING: slice thresholds defaulted to 0.5" in text

    # a bundle with both: each level at its own
    bundle = _write_bundle(tmp_path / "new", {c: 0.1 for c in CLASSES}, {c: 0.15 for c in CLASSES})
    result = evaluate(out, labels, None, run_id="r1", model=bundle)
    assert result["slice"]["per_class"]["any"]["specificity"] == 0.0 and result["eth"]["threshold"] == 0.15
    assert result["thresholds"]["slice"]["defaulted"] is False and "slice_thresholds" in result["thresholds"]["slice"]["source"]
    assert not result["warnings"]
    # an explicit override wins and says so
    result = evaluate(out, labels, None, run_id="r1", model=bundle, slice_thresholds=[0.25] * 6)
    assert result["slice"]["per_class"]["any"]["specificity"] == 1.0
    assert result["thresholds"]["slice"]["source"] == "given" and "m1" in result["thresholds"]["study"]["source"]
    # thresholds of a bundle that did not score the run: applied as asked, with a warning
    other = _write_bundle(tmp_path / "other", {c: 0.1 for c in CLASSES}, {c: 0.15 for c in CLASSES}, version_id="m2")
    result = evaluate(out, labels, None, run_id="r1", model=other)
    assert result["warnings"] == ["the run was scored by model m1, but the thresholds are bundle m2's"]


def test_evaluate_cli_applies_slice_thresholds_to_slices(out_dir, tmp_path, capsys):
    """`ichd-ray evaluate --model` with a bundle that only has study thresholds: slices at 0.5."""
    from ichd_ray.cli import main

    out, labels = out_dir
    bundle = _write_bundle(tmp_path / "old", {c: 0.1 for c in CLASSES}, None)
    target = tmp_path / "r1.json"
    assert main(["evaluate", "--predictions", out, "--labels", labels, "--run-id", "r1", "--model", bundle, "--json", str(target)]) == 0
    text = capsys.readouterr().out
    result = json.loads(target.read_text())
    # p 0.2 on all-negative slices: specificity 1 at 0.5; 0 at the study threshold 0.1 (the bug)
    assert result["slice"]["per_class"]["any"]["specificity"] == 1.0
    assert result["study_head"]["per_class"]["any"]["specificity"] == 0.0
    assert "WARNING: slice thresholds defaulted to 0.5" in text
    assert result["thresholds"]["study"]["values"] == {c: 0.1 for c in CLASSES}


def test_format_table_shows_both_study_levels_and_threshold_sources():
    slices, labels, _ = make_case({"a": [set(), {"subdural"}], "b": [set(), set()]})
    slices["p_any"] = slices["p_subdural"] = [0.1, 0.6, 0.2, 0.1]
    studies = studies_frame({"a": 0.8, "b": 0.3}, {"a": True, "b": False})
    r = evaluate_predictions(slices, labels, studies=studies, slice_thresholds=[0.4] * 6, study_thresholds=[0.7] * 6)
    text = format_table(r)
    assert "studies: max slice" in text and "studies: study head" in text
    assert "slice thresholds: given" in text and "study thresholds: given" in text
    assert "flagged (any class >= its study threshold) vs study any: sens 1.000 spec 1.000" in text
    line = next(l for l in text.splitlines() if l.startswith("any "))
    assert line.split()[-2:] == ["0.40", "0.70"]  # slice and study threshold columns
    r = evaluate_predictions(slices, labels)
    assert "study head: not evaluated" in format_table(r)


def test_choose_run_thresholds_slices_on_slice_outputs_study_on_the_study_head():
    slices, labels, _ = make_case(
        {"a": [set(), {"subdural"}], "b": [set(), set()], "c": [{"subdural"}, set()], "d": [set(), set()]}
    )
    # slices: F1 1 for t in (0.2, 0.32] -> grid 0.25 or 0.30, the nearer 0.5 wins
    slices["p_any"] = slices["p_subdural"] = [0.2, 0.32, 0.1, 0.2, 0.34, 0.15, 0.05, 0.1]
    # study head: F1 1 for t in (0.65, 0.75] -> 0.70
    head = studies_frame({"a": 0.75, "b": 0.65, "c": 0.8, "d": 0.3}, {s: False for s in "abcd"}).set_index("study_uid")
    chosen = ev.choose_run_thresholds(slices, head[P], labels)
    assert chosen["slice"]["any"] == 0.3 and chosen["slice"]["subdural"] == 0.3
    assert chosen["study"]["any"] == 0.7 and chosen["study"]["subdural"] == 0.7
    assert chosen["slice"]["epidural"] == 0.5 and chosen["study"]["epidural"] == 0.5  # no positives: default
    assert list(chosen["slice"]) == list(CLASSES) and list(chosen["study"]) == list(CLASSES)
    with pytest.raises(ValueError, match="study head has no output for.*'d'"):
        ev.choose_run_thresholds(slices, head[P].drop(index="d"), labels)


def test_bundle_slice_thresholds_round_trip_and_old_bundles_load():
    from ichd_ray.models.bundle import BundleConfig, BundleError

    weights = {"cnn_fold0.safetensors": "0" * 64, "seq_fold0.safetensors": "0" * 64}
    config = BundleConfig(backbone="test_resnet", embed_dim=96, weights=weights, slice_thresholds={c: 0.2 for c in CLASSES})
    data = config.to_dict()
    assert data["slice_thresholds"] == {c: 0.2 for c in CLASSES}
    assert BundleConfig.from_dict(data) == config
    old = {k: v for k, v in data.items() if k != "slice_thresholds"}  # written before slice thresholds existed
    loaded = BundleConfig.from_dict(old)
    assert loaded.slice_thresholds is None and loaded.thresholds == config.thresholds
    assert "slice_thresholds" not in loaded.to_dict()  # an old bundle's config.json is unchanged
    with pytest.raises(BundleError, match=r"slice_thresholds: each must be in \(0, 1\), not so for \['any'\]"):
        BundleConfig(backbone="test_resnet", embed_dim=96, slice_thresholds={**{c: 0.2 for c in CLASSES}, "any": 1.0})
    with pytest.raises(BundleError, match=r"slice_thresholds: need one per class of .*: missing \['any'\]"):
        BundleConfig(backbone="test_resnet", embed_dim=96, slice_thresholds={c: 0.2 for c in CLASSES if c != "any"})
    with pytest.raises(BundleError, match=r"slice_thresholds: expected .*, got \[0.2, "):
        BundleConfig.from_dict({**data, "slice_thresholds": [0.2] * 6})
