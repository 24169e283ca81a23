"""Score a committed run against ground truth: slice, study and ETH patient-level metrics. No Ray.

* Slice level: each scored slice whose SOP UID has a label (:func:`ichd_ray.evaluation.labels.labels_for`); the
  challenge's weighted log loss, and per class AUC, sensitivity and specificity at the slice thresholds.
* Study level, two ways, side by side:
  - ``study_head``: the run's ``studies`` table itself, what analysts read: its ``p_<class>`` (the
    sequence model's study head) scored like the slices, at the study thresholds, and its ``flagged``
    column (sensitivity/specificity against the study's ``any`` label).
  - ``study_max_of_slices``: a study's probability is the max over its slices
    (:func:`ichd_ray.evaluation.metrics.study_labels`), at the slice thresholds (``max >= t`` is "some slice is
    called").

  A study is positive for a class when any of its labelled slices is.
* ETH patient level: a study is called positive for ``any`` when at least 3 consecutive slices (in
  ``slice_index`` order, within a series) have ``p_any >=`` the slice ``any`` threshold
  (:func:`ichd_ray.evaluation.metrics.consecutive_positive`); F1 against the study's ``any`` label.

Thresholds are applied where they were chosen: a bundle's ``slice_thresholds`` (chosen on out-of-fold
slice outputs) to slice outputs, its ``thresholds`` (the study head's, what ``flagged`` uses) to the study
head. Every level in the result says which set it used and where it came from (:class:`Thresholds`); a
bundle without ``slice_thresholds`` (trained before they were chosen) gets 0.5 for slices, with a
warning, never its study thresholds.

Slices without a label are left out of every metric, the ETH rule included, and counted
(``n_unlabelled``): a labels file for part of an archive is normal, a run with no labelled slice is an
error. So are ``studies`` rows of studies without a labelled slice; a labelled study without a
``studies`` row is an error (the run's tables disagree). Results are plain JSON (NaN, e.g. the AUC of a
class without positives, becomes ``null``).

Predictions are read through the DuckDB views (:func:`ichd_ray.io.results.connect`), which only show the
attempt a ``runs`` object commits, so a crashed or in-flight attempt is never evaluated.

Why one module of ~590 lines: the slice, study and patient levels are computed from one joined
table with one set of thresholds and their provenance; the metric functions themselves live in
:mod:`ichd_ray.evaluation.metrics`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import duckdb
import numpy as np
import pandas as pd

from ichd_ray import CLASSES
from ichd_ray.evaluation.labels import labels_for, parse_labels
from ichd_ray.evaluation.metrics import (
    choose_thresholds,
    confusion,
    consecutive_positive,
    f1_score,
    per_class_auc,
    sensitivity_specificity,
    study_labels,
    weighted_log_loss,
)
from ichd_ray.io import storage
from ichd_ray.io.results import connect
from ichd_ray.models.bundle import load_bundle_config

__all__ = [
    "ETH_MIN_CONSECUTIVE",
    "Thresholds",
    "bundle_thresholds",
    "choose_run_thresholds",
    "evaluate",
    "evaluate_predictions",
    "format_table",
    "read_predictions",
    "read_run",
]

#: The ETH report's rule: a study is positive when this many consecutive slices are.
ETH_MIN_CONSECUTIVE = 3
_P_COLUMNS = [f"p_{c}" for c in CLASSES]
_ANY = CLASSES.index("any")


def _num(value: float) -> float | None:
    """A float for JSON: NaN and infinities (undefined metrics) become None."""
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Thresholds:
    """Per-class decision thresholds (:data:`CLASSES` order, each in [0, 1]) and where they came from.

    Attributes:
        values: one threshold per class.
        source: e.g. ``"bundle <version> slice_thresholds (...)"``, ``"default 0.5: <why>"``, ``"given"``.
        defaulted: True when no one chose them (0.5 each); evaluation then warns.
    """

    values: tuple[float, ...]
    source: str = "given"
    defaulted: bool = False

    def __post_init__(self) -> None:
        try:
            values = tuple(float(t) for t in self.values)
        except (TypeError, ValueError):
            values = ()
        if len(values) != len(CLASSES) or not all(0.0 <= t <= 1.0 for t in values):
            raise ValueError(f"need {len(CLASSES)} thresholds in [0, 1] ({', '.join(CLASSES)}), got {self.values!r}")
        object.__setattr__(self, "values", values)

    @classmethod
    def default(cls, why: str) -> Thresholds:
        """0.5 for every class, saying why."""
        return cls((0.5,) * len(CLASSES), f"default 0.5: {why}", defaulted=True)

    @classmethod
    def of(cls, value: ThresholdsLike, why_default: str) -> Thresholds:
        """A :class:`Thresholds` from one, a {class: t} mapping or a sequence in class order (source
        ``"given"``), or None (:meth:`default` with ``why_default``)."""
        if value is None:
            return cls.default(why_default)
        if isinstance(value, Thresholds):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(CLASSES))
            missing = [c for c in CLASSES if c not in value]
            if unknown or missing:
                raise ValueError(f"thresholds need exactly the classes {list(CLASSES)}; missing {missing}, unknown {unknown}")
            return cls(tuple(value[c] for c in CLASSES))
        return cls(tuple(value))

    def to_dict(self) -> dict[str, Any]:
        return {"values": dict(zip(CLASSES, self.values)), "source": self.source, "defaulted": self.defaulted}


#: What the thresholds arguments accept.
ThresholdsLike = Union[Thresholds, Mapping[str, float], Sequence[float], None]


def bundle_thresholds(config: Any) -> tuple[Thresholds, Thresholds]:
    """The (slice, study) thresholds of a :class:`ichd_ray.models.bundle.BundleConfig`.

    Slice: its ``slice_thresholds``; a bundle without them gets :meth:`Thresholds.default` (0.5, saying
    so), never its study thresholds. Study: its ``thresholds`` (the study head's; ``flagged`` uses them).
    """
    version = config.version_id
    study = Thresholds(
        tuple(config.thresholds[c] for c in CLASSES),
        f"bundle {version} thresholds (the study head's, chosen on its out-of-fold study outputs; flagged uses them)",
    )
    recorded = getattr(config, "slice_thresholds", None)
    if recorded is None:
        slice_ = Thresholds.default(
            f"bundle {version} has no slice_thresholds (trained before they were chosen); "
            "its study thresholds are not applied to slices"
        )
    else:
        slice_ = Thresholds(
            tuple(recorded[c] for c in CLASSES), f"bundle {version} slice_thresholds (chosen on out-of-fold slice outputs)"
        )
    return slice_, study


def _level_metrics(y: np.ndarray, p: np.ndarray, thresholds: Thresholds) -> dict[str, Any]:
    """n, weighted log loss, the thresholds and per class: positives, log loss, AUC, sensitivity, specificity."""
    auc = per_class_auc(y, p)
    sens_spec = sensitivity_specificity(y, p, thresholds.values)
    per_class = {}
    for i, c in enumerate(CLASSES):
        per_class[c] = {
            "positives": int(y[:, i].sum()),
            "log_loss": _num(weighted_log_loss(y[:, [i]], p[:, [i]], weights=[1.0])),
            "auc": _num(auc[c]),
            "sensitivity": _num(sens_spec[c]["sensitivity"]),
            "specificity": _num(sens_spec[c]["specificity"]),
        }
    return {
        "n": len(y),
        "weighted_log_loss": _num(weighted_log_loss(y, p)),
        "thresholds": thresholds.to_dict(),
        "per_class": per_class,
    }


def _eth(slices: pd.DataFrame, study_any: pd.Series, thresholds: Thresholds) -> dict[str, Any]:
    """The ETH rule per study at the slice ``any`` threshold, scored with F1 against ``study_any``
    (index study_uid)."""
    threshold = thresholds.values[_ANY]
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
    counts = confusion(truth, called)
    return {
        "rule": f"any: >= {ETH_MIN_CONSECUTIVE} consecutive slices with p_any >= the slice any threshold",
        "threshold": threshold,
        "threshold_source": thresholds.source,
        "min_consecutive": ETH_MIN_CONSECUTIVE,
        "n": len(truth),
        "f1": _num(f1_score(truth, called)),
        **{k: counts[k] for k in ("tp", "fp", "fn", "tn")},
    }


def _study_head(
    studies: pd.DataFrame, ids: np.ndarray, y_study: np.ndarray, thresholds: Thresholds, warnings: list[str]
) -> dict[str, Any]:
    """The ``studies`` table scored against the labelled studies ``ids`` (sorted) with labels ``y_study``."""
    missing = [c for c in ("study_uid", *_P_COLUMNS, "flagged") if c not in studies.columns]
    if missing:
        raise ValueError(f"studies lack column(s) {', '.join(missing)}")
    uids = studies["study_uid"].astype(str)
    duplicated = uids[uids.duplicated()]
    if len(duplicated):
        raise ValueError(f"more than one studies row for {duplicated.nunique()} stud(y/ies), e.g. {duplicated.iloc[0]!r}")
    rows = studies.assign(study_uid=uids).set_index("study_uid")
    absent = ids[~pd.Index(ids).isin(rows.index)]
    if len(absent):
        raise ValueError(
            f"the studies table has no row for {len(absent)} labelled stud(y/ies) of the run's slices "
            f"(e.g. {str(absent[0])!r}): its tables disagree, so the study head cannot be evaluated"
        )
    n_unlabelled = int((~rows.index.isin(ids)).sum())
    rows = rows.loc[ids]
    p = rows[_P_COLUMNS].to_numpy(dtype=np.float64)
    if not np.all((p >= 0.0) & (p <= 1.0)):  # also catches NaN
        raise ValueError("studies probabilities must lie in [0, 1] (NaN found or out of range)")
    if rows["flagged"].isna().any():
        raise ValueError("studies.flagged is null for some labelled studies")
    flagged = rows["flagged"].to_numpy().astype(bool)
    out = _level_metrics(y_study, p, thresholds)
    out["n_unlabelled"] = n_unlabelled
    counts = confusion(y_study[:, _ANY].astype(bool), flagged)
    # `flagged` was written at scoring time; with the bundle's study thresholds it is any(p >= t).
    inconsistent = None
    if not thresholds.defaulted:
        inconsistent = int((flagged != (p >= np.asarray(thresholds.values)[None, :]).any(axis=1)).sum())
        if inconsistent:
            warnings.append(
                f"flagged disagrees with any(p_<class> >= study threshold) in {inconsistent} of {len(flagged)} "
                f"studies: the run was scored with other thresholds than {thresholds.source}"
            )
    out["flagged"] = {
        "rule": "flagged (written at scoring): any class's p >= its study threshold; against the study any label",
        **{k: counts[k] for k in ("tp", "fp", "fn", "tn")},
        "sensitivity": _num(counts["sensitivity"]),
        "specificity": _num(counts["specificity"]),
        "n_inconsistent": inconsistent,
    }
    return out


def evaluate_predictions(
    slices: pd.DataFrame,
    labels: pd.DataFrame,
    *,
    studies: pd.DataFrame | None = None,
    slice_thresholds: ThresholdsLike = None,
    study_thresholds: ThresholdsLike = None,
) -> dict[str, Any]:
    """Slice, study (max of slices; the study head) and ETH patient-level metrics against labels.

    Args:
        slices: one row per scored slice with ``study_uid``, ``sop_uid``, ``slice_index`` and
            ``p_<class>`` for every class (``series_uid`` optional; when present the ETH rule runs
            within each series).
        labels: a frame from :func:`ichd_ray.evaluation.labels.parse_labels`.
        studies: the run's ``studies`` rows (``study_uid``, ``p_<class>``, ``flagged``); None: the
            study head is not evaluated (``study_head`` is None).
        slice_thresholds: applied to slice outputs: the slice level, max of slices, the ETH rule.
        study_thresholds: applied to the study head. Each: :class:`Thresholds`, {class: t}, a sequence
            in :data:`CLASSES` order, or None (0.5 each, with a warning).

    Returns:
        dict: JSON-serialisable. ``n_slices`` (rows given), ``n_unlabelled`` (rows without a label,
        excluded), ``thresholds`` ({slice, study}: {values, source, defaulted}), ``warnings`` (list of
        str), ``slice``, ``study_max_of_slices`` and ``study_head`` (each ``n``, ``weighted_log_loss``,
        ``thresholds``, ``per_class`` {class: positives, log_loss, auc, sensitivity, specificity};
        ``study_head`` also ``n_unlabelled`` and ``flagged`` {tp, fp, fn, tn, sensitivity, specificity,
        n_inconsistent}), ``eth`` (rule, threshold, threshold_source, min_consecutive, n, f1, tp, fp, fn,
        tn). Undefined values (an AUC without positives) are None.

    Raises:
        ValueError: missing columns, probabilities that are NaN or outside [0, 1], bad thresholds, no
            slice with a label, or a studies table that disagrees with the slices.
    """
    missing = [c for c in ("study_uid", "sop_uid", "slice_index", *_P_COLUMNS) if c not in slices.columns]
    if missing:
        raise ValueError(f"predictions lack column(s) {', '.join(missing)}")
    slice_t = Thresholds.of(slice_thresholds, "no slice thresholds given")
    study_t = Thresholds.of(study_thresholds, "no study thresholds given")
    y_all, found = labels_for(slices["sop_uid"], labels)
    if not found.any():
        example = f", e.g. sop_uid {slices['sop_uid'].iloc[0]!r}" if len(slices) else ""
        raise ValueError(f"none of the {len(slices)} predicted slices has a label{example}")

    labelled = slices.loc[found].reset_index(drop=True)
    y = y_all[found].astype(np.float64)
    p = labelled[_P_COLUMNS].to_numpy(dtype=np.float64)
    if not np.all((p >= 0.0) & (p <= 1.0)):  # also catches NaN
        raise ValueError("predicted probabilities must lie in [0, 1] (NaN found or out of range)")

    warnings = [
        f"{level} thresholds defaulted to 0.5 ({t.source.removeprefix('default 0.5: ')})"
        for level, t in (("slice", slice_t), ("study", study_t))
        if t.defaulted
    ]
    # One key type for np.unique here, the groupby in _eth and the studies rows (UIDs are strings).
    labelled["study_uid"] = labelled["study_uid"].astype(str)
    study_ids = labelled["study_uid"].to_numpy()
    ids, y_study = study_labels(y, study_ids)
    _, p_study = study_labels(p, study_ids)  # same keys, so the same (sorted) study order
    result = {
        "n_slices": len(slices),
        "n_unlabelled": int((~found).sum()),
        "thresholds": {"slice": slice_t.to_dict(), "study": study_t.to_dict()},
        "warnings": warnings,
        "slice": _level_metrics(y, p, slice_t),
        "study_max_of_slices": _level_metrics(y_study, p_study, slice_t),
        "study_head": None if studies is None else _study_head(studies, ids, y_study, study_t, warnings),
        "eth": _eth(labelled, pd.Series(y_study[:, _ANY], index=ids), slice_t),
    }
    return result


def choose_run_thresholds(
    slices: pd.DataFrame, study_head: pd.DataFrame, labels: pd.DataFrame, grid: Sequence[float] | None = None
) -> dict[str, dict[str, float]]:
    """Thresholds chosen where they will be applied (:func:`ichd_ray.evaluation.metrics.choose_thresholds`, max F1):
    ``slice`` on the slice outputs, ``study`` on the study head's outputs.

    Args:
        slices: out-of-fold slice predictions (``study_uid``, ``sop_uid``, ``p_<class>``): the ones a
            scoring run writes to ``slices`` (CNN + sequence).
        study_head: out-of-fold study-head predictions, index ``study_uid``, ``p_<class>`` columns: what
            a scoring run writes to ``studies`` (and thresholds into ``flagged``).
        labels: a frame from :func:`ichd_ray.evaluation.labels.parse_labels`; a study's label for a class is the
            max over its labelled slices.
        grid: candidate thresholds (default 0.05 .. 0.95).

    Returns:
        dict: ``{"slice": {class: t}, "study": {class: t}}`` in :data:`CLASSES` order.

    Raises:
        ValueError: no labelled slice, or a labelled study without a study-head output.
    """
    y_all, found = labels_for(slices["sop_uid"], labels)
    if not found.any():
        raise ValueError(f"none of the {len(slices)} slices has a label")
    y = y_all[found].astype(np.float64)
    p = slices.loc[found, _P_COLUMNS].to_numpy(dtype=np.float64)
    ids, y_study = study_labels(y, slices.loc[found, "study_uid"].astype(str).to_numpy())
    head = study_head.set_axis(study_head.index.astype(str))
    absent = ids[~pd.Index(ids).isin(head.index)]
    if len(absent):
        raise ValueError(f"the study head has no output for {len(absent)} labelled stud(y/ies), e.g. {str(absent[0])!r}")
    p_head = head.loc[ids, _P_COLUMNS].to_numpy(dtype=np.float64)
    return {
        "slice": dict(zip(CLASSES, choose_thresholds(y, p, grid))),
        "study": dict(zip(CLASSES, choose_thresholds(y_study, p_head, grid))),
    }


def _frame(con, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
    # Through Arrow rather than DuckDB's .df(), which trips pandas 3 deprecation warnings.
    return con.sql(sql, params=params).to_arrow_table().to_pandas()


def _runs(con, out_uri: str) -> pd.DataFrame:
    try:
        return _frame(con, "SELECT run_id, attempt, status, finished_at FROM runs")
    except duckdb.IOException:
        # The runs glob matches nothing: no run under OUT has committed yet.
        raise FileNotFoundError(f"no committed runs under {out_uri} (no runs/run_id=*/run.parquet)") from None


def _read_tables(
    out_uri: str, run_id: str | None, storage_config: storage.StorageConfig | None, tables: Sequence[str]
) -> tuple[pd.DataFrame, ...]:
    """The given tables of one committed run, all through one connection to the views."""


    order = {"slices": "study_uid, series_uid, slice_index", "studies": "study_uid"}
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
        out = []
        for table in tables:
            try:
                out.append(_frame(con, f"SELECT * FROM {table} WHERE run_id = ? ORDER BY {order[table]}", [run_id]))
            except duckdb.IOException as exc:
                raise FileNotFoundError(
                    f"run {run_id!r} under {out_uri} is committed but its {table} are missing: {exc}"
                ) from None
        return tuple(out)
    finally:
        con.close()


def read_predictions(
    out_uri: str, run_id: str | None = None, storage_config: storage.StorageConfig | None = None
) -> pd.DataFrame:
    """The ``slices`` table of one committed run, through the views (never an uncommitted attempt).

    Args:
        out_uri: the OUT prefix of the scoring runs (local path, ``file://`` or ``s3://``).
        run_id: which run; None means the committed run with the latest ``finished_at`` (whatever its
            status: a run marked failed still has its scored slices).
        storage_config: S3 settings; None means :meth:`ichd_ray.io.storage.StorageConfig.from_env`.

    Returns:
        pandas.DataFrame: the slices columns (run_id, model_version, study_uid, series_uid, sop_uid,
        uri, slice_index, position_z, p_<class>), ordered by study, series, slice_index.

    Raises:
        FileNotFoundError: nothing committed under ``out_uri``, or no committed run ``run_id``.
    """
    return _read_tables(out_uri, run_id, storage_config, ["slices"])[0]


def read_run(
    out_uri: str, run_id: str | None = None, storage_config: storage.StorageConfig | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``slices`` and ``studies`` tables of one committed run (as :func:`read_predictions` picks it),
    read through the same views, so both are the committed attempt's.

    Returns:
        tuple: slices (as :func:`read_predictions`) and studies (run_id, model_version, study_uid,
        series_uid, n_slices, p_<class>, flagged, ... ordered by study_uid).

    Raises:
        FileNotFoundError: nothing committed under ``out_uri``, or no committed run ``run_id``.
    """
    slices, studies = _read_tables(out_uri, run_id, storage_config, ["slices", "studies"])
    return slices, studies


def _fmt(value: float | None, width: int = 7, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _cells(level: dict[str, Any], c: str) -> str:
    a = level["per_class"][c]
    return f"{a['positives']:>5}{_fmt(a['auc'], 6)}{_fmt(a['sensitivity'], 6)}{_fmt(a['specificity'], 6)}"


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width text table of an :func:`evaluate_predictions` result.

    Args:
        result: the dict :func:`evaluate_predictions` (or :func:`evaluate`) returned.

    Returns:
        str: rows = classes; columns = positives/AUC/sens/spec for slices, studies by max of slices and
        studies by the study head (the ``studies`` table), then the slice and study thresholds; then
        the weighted log losses, the counts, ``flagged``'s sensitivity/specificity, the ETH
        patient-level F1, where the thresholds came from, and any warnings.
    """
    s, mx, sh, eth = result["slice"], result["study_max_of_slices"], result.get("study_head"), result["eth"]
    levels = [("slices", s), ("studies: max slice", mx)] + ([("studies: study head", sh)] if sh else [])
    name_w = max(len("weighted log loss"), *(len(c) for c in CLASSES))
    head = f"{'pos':>5}{'AUC':>6}{'sens':>6}{'spec':>6}"
    block_w = len(head)
    lines = []
    if result.get("run_id"):
        lines.append(f"run {result['run_id']} (model {result.get('model_version') or '?'})")
    blocks = "   ".join(f"{' ' + title + ' ':-^{block_w}}" for title, _ in levels)
    lines += [
        f"{'':<{name_w}}  {blocks}  {'thr':>5} {'thr':>5}",
        f"{'class':<{name_w}}  {'   '.join(head for _ in levels)}  {'slice':>5} {'study':>5}",
    ]
    slice_t, study_t = s["thresholds"]["values"], (sh or {}).get("thresholds", result["thresholds"]["study"])["values"]
    for c in CLASSES:
        cells = "   ".join(_cells(level, c) for _, level in levels)
        lines.append(f"{c:<{name_w}}  {cells}  {slice_t[c]:>5.2f} {study_t[c]:>5.2f}")
    losses = "   ".join(f"{'':>5}{_fmt(level['weighted_log_loss'], 6, 4)}{'':>12}" for _, level in levels)
    lines.append(f"{'weighted log loss':<{name_w}}  {losses}".rstrip())
    counts = f"slices: {s['n']} labelled, {result['n_unlabelled']} unlabelled (excluded); studies: {mx['n']}"
    if sh:
        counts += f"; studies table: {sh['n']} rows scored, {sh['n_unlabelled']} without a labelled slice (excluded)"
    lines.append(counts)
    if sh:
        f = sh["flagged"]
        lines.append(
            f"flagged (any class >= its study threshold) vs study any: sens {_fmt(f['sensitivity'], 0)} "
            f"spec {_fmt(f['specificity'], 0)}  (TP {f['tp']}, FP {f['fp']}, FN {f['fn']}, TN {f['tn']})"
        )
    else:
        lines.append("study head: not evaluated (no studies table given)")
    f1 = "-" if eth["f1"] is None else f"{eth['f1']:.3f}"
    lines.append(
        f"ETH patient level (any, >= {eth['min_consecutive']} consecutive slices with p_any >= "
        f"{eth['threshold']:.2f}): F1 {f1}  (TP {eth['tp']}, FP {eth['fp']}, FN {eth['fn']}, TN {eth['tn']})"
    )
    lines.append(f"slice thresholds: {result['thresholds']['slice']['source']}  [slices, max slice, ETH]")
    lines.append(f"study thresholds: {result['thresholds']['study']['source']}  [study head, flagged]")
    lines += [f"WARNING: {w}" for w in result.get("warnings", [])]
    return "\n".join(lines)


def evaluate(
    predictions_uri: str,
    labels_uri: str,
    out_json: str | None,
    run_id: str | None = None,
    *,
    model: Any = None,
    slice_thresholds: ThresholdsLike = None,
    study_thresholds: ThresholdsLike = None,
    storage_config: storage.StorageConfig | None = None,
) -> dict[str, Any]:
    """Evaluate a committed run (its ``slices`` and ``studies``) against an RSNA labels CSV, optionally
    writing the result as JSON.

    Args:
        predictions_uri: the OUT prefix of the scoring runs.
        labels_uri: the RSNA-format labels CSV.
        out_json: where to write the result (local, ``file://`` or ``s3://``); None: don't write.
        run_id: which run; None means the newest committed one.
        model: the bundle whose thresholds to apply (:func:`bundle_thresholds`): its URI or its
            :class:`ichd_ray.models.bundle.BundleConfig`; None: 0.5 each, with a warning.
        slice_thresholds: override the bundle's slice thresholds (see :func:`evaluate_predictions`).
        study_thresholds: override the bundle's study thresholds.
        storage_config: S3 settings; None means :meth:`ichd_ray.io.storage.StorageConfig.from_env`.

    Returns:
        dict: :func:`evaluate_predictions`'s result plus ``run_id``, ``model_version``, ``bundle``
        ({uri, version_id} or None), ``predictions_uri`` and ``labels_uri``.

    Raises:
        FileNotFoundError: no committed run (or labels file) where named.
        ichd_ray.evaluation.labels.LabelsError: an invalid labels file.
        ichd_ray.models.bundle.BundleError: ``model`` is not a valid bundle.
        ValueError: nothing labelled, bad thresholds, or a studies table that disagrees with the slices.
    """
    bundle_slice = Thresholds.default("no bundle given")
    bundle_study = Thresholds.default("no bundle given")
    bundle = None
    if model is not None:
        if isinstance(model, (str, os.PathLike)):
            config, _ = load_bundle_config(model, storage_config)
            bundle = {"uri": os.fspath(model), "version_id": config.version_id}
        else:
            config = model
            bundle = {"uri": None, "version_id": config.version_id}
        bundle_slice, bundle_study = bundle_thresholds(config)
    slice_t = bundle_slice if slice_thresholds is None else Thresholds.of(slice_thresholds, "")
    study_t = bundle_study if study_thresholds is None else Thresholds.of(study_thresholds, "")

    slices, studies = read_run(predictions_uri, run_id, storage_config)
    labels = parse_labels(storage.read_bytes(labels_uri, storage_config), name=labels_uri)
    versions = sorted(
        {str(v) for frame in (slices, studies) if "model_version" in frame for v in frame["model_version"].dropna().unique()}
    )
    metrics = evaluate_predictions(slices, labels, studies=studies, slice_thresholds=slice_t, study_thresholds=study_t)
    if bundle and versions and versions != [bundle["version_id"]]:
        metrics["warnings"].append(
            f"the run was scored by model {', '.join(versions)}, but the thresholds are bundle {bundle['version_id']}'s"
        )
    result = {
        "run_id": str(slices["run_id"].iloc[0]) if len(slices) else run_id,
        "model_version": ",".join(versions) or None,
        "bundle": bundle,
        "predictions_uri": str(predictions_uri),
        "labels_uri": str(labels_uri),
        **metrics,
    }
    if out_json:
        text = json.dumps(result, indent=2, allow_nan=False) + "\n"
        storage.write_bytes(out_json, text.encode("utf-8"), storage_config)
    return result
