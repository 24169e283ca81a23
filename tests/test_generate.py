"""ichd_ray.synthetic.generate: synthetic head-CT studies with labels, locally and on S3."""

import csv
import dataclasses
import hashlib
import io
import json
from collections import defaultdict

import numpy as np
import pydicom
import pytest

from ichd_ray import CLASSES

from ichd_ray.io import storage
from ichd_ray.cli import main
from ichd_ray.dicom.read import DicomError, load_slice
from ichd_ray.synthetic.generate import (
    COMPRESSIONS,
    ENCODINGS,
    SynthConfig,
    generate,
    plan_study,
    render_slice,
    slice_dataset,
)
from ichd_ray.synthetic.generate import _overlap

SMALL = SynthConfig(studies=6, slices=8, size=64, seed=5, compressed_fraction=0.5, bad_files=6)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    summary = generate(str(out), SMALL)
    return out, summary


def _digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _labels(path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(dict)
    with open(path) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["ID", "Label"]
    for image_subtype, label in rows[1:]:
        image, subtype = image_subtype.rsplit("_", 1)
        out[image][subtype] = int(label)
    return out


def test_round_trip_through_load_slice(small_set):
    out, summary = small_set
    labels = _labels(out / "labels.csv")
    bad = {row["uri"]: row["reason"] for row in csv.DictReader(open(out / "bad_files.csv"))}
    studies = {row["study_uid"]: row for row in csv.DictReader(open(out / "studies.csv"))}
    assert len(studies) == summary["studies"] == 6 and len(bad) == summary["bad_files"] == 6

    loaded = defaultdict(list)
    for path in sorted(out.glob("*/*.dcm")):
        if str(path) in bad:
            with pytest.raises(DicomError) as info:
                load_slice(path)
            assert info.value.reason == bad[str(path)]
            continue
        ct = load_slice(path)
        assert path.parent.name == ct.meta.study_uid and path.stem == ct.meta.sop_uid
        assert ct.meta.patient_hash and "SYN" not in ct.meta.patient_hash
        assert ct.hu.shape == (64, 64)
        # air outside the head, bone in the skull, whatever the encoding (RSNA-wrapped included)
        assert ct.hu[0, 0] < -900 and ct.hu.max() > 600
        loaded[ct.meta.study_uid].append(ct.meta)
    assert sum(len(v) for v in loaded.values()) == summary["slices"]
    assert set(labels) == {f"ID_{m.sop_uid}" for metas in loaded.values() for m in metas}
    assert all(list(v) == list(CLASSES) for v in labels.values())  # 6 rows per image in RSNA order

    syntaxes = {pydicom.uid.UID(m.transfer_syntax) for metas in loaded.values() for m in metas}
    assert syntaxes & set(COMPRESSIONS), "expected some compressed studies at compressed_fraction=0.5"
    for study_uid, metas in loaded.items():
        assert int(studies[study_uid]["n_slices"]) == len(metas)
        # z order is by position along the normal; positions are evenly spaced by the thickness
        positions = sorted(m.position for m in metas)
        np.testing.assert_allclose(np.diff(positions), float(studies[study_uid]["slice_thickness"]), atol=1e-3)
        # positive label counts match the summary
        for sub in CLASSES:
            assert sum(labels[f"ID_{m.sop_uid}"][sub] for m in metas) == int(studies[study_uid][f"slices_{sub}"])


def test_deterministic_for_a_seed_and_independent_of_workers(small_set, tmp_path):
    out, _ = small_set
    again = tmp_path / "again"
    generate(str(again), SMALL, workers=2)
    a, b = _digest(out), _digest(again)
    a.pop("bad_files.csv"), b.pop("bad_files.csv")  # holds absolute paths
    assert a == b
    other = tmp_path / "other"
    generate(str(other), dataclasses.replace(SMALL, seed=6, bad_files=0))
    assert not set(_digest(other)) & {k for k in a if k.endswith(".dcm")}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_every_encoding_decodes_to_the_rendered_hu(encoding):
    cfg = SynthConfig(studies=1, slices=6, size=64, seed=1)
    plan = dataclasses.replace(plan_study(cfg, 0, 0), encoding=encoding)
    hu, _ = render_slice(plan, 3, cfg.difficulty, np.random.default_rng(0))
    ct = load_slice(_to_bytes(slice_dataset(plan, 3, hu, cfg.seed)))
    inside = np.hypot(*np.mgrid[-31.5:32.5, -31.5:32.5]) < 30  # inside the reconstruction circle
    expected = np.clip(np.rint(hu), -1000 if encoding == "uint12_wrapped" else -1024, 3071)
    tolerance = 0.5 if encoding == "int16_slope" else 0
    assert np.abs(ct.hu - expected)[inside].max() <= tolerance


@pytest.mark.parametrize("syntax", COMPRESSIONS)
def test_every_compression_is_lossless(syntax):
    cfg = SynthConfig(studies=1, slices=6, size=64, seed=1)
    plan = plan_study(cfg, 0, 0)
    hu, _ = render_slice(plan, 3, cfg.difficulty, np.random.default_rng(0))
    plain = load_slice(_to_bytes(slice_dataset(plan, 3, hu, cfg.seed)))
    packed = load_slice(_to_bytes(slice_dataset(dataclasses.replace(plan, transfer_syntax=syntax), 3, hu, cfg.seed)))
    assert packed.meta.transfer_syntax == syntax
    np.testing.assert_array_equal(packed.hu, plain.hu)


def _to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_labels_mark_exactly_the_slices_with_visible_blood():
    """Render each slice with and without its bleeds: positives show blood, negatives show
    little or none, and end slices are fainter than the middle (partial volume)."""
    cfg = SynthConfig(studies=60, slices=24, size=96, seed=2)
    diff = cfg.difficulty
    checked = 0
    for index in range(cfg.studies):
        plan = plan_study(cfg, index, 0)
        if not plan.bleeds:
            continue
        clean = dataclasses.replace(plan, bleeds=[])
        for bleed in plan.bleeds:
            one = dataclasses.replace(plan, bleeds=[bleed])
            full, partial = [], []
            for i in range(plan.n_slices):
                with_blood, labels = render_slice(one, i, diff, np.random.default_rng(i))
                without, clean_labels = render_slice(clean, i, diff, np.random.default_rng(i))
                assert not any(clean_labels.values())
                delta = with_blood - without
                label = labels[bleed.subtype]
                assert labels["any"] == label
                overlap = _overlap(bleed, i)
                if label:
                    assert (delta > 3).sum() >= 2, (index, bleed.subtype, i)
                    (full if overlap == 1 else partial).append(float(delta.max()))
                elif overlap == 0:
                    assert not delta.any(), (index, bleed.subtype, i)
            # partial volume: a slice only partly inside the bleed shows it fainter
            if full and partial:
                assert max(partial) < max(full)
            checked += 1
        if checked >= 12:
            break
    assert checked >= 12


def test_subtypes_and_prevalence_follow_the_documented_defaults():
    cfg = SynthConfig(studies=300, slices=32, size=64, seed=0)
    plans = [plan_study(cfg, i, 0) for i in range(cfg.studies)]
    bleeding = [p for p in plans if p.bleeds]
    assert 0.35 < len(bleeding) / len(plans) < 0.55  # prevalence 0.45
    present = {b.subtype for p in bleeding for b in p.bleeds}
    assert present == set(CLASSES[:5])
    assert any(len({b.subtype for b in p.bleeds}) > 1 for p in bleeding)
    n_slices = [p.n_slices for p in plans]
    assert min(n_slices) >= 32 - 7 and max(n_slices) <= 32 + 7 and len(set(n_slices)) > 5
    assert {p.encoding for p in plans} == set(ENCODINGS)
    assert any(p.reverse_instance for p in plans) and any(p.tilt_deg for p in plans)


def test_synth_writes_to_s3(s3_bucket):
    bucket, config = s3_bucket
    prefix = f"s3://{bucket}/archive"
    summary = generate(prefix, SynthConfig(studies=2, slices=4, size=32, seed=9), storage_config=config)
    entries = storage.list_files(prefix, suffix=".dcm", config=config)
    assert len(entries) == summary["slices"]
    first = entries[0]
    ct = load_slice(storage.read_bytes(first.uri, config=config), name=first.uri)
    assert first.uri.endswith(f"{ct.meta.study_uid}/{ct.meta.sop_uid}.dcm")
    labels = storage.read_bytes(f"{prefix}/labels.csv", config=config).decode()
    assert f"ID_{ct.meta.sop_uid}_any" in labels


def test_cli_synth(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "o"), "--studies", "2", "--slices", "4", "--size", "32", "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["studies"] == 2 and summary["slices"] == len(list((tmp_path / "o").glob("*/*.dcm")))
    with pytest.raises(SystemExit) as info:
        main(["synth", str(tmp_path / "o"), "--studies", "0"])
    assert info.value.code == 2
    assert "positive integer" in capsys.readouterr().err
