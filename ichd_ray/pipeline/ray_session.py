"""One place that starts or joins Ray for the CLI and the ``jobs/`` entrypoints."""

from __future__ import annotations

import logging
import os

import ray

from ichd_ray.config.job import RaySection

__all__ = ["init_ray", "NO_PREEMPTION_WATCHER"]

#: The environment variable (and value) that turns Ray Train's preemption watcher off, for local Ray.
NO_PREEMPTION_WATCHER = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def init_ray(section: RaySection | None = None) -> None:
    """Join the cluster named by ``section.address`` (or by ``RAY_ADDRESS``, as under
    ``ray job submit``), else start a local Ray with ``section.num_cpus`` CPUs. No-op when running."""

    if ray.is_initialized():
        return
    section = section or RaySection()
    quiet = {"logging_level": logging.WARNING}
    if section.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=section.address or None, **quiet)
    else:
        # Workers' INFO lines (Ray Train reports, Ray Data plans) stay in the session logs, not the terminal;
        # failures still reach the driver as exceptions.
        # address="local": a new Ray of our own, never a cluster some `ray start` left on this host.
        # Ray Train's preemption watcher (an actor per run, ~10 s of start-up on 2 cores) watches for nodes
        # being drained; the one node of a local Ray never is.
        os.environ.setdefault(NO_PREEMPTION_WATCHER[0], NO_PREEMPTION_WATCHER[1])
        ray.init(address="local", num_cpus=section.num_cpus, include_dashboard=False, log_to_driver=False, **quiet)
