"""Named failpoints on the write path, for the crash and I/O-error tests.

The writer calls :func:`failpoint` at named points (``before_manifest``, ``fsync``, ...).
Nothing happens unless ``RETRODB_FAILPOINT`` was set when this module was imported (or
:func:`configure` was called), so the cost in normal use is one empty-dict test.

``RETRODB_FAILPOINT="name[:action[:hit]][,name...]"``; action is ``kill`` (SIGKILL this
process, the default), ``enospc`` or ``eio`` (raise that OSError); ``hit`` fires on the
n-th time the point is reached (default the first).

>>> configure("before_current:eio")                     # doctest: +SKIP
"""

from __future__ import annotations

import errno
import os
import signal

#: Every failpoint the write path calls, in the order an ``add`` reaches them.
NAMES = (
    "array_write",
    "after_tokenize",
    "after_segment_arrays",
    "during_encode",
    "after_index_tmp",
    "before_segment_rename",
    "after_segment_rename",
    "before_manifest",
    "after_manifest",
    "before_current",
    "after_current",
    "atomic_write",
    "atomic_rename",
    "fsync",
)
ACTIONS = ("kill", "enospc", "eio")

_active: dict[str, tuple[str, int]] = {}
_hits: dict[str, int] = {}


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition(":")
        action, _, hit = rest.partition(":")
        action = action or "kill"
        if name not in NAMES or action not in ACTIONS:
            raise ValueError(f"bad failpoint {item!r}: names {NAMES}, actions {ACTIONS}")
        out[name] = (action, int(hit or 1))
    return out


def configure(spec: str | None) -> None:
    """Arm the failpoints of ``spec`` (same syntax as ``RETRODB_FAILPOINT``); None disarms."""
    _active.clear()
    _hits.clear()
    if spec:
        _active.update(_parse(spec))


def failpoint(name: str, path: object = None) -> None:
    """Fire ``name`` if it is armed: SIGKILL, or raise ENOSPC/EIO naming ``path``."""
    if not _active or name not in _active:
        return
    action, hit = _active[name]
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != hit:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(
        code, f"{os.strerror(code)} (failpoint {name})", None if path is None else str(path)
    )


configure(os.environ.get("RETRODB_FAILPOINT"))

__all__ = ["ACTIONS", "NAMES", "configure", "failpoint"]
