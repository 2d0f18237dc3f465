"""Shared CLI plumbing: error reporting, progress bars, and the arguments and options
that several commands share (each defined once here, or in engine.py for where the work
runs). The library never prints; this is where its callbacks become bars and its errors
become one clear line.

``--quiet`` means the same in every command that has it: no progress bars and no
summary line on success. Errors, damage found by `verify`, skipped inputs and notes still
go to stderr (or, for `verify`, stdout), and the exit status is unchanged."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperCommand, TyperGroup, TyperOption

from retrodb.corpus import UNSUPPORTED, Skipped, describe_skipped
from retrodb.db import RetroDB
from retrodb.errors import RetroDBError
from retrodb.rerank import DEFAULT_FETCH

err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

#: What each progress stage counts, for the rate column.
UNITS = {
    "tokenize": "docs",
    "encode": "chunks",
    "index": "chunks",
    "verify": "files",
    "reachability": "chunks",
    "neighbours": "chunks",
    "export": "steps",
    "tokenizer": "steps",
    "train": "steps",
    "evaluate": "chunks",
}


class _PlainFlags:
    """Help that shows no `<bool>` type after flags, which take no value."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "is_flag", False):
                param.metavar = ""  # typer shows a flag's metavar as its type

    # typer's own (vendored) click types the context; Any keeps this file off its internals
    def get_help_option(self, ctx: Any) -> TyperOption | None:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class Group(_PlainFlags, TyperGroup):
    """The `retrodb` command itself (its --version and --help)."""


class Command(_PlainFlags, TyperCommand):
    """Every retrodb command: help that names arguments as the usage line of a Unix tool
    does (`DB`, not `{db}`) and shows no `<bool>` type after flags, which take no value."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name or "arg").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


DBArg = Annotated[Path, typer.Argument(help="Path of the database directory.")]
DBOrURLArg = Annotated[
    str,
    typer.Argument(
        help="Path of the database directory, or the http:// address of `retrodb serve` "
        "(token: $RETRODB_TOKEN)."
    ),
]


def open_db(target: str | Path, *, threads: int | None = None, device: str = "cpu") -> Any:
    """The database at a path (:class:`RetroDB`) or served at an http(s) address (the
    client, with the same read API)."""
    import retrodb

    return retrodb.open(target, threads=threads, device=device)


InputsArg = Annotated[
    list[str],
    typer.Argument(
        help="Folders (read recursively: .txt, .md, .rst and JSONL .jsonl/.ndjson files, any "
        "case, optionally .gz; other files are skipped and listed), files given by name (read "
        "whatever their extension; JSONL has a 'text' field and an optional 'id'), or '-' "
        "for JSONL on stdin."
    ),
]


class OnError(StrEnum):
    """What reading invalid UTF-8 does (retrodb.corpus)."""

    strict = "strict"
    replace = "replace"  # type: ignore[assignment]  # a member, where str has a method


ErrorsOpt = Annotated[
    OnError,
    typer.Option(
        "--errors", help="Invalid UTF-8: refuse the input (strict) or substitute U+FFFD (replace)."
    ),
]
ExactOpt = Annotated[bool, typer.Option("--exact", help="Exact search instead of HNSW (slow).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ResultJsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="No progress bars and no summary line; errors, warnings and skipped inputs are "
        "still printed.",
    ),
]


class Rerank(StrEnum):
    """How the k neighbours of a query are chosen (retrodb.rerank)."""

    none = "none"
    overlap = "overlap"


RerankOpt = Annotated[
    Rerank,
    typer.Option(
        "--rerank",
        help="none: the k nearest keys. overlap: fetch more dense candidates and keep the k "
        "that share the longest token run with the query chunk.",
    ),
]
FetchOpt = Annotated[
    int | None,
    typer.Option(
        "--fetch",
        help="With --rerank overlap: dense candidates searched per kept neighbour "
        f"(default {DEFAULT_FETCH}).",
        min=1,
    ),
]


ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="Encoder threads (default: $RETRODB_THREADS, else all cores this process may use).",
        min=1,
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where the encoder runs: cpu, cuda, cuda:N or auto (cuda when a GPU and ONNX "
        "Runtime's CUDA provider are present, else cpu). The GPU build: pip install "
        "'retrodb\\[gpu]' (docs/scale.md).",
    ),
]


def say_device(db: RetroDB, device: str, quiet: bool) -> None:
    """Say where the encoder ran (stderr), unless quiet or it is the default CPU."""
    enc = getattr(db, "open_encoder", None)  # a served database encodes on its server
    if quiet or enc is None or (device == "cpu" and enc.device == "cpu"):
        return
    err_console.print(
        f"encoder: {enc.device} ({enc.precision}; {enc.device_note})", highlight=False
    )


def note(message: str) -> None:
    """A line on stderr that the user should read even with --quiet (skipped inputs)."""
    err_console.print(message, highlight=False, soft_wrap=True)


def say_skipped(skipped: Sequence[Skipped]) -> None:
    """``skipped 3 files: ...`` on stderr, with the reasons, when inputs were skipped."""
    if skipped:
        note(describe_skipped(skipped))
        if any(s.reason == UNSUPPORTED for s in skipped):
            note(
                "  folders are read for .txt, .md, .rst, .jsonl and .ndjson files (any case, "
                "optionally .gz); give a file by name to read it whatever its extension"
            )


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` on stderr and exit with ``code``."""
    # escape: messages hold brackets that are not markup (pip install 'retrodb[ray]')
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file ('-': standard input)."""
    if str(path) == "-":
        text = sys.stdin.read()
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            fail(f"{path}: no such file")
        except IsADirectoryError:
            fail(f"{path}: is a directory, expected a text file")
        except UnicodeDecodeError:
            fail(f"{path}: not UTF-8 text")
    return [line for line in text.splitlines() if line.strip()]


def stdout_closed() -> None:
    """End quietly, with status 0, when the reader of standard output has gone (`retrodb
    info DB | head -1`), as Unix tools do: what is still buffered goes to /dev/null, so
    that flushing at exit does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    raise typer.Exit(0)


def handle_errors(fn: F) -> F:
    """Turn library errors (and a few OS errors) into one line on stderr and exit 1; a
    closed standard output ends the command quietly with status 0."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return result
        except BrokenPipeError:
            stdout_closed()
        except RetroDBError as exc:
            fail(str(exc))
        except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            fail(f"{exc.filename or ''}: {exc.strerror}")
        except OSError as exc:
            if exc.errno is not None and exc.strerror:
                fail(f"{exc.filename or ''}: {exc.strerror}".lstrip(": "))
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted; nothing was committed by the unfinished operation")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class _Rate(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task: Any) -> Any:  # noqa: D102
        from rich.text import Text

        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "")
        return Text(f"{speed:,.0f} {unit}/s" if speed else "", style="cyan")


@dataclasses.dataclass
class _Stage:
    start: float
    printed: float  # when its last line was written
    done: int = 0
    total: int = 0
    finished: bool = False


class PlainProgress:
    """Progress as plain lines, for a stderr that is not a terminal (a CI log, ``2>&1 |
    tee``), where bars would print nothing until the end: a line when a stage starts, one
    every ``interval`` seconds while it runs, and one when it ends (``done == total``, or at
    the end of the command), each with the stage, done/total and the rate."""

    def __init__(
        self,
        write: Callable[[str], None],
        *,
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write, self._interval, self._clock = write, interval, clock
        self._stages: dict[str, _Stage] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self._clock()
        st = self._stages.get(stage)
        first = st is None
        if st is None:
            st = self._stages[stage] = _Stage(start=now, printed=now)
        elif st.finished:
            return
        st.done, st.total = done, total
        st.finished = bool(total) and done >= total
        if first or st.finished or now - st.printed >= self._interval:
            self._line(stage, st, now)

    def close(self) -> None:
        """The last figures of every stage that did not reach its total."""
        now = self._clock()
        for stage, st in self._stages.items():
            if not st.finished:
                st.finished = True
                self._line(stage, st, now)

    def _line(self, stage: str, st: _Stage, now: float) -> None:
        st.printed = now
        unit, elapsed = UNITS.get(stage, "items"), now - st.start
        if st.total:
            parts = [f"{stage}: {st.done:,}/{st.total:,} {unit}"]
            parts.append(f"{100 * st.done / st.total:.0f}%")
        else:
            parts = [f"{stage}: {st.done:,} {unit}"]
        if elapsed > 0:
            rate = st.done / elapsed
            parts.append(f"{rate:,.{0 if rate >= 10 else 1}f} {unit}/s")
        parts.append(f"{elapsed:.0f} s")
        self._write(", ".join(parts))


@contextlib.contextmanager
def progress_bars(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """Yield a ``progress(stage, done, total)`` callback drawing one bar per stage, or
    writing plain lines (PlainProgress) where stderr is not a terminal."""
    if quiet:
        yield lambda stage, done, total: None
        return
    if not err_console.is_terminal:
        plain = PlainProgress(lambda line: print(line, file=sys.stderr, flush=True))
        try:
            yield plain
        finally:
            plain.close()
        return
    bars = Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total or None, unit=UNITS.get(stage, "items"))
        bars.update(tasks[stage], completed=done, total=total or None)

    with bars:
        yield update
