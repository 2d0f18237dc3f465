"""Reading inputs: folders of text files, JSONL files and JSONL on stdin.

Every input is validated before anything is written (``scan``), then read again in a
stream (``iter_documents``), so a bad file deep in a folder never leaves half a segment
behind and the documents are never all held in memory at once.

A document's id is its path relative to the folder given (a file given directly is named
by its file name), or the JSONL ``id`` (``<file name>:<line>`` when a line has none).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from .errors import BadInputError, NotFoundError

#: Extensions read from folders (and the same with ``.gz``).
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")

Errors = Literal["strict", "replace"]


@dataclass(frozen=True, slots=True)
class DocumentRef:
    """Where one document lives. ``line`` is set for JSONL documents (0-based)."""

    id: str
    path: Path
    line: int | None = None
    offset: int = 0
    """Byte offset of the JSONL line in the (decompressed) file."""


@dataclass(slots=True)
class Corpus:
    """Validated inputs: every document is readable, non-empty text with a unique id."""

    refs: list[DocumentRef] = field(default_factory=list)
    skipped_empty: list[str] = field(default_factory=list)
    """Ids of empty or whitespace-only documents that were skipped."""
    bytes: int = 0
    errors: Errors = "strict"
    _tempfiles: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.refs]

    def iter_documents(self) -> Iterator[tuple[str, str]]:
        """Yield ``(id, text)`` for every document, in a stable order."""
        current: Path | None = None
        lines: list[bytes] = []
        for ref in self.refs:
            if ref.line is None:
                yield ref.id, _decode(_read_bytes(ref.path), ref.path, self.errors)
                continue
            if ref.path != current:
                current = ref.path
                lines = _read_bytes(ref.path).split(b"\n")
            raw = lines[ref.line]
            obj = json.loads(_decode(raw, ref.path, self.errors, line=ref.line))
            yield ref.id, str(obj["text"])

    def cleanup(self) -> None:
        for p in self._tempfiles:
            p.unlink(missing_ok=True)
        self._tempfiles.clear()


def scan(
    inputs: Sequence[str | Path],
    *,
    errors: Errors = "strict",
    stdin: BinaryIO | None = None,
) -> Corpus:
    """Find and validate every document of ``inputs``.

    ``-`` reads JSONL from ``stdin`` (spooled to a temporary file). Raises
    :class:`BadInputError` or :class:`NotFoundError` naming the file and the problem."""
    if errors not in ("strict", "replace"):
        raise BadInputError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if not inputs:
        raise BadInputError("no input given")
    corpus = Corpus(errors=errors)
    seen: dict[str, str] = {}
    for inp in inputs:
        if str(inp) == "-":
            src = stdin if stdin is not None else sys.stdin.buffer
            fd, name = tempfile.mkstemp(prefix="retrodb-stdin-", suffix=".jsonl")
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out)
            tmp = Path(name)
            corpus._tempfiles.append(tmp)
            _scan_jsonl(tmp, corpus, seen, label="<stdin>")
            continue
        path = Path(inp)
        if not path.exists():
            raise NotFoundError(f"{path}: no such file or directory")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
            for f in files:
                rel = f.relative_to(path).as_posix()
                _scan_file(f, corpus, seen, doc_id=rel)
        elif path.is_file():
            kind = _kind(path)
            if kind is None:
                raise BadInputError(
                    f"{path}: unsupported input (expected a folder, .txt/.md/.rst, "
                    f".jsonl, optionally .gz, or '-')"
                )
            _scan_file(path, corpus, seen, doc_id=path.name)
        else:
            raise BadInputError(f"{path}: not a regular file or folder")
    if not corpus.refs:
        what = (
            f" ({len(corpus.skipped_empty)} empty documents skipped)"
            if corpus.skipped_empty
            else ""
        )
        raise BadInputError(f"no documents found in {', '.join(map(str, inputs))}{what}")
    return corpus


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise BadInputError(f"{path}: cannot read ({exc})") from exc


def _decode(raw: bytes, path: Path, errors: Errors, *, line: int | None = None) -> str:
    where = f"{path}" if line is None else f"{path}:{line + 1}"
    if b"\x00" in raw:
        raise BadInputError(f"{where}: binary data (NUL bytes); not a text document")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if errors == "replace":
            return raw.decode("utf-8", errors="replace")
        raise BadInputError(
            f"{where}: invalid UTF-8 at byte {exc.start} (use --errors replace to substitute)"
        ) from exc


def _add(corpus: Corpus, seen: dict[str, str], ref: DocumentRef, text: str, where: str) -> None:
    if not text.strip():
        corpus.skipped_empty.append(ref.id)
        return
    if ref.id in seen:
        raise BadInputError(f"{where}: duplicate document id {ref.id!r} (also in {seen[ref.id]})")
    seen[ref.id] = where
    corpus.refs.append(ref)
    corpus.bytes += len(text.encode("utf-8", errors="replace"))


def _scan_file(path: Path, corpus: Corpus, seen: dict[str, str], *, doc_id: str) -> None:
    if _kind(path) == "jsonl":
        _scan_jsonl(path, corpus, seen, label=str(path))
        return
    text = _decode(_read_bytes(path), path, corpus.errors)
    _add(corpus, seen, DocumentRef(id=doc_id, path=path), text, str(path))


def _scan_jsonl(path: Path, corpus: Corpus, seen: dict[str, str], *, label: str) -> None:
    data = _read_bytes(path)
    base = Path(label).name
    offset = 0
    for i, raw in enumerate(io.BytesIO(data).read().split(b"\n")):
        where = f"{label}:{i + 1}"
        start = offset
        offset += len(raw) + 1
        if not raw.strip():
            continue
        line = _decode(raw, Path(label), corpus.errors, line=i)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{where}: invalid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or "text" not in obj:
            raise BadInputError(f"{where}: a JSONL line must be an object with a 'text' field")
        if not isinstance(obj["text"], str):
            raise BadInputError(f"{where}: 'text' must be a string")
        doc_id = obj.get("id", f"{base}:{i + 1}")
        if not isinstance(doc_id, str | int):
            raise BadInputError(f"{where}: 'id' must be a string or an integer")
        if "\x00" in obj["text"]:
            raise BadInputError(f"{where}: NUL character in 'text'; not a text document")
        _add(
            corpus,
            seen,
            DocumentRef(id=str(doc_id), path=path, line=i, offset=start),
            obj["text"],
            where,
        )
