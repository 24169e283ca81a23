"""ichd_ray.dicom.read: header and pixel parsing by the PS3.5/PS3.3 rules; what breaks them is refused with a reason."""

import io
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut

from ichd_ray.dicom.read import (
    REJECT_REASONS,
    DicomError,
    hash_patient_id,
    load_slice,
    parse_dicom,
    decode_stored,
    read_header,
)

from dicom_factory import (
    ct_bytes,
    ct_dataset,
    delete_element,
    find_span,
    head_like,
    replace_value,
    set_length_field,
    to_bytes,
)


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
    import ichd_ray.dicom.read as dicom

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

    cases["bad_header"] = replace_value(good, "RescaleIntercept", b"-10x4")

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
    import ichd_ray.dicom.read as dicom

    monkeypatch.setattr(dicom, "decode_stored", lambda *_: pytest.fail("header reader decoded pixels"))
    meta = read_header(data)
    assert (meta.rows, meta.cols, meta.sop_uid) == (64, 64, pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    assert os.environ.get("ICHD_PATIENT_SALT")  # set by conftest: no salt warnings in tests


def test_read_header_from_a_prefix_of_the_object():
    from ichd_ray.dicom.read import IncompleteHeader

    for data in (ct_bytes(head_like(64)), Path(get_testdata_file("693_J2KR.dcm")).read_bytes()):
        full = read_header(data)
        assert read_header(data[:4096], total_size=len(data)) == full
        with pytest.raises(IncompleteHeader, match="first 200 bytes"):
            read_header(data[:200], total_size=len(data))
    # a prefix still catches an object whose pixel data is cut short
    cut = ct_bytes(head_like(64))
    with pytest.raises(DicomError, match="truncated"):
        read_header(cut[:4096], total_size=len(cut) - 10)


# ------------------------------------------------------------ required attributes (issue 9, item 1)

# Every attribute the pipeline needs: absent or unparseable rejects the file as bad_header.
REQUIRED = [
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "RescaleSlope",
    "RescaleIntercept",
    "ImagePositionPatient",
    "ImageOrientationPatient",
]


def struct_us(value: int) -> bytes:
    """An unsigned short value, little endian (the factory writes explicit VR little endian)."""
    return struct.pack("<H", value)


def bad_header(data: bytes) -> str:
    """The message of the bad_header rejection of ``data`` (by load_slice and read_header alike)."""
    with pytest.raises(DicomError) as info:
        load_slice(data)
    assert info.value.reason == "bad_header", info.value
    with pytest.raises(DicomError) as again:
        read_header(data)
    assert (again.value.reason, again.value.message) == ("bad_header", info.value.message)
    return info.value.message


@pytest.mark.parametrize("keyword", REQUIRED)
def test_missing_required_attribute_is_rejected(keyword):
    message = bad_header(delete_element(ct_bytes(head_like(16)), keyword))
    assert keyword in message and "absent" in message


@pytest.mark.parametrize("keyword", REQUIRED)
def test_empty_required_attribute_is_rejected(keyword):
    message = bad_header(replace_value(ct_bytes(head_like(16)), keyword, b""))
    assert keyword in message and ("empty" in message or "absent" in message)


@pytest.mark.parametrize(
    "keyword, value, why",
    [
        ("RescaleIntercept", b"-10x4", "unparseable value '-10x4'"),
        ("RescaleIntercept", b"nan", "unparseable value 'nan'"),
        ("RescaleIntercept", b"1e999", "non-finite"),
        ("RescaleIntercept", b"-1024\\0", "2 values, expected 1"),
        ("RescaleSlope", b"0", "is 0"),
        ("RescaleSlope", b"0.0e5", "is 0"),
        ("RescaleSlope", b"inf", "unparseable value 'inf'"),
        ("RescaleSlope", b"1_0", "unparseable value '1_0'"),  # Python's float() would say 10.0
        ("ImagePositionPatient", b"0\\0", "2 values, expected 3"),
        ("ImagePositionPatient", b"0\\0\\ten", "unparseable value 'ten'"),
        ("ImageOrientationPatient", b"1\\0\\0\\0\\1", "5 values, expected 6"),
        ("ImageOrientationPatient", b"1\\0\\0\\1\\0\\0", "degenerate orientation"),
        ("ImageOrientationPatient", b"0\\0\\0\\0\\0\\0", "degenerate orientation"),
        ("StudyInstanceUID", b"1.2.\x01\xff", "unparseable value (6 characters)"),
        ("SOPInstanceUID", b"\x00\x00", "empty"),
        ("SeriesInstanceUID", b"  ", "empty"),
    ],
)
def test_garbled_required_value_is_rejected(keyword, value, why):
    message = bad_header(replace_value(ct_bytes(head_like(16)), keyword, value))
    assert keyword in message and why in message, message


@pytest.mark.parametrize(
    "keyword, value, why",
    [
        ("Rows", b"\x10\x00\x10\x00", "2 values, expected 1"),
        ("Columns", b"\x10", "unparseable"),  # odd length: not an unsigned short
        ("PixelRepresentation", b"\x02\x00", "invalid value 2"),
        ("BitsStored", b"", "empty"),
    ],
)
def test_garbled_binary_value_is_rejected(keyword, value, why):
    data = replace_value(ct_bytes(head_like(16)), keyword, value, pad=b"")
    if len(value) % 2:  # replace_value pads to even: write the odd length by hand
        span = find_span(data, keyword)
        data = set_length_field(data[: span.value_start] + value + data[span.end :], span, len(value))
    message = bad_header(data)
    assert keyword in message and why in message, message


def test_wrong_vr_for_a_required_attribute_is_rejected():
    # RescaleIntercept "0 " re-labelled US reads as 8240 through pydicom: a VR is part of the value
    data = ct_bytes(head_like(16), intercept=0)
    span = find_span(data, "RescaleIntercept")
    data = data[: span.start + 4] + b"US" + data[span.start + 6 :]
    message = bad_header(data)
    assert "RescaleIntercept" in message and "VR 'US'" in message


def test_unknown_vr_un_is_read_with_the_dictionary_vr():
    """explicit_VR-UN.dcm holds RescaleIntercept etc. as UN: legal, decoded with the dictionary VR."""
    ct = load_slice(get_testdata_file("explicit_VR-UN.dcm"))
    assert ct.meta.rescale_intercept == 0 and ct.meta.rescale_slope == 1 and ct.meta.position is not None


def test_accepted_slices_always_have_a_position():
    for source in (ct_bytes(head_like(16)), get_testdata_file("CT_small.dcm"), get_testdata_file("693_J2KR.dcm")):
        meta = load_slice(source).meta
        assert isinstance(meta.position, float) and meta.image_position is not None
        assert meta.image_orientation is not None and len(meta.image_orientation) == 6


@pytest.mark.parametrize("keyword", ["InstanceNumber", "SliceThickness", "PixelSpacing", "PatientID", "ImageType"])
def test_optional_attribute_may_be_absent_or_empty(keyword):
    good = ct_bytes(head_like(16))
    field = {"InstanceNumber": "instance_number", "SliceThickness": "slice_thickness", "PixelSpacing": "pixel_spacing",
             "PatientID": "patient_hash", "ImageType": "image_type"}[keyword]
    for data in (delete_element(good, keyword), replace_value(good, keyword, b"")):
        ct = load_slice(data)
        assert getattr(ct.meta, field) in (None, ())
        np.testing.assert_array_equal(ct.hu, load_slice(good).hu)


@pytest.mark.parametrize(
    "keyword, value",
    [("InstanceNumber", b"seven"), ("InstanceNumber", b"99999999999999999999"), ("SliceThickness", b"5mm"),
     ("PixelSpacing", b"0.5"), ("PixelSpacing", b"0.5\\-0.5"), ("NumberOfFrames", b"x")],
)
def test_garbage_in_an_optional_attribute_we_use_is_rejected(keyword, value):
    """Present means parseable: a garbled value is not silently read as 'absent' (module docstring)."""
    ds = ct_dataset(head_like(16))
    ds.NumberOfFrames = 1
    message = bad_header(replace_value(to_bytes(ds), keyword, value))
    assert keyword in message


def test_tolerated_spellings_of_valid_values():
    good = ct_bytes(head_like(16))
    data = replace_value(good, "InstanceNumber", b" +7.0 ")  # integral IS written as a decimal
    data = replace_value(data, "RescaleIntercept", b"-1.024E3")
    data = replace_value(data, "SOPInstanceUID", b"1.2.3.44\x00", pad=b"\x00")
    ct = load_slice(data)
    assert (ct.meta.instance_number, ct.meta.rescale_intercept, ct.meta.sop_uid) == (7, -1024.0, "1.2.3.44")
    np.testing.assert_array_equal(ct.hu, load_slice(good).hu)


def test_bad_header_messages_never_hold_patient_identifiers():
    ds = ct_dataset(head_like(16), patient_id="PHI-ID-4711")
    ds.PatientName = "PHI^NAME"
    ds.PatientBirthDate = "19010101"
    ds.AccessionNumber = "PHI-ACC-42"
    good = to_bytes(ds)
    markers = ("PHI", "4711", "19010101")
    for keyword in REQUIRED:
        for value in (None, b"PHI-ID-4711", b"PHI^NAME", b"19010101\\0"):
            data = delete_element(good, keyword) if value is None else replace_value(good, keyword, value)
            if keyword.endswith("UID") and value is not None and b"\\" not in value:
                continue  # printable, one value: a valid (if odd) UID, accepted
            with pytest.raises(DicomError) as info:
                load_slice(data)
            assert info.value.reason == "bad_header"
            assert not any(m in str(info.value) for m in markers), str(info.value)


def test_localizer_or_multiframe_without_geometry_is_selected_out_not_a_fault():
    """Scouts and enhanced multi-frame CTs keep geometry elsewhere: their selection reason comes first."""
    data = delete_element(ct_bytes(head_like(16), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "ImagePositionPatient")
    assert reason_of(data) == "localizer"
    assert reason_of(get_testdata_file("eCT_Supplemental.dcm")) == "derived"


def test_compressed_header_claiming_other_dimensions_allocates_nothing():
    import tracemalloc

    ds = ct_dataset(head_like(64))
    ds.compress(pydicom.uid.JPEG2000Lossless)
    data = to_bytes(ds)
    for rows, cols in ((8192, 8192), (65535, 65535), (64, 8192)):
        claim = replace_value(replace_value(data, "Rows", struct_us(rows)), "Columns", struct_us(cols))
        tracemalloc.start()
        try:
            with pytest.raises(DicomError) as info:
                load_slice(claim)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert info.value.reason == "pixel_size_mismatch", info.value
        assert peak < 8 << 20, f"{rows}x{cols}: peak {peak / 2**20:.1f} MiB"


@pytest.mark.timeout(20)
def test_jp2_box_of_length_zero_does_not_hang():
    """pydicom 3.0.2's get_j2k_parameters loops forever on a JP2 box of length 0 (it never advances)."""
    ds = ct_dataset(head_like(16))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.PixelData = encapsulate([b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x00ftyp" + bytes(64)])
    ds["PixelData"].VR = "OB"
    assert reason_of(to_bytes(ds)) == "decode_error"


def test_rle_header_claiming_more_pixels_than_its_segments_can_hold():
    ds = ct_dataset(head_like(64))
    ds.compress(pydicom.uid.RLELossless, encoding_plugin="pylibjpeg")
    data = to_bytes(ds)
    claim = replace_value(replace_value(data, "Rows", struct_us(8192)), "Columns", struct_us(8192))
    assert reason_of(claim) == "pixel_size_mismatch"


def test_pydicom_log_records_never_carry_patient_identifiers(caplog):
    """pydicom logs every invalid value it converts, quoted. A file meta element whose length was
    corrupted swallows the patient elements that follow, and pydicom would log them (Ray ships
    worker logs to the driver): nothing from pydicom is logged while this module reads a file."""
    import logging

    ds = ct_dataset(head_like(16), patient_id="PHI-ID-4711")
    ds.PatientName = "PHI^NAME"
    data = to_bytes(ds)
    ts, pid = find_span(data, "TransferSyntaxUID"), find_span(data, "PatientID")
    broken = set_length_field(data, ts, pid.end - ts.value_start)
    with caplog.at_level(logging.DEBUG):
        for source in (broken, data):
            try:
                load_slice(source)
            except DicomError as exc:
                assert "PHI" not in str(exc)
    assert not [r for r in caplog.records if "PHI" in r.getMessage()], [r.getMessage()[:120] for r in caplog.records]
    # the filter is scoped to this module's reads: pydicom still logs for everyone else
    with caplog.at_level(logging.WARNING):
        pydicom.config.logger.warning("outside the reader")
    assert "outside the reader" in caplog.text


def test_decoded_values_outside_bits_stored_are_rejected():
    """Found by the fuzz: a JPEG-LS slice whose BitsStored was garbled to 1. The decoder returns the
    codestream's 16-bit values; preprocess's window table assumed BitsStored and clipped them."""
    from ichd_ray.dicom.preprocess import preprocess_slice

    ds = ct_dataset(head_like(64))
    ds.compress(pydicom.uid.JPEGLSLossless)
    data = replace_value(to_bytes(ds), "BitsStored", struct_us(1), pad=b"")
    assert reason_of(data) == "decode_error"
    with pytest.raises(DicomError, match="outside BitsStored 1"):
        preprocess_slice(data, 32)


def test_jpeg_frame_header_after_long_app_segments_is_found():
    """APPn segments (up to 64 KiB each) may precede the SOF marker: the size check reads on."""
    ds = ct_dataset(head_like(64))
    ds.compress(pydicom.uid.JPEGLSLossless)
    plain = load_slice(to_bytes(ds)).hu
    from pydicom.encaps import generate_fragmented_frames

    frame = b"".join(next(generate_fragmented_frames(ds.PixelData)))
    app = b"\xff\xe2" + (0xFFFF).to_bytes(2, "big") + bytes(0xFFFD)  # APP2, 64 KiB
    ds.PixelData = encapsulate([frame[:2] + app * 2 + frame[2:]])
    np.testing.assert_array_equal(load_slice(to_bytes(ds)).hu, plain)


def test_rle_segment_decoding_past_its_end_is_a_decode_error():
    """Found by bench/fuzz.py: pylibjpeg-rle panics (pyo3's PanicException, a BaseException, which
    ``except Exception`` does not catch) when a segment decodes to more than Rows x Columns bytes."""
    ds = ct_dataset(head_like(64))
    run = b"\x81\x00"  # replicate the next byte 128 times
    first, second = run * 32 + b"\x81\x07", run * 32  # 4224 bytes (128 too many), 4096 bytes
    header = struct.pack("<16I", 2, 64, 64 + len(first), *([0] * 13))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
    ds.PixelData = encapsulate([header + first + second])
    ds["PixelData"].VR = "OB"
    assert reason_of(to_bytes(ds)) == "decode_error"


@pytest.mark.parametrize("vr", [b"UT", b"SQ", b"US", b"UN"])
def test_garbled_pixel_data_vr_is_rejected(vr):
    """Found by the fuzz: the reader trusted the pixel data's length whatever its VR, pydicom reads
    the value as text / a sequence / one short. UN is fine over native data, not encapsulated."""
    ds = ct_dataset(head_like(64))
    ds.compress(pydicom.uid.JPEG2000Lossless)
    for data in (ct_bytes(head_like(16)), to_bytes(ds)):
        span = find_span(data, "PixelData")
        data = data[: span.start + 4] + vr + data[span.start + 6 :]
        if vr == b"UN" and b"\xff\xff\xff\xff" != data[span.length_at : span.length_at + 4]:
            ct = load_slice(data)  # native UN: the dictionary VR (OW) applies
            np.testing.assert_array_equal(ct.hu, load_slice(ct_bytes(head_like(16))).hu)
            continue
        with pytest.raises(DicomError, match="PixelData: VR") as info:
            load_slice(data)
        assert info.value.reason == "bad_header"
