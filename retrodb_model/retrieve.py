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
from retrodb.rerank import overlap_order, resolve_fetch
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
    ``seconds`` accumulates the time spent (encoding, search and gathering)."""

    db: RetroDB
    k: int
    rerank: str = "none"
    fetch: int | None = None
    seconds: float = 0.0
    calls: int = 0

    def __post_init__(self) -> None:
        self.fetch = resolve_fetch(self.rerank, self.fetch)

    def doc_number(self, doc_id: str) -> int:
        """The database's global number of document ``doc_id`` (-2 when it is not stored:
        never equal to a key's document, nor to -1 for "no key")."""
        n = self.db.keymap.doc_number(doc_id)
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
        if fetch > 1:
            real = np.arange(m) < (m if lengths is None else np.asarray(lengths)[:, None])
            query = np.where(real, chunks, -1)  # (n, m)
            cands = np.where(mask[..., :m], tokens[..., :m], -2)  # (n, k*fetch, m)
            order = overlap_order(query, cands, keys >= 0)[:, : self.k]  # (n, k)
            keys = np.take_along_axis(keys, order, axis=1)
            tokens = np.take_along_axis(tokens, order[..., None], axis=1)
            mask = np.take_along_axis(mask, order[..., None], axis=1)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return Neighbours(keys, tokens, mask)


__all__ = ["LiveRetriever", "Neighbours"]
