"""Queries as `retrodb query` answers them: each text's neighbours with their document,
distance, text and continuation, read from one snapshot (optionally re-ranked)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .rerank import rerank_search, resolve_fetch
from .snapshot import Snapshot


@dataclass(frozen=True, slots=True)
class Hit:
    """One neighbour of a query: its key, document, distance, text and continuation."""

    key: int
    doc: str
    distance: float
    text: str
    continuation: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "doc": self.doc,
            "distance": self.distance,
            "text": self.text,
            "continuation": self.continuation,
        }


@dataclass(frozen=True, slots=True)
class QueryResult:
    """A query text and its neighbours, best first (fewer than k when fewer exist)."""

    query: str
    neighbours: list[Hit]

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "neighbours": [h.to_dict() for h in self.neighbours]}


def lookup(snap: Snapshot, keys: np.ndarray, distances: np.ndarray | None = None) -> list[Hit]:
    """One :class:`Hit` (key, document, text, continuation) per key other than -1."""
    flat = np.asarray(keys, dtype=np.int64).ravel()
    dist = np.full(flat.shape, np.nan) if distances is None else np.asarray(distances).ravel()
    real = flat >= 0
    flat, dist = flat[real], dist[real]
    texts = snap.decode(flat)
    conts = snap.continuation_text(flat)
    docs = snap.key_documents(flat)
    return [
        Hit(key=int(k), doc=str(d), distance=float(x), text=t, continuation=c)
        for k, d, x, t, c in zip(flat, docs, dist, texts, conts, strict=True)
    ]


def query(
    snap: Snapshot,
    texts: str | Sequence[str],
    k: int = 4,
    *,
    exact: bool = False,
    rerank: str = "none",
    fetch: int | None = None,
) -> list[QueryResult]:
    """Search each text and look its neighbours up: what `retrodb query` prints.

    ``rerank="overlap"``: fetch ``fetch * k`` dense candidates (default 4 per kept
    neighbour) and keep the k sharing the longest token run with the text (see
    :mod:`.rerank`); their distances stay the dense ones."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    fetch = resolve_fetch(rerank, fetch)
    if rerank == "overlap":
        res = rerank_search(snap, texts, k, fetch=fetch, exact=exact)
    else:
        res = snap.search(texts, k, exact=exact)
    return [
        QueryResult(query=q, neighbours=lookup(snap, res.keys[i], res.distances[i]))
        for i, q in enumerate(texts)
    ]


__all__ = ["Hit", "QueryResult", "lookup", "query"]
