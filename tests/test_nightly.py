"""Nightly rescoring: incremental index, plans, model changes, deletions, a killed run, the lease;
on local files and on the moto S3 endpoint."""

import dataclasses
import datetime as dt
import shutil

import pandas as pd
import pytest

from inventory_factory import write_inventory
from ichd_ray.io import storage
from ichd_ray.io.inventory import InventoryError
from ichd_ray.config.job import JobConfig
from ichd_ray.models.bundle import init_bundle
from ichd_ray.pipeline.index import EmptyInput
from ichd_ray.pipeline.nightly import EXIT_LEASE_HELD, nightly
from ichd_ray.io.results import query
from ichd_ray.synthetic.generate import SynthConfig, generate

pytestmark = pytest.mark.timeout(600)

DAY = dt.datetime(2026, 11, 20, 2, 0, tzinfo=dt.timezone.utc)
JOB = JobConfig().with_overrides({"score": {"device": "cpu"}})
SYNTH = SynthConfig(studies=3, slices=5, size=64, seed=11, compressed_fraction=0.0)


def night(n: int) -> dt.datetime:
    return DAY + dt.timedelta(days=n)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly-models")
    v1 = init_bundle(str(root / "v1"), "test_resnet", input_size=32, seed=1)
    v2 = init_bundle(str(root / "v2"), "test_resnet", input_size=32, seed=2)
    return (str(root / "v1"), v1.version_id), (str(root / "v2"), v2.version_id)


def _latest(out, config=None):
    return query(out, "SELECT study_uid, run_id, model_version FROM latest_studies ORDER BY study_uid", config)


def test_nightly_story_on_local_files(ray_session, bundles, tmp_path, monkeypatch, capsys):
    (v1, version1), (v2, version2) = bundles
    archive, out = str(tmp_path / "archive"), str(tmp_path / "out")
    generate(archive, dataclasses.replace(SYNTH, bad_files=1), workers=1)
    run = dict(job=JOB, max_reject_fraction=0.5)

    # Night 1: everything is new.
    first = nightly(archive, v1, out, now=night(1), **run)
    assert first.summary.status == "succeeded"
    assert first.plan.run_id == f"nightly-20261121-{version1}"
    assert sorted(first.plan.plan["reason"]) == ["new"] * 3
    assert first.summary.n_inputs == first.summary.n_slices_scored + first.summary.n_rejected
    assert len(_latest(out)) == 3

    # Night 2: nothing changed, nothing scored (a run is still committed, with its index).
    second = nightly(archive, v1, out, now=night(2), **run)
    assert second.plan.plan.empty and second.summary.n_studies == 0 and second.summary.status == "succeeded"
    assert set(_latest(out)["run_id"]) == {first.plan.run_id}
    # The bad file was reported the night it appeared, not again.
    errors = query(out, "SELECT run_id, reason FROM errors WHERE stage = 'index'")
    assert set(errors["run_id"]) == {first.plan.run_id}

    # Night 3: a new study arrives; only it is scored.
    extra = str(tmp_path / "extra")
    generate(extra, dataclasses.replace(SYNTH, studies=1, seed=99), workers=1)
    new_study = pd.read_csv(f"{extra}/studies.csv")["study_uid"].iloc[0]
    shutil.copytree(f"{extra}/{new_study}", f"{archive}/{new_study}")
    third = nightly(archive, v1, out, now=night(3), **run)
    assert third.plan.plan[["study_uid", "reason"]].values.tolist() == [[new_study, "new"]]
    latest = _latest(out)
    assert len(latest) == 4 and latest.set_index("study_uid").loc[new_study, "run_id"] == third.plan.run_id

    # A dry run prints the plan with a time estimate and writes nothing.
    before = sorted(e.uri for e in storage.list_files(out))
    dry = nightly(archive, v2, out, now=night(4), dry_run=True, **run)
    assert sorted(dry.plan.plan["reason"]) == ["model"] * 4 and dry.plan.estimated_seconds is not None
    assert sorted(e.uri for e in storage.list_files(out)) == before

    # Night 4: a new model version rescoring everything; the run is killed before its commit.
    import ichd_ray.pipeline.score

    real_commit = ichd_ray.pipeline.score.commit_run

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(ichd_ray.pipeline.score, "commit_run", killed)
    with pytest.raises(KeyboardInterrupt):
        nightly(archive, v2, out, now=night(4), **run)
    assert set(_latest(out)["model_version"]) == {version1}  # nothing of the killed run is visible
    monkeypatch.setattr(ichd_ray.pipeline.score, "commit_run", real_commit)

    # Night 5 (a new study arrived meanwhile) replays... no: the re-run of night 4 repeats night 4's plan.
    generate(str(tmp_path / "late"), dataclasses.replace(SYNTH, studies=1, seed=123), workers=1)
    late = pd.read_csv(tmp_path / "late" / "studies.csv")["study_uid"].iloc[0]
    shutil.copytree(tmp_path / "late" / late, f"{archive}/{late}")
    rerun = nightly(archive, v2, out, now=night(4), **run)
    assert rerun.plan.reused and sorted(rerun.plan.plan["reason"]) == ["model"] * 4
    assert late not in set(rerun.plan.plan["study_uid"])
    latest = _latest(out)
    assert len(latest) == 4 and set(latest["model_version"]) == {version2}
    dup = query(out, f"SELECT sop_uid, count(*) AS n FROM slices WHERE run_id = '{rerun.plan.run_id}' GROUP BY sop_uid HAVING n > 1")
    assert dup.empty  # the killed attempt left no second copy

    # Night 5: the late study is new; one study is deleted from the archive and drops out.
    gone = sorted(first.plan.plan["study_uid"])[0]
    shutil.rmtree(f"{archive}/{gone}")
    fifth = nightly(archive, v2, out, now=night(5), **run)
    assert fifth.plan.plan[["study_uid", "reason"]].values.tolist() == [[late, "new"]]
    assert fifth.plan.deleted_objects > 0
    latest = _latest(out)
    assert gone not in set(latest["study_uid"]) and late in set(latest["study_uid"]) and len(latest) == 4
    deleted = query(out, f"SELECT bool_and(deleted) AS d FROM latest_index WHERE study_uid = '{gone}'")
    assert bool(deleted["d"].iloc[0])

    # Two unreadable objects arrive: with the default limit (5%) the run fails, is committed, says why.
    from ichd_ray.cli import main

    for name in ("junk1.dcm", "junk2.dcm"):
        (tmp_path / "archive" / name).write_bytes(b"not a dicom file")

    code = main(["nightly", "--archive", archive, "--model", v1, "--out", out, "--full", "--run-id", "strict", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "FAILED" in err and "max 5.0%" in err
    status = query(out, "SELECT status, problems FROM runs WHERE run_id = 'strict'")
    assert status["status"].iloc[0] == "failed" and "top reasons" in status["problems"].iloc[0]
    # The failed run's predictions stay queryable with its status, but no latest_* view shows them,
    # and its studies stay due: a v1 night plans every study again (v2 is the last good score).
    failed_rows = query(out, "SELECT count(*) AS n FROM studies JOIN runs USING (run_id) WHERE runs.status = 'failed'")
    assert failed_rows["n"].iloc[0] == 4
    assert set(_latest(out)["model_version"]) == {version2}
    assert set(query(out, "SELECT model_version FROM latest_scored")["model_version"]) == {version2}
    assert "strict" not in set(query(out, "SELECT DISTINCT run_id FROM latest_index")["run_id"])
    due = nightly(archive, v1, out, now=night(6), dry_run=True, **run)
    assert sorted(due.plan.plan["reason"]) == ["model"] * 4

    # A night writes what changed: night 2 (nothing) no index row, night 3 the new study's objects only.
    written = query(out, "SELECT run_id, count(*) AS n FROM index_rows GROUP BY run_id")
    written = dict(zip(written["run_id"], written["n"]))
    assert second.plan.run_id not in written
    assert written[third.plan.run_id] == len(storage.list_files(f"{archive}/{new_study}"))

    # A compaction folds the nights into one snapshot: tombstones go, nothing else changes.
    live = "SELECT * EXCLUDE (run_id) FROM latest_index WHERE NOT deleted ORDER BY uri"
    live_before, latest_before = query(out, live), _latest(out)
    assert query(out, "SELECT count(*) AS n FROM latest_index WHERE deleted")["n"].iloc[0] > 0
    assert main(["compact", out]) == 0 and "tombstones" in capsys.readouterr().out
    assert query(out, "SELECT count(*) AS n FROM latest_index WHERE deleted")["n"].iloc[0] == 0
    pd.testing.assert_frame_equal(query(out, live), live_before)
    pd.testing.assert_frame_equal(_latest(out), latest_before)  # the deleted study stays out
    due = nightly(archive, v1, out, now=night(6), dry_run=True, **run)
    assert sorted(due.plan.plan["reason"]) == ["model"] * 4
    assert sorted(u.rsplit("/", 1)[-1] for u in due.plan.new_objects) == ["junk1.dcm", "junk2.dcm"]  # the failed night's
    # The archive prefix lists nothing (moved away, a typo, credentials that cannot list it): refused,
    # rather than a night that marks every study deleted.
    runs_before = query(out, "SELECT count(*) AS n FROM runs")["n"].iloc[0]
    shutil.move(archive, str(tmp_path / "archive-moved"))
    code = main(["nightly", "--archive", archive, "--model", v1, "--out", out, "--no-progress"])
    assert code == 2 and f"no objects under {archive}" in capsys.readouterr().err
    assert query(out, "SELECT count(*) AS n FROM runs")["n"].iloc[0] == runs_before
    assert not query(out, "SELECT bool_or(deleted) AS d FROM latest_index WHERE study_uid <> '" + gone + "'")["d"].iloc[0]
    shutil.move(str(tmp_path / "archive-moved"), archive)

    # Every `ichd-ray results` example of the README answers on this output.
    examples = _readme_examples()
    assert len(examples) == 3
    for sql in examples:
        assert main(["results", out, "--sql", sql]) == 0
        text = capsys.readouterr().out
        assert text.strip() and "Empty" not in text, sql

    # The next compaction deletes what the first one superseded (a reader mid-query kept it until now).
    files_before = {e.uri for e in storage.list_files(f"{out}/index")}
    for name in ("junk1.dcm", "junk2.dcm"):
        (tmp_path / "archive" / name).unlink()
    assert nightly(archive, v2, out, now=night(7), **run).summary.status == "succeeded"
    assert main(["compact", out]) == 0
    files_after = {e.uri for e in storage.list_files(f"{out}/index")}
    assert not any(f"run_id={first.plan.run_id}/" in u for u in files_after)
    assert any("run_id=compaction-" in u for u in files_after) and files_before - files_after
    pd.testing.assert_frame_equal(query(out, live), live_before)


def _readme_examples() -> list[str]:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Result tables for analytics", 1)[1].split("\n## ", 1)[0]
    return re.findall(r'^ichd-ray results OUT --sql "(.+)"$', section, flags=re.M)


def test_a_held_lease_stops_a_second_run(ray_session, bundles, tmp_path, capsys):
    from ichd_ray.cli import main
    from ichd_ray.io.lease import LeaseHeld, acquire

    (v1, _), _ = bundles
    archive, out = str(tmp_path / "archive"), str(tmp_path / "out")
    generate(archive, dataclasses.replace(SYNTH, studies=1), workers=1)
    holder = acquire(storage.join(out, "_lease.json"), holder="other-host:4242:run")
    with pytest.raises(LeaseHeld) as info:
        nightly(archive, v1, out, job=JOB)
    assert info.value.holder == "other-host:4242:run"
    code = main(["nightly", "--archive", archive, "--model", v1, "--out", out, "--no-progress"])
    err = capsys.readouterr().err
    assert code == EXIT_LEASE_HELD and "other-host:4242:run" in err
    assert not storage.list_files(storage.join(out, "runs"))  # the loser wrote nothing
    from ichd_ray.io.lease import release

    release(holder)
    assert nightly(archive, v1, out, job=JOB).summary.status == "succeeded"


def test_nightly_on_s3(ray_session, bundles, s3_bucket, monkeypatch):
    import ichd_ray.pipeline.score
    from ichd_ray.io.lease import LeaseHeld, acquire, release

    (v1, _), (v2, version2) = bundles
    bucket, config = s3_bucket
    archive, out = f"s3://{bucket}/archive", f"s3://{bucket}/results"
    generate(archive, SYNTH, storage_config=config)
    run = dict(job=JOB, storage_config=config)
    first = nightly(archive, v1, out, now=night(1), **run)
    assert first.summary.status == "succeeded" and len(first.plan.plan) == 3
    assert nightly(archive, v1, out, now=night(2), **run).plan.plan.empty

    # A new study: only it is scored.
    generate(f"s3://{bucket}/incoming", dataclasses.replace(SYNTH, studies=1, seed=77), storage_config=config)
    for entry in storage.list_files(f"s3://{bucket}/incoming", suffix=".dcm", config=config):
        storage.write_bytes(entry.uri.replace("/incoming/", "/archive/"), storage.read_bytes(entry.uri, config), config)
    third = nightly(archive, v1, out, now=night(3), **run)
    assert third.plan.plan["reason"].tolist() == ["new"]

    # The same night from an S3 Inventory report of the bucket (as AWS lays it out): the same objects, so
    # nothing to read or score; a report made before the last run started is refused (it would miss what
    # changed since), and so is one that lists nothing under the archive.
    inventory = write_inventory(config, bucket, bucket, dest_prefix="inventory", fmt="Parquet", files=2)
    again = nightly(archive, v1, out, now=night(3), run_id="from-inventory", inventory_uri=inventory.manifest_uri, **run)
    assert again.plan.plan.empty and not again.plan.new_objects and again.plan.deleted_objects == 0
    assert again.plan.counts["objects"] == third.plan.counts["objects"]
    stale = write_inventory(config, bucket, bucket, dest_prefix="inventory-old", created=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    with pytest.raises(InventoryError, match="before the last committed run started"):
        nightly(archive, v1, out, now=night(3), run_id="stale", inventory_uri=stale.manifest_uri, **run)
    empty = write_inventory(config, bucket, bucket, dest_prefix="inventory-empty", objects=[])
    with pytest.raises(EmptyInput, match="lists no objects"):
        nightly(archive, v1, out, now=night(3), run_id="empty", inventory_uri=empty.manifest_uri, **run)

    # Another run holds the lease: this one stops before doing anything.
    held = acquire(f"{out}/_lease.json", holder="cron-pod-7", storage_config=config)
    with pytest.raises(LeaseHeld, match="cron-pod-7"):
        nightly(archive, v2, out, now=night(4), **run)
    release(held)

    # A new model version, killed before its commit, then re-run: all 4 rescored once, nothing lost.
    real_commit = ichd_ray.pipeline.score.commit_run
    monkeypatch.setattr(ichd_ray.pipeline.score, "commit_run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        nightly(archive, v2, out, now=night(4), **run)
    monkeypatch.setattr(ichd_ray.pipeline.score, "commit_run", real_commit)
    assert set(_latest(out, config)["model_version"]) != {version2}
    fourth = nightly(archive, v2, out, now=night(4), **run)
    assert fourth.plan.reused and sorted(fourth.plan.plan["reason"]) == ["model"] * 4
    latest = _latest(out, config)
    assert len(latest) == 4 and set(latest["run_id"]) == {fourth.plan.run_id}
    dup = query(out, f"SELECT sop_uid FROM slices WHERE run_id = '{fourth.plan.run_id}' GROUP BY sop_uid HAVING count(*) > 1", config)
    assert dup.empty
    assert not storage.exists(f"{out}/_lease.json", config)  # released after the run
