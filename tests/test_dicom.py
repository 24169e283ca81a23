import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut

from ichd_ray.dicom import (
    REJECT_REASONS,
    DicomError,
    hash_patient_id,
    load_slice,
    parse_dicom,
    decode_stored,
    read_header,
)

from dicom_factory import ct_bytes, ct_dataset, head_like, to_bytes


def reason_of(source) -> str:
    with pytest.raises(DicomError) as info:
        load_slice(source)
    return info.value.reason


# ------------------------------------------------------------------------------ Hounsfield units


def test_signed_int16_hu():
    stored = np.array([[-2000, 0], [1024, 1064]], dtype=np.int16)
    hu = load_slice(ct_bytes(stored)).hu
    assert hu.dtype == np.float32
    assert hu.tolist() == [[-3024, -1024], [0, 40]]


def test_unsigned_12_bit_with_intercept():
    stored = np.array([[0, 1024], [1064, 4095]])
    hu = load_slice(ct_bytes(stored, signed=False, bits_stored=12, intercept=-1024)).hu
    assert hu.tolist() == [[-1024, 0], [40, 3071]]


def test_any_slope():
    stored = np.array([[0, 2048], [2128, 100]])
    hu = load_slice(ct_bytes(stored, slope=0.5, intercept=-1024)).hu
    assert hu.tolist() == [[-1024, 0], [40, -974]]


def test_rsna_fix_unwraps_12_bit_unsigned_with_high_intercept():
    # HU stored modulo 4096 with intercept 0: air (-1000) sits at 3096
    stored = np.array([[0, 40], [3096, 4095]])
    data = ct_bytes(stored, signed=False, bits_stored=12, intercept=0)
    assert load_slice(data).hu.tolist() == [[0, 40], [-1000, -1]]
    assert load_slice(data, rsna_fix=False).hu.tolist() == [[0, 40], [3096, 4095]]


def test_rsna_fix_leaves_normal_intercepts_alone():
    stored = np.array([[0, 40], [3096, 4095]])
    data = ct_bytes(stored, signed=False, bits_stored=12, intercept=-1024)
    assert load_slice(data).hu.tolist() == [[-1024, -984], [2072, 3071]]


def test_bits_above_bits_stored_are_ignored():
    # 12 bits stored, signed: 0xF000 | 0x0010 is garbage in the high nibble of +16; 0x0FF0 is -16
    raw = np.array([[0x0010 | 0x7000, 0x0FF0]], dtype=np.uint16).view(np.int16)
    hu = load_slice(ct_bytes(raw, bits_stored=12, intercept=0)).hu
    assert hu.tolist() == [[16, -16]]


def test_position_along_slice_normal_with_gantry_tilt():
    tilt = np.radians(20)
    iop = (1, 0, 0, 0, np.cos(tilt), -np.sin(tilt))
    ipp = (-100.0, 30.0, 80.0)
    meta = load_slice(ct_bytes(head_like(16), position=ipp, orientation=iop)).meta
    normal = np.cross(iop[:3], iop[3:])
    assert meta.position == pytest.approx(float(np.dot(ipp, normal)))
    assert meta.position != pytest.approx(80.0)


def test_meta_fields_and_no_raw_patient_id():
    data = ct_bytes(head_like(16), patient_id="JANE-DOE-123")
    meta = load_slice(data, salt="s1").meta
    assert (meta.study_uid, meta.series_uid, meta.instance_number) == ("1.2.3.4", "1.2.3.4.5", 7)
    assert (meta.rows, meta.cols, meta.pixel_spacing, meta.slice_thickness) == (16, 16, (0.5, 0.5), 5.0)
    assert meta.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert meta.transfer_syntax == pydicom.uid.ExplicitVRLittleEndian
    assert "JANE-DOE-123" not in repr(meta.to_dict())
    assert meta.patient_hash == hash_patient_id("JANE-DOE-123", "s1")


def test_patient_hash_is_salted_and_stable(monkeypatch):
    assert hash_patient_id("P1", "a") == hash_patient_id("P1", "a")
    assert hash_patient_id("P1", "a") != hash_patient_id("P1", "b")
    assert hash_patient_id("P1", "a") != hash_patient_id("P2", "a")
    assert hash_patient_id("", "a") is None
    monkeypatch.setenv("ICHD_PATIENT_SALT", "env-salt")
    assert hash_patient_id("P1") == hash_patient_id("P1", "env-salt")
    monkeypatch.delenv("ICHD_PATIENT_SALT")
    import ichd_ray.dicom as dicom

    dicom._warn_development_salt.cache_clear()
    with pytest.warns(UserWarning, match="ICHD_PATIENT_SALT"):
        dev = hash_patient_id("P1")
    assert dev == hash_patient_id("P1", "ichd-ray-development-salt")


# ------------------------------------------------------------------------- compressed encodings


@pytest.mark.parametrize(
    "syntax",
    [pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEGLSLossless],
    ids=["rle", "jpeg2000", "jpeg-ls"],
)
@pytest.mark.parametrize("signed", [True, False], ids=["int16", "uint12"])
def test_compressed_twin_decodes_equal(syntax, signed):
    stored = head_like(64, seed=1)
    if not signed:
        stored = np.clip(stored, 0, 4095).astype(np.uint16)
    ds = ct_dataset(stored, signed=signed, bits_stored=16 if signed else 12)
    plain = load_slice(to_bytes(ds))
    kwargs = {"encoding_plugin": "pylibjpeg"} if syntax == pydicom.uid.RLELossless else {}
    ds.compress(syntax, **kwargs)
    packed = to_bytes(ds)
    assert len(packed) < len(to_bytes(ct_dataset(stored, signed=signed)))
    twin = load_slice(packed)
    assert twin.meta.transfer_syntax == syntax
    np.testing.assert_array_equal(twin.hu, plain.hu)


def test_real_ct_uncompressed_and_jpeg2000_twins_agree():
    plain = load_slice(get_testdata_file("693_UNCR.dcm"))
    j2k = load_slice(get_testdata_file("693_J2KR.dcm"))
    np.testing.assert_array_equal(plain.hu, j2k.hu)
    ds = pydicom.dcmread(get_testdata_file("693_UNCR.dcm"))
    np.testing.assert_array_equal(plain.hu, apply_modality_lut(ds.pixel_array, ds))
    assert plain.hu.min() == -3024  # outside the reconstruction circle
    assert plain.meta.position == 47.0


@pytest.mark.parametrize("name", ["CT_small.dcm", "bad_sequence.dcm", "explicit_VR-UN.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_real_ct_files_match_pydicom_modality_lut(name):
    """CT_small (native), bad_sequence (JPEG lossless), two JPEG 2000 CTs with sign quirks."""
    ct = load_slice(get_testdata_file(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file(name))
        expected = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_allclose(ct.hu, expected)
    assert ct.hu.shape == (ds.Rows, ds.Columns)


def test_ct_small_known_values():
    ct = load_slice(get_testdata_file("CT_small.dcm"))
    # stored 175 at [0, 0] with intercept -1024 -> HU -849
    assert ct.hu[0, 0] == 175 - 1024
    assert ct.meta.rows == 128 and ct.meta.position == pytest.approx(-75.699997)


def test_jpeg_ls_and_jpeg_lossless_real_files_decode():
    # JPEG-LS twin from pydicom-data / pydicom's test files (MR: decoding checked below the CT checks)
    def stored(name):
        data = Path(get_testdata_file(name)).read_bytes()
        return decode_stored(parse_dicom(data, name))

    np.testing.assert_array_equal(stored("MR_small_jpeg_ls_lossless.dcm"), stored("MR_small.dcm"))
    np.testing.assert_array_equal(stored("MR_small_RLE.dcm"), stored("MR_small.dcm"))
    np.testing.assert_array_equal(stored("MR_small_jp2klossless.dcm"), stored("MR_small.dcm"))
    lossless = stored("JPGLosslessP14SV1_1s_1f_8b.dcm")
    assert lossless.shape == (768, 1024) and lossless.dtype == np.uint8 and lossless.max() > 100


# ------------------------------------------------------------------------------------ rejections


def test_every_reason_with_its_source_name(tmp_path):
    stored = head_like(32)
    good = ct_bytes(stored)
    cases = {}
    cases["empty"] = b""
    cases["not_dicom"] = b"hello, this is a text file\n" * 20
    cases["truncated"] = good[: len(good) - 100]
    mr = ct_dataset(stored)
    mr.Modality = "MR"
    mr.SOPClassUID = pydicom.uid.MRImageStorage
    cases["not_ct"] = to_bytes(mr)
    cases["localizer"] = ct_bytes(stored, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    cases["derived"] = ct_bytes(stored, image_type=("DERIVED", "SECONDARY", "MPR"))
    multi = ct_dataset(stored)
    multi.NumberOfFrames = 2
    multi.PixelData = stored.tobytes() * 2
    cases["multi_frame"] = to_bytes(multi)
    nopix = ct_dataset(stored)
    del nopix.PixelData
    cases["no_pixel_data"] = to_bytes(nopix)
    mismatch = ct_dataset(stored)
    mismatch.Rows = 4096
    mismatch.Columns = 4096  # claims 32 MB; holds 2 KB
    cases["pixel_size_mismatch"] = to_bytes(mismatch)
    mpeg = ct_dataset(stored)
    mpeg.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    mpeg.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(100)])
    mpeg["PixelData"].VR = "OB"
    cases["missing_codec"] = to_bytes(mpeg)
    broken = ct_dataset(stored)
    broken.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    broken["PixelData"].VR = "OB"
    cases["decode_error"] = to_bytes(broken)

    assert set(cases) == set(REJECT_REASONS) - {"duplicate", "other_series"}
    for expected, data in cases.items():
        path = tmp_path / f"{expected}.dcm"
        path.write_bytes(data)
        with pytest.raises(DicomError) as info:
            load_slice(path)
        assert (info.value.reason, info.value.source) == (expected, str(path)), info.value
        assert str(path) in str(info.value)
        if expected != "decode_error":  # the only reason that needs a decode
            with pytest.raises(DicomError, match=expected):
                read_header(path)
    # the header reader accepts what only a decode can reject, and never decodes
    assert read_header(tmp_path / "decode_error.dcm").rows == 32


def test_reasons_are_checked_in_order():
    stored = head_like(16)
    # a truncated MR file is "truncated" (checked before not_ct)
    mr = ct_dataset(stored)
    mr.Modality = "MR"
    assert reason_of(to_bytes(mr)[:-40]) == "truncated"
    # a derived localizer is a localizer; a derived multi-frame image is derived
    assert reason_of(ct_bytes(stored, image_type=("DERIVED", "PRIMARY", "LOCALIZER"))) == "localizer"
    multi = ct_dataset(stored, image_type=("DERIVED", "PRIMARY", "AXIAL"))
    multi.NumberOfFrames = 2
    assert reason_of(to_bytes(multi)) == "derived"


def test_truncated_compressed_pixel_data():
    ds = ct_dataset(head_like(64))
    ds.compress(pydicom.uid.JPEG2000Lossless)
    data = to_bytes(ds)
    assert reason_of(data[: len(data) - 500]) == "truncated"


def test_error_survives_pickling():
    err = DicomError("truncated", "s3://bucket/a.dcm", "cut")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.source, back.message) == ("truncated", "s3://bucket/a.dcm", "cut")
    with pytest.raises(ValueError):
        DicomError("made_up", "x")


def _all_test_files() -> list[Path]:
    roots = {Path(get_testdata_file("CT_small.dcm")).parent, Path(get_testdata_file("693_UNCR.dcm")).parent}
    return sorted(p for root in roots for p in root.iterdir() if p.is_file())


# expected outcome for notable real files from pydicom and pydicom-data
REAL_FILES = {
    "CT_small.dcm": None,
    "693_UNCR.dcm": None,
    "693_J2KR.dcm": None,
    "bad_sequence.dcm": None,
    "693_UNCI.dcm": "derived",
    "693_J2KI.dcm": "derived",
    "eCT_Supplemental.dcm": "derived",
    "MR_small.dcm": "not_ct",
    "rtplan.dcm": "not_ct",
    "liver.dcm": "not_ct",
    "US1_J2KR.dcm": "not_ct",
    "RG1_UNCR.dcm": "not_ct",
    "MR_truncated.dcm": "truncated",
    "rtplan_truncated.dcm": "truncated",
    "README.txt": "not_dicom",
    "zipMR.gz": "not_dicom",
    "test1.json": "not_dicom",
}


def test_every_real_test_file_loads_or_is_rejected_cleanly():
    files = _all_test_files()
    assert len(files) > 120
    outcomes = {}
    for path in files:
        try:
            ct = load_slice(path)
        except DicomError as exc:
            assert exc.source == str(path)
            outcomes[path.name] = exc.reason
            continue
        assert ct.meta.modality == "CT" and np.isfinite(ct.hu).all()
        outcomes[path.name] = None
    for name, expected in REAL_FILES.items():
        assert outcomes[name] == expected, name
    loaded = [n for n, r in outcomes.items() if r is None]
    assert all(pydicom.dcmread(get_testdata_file(n), stop_before_pixels=True).Modality == "CT" for n in loaded)


def test_sources_bytes_path_and_pathlike(tmp_path):
    data = ct_bytes(head_like(16))
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    a, b, c = load_slice(data), load_slice(str(path)), load_slice(path)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(b.hu, c.hu)
    assert reason_of(io.BytesIO(data).getvalue()[:0]) == "empty"
    with pytest.raises(FileNotFoundError, match="missing.dcm"):
        load_slice(tmp_path / "missing.dcm")


def test_read_header_reads_no_pixels(tmp_path, monkeypatch):
    data = ct_bytes(head_like(64))
    import ichd_ray.dicom as dicom

    monkeypatch.setattr(dicom, "decode_stored", lambda *_: pytest.fail("header reader decoded pixels"))
    meta = read_header(data)
    assert (meta.rows, meta.cols, meta.sop_uid) == (64, 64, pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    assert os.environ.get("ICHD_PATIENT_SALT")  # set by conftest: no salt warnings in tests


def test_read_header_from_a_prefix_of_the_object():
    from ichd_ray.dicom import IncompleteHeader

    for data in (ct_bytes(head_like(64)), Path(get_testdata_file("693_J2KR.dcm")).read_bytes()):
        full = read_header(data)
        assert read_header(data[:4096], total_size=len(data)) == full
        with pytest.raises(IncompleteHeader, match="first 200 bytes"):
            read_header(data[:200], total_size=len(data))
    # a prefix still catches an object whose pixel data is cut short
    cut = ct_bytes(head_like(64))
    with pytest.raises(DicomError, match="truncated"):
        read_header(cut[:4096], total_size=len(cut) - 10)
