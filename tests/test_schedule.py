"""The lr schedule (:mod:`ichd_ray.training.schedule`): torch's schedulers against the two hand-written
formulas they replaced, at every step, and a resumed run against one never interrupted."""

import math
import warnings

import numpy as np
import pytest
import torch

from ichd_ray.training.checkpoint import load_train_state, save_train_state
from ichd_ray.training.schedule import advance_to, warmup_cosine_schedule, warmup_steps

REL = 1e-12


# Frozen copy, verbatim, of ichd_ray.training.cnn.lr_at as it was before the schedule moved to torch's schedulers.
def lr_at(step: int, total: int, peak: float, warmup_fraction: float, min_fraction: float) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up, then cosine from ``peak`` to ``min_fraction x peak``."""
    warmup = int(round(warmup_fraction * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = min_fraction * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def sequence_lr_at(step: int, total: int, peak: float) -> float:
    """Frozen copy of the sequence model's former inline schedule (seq_train_loop): step = epoch * steps + i,
    total = epochs * steps."""
    progress = step / total
    return peak * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * progress)))


def _optimizer(peak: float, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.zeros(2, requires_grad=True)]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=peak)


def _curve(optimizer, scheduler, steps: int) -> list[float]:
    """The lr of each of ``steps`` training steps, stepped as the training loops do (optimizer, then scheduler),
    and the lr after the last one."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return [*lrs, optimizer.param_groups[0]["lr"]]


def _rel(a: float, b: float) -> float:
    """Relative deviation of ``a`` from ``b`` (0 when both are 0: the end of a cosine to 0)."""
    return abs(a - b) / abs(b) if b else abs(a)


CASES = [
    # (total, warmup_fraction, min_lr_fraction, peak)
    (100, 0.1, 0.02, 1e-3),
    (37, 0.05, 0.02, 3e-3),  # the warm-up rounds to 2 steps
    (1, 0.0, 0.02, 5e-4),  # total = 1
    (1, 0.5, 0.02, 5e-4),  # round(0.5) = 0: no warm-up
    (1, 0.6, 0.0, 5e-4),  # the one step is the warm-up
    (2, 0.5, 0.0, 1.0),  # a one-step warm-up
    (3, 0.5, 0.3, 1.0),
    (10, 0.0, 0.0, 1.0),  # warmup_fraction = 0, down to 0
    (10, 0.3, 1.0, 1.0),  # min_lr_fraction = 1: flat after the warm-up
    (10, 0.0, 1.0, 2e-4),
    (10, 0.99, 0.02, 1.0),  # all warm-up but one step
    (2000, 0.05, 0.0, 5e-4),
    (5000, 0.25, 0.02, 5e-4),
    (10000, 0.05, 0.02, 5e-4),  # about the rsna1st recipe's CNN run (10 epochs of ~530 steps)
]


@pytest.mark.parametrize("total,warmup_fraction,min_fraction,peak", CASES)
def test_the_schedule_is_the_former_lr_at_at_every_step(total, warmup_fraction, min_fraction, peak):
    optimizer = _optimizer(peak, groups=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scheduler warnings in the training pattern
        scheduler = warmup_cosine_schedule(optimizer, total, peak, warmup_fraction, min_fraction)
        lrs = _curve(optimizer, scheduler, total)
    reference = [lr_at(s, total, peak, warmup_fraction, min_fraction) for s in range(total + 1)]
    worst = max(range(total + 1), key=lambda s: _rel(lrs[s], reference[s]))
    assert _rel(lrs[worst], reference[worst]) <= REL, (worst, lrs[worst], reference[worst])
    assert optimizer.param_groups[1]["lr"] == lrs[-1]  # every group follows
    w = warmup_steps(total, warmup_fraction)
    assert w == int(round(warmup_fraction * total))
    if w:  # the warm-up's ends: peak / w at step 0, peak at its last step and at the cosine's first
        assert lrs[0] == pytest.approx(peak / w, rel=REL) and lrs[w - 1] == pytest.approx(peak, rel=REL)
    else:
        assert lrs[0] == peak
    if w < total:  # the cosine's first step at peak; after the last step, the floor
        assert lrs[w] == pytest.approx(peak, rel=REL)
        assert lrs[total] == pytest.approx(min_fraction * peak, rel=REL, abs=1e-300)


def test_the_schedule_warms_up_then_decays_to_the_floor():
    optimizer = _optimizer(1e-3)
    lrs = _curve(optimizer, warmup_cosine_schedule(optimizer, 100, 1e-3, 0.1, 0.02), 100)[:100]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after the warm-up
    assert lrs[-1] == pytest.approx(2e-5, rel=0.05)


@pytest.mark.parametrize("epochs,steps,peak", [(30, 7, 1e-3), (40, 537, 3e-4), (1, 1, 1e-3)])
def test_the_schedule_is_the_former_sequence_schedule(epochs, steps, peak):
    optimizer = _optimizer(peak)
    lrs = _curve(optimizer, warmup_cosine_schedule(optimizer, epochs * steps, peak, min_lr_fraction=0.02), epochs * steps)
    for s in range(epochs * steps):
        assert _rel(lrs[s], sequence_lr_at(s, epochs * steps, peak)) <= REL, s


@pytest.mark.parametrize("total,warmup_fraction,min_fraction", [(200, 0.1, 0.02), (50, 0.0, 0.0), (7, 0.3, 1.0)])
def test_a_rebuilt_and_fast_forwarded_schedule_continues_the_same_curve(total, warmup_fraction, min_fraction):
    peak = 5e-4
    optimizer = _optimizer(peak)
    full = _curve(optimizer, warmup_cosine_schedule(optimizer, total, peak, warmup_fraction, min_fraction), total)
    w = warmup_steps(total, warmup_fraction)
    for k in sorted({0, 1, max(0, w - 1), w, w + 1, total // 2, total - 1, total}):
        fresh = _optimizer(peak)
        fresh.param_groups[0]["lr"] = 0.123  # whatever a checkpoint left there
        scheduler = warmup_cosine_schedule(fresh, total, peak, warmup_fraction, min_fraction)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fast-forward silences torch's step-order warning
            advance_to(scheduler, k)
        assert scheduler.last_epoch == k
        assert _curve(fresh, scheduler, total - k) == full[k:], k  # bit for bit


def _train_steps(model, optimizer, scheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        loss = model(torch.ones(1, 2)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return lrs


@pytest.mark.parametrize("old_format", [True, False])
def test_resuming_from_a_checkpoint_old_or_new_continues_the_same_curve(tmp_path, old_format):
    """As the CNN loop resumes: restore the optimizer, rebuild the schedule, advance to the epoch's first step.

    An old checkpoint (lrs set by hand with lr_at) holds the last step's lr and no ``initial_lr``; a new one
    holds the scheduler's next lr and ``initial_lr``. Both continue the uninterrupted curve exactly."""
    epochs, per_epoch, peak, warmup_fraction, min_fraction = 4, 5, 1e-2, 0.15, 0.02
    total, resume_epoch = epochs * per_epoch, 2
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak)
    full = _train_steps(model, optimizer, warmup_cosine_schedule(optimizer, total, peak, warmup_fraction, min_fraction), total)

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak)
    if old_format:  # the former loop: group["lr"] = lr_at(step, ...) before every step, no scheduler
        for step in range(resume_epoch * per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, peak, warmup_fraction, min_fraction)
            _train_steps(model, optimizer, None, 1)
        assert "initial_lr" not in optimizer.param_groups[0]
    else:
        scheduler = warmup_cosine_schedule(optimizer, total, peak, warmup_fraction, min_fraction)
        _train_steps(model, optimizer, scheduler, resume_epoch * per_epoch)
        assert optimizer.param_groups[0]["initial_lr"] == peak
    save_train_state(str(tmp_path), model, optimizer, {"epoch": resume_epoch - 1, "history": []})

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak)
    state = load_train_state(str(tmp_path), model, optimizer)
    scheduler = warmup_cosine_schedule(optimizer, total, peak, warmup_fraction, min_fraction)
    resumed = []
    for epoch in range(state["epoch"] + 1, epochs):
        advance_to(scheduler, epoch * per_epoch)
        resumed += _train_steps(model, optimizer, scheduler, per_epoch)
    assert resumed == full[resume_epoch * per_epoch :]


def test_a_short_epoch_does_not_shift_the_next_epochs_curve():
    """The CNN loop advances to epoch x steps_per_epoch at each epoch's start, as lr_at(step) indexed it."""
    total, per_epoch, peak = 30, 10, 1.0
    optimizer = _optimizer(peak)
    scheduler = warmup_cosine_schedule(optimizer, total, peak, 0.1, 0.02)
    _curve(optimizer, scheduler, 10)
    _curve(optimizer, scheduler, 7)  # epoch 1 ran 7 of its 10 steps
    advance_to(scheduler, 2 * per_epoch)
    lrs = _curve(optimizer, scheduler, per_epoch)[:-1]
    assert all(_rel(lr, lr_at(2 * per_epoch + i, total, peak, 0.1, 0.02)) <= REL for i, lr in enumerate(lrs))


def test_bad_arguments_are_refused():
    optimizer = _optimizer(1.0)
    for kwargs in [{"total_steps": 0}, {"peak_lr": 0.0}, {"warmup_fraction": -0.1}, {"warmup_fraction": 1.5},
                   {"min_lr_fraction": 1.1}, {"min_lr_fraction": -0.01}]:
        args = {"total_steps": 10, "peak_lr": 1.0, **kwargs}
        with pytest.raises(ValueError):
            warmup_cosine_schedule(optimizer, **args)
    scheduler = warmup_cosine_schedule(optimizer, 10, 1.0, 0.2)
    advance_to(scheduler, 5)
    with pytest.raises(ValueError, match="back"):
        advance_to(scheduler, 4)
