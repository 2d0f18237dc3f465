"""`retrodb train`, `retrodb evaluate`, `retrodb generate`: the RETRO model over a database.

Each command opens the database, calls one library function and prints. The options of
`train` are made from the `TrainArgs` dataclass, and those of `evaluate` that say how it
scores from `EvalArgs` (:mod:`retrodb_model.options`): one option per field, its docstring
as the help and its default as the default, so no field is missing and no default can
drift. This module only maps them to typer."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from retrodb.corpus import plural
from retrodb_model.config import (
    BOOSTS,
    COPY_RUN_MAX,
    FLOORS,
    MIN_RUNS,
    EvalArgs,
    TrainArgs,
    check_null_boost,
)
from retrodb_model.options import Option, eval_options, from_options, train_options
from retrodb_model.threads import RULE as THREADS_RULE
from retrodb_model.threads import default_threads

from .common import (
    Command,
    DBOrURLArg,
    FetchOpt,
    QuietOpt,
    Rerank,
    RerankOpt,
    ResultJsonOpt,
    err_console,
    fail,
    handle_errors,
    open_db,
    progress_bars,
)

DirArg = Annotated[
    Path,
    typer.Argument(
        help="The checkpoint directory (from `retrodb train`), or a pretrained model (a "
        "Hugging Face folder or a .gguf file) to use as a plain decoder."
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", help=f"torch and encoder threads ({THREADS_RULE}).", min=1),
]
#: Options made from a dataclass field that are the CLI's shared ones (same flags and help
#: in every command that has them).
SHARED: dict[str, Any] = {"rerank": RerankOpt, "fetch": FetchOpt}


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _set_threads(threads: int | None) -> int:
    """Use ``threads`` torch threads (default: the rule of retrodb_model.threads)."""
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


def _parameter(option: Option) -> inspect.Parameter:
    """The typer parameter of ``option``: the shared one of its name (:data:`SHARED`), or
    an Argument or Option with its flags, help, type and default."""
    if option.name in SHARED:
        annotation = SHARED[option.name]
    elif option.argument:
        info: Any = typer.Argument(help=option.help, show_default=False)
        annotation = Annotated[option.type, info]
    else:
        info = typer.Option(
            *option.flags,
            help=option.help,
            show_default=option.show_default,
            metavar=option.metavar,
            min=option.min,
        )
        annotation = Annotated[option.type, info]
    default = option.default
    if default is dataclasses.MISSING:
        default = inspect.Parameter.empty
    return inspect.Parameter(
        option.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
    )


def with_options(
    fn: Callable[..., None], options: Sequence[Option], *, before: str | None = None
) -> Callable[..., None]:
    """``fn`` as typer sees it: its own parameters, and one per option inserted before the
    parameter ``before`` (default: after them); ``fn`` takes the options' values in its
    ``**options``."""
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(fn, eval_str=True).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    at = len(own) if before is None else [p.name for p in own].index(before)

    @functools.wraps(fn)
    def command(**values: Any) -> None:
        fn(**values)

    params = [*own[:at], *map(_parameter, options), *own[at:]]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command


# ---------------------------------------------------------------- train


def _print_record(record: dict[str, Any]) -> None:
    if "note" in record:
        typer.echo(record["note"])
        return
    line = (
        f"step {record['step']:>6}  loss {_fmt(record['loss'])}  bpb {_fmt(record['bpb'])}  "
        f"lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  "
        f"|g| {record['grad_norm']:.2f}"
    )
    if record.get("distractor_kl") is not None:
        line += f"  kl {record['distractor_kl']:.4f}"
    if record.get("val_bpb") is not None:
        line += f"  val_loss {_fmt(record['val_loss'])}  val_bpb {_fmt(record['val_bpb'])}"
    typer.echo(line)


def _train(**options: Any) -> None:
    """Train a RETRO model on a neighbour set (AdamW, warm-up + cosine, checkpoints, resume).

    Under `torchrun --nproc_per_node N` it trains with DDP (gloo on CPU).

    Ctrl-C saves the last completed step (one process); `--resume` continues it exactly.
    """
    from retrodb_model.train import TrainingInterrupted
    from retrodb_model.train import train as run

    args = from_options(TrainArgs, options)
    try:
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


# ---------------------------------------------------------------- evaluate


def evaluate(
    directory: DirArg,
    db: DBOrURLArg,
    inputs: Annotated[
        list[str], typer.Argument(help="Held-out documents: folders, files, .jsonl.")
    ],
    as_json: ResultJsonOpt = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write the JSON here and the bpb(alpha) plot beside it (.png) "
            "(default: DIR/evaluation.json).",
        ),
    ] = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    **options: Any,
) -> None:
    """Bits per byte of held-out documents with retrieval on, with shuffled neighbours
    (each chunk gets those of another document's chunk) and off, and bpb(alpha)."""
    from retrodb_model.evaluate import evaluate_checkpoint

    args = from_options(EvalArgs, options)
    rdb = open_db(db, threads=_set_threads(threads))
    with progress_bars(quiet or as_json) as progress:
        res = evaluate_checkpoint(directory, rdb, inputs, args, progress=progress)
    written = res.save(out if out is not None else Path(directory) / "evaluation.json")
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=1))
        return
    if quiet:
        return
    excluded = ", own documents excluded" if args.exclude_self else ""
    if args.rerank != "none":
        excluded += f", re-ranked by {args.rerank}"
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


# ---------------------------------------------------------------- calibrate

_FLOORS_TEXT = ",".join(format(a, "g") for a in FLOORS)
_BOOSTS_TEXT = ",".join(format(b, "g") for b in BOOSTS)
_RUNS_TEXT = ",".join(str(n) for n in MIN_RUNS)


def _grid(flag: str, text: str, lo: float, hi: float) -> list[float]:
    """The numbers of a comma-separated option, each in [lo, hi], or a clear error."""
    try:
        grid = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        fail(f"{flag}: not a comma-separated list of numbers: {text!r}")
    if not grid or any(not lo <= a <= hi for a in grid):
        fail(f"{flag}: give numbers between {lo:g} and {hi:g}, got {text!r}")
    return grid


def calibrate(
    directory: DirArg,
    db: DBOrURLArg,
    inputs: Annotated[
        list[str],
        typer.Argument(help="Validation documents (with --exclude-self when in the database)."),
    ],
    floors: Annotated[
        str,
        typer.Option(
            "--floors", help="The overlap floors to try, comma-separated fractions of a chunk."
        ),
    ] = _FLOORS_TEXT,
    boosts: Annotated[
        str,
        typer.Option(
            "--boosts",
            help="The null boosts to try with every floor, comma-separated numbers >= 0 "
            "(added to the score of CCA's null key).",
        ),
    ] = _BOOSTS_TEXT,
    min_runs: Annotated[
        str,
        typer.Option(
            "--min-runs",
            help="The copy floors to try with every floor and boost, comma-separated whole "
            "numbers of tokens (0: off; see evaluate --min-run).",
        ),
    ] = _RUNS_TEXT,
    copy_check: Annotated[
        bool,
        typer.Option(
            "--copy-check",
            help="With --exclude-self: also evaluate every setting with the documents' own "
            "chunks retrievable (as after `retrodb add`) and require shuffled no better "
            "than off - 0.002 there too (twice the evaluations).",
        ),
    ] = False,
    as_json: ResultJsonOpt = False,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    **options: Any,
) -> None:
    """Choose the overlap floor (--min-overlap), the null boost (--null-boost) and the copy
    floor (--min-run) on validation documents and record them in DIR/retrieval.json: of
    every setting with which retrieval never hurts (on <= off + 0.002 overall and + 0.003
    in every overlap bucket up to 50 %; shuffled no better than off - 0.002), the one with
    the lowest bpb with retrieval on; if none, the most cautious. evaluate and generate use
    them by default."""
    from retrodb_model.evaluate import calibrate_floor

    grid = _grid("--floors", floors, 0.0, 1.0)
    boost_grid = _grid("--boosts", boosts, 0.0, 1e6)
    run_grid = _grid("--min-runs", min_runs, 0, COPY_RUN_MAX)
    if any(n != int(n) for n in run_grid):
        fail(f"--min-runs: give whole numbers of tokens, got {min_runs!r}")
    args = from_options(EvalArgs, options)
    rdb = open_db(db, threads=_set_threads(threads))
    with progress_bars(quiet or as_json) as progress:
        settings = calibrate_floor(
            directory, rdb, inputs, args, floors=grid, boosts=boost_grid,
            min_runs=[int(n) for n in run_grid], copy_check=copy_check, progress=progress,
        )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(settings, indent=1))
        return
    if quiet:
        return
    copy_col = f" {'copying: off - shuffled':>23} {'on / off':>8}" if copy_check else ""
    typer.echo(
        f"  {'floor':>5} {'boost':>5} {'run':>3} {'on - off':>9} {'worst bucket':>13} "
        f"{'off - shuffled':>15}{copy_col}  meets"
    )
    for t in settings["floors"]:
        h = t["hurt"]
        copy_val = ""
        if copy_check:
            ratio = t["copy"]["on_over_off"]
            copy_val = (
                f" {_fmt(t['copy']['hurt']['shuffled']):>23} "
                f"{'-' if ratio is None else format(ratio, '.3f'):>8}"
            )
        typer.echo(
            f"  {t['min_overlap']:>5g} {t['null_boost']:>5g} {t['min_run']:>3} "
            f"{_fmt(h['overall']):>9} {_fmt(h['bucket']):>13} {_fmt(h['shuffled']):>15}"
            f"{copy_val}  {'yes' if t['meets'] else 'no'}"
        )
    typer.echo(
        f"recorded min_overlap {settings['min_overlap']:g}, null_boost "
        f"{settings['null_boost']:g}, min_run {settings['min_run']} in "
        f"{Path(directory) / 'retrieval.json'}"
    )


# ---------------------------------------------------------------- generate


def generate(
    directory: DirArg,
    db: DBOrURLArg,
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
    min_overlap: Annotated[
        float | None,
        typer.Option(
            "--min-overlap",
            help="The overlap floor A: neighbours sharing a token run of fewer than A x the "
            "chunk's tokens become the null neighbour (default: the checkpoint's "
            "retrieval.json, else 0).",
            min=0.0,
            max=1.0,
        ),
    ] = None,
    null_boost: Annotated[
        float | None,
        typer.Option(
            "--null-boost",
            help="Added to the score of CCA's null key: more caution with every neighbour "
            "(default: the checkpoint's retrieval.json, else 0).",
            min=0.0,
        ),
    ] = None,
    min_run: Annotated[
        int | None,
        typer.Option(
            "--min-run",
            help="The copy floor N: a token attends to a neighbour only where the text has "
            "followed it for N tokens, else it is predicted as with retrieval off "
            "(default: the checkpoint's retrieval.json, else 0: off).",
            min=0,
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recompute every step (slow; for checking).")
    ] = False,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Two greedy generations, retrieval off and on, side by side, with the "
            "neighbours used per chunk (--json: an object with prompt, off and on). Implies -t 0.",
        ),
    ] = False,
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            help="A retrofit's pretrained base, where it is not at the recorded path "
            "(it must be the same file: its sha256 is checked).",
        ),
    ] = None,
    as_json: ResultJsonOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Continue PROMPT, retrieving k neighbours after every completed chunk. The text
    streams as it is generated (control characters escaped); timing goes to stderr.
    DIR may be a retrodb checkpoint, a RETRO-fit of a pretrained model, or the pretrained
    model itself (a Hugging Face folder or a .gguf file, without retrieval)."""
    from retrodb_model.checkpoint import load_model
    from retrodb_model.generate import generate as run

    if prompt == "-":
        prompt = sys.stdin.read()
    rdb = open_db(db, threads=_set_threads(threads))
    model, ckpt = load_model(directory, db=rdb, base=base)
    if null_boost is not None:
        check_null_boost(null_boost)
        model.set_null_boost(null_boost)
    if min_run is not None:
        model.set_min_run(min_run)  # checks it
    if compare:
        if no_retrieval or not ckpt.retrieval:
            fail("--compare sets retrieval off beside on: give a model trained with retrieval")
        floor = ckpt.min_overlap if min_overlap is None else min_overlap
        runs = {
            name: run(
                model, rdb, prompt, max_tokens=max_tokens, temperature=0.0, retrieval=name == "on",
                k=k, use_cache=not no_cache, rerank=rerank.value, fetch=fetch, min_overlap=floor,
            )
            for name in ("off", "on")
        }  # fmt: skip
        _print_comparison(prompt, runs["off"], runs["on"], as_json=as_json)
        return

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
        min_overlap=ckpt.min_overlap if min_overlap is None else min_overlap,
        on_prompt=None if as_json else echo,
        on_text=None if as_json else echo,
    )
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=1))
        return
    typer.echo("")
    if show_neighbours:
        _print_retrievals(res.retrievals)
    typer.echo(
        typer.style(
            f"\n{len(res.tokens)} tokens in {res.seconds:.2f}s ({res.tokens_per_s:.1f} tok/s after "
            f"the prompt), retrieval {res.retrieval_seconds:.2f}s "
            f"({100 * res.retrieval_share:.0f}%), {len(res.retrievals)} retrievals",
            dim=True,
        ),
        err=True,
    )


def _print_comparison(prompt: str, off: Any, on: Any, *, as_json: bool) -> None:
    """`generate --compare`: the two continuations side by side, then every chunk's
    neighbours (as in the paper's example); or one JSON object {prompt, off, on}."""
    from rich.console import Console
    from rich.table import Table

    from retrodb_model.generate import printable

    if as_json:
        typer.echo(
            json.dumps({"prompt": prompt, "off": off.to_dict(), "on": on.to_dict()}, indent=1)
        )
        return
    table = Table(show_lines=True, expand=True)
    table.add_column("retrieval off", ratio=1, overflow="fold")
    table.add_column("retrieval on", ratio=1, overflow="fold")
    table.add_row(printable(off.prompt_text), printable(on.prompt_text), style="dim")
    table.add_row(printable(off.text), printable(on.text))
    Console(highlight=False, soft_wrap=False).print(table)
    _print_retrievals(on.retrievals)


def _print_retrievals(retrievals: Sequence[Any]) -> None:
    """Every chunk's text and the neighbours retrieved for it (document, key, text)."""
    from retrodb_model.generate import printable

    for r in retrievals:
        typer.echo(typer.style(f"\n[chunk {r.chunk}] {printable(r.chunk_text)!r}", bold=True))
        for rank, (key, doc, text) in enumerate(zip(r.keys, r.docs, r.texts, strict=True), 1):
            if key >= 0:
                typer.echo(
                    f"  {rank}. {doc} key {key}: {printable(text.replace(chr(10), ' '))[:160]}"
                )


def register(app: typer.Typer) -> None:
    """Add `train`, `evaluate`, `generate` and `calibrate` to ``app``."""
    train = with_options(_train, train_options())
    app.command(name="train", cls=Command)(handle_errors(train))
    evaluate_command = with_options(evaluate, eval_options(), before="threads")
    app.command(name="evaluate", cls=Command)(handle_errors(evaluate_command))
    app.command(name="generate", cls=Command)(handle_errors(generate))
    no_floor = [
        o
        for o in eval_options()
        if o.name not in ("min_overlap", "null_boost", "min_run", "no_retrieval")
    ]
    calibrate_command = with_options(calibrate, no_floor, before="threads")
    app.command(name="calibrate", cls=Command)(handle_errors(calibrate_command))
