"""Security regressions (issue 9, "Security").

1. No pickle from storage is ever unpickled: a bundle or a training checkpoint whose weights were
   replaced by a pickle that runs code when loaded is refused, and the code never runs (a marker file
   it would write stays absent), also when the attacker fixed the sha256 in ``config.json``.
2. The patient salt never travels through Ray: not in a remote function's definition (closures are
   pickled into the GCS function table), not in task arguments, not in ``runtime_env``. Workers read
   it from their own environment (a pod secret) and hash PatientIDs where the headers are read.
3. No PHI (PatientName, PatientID, birth date, AccessionNumber, other identifying headers) in any
   output table, CLI output or Ray session log, and no credential or salt value in any of them: marker
   values are written into every header and the S3 secret, ``score`` and ``nightly`` run as CLI
   subprocesses with their own Ray temp dir, and everything they leave is grepped (``slow``); and in
   process on the shared Ray, where also nothing handed to Ray (task arguments, ray.put objects,
   function and actor definitions, runtime envs) may carry the driver's credentials or salt.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest
import torch

from ichd_ray.io import storage
from ichd_ray.models.bundle import BundleError, cnn_filename, init_bundle, load_bundle, load_bundle_config, seq_filename

BACKBONE = "test_resnet"
SIZE = 32

# ---------------------------------------------------------------------------------------------
# 1. Pickles on storage are never unpickled
# ---------------------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this runs code: it writes ``marker`` (in any process: only builtins are referenced)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _pickle_payload(kind: str, marker: Path) -> bytes:
    if kind == "torch_save":  # what a `torch.save(...)` checkpoint file looks like (zip + data.pkl)
        buf = io.BytesIO()
        torch.save({"state_dict": _Exploit(marker)}, buf)
        return buf.getvalue()
    return pickle.dumps(_Exploit(marker), protocol=2)  # a raw pickle (the legacy .bin/.pt format)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail loudly if anything in the code under test calls the usual unpickling entry points."""

    # Imported first: a module imported while the patch is on could bind the patched function for good
    # (ray.cloudpickle does `from pickle import loads`), and break every later Ray test of the session.
    import ray.train  # noqa: F401
    import safetensors.torch  # noqa: F401

    import ichd_ray.training.checkpoint  # noqa: F401

    def refuse(*args, **kwargs):
        raise AssertionError("the code under test tried to unpickle data")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_the_payload_is_live(tmp_path, kind):
    """The payload the other tests plant really runs code when unpickled (so their asserts mean something)."""
    marker = tmp_path / "pwned"
    data = _pickle_payload(kind, marker)
    if kind == "torch_save":
        torch.load(io.BytesIO(data), weights_only=False)
    else:
        pickle.loads(data)
    assert marker.read_text() == "pwned"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plant(uri: str, name: str, payload: bytes, config, *, forge_hash: bool) -> None:
    storage.write_bytes(storage.join(uri, name), payload, config)
    if forge_hash:  # the attacker can also write config.json: the sha256 check passes
        config_uri = storage.join(uri, "config.json")
        data = json.loads(storage.read_bytes(config_uri, config))
        data["weights"][name] = _sha256(payload)
        storage.write_bytes(config_uri, json.dumps(data).encode(), config)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
@pytest.mark.parametrize("forge_hash", [False, True], ids=["hash_kept", "hash_forged"])
def test_bundle_with_pickled_weights_is_refused_unread(request, tmp_path, where, kind, forge_hash, no_unpickling):
    if where == "s3":
        bucket, config = request.getfixturevalue("s3_bucket")
        uri = f"s3://{bucket}/bundles/evil"
    else:
        config, uri = None, str(tmp_path / "bundle")
    init_bundle(uri, BACKBONE, folds=2, input_size=SIZE, seed=0, storage_config=config)
    marker = tmp_path / "pwned"
    name = cnn_filename(1) if kind == "torch_save" else seq_filename(0)  # a CNN and a sequence model
    _plant(uri, name, _pickle_payload(kind, marker), config, forge_hash=forge_hash)

    # The cheap driver-side read only parses config.json: it accepts the (forged) config, runs nothing.
    loaded_config, _ = load_bundle_config(uri, config)
    assert name in loaded_config.weights
    assert not marker.exists()

    expected = f"weights file {name} is not valid safetensors" if forge_hash else f"weights file {name} has sha256 .* \\(corrupt or replaced file\\)"
    with pytest.raises(BundleError, match=expected):
        load_bundle(uri, config)
    assert not marker.exists(), "the pickle in the bundle was unpickled"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_bundle_config_that_is_a_pickle_is_refused_unread(tmp_path, kind, no_unpickling):
    uri = str(tmp_path / "bundle")
    init_bundle(uri, BACKBONE, folds=1, input_size=SIZE, seed=0)
    marker = tmp_path / "pwned"
    (tmp_path / "bundle" / "config.json").write_bytes(_pickle_payload(kind, marker))
    with pytest.raises(BundleError, match="config.json is not valid JSON"):
        load_bundle_config(uri)
    with pytest.raises(BundleError, match="config.json is not valid JSON"):
        load_bundle(uri)
    assert not marker.exists()


def _train_state(directory: Path):
    from ichd_ray.training.checkpoint import save_train_state
    from ichd_ray.models.slice_cnn import SliceCNN

    torch.manual_seed(0)
    model = SliceCNN(BACKBONE, 6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8))[1].sum().backward()
    optimizer.step()  # so the optimizer state has tensors too
    directory.mkdir(parents=True, exist_ok=True)
    save_train_state(str(directory), model, optimizer, {"epoch": 0, "history": []})
    return model, optimizer


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
@pytest.mark.parametrize("target", ["model.safetensors", "optimizer.safetensors"])
def test_training_checkpoint_with_pickled_tensors_is_refused_unread(tmp_path, kind, target, no_unpickling):
    from ichd_ray.training.checkpoint import load_train_state

    folder = tmp_path / "ckpt"
    model, optimizer = _train_state(folder)
    load_train_state(str(folder), model, optimizer)  # the genuine checkpoint loads
    marker = tmp_path / "pwned"
    (folder / target).write_bytes(_pickle_payload(kind, marker))
    with pytest.raises(Exception, match="(?i)safetensor|header"):
        load_train_state(str(folder), model, optimizer)
    assert not marker.exists(), "the pickle in the checkpoint was unpickled"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_training_checkpoint_restored_from_storage_is_refused_unread(tmp_path, monkeypatch, kind, no_unpickling):
    """The resume path that reads a Ray Train run's checkpoints from storage (``restore_train_state``)."""
    import ray.train

    from ichd_ray.training.checkpoint import restore_train_state

    run = tmp_path / "ray_train" / "cnn-fold0"
    model, optimizer = _train_state(run / "checkpoint_000000")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)  # no Ray Train checkpoint: look on storage
    assert restore_train_state(model, optimizer, str(run), None)["epoch"] == 0
    marker = tmp_path / "pwned"
    (run / "checkpoint_000000" / "model.safetensors").write_bytes(_pickle_payload(kind, marker))
    with pytest.raises(Exception, match="(?i)safetensor|header"):
        restore_train_state(model, optimizer, str(run), None)
    assert not marker.exists(), "the pickle in the stored checkpoint was unpickled"


# ---------------------------------------------------------------------------------------------
# Markers: PHI in every identifying header, credentials and the patient salt
# ---------------------------------------------------------------------------------------------

PHI = "ZQXPHI"  # prefix of every PHI marker value (case-insensitive search)
BIRTH_DATE = "18670304"  # a DA value: markers must be valid values, else pydicom's warnings would echo them
PHI_HEADERS = {
    "PatientName": f"{PHI}^PATIENT^NAME",
    "PatientBirthDate": BIRTH_DATE,
    "AccessionNumber": f"{PHI}ACC0001",
    "OtherPatientIDs": f"{PHI}-OTHER-PID",
    "InstitutionName": f"{PHI} General Hospital",
    "ReferringPhysicianName": f"{PHI}^REFERRING^DOCTOR",
}  # PatientID: f"{PHI}-PID-<synthetic id>", one per patient
SALT = "ZQXSALT-6d1f0c93-pod-secret"
SECRET_KEY = "ZQXSECRETKEY-do-not-log-4b1e"
SESSION_TOKEN = "ZQXSESSIONTOKEN-do-not-log-77aa"
KEY_ID = "ZQXKEYID0042"
FORBIDDEN = (PHI, BIRTH_DATE, "1867-03-04", SALT, SECRET_KEY, SESSION_TOKEN, KEY_ID)


def _leaks(text: str, forbidden: Iterable[str] = FORBIDDEN) -> list[str]:
    low = text.lower()
    return [m for m in forbidden if m.lower() in low]


def _patient_id(synthetic_id: str) -> str:
    return f"{PHI}-PID-{synthetic_id}"


def _expected_hash(patient_id: str, salt: str) -> str:
    return hmac.new(salt.encode(), patient_id.encode(), hashlib.sha256).hexdigest()[:32]


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def _mark(ds) -> None:
    ds.PatientID = _patient_id(str(ds.PatientID))
    for keyword, value in PHI_HEADERS.items():
        setattr(ds, keyword, value)


def _dcm_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _phi_archive(root: Path) -> dict[str, Any]:
    """Two synthetic studies (4 slices, 32 px) with markers in every identifying header, plus bad
    objects made from marked slices (each produces an error message), written to ``root``.

    Returns ``{"patients": {sop_uid: PatientID}, "bad": [relative paths]}``.
    """
    import warnings

    import pydicom

    from ichd_ray.synthetic.generate import SynthConfig, generate

    generate(str(root), SynthConfig(studies=2, slices=4, size=32, seed=5, compressed_fraction=0.0))
    patients: dict[str, str] = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        _mark(ds)
        patients[str(ds.SOPInstanceUID)] = str(ds.PatientID)
        path.write_bytes(_dcm_bytes(ds))

    first = sorted(root.rglob("*.dcm"))[0]
    folder = first.parent
    template = first.read_bytes()
    bad: list[str] = []

    def variant(name: str, change) -> None:
        ds = pydicom.dcmread(io.BytesIO(template))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the deliberately invalid values
            change(ds)
            (folder / name).write_bytes(_dcm_bytes(ds))
        bad.append(name)

    def localizer(ds):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    def mr(ds):
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage

    def pixel_size(ds):
        ds.Rows = ds.Rows * 2

    def garbled_intercept(ds):
        ds.RescaleIntercept = "-1024"  # patched to "-10x4" in the encoded bytes below (pydicom won't set it)

    def no_intercept(ds):
        del ds.RescaleIntercept

    def corrupt_rle(ds):  # a valid header whose RLE pixel data is garbage: the header reads, decoding fails
        from pydicom.encaps import encapsulate

        ds.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
        ds.PixelData = encapsulate([b"\x07" * 96])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True

    def patch_intercept(path: Path) -> None:
        data = path.read_bytes()
        tag = data.index(b"\x28\x00\x52\x10DS")  # (0028,1052) RescaleIntercept, explicit VR little endian
        length = int.from_bytes(data[tag + 6 : tag + 8], "little")
        value = b"-10x4".ljust(length, b" ")
        path.write_bytes(data[: tag + 8] + value + data[tag + 8 + length :])

    for name, change in [
        ("bad-localizer.dcm", localizer),
        ("bad-mr.dcm", mr),
        ("bad-pixel-size.dcm", pixel_size),
        ("bad-intercept.dcm", garbled_intercept),
        ("bad-no-intercept.dcm", no_intercept),
        ("bad-rle.dcm", corrupt_rle),
    ]:
        variant(name, change)
    patch_intercept(folder / "bad-intercept.dcm")
    (folder / "bad-truncated.dcm").write_bytes(template[: len(template) * 2 // 3])
    (folder / "bad-empty.dcm").write_bytes(b"")
    (folder / "bad-text.dcm").write_bytes(b"not a DICOM file\n")
    shutil.copy(first, folder / "zz-duplicate.dcm")
    bad += ["bad-truncated.dcm", "bad-empty.dcm", "bad-text.dcm", "zz-duplicate.dcm"]
    return {"patients": patients, "bad": bad}


# ---------------------------------------------------------------------------------------------
# 2. The patient salt never travels through Ray (in-process, on the shared local Ray)
# ---------------------------------------------------------------------------------------------


class _RayTraffic:
    """What this driver hands to Ray: serialized task arguments and ray.put objects, task options and
    runtime envs; plus the GCS function table (pickled remote function and actor class definitions)."""

    def __init__(self, monkeypatch) -> None:
        import ray.actor
        import ray.remote_function
        from ray._private import serialization

        self.blobs: list[bytes] = []
        self.options: list[str] = []
        serialize = serialization.SerializationContext.serialize

        def recording_serialize(ctx, value):
            out = serialize(ctx, value)
            self.blobs.append(value if isinstance(value, bytes) else out.to_bytes())
            return out

        monkeypatch.setattr(serialization.SerializationContext, "serialize", recording_serialize)
        for cls in (ray.remote_function.RemoteFunction, ray.actor.ActorClass):
            original = cls._remote

            def recording_remote(obj, *args, _original=original, **kwargs):
                self.options.append(repr({k: v for k, v in kwargs.items() if k not in ("args", "kwargs")}))
                return _original(obj, *args, **kwargs)

            monkeypatch.setattr(cls, "_remote", recording_remote)

    @staticmethod
    def function_table() -> list[bytes]:
        from ray.experimental import internal_kv

        keys = internal_kv._internal_kv_list(b"", namespace=b"fun")
        return [internal_kv._internal_kv_get(k, namespace=b"fun") or b"" for k in keys]

    def holders(self, secret: str) -> list[str]:
        import ray

        needle = secret.encode()
        found = []
        if any(needle in blob for blob in self.function_table()):
            found.append("a remote function or actor definition (closure) in the GCS function table")
        if any(needle in blob for blob in self.blobs):
            found.append("a task argument or ray.put object")
        if any(secret in text for text in self.options):
            found.append("task options / runtime_env of a task")
        if secret in json.dumps(ray.get_runtime_context().runtime_env, default=str):
            found.append("the job's runtime_env")
        return found


def _worker_env(ray, name: str) -> str | None:
    @ray.remote(num_cpus=0.1)
    def read_env(key):
        return os.environ.get(key)

    return ray.get(read_env.remote(name), timeout=60)


@pytest.mark.timeout(300)
def test_patient_salt_never_travels_through_ray(ray_session, tmp_path, monkeypatch):
    ray = ray_session
    from ichd_ray.config.job import JobConfig
    from ichd_ray.dicom.read import _DEV_SALT
    from ichd_ray.pipeline.index import build_manifest
    from ichd_ray.pipeline.nightly import make_plan

    archive = tmp_path / "archive"
    patients = _phi_archive(archive)["patients"]
    bundle = str(tmp_path / "bundle")
    init_bundle(bundle, BACKBONE, input_size=SIZE, seed=0)
    job = JobConfig().with_overrides({"score": {"device": "cpu"}})
    # The workers' own salt: what the nodes' environment (a pod secret) gives them.
    worker_salt = _worker_env(ray, "ICHD_PATIENT_SALT") or _DEV_SALT
    assert worker_salt != SALT

    traffic = _RayTraffic(monkeypatch)
    # Controls: the recorder does see a value captured in a closure, and one passed as an argument.
    closure_marker, arg_marker = "ZQXCONTROL-closure-91f2", "ZQXCONTROL-argument-5c07"

    @ray.remote(num_cpus=0.1)
    def control(value):
        return closure_marker + value

    assert ray.get(control.remote(arg_marker), timeout=60) == closure_marker + arg_marker
    assert traffic.holders(closure_marker) and traffic.holders(arg_marker), "the recorder misses what Ray pickles"

    # The driver's environment holds a salt the workers do not have: none of it may reach them.
    monkeypatch.setenv("ICHD_PATIENT_SALT", SALT)
    manifest = build_manifest(str(archive), job.index)
    plan = make_plan(str(archive), bundle, str(tmp_path / "out"), job=job)
    assert traffic.blobs, "build_manifest and make_plan submitted no task arguments?"

    holders = traffic.holders(SALT)
    assert not holders, f"the driver's ICHD_PATIENT_SALT reached Ray through: {'; '.join(holders)}"

    # PatientIDs are hashed where they are read (in the workers), with the workers' own salt.
    for table in (manifest, plan.index.to_pandas()):
        rows = table[table["sop_uid"].isin(list(patients))]
        assert len(rows) >= len(patients)
        for sop, patient_hash in zip(rows["sop_uid"], rows["patient_hash"]):
            assert patient_hash == _expected_hash(patients[sop], worker_salt), "hashed with the driver's salt, not the worker's"
    session_logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for path in session_logs.rglob("*"):
        if path.is_file():
            assert SALT.encode() not in path.read_bytes(), f"the salt is in Ray's log {path.name}"


@pytest.mark.timeout(120)
def test_workers_get_the_salt_from_their_environment_not_runtime_env(ray_session):
    """The issue forbids the salt in ``runtime_env``: a local Ray's workers inherit the driver's
    environment, a cluster's get it from the pod secret. Neither needs the job's runtime_env."""
    ray = ray_session
    env_vars = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    assert "ICHD_PATIENT_SALT" not in env_vars, "ICHD_PATIENT_SALT is shipped in the job's runtime_env"
    assert _worker_env(ray, "ICHD_PATIENT_SALT"), "the workers have no ICHD_PATIENT_SALT in their environment"


# ---------------------------------------------------------------------------------------------
# 3. No PHI, credential or salt in outputs, CLI output or Ray's logs (CLI subprocesses on moto S3)
# ---------------------------------------------------------------------------------------------

JOB_YAML = """\
score: {device: cpu, num_actors: 1, cpus_per_actor: 0.5, cpus_per_decode_task: 0.5, studies_per_batch: 2, studies_per_task: 1, cnn_chunk: 4}
ray: {num_cpus: 2}
"""


@pytest.fixture(scope="module")
def phi_world(s3_server, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A marked archive on the moto endpoint, uploaded with marker credentials; a local bundle; the
    environment the CLI subprocesses get (marker secret, token and salt; their own Ray temp dir)."""
    from ichd_ray.io.storage import StorageConfig, boto3_client

    root = tmp_path_factory.mktemp("phi")
    info = _phi_archive(root / "archive")
    marked = StorageConfig(
        endpoint_url=s3_server.endpoint_url, region="us-east-1",
        access_key_id=KEY_ID, secret_access_key=SECRET_KEY, session_token=SESSION_TOKEN,
    )
    bucket = "phi-" + hashlib.sha256(str(root).encode()).hexdigest()[:8]
    boto3_client(marked).create_bucket(Bucket=bucket)
    for path in sorted((root / "archive").rglob("*")):
        if path.is_file():
            rel = path.relative_to(root / "archive").as_posix()
            storage.write_bytes(f"s3://{bucket}/archive/{rel}", path.read_bytes(), marked)
    bundle = str(root / "bundle")
    init_bundle(bundle, BACKBONE, folds=2, input_size=SIZE, seed=0)
    (root / "job.yaml").write_text(JOB_YAML)
    # AF_UNIX socket paths must stay short: Ray's session dir goes under a short /tmp folder.
    ray_tmp = tempfile.mkdtemp(prefix="rsec", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "ICHD_"))}
    env.update(
        AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_SESSION_TOKEN=SESSION_TOKEN,
        AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=s3_server.endpoint_url,
        ICHD_PATIENT_SALT=SALT, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1",
    )
    try:
        yield {
            "bucket": bucket, "config": marked, "bundle": bundle, "job": str(root / "job.yaml"), "env": env,
            "ray_tmp": Path(ray_tmp), "patients": info["patients"], "bad": info["bad"],
            "endpoint": s3_server.endpoint_url,
        }
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _cli(world: dict[str, Any], *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ichd-ray")
    cmd = [str(exe), *args, "--config", world["job"], "--no-progress", "--endpoint-url", world["endpoint"], "--region", "us-east-1"]
    return subprocess.run(cmd, env=world["env"], capture_output=True, text=True, timeout=timeout)


def _objects(world: dict[str, Any], prefix: str) -> dict[str, bytes]:
    uri = f"s3://{world['bucket']}/{prefix}"
    return {e.uri: storage.read_bytes(e.uri, world["config"]) for e in storage.list_files(uri, config=world["config"])}


def _parquet_text(data: bytes) -> str:
    """Every value of every column, as text, plus the schema and its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(data))
    parts = [str(table.schema), repr(table.schema.metadata)]
    parts += [repr(table.column(name).to_pylist()) for name in table.column_names]
    return "\n".join(parts)


def _scan_outputs(objects: dict[str, bytes]) -> dict[str, list[str]]:
    found = {}
    for uri, data in objects.items():
        text = data.decode("latin-1")
        if uri.endswith(".parquet"):
            text += "\n" + _parquet_text(data)
        hits = _leaks(text)
        if hits:
            found[uri] = hits
    return found


def _ray_logs(ray_tmp: Path) -> list[Path]:
    sessions = [p for p in (ray_tmp / "ray").glob("session_*") if p.is_dir() and not p.is_symlink()]
    return [p for s in sessions for p in (s / "logs").rglob("*") if p.is_file()]


def _scan_logs(ray_tmp: Path) -> dict[str, list[str]]:
    found = {}
    for path in _ray_logs(ray_tmp):
        hits = _leaks(path.read_bytes().decode("latin-1"))
        if hits:
            found[str(path.relative_to(ray_tmp))] = hits
    return found


def _errors_table(objects: dict[str, bytes]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(pa.BufferReader(d)) for u, d in objects.items() if "/errors/" in u and u.endswith(".parquet")]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _assert_clean(world, name: str, proc: subprocess.CompletedProcess, prefix: str) -> dict[str, bytes]:
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    objects = _objects(world, prefix)
    assert any("/studies/" in u for u in objects) and any("/runs/" in u for u in objects), sorted(objects)
    errors = _errors_table(objects)
    assert errors is not None, "no errors table"
    rejected = {uri.rsplit("/", 1)[-1] for uri in errors.column("uri").to_pylist()}
    assert set(world["bad"]) <= rejected, f"bad objects without an error row: {sorted(set(world['bad']) - rejected)}"
    assert all(errors.column("message").to_pylist()), "an error row without a message"

    assert not _leaks(proc.stdout), f"{name} stdout leaks {_leaks(proc.stdout)}"
    assert not _leaks(proc.stderr), f"{name} stderr leaks {_leaks(proc.stderr)}"
    leaks = _scan_outputs(objects)
    assert not leaks, f"{name}: output objects leak markers: {leaks}"
    logs = _ray_logs(world["ray_tmp"])
    assert any(p.name.startswith("worker-") for p in logs), "no Ray worker log found: is RAY_TMPDIR honoured?"
    leaks = _scan_logs(world["ray_tmp"])
    assert not leaks, f"{name}: Ray session logs leak markers: {leaks}"
    reasons = sorted(set(errors.column("reason").to_pylist()))
    print(f"{name}: {len(objects)} output objects, {errors.num_rows} error rows {reasons}, "
          f"{len(logs)} Ray log files ({sum(p.stat().st_size for p in logs) / 1e6:.1f} MB) grepped")
    return objects


@pytest.mark.slow  # two CLI runs, each starting its own Ray: 65-160 s on 2 shared CPUs
@pytest.mark.timeout(900)
def test_score_and_nightly_leak_no_phi_credentials_or_salt(phi_world):
    world = phi_world
    bucket = world["bucket"]
    # Control: the grep finds the markers where they are (the archive's headers).
    archive_hits = set(h for hits in _scan_outputs(_objects(world, "archive")).values() for h in hits)
    assert {PHI, BIRTH_DATE} <= archive_hits
    started = time.perf_counter()
    score = _cli(world, "score", f"s3://{bucket}/archive", "--model", world["bundle"], "--out", f"s3://{bucket}/score-out")
    score_s = time.perf_counter() - started
    _assert_clean(world, "score", score, "score-out")

    started = time.perf_counter()
    night = _cli(
        world, "nightly", "--archive", f"s3://{bucket}/archive", "--model", world["bundle"],
        "--out", f"s3://{bucket}/nightly-out", "--max-reject-fraction", "0.95",
    )
    nightly_s = time.perf_counter() - started
    objects = _assert_clean(world, "nightly", night, "nightly-out")
    print(f"score CLI {score_s:.0f} s, nightly CLI {nightly_s:.0f} s")

    # PatientID reaches the outputs only as the HMAC under the nodes' salt.
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = [pq.read_table(pa.BufferReader(d)).to_pandas() for u, d in objects.items() if "/index/" in u and u.endswith(".parquet")]
    assert index, sorted(objects)
    rows = pd_concat(index)
    rows = rows[rows["sop_uid"].isin(list(world["patients"]))]
    assert len(rows) >= len(world["patients"])
    for sop, patient_hash in zip(rows["sop_uid"], rows["patient_hash"]):
        assert patient_hash == _expected_hash(world["patients"][sop], SALT)



@pytest.mark.timeout(300)
def test_score_and_nightly_in_process_send_no_secret_to_ray(ray_session, s3_server, tmp_path, monkeypatch, capsys):
    """The fast companion of the CLI test (it runs in ``make test``): the driver holds marker
    credentials and a marker salt; nothing Ray is handed (task arguments, ray.put objects, function
    and actor definitions, runtime envs) carries them, and no output, captured output or Ray log line
    carries them or the PHI markers."""
    from ichd_ray.config.job import JobConfig, ScoreConfig
    from ichd_ray.dicom.read import _DEV_SALT
    from ichd_ray.pipeline.nightly import nightly
    from ichd_ray.pipeline.score import score_job
    from ichd_ray.io.storage import StorageConfig, boto3_client

    ray = ray_session
    info = _phi_archive(tmp_path / "archive")
    marked = StorageConfig(
        endpoint_url=s3_server.endpoint_url, region="us-east-1",
        access_key_id=KEY_ID, secret_access_key=SECRET_KEY, session_token=SESSION_TOKEN,
    )
    bucket = "phi-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]
    boto3_client(marked).create_bucket(Bucket=bucket)
    for path in sorted((tmp_path / "archive").rglob("*")):
        if path.is_file():
            storage.write_bytes(f"s3://{bucket}/archive/{path.relative_to(tmp_path / 'archive').as_posix()}", path.read_bytes(), marked)
    bundle = str(tmp_path / "bundle")
    init_bundle(bundle, BACKBONE, folds=2, input_size=SIZE, seed=0)
    worker_salt = _worker_env(ray, "ICHD_PATIENT_SALT") or _DEV_SALT
    job = JobConfig(score=ScoreConfig(studies_per_batch=2, studies_per_task=1, cnn_chunk=4, device="cpu"))

    traffic = _RayTraffic(monkeypatch)
    monkeypatch.setenv("ICHD_PATIENT_SALT", SALT)  # the driver's; the workers keep their own
    archive = f"s3://{bucket}/archive"
    summary = score_job(archive, bundle, f"s3://{bucket}/score-out", job=job, storage_config=marked)
    assert summary.status == "succeeded", summary
    night = nightly(archive, bundle, f"s3://{bucket}/nightly-out", job=job, storage_config=marked, max_reject_fraction=0.95)
    assert night.summary.status == "succeeded", night.summary
    assert traffic.blobs and traffic.options

    for secret in (SECRET_KEY, SESSION_TOKEN, SALT):
        holders = traffic.holders(secret)
        assert not holders, f"{secret[:12]}... reached Ray through: {'; '.join(holders)}"
    captured = capsys.readouterr()
    assert not _leaks(captured.out + captured.err)
    for prefix in ("score-out", "nightly-out"):
        objects = {e.uri: storage.read_bytes(e.uri, marked) for e in storage.list_files(f"s3://{bucket}/{prefix}", config=marked)}
        errors = _errors_table(objects)
        assert errors is not None and set(info["bad"]) <= {u.rsplit("/", 1)[-1] for u in errors.column("uri").to_pylist()}
        leaks = _scan_outputs(objects)
        assert not leaks, f"{prefix}: output objects leak markers: {leaks}"
        if prefix == "nightly-out":
            import pyarrow as pa
            import pyarrow.parquet as pq

            tables = [pq.read_table(pa.BufferReader(d)).to_pandas() for u, d in objects.items() if "/index/" in u and u.endswith(".parquet")]
            rows = pd_concat(tables)
            rows = rows[rows["sop_uid"].isin(list(info["patients"]))]
            assert len(rows) >= len(info["patients"])
            assert all(h == _expected_hash(info["patients"][s], worker_salt) for s, h in zip(rows["sop_uid"], rows["patient_hash"]))
    session_logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for path in session_logs.rglob("*"):
        if path.is_file():
            hits = _leaks(path.read_bytes().decode("latin-1"))
            assert not hits, f"Ray log {path.name} leaks {hits}"
