"""ichd_ray.pipeline.index: listing, header reads, series selection and the manifest."""

import pathlib

import pandas as pd
import pytest

from ichd_ray.cli import main
from ichd_ray.config.job import IndexConfig
from ichd_ray.pipeline.index import MANIFEST_SCHEMA, EmptyInput, list_inputs, select_series, study_table


def rows(study, series, n, thickness=5.0, start=0.0, step=5.0, prefix="f", normal_z=1.0, **extra):
    out = []
    for i in range(n):
        row = {name: None for name in MANIFEST_SCHEMA.names}
        row.update(
            uri=f"{prefix}-{series}-{i:03d}.dcm", size=100, study_uid=study, series_uid=series,
            sop_uid=f"{series}.{i}", position=start + i * step, instance_number=n - i,
            slice_thickness=thickness, normal_z=normal_z,
        )
        row.update(extra)
        out.append(row)
    return out


def frame(*groups):
    return pd.DataFrame([r for g in groups for r in g], columns=MANIFEST_SCHEMA.names)


def test_orders_by_position_not_instance_number_or_name():
    df = frame(rows("s1", "a", 5, start=100.0, step=-5.0))  # file order and InstanceNumber disagree with z
    out = select_series(df)
    chosen = out[out["selected"]].sort_values("slice_index")
    assert chosen["position"].tolist() == [80.0, 85.0, 90.0, 95.0, 100.0]
    assert chosen["slice_index"].tolist() == [0, 1, 2, 3, 4]


def test_picks_thickness_nearest_5mm_then_most_slices():
    df = frame(
        rows("s1", "thin", 40, thickness=0.625, step=0.625),
        rows("s1", "five", 30, thickness=5.0),
        rows("s1", "five-short", 20, thickness=5.0),
        rows("s2", "a", 10, thickness=2.5),
        rows("s2", "b", 12, thickness=2.5),
    )
    out = select_series(df)
    assert set(out.loc[out["selected"], "series_uid"]) == {"five", "b"}
    other = out[out["reason"] == "other_series"]
    assert set(other["series_uid"]) == {"thin", "five-short", "a"}
    assert "scored with series five" in other.loc[other["series_uid"] == "thin", "message"].iloc[0]
    # every object is either selected or has a reason
    assert (out["selected"] ^ out["reason"].notna()).all()


def test_duplicates_and_non_axial_and_rejections_pass_through():
    dup = rows("s1", "a", 1, prefix="z-copy")  # same SOP UID as a's first slice, later by URI
    df = frame(
        rows("s1", "a", 3),
        dup,
        rows("s1", "sag", 4, normal_z=0.0, thickness=5.0),
        [dict(rows("s1", "x", 1)[0], uri="bad.dcm", reason="truncated", message="cut")],
    )
    out = select_series(df).set_index("uri")
    assert out.loc["z-copy-a-000.dcm", "reason"] == "duplicate"
    assert "f-a-000.dcm" in out.loc["z-copy-a-000.dcm", "message"]
    assert (out.loc[out["series_uid"] == "sag", "reason"] == "other_series").all()
    assert out.loc["bad.dcm", "reason"] == "truncated" and not out.loc["bad.dcm", "selected"]
    assert out["selected"].sum() == 3


def test_a_selected_slice_without_a_position_is_refused_never_spaced_by_5_mm():
    """The reader rejects such a file (bad_header); a manifest that still has one was not made here."""
    df = frame(rows("s1", "a", 4))
    df.loc[1, "position"] = None
    with pytest.raises(ValueError, match="study s1: a selected slice has no position"):
        study_table(select_series(df))


def test_study_table_rows():
    out = select_series(frame(rows("s2", "b", 3), rows("s1", "a", 2)))
    table = study_table(out)
    assert [s["study_uid"] for s in table] == ["s1", "s2"]
    assert table[1]["uris"] == ["f-b-000.dcm", "f-b-001.dcm", "f-b-002.dcm"]
    assert table[1]["slice_indices"] == [0, 1, 2]


# ------------------------------------------------------------------------------ an empty listing
# A mistyped prefix (or a bucket the credentials cannot list) lists nothing. Scoring it used to commit an
# empty "succeeded" run, and a nightly would have tombstoned every study of the archive: refused instead.


def test_listing_nothing_is_refused_with_the_prefix_named(tmp_path):
    (tmp_path / "empty").mkdir()
    for uri in (str(tmp_path / "no_such_prefix"), str(tmp_path / "empty")):
        with pytest.raises(EmptyInput, match=f"no objects under {uri}"):
            list_inputs(uri, IndexConfig())
    listing = tmp_path / "list.txt"
    listing.write_text("# nothing yet\n")
    with pytest.raises(EmptyInput, match="names no objects"):
        list_inputs(str(listing), IndexConfig())


@pytest.mark.timeout(240)
def test_scoring_a_mistyped_prefix_commits_nothing(ray_session, tmp_path, capsys):
    bundle = pathlib.Path(__file__).parent / "data" / "frozen_bundle_v0" / "bundle"
    out = tmp_path / "out"
    rc = main(["score", str(tmp_path / "typo"), "--model", str(bundle), "--out", str(out), "--no-progress"])
    assert rc != 0
    assert f"no objects under {tmp_path / 'typo'}" in capsys.readouterr().err
    assert not (out / "runs").exists()
