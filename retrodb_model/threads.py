"""How many threads torch (and the encoder) get when the user does not say.

torch's default is one thread per core of the machine. When other jobs already keep the
cores busy, the extra OpenMP threads spin at their barriers while they wait for a core,
and small models run many times slower than on one thread: on a 2-core machine shared
with other work, ``train --preset tiny`` ran at about 500 tokens/s on 2 threads and 6,000
on 1. So the default counts only the cores that are free now.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: The rule, as the command-line help states it.
RULE = (
    "default: the cores this process may use (CPU affinity and cgroup quota) minus the "
    "1-minute load average, rounded, divided among the local processes; at least 1"
)


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(Path("/sys/fs/cgroup/cpu.max"))
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota(path: Path) -> int | None:
    """Whole CPUs allowed by a cgroup v2 ``cpu.max`` ("max 100000" or "150000 100000")."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.floor(int(quota) / int(period)))


def default_threads(
    processes: int = 1, *, cores: int | None = None, load: float | None = None
) -> int:
    """Threads per process when none are given (the module docstring says why).

    ``cores``: the cores this process may use (default :func:`available_cores`);
    ``load``: the work already running (default the 1-minute load average); ``processes``:
    how many local processes share the cores (torchrun's LOCAL_WORLD_SIZE)."""
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this system
            load = 0.0
    busy = math.floor(max(0.0, load) + 0.5)  # round half up
    free = max(1, cores - busy)
    return max(1, free // max(1, processes))


__all__ = ["RULE", "available_cores", "default_threads"]
