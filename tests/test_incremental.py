"""ichd_ray.pipeline.incremental: the nightly table work in DuckDB gives, on random archives, exactly what
the pandas implementations it replaces gave (row for row, fingerprints byte for byte), plus the
documented rules on hand-made cases."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest

import reference_nightly as ref
from ichd_ray.pipeline.incremental import (
    LISTING_SCHEMA,
    STUDY_INDEX_SCHEMA,
    plan_from_studies,
    plan_night,
    select_series,
    study_fingerprints,
    study_rows,
)
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


def plan_studies(index: pa.Table, scored, version: str, full: bool = False) -> pa.Table:
    """The plan as a night makes it: study rows from the index, then the plan from them."""
    return plan_from_studies(study_rows(index, "r"), scored, version, full=full)


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
    headers = index.set_index("uri")
    listed = {e["uri"]: e for e in listing}

    def read_headers(rows: pa.Table) -> pa.Table:  # a changed object keeps its header; a new one is not DICOM
        out = []
        for uri in rows.column("uri").to_pylist():
            row = headers.loc[uri].to_dict() if uri in headers.index else {
                c: None for c in MANIFEST_SCHEMA.names} | {"study_uid": None, "reason": "not_dicom", "message": "no"}
            out.append({**row, "uri": uri, **{k: listed[uri][k] for k in ("size", "mtime", "etag")}})
        return _arrow(pd.DataFrame(out), MANIFEST_SCHEMA)

    con = _night_connection(listing, index[~index["deleted"]])
    read = []
    night = plan_night(con, lambda rows: (read.append(rows), read_headers(rows))[1], model_version="v1", run_id="r1",
                       preferred_thickness_mm=5.0, index_schema=INDEX_SCHEMA)
    assert _rows(read[0]) == [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in e.items()}
                              for e in sorted(want_read, key=lambda e: e["uri"])]
    gone = night.index.filter(pa.compute.field("deleted"))
    newly_gone = want_deleted[~want_deleted["uri"].isin(index.loc[index["deleted"], "uri"])]
    assert sorted(gone.column("uri").to_pylist()) == sorted(newly_gone["uri"])  # already-deleted rows are not rewritten
    assert night.deleted == len(newly_gone) and len(want_unchanged) and len(want_read) and len(newly_gone)
    unchanged_uris = set(want_unchanged["uri"])
    assert not unchanged_uris & set(night.read.column("uri").to_pylist())


def _night_connection(listing: list[dict], previous: pd.DataFrame, studies: pa.Table | None = None, scored=None):
    con = duckdb.connect()
    con.register("listing", pa.Table.from_pylist(listing, schema=LISTING_SCHEMA))
    con.register("previous", _arrow(previous, INDEX_SCHEMA) if len(previous) else INDEX_SCHEMA.empty_table())
    con.register("previous_studies", studies if studies is not None else STUDY_INDEX_SCHEMA.empty_table())
    con.register("last_scored", scored if scored is not None else pa.table(
        {c: pa.array([], pa.string()) for c in ("study_uid", "fingerprint", "model_version")}))
    return con


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
    base = {c: None for c in INDEX_SCHEMA.names} | {"patient_hash": "h", "normal_z": 1.0, "slice_thickness": 5.0,
                                                     "deleted": False, "run_id": "r0"}
    index = pd.DataFrame([
        base | {"uri": "a", "size": 1, "mtime": 1.0, "etag": "x", "study_uid": "s1", "series_uid": "A", "sop_uid": "1", "position": 0.0},
        base | {"uri": "b", "size": 1, "mtime": 1.0, "etag": None, "study_uid": "s1", "series_uid": "A", "sop_uid": "2", "position": 5.0},
        base | {"uri": "c", "size": 1, "mtime": 1.0, "etag": "z", "study_uid": "s2", "series_uid": "B", "sop_uid": "3", "position": 0.0},
    ])
    index = ref.select_series(index, 5.0).assign(deleted=False, run_id="r0")[INDEX_SCHEMA.names]
    listing = [
        {"uri": "a", "size": 1, "mtime": 5.0, "etag": "x"},  # same etag: unchanged even though mtime moved
        {"uri": "b", "size": 2, "mtime": 1.0, "etag": None},  # no etag: size changed
        {"uri": "d", "size": 1, "mtime": 1.0, "etag": "w"},  # new
    ]
    headers = {"b": index.iloc[1].to_dict() | {"size": 2}, "d": base | {"uri": "d", "size": 1, "mtime": 1.0, "etag": "w",
                                                                      "reason": "not_dicom", "message": "no"}}
    read_headers = lambda rows: _arrow(pd.DataFrame([headers[u] for u in rows.column("uri").to_pylist()]), MANIFEST_SCHEMA)  # noqa: E731
    old = study_rows(_arrow(index, INDEX_SCHEMA), "r0")

    def night(scored, version="m1", full=False):
        con = _night_connection(listing, index, old, scored)
        return plan_night(con, read_headers, model_version=version, run_id="r1", preferred_thickness_mm=5.0,
                          index_schema=INDEX_SCHEMA, full=full)

    scored = pa.Table.from_pylist([{"study_uid": "s1", "fingerprint": "old", "model_version": "m1"}])
    tonight = night(scored)
    assert tonight.read.column("uri").to_pylist() == ["b", "d"]
    assert [(r["uri"], r["deleted"]) for r in tonight.index.to_pylist()] == [("a", False), ("b", False), ("d", False), ("c", True)]
    assert [(r["study_uid"], r["deleted"]) for r in tonight.studies.to_pylist()] == [("s1", False), ("s2", True)]
    plan = tonight.plan
    assert [(r["study_uid"], r["reason"]) for r in plan.to_pylist()] == [("s1", "changed")]  # s2 is gone: not planned
    assert tonight.counts == {"objects": 3, "studies": 1, "planned_slices": 2}
    assert night(scored, "m2").plan.column("reason").to_pylist() == ["model"]
    assert night(None).plan.column("reason").to_pylist() == ["new"]
    same = pa.Table.from_pylist([{"study_uid": "s1", "fingerprint": plan.column("fingerprint")[0].as_py(), "model_version": "m1"}])
    assert night(same).plan.num_rows == 0
    assert night(same, full=True).plan.column("reason").to_pylist() == ["full"]


# ------------------------------------------------------------------ many nights, only what changed


def _header(uri: str, study: str, series: str, sop: str, thickness, position: float, reason=None) -> dict:
    return {c: None for c in MANIFEST_SCHEMA.names} | {
        "uri": uri, "study_uid": study, "series_uid": series, "sop_uid": sop, "patient_hash": "h",
        "position": position, "instance_number": int(position) % 3, "rows": 64, "cols": 64, "pixel_spacing": 0.5,
        "slice_thickness": thickness, "normal_z": 1.0, "image_type": "ORIGINAL", "transfer_syntax": "1.2.840.10008.1.2.1",
        "reason": reason, "message": "bad" if reason else None, "selected": False}


class _Archive:
    """The bucket's truth: listing entry and header per object, changed a little each night."""

    def __init__(self, rng: np.random.Generator, n_studies: int):
        self.rng, self.objects, self.serial = rng, {}, 0
        for s in range(n_studies):
            self.add_study(f"1.2.{s}")

    def add(self, study: str | None, series: str | None, sop: str | None = None, thickness=5.0, reason=None) -> str:
        self.serial += 1
        uri = f"s3://b/ct/{self.rng.integers(1e6):06d}-{self.serial}.dcm"
        sop = sop or f"{series}.{self.serial}"
        etag = f"{self.rng.integers(1e12):x}" if self.rng.random() > 0.3 else None
        entry = {"uri": uri, "size": int(self.rng.integers(1, 10**6)), "mtime": float(1.7e9 + self.serial), "etag": etag}
        self.objects[uri] = (entry, _header(uri, study, series, sop, thickness, float(self.rng.integers(0, 50)), reason))
        return uri

    def add_study(self, study: str) -> None:
        options = [[5.0], [5.0, 1.25], [2.5, 4.0], [None]]
        for k, thickness in enumerate(options[int(self.rng.integers(len(options)))]):
            for _ in range(int(self.rng.integers(1, 6))):
                self.add(study, f"{study}.{k}", thickness=thickness, reason="bad_header" if self.rng.random() < 0.05 else None)

    def change(self, uri: str) -> None:
        entry, header = self.objects[uri]
        entry = dict(entry, mtime=entry["mtime"] + 10.0, size=entry["size"] + 1,
                     etag=f"{self.rng.integers(1e12):x}" if entry["etag"] else None)
        roll = self.rng.random()
        if roll < 0.3:  # the object now belongs to another study
            other = self.objects[self.rng.choice(list(self.objects))][1]
            header = dict(header, study_uid=other["study_uid"], series_uid=other["series_uid"])
        elif roll < 0.5:
            header = dict(header, reason="bad_header", message="bad")
        else:
            header = dict(header, position=float(self.rng.integers(0, 50)), reason=None, message=None)
        self.objects[uri] = (entry, header)

    def night(self, k: int) -> None:
        uris = sorted(self.objects)
        for uri in uris:
            roll = self.rng.random()
            if roll < 0.02:
                del self.objects[uri]
            elif roll < 0.04:
                self.change(uri)
        studies = sorted({h["study_uid"] for _, h in self.objects.values() if h["study_uid"]})
        for _ in range(3):  # new slices of existing studies, one a copy of another study's SOP UID
            study = self.rng.choice(studies)
            sop = self.objects[self.rng.choice(sorted(self.objects))][1]["sop_uid"] if self.rng.random() < 0.5 else None
            self.add(study, f"{study}.0", sop=sop)
        self.add_study(f"1.9.{k}")
        uri = self.add(None, None, reason="not_dicom")  # a file of no study
        self.objects[uri][1].update(sop_uid=None)

    def listing(self) -> list[dict]:
        return [e for e, _ in sorted(self.objects.values(), key=lambda eh: eh[0]["uri"])]

    def headers(self, uris: list[str]) -> pd.DataFrame:
        rows = [{**self.objects[u][1], **{k: self.objects[u][0][k] for k in ("size", "mtime", "etag")}} for u in uris]
        return pd.DataFrame(rows, columns=MANIFEST_SCHEMA.names)


def _overlay(deltas: list[pa.Table], key: str) -> pd.DataFrame:
    """The newest row per key over the night's changes, in order (what the latest_* views do)."""
    if not deltas:
        return pd.DataFrame()
    frames = [t.to_pandas().assign(_order=n) for n, t in enumerate(deltas)]
    both = pd.concat(frames, ignore_index=True)
    return both.sort_values("_order", kind="stable").drop_duplicates(key, keep="last").drop(columns="_order")


def _sorted_rows(df: pd.DataFrame, schema: pa.Schema) -> list[dict]:
    if df.empty:
        return []
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False).sort_by("uri")
    return [{k: v for k, v in r.items() if k != "run_id"} for r in _rows(table)]


def _nights(seed: int, nights: int, compact_at: int | None = None, legacy: bool = False):
    rng = np.random.default_rng(seed)
    archive = _Archive(rng, 30)
    oracle = None  # the whole index as the pandas code kept it
    deltas, study_deltas = [], []
    scored = pd.DataFrame(columns=["study_uid", "fingerprint", "model_version"])
    for k in range(nights):
        if k:
            archive.night(k)
        version = "v2" if k >= nights - 2 else "v1"  # a model change on the last two nights
        full = k == 3
        listing = archive.listing()
        # the pandas code over the whole index
        unchanged, to_read, gone = ref.diff_listing(oracle, listing)
        fresh = archive.headers([e["uri"] for e in to_read])
        live = pd.concat([unchanged[MANIFEST_SCHEMA.names], fresh], ignore_index=True) if len(unchanged) else fresh
        rule = live["reason"].isin(["duplicate", "other_series"])  # make_plan reset the rule's own reasons
        live = ref.select_series(live.assign(reason=live["reason"].where(~rule), message=live["message"].where(~rule)), 5.0)
        oracle = pd.concat([live.assign(deleted=False, run_id=f"n{k}"), gone.assign(run_id=f"n{k}")], ignore_index=True)[INDEX_SCHEMA.names]
        want_plan = ref.plan_studies(oracle, scored, version, full=full).to_dict("records")

        # the DuckDB code over what changed
        previous = _overlay(deltas, "uri")
        con = duckdb.connect()
        con.register("listing", pa.Table.from_pylist(listing, schema=LISTING_SCHEMA))
        con.register("previous", _arrow(previous[~previous["deleted"].astype(bool)], INDEX_SCHEMA) if len(previous) else INDEX_SCHEMA.empty_table())
        studies = _overlay(study_deltas, "study_uid")
        con.register("previous_studies", _arrow(studies, STUDY_INDEX_SCHEMA) if len(studies) else STUDY_INDEX_SCHEMA.empty_table())
        con.register("last_scored", pa.Table.from_pandas(scored, preserve_index=False) if len(scored) else
                     pa.table({c: pa.array([], pa.string()) for c in scored.columns}))
        read = []
        night = plan_night(con, lambda rows: (read.append(rows.column("uri").to_pylist()),
                                              _arrow(archive.headers(rows.column("uri").to_pylist()), MANIFEST_SCHEMA))[1],
                           model_version=version, run_id=f"n{k}", preferred_thickness_mm=5.0, index_schema=INDEX_SCHEMA, full=full)
        assert read == [[e["uri"] for e in to_read]]  # headers read only for what is new or changed
        deltas.append(night.index)
        study_deltas.append(night.studies)
        got = _overlay(deltas, "uri")
        yield k, got, oracle, night, want_plan, previous
        if k == compact_at:  # a compaction: the live rows and the study rows become the snapshot
            deltas = [_arrow(got[~got["deleted"].astype(bool)], INDEX_SCHEMA)]
            study_deltas = [_arrow(_overlay(study_deltas, "study_uid"), STUDY_INDEX_SCHEMA)]
        if legacy and k == 1:  # as an index written before study rows existed
            study_deltas = []
        ok = [p for p in want_plan if rng.random() > 0.2]  # a fifth of the planned studies fail to score
        scored = pd.concat([scored[~scored["study_uid"].isin([p["study_uid"] for p in ok])],
                            pd.DataFrame([{"study_uid": p["study_uid"], "fingerprint": p["fingerprint"], "model_version": version}
                                          for p in ok], columns=scored.columns)], ignore_index=True)


@pytest.mark.parametrize("seed", range(5))
def test_nights_of_changes_give_the_whole_index_the_pandas_code_kept(seed):
    """Night after night (objects gone, changed, moved between studies, SOP UIDs copied across studies, new
    studies, a model change, --full, failed studies), the committed changes overlaid give exactly the
    whole index the pandas code rewrote every night, and the same plan."""
    for k, got, oracle, night, want_plan, previous in _nights(seed, 7):
        assert _sorted_rows(got, INDEX_SCHEMA) == _sorted_rows(oracle, INDEX_SCHEMA), f"night {k}"
        assert night.plan.to_pylist() == want_plan, f"night {k}"
        live = oracle[~oracle["deleted"].astype(bool)]
        assert night.counts == {"objects": len(live), "studies": live.loc[live["selected"].astype(bool), "study_uid"].nunique(),
                                "planned_slices": int(live["selected"].astype(bool)[live["study_uid"].isin([p["study_uid"] for p in want_plan])].sum())}
        if k:  # only what changed is written: fewer rows than the archive, all of touched studies
            touched = set(night.studies.column("study_uid").to_pylist())
            assert night.index.num_rows < len(oracle), f"night {k}"
            assert set(night.index.column("study_uid").drop_null().to_pylist()) <= touched
    assert "model" in {p["reason"] for p in want_plan}  # the failed studies of the first v2 night


@pytest.mark.parametrize("seed", range(3))
def test_a_compaction_drops_tombstones_and_changes_nothing_else(seed):
    for k, got, oracle, night, want_plan, previous in _nights(seed, 6, compact_at=2):
        live_got, live_want = got[~got["deleted"].astype(bool)], oracle[~oracle["deleted"].astype(bool)]
        assert _sorted_rows(live_got, INDEX_SCHEMA) == _sorted_rows(live_want, INDEX_SCHEMA), f"night {k}"
        assert night.plan.to_pylist() == want_plan, f"night {k}"
        if k > 2:  # tombstones of nights before the compaction are gone; later ones are kept
            assert set(got.loc[got["deleted"].astype(bool), "uri"]) < set(oracle.loc[oracle["deleted"].astype(bool), "uri"])
            assert not previous["deleted"].astype(bool).any() or k > 3


@pytest.mark.parametrize("seed", range(2))
def test_an_index_without_study_rows_is_fingerprinted_once(seed):
    """An OUT written before the study table existed: the first night computes every study's row."""
    for k, got, oracle, night, want_plan, previous in _nights(seed, 5, legacy=True):
        assert night.plan.to_pylist() == want_plan, f"night {k}"
        if k == 2:
            assert set(night.studies.column("study_uid").to_pylist()) == set(
                oracle.loc[oracle["study_uid"].notna() & ~oracle["deleted"].astype(bool), "study_uid"]) | set(
                night.studies.filter(pa.compute.field("deleted")).column("study_uid").to_pylist())
        elif k == 3:
            assert night.studies.num_rows < len(set(oracle["study_uid"].dropna()))
