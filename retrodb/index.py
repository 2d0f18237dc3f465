"""USearch HNSW indexes, one per segment. The only usearch user.

An index file is written once under a temporary name, fsynced and renamed; afterwards it
is only ever memory-mapped (``view``), never rewritten, so readers can map it safely."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from usearch.index import Index

from .config import IndexConfig
from .errors import BadInputError, CorruptError, MismatchError
from .progress import ProgressFn, no_progress

#: ``keep(query_rows, keys) -> bool mask``: which candidate keys a search may return.
KeepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def build_index(
    path: Path,
    keys: np.ndarray,
    vectors: np.ndarray,
    *,
    config: IndexConfig,
    progress: ProgressFn = no_progress,
    batch: int = 4096,
) -> None:
    """Build an HNSW index of ``vectors`` under ``keys`` and write it atomically to ``path``."""
    vectors = check_vectors(vectors)
    if keys.shape[0] != vectors.shape[0]:
        raise BadInputError(f"{keys.shape[0]} keys for {vectors.shape[0]} vectors")
    index = new_index(vectors.shape[1], config)
    n = vectors.shape[0]
    progress("index", 0, n)
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        index.add(keys[start:stop].astype(np.uint64), vectors[start:stop])
        progress("index", stop, n)
    tmp = path.with_name(path.name + ".tmp")
    index.save(str(tmp))
    fsync_file(tmp)
    os.replace(tmp, path)


def new_index(ndim: int, config: IndexConfig) -> Index:
    return Index(
        ndim=ndim,
        metric=config.metric,
        dtype=config.dtype,
        connectivity=config.connectivity,
        expansion_add=config.expansion_add,
        expansion_search=config.expansion_search,
    )


def check_vectors(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Return ``vectors`` as C-contiguous float32 ``[n, d]``, refusing NaN/inf or a wrong ``d``."""
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise BadInputError(f"vectors must be 2-D [n, d], got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise MismatchError(f"vectors have dimension {arr.shape[1]}, the database uses {dim}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise BadInputError(f"vectors must be floating point, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise BadInputError("vectors contain NaN or infinite values")
    return arr


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class SegmentIndex:
    """A memory-mapped view of one segment's index."""

    path: Path
    index: Index
    first_key: int
    size: int

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        first_key: int,
        count: int,
        ndim: int,
        expected_size: int | None,
        config: IndexConfig,
    ) -> SegmentIndex:
        """Map ``path`` after checking its size and header against what the manifest says."""
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise CorruptError(f"{path}: index file missing") from exc
        if expected_size is not None and st.st_size != expected_size:
            raise CorruptError(
                f"{path}: index file has {st.st_size} bytes, the manifest recorded {expected_size}"
            )
        try:
            meta = Index.metadata(str(path))
        except (ValueError, RuntimeError):
            meta = None
        if meta is None:
            raise CorruptError(f"{path}: not a USearch index (bad header)")
        if int(meta["dimensions"]) != ndim or int(meta["count_present"]) != count:
            raise CorruptError(
                f"{path}: index holds {meta['count_present']} vectors of dimension "
                f"{meta['dimensions']}, expected {count} of dimension {ndim}"
            )
        index = new_index(ndim, config)
        try:
            index.view(str(path))
        except Exception as exc:  # usearch raises RuntimeError with its own message
            raise CorruptError(f"{path}: cannot map index ({exc})") from exc
        index.expansion_search = config.expansion_search
        return cls(path=path, index=index, first_key=first_key, size=count)

    def vectors(self, keys: np.ndarray) -> np.ndarray:
        """The stored vectors of ``keys`` (as float32; f16 indexes round them)."""
        got = self.index.get(keys.astype(np.uint64), dtype=np.float32)
        return np.stack([np.asarray(g, dtype=np.float32) for g in got])

    def search(
        self, queries: np.ndarray, count: int, *, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``count`` keys and distances for each query, -1 / inf padded."""
        count = min(count, self.size)
        q = queries.shape[0]
        if count <= 0 or q == 0:
            return np.full((q, 0), -1, np.int64), np.full((q, 0), np.inf, np.float32)
        m = self.index.search(queries, count, exact=exact)
        keys = np.asarray(m.keys, dtype=np.int64).reshape(q, -1)
        dist = np.asarray(m.distances, dtype=np.float32).reshape(q, -1)
        # One query gives ``Matches`` (no ``counts``), several give ``BatchMatches``.
        counts = np.asarray(m.counts if hasattr(m, "counts") else [len(m.keys)]).reshape(q)
        valid = np.arange(keys.shape[1])[None, :] < counts[:, None]
        keys = np.where(valid, keys, -1)
        dist = np.where(valid, dist, np.inf).astype(np.float32)
        return keys, dist


def search_segments(
    segments: Sequence[SegmentIndex],
    queries: np.ndarray,
    k: int,
    *,
    keep: KeepFn | None = None,
    exact: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Search every segment and merge the best ``k`` per query.

    ``keep`` filters candidates (deleted documents, the query's own document); a segment is
    searched again with a larger count until every query has ``k`` kept candidates or the
    segment is exhausted. Returns ``(keys [q, k] int64, distances [q, k] float32)``, best
    first, -1 and inf where fewer than ``k`` exist."""
    if k <= 0:
        raise BadInputError(f"k must be positive, got {k}")
    q = queries.shape[0]
    all_keys = [np.full((q, 0), -1, np.int64)]
    all_dist = [np.full((q, 0), np.inf, np.float32)]
    rows = np.arange(q)
    for seg in segments:
        count = k
        while True:
            keys, dist = seg.search(
                queries, count if keep is None else min(seg.size, count * 2), exact=exact
            )
            if keep is not None and keys.size:
                ok = (keys >= 0) & keep(np.broadcast_to(rows[:, None], keys.shape), keys)
                keys = np.where(ok, keys, -1)
                dist = np.where(ok, dist, np.inf).astype(np.float32)
            got = (keys >= 0).sum(axis=1)
            if keep is None or keys.shape[1] >= seg.size or (got >= k).all():
                break
            count *= 4
        all_keys.append(keys)
        all_dist.append(dist)
    keys = np.concatenate(all_keys, axis=1)
    dist = np.concatenate(all_dist, axis=1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    keys = np.take_along_axis(keys, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    if keys.shape[1] < k:
        pad = k - keys.shape[1]
        keys = np.pad(keys, ((0, 0), (0, pad)), constant_values=-1)
        dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
    return keys, dist.astype(np.float32)
