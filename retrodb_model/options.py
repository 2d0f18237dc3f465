"""The command line of the argument dataclasses `TrainArgs` and `EvalArgs`.

Each field is one option, spelled ``--field-name`` unless :data:`TRAIN_SPELLING` or
:data:`EVAL_SPELLING` says otherwise, with the docstring written under the field as its
help and the field's default as its default: the command line and the Python API cannot
drift apart. This module describes options (:class:`Option`) and turns their values back
into the dataclass (:func:`from_options`); it knows no parser, and `retrodb_cli` maps each
Option to a typer parameter. Like :mod:`retrodb_model.config` it imports no torch, so the
command line reads it when it starts.

>>> [o.flags for o in train_options()][:3]
[(), ('--neighbours', '-n'), ('--out', '-o')]
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import types
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from retrodb.errors import BadInputError
from retrodb_model.config import EvalArgs, TrainArgs

A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class Spelling:
    """How one field appears on the command line, where not as ``--field-name``."""

    flags: tuple[str, ...] | None = None
    """The option's names (default ``("--field-name",)``); ``()``: a positional argument."""
    type: Any = None
    """The value's type on the command line, where it is not the field's."""
    more_help: str = ""
    """Help after the field's docstring."""
    metavar: str | None = None
    """What stands for the value in the help (default: its type)."""
    min: int | None = None
    """The smallest value the command line accepts (and its help shows)."""


@dataclass(frozen=True, slots=True)
class Option:
    """One command-line parameter made from a dataclass field."""

    name: str
    """The field's name, which is also the parameter's."""
    flags: tuple[str, ...]
    """``("--batch-size", "-b")``; empty for a positional argument."""
    help: str
    type: Any
    """The value's type on the command line: the field's, ``X | None`` for an optional
    field, ``list[str] | None`` (repeated KEY=VALUE, :func:`parse_model_overrides`) for a
    dict field."""
    default: Any
    """The field's default; None for a default factory; ``dataclasses.MISSING``: required."""
    metavar: str | None = None
    min: int | None = None
    show_default: bool = True
    """False where the default is made by a factory (None stands for it)."""

    @property
    def argument(self) -> bool:
        """Whether it is a positional argument rather than an option."""
        return not self.flags


#: TrainArgs' fields that are not spelled ``--field-name``, and help beyond the docstring.
TRAIN_SPELLING: dict[str, Spelling] = {
    "db": Spelling(flags=(), type=Path),
    "neighbours": Spelling(flags=("--neighbours", "-n")),
    "out": Spelling(flags=("--out", "-o")),
    "batch_size": Spelling(flags=("--batch-size", "-b")),
    "k": Spelling(flags=("-k",)),
    "model": Spelling(
        more_help="Repeat KEY=VALUE (VALUE read as JSON when it parses, e.g. dropout=0.1), "
        "or give one JSON object.",
        metavar="KEY=VALUE",
    ),
}
#: EvalArgs' fields that are not spelled ``--field-name``, and the bounds the command line
#: checks before EvalArgs does.
EVAL_SPELLING: dict[str, Spelling] = {
    "k": Spelling(flags=("-k",), min=1),
    "batch_size": Spelling(flags=("--batch-size", "-b"), min=1),
    "max_tokens": Spelling(min=1),
    "fetch": Spelling(min=1),
    "min_run": Spelling(min=0),
}


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


def _option_type(hint: Any) -> Any:
    """The command-line type of a field of type ``hint``."""
    if get_origin(hint) is dict:
        return list[str] | None  # --model KEY=VALUE, repeatable
    if get_origin(hint) in (Union, types.UnionType):  # X | None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return inner | None
    return hint


def options(cls: type, spelling: Mapping[str, Spelling]) -> list[Option]:
    """One :class:`Option` per field of the dataclass ``cls``, in field order."""
    docs, hints = field_docs(cls), get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spelled = spelling.get(f.name, Spelling())
        text = " ".join(x for x in (docs.get(f.name, ""), spelled.more_help) if x)
        factory = f.default_factory is not dataclasses.MISSING
        flags = spelled.flags
        out.append(
            Option(
                name=f.name,
                flags=("--" + f.name.replace("_", "-"),) if flags is None else flags,
                help=text,
                type=spelled.type or _option_type(hints[f.name]),
                default=None if factory else f.default,
                metavar=spelled.metavar,
                min=spelled.min,
                show_default=not factory,
            )
        )
    return out


def train_options() -> list[Option]:
    """The options of `retrodb train`: :class:`TrainArgs`' fields (`db` the argument)."""
    return options(TrainArgs, TRAIN_SPELLING)


def eval_options() -> list[Option]:
    """The options of `retrodb evaluate` that :class:`EvalArgs` holds."""
    return options(EvalArgs, EVAL_SPELLING)


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


def from_options(cls: type[A], values: Mapping[str, Any]) -> A:
    """``cls`` from the values of its :func:`options`: a path where the field is a string
    becomes the string, an enum member its value, and repeated KEY=VALUE overrides of a
    dict field the dict. Raises :class:`retrodb.errors.BadInputError` as ``cls`` does."""
    hints = get_type_hints(cls)
    fields: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, Path) and hints[name] is str:
            value = str(value)
        elif get_origin(hints[name]) is dict and not isinstance(value, dict):
            value = parse_model_overrides(value)
        fields[name] = value
    return cls(**fields)


__all__ = [
    "EVAL_SPELLING",
    "TRAIN_SPELLING",
    "Option",
    "Spelling",
    "eval_options",
    "field_docs",
    "from_options",
    "options",
    "parse_model_overrides",
    "train_options",
]
