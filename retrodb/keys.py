"""The one access layer for keys: where a key lives, its document, whether it is deleted,
and gathers of its tokens and continuation.

A :class:`KeyMap` is built once per generation (from that generation's segments and
tombstones). Everything that turns keys into rows, document numbers, masks or tokens reads
through it: ``RetroDB.retrieve`` and ``lookup``, search filtering, neighbour-set
computation, the training reader and live retrieval during generation. Nothing else
computes segment offsets, document offsets or padding masks.

Document numbers: a generation numbers its documents globally, segment after segment
(``doc_offsets[s] + local number``); they are stable within a generation and index the
boolean tables used to exclude documents from a search.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .chunking import continuation_rows, next_rows
from .errors import BadInputError, CorruptError
from .segment import Segment


@dataclass(frozen=True, slots=True)
class Retrieved:
    """Neighbours with continuations: ``tokens [..., 2m]`` and ``mask [..., 2m]`` (True = real).

    The first m positions hold the neighbour chunk, the last m its continuation (the next
    chunk of the same document; all padding at a document's end)."""

    tokens: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True, slots=True)
class LiveRows:
    """Every live chunk of a generation, in key order, with its document."""

    keys: np.ndarray  # [n] int64
    doc: np.ndarray  # [n] int32: index into doc_ids
    doc_ids: list[str]  # the live documents, in key order


@functools.lru_cache(maxsize=8)
def prefix_masks(m: int) -> np.ndarray:
    """``[m + 1, m]`` bool: row n is True on its first n positions (mask = table[length])."""
    table = np.arange(m)[None, :] < np.arange(m + 1)[:, None]
    table.setflags(write=False)
    return table


class KeyMap:
    """Key addressing for one generation of a database."""

    def __init__(
        self,
        segments: Sequence[Segment],
        *,
        tombstones: Iterable[str] = (),
        next_key: int,
        chunk_size: int,
        pad_id: int,
    ) -> None:
        self.segments = list(segments)
        self.tombstones = frozenset(tombstones)
        self.next_key = next_key
        self.chunk_size = chunk_size
        self.pad_id = pad_id
        self.first_keys = np.array([s.meta.first_key for s in self.segments], dtype=np.int64)
        self.stop_keys = np.array([s.meta.stop_key for s in self.segments], dtype=np.int64)
        self.doc_offsets = np.cumsum([0] + [s.meta.documents for s in self.segments])
        """``[S + 1]``: the global number of each segment's first document, then the total."""
        self._explicit = [i for i, s in enumerate(self.segments) if s.key_array is not None]
        self._simple = len(self.segments) == 1 and not self._explicit
        self._deleted: np.ndarray | None = None
        self._doc_index: dict[str, tuple[int, int]] | None = None

    @property
    def documents(self) -> int:
        """Documents stored (deleted ones included until compaction)."""
        return int(self.doc_offsets[-1])

    # ------------------------------------------------------------ locating

    def locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment number and row of each key; -1 for -1 or unknown keys."""
        keys = np.asarray(keys, dtype=np.int64)
        if not self.segments:
            return np.full(keys.shape, -1, np.int64), np.full(keys.shape, -1, np.int64)
        seg = np.searchsorted(self.first_keys, keys, side="right") - 1
        seg = np.clip(seg, 0, len(self.segments) - 1)
        row = keys - self.first_keys[seg]
        ok = (keys >= 0) & (row >= 0) & (keys < self.stop_keys[seg])
        for si in self._explicit:  # compacted segments: look the rows up
            sel = np.nonzero(ok & (seg == si))
            r = self.segments[si].key_rows(keys[sel])
            row[sel] = r
            ok[sel] = r >= 0
        return np.where(ok, seg, -1), np.where(ok, row, -1)

    def locate_known(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`locate`, refusing keys (other than -1) that the generation does not hold."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._simple and keys.size:  # one segment of contiguous keys: arithmetic
            first, count = self.segments[0].meta.first_key, self.segments[0].meta.chunks
            if keys.min() >= first and keys.max() < first + count:  # all held, no -1
                return np.zeros(keys.shape, np.int64), keys - first
        seg, row = self.locate(keys)
        unknown = (keys >= 0) & (seg < 0) | (keys < -1)
        if unknown.any():
            raise BadInputError(
                f"key {int(keys[unknown][0])} is not in the database "
                f"(keys are 0..{self.next_key - 1})"
            )
        return seg, row

    # ------------------------------------------------------------ documents

    def doc_index(self) -> dict[str, tuple[int, int]]:
        """Document id -> (segment number, local document number), live and deleted."""
        if self._doc_index is None:
            self._doc_index = {
                doc_id: (si, di)
                for si, seg in enumerate(self.segments)
                for di, doc_id in enumerate(seg.ids)
            }
        return self._doc_index

    def doc_number(self, doc_id: str) -> int:
        """The global number of document ``doc_id``, -1 if the generation does not store it."""
        where = self.doc_index().get(doc_id)
        return -1 if where is None else int(self.doc_offsets[where[0]] + where[1])

    def doc_table(self, doc_ids: Iterable[str]) -> np.ndarray:
        """``[documents + 1]`` bool, True at the numbers of ``doc_ids`` (unknown ids ignored).
        The last slot stands for "no document" (key -1): index it with -1."""
        table = np.zeros(self.documents + 1, dtype=bool)
        numbers = [n for n in (self.doc_number(d) for d in doc_ids) if n >= 0]
        table[numbers] = True
        return table

    def doc_numbers(self, keys: np.ndarray) -> np.ndarray:
        """The global document number of each key, -1 for -1 and unknown keys."""
        keys = np.asarray(keys, dtype=np.int64)
        seg, row = self.locate(keys)
        out = np.full(keys.shape, -1, dtype=np.int64)
        for si, s in enumerate(self.segments):
            sel = seg == si
            if sel.any():
                out[sel] = self.doc_offsets[si] + s.doc[row[sel]].astype(np.int64)
        return out

    def documents_of(self, keys: np.ndarray) -> list[str | None]:
        """The document id of each key (None for -1)."""
        seg, row = self.locate(np.asarray(keys).ravel())
        out: list[str | None] = []
        for s, r in zip(seg.tolist(), row.tolist(), strict=True):
            if s < 0:
                out.append(None)
                continue
            ids, d = self.segments[s].ids, int(self.segments[s].doc[r])
            if not 0 <= d < len(ids):
                raise CorruptError(
                    f"{self.segments[s].dir / 'doc'}: document number {d} out of range"
                )
            out.append(ids[d])
        return out

    def deleted(self, keys: np.ndarray) -> np.ndarray:
        """True for keys of deleted documents."""
        keys = np.asarray(keys, dtype=np.int64)
        if not self.tombstones:
            return np.zeros(keys.shape, dtype=bool)
        if self._deleted is None:
            dead = np.zeros(self.next_key, dtype=bool)
            index = self.doc_index()
            for doc_id in self.tombstones:
                if doc_id in index:
                    si, di = index[doc_id]
                    seg = self.segments[si]
                    first = int(seg.first_chunk[di])
                    rows = np.arange(first, first + int(seg.num_chunks[di]))
                    dead[seg.row_keys(rows)] = True
            self._deleted = dead
        ok = (keys >= 0) & (keys < self._deleted.shape[0])
        out = np.zeros(keys.shape, dtype=bool)
        out[ok] = self._deleted[keys[ok]]
        return out

    def deleted_chunks(self) -> int:
        """How many stored chunks belong to deleted documents."""
        index = self.doc_index()
        where = [index[d] for d in self.tombstones if d in index]
        return sum(int(self.segments[si].num_chunks[di]) for si, di in where)

    def live_rows(self) -> LiveRows:
        """Every chunk of a live document, in key order."""
        ids: list[str] = []
        keys: list[np.ndarray] = []
        docs: list[np.ndarray] = []
        for seg in self.segments:
            live = np.array([i not in self.tombstones for i in seg.ids], dtype=bool)
            number = np.cumsum(live) - 1 + len(ids)  # live document -> its number here
            sel = np.nonzero(live[seg.doc])[0]
            keys.append(seg.row_keys(sel))
            docs.append(number[seg.doc[sel]].astype(np.int32))
            ids += [i for i, ok in zip(seg.ids, live, strict=True) if ok]
        return LiveRows(
            keys=np.concatenate(keys) if keys else np.zeros(0, np.int64),
            doc=np.concatenate(docs) if docs else np.zeros(0, np.int32),
            doc_ids=ids,
        )

    # ------------------------------------------------------------ reading rows

    def rows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[n, m]`` int64 and lengths ``[n]`` int32 of flat ``keys``; -1 gives
        padding and length 0. Other keys must be held by this generation (checked by the
        caller, or raising IndexError here for a compacted segment)."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._simple:  # the common case: plain takes from one segment
            s = self.segments[0]
            ok = keys >= 0
            row = np.where(ok, keys - s.meta.first_key, 0)
            toks = np.take(s.tokens, row, axis=0).astype(np.int64)
            lens = np.take(s.lengths, row)
            if not ok.all():
                toks[~ok] = self.pad_id
                lens[~ok] = 0
            return toks, lens
        seg = np.searchsorted(self.first_keys, keys, side="right") - 1
        toks = np.full((keys.size, self.chunk_size), self.pad_id, np.int64)
        lens = np.zeros(keys.size, np.int32)
        for si, s in enumerate(self.segments):
            sel = np.nonzero((seg == si) & (keys >= 0))[0]
            if sel.size:
                r = s.key_rows(keys[sel])
                if (r < 0).any():
                    raise IndexError(f"key {int(keys[sel][r < 0][0])} is not in its segment")
                toks[sel] = np.take(s.tokens, r, axis=0)
                lens[sel] = np.take(s.lengths, r)
        return toks, lens

    def masks(self, lengths: np.ndarray) -> np.ndarray:
        """``[..., m]`` bool: True on the first ``length`` positions (a row gather)."""
        return np.take(prefix_masks(self.chunk_size), lengths, axis=0)

    def chunks(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token rows ``[..., m]`` (int64, padded) and lengths of ``keys``; -1 gives padding,
        length 0; keys the generation does not hold are refused."""
        keys = np.asarray(keys, dtype=np.int64)
        self.locate_known(keys.ravel())
        toks, lens = self.rows(keys.ravel())
        return toks.reshape(*keys.shape, self.chunk_size), lens.reshape(keys.shape)

    def continuation_keys(self, keys: np.ndarray) -> np.ndarray:
        """The key of each key's continuation (next chunk of the same document) or -1."""
        keys = np.asarray(keys, dtype=np.int64)
        flat = keys.ravel()
        seg, row = self.locate(flat)
        out = np.full(flat.shape, -1, dtype=np.int64)
        for si, s in enumerate(self.segments):
            sel = np.nonzero(seg == si)[0]
            if sel.size:
                nxt = continuation_rows(s.doc, row[sel])
                same = nxt >= 0
                out[sel[same]] = s.row_keys(nxt[same])
        return out.reshape(keys.shape)

    def gather(self, keys: np.ndarray) -> Retrieved:
        """Neighbour + continuation tokens for ``keys [...]``: ``tokens [..., 2m]`` int64 and
        ``mask [..., 2m]`` bool. Key -1 gives an all-padding, all-False row.

        One pass of memory-mapped gathers per segment: the continuation of row r is row
        r + 1 when it belongs to the same document (documents never span segments)."""
        keys = np.asarray(keys, dtype=np.int64)
        m = self.chunk_size
        flat = keys.ravel()
        seg, row = self.locate_known(flat)
        out = np.empty((flat.size, 2, m), dtype=np.int64)
        lengths = np.zeros((flat.size, 2), dtype=np.int32)
        for si, s in enumerate(self.segments):
            here = seg == si
            # All keys in one segment (the common case): plain slices instead of a selection.
            sel: slice | np.ndarray = slice(None) if here.all() else np.nonzero(here)[0]
            r = row[sel]
            if not r.size:
                continue
            # The next row is gathered whatever it is, and marked padding (length 0) where
            # it starts another document.
            nxt, same = next_rows(s.doc, r)
            # One gather of the rows and their next rows, interleaved: neighbouring rows
            # share pages, and one pass over the map costs half of two.
            both = np.stack([r, nxt], axis=1).reshape(-1)
            out[sel] = np.take(s.tokens, both, axis=0).reshape(-1, 2, m)
            lens = np.take(s.lengths, both).reshape(-1, 2)
            lens[:, 1] *= same
            lengths[sel] = lens
        out[lengths == 0] = self.pad_id  # key -1 and missing continuations
        mask = self.masks(lengths)
        return Retrieved(
            tokens=out.reshape(*keys.shape, 2 * m), mask=mask.reshape(*keys.shape, 2 * m)
        )


__all__ = ["KeyMap", "LiveRows", "Retrieved", "prefix_masks"]
