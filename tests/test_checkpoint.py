"""ichd_ray.training.checkpoint: safetensors + JSON training checkpoints, exact resume, the newest stored
checkpoint of a run, and refusal of anything that is not safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ichd_ray.training.checkpoint import (
    _latest_stored_checkpoint,
    load_model_weights,
    load_train_state,
    restore_train_state,
    save_train_state,
    unwrap,
)

pytestmark = pytest.mark.timeout(60)


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def _steps(model, opt, xs):
    for x in xs:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _xs(n: int) -> list[torch.Tensor]:
    return [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _trained(seed: int = 0, steps: int = 2):
    model = _net(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _steps(model, opt, _xs(steps))
    return model, opt


def test_checkpoint_resume_continues_exactly(tmp_path):
    """Stopping after 2 steps and resuming from the safetensors checkpoint gives the same weights as 4 steps."""
    xs = _xs(4)
    ref = _net()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    _steps(ref, ref_opt, xs)

    first = _net()
    opt = torch.optim.AdamW(first.parameters(), lr=1e-2, weight_decay=0.1)
    _steps(first, opt, xs[:2])
    save_train_state(str(tmp_path), first, opt, {"epoch": 3, "history": [{"loss": 1.5}]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]

    resumed = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    state = load_train_state(str(tmp_path), resumed, resumed_opt)
    assert state == {"epoch": 3, "history": [{"loss": 1.5}]}
    _steps(resumed, resumed_opt, xs[2:])
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_files_hold_tensors_and_json(tmp_path):
    model, opt = _trained()
    save_train_state(str(tmp_path), model, opt, {"epoch": 1, "step": 2})
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert set(weights) == set(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(weights[name], value)
    optimizer = load_file(str(tmp_path / "optimizer.safetensors"))
    n_params = len(list(model.parameters()))  # 6: two Linear and one LayerNorm, weight + bias each
    assert set(optimizer) == {f"{i}.{k}" for i in range(n_params) for k in ("step", "exp_avg", "exp_avg_sq")}
    assert torch.equal(optimizer["0.exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    state = json.loads((tmp_path / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 2)
    (group,) = state["optimizer"]["param_groups"]
    assert (group["lr"], group["weight_decay"], group["params"]) == (1e-2, 0.1, list(range(n_params)))


def test_load_model_weights_only_and_strictly(tmp_path):
    model, opt = _trained(seed=1)
    save_train_state(str(tmp_path), model, opt, {"epoch": 0})
    fresh = _net(seed=2)
    assert not torch.equal(fresh[0].weight, model[0].weight)
    load_model_weights(str(tmp_path), fresh)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        load_model_weights(str(tmp_path), torch.nn.Sequential(torch.nn.Linear(4, 3)))


def test_unwrap_returns_a_plain_module_itself():
    model = _net()
    assert unwrap(model) is model
    # A module that merely has a `.module` attribute is not a DDP wrapper.
    holder = torch.nn.Module()
    holder.module = model
    assert unwrap(holder) is holder


@pytest.mark.parametrize("target", ["model.safetensors", "optimizer.safetensors"])
@pytest.mark.parametrize("content", ["text", "torch_save"])
def test_a_file_that_is_not_safetensors_is_refused(tmp_path, target, content):
    model, opt = _trained()
    save_train_state(str(tmp_path), model, opt, {"epoch": 0})
    if content == "text":
        (tmp_path / target).write_text("not a checkpoint\n")
    else:  # the usual mistake: a torch.save'd state dict under the safetensors name
        torch.save(model.state_dict(), tmp_path / target)
    victim = _net(seed=3)
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    with pytest.raises(ValueError, match=rf"checkpoint .*: {target} is not valid safetensors"):
        load_train_state(str(tmp_path), victim, torch.optim.AdamW(victim.parameters()))
    if target == "model.safetensors":  # refused before anything was loaded
        for name, value in victim.state_dict().items():
            assert torch.equal(value, before[name])


def test_a_missing_weights_file_is_refused(tmp_path):
    model, opt = _trained()
    save_train_state(str(tmp_path), model, opt, {"epoch": 0})
    (tmp_path / "optimizer.safetensors").unlink()
    with pytest.raises(ValueError, match="optimizer.safetensors is not valid safetensors"):
        load_train_state(str(tmp_path), model, opt)


# ------------------------------------------------------------------------- stored checkpoints


def _store_run(run):
    """A Ray Train run folder: epochs 0 and 2 complete, a newer one whose state.json is torn, one without an
    epoch, and a folder that is not a checkpoint at all. Returns the models saved at epochs 0 and 2."""
    saved = {}
    for name, epoch in (("checkpoint_000000", 0), ("checkpoint_000001", 2)):
        folder = run / name
        folder.mkdir(parents=True)
        model, opt = _trained(seed=epoch, steps=epoch + 1)
        save_train_state(str(folder), model, opt, {"epoch": epoch, "history": [epoch]})
        saved[epoch] = model
    torn = run / "checkpoint_000002"
    torn.mkdir()
    (torn / "state.json").write_text('{"epoch": 9, "hist')  # a crashed upload
    no_epoch = run / "checkpoint_000003"
    no_epoch.mkdir()
    (no_epoch / "state.json").write_text('{"step": 40}')
    other = run / "tmp_upload"
    other.mkdir()
    (other / "state.json").write_text('{"epoch": 99}')
    return saved


def test_latest_stored_checkpoint_is_the_highest_complete_epoch(tmp_path):
    run = tmp_path / "ray_train" / "cnn-fold0"
    _store_run(run)
    assert _latest_stored_checkpoint(str(run), None) == str(run / "checkpoint_000001")
    assert _latest_stored_checkpoint("file://" + str(run), None) == "file://" + str(run / "checkpoint_000001")
    assert _latest_stored_checkpoint(str(tmp_path / "no-such-run"), None) is None


def test_restore_train_state_loads_the_newest_stored_checkpoint(tmp_path, monkeypatch):
    import ray.train

    run = tmp_path / "ray_train" / "cnn-fold0"
    saved = _store_run(run)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)  # no Ray Train checkpoint: look on storage
    model = _net(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert restore_train_state(model, opt, str(run), None) == {"epoch": 2, "history": [2]}
    for a, b in zip(saved[2].parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["state"][0]["step"].item() == 3  # the optimizer resumed too (3 steps taken)
    assert restore_train_state(model, opt, str(tmp_path / "empty"), None) is None  # a fresh start
    assert restore_train_state(model, opt, None, None) is None
