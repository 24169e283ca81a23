"""The reason table: every code mapped to fault / selection / skip; the failed-run rule counts faults."""

import re
from pathlib import Path

import pytest

from ichd_ray.dicom.read import REJECT_REASONS
from ichd_ray.reasons import ALL_REASONS, OUTCOMES, REASON_CLASS, count_outcomes, reason_class
from ichd_ray.pipeline.score import run_problems


def test_every_reason_code_is_mapped_exactly_once():
    assert set(REASON_CLASS) == set(ALL_REASONS)
    assert len(ALL_REASONS) == len(set(ALL_REASONS))
    assert set(REASON_CLASS.values()) <= set(OUTCOMES)


def test_classes_of_the_codes_that_matter():
    assert reason_class("other_series") == reason_class("duplicate") == reason_class("localizer") == "selection"
    assert reason_class("not_ct") == "selection"
    assert reason_class("truncated") == reason_class("read_error") == reason_class("bad_header") == "fault"
    assert reason_class("excluded") == "skip"
    with pytest.raises(ValueError, match="unknown reason code 'nope'"):
        reason_class("nope")
    assert count_outcomes(["other_series", "truncated", "excluded", "duplicate"]) == {"fault": 1, "selection": 2, "skip": 1}
    assert count_outcomes([]) == {"fault": 0, "selection": 0, "skip": 0}


def _errors(*reasons):
    return [{"uri": f"u{i}", "stage": "index", "reason": r, "message": ""} for i, r in enumerate(reasons)]


def test_a_study_with_other_series_and_scouts_is_not_a_failed_run():
    # 40 slices scored, 60 objects selected out on purpose (thin series, scout), 2 side files
    errors = _errors(*(["other_series"] * 58 + ["localizer"] * 2 + ["excluded"] * 2))
    assert run_problems(102, 40, errors, max_reject_fraction=0.05) == []


def test_faults_over_the_limit_fail_the_run_and_say_so():
    errors = _errors(*(["other_series"] * 50 + ["truncated"] * 4 + ["read_error"] * 2))
    problems = run_problems(100, 44, errors, max_reject_fraction=0.05)
    assert len(problems) == 1
    assert "6 faults of 100 inputs (6.0%) > max 5.0%" in problems[0]
    assert "truncated 4" in problems[0] and "other_series" not in problems[0]
    assert run_problems(100, 44, errors, max_reject_fraction=0.06) == []


def test_readme_shows_the_table_as_it_is():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (fault|selection|skip) \|", section, flags=re.M)
    assert dict(rows) == REASON_CLASS and len(rows) == len(REASON_CLASS)
    # the DICOM reader's reasons in the order it checks them
    assert [code for code, _ in rows if code in REJECT_REASONS] == list(REJECT_REASONS)
