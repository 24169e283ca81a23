"""ichd_ray.training.recipe: training on Ray Train, end to end on a tiny synthetic set: folds -> CNN -> OOF embeddings -> sequence
-> bundle -> score -> evaluate; a worker killed mid-epoch resumes from its checkpoint; a re-run resumes."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from ichd_ray import CLASSES
from ichd_ray.io.config_files import load_train_config

pytestmark = pytest.mark.timeout(600)

TINY = {
    "data": {"folds": 2, "input_size": 32, "studies_per_task": 4},
    "cnn": {"backbone": "test_resnet", "epochs": 2, "samples_per_study": 4, "batch_size": 8, "torch_threads": 1},
    "sequence": {"epochs": 2, "batch_size": 4, "window": 6, "proj_dims": [16, 8], "hidden": 8, "checkpoint_every": 1},
}


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
    from ichd_ray.training.embed import read_embeddings
    from ichd_ray.models.bundle import load_bundle
    from ichd_ray.training.data import load_training_set

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
    # where the config came from: the recipe by name and the sha256 of its file, and the overlay
    from ichd_ray.config.recipes import load_recipe

    assert training["recipe"] == {"name": "demo", "sha256": load_recipe("demo").sha256, "config_file": _config(tmp_path)}
    metrics = training["metrics"]
    assert set(metrics) >= {"prior", "cnn", "cnn_sequence", "gains", "thresholds"}
    assert all(0 < metrics[k]["slice"]["weighted_log_loss"] < 5 for k in ("prior", "cnn", "cnn_sequence"))
    assert list(cfg.thresholds) == list(CLASSES)

    # Folds are by patient, every study is embedded exactly once, by the CNN that did not train on it.
    used = ts.manifest[ts.manifest["fold"] >= 0]
    assert (used.groupby("patient_hash")["fold"].nunique() == 1).all()
    assert used["fold"].nunique() == 2
    for k, fold in enumerate(training["folds"]):
        emb = read_embeddings(fold["embeddings"]["uri"])
        fold_sops = set(used.loc[used["fold"] == k, "sop_uid"])
        assert set(emb["sop_uid"]) == fold_sops
        assert {len(v) for v in emb["cnn_logits"]} == {6}
    summaries = [json.loads(open(f["cnn"]["weights_uri"].replace(".safetensors", ".json")).read()) for f in training["folds"]]
    n_studies = used["study_uid"].nunique()
    assert [s["train_studies"] + s["val_studies"] for s in summaries] == [n_studies, n_studies]

    # A re-run finds every stage done: no retraining, the same weights.
    before = _artifacts(work)
    assert main(args[:-1] + ["--overwrite", "--no-progress"]) == 0
    capsys.readouterr()
    assert _written(before, _artifacts(work)) == set()
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
    assert result["slice"]["n"] == len(used)
    # each level at the thresholds chosen for it: slices at the slice ones, the studies table at the study head's
    assert result["thresholds"]["study"]["values"] == dict(cfg.thresholds)
    assert result["thresholds"]["slice"]["values"] == dict(cfg.slice_thresholds) and not result["warnings"]
    assert result["study_head"]["n"] == used["study_uid"].nunique()


@pytest.mark.slow  # a fault scenario (SIGKILL of a Ray Train worker), ~100 s: with the other fault tests
def test_training_worker_killed_mid_epoch_resumes_from_checkpoint(ray_session, tiny_set, tmp_path, kill_worker):
    """The Ray Train worker is SIGKILLed from outside once epoch 0's checkpoint is on disk; Ray Train
    restarts the group, the loop resumes from that checkpoint and finishes: every epoch in the history
    once, the ones after the kill marked resumed."""
    from ichd_ray.training.cnn import train_cnn_fold
    from ichd_ray.training.keys import training_keys
    from ichd_ray.training.data import build_cache, prepare_training_set
    from ichd_ray.dicom.windowing import DEFAULT_NORMALIZATION, DEFAULT_WINDOWS

    root, data = tiny_set
    cfg = load_train_config("demo", _config(tmp_path, {"cnn": {"max_failures": 1, "samples_per_study": 8, "epochs": 3}}))
    work = str(tmp_path / "work")
    ts = prepare_training_set(str(data), str(data / "labels.csv"), work, folds=2, fold_seed=0, index_config=cfg.index)
    studies, failures = build_cache(ts, work, size=32, windows=[w.to_dict() for w in DEFAULT_WINDOWS], studies_per_task=4, cpus_per_task=1.0)
    assert not failures and len(studies) == len(ts.studies)
    key = training_keys(cfg, manifest_sha256=ts.manifest_sha256, folds_sha256=ts.folds_sha256)["cnn"][0].key

    def checkpointed() -> bool:  # a checkpoint folder is complete once its state.json is there
        return any((tmp_path / "work" / "ray_train").rglob("checkpoint_*/state.json"))

    with kill_worker("RayTrainWorker", after_s=0.0, when=checkpointed) as killed:
        summary = train_cnn_fold(studies, 0, cfg, work, key=key, normalization=DEFAULT_NORMALIZATION.to_dict())
    assert killed, "the train worker was never found to kill"
    history = summary["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[0]["resumed_from_epoch"] is None
    resumed = [h["resumed_from_epoch"] for h in history[1:] if h["resumed_from_epoch"] is not None]
    assert resumed and all(r == resumed[0] for r in resumed), history  # resumed once, from one checkpoint
    assert os.path.exists(summary["weights_uri"])
    # The cache holds each study's slices in z order at the training size.
    first = studies[0]
    assert os.path.getsize(first["cache_uri"]) == first["n"] * 3 * 32 * 32
    assert np.all(np.diff(first["positions"]) > 0)
    # Labels in the cache's order equal the labels file's.
    from ichd_ray.evaluation.labels import labels_for, parse_labels

    y, found = labels_for(first["sop_uids"], parse_labels((data / "labels.csv").read_bytes()))
    assert found.all() and (y == np.asarray(first["labels"])).all()


def test_training_set_refuses_other_fold_settings(ray_session, tiny_set, tmp_path):
    from ichd_ray.config.job import IndexConfig
    from ichd_ray.training.data import prepare_training_set

    root, data = tiny_set
    work = str(tmp_path / "w")
    ts = prepare_training_set(str(data), str(data / "labels.csv"), work, folds=2, fold_seed=0, index_config=IndexConfig())
    assert len(ts.studies) == 8 and ts.folds == 2
    bad = pd.read_csv(data / "labels.csv")
    assert len(bad) == 6 * sum(len(s["sop_uids"]) for s in ts.studies)
    with pytest.raises(ValueError, match="folds: stored 2, asked 3"):
        prepare_training_set(str(data), str(data / "labels.csv"), work, folds=3, fold_seed=0, index_config=IndexConfig())


# ------------------------------------------------------------------ keyed artifacts and reproducibility


def _quiet(_line):
    pass


@pytest.fixture(scope="module")
def first_run(ray_session, tiny_set, tmp_path_factory):
    """One tiny ``train_all`` that the provenance and the determinism tests start from."""
    from ichd_ray.training.recipe import train_all

    root, data = tiny_set
    base = tmp_path_factory.mktemp("keyed")
    cfg = load_train_config("demo", _config(base))
    result = train_all(str(data), str(data / "labels.csv"), str(base / "model"), cfg, log=_quiet)
    return base, cfg, result, _weights(result)  # the weights now: a later test retrains in this work folder


def _artifacts(work):
    """Per stage, every file under it with its mtime: what a run wrote, or left alone."""
    from pathlib import Path

    work = Path(work)
    out = {}
    for stage in ("cache", "cnn", "embed", "sequence"):
        out[stage] = {str(p.relative_to(work)): p.stat().st_mtime_ns for p in (work / stage).rglob("*") if p.is_file()}
    return out


def _written(before, after):
    """Stages with a file added or rewritten between two snapshots."""
    return {stage for stage in after if set(after[stage].items()) - set(before[stage].items())}


def _ran(result):
    """Per stage, per fold, whether the run trained it (rather than reused it); the cache must be reused."""
    assert result.stages["cache"]["reused"]
    return {stage: [not f["reused"] for f in result.stages[stage]] for stage in ("cnn", "embeddings", "sequence")}


def _numbers(tree, prefix=""):
    """Flat {dotted path: value} of a metrics tree's leaves."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_numbers(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_numbers(v, f"{prefix}[{i}]"))
        return out
    return {prefix: tree}


@pytest.mark.slow
def test_config_change_retrains_exactly_the_stages_that_read_it(first_run, tiny_set):
    """cnn.lr -> CNN, embeddings and sequence retrain and the cache stays; sequence.lr -> only the
    sequence retrains; unchanged -> nothing does. The bundle always names the weights it holds."""
    import hashlib

    from ichd_ray.models.bundle import load_bundle
    from ichd_ray.training.recipe import train_all

    base, cfg, first, _ = first_run
    root, data = tiny_set
    bundle, work = str(base / "model"), str(base / "model") + "-work"

    def run(extra):
        cfg_b = load_train_config("demo", _config(base, extra))
        before = _artifacts(work)
        result = train_all(str(data), str(data / "labels.csv"), bundle, cfg_b, log=_quiet, overwrite=True)
        return cfg_b, result, _written(before, _artifacts(work))

    def provenance():
        training = load_bundle(bundle).config.training
        assert [f["fold"] for f in training["folds"]] == [0, 1]
        return training

    def sha(path):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()

    before = load_bundle(bundle).config.training
    lr = cfg.cnn.lr * 2
    cfg_lr, result, written = run({"cnn": {"lr": lr}})
    assert written == {"cnn", "embed", "sequence"}  # the cache is kept
    assert _ran(result) == {"cnn": [True, True], "embeddings": [True, True], "sequence": [True, True]}

    p0 = before
    assert [f["fold"] for f in p0["folds"]] == [0, 1]
    for f in p0["folds"]:
        for stage in ("cnn", "embeddings", "sequence"):
            assert len(f[stage]["key"]) == 64 and len(f[stage]["config_sha256"]) == 64
        for stage in ("cnn", "sequence"):
            assert len(f[stage]["weights_sha256"]) == 64
    p1 = provenance()
    assert p1["config"]["cnn"]["lr"] == lr and p1["config_sha256"] == cfg_lr.sha256()
    assert p1["cache"]["key"] == p0["cache"]["key"]
    for a, b in zip(p0["folds"], p1["folds"]):
        for stage in ("cnn", "embeddings", "sequence"):
            assert a[stage]["key"] != b[stage]["key"]
        assert a["cnn"]["weights_sha256"] != b["cnn"]["weights_sha256"]
        assert sha(b["cnn"]["weights_uri"]) == b["cnn"]["weights_sha256"]
    # The Ray Train runs are named by key: a resumed run never picks up another config's checkpoint.
    runs = set(os.listdir(os.path.join(work, "ray_train")))
    assert {f"cnn-fold{f['fold']}-{f['cnn']['key'][:16]}" for f in p0["folds"] + p1["folds"]} <= runs

    _, result, written = run({"cnn": {"lr": lr}, "sequence": {"lr": cfg.sequence.lr * 2}})
    assert written == {"sequence"}
    assert _ran(result) == {"cnn": [False, False], "embeddings": [False, False], "sequence": [True, True]}
    p2 = provenance()
    for a, b in zip(p1["folds"], p2["folds"]):
        assert a["cnn"] == b["cnn"] and a["embeddings"] == b["embeddings"]
        assert a["sequence"]["key"] != b["sequence"]["key"]

    _, result, written = run({"cnn": {"lr": lr}, "sequence": {"lr": cfg.sequence.lr * 2}})
    assert written == set()
    assert _ran(result) == {"cnn": [False, False], "embeddings": [False, False], "sequence": [False, False]}
    assert provenance()["folds"] == p2["folds"]


def _weights(result):
    """Per fold, the sha256 of the CNN's and the sequence model's weights a run's bundle names."""
    from ichd_ray.models.bundle import load_bundle_config

    return [{stage: f[stage]["weights_sha256"] for stage in ("cnn", "sequence")}
            for f in load_bundle_config(result.bundle_uri)[0].training["folds"]]


def _assert_reproduced(first, first_weights, again):
    """The same out-of-fold metrics to 1e-6; and, on one CPU machine, the very same weights."""
    a, b = _numbers(first.metrics), _numbers(again.metrics)
    assert a.keys() == b.keys()

    def same(x, y):
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            return abs(x - y) <= 1e-6
        return x == y

    # Where a difference starts: a CNN (then everything downstream) or only a sequence model.
    other = [(k, stage) for k, (w1, w2) in enumerate(zip(first_weights, _weights(again))) for stage in w1 if w1[stage] != w2[stage]]
    differ = {k: (a[k], b[k]) for k in a if not same(a[k], b[k])}
    assert not differ, f"{len(differ)} of {len(a)} metrics differ, e.g. {sorted(differ.items())[:4]}; weights differ at {other}"
    assert not other, f"the metrics agree but the weights differ at (fold, stage) {other}"


@pytest.mark.slow
def test_same_seed_same_data_same_out_of_fold_metrics(first_run, tiny_set, tmp_path):
    """A second run in a fresh work folder reproduces the first one's out-of-fold metrics (to 1e-6)."""
    from ichd_ray.training.recipe import train_all

    base, cfg, first, first_weights = first_run
    root, data = tiny_set
    again = train_all(str(data), str(data / "labels.csv"), str(tmp_path / "model"), cfg, log=_quiet)
    _assert_reproduced(first, first_weights, again)


@pytest.mark.slow
def test_two_gloo_workers_reproduce_too(ray_session, tiny_set, tmp_path):
    """DDP on CPU: two Ray Train workers (gloo) per CNN and per sequence model, two runs, the same
    metrics and weights: each rank draws its own seeded samples, the all-reduce order is fixed."""
    from ichd_ray.training.recipe import train_all

    root, data = tiny_set
    two = {"num_workers": 2, "cpus_per_worker": 0.25}
    cfg = load_train_config("demo", _config(tmp_path, {"cnn": {**two, "batch_size": 4, "cpus_per_data_task": 0.25},
                                                       "sequence": {**two, "batch_size": 2}}))
    runs = [train_all(str(data), str(data / "labels.csv"), str(tmp_path / f"model{i}"), cfg, log=_quiet) for i in range(2)]
    _assert_reproduced(runs[0], _weights(runs[0]), runs[1])
