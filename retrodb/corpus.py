"""Reading inputs: folders of text files, JSONL files and JSONL on stdin.

Every input is validated before anything is written (``scan``), then read again in a
stream (``iter_documents``, or ``iter_pieces`` for pieces of at most about
``PIECE_CHARS`` characters), so a bad file deep in a folder never leaves half a segment
behind and the documents are never all held in memory at once. Text files are validated
and read in blocks, so even a single very large document is never held whole; a JSONL
document is held while its line is parsed.

A document's id is its path relative to the folder given (a file given directly is named
by its file name), or the JSONL ``id`` (``<file name>:<line>`` when a line has none).

Folders are read for the extensions in :data:`TEXT_SUFFIXES` and :data:`JSONL_SUFFIXES`
(any case, optionally ``.gz``); a file given by name is read whatever its extension, as
text unless it is JSONL. Nothing is left out silently: every file of a folder that is not
read and every empty document is listed in :attr:`Corpus.skipped` with the reason.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, TextIO

from .errors import BadInputError, NotFoundError

#: Extensions read from folders (and the same with ``.gz``).
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")

Errors = Literal["strict", "replace"]

#: Target size of the pieces :meth:`Corpus.iter_pieces` yields (characters).
PIECE_CHARS = 1 << 18
#: Bytes read at a time from a file.
_BLOCK = 1 << 20
#: A space with a non-space on each side: where a line without newlines may be cut.
_SPACE_CUT = re.compile(r"(?<=\S) (?=\S)")


def cut_points(text: str) -> list[int]:
    """The offsets where :meth:`Corpus.iter_pieces` may cut ``text``: just after a newline,
    or just before a space between two non-spaces."""
    after_newline = [i + 1 for i, c in enumerate(text) if c == "\n"]
    return after_newline + [m.start() for m in _SPACE_CUT.finditer(text)]


def read_id_file(path: str | Path, *, stdin: TextIO | None = None) -> list[str]:
    """Document ids from a text file (``-``: ``stdin``): one per line; surrounding spaces,
    blank lines and ``#`` comment lines are ignored."""
    if str(path) == "-":
        text = (stdin or sys.stdin).read()
    else:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise NotFoundError(f"{p}: no such file") from exc
        except IsADirectoryError as exc:
            raise BadInputError(f"{p}: is a directory, expected a file of document ids") from exc
        except UnicodeDecodeError as exc:
            raise BadInputError(f"{p}: not UTF-8 text") from exc
    lines = (line.strip() for line in text.splitlines())
    return [s for s in lines if s and not s.startswith("#")]


@dataclass(frozen=True, slots=True)
class DocumentRef:
    """Where one document lives. ``line`` is set for JSONL documents (0-based)."""

    id: str
    path: Path
    line: int | None = None
    offset: int = 0
    """Byte offset of the JSONL line in the (decompressed) file."""


#: Why an input was skipped (:attr:`Skipped.reason`).
EMPTY = "empty"
UNSUPPORTED = "unsupported extension"
NOT_A_FILE = "not a regular file"


@dataclass(frozen=True, slots=True)
class Skipped:
    """An input that holds no document: a file of a folder that is not read, or an empty
    document."""

    file: str
    """The file: relative to the folder given, else as given (``<stdin>`` for ``-``)."""
    reason: str
    """:data:`EMPTY` (no text, or only whitespace), :data:`UNSUPPORTED` (a folder's file
    whose extension is not read; give it by name to read it) or :data:`NOT_A_FILE`."""
    line: int | None = None
    """For a JSONL record: its line (1-based)."""
    doc_id: str | None = None
    """The id the document would have had (empty documents only)."""

    @property
    def name(self) -> str:
        """``file`` or ``file:line``."""
        return self.file if self.line is None else f"{self.file}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "reason": self.reason, "doc_id": self.doc_id}


@dataclass(slots=True)
class Corpus:
    """Validated inputs: every document is readable, non-empty text with a unique id."""

    refs: list[DocumentRef] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    """What holds no document, with the reason, in the order met."""
    bytes: int = 0
    errors: Errors = "strict"
    spooled: list[Path] = field(default_factory=list)
    """Temporary files holding inputs read from stdin (removed by :meth:`cleanup`)."""

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.refs]

    @property
    def skipped_empty(self) -> list[str]:
        """Ids of the empty or whitespace-only documents that were skipped."""
        return [str(s.doc_id) for s in self.skipped if s.reason == EMPTY]

    def iter_documents(self) -> Iterator[tuple[str, str]]:
        """Yield ``(id, text)`` for every document, in a stable order."""
        doc = -1
        parts: list[str] = []
        for i, piece in self.iter_pieces():
            if i != doc:
                if parts:
                    yield self.refs[doc].id, "".join(parts)
                doc, parts = i, []
            parts.append(piece)
        if doc >= 0:
            yield self.refs[doc].id, "".join(parts)

    def iter_pieces(self, max_chars: int | None = None) -> Iterator[tuple[int, str]]:
        """Yield ``(document number, piece)``: every document's text in order, cut into
        pieces of about ``max_chars`` characters. A piece ends just after a newline, or,
        in a line longer than ``4 * max_chars``, just before a space between two
        non-spaces; the pieces of a document concatenate to its text. Each document
        yields at least one piece."""
        max_chars = max_chars or PIECE_CHARS
        open_jsonl: tuple[Path, Iterator[tuple[int, bytes]]] | None = None
        for i, ref in enumerate(self.refs):
            if ref.line is None:
                yield from ((i, p) for p in _cut(self._text_blocks(ref.path), max_chars))
                continue
            if open_jsonl is None or open_jsonl[0] != ref.path:
                open_jsonl = (ref.path, _jsonl_lines(ref.path))
            raw = next((raw for n, raw in open_jsonl[1] if n == ref.line), None)
            if raw is None:
                raise BadInputError(f"{ref.path}: changed while reading (line {ref.line + 1} gone)")
            obj = json.loads(_decode(raw, ref.path, self.errors, line=ref.line))
            yield from ((i, p) for p in _cut(iter([str(obj["text"])]), max_chars))

    def _text_blocks(self, path: Path) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(
            "replace" if self.errors == "replace" else "strict"
        )
        with _open_binary(path) as f:
            while block := f.read(_BLOCK):
                yield decoder.decode(block)
        yield decoder.decode(b"", final=True)

    def cleanup(self) -> None:
        for p in self.spooled:
            p.unlink(missing_ok=True)
        self.spooled.clear()


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
            corpus.spooled.append(tmp)
            _scan_jsonl(tmp, corpus, seen, label="<stdin>", name="<stdin>")
            continue
        path = Path(inp)
        if not path.exists():
            raise NotFoundError(f"{path}: no such file or directory")
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                rel = f.relative_to(path).as_posix()
                if f.is_dir():
                    continue
                if not f.is_file():
                    corpus.skipped.append(Skipped(rel, NOT_A_FILE))
                elif _kind(f) is None:
                    corpus.skipped.append(Skipped(rel, UNSUPPORTED))
                else:
                    _scan_file(f, corpus, seen, doc_id=rel, name=rel)
        elif path.is_file():
            _scan_file(path, corpus, seen, doc_id=path.name, name=str(path))
        else:
            raise BadInputError(f"{path}: not a regular file or folder")
    if not corpus.refs:
        what = f" ({describe_skipped(corpus.skipped)})" if corpus.skipped else ""
        raise BadInputError(f"no documents found in {', '.join(map(str, inputs))}{what}")
    return corpus


def describe_skipped(skipped: Sequence[Skipped], *, show: int = 3) -> str:
    """One line for people: ``skipped 3 files: 2 with an unsupported extension (LICENSE,
    code.py), 1 empty (notes.txt)``, at most ``show`` names per reason."""
    by_reason: dict[str, list[str]] = {}
    for s in skipped:
        by_reason.setdefault(s.reason, []).append(s.name)
    parts = []
    for reason, names in by_reason.items():
        more = f", and {len(names) - show:,} more" if len(names) > show else ""
        what = {EMPTY: "empty", UNSUPPORTED: "with an unsupported extension"}.get(reason, reason)
        parts.append(f"{len(names):,} {what} ({', '.join(names[:show])}{more})")
    records = sum(1 for s in skipped if s.line is not None)
    files = len(skipped) - records
    counts = [plural(files, "file")] if files else []
    counts += [plural(records, "JSONL record")] if records else []
    return f"skipped {' and '.join(counts)}: " + "; ".join(parts) if skipped else ""


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """``1 document``, ``2 documents``, ``26,797 chunks``."""
    return f"{n:,} {noun if n == 1 else plural_form or noun + 's'}"


def _kind(path: Path) -> str | None:
    """How a folder's file is read: ``jsonl``, ``text`` or None (not read). Extensions are
    compared in any case (``notes.TXT`` is text)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _cut(blocks: Iterator[str], max_chars: int) -> Iterator[str]:
    """Re-cut a stream of text into pieces (see :meth:`Corpus.iter_pieces`).

    A run of more than ``4 * max_chars`` characters with neither a newline nor a space
    between non-spaces is held whole (cutting it could change its tokenization)."""
    buf = ""
    emitted = False
    for block in blocks:
        buf += block
        while len(buf) >= max_chars:
            nl = buf.rfind("\n", 0, max_chars)
            if nl < 0:
                nl = buf.find("\n", max_chars, 4 * max_chars)
            if nl >= 0:
                cut = nl + 1
            elif len(buf) < 4 * max_chars:
                break  # the line may end in the next block
            else:
                cut = 0
                for m in _SPACE_CUT.finditer(buf, 1, 4 * max_chars):
                    cut = m.start()
                if cut == 0:
                    break
            yield buf[:cut]
            emitted = True
            buf = buf[cut:]
    if buf or not emitted:
        yield buf


class _Reader:
    """A binary file (gzip decompressed) whose read errors become BadInputError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            gz = path.name.lower().endswith(".gz")
            self._f = gzip.open(path, "rb") if gz else open(path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise BadInputError(f"{path}: cannot read ({exc})") from exc

    def read(self, n: int) -> bytes:
        try:
            return self._f.read(n)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise BadInputError(f"{self.path}: cannot read ({exc})") from exc

    def readline(self) -> bytes:
        try:
            return self._f.readline()
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise BadInputError(f"{self.path}: cannot read ({exc})") from exc

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _open_binary(path: Path) -> _Reader:
    return _Reader(path)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes without the newline)`` of a JSONL file, streamed."""
    with _open_binary(path) as f:
        n = 0
        while line := f.readline():
            yield n, line[:-1] if line.endswith(b"\n") else line
            n += 1


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


def _add(
    corpus: Corpus,
    seen: dict[str, str],
    ref: DocumentRef,
    text: str,
    where: str,
    *,
    name: str,
    line: int | None = None,
    size: int | None = None,
) -> None:
    if not text.strip():
        corpus.skipped.append(Skipped(name, EMPTY, line=line, doc_id=ref.id))
        return
    if ref.id in seen:
        raise BadInputError(f"{where}: duplicate document id {ref.id!r} (also in {seen[ref.id]})")
    seen[ref.id] = where
    corpus.refs.append(ref)
    corpus.bytes += len(text.encode("utf-8", errors="replace")) if size is None else size


def _scan_file(path: Path, corpus: Corpus, seen: dict[str, str], *, doc_id: str, name: str) -> None:
    """A JSONL file by its extension, any other file as text (a folder's files are
    filtered by :func:`_kind` before)."""
    if _kind(path) == "jsonl":
        _scan_jsonl(path, corpus, seen, label=str(path), name=name)
        return
    _scan_text(path, corpus, seen, doc_id=doc_id, name=name)


def _scan_text(path: Path, corpus: Corpus, seen: dict[str, str], *, doc_id: str, name: str) -> None:
    """Validate a text file block by block (never holding it whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pos = 0
    size = 0
    has_text = False
    with _open_binary(path) as f:
        while True:
            block = f.read(_BLOCK)
            if b"\x00" in block:
                raise BadInputError(
                    f"{path}: binary data (NUL byte at offset {pos + block.index(0)}); "
                    f"not a text document"
                )
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                if corpus.errors != "replace":
                    raise BadInputError(
                        f"{path}: invalid UTF-8 at byte {pos - pending + exc.start} "
                        f"(use --errors replace to substitute)"
                    ) from exc
                decoder = codecs.getincrementaldecoder("utf-8")("replace")
                text = decoder.decode(block, final=not block)
                has_text = True  # U+FFFD is text
            has_text = has_text or bool(text.strip())
            size += len(text.encode("utf-8", errors="replace"))
            pos += len(block)
            if not block:
                break
    ref = DocumentRef(id=doc_id, path=path)
    _add(corpus, seen, ref, "x" if has_text else "", str(path), name=name, size=size)


def _scan_jsonl(path: Path, corpus: Corpus, seen: dict[str, str], *, label: str, name: str) -> None:
    base = Path(label).name
    offset = 0
    for i, raw in _jsonl_lines(path):
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
            name=name,
            line=i + 1,
        )
