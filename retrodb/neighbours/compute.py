"""Computing and refreshing neighbour sets.

For every chunk of a training corpus (the database's own live chunks, or other inputs
tokenized and encoded the way the database's own were) a set holds the ``k`` nearest
keys of the database, never from a listed document and, by the paper's rule, never from
the chunk's own document. ``self_share`` relaxes that rule for a stable-hashed share of
the documents: their chunks may retrieve their own document (their own continuation
among them), so a model trained on the set sees neighbours worth copying as well as
neighbours that are not, and learns when to trust them.

``rerank="overlap"`` searches ``fetch * k`` dense candidates under the same rules and
keeps the k that share the longest token run with the row's chunk (:mod:`retrodb.rerank`).

A refresh searches only the segments added since the set's generation and merges the top
k; rows that lost a neighbour to a deletion are searched again in full. A re-ranked top k
does not merge by distance, so every row of a re-ranked set is searched again in full.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, Protocol

import numpy as np

from .. import corpus as corpus_mod
from ..chunking import chunk_documents
from ..errors import BadInputError
from ..progress import ProgressFn, no_progress
from ..rerank import candidate_tokens, check_rerank, padded, rerank_keys, resolve_fetch
from ..search import Exclusion, check_k, merge_top
from ..split import split_value
from .store import (
    NeighbourSet,
    NeighbourSetInfo,
    Rows,
    SegmentRef,
    check_name,
    set_lock,
    write_version,
)

if TYPE_CHECKING:
    from ..db import RetroDB
    from ..snapshot import Snapshot
    from ..storage import SegmentMeta

#: Query chunks per search call.
DEFAULT_BATCH = 1024
#: The hash seed that picks the self-share documents (independent of the train/validation
#: split, which uses seed 0).
SELF_SHARE_SEED = 7


def self_share_mask(doc_ids: Iterable[str], share: float) -> np.ndarray:
    """True for the documents (a stable share ``share`` of them, by a hash of the id) whose
    chunks may retrieve their own document."""
    if not 0.0 <= share <= 1.0:
        raise BadInputError(f"self_share must be in [0, 1], got {share}")
    return np.array([split_value(d, seed=SELF_SHARE_SEED) < share for d in doc_ids], dtype=bool)


def _rows_of_inputs(
    db: RetroDB,
    inputs: Sequence[str | Path],
    *,
    errors: corpus_mod.Errors,
    stdin: BinaryIO | None,
    progress: ProgressFn,
) -> Rows:
    """Rows of other documents, tokenized, chunked and encoded the way the database's own
    were."""
    corpus = corpus_mod.scan(inputs, errors=errors, stdin=stdin)
    try:
        ids, texts = [], []
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
    return Rows(
        doc_ids=ids,
        doc=doc.astype(np.int32),
        tokens=chunks,
        lengths=lengths.astype(np.int32),
        vectors=vectors.astype(np.float16),
    )


def _query_tokens(snap: Snapshot, rows: Rows, idx: np.ndarray) -> np.ndarray:
    """The tokens ``[len(idx), m]`` of rows ``idx``, padding as -1 (for re-ranking)."""
    if rows.chunk_keys is not None:
        toks, lengths = snap.chunks(rows.chunk_keys[idx])
    else:
        assert rows.tokens is not None and rows.lengths is not None
        toks, lengths = rows.tokens[idx], rows.lengths[idx]
    return padded(toks, snap.keymap.masks(lengths))


@dataclass(frozen=True)
class SearchRules:
    """What a set's rows may retrieve and how the k are chosen: recorded in the set's
    description, given to every :class:`Searcher` (local or on a worker)."""

    k: int
    exclude: tuple[str, ...] = ()
    exact: bool = False
    self_share: float = 0.0
    rerank: str = "none"
    fetch: int = 1

    @classmethod
    def of(cls, info: NeighbourSetInfo, *, exact: bool | None = None) -> SearchRules:
        """The rules a set was computed with (``exact`` overridden when given)."""
        return cls(
            k=info.k,
            exclude=tuple(info.exclude),
            exact=info.exact if exact is None else exact,
            self_share=info.self_share,
            rerank=info.rerank,
            fetch=info.fetch,
        )


@dataclass(frozen=True)
class SearchJob:
    """The top ``rules.k`` of every row of ``rows`` in ``snap``, searched in batches of
    ``batch_size`` rows by a :class:`Searcher` (here, or on a :class:`SearchEngine`)."""

    snap: Snapshot
    rows: Rows
    rules: SearchRules
    batch_size: int
    progress: ProgressFn = no_progress

    def run_here(self) -> tuple[np.ndarray, np.ndarray]:
        """The job in this process: keys and distances ``[rows.n, k]``."""
        segments = list(range(len(self.snap.segments)))
        search = Searcher(self.snap, self.rows, self.rules)
        return search.run(np.arange(self.rows.n), segments, self.batch_size, self.progress)


class SearchEngine(Protocol):
    """Runs a :class:`SearchJob` somewhere other than this process (see
    :class:`retrodb.ray_engine.RayEngine`), with the same :class:`Searcher` and batches."""

    def neighbours(self, job: SearchJob) -> tuple[np.ndarray, np.ndarray]:
        """What ``job.run_here()`` gives: keys and distances of every row."""
        ...


def _span(meta: SegmentMeta) -> int:
    """How many keys a segment's key range spans (its chunk count unless compacted with gaps)."""
    return int(meta.stop_key - meta.first_key)


class KeyRanges:
    """The key ranges of segments a set has already searched."""

    def __init__(self, segments: Iterable[SegmentRef]) -> None:
        spans = sorted((s.first_key, s.stop_key) for s in segments)
        self.starts = np.array([a for a, _ in spans], dtype=np.int64)
        self.stops = np.array([b for _, b in spans], dtype=np.int64)

    def count(self, first: int, n: int) -> int:
        """How many of keys ``first .. first+n-1`` are covered."""
        lo = np.maximum(self.starts, first)
        hi = np.minimum(self.stops, first + n)
        return int(np.clip(hi - lo, 0, None).sum())


class Searcher:
    """Batched, filtered search for the rows of a set; with ``rerank="overlap"``, the k of
    ``fetch * k`` candidates that share the longest token run with the row's chunk."""

    def __init__(self, snap: Snapshot, rows: Rows, rules: SearchRules) -> None:
        check_rerank(rules.rerank)
        self.snap, self.rows, self.rules = snap, rows, rules
        self.k = rules.k
        km = snap.keymap
        self.excluded = km.doc_table(rules.exclude)
        # Per row, the database document it may not retrieve (-2: none).
        per_doc = np.array(
            [n if n >= 0 else -2 for n in map(km.doc_number, rows.doc_ids)], dtype=np.int64
        ).reshape(-1)
        if rules.self_share > 0:
            per_doc[self_share_mask(rows.doc_ids, rules.self_share)] = -2
        self.own_doc = per_doc[rows.doc] if rows.n else per_doc

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        if self.rows.vectors is not None:
            return self.rows.vectors[rows].astype(np.float32)
        assert self.rows.chunk_keys is not None
        keys = self.rows.chunk_keys[rows]
        seg, _ = self.snap.locate(keys)
        out = np.empty((keys.size, self.snap.dim), np.float32)
        for si in np.unique(seg):
            sel = np.nonzero(seg == si)[0]
            out[sel] = self.snap.indexes[int(si)].vectors(keys[sel])
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
        skip: KeyRanges | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k of ``rows`` in ``segments``; ``skip``: key ranges never to return."""
        total = rows.size if total is None else total
        keys = np.full((rows.size, self.k), -1, np.int64)
        dist = np.full((rows.size, self.k), np.inf, np.float32)
        progress("neighbours", done, total)
        for a in range(0, rows.size, batch_size):
            b = min(rows.size, a + batch_size)
            batch = rows[a:b]
            exclusion = Exclusion(
                own_doc=self.own_doc[batch],
                docs=self.excluded,
                skip_starts=None if skip is None else skip.starts,
                skip_stops=None if skip is None else skip.stops,
            )
            reranked = self.rules.rerank == "overlap"
            res = self.snap.search_vectors(
                self.vectors(batch),
                self.k * self.rules.fetch if reranked else self.k,
                exact=self.rules.exact,
                exclusion=exclusion,
                segments=segments,
            )
            if reranked:
                query = _query_tokens(self.snap, self.rows, batch)
                cands = candidate_tokens(self.snap, res.keys)
                keys[a:b], dist[a:b] = rerank_keys(query, res.keys, res.distances, cands, self.k)
            else:
                keys[a:b], dist[a:b] = res.keys, res.distances
            progress("neighbours", done + b, total)
        return keys, dist


def _info(
    db: RetroDB,
    name: str,
    rows: Rows,
    rules: SearchRules,
    *,
    inputs: tuple[str, ...],
    refreshed_from: int | None = None,
    searched: tuple[str, ...] | None = None,
) -> NeighbourSetInfo:
    segs = tuple(SegmentRef(s.meta.name, s.meta.first_key, _span(s.meta)) for s in db.segments)
    return NeighbourSetInfo(
        name=name,
        version="",  # set by write_version
        k=rules.k,
        generation=db.generation,
        source=rows.source,
        inputs=inputs,
        segments=segs,
        exclude=rules.exclude,
        tokenizer_fingerprint=db.manifest.tokenizer["fingerprint"],
        encoder_fingerprint=db.manifest.encoder["fingerprint"],
        chunk_size=db.chunk_size,
        dim=db.dim,
        rows=rows.n,
        documents=len(rows.doc_ids),
        exact=rules.exact,
        refreshed_from=refreshed_from,
        searched=tuple(s.name for s in segs) if searched is None else searched,
        self_share=float(rules.self_share),
        rerank=rules.rerank,
        fetch=rules.fetch,
    )


def compute(
    db: RetroDB,
    name: str,
    *,
    inputs: Sequence[str | Path] | None = None,
    k: int = 2,
    exclude_docs: Iterable[str] = (),
    exact: bool = False,
    self_share: float = 0.0,
    rerank: str = "none",
    fetch: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    errors: corpus_mod.Errors = "strict",
    stdin: BinaryIO | None = None,
    progress: ProgressFn = no_progress,
    engine: SearchEngine | None = None,
) -> NeighbourSet:
    """Compute set ``name`` for ``db``'s generation (replacing any earlier version).

    ``inputs``: documents to compute neighbours for (tokenized with the database's
    tokenizer and encoded with its encoder); default: the database's own live chunks,
    whose stored index vectors are reused (nothing is re-encoded). ``exclude_docs``:
    document ids never returned as neighbours. ``exact``: brute-force search.
    ``self_share``: the share of documents (stable hash of the id) whose chunks may
    retrieve their own document; 0 is the paper's rule for every document. ``rerank``:
    ``"overlap"`` keeps the k of ``fetch * k`` dense candidates (default 4 per neighbour,
    same rules) that share the longest token run with the row's chunk; ``"none"`` the dense
    top k. ``engine``: search elsewhere (e.g. ``RayEngine``); the set is committed here."""
    check_name(name)
    k = check_k(k)
    fetch = resolve_fetch(rerank, fetch)
    if batch_size <= 0:
        raise BadInputError(f"batch_size must be positive, got {batch_size}")
    self_share_mask([], self_share)  # validates the share
    rules = SearchRules(
        k=k,
        exclude=tuple(dict.fromkeys(exclude_docs)),
        exact=exact,
        self_share=float(self_share),
        rerank=rerank,
        fetch=fetch,
    )
    with set_lock(db, name):
        if inputs:
            rows = _rows_of_inputs(db, inputs, errors=errors, stdin=stdin, progress=progress)
        else:
            rows = Rows.of_database(db)
        if rows.n == 0:
            raise BadInputError("no chunks to compute neighbours for (all documents deleted)")
        job = SearchJob(db.snapshot, rows, rules, batch_size, progress)
        keys, dist = job.run_here() if engine is None else engine.neighbours(job)
        info = _info(db, name, rows, rules, inputs=tuple(str(p) for p in inputs or ()))
        return write_version(db, info, rows, keys, dist)


def _carry_over(db: RetroDB, old: NeighbourSet) -> tuple[Rows, np.ndarray, np.ndarray]:
    """The rows of the refreshed set, each row's row in ``old`` and whether it had one."""
    if old.info.source == "db":
        rows = Rows.of_database(db)
        now = rows.chunk_keys
        assert now is not None
        # Old rows by key (both are in key order); new keys are new rows.
        prev = np.minimum(np.searchsorted(old.chunk_keys, now), old.info.rows - 1)
        return rows, prev, old.chunk_keys[prev] == now
    rows = Rows.of_set(old)
    return rows, np.arange(rows.n), np.ones(rows.n, dtype=bool)


def refresh(
    db: RetroDB,
    name: str,
    *,
    batch_size: int = DEFAULT_BATCH,
    exact: bool | None = None,
    progress: ProgressFn = no_progress,
) -> NeighbourSet:
    """Bring set ``name`` up to ``db``'s generation without a full recompute.

    Only the segments added since are searched, and their top k merged with the stored
    top k. Neighbours from documents deleted since are dropped, and the rows that lost one
    are searched again in full. For a set of the database's own documents, rows of new
    documents are added and rows of deleted ones removed. A re-ranked set is searched
    again in full (its top k does not merge by distance). With exact search the result
    equals a full recompute."""
    with set_lock(db, name):
        old = NeighbourSet.open(db, name, allow_stale=True)
        if not old.is_stale(db):
            return old
        if old.info.generation > db.generation:
            old.check(db)  # raises: the database object is older than the set
        i = old.info
        rules = SearchRules.of(i, exact=exact)
        rows, prev, found = _carry_over(db, old)
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
        if i.rerank != "none":
            full[:] = True  # a re-ranked top k does not merge with new candidates by distance
        covered = KeyRanges(i.segments)
        spans = [(s.meta.first_key, _span(s.meta)) for s in db.segments]
        new_segments = [si for si, (a, n) in enumerate(spans) if covered.count(a, n) < n]
        partial = any(covered.count(*spans[si]) > 0 for si in new_segments)
        search = Searcher(db.snapshot, rows, rules)
        todo_full = np.nonzero(full)[0]
        todo_new = np.nonzero(~full)[0] if new_segments else np.zeros(0, np.int64)
        total = todo_full.size + todo_new.size
        if todo_full.size:
            every = list(range(len(db.segments)))
            kf, df = search.run(todo_full, every, batch_size, progress, total=total)
            keys[todo_full], dist[todo_full] = kf, df
        if todo_new.size:
            kn, dn = search.run(
                todo_new,
                new_segments,
                batch_size,
                progress,
                done=todo_full.size,
                total=total,
                skip=covered if partial else None,
            )
            keys[todo_new], dist[todo_new] = merge_top(
                [keys[todo_new], kn], [dist[todo_new], dn], i.k
            )
        # a re-ranked set searched every segment (None: all of them)
        searched = (
            None if i.rerank != "none" else tuple(db.segments[s].meta.name for s in new_segments)
        )
        info = _info(
            db, name, rows, rules, inputs=i.inputs, refreshed_from=i.generation, searched=searched
        )
        return write_version(db, info, rows, keys, dist)


@dataclass(frozen=True, slots=True)
class UpdateReport:
    """What :func:`update` did: ``how`` is ``computed``, ``refreshed`` or ``current``."""

    set: NeighbourSet
    how: Literal["computed", "refreshed", "current"]
    seconds: float
    unknown_excluded: int
    """Excluded ids that are not in the database (harmless, probably a typo)."""

    @property
    def info(self) -> NeighbourSetInfo:
        return self.set.info

    def summary(self) -> str:
        i = self.info
        if self.how == "current":
            how = "already current"
        elif self.how == "refreshed" and i.rerank != "none":
            how = f"refreshed from generation {i.refreshed_from}, every row re-ranked again"
        elif self.how == "refreshed":
            how = (
                f"refreshed from generation {i.refreshed_from}, "
                f"{corpus_mod.plural(len(i.searched), 'new segment')}"
            )
        else:
            how = f"{i.rows / max(self.seconds, 1e-9):,.0f} chunks/s"
        rows, docs = corpus_mod.plural(i.rows, "chunk"), corpus_mod.plural(i.documents, "document")
        k = f"k={i.k}" if i.rerank == "none" else f"k={i.k} of {i.k * i.fetch} by {i.rerank}"
        return f"neighbours {i.name}: {rows} of {docs}, {k}, generation {i.generation} ({how})"


def update(
    db: RetroDB,
    name: str,
    *,
    refresh_only: bool = False,
    inputs: Sequence[str | Path] | None = None,
    k: int | None = None,
    exclude_docs: Sequence[str] = (),
    exact: bool = False,
    self_share: float | None = None,
    rerank: str | None = None,
    fetch: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: ProgressFn = no_progress,
    engine: SearchEngine | None = None,
) -> UpdateReport:
    """What `retrodb neighbours DB NAME` does: compute the set, or with ``refresh_only``
    bring an existing one up to date (its inputs, exclusions, k, search mode, self share
    and re-ranking are kept; asking to change them is refused). ``rerank`` (default
    ``none``) and ``fetch``: see :func:`compute`. ``engine``: compute elsewhere (a refresh
    always runs here)."""
    t0 = time.perf_counter()
    if refresh_only:
        if engine is not None:
            raise BadInputError(
                "--refresh runs in this process (it searches only the new segments); "
                "drop --engine to refresh"
            )
        if inputs or exclude_docs or exact or self_share is not None:
            raise BadInputError(
                "--refresh keeps the set's inputs, exclusions, search mode and self share; "
                "recompute without --refresh to change them"
            )
        old = NeighbourSet.open(db, name, allow_stale=True)
        if k is not None and k != old.info.k:
            raise BadInputError(
                f"set {name!r} has k={old.info.k}; recompute without --refresh to change k"
            )
        if (rerank is not None and rerank != old.info.rerank) or (
            fetch is not None and fetch != old.info.fetch
        ):
            raise BadInputError(
                f"set {name!r} has rerank={old.info.rerank} (fetch {old.info.fetch}); "
                "recompute without --refresh to change them"
            )
        was_current = not old.is_stale(db)
        ns = refresh(db, name, batch_size=batch_size, progress=progress)
        how: Literal["computed", "refreshed", "current"] = "current" if was_current else "refreshed"
    else:
        ns = compute(
            db,
            name,
            inputs=inputs or None,
            k=2 if k is None else k,
            exclude_docs=exclude_docs,
            exact=exact,
            self_share=self_share or 0.0,
            rerank=rerank or "none",
            fetch=fetch,
            batch_size=batch_size,
            progress=progress,
            engine=engine,
        )
        how = "computed"
    known = db.keymap.doc_index()
    return UpdateReport(
        set=ns,
        how=how,
        seconds=time.perf_counter() - t0,
        unknown_excluded=sum(d not in known for d in ns.info.exclude),
    )


__all__ = [
    "DEFAULT_BATCH",
    "SearchEngine",
    "Searcher",
    "UpdateReport",
    "compute",
    "refresh",
    "SearchRules",
    "self_share_mask",
    "update",
]
