"""A nightly run killed with SIGKILL (as the OOM killer or a node loss does) and re-run at once.

Each test runs ``ichd-ray nightly`` as a real subprocess (its own local Ray), watches OUT from here and
SIGKILLs the whole process tree when OUT shows a given state: the plan written, an attempt folder
present, N part files written. Then it re-runs at once and compares the committed output with a clean
run's. The killed process never released its lease: on this host the re-run sees its pid gone and takes
over at once; a lease last renewed on another host (a Kubernetes re-run is a new pod) lapses after its
TTL (10 s here). Faults come from here, never from hooks in the code under test.

Also here: a commit whose response was lost is retried and stays one commit.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from fault_scripts.proc_tree import TAG_VAR, tagged_processes

from ichd_ray.io import storage

pytestmark = pytest.mark.timeout(900)

RUN_ID = "kill-test"
TTL_S = 10
CLI = Path(sys.executable).with_name("ichd-ray")
JOB_YAML = """\
score:
  device: cpu
  cpus_per_actor: 0.25
  cpus_per_decode_task: 0.5
ray:
  num_cpus: 1
"""


# ----------------------------------------------------------------------------- the CLI, killed


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A small synthetic archive, a bundle and a job YAML (1 local CPU, fractional tasks)."""
    from ichd_ray.models.bundle import init_bundle
    from ichd_ray.synthetic.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("kill")
    generate(str(root / "archive"), SynthConfig(studies=3, slices=4, size=32, seed=5, compressed_fraction=0.0), workers=1)
    init_bundle(str(root / "model"), "test_resnet", input_size=32, seed=1)
    (root / "job.yaml").write_text(JOB_YAML)
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths live under it
    yield {"archive": str(root / "archive"), "model": str(root / "model"), "config": str(root / "job.yaml"),
           "root": str(root), "ray_tmp": ray_tmp}
    shutil.rmtree(ray_tmp, ignore_errors=True)


class Nightly:
    """``ichd-ray nightly`` subprocesses on one OUT; every process they start carries a tag in its
    environment, so the whole tree (Ray's daemons and workers too, which leave the process group) can
    be SIGKILLed, and nothing is left running after the test."""

    def __init__(self, inputs: dict[str, str], out: str) -> None:
        self.inputs, self.out = inputs, out
        self.tag = uuid.uuid4().hex
        self.procs: list[subprocess.Popen] = []

    def start(self, ttl_s: float = TTL_S) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({TAG_VAR: self.tag, "ICHD_PATIENT_SALT": "test-salt", "PYTHONUNBUFFERED": "1",
                    # A Ray temp root of its own: a `ray start` elsewhere on this machine (its address
                    # file in /tmp/ray) would otherwise be joined by the CLI's ray.init().
                    "RAY_TMPDIR": self.inputs["ray_tmp"]})
        args = [
            str(CLI), "nightly", "--archive", self.inputs["archive"], "--model", self.inputs["model"],
            "--out", self.out, "--run-id", RUN_ID, "--config", self.inputs["config"], "--no-progress",
            "--lease-ttl", str(ttl_s),
        ]
        proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        return proc

    def run(self, ttl_s: float = TTL_S, timeout: float = 300) -> tuple[int, str]:
        proc = self.start(ttl_s)
        try:
            output, _ = proc.communicate(timeout=timeout)
        finally:
            self.kill_all()
        return proc.returncode, output

    def kill_when(self, state: Callable[[], bool], what: str, ttl_s: float = TTL_S, timeout: float = 300) -> None:
        """Start a run and SIGKILL its process tree as soon as ``state()`` holds."""
        proc = self.start(ttl_s)
        deadline = time.monotonic() + timeout
        while not state():
            if proc.poll() is not None:
                output = proc.stdout.read() if proc.stdout else ""
                self.kill_all()
                raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{output[-3000:]}")
            assert time.monotonic() < deadline, f"no {what} after {timeout} s"
            time.sleep(0.02)
        self.kill_all()
        assert not committed(self.out), f"killed too late: the run was already committed ({what})"

    def kill_all(self) -> None:
        """SIGKILL the CLI's process group, then every process that carries this tag, until none is left."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for _ in range(50):
            tagged = tagged_processes(self.tag)
            if not tagged:
                break
            for pid in tagged:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"processes of the test run still alive: {tagged_processes(self.tag)}")
        for proc in self.procs:
            proc.wait()
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
def nightly_cli(inputs, tmp_path) -> Iterator[Callable[[str], Nightly]]:
    made: list[Nightly] = []

    def make(name: str) -> Nightly:
        made.append(Nightly(inputs, str(tmp_path / name)))
        return made[-1]

    yield make
    for n in made:
        n.kill_all()


# States of OUT, as seen from outside the process.


def plan_written(out: str) -> Callable[[], bool]:
    return lambda: os.path.exists(os.path.join(out, "plans", f"run_id={RUN_ID}", "plan.parquet"))


def _attempts(out: str) -> list[Path]:
    return sorted(Path(out).glob(f"*/run_id={RUN_ID}/attempt=*"))


def attempt_present(out: str) -> Callable[[], bool]:
    return lambda: bool(_attempts(out))


def part_files(out: str, n: int) -> Callable[[], bool]:
    return lambda: sum(1 for a in _attempts(out) for _ in a.glob("*.parquet")) >= n


def committed(out: str) -> bool:
    return os.path.exists(os.path.join(out, "runs", f"run_id={RUN_ID}", "run.parquet"))


def committed_output(out: str) -> dict[str, pd.DataFrame]:
    """The committed tables, sorted, without what differs between two runs of the same plan."""
    from ichd_ray.io.results import query

    def table(sql: str, keys: list[str]) -> pd.DataFrame:
        df = query(out, sql)
        df = df.drop(columns=[c for c in ("attempt",) if c in df.columns])
        return df.sort_values(keys).reset_index(drop=True)

    runs = query(out, "SELECT * FROM runs")
    return {
        "slices": table("SELECT * FROM slices", ["study_uid", "slice_index", "sop_uid"]),
        "studies": table("SELECT * FROM studies", ["study_uid"]),
        "errors": table("SELECT * FROM errors", ["uri", "stage"]),
        "runs": runs[["run_id", "status", "n_inputs", "n_slices_scored", "n_rejected", "n_studies", "kind"]],
    }


def assert_same_output(out: str, clean: dict[str, pd.DataFrame]) -> None:
    got = committed_output(out)
    for name, expected in clean.items():
        pd.testing.assert_frame_equal(got[name], expected, check_exact=False, rtol=1e-5, atol=1e-6, obj=name)
    # At rest only the committed attempt holds files (temporary ones included): the killed attempts'
    # files are gone, and so is the lease. (On local disk a killed attempt may leave an empty folder.)
    holding = {a.name for a in _attempts(out) if any(f.is_file() for f in a.rglob("*"))}
    assert holding == {f"attempt={json_run(out)['attempt']}"}
    assert not os.path.exists(os.path.join(out, "_lease.json"))


def json_run(out: str) -> dict:
    from ichd_ray.io.tables import read_run

    return read_run(out, RUN_ID)


@pytest.fixture(scope="module")
def clean_output(inputs, tmp_path_factory) -> dict[str, pd.DataFrame]:
    out = str(tmp_path_factory.mktemp("clean") / "out")
    cli = Nightly(inputs, out)
    code, output = cli.run()
    assert code == 0, output[-3000:]
    return committed_output(out)


class ForeignHeartbeat:
    """Stands in for a holder on another host (a pod on another node): rewrites OUT's lease as that
    holder's and renews it every second with a ``TTL_S`` lease, as a live keeper would, until stopped
    (the pod dies). Nothing on this host can tell whether that process is alive."""

    HOLDER = "nightly-pod-x:1:0a1b2c3d"

    def __init__(self, out: str) -> None:
        import threading

        self.path = os.path.join(out, "_lease.json")
        self.record = json.loads(Path(self.path).read_text())
        self.record.update(holder=self.HOLDER, nonce="f" * 16, ttl_seconds=float(TTL_S))
        self.record["process"] = {**self.record["process"], "host": "nightly-pod-x", "pid": 1}
        self.expires_at = dt.datetime.now(dt.timezone.utc)
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        expires = now + dt.timedelta(seconds=TTL_S)
        self.record.update(renewed_at=_iso(now), expires_at=_iso(expires))
        storage.write_bytes(self.path, json.dumps(self.record).encode())
        self.expires_at = expires

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._beat()

    def stop(self) -> dt.datetime:
        """The holder dies: no more renewals. Returns when its lease expires."""
        self._stop.set()
        self._thread.join()
        return self.expires_at


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


@pytest.mark.slow
def test_killed_runs_rerun_at_once_and_a_dead_pods_lease_lapses(nightly_cli, clean_output) -> None:
    """Killed when the plan is written, re-run at once and killed as soon as its attempt folder appears,
    re-run at once and killed after two part files: with an hour's TTL, only the dead-pid check on this
    host lets each re-run in. Then the lease looks like a pod's on another node, renewed while that pod
    lives (a re-run exits 75) and lapsing TTL_S after it dies; the next run finishes, same output."""
    cli = nightly_cli("out")
    lease_path = os.path.join(cli.out, "_lease.json")
    cli.kill_when(plan_written(cli.out), "plan written", ttl_s=3600)
    killed = json.loads(Path(lease_path).read_text())  # the killed run never released it
    cli.kill_when(attempt_present(cli.out), "attempt folder", ttl_s=3600)  # exit 75 here: locked out
    rerun = json.loads(Path(lease_path).read_text())
    assert rerun["holder"] != killed["holder"] and rerun["acquired_at"] < killed["expires_at"]
    cli.kill_when(part_files(cli.out, 2), "2 part files", ttl_s=3600)
    assert len(_attempts(cli.out)) >= 2

    pod = ForeignHeartbeat(cli.out)
    try:
        code, output = cli.run(ttl_s=TTL_S)
    finally:
        expires = pod.stop()
    assert code == 75 and ForeignHeartbeat.HOLDER in output, output[-3000:]
    assert json.loads(Path(lease_path).read_text())["holder"] == ForeignHeartbeat.HOLDER
    time.sleep(max(0.0, (expires - dt.datetime.now(dt.timezone.utc)).total_seconds()))
    code, output = cli.run(ttl_s=TTL_S)
    assert code == 0, output[-3000:]
    assert "(re-run: the first attempt's plan)" in output
    assert_same_output(cli.out, clean_output)


# ------------------------------------------------------------------------- a commit, response lost


def test_a_commit_whose_response_was_lost_is_one_commit(s3_bucket, monkeypatch) -> None:
    """commit_run is one unconditional PUT of bytes fixed before the call: a retry after a lost response
    (botocore's, or the caller's after botocore gave up) writes the same object again."""
    import botocore.retries.standard
    import urllib3
    from botocore.exceptions import ConnectionClosedError

    from ichd_ray.io.tables import RUNS_SCHEMA, commit_run, read_run

    bucket, config = s3_bucket
    out = f"s3://{bucket}/out"
    row = {name: None for name in RUNS_SCHEMA.names} | {"run_id": "r1", "attempt": "a1", "status": "succeeded"}
    client = storage.boto3_client(config)
    http = urllib3.PoolManager()
    lost = {"n": 0}
    statuses: list[int] = []
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, context: 0)

    def drop(request, **kwargs):
        if lost["n"] <= 0 or "/runs/" not in request.url:
            return None
        lost["n"] -= 1
        body = request.body.read() if hasattr(request.body, "read") else request.body
        statuses.append(http.request(request.method, request.url, body=body, headers=dict(request.headers.items()), retries=False).status)
        raise ConnectionClosedError(endpoint_url=request.url)

    client.meta.events.register("before-send.s3.PutObject", drop)
    try:
        lost["n"] = 1  # botocore's retry lands the same bytes again
        commit_run(out, row, config)
        assert statuses == [200] and read_run(out, "r1", config)["attempt"] == "a1"
        lost["n"] = client.meta.config.retries["total_max_attempts"]  # botocore gives up, though the first attempt landed; the caller's retry is the same PUT
        with pytest.raises(Exception):
            commit_run(out, row | {"attempt": "a2"}, config)
        assert read_run(out, "r1", config)["attempt"] == "a2"
        commit_run(out, row | {"attempt": "a2"}, config)
    finally:
        client.meta.events.unregister("before-send.s3.PutObject", drop)
    assert read_run(out, "r1", config)["attempt"] == "a2"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/runs/")["Contents"]]
    assert keys == ["out/runs/run_id=r1/run.parquet"]
