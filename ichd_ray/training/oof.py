"""Out-of-fold evaluation of a training run: every labelled slice predicted by the fold models that did
not train on it, as a prior-only baseline, the CNN alone and CNN + sequence; the metrics, their gains,
and the thresholds chosen on those outputs (where scoring applies them)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch

from ichd_ray import CLASSES
from ichd_ray.evaluation.evaluate import choose_run_thresholds, evaluate_predictions
from ichd_ray.evaluation.labels import label_id
from ichd_ray.io import storage
from ichd_ray.models.sequence import SequenceModel, sequence_config
from ichd_ray.training.data import LABEL_COLUMNS
from ichd_ray.training.sequence import predict_studies

__all__ = ["out_of_fold_predictions", "out_of_fold_metrics", "format_metrics"]


def labels_frame(manifest: pd.DataFrame) -> pd.DataFrame:
    used = manifest[manifest["fold"] >= 0].drop_duplicates("sop_uid")
    frame = pd.DataFrame(used[LABEL_COLUMNS].to_numpy(np.uint8), columns=list(CLASSES), index=[label_id(s) for s in used["sop_uid"]])
    frame.index.name = "image_id"
    return frame


def _slice_frame(rows: list[dict[str, Any]], probs: list[np.ndarray]) -> pd.DataFrame:
    parts = []
    for r, p in zip(rows, probs):
        part = pd.DataFrame(np.asarray(p, np.float64).reshape(-1, len(CLASSES)), columns=[f"p_{c}" for c in CLASSES])
        part.insert(0, "study_uid", r["study_uid"])
        part.insert(1, "sop_uid", r["sop_uids"])
        part.insert(2, "slice_index", np.arange(len(part)))
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def out_of_fold_predictions(rows, folds: int, cfg, sequence_uris: list[str], storage_config) -> dict[str, pd.DataFrame]:
    """Per slice, out of fold: the prior baseline, the CNN alone and CNN + sequence; plus study-head
    probabilities. ``sequence_uris``: sequence model k's weights, per fold."""
    prior, cnn, seq, study_head, ordered = [], [], [], {}, []
    for k in range(folds):
        train = [r for r in rows if r["fold"] != k]
        held = [r for r in rows if r["fold"] == k]
        if not held:
            continue
        prevalence = np.concatenate([np.frombuffer(r["labels"], np.uint8) for r in train]).reshape(-1, len(CLASSES))
        prevalence = prevalence.mean(axis=0).clip(1e-6, 1 - 1e-6)
        model = SequenceModel.from_config(int(rows[0]["dim"]), sequence_config(cfg.sequence), len(CLASSES))
        model.load_state_dict(safetensors.torch.load(storage.read_bytes(sequence_uris[k], storage_config)))
        preds = predict_studies(model, held)
        for r, (slice_p, study_p) in zip(held, preds):
            n = int(r["n"])
            prior.append(np.tile(prevalence, (n, 1)))
            cnn.append(1.0 / (1.0 + np.exp(-np.frombuffer(r["logits"], np.float32).astype(np.float64).reshape(n, -1))))
            seq.append(slice_p)
            study_head[r["study_uid"]] = study_p
        ordered += held
    return {
        "prior": _slice_frame(ordered, prior),
        "cnn": _slice_frame(ordered, cnn),
        "cnn_sequence": _slice_frame(ordered, seq),
        "study_head": pd.DataFrame.from_dict(study_head, orient="index", columns=[f"p_{c}" for c in CLASSES]),
    }


def format_metrics(metrics: dict[str, Any]) -> str:
    """The final table: prior-only baseline, CNN alone and CNN + sequence, all out of fold."""
    names = {"prior": "prior-only baseline", "cnn": "CNN alone", "cnn_sequence": "CNN + sequence"}
    lines = [f"{'out of fold':<22}{'slice wLL':>11}{'study wLL':>11}{'any AUC':>9}{'ETH F1':>8}"]
    for key, label in names.items():
        m = metrics[key]
        auc = m["slice"]["per_class"]["any"]["auc"]
        f1 = m["eth"]["f1"]
        lines.append(
            f"{label:<22}{m['slice']['weighted_log_loss']:>11.4f}{m['study_max_of_slices']['weighted_log_loss']:>11.4f}"
            f"{(auc if auc is not None else float('nan')):>9.3f}{(f1 if f1 is not None else float('nan')):>8.3f}"
        )
    gains = metrics["gains"]
    lines.append(
        f"slice wLL: CNN {gains['cnn_vs_prior']:+.1%} vs prior, CNN + sequence {gains['sequence_vs_cnn']:+.1%} vs CNN "
        f"({gains['sequence_vs_prior']:+.1%} vs prior)"
    )
    return "\n".join(lines)


def out_of_fold_metrics(rows, manifest: pd.DataFrame, cfg, sequence_uris: list[str], storage_config) -> dict[str, Any]:
    """``{prior, cnn, cnn_sequence}`` metrics (:func:`ichd_ray.evaluation.evaluate.evaluate_predictions`),
    their ``gains`` in slice weighted log loss, and the ``thresholds`` / ``slice_thresholds`` chosen."""
    preds = out_of_fold_predictions(rows, cfg.data.folds, cfg, sequence_uris, storage_config)
    labels = labels_frame(manifest)
    metrics: dict[str, Any] = {key: evaluate_predictions(preds[key], labels) for key in ("prior", "cnn", "cnn_sequence")}
    wll = {key: metrics[key]["slice"]["weighted_log_loss"] for key in ("prior", "cnn", "cnn_sequence")}
    metrics["gains"] = {
        "cnn_vs_prior": wll["cnn"] / wll["prior"] - 1,
        "sequence_vs_cnn": wll["cnn_sequence"] / wll["cnn"] - 1,
        "sequence_vs_prior": wll["cnn_sequence"] / wll["prior"] - 1,
    }
    # Thresholds are chosen where they are applied: the study head's (`thresholds`: `flagged`, studies.p_*)
    # on its out-of-fold study outputs, `slice_thresholds` (slices.p_*, the ETH rule) on the out-of-fold
    # CNN + sequence slice outputs, the ones scoring writes.
    chosen = choose_run_thresholds(preds["cnn_sequence"], preds["study_head"], labels)
    metrics["thresholds"], metrics["slice_thresholds"] = chosen["study"], chosen["slice"]
    return metrics
