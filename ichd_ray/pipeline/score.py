"""The scoring run on Ray Data: manifest -> study rows -> CPU decode -> model actors -> Parquet -> commit.

:class:`ScoringRun` is the one implementation; ``score_job`` (``ichd-ray score``), the nightly job and
the out-of-fold embeddings compose it. Data flow (one row = one study, pixels never shuffled)::

    manifest (headers only) --study_table--> from_items (uris, positions in z order)
      --map_batches(decode_studies, CPU tasks, studies_per_task)-->   uint8 [T, 3, S, S] per study
                                                 (ichd_ray.pipeline.decode)
      --map_batches(StudyScoringActor, fixed actor pool)-->           CNN over every slice (chunked),
                                                                      sequence model while embeddings
                                                                      are on the device, fold average
      --materialize (results only)--> slices / studies / embeddings (Ray writes) + errors -> commit

Every input object ends in exactly one of ``slices`` or ``errors``; a bad file or a failing study is
recorded and the job goes on. See :mod:`ichd_ray.io.tables` for the commit protocol.

Why one module of ~630 lines: :class:`ScoringRun` is the whole scoring flow (plan, decode, model
actors, tables, commit, failure policy) that the issue asked to read as one object; its parts are
used nowhere else.
"""

from __future__ import annotations

import datetime as dt
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
import ray
import ray.data
import ray.exceptions
import torch
from ray.data import ActorPoolStrategy

from ichd_ray import CLASSES, __version__
from ichd_ray.config.job import ConfigError, JobConfig
from ichd_ray.io import config_files, storage
from ichd_ray.models.bundle import load_bundle, load_bundle_config
from ichd_ray.models.inference import StudyInput, StudyScorer
from ichd_ray.pipeline.index import build_manifest, read_manifest, study_table
from ichd_ray.pipeline.decode import DECODE_BASE_MEMORY, STUDY_FIELDS, decode_memory, decode_studies
from ichd_ray.pipeline.outputs import embeddings_rows, slices_rows, studies_rows, write_part
from ichd_ray.reasons import FAULT, count_outcomes, reason_class
from ichd_ray.io.tables import (
    ERRORS_SCHEMA,
    SLICES_SCHEMA,
    STUDIES_SCHEMA,
    commit_run,
    new_attempt_id,
    remove_other_attempts,
    write_table,
)

__all__ = ["RunSummary", "ScoredStudies", "ScoringRun", "StudyScoringActor", "score_job", "default_run_id", "decode_studies"]

#: Batch :class:`StudyScoringActor` returns: one row per study (the probabilities the table builders
#: turn into ``slices`` / ``studies`` / ``embeddings`` rows). Not a committed table's schema.
ACTOR_OUTPUT_SCHEMA = pa.schema(
    STUDY_FIELDS
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


def default_run_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"score-{now:%Y%m%dT%H%M%SZ}"


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


@dataclass
class ScoredStudies:
    """What :meth:`ScoringRun.score` wrote under the attempt (nothing is committed yet)."""

    n_inputs: int
    n_slices: int
    n_studies: int
    study_uids: set[str]  # studies that got a prediction (a failed one is not here: it stays due)


class ScoringRun:
    """One scoring run: plan -> decode -> model -> tables -> commit, with the failure policy.

    ``score_job`` is ``ScoringRun(...).score(manifest)`` then ``.commit()``; the nightly job composes the
    same object: it scores its planned manifest, writes its own tables under the same attempt
    (:meth:`write_table`), checks its lease, and commits. Nothing is visible to readers before
    :meth:`commit`; an exception anywhere leaves the attempt's files invisible (the next run removes them).
    Ray must already be initialised.

    Args:
        bundle_uri: model bundle.
        out_uri: output prefix (tables and the runs object).
        job: validated job config (defaults otherwise).
        run_id: default ``score-<UTC timestamp>``; re-using one replaces that run's output.
        progress: Ray Data progress bars.
        storage_config: the driver's storage settings (default: ``job.storage`` + environment);
            workers get them without credentials and use their own environment's.
        max_reject_fraction: the run is ``failed`` when more than this fraction of its inputs are faults.
        kind: what made the run, recorded in its runs row (``score``, ``nightly``).
        storage_retries: S3 retries already spent for this run before it started (nightly's listing).
    """

    def __init__(
        self,
        bundle_uri: str,
        out_uri: str,
        *,
        job: JobConfig | None = None,
        run_id: str | None = None,
        progress: bool = False,
        storage_config: storage.StorageConfig | None = None,
        max_reject_fraction: float | None = None,
        kind: str = "score",
        storage_retries: int = 0,
    ) -> None:
        self.job = job or JobConfig()
        self.storage_config = storage_config or config_files.storage_config(self.job.storage)
        self.bundle_uri, self.out_uri, self.progress, self.kind = bundle_uri, out_uri, progress, kind
        self.max_reject_fraction = max_reject_fraction
        self.started = dt.datetime.now(dt.timezone.utc)
        self._clock = time.perf_counter()
        self.run_id = run_id or default_run_id(self.started)
        self.attempt = new_attempt_id(self.started)
        self._retries_before = storage.retry_count()  # this process's; workers report theirs
        self.storage_retries = storage_retries
        self.bundle_config, self.bundle_sha256 = load_bundle_config(bundle_uri, storage_config=self.storage_config)
        self.errors: list[dict] = []
        self.scored: ScoredStudies | None = None
        _check_cluster_fits(self.job, DECODE_BASE_MEMORY)  # before any work: a pool that cannot fit would hang
        self._data_context()  # before the manifest is built: indexing runs on Ray Data too

    def score(self, manifest) -> ScoredStudies:
        """Decode and score every selected study of ``manifest``; write slices, studies (and embeddings)
        under the attempt; record the manifest's rejects and every failed slice as errors."""
        if self.scored is not None:
            raise RuntimeError("a ScoringRun scores one manifest")
        self.storage_retries += int(manifest.attrs.get("storage_retries", 0))
        self.errors += [
            {"run_id": self.run_id, "uri": r.uri, "stage": "index", "reason": r.reason, "message": r.message or ""}
            for r in manifest[manifest["reason"].notna()].itertuples()
        ]
        studies = study_table(manifest)
        counts = {"slices": 0, "studies": 0}
        uids: set[str] = set()
        if studies:
            scored = _materialize(self._model_stage(self._decode_stage(studies)))
            for row in scored.select_columns(["failures", "storage_retries"]).take_all():
                self.errors += [{"run_id": self.run_id, **f} for f in json.loads(row["failures"])]
                self.storage_retries += row["storage_retries"]
            for table, fn, kwargs in self._tables():
                counts[table] = self._write_parts(scored, table, fn, kwargs)
            if counts["studies"]:
                uids = set(ds_studies_uids(scored))
        sc = self.storage_config
        for table, schema in (("slices", SLICES_SCHEMA), ("studies", STUDIES_SCHEMA)):
            if not counts[table]:  # every table of a committed run exists, empty or not
                write_table(schema.empty_table(), self.out_uri, table, self.run_id, self.attempt, storage_config=sc)
        write_table(pa.Table.from_pylist(self.errors, schema=ERRORS_SCHEMA), self.out_uri, "errors", self.run_id, self.attempt, storage_config=sc)
        self.scored = ScoredStudies(len(manifest), counts["slices"], counts["studies"], uids)
        return self.scored

    def write_table(self, table: str, rows: pa.Table) -> None:
        """Another table of this run (nightly's ``index`` and ``scored``), committed with it."""
        write_table(rows, self.out_uri, table, self.run_id, self.attempt, storage_config=self.storage_config)

    def commit(self) -> RunSummary:
        """Judge the run (:func:`run_problems`), write its runs row (the commit) and remove other attempts."""
        if self.scored is None:
            raise RuntimeError("commit() before score()")
        n_inputs, n_slices, n_studies = self.scored.n_inputs, self.scored.n_slices, self.scored.n_studies
        seconds = time.perf_counter() - self._clock
        storage_retries = self.storage_retries + storage.retry_count() - self._retries_before
        errors = self.errors
        outcomes = count_outcomes(e["reason"] for e in errors)
        problems = run_problems(n_inputs, n_slices, errors, self.max_reject_fraction)
        status = "failed" if problems else "succeeded"
        run_row = {
            "run_id": self.run_id,
            "attempt": self.attempt,
            "model_version": self.bundle_config.version_id,
            "bundle_uri": self.bundle_uri,
            "bundle_sha256": self.bundle_sha256,
            "code_version": __version__,
            "config_sha256": self.job.sha256(),
            "config_json": json.dumps(self.job.to_dict(), sort_keys=True),
            "started_at": self.started,
            "finished_at": dt.datetime.now(dt.timezone.utc),
            "status": status,
            "n_inputs": n_inputs,
            "n_slices_scored": n_slices,
            "n_rejected": len(errors),
            "n_faults": outcomes["fault"],
            "n_selected_out": outcomes["selection"],
            "n_skipped": outcomes["skip"],
            "n_studies": n_studies,
            "n_storage_retries": storage_retries,
            "slices_per_s": n_slices / seconds if seconds > 0 else 0.0,
            "kind": self.kind,
            "problems": json.dumps(problems),
        }
        run_uri = commit_run(self.out_uri, run_row, self.storage_config)
        remove_other_attempts(self.out_uri, self.run_id, keep=self.attempt, storage_config=self.storage_config)
        return RunSummary(
            self.run_id, self.attempt, status, n_inputs, n_slices, len(errors), n_studies, seconds,
            run_row["slices_per_s"], dict(Counter(e["reason"] for e in errors)), storage_retries, outcomes,
            self.out_uri, run_uri, problems,
        )

    # -- the stages

    def _decode_stage(self, studies: list[dict]):
        cfg, bc = self.job.score, self.bundle_config
        size, windows = int(bc.input_size), [w.to_dict() for w in bc.windows]
        memory = decode_memory(cfg.studies_per_task, max(len(s["uris"]) for s in studies), len(windows), size)
        _check_cluster_fits(self.job, memory)  # now that the longest study is known
        ds = ray.data.from_items(studies, override_num_blocks=max(1, math.ceil(len(studies) / cfg.studies_per_task)))
        return ds.map_batches(
            decode_studies,
            batch_size=cfg.studies_per_task,
            batch_format="pyarrow",
            fn_kwargs={"size": size, "windows": windows, "rsna_fix": bool(bc.preprocessing["rsna_fix"]),
                       "storage_config": self.storage_config.for_workers()},
            num_cpus=cfg.cpus_per_decode_task,
            # Its real peak (the batch's pixel buffer and the block Ray copies from it). Asking for it
            # also keeps Ray Data from fusing decode into the model actor when both ask for the same
            # CPUs: fused, decode ran inside the actor and the model waited for it (BENCHMARKS.md).
            memory=memory,
        )

    def _model_stage(self, ds):
        cfg, bc = self.job.score, self.bundle_config
        return ds.map_batches(
            StudyScoringActor,
            batch_size=cfg.studies_per_batch,
            batch_format="pyarrow",
            fn_constructor_kwargs={
                "bundle_uri": self.bundle_uri,
                "storage_config": self.storage_config.for_workers(),
                "device": cfg.device,
                "cnn_chunk": cfg.cnn_chunk,
                "input_size": int(bc.input_size),
                "channels": len(bc.windows),
                "write_embeddings": cfg.write_embeddings,
            },
            compute=ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.num_gpus_per_actor,
        )  # Ray Data restarts a dead actor and retries its batch: same inputs, same outputs

    def _tables(self) -> list[tuple[str, Callable[..., pa.Table], dict[str, Any]]]:
        version = self.bundle_config.version_id
        thresholds = [self.bundle_config.thresholds[c] for c in CLASSES]  # one per class: BundleConfig validates
        tables = [
            ("slices", slices_rows, {"run_id": self.run_id, "model_version": version}),
            ("studies", studies_rows, {"run_id": self.run_id, "model_version": version, "thresholds": thresholds}),
        ]
        if self.job.score.write_embeddings:
            tables.append(("embeddings", embeddings_rows, {"run_id": self.run_id, "model_version": version}))
        return tables

    def _write_parts(self, scored, table: str, build: Callable[..., pa.Table], build_kwargs: dict[str, Any]) -> int:
        """One part file per block of scored studies (Ray tasks); returns the rows written."""
        written = _materialize(
            scored.map_batches(
                write_part,
                batch_format="pyarrow",
                batch_size=None,
                num_cpus=0.25,
                fn_kwargs={
                    "build": build, "build_kwargs": build_kwargs, "out_uri": self.out_uri, "table": table,
                    "run_id": self.run_id, "attempt": self.attempt, "storage_config": self.storage_config.for_workers(),
                },
            )
        ).to_arrow_refs()
        parts = pa.concat_tables(ray.get(written))
        self.storage_retries += int(pc.sum(parts["storage_retries"]).as_py() or 0)
        return int(pc.sum(parts["rows"]).as_py() or 0)

    def _data_context(self) -> None:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = self.progress
        # The actor pool is fixed and holds its CPUs from the start; the reservation only held the decode
        # tasks to ~1 at a time on small clusters (bench/score.py: 36% -> 66% of the ideal when off).
        ctx.op_resource_reservation_enabled = self.job.score.reserve_operator_resources
        ctx.print_on_execution_start = self.progress
        # A task's own exception (StorageUnavailable, PermissionError) reaches the driver as itself, so the
        # run can say what failed instead of "UDF failed to process a data block".
        ctx.raise_original_map_exception = True
        if not self.progress:  # quiet runs (tests, demo): no per-dataset INFO lines either
            logging.getLogger("ray.data").setLevel(logging.WARNING)


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
    max_reject_fraction: float | None = None,
) -> RunSummary:
    """Score every study under ``input_uri`` (or in ``manifest_uri``) with the bundle; commit a run.

    Ray must already be initialised (the CLI and ``jobs/score.py`` do it). Arguments as for
    :class:`ScoringRun`, plus ``input_uri`` (a prefix to list, or a ``.txt``/``.parquet`` list of URIs)
    or ``manifest_uri`` (a manifest from ``ichd-ray index``).

    Raises:
        ichd_ray.io.storage.StorageUnavailable: S3 kept failing past its bounded retries; nothing is
            committed (the attempt's partial files stay invisible and the next run removes them).
    """
    if not (input_uri or manifest_uri):
        raise ValueError("score_job needs input_uri or manifest_uri")
    run = ScoringRun(bundle_uri, out_uri, job=job, run_id=run_id, progress=progress, storage_config=storage_config,
                     max_reject_fraction=max_reject_fraction)
    sc = run.storage_config
    manifest = read_manifest(manifest_uri, sc) if manifest_uri else build_manifest(input_uri, run.job.index, sc)
    run.score(manifest)
    return run.commit()


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
