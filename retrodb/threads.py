"""How many CPU threads a process uses when ``--threads`` is not given.

- ``RETRODB_THREADS``, when set, is that number for every retrodb process that inherits it:
  the encoder's ONNX Runtime threads here, and torch's in ``retrodb_model``. Set it when
  several processes share the cores (parallel builds, test workers): ONNX Runtime's threads
  spin while they wait for work, so two processes that each take every core slow each
  other down.
- Otherwise the encoder takes every core this process may run on (:func:`available_cores`:
  its CPU affinity, capped by a cgroup v2 CPU quota, so a container limited to 2 CPUs on a
  large host does not start a thread per host core).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import BadInputError

#: The environment variable that sets the default thread count.
THREADS_ENV = "RETRODB_THREADS"


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota(Path("/sys/fs/cgroup/cpu.max"))
    return max(1, min(cores, quota) if quota else cores)


def cgroup_quota(path: Path) -> int | None:
    """Whole CPUs allowed by a cgroup v2 ``cpu.max`` ("max 100000" or "150000 100000")."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.floor(int(quota) / int(period)))


def threads_from_env() -> int | None:
    """``$RETRODB_THREADS`` as a number, None when it is unset or empty."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise BadInputError(
            f"{THREADS_ENV}={raw!r}: expected a whole number of threads, at least 1"
        )
    return n


def encoder_threads(threads: int | None = None) -> int:
    """The encoder's threads: ``threads`` when given, else ``$RETRODB_THREADS``, else
    :func:`available_cores`."""
    return threads or threads_from_env() or available_cores()


__all__ = ["THREADS_ENV", "available_cores", "cgroup_quota", "encoder_threads", "threads_from_env"]
