"""Training on Ray Train, end to end on a tiny synthetic set: folds -> CNN -> OOF embeddings -> sequence
-> bundle -> score -> evaluate; a worker killed mid-epoch resumes from its checkpoint; a re-run resumes."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from ichd_ray import CLASSES
from ichd_ray.synth import SynthConfig, generate
from ichd_ray.train_config import load_train_config

pytestmark = pytest.mark.timeout(600)

TINY = {
    "data": {"folds": 2, "input_size": 32, "studies_per_task": 4},
    "cnn": {"backbone": "test_resnet", "epochs": 2, "samples_per_study": 4, "batch_size": 8, "torch_threads": 1},
    "sequence": {"epochs": 2, "batch_size": 4, "window": 6, "proj_dims": [16, 8], "hidden": 8, "checkpoint_every": 1},
}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    generate(str(data), SynthConfig(studies=8, slices=8, size=64, seed=3, bad_files=2), workers=1)
    return root, data


def _config(tmp_path, extra=None):
    path = tmp_path / "train.yaml"
    import yaml

    merged = json.loads(json.dumps(TINY))
    for section, values in (extra or {}).items():
        merged.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(merged))
    return str(path)


def test_train_all_cli_score_and_evaluate(ray_session, tiny_set, tmp_path, capsys):
    from ichd_ray.cli import main
    from ichd_ray.embed import read_embeddings
    from ichd_ray.models.bundle import load_bundle
    from ichd_ray.train_data import load_training_set

    root, data = tiny_set
    bundle = tmp_path / "model"
    args = ["train", "all", "--data", str(data), "--labels", str(data / "labels.csv"), "--out", str(bundle),
            "--config", _config(tmp_path), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    for line in ("prior-only baseline", "CNN alone", "CNN + sequence", f"bundle {bundle}"):
        assert line in text

    loaded = load_bundle(str(bundle))
    cfg = loaded.config
    assert cfg.folds == 2 and cfg.backbone == "test_resnet" and cfg.input_size == 32
    training = cfg.training
    assert training["state"] == "trained" and len(training["cnn_history"]) == 2
    assert [len(h) for h in training["cnn_history"]] == [2, 2] and [len(h) for h in training["sequence_history"]] == [2, 2]
    work = str(bundle) + "-work"
    ts = load_training_set(work)
    assert training["manifest_sha256"] == ts.manifest_sha256
    assert training["config_sha256"] == load_train_config("demo", _config(tmp_path)).sha256()
    metrics = training["metrics"]
    assert set(metrics) >= {"prior", "cnn", "cnn_sequence", "gains", "thresholds"}
    assert all(0 < metrics[k]["slice"]["weighted_log_loss"] < 5 for k in ("prior", "cnn", "cnn_sequence"))
    assert list(cfg.thresholds) == list(CLASSES)

    # Folds are by patient, every study is embedded exactly once, by the CNN that did not train on it.
    used = ts.manifest[ts.manifest["fold"] >= 0]
    assert (used.groupby("patient_hash")["fold"].nunique() == 1).all()
    assert used["fold"].nunique() == 2
    for k in range(2):
        emb = read_embeddings(os.path.join(work, "embed", f"fold{k}", "out"))
        fold_sops = set(used.loc[used["fold"] == k, "sop_uid"])
        assert set(emb["sop_uid"]) == fold_sops
        assert {len(v) for v in emb["cnn_logits"]} == {6}
    summaries = [json.loads(open(os.path.join(work, "cnn", f"fold{k}.json")).read()) for k in range(2)]
    n_studies = used["study_uid"].nunique()
    assert [s["train_studies"] + s["val_studies"] for s in summaries] == [n_studies, n_studies]

    # A re-run finds every stage done: no retraining, the same weights.
    before = {p: os.path.getmtime(os.path.join(work, "cnn", p)) for p in ("fold0.safetensors", "fold1.safetensors")}
    assert main(args[:-1] + ["--overwrite", "--no-progress"]) == 0
    capsys.readouterr()
    assert before == {p: os.path.getmtime(os.path.join(work, "cnn", p)) for p in before}
    assert load_bundle(str(bundle)).config.training["metrics"] == metrics

    # Without --overwrite an existing bundle is refused before any work.
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err

    # The bundle scores like any other; evaluate reads the committed run.
    out = tmp_path / "scored"
    assert main(["score", str(data), "--model", str(bundle), "--out", str(out), "--run-id", "r1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--predictions", str(out), "--labels", str(data / "labels.csv"), "--model", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert "weighted" in text.lower() and "metrics JSON" in text
    result = json.loads((out / "evaluation" / "r1.json").read_text())
    assert result["slice"]["n"] == len(used) and result["thresholds"] == dict(cfg.thresholds)


def test_training_worker_killed_mid_epoch_resumes_from_checkpoint(ray_session, tiny_set, tmp_path):
    """Rank 0 dies in epoch 1 (after epoch 0's checkpoint); Ray Train restarts the group, the loop resumes
    at epoch 1 from the checkpoint and finishes: two epochs in the history, the second marked resumed."""
    from ichd_ray.train_cnn import train_cnn_fold
    from ichd_ray.train_data import build_cache, prepare_training_set
    from ichd_ray.windowing import DEFAULT_NORMALIZATION, DEFAULT_WINDOWS

    root, data = tiny_set
    cfg = load_train_config("demo", _config(tmp_path, {"cnn": {"max_failures": 1, "samples_per_study": 8}}))
    work = str(tmp_path / "work")
    ts = prepare_training_set(str(data), str(data / "labels.csv"), work, folds=2, fold_seed=0, index_config=cfg.index)
    studies, failures = build_cache(ts, work, size=32, windows=[w.to_dict() for w in DEFAULT_WINDOWS], studies_per_task=4, cpus_per_task=1.0)
    assert not failures and len(studies) == len(ts.studies)
    marker = tmp_path / "killed"
    summary = train_cnn_fold(
        studies, 0, cfg, work, normalization=DEFAULT_NORMALIZATION.to_dict(),
        fault={"marker": str(marker), "epoch": 1, "step": 1},
    )
    assert marker.exists()  # the worker did die
    assert summary["steps_per_epoch"] >= 2  # so step 1 is mid-epoch
    history = summary["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[0]["resumed_from_epoch"] is None and history[1]["resumed_from_epoch"] == 0
    assert os.path.exists(summary["weights_uri"])
    # The cache holds each study's slices in z order at the training size.
    first = studies[0]
    assert os.path.getsize(first["cache_uri"]) == first["n"] * 3 * 32 * 32
    assert np.all(np.diff(first["positions"]) > 0)
    # Labels in the cache's order equal the labels file's.
    from ichd_ray.labels import labels_for, read_labels

    y, found = labels_for(first["sop_uids"], read_labels(str(data / "labels.csv")))
    assert found.all() and (y == np.asarray(first["labels"])).all()


def test_training_set_refuses_other_fold_settings(ray_session, tiny_set, tmp_path):
    from ichd_ray.config import IndexConfig
    from ichd_ray.train_data import prepare_training_set

    root, data = tiny_set
    work = str(tmp_path / "w")
    ts = prepare_training_set(str(data), str(data / "labels.csv"), work, folds=2, fold_seed=0, index_config=IndexConfig())
    assert len(ts.studies) == 8 and ts.folds == 2
    bad = pd.read_csv(data / "labels.csv")
    assert len(bad) == 6 * sum(len(s["sop_uids"]) for s in ts.studies)
    with pytest.raises(ValueError, match="folds: stored 2, asked 3"):
        prepare_training_set(str(data), str(data / "labels.csv"), work, folds=3, fold_seed=0, index_config=IndexConfig())


def test_cnn_fold_and_oof_embeddings_on_s3(ray_session, tiny_set, s3_bucket, tmp_path):
    """Data, cache, Ray Train checkpoints and the OOF embedding run all on the S3 endpoint."""
    from ichd_ray import storage
    from ichd_ray.embed import embed_fold
    from ichd_ray.train_cnn import train_cnn_fold
    from ichd_ray.train_data import build_cache, prepare_training_set
    from ichd_ray.windowing import DEFAULT_NORMALIZATION, DEFAULT_WINDOWS

    root, data = tiny_set
    bucket, config = s3_bucket
    archive = f"s3://{bucket}/archive"
    for path in data.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{archive}/{path.relative_to(data).as_posix()}", path.read_bytes(), config)
    work = f"s3://{bucket}/work"
    cfg = load_train_config("demo", _config(tmp_path, {"cnn": {"epochs": 1}}))
    ts = prepare_training_set(archive, f"{archive}/labels.csv", work, folds=2, fold_seed=0, index_config=cfg.index, storage_config=config)
    studies, failures = build_cache(ts, work, size=32, windows=[w.to_dict() for w in DEFAULT_WINDOWS], studies_per_task=4,
                                    cpus_per_task=1.0, storage_config=config)
    assert not failures and all(s["cache_uri"].startswith(f"s3://{bucket}/work/cache/32/") for s in studies)
    summary = train_cnn_fold(studies, 1, cfg, work, normalization=DEFAULT_NORMALIZATION.to_dict(), storage_config=config)
    assert summary["weights_uri"] == f"{work}/cnn/fold1.safetensors" and storage.exists(summary["weights_uri"], config)
    assert storage.list_files(f"{work}/ray_train/cnn-fold1", suffix="/state.json", config=config)  # checkpoints on S3
    emb = embed_fold(ts, 1, cfg, work, summary["weights_uri"], storage_config=config)
    used = ts.manifest[ts.manifest["fold"] == 1]
    assert set(emb["sop_uid"]) == set(used["sop_uid"])
