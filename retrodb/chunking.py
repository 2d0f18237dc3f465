"""Token ids -> fixed-size chunks. Pure numpy; the one chunking rule of retrodb.

A document of n tokens becomes ``max(1, ceil(n / m))`` rows of m tokens: every row but
the last is full, the last is padded with the pad id and records its real length (an
empty document still gets one row, of length 0). A document's rows are contiguous and
in order. :class:`Chunker` applies the rule to a stream of pieces (bounded memory, used
to write segments); :func:`chunk_documents` applies it to documents held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: ``sink(tokens [r, m], lengths [r], doc [r])``: a block of finished rows.
RowSink = Callable[[np.ndarray, np.ndarray, np.ndarray], None]

#: Rows buffered before they are handed to the sink.
ROW_BLOCK = 8192


def num_chunks(n_tokens: int, chunk_size: int) -> int:
    """Chunks needed for ``n_tokens`` tokens (at least one, so every document has a chunk)."""
    return max(1, -(-n_tokens // chunk_size))


@dataclass(frozen=True, slots=True)
class DocumentTable:
    """Per document: its first row, its number of rows and its number of tokens."""

    first_chunk: np.ndarray  # [d] int64
    num_chunks: np.ndarray  # [d] int32
    num_tokens: np.ndarray  # [d] int64


class Chunker:
    """Cut a stream of documents, each given as pieces of token ids, into rows of m tokens.

    ``start()`` begins a document, ``feed(ids)`` adds its next piece, ``finish()`` ends the
    stream and returns the :class:`DocumentTable`. Finished rows go to ``sink`` in blocks of
    at most ``block`` rows. Memory: one block plus the ids of the current piece.

    >>> rows = []
    >>> c = Chunker(4, pad_id=0, sink=lambda t, n, d: rows.append(t.copy()), block=8)
    >>> c.start(); c.feed([5, 6, 7, 8, 9]); table = c.finish()
    >>> np.concatenate(rows).tolist(), table.num_chunks.tolist()
    ([[5, 6, 7, 8], [9, 0, 0, 0]], [2])
    """

    def __init__(
        self,
        m: int,
        *,
        pad_id: int,
        sink: RowSink,
        dtype: np.dtype | type = np.int64,
        block: int | None = None,
    ) -> None:
        block = block or ROW_BLOCK
        self.m = m
        self.pad_id = pad_id
        self.sink = sink
        self.block = block
        self.buf_tokens = np.full((block, m), pad_id, dtype=dtype)
        self.buf_lengths = np.zeros(block, np.int32)
        self.buf_doc = np.zeros(block, np.int32)
        self.filled = 0
        self.rows = 0
        """Rows emitted so far (flushed or buffered)."""
        self.pending = np.zeros(0, np.int64)
        self.first_chunk: list[int] = []
        self.num_tokens: list[int] = []

    def start(self) -> None:
        """Begin the next document (ending the current one)."""
        self._end_document()
        self.first_chunk.append(self.rows)
        self.num_tokens.append(0)

    def feed(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append the next piece of the current document."""
        arr = np.asarray(ids, dtype=np.int64)
        self.num_tokens[-1] += arr.size
        if self.pending.size:
            arr = np.concatenate([self.pending, arr])
        full = arr.size // self.m
        if full:
            self._emit(arr[: full * self.m].reshape(full, self.m), self.m)
        self.pending = arr[full * self.m :]

    def finish(self) -> DocumentTable:
        """End the stream: the last row of the last document, a final flush, the table."""
        self._end_document()
        self._flush()
        first = np.array(self.first_chunk, dtype=np.int64)
        return DocumentTable(
            first_chunk=first,
            num_chunks=np.diff(np.append(first, self.rows)).astype(np.int32),
            num_tokens=np.array(self.num_tokens, dtype=np.int64),
        )

    def _end_document(self) -> None:
        """The current document's last, padded row (an empty document gets one of length 0)."""
        if not self.first_chunk:
            return
        if self.pending.size or self.rows == self.first_chunk[-1]:
            row = np.full((1, self.m), self.pad_id, dtype=np.int64)
            row[0, : self.pending.size] = self.pending
            self._emit(row, self.pending.size)
            self.pending = np.zeros(0, np.int64)

    def _emit(self, rows: np.ndarray, length: int) -> None:
        doc = len(self.first_chunk) - 1
        done = 0
        while done < rows.shape[0]:
            take = min(rows.shape[0] - done, self.block - self.filled)
            sl = slice(self.filled, self.filled + take)
            self.buf_tokens[sl] = rows[done : done + take]
            self.buf_lengths[sl] = length
            self.buf_doc[sl] = doc
            self.filled += take
            self.rows += take
            done += take
            if self.filled == self.block:
                self._flush()

    def _flush(self) -> None:
        n = self.filled
        if n:
            self.sink(self.buf_tokens[:n], self.buf_lengths[:n], self.buf_doc[:n])
        self.buf_tokens[:n] = self.pad_id
        self.filled = 0


def chunk_documents(
    docs: Sequence[Sequence[int] | np.ndarray],
    chunk_size: int,
    *,
    pad_id: int,
    dtype: np.dtype | type,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunk documents held in memory into one array (the :class:`Chunker` rule).

    Returns ``(chunks [n, m], lengths [n], doc [n])`` where ``doc[i]`` is the index in
    ``docs`` of the document that row i belongs to."""
    n = sum(num_chunks(len(d), chunk_size) for d in docs)
    chunks = np.empty((n, chunk_size), dtype=dtype)
    lengths = np.empty(n, dtype=np.int32)
    doc = np.empty(n, dtype=np.int64)
    at = 0

    def sink(t: np.ndarray, ln: np.ndarray, d: np.ndarray) -> None:
        nonlocal at
        r = t.shape[0]
        chunks[at : at + r], lengths[at : at + r], doc[at : at + r] = t, ln, d
        at += r

    c = Chunker(chunk_size, pad_id=pad_id, sink=sink, dtype=dtype, block=max(1, min(n, ROW_BLOCK)))
    for ids in docs:
        c.start()
        c.feed(ids)
    c.finish()
    return chunks, lengths, doc


def chunk_tokens(
    ids: Sequence[int] | np.ndarray,
    chunk_size: int,
    *,
    pad_id: int,
    dtype: np.dtype | type = np.int64,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one document's ids into ``[c, chunk_size]`` rows; returns ``(chunks, lengths)``."""
    chunks, lengths, _ = chunk_documents([ids], chunk_size, pad_id=pad_id, dtype=dtype)
    return chunks, lengths


def next_rows(doc: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the next row (the last row stays itself) and whether that next row is
    the continuation of the same document. ``doc`` may be a memory map; it is read at
    ``rows`` and at the next rows only."""
    rows = np.asarray(rows, dtype=np.int64)
    n = doc.shape[0]
    if n == 0:
        return np.full(rows.shape, -1, dtype=np.int64), np.zeros(rows.shape, dtype=bool)
    nxt = np.minimum(rows + 1, n - 1)
    return nxt, (rows + 1 < n) & (doc[nxt] == doc[rows])


def continuation_rows(doc: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each row, the row of its continuation (the next chunk of the same document),
    or -1 at the end of a document (see :func:`next_rows`)."""
    nxt, same = next_rows(doc, rows)
    return np.where(same, nxt, -1)
