"""Fuzz the DICOM reader: mutate valid CT slices and check every outcome (issue 9, item 1).

Seeds are valid slices: pydicom's and pydicom-data's real CTs (native, JPEG lossless, JPEG 2000, one
with UN VRs) and synthetic ones (int16, 12-bit RSNA-wrapped, slope 0.5, implicit VR, big endian, RLE,
JPEG-LS, JPEG 2000, a ``ichd_ray.synthetic.generate`` slice), each with marker values in the patient-identifying
elements. A mutation edits the *encoded bytes* (what a broken writer or a bad disk produces): delete
an element, replace its value with garbage or a tricky string, rewrite its length or VR, claim
other Rows/Columns (65535 included), overwrite pixel payload bytes, truncate the file.

The oracle, for every mutated file:

* ``load_slice`` either raises :class:`DicomError` with a reason from ``REJECT_REASONS`` (any other
  exception fails), or returns HU equal, exactly, to an independent reading of the same bytes:
  pydicom's ``pixel_array`` (its own header parse, its own unused-bit masking, its own decoders)
  times pydicom's RescaleSlope plus RescaleIntercept, with the RSNA fix where it applies. For a
  mutated uncompressed payload that is stored x slope + intercept of the mutated bytes; for a
  mutated codestream it is whatever the decoder makes of it, which both paths share.
* an accepted slice has a finite position and every required field; neither the rejection message
  nor any pydicom log record emitted while reading holds a patient-identifying marker.
* ``preprocess_slice`` rejects with the same reason, or agrees within +-1 with windowing the HU;
  ``read_header`` agrees except for what only a decode can find.
* tracemalloc peak of the three reads stays under :data:`PEAK_BOUND` (below).

No timed assertions: ``deadline=None``; a hang is caught by pytest-timeout's thread method, which
dumps every stack and ends the run (the signal method would let hypothesis retry the hang forever).

Examples: ``ICHD_FUZZ_EXAMPLES`` (default 150 native + 100 compressed in CI); ``bench/fuzz.py`` runs
thousands and prints outcome counts.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import struct
import tracemalloc
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from ichd_ray.dicom.read import REJECT_REASONS, DicomError, load_slice, read_header
from ichd_ray.dicom.preprocess import preprocess_slice
from ichd_ray.dicom.windowing import window_slice

from dicom_factory import Span, ct_dataset, element_spans, head_like, set_length_field, to_bytes

# Peak traced allocation of one example's three reads. Honest work on the largest seed (512 x 512,
# 16 bit) is ~10 MiB: the 0.5 MiB file, stored values, int32 and float64 HU copies (1 + 2 MiB), a
# decoded array for compressed data, and preprocess's window table (up to 2^18 block sums x 8 B x a
# few arrays). A header that drove allocation (65535 x 65535 x 2 B = 8 GiB; even 8192 x 8192 x 2 B =
# 128 MiB, pydicom's preallocation for a compressed frame) lands far above. numpy reports to
# tracemalloc; the C decoders' own mallocs are not seen, which is why compressed frames are checked
# against the codestream's own dimensions before any decoder runs.
PEAK_BOUND = 64 << 20

MARKERS = {
    "PatientName": "FUZZPHI^NAME",
    "PatientID": "FUZZPHI-ID-31337",
    "PatientBirthDate": "19020304",
    "AccessionNumber": "FUZZPHIACC",
}
MARKER_PARTS = ("FUZZPHI", "31337", "19020304")

# Attributes a mutation targets more often than a uniformly drawn element.
INTERESTING = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "RescaleSlope",
    "RescaleIntercept", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "InstanceNumber", "ImageType", "Modality", "SOPClassUID", "NumberOfFrames",
    "TransferSyntaxUID", "PhotometricInterpretation", "PixelData",
)

TRICKY = [
    b"", b" ", b"\x00", b"-10x4", b"nan", b"NaN", b"inf", b"-inf", b"1e999", b"-1e999", b"0", b"-0",
    b"0.0", b"1_0", b"1,5", b"\\", b"1\\2", b"0\\0\\0", b"1\\0\\0\\0\\1\\0", b"1\\0\\0\\1\\0\\0",
    b"0\\0\\0\\0\\0\\0", b"65535", b"-1", b"4294967296", b"99999999999999999999", b"1" * 400,
    b"1.2.3", b"1.2..3", b"ISO_IR 100", b"MR", b"CT", b"DERIVED\\SECONDARY", b"ORIGINAL\\PRIMARY\\LOCALIZER",
    b"1.2.840.10008.5.1.4.1.1.4", b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.2", b"\xff\xfe\xfd",
    b"FUZZPHI-ID-31337", b"+.5E-2", b"  -1024  ", b"1.0", b"7.5",
]
VRS = [b"US", b"SS", b"DS", b"IS", b"UN", b"OB", b"OW", b"SQ", b"UI", b"CS", b"LO", b"UT", b"\x00\x00", b"zz"]
DIMENSIONS = [0, 1, 2, 15, 16, 63, 64, 65, 127, 128, 511, 512, 513, 4096, 8192, 8193, 65535]
USHORTS = [0, 1, 2, 7, 8, 11, 12, 15, 16, 17, 24, 32, 33, 64, 255, 256, 65535]


# -------------------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class Seed:
    """A valid slice to mutate: its bytes and the element spans of those bytes."""

    name: str
    data: bytes
    spans: tuple[Span, ...]
    compressed: bool
    size: int  # preprocess output side: half the seed's side, the production ratio (512 -> 256)


def _with_markers(ds: pydicom.Dataset) -> bytes:
    for keyword, value in MARKERS.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _real(name: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file(name))
    return _with_markers(ds)


def _synthetic(kind: str) -> bytes:
    stored = head_like(64, seed=7)
    if kind == "int16":
        return _with_markers(ct_dataset(stored))
    if kind == "uint12_rsna":  # HU mod 4096 with intercept 0: the RSNA fix applies
        return _with_markers(ct_dataset(((stored.astype(np.int32) - 1024) % 4096).astype(np.uint16), signed=False, bits_stored=12, intercept=0))
    if kind == "slope_half":
        return _with_markers(ct_dataset(stored, slope=0.5, intercept=-1000.5))
    if kind == "implicit":
        ds = ct_dataset(stored)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        return _with_markers(ds)
    if kind == "big_endian":
        ds = ct_dataset(stored)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
        ds.PixelData = stored.astype(">i2").tobytes()
        return _with_markers(ds)
    if kind in ("rle", "jpeg_ls", "j2k"):
        ds = ct_dataset(stored)
        syntax = {"rle": pydicom.uid.RLELossless, "jpeg_ls": pydicom.uid.JPEGLSLossless, "j2k": pydicom.uid.JPEG2000Lossless}[kind]
        ds.compress(syntax, **({"encoding_plugin": "pylibjpeg"} if kind == "rle" else {}))
        return _with_markers(ds)
    if kind == "synth":
        from ichd_ray.synthetic.generate import SynthConfig, plan_study, render_study

        cfg = SynthConfig(studies=1, slices=3, size=64, seed=3, compressed_fraction=0.0)
        data = render_study(cfg, plan_study(cfg, 0, 0))[0][1][1]
        return _with_markers(pydicom.dcmread(io.BytesIO(data)))
    raise ValueError(kind)


NATIVE_SEEDS = ("CT_small.dcm", "693_UNCR.dcm", "int16", "uint12_rsna", "slope_half", "implicit", "big_endian", "synth")
COMPRESSED_SEEDS = ("693_J2KR.dcm", "bad_sequence.dcm", "explicit_VR-UN.dcm", "rle", "jpeg_ls", "j2k")


@functools.lru_cache(maxsize=None)
def seed(name: str) -> Seed:
    data = _real(name) if name.endswith(".dcm") else _synthetic(name)
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return Seed(name, data, tuple(element_spans(data)), ds.file_meta.TransferSyntaxUID.is_compressed, ds.Rows // 2)


# ---------------------------------------------------------------------------------- mutations


def _put_us(data: bytes, span: Span, value: int) -> bytes:
    if span.end - span.value_start != 2:
        return data
    packed = struct.pack("<H" if span.little else ">H", value)
    return data[: span.value_start] + packed + data[span.end :]


def _replace(data: bytes, span: Span, value: bytes) -> bytes:
    """Replace a value and fix the length field (no padding: odd lengths are part of the test)."""
    limit = 0xFFFF if span.length_size == 2 else 0xFFFFFFFE
    value = value[:limit]
    return set_length_field(data[: span.value_start] + value + data[span.end :], span, len(value))


@st.composite
def mutation(draw, s: Seed):
    """One edit of one element: (description, function of the file bytes). Edits are drawn against
    the seed's spans and applied last-offset-first, so each span still points at its element."""
    spans = s.spans
    interesting = [sp for sp in spans if sp.keyword in INTERESTING]
    span = draw(st.sampled_from(interesting) if interesting and draw(st.booleans()) else st.sampled_from(spans))
    kinds = ["delete", "garbage", "tricky", "length", "vr"]
    if span.keyword in ("Rows", "Columns"):
        kinds += ["dims", "dims"]
    elif span.vr in ("US", None) and span.end - span.value_start == 2:
        kinds += ["ushort"]
    if span.keyword == "PixelData":
        kinds += ["pixels", "pixels", "pixels"]
    kind = draw(st.sampled_from(kinds))
    label = f"{kind} {span.keyword or hex(span.tag)}"
    if kind == "delete":
        return span, label, lambda d: d[: span.start] + d[span.end :]
    if kind == "garbage":
        value = draw(st.binary(max_size=40))
        return span, f"{label} {value!r}", lambda d: _replace(d, span, value)
    if kind == "tricky":
        value = draw(st.sampled_from(TRICKY) | st.text("0123456789+-.eE \\", max_size=24).map(str.encode))
        return span, f"{label} {value!r}", lambda d: _replace(d, span, value)
    if kind == "length":
        old = span.end - span.value_start
        length = draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF]) | st.integers(max(0, old - 4), old + 16) | st.integers(0, 2**32 - 1))
        return span, f"{label} {length}", lambda d: set_length_field(d, span, length)
    if kind == "vr":
        if span.vr is None:  # implicit VR: no VR bytes; overwrite the tag's element number instead
            new = struct.pack("<H" if span.little else ">H", draw(st.integers(0, 0xFFFF)))
            return span, f"{label} tag", lambda d: d[: span.start + 2] + new + d[span.start + 4 :]
        vr = draw(st.sampled_from(VRS))
        return span, f"{label} {vr!r}", lambda d: d[: span.start + 4] + vr + d[span.start + 6 :]
    if kind in ("dims", "ushort"):
        value = draw(st.sampled_from(DIMENSIONS if kind == "dims" else USHORTS) | st.integers(0, 0xFFFF))
        return span, f"{label} {value}", lambda d: _put_us(d, span, value)
    # pixels: overwrite a few payload bytes (for encapsulated data: anywhere in items and fragments)
    size = span.end - span.value_start
    edits = draw(st.lists(st.tuples(st.integers(0, max(0, size - 1)), st.integers(0, 255)), min_size=1, max_size=8))

    def poke(d: bytes) -> bytes:
        b = bytearray(d)
        for at, value in edits:
            if span.value_start + at < span.end:
                b[span.value_start + at] = value
        return bytes(b)

    return span, f"{label} {len(edits)} bytes", poke


class Case:
    """A mutated file; its repr (what hypothesis prints for a failure) names the seed and edits.
    Not a dataclass: hypothesis would print every field, the file's bytes included."""

    def __init__(self, seed: Seed, edits: str, data: bytes) -> None:
        self.seed, self.edits, self.data = seed, edits, data

    def __repr__(self) -> str:
        return f"Case({self.seed.name!r}, {self.edits!r}, {len(self.data)} bytes)"


@st.composite
def mutated(draw, names: tuple[str, ...]) -> Case:
    """1-3 element edits of one seed, on distinct elements, and maybe a truncation."""
    s = seed(draw(st.sampled_from(names)))
    edits = draw(st.lists(mutation(s), min_size=1, max_size=3, unique_by=lambda m: m[0].start))
    data = s.data
    for span, _, apply in sorted(edits, key=lambda m: -m[0].start):
        data = apply(data)
    labels = [label for _, label, _ in edits]
    if draw(st.integers(0, 9)) == 0:  # 1 in 10: truncation is also what most length edits cause
        # per mille of the length: hypothesis favours small integers, which would all cut the preamble
        cut = len(data) * draw(st.integers(1, 999)) // 1000
        data = data[:cut]
        labels.append(f"truncate at {cut}/{len(s.data)}")
    return Case(s, "; ".join(labels), data)


# ------------------------------------------------------------------------------------- oracle


def reference_hu(data: bytes) -> np.ndarray:
    """HU by pydicom alone: its header parse, its pixel_array, its rescale values (+ the RSNA fix)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if not str(ds.file_meta.get("TransferSyntaxUID", "")).strip("\x00 "):  # pydicom guessed: say so
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (
                pydicom.uid.ImplicitVRLittleEndian if implicit
                else pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
            )
        if not str(ds.get("PhotometricInterpretation", "")).strip():  # pydicom insists; HU do not depend on it
            ds.PhotometricInterpretation = "MONOCHROME2"
        stored = ds.pixel_array.astype(np.int64)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    if int(ds.BitsStored) == 12 and int(ds.PixelRepresentation) == 0 and intercept > -100:
        stored = stored + 1000
        stored[stored >= 4096] -= 4096
        intercept = -1000.0
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


class _Records(logging.Handler):
    """Collects pydicom's log records emitted while the readers run."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# Rejections only a decode can find (read_header accepts these files).
DECODE_ONLY = {"decode_error", "pixel_size_mismatch", "truncated"}


def check(data: bytes, size: int) -> str:
    """Run every reader on ``data`` and check the outcome (module docstring).

    Args:
        data: the (mutated) file.
        size: preprocess output side. Half the seed's side, as in production: the fast path's window
            table grows with (side / size)^2 x the value range (32 px from a 16-bit 512 px image
            is a 134 MiB table, by design of that path, not of the header).

    Returns:
        ``accepted`` or the rejection reason.
    """
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.utils")]
    for logger in loggers:
        logger.addHandler(records)
    tracemalloc.start()
    try:
        try:
            ct = load_slice(data, name="fuzz.dcm", rsna_fix=True)
            outcome = "accepted"
        except DicomError as exc:
            ct, outcome = None, exc.reason
            assert exc.reason in REJECT_REASONS and exc.reason not in ("duplicate", "other_series"), exc
            assert exc.source == "fuzz.dcm"
            assert not any(m in str(exc) for m in MARKER_PARTS), f"patient identifier in {exc}"
        try:
            pre = preprocess_slice(data, size, name="fuzz.dcm")
            pre_outcome = "accepted"
        except DicomError as exc:
            pre, pre_outcome = None, exc.reason
        try:
            header = read_header(data, name="fuzz.dcm")
            header_outcome = "accepted"
        except DicomError as exc:
            header, header_outcome = None, exc.reason
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        for logger in loggers:
            logger.removeHandler(records)
    assert peak < PEAK_BOUND, f"traced peak {peak / 2**20:.1f} MiB (outcome {outcome})"
    leaked = [m for m in records.messages if any(p in m for p in MARKER_PARTS)]
    assert not leaked, f"pydicom logged a patient identifier while reading: {leaked[0][:200]}"
    assert pre_outcome == outcome, (pre_outcome, outcome)
    if outcome in DECODE_ONLY:
        assert header_outcome in ("accepted", outcome), (header_outcome, outcome)
    elif outcome == "accepted":
        assert header_outcome == "accepted", header_outcome
    else:
        assert header_outcome == outcome, (header_outcome, outcome)
    if ct is None:
        return outcome
    meta = ct.meta
    assert header == meta
    assert isinstance(meta.position, float) and math.isfinite(meta.position)
    assert meta.study_uid and meta.series_uid and meta.sop_uid
    assert meta.rescale_slope != 0 and math.isfinite(meta.rescale_slope) and math.isfinite(meta.rescale_intercept)
    assert ct.hu.shape == (meta.rows, meta.cols) and ct.hu.dtype == np.float32
    expected = reference_hu(data)  # raises if pydicom cannot read what we accepted: a failure
    np.testing.assert_array_equal(ct.hu, expected)
    windowed = window_slice(ct.hu, size)
    assert pre.shape == windowed.shape
    assert np.abs(pre.astype(int) - windowed.astype(int)).max() <= 1
    return outcome


# -------------------------------------------------------------------------------------- tests

# pydicom warns on every odd value of a mutated file (and the oracle reads them all): noise here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Hypothesis keeps a cache under .hypothesis/: not in the shared working tree.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    import tempfile

    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "ichd-ray-hypothesis")

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,  # CI runs the same examples every time; bench/fuzz.py explores
    database=None,  # nothing written into the shared working tree
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_EXAMPLES = int(os.environ.get("ICHD_FUZZ_EXAMPLES", "0"))


def _examples(default: int) -> int:
    return _EXAMPLES or default


@pytest.mark.parametrize("name", NATIVE_SEEDS + COMPRESSED_SEEDS)
def test_seeds_are_accepted_exactly(name):
    s = seed(name)
    assert check(s.data, s.size) == "accepted"
    if name.endswith(".dcm"):  # the marker rewrite changed nothing the reader uses
        np.testing.assert_array_equal(load_slice(s.data).hu, load_slice(get_testdata_file(name)).hu)


@pytest.mark.timeout(300, method="thread")
@pytest.mark.parametrize("name", ["CT_small.dcm", "int16", "implicit", "big_endian", "rle", "j2k"])
def test_deleting_any_element(name):
    """Every top-level element of a seed deleted in turn (exhaustive, not sampled; of CT_small's 179
    private elements, which the reader never looks at, every tenth)."""
    s = seed(name)
    required = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns", "BitsAllocated",
                "BitsStored", "PixelRepresentation", "SamplesPerPixel", "RescaleSlope", "RescaleIntercept",
                "ImagePositionPatient", "ImageOrientationPatient"}
    private = [sp for sp in s.spans if (sp.tag >> 16) % 2]
    for span in s.spans:
        if (span.tag >> 16) % 2 and private.index(span) % 10:
            continue
        data = s.data[: span.start] + s.data[span.end :]
        outcome = check(data, s.size)
        if span.keyword in required:
            assert outcome == "bad_header", (span.keyword, outcome)
            with pytest.raises(DicomError, match=f"{span.keyword}: absent"):
                load_slice(data)
        elif span.keyword == "PixelData":
            assert outcome == "no_pixel_data"
        elif span.tag >> 16 not in (0x0002, 0x0008, 0x0028, 0x7FE0) and span.keyword not in (
            "ImageType", "StudyInstanceUID"
        ):
            # patient, study, series, equipment and frame-of-reference elements: nothing we need
            assert outcome == "accepted", (span.keyword or hex(span.tag), outcome)


@pytest.mark.parametrize("name", NATIVE_SEEDS + COMPRESSED_SEEDS)
def test_claimed_65535_by_65535_allocates_nothing(name):
    s = seed(name)
    data = s.data
    for span in sorted((sp for sp in s.spans if sp.keyword in ("Rows", "Columns")), key=lambda sp: -sp.start):
        data = _put_us(data, span, 65535)
    assert check(data, s.size) == "pixel_size_mismatch"


@pytest.mark.timeout(300, method="thread")
@settings(settings.get_profile("ci"), max_examples=_examples(150))
@given(mutated(NATIVE_SEEDS))
def test_fuzz_native(case):
    event(check(case.data, case.seed.size))  # outcome counts: pytest --hypothesis-show-statistics


@pytest.mark.timeout(300, method="thread")
@settings(settings.get_profile("ci"), max_examples=_examples(100))
@given(mutated(COMPRESSED_SEEDS))
def test_fuzz_compressed(case):
    event(check(case.data, case.seed.size))
