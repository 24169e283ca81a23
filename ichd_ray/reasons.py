"""Every reason an input is not scored, and what kind of outcome it is. Pure data, no I/O.

A listed object ends as a scored slice or as one ``errors`` row with a ``reason``. Each reason is one of:

* ``fault``: something is wrong with the object or the system (unreadable, truncated, a header the
  pipeline cannot trust, a decoder or model failure). Faults are what on-call acts on, and the only
  rejections the failed-run limit (``--max-reject-fraction``) counts.
* ``selection``: a valid object left out on purpose by a documented rule (the study's other series,
  scouts, derived images, other modalities, duplicates). A real head-CT study has many of these.
* ``skip``: not a candidate at all (side files excluded by suffix: labels, notes, manifests).

:data:`REASON_CLASS` is the one table; README's "Guarantees" section shows it and a test checks that
every code the pipeline can emit is in it.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["REJECT_REASONS", "FAULT", "SELECTION", "SKIP", "OUTCOMES", "PIPELINE_REASONS", "ALL_REASONS", "REASON_CLASS", "reason_class", "count_outcomes"]

#: The DICOM reader's rejection codes (:mod:`ichd_ray.dicom.read`), in the order they are checked.
#: ``duplicate`` and ``other_series`` come from the index stage (series selection), never from a single
#: file. ``bad_header`` follows the selection reasons and ``no_pixel_data`` (see the reader's docstring).
#: Defined here, the bottom layer, so the result tables and reports can name them without the reader.
REJECT_REASONS: tuple[str, ...] = (
    "empty",
    "not_dicom",
    "truncated",
    "not_ct",
    "localizer",
    "derived",
    "multi_frame",
    "no_pixel_data",
    "bad_header",
    "pixel_size_mismatch",
    "missing_codec",
    "decode_error",
    "duplicate",
    "other_series",
)

FAULT, SELECTION, SKIP = "fault", "selection", "skip"
OUTCOMES = (FAULT, SELECTION, SKIP)

#: Reasons the pipeline gives beside the DICOM reader's (:data:`REJECT_REASONS`).
PIPELINE_REASONS: tuple[str, ...] = ("excluded", "read_error", "internal_error", "score_error")
#: Every code an ``errors`` row can carry.
ALL_REASONS: tuple[str, ...] = REJECT_REASONS + PIPELINE_REASONS

#: Reason code -> outcome, with why (the README table is generated from the same words).
REASON_CLASS: dict[str, str] = {
    "empty": FAULT,  # a 0-byte object: a failed transfer
    "not_dicom": FAULT,  # not a DICOM file and not excluded by suffix: unexpected in an archive
    "truncated": FAULT,
    "bad_header": FAULT,  # a required attribute absent or unparseable: never defaulted
    "not_ct": SELECTION,  # MR, CR, SR, ... in the same archive
    "localizer": SELECTION,  # scouts and topograms
    "derived": SELECTION,  # reformats, MIPs, secondary captures of CT
    "multi_frame": SELECTION,  # Enhanced CT: not scored by this pipeline (documented limit)
    "no_pixel_data": FAULT,  # a CT image without pixels
    "pixel_size_mismatch": FAULT,
    "missing_codec": FAULT,  # a deployment problem: the image is fine, the decoder is not installed
    "decode_error": FAULT,
    "duplicate": SELECTION,  # the same SOPInstanceUID stored twice: the first (by URI) is scored
    "other_series": SELECTION,  # the study is scored from one series (the series rule)
    "excluded": SKIP,  # side file by suffix (index.exclude_suffixes)
    "read_error": FAULT,  # storage failed to return the object
    "internal_error": FAULT,  # a bug: the object could not be classified
    "score_error": FAULT,  # the model stage failed on the object's study
}


def reason_class(reason: str) -> str:
    """The outcome (``fault``, ``selection`` or ``skip``) of a reason code; unknown codes raise."""
    try:
        return REASON_CLASS[reason]
    except KeyError:
        raise ValueError(f"unknown reason code {reason!r}: add it to ichd_ray.reasons.REASON_CLASS") from None


def count_outcomes(reasons: Iterable[str]) -> dict[str, int]:
    """``{fault: n, selection: n, skip: n}`` over reason codes (every outcome present, 0 when none)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for reason in reasons:
        counts[reason_class(reason)] += 1
    return counts
