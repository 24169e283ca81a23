"""Shared pytest fixtures: an in-process moto S3 server and fresh buckets on it; one local Ray per session;
faults injected from outside (a worker process SIGKILLed), never through hooks in production code."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

# Set before any ichd_ray import so PatientID hashing doesn't warn about the development salt.
os.environ.setdefault("ICHD_PATIENT_SALT", "test-salt")

from ichd_ray.io.storage import StorageConfig, boto3_client  # noqa: E402


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 endpoint and the config that reaches it."""

    endpoint_url: str
    config: StorageConfig


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 over HTTP on 127.0.0.1, for the whole session (real HTTP, so pyarrow's C++ client works)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint_url = f"http://127.0.0.1:{port}"
    config = StorageConfig(
        endpoint_url=endpoint_url,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    )
    try:
        yield S3Server(endpoint_url=endpoint_url, config=config)
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[tuple[str, StorageConfig]]:
    """A new empty bucket per test: ``(bucket_name, config)``."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    boto3_client(s3_server.config).create_bucket(Bucket=name)
    yield name, s3_server.config


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test run (2 CPUs). Workers get test credentials for the moto
    endpoint through the runtime env: task arguments never carry credentials. The patient salt is in
    this process's environment (set above), which local Ray's workers inherit, as a pod's would."""
    import ray

    from ichd_ray.pipeline.ray_session import NO_PREEMPTION_WATCHER

    if not ray.is_initialized():
        os.environ.setdefault(*NO_PREEMPTION_WATCHER)  # as init_ray does for a local Ray
        ray.init(
            address="local",  # never join a cluster a fault test or `ray start` left on this machine
            num_cpus=2,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            runtime_env={
                "env_vars": {
                    "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1",
                }
            },
        )
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray


@contextlib.contextmanager
def _kill_once(name: str, after_s: float = 0.5, when: Callable[[], bool] | None = None):
    """SIGKILL the first worker of this session's Ray whose command line names ``name``, ``after_s`` after
    it is found (and once ``when()`` holds); yields the list the killed pid is appended to."""
    import psutil
    import ray

    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    killed: list[int] = []
    stop = threading.Event()

    def hunt():
        while not stop.is_set() and not killed:
            if when is None or when():
                for proc in raylet.children(recursive=True):
                    try:
                        if name in " ".join(proc.cmdline()):
                            stop.wait(after_s)  # let it get going
                            proc.kill()
                            killed.append(proc.pid)
                            return
                    except psutil.Error:
                        continue
            stop.wait(0.05)

    thread = threading.Thread(target=hunt, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        stop.set()
        thread.join(5)


@pytest.fixture
def kill_worker(ray_session):
    """``with kill_worker("StudyScoringActor", after_s=0.5, when=None) as killed:`` SIGKILLs that Ray worker
    process once while the block runs (Ray's own recovery is what the test then checks)."""
    return _kill_once


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """8 synthetic studies of 8 slices at 64 px (and 2 bad files): what the training tests train on."""
    from ichd_ray.synthetic.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    generate(str(data), SynthConfig(studies=8, slices=8, size=64, seed=3, bad_files=2), workers=1)
    return root, data
