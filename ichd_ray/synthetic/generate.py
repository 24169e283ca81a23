"""Synthetic head-CT studies with labelled intracranial hemorrhages, written as real DICOM series.

What a study looks like (all in millimetres and Hounsfield units, axial slices from skull base to vertex):

* **Phantom.** Air (-1000), scalp (35), skull (inner/outer table ~1,200 with ~700 diploe), grey matter
  (38) around white matter (28), CSF (6) in sulci, the interhemispheric fissure and the lateral
  ventricles (present in the middle third of the head), bone masses of the skull base in the lowest
  slices with beam-hardening brightening of nearby brain (a real bleed mimic), and calcifications
  (pineal, choroid plexus: 100-250 HU, bright in the brain window like blood, told apart in the subdural
  window). The head's size, position, in-plane rotation and gantry tilt vary per study.
* **Hemorrhages** (blood 50-90 HU), each spanning several adjacent slices, by subtype with its real
  shape and place: epidural = biconvex lens at the inner skull table; subdural = long thin crescent along
  it; subarachnoid = blood filling sulci in a sector and/or the interhemispheric fissure;
  intraparenchymal = rounded, irregular blob in parenchyma with a hypodense oedema rim;
  intraventricular = blood layering in the dependent (posterior) part of the ventricles.
  A study may carry several subtypes.
* **Ambiguity on purpose.** A bleed's end slices only partly overlap it: their blood is averaged with
  the tissue around it (partial volume), so its contrast there falls to a fraction and its cross-section
  shrinks, yet the slice is labelled positive (overlap >= 25% of the slice thickness). Gaussian noise,
  mimics (calcifications, beam hardening) and small bleeds make single slices uncertain, so context from
  neighbouring slices carries information, as on real scans.
* **Encodings** mixed per study: int16 (intercept -1024, GE-style -2000 padding outside the FOV), 12-bit
  unsigned (intercept -1024), 12-bit unsigned *wrapped* (intercept 0: the RSNA case the intercept fix
  repairs) and int16 with slope 0.5; a fraction of studies compressed losslessly (RLE, JPEG 2000,
  JPEG-LS). InstanceNumber runs backwards in some studies and file names are SOP UIDs, so only the
  position along the slice normal orders a study.

Difficulty defaults are fixed (:class:`Difficulty`); later stages measure models on them and must not
retune them to meet a target. Output is deterministic for a seed, whatever the number of workers.

Layout: ``OUT/<StudyInstanceUID>/<SOPInstanceUID>.dcm``, ``OUT/labels.csv`` (RSNA format: ``ID,Label``
with ``ID_<SOPInstanceUID>_<subtype>``, 6 rows per image) and ``OUT/studies.csv`` (one row per study).

Why one module of ~640 lines: one generator; phantom, bleeds, labels and encodings draw from the same
per-study random stream in a fixed order, which is what makes a seed reproduce an archive byte for byte.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from scipy.ndimage import gaussian_filter

from ichd_ray import CLASSES

from ichd_ray.io import storage

__all__ = ["Difficulty", "SynthConfig", "Bleed", "StudyPlan", "plan_study", "render_study", "generate"]

SUBTYPES: tuple[str, ...] = CLASSES[:5]
ENCODINGS: dict[str, float] = {"int16": 0.45, "uint12": 0.30, "uint12_wrapped": 0.10, "int16_slope": 0.15}
COMPRESSIONS: tuple[str, ...] = (
    pydicom.uid.RLELossless,
    pydicom.uid.JPEG2000Lossless,
    pydicom.uid.JPEGLSLossless,
)
_UID_ROOT = "ichd-ray-synth"
#: Invalid objects ``bad_files`` cycles through, with the reason a reader must give.
BAD_KINDS: tuple[tuple[str, str], ...] = (
    ("empty", "empty"),
    ("truncated", "truncated"),
    ("text", "not_dicom"),
    ("localizer", "localizer"),
    ("mr", "not_ct"),
    ("pixel_size_mismatch", "pixel_size_mismatch"),
)


@dataclass(frozen=True)
class Difficulty:
    """Documented, fixed difficulty of the synthetic set. Do not retune to meet a model target.

    Args:
        prevalence: fraction of studies with at least one hemorrhage.
        subtype_probs: per-subtype chance to be the first subtype of a bleeding study.
        extra_subtype_prob: chance of each further distinct subtype in a bleeding study.
        blood_hu: range of blood density.
        noise_hu: standard deviation of the Gaussian image noise at 256 x 256 sampling of the
            field of view (per-pixel noise scales with the matrix size so the signal-to-noise ratio
            seen by a network at a given input size does not depend on the DICOM matrix).
        extent_slices: range of a bleed's half-extent along z, in slices.
        size_scale: multiplies every bleed's in-plane size.
        positive_overlap: minimum z-overlap of a slice with a bleed for a positive label.
        calcification_prob: chance per study of calcification mimics.
    """

    prevalence: float = 0.45
    subtype_probs: tuple[float, ...] = (0.10, 0.25, 0.15, 0.22, 0.28)
    extra_subtype_prob: float = 0.3
    blood_hu: tuple[float, float] = (50.0, 90.0)
    noise_hu: float = 10.0
    extent_slices: tuple[float, float] = (1.2, 4.0)
    size_scale: float = 1.0
    positive_overlap: float = 0.25
    calcification_prob: float = 0.6


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    Args:
        studies: number of studies.
        slices: nominal slices per study (each study draws within +-``slice_jitter``).
        size: image side in pixels (Rows = Columns).
        seed: everything is a function of the seed.
        slice_jitter: relative spread of slice counts.
        compressed_fraction: fraction of studies written with a lossless compressed transfer syntax.
        studies_per_patient: mean studies per patient (>= 1); patients group folds later.
        bad_files: how many invalid objects to add (cycling through :data:`BAD_KINDS`), each in a
            study folder beside the good slices, listed in ``OUT/bad_files.csv`` with the expected
            rejection reason; for testing that a job reports them and carries on.
        difficulty: the fixed difficulty settings.
    """

    studies: int = 20
    slices: int = 32
    size: int = 256
    seed: int = 0
    slice_jitter: float = 0.2
    compressed_fraction: float = 0.15
    studies_per_patient: float = 1.25
    bad_files: int = 0
    difficulty: Difficulty = field(default_factory=Difficulty)

    def __post_init__(self) -> None:
        if self.studies < 1 or self.slices < 3 or self.size < 32:
            raise ValueError(f"need studies >= 1, slices >= 3, size >= 32; got {self.studies}, {self.slices}, {self.size}")


@dataclass
class Bleed:
    """One hemorrhage: its subtype, z-extent (slice units) and in-plane geometry parameters."""

    subtype: str
    z_center: float
    half_extent: float
    blood_hu: float
    angle: float = 0.0  # radians, around the head centre
    span: float = 0.5  # angular half-span (radians) or blob radius (mm)
    thickness: float = 8.0  # mm
    x: float = 0.0  # blob centre, head coordinates (mm)
    y: float = 0.0


@dataclass
class StudyPlan:
    """Everything random about one study, drawn up front so rendering is a pure function of it."""

    index: int
    patient_index: int
    study_uid: str
    series_uid: str
    n_slices: int
    size: int
    fov_mm: float
    thickness_mm: float
    z0_mm: float
    tilt_deg: float
    rotation: float
    center: tuple[float, float]
    semi_axes: tuple[float, float]
    skull_mm: float
    encoding: str
    transfer_syntax: str
    reverse_instance: bool
    calcifications: bool
    sulcus_phase: float
    bleeds: list[Bleed]
    noise_seed: int


def _uid(seed: int, *parts: object) -> str:
    """A deterministic UUID-derived UID (2.25.<128-bit int>) from the seed and a path of parts."""
    digest = hashlib.sha256("/".join([_UID_ROOT, str(seed), *map(str, parts)]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _patient_of(cfg: SynthConfig) -> list[int]:
    rng = np.random.default_rng([cfg.seed, 7])
    n_patients = max(1, min(cfg.studies, round(cfg.studies / max(cfg.studies_per_patient, 1.0))))
    owners = list(range(n_patients)) + list(rng.integers(0, n_patients, cfg.studies - n_patients))
    rng.shuffle(owners)
    return [int(o) for o in owners]


def plan_study(cfg: SynthConfig, index: int, patient_index: int) -> StudyPlan:
    """Draw one study's random choices from ``(seed, index)`` alone."""
    rng = np.random.default_rng([cfg.seed, index, 11])
    diff = cfg.difficulty
    jitter = int(round(cfg.slices * cfg.slice_jitter))
    n = int(max(3, cfg.slices + rng.integers(-jitter, jitter + 1)))
    thickness = float(rng.choice([5.0, 5.0, 5.0, 4.0, 3.0]))
    semi = (float(rng.uniform(62, 74)), float(rng.uniform(80, 92)))
    compressed = rng.random() < cfg.compressed_fraction
    encoding = str(rng.choice(list(ENCODINGS), p=np.array(list(ENCODINGS.values()))))
    plan = StudyPlan(
        index=index,
        patient_index=patient_index,
        study_uid=_uid(cfg.seed, "study", index),
        series_uid=_uid(cfg.seed, "series", index),
        n_slices=n,
        size=cfg.size,
        fov_mm=float(rng.uniform(220, 250)),
        thickness_mm=thickness,
        z0_mm=float(rng.uniform(-80, 20)),
        tilt_deg=float(rng.uniform(-15, 15)) if rng.random() < 0.25 else 0.0,
        rotation=float(rng.normal(0, 0.08)),
        center=(float(rng.normal(0, 6)), float(rng.normal(0, 6))),
        semi_axes=semi,
        skull_mm=float(rng.uniform(5, 8)),
        encoding=encoding,
        transfer_syntax=str(rng.choice(COMPRESSIONS)) if compressed else str(pydicom.uid.ExplicitVRLittleEndian),
        reverse_instance=bool(rng.random() < 0.3),
        calcifications=bool(rng.random() < diff.calcification_prob),
        sulcus_phase=float(rng.uniform(0, 2 * math.pi)),
        bleeds=[],
        noise_seed=int(rng.integers(0, 2**31)),
    )
    if rng.random() < diff.prevalence:
        probs = np.array(diff.subtype_probs) / sum(diff.subtype_probs)
        chosen = [str(rng.choice(SUBTYPES, p=probs))]
        for sub in SUBTYPES:
            if sub not in chosen and rng.random() < diff.extra_subtype_prob * probs[SUBTYPES.index(sub)] * 2:
                chosen.append(sub)
        plan.bleeds = [_draw_bleed(rng, sub, plan, diff) for sub in chosen]
    return plan


def _ventricle_t_range() -> tuple[float, float]:
    return -0.35, 0.45


def _draw_bleed(rng: np.random.Generator, subtype: str, plan: StudyPlan, diff: Difficulty) -> Bleed:
    n = plan.n_slices
    half = float(rng.uniform(*diff.extent_slices))
    lo_t, hi_t = (-0.6, 0.8)
    if subtype == "intraventricular":
        lo_t, hi_t = _ventricle_t_range()
        lo_t, hi_t = lo_t + 0.1, hi_t - 0.1
    if subtype == "subarachnoid":
        half *= 0.8
    if subtype in ("subdural",):
        half *= 1.4
    t_center = float(rng.uniform(lo_t, hi_t))
    z_center = (t_center + 0.85) / 1.8 * (n - 1)
    scale = diff.size_scale
    bleed = Bleed(subtype, z_center, half, float(rng.uniform(*diff.blood_hu)), angle=float(rng.uniform(0, 2 * math.pi)))
    if subtype == "epidural":
        # favour the temporal regions (lateral): angle near 0 or pi in head coordinates
        bleed.angle = float(rng.choice([0.0, math.pi]) + rng.normal(0, 0.5))
        bleed.span, bleed.thickness = float(rng.uniform(0.22, 0.42)), float(rng.uniform(7, 16)) * scale
    elif subtype == "subdural":
        bleed.span, bleed.thickness = float(rng.uniform(0.6, 1.2)), float(rng.uniform(3, 9)) * scale
    elif subtype == "subarachnoid":
        bleed.span = float(rng.uniform(0.5, 1.1))
        bleed.thickness = float(rng.random())  # < 0.5: also the interhemispheric fissure
    elif subtype == "intraparenchymal":
        r = float(rng.uniform(0.15, 0.6))
        th = float(rng.uniform(0, 2 * math.pi))
        bleed.x, bleed.y = r * plan.semi_axes[0] * math.cos(th), r * plan.semi_axes[1] * math.sin(th)
        bleed.span = float(rng.uniform(5, 17)) * scale
    elif subtype == "intraventricular":
        bleed.thickness = float(rng.uniform(0.25, 0.7))  # fill fraction of the ventricle
    return bleed


def _slice_t(plan: StudyPlan, i: int) -> float:
    """Normalised height of slice i: -0.85 at the skull base .. 0.95 near the vertex."""
    return -0.85 + 1.8 * i / max(plan.n_slices - 1, 1)


def _overlap(bleed: Bleed, i: int) -> float:
    """Fraction of slice i's thickness inside the bleed's z-extent (partial volume)."""
    lo, hi = bleed.z_center - bleed.half_extent, bleed.z_center + bleed.half_extent
    return float(max(0.0, min(hi, i + 0.5) - max(lo, i - 0.5)))


def _profile(bleed: Bleed, i: int) -> float:
    """In-plane size factor of the bleed at slice i (ellipsoidal), floored at its ends."""
    d = (i - bleed.z_center) / bleed.half_extent
    return float(max(0.3, math.sqrt(max(0.0, 1.0 - d * d))))


def _visible_in_slice(plan: StudyPlan, bleed: Bleed, i: int) -> bool:
    t = _slice_t(plan, i)
    if bleed.subtype == "intraventricular":
        lo, hi = _ventricle_t_range()
        return lo < t < hi
    return -0.85 <= t <= 0.92


def render_slice(
    plan: StudyPlan, i: int, diff: Difficulty, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, int]]:
    """HU image (size x size, float32) of slice i and its labels.

    A subtype is labelled present where one of its bleeds overlaps the slice by at least
    ``diff.positive_overlap`` of its thickness *and* covers at least 2 mm^2 of it as rendered, so a
    label never marks blood that is not in the image.
    """
    n = plan.size
    px = plan.fov_mm / n
    coords = (np.arange(n) - (n - 1) / 2) * px
    xx, yy = np.meshgrid(coords, coords)
    cos_r, sin_r = math.cos(plan.rotation), math.sin(plan.rotation)
    x = (xx - plan.center[0]) * cos_r + (yy - plan.center[1]) * sin_r
    y = -(xx - plan.center[0]) * sin_r + (yy - plan.center[1]) * cos_r
    r = np.hypot(x, y)
    theta = np.arctan2(y, x)

    t = _slice_t(plan, i)
    shrink = math.sqrt(max(0.05, 1.0 - 0.9 * t * t)) if t > 0 else 1.0 - 0.25 * t * t
    a, b = plan.semi_axes[0] * shrink, plan.semi_axes[1] * shrink
    radius = 1.0 / np.sqrt((np.cos(theta) / a) ** 2 + (np.sin(theta) / b) ** 2)  # inner table
    depth = radius - r  # mm inside the inner table (negative outside)

    hu = np.full((n, n), -1000.0)
    hu[(depth < 0) & (depth > -(plan.skull_mm + 5))] = 35.0  # scalp
    skull = (depth <= 0) & (depth > -plan.skull_mm)
    diploe = skull & (np.abs(depth + plan.skull_mm / 2) < plan.skull_mm / 5)
    hu[skull] = 1250.0
    hu[diploe] = 700.0
    brain = depth > 0
    rho = r / radius
    hu[brain] = np.where(rho[brain] < 0.72, 28.0, 38.0)

    # sulci: thin CSF lines in the cortex, and the interhemispheric fissure
    n_sulci = 22
    u = (theta - plan.sulcus_phase) * n_sulci / (2 * math.pi) + 0.3 * np.sin(r / 9.0)
    sulcus_dist = np.abs(u - np.round(u)) * 2 * math.pi * r / n_sulci
    sulci = brain & (rho > 0.78) & (rho < 0.995) & (sulcus_dist < 0.7)
    fissure = brain & (np.abs(x) < 0.9) & (np.abs(y) > 0.2 * b)
    hu[sulci | fissure] = 6.0

    # ventricles in the middle third
    v_lo, v_hi = _ventricle_t_range()
    ventricles = np.zeros((n, n), dtype=bool)
    if v_lo < t < v_hi:
        g = math.sin(math.pi * (t - v_lo) / (v_hi - v_lo))
        for side in (-1, 1):
            ventricles |= ((x - side * 7.0) / (5.5 * g + 1.0)) ** 2 + ((y + 4.0) / (24.0 * g + 2.0)) ** 2 < 1.0
        hu[ventricles] = 6.0

    # skull base: bone masses and beam hardening of the brain next to them
    if t < -0.35:
        weight = min(1.0, (-0.35 - t) / 0.4)
        for side in (-1, 1):
            petrous = ((x - side * 0.45 * a) / (0.18 * a)) ** 2 + ((y - 0.05 * b) / (0.45 * b * weight + 1)) ** 2 < 1
            hu[petrous & brain] = 1100.0
        hu[brain & (depth < 10)] += 14.0 * weight * np.exp(-depth[brain & (depth < 10)] / 5.0)

    if plan.calcifications:
        if -0.2 < t < 0.1:  # pineal gland
            hu[np.hypot(x, y - 0.15 * b) < 2.2] = 160.0
        if ventricles.any():  # choroid plexus in the posterior horns
            for side in (-1, 1):
                hu[np.hypot(x - side * 8.0, y - 14.0) < 2.0] = 220.0

    labels = {sub: 0 for sub in CLASSES}
    soft_tissue = hu < 200  # blood displaces tissue, never bone or calcification
    min_pixels = max(1, math.ceil(2.0 / (px * px)))
    for bleed in plan.bleeds:
        overlap = _overlap(bleed, i)
        if overlap <= 0 or not _visible_in_slice(plan, bleed, i):
            continue
        mask = _bleed_mask(bleed, plan, i, x, y, theta, depth, radius, brain, ventricles, sulci | fissure, a, b)
        mask &= soft_tissue
        if overlap >= diff.positive_overlap and mask.sum() >= min_pixels:
            labels[bleed.subtype] = 1
        if bleed.subtype == "intraparenchymal":  # hypodense oedema rim
            rim = brain & ~mask & _blob(bleed, plan, i, x, y, grow=3.0)
            hu[rim] -= 8.0 * overlap
        # partial volume: the slice averages blood with what it displaces
        hu[mask] = overlap * bleed.blood_hu + (1.0 - overlap) * hu[mask]

    hu = gaussian_filter(hu, sigma=0.55 / px)  # ~0.55 mm of blur whatever the matrix size
    # noise_hu is the noise at 256 x 256 sampling: white noise scaled so area-resizing to 256 gives it
    hu += rng.normal(0.0, diff.noise_hu * n / 256, size=hu.shape)
    labels["any"] = int(any(labels[sub] for sub in SUBTYPES))
    return hu.astype(np.float32), labels


def _blob(bleed: Bleed, plan: StudyPlan, i: int, x: np.ndarray, y: np.ndarray, grow: float = 0.0) -> np.ndarray:
    rad = bleed.span * _profile(bleed, i) + grow
    ang = np.arctan2(y - bleed.y, x - bleed.x)
    wobble = 1.0 + 0.18 * np.sin(3 * ang + bleed.angle) + 0.1 * np.sin(5 * ang + 2 * bleed.angle)
    return np.hypot(x - bleed.x, (y - bleed.y) / 1.15) < rad * wobble


def _angle_diff(theta: np.ndarray, angle: float) -> np.ndarray:
    return np.abs((theta - angle + math.pi) % (2 * math.pi) - math.pi)


def _bleed_mask(bleed, plan, i, x, y, theta, depth, radius, brain, ventricles, csf, a, b) -> np.ndarray:
    prof = _profile(bleed, i)
    if bleed.subtype in ("epidural", "subdural"):
        dtheta = _angle_diff(theta, bleed.angle) / (bleed.span * (0.6 + 0.4 * prof))
        inside = dtheta < 1.0
        if bleed.subtype == "epidural":  # biconvex lens: thickest in the middle
            shape = 1.0 - dtheta**2
        else:  # crescent: even thickness, tapering ends
            shape = np.sqrt(np.clip(1.0 - dtheta**4, 0, 1))
        return brain & inside & (depth < bleed.thickness * prof * shape)
    if bleed.subtype == "subarachnoid":
        sector = _angle_diff(theta, bleed.angle) < bleed.span
        mask = csf & ~ventricles & sector
        if bleed.thickness < 0.5:
            mask |= csf & (np.abs(x) < 1.2) & (np.abs(y) > 0.2 * b)
        return mask
    if bleed.subtype == "intraparenchymal":
        return brain & ~ventricles & _blob(bleed, plan, i, x, y)
    if bleed.subtype == "intraventricular":
        if not ventricles.any():
            return ventricles
        ys = y[ventricles]
        level = ys.max() - bleed.thickness * prof * (ys.max() - ys.min())
        return ventricles & (y > level)
    raise ValueError(f"unknown subtype {bleed.subtype}")


# ------------------------------------------------------------------------------------ DICOM


def _encode(hu: np.ndarray, encoding: str) -> tuple[np.ndarray, dict]:
    """Stored values + the tags that describe them."""
    if encoding == "int16":
        stored = np.clip(np.rint(hu) + 1024, -32768, 32767).astype(np.int16)
        return stored, dict(BitsStored=16, HighBit=15, PixelRepresentation=1, RescaleIntercept=-1024, RescaleSlope=1)
    if encoding == "int16_slope":
        stored = np.clip(np.rint((hu + 1024) / 0.5), -32768, 32767).astype(np.int16)
        return stored, dict(BitsStored=16, HighBit=15, PixelRepresentation=1, RescaleIntercept=-1024, RescaleSlope=0.5)
    if encoding == "uint12":
        stored = np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16)
        return stored, dict(BitsStored=12, HighBit=11, PixelRepresentation=0, RescaleIntercept=-1024, RescaleSlope=1)
    if encoding == "uint12_wrapped":
        # HU stored modulo 4096 with intercept 0: what the RSNA fix undoes
        stored = (np.clip(np.rint(hu), -1000, 3095).astype(np.int32) % 4096).astype(np.uint16)
        return stored, dict(BitsStored=12, HighBit=11, PixelRepresentation=0, RescaleIntercept=0, RescaleSlope=1)
    raise ValueError(f"unknown encoding {encoding!r}; choose from {sorted(ENCODINGS)}")


def slice_dataset(plan: StudyPlan, i: int, hu: np.ndarray, seed: int) -> pydicom.Dataset:
    """A CT Image Storage dataset for slice i (uncompressed)."""
    sop_uid = _uid(seed, "sop", plan.index, i)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20260101"
    ds.Modality = "CT"
    ds.Manufacturer = "ichd-ray synthetic"
    ds.PatientName = "SYNTHETIC^PATIENT"
    ds.PatientID = f"SYN{plan.patient_index:06d}"
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = plan.thickness_mm
    ds.KVP = 120
    ds.StudyInstanceUID = plan.study_uid
    ds.SeriesInstanceUID = plan.series_uid
    ds.StudyID = str(plan.index)
    ds.SeriesNumber = 2
    ds.InstanceNumber = plan.n_slices - i if plan.reverse_instance else i + 1
    tilt = math.radians(plan.tilt_deg)
    col_dir = (0.0, math.cos(tilt), -math.sin(tilt))
    normal = (0.0, math.sin(tilt), math.cos(tilt))
    half = plan.fov_mm / 2
    along = plan.z0_mm + i * plan.thickness_mm
    ds.ImagePositionPatient = [round(v, 4) for v in (-half, -half * col_dir[1] + along * normal[1], -half * col_dir[2] + along * normal[2])]
    ds.ImageOrientationPatient = [1, 0, 0, 0, round(col_dir[1], 6), round(col_dir[2], 6)]
    ds.FrameOfReferenceUID = _uid(seed, "for", plan.index)
    ds.SliceLocation = round(along, 4)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = plan.size
    ds.PixelSpacing = [round(plan.fov_mm / plan.size, 6)] * 2
    ds.BitsAllocated = 16
    ds.WindowCenter, ds.WindowWidth = 40, 80
    stored, tags = _encode(hu, plan.encoding)
    if plan.encoding == "int16":  # GE-style padding outside the reconstruction circle
        n = plan.size
        yy, xx = np.mgrid[:n, :n]
        stored = stored.copy()
        stored[np.hypot(xx - (n - 1) / 2, yy - (n - 1) / 2) > n / 2] = -2000  # HU -3024
        ds.PixelPaddingValue = int(stored[0, 0])
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = stored.tobytes()
    if plan.transfer_syntax != pydicom.uid.ExplicitVRLittleEndian:
        kwargs = {"encoding_plugin": "pylibjpeg"} if plan.transfer_syntax == pydicom.uid.RLELossless else {}
        ds.compress(UID(plan.transfer_syntax), generate_instance_uid=False, **kwargs)
    return ds


def render_study(cfg: SynthConfig, plan: StudyPlan) -> tuple[list[tuple[str, bytes]], list[dict[str, int]], list[str]]:
    """Render every slice: (file name, DICOM bytes), labels and SOP UIDs per slice, in z order."""
    rng = np.random.default_rng([cfg.seed, plan.index, plan.noise_seed])
    files, labels, sops = [], [], []
    for i in range(plan.n_slices):
        hu, slice_label = render_slice(plan, i, cfg.difficulty, rng)
        ds = slice_dataset(plan, i, hu, cfg.seed)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append((f"{ds.SOPInstanceUID}.dcm", buf.getvalue()))
        labels.append(slice_label)
        sops.append(str(ds.SOPInstanceUID))
    return files, labels, sops


def _write_study(args: tuple[SynthConfig, int, int, str, dict | None]) -> dict:
    cfg, index, patient_index, out, storage_cfg = args
    config = storage.StorageConfig.from_dict(storage_cfg) if storage_cfg else None
    plan = plan_study(cfg, index, patient_index)
    files, labels, sops = render_study(cfg, plan)
    for fname, data in files:
        storage.write_bytes(storage.join(out, plan.study_uid, fname), data, config=config)
    bad = []
    if index < cfg.bad_files:
        kind, reason = BAD_KINDS[index % len(BAD_KINDS)]
        fname = f"bad-{kind}-{index}.dcm"
        storage.write_bytes(storage.join(out, plan.study_uid, fname), _bad_object(kind, plan, files, cfg.seed), config=config)
        bad.append({"uri": storage.join(out, plan.study_uid, fname), "kind": kind, "reason": reason})
    subtypes = sorted({b.subtype for b in plan.bleeds})
    row = {
        "study_uid": plan.study_uid,
        "series_uid": plan.series_uid,
        "patient_index": plan.patient_index,
        "n_slices": plan.n_slices,
        "size": plan.size,
        "slice_thickness": plan.thickness_mm,
        "tilt_deg": round(plan.tilt_deg, 3),
        "encoding": plan.encoding,
        "transfer_syntax": UID(plan.transfer_syntax).name,
        "instance_order": "reversed" if plan.reverse_instance else "ascending",
        "subtypes": ";".join(subtypes),
    }
    for sub in CLASSES:
        row[f"slices_{sub}"] = sum(lab[sub] for lab in labels)
    row["bytes"] = sum(len(d) for _, d in files)
    return {"row": row, "labels": list(zip(sops, labels)), "bad": bad}


def _bad_object(kind: str, plan: StudyPlan, files: list[tuple[str, bytes]], seed: int) -> bytes:
    """An invalid object of the given kind, made from the study's own first slice where it helps."""
    if kind == "empty":
        return b""
    if kind == "truncated":
        data = files[0][1]
        return data[: len(data) * 2 // 3]
    if kind == "text":
        return b"This is not a DICOM file: a note left in the archive.\n"
    ds = pydicom.dcmread(io.BytesIO(files[0][1]))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(seed, "bad", plan.index, kind)
    if kind == "localizer":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    elif kind == "mr":
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
    elif kind == "pixel_size_mismatch":
        ds.Rows = ds.Rows * 2  # header claims more pixels than the data holds
    else:
        raise ValueError(f"unknown bad-file kind {kind!r}")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def generate(out: str, cfg: SynthConfig, *, workers: int = 1, storage_config: storage.StorageConfig | None = None) -> dict:
    """Write a synthetic study set to ``out`` (local path, ``file://`` or ``s3://``).

    Args:
        out: destination prefix.
        cfg: what to generate.
        workers: processes rendering studies in parallel (the result does not depend on it).
        storage_config: S3 endpoint/credentials (default: from the environment).

    Returns:
        Summary dict: studies, slices, positive slices per class, bytes, seconds, paths.
    """
    started = time.perf_counter()
    owners = _patient_of(cfg)
    cfg_dict = storage_config.to_dict() if storage_config else None
    jobs = [(cfg, i, owners[i], out, cfg_dict) for i in range(cfg.studies)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_write_study, jobs))
    else:
        results = [_write_study(job) for job in jobs]

    label_buf = io.StringIO()
    writer = csv.writer(label_buf, lineterminator="\n")
    writer.writerow(["ID", "Label"])
    for res in results:
        for sop, labels in res["labels"]:
            for sub in CLASSES:
                writer.writerow([f"ID_{sop}_{sub}", labels[sub]])
    study_buf = io.StringIO()
    rows = [res["row"] for res in results]
    dict_writer = csv.DictWriter(study_buf, fieldnames=list(rows[0]), lineterminator="\n")
    dict_writer.writeheader()
    dict_writer.writerows(rows)
    storage.write_bytes(storage.join(out, "labels.csv"), label_buf.getvalue().encode(), config=storage_config)
    storage.write_bytes(storage.join(out, "studies.csv"), study_buf.getvalue().encode(), config=storage_config)
    bad = [b for res in results for b in res["bad"]]
    if bad:
        bad_buf = io.StringIO()
        bad_writer = csv.DictWriter(bad_buf, fieldnames=["uri", "kind", "reason"], lineterminator="\n")
        bad_writer.writeheader()
        bad_writer.writerows(bad)
        storage.write_bytes(storage.join(out, "bad_files.csv"), bad_buf.getvalue().encode(), config=storage_config)

    n_slices = sum(r["n_slices"] for r in rows)
    return {
        "out": out,
        "studies": len(rows),
        "slices": n_slices,
        "positive_slices": {sub: sum(r[f"slices_{sub}"] for r in rows) for sub in CLASSES},
        "positive_studies": sum(1 for r in rows if r["subtypes"]),
        "bytes": sum(r["bytes"] for r in rows),
        "bad_files": len(bad),
        "seconds": round(time.perf_counter() - started, 2),
        "config": asdict(cfg),
    }
