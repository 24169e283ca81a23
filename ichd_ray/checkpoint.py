"""Training checkpoints without pickles: weights and optimizer tensors in safetensors, the rest JSON.

A checkpoint folder holds ``model.safetensors``, ``optimizer.safetensors`` (every tensor of the
optimizer state, keyed ``<param index>.<name>``) and ``state.json`` (epoch, step, the optimizer's
param groups, metrics history). Loading never unpickles anything, so a checkpoint on shared storage
cannot run code (``torch.load`` of an untrusted file can).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["save_train_state", "load_train_state", "load_model_weights", "unwrap"]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


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
    unwrap(model).load_state_dict(load_file(os.path.join(directory, MODEL_FILE), device="cpu"), strict=True)


def load_train_state(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer from ``directory``; returns the JSON state (without the optimizer part)."""
    load_model_weights(directory, model)
    with open(os.path.join(directory, STATE_FILE)) as fh:
        state = json.load(fh)
    saved = state.pop("optimizer")
    tensors = load_file(os.path.join(directory, OPTIMIZER_FILE), device="cpu")
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    for pid, entries in saved["scalars"].items():
        per_param.setdefault(int(pid), {}).update(entries)
    optimizer.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})
    return state
