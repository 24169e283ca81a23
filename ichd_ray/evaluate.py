"""Score a committed run against ground truth: slice, study and ETH patient-level metrics. No Ray.

* Slice level: each scored slice whose SOP UID has a label (:func:`ichd_ray.labels.labels_for`); the
  challenge's weighted log loss, and per class AUC, sensitivity and specificity at the thresholds.
* Study level: a study is positive for a class when any of its slices is, and its probability is the
  max over its slices (:func:`ichd_ray.metrics.study_labels` on both), scored the same way.
* ETH patient level: a study is called positive for ``any`` when at least 3 consecutive slices (in
  ``slice_index`` order, within a series) have ``p_any >= threshold``
  (:func:`ichd_ray.metrics.consecutive_positive`); F1 against the study's ``any`` label.

Slices without a label are left out of every metric, the ETH rule included, and counted
(``n_unlabelled``): a labels file for part of an archive is normal, a run with no labelled slice is an
error. Results are plain JSON (NaN,
e.g. the AUC of a class without positives, becomes ``null``).

Predictions are read through the DuckDB views (:func:`ichd_ray.report.connect`), which only show the
attempt a ``runs`` object commits, so a crashed or in-flight attempt is never evaluated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ichd_ray import CLASSES, storage
from ichd_ray.labels import labels_for, read_labels
from ichd_ray.metrics import (
    consecutive_positive,
    f1_score,
    per_class_auc,
    sensitivity_specificity,
    study_labels,
    weighted_log_loss,
)

__all__ = ["ETH_MIN_CONSECUTIVE", "evaluate", "evaluate_predictions", "format_table", "read_predictions"]

#: The ETH report's rule: a study is positive when this many consecutive slices are.
ETH_MIN_CONSECUTIVE = 3
_P_COLUMNS = [f"p_{c}" for c in CLASSES]
_ANY = CLASSES.index("any")


def _num(value: float) -> float | None:
    """A float for JSON: NaN and infinities (undefined metrics) become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def _check_thresholds(thresholds: Sequence[float] | None) -> list[float]:
    if thresholds is None:
        return [0.5] * len(CLASSES)
    values = [float(t) for t in thresholds]
    if len(values) != len(CLASSES) or not all(0.0 <= t <= 1.0 for t in values):
        raise ValueError(f"need {len(CLASSES)} thresholds in [0, 1] ({', '.join(CLASSES)}), got {values}")
    return values


def _level_metrics(y: np.ndarray, p: np.ndarray, thresholds: list[float]) -> dict[str, Any]:
    """n, weighted log loss and per class: positives, log loss, AUC, sensitivity, specificity."""
    auc = per_class_auc(y, p)
    sens_spec = sensitivity_specificity(y, p, thresholds)
    per_class = {}
    for i, c in enumerate(CLASSES):
        per_class[c] = {
            "positives": int(y[:, i].sum()),
            "log_loss": _num(weighted_log_loss(y[:, [i]], p[:, [i]], weights=[1.0])),
            "auc": _num(auc[c]),
            "sensitivity": _num(sens_spec[c]["sensitivity"]),
            "specificity": _num(sens_spec[c]["specificity"]),
        }
    return {"n": len(y), "weighted_log_loss": _num(weighted_log_loss(y, p)), "per_class": per_class}


def _eth(slices: pd.DataFrame, study_any: pd.Series, threshold: float) -> dict[str, Any]:
    """The ETH rule per study, scored with F1 against ``study_any`` (index study_uid)."""
    # slice_index restarts in each series, so runs of positive slices are only counted within one.
    keys = ["study_uid", "series_uid"] if "series_uid" in slices.columns else ["study_uid"]
    ordered = slices.sort_values([*keys, "slice_index"], kind="mergesort")
    positive = ordered["p_any"].to_numpy() >= threshold
    called = pd.Series(positive, index=ordered.index).groupby([ordered[k] for k in keys], sort=False, dropna=False).agg(
        lambda s: consecutive_positive(s.to_numpy(), run=ETH_MIN_CONSECUTIVE)
    )
    if len(keys) > 1:
        called = called.groupby(level=0, dropna=False).any()
    called = called.reindex(study_any.index, fill_value=False).astype(bool).to_numpy()
    truth = study_any.to_numpy().astype(bool)
    return {
        "rule": f"any: >= {ETH_MIN_CONSECUTIVE} consecutive slices with p_any >= threshold",
        "threshold": threshold,
        "min_consecutive": ETH_MIN_CONSECUTIVE,
        "n": len(truth),
        "f1": _num(f1_score(truth, called)),
        "tp": int((truth & called).sum()),
        "fp": int((~truth & called).sum()),
        "fn": int((truth & ~called).sum()),
        "tn": int((~truth & ~called).sum()),
    }


def evaluate_predictions(
    slices: pd.DataFrame, labels: pd.DataFrame, thresholds: Sequence[float] | None = None
) -> dict[str, Any]:
    """Slice, study and ETH patient-level metrics of per-slice predictions against labels.

    Args:
        slices: one row per scored slice with ``study_uid``, ``sop_uid``, ``slice_index`` and
            ``p_<class>`` for every class (``series_uid`` optional; when present the ETH rule runs
            within each series).
        labels: a frame from :func:`ichd_ray.labels.parse_labels`.
        thresholds: per-class decision thresholds in :data:`CLASSES` order; default 0.5 each.

    Returns:
        dict: JSON-serialisable. ``n_slices`` (rows given), ``n_unlabelled`` (rows without a label,
        excluded), ``thresholds`` ({class: t}), ``slice`` and ``study`` (each ``n``,
        ``weighted_log_loss``, ``per_class`` {class: positives, log_loss, auc, sensitivity,
        specificity}), ``eth`` (rule, threshold, min_consecutive, n, f1, tp, fp, fn, tn). Undefined
        values (an AUC without positives) are None.

    Raises:
        ValueError: missing columns, probabilities that are NaN or outside [0, 1], bad thresholds, or
            no slice with a label.
    """
    missing = [c for c in ("study_uid", "sop_uid", "slice_index", *_P_COLUMNS) if c not in slices.columns]
    if missing:
        raise ValueError(f"predictions lack column(s) {', '.join(missing)}")
    t = _check_thresholds(thresholds)
    y_all, found = labels_for(slices["sop_uid"], labels)
    if not found.any():
        example = f", e.g. sop_uid {slices['sop_uid'].iloc[0]!r}" if len(slices) else ""
        raise ValueError(f"none of the {len(slices)} predicted slices has a label{example}")

    labelled = slices.loc[found].reset_index(drop=True)
    y = y_all[found].astype(np.float64)
    p = labelled[_P_COLUMNS].to_numpy(dtype=np.float64)
    if not np.all((p >= 0.0) & (p <= 1.0)):  # also catches NaN
        raise ValueError("predicted probabilities must lie in [0, 1] (NaN found or out of range)")

    # One key type for np.unique here and the groupby in _eth (study UIDs are strings in the tables).
    labelled["study_uid"] = labelled["study_uid"].astype(str)
    study_ids = labelled["study_uid"].to_numpy()
    ids, y_study = study_labels(y, study_ids)
    _, p_study = study_labels(p, study_ids)  # same keys, so the same (sorted) study order
    return {
        "n_slices": len(slices),
        "n_unlabelled": int((~found).sum()),
        "thresholds": dict(zip(CLASSES, t)),
        "slice": _level_metrics(y, p, t),
        "study": _level_metrics(y_study, p_study, t),
        "eth": _eth(labelled, pd.Series(y_study[:, _ANY], index=ids), t[_ANY]),
    }


def _frame(con, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
    # Through Arrow rather than DuckDB's .df(), which trips pandas 3 deprecation warnings.
    return con.sql(sql, params=params).to_arrow_table().to_pandas()


def _runs(con, out_uri: str) -> pd.DataFrame:
    import duckdb

    try:
        return _frame(con, "SELECT run_id, attempt, status, finished_at FROM runs")
    except duckdb.IOException:
        # The runs glob matches nothing: no run under OUT has committed yet.
        raise FileNotFoundError(f"no committed runs under {out_uri} (no runs/run_id=*/run.parquet)") from None


def read_predictions(
    out_uri: str, run_id: str | None = None, storage_config: storage.StorageConfig | None = None
) -> pd.DataFrame:
    """The ``slices`` table of one committed run, through the views (never an uncommitted attempt).

    Args:
        out_uri: the OUT prefix of the scoring runs (local path, ``file://`` or ``s3://``).
        run_id: which run; None means the committed run with the latest ``finished_at`` (whatever its
            status: a run marked failed still has its scored slices).
        storage_config: S3 settings; None means :meth:`ichd_ray.storage.StorageConfig.from_env`.

    Returns:
        pandas.DataFrame: the slices columns (run_id, model_version, study_uid, series_uid, sop_uid,
        uri, slice_index, position_z, p_<class>), ordered by study, series, slice_index.

    Raises:
        FileNotFoundError: nothing committed under ``out_uri``, or no committed run ``run_id``.
    """
    import duckdb

    from ichd_ray.report import connect

    try:
        con = connect(out_uri, storage_config)
    except duckdb.IOException as exc:
        # The views need runs/ and every data table: typically nothing has been committed under OUT.
        raise FileNotFoundError(f"cannot open the result views under {out_uri} (nothing committed there?): {exc}") from None
    try:
        runs = _runs(con, out_uri)
        if run_id is None:
            newest = runs.sort_values(["finished_at", "run_id"], ascending=False, na_position="last")
            run_id = str(newest["run_id"].iloc[0])
        elif run_id not in set(runs["run_id"]):
            known = ", ".join(sorted(map(str, runs["run_id"]))[:10])
            raise FileNotFoundError(f"no committed run {run_id!r} under {out_uri}; committed: {known}")
        try:
            return _frame(
                con, "SELECT * FROM slices WHERE run_id = ? ORDER BY study_uid, series_uid, slice_index", [run_id]
            )
        except duckdb.IOException as exc:
            raise FileNotFoundError(f"run {run_id!r} under {out_uri} is committed but its slices are missing: {exc}") from None
    finally:
        con.close()


def _fmt(value: float | None, width: int = 7, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width text table of an :func:`evaluate_predictions` result.

    Args:
        result: the dict :func:`evaluate_predictions` (or :func:`evaluate`) returned.

    Returns:
        str: rows = classes, columns = slice positives/AUC/sens/spec and study positives/AUC/sens/spec,
        then the weighted log losses, the counts and the ETH patient-level F1 line.
    """
    s, st, eth = result["slice"], result["study"], result["eth"]
    name_w = max(len("weighted log loss"), *(len(c) for c in CLASSES))
    head = f"{'pos':>6}{'AUC':>7}{'sens':>7}{'spec':>7}"
    block_w = len(head)
    lines = []
    if result.get("run_id"):
        lines.append(f"run {result['run_id']} (model {result.get('model_version') or '?'})")
    lines += [
        f"{'':<{name_w}}  {' slices ':-^{block_w}}   {' studies ':-^{block_w}}  {'thr':>5}",
        f"{'class':<{name_w}}  {head}   {head}",
    ]
    for c in CLASSES:
        a, b = s["per_class"][c], st["per_class"][c]
        cells = [
            f"{a['positives']:>6}{_fmt(a['auc'])}{_fmt(a['sensitivity'])}{_fmt(a['specificity'])}",
            f"{b['positives']:>6}{_fmt(b['auc'])}{_fmt(b['sensitivity'])}{_fmt(b['specificity'])}",
        ]
        lines.append(f"{c:<{name_w}}  {cells[0]}   {cells[1]}  {result['thresholds'][c]:>5.2f}")
    lines.append(
        f"{'weighted log loss':<{name_w}}  {'':>6}{_fmt(s['weighted_log_loss'], 7, 4)}{'':>14}"
        f"   {'':>6}{_fmt(st['weighted_log_loss'], 7, 4)}"
    )
    lines.append(
        f"slices: {s['n']} labelled, {result['n_unlabelled']} unlabelled (excluded); studies: {st['n']}"
    )
    f1 = "-" if eth["f1"] is None else f"{eth['f1']:.3f}"
    lines.append(
        f"ETH patient level (any, >= {eth['min_consecutive']} consecutive slices with p_any >= "
        f"{eth['threshold']:.2f}): F1 {f1}  (TP {eth['tp']}, FP {eth['fp']}, FN {eth['fn']}, TN {eth['tn']})"
    )
    return "\n".join(lines)


def evaluate(
    predictions_uri: str,
    labels_uri: str,
    out_json: str | None,
    run_id: str | None = None,
    thresholds: Sequence[float] | None = None,
    storage_config: storage.StorageConfig | None = None,
) -> dict[str, Any]:
    """Evaluate a committed run against an RSNA labels CSV, optionally writing the result as JSON.

    Args:
        predictions_uri: the OUT prefix of the scoring runs.
        labels_uri: the RSNA-format labels CSV.
        out_json: where to write the result (local, ``file://`` or ``s3://``); None: don't write.
        run_id: which run; None means the newest committed one.
        thresholds: per-class thresholds in :data:`CLASSES` order; default 0.5 each.
        storage_config: S3 settings; None means :meth:`ichd_ray.storage.StorageConfig.from_env`.

    Returns:
        dict: :func:`evaluate_predictions`'s result plus ``run_id``, ``model_version``,
        ``predictions_uri`` and ``labels_uri``.

    Raises:
        FileNotFoundError: no committed run (or labels file) where named.
        ichd_ray.labels.LabelsError: an invalid labels file.
        ValueError: nothing labelled, or bad thresholds.
    """
    slices = read_predictions(predictions_uri, run_id, storage_config)
    labels = read_labels(labels_uri, storage_config)
    versions = sorted(map(str, slices["model_version"].dropna().unique())) if "model_version" in slices else []
    result = {
        "run_id": str(slices["run_id"].iloc[0]) if len(slices) else run_id,
        "model_version": ",".join(versions) or None,
        "predictions_uri": str(predictions_uri),
        "labels_uri": str(labels_uri),
        **evaluate_predictions(slices, labels, thresholds),
    }
    if out_json:
        text = json.dumps(result, indent=2, allow_nan=False) + "\n"
        storage.write_bytes(out_json, text.encode("utf-8"), storage_config)
    return result
