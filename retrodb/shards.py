"""The work of a distributed build, one task at a time, without any engine.

A distributed build (:mod:`retrodb.ray_engine`) cuts the documents into *shards*: runs of
consecutive documents in input order, one segment each. This module holds what the tasks
of that build do, as plain functions the engine calls and the tests can call alone:

- :func:`plan_shards`: documents -> shards of about equal bytes (on the driver);
- :func:`tokenize_shard`: one shard -> *parts* of at most ``part_rows`` chunk rows, read,
  tokenized and chunked exactly as a local build does (:class:`~retrodb.chunking.Chunker`,
  :class:`~retrodb.tokenizer.PieceTokenizer`);
- :func:`encode_part`: a part's rows -> their keys, through :func:`~retrodb.ingest.encode_ids`;
- :func:`write_shard`: the encoded parts of one shard -> one sealed segment, written with
  :class:`~retrodb.segment.SegmentWriter` (so it is byte-compatible with a local segment),
  whose keys start at the ``first_key`` the driver assigned.

Keys: shard s holds keys ``first_key(s) .. first_key(s) + chunks(s) - 1`` with
``first_key(s)`` the build's first key plus the chunks of shards 0..s-1, so the keys of a
distributed build are those of a local build of the same documents (:func:`first_keys`).

A part travels between tasks as a :class:`Part` (arrays) or, inside a Ray Data block, as a
row of plain columns (:meth:`Part.to_row`, :meth:`Part.from_row`): integers, bytes and one
JSON string, which every block format carries without extension types.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import corpus as corpus_mod
from .chunking import Chunker, DocumentTable
from .config import DBConfig
from .corpus import DocumentRef
from .errors import BadInputError, CorruptError, MismatchError, NotFoundError
from .ingest import _document_ids, encode_ids
from .segment import SegmentWriter
from .storage import SegmentMeta, Storage, tokenizer_file, tokenizer_kind
from .tokenizer import PieceTokenizer, Tokenizer

if TYPE_CHECKING:
    from .encoder import Encoder

#: Chunk rows per part (the unit of encoding work), by device: a few seconds of a CPU
#: encoder, a few batches of a GPU one.
PART_ROWS = {"cpu": 256, "cuda": 4096}
#: Target text bytes per shard (one segment each): about 4 million chunks of 64 tokens.
SHARD_BYTES = 1 << 30
#: The environment variable of the worker-kill test hook (see :func:`kill_hook`).
KILL_DIR_ENV = "RETRODB_TEST_KILL_DIR"
#: The points where :func:`kill_hook` may end a worker.
KILL_POINTS = ("tokenize", "encode", "write", "search")


# ---------------------------------------------------------------- planning


@dataclass(frozen=True, slots=True)
class Shard:
    """Documents ``refs`` (consecutive, in input order) that become one segment."""

    index: int
    refs: tuple[DocumentRef, ...]
    bytes: int

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.refs]

    def to_json(self) -> str:
        refs = [[r.id, str(r.path.absolute()), r.line, r.offset] for r in self.refs]
        return json.dumps({"index": self.index, "bytes": self.bytes, "refs": refs})

    @classmethod
    def from_json(cls, text: str) -> Shard:
        d = json.loads(text)
        refs = tuple(
            DocumentRef(id=i, path=Path(p), line=line, offset=off) for i, p, line, off in d["refs"]
        )
        return cls(index=int(d["index"]), refs=refs, bytes=int(d["bytes"]))


def document_sizes(refs: Sequence[DocumentRef]) -> list[int]:
    """About how many bytes each document holds: a text file's size, a JSONL line's span
    (from the offsets ``scan`` recorded). Only used to balance shards."""
    sizes: list[int] = []
    file_size: dict[Path, int] = {}

    def size_of(path: Path) -> int:
        if path not in file_size:
            try:
                file_size[path] = path.stat().st_size
            except OSError:
                file_size[path] = 0
        return file_size[path]

    for i, ref in enumerate(refs):
        if ref.line is None:
            sizes.append(max(1, size_of(ref.path)))
            continue
        nxt = refs[i + 1] if i + 1 < len(refs) else None
        end = nxt.offset if nxt is not None and nxt.path == ref.path else size_of(ref.path)
        sizes.append(max(1, end - ref.offset))
    return sizes


def plan_shards(
    corpus: corpus_mod.Corpus,
    *,
    shards: int | None = None,
    min_shards: int = 1,
    shard_bytes: int = SHARD_BYTES,
) -> list[Shard]:
    """Cut ``corpus`` into shards of consecutive documents of about equal bytes.

    ``shards``: exactly this many (fewer when there are fewer documents); else enough that
    none holds much more than ``shard_bytes``, and at least ``min_shards`` (so that every
    worker gets one)."""
    refs = corpus.refs
    if not refs:
        raise BadInputError("no documents to build from")
    sizes = np.array(document_sizes(refs), dtype=np.int64)
    total = int(sizes.sum())
    if shards is None:
        shards = max(min_shards, -(-total // max(1, shard_bytes)))
    if shards < 1:
        raise BadInputError(f"shards must be positive, got {shards}")
    n = min(shards, len(refs))
    # Cut at the document boundary nearest each multiple of total/n, then make every shard
    # non-empty.
    ends = np.concatenate([[0], np.cumsum(sizes)])  # ends[b]: bytes of the first b documents
    cuts = []
    for j in range(1, n):
        target = total * j / n
        b = int(np.searchsorted(ends, target, side="left"))  # ends[b - 1] < target <= ends[b]
        cuts.append(b if ends[b] - target <= target - ends[b - 1] else b - 1)
    bounds = [0]
    for j, c in enumerate(cuts):
        lo, hi = bounds[-1] + 1, len(refs) - (n - 1 - j)
        bounds.append(min(max(c, lo), hi))
    bounds.append(len(refs))
    return [
        Shard(index=s, refs=tuple(refs[a:b]), bytes=int(sizes[a:b].sum()))
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]


def first_keys(first_key: int, chunks: Sequence[int]) -> list[int]:
    """The first key of each shard: ``first_key`` plus the chunks of the shards before it."""
    out, at = [], first_key
    for c in chunks:
        out.append(at)
        at += int(c)
    return out


# ---------------------------------------------------------------- parts


@dataclass(slots=True)
class Part:
    """Up to ``PART_ROWS`` consecutive chunk rows of one shard.

    ``doc`` numbers the shard's documents from 0. Part 0 of a shard also carries the
    shard's document ids and document table (``ids`` and ``table``)."""

    shard: int
    part: int
    tokens: np.ndarray  # [r, m] token dtype
    lengths: np.ndarray  # [r] int32
    doc: np.ndarray  # [r] int32
    vectors: np.ndarray | None = None  # [r, d] float32, once encoded
    ids: list[str] | None = None
    table: DocumentTable | None = None
    parts: int = 0
    """How many parts the shard has (set on every part)."""

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    def to_row(self) -> dict[str, Any]:
        """A row of plain columns (ints, bytes, a JSON string) for a Ray Data block."""
        meta: dict[str, Any] = {
            "dtype": self.tokens.dtype.str,
            "m": int(self.tokens.shape[1]),
            "dim": 0 if self.vectors is None else int(self.vectors.shape[1]),
        }
        if self.ids is not None and self.table is not None:
            meta["ids"] = self.ids
        return {
            "shard": self.shard,
            "part": self.part,
            "parts": self.parts,
            "rows": self.rows,
            "tokens": self.tokens.tobytes(),
            "lengths": self.lengths.astype("<i4").tobytes(),
            "doc": self.doc.astype("<i4").tobytes(),
            "vectors": b"" if self.vectors is None else self.vectors.astype("<f4").tobytes(),
            "table": b"" if self.table is None else _table_bytes(self.table),
            "meta": json.dumps(meta),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Part:
        meta = json.loads(str(row["meta"]))
        r, m, dim = int(row["rows"]), int(meta["m"]), int(meta["dim"])
        tokens = np.frombuffer(row["tokens"], dtype=np.dtype(meta["dtype"])).reshape(r, m)
        vectors = np.frombuffer(row["vectors"], dtype="<f4").reshape(r, dim) if dim else None
        table = _table_from_bytes(row["table"]) if len(row["table"]) else None
        return cls(
            shard=int(row["shard"]),
            part=int(row["part"]),
            parts=int(row["parts"]),
            tokens=tokens,
            lengths=np.frombuffer(row["lengths"], dtype="<i4"),
            doc=np.frombuffer(row["doc"], dtype="<i4"),
            vectors=vectors,
            ids=meta.get("ids"),
            table=table,
        )


def _table_bytes(t: DocumentTable) -> bytes:
    d = t.first_chunk.shape[0]
    head = np.array([d], dtype="<i8").tobytes()
    return (
        head
        + t.first_chunk.astype("<i8").tobytes()
        + t.num_chunks.astype("<i4").tobytes()
        + t.num_tokens.astype("<i8").tobytes()
    )


def _table_from_bytes(b: bytes) -> DocumentTable:
    d = int(np.frombuffer(b[:8], dtype="<i8")[0])
    at = 8
    first = np.frombuffer(b[at : at + 8 * d], dtype="<i8")
    at += 8 * d
    count = np.frombuffer(b[at : at + 4 * d], dtype="<i4")
    at += 4 * d
    tokens = np.frombuffer(b[at : at + 8 * d], dtype="<i8")
    return DocumentTable(first_chunk=first, num_chunks=count, num_tokens=tokens)


# ---------------------------------------------------------------- the tasks


def kill_hook(point: str) -> None:
    """A test hook: end this worker process at ``point`` once per arming.

    When the environment variable ``RETRODB_TEST_KILL_DIR`` names a directory holding a file
    ``arm-<point>``, the first process to reach ``point`` renames it to ``fired-<point>``
    (a rename succeeds for exactly one process) and exits at once with ``os._exit(1)``, as
    a worker killed by the system would. Without the variable it costs one lookup."""
    root = os.environ.get(KILL_DIR_ENV)
    if not root:
        return
    try:
        os.rename(os.path.join(root, f"arm-{point}"), os.path.join(root, f"fired-{point}"))
    except FileNotFoundError:
        return
    os._exit(1)


def load_tokenizer(root: Path, tokenizer: dict[str, Any]) -> Tokenizer:
    """The tokenizer of the database at ``root`` as a worker sees it, refused unless it is
    the driver's. ``tokenizer``: the driver's tokenizer as the manifest records it
    (:meth:`~retrodb.tokenizer.Tokenizer.manifest_entry`: kind, file, fingerprint, special
    ids)."""
    path = root / tokenizer_file(tokenizer)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise NotFoundError(
            f"{path}: not found on this worker; the database directory must be on a "
            f"filesystem every worker sees"
        ) from exc
    tok = Tokenizer.from_bytes(data, kind=tokenizer_kind(tokenizer), path=path, special=tokenizer)
    if tok.fingerprint != tokenizer["fingerprint"]:
        raise MismatchError(f"{path}: this worker sees another tokenizer than the driver")
    return tok


def tokenize_shard(
    shard: Shard,
    tokenizer: Tokenizer,
    *,
    chunk_size: int,
    errors: corpus_mod.Errors,
    part_rows: int = PART_ROWS["cpu"],
) -> list[Part]:
    """Read, tokenize and chunk one shard's documents into parts (the rows a local build
    of the same documents writes, in the same order)."""
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def sink(t: np.ndarray, n: np.ndarray, d: np.ndarray) -> None:
        rows.append((t.copy(), n.copy(), d.copy()))

    corpus = corpus_mod.Corpus(refs=list(shard.refs), errors=errors)
    chunker = Chunker(chunk_size, pad_id=tokenizer.pad_id, sink=sink, dtype=tokenizer.token_dtype)
    pieces = PieceTokenizer(tokenizer, cuts=corpus_mod.cut_points)
    doc = -1
    for d, ids in _document_ids(corpus, pieces):
        if d != doc:
            chunker.start()
            doc = d
        chunker.feed(ids)
    table = chunker.finish()
    if len(table.first_chunk) != len(shard.refs):
        raise CorruptError(
            f"{shard.refs[0].path}: shard {shard.index} read {len(table.first_chunk)} "
            f"documents, expected {len(shard.refs)} (an input changed while building?)"
        )
    tokens = np.concatenate([t for t, _, _ in rows])
    lengths = np.concatenate([n for _, n, _ in rows]).astype(np.int32)
    docs = np.concatenate([d for _, _, d in rows]).astype(np.int32)
    n = tokens.shape[0]
    starts = list(range(0, n, part_rows))
    parts = [
        Part(
            shard=shard.index,
            part=p,
            parts=len(starts),
            tokens=tokens[a : a + part_rows],
            lengths=lengths[a : a + part_rows],
            doc=docs[a : a + part_rows],
        )
        for p, a in enumerate(starts)
    ]
    parts[0].ids = shard.ids
    parts[0].table = table
    return parts


def encode_part(part: Part, tokenizer: Tokenizer, encoder: Encoder) -> Part:
    """``part`` with the keys of its rows (each row only its real tokens)."""
    rows = [r[:k] for r, k in zip(part.tokens, part.lengths, strict=True)]
    return replace(part, vectors=encode_ids(tokenizer, encoder, rows))


def write_shard(
    storage: Storage,
    parts: Sequence[Part],
    *,
    config: DBConfig,
    dim: int,
    first_key: int,
    generation: int,
    tally: Callable[[str, int], None] | None = None,
) -> SegmentMeta:
    """Write the encoded parts of one shard as one sealed segment whose first key is
    ``first_key``; returns its manifest entry (the driver commits it). ``tally(stage, n)``
    is told of every ``n`` rows indexed (stage ``"index"``)."""
    parts = sorted(parts, key=lambda p: p.part)
    shard = parts[0].shard
    if [p.part for p in parts] != list(range(parts[0].parts)) or parts[0].table is None:
        raise CorruptError(
            f"{storage.root}: shard {shard} reached its writer with parts "
            f"{[p.part for p in parts]} of {parts[0].parts}"
        )
    head = parts[0]
    assert head.ids is not None and head.table is not None
    writer = SegmentWriter(
        storage,
        generation=generation,
        chunk_size=config.chunk.chunk_size,
        token_dtype=head.tokens.dtype,
        dim=dim,
        index=config.index,
    )
    try:
        for p in parts:
            writer.append_rows(p.tokens, p.lengths, p.doc)
        writer.close_rows()
        at = first_key
        for p in parts:
            if p.vectors is None:
                raise CorruptError(f"shard {shard} part {p.part} reached its writer unencoded")
            writer.add_vectors(np.arange(at, at + p.rows), p.vectors)
            at += p.rows
            if tally is not None:
                tally("index", p.rows)
        return writer.seal(head.ids, head.table, first_key=first_key)
    except BaseException:
        writer.discard()
        raise


def iter_rows(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The rows of a column batch (a dict of equal-length sequences)."""
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    for i in range(n):
        yield {k: batch[k][i] for k in names}


__all__ = [
    "KILL_DIR_ENV",
    "KILL_POINTS",
    "PART_ROWS",
    "SHARD_BYTES",
    "Part",
    "Shard",
    "document_sizes",
    "encode_part",
    "first_keys",
    "iter_rows",
    "kill_hook",
    "load_tokenizer",
    "plan_shards",
    "tokenize_shard",
    "write_shard",
]
