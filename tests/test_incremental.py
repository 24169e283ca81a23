"""ichd_ray.pipeline.incremental: the nightly table work in DuckDB gives, on random archives, exactly what
the pandas implementations it replaces gave (row for row, fingerprints byte for byte), plus the
documented rules on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import reference_nightly as ref
from ichd_ray.pipeline.incremental import LISTING_SCHEMA, diff_listing, plan_studies, select_series, study_fingerprints
from ichd_ray.pipeline.index import MANIFEST_SCHEMA
from ichd_ray.pipeline.nightly import INDEX_SCHEMA


def _headers(rng: np.random.Generator, n_studies: int) -> pd.DataFrame:
    """A random header table with every case the rule has: rejected headers, duplicate SOP UIDs, tilted
    series, several series per study with tied and unknown thicknesses, tied positions, missing ETags."""
    rows = []
    for s in range(n_studies):
        for k in range(int(rng.integers(1, 4))):
            thickness = rng.choice([1.0, 2.5, 5.0, 5.0, np.nan, 4.0, 6.0])
            normal_z = 1.0 if rng.random() > 0.1 else 0.5
            for i in range(int(rng.integers(1, 7))):
                sop = f"1.2.{s}.{k}.{i}" if rng.random() > 0.1 else f"1.2.{s}.0.0"  # some SOP UIDs repeat
                rows.append({
                    "uri": f"s3://b/arch/{rng.integers(1e9):09d}-{s}-{k}-{i}.dcm",
                    "size": int(rng.integers(1, 10**6)),
                    "mtime": float(np.round(1.7e9 + rng.random() * 1e6, int(rng.integers(0, 7)))) if rng.random() > 0.05 else None,
                    "etag": f"{rng.integers(1e12):x}" if rng.random() > 0.3 else None,
                    "study_uid": f"1.2.{s}", "series_uid": f"1.2.{s}.{k}", "sop_uid": sop,
                    "patient_hash": "h", "position": float(rng.choice([0.0, 5.0, 10.0, rng.random() * 100])),
                    "instance_number": int(rng.integers(0, 5)) if rng.random() > 0.2 else None,
                    "rows": 64, "cols": 64, "pixel_spacing": 0.5,
                    "slice_thickness": None if np.isnan(thickness) else float(thickness + (rng.random() < 0.2)),
                    "normal_z": normal_z, "image_type": "ORIGINAL", "transfer_syntax": "1.2.840.10008.1.2.1",
                    "reason": None if rng.random() > 0.15 else "bad_header",
                    "message": None, "selected": False, "slice_index": None,
                })
                if rows[-1]["reason"]:
                    rows[-1]["message"] = "bad"
    rows.append({**rows[0], "uri": "s3://b/arch/zz-no-study.dcm", "study_uid": None, "series_uid": None, "sop_uid": None,
                 "reason": "not_dicom", "message": "no"})
    return pd.DataFrame(rows)[MANIFEST_SCHEMA.names]


def _arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)


def _rows(table: pa.Table) -> list[dict]:
    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v
    return [{k: clean(v) for k, v in row.items()} for row in table.to_pylist()]


@pytest.mark.parametrize("seed", range(6))
def test_select_series_matches_the_pandas_rule(seed):
    headers = _headers(np.random.default_rng(seed), 40)
    want = _arrow(ref.select_series(headers, 5.0), MANIFEST_SCHEMA)
    got = select_series(_arrow(headers, MANIFEST_SCHEMA), 5.0)
    assert got.schema == MANIFEST_SCHEMA
    assert _rows(got) == _rows(want)
    assert {"duplicate", "other_series"} <= set(got.column("reason").to_pylist())  # the cases occurred


def _index(headers: pd.DataFrame, deleted_fraction: float, rng) -> pd.DataFrame:
    index = ref.select_series(headers, 5.0)
    index["deleted"] = rng.random(len(index)) < deleted_fraction
    index["run_id"] = "r0"
    return index[INDEX_SCHEMA.names]


@pytest.mark.parametrize("seed", range(4))
def test_fingerprints_and_plan_match_the_pandas_code(seed):
    rng = np.random.default_rng(100 + seed)
    index = _index(_headers(rng, 50), 0.1, rng)
    table = _arrow(index, INDEX_SCHEMA)
    want = ref.study_fingerprints(index)
    got = study_fingerprints(table)
    assert dict(zip(got.column("study_uid").to_pylist(), got.column("fingerprint").to_pylist())) == want.to_dict()

    studies = sorted(set(index.loc[index["selected"], "study_uid"]))
    fps = want.to_dict()
    # last scores: some studies never scored, some by another model, some at another fingerprint, one with no version
    scored = pd.DataFrame([{"study_uid": s, "model_version": rng.choice(["v1", "v1", "v0", None]),
                            "fingerprint": fps.get(s) if rng.random() > 0.3 else "old"} for s in studies if rng.random() > 0.2])
    for full in (False, True):
        expected = ref.plan_studies(index, scored, "v1", full=full)
        plan = plan_studies(table, pa.Table.from_pandas(scored, preserve_index=False), "v1", full=full)
        assert plan.to_pylist() == expected.to_dict("records")
    assert set(plan_studies(table, None, "v1").column("reason").to_pylist()) == {"new"}
    reasons = set(plan_studies(table, pa.Table.from_pandas(scored, preserve_index=False), "v1").column("reason").to_pylist())
    assert reasons == {"new", "model", "changed"}


@pytest.mark.parametrize("seed", range(4))
def test_diff_listing_matches_the_pandas_code(seed):
    rng = np.random.default_rng(200 + seed)
    index = _index(_headers(rng, 40), 0.05, rng)
    live = index[~index["deleted"]]
    listing = []
    for row in live.itertuples():
        roll = rng.random()
        if roll < 0.1:
            continue  # gone tonight
        entry = {"uri": row.uri, "size": row.size, "mtime": None if pd.isna(row.mtime) else row.mtime,
                 "etag": None if pd.isna(row.etag) else row.etag}
        if roll < 0.15:
            entry["etag"] = "changed" if entry["etag"] else None
            entry["size"] = row.size + (0 if entry["etag"] else 1)
        elif roll < 0.2:
            entry["mtime"] = None if entry["mtime"] is not None else 1.7e9  # known <-> unknown
        elif roll < 0.25 and entry["mtime"] is not None:
            entry["mtime"] = row.mtime + 5e-7  # within the tolerance: unchanged
        elif roll < 0.3 and entry["etag"]:
            entry["etag"] = None  # ETag lost: size + mtime decide
        listing.append(entry)
    listing += [{"uri": f"s3://b/new/{i}.dcm", "size": 10, "mtime": 1.8e9, "etag": None} for i in range(5)]
    listing += [{"uri": u, "size": 1, "mtime": 1.0, "etag": "back"} for u in index.loc[index["deleted"], "uri"][:3]]  # reappears
    rng.shuffle(listing)

    want_unchanged, want_read, want_deleted = ref.diff_listing(index, listing)
    unchanged, to_read, deleted = diff_listing(_arrow(index, INDEX_SCHEMA), pa.Table.from_pylist(listing, schema=LISTING_SCHEMA))
    assert _rows(unchanged) == _rows(_arrow(want_unchanged, INDEX_SCHEMA))
    assert _rows(to_read) == [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in e.items()} for e in want_read]
    assert _rows(deleted) == _rows(_arrow(want_deleted, INDEX_SCHEMA))
    assert unchanged.num_rows and to_read.num_rows and deleted.num_rows

    first_night = diff_listing(INDEX_SCHEMA.empty_table(), pa.Table.from_pylist(listing, schema=LISTING_SCHEMA))
    assert (first_night[0].num_rows, first_night[1].num_rows, first_night[2].num_rows) == (0, len(listing), 0)


def test_series_rule_on_a_hand_made_study():
    """Nearest 5 mm wins over more slices; the chosen series is numbered by position, ties by
    InstanceNumber; a tilted series and a duplicate SOP UID are named."""
    base = {c: None for c in MANIFEST_SCHEMA.names} | {"size": 1, "patient_hash": "h", "normal_z": 1.0, "selected": False}

    def row(uri, series, sop, thickness, position, instance=None, normal_z=1.0):
        return base | {"uri": uri, "study_uid": "S", "series_uid": series, "sop_uid": sop, "slice_thickness": thickness,
                       "position": position, "instance_number": instance, "normal_z": normal_z}

    rows = [row("a", "thin", "t1", 1.0, 0.0), row("b", "thin", "t2", 1.0, 1.0), row("c", "thin", "t3", 1.0, 2.0),
            row("d", "five", "f1", 5.0, 10.0), row("e", "five", "f2", 5.0, 5.0, instance=2), row("f", "five", "f3", 5.0, 5.0, instance=1),
            row("g", "five", "f1", 5.0, 15.0), row("h", "tilt", "x1", 5.0, 0.0, normal_z=0.5)]
    out = select_series(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)).to_pandas().set_index("uri")
    assert out.loc[["f", "e", "d"], "slice_index"].tolist() == [0, 1, 2] and out.loc[["d", "e", "f"], "selected"].all()
    assert out.loc["g", "reason"] == "duplicate" and out.loc["g", "message"] == "SOPInstanceUID also in d"
    assert out.loc["h", "reason"] == "other_series" and "not an axial series" in out.loc["h", "message"]
    assert set(out.loc[["a", "b", "c"], "reason"]) == {"other_series"}
    assert out.loc["a", "message"] == "study S scored with series five (rule: thickness nearest 5 mm, then most slices)"


def test_a_rejected_file_does_not_make_an_accepted_one_a_duplicate():
    """Only accepted objects take part in the duplicate rule. The pandas rule before issue 11 counted a
    rejected file too: the accepted slice sorted after it became "duplicate: SOPInstanceUID also in None"
    and its study lost a slice."""
    base = {c: None for c in MANIFEST_SCHEMA.names} | {"size": 1, "patient_hash": "h", "normal_z": 1.0, "selected": False,
                                                        "study_uid": "S", "series_uid": "A", "slice_thickness": 5.0}
    rows = [base | {"uri": "a-truncated.dcm", "sop_uid": "1", "reason": "truncated", "message": "cut short"},
            base | {"uri": "b.dcm", "sop_uid": "1", "position": 0.0}, base | {"uri": "c.dcm", "sop_uid": "2", "position": 5.0}]
    out = select_series(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)).to_pylist()
    assert [(r["uri"], r["reason"], r["selected"], r["slice_index"]) for r in out] == [
        ("a-truncated.dcm", "truncated", False, None), ("b.dcm", None, True, 0), ("c.dcm", None, True, 1)]


def test_diff_and_plan_on_a_hand_made_night():
    index = pa.Table.from_pylist([
        {"uri": "a", "size": 1, "mtime": 1.0, "etag": "x", "study_uid": "s1", "selected": True, "deleted": False},
        {"uri": "b", "size": 1, "mtime": 1.0, "etag": None, "study_uid": "s1", "selected": True, "deleted": False},
        {"uri": "c", "size": 1, "mtime": 1.0, "etag": "z", "study_uid": "s2", "selected": True, "deleted": False},
    ])
    listing = pa.Table.from_pylist([
        {"uri": "a", "size": 1, "mtime": 5.0, "etag": "x"},  # same etag: unchanged even though mtime moved
        {"uri": "b", "size": 2, "mtime": 1.0, "etag": None},  # no etag: size changed
        {"uri": "d", "size": 1, "mtime": 1.0, "etag": "w"},  # new
    ], schema=LISTING_SCHEMA)
    unchanged, to_read, deleted = diff_listing(index, listing)
    assert unchanged.column("uri").to_pylist() == ["a"]
    assert to_read.column("uri").to_pylist() == ["b", "d"]
    assert deleted.column("uri").to_pylist() == ["c"] and deleted.column("deleted").to_pylist() == [True]

    tonight = index.set_column(index.schema.get_field_index("deleted"), "deleted", pa.array([False, False, True]))
    scored = pa.Table.from_pylist([{"study_uid": "s1", "fingerprint": "old", "model_version": "m1"}])
    plan = plan_studies(tonight, scored, "m1")
    assert [(r["study_uid"], r["reason"]) for r in plan.to_pylist()] == [("s1", "changed")]  # s2 is gone: not planned
    assert plan_studies(tonight, scored, "m2").column("reason").to_pylist() == ["model"]
    assert plan_studies(tonight, None, "m1").column("reason").to_pylist() == ["new"]
    same = pa.Table.from_pylist([{"study_uid": "s1", "fingerprint": plan.column("fingerprint")[0].as_py(), "model_version": "m1"}])
    assert plan_studies(tonight, same, "m1").num_rows == 0
    assert plan_studies(tonight, same, "m1", full=True).column("reason").to_pylist() == ["full"]
