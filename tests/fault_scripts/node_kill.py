"""Kill a Ray worker node's raylet mid-run, on a 2-node cluster on this machine (issue 9, "A node dies").

Run by ``tests/test_fault_node.py`` as its own process (the test session's Ray stays untouched)::

    python tests/fault_scripts/node_kill.py score ROOT [decode|write]
    python tests/fault_scripts/node_kill.py train ROOT

The cluster is ``ray.cluster_utils.Cluster`` with its own temp dir (``$NODE_KILL_RAY_TMP``, else ``ROOT/ray``): a head and a worker
node, the driver connected to the head. The fault comes from here, never from a hook in the code under
test: the workload runs in a thread while the main thread watches the worker node and SIGKILLs its
raylet (its workers and agents then die with it, as on a lost machine) as soon as the node is doing the
work the scenario is about. What runs on the node is read from the process titles of the raylet's
children (``ray::MapBatches(decode_studies)``, ``ray::IDLE``, ...): no dashboard, no state API.

* ``score decode``: a warm-up run, a clean run (the reference), then a run during which the worker node dies
  while a decode task executes there. The head (1 CPU) holds the actor pool and a decode task, so the
  run finishes there: lost tasks are retried, lost blocks rebuilt from lineage.
* ``score write``: the head has no CPUs (as KubeRay heads usually run), so everything is on the worker
  node; it dies once the scored blocks are materialized and the first table is being written, and a
  replacement node joins (a lost machine comes back as a new one).
* ``train``: index, cache and one CNN per fold (``train_cnn_stage``); the Ray Train worker asks for 1.5
  CPUs, more than the head's 1, so it runs on the 2-CPU worker node, which dies once epoch 0's
  checkpoint is written; a replacement node joins and the fold resumes there.

Results (timings, what ran on the node when it died, outcomes) go to ``ROOT/<mode>.json``; the test
compares the tables. ``Cluster.add_node`` must run in the main thread (it sets signal handlers), hence
the workload thread.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("ICHD_PATIENT_SALT", "test-salt")

# GCS marks a dead raylet's node dead after missing health_check_failure_threshold checks (~15 s by
# default; a few seconds here), when the lost tasks and actors are rescheduled.
SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 500}
OBJECT_STORE = 100 * 1024 * 1024


def log(msg: str) -> None:
    print(f"[node_kill {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def children_titles(pid: int) -> list[str]:
    """Command lines of the live children of ``pid`` (a Ray worker's is its process title)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid or fields[0] in ("Z", "X"):
                continue
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                out.append(fh.read().replace(b"\0", b" ").decode(errors="replace").strip())
        except (OSError, ValueError, IndexError):
            continue
    return out


def raylet_pid(node) -> int:
    import ray._private.ray_constants as rc

    return node.all_processes[rc.PROCESS_TYPE_RAYLET][0].process.pid


class Workload(threading.Thread):
    """Runs ``fn()`` and keeps its result or exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error, self.tb = fn, None, None, ""
        self.started = self.finished = 0.0

    def run(self) -> None:
        self.started = time.perf_counter()
        try:
            self.result = self.fn()
        except BaseException as exc:  # reported, never swallowed
            self.error, self.tb = exc, traceback.format_exc()
        finally:
            self.finished = time.perf_counter()


def kill_node_when(cluster, node, workload: Workload, ready: Callable[[list[str]], bool], *, replace: dict | None,
                   timeout: float) -> dict:
    """Main thread: start ``workload``; SIGKILL ``node``'s raylet once ``ready(titles of its workers)``;
    reap what is left of the node; add a node with ``replace`` (add_node kwargs) when given; wait for the
    workload. Returns what happened."""
    pid = raylet_pid(node)
    seen: set[str] = set()
    info: dict[str, Any] = {"killed": False}
    workload.start()
    deadline = time.monotonic() + timeout
    while workload.is_alive():
        titles = [t for t in children_titles(pid) if t.startswith("ray::")]
        seen.update(titles)
        if ready(titles):
            os.kill(pid, signal.SIGKILL)
            killed_at = time.perf_counter()
            info.update(killed=True, kill_after_s=killed_at - workload.started,
                        running_on_node_at_kill=sorted(t for t in titles if t != "ray::IDLE"))
            log(f"SIGKILLed the worker node's raylet (pid {pid}); running there: {info['running_on_node_at_kill']}")
            cluster.remove_node(node, allow_graceful=False)  # reap the node's agents; its workers die with the raylet
            t = time.perf_counter()
            while alive_nodes() > len(cluster.worker_nodes) + 1 and time.perf_counter() - t < 60:
                time.sleep(0.1)
            info["node_marked_dead_s"] = time.perf_counter() - killed_at
            log(f"GCS marked the node dead after {info['node_marked_dead_s']:.1f} s")
            if replace is not None:
                t = time.perf_counter()
                add_worker(cluster, **replace)
                info["replacement_added_s"] = time.perf_counter() - killed_at
                log(f"replacement node up {info['replacement_added_s']:.1f} s after the kill")
            break
        if time.monotonic() > deadline:
            info["error"] = f"the worker node never reached the kill point in {timeout} s; seen there: {sorted(seen)}"
            break
        time.sleep(0.02)
    info["titles_seen_on_node"] = sorted(seen)
    workload.join()
    info["seconds"] = workload.finished - workload.started
    if info.get("killed"):
        info["after_kill_s"] = info["seconds"] - info["kill_after_s"]
    if workload.error is not None:
        info["exception"] = f"{type(workload.error).__name__}: {workload.error}"[:4000]
        info["traceback"] = workload.tb[-8000:]
        log(f"the workload raised: {info['exception'][:1000]}")
    return info


def start_cluster(root: Path, head_cpus: int):
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    # Ray's socket paths live under its temp dir and must stay under 108 bytes: the caller may give a short one.
    temp_dir = Path(os.environ.get("NODE_KILL_RAY_TMP") or root / "ray")
    temp_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "temp_dir": str(temp_dir),
            "include_dashboard": False,
            "object_store_memory": OBJECT_STORE,
            "_system_config": SYSTEM_CONFIG,
        },
    )
    # The driver joins the head before any other node exists, so it is never on the node that dies.
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    cluster.connected = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray.train", "ray.data", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return cluster


def add_worker(cluster, cpus: int, resources: dict | None = None):
    node = cluster.add_node(num_cpus=cpus, resources=resources or {}, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    return node


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def actor_restarts() -> dict[str, int]:
    """Restarts GCS recorded, per actor class (Ray Data's pool actors are restartable)."""
    import ray

    out: dict[str, int] = {}
    for info in ray._private.state.actors().values():
        name = info.get("ActorClassName", "?")
        out[name] = out.get(name, 0) + int(info.get("NumRestarts", 0))
    return out


def shutdown(cluster) -> None:
    import ray

    try:
        ray.shutdown()
    finally:
        cluster.shutdown()


# ------------------------------------------------------------------------------------------ score


def score_inputs(root: Path) -> tuple[str, str]:
    from ichd_ray.models.bundle import init_bundle
    from ichd_ray.synthetic.generate import SynthConfig, generate

    data, bundle = root / "archive", root / "bundle"
    if not (data / "labels.csv").exists():
        generate(str(data), SynthConfig(studies=6, slices=6, size=64, seed=21, compressed_fraction=0.25, bad_files=2))
    if not (bundle / "config.json").exists():
        init_bundle(str(bundle), "test_resnet", folds=2, input_size=32, seed=0)
    return str(data), str(bundle)


def attempt_written(out: Path, table: str = "slices") -> bool:
    """Ray has started writing ``table``'s part files of the (uncommitted) attempt under ``out``."""
    return any((out / table).glob("run_id=*/attempt=*/*"))


def run_score(root: Path, variant: str) -> dict:
    from ichd_ray.config.job import JobConfig, ScoreConfig
    from ichd_ray.pipeline.score import score_job

    assert variant in ("decode", "write"), variant
    data, bundle = score_inputs(root)
    # One actor (1/4 CPU) and decode tasks of 1/2 CPU, one study each: both fit on a 1-CPU node alone,
    # so the run can go on on what is left (the fail-fast pool check runs at the start only).
    job = JobConfig(score=ScoreConfig(num_actors=1, cpus_per_actor=0.25, cpus_per_decode_task=0.5, studies_per_batch=1,
                                      studies_per_task=1, cnn_chunk=8, device="cpu"))
    cluster = start_cluster(root, head_cpus=1 if variant == "decode" else 0)
    result: dict = {"mode": "score", "variant": variant}
    try:
        worker = add_worker(cluster, cpus=1)
        result["nodes_before"] = alive_nodes()

        # A warm-up run first, so that the clean and the faulted run both find the workers started and
        # the model loaded (the first run of a job pays ~15 s of process start-up and imports).
        t0 = time.perf_counter()
        score_job(data, bundle, str(root / "out_warmup"), job=job, run_id="warmup")
        result["warmup_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        clean = score_job(data, bundle, str(root / "out_clean"), job=job, run_id="clean")
        result["clean"] = {"seconds": time.perf_counter() - t0, "status": clean.status, "n_slices": clean.n_slices_scored}
        log(f"clean run: {clean.status} in {result['clean']['seconds']:.1f} s")
        restarts_before = actor_restarts()

        out_fault = root / "out_fault"
        if variant == "decode":
            def ready(titles):
                return any("decode_studies" in t for t in titles)
        else:
            def ready(titles):
                return attempt_written(out_fault)
        workload = Workload(lambda: score_job(data, bundle, str(out_fault), job=job, run_id="fault"))
        info = kill_node_when(cluster, worker, workload, ready, replace={"cpus": 1} if variant == "write" else None, timeout=120)
        restarts_after = actor_restarts()
        info["actor_restarts"] = {k: v - restarts_before.get(k, 0) for k, v in restarts_after.items() if v - restarts_before.get(k, 0)}
        if workload.result is not None:
            s = workload.result
            info.update(status=s.status, n_slices=s.n_slices_scored, problems=s.problems)
        result["fault"] = info
        result["nodes_after"] = alive_nodes()
        log(f"faulted run: {info.get('status', 'raised')} in {info['seconds']:.1f} s; nodes alive after: {result['nodes_after']}")
    finally:
        shutdown(cluster)
    return result


# ------------------------------------------------------------------------------------------ train


TRAIN_TINY = {
    "data": {"folds": 2, "input_size": 32, "studies_per_task": 4},
    # 2 epochs: the node dies after epoch 0's checkpoint, epoch 1 runs on the replacement node (each epoch
    # here is ~30-60 s of Ray Data start-up on a cold node with 2 shared cores: a third only cost time).
    # cpus_per_worker 1.5 > the head's 1 CPU: the train worker can only run on a 2-CPU worker node.
    "cnn": {"backbone": "test_resnet", "epochs": 2, "samples_per_study": 8, "batch_size": 8, "torch_threads": 1,
            "cpus_per_worker": 1.5, "cpus_per_data_task": 0.25, "max_failures": 2},
}


def checkpoint_folders(work: Path) -> list[Path]:
    """Complete Ray Train checkpoint folders under WORK (a folder holds state.json once it is whole)."""
    base = work / "ray_train"
    return sorted(p.parent for p in base.rglob("checkpoint_*/state.json")) if base.exists() else []


def run_train(root: Path) -> dict:
    import yaml

    from ichd_ray.synthetic.generate import SynthConfig, generate
    from ichd_ray.training.recipe import train_cnn_stage
    from ichd_ray.io.config_files import load_train_config

    data = root / "data"
    if not (data / "labels.csv").exists():
        generate(str(data), SynthConfig(studies=8, slices=8, size=64, seed=3), workers=1)
    (root / "train.yaml").write_text(yaml.safe_dump(TRAIN_TINY))
    cfg = load_train_config("demo", str(root / "train.yaml"))
    work = root / "work"
    cluster = start_cluster(root, head_cpus=1)
    result: dict = {"mode": "train"}
    try:
        worker = add_worker(cluster, cpus=2)
        result["nodes_before"] = alive_nodes()

        def ready(titles) -> bool:  # epoch 0 checkpointed, the train worker busy on the node
            return bool(checkpoint_folders(work)) and any(t != "ray::IDLE" and "Agent" not in t for t in titles)

        workload = Workload(lambda: train_cnn_stage(str(data), str(data / "labels.csv"), str(work), cfg, log=log))
        info = kill_node_when(cluster, worker, workload, ready, replace={"cpus": 2}, timeout=240)
        if workload.result is not None:
            info["folds"] = [{"history": f["history"], "weights_uri": f["weights_uri"], "seconds": f.get("seconds")}
                             for f in workload.result["folds"]]
        info["checkpoints"] = [str(p.relative_to(work)) for p in checkpoint_folders(work)]
        result["train"] = info
        result["nodes_after"] = alive_nodes()
        log(f"training: {'raised' if workload.error else 'finished'} in {info['seconds']:.1f} s")
    finally:
        shutdown(cluster)
    return result


def main() -> int:
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("NODE_KILL_DUMP_AFTER_S", "600")), exit=False)
    mode, root = sys.argv[1], Path(sys.argv[2])
    root.mkdir(parents=True, exist_ok=True)
    result = run_score(root, sys.argv[3] if len(sys.argv) > 3 else "decode") if mode == "score" else run_train(root)
    (root / f"{mode}.json").write_text(json.dumps(result, indent=1, default=str))
    log(f"result: {root / f'{mode}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
