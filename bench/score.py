"""The scoring job on this machine: CPU decode stage through Ray Data, and the job end to end.

1. CPU stage (read + decode + window, 512x512 -> uint8 [3, 256, 256]) on a synthetic set written to a
   temp dir first (uncompressed; files are in the page cache on both sides):

   * one process, pinned to one core: ``storage.read_bytes`` + ``preprocess_slice`` over every slice;
   * the same process calling ``decode_studies`` itself (the per-slice work plus building the study
     block it returns), no Ray;
   * ``cores`` plain processes (multiprocessing, one pinned per core), no Ray: what the box can do;
   * Ray Data: ``from_items(study_table(manifest))`` -> ``map_batches(decode_studies, ...)`` exactly as
     ``score_job`` configures it, ``.materialize()``; Ray start-up and the index are not timed. Once
     with the default ``DataContext`` and once with ``op_resource_reservation_enabled = False`` (a
     diagnostic: not what ``score_job`` runs).

   Every timed variant runs ``--rounds`` times, interleaved, after a warm-up; the median is reported.
2. End to end: ``score_job`` (local Ray already started, one model actor on CPU) against the bare
   model: ``StudyScorer.score`` on pre-decoded uint8 studies in this process at the thread count a
   Ray actor with the same ``num_cpus`` gets (probed), same batches of ``studies_per_batch``.

    python bench/score.py [--studies 24] [--slices 32] [--rounds 3] [--write]

``--write`` replaces the score section of BENCHMARKS.md with this run's tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ICHD_PATIENT_SALT", "bench")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute  # noqa: E402,F401

from ichd_ray.io import storage  # noqa: E402
from ichd_ray.dicom.preprocess import preprocess_slice  # noqa: E402

from benchmarks_md import write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------ CPU stage


def pinned_loop(uris: list[str], size: int, rounds: int) -> list[float]:
    """slices/s of read + preprocess_slice in this process, pinned to one core."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {sorted(before)[0]})
    try:
        for u in uris[:64]:
            preprocess_slice(storage.read_bytes(u), size)
        rates = []
        for _ in range(rounds):
            t = time.perf_counter()
            for u in uris:
                preprocess_slice(storage.read_bytes(u), size)
            rates.append(len(uris) / (time.perf_counter() - t))
        return rates
    finally:
        os.sched_setaffinity(0, before)


def pinned_decode_studies(studies: list[dict], spt: int, size: int, windows: list[dict], rounds: int) -> list[float]:
    """slices/s of ``decode_studies`` called in this process (no Ray), ``spt`` studies a call, one core."""
    from ichd_ray.pipeline.decode import decode_studies

    n = sum(len(s["uris"]) for s in studies)
    batches = [pa.Table.from_pylist(studies[i : i + spt]) for i in range(0, len(studies), spt)]
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {sorted(before)[0]})
    try:
        decoded = sum(sum(decode_studies(b, size=size, windows=windows, rsna_fix=True, storage_config=None).column("n_images").to_pylist()) for b in batches)
        assert decoded == n, f"decode_studies decoded {decoded} of {n} slices"  # failures are recorded, not raised
        rates = []
        for _ in range(rounds):
            t = time.perf_counter()
            for b in batches:
                decode_studies(b, size=size, windows=windows, rsna_fix=True, storage_config=None)
            rates.append(n / (time.perf_counter() - t))
        return rates
    finally:
        os.sched_setaffinity(0, before)


def _plain_worker(core: int, uris: list[str], size: int, rounds: int, barrier, queue) -> None:
    os.sched_setaffinity(0, {core})
    for u in uris[:32]:
        preprocess_slice(storage.read_bytes(u), size)
    for r in range(rounds):
        barrier.wait()
        t = time.perf_counter()
        for u in uris:
            preprocess_slice(storage.read_bytes(u), size)
        queue.put((r, time.perf_counter() - t))


def plain_processes(uris: list[str], size: int, cores: list[int], rounds: int) -> list[float]:
    """Aggregate slices/s of one plain process per core (files split round-robin), no Ray."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(cores)), ctx.Queue()
    procs = [
        ctx.Process(target=_plain_worker, args=(c, uris[i :: len(cores)], size, rounds, barrier, queue))
        for i, c in enumerate(cores)
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in range(rounds * len(cores))]
    for p in procs:
        p.join()
    return [len(uris) / max(s for r, s in results if r == k) for k in range(rounds)]


def _walk(stats):
    yield stats
    for parent in stats.parents:
        yield from _walk(parent)


def op_blocks(mat) -> dict[str, list]:
    """Operator name -> BlockStats of a materialized dataset (its whole lineage)."""
    out: dict[str, list] = {}
    for st in _walk(mat._raw_stats()):
        for name, blocks in st.metadata.items():
            out.setdefault(name, []).extend(b for b in blocks if b.exec_stats is not None)
    return out


def op_timing(blocks: list) -> dict:
    """Totals over an operator's blocks; times are perf_counter seconds (system-wide monotonic clock)."""
    es = [b.exec_stats for b in blocks]
    stages = [e.stage_time_s for e in es if e.stage_time_s]
    start = min(e.start_time_s for e in es)
    end = max(e.end_time_s for e in es)
    wall = sum(e.wall_time_s for e in es)
    body = sum(e.function_body_time_s or 0.0 for e in es)
    return {
        "tasks": len(es),
        "start": start,
        "end": end,
        "span": end - start,
        "wall_sum": wall,
        "cpu_sum": sum(e.cpu_time_s or 0.0 for e in es),
        "body_sum": body,
        "concurrency": wall / (end - start) if end > start else float("nan"),
        "rows": sum(b.num_rows or 0 for b in blocks),
        "stage_sums": [sum(st[i] for st in stages) for i in range(len(stages[0]))] if stages else None,
    }


def _n_images_fn(block) -> int:
    return int(pa.compute.sum(block.column("n_images")).as_py() or 0)


_n_images = None


def ray_decode(studies: list[dict], spt: int, size: int, windows: list[dict], reservation: bool, check: bool = False):
    """One run of the decode stage as score_job builds it; returns (slices/s, materialized ds, timing)."""
    import ray
    import ray.data

    from ichd_ray.pipeline.decode import decode_studies

    global _n_images
    if _n_images is None:
        _n_images = ray.remote(num_cpus=0.1)(_n_images_fn)
    n = sum(len(s["uris"]) for s in studies)
    ctx = ray.data.DataContext.get_current()
    old = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = reservation
    try:
        t = time.perf_counter()
        # as in score_job (cpus_per_decode_task = 1.0, the ScoreConfig default)
        ds = ray.data.from_items(studies, override_num_blocks=max(1, math.ceil(len(studies) / spt)))
        ds = ds.map_batches(
            decode_studies,
            batch_size=spt,
            batch_format="pyarrow",
            fn_kwargs={"size": size, "windows": windows, "rsna_fix": True, "storage_config": None},
            num_cpus=1.0,
        )
        mat = ds.materialize()
        t_end = time.perf_counter()
        seconds = t_end - t
    finally:
        ctx.op_resource_reservation_enabled = old
    blocks = [b for name, bl in op_blocks(mat).items() if "decode_studies" in name for b in bl]
    timing = op_timing(blocks)
    timing.update(seconds=seconds, lead=timing["start"] - t, tail=t_end - timing["end"])
    assert timing["rows"] == len(studies), (timing, len(studies))
    # plain tasks on the stored blocks (a Ray Data aggregation would start actors that outlive it
    # and hold CPUs into the next timed run)
    if check:  # warm-up runs only: no extra Ray work next to the timed runs
        decoded = sum(ray.get([_n_images.remote(ref) for ref in mat.to_arrow_refs()]))
        assert decoded == n, f"Ray decode stage decoded {decoded} of {n} slices"
    return n / seconds, mat, timing


# ----------------------------------------------------------------------------------- end to end


class ThreadProbe:
    def threads(self) -> tuple[int, str | None]:
        import torch

        return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


def actor_threads(num_cpus: float) -> tuple[int, str | None]:
    import ray

    actor = ray.remote(ThreadProbe).options(num_cpus=num_cpus).remote()
    try:
        return ray.get(actor.threads.remote())
    finally:
        ray.kill(actor)


def predecode(studies: list[dict], size: int):
    from ichd_ray.models.inference import StudyInput

    return [
        StudyInput(
            images=np.stack([preprocess_slice(storage.read_bytes(u), size) for u in s["uris"]]),
            positions=np.asarray(s["positions"], dtype=np.float64),
        )
        for s in studies
    ]


def bare_model(bundle_uri: str, inputs, threads: int, studies_per_batch: int, cnn_chunk: int) -> tuple[float, float]:
    """slices/s of StudyScorer.score alone on pre-decoded studies; also the bundle load seconds."""
    import torch

    from ichd_ray.models.bundle import load_bundle
    from ichd_ray.models.inference import StudyScorer

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = time.perf_counter()
        scorer = StudyScorer(load_bundle(bundle_uri, device="cpu"), device="cpu", cnn_chunk=cnn_chunk)
        load_s = time.perf_counter() - t
        scorer.score(inputs[:1])  # warm-up (first-call allocations), not timed
        n = sum(len(s.images) for s in inputs)
        t = time.perf_counter()
        for i in range(0, len(inputs), studies_per_batch):
            scorer.score(inputs[i : i + studies_per_batch])
        return n / (time.perf_counter() - t), load_s
    finally:
        torch.set_num_threads(before)


def run_score_job(manifest_uri: str, bundle_uri: str, out_uri: str, job, run_id: str):
    """score_job with Dataset.materialize wrapped, to keep the main pipeline's stats and timing."""
    import ray.data

    from ichd_ray.pipeline.score import score_job

    seen: list[tuple] = []
    original = ray.data.Dataset.materialize
    ctx = ray.data.DataContext.get_current()
    per_stage = ctx.per_stage_map_timing
    ctx.per_stage_map_timing = True  # stats only: splits a fused operator's time per stage

    def recording(self, *a, **k):
        t = time.perf_counter()
        out = original(self, *a, **k)
        seen.append((out, t, time.perf_counter()))
        return out

    ray.data.Dataset.materialize = recording
    try:
        t = time.perf_counter()
        summary = score_job(None, bundle_uri, out_uri, job=job, run_id=run_id, manifest_uri=manifest_uri)
        wall = time.perf_counter() - t
    finally:
        ray.data.Dataset.materialize = original
        ctx.per_stage_map_timing = per_stage
    main, p0, p1 = seen[0]  # the first materialize is decode -> actor (score_job's `scored`)
    ops = op_blocks(main)
    actor = [b for name, bl in ops.items() if "StudyScoringActor" in name for b in bl]
    fused = any("decode_studies" in name and "StudyScoringActor" in name for name in ops)
    decode = [b for name, bl in ops.items() if "decode_studies" in name and "StudyScoringActor" not in name for b in bl]
    return {
        "summary": summary,
        "wall": wall,
        "pipeline": p1 - p0,
        "pipeline_start": p0,
        "actor": op_timing(actor),
        "decode": op_timing(decode) if decode else None,
        "fused": fused,
        "ops": list(ops),
        "stats": main.stats(),
    }


# ------------------------------------------------------------------------------------------ main


def decode_section(stats_lines: list[str]) -> list[str]:
    """The decode operator's block of a ds.stats() text (its header and the timing/size lines)."""
    out, inside = [], False
    for line in stats_lines:
        if line.startswith(("Operator", "Dataset")):
            inside = line.startswith("Operator") and "decode_studies" in line
        if inside and not line.lstrip().startswith(("* Tasks per node", "* Operator throughput", "* Total input")):
            out.append(line.strip())
    return out


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--slices", type=int, default=32, help="nominal slices per study (synth jitters +-20%%)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--size", type=int, default=256, help="network input size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)), help="ray.init(num_cpus=...)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--studies-per-task", default="1,3,6", help="CPU stage: comma list")
    parser.add_argument("--backbones", default="resnet10t,test_resnet", help="end to end: comma list ('' skips it)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--decode-cpus", default="1.0,0.5", help="end to end: cpus_per_decode_task values, comma list")
    parser.add_argument("--e2e-studies-per-task", type=int, default=6)
    parser.add_argument("--studies-per-batch", type=int, default=4)
    parser.add_argument("--cnn-chunk", type=int, default=64)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    command = (
        f"python bench/score.py --studies {args.studies} --slices {args.slices} --image-size {args.image_size} "
        f"--size {args.size} --cpus {args.cpus} --rounds {args.rounds} --studies-per-task {args.studies_per_task} "
        f"--backbones {args.backbones} --cpus-per-actor {args.cpus_per_actor:g} --decode-cpus {args.decode_cpus} "
        f"--e2e-studies-per-task {args.e2e_studies_per_task} --studies-per-batch {args.studies_per_batch} "
        f"--cnn-chunk {args.cnn_chunk}"
    )
    clock = time.perf_counter()

    import ray
    import ray.data
    import torch

    from ichd_ray.config.job import IndexConfig, JobConfig, ScoreConfig
    from ichd_ray.pipeline.index import build_manifest, study_table, write_manifest
    from ichd_ray.models.bundle import init_bundle
    from ichd_ray.synthetic.generate import SynthConfig, generate
    from ichd_ray.dicom.windowing import DEFAULT_WINDOWS

    windows = [w.to_dict() for w in DEFAULT_WINDOWS]
    cores = sorted(os.sched_getaffinity(0))[: args.cpus]
    tmp = Path(tempfile.mkdtemp(prefix="ichd-bench-score-"))
    try:
        data = tmp / "data"
        synth = SynthConfig(studies=args.studies, slices=args.slices, size=args.image_size, seed=args.seed, compressed_fraction=0.0)
        gen = generate(str(data), synth, workers=max(1, len(cores)))
        log(f"synthetic set: {gen['studies']} studies, {gen['slices']} slices, {gen['bytes'] / 1e6:.0f} MB in {gen['seconds']} s -> {data}")

        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        manifest = build_manifest(str(data), IndexConfig())
        manifest_uri = str(tmp / "manifest.parquet")
        write_manifest(manifest, manifest_uri)
        studies = study_table(manifest)
        uris = [u for s in studies for u in s["uris"]]
        n = len(uris)
        log(f"manifest: {len(studies)} studies, {n} slices selected")

        # ---------------------------------------------------------------- 1. CPU stage
        spts = [int(x) for x in args.studies_per_task.split(",") if x]
        single = statistics.median(pinned_loop(uris, args.size, args.rounds))
        log(f"(a) one process, one core: read + preprocess_slice {single:,.0f} slices/s")
        single_decode = {spt: statistics.median(pinned_decode_studies(studies, spt, args.size, windows, args.rounds)) for spt in spts}
        log("(a') decode_studies in-process, one core: " + ", ".join(f"{k}/task {v:,.0f}/s" for k, v in single_decode.items()))
        plain = statistics.median(plain_processes(uris, args.size, cores, args.rounds))
        log(f"(c) {len(cores)} plain processes, no Ray: {plain:,.0f} slices/s")

        for spt in spts:  # warm-up, not timed: worker processes, imports, look-up tables
            for reservation in (True, False):
                ray_decode(studies, spt, args.size, windows, reservation, check=True)
        runs: dict[tuple[int, bool], list] = {}
        for _ in range(args.rounds):
            for spt in spts:
                for reservation in (True, False):
                    rate, mat, timing = ray_decode(studies, spt, args.size, windows, reservation)
                    runs.setdefault((spt, reservation), []).append((rate, mat.stats(), timing))
                    del mat
        ideal = single * len(cores)
        cpu_rows = []
        for (spt, reservation), rs in runs.items():
            rs = sorted(rs, key=lambda r: r[0])
            med = rs[len(rs) // 2]
            cpu_rows.append({"spt": spt, "reservation": reservation, "rate": med[0], "stats": med[1], "timing": med[2], "min": rs[0][0], "max": rs[-1][0]})
            log(
                f"(b) Ray Data, {spt} studies/task, reservation {'on ' if reservation else 'off'}: {med[0]:,.0f} slices/s "
                f"(min {rs[0][0]:,.0f}, max {rs[-1][0]:,.0f}) = {med[0] / ideal:.0%} of (a) x {len(cores)}; "
                f"{med[2]['tasks']} tasks, mean concurrency {med[2]['concurrency']:.2f}, task wall sum {med[2]['wall_sum']:.2f} s"
            )
        best = max((r for r in cpu_rows if r["reservation"]), key=lambda r: r["rate"])
        best_off = max((r for r in cpu_rows if not r["reservation"]), key=lambda r: r["rate"])
        stats_lines = [line for line in best["stats"].splitlines() if line.strip()]
        log(f"\nds.stats() of the best default run ({best['spt']} studies/task):\n" + "\n".join(stats_lines))

        # ---------------------------------------------------------------- 2. end to end
        e2e_rows = []
        backbones = [b for b in args.backbones.split(",") if b]
        if backbones:
            threads, omp = actor_threads(args.cpus_per_actor)
            log(f"\nRay actor with num_cpus={args.cpus_per_actor:g}: torch.get_num_threads() = {threads} (OMP_NUM_THREADS={omp})")
            inputs = predecode(studies, args.size)
        for backbone in backbones:
            bundle_uri = str(tmp / f"bundle-{backbone}")
            init_bundle(bundle_uri, backbone, input_size=args.size)
            bare1, load_s = bare_model(bundle_uri, inputs, threads, args.studies_per_batch, args.cnn_chunk)
            log(f"{backbone}: bare StudyScorer.score, {threads} thread(s): {bare1:,.1f} slices/s (bundle load {load_s:.2f} s, not timed)")
            rows_before = len(e2e_rows)
            for dcpu in [float(x) for x in args.decode_cpus.split(",") if x]:
                job = JobConfig(
                    score=ScoreConfig(
                        num_actors=1,
                        cpus_per_actor=args.cpus_per_actor,
                        cpus_per_decode_task=dcpu,
                        studies_per_batch=args.studies_per_batch,
                        studies_per_task=args.e2e_studies_per_task,
                        cnn_chunk=args.cnn_chunk,
                        device="cpu",
                    )
                ).validate()
                r = run_score_job(manifest_uri, bundle_uri, str(tmp / "out"), job, f"bench-{backbone}-{dcpu:g}")
                s = r["summary"]
                assert s.status == "succeeded" and s.n_slices_scored == n, s
                a = r["actor"]
                row = {
                    "backbone": backbone,
                    "dcpu": dcpu,
                    "threads": threads,
                    "omp": omp,
                    "wall": r["wall"],
                    "pipeline": r["pipeline"],
                    "startup": a["start"] - r["pipeline_start"],
                    "window": a["span"],
                    "busy": a["wall_sum"] / a["span"],
                    "stage_sums": a["stage_sums"],
                    "actor_wall_sum": a["wall_sum"],
                    "fused": r["fused"],
                    "decode": r["decode"],
                    "ops": r["ops"],
                    "stats": r["stats"],
                }
                e2e_rows.append(row)
                log(
                    f"{backbone}, cpus_per_actor {args.cpus_per_actor:g} + cpus_per_decode_task {dcpu:g} "
                    f"({'decode FUSED into the actor' if row['fused'] else 'decode in separate tasks'}): "
                    f"score_job {n / row['wall']:,.1f}/s ({row['wall']:.1f} s), pipeline {n / row['pipeline']:,.1f}/s "
                    f"({row['pipeline']:.1f} s, actor start {row['startup']:.1f} s), "
                    f"model stage {n / row['window']:,.1f}/s ({row['window']:.1f} s, actor busy {row['busy']:.0%}); "
                    f"actor time per fused stage: {row['stage_sums']}"
                )
                log("  ops: " + " | ".join(row["ops"]))
                log("\n".join("  " + line for line in row["stats"].splitlines() if line.strip()))
            bare2, _ = bare_model(bundle_uri, inputs, threads, args.studies_per_batch, args.cnn_chunk)
            log(f"{backbone}: bare StudyScorer.score again after the jobs: {bare2:,.1f} slices/s")
            for row in e2e_rows[rows_before:]:
                row.update(bare=(bare1 + bare2) / 2, bare_runs=(bare1, bare2), load_s=load_s)
                log(f"  {row['backbone']} decode cpus {row['dcpu']:g}: model stage / bare = {n / row['window'] / row['bare']:.0%}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - clock

    # ---------------------------------------------------------------------------- write-up
    cpu_name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({cpu_name}; a VM), no GPU; Python {platform.python_version()}, "
        f"Ray {ray.__version__}, torch {torch.__version__}, numpy {np.__version__}.  ",
        f"Date: {dt.date.today().isoformat()}. Command: `{command}` (whole run {total:.0f} s).  ",
        f"Data: {gen['studies']} synthetic studies, {n} slices, {args.image_size}x{args.image_size} uncompressed "
        f"(`compressed_fraction=0`), written to a temp dir first (page cache warm) -> uint8 [3, {args.size}, {args.size}]. "
        f"Ray: local, `ray.init(num_cpus={args.cpus})`.",
        "",
        "**CPU stage** (read + decode + window), median of "
        f"{args.rounds} interleaved rounds after a warm-up (min-max in brackets). Ray rows: "
        "`from_items(study_table(manifest))` -> `map_batches(decode_studies, batch_size=studies_per_task, "
        "batch_format=\"pyarrow\", num_cpus=1.0)` as `score_job` builds it -> `.materialize()`; timed from building "
        "the dataset to the end of `materialize` (Ray start-up and the index not timed). Concurrency = sum of the "
        "decode tasks' wall times / their span (per-block start/end times from the stats).",
        "",
        "| variant | slices/s | vs (a) x cores | tasks | concurrency | timed s = before 1st task + task span + after last |",
        "|---|---:|---:|---:|---:|---|",
        f"| (a) one process, one core: `read_bytes` + `preprocess_slice` | {fmt(single)} | {single / ideal:.0%} | | 1 | |",
    ]
    for spt, rate in single_decode.items():
        lines.append(f"| (a') `decode_studies` called in one process, no Ray, one core, {spt} studies/call | {fmt(rate)} | {rate / ideal:.0%} | | 1 | |")
    lines.append(f"| (c) {len(cores)} plain processes, one pinned per core, no Ray | {fmt(plain)} | {plain / ideal:.0%} | | {len(cores)} | |")
    for r in sorted(cpu_rows, key=lambda r: (not r["reservation"], r["spt"])):
        what = "reservation on (Ray Data's default; `score.reserve_operator_resources: true`)" if r["reservation"] else "reservation off (`score_job`'s default)"
        t = r["timing"]
        lines.append(
            f"| (b) Ray Data, {r['spt']} studies/task, {what} | {fmt(r['rate'])} ({fmt(r['min'])}-{fmt(r['max'])}) | "
            f"**{r['rate'] / ideal:.0%}** | {t['tasks']} | {t['concurrency']:.2f} | "
            f"{t['seconds']:.2f} = {t['lead']:.2f} + {t['span']:.2f} + {t['tail']:.2f} |"
        )
    bt = best["timing"]
    per_task_rate = n / bt["wall_sum"]
    lines += [
        "",
        f"`ds.stats()` of the median default run with {best['spt']} studies/task, decode operator:",
        "",
        "```",
        *decode_section(stats_lines),
        "```",
    ]
    if e2e_rows:
        lines += [
            "",
            f"**End to end**: `score_job` (Ray already up; manifest from the index above, so no indexing; 1 model "
            f"actor on CPU, `cpus_per_actor={args.cpus_per_actor:g}`, `studies_per_task={args.e2e_studies_per_task}`, "
            f"`studies_per_batch={args.studies_per_batch}`, `cnn_chunk={args.cnn_chunk}`; untrained 1-fold bundle "
            f"`init_bundle(..., backbone, input_size={args.size})`), one run per row, vs the bare model: "
            "`StudyScorer.score` on the same studies pre-decoded to uint8, same batches, in this process at "
            f"{e2e_rows[0]['threads']} torch thread(s) (`torch.get_num_threads()` inside a Ray actor with "
            f"`num_cpus={args.cpus_per_actor:g}`; OMP_NUM_THREADS={e2e_rows[0].get('omp')}), bundle load and one "
            "warm-up call not timed; run before and after the jobs, mean used. *score_job* = the whole call "
            "(manifest read, actor start + bundle load, decode, score, result tables, Parquet writes, commit). "
            "*pipeline* = the decode -> actor `materialize` inside it. *model stage* = first actor batch start to "
            "last actor batch end (actor start-up excluded; the actor was busy in all of it: sum of batch times / "
            "window = "
            + ", ".join(sorted({f"{r['busy']:.0%}" for r in e2e_rows}))
            + "). Per-stage times inside the actor from `DataContext.per_stage_map_timing` (stats only).",
            "",
            "| backbone | `cpus_per_decode_task` | decode runs | bare model slices/s (2 runs) | score_job slices/s (s) | pipeline slices/s (s) | 1st model batch after (s) | model stage slices/s (s) | decode inside the actor (s) | **model stage / bare** | score_job / bare |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in e2e_rows:
            inside = f"{r['stage_sums'][0]:.1f}" if r["fused"] and r["stage_sums"] else "0"
            lines.append(
                f"| {r['backbone']} | {r['dcpu']:g} | {'fused into the model actor' if r['fused'] else 'own tasks'} | "
                f"{fmt(r['bare'], 1)} ({fmt(r['bare_runs'][0], 1)}, {fmt(r['bare_runs'][1], 1)}) | "
                f"{fmt(n / r['wall'], 1)} ({r['wall']:.1f}) | {fmt(n / r['pipeline'], 1)} ({r['pipeline']:.1f}) | "
                f"{r['startup']:.1f} | {fmt(n / r['window'], 1)} ({r['window']:.1f}) | {inside} | "
                f"**{n / r['window'] / r['bare']:.1%}** | {n / r['wall'] / r['bare']:.0%} |"
            )

    notes = ["", "Notes (each from this run's numbers above):"]
    cpu_met = best["rate"] / ideal >= 0.70
    notes.append(
        f"- CPU stage target (Ray >= 70% of (a) x {len(cores)} cores): **{'met' if cpu_met else 'not met'}** with "
        f"Ray Data's default reservation: best {fmt(best['rate'])} slices/s = {best['rate'] / ideal:.0%} "
        f"({best['spt']} studies/task). {len(cores)} plain processes reach {plain / ideal:.0%}, so the machine "
        "itself scales across its cores."
    )
    notes.append(
        "- Where the time goes, 1: concurrency. With Ray Data's default operator resource reservation "
        "(`op_resource_reservation_enabled=True`, ratio 0.5) the decode tasks ran "
        + ("about one at a time " if bt["concurrency"] < 1.25 else "")
        + f"(concurrency {bt['concurrency']:.2f} on {args.cpus} CPUs). With it off "
        f"(`DataContext.op_resource_reservation_enabled = False`) "
        f"concurrency is {best_off['timing']['concurrency']:.2f} and the stage gives {fmt(best_off['rate'])} "
        f"slices/s = {best_off['rate'] / ideal:.0%} ({best_off['spt']} studies/task). `score_job` turns it off by default (`score.reserve_operator_resources: false`), so its CPU stage is the 'off' rows."
    )
    dec = statistics.median(single_decode.values())
    notes.append(
        f"- Where the time goes, 2: work per slice. Inside Ray the decode tasks ran at {fmt(per_task_rate)} slices/s "
        f"each (slices / sum of task wall times, best default run) against {fmt(single)} for the bare loop (a) and "
        f"{fmt(dec)} for `decode_studies` called without Ray (a'). So `decode_studies` itself adds "
        f"{max(0.0, 1000 / dec - 1000 / single):.3f} ms per slice to the {1000 / single:.3f} ms of read + "
        f"`preprocess_slice`, and running it as a Ray Data task adds {max(0.0, 1000 / per_task_rate - 1000 / dec):.3f} ms "
        "per slice more (inside the task: not broken down here)."
    )
    fixed = bt["lead"] + bt["tail"]
    fixed_off = best_off["timing"]["lead"] + best_off["timing"]["tail"]
    notes.append(
        f"- Where the time goes, 3: outside the tasks. Before the first decode task starts plus after the last one "
        f"ends: {fixed:.2f} s of {bt['seconds']:.2f} s ({fixed / bt['seconds']:.0%}) in the best default run, "
        f"{fixed_off:.2f} s of {best_off['timing']['seconds']:.2f} s ({fixed_off / best_off['timing']['seconds']:.0%}) "
        "with the reservation off; the rest is the task span, where concurrency and per-task speed decide."
    )
    notes.append(
        f"- What would close the CPU gap: first, let the decode tasks run concurrently (reservation off: "
        f"{best['rate'] / ideal:.0%} -> {best_off['rate'] / ideal:.0%} here); then the per-task rate "
        f"({fmt(per_task_rate)} vs {fmt(single)} slices/s per core) decides the rest."
    )
    for r in e2e_rows:
        ratio = n / r["window"] / r["bare"]
        line = (
            f"- {r['backbone']}, `cpus_per_decode_task={r['dcpu']:g}`: model stage = {ratio:.1%} of the bare model, "
            + ("target >= 90% met" if ratio >= 0.90 else "**target >= 90% not met**")
            + f". The whole `score_job` call = {n / r['wall'] / r['bare']:.0%} of bare: the first model batch starts "
            f"{r['startup']:.1f} s into the pipeline (actor start + bundle load"
            + ("" if r["fused"] else " + the first decode task")
            + f") and {r['wall'] - r['pipeline']:.1f} s go to the manifest read, result tables, Parquet writes and commit."
        )
        if r["fused"] and r["stage_sums"]:
            line += (
                f" Ray Data fused `decode_studies` into the actor operator "
                f"(`{next(o for o in r['ops'] if 'StudyScoringActor' in o)}`): both ask for `num_cpus={r['dcpu']:g}` "
                "and no GPU, so their remote args match, and the decode runs inside the model actor before each "
                f"block: {r['stage_sums'][0]:.1f} s of decode and {r['stage_sums'][1]:.1f} s of "
                "`StudyScoringActor` calls in the actor, while the CPU reserved for decode tasks stays unused."
            )
        elif r["decode"]:
            line += (
                f" Decode ran in its own {r['decode']['tasks']} tasks ({r['decode']['wall_sum']:.1f} s in all) next to "
                f"the actor; the actor was inside a batch {r['busy']:.0%} of the model-stage window"
                + (", so the model did not wait for data between batches." if r["busy"] >= 0.97 else ".")
            )
        notes.append(line)
    if e2e_rows:
        spread = max(abs(r["bare_runs"][0] - r["bare_runs"][1]) / r["bare"] for r in e2e_rows)
        starts = [r["startup"] for r in e2e_rows]
        notes.append(
            f"- Noise: the two bare-model runs of a backbone differ by up to {spread:.0%}, and each `score_job` row is "
            "one run, so differences between rows smaller than that are within run-to-run noise here."
        )
        notes.append(
            f"- The whole-call figures (`score_job / bare`) are lower mainly because the first model batch starts "
            f"{min(starts):.1f}-{max(starts):.1f} s into the pipeline, on runs of "
            f"{min(r['wall'] for r in e2e_rows):.0f}-{max(r['wall'] for r in e2e_rows):.0f} s. Loading the same bundle "
            f"in this process took {max(r['load_s'] for r in e2e_rows):.2f} s at most, so most of that is starting "
            "the actor's worker process and its imports (not broken down further here); it does not grow with the "
            "number of slices, so it weighs less on longer runs."
        )
    if any(r["fused"] for r in e2e_rows):
        notes.append(
            "- What would close the fused case: keep the two operators apart, e.g. `cpus_per_decode_task` different "
            "from `cpus_per_actor` (the other rows), or have `score_job` give the decode stage remote args that "
            "cannot match the actor's; then decode overlaps the model on the other core. With GPU actors "
            "(`num_gpus_per_actor > 0`) the args differ anyway (not measured here: no GPU)."
        )
    text = "\n".join(lines + notes)
    print()
    print(text)
    if args.write:
        write_section("score", "Scoring job: CPU stage and end to end (`bench/score.py`)", text)

if __name__ == "__main__":
    main()
