"""ichd_ray.pipeline.ray_session: a local Ray of its own (never a cluster left running), sized as asked,
and without Ray Train's preemption watcher (the one node of a local Ray is never drained)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(180)

SCRIPT = """
import json, os, ray
from ichd_ray.config.job import RaySection
from ichd_ray.pipeline.ray_session import init_ray
init_ray(RaySection(num_cpus=1))
init_ray(RaySection(num_cpus=2))  # already running: a no-op
print(json.dumps({"cpus": ray.cluster_resources().get("CPU"), "watcher": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}))
"""


def test_a_local_ray_is_sized_as_asked_and_started_once():
    # its own process: the test session's Ray is already running (one ray.init per session)
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"cpus": 1.0, "watcher": "0"}
