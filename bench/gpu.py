"""The GPU path, measured: the bare CNN, ``StudyScorer.score`` and one DDP training step, on any device.

The CUDA code of the project (bf16 autocast, channels-last, pinned host memory, NCCL) only runs on a GPU
machine, which may have torch and timm but not Ray, pydicom or pyarrow. So the pixels are prepared
on a CPU machine and carried over, and this script imports nothing but torch, timm, numpy, safetensors
and the model modules of ``ichd_ray`` (``ichd_ray.io.storage`` is replaced by a stub where pyarrow is
missing: nothing here touches storage). The bundle and sequence configs are pydantic models; where the
GPU image lacks pydantic, ``make gpu-wheels`` downloads its wheels (CPython 3.12, manylinux) into
``.whl/``, to carry over and install with ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl``
and ``PYTHONPATH=/tmp/site``::

    # on the CPU machine (pydicom there: synthetic DICOM slices through ichd_ray.dicom.preprocess; else random)
    python bench/gpu.py --prepare bench_batches --size 512
    # on the GPU machine (densenet121 at 512, bf16, channels-last; --compile adds torch.compile)
    python bench/gpu.py --batches bench_batches --compile --out gpu.json
    # the tests: toy size on the CPU, 1 thread
    python bench/gpu.py --toy --device cpu --threads 1 --out toy.json

What is timed (warm-up, then a timed loop of at most ``--steps`` iterations or ``--seconds`` seconds,
synchronised at both ends; the whole run stays under ``--budget-s``, later phases are skipped past it):

* ``bare_fp32`` / ``bare_bf16``: ``SliceCNN`` forward (embedding + logits) on a uint8 batch already on
  the device, channels-last; fp32 (TF32 convolutions where cuDNN allows them, torch's default) and
  under bf16 autocast;
* ``bare_bf16_compiled``: the same after ``torch.compile`` (``--compile``); compile time reported;
* ``scorer`` / ``scorer_fp32``: ``StudyScorer.score`` on whole studies in host memory (its pinned
  host -> device copy, chunked CNN over every fold, sequence model, fold average), bf16 on CUDA as
  shipped; ``scorer_fp32`` with ``mixed_precision=False`` (CUDA only; on the CPU the scorer is fp32);
* ``train_step``: ``SliceCNN`` in ``DistributedDataParallel`` with world size 1 (NCCL on CUDA, gloo
  on the CPU), AdamW, bf16 autocast on CUDA, the class-weighted BCE, as ``train_cnn.cnn_train_loop``
  runs it; every step's loss must be finite (exit code 1 otherwise).

Output: a markdown table on stdout and, with ``--out``, JSON (device, versions, settings, per phase
slices/s, iterations, seconds, peak device memory). Exit code 0 when every phase that ran succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import socket
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the GPU machine gets the working tree, not an installed package

NUM_CLASSES = 6
META = "meta.json"


# ------------------------------------------------------------------------------------- imports


def _stub_storage(reason: str) -> None:
    """Stand-in for ``ichd_ray.io.storage`` where pyarrow is missing: ``ichd_ray.models`` imports the
    bundle module, which imports storage (for bundles on S3) at import time."""
    stub = types.ModuleType("ichd_ray.io.storage")
    stub.__doc__ = f"bench/gpu.py stub: the real module cannot be imported ({reason})"

    class StorageConfig:  # only named in annotations by the model modules
        pass

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"storage is not available in bench/gpu.py: {reason}")

    stub.StorageConfig = StorageConfig
    for name in ("join", "read_bytes", "write_bytes", "exists", "list_files", "filesystem"):
        setattr(stub, name, unavailable)
    import ichd_ray.io

    sys.modules["ichd_ray.io.storage"] = stub
    ichd_ray.io.storage = stub


def import_models() -> tuple[types.SimpleNamespace, str | None]:
    """The model classes, importing no Ray, pydicom or pyarrow; returns (namespace, why storage is stubbed)."""
    stubbed = None
    try:
        import ichd_ray.io.storage  # noqa: F401  (pyarrow)
    except ImportError as exc:
        stubbed = f"{type(exc).__name__}: {exc}"
        _stub_storage(stubbed)
    from ichd_ray.models.bundle import BundleConfig, LoadedBundle
    from ichd_ray.models.inference import StudyInput, StudyScorer
    from ichd_ray.models.sequence import SequenceConfig, SequenceModel, masked_bce
    from ichd_ray.models.slice_cnn import SliceCNN

    names = dict(
        BundleConfig=BundleConfig, LoadedBundle=LoadedBundle, StudyInput=StudyInput, StudyScorer=StudyScorer,
        SequenceConfig=SequenceConfig, SequenceModel=SequenceModel, masked_bce=masked_bce, SliceCNN=SliceCNN,
    )
    return types.SimpleNamespace(**names), stubbed


# ------------------------------------------------------------------------------------- batches


def prepare(directory: Path, size: int, studies: int, slices: int, seed: int) -> dict[str, Any]:
    """Write uint8 studies [T, 3, size, size] as ``study_<i>.npy`` plus ``meta.json`` (positions, source).

    With pydicom (a CPU machine with the project installed): synthetic DICOM studies from
    :mod:`ichd_ray.synthetic.generate`, ordered by position and windowed by :func:`ichd_ray.dicom.preprocess.preprocess_slice`,
    exactly the scoring job's pixels. Without: random uint8 (``source: random`` says so).
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries: list[dict[str, Any]] = []
    try:
        import tempfile

        import pydicom  # noqa: F401

        from ichd_ray.dicom.read import read_header
        from ichd_ray.dicom.preprocess import preprocess_slice
        from ichd_ray.synthetic.generate import SynthConfig, generate

        source = "synthetic_dicom"
        with tempfile.TemporaryDirectory() as tmp:
            os.environ.setdefault("ICHD_PATIENT_SALT", "bench-gpu")
            generate(tmp, SynthConfig(studies=studies, slices=slices, size=max(32, size), seed=seed, compressed_fraction=0.0))
            for i, folder in enumerate(sorted(p for p in Path(tmp).iterdir() if p.is_dir())):
                files = []
                for path in folder.glob("*.dcm"):
                    data = path.read_bytes()
                    files.append((read_header(data, name=path.name).position, data, path.name))
                files.sort(key=lambda f: f[0])
                images = np.empty((len(files), 3, size, size), dtype=np.uint8)
                for t, (_, data, name) in enumerate(files):
                    preprocess_slice(data, size, name=name, out=images[t])
                np.save(directory / f"study_{i:03d}.npy", images)
                entries.append({"file": f"study_{i:03d}.npy", "positions": [float(f[0]) for f in files]})
    except ImportError:
        source = "random"
        for i in range(studies):
            images = rng.integers(0, 256, size=(slices, 3, size, size), dtype=np.uint8)
            np.save(directory / f"study_{i:03d}.npy", images)
            entries.append({"file": f"study_{i:03d}.npy", "positions": [5.0 * t for t in range(slices)]})
    meta = {"source": source, "size": size, "studies": entries, "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    (directory / META).write_text(json.dumps(meta, indent=1))
    return meta


def load_batches(directory: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    meta = json.loads((directory / META).read_text())
    studies = []
    for entry in meta["studies"]:
        images = np.load(directory / entry["file"])
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise SystemExit(f"{directory / entry['file']}: expected uint8 [T, 3, S, S], got {images.dtype} {images.shape}")
        studies.append((images, np.asarray(entry["positions"], dtype=np.float64)))
    return studies, meta


def random_studies(size: int, studies: int, slices: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, 256, size=(slices, 3, size, size), dtype=np.uint8), np.arange(slices, dtype=np.float64) * 5.0)
        for _ in range(studies)
    ]


# ------------------------------------------------------------------------------------- timing


class Budget:
    """The whole run's time limit: a phase starts only if its estimate fits what is left."""

    def __init__(self, seconds: float) -> None:
        self.started = time.perf_counter()
        self.seconds = seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], items: int, device: torch.device, *, warmup: int, steps: int, seconds: float) -> dict[str, Any]:
    """``warmup`` calls, then calls until ``steps`` or ``seconds``; ``items`` slices (or samples) per call."""
    started = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    warmup_s = time.perf_counter() - started
    iters, t0 = 0, time.perf_counter()
    while iters < steps and (iters == 0 or time.perf_counter() - t0 < seconds):
        fn()
        iters += 1
    _sync(device)
    elapsed = time.perf_counter() - t0
    return {"iters": iters, "seconds": round(elapsed, 4), "warmup_s": round(warmup_s, 3), "slices_per_s": iters * items / elapsed}


@contextlib.contextmanager
def _peak_memory(device: torch.device, result: dict[str, Any]):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------- phases


def build_bundle(m: types.SimpleNamespace, args: argparse.Namespace, device: torch.device):
    """An untrained bundle in memory, built as ``init_bundle`` builds one (no storage)."""
    seq_config = m.SequenceConfig(proj_dims=(16, 8), hidden=8) if args.toy else m.SequenceConfig()
    models = []
    torch.manual_seed(args.seed)
    for _ in range(args.folds):
        cnn = m.SliceCNN(args.arch, NUM_CLASSES)
        seq = m.SequenceModel.from_config(cnn.num_features, seq_config, NUM_CLASSES)
        models.append((cnn.to(device).eval(), seq.to(device).eval()))
    config = m.BundleConfig(
        backbone=args.arch, embed_dim=models[0][0].num_features, input_size=args.size, folds=args.folds,
        sequence=seq_config, training={"state": "untrained", "made_by": "bench/gpu.py"},
    )
    return m.LoadedBundle(uri="memory://bench-gpu", config=config, models=models, bundle_sha256="")


def bare_phase(cnn: torch.nn.Module, batch: np.ndarray, device: torch.device, *, bf16: bool, args) -> dict[str, Any]:
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    @torch.inference_mode()
    def forward():
        with amp:
            emb, logits = cnn(x)
        return logits

    result: dict[str, Any] = {}
    with _peak_memory(device, result):
        result.update(timed(forward, len(batch), device, warmup=args.warmup, steps=args.steps, seconds=args.seconds))
        logits = forward().float()
    result["finite"] = bool(torch.isfinite(logits).all())
    return result


def scorer_phase(m, bundle, studies, device: torch.device, *, mixed_precision: bool, args) -> dict[str, Any]:
    scorer = m.StudyScorer(bundle, device, cnn_chunk=args.chunk, mixed_precision=mixed_precision)
    inputs = [m.StudyInput(images, positions, study_id=f"bench-{i}") for i, (images, positions) in enumerate(studies)]
    n = sum(len(s.images) for s in inputs)
    result: dict[str, Any] = {"studies_per_call": len(inputs)}
    with _peak_memory(device, result):
        result.update(timed(lambda: scorer.score(inputs), n, device, warmup=args.warmup, steps=args.steps, seconds=args.seconds))
    out = scorer.score(inputs)
    result["finite"] = all(np.isfinite(s.slice_probs).all() and np.isfinite(s.study_probs).all() for s in out)
    return result


def train_phase(m, batch: np.ndarray, device: torch.device, args) -> dict[str, Any]:
    """One-GPU DDP (world size 1) training steps as ``cnn_train_loop`` runs them."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cuda = device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0)
    try:
        torch.manual_seed(args.seed)
        model = m.SliceCNN(args.arch, NUM_CLASSES, drop_rate=0.2).to(device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=5e-4, weight_decay=2e-5)
        rng = np.random.default_rng(args.seed)
        images = np.ascontiguousarray(batch[: args.train_batch])
        labels = (rng.random((len(images), NUM_CLASSES)) < 0.15).astype(np.float32)
        losses: list[float] = []

        def step():
            x = torch.from_numpy(images).to(device, non_blocking=True)
            y = torch.from_numpy(labels).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                _, logits = ddp(x)
            loss = m.masked_bce(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))  # a host sync per step, as in the training loop

        ddp.train()
        result: dict[str, Any] = {"backend": backend, "world_size": dist.get_world_size(), "batch": len(images)}
        with _peak_memory(device, result):
            result.update(timed(step, len(images), device, warmup=args.warmup, steps=args.steps, seconds=args.seconds))
        result["samples_per_s"] = result.pop("slices_per_s")
        result["steps_per_s"] = result["iters"] / result["seconds"]
        result["first_loss"], result["loss"] = losses[0], losses[-1]
        result["finite"] = all(math.isfinite(v) for v in losses)
        return result
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------- report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"bench/gpu.py: {report['arch']} at {report['size']} px on {report['device_name']} "
        f"(torch {report['torch']}, timm {report['timm']}, data: {report['data_source']})",
        "",
        "| phase | slices/s | iterations | seconds | peak GiB | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in report["phases"].items():
        if "error" in r or "skipped" in r:
            lines.append(f"| {name} | - | - | - | - | {r.get('error') or r.get('skipped')} |")
            continue
        rate = r.get("slices_per_s", r.get("samples_per_s"))
        notes = []
        if name == "train_step":
            notes.append(f"{r['backend']} world size {r['world_size']}, batch {r['batch']}, {r['steps_per_s']:.2f} steps/s, loss {r['loss']:.4f}")
        if "compile_s" in r:
            notes.append(f"compile {r['compile_s']:.1f} s")
        if "studies_per_call" in r:
            notes.append(f"{r['studies_per_call']} studies per call, {report['folds']} fold(s)")
        if not r.get("finite", True):
            notes.append("NON-FINITE OUTPUT")
        lines.append(
            f"| {name} | {rate:,.1f} | {r['iters']} | {r['seconds']:.2f} | {r.get('peak_mem_gib', '-')} | {'; '.join(notes)} |"
        )
    lines.append("")
    lines.append(f"total {report['total_s']:.1f} s; batch {report['batch']}; channels-last; bf16 = torch.autocast(bfloat16)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--arch", default="densenet121", help="timm backbone (default densenet121)")
    p.add_argument("--size", type=int, default=512, help="network input side (default 512)")
    p.add_argument("--batch", type=int, default=64, help="slices per bare-model forward (default 64)")
    p.add_argument("--chunk", type=int, default=64, help="StudyScorer cnn_chunk (default 64)")
    p.add_argument("--folds", type=int, default=1, help="folds in the in-memory bundle (default 1)")
    p.add_argument("--train-batch", type=int, default=32, help="training batch (default 32, the cnn preset)")
    p.add_argument("--compile", action="store_true", help="also time the bare model under torch.compile")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--steps", type=int, default=500, help="at most this many timed iterations per phase")
    p.add_argument("--seconds", type=float, default=20.0, help="at most this long per timed loop (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip phases that would end past this (default 450)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--toy", action="store_true", help="tiny model (test_resnet) at 32 px, short loops: for the CPU tests")
    p.add_argument("--prepare", type=Path, metavar="DIR", help="write uint8 studies to DIR and exit (on a CPU machine)")
    p.add_argument("--prepare-studies", type=int, default=2)
    p.add_argument("--prepare-slices", type=int, default=32)
    p.add_argument("--batches", type=Path, metavar="DIR", help="read the studies --prepare wrote (else random uint8)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.toy:
        toy = {"arch": "test_resnet", "size": 32, "batch": 8, "chunk": 8, "train_batch": 4, "steps": 5, "seconds": 0.5,
               "warmup": 1, "prepare_slices": 6}
        for key, value in toy.items():
            if getattr(args, key) == p.get_default(key):  # flags given explicitly still win
                setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prepare:
        meta = prepare(args.prepare, args.size, args.prepare_studies, args.prepare_slices, args.seed)
        total = sum(len(s["positions"]) for s in meta["studies"])
        print(f"wrote {len(meta['studies'])} studies ({total} slices, {meta['source']}) at {args.size} px to {args.prepare}")
        return 0

    budget = Budget(args.budget_s)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"bench/gpu.py: --device {args.device} but torch sees no CUDA device", file=sys.stderr)
            return 2
        if device.index is None:  # set_device, DDP's device_ids and NCCL want an index
            device = torch.device("cuda", torch.cuda.current_device())
    m, stubbed = import_models()
    import timm

    if args.batches:
        studies, meta = load_batches(args.batches)
        source = meta["source"]
        if meta["size"] != args.size:
            print(f"note: {args.batches} holds {meta['size']} px studies; --size {args.size} -> {meta['size']}", file=sys.stderr)
            args.size = meta["size"]
    else:
        studies = random_studies(args.size, 2, max(args.chunk, 8) if args.toy else 32, args.seed)
        source = "random"
    pool = np.concatenate([images for images, _ in studies])
    batch = pool[np.arange(max(args.batch, args.train_batch)) % len(pool)]

    imported = sorted({name.split(".")[0] for name in sys.modules} & {"ray", "pydicom", "pyarrow"})
    report: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "python": platform.python_version(),
        "arch": args.arch,
        "size": args.size,
        "batch": args.batch,
        "chunk": args.chunk,
        "folds": args.folds,
        "data_source": source,
        "studies": [len(images) for images, _ in studies],
        "storage_stubbed": stubbed,
        "imported": imported,  # of ray / pydicom / pyarrow: what this run had to import (ideally nothing)
        "phases": {},
    }
    phases: dict[str, dict[str, Any]] = report["phases"]
    bundle = build_bundle(m, args, device)
    cnn = bundle.models[0][0].to(memory_format=torch.channels_last)
    # A phase is started only when a timed loop and a margin still fit in the budget.
    need = args.seconds + 15.0 if not args.toy else 0.0

    def run(name: str, fn: Callable[[], dict[str, Any]], extra: float = 0.0) -> None:
        if budget.left < need + extra:
            phases[name] = {"skipped": f"time budget ({budget.left:.0f} s left of {args.budget_s:.0f})"}
            return
        try:
            phases[name] = fn()
        except Exception as exc:  # record and go on: one failing phase must not hide the others' figures
            phases[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  {name}: {json.dumps(phases[name])}", file=sys.stderr, flush=True)

    run("bare_fp32", lambda: bare_phase(cnn, batch[: args.batch], device, bf16=False, args=args))
    run("bare_bf16", lambda: bare_phase(cnn, batch[: args.batch], device, bf16=True, args=args))
    run("scorer", lambda: scorer_phase(m, bundle, studies, device, mixed_precision=True, args=args))
    if device.type == "cuda":
        def scorer_fp32() -> dict[str, Any]:
            # As a bundle loaded for mixed_precision=False would be: the CNNs in the default memory format.
            for net, _ in bundle.models:
                net.to(memory_format=torch.contiguous_format)
            try:
                return scorer_phase(m, bundle, studies, device, mixed_precision=False, args=args)
            finally:
                for net, _ in bundle.models:
                    net.to(memory_format=torch.channels_last)

        run("scorer_fp32", scorer_fp32)
    run("train_step", lambda: train_phase(m, batch, device, args))
    if args.compile:
        def compiled() -> dict[str, Any]:
            started = time.perf_counter()
            fast = torch.compile(cnn, backend=args.compile_backend)
            x = torch.from_numpy(np.ascontiguousarray(batch[: args.batch])).to(device).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                fast(x)
            _sync(device)
            compile_s = time.perf_counter() - started
            result = bare_phase(fast, batch[: args.batch], device, bf16=True, args=args)
            result["compile_s"] = round(compile_s, 2)
            result["backend"] = args.compile_backend
            return result

        run("bare_bf16_compiled", compiled, extra=0.0 if args.toy else 90.0)

    report["total_s"] = round(time.perf_counter() - budget.started, 2)
    print(markdown(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    failed = [n for n, r in phases.items() if "error" in r or not r.get("finite", True)]
    if failed:
        print(f"FAILED phases: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
