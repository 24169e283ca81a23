"""Hand-built CT DICOMs for tests: exact stored values and tags, written with pydicom."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import FileMetaDataset
from pydicom.uid import generate_uid


def ct_dataset(
    stored: np.ndarray,
    *,
    signed: bool = True,
    bits_stored: int = 16,
    slope: float = 1.0,
    intercept: float = -1024.0,
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    patient_id: str = "PAT-0001",
    position=(0.0, 0.0, 10.0),
    orientation=(1, 0, 0, 0, 1, 0),
    sop_uid: str | None = None,
) -> pydicom.Dataset:
    rows, cols = stored.shape
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.ImageType = list(image_type)
    ds.PatientID = patient_id
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.InstanceNumber = 7
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 5.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ct_bytes(stored: np.ndarray, **kwargs) -> bytes:
    return to_bytes(ct_dataset(stored, **kwargs))


def head_like(size: int = 64, seed: int = 0) -> np.ndarray:
    """Stored int16 values (HU + 1024) of a noisy disc: air, bone ring, brain with a bright spot."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(xx - size / 2, yy - size / 2) / (size / 2)
    hu = np.where(r < 0.8, 35.0, np.where(r < 0.9, 1200.0, -1000.0))
    hu[(np.abs(xx - size * 0.6) < 4) & (np.abs(yy - size * 0.5) < 4)] = 70.0
    hu += rng.normal(0, 8, hu.shape)
    return np.rint(hu + 1024).astype(np.int16)


# ------------------------------------------------------------------- byte-level element surgery
#
# The regression and fuzz tests edit *encoded* files, not datasets: pydicom refuses to write many of
# the values we need (``"-10x4"`` as DS, a 3-value ImageOrientationPatient, wrong VRs, odd lengths),
# and a reader must be tested on the bytes a broken writer produced, not on what pydicom would write.

# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


@dataclass(frozen=True)
class Span:
    """Where one top-level element lies in an encoded file.

    Attributes:
        tag: the element's tag as an int (group << 16 | element).
        keyword: its dictionary keyword ("" for private or unknown tags).
        start: offset of the element's first byte (its tag).
        value_start: offset of its value.
        end: offset just past the element (the next element's start, or the end of the file).
        length_at: offset of the length field.
        length_size: 2 (explicit VR, short form) or 4 bytes.
        little: byte order of the length field.
        vr: the explicit VR (e.g. "DS"), or None in implicit VR.
    """

    tag: int
    keyword: str
    start: int
    value_start: int
    end: int
    length_at: int
    length_size: int
    little: bool
    vr: str | None


def _meta_spans(data: bytes) -> tuple[list[Span], int]:
    """File meta elements (always explicit VR little endian, no sequences) after the preamble."""
    spans, pos = [], 132
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length_at, size, value_start = pos + 8, 4, pos + 12
            (length,) = struct.unpack_from("<I", data, length_at)
        else:
            length_at, size, value_start = pos + 6, 2, pos + 8
            (length,) = struct.unpack_from("<H", data, length_at)
        tag = (group << 16) | elem
        end = value_start + length
        spans.append(Span(tag, keyword_for_tag(tag) or "", pos, value_start, end, length_at, size, True, vr.decode()))
        pos = end
    return spans, pos


def element_spans(data: bytes) -> list[Span]:
    """Every top-level element of a valid file (file meta group, then the dataset), in file order.

    The dataset part trusts pydicom's ``value_tell`` of each raw element; an element ends where the
    next begins, so an undefined-length sequence or encapsulated pixel data spans its delimiters.

    Args:
        data: a well-formed DICOM file with a preamble (the seeds of the tests).
    """
    meta, start = _meta_spans(data)
    fp = io.BytesIO(data)
    ds = pydicom.dcmread(fp, force=True)
    implicit, little = ds.original_encoding
    # pydicom converts a few elements while reading (SpecificCharacterSet): they keep ``file_tell``
    tell = lambda e: e.value_tell if hasattr(e, "value_tell") else e.file_tell  # noqa: E731
    raw = sorted(ds._dict.values(), key=tell)
    spans: list[Span] = []
    for elem in raw:
        vt = tell(elem)
        if implicit:
            begin, length_at, size, vr = vt - 8, vt - 4, 4, None
        else:
            long_form = data[vt - 8 : vt - 6] in _LONG_VRS and data[vt - 6 : vt - 4] == b"\x00\x00"
            begin = vt - 12 if long_form else vt - 8
            length_at, size = (vt - 4, 4) if long_form else (vt - 2, 2)
            vr = data[begin + 4 : begin + 6].decode("latin-1")
        tag = int(elem.tag)
        assert struct.unpack_from("<HH" if little else ">HH", data, begin) == (tag >> 16, tag & 0xFFFF), hex(tag)
        spans.append(Span(tag, keyword_for_tag(tag) or "", begin, vt, -1, length_at, size, little, vr))
    ends = [s.start for s in spans[1:]] + [len(data)]
    spans = [Span(**{**s.__dict__, "end": e}) for s, e in zip(spans, ends)]
    assert not spans or spans[0].start == start, "dataset does not follow the file meta group"
    return meta + spans


def find_span(data: bytes, keyword_or_tag: str | int) -> Span:
    tag = tag_for_keyword(keyword_or_tag) if isinstance(keyword_or_tag, str) else keyword_or_tag
    for span in element_spans(data):
        if span.tag == tag:
            return span
    raise KeyError(keyword_or_tag)


def delete_element(data: bytes, keyword_or_tag: str | int) -> bytes:
    """The file without one element (its tag, VR, length and value)."""
    span = find_span(data, keyword_or_tag)
    return data[: span.start] + data[span.end :]


def set_length_field(data: bytes, span: Span, length: int) -> bytes:
    """Overwrite only the length field (the value bytes stay): the rest of the file shifts meaning."""
    fmt = ("<" if span.little else ">") + ("H" if span.length_size == 2 else "I")
    length &= 0xFFFF if span.length_size == 2 else 0xFFFFFFFF
    return data[: span.length_at] + struct.pack(fmt, length) + data[span.length_at + span.length_size :]


def replace_value(data: bytes, keyword_or_tag: str | int | Span, value: bytes, pad: bytes = b" ") -> bytes:
    """The file with one element's value replaced by ``value`` (padded to even length), length fixed up.

    Args:
        data: the file.
        keyword_or_tag: the element (or its :class:`Span`).
        value: the new value bytes, written as they are (no validation: that is the point).
        pad: padding byte for an odd-length value (space for text, NUL for UIDs and binary).
    """
    span = keyword_or_tag if isinstance(keyword_or_tag, Span) else find_span(data, keyword_or_tag)
    if len(value) % 2:
        value += pad
    limit = 0xFFFF if span.length_size == 2 else 0xFFFFFFFE
    value = value[:limit]
    out = data[: span.value_start] + value + data[span.end :]
    return set_length_field(out, span, len(value))


def text_value(data: bytes, keyword: str) -> bytes:
    span = find_span(data, keyword)
    return data[span.value_start : span.end]
