"""How many worker processes run, and each worker's share of a pool's server limits."""

from __future__ import annotations

import os

from .schema import Config


def worker_count(config: Config) -> int:
    """general.workers, with 0 resolved to the CPU cores this process may run on."""
    if config.general.workers:
        return config.general.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def pool_share(total: int, pool_index: int, worker: int, workers: int) -> int:
    """Worker `worker`'s part of a pool limit `total` split over `workers` processes.

    The parts add up to `total` exactly (the operator's limit on PostgreSQL backends holds). The
    remainder goes to different workers for different pools, so many small pools do not all land
    on worker 0; a worker whose part is 0 is never given that pool's clients.
    """
    base, extra = divmod(total, workers)
    return base + (1 if (worker - pool_index) % workers < extra else 0)


def pool_keys(config: Config) -> list[tuple[str, str]]:
    """Every (database, user) pool in a fixed order: the pool_index of pool_share."""
    return [(db, user) for db, pool in config.pools.items() for user in pool.users]
