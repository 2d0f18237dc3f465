"""Neighbour sets: the precomputed retrieval a RETRO training loop reads.

For every chunk of a training corpus (the database's own documents, or other inputs
tokenized with the database's tokenizer) a neighbour set holds the ``k`` nearest keys of
the database, never from the chunk's own document nor from a listed document, ``-1``
where fewer exist. A set is tied to the generation it was computed for: opening it
against another generation raises :class:`StaleError`, and :meth:`NeighbourSet.refresh`
brings it up to date by searching only the segments added since and merging the top k.

On disk (see docs/neighbours.md)::

    DB/neighbours/<name>/
      CURRENT                 the committed version's directory name (replaced atomically)
      LOCK                    flock held while a version is being written
      <version>/              a Zarr v3 group of raw single-chunk arrays + neighbours.json
        neighbours.json       generation, segments searched, k, fingerprints, source, excludes
        keys [n, k] int64     nearest keys, best first, -1 = none
        distances [n, k] f32  cosine distances, inf where the key is -1
        continuations [n, k]  int64 key of each neighbour's continuation, -1 at a document end
        doc [n] int32         row -> document of this set (docs/ids)
        docs/ids, docs/first_row, docs/num_rows
        chunk_keys [n] int64  (source "db") the database key of each row: no tokens copied
        tokens [n, m], lengths [n], vectors [n, d] f16   (source "inputs")

Rows are in document order and a document's rows are contiguous. :class:`SequenceReader`
turns windows of rows into training batches with memory-mapped gathers only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np

from . import corpus as corpus_mod
from .chunking import chunk_documents
from .errors import (
    BadInputError,
    CorruptError,
    FormatVersionError,
    MismatchError,
    NotFoundError,
    StaleError,
)
from .progress import ProgressFn, no_progress
from .storage import (
    NEIGHBOURS,
    TMP_PREFIX,
    SegmentMeta,
    exclusive_lock,
    fsync_path,
    fsync_tree,
    open_raw_array,
    read_strings,
    write_array,
    write_atomic,
)

if TYPE_CHECKING:
    from .db import RetroDB, Segment

#: Version of the neighbour-set layout written by this code.
SET_FORMAT_VERSION = 1
META_FILE = "neighbours.json"
CURRENT_FILE = "CURRENT"
LOCK_FILE = "LOCK"
#: Older versions kept beside the current one, so that a reader that read CURRENT just
#: before a refresh can still map its arrays.
KEEP_OLD_VERSIONS = 1
#: Query chunks per search call.
DEFAULT_BATCH = 1024

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^\d{6,}-g\d+-[0-9a-f]+$")
Source = Literal["db", "inputs"]


# ---------------------------------------------------------------- metadata


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """A database segment a neighbour set has searched: its name and key range
    ``first_key .. first_key + chunks - 1`` (``chunks`` is the key span, which exceeds the
    row count of a compacted segment whose keys have gaps)."""

    name: str
    first_key: int
    chunks: int

    @property
    def stop_key(self) -> int:
        """One past the largest key of the range (``SegmentMeta.stop_key`` when written)."""
        return self.first_key + self.chunks


@dataclass(frozen=True, slots=True)
class NeighbourSetInfo:
    """What ``neighbours.json`` records about one version of a neighbour set."""

    name: str
    version: str
    """The version directory's name."""
    k: int
    generation: int
    """The database generation the set matches."""
    source: Source
    """``db``: the rows are the database's own live chunks; ``inputs``: other documents."""
    inputs: tuple[str, ...]
    segments: tuple[SegmentRef, ...]
    """Every segment whose keys the set has searched (all live segments of ``generation``)."""
    exclude: tuple[str, ...]
    """Document ids never returned as neighbours (besides each chunk's own document)."""
    tokenizer_fingerprint: str
    encoder_fingerprint: str
    chunk_size: int
    dim: int
    rows: int
    documents: int
    exact: bool
    created: float = field(default_factory=time.time)
    refreshed_from: int | None = None
    """The generation of the version this one was refreshed from (None: a full compute)."""
    searched: tuple[str, ...] = ()
    """The segments searched to make this version (all of them for a full compute)."""
    format_version: int = SET_FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format": "retrodb-neighbours", **d}
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str) -> NeighbourSetInfo:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorruptError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(d, dict) or d.pop("format", None) != "retrodb-neighbours":
            raise CorruptError(f"{where}: not a retrodb neighbour set description")
        version = d.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= SET_FORMAT_VERSION:
            raise FormatVersionError(
                f"{where}: neighbour-set format version {version!r}; this retrodb reads "
                f"1..{SET_FORMAT_VERSION} (upgrade retrodb)"
            )
        try:
            d["segments"] = tuple(SegmentRef(**s) for s in d["segments"])
            for key in ("inputs", "exclude", "searched"):
                d[key] = tuple(d.get(key, ()))
            return cls(**d)
        except (KeyError, TypeError) as exc:
            raise CorruptError(f"{where}: missing or unknown field ({exc})") from exc


# ---------------------------------------------------------------- the set


class NeighbourSet:
    """One committed version of a neighbour set, read through memory maps.

    >>> ns = NeighbourSet.compute(db, "train", k=2)            # doctest: +SKIP
    >>> ns.keys.shape                                          # doctest: +SKIP
    (41230, 2)
    >>> NeighbourSet.open(db, "train")                         # doctest: +SKIP
    StaleError: ... run `retrodb neighbours DB train --refresh`
    """

    def __init__(self, directory: Path, info: NeighbourSetInfo) -> None:
        self.dir = directory
        self.info = info

    def __repr__(self) -> str:
        i = self.info
        return (
            f"NeighbourSet({i.name!r}, rows={i.rows}, k={i.k}, generation={i.generation}, "
            f"source={i.source!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"dir": self.dir, "info": self.info}  # never pickle the maps

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.dir, self.info = state["dir"], state["info"]

    # -------------------------------------------------------- opening

    @classmethod
    def open(cls, db: RetroDB, name: str, *, allow_stale: bool = False) -> NeighbourSet:
        """Open the committed version of set ``name`` of ``db``.

        Raises :class:`StaleError` when it was computed for another generation than
        ``db``'s (unless ``allow_stale``) and :class:`MismatchError` when the tokenizer
        or encoder differ."""
        root = _set_root(db, name)
        cur = root / CURRENT_FILE
        try:
            version = cur.read_text().strip()
        except FileNotFoundError as exc:
            raise NotFoundError(
                f"{root}: no neighbour set named {name!r} (make one with "
                f"`retrodb neighbours {db.path} {name}`)"
            ) from exc
        directory = root / version
        meta = directory / META_FILE
        try:
            text = meta.read_text()
        except FileNotFoundError as exc:
            raise CorruptError(f"{meta}: missing (named by {cur})") from exc
        ns = cls(directory, NeighbourSetInfo.from_json(text, where=str(meta)))
        ns.check(db, allow_stale=allow_stale)
        return ns

    def check(self, db: RetroDB, *, allow_stale: bool = False) -> None:
        """Refuse a set made with another tokenizer or encoder, or (unless ``allow_stale``)
        for another generation."""
        i = self.info
        if i.tokenizer_fingerprint != db.manifest.tokenizer["fingerprint"]:
            raise MismatchError(f"{self.dir}: made with another tokenizer than {db.path}'s")
        if i.encoder_fingerprint != db.manifest.encoder["fingerprint"]:
            raise MismatchError(f"{self.dir}: made with another encoder than {db.path}'s")
        if i.chunk_size != db.chunk_size:
            raise MismatchError(f"{self.dir}: chunk size {i.chunk_size}, database {db.chunk_size}")
        if allow_stale or i.generation == db.generation:
            return
        if i.generation > db.generation:
            raise StaleError(
                f"neighbour set {i.name!r} matches generation {i.generation}, newer than the "
                f"opened database (generation {db.generation}); reopen the database"
            )
        raise StaleError(
            f"neighbour set {i.name!r} was computed for generation {i.generation} but "
            f"{db.path} is at generation {db.generation} ({_what_changed(self, db)}); run "
            f"`retrodb neighbours {db.path} {i.name} --refresh` to update it"
        )

    def is_stale(self, db: RetroDB) -> bool:
        return self.info.generation != db.generation

    # -------------------------------------------------------- arrays (memory maps)

    def _array(self, name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        return open_raw_array(
            self.dir / name, dtype=None if dtype is None else np.dtype(dtype), shape=shape
        )

    @cached_property
    def keys(self) -> np.ndarray:
        """``[n, k]`` int64: nearest database keys of each row, best first, -1 = none."""
        return self._array("keys", np.int64, (self.info.rows, self.info.k))

    @cached_property
    def distances(self) -> np.ndarray:
        """``[n, k]`` float32 cosine distances (inf where the key is -1)."""
        return self._array("distances", np.float32, (self.info.rows, self.info.k))

    @cached_property
    def continuations(self) -> np.ndarray:
        """``[n, k]`` int64: the key of each neighbour's continuation (the next chunk of its
        document), -1 at a document's end or where the key is -1."""
        return self._array("continuations", np.int64, (self.info.rows, self.info.k))

    @cached_property
    def doc(self) -> np.ndarray:
        """``[n]`` int32: the document (index into :attr:`doc_ids`) of each row."""
        return self._array("doc", np.int32, (self.info.rows,))

    @cached_property
    def first_row(self) -> np.ndarray:
        return self._array("docs/first_row", np.int64, (self.info.documents,))

    @cached_property
    def num_rows(self) -> np.ndarray:
        return self._array("docs/num_rows", np.int32, (self.info.documents,))

    @cached_property
    def doc_ids(self) -> list[str]:
        ids = read_strings(self.dir / "docs" / "ids")
        if len(ids) != self.info.documents:
            raise CorruptError(
                f"{self.dir / 'docs' / 'ids'}: {len(ids)} ids, expected {self.info.documents}"
            )
        return ids

    @cached_property
    def chunk_keys(self) -> np.ndarray:
        """``[n]`` int64 (source ``db``): the database key of each row."""
        self._need("db", "chunk_keys")
        return self._array("chunk_keys", np.int64, (self.info.rows,))

    @cached_property
    def tokens(self) -> np.ndarray:
        """``[n, m]`` (source ``inputs``): the rows' tokens, padded."""
        self._need("inputs", "tokens")
        return self._array("tokens", None, (self.info.rows, self.info.chunk_size))

    @cached_property
    def lengths(self) -> np.ndarray:
        """``[n]`` int32 (source ``inputs``): real tokens of each row."""
        self._need("inputs", "lengths")
        return self._array("lengths", np.int32, (self.info.rows,))

    @cached_property
    def vectors(self) -> np.ndarray:
        """``[n, d]`` float16 (source ``inputs``): the rows' encoder keys, kept for refresh."""
        self._need("inputs", "vectors")
        return self._array("vectors", np.float16, (self.info.rows, self.info.dim))

    def _need(self, source: str, what: str) -> None:
        if self.info.source != source:
            raise BadInputError(f"{what} exists only in sets of source {source!r}")

    def row_tokens(self, db: RetroDB, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[..., m]`` (int64) and lengths of ``rows``, whatever the source."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.info.source == "db":
            return db.chunks(self.chunk_keys[rows])
        return self.tokens[rows].astype(np.int64), self.lengths[rows]

    # -------------------------------------------------------- writing

    @classmethod
    def compute(
        cls,
        db: RetroDB,
        name: str,
        *,
        inputs: Sequence[str | Path] | None = None,
        k: int = 2,
        exclude_docs: Iterable[str] = (),
        exact: bool = False,
        batch_size: int = DEFAULT_BATCH,
        errors: corpus_mod.Errors = "strict",
        stdin: BinaryIO | None = None,
        progress: ProgressFn = no_progress,
    ) -> NeighbourSet:
        """Compute set ``name`` for ``db``'s generation (replacing any earlier version).

        ``inputs``: documents to compute neighbours for (tokenized with the database's
        tokenizer and encoded with its encoder); default: the database's own live chunks,
        whose stored index vectors are reused (nothing is re-encoded). ``exclude_docs``:
        document ids never returned as neighbours. ``exact``: brute-force search."""
        _check_name(name)
        if not isinstance(k, int | np.integer) or k <= 0:
            raise BadInputError(f"k must be a positive integer, got {k!r}")
        if batch_size <= 0:
            raise BadInputError(f"batch_size must be positive, got {batch_size}")
        exclude = tuple(dict.fromkeys(exclude_docs))
        with _set_lock(db, name):
            if inputs:
                rows = _input_rows(db, inputs, errors=errors, stdin=stdin, progress=progress)
            else:
                rows = _db_rows(db)
            if rows.n == 0:
                raise BadInputError("no chunks to compute neighbours for (all documents deleted)")
            search = _Searcher(db, rows, exclude=exclude, k=int(k), exact=exact)
            keys, dist = search.run(
                np.arange(rows.n), list(range(len(db.segments))), batch_size, progress
            )
            info = _info(
                db,
                name,
                rows,
                k=int(k),
                exclude=exclude,
                exact=exact,
                inputs=tuple(str(p) for p in inputs or ()),
            )
            return _commit(db, info, rows, keys, dist)

    @classmethod
    def refresh(
        cls,
        db: RetroDB,
        name: str,
        *,
        batch_size: int = DEFAULT_BATCH,
        exact: bool | None = None,
        progress: ProgressFn = no_progress,
    ) -> NeighbourSet:
        """Bring set ``name`` up to ``db``'s generation without a full recompute.

        Only the segments added since are searched, and their top k merged with the
        stored top k. Neighbours from documents deleted since are dropped, and the rows
        that lost one are searched again in full. For a set of the database's own
        documents, rows of new documents are added and rows of deleted ones removed.
        With exact search the result equals a full recompute."""
        with _set_lock(db, name):
            old = cls.open(db, name, allow_stale=True)
            if not old.is_stale(db):
                return old
            if old.info.generation > db.generation:
                old.check(db)  # raises: the database object is older than the set
            i = old.info
            exact = i.exact if exact is None else exact
            if old.info.source == "db":
                rows = _db_rows(db)
                now = rows.chunk_keys
                assert now is not None
                # Old rows by key (both are in key order); new keys are new rows.
                prev = np.minimum(np.searchsorted(old.chunk_keys, now), i.rows - 1)
                found = old.chunk_keys[prev] == now
            else:
                rows = _Rows.from_set(old)
                prev = np.arange(rows.n)
                found = np.ones(rows.n, dtype=bool)
            if rows.n == 0:
                raise BadInputError("no chunks left to compute neighbours for")
            keys = np.full((rows.n, i.k), -1, np.int64)
            dist = np.full((rows.n, i.k), np.inf, np.float32)
            keys[found] = old.keys[prev[found]]
            dist[found] = old.distances[prev[found]]
            # Neighbours whose document was deleted (or whose key is gone) since.
            seg, _ = db.locate(keys)
            gone = (keys >= 0) & ((seg < 0) | db.deleted_mask(keys))
            full = ~found | gone.any(axis=1)
            covered = _KeyRanges(i.segments)
            new_segments = [
                si
                for si, s in enumerate(db.segments)
                if covered.count(s.meta.first_key, _span(s.meta)) < _span(s.meta)
            ]
            partial = any(
                covered.count(db.segments[si].meta.first_key, _span(db.segments[si].meta)) > 0
                for si in new_segments
            )
            search = _Searcher(db, rows, exclude=i.exclude, k=i.k, exact=exact)
            todo_full = np.nonzero(full)[0]
            todo_new = np.nonzero(~full)[0] if new_segments else np.zeros(0, np.int64)
            total = todo_full.size + todo_new.size
            if todo_full.size:
                kf, df = search.run(
                    todo_full, list(range(len(db.segments))), batch_size, progress, total=total
                )
                keys[todo_full], dist[todo_full] = kf, df
            if todo_new.size:
                kn, dn = search.run(
                    todo_new,
                    new_segments,
                    batch_size,
                    progress,
                    done=todo_full.size,
                    total=total,
                    skip_keys=covered if partial else None,
                )
                keys[todo_new], dist[todo_new] = _merge_top(
                    keys[todo_new], dist[todo_new], kn, dn, i.k
                )
            info = _info(
                db,
                name,
                rows,
                k=i.k,
                exclude=i.exclude,
                exact=exact,
                inputs=i.inputs,
                refreshed_from=i.generation,
                searched=tuple(db.segments[s].meta.name for s in new_segments),
            )
            return _commit(db, info, rows, keys, dist)


def list_sets(db: RetroDB) -> list[NeighbourSetInfo]:
    """Every neighbour set of ``db`` (stale or not), by name."""
    out: list[NeighbourSetInfo] = []
    root = db.path / NEIGHBOURS
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if (d / CURRENT_FILE).is_file():
            out.append(NeighbourSet.open(db, d.name, allow_stale=True).info)
    return out


def delete_set(db: RetroDB, name: str) -> None:
    """Remove neighbour set ``name`` and all its versions."""
    root = _set_root(db, name)
    if not (root / CURRENT_FILE).exists():
        raise NotFoundError(f"{root}: no neighbour set named {name!r}")
    with _set_lock(db, name):
        (root / CURRENT_FILE).unlink()
        fsync_path(root)
        for p in root.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name != LOCK_FILE:
                p.unlink()
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- training reads


class SequenceReader:
    """Training sequences of ``seq_len`` tokens from a neighbour set, with their neighbours.

    A sequence is ``seq_len // m`` consecutive rows (chunks) of one document, plus the
    token after them: a window. :meth:`windows` tiles every chosen document into windows
    (the last one of a document may be short and is padded); :meth:`read` assembles a
    batch of windows with memory-mapped gathers only. The reader pins the segments of the
    generation the set was checked against; it pickles without its maps and reopens them
    on first use in each process (DataLoader workers)."""

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
        self.seq_len = seq_len
        self.chunk_size = m
        self.chunks_per_seq = seq_len // m
        self.k = k
        self.pad_id = db.pad_id
        self._segments: tuple[tuple[str, SegmentMeta], ...] = tuple(
            (str(s.dir), s.meta) for s in db.segments
        )
        self._token_dtype = db.token_dtype
        self._maps: _Maps | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = {s: getattr(self, s) for s in self.__dict__ if s != "_maps"}
        state["_maps"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def reopen(self) -> None:
        """Drop the maps (they are opened again on next use), e.g. in a fresh worker."""
        self._maps = None

    @property
    def maps(self) -> _Maps:
        if self._maps is None:
            self._maps = _Maps.open(self)
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
        mp = self.maps
        start = np.asarray(start, dtype=np.int64).reshape(-1)
        end = np.asarray(end, dtype=np.int64).reshape(-1)
        b, c, m, k = start.size, self.chunks_per_seq, self.chunk_size, self.k
        rows = start[:, None] + np.arange(c + 1)  # (B, c+1): the window and the next row
        valid = rows < end[:, None]
        partial = not valid.all()
        if partial:
            rows = np.where(valid, rows, start[:, None])  # in range; masked out below
        wrows = rows[:, :c]
        # np.take: the same gather as fancy indexing, with less overhead on small batches
        pairs = np.stack(  # (B, c, k, 2): each neighbour's key, then its continuation's
            [np.take(mp.keys, wrows, axis=0), np.take(mp.continuations, wrows, axis=0)], axis=-1
        )[:, :, :k]
        if partial:
            pairs[~valid[:, :c]] = -1
        nkeys = np.ascontiguousarray(pairs[..., 0])
        if mp.chunk_keys is not None:  # source "db": the rows are database keys
            own = np.take(mp.chunk_keys, rows)
            if partial:
                own[~valid] = -1
            toks, lens = mp.gather(np.concatenate([own.reshape(-1), pairs.reshape(-1)]))
            own_toks, own_lens = toks[: own.size], lens[: own.size]
            toks, lens = toks[own.size :], lens[own.size :]
        else:
            assert mp.tokens is not None and mp.lengths is not None
            own_toks = np.take(mp.tokens, rows, axis=0).astype(np.int64)
            own_lens = np.take(mp.lengths, rows)
            if partial:
                own_toks[~valid] = self.pad_id
                own_lens[~valid] = 0
            toks, lens = mp.gather(pairs.reshape(-1))
        retrieved = toks.reshape(b, c, k, 2 * m)
        rmask = np.take(mp.mask_rows, lens, axis=0).reshape(b, c, k, 2 * m)
        tokens = np.ascontiguousarray(own_toks.reshape(b, (c + 1) * m)[:, : c * m + 1])
        tmask = np.take(mp.mask_rows, own_lens, axis=0).reshape(b, (c + 1) * m)[:, : c * m + 1]
        tmask = np.ascontiguousarray(tmask)
        targets = np.where(tmask[:, 1:], tokens[:, 1:], -100)
        return {
            "tokens": tokens,
            "token_mask": tmask,
            "targets": targets,
            "retrieved": retrieved,
            "retrieved_mask": rmask,
            "neighbours": nkeys,
        }


def _plain(a: np.ndarray) -> np.ndarray:
    """A plain ndarray view of a memory map (indexing it skips np.memmap's Python layer)."""
    return a.view(np.ndarray) if isinstance(a, np.memmap) else a


@dataclass
class _Maps:
    """The memory maps one process reads batches from."""

    keys: np.ndarray
    continuations: np.ndarray
    chunk_keys: np.ndarray | None
    tokens: np.ndarray | None
    lengths: np.ndarray | None
    seg_tokens: list[np.ndarray]
    seg_lengths: list[np.ndarray]
    first_keys: np.ndarray
    segments: list[Segment]
    """The :class:`~retrodb.db.Segment` of each entry: ``key_rows`` maps keys to rows
    (a lookup in a compacted segment, whose keys have gaps)."""
    pad_id: int
    chunk_size: int

    @classmethod
    def open(cls, r: SequenceReader) -> _Maps:
        from .db import Segment  # the one place that knows a segment's arrays

        segs = [Segment(Path(d), meta, r.chunk_size, r._token_dtype) for d, meta in r._segments]
        for s in segs:
            if s.key_array is not None:  # key_rows searches it: skip np.memmap's Python layer
                s.key_array = _plain(s.key_array)
        ns = NeighbourSet(r.nset.dir, r.nset.info)  # fresh maps in this process
        db_source = ns.info.source == "db"
        return cls(
            keys=_plain(ns.keys),
            continuations=_plain(ns.continuations),
            chunk_keys=_plain(ns.chunk_keys) if db_source else None,
            tokens=None if db_source else _plain(ns.tokens),
            lengths=None if db_source else _plain(ns.lengths),
            seg_tokens=[_plain(s.tokens) for s in segs],
            seg_lengths=[_plain(s.lengths) for s in segs],
            first_keys=np.array([s.meta.first_key for s in segs], dtype=np.int64),
            segments=segs,
            pad_id=r.pad_id,
            chunk_size=r.chunk_size,
        )

    def gather(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[n, m]`` int64 and lengths ``[n]`` of keys; -1 gives padding, length 0.

        The keys come from a set checked against this generation; a key that its segment
        does not hold raises IndexError rather than read another row."""
        if self.first_keys.size == 1 and self.segments[0].key_array is None:
            ok = keys >= self.first_keys[0]  # False for -1
            row = np.where(ok, keys - self.first_keys[0], 0)
            toks = np.take(self.seg_tokens[0], row, axis=0).astype(np.int64)
            lens = np.take(self.seg_lengths[0], row)
            if not ok.all():
                bad = ~ok
                toks[bad] = self.pad_id
                lens[bad] = 0
            return toks, lens
        seg = np.searchsorted(self.first_keys, keys, side="right") - 1
        toks = np.full((keys.size, self.chunk_size), self.pad_id, np.int64)
        lens = np.zeros(keys.size, np.int32)
        for si in range(self.first_keys.size):
            sel = np.nonzero(seg == si)[0]  # -1 keys fall before every segment
            if sel.size:
                r = self.segments[si].key_rows(keys[sel])  # compacted: keys with gaps
                if (r < 0).any():
                    raise IndexError("a neighbour key is not in its segment")
                toks[sel] = np.take(self.seg_tokens[si], r, axis=0)
                lens[sel] = np.take(self.seg_lengths[si], r)
        return toks, lens

    @cached_property
    def mask_rows(self) -> np.ndarray:
        """``[m + 1, m]`` bool: row n is True on its first n positions (mask = table[lengths])."""
        m = self.chunk_size
        return np.arange(m + 1)[:, None] > np.arange(m)[None, :]


# ---------------------------------------------------------------- computing


@dataclass(slots=True)
class _Rows:
    """The query rows of a set being written, with their documents."""

    doc_ids: list[str]
    doc: np.ndarray  # [n] int32, index into doc_ids
    chunk_keys: np.ndarray | None = None  # source "db"
    tokens: np.ndarray | None = None  # source "inputs"
    lengths: np.ndarray | None = None
    vectors: np.ndarray | None = None  # [n, d] float16

    @property
    def n(self) -> int:
        return int(self.doc.shape[0])

    @property
    def source(self) -> Source:
        return "db" if self.chunk_keys is not None else "inputs"

    @classmethod
    def from_set(cls, ns: NeighbourSet) -> _Rows:
        return cls(
            doc_ids=ns.doc_ids,
            doc=np.asarray(ns.doc),
            tokens=np.asarray(ns.tokens),
            lengths=np.asarray(ns.lengths),
            vectors=np.asarray(ns.vectors),
        )


def _db_rows(db: RetroDB) -> _Rows:
    """Every live chunk of the database, in key order."""
    dead = set(db.manifest.tombstones)
    ids: list[str] = []
    keys: list[np.ndarray] = []
    docs: list[np.ndarray] = []
    for seg in db.segments:
        live = np.array([i not in dead for i in seg.ids], dtype=bool)
        number = np.cumsum(live) - 1 + len(ids)  # live document -> its index in this set
        seg_doc = np.asarray(seg.doc)
        sel = np.nonzero(live[seg_doc])[0]
        keys.append(seg.row_keys(sel.astype(np.int64)))
        docs.append(number[seg_doc[sel]].astype(np.int32))
        ids += [i for i, ok in zip(seg.ids, live, strict=True) if ok]
    return _Rows(
        doc_ids=ids,
        doc=np.concatenate(docs) if docs else np.zeros(0, np.int32),
        chunk_keys=np.concatenate(keys) if keys else np.zeros(0, np.int64),
    )


def _input_rows(
    db: RetroDB,
    inputs: Sequence[str | Path],
    *,
    errors: corpus_mod.Errors,
    stdin: BinaryIO | None,
    progress: ProgressFn,
) -> _Rows:
    """Tokenize, chunk and encode other documents the way the database's own were."""
    corpus = corpus_mod.scan(inputs, errors=errors, stdin=stdin)
    try:
        ids: list[str] = []
        texts: list[str] = []
        for doc_id, text in corpus.iter_documents():
            ids.append(doc_id)
            texts.append(text)
    finally:
        corpus.cleanup()
    tok = db.tokenizer
    assert tok is not None  # RetroDB refuses to open without one
    progress("tokenize", 0, len(ids))
    token_lists = tok.encode(texts)
    progress("tokenize", len(ids), len(ids))
    del texts
    chunks, lengths, doc = chunk_documents(
        token_lists, db.chunk_size, pad_id=db.pad_id, dtype=db.token_dtype
    )
    vectors = db.encode_chunks(chunks, lengths, progress=progress)
    return _Rows(
        doc_ids=ids,
        doc=doc.astype(np.int32),
        tokens=chunks,
        lengths=lengths.astype(np.int32),
        vectors=vectors.astype(np.float16),
    )


def _span(meta: Any) -> int:
    """How many keys a segment's key range spans (its chunk count unless compacted with gaps)."""
    return int(meta.stop_key - meta.first_key)


class _KeyRanges:
    """The key ranges of segments a set has already searched."""

    def __init__(self, segments: Iterable[SegmentRef]) -> None:
        spans = sorted((s.first_key, s.stop_key) for s in segments)
        self.starts = np.array([a for a, _ in spans], dtype=np.int64)
        self.stops = np.array([b for _, b in spans], dtype=np.int64)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.starts, keys, side="right") - 1
        ok = i >= 0
        out = np.zeros(keys.shape, dtype=bool)
        out[ok] = keys[ok] < self.stops[i[ok]]
        return out

    def count(self, first: int, n: int) -> int:
        """How many of keys ``first .. first+n-1`` are covered."""
        lo = np.maximum(self.starts, first)
        hi = np.minimum(self.stops, first + n)
        return int(np.clip(hi - lo, 0, None).sum())


class _Searcher:
    """Batched, filtered search for the rows of a set."""

    def __init__(
        self, db: RetroDB, rows: _Rows, *, exclude: Sequence[str], k: int, exact: bool
    ) -> None:
        self.db, self.rows, self.k, self.exact = db, rows, k, exact
        index = db.doc_index()
        offsets = np.cumsum([0] + [s.meta.documents for s in db.segments])
        n_docs = int(offsets[-1])

        def number(doc_id: str) -> int:
            si, di = index[doc_id]
            return int(offsets[si] + di)

        self.excluded = np.zeros(n_docs + 1, dtype=bool)  # the last slot: "no document"
        self.excluded[[number(d) for d in exclude if d in index]] = True
        if rows.source == "inputs":
            # An input document that is also in the database is its own document there.
            per_doc = np.array(
                [number(d) if d in index else -1 for d in rows.doc_ids], dtype=np.int64
            )
            self.own_doc: np.ndarray | None = per_doc[rows.doc] if rows.n else per_doc
        else:
            self.own_doc = None

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        if self.rows.vectors is not None:
            return self.rows.vectors[rows].astype(np.float32)
        assert self.rows.chunk_keys is not None
        keys = self.rows.chunk_keys[rows]
        seg, _ = self.db.locate(keys)
        out = np.empty((keys.size, self.db.dim), np.float32)
        for si in np.unique(seg):
            sel = np.nonzero(seg == si)[0]
            out[sel] = self.db.indexes[int(si)].vectors(keys[sel])
        return out

    def run(
        self,
        rows: np.ndarray,
        segments: list[int],
        batch_size: int,
        progress: ProgressFn,
        *,
        done: int = 0,
        total: int | None = None,
        skip_keys: _KeyRanges | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k of ``rows`` in ``segments``; ``skip_keys``: keys never to return."""
        total = rows.size if total is None else total
        keys = np.full((rows.size, self.k), -1, np.int64)
        dist = np.full((rows.size, self.k), np.inf, np.float32)
        progress("neighbours", done, total)
        for a in range(0, rows.size, batch_size):
            b = min(rows.size, a + batch_size)
            batch = rows[a:b]
            if self.own_doc is None:
                own = self.db.key_doc_numbers(self.rows.chunk_keys[batch])  # type: ignore[index]
            else:
                own = self.own_doc[batch]

            def keep(q: np.ndarray, cand: np.ndarray, own: np.ndarray = own) -> np.ndarray:
                cd = self.db.key_doc_numbers(cand)
                ok = (cd != own[q]) & ~self.excluded[cd]  # cd = -1 reads the last slot
                if skip_keys is not None:
                    ok &= ~skip_keys.contains(cand)
                return ok

            res = self.db.search_vectors(
                self.vectors(batch), self.k, exact=self.exact, keep=keep, segments=segments
            )
            keys[a:b], dist[a:b] = res.keys, res.distances
            progress("neighbours", done + b, total)
        return keys, dist


def _merge_top(
    k1: np.ndarray, d1: np.ndarray, k2: np.ndarray, d2: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    keys = np.concatenate([k1, k2], axis=1)
    dist = np.concatenate([d1, d2], axis=1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(keys, order, axis=1), np.take_along_axis(dist, order, axis=1)


def _info(
    db: RetroDB,
    name: str,
    rows: _Rows,
    *,
    k: int,
    exclude: tuple[str, ...],
    exact: bool,
    inputs: tuple[str, ...],
    refreshed_from: int | None = None,
    searched: tuple[str, ...] | None = None,
) -> NeighbourSetInfo:
    segs = tuple(SegmentRef(s.meta.name, s.meta.first_key, _span(s.meta)) for s in db.segments)
    return NeighbourSetInfo(
        name=name,
        version="",  # set by _commit
        k=k,
        generation=db.generation,
        source=rows.source,
        inputs=inputs,
        segments=segs,
        exclude=exclude,
        tokenizer_fingerprint=db.manifest.tokenizer["fingerprint"],
        encoder_fingerprint=db.manifest.encoder["fingerprint"],
        chunk_size=db.chunk_size,
        dim=db.dim,
        rows=rows.n,
        documents=len(rows.doc_ids),
        exact=exact,
        refreshed_from=refreshed_from,
        searched=tuple(s.name for s in segs) if searched is None else searched,
    )


def _commit(
    db: RetroDB, info: NeighbourSetInfo, rows: _Rows, keys: np.ndarray, dist: np.ndarray
) -> NeighbourSet:
    """Write a new version in a temporary directory, fsync, rename, then point CURRENT at it."""
    root = _set_root(db, info.name)
    info = replace(info, version=_next_version(root, info.generation))
    tmp = root / f"{TMP_PREFIX}{info.version}"
    try:
        tmp.mkdir()
        write_array(tmp, "keys", np.ascontiguousarray(keys, dtype=np.int64))
        write_array(tmp, "distances", np.ascontiguousarray(dist, dtype=np.float32))
        write_array(tmp, "continuations", db.continuation_keys(keys))
        write_array(tmp, "doc", rows.doc.astype(np.int32))
        num = np.bincount(rows.doc, minlength=len(rows.doc_ids)).astype(np.int32)
        first = (np.cumsum(num, dtype=np.int64) - num).astype(np.int64)
        write_array(tmp, "docs/ids", np.array(rows.doc_ids, dtype=object))
        write_array(tmp, "docs/first_row", first)
        write_array(tmp, "docs/num_rows", num)
        if rows.chunk_keys is not None:
            write_array(tmp, "chunk_keys", rows.chunk_keys.astype(np.int64))
        else:
            assert rows.tokens is not None and rows.lengths is not None
            assert rows.vectors is not None
            write_array(tmp, "tokens", np.ascontiguousarray(rows.tokens))
            write_array(tmp, "lengths", rows.lengths.astype(np.int32))
            write_array(tmp, "vectors", np.ascontiguousarray(rows.vectors, dtype=np.float16))
        (tmp / META_FILE).write_text(info.to_json())
        fsync_tree(tmp)
        final = root / info.version
        os.rename(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(root / CURRENT_FILE, (info.version + "\n").encode())
    _remove_old_versions(root, info.version)
    return NeighbourSet(final, info)


def _versions(root: Path) -> list[Path]:
    """Committed version directories, oldest first (names start with a sequence number)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))


def _next_version(root: Path, generation: int) -> str:
    last = _versions(root)
    seq = int(last[-1].name.split("-")[0]) + 1 if last else 1
    return f"{seq:06d}-g{generation}-{secrets.token_hex(3)}"


def _remove_old_versions(root: Path, current: str) -> None:
    old = [p for p in _versions(root) if p.name != current]
    for p in old[: max(0, len(old) - KEEP_OLD_VERSIONS)]:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- helpers


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise BadInputError(
            f"bad neighbour set name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _set_root(db: RetroDB, name: str) -> Path:
    _check_name(name)
    return db.path / NEIGHBOURS / name


@contextlib.contextmanager
def _set_lock(db: RetroDB, name: str) -> Iterator[None]:
    """The single-writer lock of one set; removes what an interrupted writer left."""
    root = _set_root(db, name)
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(
        root / LOCK_FILE, f"{root}: another process is writing neighbour set {name!r}"
    ):
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
        yield


def _what_changed(ns: NeighbourSet, db: RetroDB) -> str:
    had = {s.name for s in ns.info.segments}
    new = [s for s in db.segments if s.meta.name not in had]
    parts = []
    if new:
        parts.append(f"{len(new)} segment(s) added")
    if len(db.manifest.tombstones):
        parts.append(f"{len(db.manifest.tombstones)} deleted document(s)")
    return ", ".join(parts) or "the database changed"


def read_id_file(path: str | Path) -> list[str]:
    """Document ids from a text file: one per line; blank lines and ``#`` comments ignored."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise NotFoundError(f"{p}: no such file") from exc
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{p}: not UTF-8 text") from exc
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


__all__ = [
    "NeighbourSet",
    "NeighbourSetInfo",
    "SegmentRef",
    "SequenceReader",
    "delete_set",
    "list_sets",
    "read_id_file",
]
