"""USearch HNSW indexes, one per segment. The only usearch user.

An index file is written once under a temporary name, fsynced and renamed; afterwards it
is only ever memory-mapped (``view``), never rewritten, so readers can map it safely.

USearch trusts the file it maps: a flipped byte in the graph (neighbour lists, levels)
can make a search read out of bounds and crash the process. So :meth:`IndexBuilder.save`
returns an *index guard*, the CRC-32 of everything after the vector matrix (the graph,
about 150 bytes a vector at connectivity 16), which the manifest records and
:meth:`SegmentIndex.open` checks before mapping. Flipped bytes inside the vectors cannot
crash a search (they only change distances); ``retrodb verify`` finds them by sha256.

Reachability: HNSW built by concurrent adds (and, more rarely, by single-threaded ones) can
leave nodes that no search reaches: no other node links to them, so a search for their own
vector returns their neighbours and never them. :meth:`IndexBuilder.save` therefore searches
every stored vector for itself (:func:`unreachable_keys`) and writes the keys not found to a
*side list* file beside the index (``index-side.json``, only when there are some), written
once like the index. :class:`SegmentIndex` searches those few vectors exactly and merges
them into every approximate search, so every key is found by a search for its own vector;
:meth:`SegmentIndex.unreachable` checks that on a mapped index (``retrodb verify``).

USearch's wheels link their own copy of libstdc++ into the compiled module, and that copy
shares the C++ locale's facet numbers with the system libstdc++ (they are STB_GNU_UNIQUE
symbols, unified across the whole process). If USearch numbers them first, the system
copy later hands the same numbers to other facets and onnxruntime crashes on import. This
module therefore makes the system libstdc++ global before USearch is loaded, so that USearch
binds to it (:func:`share_cxx_runtime`; docs/reliability.md, promise 9).
"""

from __future__ import annotations

import ctypes
import errno
import json
import struct
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import IndexConfig
from .errors import BadInputError, CorruptError, MismatchError, RetroDBError
from .failpoints import failpoint
from .fsutil import write_atomic, write_file_atomic
from .progress import ProgressFn, no_progress


class CxxRuntimeClashError(RetroDBError, ImportError):
    """USearch was loaded before retrodb with its private C++ runtime, and the process's
    C++ locale facet numbers now clash (onnxruntime would crash on import)."""


#: Facet ids that belong to one libstdc++ copy (numbered when that copy builds its
#: classic locale) and ids shared by every copy in the process (STB_GNU_UNIQUE).
_OWN_FACET_IDS = (
    "_ZNSt5ctypeIcE2idE",
    "_ZNSt5ctypeIwE2idE",
    "_ZNSt7codecvtIcc11__mbstate_tE2idE",
    "_ZNSt7codecvtIwc11__mbstate_tE2idE",
    "_ZNSt7codecvtIDsc11__mbstate_tE2idE",
    "_ZNSt7codecvtIDic11__mbstate_tE2idE",
)
_SHARED_FACET_IDS = (
    "_ZNSt7collateIcE2idE",
    "_ZNSt7collateIwE2idE",
    "_ZNSt8numpunctIcE2idE",
    "_ZNSt8numpunctIwE2idE",
    "_ZNSt8messagesIcE2idE",
    "_ZNSt7__cxx117collateIcE2idE",
    "_ZNSt7__cxx118numpunctIcE2idE",
    "_ZNSt7__cxx118messagesIcE2idE",
    "_ZNSt7num_getIcSt19istreambuf_iteratorIcSt11char_traitsIcEEE2idE",
    "_ZNSt7num_putIcSt19ostreambuf_iteratorIcSt11char_traitsIcEEE2idE",
)


def _facet_ids(lib: ctypes.CDLL, names: Sequence[str]) -> set[int]:
    out = set()
    for name in names:
        try:
            value = ctypes.c_size_t.in_dll(lib, name).value
        except ValueError:  # not exported by this build
            continue
        if value:
            out.add(value)
    return out


def share_cxx_runtime() -> None:
    """Load the system libstdc++ with RTLD_GLOBAL (Linux), before USearch is imported.

    USearch's compiled module exports the symbols of its statically linked libstdc++; with
    the system copy global, the dynamic linker binds them to the system copy, and the
    process has one C++ locale (the state that importing onnxruntime first produces too:
    it loads a provider library with RTLD_GLOBAL). Raises :class:`CxxRuntimeClashError`
    when it is too late: USearch's private copy has already numbered the shared facet ids
    while the system copy has not built its locale (the next C++ library to use a locale,
    such as onnxruntime, would crash), or the two numberings already overlap."""
    if not sys.platform.startswith("linux"):
        return
    try:
        lib = ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return  # no system C++ runtime: nothing to share or to clash with
    own = _facet_ids(lib, _OWN_FACET_IDS)
    shared = _facet_ids(lib, _SHARED_FACET_IDS)
    if shared and (not own or own & shared):
        module = sys.modules.get("usearch.compiled")
        where = getattr(module, "__file__", None) or "a C++ extension module"
        raise CxxRuntimeClashError(
            f"{where}: USearch (or another module with its own libstdc++) was imported "
            f"before retrodb and numbered the C++ locale facets with its private runtime; "
            f"onnxruntime would crash (SIGSEGV) in this process. Import retrodb or "
            f"onnxruntime before usearch, or reinstall retrodb so that its startup hook "
            f"(retrodb-cxx-runtime.pth) is in site-packages (docs/reliability.md)"
        )


share_cxx_runtime()

from usearch.index import Index  # noqa: E402 - after share_cxx_runtime(), on purpose


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


#: A key counts as reachable when a search for its own stored vector returns it among the
#: best ``REACH_K`` (at the index's configured ``expansion_search``).
REACH_K = 10
#: Distances at or below this are the same vector (f16 rounding): when ``REACH_K`` such
#: copies fill a key's own search, the key is tied with duplicates, not unreachable.
_SAME = 1e-6
#: Self-searches per batch in the reachability check.
_REACH_BATCH = 2048


def side_file(index_path: Path) -> Path:
    """The side list file that belongs to the index file ``index_path``."""
    return index_path.with_name(index_path.stem + "-side.json")


class IndexBuilder:
    """An in-memory HNSW index filled batch by batch, checked, then saved once.

    After :meth:`save`, ``side_keys`` holds the keys the graph could not reach (written to
    the side list) and ``check_seconds`` what finding them cost."""

    def __init__(self, ndim: int, config: IndexConfig, *, repair: bool = True) -> None:
        self.ndim = ndim
        self.repair = repair
        self.index = new_index(ndim, config)
        self.side_keys = np.zeros(0, np.int64)
        self.check_seconds = 0.0

    def __len__(self) -> int:
        return len(self.index)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        vectors = check_vectors(vectors, self.ndim)
        if keys.shape[0] != vectors.shape[0]:
            raise BadInputError(f"{keys.shape[0]} keys for {vectors.shape[0]} vectors")
        if keys.shape[0]:
            self.index.add(np.asarray(keys).astype(np.uint64), vectors)

    def save(self, path: Path, *, progress: ProgressFn = no_progress) -> tuple[int, int]:
        """Find the keys the graph cannot reach (unless ``repair`` is off), then write the
        index to ``path`` and, when there are such keys, their side list beside it (each:
        temporary name, fsync, rename). Returns the index guard."""
        start = time.perf_counter()
        if self.repair:
            self.side_keys = unreachable_keys(self.index, progress=progress)
        self.check_seconds = time.perf_counter() - start
        side = side_file(path)
        side.unlink(missing_ok=True)  # a fresh segment directory has none; tests reuse paths
        guards: list[tuple[int, int]] = []

        def write(tmp: Path) -> None:
            try:
                self.index.save(str(tmp))
            except RuntimeError as exc:  # USearch reports a failed write this way
                raise OSError(errno.EIO, f"cannot write the index ({exc})", str(tmp)) from exc
            failpoint("after_index_tmp", tmp)
            guards.append(index_guard(tmp))

        write_file_atomic(path, write)
        if self.side_keys.size:
            body = {"unreachable": [int(k) for k in self.side_keys], "k": REACH_K}
            write_atomic(side, (json.dumps(body) + "\n").encode())
        return guards[0]


def _search_index(
    index: Index, queries: np.ndarray, count: int, *, exact: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``count`` keys and distances of ``index`` for each query, -1 / inf padded."""
    q = queries.shape[0]
    m = index.search(queries, count, exact=exact)
    keys = np.asarray(m.keys, dtype=np.int64).reshape(q, -1)
    dist = np.asarray(m.distances, dtype=np.float32).reshape(q, -1)
    # One query gives ``Matches`` (no ``counts``), several give ``BatchMatches``.
    counts = np.asarray(m.counts if hasattr(m, "counts") else [len(m.keys)]).reshape(q)
    if (counts == keys.shape[1]).all():  # every query filled (the usual case)
        return keys, dist
    valid = np.arange(keys.shape[1])[None, :] < counts[:, None]
    keys = np.where(valid, keys, -1)
    dist = np.where(valid, dist, np.inf).astype(np.float32)
    return keys, dist


def _get_many(index: Index, keys: np.ndarray, dtype: str) -> list[np.ndarray | None]:
    """``index.get`` of several keys: one stored vector (as ``dtype``) or None per key."""
    got = index.get(np.asarray(keys).astype(np.uint64), dtype=dtype)
    return list(got) if isinstance(got, tuple) else [got]


def _stored_vectors(index: Index, keys: np.ndarray, where: object) -> np.ndarray:
    """The stored vectors of ``keys`` as float32 ``[n, d]`` (f16 indexes round them)."""
    if keys.size == 0:
        return np.zeros((0, index.ndim), np.float32)
    got = _get_many(index, keys, "f32")
    rows = [g for g in got if g is not None]
    if len(rows) < len(got):
        raise CorruptError(f"{where}: some keys have no vector in the index")
    return np.stack([np.asarray(g, dtype=np.float32).reshape(-1) for g in rows])


SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def _not_found(
    keys: np.ndarray,
    vectors: Callable[[np.ndarray], np.ndarray],
    search: SearchFn,
    *,
    k: int,
    progress: ProgressFn,
) -> np.ndarray:
    """Keys whose own-vector search (``search``, top ``k``) does not return them, sorted;
    keys tied with ``k`` exact duplicates of their vector are not counted."""
    n = keys.size
    k = min(k, n)
    missing = [np.zeros(0, np.int64)]
    progress("reachability", 0, n)
    for start in range(0, n, _REACH_BATCH):
        batch = keys[start : start + _REACH_BATCH]
        got, dist = search(vectors(batch), k)
        found = (got == batch[:, None]).any(axis=1)
        tied = (dist <= _SAME).sum(axis=1) >= k
        missing.append(batch[~found & ~tied])
        progress("reachability", min(n, start + _REACH_BATCH), n)
    return np.sort(np.concatenate(missing))


def unreachable_keys(
    index: Index, *, k: int = REACH_K, progress: ProgressFn = no_progress
) -> np.ndarray:
    """Keys of ``index`` (int64, sorted) that an approximate search for their own stored
    vector, at the index's ``expansion_search``, does not return among the best ``k``.

    Costs one batched search per key (about as much as adding them, at k = 10)."""
    keys = np.sort(np.asarray(index.keys, dtype=np.uint64)).astype(np.int64)
    return _not_found(
        keys,
        lambda b: _stored_vectors(index, b, "index"),
        lambda q, c: _search_index(index, q, c),
        k=k,
        progress=progress,
    )


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


@dataclass(slots=True)
class SegmentIndex:
    """A memory-mapped view of one segment's index, with its side list (the keys the graph
    cannot reach, searched exactly; see the module docstring)."""

    path: Path
    index: Index
    first_key: int
    size: int
    side: SideList | None = None

    @property
    def side_keys(self) -> np.ndarray:
        """The keys of the side list (int64, sorted; empty when it has none)."""
        return self.side.keys if self.side is not None else np.zeros(0, np.int64)

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
        load: bool = False,
    ) -> SegmentIndex:
        """Map ``path`` after checking its size and header against what the manifest says,
        and its graph against the recorded ``guard`` (see the module docstring). ``load``:
        read the index into memory instead (the file's size in RAM; no page faults on the
        first searches)."""
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
            if load:
                index.load(str(path))
            else:
                index.view(str(path))
        except Exception as exc:  # usearch raises RuntimeError with its own message
            raise CorruptError(f"{path}: cannot {'load' if load else 'map'} index ({exc})") from exc
        # usearch's setter is declared apart from its property, which mypy reads as read-only
        index.expansion_search = config.expansion_search  # type: ignore[misc]
        side = SideList.open(path, index, config)
        return cls(path=path, index=index, first_key=first_key, size=count, side=side)

    def vectors(self, keys: np.ndarray) -> np.ndarray:
        """The stored vectors of ``keys`` (as float32; f16 indexes round them)."""
        return _stored_vectors(self.index, np.asarray(keys), self.path)

    def search(
        self, queries: np.ndarray, count: int, *, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``count`` keys and distances for each query, -1 / inf padded. An approximate
        search also searches the side list exactly and merges it in."""
        count = min(count, self.size)
        q = queries.shape[0]
        if count <= 0 or q == 0:
            return np.full((q, 0), -1, np.int64), np.full((q, 0), np.inf, np.float32)
        keys, dist = _search_index(self.index, queries, count, exact=exact)
        if self.side is None or exact:
            return keys, dist
        side_dist = self.side.distances(queries)  # (q, s)
        # Usually no side vector beats a query's worst result: the answer stands as it is.
        if not (side_dist < dist[:, -1:]).any():
            return keys, dist
        side_keys = np.broadcast_to(self.side.keys[None, :], side_dist.shape)
        # A side key the graph returned too (it is reachable from some queries) counts once.
        again = (side_keys[:, :, None] == keys[:, None, :]).any(axis=2)
        side_keys = np.where(again, -1, side_keys)
        side_dist = np.where(again, np.inf, side_dist).astype(np.float32)
        keys = np.concatenate([keys, side_keys], axis=1)
        dist = np.concatenate([dist, side_dist], axis=1)
        order = np.argsort(dist, axis=1, kind="stable")[:, :count]
        keys = np.take_along_axis(keys, order, axis=1)
        dist = np.take_along_axis(dist, order, axis=1)
        return np.where(np.isinf(dist), -1, keys), dist

    def unreachable(self, *, k: int = REACH_K, progress: ProgressFn = no_progress) -> np.ndarray:
        """Keys (int64, sorted) that :meth:`search` for their own stored vector does not
        return among the best ``k``: 0 for an index saved by :class:`IndexBuilder`; an
        index written before side lists existed may have some. Costs one search per key."""
        keys = np.sort(np.asarray(self.index.keys, dtype=np.uint64)).astype(np.int64)
        return _not_found(keys, self.vectors, self.search, k=k, progress=progress)


@dataclass(frozen=True, slots=True)
class SideList:
    """The keys an index's graph cannot reach, with their stored vectors, searched exactly
    beside the graph (see the module docstring). Distances are USearch's own: the query is
    rounded to the index's scalar type first (f16, bf16), and an i8 index, whose scaled
    integer distances NumPy does not reproduce, keeps a small USearch index instead."""

    keys: np.ndarray  # int64 [s], sorted
    vectors: np.ndarray  # float32 [s, d], as stored; unit length for cos
    metric: str
    dtype: str
    index: Index | None  # i8 only

    @classmethod
    def open(cls, path: Path, index: Index, config: IndexConfig) -> SideList | None:
        """Read the side list of the index at ``path`` (None when its file is absent) and
        its keys' vectors from ``index``."""
        side = side_file(path)
        try:
            body = json.loads(side.read_bytes())
            keys = np.unique(np.asarray(body["unreachable"], dtype=np.int64).reshape(-1))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptError(f"{side}: unreadable side list ({exc})") from exc
        if keys.size == 0:
            return None
        if (keys < 0).any() or any(v is None for v in _get_many(index, keys, "f32")):
            raise CorruptError(f"{side}: lists keys that the index {path.name} does not hold")
        vectors = _stored_vectors(index, keys, path)
        small = None
        if config.dtype == "i8":  # the stored bytes, so that nothing is quantized twice
            raw = np.stack([g for g in _get_many(index, keys, "i8") if g is not None])
            small = new_index(vectors.shape[1], config)
            small.add(keys.astype(np.uint64), raw)
        elif config.metric == "cos":
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
        return cls(
            keys=keys, vectors=vectors, metric=config.metric, dtype=config.dtype, index=small
        )

    def distances(self, queries: np.ndarray) -> np.ndarray:
        """Exact distances ``[q, s]`` from each query to each side vector (keys' order)."""
        if self.index is not None:
            keys, dist = _search_index(self.index, queries, self.keys.size, exact=True)
            out = np.full(keys.shape, np.inf, np.float32)
            ok = keys >= 0
            rows = np.broadcast_to(np.arange(keys.shape[0])[:, None], keys.shape)
            out[rows[ok], np.searchsorted(self.keys, keys[ok])] = dist[ok]
            return out
        q = _round_like(self.dtype, np.asarray(queries, dtype=np.float32))
        if self.metric == "l2sq":
            v = self.vectors
            d = (q * q).sum(1)[:, None] - 2 * q @ v.T + (v * v).sum(1)[None, :]
            return np.maximum(d, 0).astype(np.float32)
        dot = q @ self.vectors.T  # float32 [q, s]
        if self.metric == "cos":
            dot /= np.maximum(np.sqrt(np.einsum("ij,ij->i", q, q)), 1e-30)[:, None]
        return np.subtract(1, dot, out=dot)


def _round_like(dtype: str, x: np.ndarray) -> np.ndarray:
    """``x`` (float32) rounded to the scalar type USearch converts queries to."""
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bf16":  # round to nearest even on the upper 16 bits
        u = np.ascontiguousarray(x).view(np.uint32)
        return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return x
