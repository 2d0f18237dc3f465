"""Live retrieval for evaluation and generation: token chunks in, neighbour tokens out.

Training reads precomputed neighbour sets; evaluation and generation retrieve live, through
the one path the database uses for its own keys (``RetroDB.encode_chunks``: detokenize,
BERT WordPiece, ONNX encoder, mean pool), then ``search_vectors`` and ``retrieve``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from retrodb.db import RetroDB
from retrodb.errors import BadInputError
from retrodb.rerank import longest_run, overlap_order, resolve_fetch
from retrodb.search import Exclusion


@dataclass
class Neighbours:
    """The k neighbours of n query chunks.

    keys [n, k] int64 (-1 = none); tokens [n, k, 2m] int64 (neighbour + continuation,
    padding where the mask is False); mask [n, k, 2m] bool."""

    keys: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, mask) as torch tensors, with -1 wherever the mask is False."""
        toks = np.where(self.mask, self.tokens, -1)
        return torch.from_numpy(toks), torch.from_numpy(self.mask.copy())


@dataclass
class LiveRetriever:
    """Encode chunks with ``db``'s encoder and fetch their k nearest neighbours.

    ``rerank="overlap"``: fetch ``fetch * k`` dense candidates (``fetch`` default 4) and
    keep the k that share the longest token run with the chunk (:mod:`retrodb.rerank`);
    ``"none"``: the dense k.
    ``min_overlap`` (the floor, 0 <= A <= 1): a neighbour whose chunk shares a run of fewer
    than ``A`` x the query chunk's tokens with it becomes the null neighbour (key -1, all
    padding), so a chunk whose neighbours have nothing to copy is predicted as with
    retrieval off; 0 keeps every neighbour.
    ``seconds`` accumulates the time spent (encoding, search and gathering)."""

    db: RetroDB
    k: int
    rerank: str = "none"
    fetch: int | None = None
    min_overlap: float = 0.0
    seconds: float = 0.0
    calls: int = 0
    dropped: int = 0
    """Neighbours the floor turned into the null neighbour, over every call."""

    def __post_init__(self) -> None:
        self.fetch = resolve_fetch(self.rerank, self.fetch)
        if not 0.0 <= self.min_overlap <= 1.0:
            raise BadInputError(f"min_overlap must be between 0 and 1, got {self.min_overlap}")

    def doc_number(self, doc_id: str) -> int:
        """The database's global number of document ``doc_id`` (-2 when it is not stored:
        never equal to a key's document, nor to -1 for "no key")."""
        n = self.db.doc_number(doc_id)
        return n if n >= 0 else -2

    def __call__(
        self,
        chunks: np.ndarray,
        lengths: np.ndarray | None = None,
        *,
        exclude: np.ndarray | None = None,
    ) -> Neighbours:
        """Neighbours of ``chunks [n, m]`` (``lengths`` real tokens each, default all).

        ``exclude [n]``: per chunk, a document number (see :meth:`doc_number`) whose
        chunks must not be returned for it; -2 = none."""
        t0 = time.perf_counter()
        chunks = np.asarray(chunks, dtype=np.int64)
        n, m = chunks.shape[0], self.db.chunk_size
        if n == 0:
            return Neighbours(
                np.zeros((0, self.k), np.int64),
                np.zeros((0, self.k, 2 * m), np.int64),
                np.zeros((0, self.k, 2 * m), bool),
            )
        vectors = self.db.encode_chunks(chunks, lengths)
        exclusion = None
        if exclude is not None:
            exclusion = Exclusion(own_doc=np.asarray(exclude, dtype=np.int64))
        fetch = int(self.fetch or 1)
        res = self.db.search_vectors(vectors, self.k * fetch, exclusion=exclusion)
        got = self.db.retrieve(res.keys)  # (n, k*fetch, 2m)
        keys, tokens, mask = res.keys, got.tokens, got.mask
        if fetch > 1 or self.min_overlap > 0:
            qlen = np.full(n, m) if lengths is None else np.asarray(lengths, dtype=np.int64)
            query = np.where(np.arange(m) < qlen[:, None], chunks, -1)  # (n, m)
            cands = np.where(mask[..., :m], tokens[..., :m], -2)  # (n, k*fetch, m)
        if fetch > 1:
            order = overlap_order(query, cands, keys >= 0)[:, : self.k]  # (n, k)
            keys = np.take_along_axis(keys, order, axis=1)
            tokens = np.take_along_axis(tokens, order[..., None], axis=1)
            mask = np.take_along_axis(mask, order[..., None], axis=1)
            cands = np.take_along_axis(cands, order[..., None], axis=1)
        if self.min_overlap > 0:
            runs = longest_run(query, cands)  # (n, k)
            drop = (keys >= 0) & (runs < self.min_overlap * np.maximum(qlen, 1)[:, None])
            keys = np.where(drop, -1, keys)
            mask = mask & ~drop[..., None]
            self.dropped += int(drop.sum())
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return Neighbours(keys, tokens, mask)


__all__ = ["LiveRetriever", "Neighbours"]
