"""The scoring job on Ray Data: manifest -> study rows -> CPU decode -> model actors -> Parquet.

Data flow (one row = one study, pixels never shuffled)::

    manifest (headers only) --study_table--> from_items (uris, positions in z order)
      --map_batches(decode_studies, CPU tasks, studies_per_task)-->   uint8 [T, 3, S, S] per study
      --map_batches(StudyScoringActor, fixed actor pool)-->           CNN over every slice (chunked),
                                                                      sequence model while embeddings
                                                                      are on the device, fold average
      --materialize (results only)--> slices / studies / embeddings (Ray writes) + errors -> commit

Every input object ends in exactly one of ``slices`` or ``errors``; a bad file or a failing study is
recorded and the job goes on. See :mod:`ichd_ray.io.tables` for the commit protocol.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ichd_ray import CLASSES, __version__

from ichd_ray.io import storage
from ichd_ray.config.job import JobConfig
from ichd_ray.dicom.read import DicomError
from ichd_ray.reasons import FAULT, count_outcomes, reason_class
from ichd_ray.io.tables import (
    EMBEDDINGS_SCHEMA,
    ERRORS_SCHEMA,
    SLICES_SCHEMA,
    STUDIES_SCHEMA,
    commit_run,
    new_attempt_id,
    remove_other_attempts,
    table_prefix,
    write_table,
)

__all__ = ["RunSummary", "decode_studies", "StudyScoringActor", "score_job", "default_run_id"]

# What travels with a study through both stages: slices in z order, minus any that failed.
_STUDY_FIELDS = [
    ("study_uid", pa.string()),
    ("series_uid", pa.string()),
    ("uris", pa.list_(pa.string())),
    ("sop_uids", pa.list_(pa.string())),
    ("positions", pa.list_(pa.float64())),
    ("slice_indices", pa.list_(pa.int32())),
]
#: Batch a decode task hands to the scoring actors: one row per study, its pixels in ``images``.
DECODED_SCHEMA = pa.schema(
    _STUDY_FIELDS
    + [("n_images", pa.int32()), ("images", pa.large_binary()), ("failures", pa.string()), ("storage_retries", pa.int64())]
)
#: Batch :class:`StudyScoringActor` returns: one row per study (the probabilities the table builders
#: turn into ``slices`` / ``studies`` / ``embeddings`` rows). Not a committed table's schema.
ACTOR_OUTPUT_SCHEMA = pa.schema(
    _STUDY_FIELDS
    + [
        ("slice_probs", pa.list_(pa.float32())),  # n x 6, row-major
        ("study_probs", pa.list_(pa.float32())),
        ("embeddings", pa.list_(pa.float16())),  # n x D, row-major; empty unless asked for
        ("embed_dim", pa.int32()),
        ("cnn_logits", pa.list_(pa.float32())),  # n x 6, row-major; with the embeddings
        ("failures", pa.string()),
        ("storage_retries", pa.int64()),  # S3 retries the decode task spent (on the study's first row)
    ]
)


#: Memory a decode task needs beside its pixel buffer: pydicom's parse and one full-size decoded slice
#: (measured peak 127-155 MiB per task with 256-512 px DICOMs; Ray Data warned at the bare buffer size).
DECODE_BASE_MEMORY = 192 * 1024 * 1024


def default_run_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"score-{now:%Y%m%dT%H%M%SZ}"


# ----------------------------------------------------------------------------- CPU decode stage


def decode_studies(
    batch: pa.Table, *, size: int, windows: list[dict], rsna_fix: bool, storage_config: dict | None
) -> pa.Table:
    """Read + decode + window every slice of each study to uint8 [T, 3, size, size], preprocessed as
    the bundle says (``rsna_fix``; the area resize is the only resize there is).

    A slice that cannot be read or decoded is left out of its study and reported in ``failures``
    (JSON list of {uri, stage, reason, message}); the rest of the study goes on.
    """
    from ichd_ray.dicom.preprocess import preprocess_slice
    from ichd_ray.dicom.windowing import windows_from_config

    specs = windows_from_config(windows)
    config = storage.StorageConfig.on_worker(storage_config)
    rows = batch.to_pylist()
    # One buffer for every slice of the batch, filled in place and handed to Arrow without a copy
    # (stacking, .tobytes() and from_pydict each copied every study's pixels: ~24% of a core).
    slice_bytes = len(specs) * size * size
    pixels = np.empty((sum(len(r["uris"]) for r in rows), len(specs), size, size), dtype=np.uint8)
    offsets = [0]
    filled = 0
    retries_before = storage.retry_count()
    out: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names if name != "images"}
    for row in rows:
        keep, failures = [], []
        for i, uri in enumerate(row["uris"]):
            try:
                data = storage.read_bytes(uri, config)
                preprocess_slice(data, size, windows=specs, name=uri, rsna_fix=rsna_fix, out=pixels[filled])
                filled += 1
                keep.append(i)
            except DicomError as exc:
                failures.append({"uri": uri, "stage": "decode", "reason": exc.reason, "message": exc.message})
            except storage.StorageUnavailable:
                raise  # the store, not this object: stop the run uncommitted rather than reject good slices
            except OSError as exc:
                failures.append({"uri": uri, "stage": "read", "reason": "read_error", "message": f"{type(exc).__name__}: {exc}"})
            except Exception as exc:  # a decoder bug must not take the study down
                failures.append({"uri": uri, "stage": "decode", "reason": "decode_error", "message": f"{type(exc).__name__}: {exc}"})
        offsets.append(filled * slice_bytes)
        out["study_uid"].append(row["study_uid"])
        out["series_uid"].append(row["series_uid"])
        for key in ("uris", "sop_uids", "positions", "slice_indices"):
            out[key].append([row[key][i] for i in keep])
        out["n_images"].append(len(keep))
        out["failures"].append(json.dumps(failures))
        out["storage_retries"].append(0)
    if rows:
        out["storage_retries"][0] = storage.retry_count() - retries_before
    images = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(),
        len(rows),
        [None, pa.py_buffer(np.asarray(offsets, dtype=np.int64)), pa.py_buffer(pixels[:filled].reshape(-1))],
    )
    columns = {name: pa.array(values, type=DECODED_SCHEMA.field(name).type) for name, values in out.items()}
    columns["images"] = images
    return pa.Table.from_pydict({name: columns[name] for name in DECODED_SCHEMA.names}, schema=DECODED_SCHEMA)


# ---------------------------------------------------------------------------- model actor stage


class StudyScoringActor:
    """Holds a loaded bundle on its device; scores batches of decoded studies.

    Args:
        bundle_uri: model bundle to load (sha256-checked).
        storage_config: StorageConfig as a dict (reaches workers as plain kwargs).
        device: ``auto`` (CUDA when the actor has a GPU), ``cpu`` or ``cuda``.
        cnn_chunk: slices per CNN forward pass.
        input_size: image side the decode stage produced.
        channels: windows per image.
        write_embeddings: also return fold ``0``'s float16 embeddings.
    """

    def __init__(
        self,
        bundle_uri: str,
        storage_config: dict | None,
        device: str,
        cnn_chunk: int,
        input_size: int,
        channels: int,
        write_embeddings: bool = False,
    ) -> None:
        import torch

        from ichd_ray.models.bundle import load_bundle
        from ichd_ray.models.inference import StudyScorer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        config = storage.StorageConfig.on_worker(storage_config)
        before = storage.retry_count()
        self.bundle = load_bundle(bundle_uri, storage_config=config, device=device)
        self.pending_retries = storage.retry_count() - before  # reported with the next batch
        self.scorer = StudyScorer(self.bundle, device=device, cnn_chunk=cnn_chunk)
        self.size, self.channels = input_size, channels
        self.write_embeddings = write_embeddings

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ichd_ray.models.inference import StudyInput

        rows = batch.drop_columns(["images"]).to_pylist()
        images = batch.column("images")  # read in place: to_pylist would copy every study's pixels
        inputs = {
            i: StudyInput(
                images=np.frombuffer(images[i].as_buffer(), np.uint8).reshape(r["n_images"], self.channels, self.size, self.size),
                positions=np.asarray(r["positions"], dtype=np.float64),
            )
            for i, r in enumerate(rows)
            if r["n_images"] > 0
        }
        results: dict[int, Any] = {}
        try:
            scored = self.scorer.score(list(inputs.values()), return_embeddings=self.write_embeddings)
            results = dict(zip(inputs, scored))
        except Exception:  # one bad study must not fail its batch-mates: retry one by one
            for i, study in inputs.items():
                try:
                    results[i] = self.scorer.score([study], return_embeddings=self.write_embeddings)[0]
                except Exception as exc:  # recorded as errors for each of the study's slices
                    results[i] = exc
        out: dict[str, list] = {name: [] for name in ACTOR_OUTPUT_SCHEMA.names}
        for i, r in enumerate(rows):
            failures = json.loads(r["failures"])
            res = results.get(i)
            if isinstance(res, Exception) or res is None:
                message = f"{type(res).__name__}: {res}" if res is not None else "no slice could be decoded"
                if res is not None:
                    failures += [{"uri": u, "stage": "score", "reason": "score_error", "message": message} for u in r["uris"]]
                for key in ("uris", "sop_uids", "positions", "slice_indices"):
                    r[key] = []
                slice_probs, study_probs, emb, dim, cnn_logits = [], [], [], 0, []
            else:
                slice_probs = np.asarray(res.slice_probs, np.float32).reshape(-1).tolist()
                study_probs = np.asarray(res.study_probs, np.float32).tolist()
                if self.write_embeddings and res.embeddings is not None:
                    emb_arr = np.asarray(res.embeddings, np.float16)
                    emb, dim = emb_arr.reshape(-1).tolist(), int(emb_arr.shape[1])
                    cnn_logits = np.asarray(res.cnn_logits, np.float32).reshape(-1).tolist()
                else:
                    emb, dim, cnn_logits = [], 0, []
            for key in ("study_uid", "series_uid", "uris", "sop_uids", "positions", "slice_indices"):
                out[key].append(r[key])
            out["slice_probs"].append(slice_probs)
            out["study_probs"].append(study_probs)
            out["embeddings"].append(emb)
            out["embed_dim"].append(dim)
            out["cnn_logits"].append(cnn_logits)
            out["failures"].append(json.dumps(failures))
            out["storage_retries"].append(r["storage_retries"])
        if rows:
            out["storage_retries"][0] += self.pending_retries
            self.pending_retries = 0
        return pa.Table.from_pydict(out, schema=ACTOR_OUTPUT_SCHEMA)


# ------------------------------------------------------------------------------ table builders


def slices_rows(batch: pa.Table, *, run_id: str, model_version: str) -> pa.Table:
    out: dict[str, list] = {name: [] for name in SLICES_SCHEMA.names}
    for r in batch.to_pylist():
        probs = np.asarray(r["slice_probs"], np.float32).reshape(-1, len(CLASSES))
        for j, uri in enumerate(r["uris"]):
            out["run_id"].append(run_id)
            out["model_version"].append(model_version)
            out["study_uid"].append(r["study_uid"])
            out["series_uid"].append(r["series_uid"])
            out["sop_uid"].append(r["sop_uids"][j])
            out["uri"].append(uri)
            out["slice_index"].append(r["slice_indices"][j])
            out["position_z"].append(r["positions"][j])
            for c, name in enumerate(CLASSES):
                out[f"p_{name}"].append(float(probs[j, c]))
    return pa.Table.from_pydict(out, schema=SLICES_SCHEMA)


def studies_rows(batch: pa.Table, *, run_id: str, model_version: str, thresholds: list[float]) -> pa.Table:
    out: dict[str, list] = {name: [] for name in STUDIES_SCHEMA.names}
    for r in batch.to_pylist():
        if not r["uris"]:
            continue
        out["run_id"].append(run_id)
        out["model_version"].append(model_version)
        out["study_uid"].append(r["study_uid"])
        out["series_uid"].append(r["series_uid"])
        out["n_slices"].append(len(r["uris"]))
        out["n_slices_rejected"].append(len(json.loads(r["failures"])))
        for c, name in enumerate(CLASSES):
            out[f"p_{name}"].append(r["study_probs"][c])
        out["flagged"].append(any(p >= t for p, t in zip(r["study_probs"], thresholds)))
    return pa.Table.from_pydict(out, schema=STUDIES_SCHEMA)


def embeddings_rows(batch: pa.Table, *, run_id: str, model_version: str) -> pa.Table:
    out: dict[str, list] = {name: [] for name in EMBEDDINGS_SCHEMA.names}
    for r in batch.to_pylist():
        if not r["embed_dim"]:
            continue
        emb = np.asarray(r["embeddings"], np.float16).reshape(len(r["uris"]), r["embed_dim"])
        logits = np.asarray(r["cnn_logits"], np.float32).reshape(len(r["uris"]), len(CLASSES))
        for j in range(len(r["uris"])):
            out["run_id"].append(run_id)
            out["model_version"].append(model_version)
            out["study_uid"].append(r["study_uid"])
            out["sop_uid"].append(r["sop_uids"][j])
            out["slice_index"].append(r["slice_indices"][j])
            out["position_z"].append(r["positions"][j])
            out["embedding"].append(emb[j].tolist())
            out["cnn_logits"].append(logits[j].tolist())
    return pa.Table.from_pydict(out, schema=EMBEDDINGS_SCHEMA)


def write_part(
    batch: pa.Table,
    *,
    build: Callable[..., pa.Table],
    build_kwargs: dict[str, Any],
    out_uri: str,
    table: str,
    run_id: str,
    attempt: str,
    storage_config: dict | None,
) -> pa.Table:
    """Build one table's rows for a block of scored studies and write them as one part file, through
    :mod:`ichd_ray.io.storage` (so its bounded S3 retries are counted). The part is named by the studies it
    holds: a task Ray retries after its write rewrites the same object, never a second copy."""
    rows = build(batch, **build_kwargs)
    before = storage.retry_count()
    if rows.num_rows:
        studies = "\n".join(sorted(set(batch.column("study_uid").to_pylist())))
        part = "part-" + hashlib.sha256(studies.encode()).hexdigest()[:16]
        try:
            write_table(rows, out_uri, table, run_id, attempt, part=part, storage_config=storage.StorageConfig.on_worker(storage_config))
        except OSError as exc:
            if exc.errno is None:
                raise
            # Ray Data rewrites an OSError's filename with its retry note on the way to the driver:
            # the URI travels in the message instead.
            raise type(exc)(exc.errno, f"{exc.strerror}: {exc.filename or table_prefix(out_uri, table, run_id, attempt)}") from None
    return pa.table({"rows": pa.array([rows.num_rows], pa.int64()), "storage_retries": pa.array([storage.retry_count() - before], pa.int64())})


# --------------------------------------------------------------------------------------- the job


@dataclass
class RunSummary:
    run_id: str
    attempt: str
    status: str
    n_inputs: int
    n_slices_scored: int
    n_rejected: int
    n_studies: int
    seconds: float
    slices_per_s: float
    reasons: dict[str, int] = field(default_factory=dict)
    storage_retries: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)  # fault / selection / skip counts
    out_uri: str = ""
    run_uri: str = ""
    problems: list[str] = field(default_factory=list)


def score_job(
    input_uri: str | None,
    bundle_uri: str,
    out_uri: str,
    *,
    job: JobConfig | None = None,
    run_id: str | None = None,
    manifest_uri: str | None = None,
    progress: bool = False,
    storage_config: storage.StorageConfig | None = None,
    extra_tables: Callable[[set[str]], dict[str, pa.Table]] | None = None,
    max_reject_fraction: float | None = None,
    kind: str = "score",
    before_commit: Callable[[], None] | None = None,
    storage_retries: int = 0,
) -> RunSummary:
    """Score every study under ``input_uri`` (or in ``manifest_uri``) with the bundle; commit a run.

    Ray must already be initialised (the CLI and ``jobs/score.py`` do it).

    Args:
        input_uri: prefix to list, or a ``.txt``/``.parquet`` list of URIs.
        bundle_uri: model bundle.
        out_uri: output prefix (tables and the runs object).
        job: validated job config (defaults otherwise).
        run_id: default ``score-<UTC timestamp>``; re-using one replaces that run's output.
        manifest_uri: a manifest from ``ichd-ray index`` instead of indexing ``input_uri``.
        progress: Ray Data progress bars.
        storage_config: the driver's storage settings (default: ``job.storage`` + environment);
            workers get them without credentials and use their own environment's.
        extra_tables: called with the study UIDs that were scored; returns more tables
            (``{name: table}``) to write under this attempt, committed with the run (the nightly job's
            ``index`` and ``scored``).
        max_reject_fraction: the run is ``failed`` when more than this fraction of its inputs is rejected.
        kind: recorded in the runs row (``score``, ``nightly``).
        before_commit: called just before the commit; raising stops the run uncommitted (a lost lease).
        storage_retries: S3 retries already spent for this run before the call (nightly's index).

    Raises:
        ichd_ray.io.storage.StorageUnavailable: S3 kept failing past its bounded retries; nothing is
            committed (the attempt's partial files stay invisible and the next run removes them).
    """
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from ichd_ray.pipeline.index import build_manifest, read_manifest, study_table
    from ichd_ray.models.bundle import load_bundle_config

    job = job or JobConfig()
    sc = storage_config or job.storage.storage_config()
    sc_dict = sc.for_workers()
    started = dt.datetime.now(dt.timezone.utc)
    clock = time.perf_counter()
    run_id = run_id or default_run_id(started)
    attempt = new_attempt_id(started)

    retries_before = storage.retry_count()  # this process's; workers report theirs
    bundle_config, bundle_sha256 = load_bundle_config(bundle_uri, storage_config=sc)
    size = int(bundle_config.input_size)
    windows = [w.to_dict() for w in bundle_config.windows]
    rsna_fix = bool(bundle_config.preprocessing["rsna_fix"])  # validated when the bundle was read
    model_version = bundle_config.version_id
    thresholds = [bundle_config.thresholds[c] for c in CLASSES]  # one per class: BundleConfig validates

    _check_cluster_fits(job, DECODE_BASE_MEMORY)  # before any work: a pool that cannot fit would hang
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    # The actor pool is fixed and holds its CPUs from the start; the reservation only held the decode
    # tasks to ~1 at a time on small clusters (bench/score.py: 36% -> 66% of the ideal when off).
    ctx.op_resource_reservation_enabled = job.score.reserve_operator_resources
    ctx.print_on_execution_start = progress
    # A task's own exception (StorageUnavailable, PermissionError) reaches the driver as itself, so the
    # run can say what failed instead of "UDF failed to process a data block".
    ctx.raise_original_map_exception = True
    if not progress:  # quiet runs (tests, demo): no per-dataset INFO lines either
        logging.getLogger("ray.data").setLevel(logging.WARNING)

    if manifest_uri:
        manifest = read_manifest(manifest_uri, sc)
    elif input_uri:
        manifest = build_manifest(input_uri, job.index, sc)
    else:
        raise ValueError("score_job needs input_uri or manifest_uri")
    n_inputs = len(manifest)
    storage_retries += int(manifest.attrs.get("storage_retries", 0))
    errors = [
        {"run_id": run_id, "uri": r.uri, "stage": "index", "reason": r.reason, "message": r.message or ""}
        for r in manifest[manifest["reason"].notna()].itertuples()
    ]
    studies = study_table(manifest)

    n_slices = n_studies = 0
    if studies:
        cfg = job.score
        decode_memory = DECODE_BASE_MEMORY + 2 * cfg.studies_per_task * max(len(s["uris"]) for s in studies) * len(windows) * size * size
        _check_cluster_fits(job, decode_memory)  # now that the longest study is known
        n_blocks = max(1, math.ceil(len(studies) / cfg.studies_per_task))
        ds = ray.data.from_items(studies, override_num_blocks=n_blocks)
        ds = ds.map_batches(
            decode_studies,
            batch_size=cfg.studies_per_task,
            batch_format="pyarrow",
            fn_kwargs={"size": size, "windows": windows, "rsna_fix": rsna_fix, "storage_config": sc_dict},
            num_cpus=cfg.cpus_per_decode_task,
            # Its real peak (the batch's pixel buffer and the block Ray copies from it). Asking for it
            # also keeps Ray Data from fusing decode into the model actor when both ask for the same
            # CPUs: fused, decode ran inside the actor and the model waited for it (BENCHMARKS.md).
            memory=decode_memory,
        )
        ds = ds.map_batches(
            StudyScoringActor,
            batch_size=cfg.studies_per_batch,
            batch_format="pyarrow",
            fn_constructor_kwargs={
                "bundle_uri": bundle_uri,
                "storage_config": sc_dict,
                "device": cfg.device,
                "cnn_chunk": cfg.cnn_chunk,
                "input_size": size,
                "channels": len(windows),
                "write_embeddings": cfg.write_embeddings,
            },
            compute=ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.num_gpus_per_actor,
        )  # Ray Data restarts a dead actor and retries its batch: same inputs, same outputs
        scored = _materialize(ds)
        for row in scored.select_columns(["failures", "storage_retries"]).take_all():
            errors += [{"run_id": run_id, **f} for f in json.loads(row["failures"])]
            storage_retries += row["storage_retries"]
        tables = [
            ("slices", slices_rows, {"run_id": run_id, "model_version": model_version}),
            ("studies", studies_rows, {"run_id": run_id, "model_version": model_version, "thresholds": thresholds}),
        ]
        if job.score.write_embeddings:
            tables.append(("embeddings", embeddings_rows, {"run_id": run_id, "model_version": model_version}))
        for table, fn, kwargs in tables:
            written = _materialize(
                scored.map_batches(
                    write_part,
                    batch_format="pyarrow",
                    batch_size=None,
                    num_cpus=0.25,
                    fn_kwargs={
                        "build": fn, "build_kwargs": kwargs, "out_uri": out_uri, "table": table,
                        "run_id": run_id, "attempt": attempt, "storage_config": sc_dict,
                    },
                )
            ).to_arrow_refs()
            parts = pa.concat_tables(ray.get(written))
            count = int(pc.sum(parts["rows"]).as_py() or 0)
            storage_retries += int(pc.sum(parts["storage_retries"]).as_py() or 0)
            if table == "slices":
                n_slices = count
            elif table == "studies":
                n_studies = count
    for table, schema in (("slices", SLICES_SCHEMA), ("studies", STUDIES_SCHEMA)):
        if (table == "slices" and not n_slices) or (table == "studies" and not n_studies):
            write_table(schema.empty_table(), out_uri, table, run_id, attempt, storage_config=sc)
    write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), out_uri, "errors", run_id, attempt, storage_config=sc)

    if extra_tables is not None:
        scored_studies: set[str] = set()
        if n_studies:
            scored_studies = set(ds_studies_uids(scored))
        for table, rows in extra_tables(scored_studies).items():
            write_table(rows, out_uri, table, run_id, attempt, storage_config=sc)

    seconds = time.perf_counter() - clock
    storage_retries += storage.retry_count() - retries_before
    n_rejected = len(errors)
    outcomes = count_outcomes(e["reason"] for e in errors)
    problems = run_problems(n_inputs, n_slices, errors, max_reject_fraction)
    status = "failed" if problems else "succeeded"
    run_row = {
        "run_id": run_id,
        "attempt": attempt,
        "model_version": model_version,
        "bundle_uri": bundle_uri,
        "bundle_sha256": bundle_sha256,
        "code_version": __version__,
        "config_sha256": job.sha256(),
        "config_json": json.dumps(job.to_dict(), sort_keys=True),
        "started_at": started,
        "finished_at": dt.datetime.now(dt.timezone.utc),
        "status": status,
        "n_inputs": n_inputs,
        "n_slices_scored": n_slices,
        "n_rejected": n_rejected,
        "n_faults": outcomes["fault"],
        "n_selected_out": outcomes["selection"],
        "n_skipped": outcomes["skip"],
        "n_studies": n_studies,
        "n_storage_retries": storage_retries,
        "slices_per_s": n_slices / seconds if seconds > 0 else 0.0,
        "kind": kind,
        "problems": json.dumps(problems),
    }
    if before_commit is not None:
        before_commit()
    run_uri = commit_run(out_uri, run_row, sc)
    remove_other_attempts(out_uri, run_id, keep=attempt, storage_config=sc)
    reasons = dict(Counter(e["reason"] for e in errors))
    return RunSummary(
        run_id, attempt, status, n_inputs, n_slices, n_rejected, n_studies, seconds,
        run_row["slices_per_s"], reasons, storage_retries, outcomes, out_uri, run_uri, problems,
    )


class _StorageErrorsOffConsole(logging.Filter):
    """Drops Ray Data's console records of a task's storage failure: raised as itself
    (``raise_original_map_exception``), Ray Data takes it for an internal error and logs its stack
    trace twice, asking for a bug report; the caller reports it in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return not (isinstance(getattr(exc, "cause", exc), OSError) or storage.unavailable_cause(exc) is not None)
        return not record.getMessage().startswith("Exception occurred in Ray Data or Ray Core internal code")


def _materialize(ds):
    """``ds.materialize()``; a task's storage failure (a store that stopped answering, a denied write)
    is raised as itself, not inside Ray's wrapper, so the CLI can print one clear line."""
    import ray.exceptions

    handlers = logging.getLogger("ray.data").handlers
    quiet = _StorageErrorsOffConsole()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        return ds.materialize()
    except ray.exceptions.RayTaskError as exc:
        failure = storage.task_storage_error(exc)
        if failure is None:
            raise
        raise failure from None
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def ds_studies_uids(scored) -> list[str]:
    """UIDs of the studies a scored dataset holds predictions for."""
    return [r["study_uid"] for r in scored.select_columns(["study_uid", "uris"]).take_all() if r["uris"]]


def run_problems(n_inputs: int, n_slices: int, errors: list[dict], max_reject_fraction: float | None) -> list[str]:
    """Why a run is ``failed`` (empty: it succeeded): what on-call should look at first.

    The reject limit counts faults only (:mod:`ichd_ray.reasons`): objects selected out by the series
    rule or skipped by suffix are the normal shape of an archive, not a problem."""
    problems = []
    if n_inputs != n_slices + len(errors):
        problems.append(f"inputs {n_inputs} != scored slices {n_slices} + rejected {len(errors)}: an input is unaccounted for")
    failed = sorted({e["uri"] for e in errors if e["stage"] == "score"})
    if failed:
        problems.append(f"{len(failed)} slice(s) of studies that failed in the model stage (errors.stage = 'score'), e.g. {failed[0]}")
    faults = [e["reason"] for e in errors if reason_class(e["reason"]) == FAULT]
    if max_reject_fraction is not None and n_inputs and len(faults) / n_inputs > max_reject_fraction:
        top = ", ".join(f"{r} {n}" for r, n in Counter(faults).most_common(3))
        problems.append(
            f"{len(faults)} faults of {n_inputs} inputs ({len(faults) / n_inputs:.1%}) > max {max_reject_fraction:.1%}; "
            f"top reasons: {top}"
        )
    return problems


def _check_cluster_fits(job: JobConfig, decode_memory: int) -> None:
    """Fail fast instead of hanging: place the actor pool on the alive nodes as they are (each actor's
    CPUs and GPUs on one node), then one decode task (its CPUs and ``decode_memory`` bytes) on what is
    left of some node. Skipped with ``ray.autoscaling: true``, where the autoscaler adds the nodes."""
    import ray

    from ichd_ray.config.job import ConfigError

    if job.ray.autoscaling:
        return
    cfg = job.score
    free = [
        {k: float(node["Resources"].get(k, 0.0)) for k in ("CPU", "GPU", "memory")}
        for node in ray.nodes()
        if node.get("Alive")
    ]
    shape = (
        f"{len(free)} node(s) with CPU/GPU/memory GiB "
        + ", ".join(f"{n['CPU']:g}/{n['GPU']:g}/{n['memory'] / 2**30:.1f}" for n in free)
    )
    for i in range(cfg.num_actors):
        # first fit on the node with the most CPUs left: the decode task needs a node too
        fits = [n for n in free if n["CPU"] >= cfg.cpus_per_actor and n["GPU"] >= cfg.num_gpus_per_actor]
        if not fits:
            what = "GPUs" if any(n["CPU"] >= cfg.cpus_per_actor for n in free) and cfg.num_gpus_per_actor else "CPUs"
            raise ConfigError(
                f"score.num_actors = {cfg.num_actors}: actor {i + 1} needs score.cpus_per_actor = {cfg.cpus_per_actor:g} CPUs "
                f"and score.num_gpus_per_actor = {cfg.num_gpus_per_actor:g} GPUs on one node, and no node has those "
                f"{what} left ({shape}): lower them (fractions are fine), or add nodes; otherwise the job would wait forever"
            )
        node = max(fits, key=lambda n: (n["CPU"], n["GPU"]))
        node["CPU"] -= cfg.cpus_per_actor
        node["GPU"] -= cfg.num_gpus_per_actor
    if not any(n["CPU"] >= cfg.cpus_per_decode_task for n in free):
        raise ConfigError(
            f"after the actor pool (score.num_actors x score.cpus_per_actor), no node has score.cpus_per_decode_task = "
            f"{cfg.cpus_per_decode_task:g} CPUs left ({shape}): lower them (fractions are fine) or add CPUs; "
            "otherwise the decode tasks would wait forever"
        )
    if not any(n["CPU"] >= cfg.cpus_per_decode_task and n["memory"] >= decode_memory for n in free):
        raise ConfigError(
            f"a decode task needs {decode_memory / 2**30:.2f} GiB of memory (score.studies_per_task x the longest study's "
            f"slices x windows x input size^2, twice, plus a base) on a node with CPUs to spare, and no node has it "
            f"({shape}): lower score.studies_per_task or add memory"
        )
