"""List an archive in parallel: one delimiter listing of the top, then its key prefixes in Ray tasks.

Why: ListObjectsV2 returns at most 1,000 keys per request and each page needs the previous page's
continuation token, so :func:`ichd_ray.io.storage.list_files` lists a prefix as one sequential chain of
requests: 40 M objects are 40,000 requests, about an hour at ~80 ms each, before the nightly job has
read a single header. Different prefixes have independent chains, so the archive is split along its
"directories" and the chains run side by side:

1. one delimiter listing (``Delimiter='/'``) of the archive gives the objects at its top level and its
   child prefixes (S3 CommonPrefixes; local subdirectories, so local archives take the same path);
2. while there are fewer than ``min_prefixes`` of them, and at most down to ``max_depth``, the children
   are listed the same way to get more fan-out (``ct/`` with 3 scanner folders -> their series folders);
3. the prefixes are listed recursively in Ray tasks, ``prefixes_per_task`` each; a task hands back an
   Arrow table (four columns, not a Python object per file), so 40 M rows stay ~5 GB on the driver;
4. the level entries and the tasks' tables are concatenated and sorted by URI.

The split follows the key layout: objects sitting flat in one prefix have one chain whatever is done
here (they are listed on the driver, as ``list_files`` would). The gain is up to the number of prefixes
over the tasks running at once (``TASK_CPUS`` each), less one request per prefix and per descended level.

The result has exactly the rows of ``storage.list_files(archive_uri)``: every key under the archive is
either at a listed level or under exactly one of the prefixes handed to tasks, and the conversion,
exclusions (directory markers, temporaries of in-flight local writes) and the single-object and empty
cases are storage's own. A listing failure anywhere raises, naming the prefix: a partial listing would
make the nightly diff mark the missing objects deleted.

The Ray part is thin: what runs in a task is :func:`ichd_ray.io.storage.list_files_table`. Tasks get
storage settings without credentials (:meth:`StorageConfig.for_workers`); workers take theirs from
their own environment. Without Ray (or ``parallel=False``) this is ``list_files`` as a table.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pyarrow as pa
import ray

from ichd_ray.io import storage
from ichd_ray.pipeline.incremental import LISTING_SCHEMA

__all__ = ["ListingStats", "list_archive", "list_archive_with_stats"]

logger = logging.getLogger(__name__)

#: CPUs a listing task reserves: it waits on the network almost all the time, so several share a core.
TASK_CPUS = 0.25
# How long the driver waits between sweeps of finished tasks (it returns at once when all are done).
_POLL_S = 0.5


@dataclass(frozen=True)
class ListingStats:
    """How an archive was listed.

    Attributes:
        parallel: Whether Ray tasks listed the prefixes (False: one ``list_files`` on the driver).
        depth: Depth of the prefixes handed to tasks (1: the archive's children); 0 when none were.
        prefixes: Prefixes listed recursively in tasks.
        tasks: Ray tasks started.
        level_listings: Delimiter listings made on the driver (the archive, plus each descended prefix).
        objects: Rows of the listing.
        storage_retries: S3 retries the tasks spent.
    """

    parallel: bool
    depth: int
    prefixes: int
    tasks: int
    level_listings: int
    objects: int
    storage_retries: int = 0


def list_archive(
    archive_uri: str,
    storage_config: storage.StorageConfig | None = None,
    *,
    parallel: bool = True,
    prefixes_per_task: int | None = None,
    max_depth: int = 2,
    min_prefixes: int = 8,
) -> pa.Table:
    """Every object under an archive prefix, listed in parallel over its key prefixes (module docstring).

    Args:
        archive_uri: Prefix URI (``s3://``, ``file://`` or a local path), with :func:`storage.list_files`'s
            directory semantics (``s3://b/ct`` covers ``ct/...``, not ``ct2/...``); a URI naming one
            object gives that object.
        storage_config: S3 settings; None means :meth:`StorageConfig.from_env` (on each worker too).
        parallel: False lists on the driver with ``list_files``, as happens when Ray is not running.
        prefixes_per_task: Prefixes one Ray task lists, one after the other; None: about four tasks
            per slot the cluster runs at once (CPUs / ``TASK_CPUS``). Fewer tasks than slots leave it
            idle.
        max_depth: Deepest level whose prefixes are handed to tasks (1: the archive's children).
        min_prefixes: Descend another level while there are fewer prefixes than this.

    Returns:
        pyarrow.Table: :data:`ichd_ray.pipeline.incremental.LISTING_SCHEMA` rows sorted by ``uri``, the
        same as ``list_files(archive_uri)``'s; empty when nothing is there.

    Raises:
        ValueError: ``prefixes_per_task``, ``max_depth`` or ``min_prefixes`` below 1.
        FileNotFoundError: The S3 bucket does not exist.
        PermissionError: Access denied to some prefix (named in the message).
        StorageUnavailable: S3 kept failing after retries (the prefix is named).
        RuntimeError: A listing task failed otherwise (its first prefix is named).
    """
    table, _ = list_archive_with_stats(
        archive_uri, storage_config, parallel=parallel, prefixes_per_task=prefixes_per_task,
        max_depth=max_depth, min_prefixes=min_prefixes,
    )
    return table


def list_archive_with_stats(
    archive_uri: str,
    storage_config: storage.StorageConfig | None = None,
    *,
    parallel: bool = True,
    prefixes_per_task: int | None = None,
    max_depth: int = 2,
    min_prefixes: int = 8,
) -> tuple[pa.Table, ListingStats]:
    """:func:`list_archive`, plus how the work was split (for logs, benchmarks and tests).

    Args:
        archive_uri: See :func:`list_archive`.
        storage_config: See :func:`list_archive`.
        parallel: See :func:`list_archive`.
        prefixes_per_task: See :func:`list_archive`.
        max_depth: See :func:`list_archive`.
        min_prefixes: See :func:`list_archive`.

    Returns:
        tuple[pyarrow.Table, ListingStats]: The listing and its statistics.
    """
    for name, value in (("prefixes_per_task", prefixes_per_task), ("max_depth", max_depth), ("min_prefixes", min_prefixes)):
        if value is not None and value < 1:
            raise ValueError(f"list_archive: {name} must be >= 1, got {value}")
    if not parallel or not ray.is_initialized():
        table = _as_listing(storage.files_table(storage.list_files(archive_uri, config=storage_config)))
        return table, ListingStats(False, 0, 0, 0, 0, table.num_rows)

    entries, prefixes = storage.list_level(storage.directory_uri(archive_uri), storage_config)
    if not entries and not prefixes:
        # Nothing under the prefix: list_files decides between "the URI names one object" and empty.
        table = _as_listing(storage.files_table(storage.list_files(archive_uri, config=storage_config)))
        return table, ListingStats(True, 0, 0, 0, 1, table.num_rows)
    levels, depth = 1, 1
    while prefixes and len(prefixes) < min_prefixes and depth < max_depth:
        # Too few prefixes to keep the tasks busy: their children are the next level's prefixes, and
        # the objects sitting directly in them are listed here. Fewer than min_prefixes listings.
        deeper: list[str] = []
        for prefix in prefixes:
            found, children = storage.list_level(prefix, storage_config)
            entries += found
            deeper += children
        levels += len(prefixes)
        prefixes, depth = deeper, depth + 1

    if prefixes_per_task is None:
        # About four tasks per slot: short chains keep every slot busy to the end (on 2 CPUs and 20 ms
        # per request, 4 prefixes a task listed 200 prefixes 2.5x faster than 16 a task did).
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) / TASK_CPUS))
        prefixes_per_task = max(1, math.ceil(len(prefixes) / (4 * slots)))
    chunks = [prefixes[i : i + prefixes_per_task] for i in range(0, len(prefixes), prefixes_per_task)]
    tables, retries = _run_tasks(chunks, storage_config)
    table = _as_listing(pa.concat_tables([storage.files_table(entries), *tables]).sort_by("uri"))
    stats = ListingStats(True, depth if prefixes else 0, len(prefixes), len(chunks), levels, table.num_rows, retries)
    logger.info("listed %s: %d objects, %d prefixes at depth %d in %d tasks", archive_uri, stats.objects,
                stats.prefixes, stats.depth, stats.tasks)
    return table, stats


def _list_prefixes(prefixes: list[str], storage_config: dict | None) -> tuple[pa.Table, int]:
    """The task: each prefix listed recursively (storage's pure function), as one Arrow table."""
    before = storage.retry_count()
    config = storage.StorageConfig.on_worker(storage_config)
    table = pa.concat_tables([storage.list_files_table(prefix, config) for prefix in prefixes])
    return table, storage.retry_count() - before


def _run_tasks(chunks: list[list[str]], storage_config: storage.StorageConfig | None) -> tuple[list[pa.Table], int]:
    """Run one listing task per chunk; the first failure cancels the others and raises, naming its prefix."""
    if not chunks:
        return [], 0
    task = ray.remote(num_cpus=TASK_CPUS, max_retries=3)(_list_prefixes)
    cfg_dict = storage_config.for_workers() if storage_config else None  # no credentials in task arguments
    chunk_of = {task.remote(chunk, cfg_dict): chunk for chunk in chunks}
    pending = list(chunk_of)
    tables, retries = [], 0
    while pending:
        # Sweeps of everything finished (not one ray.get of all): a failure is seen within _POLL_S of
        # happening, whatever the task order, and its chunk is known.
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S)
        for ref in ready:
            try:
                table, n = ray.get(ref)
            except ray.exceptions.RayError as exc:
                for other in pending:
                    # force: the worker process is killed and replaced. A plain cancel raises
                    # KeyboardInterrupt inside the task, which can land mid-import and leave the reused
                    # worker with a half-imported module (seen: "module 'pandas' has no attribute 'core'"
                    # in every later Ray Data task of the session).
                    ray.cancel(other, force=True)
                failure = storage.task_storage_error(exc)
                if failure is not None:
                    raise failure from None  # storage's message names the prefix that failed
                chunk = chunk_of[ref]
                raise RuntimeError(
                    f"listing {chunk[0]} (and {len(chunk) - 1} more prefixes of its task) failed: {exc}"
                ) from exc
            tables.append(table)
            retries += n
    return tables, retries


def _as_listing(table: pa.Table) -> pa.Table:
    return table.cast(LISTING_SCHEMA)
