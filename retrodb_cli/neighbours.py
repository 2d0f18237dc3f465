"""`retrodb neighbours`: compute, refresh and list the neighbour sets that RETRO trains on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from retrodb.corpus import plural
from retrodb.db import RetroDB
from retrodb.neighbours import list_sets, read_id_file, update

from .common import (
    Command,
    DBArg,
    DeviceOpt,
    ExactOpt,
    FetchOpt,
    JsonOpt,
    QuietOpt,
    Rerank,
    RerankOpt,
    ThreadsOpt,
    fail,
    handle_errors,
    progress_bars,
    say_device,
)
from .engine import Engine, EngineOpt, RayAddressOpt, WorkersOpt, make_engine


def neighbours(
    db: DBArg,
    name: Annotated[
        str | None,
        typer.Argument(help="Name of the neighbour set (stored under DB/neighbours/NAME)."),
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            help="Compute neighbours for these documents (folders, files, .jsonl, '-') instead "
            "of the database's own; repeat for several.",
        ),
    ] = None,
    k: Annotated[
        int | None, typer.Option("-k", help="Neighbours per chunk (default 2).", min=1)
    ] = None,
    exclude_docs: Annotated[
        Path | None,
        typer.Option(
            "--exclude-docs",
            help="A file of document ids (one a line) never to return as neighbours.",
        ),
    ] = None,
    refresh: Annotated[
        bool,
        typer.Option(
            "--refresh",
            help="Update an existing set to the current generation: search only the segments "
            "added since and merge the top k.",
        ),
    ] = False,
    exact: ExactOpt = False,
    self_share: Annotated[
        float | None,
        typer.Option(
            "--self-share",
            min=0.0,
            max=1.0,
            help="Share of documents (a stable hash of the id) whose chunks may retrieve their "
            "own document, as with leakage; the rest follow the paper's rule (default 0).",
        ),
    ] = None,
    rerank: RerankOpt = Rerank.none,
    fetch: FetchOpt = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Chunks per search call.", min=1)
    ] = 1024,
    list_: Annotated[
        bool, typer.Option("--list", help="List the database's neighbour sets and exit.")
    ] = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    engine: EngineOpt = Engine.local,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Precompute the k nearest chunks of every training chunk, never from its own document.

    A set belongs to one generation; after `retrodb add`, update it with --refresh."""
    ray = make_engine(engine, workers=workers, address=ray_address, device=device, threads=threads)
    rdb = RetroDB.open(db, threads=threads, device=device)
    if list_:
        _list(rdb, as_json)
        return
    if name is None:
        fail("give a NAME for the neighbour set (or --list)")
        return
    with progress_bars(quiet or as_json) as progress:
        report = update(
            rdb,
            name,
            refresh_only=refresh,
            inputs=inputs or None,
            k=k,
            exclude_docs=read_id_file(exclude_docs) if exclude_docs is not None else (),
            exact=exact,
            self_share=self_share,
            # the default is "keep the set's" for --refresh, like --exact's
            rerank=None if rerank is Rerank.none else rerank.value,
            fetch=fetch,
            batch_size=batch_size,
            progress=progress,
            engine=ray,
        )
    say_device(rdb, device, quiet or as_json)
    if as_json:
        d = report.info.to_dict(current_generation=rdb.generation)
        d["seconds"] = round(report.seconds, 3)
        typer.echo(json.dumps(d, indent=1))
        return
    if not quiet:
        typer.echo(report.summary())
    if report.unknown_excluded:
        typer.echo(
            f"note: {report.unknown_excluded:,} of the "
            f"{plural(len(report.info.exclude), 'excluded id')} "
            f"{'is' if report.unknown_excluded == 1 else 'are'} not in the database",
            err=True,
        )


def _list(rdb: RetroDB, as_json: bool) -> None:
    sets = [i.to_dict(current_generation=rdb.generation) for i in list_sets(rdb)]
    if as_json:
        typer.echo(json.dumps(sets, indent=1))
        return
    if not sets:
        typer.echo("no neighbour sets")
    for s in sets:
        state = (
            f"STALE (generation {s['generation']}, database {rdb.generation}; run --refresh)"
            if s["stale"]
            else f"current (generation {s['generation']})"
        )
        typer.echo(
            f"{s['name']:<16} {s['rows']:>10,} chunks  k={s['k']}  source {s['source']}  {state}"
        )


def register(app: typer.Typer) -> None:
    """Add the `neighbours` command to ``app``."""
    app.command(name="neighbours", cls=Command)(handle_errors(neighbours))
