"""`retrodb neighbours`: compute, refresh and list the neighbour sets that RETRO trains on."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from retrodb.db import RetroDB
from retrodb.neighbours import NeighbourSet, NeighbourSetInfo, list_sets, read_id_file

from .common import fail, handle_errors, progress_bars


def neighbours(
    db: Annotated[Path, typer.Argument(help="Path of the database directory.")],
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
    exact: Annotated[
        bool, typer.Option("--exact", help="Exact search instead of HNSW (slow).")
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Chunks per search call.", min=1)
    ] = 1024,
    list_: Annotated[
        bool, typer.Option("--list", help="List the database's neighbour sets and exit.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Encoder threads (default: all cores).", min=1)
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Precompute the k nearest chunks of every training chunk, never from its own document.

    A set belongs to one generation; after `retrodb add`, update it with --refresh."""
    rdb = RetroDB.open(db, threads=threads)
    if list_:
        _list(rdb, as_json)
        return
    if name is None:
        fail("give a NAME for the neighbour set (or --list)")
        return
    was_current = False
    if refresh:
        if inputs or exclude_docs is not None or exact:
            fail(
                "--refresh keeps the set's inputs, exclusions and search mode; "
                "recompute without --refresh to change them"
            )
        old = NeighbourSet.open(rdb, name, allow_stale=True)
        if k is not None and k != old.info.k:
            fail(f"set {name!r} has k={old.info.k}; recompute without --refresh to change k")
        was_current = not old.is_stale(rdb)
    exclude = read_id_file(exclude_docs) if exclude_docs is not None else []
    t0 = time.perf_counter()
    with progress_bars(quiet or as_json) as progress:
        if refresh:
            ns = NeighbourSet.refresh(rdb, name, batch_size=batch_size, progress=progress)
        else:
            ns = NeighbourSet.compute(
                rdb,
                name,
                inputs=inputs or None,
                k=2 if k is None else k,
                exclude_docs=exclude,
                exact=exact,
                batch_size=batch_size,
                progress=progress,
            )
    seconds = time.perf_counter() - t0
    i = ns.info
    if as_json:
        d = _summary(rdb, i)
        d["seconds"] = round(seconds, 3)
        typer.echo(json.dumps(d, indent=1))
        return
    if quiet:
        return
    if was_current:
        how = "already current"
    elif i.refreshed_from is not None:
        how = f"refreshed from generation {i.refreshed_from}, {len(i.searched)} new segment(s)"
    else:
        how = f"{i.rows / max(seconds, 1e-9):,.0f} chunks/s"
    typer.echo(
        f"neighbours {i.name}: {i.rows:,} chunks of {i.documents:,} documents, k={i.k}, "
        f"generation {i.generation} ({how})"
    )
    known = rdb.doc_index()
    unknown = sum(d not in known for d in i.exclude)
    if unknown:
        typer.echo(
            f"note: {unknown} of {len(i.exclude)} excluded ids are not in the database", err=True
        )


def _summary(rdb: RetroDB, info: NeighbourSetInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "rows": info.rows,
        "documents": info.documents,
        "k": info.k,
        "generation": info.generation,
        "stale": info.generation != rdb.generation,
        "source": info.source,
        "inputs": list(info.inputs),
        "exclude": len(info.exclude),
        "exact": info.exact,
        "refreshed_from": info.refreshed_from,
        "segments": [s.name for s in info.segments],
    }


def _list(rdb: RetroDB, as_json: bool) -> None:
    sets = [_summary(rdb, i) for i in list_sets(rdb)]
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
    app.command(name="neighbours")(handle_errors(neighbours))
