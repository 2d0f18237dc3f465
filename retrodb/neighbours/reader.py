"""Training sequences from a neighbour set: windows of rows and their neighbours, read
with memory-mapped gathers only (through the generation's KeyMap)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BadInputError
from ..keys import KeyMap
from .store import NeighbourSet

if TYPE_CHECKING:
    from ..db import RetroDB


class SequenceReader:
    """Training sequences of ``seq_len`` tokens from a neighbour set, with their neighbours.

    A sequence is ``seq_len // m`` consecutive rows (chunks) of one document, plus the
    token after them: a window. :meth:`windows` tiles every chosen document into windows
    (the last one of a document may be short and is padded); :meth:`read` assembles a
    batch of windows with memory-mapped gathers only. The reader pins the generation the
    set was checked against (its KeyMap); it pickles without its maps and reopens them on
    first use in each process (DataLoader workers)."""

    def __init__(
        self, db: RetroDB, nset: NeighbourSet, *, seq_len: int, k: int | None = None
    ) -> None:
        nset.check(db)
        m = db.chunk_size
        if seq_len <= 0 or seq_len % m:
            raise BadInputError(
                f"seq_len must be a positive multiple of the chunk size {m}, got {seq_len}"
            )
        k = nset.info.k if k is None else k
        if not 1 <= k <= nset.info.k:
            raise BadInputError(f"k must be in 1..{nset.info.k} (the set's k), got {k}")
        self.nset = nset
        self.keymap: KeyMap = db.keymap
        self.seq_len = seq_len
        self.chunk_size = m
        self.chunks_per_seq = seq_len // m
        self.k = k
        self.pad_id = db.pad_id
        self._maps: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def reopen(self) -> None:
        """Drop the maps (they are opened again on next use), e.g. in a fresh worker."""
        self._maps = None

    @property
    def maps(self) -> dict[str, np.ndarray]:
        """The set's arrays this process reads, as plain views of fresh memory maps."""
        if self._maps is None:
            ns = NeighbourSet(self.nset.dir, self.nset.info)
            names = ["keys", "continuations"]
            names += ["chunk_keys"] if ns.info.source == "db" else ["tokens", "lengths"]
            self._maps = {n: np.asarray(getattr(ns, n)).view(np.ndarray) for n in names}
        return self._maps

    def windows(self, documents: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(start, end)`` rows of every window of the chosen documents (a bool mask or
        indices into the set's documents; default all), in document order. ``end`` is
        the exclusive end of the window's document."""
        first = np.asarray(self.nset.first_row, dtype=np.int64)
        count = np.asarray(self.nset.num_rows, dtype=np.int64)
        if documents is not None:
            first, count = first[documents], count[documents]
        per = -(-count // self.chunks_per_seq)
        doc = np.repeat(np.arange(first.size), per)
        offset = np.arange(doc.size) - np.repeat(np.cumsum(per) - per, per)
        start = first[doc] + offset * self.chunks_per_seq
        return start, first[doc] + count[doc]

    def _own_rows(
        self, rows: np.ndarray, valid: np.ndarray, partial: bool
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """The window's own tokens and lengths (source "inputs"), or its keys (source "db")."""
        mp = self.maps
        if "chunk_keys" in mp:
            own = np.take(mp["chunk_keys"], rows)
            if partial:
                own[~valid] = -1
            return own, None, None
        toks = np.take(mp["tokens"], rows, axis=0).astype(np.int64)
        lens = np.take(mp["lengths"], rows)
        if partial:
            toks[~valid] = self.pad_id
            lens[~valid] = 0
        return None, toks, lens

    def read(self, start: np.ndarray, end: np.ndarray) -> dict[str, np.ndarray]:
        """One batch of windows: numpy arrays with a leading batch axis B.

        - ``tokens [B, L+1]`` int64: the window's tokens and the one after it (pad id
          where the document ends), so inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``
        - ``token_mask [B, L+1]`` bool: True for real tokens
        - ``targets [B, L]`` int64: ``tokens[:, 1:]`` with -100 where it is padding
        - ``retrieved [B, L/m, k, 2m]`` int64: for chunk u, its k neighbours, each the
          neighbour chunk then its continuation, pad id where missing
        - ``retrieved_mask [B, L/m, k, 2m]`` bool: True for real neighbour tokens
        - ``neighbours [B, L/m, k]`` int64: the neighbour keys (-1 = none)
        """
        mp, km = self.maps, self.keymap
        start = np.asarray(start, dtype=np.int64).reshape(-1)
        end = np.asarray(end, dtype=np.int64).reshape(-1)
        b, c, m, k = start.size, self.chunks_per_seq, self.chunk_size, self.k
        rows = start[:, None] + np.arange(c + 1)  # (B, c+1): the window and the next row
        valid = rows < end[:, None]
        partial = not valid.all()
        if partial:
            rows = np.where(valid, rows, start[:, None])  # in range; masked out below
        wrows = rows[:, :c]
        pairs = np.stack(  # (B, c, k, 2): each neighbour's key, then its continuation's
            [np.take(mp["keys"], wrows, axis=0), np.take(mp["continuations"], wrows, axis=0)],
            axis=-1,
        )[:, :, :k]
        if partial:
            pairs[~valid[:, :c]] = -1
        own_keys, own_toks, own_lens = self._own_rows(rows, valid, partial)
        if own_keys is not None:  # one gather for the window's rows and their neighbours
            toks, lens = km.rows(np.concatenate([own_keys.reshape(-1), pairs.reshape(-1)]))
            own_toks, own_lens = toks[: own_keys.size], lens[: own_keys.size]
            toks, lens = toks[own_keys.size :], lens[own_keys.size :]
        else:
            toks, lens = km.rows(pairs.reshape(-1))
        assert own_toks is not None and own_lens is not None
        tokens = np.ascontiguousarray(own_toks.reshape(b, (c + 1) * m)[:, : c * m + 1])
        tmask = km.masks(own_lens).reshape(b, (c + 1) * m)[:, : c * m + 1]
        tmask = np.ascontiguousarray(tmask)
        return {
            "tokens": tokens,
            "token_mask": tmask,
            "targets": np.where(tmask[:, 1:], tokens[:, 1:], -100),
            "retrieved": toks.reshape(b, c, k, 2 * m),
            "retrieved_mask": km.masks(lens).reshape(b, c, k, 2 * m),
            "neighbours": np.ascontiguousarray(pairs[..., 0]),
        }


__all__ = ["SequenceReader"]
