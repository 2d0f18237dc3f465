"""How many threads torch (and the encoder) get when the user does not say.

torch's default is one thread per core of the machine. When other jobs already keep the
cores busy, the extra OpenMP threads spin at their barriers while they wait for a core,
and small models run many times slower than on one thread: on a 2-core machine shared
with other work, ``train --preset tiny`` ran at about 500 tokens/s on 2 threads and 6,000
on 1. So the default counts only the cores that are free now, unless ``RETRODB_THREADS``
says how many (see :mod:`retrodb.threads`).
"""

from __future__ import annotations

import math
import os

from retrodb.threads import THREADS_ENV, available_cores, threads_from_env

#: The rule, as the command-line help states it.
RULE = (
    f"default: ${THREADS_ENV} when set, else the cores this process may use (CPU affinity "
    "and cgroup quota) minus the 1-minute load average, rounded, divided among the local "
    "processes; at least 1"
)


def default_threads(
    processes: int = 1, *, cores: int | None = None, load: float | None = None
) -> int:
    """Threads per process when none are given (the module docstring says why).

    ``$RETRODB_THREADS`` when set (threads per process). Else: ``cores``, the cores this
    process may use (default :func:`~retrodb.threads.available_cores`); ``load``, the work
    already running (default the 1-minute load average); ``processes``, how many local
    processes share the cores (torchrun's LOCAL_WORLD_SIZE)."""
    chosen = threads_from_env()
    if chosen is not None:
        return chosen
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this system
            load = 0.0
    busy = math.floor(max(0.0, load) + 0.5)  # round half up
    free = max(1, cores - busy)
    return max(1, free // max(1, processes))


__all__ = ["RULE", "default_threads"]
