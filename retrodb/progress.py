"""Progress reporting. The library never prints: long operations call a callback with
``(stage, done, total)`` and the CLI turns those calls into progress bars."""

from __future__ import annotations

from collections.abc import Callable

#: ``progress(stage, done, total)``: ``done`` units of ``total`` finished in ``stage``.
#: ``total`` is 0 when unknown. Calls for one stage have non-decreasing ``done``.
ProgressFn = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """The default callback: does nothing."""
