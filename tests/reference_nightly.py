"""The pandas implementations of the nightly table work as they were before issue 11 (commit b105c7b),
kept as the oracle that ichd_ray.pipeline.incremental (DuckDB) is checked against in test_incremental.
Frozen: not used by the package."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import pandas as pd

_AXIAL_MIN_NORMAL_Z = math.cos(math.radians(35))


def select_series(headers: pd.DataFrame, preferred_thickness_mm: float = 5.0) -> pd.DataFrame:
    """Apply the series rule (module docstring); returns the table with ``reason``, ``message``,
    ``selected`` and ``slice_index`` filled in. Pure: no I/O."""
    df = headers.copy().sort_values("uri", kind="stable").reset_index(drop=True)
    df["selected"] = False
    df["slice_index"] = pd.array([None] * len(df), dtype="Int32")
    ok = df["reason"].isna()

    # Changed from b105c7b, which looked for duplicates among rejected objects too: an accepted slice whose
    # SOP UID a rejected file (earlier by URI) shared became "duplicate ... also in None" (test_incremental).
    dup = ok & df["sop_uid"].where(ok).duplicated(keep="first") & df["sop_uid"].notna()
    first_uri = df[ok & ~dup].drop_duplicates("sop_uid").set_index("sop_uid")["uri"]
    df.loc[dup, "reason"] = "duplicate"
    df.loc[dup, "message"] = [f"SOPInstanceUID also in {first_uri.get(s)}" for s in df.loc[dup, "sop_uid"]]

    ok = df["reason"].isna()
    not_axial = ok & df["normal_z"].notna() & (df["normal_z"] < _AXIAL_MIN_NORMAL_Z)
    df.loc[not_axial, "reason"] = "other_series"
    df.loc[not_axial, "message"] = "not an axial series (slice normal more than 35 degrees from z)"

    ok = df["reason"].isna()
    for study_uid, study in df[ok].groupby("study_uid", sort=True):
        series_stats = []
        for series_uid, series in study.groupby("series_uid", sort=True):
            thickness = series["slice_thickness"].median()
            distance = abs(thickness - preferred_thickness_mm) if pd.notna(thickness) else math.inf
            series_stats.append((distance, -len(series), series_uid))
        chosen = min(series_stats)[2]
        for _, _, series_uid in series_stats:
            idx = study.index[study["series_uid"] == series_uid]
            if series_uid != chosen:
                df.loc[idx, "reason"] = "other_series"
                df.loc[idx, "message"] = f"study {study_uid} scored with series {chosen} (rule: thickness nearest {preferred_thickness_mm:g} mm, then most slices)"
                continue
            # every accepted slice has a position (the reader rejects one without: bad_header)
            order = df.loc[idx].sort_values(["position", "instance_number", "sop_uid"], kind="stable", na_position="last")
            df.loc[order.index, "slice_index"] = np.arange(len(order), dtype=np.int32)
            df.loc[order.index, "selected"] = True
    return df


def _changed(old: pd.Series, new: dict[str, Any]) -> bool:
    """An object changed when its ETag differs (both known), else when size or mtime differs."""
    if old.get("etag") and new.get("etag"):
        return old["etag"] != new["etag"]
    return old.get("size") != new.get("size") or not _same_mtime(old.get("mtime"), new.get("mtime"))


def _same_mtime(a: Any, b: Any) -> bool:
    if a is None or b is None or (isinstance(a, float) and np.isnan(a)) or (isinstance(b, float) and np.isnan(b)):
        return a is None and b is None
    return abs(float(a) - float(b)) < 1e-6


def diff_listing(previous: pd.DataFrame | None, listing: list[dict[str, Any]]) -> tuple[pd.DataFrame, list[dict[str, Any]], pd.DataFrame]:
    """Split today's listing against the last committed index.

    Args:
        previous: The last committed index (``INDEX_SCHEMA`` columns) or None on the first night.
        listing: ``{uri, size, mtime, etag}`` per object in the archive now.

    Returns:
        (unchanged, to_read, deleted): index rows still valid as they are; listing entries that are new
        or changed (their headers must be read); index rows whose object is gone (marked deleted).
    """
    if previous is None or previous.empty:
        return pd.DataFrame(columns=previous.columns if previous is not None else []), list(listing), pd.DataFrame(columns=previous.columns if previous is not None else [])
    live = previous[~previous["deleted"].astype(bool)].set_index("uri", drop=False)
    seen, to_read, unchanged_uris = set(), [], []
    for entry in listing:
        uri = entry["uri"]
        seen.add(uri)
        if uri in live.index and not _changed(live.loc[uri], entry):
            unchanged_uris.append(uri)
        else:
            to_read.append(entry)
    unchanged = live.loc[unchanged_uris].reset_index(drop=True)
    deleted = previous[~previous["uri"].isin(seen)].copy()
    deleted["deleted"] = True
    return unchanged, to_read, deleted.reset_index(drop=True)


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _number(value: Any, digits: int) -> str:
    """The same text whether the column came back as int, float or object (a Parquet round trip)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return f"{float(value):.{digits}f}"


def study_fingerprints(index: pd.DataFrame) -> pd.Series:
    """sha256 per study over its live objects' (uri, etag, size, mtime): any added, removed or replaced
    object changes it. Deleted rows and objects without a study are ignored."""
    live = index[~index["deleted"].astype(bool) & index["study_uid"].notna()]
    out = {}
    for study_uid, group in live.sort_values("uri").groupby("study_uid", sort=True):
        text = "\n".join(f"{r.uri}|{_text(r.etag)}|{_number(r.size, 0)}|{_number(r.mtime, 6)}" for r in group.itertuples())
        out[study_uid] = hashlib.sha256(text.encode()).hexdigest()
    return pd.Series(out, dtype=object, name="fingerprint")


def plan_studies(
    index: pd.DataFrame, scored: pd.DataFrame | None, model_version: str, full: bool = False
) -> pd.DataFrame:
    """The studies to score tonight and why.

    Args:
        index: Tonight's index (after the series rule).
        scored: Latest committed ``scored`` row per study (``study_uid``, ``fingerprint``, ``model_version``).
        model_version: The bundle's version.
        full: Score every study.

    Returns:
        DataFrame ``study_uid, fingerprint, reason`` (reason: full | new | model | changed), by study.
    """
    selected = index[index["selected"].astype(bool) & ~index["deleted"].astype(bool)]
    fingerprints = study_fingerprints(index)
    last = scored.set_index("study_uid") if scored is not None and len(scored) else pd.DataFrame(columns=["fingerprint", "model_version"])
    rows = []
    for study_uid in sorted(selected["study_uid"].unique()):
        fp = fingerprints[study_uid]
        if full:
            reason = "full"
        elif study_uid not in last.index:
            reason = "new"
        elif last.loc[study_uid, "model_version"] != model_version:
            reason = "model"
        elif last.loc[study_uid, "fingerprint"] != fp:
            reason = "changed"
        else:
            continue
        rows.append({"study_uid": study_uid, "fingerprint": fp, "reason": reason})
    return pd.DataFrame(rows, columns=["study_uid", "fingerprint", "reason"])


