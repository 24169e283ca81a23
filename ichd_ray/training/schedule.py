"""The per-step learning-rate schedule of both training stages, built from torch's own schedulers.

Step ``s`` of ``total`` (0-based) trains at a linear warm-up ``peak * (s + 1) / w`` for the first
``w = round(warmup_fraction * total)`` steps, then a cosine from ``peak`` down towards
``min_lr_fraction * peak``: ``floor + (peak - floor) * (1 + cos(pi * (s - w) / (total - w))) / 2``.
It is torch's ``SequentialLR(LinearLR, CosineAnnealingLR)`` (``CosineAnnealingLR`` alone when
``w == 0``), stepped once after every optimizer step; the lr of step ``s`` is the optimizer's after
``s`` scheduler steps. It replaced two hand-written formulas (the CNN's ``lr_at``, the sequence
model's inline cosine) and matches them at every step to within 1e-12 relative (tests/test_schedule.py;
measured 3e-13 at worst over 100,000 steps with a floor > 0; the rsna preset's CNN runs about 5,000).
Only a cosine down to 0 over more than ~10,000 steps drifts further in its last steps (7e-12
relative, 1e-17 absolute, at 30,000): torch takes the angle as ``pi * t / T``, ``lr_at`` took
``pi * (t / T)``, and ``1 + cos`` near ``pi`` magnifies that last-bit difference.

A resumed run rebuilds the scheduler and steps it to the resumed step (:func:`advance_to`) rather
than saving it: the checkpoint format stays as it was (old checkpoints resume; new ones only gain
torch's ``initial_lr`` in the optimizer's param groups, which the rebuild overwrites), and the lrs
are bit-for-bit those of the run that was never interrupted.
"""

from __future__ import annotations

import warnings

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

__all__ = ["advance_to", "warmup_cosine_schedule", "warmup_steps"]

# torch warns when a scheduler's first step() comes before any optimizer.step(); fast-forwarding a
# resumed run does exactly that, on purpose.
_EARLY_STEP_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    """The number of warm-up steps: ``round(warmup_fraction * total_steps)`` (Python's round, half to even)."""
    return round(warmup_fraction * total_steps)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    peak_lr: float,
    warmup_fraction: float = 0.0,
    min_lr_fraction: float = 0.0,
) -> LRScheduler:
    """A linear warm-up to ``peak_lr``, then a cosine decay to ``min_lr_fraction * peak_lr``, per step.

    Sets every param group's ``lr`` and ``initial_lr`` to ``peak_lr`` first, so an optimizer just
    restored from a checkpoint (whose groups hold the last lr used, and ``initial_lr`` or not) starts
    the curve from its beginning; then call :func:`advance_to` with the resumed step.

    Args:
        optimizer (torch.optim.Optimizer): The optimizer whose param groups the schedule sets.
        total_steps (int): Optimizer steps in the whole run (epochs x steps per epoch), at least 1.
        peak_lr (float): The lr at the end of the warm-up and the start of the cosine (> 0).
        warmup_fraction (float): Fraction of ``total_steps`` spent warming up, in [0, 1]; the warm-up
            has :func:`warmup_steps` steps, step ``s`` of them at ``peak_lr * (s + 1) / w``.
        min_lr_fraction (float): The cosine's floor as a fraction of ``peak_lr``, in [0, 1].

    Returns:
        LRScheduler: ``SequentialLR(LinearLR, CosineAnnealingLR)``, or the ``CosineAnnealingLR`` alone
        without a warm-up. Call its ``step()`` after every ``optimizer.step()``; its ``last_epoch``
        is the number of steps taken. Defined for steps ``0 .. total_steps`` (at ``total_steps``
        the lr is the floor, unless every step was warm-up); stepping further restarts the cosine.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not peak_lr > 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr}")
    if not 0 <= warmup_fraction <= 1:
        raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
    if not 0 <= min_lr_fraction <= 1:
        raise ValueError(f"min_lr_fraction must be in [0, 1], got {min_lr_fraction}")
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = peak_lr
    # torch's own schedulers rather than a LambdaLR over a formula of ours: the curve then has one
    # implementation, the one torch documents and tests.
    warmup = warmup_steps(total_steps, warmup_fraction)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=min_lr_fraction * peak_lr)
    if warmup == 0:
        return cosine
    # Step s < w at peak * (1/w + (1 - 1/w) * s / (w - 1)) = peak * (s + 1) / w; a one-step warm-up
    # (w = 1) is the constant factor 1 (total_iters 1 only keeps the division defined).
    linear = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def advance_to(scheduler: LRScheduler, step: int) -> None:
    """Step ``scheduler`` until it has taken ``step`` steps (its ``last_epoch``): a resumed run's fast-forward.

    The same ``step()`` calls as the uninterrupted run, in the same order, so the same lrs to the bit
    (the cosine is recursive in torch: setting ``last_epoch`` directly would not give them).

    Args:
        scheduler (LRScheduler): A scheduler from :func:`warmup_cosine_schedule`.
        step (int): The step the next optimizer step is; not below the steps already taken.
    """
    if step < scheduler.last_epoch:
        raise ValueError(f"cannot move a schedule back from step {scheduler.last_epoch} to {step}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EARLY_STEP_WARNING, category=UserWarning)
        while scheduler.last_epoch < step:
            scheduler.step()
