"""Head-CT DICOM reading: header checks, stored pixel values, Hounsfield units. Pure functions, no Ray.

One parse per file. The header is read with pydicom up to the pixel data; the pixel data element is
then located in the original bytes, so uncompressed pixels are a zero-copy ``np.frombuffer`` view and
nothing a header merely claims is ever allocated. Compressed (encapsulated) pixel data is walked item by
item (truncation is caught there), its codestream header (JPEG SOF, JPEG 2000 SIZ, RLE segment table)
is checked against Rows x Columns, and only then is it handed to pydicom's decoders (pylibjpeg,
openjpeg, libjpeg, CharLS).

Every file that cannot be scored raises :class:`DicomError` with a stable ``reason`` code, checked in
the order of :data:`REJECT_REASONS`. PatientID leaves this module only as a salted hash; no message
quotes a value that overlaps a patient-identifying element, and pydicom's own log records (which
quote raw values) are dropped while this module reads.

Header rule (``bad_header``): nothing the pipeline needs is defaulted. Required: the three UIDs
(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID: one non-empty value of printable characters;
not PS3.5's digits-and-dots, since anonymizers write hashes), Rows, Columns, BitsAllocated,
BitsStored, PixelRepresentation (0 or 1), SamplesPerPixel, RescaleSlope (non-zero), RescaleIntercept,
ImagePositionPatient (3 values) and ImageOrientationPatient (6 values, a non-degenerate normal), each
finite. Absent, empty, the wrong number of values, an explicit VR other than the dictionary's (or UN),
or a value that does not parse rejects the file with a message naming the attribute and why. So an
accepted slice always has a ``position``. Parsing is DICOM's, not Python's: a DS matches PS3.5's
decimal string (``float()`` would also take ``nan``, ``inf`` and ``1_0``), an IS its integer string
(``7.0`` tolerated, as pydicom does) within 32 bits.

Optional attributes we use (InstanceNumber, SliceThickness, PixelSpacing (2 positive values),
NumberOfFrames, PhotometricInterpretation): absent or empty reads as None; *present but garbled is
rejected too*, deliberately. A garbled value is evidence of a corrupted header, and reading it as
"absent" would change series selection (thickness), ordering ties (InstanceNumber) or the frame
count without a trace; a rejection is counted and names the attribute, and an attribute can be
relaxed when a real archive shows a harmless quirk. PhotometricInterpretation, when present, must be
MONOCHROME1/2 (other defined values: ``decode_error``, not a CT we can score); absent is accepted
because HU do not depend on it (pydicom's decoders still need it for compressed data). Attributes
we do not use (WindowCenter, ...) are not read at all. Classification attributes (Modality,
SOPClassUID, ImageType, TransferSyntaxUID) are read as text: a garbled value classifies as what it
says (e.g. ``not_ct``); a transfer syntax that contradicts the pixel data's encoding is ``bad_header``.

Selection reasons (localizer, derived, multi_frame) are checked before ``bad_header``: a scout or an
Enhanced CT keeps its geometry elsewhere and is left out on purpose, not a fault. A garbled
attribute that an earlier check needs (NumberOfFrames) is ``bad_header`` at that check.

HU = stored x RescaleSlope + RescaleIntercept. The RSNA fix: some 12-bit unsigned images carry a
RescaleIntercept > -100 although their values were written as ``HU mod 4096`` (air wraps to ~3000);
for those, ``x = stored + 1000; x[x >= 4096] -= 4096; intercept = -1000`` restores HU. It originated in
a widely used RSNA 2019 Kaggle kernel and is applied by default (``rsna_fix=False`` turns it off).

Why one module of ~1,050 lines: every check runs on the same single parse of one file, in the order of
:data:`REJECT_REASONS`; the header rule, locating the pixel data, walking encapsulated fragments and the
codestream checks share that state and each other's helpers. Split by step, one rule book would be spread
over files that all import each other's private names.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import io
import logging
import math
import os
import re
import struct
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from ichd_ray.reasons import REJECT_REASONS

__all__ = [
    "REJECT_REASONS",
    "DicomError",
    "IncompleteHeader",
    "SliceMeta",
    "CtSlice",
    "ParsedDicom",
    "parse_dicom",
    "check_header",
    "read_header",
    "decode_stored",
    "stored_to_hu",
    "rsna_fix_applies",
    "slice_normal",
    "load_slice",
    "hash_patient_id",
    "patient_salt",
    "read_source",
]

Source = Union[bytes, bytearray, memoryview, str, os.PathLike]

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
_ENHANCED_CT = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
_LOCALIZER_TOKENS = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM", "SURVIEW"}
_PIXEL_DATA_TAG = 0x7FE00010
_FLOAT_PIXEL_TAGS = {0x7FE00008, 0x7FE00009}
# Never hand a decoder an image larger than this (a header can claim anything).
MAX_PIXELS = 8192 * 8192
_DEV_SALT = "ichd-ray-development-salt"
_NATIVE_SYNTAXES = {
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
}


class IncompleteHeader(Exception):
    """A prefix given to :func:`read_header` ends before the pixel data: read more bytes (or all)."""

    def __init__(self, source: str, have: int) -> None:
        self.source, self.have = source, have
        super().__init__(f"{source}: header extends past the first {have} bytes")

    def __reduce__(self):
        return (IncompleteHeader, (self.source, self.have))


class DicomError(ValueError):
    """A file that cannot be scored.

    Attributes:
        reason: stable code from :data:`REJECT_REASONS`.
        source: the file's name or URI.
        message: human-readable detail.
    """

    def __init__(self, reason: str, source: str, message: str = "") -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        self.reason = reason
        self.source = source
        self.message = message
        super().__init__(f"{source}: {reason}" + (f": {message}" if message else ""))

    def __reduce__(self):  # keep the fields across Ray's pickling
        return (DicomError, (self.reason, self.source, self.message))


@dataclass(frozen=True)
class SliceMeta:
    """Header fields of one CT slice (no PHI: PatientID only as a salted hash)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    patient_hash: str | None
    position: float  # along the slice normal, mm (ImagePositionPatient . normal); never None since bad_header
    instance_number: int | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    image_type: tuple[str, ...]
    transfer_syntax: str
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    rescale_slope: float
    rescale_intercept: float
    image_position: tuple[float, float, float] | None = None  # always set by this module
    image_orientation: tuple[float, ...] | None = None  # always set (6 values, non-degenerate)
    modality: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CtSlice:
    """A decoded CT slice: ``hu`` float32 (rows, cols) in Hounsfield units, and its header."""

    hu: np.ndarray
    meta: SliceMeta


@dataclass
class ParsedDicom:
    """One parse of a DICOM byte string: header dataset plus where the pixel data lies."""

    name: str
    data: bytes
    dataset: pydicom.Dataset = field(repr=False)
    transfer_syntax: UID
    pixel_offset: int | None  # offset of the pixel data value in ``data``
    pixel_length: int | None  # value length; None when encapsulated
    encapsulated: bool
    meta: SliceMeta | None = None
    complete: bool = True  # False when parsed from a prefix: headers only, no decoding
    pixel_vr: str | None = None  # the pixel data's explicit VR (None: implicit VR)


# ------------------------------------------------------------------------------ pydicom quiet

_READING = threading.local()


class _WhileReading(logging.Filter):
    """Drops pydicom's log records emitted while this module reads a file, in that thread only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_READING, "depth", 0)


# pydicom logs (and warns) every invalid value it converts, quoted; in a corrupted file a quoted
# value can hold patient identifiers (a bad length swallows the elements that follow), and Ray ships
# worker logs to the driver. The reader reports through DicomError instead. Filters sit on the
# loggers pydicom creates records on (a parent's filter does not see a child's records).
for _logger in ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.utils"):
    logging.getLogger(_logger).addFilter(_WhileReading())


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """No pydicom warnings or log records inside (other threads and callers are unaffected)."""
    _READING.depth = getattr(_READING, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _READING.depth -= 1


def _quietly(fn):
    """Run ``fn`` under :func:`_quiet_pydicom` (every public reader that lets pydicom touch values)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _quiet_pydicom():
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------- sources


def read_source(source: Source, name: str | None = None) -> tuple[bytes, str]:
    """Bytes and a display name from bytes or a local path (a convenience for tools and tests).

    Object storage is the caller's business (:mod:`ichd_ray.io.storage`): this layer parses bytes and
    does no network I/O, so a URI is refused rather than fetched.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<bytes>"
    path = os.fspath(source)
    if "://" in path:
        raise ValueError(f"{path}: a storage URI; read it with ichd_ray.io.storage.read_bytes and pass the bytes")
    with open(path, "rb") as fh:
        return fh.read(), name or path


# ------------------------------------------------------------------------------ patient ids


def patient_salt(salt: str | None = None) -> str:
    """The PatientID salt: explicit value, else ``ICHD_PATIENT_SALT``, else a development salt (warns)."""
    if salt:
        return salt
    env = os.environ.get("ICHD_PATIENT_SALT")
    if env:
        return env
    _warn_development_salt()
    return _DEV_SALT


@functools.lru_cache(maxsize=1)
def _warn_development_salt() -> None:
    """Once per process (warnings' own once-registry is reset by every catch_warnings block)."""
    warnings.warn(
        "ICHD_PATIENT_SALT is not set: PatientIDs are hashed with the fixed development salt; "
        "set a secret salt for real data",
        stacklevel=4,
    )


def hash_patient_id(patient_id: str | None, salt: str | None = None) -> str | None:
    """Salted HMAC-SHA256 of a PatientID, 32 hex characters; stable for a given salt. None when empty."""
    if patient_id is None or str(patient_id).strip() == "":
        return None
    key = patient_salt(salt).encode("utf-8")
    return hmac.new(key, str(patient_id).strip().encode("utf-8"), hashlib.sha256).hexdigest()[:32]


# ----------------------------------------------------------------------------------- parsing


#: keyword -> (tag, dictionary VR) of every element this module reads.
_ELEMENTS: dict[str, tuple[int, str]] = {
    kw: (tag_for_keyword(kw), dictionary_VR(tag_for_keyword(kw)))  # type: ignore[arg-type]
    for kw in (
        "TransferSyntaxUID", "SOPClassUID", "Modality", "ImageType", "NumberOfFrames", "PatientID",
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber",
        "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
        "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
        "RescaleSlope", "RescaleIntercept", "PhotometricInterpretation",
    )
}
# Patient-identifying elements: a value that overlaps one of theirs is never echoed in a message
# (a corrupted length can make their bytes part of another element's value).
_PHI_TAGS = (0x00100010, 0x00100020, 0x00100030, 0x00080050, 0x00101000, 0x00101001, 0x00101040)
# DICOM's decimal and integer strings (PS3.5 6.2). Python's float() also takes "nan", "inf",
# "1_000" and "\u0661": none of those is a DS, and each would slip through as a number.
_DS = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")  # [0-9]: \d is any Unicode digit
_IS = re.compile(r"[+-]?[0-9]{1,12}(?:\.0*)?\Z")  # "7.0" tolerated, as pydicom does
# UIDs: printable ASCII without spaces. Not PS3.5's digits-and-dots: anonymizers write hashes
# (pydicom's bad_sequence.dcm holds 64 hex digits) and those still identify a study uniquely.
_UID = re.compile(r"[!-~]+\Z")
_PRINTABLE = re.compile(r"[ -~]{0,32}\Z")


def _text_values(value: Any) -> list[str]:
    """Values of a text element: raw bytes split on backslash, or an already-converted pydicom value.
    Padding (spaces, NULs) is stripped; an element holding only padding has no values."""
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("latin-1").strip("\x00 ")
        return [p.strip("\x00 ") for p in text.split("\\")] if text else []
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    out = [str(v).strip("\x00 ") for v in items]
    return [] if out == [""] else out


def _lenient_text(ds: pydicom.Dataset, keyword: str) -> list[str]:
    """Text values for classification only (Modality, SOP class, ImageType, transfer syntax): no VR
    check and nothing to parse, so nothing can fail; a garbled value classifies as what it says."""
    elem = ds._dict.get(_ELEMENTS[keyword][0])
    return [] if elem is None else _text_values(elem.value)


class _Header:
    """Typed reads of one dataset's elements. Distinguishes absent (None) from present; a present
    value that does not parse raises ``bad_header`` naming the attribute and why.

    Raw elements (all of them straight after ``dcmread``) are decoded here: pydicom's generic
    conversion costs ~40 us per element and a slice reads ~20. Elements pydicom already converted
    (file meta, a deflated dataset read whole) are read from their converted values.
    """

    __slots__ = ("ds", "name")

    def __init__(self, ds: pydicom.Dataset, name: str) -> None:
        self.ds, self.name = ds, name

    def fail(self, keyword: str, why: str) -> DicomError:
        return DicomError("bad_header", self.name, f"{keyword}: {why}")

    def shown(self, value: str) -> str:
        """``value`` quoted, when it is short printable text that overlaps no patient identifier."""
        if not _PRINTABLE.match(value):
            return f"({len(value)} characters)"
        probe = value.strip().upper()
        if len(probe) >= 3:
            for tag in _PHI_TAGS:
                elem = self.ds._dict.get(tag)
                for phi in _text_values(elem.value) if elem is not None else ():
                    phi = phi.upper()
                    if len(phi) >= 3 and (phi in probe or probe in phi):
                        return f"({len(value)} characters, overlaps a patient identifier: not shown)"
        return repr(value)

    def element(self, keyword: str) -> Any:
        """The element, or None when absent; raises when its explicit VR is neither the dictionary
        VR nor UN (UN is legal and is read with the dictionary VR, as pydicom does)."""
        tag, want = _ELEMENTS[keyword]
        elem = self.ds._dict.get(tag)
        if elem is not None and elem.VR is not None and elem.VR not in (want, "UN"):
            raise self.fail(keyword, f"VR {elem.VR!r}, expected {want}")
        return elem

    def texts(self, keyword: str, required: bool) -> list[str] | None:
        elem = self.element(keyword)
        if elem is None:
            if required:
                raise self.fail(keyword, "absent")
            return None
        values = _text_values(elem.value)
        if not values:
            if required:
                raise self.fail(keyword, "empty value")
            return None
        return values

    def uid(self, keyword: str) -> str:
        """A required UID: present, one non-empty value of printable characters."""
        elem = self.element(keyword)
        if elem is None:
            raise self.fail(keyword, "absent")
        values = _text_values(elem.value)
        if not values or values == [""]:
            raise self.fail(keyword, "empty UID")
        if len(values) != 1:
            raise self.fail(keyword, f"has {len(values)} values, expected 1")
        if not _UID.match(values[0]):
            raise self.fail(keyword, f"unparseable value {self.shown(values[0])}")
        return values[0]

    def decimals(self, keyword: str, n: int, required: bool) -> tuple[float, ...] | None:
        """Exactly ``n`` finite decimal strings (DS)."""
        values = self.texts(keyword, required)
        if values is None:
            return None
        if len(values) != n:
            raise self.fail(keyword, f"has {len(values)} values, expected {n}")
        out = []
        for v in values:
            if not _DS.match(v):
                raise self.fail(keyword, f"unparseable value {self.shown(v)}")
            f = float(v)
            if not math.isfinite(f):
                raise self.fail(keyword, f"non-finite value {self.shown(v)}")
            out.append(f)
        return tuple(out)

    def integer(self, keyword: str) -> int | None:
        """An optional integer string (IS), within DICOM's signed 32-bit range."""
        values = self.texts(keyword, False)
        if values is None:
            return None
        if len(values) != 1:
            raise self.fail(keyword, f"has {len(values)} values, expected 1")
        if not _IS.match(values[0]):
            raise self.fail(keyword, f"unparseable value {self.shown(values[0])}")
        out = int(values[0].split(".")[0])
        if not -(2**31) <= out < 2**31:
            raise self.fail(keyword, f"value {out} out of range")
        return out

    def ushort(self, keyword: str) -> int:
        """A required unsigned short (US), one value."""
        elem = self.element(keyword)
        if elem is None:
            raise self.fail(keyword, "absent")
        value = elem.value
        if isinstance(value, (bytes, bytearray)) or value is None:
            raw = bytes(value or b"")
            if not raw:
                raise self.fail(keyword, "empty value")
            if len(raw) % 2:
                raise self.fail(keyword, f"unparseable value ({len(raw)} bytes, not unsigned shorts)")
            little = getattr(elem, "is_little_endian", self.ds.original_encoding[1] is not False)
            values = struct.unpack(("<" if little is not False else ">") + f"{len(raw) // 2}H", raw)
        else:
            values = tuple(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else (value,)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise self.fail(keyword, "unparseable value (not an unsigned short)")
        if len(values) != 1:
            raise self.fail(keyword, f"has {len(values)} values, expected 1")
        return int(values[0])


def _pixel_format(h: _Header) -> tuple[int, int, int, int, int]:
    """Rows, Columns, BitsAllocated, BitsStored, PixelRepresentation (all required, US)."""
    rows, cols = h.ushort("Rows"), h.ushort("Columns")
    bits_allocated, bits_stored = h.ushort("BitsAllocated"), h.ushort("BitsStored")
    representation = h.ushort("PixelRepresentation")
    if representation not in (0, 1):
        raise h.fail("PixelRepresentation", f"invalid value {representation} (0 or 1)")
    return rows, cols, bits_allocated, bits_stored, representation


def _looks_like_raw_dataset(data: bytes) -> bool:
    """A DICOM file without preamble starts with a group 0002 (meta) or 0008 element."""
    if len(data) < 8:
        return False
    group_le = struct.unpack_from("<H", data, 0)[0]
    group_be = struct.unpack_from(">H", data, 0)[0]
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


def _check_raw_lengths(ds: pydicom.Dataset, name: str) -> None:
    """pydicom silently reads short values at end of file; a value shorter than its length is truncation."""
    for elem in list(ds._dict.values()):  # raw elements are not converted (cheap)
        length = getattr(elem, "length", None)
        value = getattr(elem, "value", None)
        if isinstance(value, (bytes, bytearray)) and length is not None and length != 0xFFFFFFFF:
            if len(value) < length:
                raise DicomError(
                    "truncated", name, f"element {elem.tag} holds {len(value)} of {length} bytes"
                )


def _walk_encapsulated(data: bytes, start: int, name: str) -> int:
    """End offset (exclusive, before the sequence delimiter) of encapsulated pixel data items."""
    pos, n = start, len(data)
    while True:
        if pos + 8 > n:
            raise DicomError("truncated", name, "encapsulated pixel data ends before its delimiter")
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            raise DicomError("decode_error", name, f"bad item ({group:04X},{elem:04X}) in encapsulated pixel data")
        if pos + 8 + length > n:
            raise DicomError("truncated", name, f"pixel data item needs {length} bytes, {n - pos - 8} remain")
        pos += 8 + length


@_quietly
def parse_dicom(data: bytes, name: str = "<bytes>", total_size: int | None = None) -> ParsedDicom:
    """Parse the header and locate the pixel data; raises ``empty``, ``not_dicom`` or ``truncated``.

    Args:
        data: the whole file, or (for header-only use, with ``total_size``) a prefix of it.
        name: file name or URI used in errors.
        total_size: size of the whole object when ``data`` is a prefix (a byte-range read): checks
            then use it, and :class:`IncompleteHeader` asks for more bytes if the prefix ends before
            the pixel data element.
    """
    prefix = total_size is not None and total_size > len(data)
    if total_size == 0 or len(data) == 0:
        raise DicomError("empty", name, "0 bytes")
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    if not has_preamble and not _looks_like_raw_dataset(data):
        raise DicomError("not_dicom", name, "no DICM preamble and no DICOM element at the start")
    fp = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not has_preamble)
    except (InvalidDicomError, EOFError, struct.error) as exc:
        reason = "truncated" if has_preamble and isinstance(exc, (EOFError, struct.error)) else "not_dicom"
        raise DicomError(reason, name, f"unreadable header: {exc}") from None
    except Exception as exc:  # pydicom raises many types on garbage
        raise DicomError("not_dicom", name, f"unreadable header: {type(exc).__name__}: {exc}") from None
    if not has_preamble and not _lenient_text(ds, "SOPClassUID") and not _lenient_text(ds, "Modality"):
        raise DicomError("not_dicom", name, "no SOPClassUID or Modality in header")
    try:
        _check_raw_lengths(ds, name)
        if getattr(ds, "file_meta", None) is not None:
            _check_raw_lengths(ds.file_meta, name)
    except DicomError:
        if prefix:
            raise IncompleteHeader(name, len(data)) from None
        raise

    meta_ts = (_lenient_text(ds.file_meta, "TransferSyntaxUID") or [None])[0] if getattr(ds, "file_meta", None) else None
    is_implicit, is_little = ds.original_encoding
    if meta_ts is None:
        meta_ts = (
            pydicom.uid.ImplicitVRLittleEndian
            if is_implicit
            else (pydicom.uid.ExplicitVRLittleEndian if is_little else pydicom.uid.ExplicitVRBigEndian)
        )
    ts = UID(str(meta_ts))

    pixel_offset = pixel_length = pixel_vr = None
    encapsulated = False
    pos, n = fp.tell(), len(data)
    if prefix and (pos >= n or n - pos < 12 or ts == pydicom.uid.DeflatedExplicitVRLittleEndian):
        raise IncompleteHeader(name, n)
    size = total_size if prefix else n
    if ts == pydicom.uid.DeflatedExplicitVRLittleEndian:
        # Offsets refer to the inflated stream: let pydicom read it whole (rare syntax).
        full = _full_read(data, name)
        if "PixelData" in full:
            ds = full
            pixel_length = len(full.PixelData)
    elif n - pos > 0:
        endian = "<" if is_little else ">"
        if n - pos < 8:
            raise DicomError("truncated", name, f"{n - pos} stray bytes where an element should start")
        group, elem = struct.unpack_from(endian + "HH", data, pos)
        tag = (group << 16) | elem
        if tag == _PIXEL_DATA_TAG:
            # Some writers switch to implicit VR mid-file (pydicom reads past it): trust the bytes.
            if is_implicit or not data[pos + 4 : pos + 6].isalpha():
                (length,), header = struct.unpack_from(endian + "I", data, pos + 4), 8
            else:
                if n - pos < 12:
                    raise DicomError("truncated", name, "pixel data element header cut off")
                (length,), header = struct.unpack_from(endian + "I", data, pos + 8), 12
                pixel_vr = data[pos + 4 : pos + 6].decode("latin-1")
            pixel_offset = pos + header
            if length == 0xFFFFFFFF:
                encapsulated = True
            else:
                if pixel_offset + length > size:
                    raise DicomError(
                        "truncated", name, f"pixel data claims {length} bytes, {size - pixel_offset} present"
                    )
                pixel_length = length
        elif tag in _FLOAT_PIXEL_TAGS:
            pixel_offset = None  # float pixel data: not a CT image; reported as no_pixel_data
    return ParsedDicom(name, data, ds, ts, pixel_offset, pixel_length, encapsulated, complete=not prefix, pixel_vr=pixel_vr)


def _full_read(data: bytes, name: str) -> pydicom.Dataset:
    try:  # under parse_dicom's _quiet_pydicom
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise DicomError("decode_error", name, f"{type(exc).__name__}: {exc}") from None


def slice_normal(orientation: tuple[float, ...] | None) -> tuple[float, float, float] | None:
    """Unit normal (row x column direction) of ImageOrientationPatient; None when missing or degenerate.

    Plain floats: numpy costs more than it saves on 3-vectors, and this runs once per slice."""
    if orientation is None:
        return None
    (rx, ry, rz), (cx, cy, cz) = orientation[:3], orientation[3:]
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    norm = math.sqrt(sum(v * v for v in normal))
    return None if norm <= 1e-6 else (normal[0] / norm, normal[1] / norm, normal[2] / norm)


def _slice_meta(ds: pydicom.Dataset, ts: UID, salt: str | None, hash_patient: bool, name: str) -> tuple[SliceMeta, int]:
    """Every header field the pipeline uses, each parsed strictly (module docstring: the rule), and
    SamplesPerPixel (checked by :func:`_check_pixels`, not kept)."""
    h = _Header(ds, name)
    study_uid, series_uid, sop_uid = h.uid("StudyInstanceUID"), h.uid("SeriesInstanceUID"), h.uid("SOPInstanceUID")
    rows, cols, bits_allocated, bits_stored, representation = _pixel_format(h)
    samples = h.ushort("SamplesPerPixel")
    slope = h.decimals("RescaleSlope", 1, True)[0]  # type: ignore[index]
    if slope == 0:
        raise h.fail("RescaleSlope", "is 0 (every pixel would read as the intercept)")
    intercept = h.decimals("RescaleIntercept", 1, True)[0]  # type: ignore[index]
    ipp = h.decimals("ImagePositionPatient", 3, True)
    iop = h.decimals("ImageOrientationPatient", 6, True)
    normal = slice_normal(iop)
    if normal is None:
        raise h.fail("ImageOrientationPatient", "degenerate orientation (row x column direction is zero)")
    spacing = h.decimals("PixelSpacing", 2, False)
    if spacing is not None and not (spacing[0] > 0 and spacing[1] > 0):
        raise h.fail("PixelSpacing", f"not positive: {spacing[0]:g}\\{spacing[1]:g}")
    thickness = h.decimals("SliceThickness", 1, False)
    instance = h.integer("InstanceNumber")
    image_type = tuple(v.upper() for v in _lenient_text(ds, "ImageType"))
    patient = _lenient_text(ds, "PatientID") if hash_patient else []
    modality = _lenient_text(ds, "Modality")
    meta = SliceMeta(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        patient_hash=hash_patient_id("\\".join(patient), salt) if patient else None,
        position=sum(p * v for p, v in zip(ipp, normal)),  # type: ignore[arg-type]
        instance_number=instance,
        pixel_spacing=spacing,  # type: ignore[arg-type]
        slice_thickness=thickness[0] if thickness else None,
        image_type=image_type,
        transfer_syntax=str(ts),
        rows=rows,
        cols=cols,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=representation,
        rescale_slope=slope,
        rescale_intercept=intercept,
        image_position=ipp,  # type: ignore[arg-type]
        image_orientation=iop,
        modality=modality[0] if modality else None,
    )
    return meta, samples


def check_header(parsed: ParsedDicom, salt: str | None = None, *, hash_patient: bool = True) -> SliceMeta:
    """Header-level rejections, in order: not_ct, localizer, derived, multi_frame, no_pixel_data,
    bad_header, pixel_size_mismatch, missing_codec. Sets and returns ``parsed.meta``.

    Args:
        parsed: from :func:`parse_dicom` (a prefix is enough).
        salt: PatientID salt (default ``ICHD_PATIENT_SALT``).
        hash_patient: False leaves ``patient_hash`` empty (the pixel path never needs it).

    Raises:
        DicomError: ``bad_header`` names the attribute and why (module docstring: the rule).
    """
    with _quiet_pydicom():
        return _check_header(parsed, salt, hash_patient)


def _check_header(parsed: ParsedDicom, salt: str | None, hash_patient: bool = True) -> SliceMeta:
    ds, name = parsed.dataset, parsed.name
    modality = (_lenient_text(ds, "Modality") or [""])[0].upper()
    sop_class = (_lenient_text(ds, "SOPClassUID") or [""])[0]
    h = _Header(ds, name)
    if modality and modality != "CT":
        raise DicomError("not_ct", name, f"Modality {h.shown(modality)}")
    if sop_class and sop_class not in CT_SOP_CLASSES:
        raise DicomError("not_ct", name, f"SOP class {_uid_label(h, sop_class)}")
    if not modality and not sop_class:
        raise DicomError("not_ct", name, "no Modality and no SOP class")
    # Selection reasons before bad_header: a scout or an Enhanced CT keeps its geometry elsewhere
    # (or not at all) and is left out on purpose, not a fault.
    image_type = tuple(v.upper() for v in _lenient_text(ds, "ImageType"))
    if _LOCALIZER_TOKENS & set(image_type):
        raise DicomError("localizer", name, "ImageType " + h.shown("\\".join(image_type)))
    if image_type and image_type[0] == "DERIVED":
        raise DicomError("derived", name, "ImageType " + h.shown("\\".join(image_type)))
    frames = h.integer("NumberOfFrames")
    if frames is not None and frames < 0:
        raise DicomError("bad_header", name, f"NumberOfFrames: negative value {frames}")
    frames = frames or 1  # 0 or absent: one frame (as pydicom reads it)
    if frames != 1 or sop_class in _ENHANCED_CT:
        raise DicomError("multi_frame", name, f"{frames} frames ({CT_SOP_CLASSES.get(sop_class, 'CT')})")
    if parsed.pixel_offset is None and parsed.pixel_length is None:
        raise DicomError("no_pixel_data", name, "no (7FE0,0010) Pixel Data element")
    meta, samples = _slice_meta(ds, parsed.transfer_syntax, salt, hash_patient, name)
    _check_pixels(parsed, meta, samples, h)
    parsed.meta = meta
    return meta


def _uid_label(h: _Header, uid: str) -> str:
    """A UID's registered name, else the UID itself as :meth:`_Header.shown` allows."""
    known = pydicom.uid.UID_dictionary.get(uid)
    return f"{known[0]} ({uid})" if known else h.shown(uid)


def _check_pixels(parsed: ParsedDicom, meta: SliceMeta, samples: int, h: _Header) -> None:
    name, ts = parsed.name, parsed.transfer_syntax
    _check_pixel_vr(parsed)
    # The transfer syntax must say how the pixel data is stored: an uncompressed syntax over
    # encapsulated data (e.g. a file meta group that lost its TransferSyntaxUID, so the encoding
    # was inferred) would read fragment bytes as pixels; a compressed one over native data has
    # nothing to decode.
    native = ts in _NATIVE_SYNTAXES or ts == pydicom.uid.DeflatedExplicitVRLittleEndian
    if parsed.encapsulated and native:
        raise DicomError(
            "bad_header", name, f"TransferSyntaxUID: {_uid_label(h, ts)} is uncompressed, but the pixel data is encapsulated"
        )
    if not parsed.encapsulated and not native:
        raise DicomError(
            "bad_header", name, f"TransferSyntaxUID: {_uid_label(h, ts)} needs encapsulated pixel data, found native data"
        )
    if meta.rows <= 0 or meta.cols <= 0 or meta.rows * meta.cols > MAX_PIXELS:
        raise DicomError("pixel_size_mismatch", name, f"header claims {meta.rows}x{meta.cols} pixels")
    _check_format(h, samples, meta.bits_allocated, meta.bits_stored)
    if not parsed.encapsulated:
        expected = meta.rows * meta.cols * meta.bits_allocated // 8
        if parsed.pixel_length not in (expected, expected + 1):
            raise DicomError(
                "pixel_size_mismatch",
                name,
                f"pixel data holds {parsed.pixel_length} bytes, Rows x Columns x BitsAllocated "
                f"({meta.rows}x{meta.cols}x{meta.bits_allocated}) needs {expected}",
            )
        return
    try:
        decoder = pydicom.pixels.get_decoder(parsed.transfer_syntax)
        available = decoder.is_available
    except NotImplementedError:
        available = False
    if not available:
        raise DicomError(
            "missing_codec",
            name,
            f"no decoder installed for transfer syntax {_uid_label(h, ts)}",
        )


_MONOCHROME = {"MONOCHROME1", "MONOCHROME2"}
# Photometric interpretations DICOM defines: a CT in one of the others is valid DICOM we cannot score
# (palette indices, colour samples); anything else is a garbled value.
_PHOTOMETRIC = _MONOCHROME | {
    "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
    "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB",
}


def _check_pixel_vr(parsed: ParsedDicom) -> None:
    """Pixel Data is OB or OW (OW over encapsulated data occurs: pydicom's explicit_VR-UN.dcm), or UN
    with a defined length (a writer that did not know the tag). Any other VR is a garbled element
    header (pydicom would read the value as text, a sequence or one short), and UN of undefined
    length is by PS3.5 6.2.2 a sequence, not encapsulated pixel data."""
    vr = parsed.pixel_vr
    if vr not in (None, "OB", "OW", "UN") or (vr == "UN" and parsed.encapsulated):
        how = " of undefined length" if vr == "UN" else ""
        raise DicomError("bad_header", parsed.name, f"PixelData: VR {vr!r}{how}, expected OB or OW")


def _check_format(h: _Header, samples: int, bits_allocated: int, bits_stored: int) -> None:
    """A monochrome integer image. PhotometricInterpretation may be absent (HU do not depend on it:
    MONOCHROME1 only inverts the display); present, it must be a real one, and monochrome."""
    photometric = h.texts("PhotometricInterpretation", False)
    if photometric is not None and (len(photometric) != 1 or photometric[0].upper() not in _PHOTOMETRIC):
        shown = h.shown("\\".join(photometric))
        raise h.fail("PhotometricInterpretation", f"unparseable value {shown}")
    pi = photometric[0].upper() if photometric else None
    if samples != 1 or bits_allocated not in (8, 16, 32) or not 0 < bits_stored <= bits_allocated or pi not in (None, *_MONOCHROME):
        raise DicomError(
            "decode_error",
            h.name,
            f"unsupported pixel format: SamplesPerPixel {samples}, BitsAllocated {bits_allocated}, "
            f"BitsStored {bits_stored}, PhotometricInterpretation {pi or 'absent'} (monochrome CT expected)",
        )


def read_header(
    source: Source, *, name: str | None = None, salt: str | None = None, total_size: int | None = None
) -> SliceMeta:
    """Header fields of a CT slice without decoding pixels; raises :class:`DicomError` on rejection.

    Checks everything up to and including ``missing_codec`` (the pixel data's presence, size and codec
    are read from the element header, never its value); only ``decode_error`` needs a full decode.

    Args:
        source: bytes or a local path.
        name: name to report in errors (default: the path, or ``<bytes>``).
        salt: PatientID salt (default ``ICHD_PATIENT_SALT``).
        total_size: the object's size when ``source`` holds only its first bytes (a ranged GET);
            raises :class:`IncompleteHeader` when they end before the pixel data element.
    """
    data, label = read_source(source, name)
    return check_header(parse_dicom(data, label, total_size), salt)


# ---------------------------------------------------------------------------------- decoding

_DTYPES = {(8, 0): np.uint8, (8, 1): np.int8, (16, 0): np.uint16, (16, 1): np.int16, (32, 0): np.uint32, (32, 1): np.int32}


def _correct_unused_bits(arr: np.ndarray, bits_stored: int, bits_allocated: int) -> np.ndarray:
    """Ignore bits above BitsStored (mask unsigned, sign-extend signed), as pydicom does."""
    shift = bits_allocated - bits_stored
    if shift <= 0:
        return arr
    out = np.left_shift(arr, shift)
    np.right_shift(out, shift, out=out)
    return out


@_quietly
def decode_stored(parsed: ParsedDicom) -> np.ndarray:
    """Stored pixel values (rows, cols) as signed/unsigned integers; a read-only view when uncompressed.

    Compressed data is checked before any decoder sees it: the codestream's own dimensions must be
    the header's (a header can claim 8192 x 8192 over a 512 x 512 stream, and pydicom allocates what
    the header claims), and a JPEG 2000 stream must be framed so pydicom's parser cannot loop.

    Args:
        parsed: a whole file from :func:`parse_dicom`; :func:`check_header` need not have run (the
            pixel format is then read here, strictly).
    """
    if not parsed.complete:
        raise ValueError(f"{parsed.name}: parsed from a prefix; decoding needs the whole file")
    name = parsed.name
    if parsed.meta is not None:
        meta = parsed.meta
        rows, cols, bits_allocated, bits_stored = meta.rows, meta.cols, meta.bits_allocated, meta.bits_stored
        representation = meta.pixel_representation
    else:
        h = _Header(parsed.dataset, name)
        rows, cols, bits_allocated, bits_stored, representation = _pixel_format(h)
        _check_format(h, h.ushort("SamplesPerPixel"), bits_allocated, bits_stored)
        _check_pixel_vr(parsed)
        if rows <= 0 or cols <= 0 or rows * cols > MAX_PIXELS:
            raise DicomError("pixel_size_mismatch", name, f"header claims {rows}x{cols} pixels")
    dtype = np.dtype(_DTYPES[(bits_allocated, representation)])
    if parsed.transfer_syntax in _NATIVE_SYNTAXES and parsed.pixel_offset is not None:
        if parsed.pixel_length is None or parsed.pixel_length < rows * cols * dtype.itemsize:
            raise DicomError("pixel_size_mismatch", name, f"pixel data holds {parsed.pixel_length} bytes")
        if parsed.transfer_syntax == pydicom.uid.ExplicitVRBigEndian:
            dtype = dtype.newbyteorder(">")
        arr = np.frombuffer(parsed.data, dtype=dtype, count=rows * cols, offset=parsed.pixel_offset)
        arr = arr.reshape(rows, cols)
        if dtype.byteorder == ">":
            arr = arr.astype(dtype.newbyteorder("="))
        return _correct_unused_bits(arr, bits_stored, bits_allocated)

    ds = parsed.dataset
    if parsed.encapsulated:
        end = _walk_encapsulated(parsed.data, parsed.pixel_offset, name)  # type: ignore[arg-type]
        _check_codestream(parsed, end, rows, cols)
        ds = pydicom.Dataset(ds)  # shallow copy: leave the parsed header untouched
        ds.file_meta = parsed.dataset.file_meta
        ds.add_new(_PIXEL_DATA_TAG, "OB", parsed.data[parsed.pixel_offset : end])
        ds["PixelData"].is_undefined_length = True
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise DicomError("decode_error", name, f"{parsed.transfer_syntax.name}: {type(exc).__name__}: {exc}") from None
    except BaseException as exc:
        # A Rust decoder's panic surfaces as pyo3's PanicException, a BaseException (pylibjpeg-rle
        # 2.2 panics on a segment that decodes past the frame). Anything else (KeyboardInterrupt,
        # SystemExit, ...) is not about the file and propagates.
        if type(exc).__name__ != "PanicException":
            raise
        raise DicomError("decode_error", name, f"{parsed.transfer_syntax.name}: decoder panicked: {exc}") from None
    if arr.shape != (rows, cols):
        raise DicomError("pixel_size_mismatch", name, f"decoded {arr.shape}, header says {rows}x{cols}")
    # Native values are masked to BitsStored above; a decoder returns what the codestream holds. Values
    # outside BitsStored mean header and codestream disagree (which one is right is unknowable), and
    # callers (preprocess's window tables) rely on the range: one min/max, small beside a decode.
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if representation else (0, (1 << bits_stored) - 1)
    low, high = int(arr.min()), int(arr.max())
    if low < lo or high > hi:
        raise DicomError(
            "decode_error", name,
            f"decoded values span {low}..{high}, outside BitsStored {bits_stored} "
            f"({'signed' if representation else 'unsigned'}: {lo}..{hi})",
        )
    return arr


# Bytes of the frame's start read for its codestream header: every codec's header lies well within,
# unless JPEG APPn segments (an ICC profile) come first; then the whole frame is read.
_CODESTREAM_HEAD = 1 << 16
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # F7: JPEG-LS
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _frame_head(data: bytes, start: int, end: int, limit: int = _CODESTREAM_HEAD) -> tuple[bytes, int, int]:
    """The single frame's first bytes (fragments after the Basic Offset Table joined, up to
    ``limit``), the first fragment's length, and the number of fragments."""
    pos, parts, have, first, count = start, [], 0, -1, -1
    while pos < end:  # items were validated by _walk_encapsulated
        (length,) = struct.unpack_from("<I", data, pos + 4)
        if count >= 0 and have < limit:
            take = min(length, limit - have)
            parts.append(data[pos + 8 : pos + 8 + take])
            have += take
        if count == 0:
            first = length
        count += 1
        pos += 8 + length
    return b"".join(parts), first, count


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG or JPEG-LS frame header (SOFn / SOF55); None if there is none."""
    if head[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(head)
    while pos + 4 <= n:
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or a scan before any frame header
            return None
        (length,) = struct.unpack_from(">H", head, pos + 2)
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if pos + 9 > n:
                return None
            return struct.unpack_from(">HH", head, pos + 5)  # type: ignore[return-value]
        pos += 2 + length
    return None


def _j2k_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG 2000 SIZ segment, optionally inside a JP2 file; None if absent or
    if a JP2 box is not plainly framed: pydicom 3.0's own box walk never advances past a box of
    length 0 (and misreads one of length 1), so it must never be handed one."""
    pos, n = 0, len(head)
    if head.startswith(_JP2_SIGNATURE):
        pos = 12
        while True:
            if pos + 8 > n:
                return None
            length, box = struct.unpack_from(">I", head, pos)[0], head[pos + 4 : pos + 8]
            if length < 8:
                return None
            if box == b"jp2c":
                pos += 8
                break
            pos += length
    if head[pos : pos + 4] != b"\xff\x4f\xff\x51" or pos + 24 > n:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", head, pos + 8)
    return ysiz - yosiz, xsiz - xosiz


def _check_codestream(parsed: ParsedDicom, end: int, rows: int, cols: int) -> None:
    """Reject, before decoding, a compressed frame whose own header contradicts Rows x Columns or
    cannot be found (every decoder we ship reads the same header and would fail on it)."""
    ts, name = parsed.transfer_syntax, parsed.name
    head, first, count = _frame_head(parsed.data, parsed.pixel_offset, end)  # type: ignore[arg-type]
    if count < 1:
        raise DicomError("decode_error", name, "encapsulated pixel data holds no fragment")
    if ts == pydicom.uid.RLELossless:
        # 64-byte header: segment count, 15 offsets. Each segment decodes to Rows x Columns bytes and
        # PackBits turns 2 bytes into at most 128, so a segment's length bounds what it can hold.
        if len(head) < 64 or first < 64:
            raise DicomError("decode_error", name, "RLE header cut short")
        nseg, *offsets = struct.unpack_from("<16I", head, 0)
        bounds = [*offsets[:nseg], first] if 1 <= nseg <= 15 else []
        if not bounds or bounds[0] != 64 or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise DicomError("decode_error", name, f"RLE header: {nseg} segments at bad offsets")
        shortest = min(b - a for a, b in zip(bounds, bounds[1:]))
        if rows * cols > 64 * shortest + 128:
            raise DicomError(
                "pixel_size_mismatch", name, f"an RLE segment of {shortest} bytes cannot hold {rows}x{cols} pixels"
            )
        return
    if ts in pydicom.uid.JPEG2000TransferSyntaxes:
        parse, kind = _j2k_size, "JPEG 2000 SIZ"
    elif ts in pydicom.uid.JPEGTransferSyntaxes or ts in pydicom.uid.JPEGLSTransferSyntaxes:
        parse, kind = _jpeg_size, "JPEG frame header (SOF)"
    else:
        return  # no other codec is installed: missing_codec was raised by check_header
    size = parse(head)
    if size is None and len(head) == _CODESTREAM_HEAD:  # long APPn segments first: read it all
        size = parse(_frame_head(parsed.data, parsed.pixel_offset, end, limit=len(parsed.data))[0])  # type: ignore[arg-type]
    if size is None or size[1] <= 0 or size[0] < 0 or (size[0] == 0 and kind.startswith("JPEG 2000")):
        raise DicomError("decode_error", name, f"no valid {kind} at the start of the pixel data")
    if size[1] != cols or size[0] not in (0, rows):  # JPEG height 0: defined later (DNL)
        raise DicomError(
            "pixel_size_mismatch", name, f"codestream is {size[0]}x{size[1]}, header says {rows}x{cols}"
        )


def rsna_fix_applies(meta: SliceMeta) -> bool:
    """True for 12-bit unsigned images whose intercept > -100: their HU were stored wrapped mod 4096."""
    return meta.bits_stored == 12 and meta.pixel_representation == 0 and meta.rescale_intercept > -100


def stored_to_hu(stored: np.ndarray, meta: SliceMeta, rsna_fix: bool = True) -> np.ndarray:
    """Hounsfield units (float32) from stored values: ``stored * slope + intercept`` (+ the RSNA fix)."""
    intercept = meta.rescale_intercept
    values = stored.astype(np.int32)
    if rsna_fix and rsna_fix_applies(meta):
        values = values + 1000
        values[values >= 4096] -= 4096
        intercept = -1000.0
    hu = values.astype(np.float64) * meta.rescale_slope + intercept
    return hu.astype(np.float32)


def load_slice(
    source: Source, *, name: str | None = None, salt: str | None = None, rsna_fix: bool = True
) -> CtSlice:
    """Read one CT slice: every check of :func:`read_header`, then decode and convert to HU.

    Args:
        source: bytes or a local path.
        name: name to report in errors.
        salt: PatientID salt (default ``ICHD_PATIENT_SALT``).
        rsna_fix: apply the RSNA 12-bit intercept fix where it applies.

    Returns:
        CtSlice with ``hu`` float32 (rows, cols) and ``meta``.

    Raises:
        DicomError: with ``reason`` from :data:`REJECT_REASONS`.
    """
    data, label = read_source(source, name)
    parsed = parse_dicom(data, label)
    meta = check_header(parsed, salt)
    return CtSlice(hu=stored_to_hu(decode_stored(parsed), meta, rsna_fix), meta=meta)
