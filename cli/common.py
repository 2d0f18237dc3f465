"""Shared CLI plumbing: error reporting and progress bars. The library never prints;
this is where its callbacks become bars and its errors become one clear line."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
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
from typer.core import TyperCommand, TyperOption

from retrodb.db import RetroDB
from retrodb.errors import RetroDBError

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


class Command(TyperCommand):
    """Every retrodb command: help that names arguments as the usage line of a Unix tool
    does (`DB`, not `{db}`) and shows no `<bool>` type after flags, which take no value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "is_flag", False):
                param.metavar = ""  # typer shows a flag's metavar as its type

    # typer's own (vendored) click types the context; Any keeps this file off its internals
    def get_help_option(self, ctx: Any) -> TyperOption | None:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name or "arg").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="Encoder threads (default: all cores).", min=1)
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where the encoder runs: cpu, cuda, cuda:N or auto (cuda when a GPU and ONNX "
        "Runtime's CUDA provider are present, else cpu). The GPU build: pip install "
        "'retrodb[gpu]' (docs/scale.md).",
    ),
]


def say_device(db: RetroDB, device: str, quiet: bool) -> None:
    """Say where the encoder ran (stderr), unless quiet or it is the default CPU."""
    enc = db._encoder
    if quiet or enc is None or (device == "cpu" and enc.device == "cpu"):
        return
    err_console.print(
        f"encoder: {enc.device} ({enc.precision}; {enc.device_note})", highlight=False
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


def handle_errors(fn: F) -> F:
    """Turn library errors (and a few OS errors) into one line on stderr and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
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


@contextlib.contextmanager
def progress_bars(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """Yield a ``progress(stage, done, total)`` callback drawing one bar per stage."""
    if quiet:
        yield lambda stage, done, total: None
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
