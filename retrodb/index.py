"""USearch HNSW indexes, one per segment. The only usearch user.

An index file is written once under a temporary name, fsynced and renamed; afterwards it
is only ever memory-mapped (``view``), never rewritten, so readers can map it safely.

USearch trusts the file it maps: a flipped byte in the graph (neighbour lists, levels)
can make a search read out of bounds and crash the process. So :meth:`IndexBuilder.save`
returns an *index guard*, the CRC-32 of everything after the vector matrix (the graph,
about 150 bytes a vector at connectivity 16), which the manifest records and
:meth:`SegmentIndex.open` checks before mapping. Flipped bytes inside the vectors cannot
crash a search (they only change distances); ``retrodb verify`` finds them by sha256.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from usearch.index import Index

from .config import IndexConfig
from .errors import BadInputError, CorruptError, MismatchError
from .failpoints import failpoint
from .progress import ProgressFn, no_progress


def build_index(
    path: Path,
    keys: np.ndarray,
    vectors: np.ndarray,
    *,
    config: IndexConfig,
    progress: ProgressFn = no_progress,
    batch: int = 4096,
) -> tuple[int, int]:
    """Build an HNSW index of ``vectors`` under ``keys`` and write it atomically to ``path``.

    Returns the index guard ``(offset, crc32)``."""
    vectors = check_vectors(vectors)
    if keys.shape[0] != vectors.shape[0]:
        raise BadInputError(f"{keys.shape[0]} keys for {vectors.shape[0]} vectors")
    builder = IndexBuilder(vectors.shape[1], config)
    n = vectors.shape[0]
    progress("index", 0, n)
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        builder.add(keys[start:stop], vectors[start:stop])
        progress("index", stop, n)
    return builder.save(path)


class IndexBuilder:
    """An in-memory HNSW index filled batch by batch, then saved once."""

    def __init__(self, ndim: int, config: IndexConfig) -> None:
        self.ndim = ndim
        self.index = new_index(ndim, config)

    def __len__(self) -> int:
        return len(self.index)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        vectors = check_vectors(vectors, self.ndim)
        if keys.shape[0] != vectors.shape[0]:
            raise BadInputError(f"{keys.shape[0]} keys for {vectors.shape[0]} vectors")
        if keys.shape[0]:
            self.index.add(np.asarray(keys).astype(np.uint64), vectors)

    def save(self, path: Path) -> tuple[int, int]:
        """Write the index to ``path`` (temporary name, fsync, rename); returns its guard."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            try:
                self.index.save(str(tmp))
            except RuntimeError as exc:  # USearch reports a failed write this way
                raise OSError(errno.EIO, f"cannot write the index ({exc})", str(tmp)) from exc
            failpoint("after_index_tmp", tmp)
            guard = index_guard(tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return guard


def _graph_offset(path: Path, size: int) -> int:
    """Where the vector matrix of a saved dense index ends (0 when it has none)."""
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        meta = Index.metadata(str(path))
    except (ValueError, RuntimeError):
        meta = None
    if not meta or not meta.get("matrix_included") or len(head) < 16:
        return 0
    if meta.get("matrix_uses_64_bit_dimensions"):
        rows, cols = struct.unpack("<QQ", head[:16])
        start = 16
    else:
        rows, cols = struct.unpack("<II", head[:8])
        start = 8
    end = start + rows * cols
    return end if 0 < end <= size else 0


def _crc32(path: Path, offset: int) -> int:
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def index_guard(path: Path) -> tuple[int, int]:
    """``(offset, crc32)`` of the part of an index file after its vectors (the graph)."""
    offset = _graph_offset(path, path.stat().st_size)
    return offset, _crc32(path, offset)


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
        guard: tuple[int, int] | None = None,
    ) -> SegmentIndex:
        """Map ``path`` after checking its size and header against what the manifest says,
        and its graph against the recorded ``guard`` (see the module docstring)."""
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
        if guard is not None:
            offset, crc = guard
            if not 0 <= offset <= st.st_size or _crc32(path, offset) != crc:
                raise CorruptError(
                    f"{path}: index graph checksum does not match the manifest (the file is "
                    f"damaged; searching it could crash)"
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
        keys = np.asarray(keys)
        if keys.size == 0:
            return np.zeros((0, self.index.ndim), np.float32)
        got = self.index.get(keys.astype(np.uint64), dtype=np.float32)
        if any(g is None for g in got):
            raise CorruptError(f"{self.path}: some keys have no vector in the index")
        return np.stack([np.asarray(g, dtype=np.float32).reshape(-1) for g in got])

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
