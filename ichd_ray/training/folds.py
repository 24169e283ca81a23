"""K-fold assignment: once per patient, stratified on ``any``, shared by every training stage.

A patient's studies always share a fold, so no stage ever validates on a patient it trained on (the
2nd and 11th RSNA places split by PatientID; splitting by study leaks scanner and anatomy). The folds
are stratified on the study-level ``any`` label so every fold sees positives. The assignment is a
column of the training manifest, written once and read by the CNN, embedding and sequence stages.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

__all__ = ["assign_folds", "assignment_sha256"]


def assign_folds(studies: pd.DataFrame, folds: int, seed: int = 0) -> pd.Series:
    """Fold per study, grouped by patient and stratified on study-level ``any``.

    Args:
        studies: One row per study with columns ``study_uid``, ``patient_hash`` (None/NaN for a study
            without a PatientID: it becomes its own group) and ``any`` (0/1 study label).
        folds: Number of folds K, >= 2.
        seed: Shuffle seed; the same inputs and seed give the same assignment.

    Returns:
        pd.Series: int fold in [0, K) indexed by ``study_uid``.

    Raises:
        ValueError: Missing columns, duplicate studies, or fewer patients than folds.
    """

    missing = [c for c in ("study_uid", "patient_hash", "any") if c not in studies.columns]
    if missing:
        raise ValueError(f"assign_folds: studies table lacks column(s) {missing}")
    if not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if studies["study_uid"].duplicated().any():
        dup = studies.loc[studies["study_uid"].duplicated(), "study_uid"].iloc[0]
        raise ValueError(f"assign_folds: study {dup} appears more than once")
    # Sorted input: the assignment must not depend on the order the index listed the studies in.
    table = studies.sort_values("study_uid").reset_index(drop=True)
    groups = table["patient_hash"].where(table["patient_hash"].notna(), "study:" + table["study_uid"])
    n_groups = groups.nunique()
    if n_groups < folds:
        raise ValueError(f"{folds} folds need at least {folds} patients, the data has {n_groups}")
    y = table["any"].astype(int).to_numpy()
    if len(set(y)) > 1:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    else:  # one class only: nothing to stratify on
        splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold = np.full(len(table), -1, dtype=np.int64)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(table)), y, groups)):
        fold[held_out] = k
    return pd.Series(fold, index=pd.Index(table["study_uid"], name="study_uid"), name="fold")


def assignment_sha256(fold_of: Mapping[str, int]) -> str:
    """sha256 of a fold assignment (study -> fold), independent of the order it is listed in: what
    the training stages' keys record as the split they were trained on."""
    pairs = sorted((str(study), int(fold)) for study, fold in fold_of.items())
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()
