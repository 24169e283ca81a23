"""Run a fault script as a subprocess whose whole process tree can be found and SIGKILLed afterwards.

Ray's daemons and workers leave the process group, so the tree is found by a tag in the environment
(every process the script starts inherits it), never by a name: other Ray clusters on this machine
are not touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence

TAG_VAR = "ICHD_FAULT_TEST_TAG"


def tagged_processes(tag: str) -> list[int]:
    """Live (not zombie) processes whose environment carries ``tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
            with open(f"/proc/{name}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def kill_tagged(tag: str) -> int:
    """SIGKILL every process carrying ``tag`` until none is left; returns how many were killed."""
    killed = 0
    for _ in range(100):
        pids = tagged_processes(tag)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes of the fault test still alive: {tagged_processes(tag)}")


def tagged_env(extra: dict[str, str] | None = None, tag: str | None = None) -> tuple[dict[str, str], str]:
    """This process's environment without ``RAY_*`` (no stray cluster address), plus ``extra`` and a tag."""
    tag = tag or uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({TAG_VAR: tag, "PYTHONUNBUFFERED": "1"})
    env.setdefault("ICHD_PATIENT_SALT", "test-salt")
    env.update(extra or {})
    return env, tag


def run_tagged(args: Sequence[str], *, timeout: float, extra_env: dict[str, str] | None = None,
               preexec_fn=None) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``args`` to completion (or ``timeout``), then kill whatever it left running.

    Returns the completed process (stdout and stderr captured as text; returncode -9 on a timeout)
    and the number of leftover processes that had to be killed."""
    full_env, tag = tagged_env(extra_env)
    proc = subprocess.Popen(list(args), env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec_fn)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[run_tagged] killed after {timeout} s"
    finally:
        leftovers = kill_tagged(tag)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), leftovers
