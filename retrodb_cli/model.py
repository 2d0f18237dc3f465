"""`retrodb train`, `retrodb evaluate`, `retrodb generate`: the RETRO model over a database.

Each command opens the database, calls one library function and prints. The options of
`train` are made from the `TrainArgs` dataclass: one option per field, its docstring as the
help and its default as the default, so no field is missing and no default can drift."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import os
import sys
import textwrap
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

import typer

from retrodb.corpus import plural
from retrodb.db import RetroDB
from retrodb.errors import BadInputError
from retrodb_model.threads import RULE as THREADS_RULE
from retrodb_model.threads import default_threads

from .common import (
    Command,
    FetchOpt,
    QuietOpt,
    Rerank,
    RerankOpt,
    err_console,
    fail,
    handle_errors,
    progress_bars,
)

DirArg = Annotated[Path, typer.Argument(help="The checkpoint directory (from `retrodb train`).")]
DBArg = Annotated[Path, typer.Argument(help="Path of the database directory.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", help=f"torch and encoder threads ({THREADS_RULE}).", min=1),
]


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _set_threads(threads: int | None) -> int:
    """Use ``threads`` torch threads (default: the rule of retrodb_model.threads)."""
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------- train


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name, with its
    lines joined (fields without one are absent)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            text = " ".join(inspect.cleandoc(after.value.value).split())
            docs[node.target.id] = text.replace("``", "`")
    return docs


#: Option names where they are not `--field-name`, and help beyond the field docstring.
_NAMES: dict[str, tuple[str, ...]] = {
    "neighbours": ("--neighbours", "-n"),
    "out": ("--out", "-o"),
    "batch_size": ("--batch-size", "-b"),
    "k": ("-k",),
}
_MORE_HELP = {
    "model": "Repeat KEY=VALUE (VALUE read as JSON when it parses, e.g. dropout=0.1), or "
    "give one JSON object.",
}
_METAVARS = {"model": "KEY=VALUE"}


def _option_type(hint: Any) -> Any:
    """The command-line type of a TrainArgs field of type ``hint``."""
    if get_origin(hint) is dict:
        return list[str] | None  # --model KEY=VALUE, repeatable
    if get_origin(hint) in (Union, types.UnionType):  # X | None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return inner | None
    return hint


def _train_parameters() -> list[inspect.Parameter]:
    """One typer parameter per TrainArgs field: `db` the argument, the rest options."""
    from retrodb_model.config import TrainArgs  # no torch: the CLI starts fast

    docs, hints = field_docs(TrainArgs), get_type_hints(TrainArgs)
    params = []
    for f in dataclasses.fields(TrainArgs):
        text = " ".join(x for x in (docs.get(f.name, ""), _MORE_HELP.get(f.name, "")) if x)
        kind = _option_type(hints[f.name])
        if f.name == "db":
            info: Any = typer.Argument(help=text, show_default=False)
            kind = Path
        else:
            names = _NAMES.get(f.name, ("--" + f.name.replace("_", "-"),))
            info = typer.Option(
                *names,
                help=text,
                show_default=f.name != "model",
                metavar=_METAVARS.get(f.name),
            )
        default: Any = inspect.Parameter.empty
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = None
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[kind, info],
                default=default,
            )
        )
    return params


def parse_model_overrides(values: list[str] | None) -> dict[str, Any]:
    """`--model` values: KEY=VALUE pairs (VALUE as JSON when it parses, else a string),
    or JSON objects; later keys win."""
    out: dict[str, Any] = {}
    for value in values or []:
        if value.lstrip().startswith("{"):
            try:
                obj = json.loads(value)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"--model {value!r} is not valid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise BadInputError("--model must be KEY=VALUE or a JSON object")
            out.update(obj)
            continue
        key, sep, raw = value.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"--model {value!r}: expected KEY=VALUE, e.g. dropout=0.1")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _print_record(record: dict[str, Any]) -> None:
    if "note" in record:
        typer.echo(record["note"])
        return
    line = (
        f"step {record['step']:>6}  loss {_fmt(record['loss'])}  bpb {_fmt(record['bpb'])}  "
        f"lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  "
        f"|g| {record['grad_norm']:.2f}"
    )
    if record.get("val_bpb") is not None:
        line += f"  val_loss {_fmt(record['val_loss'])}  val_bpb {_fmt(record['val_bpb'])}"
    typer.echo(line)


def _train(**options: Any) -> None:
    """Train a RETRO model on a neighbour set (AdamW, warm-up + cosine, checkpoints, resume).

    Under `torchrun --nproc_per_node N` it trains with DDP (gloo on CPU).

    Ctrl-C saves the last completed step (one process); `--resume` continues it exactly.
    """
    from retrodb_model.train import TrainArgs, TrainingInterrupted
    from retrodb_model.train import train as run

    options["db"] = str(options["db"])
    options["model"] = parse_model_overrides(options["model"])
    try:
        args = TrainArgs(**options)
        state = run(args, log=_print_record)
    except TrainingInterrupted as exc:
        err_console.print(exc.message, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except ValueError as exc:  # invalid configuration values (RetroConfig, presets)
        if type(exc) is not ValueError:
            raise
        fail(str(exc))
    if state.get("history") and int(os.environ.get("RANK", "0")) == 0:
        last = state["history"][-1]
        typer.echo(
            f"saved {args.out} at step {state['step']}: bpb {_fmt(last.get('bpb'))}, "
            f"val_bpb {_fmt(last.get('val_bpb'))}"
        )


def make_train_command() -> Callable[..., None]:
    """`_train` with a signature made from TrainArgs, for typer."""

    def train(**options: Any) -> None:
        _train(**options)

    train.__doc__ = _train.__doc__
    train.__signature__ = inspect.Signature(_train_parameters())  # type: ignore[attr-defined]
    return train


# ---------------------------------------------------------------- evaluate


def evaluate(
    directory: DirArg,
    db: DBArg,
    inputs: Annotated[
        list[str], typer.Argument(help="Held-out documents: folders, files, .jsonl.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write the JSON here and the bpb(alpha) plot beside it (.png) "
            "(default: DIR/evaluation.json).",
        ),
    ] = None,
    k: Annotated[
        int | None,
        typer.Option("-k", help="Neighbours per chunk (default: the training k).", min=1),
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", help="Window length (default: the training one).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Windows per forward pass.", min=1)
    ] = 4,
    no_retrieval: Annotated[
        bool, typer.Option("--no-retrieval", help="Only evaluate without retrieval (no search).")
    ] = False,
    exclude_self: Annotated[
        bool,
        typer.Option(
            "--exclude-self",
            help="Never retrieve from a database document with the evaluated document's id.",
        ),
    ] = False,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", help="Score only the first N tokens of each document.", min=1),
    ] = None,
    rerank: RerankOpt = Rerank.none,
    fetch: FetchOpt = None,
    shuffle_seed: Annotated[
        int, typer.Option("--shuffle-seed", help="Seed of the shuffled neighbours.")
    ] = 0,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Bits per byte of held-out documents with retrieval on, with shuffled neighbours
    (each chunk gets another chunk's) and off, and bpb(alpha)."""
    from retrodb_model.evaluate import evaluate_checkpoint

    rdb = RetroDB.open(db, threads=_set_threads(threads))
    with progress_bars(quiet or as_json) as progress:
        res = evaluate_checkpoint(
            directory,
            rdb,
            inputs,
            seq_len=seq_len,
            k=k,
            batch_size=batch_size,
            retrieval=not no_retrieval,
            exclude_self=exclude_self,
            max_tokens=max_tokens,
            rerank=rerank.value,
            fetch=fetch,
            shuffle_seed=shuffle_seed,
            progress=progress,
        )
    written = res.save(out if out is not None else Path(directory) / "evaluation.json")
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=1))
        return
    if quiet:
        return
    excluded = ", own documents excluded" if exclude_self else ""
    if rerank is not Rerank.none:
        excluded += f", re-ranked by {rerank.value}"
    typer.echo(
        f"{plural(res.documents, 'document')}, {plural(res.tokens, 'token')}, "
        f"{plural(res.bytes, 'byte')} "
        f"(windows of {res.seq_len}, k={res.k}{excluded})"
    )
    for mode, v in res.bpb.items():
        typer.echo(f"  bpb {mode.replace('_', ' '):<13} {_fmt(v)}")
    table = res.bpb_alpha
    if table:
        typer.echo("  bpb(alpha): chunks whose overlap with their neighbours is <= alpha")
        typer.echo(
            f"    {'alpha':>6} {'chunks':>7} {'share':>6} {'retrieval':>10} {'shuffled':>9} "
            f"{'no retr.':>9}"
        )
        for i, a in enumerate(table["alpha"]):
            typer.echo(
                f"    {a:>5g}% {table['chunks'][i]:>7} {100 * table['fraction'][i]:>5.1f}% "
                f"{_fmt(table['retrieval'][i]):>10} {_fmt(table['shuffled'][i]):>9} "
                f"{_fmt(table['no_retrieval'][i]):>9}"
            )
    typer.echo("wrote " + " and ".join(str(p) for p in written))


# ---------------------------------------------------------------- generate


def generate(
    directory: DirArg,
    db: DBArg,
    prompt: Annotated[str, typer.Argument(help="The prompt ('-' reads it from stdin).")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="New tokens.", min=0)] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="0: greedy.", min=0.0)
    ] = 0.8,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Nucleus sampling mass.", min=0.0, max=1.0)
    ] = 0.95,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    no_retrieval: Annotated[
        bool, typer.Option("--no-retrieval", help="Generate without retrieval.")
    ] = False,
    k: Annotated[int | None, typer.Option("-k", help="Neighbours per chunk.", min=1)] = None,
    show_neighbours: Annotated[
        bool,
        typer.Option("--show-neighbours", help="Print every retrieval (chunk, documents, text)."),
    ] = False,
    rerank: RerankOpt = Rerank.none,
    fetch: FetchOpt = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recompute every step (slow; for checking).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Continue PROMPT, retrieving k neighbours after every completed chunk. The text
    streams as it is generated (control characters escaped); timing goes to stderr."""
    from retrodb_model.checkpoint import load_model
    from retrodb_model.generate import generate as run
    from retrodb_model.generate import printable

    if prompt == "-":
        prompt = sys.stdin.read()
    rdb = RetroDB.open(db, threads=_set_threads(threads))
    model, _ = load_model(directory, db=rdb)
    assert rdb.tokenizer is not None  # RetroDB refuses to open without one
    if not as_json:
        head = rdb.tokenizer.decode(rdb.tokenizer.encode([prompt])[0])
        typer.echo(printable(head), nl=False)

    def echo(text: str) -> None:
        if text:
            typer.echo(text, nl=False)

    res = run(
        model,
        rdb,
        prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        retrieval=not no_retrieval,
        k=k,
        use_cache=not no_cache,
        rerank=rerank.value,
        fetch=fetch,
        on_text=None if as_json else echo,
    )
    if as_json:
        per_s = None if math.isnan(res.tokens_per_s) else res.tokens_per_s
        record = {
            "prompt": res.prompt,
            "text": res.text,
            "tokens": len(res.tokens),
            "seconds": res.seconds,
            "retrieval_seconds": res.retrieval_seconds,
            "tokens_per_s": per_s,
            "retrievals": [dataclasses.asdict(r) for r in res.retrievals],
        }
        typer.echo(json.dumps(record, indent=1))
        return
    typer.echo("")
    if show_neighbours:
        for r in res.retrievals:
            typer.echo(typer.style(f"\n[chunk {r.chunk}] {r.chunk_text!r}", bold=True))
            for rank, (key, doc, text) in enumerate(zip(r.keys, r.docs, r.texts, strict=True), 1):
                if key >= 0:
                    typer.echo(
                        f"  {rank}. {doc} key {key}: {printable(text.replace(chr(10), ' '))[:160]}"
                    )
    typer.echo(
        typer.style(
            f"\n{len(res.tokens)} tokens in {res.seconds:.2f}s ({res.tokens_per_s:.1f} tok/s after "
            f"the prompt), retrieval {res.retrieval_seconds:.2f}s "
            f"({100 * res.retrieval_share:.0f}%), {len(res.retrievals)} retrievals",
            dim=True,
        ),
        err=True,
    )


def register(app: typer.Typer) -> None:
    """Add `train`, `evaluate` and `generate` to ``app``."""
    app.command(name="train", cls=Command)(handle_errors(make_train_command()))
    app.command(name="evaluate", cls=Command)(handle_errors(evaluate))
    app.command(name="generate", cls=Command)(handle_errors(generate))
