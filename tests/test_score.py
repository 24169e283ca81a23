"""End to end on local Ray (2 CPUs): synth -> model init -> index -> score -> Parquet -> DuckDB."""

import csv
import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from ichd_ray import CLASSES

from ichd_ray.io import storage
from ichd_ray.config.job import JobConfig, ScoreConfig
from ichd_ray.models.bundle import init_bundle
from ichd_ray.io.tables import read_run
from ichd_ray.io.results import query
from ichd_ray.pipeline.score import score_job
from ichd_ray.synthetic.generate import SynthConfig, generate

pytestmark = pytest.mark.timeout(300)

SYNTH = SynthConfig(studies=4, slices=6, size=64, seed=11, compressed_fraction=0.25, bad_files=4)
JOB = JobConfig(score=ScoreConfig(studies_per_batch=2, studies_per_task=2, cnn_chunk=4, device="cpu"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    data = root / "archive"
    generate(str(data), SYNTH)
    # a duplicate object: the same slice stored twice
    first = sorted(data.glob("*/2.25.*.dcm"))[0]
    shutil.copy(first, first.parent / "zz-copy.dcm")
    bundle = root / "bundle"
    init_bundle(str(bundle), "test_resnet", folds=2, input_size=32, seed=0)
    return root, data, bundle


def inputs_of(data) -> set[str]:
    """Every object a listing of the archive returns: slices, bad files and the side files (CSVs)."""
    return {str(p) for p in data.rglob("*") if p.is_file()}


def side_files(data) -> set[str]:
    return {u for u in inputs_of(data) if not u.endswith(".dcm")}


def expected_rejections(data) -> dict[str, str]:
    out = {row["uri"]: row["reason"] for row in csv.DictReader(open(data / "bad_files.csv"))}
    out.update({str(p): "duplicate" for p in data.rglob("zz-copy.dcm")})
    out.update(dict.fromkeys(side_files(data), "excluded"))
    return out


def test_score_local_end_to_end(ray_session, dataset):
    root, data, bundle = dataset
    out = root / "out"
    summary = score_job(str(data), str(bundle), str(out), job=JOB, run_id="r1")
    assert summary.status == "succeeded"
    assert summary.n_inputs == len(inputs_of(data)) == summary.n_slices_scored + summary.n_rejected
    assert summary.n_studies == SYNTH.studies

    slices = query(str(out), "SELECT * FROM slices")
    studies = query(str(out), "SELECT * FROM studies")
    errors = query(str(out), "SELECT * FROM errors")
    # every input object is in exactly one of slices or errors, with the reason it deserves
    assert sorted(slices["uri"].tolist() + errors["uri"].tolist()) == sorted(inputs_of(data))
    assert dict(zip(errors["uri"], errors["reason"])) == expected_rejections(data)
    assert set(errors["stage"]) <= {"index", "decode"}
    # side files are listed, skipped by a named rule and counted; faults, selections, skips add up
    assert {"bad_files.csv", "labels.csv", "studies.csv"} <= {u.rsplit("/", 1)[-1] for u in side_files(data)}
    assert set(errors.loc[errors["reason"] == "excluded", "stage"]) == {"index"}
    bad = list(csv.DictReader(open(data / "bad_files.csv")))
    selected_out = sum(r["reason"] in ("localizer", "not_ct") for r in bad) + 1  # + the duplicate
    assert summary.outcomes == {"fault": len(bad) + 1 - selected_out, "selection": selected_out, "skip": len(side_files(data))}
    # z order: slice_index follows the position along the normal
    # (every rejection here happens at the index stage, so each study keeps all its chosen slices)
    for _, study in slices.groupby("study_uid"):
        study = study.sort_values("slice_index")
        assert study["position_z"].is_monotonic_increasing and study["position_z"].is_unique
        assert study["slice_index"].tolist() == list(range(len(study)))
    probs = slices[[f"p_{c}" for c in CLASSES]].to_numpy()
    assert ((probs > 0) & (probs < 1)).all()
    assert studies["n_slices"].sum() == len(slices)
    # flagged is the study head at the bundle's thresholds (0.5 each for an untrained bundle)
    assert studies["flagged"].tolist() == (studies[[f"p_{c}" for c in CLASSES]] >= 0.5).any(axis=1).tolist()
    run = read_run(str(out), "r1")
    assert run["attempt"] == summary.attempt and run["status"] == "succeeded"
    assert run["model_version"] == slices["model_version"].iloc[0]
    assert run["bundle_sha256"] == hashlib.sha256((bundle / "config.json").read_bytes()).hexdigest()
    # the stored config is the job's, and its hash is the hash of that stored text
    assert json.loads(run["config_json"]) == JOB.to_dict()
    assert run["config_sha256"] == hashlib.sha256(run["config_json"].encode()).hexdigest()
    assert (run["n_faults"], run["n_selected_out"], run["n_skipped"]) == tuple(summary.outcomes.values())
    assert run["n_faults"] + run["n_selected_out"] + run["n_skipped"] == run["n_rejected"]
    assert (studies["n_slices_rejected"] == 0).all()


def test_a_slice_lost_after_indexing_shortens_its_study_and_is_counted(ray_session, dataset, tmp_path):
    from ichd_ray.config.job import IndexConfig
    from ichd_ray.pipeline.index import build_manifest, write_manifest

    root, data, bundle = dataset
    archive = tmp_path / "archive"
    shutil.copytree(data, archive)
    manifest = build_manifest(str(archive), IndexConfig())
    write_manifest(manifest, str(tmp_path / "manifest.parquet"))
    chosen = manifest[manifest["selected"].astype(bool)].sort_values(["study_uid", "slice_index"]).iloc[1]
    (archive / chosen["uri"][len(str(archive)) + 1 :]).unlink()  # gone between index and score
    out = tmp_path / "out"
    summary = score_job(None, str(bundle), str(out), job=JOB, run_id="lost", manifest_uri=str(tmp_path / "manifest.parquet"))
    assert summary.status == "succeeded" and summary.outcomes["fault"] >= 1
    studies = query(str(out), "SELECT study_uid, n_slices, n_slices_rejected FROM studies").set_index("study_uid")
    selected = manifest[manifest["selected"].astype(bool)].groupby("study_uid").size()
    assert studies.loc[chosen["study_uid"], "n_slices_rejected"] == 1
    assert studies.loc[chosen["study_uid"], "n_slices"] == selected[chosen["study_uid"]] - 1
    others = studies.drop(index=chosen["study_uid"])
    assert (others["n_slices_rejected"] == 0).all() and (others["n_slices"] == selected[others.index]).all()
    errors = query(str(out), "SELECT uri, stage, reason FROM errors WHERE stage = 'read'")
    assert errors.values.tolist() == [[chosen["uri"], "read", "read_error"]]


def test_the_reject_limit_counts_faults_not_selected_out_objects(ray_session, dataset):
    root, data, bundle = dataset
    listed = len(inputs_of(data))
    bad = list(csv.DictReader(open(data / "bad_files.csv")))
    faults = sum(r["reason"] not in ("localizer", "not_ct") for r in bad)
    # between the fault fraction and the fraction of everything not scored
    limit = (faults + 0.5) / listed
    assert limit < (len(expected_rejections(data)) / listed)
    summary = score_job(str(data), str(bundle), str(root / "limit"), job=JOB, run_id="limit", max_reject_fraction=limit)
    assert summary.status == "succeeded", summary.problems
    strict = score_job(str(data), str(bundle), str(root / "limit"), job=JOB, run_id="strict", max_reject_fraction=(faults - 0.5) / listed)
    assert strict.status == "failed" and "faults of" in strict.problems[0]


def test_rerun_with_same_run_id_leaves_one_copy_and_killed_actor_changes_nothing(ray_session, dataset, tmp_path, kill_worker):
    root, data, bundle = dataset
    out = root / "out-rerun"
    first = score_job(str(data), str(bundle), str(out), job=JOB, run_id="nightly")
    before = query(str(out), "SELECT sop_uid, p_any, p_subdural FROM slices ORDER BY sop_uid")

    # a run killed right after its attempt folder appeared left nothing else
    (out / "slices" / "run_id=nightly" / "attempt=killed-early").mkdir()
    # SIGKILL the scoring actor's process once it is up: Ray Data restarts it and retries its batch
    with kill_worker("StudyScoringActor") as killed:
        second = score_job(str(data), str(bundle), str(out), job=JOB, run_id="nightly")
    assert killed, "the scoring actor was never found to kill"
    assert second.attempt != first.attempt and second.status == "succeeded"
    after = query(str(out), "SELECT sop_uid, p_any, p_subdural FROM slices ORDER BY sop_uid")
    pd.testing.assert_frame_equal(before, after, check_exact=False, rtol=1e-5)
    # at rest one attempt per table, and one runs row
    for table in ("slices", "studies", "errors"):
        attempts = {p.name for p in (out / table / "run_id=nightly").iterdir()}
        assert attempts == {f"attempt={second.attempt}"}
    assert query(str(out), "SELECT count(*) AS n FROM runs")["n"].iloc[0] == 1


def test_uncommitted_attempt_is_invisible(ray_session, dataset):
    root, data, bundle = dataset
    out = root / "out"
    if not (out / "runs").exists():
        score_job(str(data), str(bundle), str(out), job=JOB, run_id="r1")
    n = query(str(out), "SELECT count(*) AS n FROM slices")["n"].iloc[0]
    committed = read_run(str(out), "r1")["attempt"]
    # a crashed run left a full copy of its data under another attempt, without committing
    src = out / "slices" / "run_id=r1" / f"attempt={committed}"
    shutil.copytree(src, src.parent / "attempt=crashed")
    assert query(str(out), "SELECT count(*) AS n FROM slices")["n"].iloc[0] == n
    shutil.rmtree(src.parent / "attempt=crashed")


def test_score_on_s3(ray_session, dataset, s3_bucket):
    root, data, bundle = dataset
    bucket, config = s3_bucket
    archive = f"s3://{bucket}/archive"
    generate(archive, dataclasses.replace(SYNTH, studies=2, bad_files=2), storage_config=config)
    s3_bundle = f"s3://{bucket}/models/v1"
    for p in bundle.iterdir():
        storage.write_bytes(f"{s3_bundle}/{p.name}", p.read_bytes(), config)
    out = f"s3://{bucket}/results"
    summary = score_job(archive, s3_bundle, out, job=JOB, run_id="s3run", storage_config=config)
    assert summary.status == "succeeded" and summary.n_studies == 2
    n_inputs = len(storage.list_files(archive, config=config))  # slices, bad files and 3 CSVs
    assert summary.n_inputs == n_inputs == summary.n_slices_scored + summary.n_rejected
    studies = query(out, "SELECT study_uid, n_slices, p_any FROM studies", config)
    assert len(studies) == 2 and studies["n_slices"].sum() == summary.n_slices_scored
    errors = query(out, "SELECT reason FROM errors", config)
    assert sorted(errors["reason"]) == ["empty", "excluded", "excluded", "excluded", "truncated"]


def test_embeddings_and_cli(ray_session, dataset, capsys):
    from ichd_ray.cli import main

    root, data, bundle = dataset
    out = root / "out-cli"
    manifest = root / "manifest.parquet"
    assert main(["index", str(data), "--out", str(manifest)]) == 0
    assert "indexed" in capsys.readouterr().out
    code = main(
        ["score", "--manifest", str(manifest), "--model", str(bundle), "--out", str(out), "--run-id", "cli",
         "--write-embeddings", "--device", "cpu", "--no-progress"]
    )
    text = capsys.readouterr().out
    assert code == 0 and "succeeded" in text and "ichd-ray results" in text
    emb = pd.read_parquet(out / "embeddings", partitioning=None)
    slices = query(str(out), "SELECT sop_uid FROM slices")
    assert set(emb["sop_uid"]) == set(slices["sop_uid"])
    dims = {len(e) for e in emb["embedding"]}
    assert len(dims) == 1 and dims.pop() > 8 and emb["embedding"].iloc[0].dtype == np.float16
    # The CNN logits and z positions travel with the embeddings: the sequence stage's other inputs.
    assert {len(v) for v in emb["cnn_logits"]} == {6}
    positions = query(str(out), "SELECT sop_uid, position_z FROM slices").set_index("sop_uid")["position_z"]
    assert np.allclose(emb.set_index("sop_uid")["position_z"].sort_index(), positions.sort_index())
    assert main(["results", str(out), "--sql", "SELECT count(*) AS n FROM studies"]) == 0
    assert str(SYNTH.studies) in capsys.readouterr().out
    bad = root / "bad.yaml"
    bad.write_text("score:\n  device: tpu\n")
    assert main(["score", str(data), "--model", str(bundle), "--out", str(out), "--config", str(bad)]) == 2
    assert "score.device" in capsys.readouterr().err


def test_a_pool_that_cannot_fit_fails_fast_instead_of_hanging(ray_session, dataset):
    from ichd_ray.config.job import ConfigError

    root, data, bundle = dataset
    job = JOB.with_overrides({"score": {"num_actors": 2, "cpus_per_actor": 1.0}})
    with pytest.raises(ConfigError, match="cpus_per_actor"):
        score_job(str(data), str(bundle), str(root / "never"), job=job)
    assert not (root / "never").exists()


GIB = 1024**3


def _nodes(*specs):
    """ray.nodes() rows for alive nodes with (CPU, GPU, memory GiB)."""
    return [
        {"Alive": True, "NodeID": f"n{i}", "Resources": {"CPU": c, "GPU": g, "memory": m * GIB}}
        for i, (c, g, m) in enumerate(specs)
    ] + [{"Alive": False, "NodeID": "dead", "Resources": {"CPU": 64.0, "GPU": 8.0, "memory": 512.0 * GIB}}]


def _fit(monkeypatch, nodes, job, decode_memory=1 * GIB):
    import ray

    from ichd_ray.pipeline.score import _check_cluster_fits

    totals = {k: sum(n["Resources"].get(k, 0.0) for n in nodes if n["Alive"]) for k in ("CPU", "GPU", "memory")}
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: totals)
    _check_cluster_fits(job, decode_memory)


def test_the_pool_check_places_actors_and_a_decode_task_on_real_nodes(monkeypatch):
    from ichd_ray.config.job import ConfigError

    def job(**score):
        return JOB.with_overrides({"score": score})

    # fits: an actor on one node, a decode task on the other
    _fit(monkeypatch, _nodes((1, 0, 4), (1, 0, 4)), job(cpus_per_actor=0.5, cpus_per_decode_task=1.0))
    # 1.5 CPUs for one actor: the cluster has 2, but no node holds 1.5
    with pytest.raises(ConfigError, match="no node"):
        _fit(monkeypatch, _nodes((1, 0, 4), (1, 0, 4)), job(cpus_per_actor=1.5, cpus_per_decode_task=0.25))
    # an actor needs 1 CPU and 1 GPU: the cluster has 4.5 CPUs and a GPU, but the GPU node has 0.5 CPU
    with pytest.raises(ConfigError, match="no node has those GPUs"):
        _fit(monkeypatch, _nodes((0.5, 1, 16), (4, 0, 16)), job(cpus_per_actor=1.0, num_gpus_per_actor=1.0, cpus_per_decode_task=0.5))
    _fit(monkeypatch, _nodes((4, 1, 16), (4, 1, 16)), job(num_actors=2, num_gpus_per_actor=1.0))
    # the decode task's memory request must fit one node's memory (the dead node's never counts)
    with pytest.raises(ConfigError, match="memory"):
        _fit(monkeypatch, _nodes((2, 0, 4), (2, 0, 4)), job(), decode_memory=6 * GIB)
    # on an autoscaling cluster the same impossible pool is left to the autoscaler
    autoscaling = JOB.with_overrides({"score": {"cpus_per_actor": 1.5}, "ray": {"autoscaling": True}})
    _fit(monkeypatch, _nodes((1, 0, 4)), autoscaling, decode_memory=6 * GIB)


def test_scoring_preprocesses_as_the_bundle_says(ray_session, tmp_path):
    """rsna_fix off in the bundle: RSNA-wrapped 12-bit slices are windowed without the fix."""
    import json

    from ichd_ray.models.bundle import BundleError

    data = tmp_path / "archive"
    generate(str(data), SynthConfig(studies=3, slices=4, size=32, seed=5, compressed_fraction=0.0), workers=1)
    on, off = tmp_path / "fix-on", tmp_path / "fix-off"
    init_bundle(str(on), "test_resnet", folds=1, input_size=32, seed=0)
    init_bundle(str(off), "test_resnet", folds=1, input_size=32, seed=0, preprocessing={"rsna_fix": False})
    assert json.loads((off / "config.json").read_text())["preprocessing"]["rsna_fix"] is False
    score_job(str(data), str(on), str(tmp_path / "out-on"), job=JOB, run_id="on")
    score_job(str(data), str(off), str(tmp_path / "out-off"), job=JOB, run_id="off")
    sql = "SELECT study_uid, sop_uid, p_any FROM slices ORDER BY sop_uid"
    a, b = query(str(tmp_path / "out-on"), sql), query(str(tmp_path / "out-off"), sql)
    encodings = pd.read_csv(data / "studies.csv").set_index("study_uid")["encoding"]
    assert sorted(encodings) == ["uint12", "uint12", "uint12_wrapped"]  # seed 5
    differs = a.loc[~np.isclose(a["p_any"], b["p_any"], rtol=0, atol=1e-7), "study_uid"]
    # exactly the wrapped study's slices change, every one of them
    assert set(differs) == set(encodings.index[encodings == "uint12_wrapped"])
    assert len(differs) == (a["study_uid"] == differs.iloc[0]).sum()
    # a preprocessing this code cannot do is refused when the bundle is read, before any work
    bad = json.loads((on / "config.json").read_text())
    bad["preprocessing"]["resize"] = "bilinear"
    (on / "config.json").write_text(json.dumps(bad))
    with pytest.raises(BundleError, match="preprocessing.resize"):
        score_job(str(data), str(on), str(tmp_path / "never"), job=JOB)
    assert not (tmp_path / "never").exists()


def test_decode_is_never_fused_into_the_model_actor(ray_session, dataset, monkeypatch):
    """Same CPU request for both stages used to let Ray Data run decode inside the actor."""
    import ray.data

    root, data, bundle = dataset
    plans = []
    materialize = ray.data.Dataset.materialize

    def spy(self):
        out = materialize(self)
        plans.append(out.stats())
        return out

    monkeypatch.setattr(ray.data.Dataset, "materialize", spy)
    job = JOB.with_overrides({"score": {"cpus_per_actor": 1.0, "cpus_per_decode_task": 1.0}})
    assert score_job(str(data), str(bundle), str(root / "unfused"), job=job).status == "succeeded"
    assert "MapBatches(decode_studies)->MapBatches(StudyScoringActor)" not in plans[0]
    assert "MapBatches(StudyScoringActor)" in plans[0]
