"""Stage 3: the study sequence model of one fold on Ray Train.

Sequence model k trains on the out-of-fold embeddings and CNN logits of the studies outside fold k
(:mod:`ichd_ray.embed`) and validates on fold k, so at scoring time CNN k and sequence model k form a
pair that never saw fold k. Training uses random sub-sequences of ``window`` slices (1st place: random
24-slice windows) and the class-weighted BCE on both the slice outputs and the study output (the study
target is the max over the window's slice labels); validation runs on whole studies. Checkpoints and
resume work as for the CNN (:mod:`ichd_ray.train_cnn`).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd

from ichd_ray import CLASSES, storage

__all__ = ["sequence_rows", "seq_train_loop", "train_sequence_fold", "predict_studies", "pad_studies"]

_C = len(CLASSES)


def sequence_rows(embeddings: pd.DataFrame, manifest: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per study from an embeddings table: z-ordered float16 embeddings, CNN logits,
    positions, labels (``y_<class>`` of the training manifest) and fold, as compact bytes."""
    from ichd_ray.train_data import LABEL_COLUMNS

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
    """Runs on every Ray Train worker. ``config``: sequence (SequenceSection dict), fold, fault."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from ichd_ray.checkpoint import restore_train_state, save_train_state, unwrap
    from ichd_ray.models.sequence import SequenceConfig, SequenceModel, masked_bce
    from ichd_ray.train_cnn import _all_reduce, _fault_hook, _weighted_log_loss_from_sums

    c = config["sequence"]
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(c["seed"] * 1000 + config["fold"])
    rng = np.random.default_rng([c["seed"], config["fold"], rank])

    def load(name: str) -> list[dict[str, np.ndarray]]:
        shard = ray.train.get_dataset_shard(name)
        if shard is None:
            return []
        return [_decode(r) for batch in shard.iter_batches(batch_format="pyarrow") for r in batch.to_pylist()]

    # The shard is small (embeddings, not pixels): read it once, then every epoch works in memory.
    train, val = load("train"), load("val")
    dim = config["embed_dim"]
    seq_cfg = SequenceConfig(tuple(c["proj_dims"]), c["hidden"], c["num_layers"], c["rnn"], c["dropout"])
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

    for epoch in range(start_epoch, epochs):
        model.train()
        started, loss_sum = time.perf_counter(), 0.0
        order = rng.permutation(len(train))
        for i in range(steps):
            _fault_hook(config.get("fault"), epoch, i, rank)
            # cosine decay per step, no warm-up: the model is small and starts from scratch
            progress = (epoch * steps + i) / (epochs * steps)
            for group in optimizer.param_groups:
                group["lr"] = c["lr"] * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * progress)))
            picked = [_window(train[j], c["window"], rng) for j in order[i * c["batch_size"] : (i + 1) * c["batch_size"]]]
            if not picked:  # equal shards: never, but an empty step must still join the all-reduce
                picked = [_window(train[int(rng.integers(len(train)))], c["window"], rng)]
            emb, logits, dz, mask, y, study_y = (t.to(device) for t in pad_studies(picked))
            slice_logits, study_logits = model(emb, logits, dz, mask)
            loss = masked_bce(slice_logits, y, mask) + masked_bce(study_logits, study_y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
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


def sequence_weights_uri(work_uri: str, fold: int) -> str:
    return storage.join(work_uri, "sequence", f"fold{fold}.safetensors")


def train_sequence_fold(
    rows: list[dict[str, Any]],
    fold: int,
    cfg,
    work_uri: str,
    *,
    storage_config: storage.StorageConfig | None = None,
    fault: dict | None = None,
) -> dict[str, Any]:
    """Train sequence model ``fold`` on the other folds' study rows; validate on fold ``fold``.

    Returns:
        dict: ``weights_uri``, ``history``, ``seconds``; an existing result is returned as is.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from ichd_ray.train_cnn import finished_fold, fit_and_export, ray_run_config, ray_run_uri

    weights_uri = sequence_weights_uri(work_uri, fold)
    done = finished_fold(weights_uri, storage_config)
    if done is not None:
        return done

    c = cfg.sequence
    train = [r for r in rows if r["fold"] != fold]
    held_out = [r for r in rows if r["fold"] == fold]
    if len(train) < c.num_workers:
        raise ValueError(f"sequence fold {fold}: {len(train)} training studies for {c.num_workers} workers")
    keep = ("n", "dim", "emb", "logits", "positions", "labels")
    datasets = {
        "train": ray.data.from_items([{k: r[k] for k in keep} for r in train]),
        "val": ray.data.from_items([{k: r[k] for k in keep} for r in held_out]),
    }
    trainer = TorchTrainer(
        seq_train_loop,
        train_loop_config={
            "sequence": cfg.to_dict()["sequence"], "fold": fold, "embed_dim": int(rows[0]["dim"]), "fault": fault,
            "run_uri": ray_run_uri(work_uri, f"sequence-fold{fold}"),
            "storage_config": storage_config.for_workers() if storage_config else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}
        ),
        run_config=ray_run_config(work_uri, f"sequence-fold{fold}", c.max_failures, storage_config),
        datasets=datasets,
    )
    return fit_and_export(
        trainer, weights_uri, {"kind": "sequence", "fold": str(fold)},
        {"fold": fold, "train_studies": len(train), "val_studies": len(held_out)}, storage_config,
    )


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
