"""The output store fails: a full disk (issue 9, "Faults to survive").

``ichd-ray score`` runs as a subprocess with ``RLIMIT_FSIZE`` (and ``SIGXFSZ`` ignored, so a write past
the limit fails with ``EFBIG``, "File too large", instead of killing the process). Expected: a non-zero
exit with one clear line naming the output path, nothing visible through the views, no partial or
temporary file left that looks like a table part; then the same command without the limit succeeds and
commits exactly a clean run's output.

Where the limit applies. ``RLIMIT_FSIZE`` is per process and inherited: under it Ray's raylet cannot
even create its object store (an ``ftruncate`` of the shared-memory file past the limit), so a CLI that
starts its own local Ray under the limit never gets to write output. In production Ray's temp dir is its
own disk; here the job joins a one-node cluster (``RAY_ADDRESS``, as under ``ray job submit``) whose
daemons run without the limit, and the limit is put on the processes that write the job's output: the
CLI (the driver: ``errors`` part, the ``runs`` commit) through ``preexec_fn``, and the Ray workers that
write the ``slices``/``studies`` parts through a test-only ``sitecustomize`` on the cluster's
``PYTHONPATH`` (``fault_scripts/fsize_site``) that reads the limit from a file when a worker starts.
Ray's own files in those processes are kept under the limit: its logs rotate at a few KiB and Ray
Data logs to the console only (``fault_scripts/raydata_console_logging.yaml``).

Two places the disk fills up:

* ``parts``: the limit is below every ``slices`` part, for the driver and the workers: the first table
  part a worker writes fails.
* ``commit``: only the driver is limited, between the size of its ``errors`` part and the ``runs`` row:
  every table part is written, and the commit itself fails.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fault_scripts.proc_tree import kill_tagged, run_tagged, tagged_env
from fault_scripts.tables import assert_same_tables, committed_tables, run_row

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HERE = Path(__file__).parent / "fault_scripts"
CLI = Path(sys.executable).with_name("ichd-ray")
RUN_ID = "disk"
JOB_YAML = """\
score:
  device: cpu
  cpus_per_actor: 0.25
  cpus_per_decode_task: 0.5
  studies_per_task: 1
  studies_per_batch: 2
"""
#: Ray's own logs rotate well below any limit used here (RAY_ROTATION_MAX_BYTES applies to the C++
#: and Python logs of every Ray process); Ray Data logs to the console only.
RAY_LOG_ENV = {
    "RAY_ROTATION_MAX_BYTES": "1024",
    "RAY_ROTATION_BACKUP_COUNT": "1",
    "RAY_DATA_LOGGING_CONFIG": str(HERE / "raydata_console_logging.yaml"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from ichd_ray.models.bundle import init_bundle
    from ichd_ray.synthetic.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("disk")
    generate(str(root / "archive"), SynthConfig(studies=4, slices=6, size=64, seed=7, compressed_fraction=0.25, bad_files=2))
    init_bundle(str(root / "bundle"), "test_resnet", folds=1, input_size=32, seed=0)
    (root / "job.yaml").write_text(JOB_YAML)
    return {"root": root, "archive": root / "archive", "bundle": root / "bundle", "config": root / "job.yaml"}


@pytest.fixture(scope="module")
def cluster(inputs):
    """A one-node Ray (1 CPU, its own temp dir) whose workers take the limit in ``limit_file`` when they
    start (no file: no limit). Yields ``{"address", "limit_file"}``; everything it started is killed after."""
    temp_dir = tempfile.mkdtemp(prefix="ichd-dk-", dir="/tmp")  # short: Ray's socket paths must fit in 108 bytes
    limit_file = Path(temp_dir) / "fsize-limit"
    address_file = Path(temp_dir) / "address"
    env, tag = tagged_env({
        **RAY_LOG_ENV,
        "PYTHONPATH": os.pathsep.join([str(HERE / "fsize_site"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "ICHD_TEST_FSIZE_LIMIT_FILE": str(limit_file),
    })
    head = subprocess.Popen([sys.executable, str(HERE / "ray_head.py"), temp_dir, "1", str(address_file)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not address_file.exists():
            assert head.poll() is None, f"the Ray head exited {head.returncode}: {head.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the Ray head did not come up in 90 s"
            time.sleep(0.2)
        yield {"address": address_file.read_text(), "limit_file": limit_file}
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        kill_tagged(tag)
        head.stdout.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _limited(limit: int | None):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by SIGXFSZ
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def score_cli(inputs, cluster, out: Path, *, limit: int | None = None) -> subprocess.CompletedProcess:
    """The same command every time: ``ichd-ray score ARCHIVE --model BUNDLE --out OUT --run-id disk``."""
    args = [str(CLI), "score", str(inputs["archive"]), "--model", str(inputs["bundle"]), "--out", str(out),
            "--run-id", RUN_ID, "--config", str(inputs["config"]), "--device", "cpu", "--no-progress"]
    proc, _ = run_tagged(args, timeout=150, preexec_fn=_limited(limit),
                         extra_env={**RAY_LOG_ENV, "RAY_ADDRESS": cluster["address"]})
    return proc


@pytest.fixture(scope="module")
def clean(inputs, cluster) -> dict:
    """The reference: the command on a healthy disk."""
    cluster["limit_file"].unlink(missing_ok=True)
    out = inputs["root"] / "clean"
    t0 = time.perf_counter()
    proc = score_cli(inputs, cluster, out)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    sizes: dict[str, list[int]] = {}
    for p in out.rglob("*.parquet"):
        sizes.setdefault(p.relative_to(out).parts[0], []).append(p.stat().st_size)
    assert set(sizes) >= {"slices", "studies", "errors", "runs"}
    return {"out": out, "tables": committed_tables(str(out), RUN_ID), "run": run_row(str(out), RUN_ID), "sizes": sizes, "seconds": seconds}


def _one_line_error(stderr: str) -> str:
    """The CLI's own message: one line starting ``ichd-ray score:``, and no traceback of its own."""
    lines = [line for line in stderr.splitlines() if line.startswith("ichd-ray score:")]
    assert len(lines) == 1, f"expected one 'ichd-ray score:' line in stderr:\n{stderr[-5000:]}"
    assert f"{os.sep}ichd_ray{os.sep}cli.py" not in stderr, f"a traceback through the CLI:\n{stderr[-5000:]}"
    return lines[0]


def _nothing_visible(out: Path) -> None:
    import duckdb

    from ichd_ray.io.results import query

    assert not list(out.glob("runs/*/run.parquet")), "a run was committed"
    for table in ("runs", "slices", "studies", "errors"):
        try:
            n = query(str(out), f"SELECT count(*) AS n FROM {table}")["n"].iloc[0]
        except duckdb.IOException as exc:  # no run ever committed under OUT: the views find no runs object
            assert "No files found" in str(exc) and "/runs/" in str(exc), exc
            n = 0
        assert n == 0, f"{n} row(s) visible in {table}"
    # no temporary file left behind, no partial file that looks like a table part
    leftovers = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in leftovers if p.name.startswith(".") or not p.name.endswith(".parquet")], leftovers
    for part in leftovers:
        pq.read_metadata(part)  # every part there is whole (each was renamed into place complete)


@pytest.mark.parametrize("where", ["parts", "commit"])
def test_full_disk_fails_clearly_commits_nothing_and_the_next_run_succeeds(inputs, cluster, clean, where, capsys):
    out = inputs["root"] / f"out-{where}"
    sizes = clean["sizes"]
    if where == "parts":
        limit = min(sizes["slices"]) - 1  # no slices part fits; the (smaller) logs of Ray rotate below it
        cluster["limit_file"].write_text(str(limit))
    else:
        assert max(sizes["errors"]) < min(sizes["runs"]), sizes
        limit = (max(sizes["errors"]) + min(sizes["runs"])) // 2  # the driver's part fits, its commit does not
        cluster["limit_file"].unlink(missing_ok=True)
    t0 = time.perf_counter()
    failed = score_cli(inputs, cluster, out, limit=limit)
    failed_s = time.perf_counter() - t0
    cluster["limit_file"].unlink(missing_ok=True)
    (inputs["root"] / f"failed-{where}.stderr").write_text(failed.stderr)  # for a look after the test

    assert failed.returncode != 0, failed.stdout[-3000:]
    line = _one_line_error(failed.stderr)
    assert "File too large" in line or "EFBIG" in line, line
    _nothing_visible(out)

    t0 = time.perf_counter()
    again = score_cli(inputs, cluster, out)
    again_s = time.perf_counter() - t0
    assert again.returncode == 0, again.stderr[-4000:]
    assert_same_tables(committed_tables(str(out), RUN_ID), clean["tables"])
    assert run_row(str(out), RUN_ID) == clean["run"]
    # at rest one attempt per table: the failed run's parts are gone
    for table in ("slices", "studies", "errors"):
        assert len(list((out / table / f"run_id={RUN_ID}").iterdir())) == 1
    with capsys.disabled():
        print(f"\n[full disk: {where}] limit {limit} B; failed run exit {failed.returncode} in {failed_s:.1f} s, "
              f"stderr {len(failed.stderr.splitlines())} lines, message: {line}\n"
              f"[full disk: {where}] re-run without the limit: exit 0 in {again_s:.1f} s (clean run {clean['seconds']:.1f} s); "
              f"part sizes {sizes}")
    # Last, so that everything above is checked whatever the message looks like: it names what could not
    # be written, and nothing before it buries it in a traceback (Ray's, logged to the console, included).
    problems = []
    if str(out) not in line:
        problems.append(f"the message does not name the output path {out}: {line!r}")
    if "Traceback (most recent call last)" in failed.stderr:
        n = failed.stderr.count("Traceback (most recent call last)")
        problems.append(f"stderr holds {n} traceback(s) over {len(failed.stderr.splitlines())} lines before the message "
                        f"(see {inputs['root'] / f'failed-{where}.stderr'})")
    assert not problems, "\n".join(problems)
