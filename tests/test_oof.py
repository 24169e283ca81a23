"""ichd_ray.training.oof: every slice predicted by the fold that did not train on it; without Ray."""

import numpy as np
import torch
from safetensors.torch import save

from ichd_ray import CLASSES
from ichd_ray.io.config_files import load_train_config
from ichd_ray.models.sequence import SequenceModel, sequence_config
from ichd_ray.training.oof import format_metrics, out_of_fold_predictions
from ichd_ray.training.sequence import predict_studies

DIM = 8


def _rows(rng, folds=2, per_fold=3):
    rows = []
    for k in range(folds):
        for i in range(per_fold):
            n = int(rng.integers(3, 7))
            labels = (rng.random((n, len(CLASSES))) < 0.3 + 0.2 * k).astype(np.uint8)
            rows.append({
                "study_uid": f"1.{k}.{i}", "fold": k, "n": n, "dim": DIM,
                "emb": rng.standard_normal((n, DIM)).astype(np.float16).tobytes(),
                "logits": rng.standard_normal((n, len(CLASSES))).astype(np.float32).tobytes(),
                "positions": [5.0 * j for j in range(n)], "labels": labels.tobytes(),
                "sop_uids": [f"1.{k}.{i}.{j}" for j in range(n)],
            })
    return rows


def test_each_slice_is_predicted_by_the_model_of_its_own_fold(tmp_path):
    """Fold k's slices get sequence model k (trained without them); the prior is the other folds'
    prevalence; the CNN column is the sigmoid of the stored logits."""
    cfg = load_train_config("demo", overrides={"sequence": {"proj_dims": [8], "hidden": 4}})
    rng = np.random.default_rng(0)
    rows = _rows(rng)
    uris, models = [], []
    for k in range(2):
        torch.manual_seed(k)
        model = SequenceModel.from_config(DIM, sequence_config(cfg.sequence), len(CLASSES))
        path = tmp_path / f"seq{k}.safetensors"
        path.write_bytes(save(model.state_dict()))
        uris.append(str(path))
        models.append(model)
    preds = out_of_fold_predictions(rows, 2, cfg, uris, None)

    for k in range(2):
        held = [r for r in rows if r["fold"] == k]
        train = [r for r in rows if r["fold"] != k]
        prevalence = np.concatenate([np.frombuffer(r["labels"], np.uint8).reshape(-1, 6) for r in train]).mean(axis=0)
        own = predict_studies(models[k], held)
        other = predict_studies(models[1 - k], held)
        for r, (slice_p, study_p), (other_p, _) in zip(held, own, other):
            got = preds["cnn_sequence"][preds["cnn_sequence"]["study_uid"] == r["study_uid"]]
            values = got[[f"p_{c}" for c in CLASSES]].to_numpy()
            assert got["sop_uid"].tolist() == r["sop_uids"]
            np.testing.assert_allclose(values, slice_p, rtol=1e-6)
            assert not np.allclose(values, other_p)  # the other fold's model would give something else
            np.testing.assert_allclose(preds["study_head"].loc[r["study_uid"]].to_numpy(), study_p, rtol=1e-6)
            prior = preds["prior"][preds["prior"]["study_uid"] == r["study_uid"]][[f"p_{c}" for c in CLASSES]].to_numpy()
            np.testing.assert_allclose(prior, np.tile(prevalence, (r["n"], 1)))
            cnn = preds["cnn"][preds["cnn"]["study_uid"] == r["study_uid"]][[f"p_{c}" for c in CLASSES]].to_numpy()
            logits = np.frombuffer(r["logits"], np.float32).reshape(-1, 6).astype(np.float64)
            np.testing.assert_allclose(cnn, 1 / (1 + np.exp(-logits)))
    assert len(preds["cnn_sequence"]) == sum(r["n"] for r in rows)


def test_format_metrics_is_the_table_training_ends_with():
    def level(wll, auc, f1):
        return {"slice": {"weighted_log_loss": wll, "per_class": {"any": {"auc": auc}}},
                "study_max_of_slices": {"weighted_log_loss": 2 * wll}, "eth": {"f1": f1}}

    metrics = {"prior": level(0.2, 0.5, None), "cnn": level(0.1, 0.9, 0.8), "cnn_sequence": level(0.05, 0.99, 0.95),
               "gains": {"cnn_vs_prior": -0.5, "sequence_vs_cnn": -0.5, "sequence_vs_prior": -0.75}}
    lines = format_metrics(metrics).splitlines()
    assert lines[1].split()[-4:] == ["0.2000", "0.4000", "0.500", "nan"]
    assert lines[3].split()[-4:] == ["0.0500", "0.1000", "0.990", "0.950"]
    assert lines[4] == "slice wLL: CNN -50.0% vs prior, CNN + sequence -50.0% vs CNN (-75.0% vs prior)"
