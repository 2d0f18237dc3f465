"""Token ids -> fixed-size chunks. Pure numpy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def num_chunks(n_tokens: int, chunk_size: int) -> int:
    """Chunks needed for ``n_tokens`` tokens (at least one, so every document has a chunk)."""
    return max(1, -(-n_tokens // chunk_size))


def chunk_tokens(
    ids: Sequence[int] | np.ndarray,
    chunk_size: int,
    *,
    pad_id: int,
    dtype: np.dtype | type = np.int64,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one document's ids into ``[c, chunk_size]`` rows, padding the last one.

    Returns ``(chunks, lengths)``: ``lengths[i]`` is the number of real tokens of row i
    (``chunk_size`` for all but possibly the last row)."""
    arr = np.asarray(ids, dtype=np.int64)
    c = num_chunks(arr.size, chunk_size)
    out = np.full(c * chunk_size, pad_id, dtype=dtype)
    out[: arr.size] = arr
    lengths = np.full(c, chunk_size, dtype=np.int32)
    lengths[-1] = arr.size - (c - 1) * chunk_size
    return out.reshape(c, chunk_size), lengths


def chunk_documents(
    docs: Sequence[Sequence[int] | np.ndarray],
    chunk_size: int,
    *,
    pad_id: int,
    dtype: np.dtype | type,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunk many documents into one array.

    Returns ``(chunks [n, m], lengths [n], doc [n])`` where ``doc[i]`` is the index in ``docs``
    of the document that row i belongs to. A document's rows are contiguous and in order."""
    counts = np.array([num_chunks(len(d), chunk_size) for d in docs], dtype=np.int64)
    n = int(counts.sum())
    chunks = np.full((n, chunk_size), pad_id, dtype=dtype)
    lengths = np.empty(n, dtype=np.int32)
    row = 0
    for d, c in zip(docs, counts, strict=True):
        ch, ln = chunk_tokens(d, chunk_size, pad_id=pad_id, dtype=dtype)
        chunks[row : row + c] = ch
        lengths[row : row + c] = ln
        row += int(c)
    doc = np.repeat(np.arange(len(docs), dtype=np.int64), counts)
    return chunks, lengths, doc


def continuation_rows(doc: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each row, the row of its continuation (the next chunk of the same document),
    or -1 at the end of a document. ``doc`` may be a memory map; it is read at ``rows``
    and ``rows + 1`` only."""
    rows = np.asarray(rows, dtype=np.int64)
    n = doc.shape[0]
    if n == 0:
        return np.full(rows.shape, -1, dtype=np.int64)
    nxt = np.minimum(rows + 1, n - 1)
    same = (rows + 1 < n) & (doc[nxt] == doc[rows])
    return np.where(same, nxt, -1)
