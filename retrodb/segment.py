"""One immutable segment: reading its arrays through memory maps, and writing a new one.

A segment is a directory of uncompressed single-chunk Zarr v3 arrays plus one HNSW
index file (see docs/format.md)::

    tokens [n, m]   lengths [n]   doc [n]   (keys [n], only when its keys have gaps)
    docs/ids  docs/first_chunk  docs/num_chunks  docs/num_tokens
    index.usearch

:class:`SegmentWriter` writes one in a temporary directory and seals it (checksums,
fsync, rename); it takes rows, document tables and vectors, not a database.
:func:`merge_segments` (compaction) copies the live rows of several segments into one,
vectors included, without encoding anything.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .chunking import DocumentTable
from .config import IndexConfig
from .errors import CorruptError
from .failpoints import failpoint
from .index import IndexBuilder, SegmentIndex
from .progress import ProgressFn, no_progress
from .storage import (
    INDEX_FILE,
    RawArrayWriter,
    SegmentMeta,
    Storage,
    open_raw_array,
    read_strings,
    write_array,
)

#: Rows copied per step while merging segments.
MERGE_BLOCK = 4096


def _plain(a: np.ndarray) -> np.ndarray:
    """A plain ndarray view of a memory map: indexing it skips np.memmap's Python layer
    (the view keeps the mapping alive)."""
    return a.view(np.ndarray) if isinstance(a, np.memmap) else a


class Segment:
    """Read access to one committed segment through memory maps.

    Opening checks every file's size against the manifest (cheap); checksums are
    ``retrodb verify``'s job. Pickles as its directory and manifest entry, never its
    maps (DataLoader workers reopen them)."""

    def __init__(
        self, directory: Path, meta: SegmentMeta, chunk_size: int, token_dtype: np.dtype
    ) -> None:
        self.dir = Path(directory)
        self.meta = meta
        self.chunk_size = chunk_size
        self.token_dtype = np.dtype(token_dtype)
        if not self.dir.is_dir():
            raise CorruptError(f"{self.dir}: segment directory missing")
        for rel, info in meta.files.items():
            p = self.dir / rel
            try:
                size = p.stat().st_size
            except FileNotFoundError as exc:
                raise CorruptError(f"{p}: missing") from exc
            if size != info.size:
                raise CorruptError(f"{p}: {size} bytes, the manifest recorded {info.size}")
        n, d = meta.chunks, meta.documents
        self.tokens = self._open("tokens", self.token_dtype, (n, chunk_size))
        self.lengths = self._open("lengths", np.int32, (n,))
        self.doc = self._open("doc", np.int32, (n,))
        self.first_chunk = self._open("docs/first_chunk", np.int64, (d,))
        self.num_chunks = self._open("docs/num_chunks", np.int32, (d,))
        self.key_array: np.ndarray | None = None
        """The sorted keys of the rows of a compacted segment (None: row r is key first_key + r)."""
        if meta.explicit_keys:
            self.key_array = self._open("keys", np.int64, (n,))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Segment, (self.dir, self.meta, self.chunk_size, self.token_dtype))

    def _open(self, name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        return _plain(open_raw_array(self.dir / name, dtype=np.dtype(dtype), shape=shape))

    @cached_property
    def num_tokens(self) -> np.ndarray:
        return self._open("docs/num_tokens", np.int64, (self.meta.documents,))

    @cached_property
    def ids(self) -> list[str]:
        ids = read_strings(self.dir / "docs" / "ids")
        if len(ids) != self.meta.documents:
            raise CorruptError(
                f"{self.dir / 'docs' / 'ids'}: {len(ids)} ids, expected {self.meta.documents}"
            )
        return ids

    def row_keys(self, rows: np.ndarray) -> np.ndarray:
        """The key of each row."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.key_array is None:
            return self.meta.first_key + rows
        return np.asarray(self.key_array[rows], dtype=np.int64)

    def key_rows(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key, -1 where the segment does not hold it."""
        keys = np.asarray(keys, dtype=np.int64)
        n = self.meta.chunks
        if self.key_array is None:
            row = keys - self.meta.first_key
            return np.where((row >= 0) & (row < n), row, -1)
        if n == 0:
            return np.full(keys.shape, -1, np.int64)
        row = np.minimum(np.searchsorted(self.key_array, keys), n - 1)
        return np.where(self.key_array[row] == keys, row, -1)

    def open_index(self, *, dim: int, config: IndexConfig, load: bool = False) -> SegmentIndex:
        """Map this segment's HNSW index (size, header and graph checked first); ``load``:
        read it into memory instead."""
        info = self.meta.files.get(INDEX_FILE)
        return SegmentIndex.open(
            self.dir / INDEX_FILE,
            first_key=self.meta.first_key,
            count=self.meta.chunks,
            ndim=dim,
            expected_size=info.size if info else None,
            config=config,
            guard=self.meta.index_guard,
            load=load,
        )


class SegmentWriter:
    """Write one new segment in a temporary directory, then seal it.

    Rows first (:meth:`append_rows`, streamed to raw files), then :meth:`close_rows` (the
    arrays become Zarr arrays that can be mapped and read back), vectors at any time
    (:meth:`add_vectors`), and :meth:`seal` with the document table: the index is saved,
    every file checksummed and fsynced, and the directory renamed into ``segments/``.
    Nothing is visible to readers until a manifest names the segment."""

    def __init__(
        self,
        storage: Storage,
        *,
        generation: int,
        chunk_size: int,
        token_dtype: np.dtype,
        dim: int,
        index: IndexConfig,
        explicit_keys: bool = False,
    ) -> None:
        self.storage = storage
        self.name = f"{generation:06d}-{secrets.token_hex(4)}"
        self.dir = storage.new_segment_dir(self.name)
        self.chunk_size = chunk_size
        self.token_dtype = np.dtype(token_dtype)
        self._tokens = RawArrayWriter(self.dir, "tokens", self.token_dtype, (chunk_size,))
        self._lengths = RawArrayWriter(self.dir, "lengths", np.int32)
        self._doc = RawArrayWriter(self.dir, "doc", np.int32)
        self._keys = RawArrayWriter(self.dir, "keys", np.int64) if explicit_keys else None
        self._first_key = self._last_key = -1
        self.index = IndexBuilder(dim, index)

    @property
    def rows(self) -> int:
        return self._tokens.rows

    def append_rows(
        self,
        tokens: np.ndarray,
        lengths: np.ndarray,
        doc: np.ndarray,
        keys: np.ndarray | None = None,
    ) -> None:
        """Append rows; ``keys`` (sorted, increasing) only for a writer with explicit keys."""
        self._tokens.append(tokens)
        self._lengths.append(lengths)
        self._doc.append(doc)
        if self._keys is not None:
            assert keys is not None, "a writer with explicit keys needs the rows' keys"
            if keys.size:
                self._first_key = int(keys[0]) if self._first_key < 0 else self._first_key
                self._last_key = int(keys[-1])
            self._keys.append(keys)

    def close_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Finish the row arrays; returns maps of ``tokens [n, m]`` and ``lengths [n]``."""
        for w in (self._tokens, self._lengths, self._doc):
            w.finish()
        if self._keys is not None:
            if self._last_key - self._first_key + 1 == self.rows:
                self._keys.discard()  # contiguous after all: row r is key first + r
                self._keys = None
            else:
                self._keys.finish()
        n = self.rows
        tokens = open_raw_array(
            self.dir / "tokens", dtype=self.token_dtype, shape=(n, self.chunk_size)
        )
        lengths = open_raw_array(self.dir / "lengths", dtype=np.dtype(np.int32), shape=(n,))
        return tokens, lengths

    def add_vectors(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add(np.asarray(keys, dtype=np.int64), vectors)

    def seal(self, ids: Sequence[str], table: DocumentTable, *, first_key: int) -> SegmentMeta:
        """Write the document table and the index, then publish the directory.
        ``first_key``: the key of row 0 (ignored for a segment with explicit keys)."""
        write_array(self.dir, "docs/ids", np.array(list(ids), dtype=object))
        write_array(self.dir, "docs/first_chunk", table.first_chunk.astype(np.int64))
        write_array(self.dir, "docs/num_chunks", table.num_chunks.astype(np.int32))
        write_array(self.dir, "docs/num_tokens", table.num_tokens.astype(np.int64))
        failpoint("after_segment_arrays", self.dir)
        guard = self.index.save(self.dir / INDEX_FILE)
        del self.index
        files = self.storage.seal_segment(self.dir, self.name)
        explicit = self._keys is not None
        return SegmentMeta(
            name=self.name,
            first_key=self._first_key if explicit or self._first_key >= 0 else first_key,
            chunks=self.rows,
            documents=len(ids),
            tokens=int(table.num_tokens.sum()),
            files=files,
            key_stop=self._last_key + 1 if explicit else None,
            index_guard=guard,
        )

    def discard(self) -> None:
        """Drop everything written (nothing was committed)."""
        for w in (self._tokens, self._lengths, self._doc, self._keys):
            if w is not None:
                w.discard()
        shutil.rmtree(self.dir, ignore_errors=True)


def merge_segments(
    writer: SegmentWriter,
    segments: Sequence[Segment],
    vectors: Callable[[int, np.ndarray], np.ndarray],
    *,
    dead: set[str],
    progress: ProgressFn = no_progress,
) -> SegmentMeta | None:
    """Copy the live rows of ``segments`` (documents not in ``dead``) into ``writer`` (made
    with ``explicit_keys``) and seal it; None (and nothing left behind) when no live row is
    left. Rows keep their keys; ``vectors(segment number, keys)`` gives their stored index
    vectors, so nothing is encoded."""
    ids: list[str] = []
    tables: list[tuple[np.ndarray, np.ndarray]] = []
    total = sum(s.meta.chunks for s in segments)
    done = 0
    progress("compact", 0, total)
    for si, seg in enumerate(segments):
        live = np.array([i not in dead for i in seg.ids], dtype=bool)
        if live.any():
            number = (np.cumsum(live) - 1 + len(ids)).astype(np.int32)  # new document numbers
            rows = np.nonzero(live[seg.doc])[0]
            for start in range(0, rows.size, MERGE_BLOCK):
                r = rows[start : start + MERGE_BLOCK]
                keys = seg.row_keys(r)
                writer.append_rows(seg.tokens[r], seg.lengths[r], number[seg.doc[r]], keys)
                writer.add_vectors(keys, vectors(si, keys))
            ids += [i for i, ok in zip(seg.ids, live, strict=True) if ok]
            tables.append((seg.num_chunks[live], seg.num_tokens[live]))
        done += seg.meta.chunks
        progress("compact", done, total)
    if writer.rows == 0:
        writer.discard()
        return None
    writer.close_rows()
    counts = np.concatenate([c for c, _ in tables]).astype(np.int32)
    table = DocumentTable(
        first_chunk=(np.cumsum(counts) - counts).astype(np.int64),
        num_chunks=counts,
        num_tokens=np.concatenate([t for _, t in tables]).astype(np.int64),
    )
    return writer.seal(ids, table, first_key=-1)


__all__ = ["Segment", "SegmentWriter", "merge_segments"]
