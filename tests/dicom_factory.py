"""Hand-built CT DICOMs for tests: exact stored values and tags, written with pydicom."""

from __future__ import annotations

import io

import numpy as np
import pydicom
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
