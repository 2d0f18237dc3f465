"""`retrodb`: build, grow and query a RETRO retrieval database from the shell.

Each command opens the database, calls one library method and prints the result; library
errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from retrodb import __version__
from retrodb.config import ChunkConfig, DBConfig, EncoderConfig, TokenizerConfig
from retrodb.corpus import plural, read_id_file
from retrodb.db import RetroDB

from . import model as model_commands
from . import neighbours as neighbour_commands
from . import serve as serve_commands
from .common import (
    Command,
    DBArg,
    DBOrURLArg,
    DeviceOpt,
    ErrorsOpt,
    ExactOpt,
    FetchOpt,
    Group,
    InputsArg,
    JsonOpt,
    OnError,
    QuietOpt,
    Rerank,
    RerankOpt,
    ThreadsOpt,
    fail,
    handle_errors,
    open_db,
    progress_bars,
    read_lines,
    say_device,
    say_skipped,
)
from .engine import Engine, EngineOpt, RayAddressOpt, WorkersOpt, make_engine

app = typer.Typer(
    name="retrodb",
    cls=Group,
    help="An on-disk, memory-mapped RETRO retrieval database.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"retrodb {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """An on-disk, memory-mapped RETRO retrieval database."""


#: What --tokenizer accepts (build and add).
TOKENIZER_HELP = (
    "A SentencePiece model, a Hugging Face tokenizer (tokenizer.json or a model folder) or a "
    ".gguf file (its tokenizer; needs retrodb[hf])."
)


class Quantize(StrEnum):
    none = "none"
    int8 = "int8"


@app.command(cls=Command)
@handle_errors
def build(
    db: DBArg,
    inputs: InputsArg,
    vocab_size: Annotated[
        int,
        typer.Option(
            "--vocab-size",
            help="SentencePiece vocabulary (a soft limit on small corpora); not used with "
            "--tokenizer.",
            min=300,
        ),
    ] = 32000,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer",
            help=TOKENIZER_HELP + " Use it instead of training a SentencePiece model; "
            "chunks are --chunk-size tokens of it.",
        ),
    ] = None,
    encoder: Annotated[
        Path | None,
        typer.Option(
            "--encoder",
            help="A local Hugging Face BERT checkpoint, an exported .onnx, or the encoder "
            "folder of another database (default: the bundled all-MiniLM-L6-v2).",
        ),
    ] = None,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", help="Tokens per chunk (m).", min=1)
    ] = 64,
    quantize: Annotated[
        Quantize,
        typer.Option("--quantize", help="int8: per-channel dynamic int8 encoder (faster)."),
    ] = Quantize.none,
    errors: ErrorsOpt = OnError.strict,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    engine: EngineOpt = Engine.local,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Build a new database from INPUTS... (trains the tokenizer, exports the encoder,
    indexes every chunk).

    The encoder's files are hard links into a shared store
    ($RETRODB_CACHE_DIR/store, default ~/.cache/retrodb/store) where the
    filesystem allows, so databases built with one encoder hold it once on disk.
    Skipped inputs are listed on stderr with the reason."""
    config = DBConfig(
        chunk=ChunkConfig(chunk_size=chunk_size),
        tokenizer=TokenizerConfig(vocab_size=vocab_size),
        encoder=EncoderConfig(quantize=quantize.value),
    )
    with progress_bars(quiet) as progress:
        rdb = RetroDB.build(
            db,
            inputs,
            config=config,
            tokenizer=tokenizer,
            encoder=encoder,
            errors=errors.value,
            progress=progress,
            threads=threads,
            device=device,
            engine=make_engine(
                engine, workers=workers, address=ray_address, device=device, threads=threads
            ),
        )
    say_device(rdb, device, quiet)
    res = rdb.last_build
    assert res is not None
    say_skipped(res.skipped)
    if not quiet:
        typer.echo(
            f"built {db}: {plural(res.documents, 'document')}, {plural(res.chunks, 'chunk')}, "
            f"{plural(res.tokens, 'token')}, vocabulary {res.vocab_size:,} "
            f"(generation {res.generation})"
        )


@app.command(cls=Command)
@handle_errors
def add(
    db: DBArg,
    inputs: InputsArg,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer",
            help=TOKENIZER_HELP + " Refuse unless the database uses this tokenizer (the same "
            "fingerprint).",
        ),
    ] = None,
    encoder: Annotated[
        Path | None, typer.Option("--encoder", help="Refuse unless the database uses this encoder.")
    ] = None,
    errors: ErrorsOpt = OnError.strict,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    engine: EngineOpt = Engine.local,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Add documents as a new segment; nothing stored is re-encoded, nothing is retrained."""
    ray = make_engine(engine, workers=workers, address=ray_address, device=device, threads=threads)
    rdb = RetroDB.open(db, threads=threads, device=device)
    with progress_bars(quiet) as progress:
        res = rdb.add(
            inputs,
            errors=errors.value,
            progress=progress,
            tokenizer=tokenizer,
            encoder=encoder,
            engine=ray,
        )
    say_device(rdb, device, quiet)
    say_skipped(res.skipped)
    if not quiet:
        where = (
            f"segment {res.segment}" if len(res.segments) <= 1 else f"{len(res.segments)} segments"
        )
        typer.echo(
            f"added {plural(res.documents, 'document')}, {plural(res.chunks, 'chunk')}, "
            f"{plural(res.tokens, 'token')} (generation {res.generation}, {where})"
        )


@app.command(cls=Command)
@handle_errors
def query(
    db: DBOrURLArg,
    texts: Annotated[
        list[str] | None, typer.Argument(help="Query texts; each is one query.")
    ] = None,
    input: Annotated[
        Path | None,
        typer.Option("--input", "-i", help="A file with one query per line ('-' for stdin)."),
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Neighbours per query.")] = 4,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per query per line.")
    ] = False,
    exact: ExactOpt = False,
    rerank: RerankOpt = Rerank.none,
    fetch: FetchOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Find the k nearest chunks of each query text, with their continuations.

    With --rerank overlap, --fetch times k dense candidates are ordered by the longest
    token run they share with the query and the first k shown (distances stay the dense
    ones)."""
    queries = list(texts or [])
    if input is not None:
        queries += read_lines(input)
    if not queries:
        fail("no query: give TEXT arguments or --input FILE")
    if k <= 0:
        fail(f"-k must be positive, got {k}")
    rdb = open_db(db, threads=threads, device=device)
    results = rdb.query(queries, k=k, exact=exact, rerank=rerank.value, fetch=fetch)
    say_device(rdb, device, as_json)
    for result in results:
        if as_json:
            typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
            continue
        typer.echo(f"query: {result.query}")
        for rank, hit in enumerate(result.neighbours, 1):
            typer.echo(f"  [{rank}] {hit.doc}  key {hit.key}  distance {hit.distance:.4f}")
            typer.echo(_indent(hit.text))
            if hit.continuation:
                cont = hit.continuation[:200].replace("\n", " ")
                typer.echo(_indent(f"… {cont} …", dim=True))
        typer.echo("")


def _indent(text: str, dim: bool = False) -> str:
    body = "\n".join("      " + line for line in text.strip("\n").splitlines())
    return typer.style(body, dim=True) if dim else body


@app.command(cls=Command)
@handle_errors
def info(db: DBOrURLArg, as_json: JsonOpt = False) -> None:
    """Documents, chunks (live and stored), tokens, segments, generation, configuration,
    the tokenizer's training settings, fingerprints and sizes."""
    d = open_db(db).info()
    if as_json:
        typer.echo(json.dumps(d, indent=1))
        return
    deleted_docs = d["deleted_documents"]
    deleted_chunks = d["chunks"] - d["live_chunks"]
    typer.echo(f"database     {d['path']}")
    typer.echo(f"generation   {d['generation']}  (format {d['format_version']})")
    typer.echo(
        f"documents    {d['documents']:,}"
        + (
            f"  (and {plural(deleted_docs, 'deleted document')} still stored)"
            if deleted_docs
            else ""
        )
    )
    typer.echo(
        f"chunks       {d['live_chunks']:,}"
        + (
            f"  (and {plural(deleted_chunks, 'deleted chunk')} still stored)"
            if deleted_chunks
            else ""
        )
        + f"  (chunk size {d['config']['chunk']['chunk_size']})"
    )
    typer.echo(
        f"tokens       {d['tokens']:,}"
        + ("  (stored, deleted documents' included)" if deleted_docs else "")
    )
    typer.echo(f"segments     {d['segments']}")
    tok = d["tokenizer"]
    typer.echo(
        f"tokenizer    {tok.get('kind', 'sentencepiece')}, vocabulary {tok['vocab_size']:,}  "
        f"{tok['fingerprint'][:23]}…"
    )
    if tok.get("source"):
        typer.echo(f"             from {tok['source']}")
    trainer = tok.get("trainer")
    if trainer:
        opts = trainer["options"]
        typer.echo(
            f"             trained by sentencepiece {trainer['sentencepiece']}, "
            f"{plural(opts['num_threads'], 'thread')}, seed {trainer['seed']}, "
            f"{trainer['sampled']:,} of {plural(trainer['sentences'], 'sentence')}"
        )
    typer.echo(
        f"encoder      dimension {d['encoder']['dim']}  {d['encoder']['fingerprint'][:23]}…  "
        f"quantize {d['config']['encoder']['quantize']}"
    )
    typer.echo("bytes on disk")
    for part, n in d["bytes"].items():
        if part == "shared":
            if n:
                typer.echo(
                    f"  {'shared':<16} {n:>14,}  (hard links: deleting this database does not "
                    "free them)"
                )
            continue
        typer.echo(f"  {part:<16} {n:>14,}")


@app.command(cls=Command)
@handle_errors
def verify(
    db: DBArg,
    repair: Annotated[
        bool, typer.Option("--repair", help="Remove what an interrupted writer left behind.")
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check every committed file (sizes, checksums, arrays, indexes). Exit 1 on damage.

    With --quiet only what needs attention is printed: damage, leftovers,
    unreachable chunks."""
    rdb = RetroDB.open(db)
    with progress_bars(quiet or as_json) as progress:
        rep = rdb.verify(repair=repair, progress=progress)
    if as_json:
        typer.echo(json.dumps(rep.to_dict(), indent=1))
    else:
        for p in rep.problems:
            typer.echo(f"damaged: {p}")
        for p in rep.leftovers:
            typer.echo(f"leftover (run --repair to remove): {p}")
        if rep.unreachable:
            typer.echo(
                f"unreachable: {plural(rep.unreachable, 'live chunk')} not found by a search "
                "for their own key (an index written before side lists; `retrodb compact "
                "--force` rebuilds it)"
            )
        if not quiet:
            for p in rep.removed:
                typer.echo(f"removed: {p}")
            for p in rep.retained:
                typer.echo(f"kept one more generation for readers (merged by compact): {p}")
        if not quiet or not rep.ok:
            status = "ok" if rep.ok else "DAMAGED"
            typer.echo(
                f"{status}: generation {rep.generation}, {plural(rep.files_checked, 'file')} "
                f"checked, {plural(rep.unreachable, 'unreachable chunk')} "
                f"({rep.side_list:,} found through side lists)"
            )
    if not rep.ok:
        raise typer.Exit(1)


@app.command(cls=Command)
@handle_errors
def delete(
    db: DBArg,
    doc: Annotated[
        list[str] | None, typer.Option("--doc", help="A document id to delete (repeatable).")
    ] = None,
    doc_file: Annotated[
        Path | None,
        typer.Option("--doc-file", help="A file of document ids, one per line ('-' for stdin)."),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Delete documents: they disappear from every search and neighbour set at once.

    Their rows stay on disk until `retrodb compact`."""
    ids = list(doc or [])
    if doc_file is not None:
        ids += read_id_file(doc_file)
    if not ids:
        fail("no document ids: give --doc ID or --doc-file FILE")
    res = RetroDB.open(db).delete(ids)
    if not quiet:
        typer.echo(
            f"deleted {plural(res.deleted, 'document')} (generation {res.generation}; "
            f"{plural(res.tombstones, 'deleted document')} stored until `retrodb compact`)"
        )


@app.command(cls=Command)
@handle_errors
def compact(
    db: DBArg,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Rewrite even a single segment without deletions (rebuilds its index, e.g. "
            "for chunks `verify` reports unreachable).",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge all segments into one and drop the rows of deleted documents.

    No chunk is encoded again and no live key changes."""
    rdb = RetroDB.open(db)
    with progress_bars(quiet) as progress:
        res = rdb.compact(force=force, progress=progress)
    if quiet:
        return
    if not res.changed:
        typer.echo(
            f"nothing to compact (generation {res.generation}: "
            f"{plural(res.segments_before, 'segment')}, no deleted documents)"
        )
        return
    typer.echo(
        f"compacted {plural(res.segments_before, 'segment')} into {res.segments_after}, "
        f"dropped {plural(res.documents_dropped, 'deleted document')} "
        f"({plural(res.chunks_dropped, 'chunk')}) (generation {res.generation})"
    )


# Commands defined in other modules of this package, after the database commands.
neighbour_commands.register(app)
serve_commands.register(app)
model_commands.register(app)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
