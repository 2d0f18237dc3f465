"""Search over every segment of a generation, with the filters a RETRO database needs.

The indexes know vectors and keys only; what may be returned is decided here, through
the generation's :class:`~retrodb.keys.KeyMap`: deleted documents never, a query's own
document or a list of excluded documents when asked. When filters drop candidates, a
segment is searched again with a larger count until each query has k kept candidates or
the segment is exhausted; the segments' top k are then merged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import BadInputError
from .index import SegmentIndex
from .keys import KeyMap

#: A segment is searched again with this many times more candidates while filters drop
#: too many.
WIDEN = 4


@dataclass(frozen=True, slots=True)
class SearchResult:
    """``keys [q, k]`` int64 (-1 where fewer than k exist) and cosine ``distances [q, k]``."""

    keys: np.ndarray
    distances: np.ndarray


@dataclass(frozen=True, slots=True)
class Exclusion:
    """Candidates a search must not return, besides deleted documents.

    ``own_doc [q]``: per query, a global document number never returned for it (-2: none;
    -1 never matches a real key). ``docs``: a ``[documents + 1]`` bool table of document
    numbers never returned (see :meth:`KeyMap.doc_table`). ``skip_starts``/``skip_stops``:
    sorted ``[start, stop)`` key ranges never returned (what a neighbour set has already
    searched)."""

    own_doc: np.ndarray | None = None
    docs: np.ndarray | None = None
    skip_starts: np.ndarray | None = None
    skip_stops: np.ndarray | None = None

    @property
    def needs_documents(self) -> bool:
        return self.own_doc is not None or self.docs is not None

    def skipped(self, keys: np.ndarray) -> np.ndarray:
        if self.skip_starts is None or self.skip_stops is None:
            return np.zeros(keys.shape, dtype=bool)
        i = np.searchsorted(self.skip_starts, keys, side="right") - 1
        ok = i >= 0
        out = np.zeros(keys.shape, dtype=bool)
        out[ok] = keys[ok] < self.skip_stops[i[ok]]
        return out


def check_k(k: object) -> int:
    """``k`` as an int, refusing anything but a positive integer."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
        raise BadInputError(f"k must be a positive integer, got {k!r}")
    return int(k)


def merge_top(
    keys: Sequence[np.ndarray], dist: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of several ``[q, *]`` candidate lists, -1 / inf padded to k."""
    all_keys = np.concatenate(keys, axis=1)
    all_dist = np.concatenate(dist, axis=1)
    order = np.argsort(all_dist, axis=1, kind="stable")[:, :k]
    top_keys = np.take_along_axis(all_keys, order, axis=1)
    top_dist = np.take_along_axis(all_dist, order, axis=1)
    if top_keys.shape[1] < k:
        pad = k - top_keys.shape[1]
        top_keys = np.pad(top_keys, ((0, 0), (0, pad)), constant_values=-1)
        top_dist = np.pad(top_dist, ((0, 0), (0, pad)), constant_values=np.inf)
    return top_keys, top_dist.astype(np.float32)


def _kept(keymap: KeyMap, keys: np.ndarray, exclusion: Exclusion | None) -> np.ndarray:
    """``[q, c]`` bool: which candidates may be returned."""
    ok = (keys >= 0) & ~keymap.deleted(keys)
    if exclusion is None:
        return ok
    if exclusion.needs_documents:
        docs = keymap.doc_numbers(keys)  # -1 for -1
        if exclusion.own_doc is not None:
            ok &= docs != exclusion.own_doc[:, None]
        if exclusion.docs is not None:
            ok &= ~exclusion.docs[docs]  # -1 reads the last slot: "no document"
    return ok & ~exclusion.skipped(keys)


def search_segments(
    indexes: Sequence[SegmentIndex],
    vectors: np.ndarray,
    k: int,
    *,
    exact: bool = False,
    kept: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Search every index and merge the best ``k`` per query: ``(keys [q, k], distances
    [q, k])``, best first, -1 / inf where fewer exist. ``kept(keys [q, c]) -> bool [q, c]``
    filters candidates; a segment is then searched again with ``WIDEN`` times more
    candidates until every query has ``k`` kept ones or the segment is exhausted."""
    k = check_k(k)
    q = vectors.shape[0]
    found_keys = [np.full((q, 0), -1, np.int64)]
    found_dist = [np.full((q, 0), np.inf, np.float32)]
    for index in indexes:
        count = k if kept is None else 2 * k
        while True:
            keys, dist = index.search(vectors, count, exact=exact)
            if kept is None:
                break
            ok = (keys >= 0) & kept(keys)
            keys = np.where(ok, keys, -1)
            dist = np.where(ok, dist, np.inf).astype(np.float32)
            if keys.shape[1] >= index.size or (ok.sum(axis=1) >= k).all():
                break
            count *= WIDEN
        if len(indexes) == 1 and kept is None:  # one best-first list already: no merge
            return merge_top([keys], [dist], k) if keys.shape[1] < k else (keys, dist)
        found_keys.append(keys)
        found_dist.append(dist)
    return merge_top(found_keys, found_dist, k)


def search_filtered(
    keymap: KeyMap,
    indexes: Sequence[SegmentIndex],
    vectors: np.ndarray,
    k: int,
    *,
    exact: bool = False,
    exclusion: Exclusion | None = None,
) -> SearchResult:
    """The ``k`` nearest keys of each query vector over ``indexes`` that ``keymap`` says
    may be returned (never deleted documents; nor what ``exclusion`` names), best first."""
    filtered = exclusion is not None or bool(keymap.tombstones)
    keys, dist = search_segments(
        indexes,
        vectors,
        k,
        exact=exact,
        kept=(lambda c: _kept(keymap, c, exclusion)) if filtered else None,
    )
    return SearchResult(keys=keys, distances=dist)


__all__ = [
    "Exclusion",
    "SearchResult",
    "check_k",
    "merge_top",
    "search_filtered",
    "search_segments",
]
