"""Training checkpoints without pickles: weights and optimizer tensors in safetensors, the rest JSON.

A checkpoint folder holds ``model.safetensors``, ``optimizer.safetensors`` (every tensor of the
optimizer state, keyed ``<param index>.<name>``) and ``state.json`` (epoch, step, the optimizer's
param groups, metrics history). Loading never unpickles anything, so a checkpoint on shared storage
cannot run code (``torch.load`` of an untrusted file can).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["save_train_state", "load_train_state", "load_model_weights", "unwrap", "restore_train_state"]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def _load_tensors(directory: str, name: str) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint; anything else (a pickle, garbage) is refused unread."""
    try:
        return load_file(os.path.join(directory, name), device="cpu")
    except Exception as exc:
        raise ValueError(f"checkpoint {directory}: {name} is not valid safetensors: {exc}") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_train_state(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write the three checkpoint files into ``directory`` (which must exist)."""
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(weights, os.path.join(directory, MODEL_FILE))
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in opt["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    save_file(tensors, os.path.join(directory, OPTIMIZER_FILE))
    payload = {**state, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    with open(os.path.join(directory, STATE_FILE), "w") as fh:
        json.dump(payload, fh, allow_nan=False)


def load_model_weights(directory: str, model: nn.Module) -> None:
    unwrap(model).load_state_dict(_load_tensors(directory, MODEL_FILE), strict=True)


def load_train_state(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer from ``directory``; returns the JSON state (without the optimizer part)."""
    load_model_weights(directory, model)
    with open(os.path.join(directory, STATE_FILE)) as fh:
        state = json.load(fh)
    saved = state.pop("optimizer")
    tensors = _load_tensors(directory, OPTIMIZER_FILE)
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    for pid, entries in saved["scalars"].items():
        per_param.setdefault(int(pid), {}).update(entries)
    optimizer.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})
    return state


def _latest_stored_checkpoint(run_uri: str, storage_config: dict | None) -> str | None:
    """The newest complete checkpoint folder of a Ray Train run on storage (highest epoch in its state.json)."""
    from ichd_ray.io import storage

    config = storage.StorageConfig.on_worker(storage_config)
    best, best_epoch = None, -1
    for entry in storage.list_files(run_uri, suffix="/" + STATE_FILE, config=config):
        folder = entry.uri[: -len(STATE_FILE) - 1]
        if not os.path.basename(folder).startswith("checkpoint_"):
            continue
        try:
            epoch = json.loads(storage.read_bytes(entry.uri, config))["epoch"]
        except (OSError, ValueError, KeyError):
            continue  # a folder from a crashed upload: skip it
        if epoch > best_epoch:
            best, best_epoch = folder, epoch
    return best


def restore_train_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, run_uri: str | None = None, storage_config: dict | None = None
) -> dict[str, Any] | None:
    """Restore from Ray Train's checkpoint for this attempt, else from the newest one stored for the run.

    Ray Train's controller learns of a reported checkpoint when it next polls the workers (every 2 s);
    a worker that dies right after reporting leaves it on storage but unknown to the controller, which
    would restart the run from scratch. Looking on storage too loses nothing that was written.

    Returns:
        The JSON state of the restored checkpoint, or None when there is none (a fresh start).
    """
    import ray.train

    from ichd_ray.io import storage

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            return load_train_state(directory, model, optimizer)
    folder = _latest_stored_checkpoint(run_uri, storage_config) if run_uri else None
    if folder is None:
        return None
    config = storage.StorageConfig.on_worker(storage_config)
    with tempfile.TemporaryDirectory() as directory:
        for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
            with open(os.path.join(directory, name), "wb") as fh:
                fh.write(storage.read_bytes(storage.join(folder, name), config))
        return load_train_state(directory, model, optimizer)
