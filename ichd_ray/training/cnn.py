"""Stage 1: the per-slice CNN of one fold on Ray Train (DDP; gloo on CPU, nccl on GPU).

Data comes from Ray Data (:func:`ichd_ray.training.data.train_dataset`): each epoch draws
``samples_per_study x training studies`` slices, a random study then a random slice, read from the
decoded cache and augmented on CPU tasks. Each worker builds its epoch's dataset itself, one row per
step, every draw seeded by (``cnn.seed``, fold, epoch, rank, step) and the order kept, so the same
seed, data and machine give the same weights; each rank reads its share of the held-out fold straight
from the cache (:func:`ichd_ray.training.data.held_out_batches`). The loss is the class-weighted BCE of the challenge metric (``any`` x2);
AdamW with a linear warm-up and a cosine decay per step (:mod:`ichd_ray.training.schedule`); bf16
autocast on GPU. Every epoch ends with the held-out fold's weighted log loss and a checkpoint
(safetensors + JSON, see :mod:`ichd_ray.training.checkpoint`) under ``WORK/ray_train/cnn-fold<k>-<key>``.
A failed worker restarts the group from the last checkpoint (``FailureConfig``); a re-run of the same
command (same ``RunConfig(name, storage_path)``) resumes after a driver failure.

Artifacts are named by the fold's key (:func:`ichd_ray.training.keys.training_keys`: the CNN fields,
the cache's key, the fold assignment): ``WORK/cnn/fold<k>-<key>.safetensors`` and ``.json``. A fold is
reused only when a summary of the same key is there, and the Ray Train run carries the key in its name,
so a resumed run never continues another config's checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from ichd_ray import CLASS_WEIGHTS, CLASSES

from ichd_ray.io import storage
from ichd_ray.training.schedule import advance_to, warmup_cosine_schedule

__all__ = [
    "cnn_train_loop",
    "train_cnn_fold",
    "ray_run_config",
    "run_name",
    "cnn_weights_uri",
    "finished_fold",
    "fit_and_export",
    "epoch_seed",
]


def epoch_seed(*parts: int) -> int:
    """A 32-bit seed from integers (config seed, fold, epoch, rank, ...): torch's generator per epoch."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _all_reduce(values: np.ndarray) -> np.ndarray:
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
        dist.all_reduce(t)
        return t.numpy()
    return values


def _weighted_log_loss_from_sums(bce_sums: np.ndarray, count: float) -> float:
    """The challenge metric from per-class BCE sums: sum_c w_c * mean_c / sum_c w_c."""
    w = np.asarray(CLASS_WEIGHTS, dtype=np.float64)
    return float((w * bce_sums / max(count, 1.0)).sum() / w.sum())


def cnn_train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``config``: cnn (CnnSection dict), fold, input_size,
    normalization {mean, std}, steps_per_epoch, sampler (:func:`ichd_ray.training.data.sampler_inputs` of
    the training studies), prevalence (per class, training slices), run_uri and storage_config
    (checkpoint fallback, cache reads).

    Every random number is seeded: the weights by ``cnn.seed`` (the same start for every fold), each
    epoch's samples and augmentations by (seed, fold, epoch, rank, step), torch's generator (dropout)
    by (seed, fold, epoch, rank) at the start of each epoch, so a resumed epoch draws what it would have."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from ichd_ray.training.checkpoint import restore_train_state, save_train_state, unwrap
    from ichd_ray.models.sequence import masked_bce
    from ichd_ray.models.slice_cnn import SliceCNN
    from ichd_ray.training.data import held_out_batches, train_dataset

    cnn = config["cnn"]
    fold = int(config["fold"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if cnn["torch_threads"]:
        torch.set_num_threads(cnn["torch_threads"])
    # Every fold's CNN starts from the same weights (like the seeds' shared ImageNet start): sequence model
    # k trains on the other folds' CNN embeddings and scores CNN k's, so their feature spaces must agree.
    # From different random starts they do not (measured: BENCHMARKS.md, training section).
    torch.manual_seed(cnn["seed"])
    norm = config["normalization"]
    model = SliceCNN(
        cnn["backbone"], len(CLASSES), pretrained_path=cnn["pretrained_path"], drop_rate=cnn["drop_rate"],
        mean=norm["mean"], std=norm["std"],
    )
    if config.get("prevalence") is not None:
        # Head bias at the training prevalence: the first steps learn images, not the class priors
        # (from 0, every class starts at p = 0.5 against 1-12% positives).
        p = np.clip(np.asarray(config["prevalence"], dtype=np.float64), 1e-4, 1 - 1e-4)
        with torch.no_grad():
            model.head.bias.copy_(torch.from_numpy(np.log(p / (1 - p))).float())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cnn["lr"], weight_decay=cnn["weight_decay"])
    epochs, steps_per_epoch = cnn["epochs"], config["steps_per_epoch"]
    total_steps = epochs * steps_per_epoch
    start_epoch, history, resumed_from = 0, [], None
    state = restore_train_state(model, optimizer, config.get("run_uri"), config.get("storage_config"))
    if state is not None:
        start_epoch, history, resumed_from = state["epoch"] + 1, state["history"], state["epoch"]
    # Built after the restore, which it overrides (the groups hold the last lr used); fast-forwarded below.
    scheduler = warmup_cosine_schedule(optimizer, total_steps, cnn["lr"], cnn["warmup_fraction"], cnn["min_lr_fraction"])
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    cuda = device.type == "cuda"
    # This rank's share of the held-out studies, read straight from the cache each epoch: in study order,
    # so the sums are the same on every run, and no Ray Train dataset (its DatasetManager actor costs
    # ~15 s of start-up per fold on 2 cores; the held-out fold is small).
    world = ctx.get_world_size()
    val_studies = config["val"][rank::world]

    for epoch in range(start_epoch, epochs):
        model.train()
        torch.manual_seed(epoch_seed(cnn["seed"], fold, epoch, rank))
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        # Epoch e's first step is e x steps_per_epoch whatever came before: the resumed run's
        # fast-forward, and after a short epoch (unequal shards) the skipped steps' share of the curve.
        advance_to(scheduler, epoch * steps_per_epoch)
        lr = optimizer.param_groups[0]["lr"]
        train = train_dataset(
            config["sampler"], steps=steps_per_epoch, batch_size=cnn["batch_size"], size=config["input_size"],
            augment=cnn["augment"], seed=[cnn["seed"], fold, epoch, rank], cpus_per_task=cnn["cpus_per_data_task"],
            storage_config=config.get("storage_config"),
        )
        batches = train.iter_batches(batch_size=cnn["batch_size"], batch_format="numpy", drop_last=True, prefetch_batches=2)
        for i, batch in enumerate(batches):
            if i >= steps_per_epoch:  # equal shards make this a no-op; it bounds the schedule if not
                continue
            x = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(device, non_blocking=True)
            y = torch.from_numpy(np.ascontiguousarray(batch["label"])).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                _, logits = model(x)
            loss = masked_bce(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]  # this step's: the metric below is the epoch's last lr
            scheduler.step()
            loss_sum += float(loss) * len(x)
            seen += len(x)
        train_seconds = time.perf_counter() - started

        # Held-out fold: per-class BCE sums reduced over workers give the exact challenge metric.
        sums = np.zeros(len(CLASSES) + 1)
        if val_studies:
            net = unwrap(model).eval()  # no DDP in eval: shares may differ in length, nothing to sync
            with torch.no_grad():
                for batch in held_out_batches(val_studies, size=config["input_size"], storage_config=config.get("storage_config")):
                    x = torch.from_numpy(batch["image"]).to(device)
                    y = torch.from_numpy(batch["label"]).to(device)
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                        _, logits = net(x)
                    p = torch.sigmoid(logits.float()).clamp(1e-15, 1 - 1e-15)
                    bce = F.binary_cross_entropy(p, y, reduction="none").sum(dim=0)
                    sums[:-1] += bce.double().cpu().numpy()
                    sums[-1] += len(x)
        totals = _all_reduce(np.concatenate([sums, [loss_sum, seen]]))
        metrics = {
            "epoch": epoch,
            "train_loss": totals[-2] / max(totals[-1], 1),
            "val_weighted_log_loss": _weighted_log_loss_from_sums(totals[: len(CLASSES)], totals[len(CLASSES)]) if totals[len(CLASSES)] else None,
            "val_slices": int(totals[len(CLASSES)]),
            "lr": lr,
            "train_samples_per_s": totals[-1] / train_seconds if train_seconds > 0 else 0.0,
            "resumed_from_epoch": resumed_from,
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory() as directory:
            ckpt = None
            if rank == 0:
                save_train_state(directory, model, optimizer, {"epoch": epoch, "history": history})
                ckpt = ray.train.Checkpoint.from_directory(directory)
            ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=ckpt)


def ray_run_config(work_uri: str, name: str, max_failures: int, storage_config: storage.StorageConfig | None):
    """``RunConfig(name, storage_path)`` under ``WORK/ray_train``: the same call resumes the same run."""
    import ray.train

    scheme, _ = storage.parse_uri(work_uri)
    base = storage.join(work_uri, "ray_train")
    if scheme == "file":
        path, fs = os.path.abspath(storage.parse_uri(base)[1]), None
    else:
        fs, path = storage.filesystem(base, storage_config)
    return ray.train.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
    )


def run_name(stage: str, fold: int, key: str) -> str:
    """The Ray Train run of ``stage`` fold ``fold`` for artifact ``key``: ``<stage>-fold<k>-<key[:16]>``."""
    return f"{stage}-fold{fold}-{key[:16]}"


def ray_run_uri(work_uri: str, name: str) -> str:
    """Where Ray Train keeps run ``name``'s checkpoints (see :func:`ray_run_config`)."""
    return storage.join(work_uri, "ray_train", name)


def finished_fold(weights_uri: str, key: str, storage_config) -> dict[str, Any] | None:
    """The summary of a fold exported under ``key`` (a resumed or repeated run reuses it), else None.

    The summary must name the same full key: a file of another config never counts as done."""
    summary_uri = weights_uri.replace(".safetensors", ".json")
    if not (storage.exists(summary_uri, storage_config) and storage.exists(weights_uri, storage_config)):
        return None
    summary = json.loads(storage.read_bytes(summary_uri, storage_config))
    return summary if summary.get("key") == key else None


def fit_and_export(trainer, weights_uri: str, metadata: dict[str, str], summary: dict[str, Any], storage_config) -> dict[str, Any]:
    """Run a fold's trainer; export the last checkpoint's weights (safetensors) and the fold summary
    (``summary`` + ``weights_uri``, ``weights_sha256``, ``history``, ``seconds``) beside them. The
    summary is written last: it is what :func:`finished_fold` looks for (``summary["key"]``)."""
    import hashlib

    from safetensors.torch import load_file, save

    from ichd_ray.training.checkpoint import MODEL_FILE, STATE_FILE

    started = time.perf_counter()
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, STATE_FILE)) as fh:
            history = json.load(fh)["history"]
        weights = load_file(os.path.join(directory, MODEL_FILE))
    # One metadata entry (a sorted JSON string): safetensors writes a dict's entries in a per-process
    # random order, so the same weights would give other bytes, and another sha256, on every run.
    data = save(weights, metadata={"ichd_ray": json.dumps(metadata, sort_keys=True)})
    storage.write_bytes(weights_uri, data, storage_config)
    summary = {**summary, "weights_uri": weights_uri, "weights_sha256": hashlib.sha256(data).hexdigest(), "history": history,
               "seconds": time.perf_counter() - started}
    storage.write_bytes(weights_uri.replace(".safetensors", ".json"), json.dumps(summary, indent=1).encode(), storage_config)
    return summary


def cnn_weights_uri(work_uri: str, fold: int, key: str) -> str:
    """``WORK/cnn/fold<k>-<key[:16]>.safetensors`` (the summary is the ``.json`` beside it)."""
    return storage.join(work_uri, "cnn", f"fold{fold}-{key[:16]}.safetensors")


def train_cnn_fold(
    studies: list[dict[str, Any]],
    fold: int,
    cfg,
    work_uri: str,
    *,
    key: str,
    normalization: dict,
    storage_config: storage.StorageConfig | None = None,
) -> dict[str, Any]:
    """Train CNN ``fold`` on the other folds' studies; validate on fold ``fold`` every epoch.

    Args:
        studies: Cached training studies (:func:`ichd_ray.training.data.build_cache`), all folds.
        fold: The held-out fold.
        cfg: :class:`ichd_ray.config.train.TrainConfig`.
        work_uri: Work folder (checkpoints, final weights).
        key: The fold's artifact key (``training_keys(...)["cnn"][fold].key``): names the weights and
            the Ray Train run.
        normalization: ``{mean, std}`` of the CNN input.
        storage_config: Driver storage settings.

    Returns:
        dict: ``key``, ``weights_uri``, ``weights_sha256``, ``history`` (per-epoch metrics),
        ``seconds``, ``reused``. When weights of the same key exist (a resumed or repeated ``train
        all``) it returns them without training (``reused`` True).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from ichd_ray.training.data import sampler_inputs

    weights_uri = cnn_weights_uri(work_uri, fold, key)
    done = finished_fold(weights_uri, key, storage_config)
    if done is not None:
        return {**done, "reused": True}

    c = cfg.cnn
    train = [s for s in studies if s["fold"] != fold]
    held_out = [s for s in studies if s["fold"] == fold]
    workers_sc = storage_config.for_workers() if storage_config else None
    samples = c.samples_per_study * len(train)
    steps_per_epoch = samples // (c.num_workers * c.batch_size)
    if steps_per_epoch < 1:
        raise ValueError(
            f"cnn fold {fold}: {samples} samples per epoch cannot fill one batch of {c.batch_size} on each of "
            f"{c.num_workers} workers: raise cnn.samples_per_study or lower cnn.batch_size"
        )
    # The training samples are drawn by each worker (seeded per epoch and rank): only the held-out fold
    # goes through Ray Train's dataset sharding, where arrival order does not change the sums.
    name = run_name("cnn", fold, key)
    trainer = TorchTrainer(
        cnn_train_loop,
        train_loop_config={
            "cnn": json.loads(json.dumps(cfg.to_dict()["cnn"])),
            "fold": fold,
            "input_size": cfg.data.input_size,
            "normalization": normalization,
            "steps_per_epoch": steps_per_epoch,
            "sampler": sampler_inputs(train),
            # absolute: the worker reads these itself, and Ray Train runs it in another working directory
            "val": [{"cache_uri": storage.absolute(s["cache_uri"]), "n": int(s["n"]), "labels": np.asarray(s["labels"], np.uint8).tolist()}
                    for s in held_out],
            "prevalence": np.concatenate([np.asarray(s["labels"], np.float64) for s in train]).mean(axis=0).tolist(),
            "run_uri": ray_run_uri(work_uri, name),
            "storage_config": workers_sc,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}
        ),
        run_config=ray_run_config(work_uri, name, c.max_failures, storage_config),
    )
    summary = fit_and_export(
        trainer, weights_uri, {"kind": "cnn", "fold": str(fold), "backbone": c.backbone, "key": key},
        {"key": key, "fold": fold, "run": name, "train_studies": len(train), "val_studies": len(held_out),
         "steps_per_epoch": steps_per_epoch},
        storage_config,
    )
    return {**summary, "reused": False}
