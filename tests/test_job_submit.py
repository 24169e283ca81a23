"""`ray job submit -- python jobs/score.py ...` against a separate local `ray start --head`."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from ichd_ray.models.bundle import init_bundle
from ichd_ray.io.tables import read_run
from ichd_ray.synthetic.generate import SynthConfig, generate

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head of its own (not the test session's), stopped with its processes afterwards."""
    ray_bin = Path(sys.executable).with_name("ray")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    port, dash = _free_port(), _free_port()
    # every fixed default port moved: the test session's own Ray already holds them (52365, 10001, ...)
    ports = [
        f"--{name}={_free_port()}"
        for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                     "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    ]
    # the job's `python` must be this environment's, as on a cluster image with the package installed
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{ray_bin.parent}{os.pathsep}{os.environ['PATH']}")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--num-cpus=2", f"--port={port}", "--include-dashboard=true",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(address, timeout=2)
            break
        except OSError:
            if head.poll() is not None:
                pytest.fail("ray start --head exited early")
            time.sleep(1)
    else:
        pytest.fail("the Ray head's dashboard did not come up in 90 s")
    try:
        yield ray_bin, address, env
    finally:
        head.terminate()  # `ray start --block` drains and stops its processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_scores(ray_head, tmp_path):
    ray_bin, address, env = ray_head
    generate(str(tmp_path / "archive"), SynthConfig(studies=2, slices=4, size=32, seed=3, bad_files=1))
    init_bundle(str(tmp_path / "bundle"), "test_resnet", input_size=32)
    out = tmp_path / "out"
    command = [
        str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(ROOT / "jobs"), "--",
        "python", "score.py", str(tmp_path / "archive"), "--model", str(tmp_path / "bundle"),
        "--out", str(out), "--run-id", "submitted", "--no-progress",
    ]
    for _ in range(30):  # the dashboard answers before the node's job agent has registered
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=200)
        if "No available agent" not in result.stderr + result.stdout:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run submitted" in result.stdout and "succeeded" in result.stdout
    run = read_run(str(out), "submitted")
    assert run["status"] == "succeeded" and run["n_studies"] == 2
    # one bad file (a fault) and the generator's three CSVs (skipped by suffix)
    assert (run["n_rejected"], run["n_faults"], run["n_skipped"]) == (4, 1, 3)
