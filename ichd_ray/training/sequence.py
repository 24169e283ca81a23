"""Stage 3: the study sequence model of one fold on Ray Train.

Sequence model k trains on the out-of-fold embeddings and CNN logits of the studies outside fold k
(:mod:`ichd_ray.training.embed`) and validates on fold k, so at scoring time CNN k and sequence model k form a
pair that never saw fold k. Training uses random sub-sequences of ``window`` slices (1st place: random
24-slice windows) and the class-weighted BCE on both the slice outputs and the study output (the study
target is the max over the window's slice labels); validation runs on whole studies. Checkpoints,
resume and keyed artifacts (``WORK/sequence/fold<k>-<key>.safetensors``, run
``sequence-fold<k>-<key>``) work as for the CNN (:mod:`ichd_ray.training.cnn`).

Reproducible: every worker receives all rows and keeps its own share, assigned on the driver by
study order (not by arrival order); its shuffles and windows come from (seed, fold, rank, epoch), its
dropout from torch seeded by the same, so the same embeddings and seed give the same weights.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd

from ichd_ray import CLASSES

from ichd_ray.io import storage
from ichd_ray.training.schedule import advance_to, warmup_cosine_schedule

__all__ = ["sequence_rows", "seq_train_loop", "train_sequence_fold", "sequence_weights_uri", "predict_studies", "pad_studies"]

_C = len(CLASSES)
#: The sequence model's cosine ends at this fraction of ``sequence.lr`` (not a config field).
_MIN_LR_FRACTION = 0.02


def sequence_rows(embeddings: pd.DataFrame, manifest: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per study from an embeddings table: z-ordered float16 embeddings, CNN logits,
    positions, labels (``y_<class>`` of the training manifest) and fold, as compact bytes."""
    from ichd_ray.training.data import LABEL_COLUMNS

    labelled = manifest[manifest["fold"] >= 0].drop_duplicates("sop_uid").set_index("sop_uid")
    table = embeddings.sort_values(["study_uid", "slice_index"])
    rows = []
    for study_uid, group in table.groupby("study_uid", sort=True):
        emb = np.stack(group["embedding"].to_numpy()).astype(np.float16)
        logits = np.stack(group["cnn_logits"].to_numpy()).astype(np.float32)
        sops = group["sop_uid"].tolist()
        labels = labelled.loc[sops, LABEL_COLUMNS].to_numpy(dtype=np.uint8)
        rows.append(
            {
                "study_uid": study_uid,
                "fold": int(labelled.loc[sops[0], "fold"]),
                "n": len(sops),
                "dim": emb.shape[1],
                "emb": emb.tobytes(),
                "logits": logits.tobytes(),
                "positions": group["position_z"].astype(float).tolist(),
                "labels": labels.tobytes(),
                "sop_uids": sops,
            }
        )
    return rows


def _decode(row: dict[str, Any]) -> dict[str, np.ndarray]:
    n, dim = int(row["n"]), int(row["dim"])
    return {
        "emb": np.frombuffer(row["emb"], np.float16).reshape(n, dim),
        "logits": np.frombuffer(row["logits"], np.float32).reshape(n, _C),
        "positions": np.asarray(row["positions"], np.float64),
        "labels": np.frombuffer(row["labels"], np.uint8).reshape(n, _C),
    }


def pad_studies(studies: list[dict[str, np.ndarray]]):
    """Padded tensors (emb, logits, dz, mask, slice targets, study targets) for a list of studies."""
    import torch

    lengths = [len(s["emb"]) for s in studies]
    b, t, dim = len(studies), max(lengths), studies[0]["emb"].shape[1]
    emb = np.zeros((b, t, dim), np.float32)
    logits = np.zeros((b, t, _C), np.float32)
    dz = np.zeros((b, t), np.float32)
    y = np.zeros((b, t, _C), np.float32)
    for i, s in enumerate(studies):
        n = lengths[i]
        emb[i, :n], logits[i, :n], y[i, :n] = s["emb"], s["logits"], s["labels"]
        dz[i, 1:n] = np.diff(s["positions"])
    mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    study_y = y.max(axis=1)
    return tuple(torch.from_numpy(a) for a in (emb, logits, dz, mask, y, study_y))


def _window(study: dict[str, np.ndarray], window: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = len(study["emb"])
    if n <= window:
        return study
    start = int(rng.integers(0, n - window + 1))
    return {k: v[start : start + window] for k, v in study.items()}


def seq_train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``config``: sequence (SequenceSection dict), fold, embed_dim,
    rows (object ref of ``{"train", "val"}`` study rows), run_uri, storage_config. Each row names the rank
    it belongs to (``share``) and every worker keeps its own, in study order."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from ichd_ray.training.checkpoint import restore_train_state, save_train_state, unwrap
    from ichd_ray.models.sequence import SequenceConfig, SequenceModel, masked_bce
    from ichd_ray.training.cnn import _all_reduce, _weighted_log_loss_from_sums, epoch_seed

    c = config["sequence"]
    fold = int(config["fold"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(c["seed"] * 1000 + fold)

    def mine(part: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        return [_decode(r) for r in sorted((r for r in part if r["share"] == rank), key=lambda r: r["study_uid"])]

    # {"train", "val"}: every study row, each naming the rank it belongs to. Small (embeddings, not
    # pixels): read once, then every epoch works in memory.
    rows = ray.get(config["rows"])
    train, val = mine(rows["train"]), mine(rows["val"])
    del rows
    dim = config["embed_dim"]
    seq_cfg = SequenceConfig(**{k: c[k] for k in SequenceConfig.model_fields})
    model = SequenceModel.from_config(dim, seq_cfg, _C)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])
    start_epoch, history, resumed_from = 0, [], None
    state = restore_train_state(model, optimizer, config.get("run_uri"), config.get("storage_config"))
    if state is not None:
        start_epoch, history, resumed_from = state["epoch"] + 1, state["history"], state["epoch"]
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    steps = max(1, -(-len(train) // c["batch_size"]))
    epochs = c["epochs"]
    # Cosine decay per step to 2% of lr, no warm-up: the model is small and starts from scratch. Built
    # after the restore, which it overrides; fast-forwarded to each epoch's first step below.
    scheduler = warmup_cosine_schedule(optimizer, epochs * steps, c["lr"], min_lr_fraction=_MIN_LR_FRACTION)

    for epoch in range(start_epoch, epochs):
        model.train()
        # Per epoch, so a run resumed at epoch e draws what an uninterrupted one would have.
        rng = np.random.default_rng([c["seed"], fold, rank, epoch])
        torch.manual_seed(epoch_seed(c["seed"], fold, epoch, rank))
        started, loss_sum = time.perf_counter(), 0.0
        order = rng.permutation(len(train))
        advance_to(scheduler, epoch * steps)
        for i in range(steps):
            picked = [_window(train[j], c["window"], rng) for j in order[i * c["batch_size"] : (i + 1) * c["batch_size"]]]
            if not picked:  # equal shards: never, but an empty step must still join the all-reduce
                picked = [_window(train[int(rng.integers(len(train)))], c["window"], rng)]
            emb, logits, dz, mask, y, study_y = (t.to(device) for t in pad_studies(picked))
            slice_logits, study_logits = model(emb, logits, dz, mask)
            loss = masked_bce(slice_logits, y, mask) + masked_bce(study_logits, study_y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss)

        # Validate, report and checkpoint every `checkpoint_every` epochs and at the end: a report costs
        # about a second (the controller polls every 2 s), far more than an epoch of this small model.
        if (epoch + 1) % c["checkpoint_every"] and epoch != epochs - 1:
            continue
        sums = np.zeros(_C + 1)
        net = unwrap(model).eval()
        with torch.no_grad():
            for i in range(0, len(val), 32):
                emb, logits, dz, mask, y, _ = (t.to(device) for t in pad_studies(val[i : i + 32]))
                slice_logits, _ = net(emb, logits, dz, mask)
                p = torch.sigmoid(slice_logits[mask]).clamp(1e-15, 1 - 1e-15)
                sums[:-1] += F.binary_cross_entropy(p, y[mask], reduction="none").sum(dim=0).double().cpu().numpy()
                sums[-1] += int(mask.sum())
        totals = _all_reduce(np.concatenate([sums, [loss_sum, steps]]))
        metrics = {
            "epoch": epoch,
            "train_loss": totals[-2] / max(totals[-1], 1),
            "val_weighted_log_loss": _weighted_log_loss_from_sums(totals[:_C], totals[_C]) if totals[_C] else None,
            "val_slices": int(totals[_C]),
            "seconds": time.perf_counter() - started,
            "resumed_from_epoch": resumed_from,
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory() as directory:
            ckpt = None
            if rank == 0:
                save_train_state(directory, model, optimizer, {"epoch": epoch, "history": history})
                ckpt = ray.train.Checkpoint.from_directory(directory)
            ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=ckpt)


def sequence_weights_uri(work_uri: str, fold: int, key: str) -> str:
    """``WORK/sequence/fold<k>-<key[:16]>.safetensors`` (the summary is the ``.json`` beside it)."""
    return storage.join(work_uri, "sequence", f"fold{fold}-{key[:16]}.safetensors")


def _shares(rows: list[dict[str, Any]], workers: int, equal: bool) -> list[int]:
    """The rank each row (in study order) goes to; -1 for the remainder left out when every rank must
    take the same number of steps (the training rows)."""
    order = sorted(range(len(rows)), key=lambda i: rows[i]["study_uid"])
    usable = len(rows) - len(rows) % workers if equal else len(rows)
    share = [-1] * len(rows)
    for position, i in enumerate(order[:usable]):
        share[i] = position % workers
    return share


def train_sequence_fold(
    rows: list[dict[str, Any]],
    fold: int,
    cfg,
    work_uri: str,
    *,
    key: str,
    storage_config: storage.StorageConfig | None = None,
) -> dict[str, Any]:
    """Train sequence model ``fold`` on the other folds' study rows; validate on fold ``fold``.

    Args:
        key: The fold's artifact key (``training_keys(...)["sequence"][fold].key``).

    Returns:
        dict: ``key``, ``weights_uri``, ``weights_sha256``, ``history``, ``seconds``, ``reused``; a
        result of the same key is returned as is (``reused`` True).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from ichd_ray.training.cnn import finished_fold, fit_and_export, ray_run_config, ray_run_uri, run_name

    weights_uri = sequence_weights_uri(work_uri, fold, key)
    done = finished_fold(weights_uri, key, storage_config)
    if done is not None:
        return {**done, "reused": True}

    c = cfg.sequence
    train = [r for r in rows if r["fold"] != fold]
    held_out = [r for r in rows if r["fold"] == fold]
    if len(train) < c.num_workers:
        raise ValueError(f"sequence fold {fold}: {len(train)} training studies for {c.num_workers} workers")
    keep = ("study_uid", "n", "dim", "emb", "logits", "positions", "labels")

    def items(part, equal):
        return [{**{k: r[k] for k in keep}, "share": share} for r, share in zip(part, _shares(part, c.num_workers, equal))]

    # One object in the object store, not Ray Train datasets: every worker reads the rows and keeps the
    # ones assigned to its rank here, by study order (a dataset split follows arrival order), and no
    # DatasetManager actor starts for each fold (~15 s of start-up on 2 cores). Equal training shares:
    # every rank takes the same number of steps (DDP), like streaming_split(equal=True).
    rows_ref = ray.put({"train": items(train, True), "val": items(held_out, False)})
    name = run_name("sequence", fold, key)
    trainer = TorchTrainer(
        seq_train_loop,
        train_loop_config={
            "sequence": cfg.to_dict()["sequence"], "fold": fold, "embed_dim": int(rows[0]["dim"]), "rows": rows_ref,
            "run_uri": ray_run_uri(work_uri, name),
            "storage_config": storage_config.for_workers() if storage_config else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}
        ),
        run_config=ray_run_config(work_uri, name, c.max_failures, storage_config),
    )
    summary = fit_and_export(
        trainer, weights_uri, {"kind": "sequence", "fold": str(fold), "key": key},
        {"key": key, "fold": fold, "run": name, "train_studies": len(train), "val_studies": len(held_out)}, storage_config,
    )
    return {**summary, "reused": False}


def predict_studies(model, rows: list[dict[str, Any]], batch: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """(slice probabilities [T, 6], study probabilities [6]) per study row, whole studies, on the CPU."""
    import torch

    model = model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            studies = [_decode(r) for r in rows[i : i + batch]]
            emb, logits, dz, mask, _, _ = pad_studies(studies)
            slice_logits, study_logits = model(emb, logits, dz, mask)
            sp, tp = torch.sigmoid(slice_logits).numpy(), torch.sigmoid(study_logits).numpy()
            out += [(sp[j, : len(s["emb"])], tp[j]) for j, s in enumerate(studies)]
    return out
