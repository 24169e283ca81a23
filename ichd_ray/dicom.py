"""Head-CT DICOM reading: header checks, stored pixel values, Hounsfield units. Pure functions, no Ray.

One parse per file. The header is read with pydicom up to the pixel data; the pixel data element is
then located in the original bytes, so uncompressed pixels are a zero-copy ``np.frombuffer`` view and
nothing a header merely claims is ever allocated. Compressed (encapsulated) pixel data is walked item by
item (truncation is caught there) and handed to pydicom's decoders (pylibjpeg, openjpeg, libjpeg, CharLS).

Every file that cannot be scored raises :class:`DicomError` with a stable ``reason`` code, checked in
the order of :data:`REJECT_REASONS`. PatientID leaves this module only as a salted hash.

HU = stored x RescaleSlope + RescaleIntercept. The RSNA fix: some 12-bit unsigned images carry a
RescaleIntercept > -100 although their values were written as ``HU mod 4096`` (air wraps to ~3000);
for those, ``x = stored + 1000; x[x >= 4096] -= 4096; intercept = -1000`` restores HU. It originated in
a widely used RSNA 2019 Kaggle kernel and is applied by default (``rsna_fix=False`` turns it off).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import math
import os
import struct
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

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

#: Rejection codes in the order they are checked. ``duplicate`` and ``other_series`` come from the
#: index stage (series selection), never from a single file.
REJECT_REASONS: tuple[str, ...] = (
    "empty",
    "not_dicom",
    "truncated",
    "not_ct",
    "localizer",
    "derived",
    "multi_frame",
    "no_pixel_data",
    "pixel_size_mismatch",
    "missing_codec",
    "decode_error",
    "duplicate",
    "other_series",
)

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
    position: float | None  # along the slice normal, mm (ImagePositionPatient . normal)
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
    image_position: tuple[float, float, float] | None = None
    image_orientation: tuple[float, ...] | None = None
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


# ----------------------------------------------------------------------------------- sources


def read_source(source: Source, name: str | None = None) -> tuple[bytes, str]:
    """Bytes and a display name from bytes, a local path, or a storage URI (``s3://``, ``file://``)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<bytes>"
    path = os.fspath(source)
    if "://" in path:
        from ichd_ray import storage  # local import: storage pulls in pyarrow/fsspec

        return storage.read_bytes(path), name or path
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


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "SH", "ST", "TM", "UI"}


def _raw_value(ds: pydicom.Dataset, keyword: str) -> Any:
    """Decode a still-raw element ourselves: pydicom's generic conversion costs ~40 us per element
    and the fast path reads ~20 of them per slice. Returns a str, a list of str, an int, or None;
    anything unusual goes to pydicom (``NotImplemented``)."""
    tag = tag_for_keyword(keyword)
    elem = ds._dict.get(tag) if tag is not None else None
    if elem is None:
        return None
    if not isinstance(elem, RawDataElement):
        return NotImplemented
    raw = elem.value
    if raw is None:
        return NotImplemented
    vr = elem.VR or dictionary_VR(tag)
    if vr in _TEXT_VRS:
        parts = raw.decode("latin-1").strip("\x00 ").split("\\")
        parts = [p.strip("\x00 ") for p in parts]
        return parts[0] if len(parts) == 1 else parts
    if vr == "US" and len(raw) == 2:
        return struct.unpack("<H" if ds.original_encoding[1] is not False else ">H", raw)[0]
    return NotImplemented


def _value(ds: pydicom.Dataset, keyword: str, default: Any = None) -> Any:
    """A header value, or ``default`` when missing or unreadable (bad VRs must not crash a job)."""
    try:
        value = _raw_value(ds, keyword)
        if value is NotImplemented:
            value = ds.get(keyword, default)
    except Exception:
        return default
    return default if value is None or value == "" else value


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if isinstance(value, str):
        value = [value]
    try:
        out = tuple(float(v) for v in value)
    except Exception:
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _float(value: Any, default: float | None = None) -> float | None:
    try:
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        out = float(value)
    except Exception:
        return default
    return out if np.isfinite(out) else default


def _int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(value)
    except Exception:
        return default


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not has_preamble)
        except (InvalidDicomError, EOFError, struct.error) as exc:
            reason = "truncated" if has_preamble and isinstance(exc, (EOFError, struct.error)) else "not_dicom"
            raise DicomError(reason, name, f"unreadable header: {exc}") from None
        except Exception as exc:  # pydicom raises many types on garbage
            raise DicomError("not_dicom", name, f"unreadable header: {type(exc).__name__}: {exc}") from None
    if not has_preamble and _value(ds, "SOPClassUID") is None and _value(ds, "Modality") is None:
        raise DicomError("not_dicom", name, "no SOPClassUID or Modality in header")
    try:
        _check_raw_lengths(ds, name)
        if getattr(ds, "file_meta", None) is not None:
            _check_raw_lengths(ds.file_meta, name)
    except DicomError:
        if prefix:
            raise IncompleteHeader(name, len(data)) from None
        raise

    meta_ts = _value(ds.file_meta, "TransferSyntaxUID") if getattr(ds, "file_meta", None) else None
    is_implicit, is_little = ds.original_encoding
    if meta_ts is None:
        meta_ts = (
            pydicom.uid.ImplicitVRLittleEndian
            if is_implicit
            else (pydicom.uid.ExplicitVRLittleEndian if is_little else pydicom.uid.ExplicitVRBigEndian)
        )
    ts = UID(str(meta_ts))

    pixel_offset = pixel_length = None
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
    return ParsedDicom(name, data, ds, ts, pixel_offset, pixel_length, encapsulated, complete=not prefix)


def _full_read(data: bytes, name: str) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
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


def _slice_meta(ds: pydicom.Dataset, ts: UID, salt: str | None, hash_patient: bool = True) -> SliceMeta:
    ipp = _floats(_value(ds, "ImagePositionPatient"), 3)
    iop = _floats(_value(ds, "ImageOrientationPatient"), 6)
    position = None
    if ipp is not None:
        normal = slice_normal(iop)
        position = ipp[2] if normal is None else sum(p * v for p, v in zip(ipp, normal))
    spacing = _floats(_value(ds, "PixelSpacing"), 2)
    raw_type = _value(ds, "ImageType") or ()
    if isinstance(raw_type, str):
        raw_type = raw_type.split("\\")
    image_type = tuple(str(v).strip().upper() for v in raw_type)
    bits_allocated = _int(_value(ds, "BitsAllocated"), 16)
    return SliceMeta(
        study_uid=str(_value(ds, "StudyInstanceUID", "")),
        series_uid=str(_value(ds, "SeriesInstanceUID", "")),
        sop_uid=str(_value(ds, "SOPInstanceUID", "")),
        patient_hash=hash_patient_id(_value(ds, "PatientID"), salt) if hash_patient else None,
        position=position,
        instance_number=_int(_value(ds, "InstanceNumber")),
        pixel_spacing=spacing,  # type: ignore[arg-type]
        slice_thickness=_float(_value(ds, "SliceThickness")),
        image_type=image_type,
        transfer_syntax=str(ts),
        rows=_int(_value(ds, "Rows"), 0) or 0,
        cols=_int(_value(ds, "Columns"), 0) or 0,
        bits_allocated=bits_allocated,
        bits_stored=_int(_value(ds, "BitsStored"), bits_allocated),
        pixel_representation=_int(_value(ds, "PixelRepresentation"), 0),
        rescale_slope=_float(_value(ds, "RescaleSlope"), 1.0) or 1.0,
        rescale_intercept=_float(_value(ds, "RescaleIntercept"), 0.0),
        image_position=ipp,  # type: ignore[arg-type]
        image_orientation=iop,
        modality=_value(ds, "Modality"),
    )


def check_header(parsed: ParsedDicom, salt: str | None = None, *, hash_patient: bool = True) -> SliceMeta:
    """Header-level rejections, in order: not_ct, localizer, derived, multi_frame, no_pixel_data,
    pixel_size_mismatch, missing_codec. Sets and returns ``parsed.meta``.

    ``hash_patient=False`` leaves ``patient_hash`` empty (the pixel path never needs it)."""
    with warnings.catch_warnings():  # pydicom warns on every odd value it converts
        warnings.filterwarnings("ignore", module="pydicom")
        return _check_header(parsed, salt, hash_patient)


def _check_header(parsed: ParsedDicom, salt: str | None, hash_patient: bool = True) -> SliceMeta:
    ds, name = parsed.dataset, parsed.name
    modality = str(_value(ds, "Modality", "")).strip().upper()
    sop_class = str(_value(ds, "SOPClassUID", "")).strip()
    if modality and modality != "CT":
        raise DicomError("not_ct", name, f"Modality {modality}")
    if sop_class and sop_class not in CT_SOP_CLASSES:
        label = UID(sop_class).name if sop_class else "none"
        raise DicomError("not_ct", name, f"SOP class {label}")
    if not modality and not sop_class:
        raise DicomError("not_ct", name, "no Modality and no SOP class")
    meta = _slice_meta(ds, parsed.transfer_syntax, salt, hash_patient)
    if _LOCALIZER_TOKENS & set(meta.image_type):
        raise DicomError("localizer", name, "ImageType " + "\\".join(meta.image_type))
    if meta.image_type and meta.image_type[0] == "DERIVED":
        raise DicomError("derived", name, "ImageType " + "\\".join(meta.image_type))
    frames = _int(_value(ds, "NumberOfFrames"), 1) or 1
    if frames > 1 or sop_class in _ENHANCED_CT:
        raise DicomError("multi_frame", name, f"{frames} frames ({CT_SOP_CLASSES.get(sop_class, 'CT')})")
    _check_pixels(parsed, meta)
    parsed.meta = meta
    return meta


def _check_pixels(parsed: ParsedDicom, meta: SliceMeta) -> None:
    name = parsed.name
    if parsed.pixel_offset is None and parsed.pixel_length is None:
        raise DicomError("no_pixel_data", name, "no (7FE0,0010) Pixel Data element")
    spp = _int(_value(parsed.dataset, "SamplesPerPixel"), 1)
    if meta.rows <= 0 or meta.cols <= 0 or meta.rows * meta.cols > MAX_PIXELS:
        raise DicomError("pixel_size_mismatch", name, f"header claims {meta.rows}x{meta.cols} pixels")
    if spp != 1 or meta.bits_allocated not in (8, 16, 32) or not 0 < meta.bits_stored <= meta.bits_allocated:
        raise DicomError(
            "decode_error",
            name,
            f"unsupported pixel format: SamplesPerPixel {spp}, BitsAllocated {meta.bits_allocated}, "
            f"BitsStored {meta.bits_stored} (monochrome CT expected)",
        )
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
            f"no decoder installed for transfer syntax {parsed.transfer_syntax.name} ({parsed.transfer_syntax})",
        )


def read_header(
    source: Source, *, name: str | None = None, salt: str | None = None, total_size: int | None = None
) -> SliceMeta:
    """Header fields of a CT slice without decoding pixels; raises :class:`DicomError` on rejection.

    Checks everything up to and including ``missing_codec`` (the pixel data's presence, size and codec
    are read from the element header, never its value); only ``decode_error`` needs a full decode.

    Args:
        source: bytes, a local path, or a storage URI.
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


def decode_stored(parsed: ParsedDicom) -> np.ndarray:
    """Stored pixel values (rows, cols) as signed/unsigned integers; a read-only view when uncompressed."""
    if not parsed.complete:
        raise ValueError(f"{parsed.name}: parsed from a prefix; decoding needs the whole file")
    meta = parsed.meta if parsed.meta is not None else _slice_meta(parsed.dataset, parsed.transfer_syntax, None, False)
    name = parsed.name
    dtype = np.dtype(_DTYPES[(meta.bits_allocated, 1 if meta.pixel_representation else 0)])
    if parsed.transfer_syntax in _NATIVE_SYNTAXES and parsed.pixel_offset is not None:
        if parsed.transfer_syntax == pydicom.uid.ExplicitVRBigEndian:
            dtype = dtype.newbyteorder(">")
        arr = np.frombuffer(parsed.data, dtype=dtype, count=meta.rows * meta.cols, offset=parsed.pixel_offset)
        arr = arr.reshape(meta.rows, meta.cols)
        if dtype.byteorder == ">":
            arr = arr.astype(dtype.newbyteorder("="))
        return _correct_unused_bits(arr, meta.bits_stored, meta.bits_allocated)

    ds = parsed.dataset
    if parsed.encapsulated:
        end = _walk_encapsulated(parsed.data, parsed.pixel_offset, name)  # type: ignore[arg-type]
        ds = pydicom.Dataset(ds)  # shallow copy: leave the parsed header untouched
        ds.file_meta = parsed.dataset.file_meta
        ds.add_new(_PIXEL_DATA_TAG, "OB", parsed.data[parsed.pixel_offset : end])
        ds["PixelData"].is_undefined_length = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:
        raise DicomError("decode_error", name, f"{parsed.transfer_syntax.name}: {type(exc).__name__}: {exc}") from None
    if arr.shape != (meta.rows, meta.cols):
        raise DicomError(
            "pixel_size_mismatch", name, f"decoded {arr.shape}, header says {meta.rows}x{meta.cols}"
        )
    return arr


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
        source: bytes, a local path, or a storage URI.
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
