"""Re-ranking dense candidates by token overlap with the query chunk.

RETRO's gains come mostly from neighbours that share tokens with the text (Norlund et
al. 2023), and re-ranking by lexical overlap lowered RETRO's perplexity further
(Doostmohammadi et al. 2023). A dense search returns ``fetch * k`` candidates; they are
ordered by the longest common contiguous token run between the query chunk and the
candidate chunk (runs shorter than ``min_run`` count as none, so without real overlap the
dense order stands), ties broken by the dense order, and the first k are kept.

>>> order = overlap_order(query_tokens, candidate_tokens)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from .errors import BadInputError
from .search import SearchResult, check_k

if TYPE_CHECKING:
    from .snapshot import Snapshot

Rerank = Literal["none", "overlap"]
RERANKS: tuple[str, ...] = ("none", "overlap")
#: Dense candidates fetched per kept neighbour when re-ranking.
DEFAULT_FETCH = 4
#: Shorter common runs are treated as no overlap (shared markup, single common words).
DEFAULT_MIN_RUN = 4


def longest_run(query: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """Longest common contiguous run between each query ``[n, m]`` and each of its
    candidates ``[n, c, r]``: ``[n, c]`` int64. Negative entries (padding) never match."""
    query = np.asarray(query, dtype=np.int64)
    cands = np.asarray(cands, dtype=np.int64)
    n, c, r = cands.shape
    best = np.zeros((n, c), dtype=np.int64)
    run = np.zeros((n, c, r + 1), dtype=np.int32)
    for i in range(query.shape[1]):
        q = query[:, i]  # (n,)
        eq = (cands == q[:, None, None]) & (q >= 0)[:, None, None]  # (n, c, r)
        nxt = np.zeros_like(run)
        nxt[..., 1:] = (run[..., :-1] + 1) * eq
        run = nxt
        np.maximum(best, run.max(axis=-1), out=best)
    return best


def overlap_order(
    query: np.ndarray,
    cands: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    min_run: int = DEFAULT_MIN_RUN,
) -> np.ndarray:
    """The re-ranked order ``[n, c]`` (indices into the candidate axis) of candidates
    ``cands [n, c, r]`` for queries ``query [n, m]`` (negative = padding), given in dense
    order. ``valid [n, c]``: False for missing candidates, which go last."""
    score = longest_run(query, cands)
    score[score < min_run] = 0
    if valid is not None:
        score = np.where(valid, score, -1)
    # stable: equal scores keep the dense order
    return np.argsort(-score, axis=1, kind="stable")


def rerank_keys(
    query: np.ndarray,
    keys: np.ndarray,
    dist: np.ndarray,
    cand_tokens: np.ndarray,
    k: int,
    *,
    min_run: int = DEFAULT_MIN_RUN,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k best of dense candidates ``keys, dist [n, c]`` (best first, -1 = none)
    by overlap of their tokens ``cand_tokens [n, c, m]`` (negative = padding) with
    ``query [n, m]``: ``(keys [n, k], dist [n, k])``; fewer than k candidates give -1 / inf
    padding."""
    order = overlap_order(query, cand_tokens, keys >= 0, min_run=min_run)[:, :k]
    keys, dist = np.take_along_axis(keys, order, axis=1), np.take_along_axis(dist, order, axis=1)
    if keys.shape[1] < k:
        pad = ((0, 0), (0, k - keys.shape[1]))
        keys = np.pad(keys, pad, constant_values=-1)
        dist = np.pad(dist, pad, constant_values=np.inf)
    return keys, dist


def check_rerank(rerank: str) -> None:
    if rerank not in RERANKS:
        raise BadInputError(f"rerank must be one of {RERANKS}, got {rerank!r}")


def resolve_fetch(rerank: str, fetch: int | None) -> int:
    """The dense candidates per kept neighbour that ``rerank`` fetches: ``fetch`` (default
    :data:`DEFAULT_FETCH`) for ``overlap``, 1 for ``none`` (which refuses another value)."""
    check_rerank(rerank)
    if fetch is not None and (
        isinstance(fetch, bool) or not isinstance(fetch, int | np.integer) or fetch <= 0
    ):
        raise BadInputError(f"fetch must be a positive integer, got {fetch!r}")
    if rerank == "none":
        if fetch not in (None, 1):
            raise BadInputError(
                f"fetch={fetch} applies only to rerank 'overlap' (rerank 'none' keeps the "
                "dense top k)"
            )
        return 1
    return DEFAULT_FETCH if fetch is None else int(fetch)


def padded(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Token rows with every position outside ``mask`` set to -1 (never matches)."""
    return np.where(mask, np.asarray(tokens, dtype=np.int64), -1)


def candidate_tokens(snap: Snapshot, keys: np.ndarray) -> np.ndarray:
    """The chunk tokens ``[..., m]`` of ``keys [...]`` with padding (and key -1) as -1."""
    toks, lengths = snap.chunks(keys)
    return padded(toks, snap.keymap.masks(lengths))


def rerank_search(
    snap: Snapshot,
    queries: str | Sequence[str],
    k: int,
    *,
    fetch: int = DEFAULT_FETCH,
    exact: bool = False,
    min_run: int = DEFAULT_MIN_RUN,
) -> SearchResult:
    """``snap.search`` of query texts, re-ranked: ``fetch * k`` dense candidates, the k that
    share the longest token run with the query's tokens kept (distances stay the dense
    ones, so they are no longer sorted)."""
    k = check_k(k)
    fetch = resolve_fetch("overlap", fetch)
    texts = [queries] if isinstance(queries, str) else list(queries)
    dense = snap.search(texts, k=k * fetch, exact=exact)  # also refuses empty texts
    tok = snap.tokenizer
    ids = tok.encode(texts)
    query = np.full((len(ids), max((len(t) for t in ids), default=1)), -1, dtype=np.int64)
    for i, t in enumerate(ids):
        query[i, : len(t)] = t
    cands = candidate_tokens(snap, dense.keys)
    keys, dist = rerank_keys(query, dense.keys, dense.distances, cands, k, min_run=min_run)
    return SearchResult(keys=keys, distances=dist)


__all__ = [
    "DEFAULT_FETCH",
    "DEFAULT_MIN_RUN",
    "RERANKS",
    "Rerank",
    "candidate_tokens",
    "check_rerank",
    "longest_run",
    "overlap_order",
    "padded",
    "rerank_keys",
    "rerank_search",
    "resolve_fetch",
]
