import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from ichd_ray.dicom.read import DicomError, load_slice
from ichd_ray.dicom.preprocess import block_sum, preprocess_slice
from ichd_ray.dicom.windowing import WindowSpec, window_slice

from dicom_factory import ct_bytes, ct_dataset, head_like, to_bytes


def assert_close_to_reference(data, size, **kwargs):
    fast = preprocess_slice(data, size, **kwargs)
    ref = window_slice(load_slice(data).hu, size, **({"windows": kwargs["windows"]} if "windows" in kwargs else {}))
    assert fast.dtype == np.uint8 and fast.shape == ref.shape == (ref.shape[0], size, size)
    diff = np.abs(fast.astype(int) - ref.astype(int))
    assert diff.max() <= 1
    return fast, ref, diff


ENCODINGS = {
    "int16": dict(signed=True, intercept=-1024),
    "uint12": dict(signed=False, bits_stored=12, intercept=-1024),
    "uint12_wrapped": dict(signed=False, bits_stored=12, intercept=0),
    "slope_0.5": dict(signed=True, slope=0.5, intercept=-1024),
    "slope_odd": dict(signed=True, slope=0.37, intercept=-1000.5),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("size", [32, 16, 24, 96])  # 64 px input: /2, /4, fractional, upsampling
def test_fast_path_matches_reference(encoding, size):
    stored = head_like(64, seed=3).astype(np.int32)
    if not ENCODINGS[encoding].get("signed", True):
        stored = np.clip(stored, 0, 4095)
    if encoding == "uint12_wrapped":  # values as the RSNA-wrapped files hold them
        stored = (stored - 1024) % 4096
    _, _, diff = assert_close_to_reference(ct_bytes(stored, **ENCODINGS[encoding]), size)
    if encoding != "slope_odd":  # integer arithmetic: exact
        assert diff.max() == 0


def test_fast_path_on_real_512_ct():
    data = open(get_testdata_file("693_UNCR.dcm"), "rb").read()
    fast, ref, diff = assert_close_to_reference(data, 256)
    assert diff.max() == 0
    # the brain window of a real head shows brain (neither all black nor all white)
    assert 20 < fast[0].mean() < 200


@pytest.mark.parametrize("name", ["693_J2KR.dcm", "bad_sequence.dcm", "CT_small.dcm"])
def test_fast_path_on_real_compressed_and_small_ct(name):
    data = open(get_testdata_file(name), "rb").read()
    assert_close_to_reference(data, 256)


def test_custom_windows():
    windows = (WindowSpec("soft", 40, 380), WindowSpec("brain", 40, 80))
    fast, _, _ = assert_close_to_reference(ct_bytes(head_like(32)), 16, windows=windows)
    assert fast.shape == (2, 16, 16)


def test_known_values_through_fast_path():
    stored = np.full((4, 4), 1024 + 40, dtype=np.int16)  # HU 40 everywhere
    stored[2:, 2:] = [[1024 - 1000, 1024 + 80], [1024 + 80, 1024 + 80]]  # mean HU -190
    out = preprocess_slice(ct_bytes(stored), 2)
    assert out[:, 0, 0].tolist() == [128, 76, 76]  # brain 127.5->128, subdural 76.5->76, bone 76.5->76
    assert out[:, 1, 1].tolist() == [0, 0, 56]  # bone: (-190 + 800) / 2800 * 255 = 55.55


def test_block_sum_is_exact():
    rng = np.random.default_rng(0)
    values = rng.integers(-32768, 32767, size=(12, 12)).astype(np.int16)
    for k in (1, 2, 3, 4):
        expected = values.astype(np.int64).reshape(12 // k, k, 12 // k, k).sum(axis=(1, 3))
        np.testing.assert_array_equal(block_sum(values, k), expected)


def test_same_rejections_as_load_slice():
    stored = head_like(32)
    mr = ct_dataset(stored)
    mr.Modality = "MR"
    for data, reason in [
        (b"", "empty"),
        (ct_bytes(stored)[:-64], "truncated"),
        (to_bytes(mr), "not_ct"),
        (ct_bytes(stored, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "localizer"),
    ]:
        with pytest.raises(DicomError) as info:
            preprocess_slice(data, 16, name="x.dcm")
        assert (info.value.reason, info.value.source) == (reason, "x.dcm")


def test_big_endian_native_syntax():
    stored = head_like(32)
    ds = ct_dataset(stored)
    little = to_bytes(ds)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    ds.PixelData = stored.astype(">i2").tobytes()  # pydicom writes OW bytes as given
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, little_endian=False, implicit_vr=False, force_encoding=True)
    big = buf.getvalue()
    assert load_slice(big).meta.transfer_syntax == pydicom.uid.ExplicitVRBigEndian
    np.testing.assert_array_equal(load_slice(big).hu, load_slice(little).hu)
    np.testing.assert_array_equal(preprocess_slice(big, 16), preprocess_slice(little, 16))


@pytest.mark.parametrize("size", [16, 24])  # integer ratio (table path) and fractional (float path)
def test_writes_into_a_given_slot(size):
    data = ct_bytes(head_like(32))
    study = np.zeros((2, 3, size, size), np.uint8)
    returned = preprocess_slice(data, size, out=study[1])
    assert returned is study[1] or np.shares_memory(returned, study)
    np.testing.assert_array_equal(study[1], preprocess_slice(data, size))
    assert not study[0].any()
    with pytest.raises(ValueError, match="out must be uint8"):
        preprocess_slice(data, size, out=np.zeros((3, size + 1, size), np.uint8))
