"""ichd_ray.training.embed: out-of-fold embeddings through the scoring actors (here with the CNN fold,
the cache and Ray Train's checkpoints all on the S3 endpoint)."""

import pytest

from ichd_ray.io.config_files import load_train_config
from test_recipe import _config

pytestmark = pytest.mark.timeout(600)


def test_cnn_fold_and_oof_embeddings_on_s3(ray_session, tiny_set, s3_bucket, tmp_path):
    """Data, cache, Ray Train checkpoints and the OOF embedding run all on the S3 endpoint."""
    from ichd_ray.io import storage
    from ichd_ray.training.embed import embed_fold
    from ichd_ray.training.cnn import train_cnn_fold
    from ichd_ray.training.keys import training_keys
    from ichd_ray.training.data import build_cache, prepare_training_set
    from ichd_ray.dicom.windowing import DEFAULT_NORMALIZATION, DEFAULT_WINDOWS

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
    keys = training_keys(cfg, manifest_sha256=ts.manifest_sha256, folds_sha256=ts.folds_sha256)
    assert not failures and all(s["cache_uri"].startswith(f"s3://{bucket}/work/cache/32-{keys['cache'].short}/") for s in studies)
    key = keys["cnn"][1]
    summary = train_cnn_fold(studies, 1, cfg, work, key=key.key, normalization=DEFAULT_NORMALIZATION.to_dict(), storage_config=config)
    assert summary["weights_uri"] == f"{work}/cnn/fold1-{key.short}.safetensors" and storage.exists(summary["weights_uri"], config)
    assert storage.list_files(f"{work}/ray_train/cnn-fold1-{key.short}", suffix="/state.json", config=config)  # checkpoints on S3
    emb = embed_fold(ts, 1, cfg, work, summary["weights_uri"], key=keys["embeddings"][1].key, storage_config=config)
    used = ts.manifest[ts.manifest["fold"] == 1]
    assert set(emb["sop_uid"]) == set(used["sop_uid"])
