"""The options that choose where `build`, `add` and `neighbours` do their work: here (the
default) or on a Ray cluster (`--engine ray`, the extra `retrodb[ray]`)."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

from .common import fail

if TYPE_CHECKING:
    from retrodb.ray_engine import RayEngine


class Engine(StrEnum):
    local = "local"
    ray = "ray"


EngineOpt = Annotated[
    Engine,
    typer.Option(
        "--engine",
        help="local: this process. ray: a Ray cluster (pip install 'retrodb\\[ray]'; the "
        "database must be on a filesystem every worker sees; docs/scale.md).",
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=1,
        help="With --engine ray: encoder (or searcher) actors; without --ray-address also the "
        "CPUs of the local Ray started for the run (default: all cores, or the cluster's).",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="With --engine ray: a running cluster (the address `ray start --head` prints, or "
        "'auto'); default: start a local Ray for the run and stop it at the end.",
    ),
]


def make_engine(
    engine: Engine,
    *,
    workers: int | None,
    address: str | None,
    device: str,
    threads: int | None,
) -> RayEngine | None:
    """None for the local engine; else a RayEngine (Ray itself is imported when it runs)."""
    if engine is Engine.local:
        if workers is not None or address is not None:
            fail("--workers and --ray-address need --engine ray")
        return None
    from retrodb.ray_engine import RayEngine

    return RayEngine(workers=workers, address=address, device=device, threads=threads)
