"""Ground-truth labels in the RSNA 2019 format: parse, validate, look up by SOP UID. Pure, no Ray.

The RSNA file has a header ``ID,Label`` and six rows per image, ``ID_<image>_<subtype>,<0|1>``, with
``<subtype>`` one of :data:`ichd_ray.CLASSES`. The image id is ``ID_<image>``; RSNA DICOMs carry that
same string (``ID_6431af929``) as SOPInstanceUID, while :mod:`ichd_ray.synthetic.generate` and ordinary DICOMs have
dotted UIDs and the file prefixes them (``ID_1.2.3...``): :func:`label_id` maps both to the image id.

The official file repeats some rows verbatim; those are dropped. Everything else that would make a
metric silently wrong (an unknown subtype, a label that is not 0/1, the same ID with two labels, an
image without all six rows, ``any`` disagreeing with the subtypes) raises :class:`LabelsError` naming
the file, the problem and the first offending lines.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ichd_ray import CLASSES

__all__ = ["LabelsError", "label_id", "labels_for", "parse_labels"]

#: How many offending lines or IDs an error message lists.
_SHOW = 5
_ID_PREFIX = "ID_"


class LabelsError(ValueError):
    """A labels file that cannot be used as ground truth; the message names the file and the problem."""


def label_id(sop_uid: str) -> str:
    """The RSNA image id of a SOP Instance UID.

    Args:
        sop_uid: SOPInstanceUID as read from the DICOM header (or the ``sop_uid`` result column).

    Returns:
        str: the UID itself when it already starts with ``ID_`` (RSNA DICOMs), else ``"ID_" + sop_uid``.
    """
    sop_uid = str(sop_uid)
    return sop_uid if sop_uid.startswith(_ID_PREFIX) else _ID_PREFIX + sop_uid


def _examples(lines: Iterable[int], ids: Iterable[str]) -> str:
    pairs = [f"line {ln}: {i!r}" for ln, i in zip(lines, ids)]
    more = "" if len(pairs) <= _SHOW else f" (+{len(pairs) - _SHOW} more)"
    return "; ".join(pairs[:_SHOW]) + more


def _read_csv(text: str, name: str) -> pd.DataFrame:
    """The CSV as strings, indexed by file line number (header = line 1), blank lines dropped."""
    try:
        # skip_blank_lines=False keeps one row per physical line, so row i is line i + 2 in messages.
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise LabelsError(f"{name}: empty file, expected a header 'ID,Label'") from None
    except pd.errors.ParserError as exc:
        raise LabelsError(f"{name}: not a valid CSV: {exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("ID", "Label") if c not in frame.columns]
    if missing:
        raise LabelsError(
            f"{name}: missing column(s) {', '.join(missing)}; expected a header 'ID,Label', got {list(frame.columns)}"
        )
    frame = frame[["ID", "Label"]].apply(lambda col: col.str.strip())
    frame.index = frame.index + 2
    return frame[(frame["ID"] != "") | (frame["Label"] != "")]


def _split_ids(ids: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``ID_<image>_<subtype>`` -> (image id ``ID_<image>``, subtype); both None without an underscore.

    Same as ``str.rsplit('_', 1)``, in Arrow: the official file has 4.5 million rows, and the
    per-string Python split was most of the parse time.
    """
    parts = pc.split_pattern(pa.array(ids.to_numpy(dtype=object), type=pa.string()), "_", max_splits=1, reverse=True)
    # list_element fails on a too-short list, so blank the IDs without an underscore first.
    parts = pc.if_else(pc.equal(pc.list_value_length(parts), 2), parts, pa.scalar(None, parts.type))
    image = pc.list_element(parts, 0).to_pandas().set_axis(ids.index)
    subtype = pc.list_element(parts, 1).to_pandas().set_axis(ids.index)
    return image, subtype


def parse_labels(data: bytes | str, name: str = "labels.csv") -> pd.DataFrame:
    """Parse and validate an RSNA labels CSV into one row per image.

    Args:
        data: the file content (bytes are decoded as UTF-8; a byte-order mark is ignored).
        name: what to call the file in error messages (its URI).

    Returns:
        pandas.DataFrame: index ``image_id`` (``ID_<image>``, in order of first appearance), columns
        exactly :data:`ichd_ray.CLASSES` in order, dtype uint8.

    Raises:
        LabelsError: missing columns, no label rows, a malformed ID or unknown subtype, a label other
            than 0/1, the same ID with different labels, an image missing some classes, or ``any`` not
            equal to the max of the subtypes. The message names the file and the first offenders.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise LabelsError(f"{name}: not UTF-8 text: {exc}") from None
    elif data.startswith("\ufeff"):
        data = data[1:]
    frame = _read_csv(data, name)
    if frame.empty:
        raise LabelsError(f"{name}: no label rows after the header")

    image, subtype = _split_ids(frame["ID"])
    bad = subtype.isna() | (image == "") | ~subtype.isin(CLASSES)
    if bad.any():
        raise LabelsError(
            f"{name}: {int(bad.sum())} ID(s) not of the form ID_<image>_<subtype> with subtype in "
            f"{', '.join(CLASSES)}: {_examples(frame.index[bad], frame['ID'][bad])}"
        )

    value = pd.to_numeric(frame["Label"], errors="coerce")
    bad = ~value.isin((0, 1))
    if bad.any():
        shown = [f"{i},{v}" for i, v in zip(frame["ID"][bad], frame["Label"][bad])]
        raise LabelsError(f"{name}: {int(bad.sum())} label(s) not 0 or 1: {_examples(frame.index[bad], shown)}")

    rows = pd.DataFrame({"id": frame["ID"], "image_id": image, "subtype": subtype, "label": value.astype(np.uint8)})
    # The official stage-2 file repeats some rows verbatim; identical repeats carry no conflict.
    rows = rows.drop_duplicates(subset=["id", "label"])
    conflict = rows["id"].duplicated(keep=False)
    if conflict.any():
        shown = [f"{i},{v}" for i, v in zip(rows["id"][conflict], rows["label"][conflict])]
        n_ids = rows["id"][conflict].nunique()
        raise LabelsError(
            f"{name}: {n_ids} ID(s) given conflicting labels: {_examples(rows.index[conflict], shown)}"
        )

    order = pd.unique(rows["image_id"])
    table = rows.pivot(index="image_id", columns="subtype", values="label").reindex(index=order, columns=list(CLASSES))
    incomplete = table.isna().any(axis=1)
    if incomplete.any():
        detail = [
            f"{img!r} lacks {', '.join(c for c in CLASSES if pd.isna(table.at[img, c]))}"
            for img in table.index[incomplete][:_SHOW]
        ]
        raise LabelsError(
            f"{name}: {int(incomplete.sum())} image(s) without all {len(CLASSES)} classes: {'; '.join(detail)}"
        )
    table = table.astype(np.uint8)
    table.index.name = "image_id"
    table.columns.name = None

    values = table.to_numpy()
    # The challenge defines `any` as "some subtype present"; a file that disagrees has a broken row.
    wrong = values[:, -1] != values[:, :-1].max(axis=1)
    if wrong.any():
        shown = ", ".join(repr(i) for i in table.index[wrong][:_SHOW])
        raise LabelsError(
            f"{name}: {int(wrong.sum())} image(s) with 'any' not equal to the max of the subtypes, e.g. {shown}"
        )
    return table


def labels_for(sop_uids: Iterable[str], labels_df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the given slices, looked up by :func:`label_id`.

    Args:
        sop_uids: SOP Instance UIDs, one per slice.
        labels_df: a frame from :func:`parse_labels` (unique ``image_id`` index, :data:`CLASSES` columns).

    Returns:
        tuple[np.ndarray, np.ndarray]: ``[N, 6]`` uint8 labels in :data:`CLASSES` order (zeros where not
        found) and ``[N]`` bool, True where the slice has a label.
    """
    ids = [label_id(s) for s in sop_uids]
    position = labels_df.index.get_indexer(ids)
    found = position >= 0
    out = np.zeros((len(ids), len(CLASSES)), dtype=np.uint8)
    out[found] = labels_df[list(CLASSES)].to_numpy(dtype=np.uint8)[position[found]]
    return out, found
