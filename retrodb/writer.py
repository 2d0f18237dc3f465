"""Write transactions: build a database, add documents, delete documents, compact.

Every transaction follows the commit protocol of docs/format.md: take the writer lock,
read the latest generation, validate every input, write new segments in temporary
directories, then commit manifest N+1 by replacing CURRENT. An I/O error becomes a
:class:`WriteError` that says which file failed and which generation the database is left
at. After a commit, the writer removes what no kept generation references any more
(segments merged away by a compaction stay for one more generation, for readers that
opened the previous one).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from . import corpus as corpus_mod
from .config import FORMAT_VERSION, DBConfig
from .corpus import Skipped
from .errors import BadInputError, MismatchError, NotFoundError, RetroDBError, WriteError
from .fsutil import file_table, fsync_path, fsync_tree
from .ingest import LocalEngine, SegmentEngine, SegmentJob, open_encoder
from .progress import ProgressFn, no_progress
from .segment import SegmentWriter, merge_segments
from .storage import (
    ENCODER_DIR,
    EXPLICIT_KEYS,
    Manifest,
    SegmentMeta,
    Storage,
    check_not_in_use,
)
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .encoder import Encoder
    from .snapshot import Snapshot


@dataclass(frozen=True, slots=True)
class BuildResult:
    """What :meth:`RetroDB.build` did (``db.last_build``)."""

    generation: int
    documents: int
    chunks: int
    tokens: int
    vocab_size: int
    skipped: tuple[Skipped, ...]
    """Inputs that hold no document, with the reason (files of a folder that are not read,
    empty documents)."""
    encoder_shared: int
    """Bytes of the encoder hard-linked with the shared store (0: a private copy)."""


@dataclass(frozen=True, slots=True)
class AddResult:
    generation: int
    documents: int
    chunks: int
    tokens: int
    skipped_empty: int
    """How many of :attr:`skipped` are empty documents."""
    segment: str
    """The new segment (the first of them, when an engine wrote several)."""
    skipped: tuple[Skipped, ...] = ()
    """Inputs that hold no document, with the reason (files of a folder that are not read,
    empty documents)."""
    segments: tuple[str, ...] = ()
    """Every new segment, in key order."""


@dataclass(frozen=True, slots=True)
class DeleteResult:
    generation: int
    deleted: int
    """Documents deleted by this call."""
    tombstones: int
    """Deleted documents still stored (until :meth:`RetroDB.compact`)."""


@dataclass(frozen=True, slots=True)
class CompactResult:
    generation: int
    changed: bool
    """False when there was nothing to do (one segment and no deleted documents)."""
    segments_before: int
    segments_after: int
    documents_dropped: int
    chunks_dropped: int
    segment: str | None


def next_manifest(
    prev: Manifest,
    *,
    segments: tuple[SegmentMeta, ...],
    next_key: int,
    tombstones: tuple[str, ...] | None = None,
) -> Manifest:
    """Generation ``prev.generation + 1`` with these segments (features follow them)."""
    features = set(prev.features) - {EXPLICIT_KEYS}
    if any(s.explicit_keys for s in segments):
        features.add(EXPLICIT_KEYS)
    return Manifest(
        generation=prev.generation + 1,
        config=prev.config,
        tokenizer=prev.tokenizer,
        encoder=prev.encoder,
        next_key=next_key,
        segments=segments,
        tombstones=prev.tombstones if tombstones is None else tombstones,
        features=tuple(sorted(features)),
        format_version=FORMAT_VERSION,
    )


# ---------------------------------------------------------------- engines


def _engine_segments(engine: SegmentEngine, job: SegmentJob) -> tuple[SegmentMeta, ...]:
    """``engine.write_segments(job)``, refusing segments that do not hold the corpus's
    documents with contiguous keys from ``job.first_key`` (nothing is committed then)."""
    metas = engine.write_segments(job)
    at = job.first_key
    for meta in metas:
        if meta.first_key != at or meta.explicit_keys:
            raise RetroDBError(
                f"{job.storage.segment_dir(meta.name)}: first key {meta.first_key}, expected {at}"
            )
        at += meta.chunks
    if sum(m.documents for m in metas) != len(job.corpus):
        raise RetroDBError(
            f"{job.storage.root}: the new segments hold {sum(m.documents for m in metas)} "
            f"documents, expected {len(job.corpus)}"
        )
    return tuple(metas)


# ---------------------------------------------------------------- transactions


@contextlib.contextmanager
def _locked(snap: Snapshot) -> Iterator[Snapshot]:
    """The writer lock, and the latest committed generation under it."""
    with snap.storage.writer_lock():
        yield snap.latest()


def _cleanup(storage: Storage) -> None:
    """Remove what no kept generation references (best effort; the next writer retries)."""
    with contextlib.suppress(Exception):
        storage.remove_leftovers(storage.read_manifest())


@contextlib.contextmanager
def _writing(storage: Storage, generation: int) -> Iterator[None]:
    """Turn an I/O error while writing ``generation`` into a :class:`WriteError` that says
    which file failed and which generation the database is left at, and remove what the
    failed write left behind (best effort; the next writer also does)."""
    try:
        yield
    except RetroDBError:
        _cleanup(storage)
        raise
    except OSError as exc:
        committed = False
        with contextlib.suppress(Exception):
            committed = storage.current_name() == f"{generation:06d}.json"
        where = getattr(exc, "filename", None) or storage.root
        what = getattr(exc, "strerror", None) or str(exc)
        if committed:
            msg = (
                f"{where}: {what}; generation {generation} was committed but may not be "
                f"on disk yet (run `retrodb verify {storage.root}`)"
            )
        else:
            _cleanup(storage)
            msg = (
                f"{where}: {what}; nothing was committed, {storage.root} is still at "
                f"generation {generation - 1}"
            )
        raise WriteError(
            msg, errno=getattr(exc, "errno", None), filename=getattr(exc, "filename", None)
        ) from exc


def _commit(snap: Snapshot, manifest: Manifest) -> Snapshot:
    """Commit ``manifest`` (the generation after ``snap``'s), free what is no longer
    referenced, and return its snapshot."""
    snap.storage.commit(manifest)
    new = snap.at(manifest)
    _cleanup(snap.storage)
    return new


# ---------------------------------------------------------------- build and add


def build(
    path: Path,
    inputs: Sequence[str | Path],
    *,
    config: DBConfig,
    tokenizer: str | Path | None,
    encoder: str | Path | None,
    errors: corpus_mod.Errors,
    stdin: BinaryIO | None,
    progress: ProgressFn,
    threads: int | None,
    device: str = "cpu",
    engine: SegmentEngine | None = None,
) -> tuple[Encoder, BuildResult]:
    """Build a new database at ``path``: everything is written to a temporary directory
    beside it and renamed into place at the end, so a failed build leaves nothing behind.
    The encoder's files are hard links into the shared store where the filesystem allows
    (:func:`~retrodb.encoder_files.share_encoder`). Returns the encoder it used (already loaded;
    with an ``engine``, a CPU session opened only to read the encoder's fingerprint and
    dimension) and what was built."""
    from .encoder_device import parse_device
    from .encoder_files import share_encoder
    from .encoder_prepare import prepare_encoder

    check_not_in_use(path)
    parse_device(device)
    if not path.parent.exists():
        raise NotFoundError(f"{path.parent}: parent directory does not exist")
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else None
    if encoder is not None and not Path(encoder).exists():
        raise NotFoundError(f"{encoder}: encoder not found")
    corpus = corpus_mod.scan(inputs, errors=errors, stdin=stdin)
    tmp = path.parent / f".{path.name}.building-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        tmp.mkdir()
        store = Storage(tmp)
        store.init_layout()
        if tok is None:
            progress("tokenizer", 0, 1)
            tok = Tokenizer.train((t for _, t in corpus.iter_pieces()), config=config.tokenizer)
            progress("tokenizer", 1, 1)
        tok.save(tmp / tok.file_name)
        prepare_encoder(encoder, tmp / ENCODER_DIR, config=config.encoder, progress=progress)
        encoder_files = file_table(tmp / ENCODER_DIR)
        shared = share_encoder(tmp / ENCODER_DIR, encoder_files)
        if engine is None:
            enc = open_encoder(tmp / ENCODER_DIR, config.encoder, threads=threads, device=device)
        else:  # the engine's workers encode; the driver reads the fingerprint and dimension
            enc = open_encoder(tmp / ENCODER_DIR, config.encoder, threads=1, device="cpu")
        first = Manifest(
            generation=0,
            config=config.to_dict(),
            tokenizer=tok.manifest_entry(),
            encoder={
                "dir": ENCODER_DIR,
                "fingerprint": enc.fingerprint,
                "dim": enc.dim,
                "files": {
                    k: {"size": v.size, "sha256": v.sha256} for k, v in encoder_files.items()
                },
            },
            next_key=0,
            format_version=FORMAT_VERSION,
        )
        job = SegmentJob(store, corpus, tok, config, first_key=0, generation=1, progress=progress)
        metas = _engine_segments(engine or LocalEngine(enc), job)
        fsync_tree(tmp)
        manifest = next_manifest(first, segments=metas, next_key=sum(m.chunks for m in metas))
        store.commit(manifest)
        store.remove_leftovers(manifest)  # what failed (and retried) engine workers left
        if path.exists():  # an empty directory the user made
            path.rmdir()
        os.rename(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        corpus.cleanup()
    return enc, BuildResult(
        generation=manifest.generation,
        documents=sum(s.documents for s in metas),
        chunks=sum(s.chunks for s in metas),
        tokens=sum(s.tokens for s in metas),
        vocab_size=tok.vocab_size,
        skipped=tuple(corpus.skipped),
        encoder_shared=shared,
    )


def _refuse_duplicates(snap: Snapshot, ids: Sequence[str]) -> None:
    existing = snap.keymap.doc_index()
    dups = [i for i in ids if i in existing]
    if not dups:
        return
    more = f" (and {len(dups) - 1} more)" if len(dups) > 1 else ""
    if dups[0] in snap.keymap.tombstones:
        raise BadInputError(
            f"document id {dups[0]!r} was deleted but is still stored{more}; run "
            f"`retrodb compact {snap.path}` before adding it again"
        )
    raise BadInputError(f"document id {dups[0]!r} is already in the database{more}")


def add(
    snap: Snapshot,
    inputs: Sequence[str | Path],
    *,
    errors: corpus_mod.Errors = "strict",
    stdin: BinaryIO | None = None,
    progress: ProgressFn = no_progress,
    tokenizer: str | Path | None = None,
    encoder: str | Path | None = None,
    engine: SegmentEngine | None = None,
) -> tuple[Snapshot, AddResult]:
    """Add documents as a new segment and commit a new generation.

    Nothing stored is re-encoded and no model is retrained. ``tokenizer``/``encoder``,
    when given, must be the ones the database was built with (a guard for scripts).
    Every input is validated before anything is written. ``engine``: where the segments
    are written, as for :meth:`RetroDB.build` (it may write several segments, committed
    together). Returns the committed generation's snapshot and what was added."""
    with _locked(snap) as cur:
        m = cur.manifest
        if (
            tokenizer is not None
            and Tokenizer.load(tokenizer).fingerprint != cur.tokenizer.fingerprint
        ):
            ours = cur.path / cur.tokenizer.file_name
            raise MismatchError(f"{tokenizer}: tokenizer does not match the database's ({ours})")
        if encoder is not None:
            cur.check_encoder_matches(Path(encoder))
        corpus = corpus_mod.scan(inputs, errors=errors, stdin=stdin)
        try:
            _refuse_duplicates(cur, corpus.ids)
            engine = engine or LocalEngine(cur.encoder)  # an encoder error writes nothing
            cur.storage.remove_leftovers(m)
            gen = m.generation + 1
            with _writing(cur.storage, gen):
                job = SegmentJob(
                    cur.storage,
                    corpus,
                    cur.tokenizer,
                    cur.config,
                    first_key=m.next_key,
                    generation=gen,
                    progress=progress,
                )
                metas = _engine_segments(engine, job)
                chunks = sum(s.chunks for s in metas)
                manifest = next_manifest(
                    m, segments=(*m.segments, *metas), next_key=m.next_key + chunks
                )
                new = _commit(cur, manifest)
        finally:
            corpus.cleanup()
        return new, AddResult(
            generation=manifest.generation,
            documents=sum(s.documents for s in metas),
            chunks=chunks,
            tokens=sum(s.tokens for s in metas),
            skipped_empty=len(corpus.skipped_empty),
            segment=metas[0].name,
            skipped=tuple(corpus.skipped),
            segments=tuple(s.name for s in metas),
        )


# ---------------------------------------------------------------- delete and compact


def delete(snap: Snapshot, doc_ids: Sequence[str]) -> tuple[Snapshot, DeleteResult]:
    """Delete documents: a new generation whose manifest lists them as tombstones.

    Their chunks disappear from every search, neighbour set and continuation lookup at
    once; compaction drops their rows from disk later. Unknown or already deleted ids are
    refused (nothing is written)."""
    if isinstance(doc_ids, str):
        raise BadInputError("doc_ids must be a sequence of document ids, not one string")
    wanted = list(dict.fromkeys(str(i) for i in doc_ids))
    if not wanted:
        raise BadInputError("no document ids given")
    with _locked(snap) as cur:
        m = cur.manifest
        index = cur.keymap.doc_index()
        unknown = [i for i in wanted if i not in index]
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:5])
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise BadInputError(f"unknown document id(s): {shown}{more}")
        gone = [i for i in wanted if i in cur.keymap.tombstones]
        if gone:
            raise BadInputError(f"document id {gone[0]!r} is already deleted")
        cur.storage.remove_leftovers(m)
        gen = m.generation + 1
        with _writing(cur.storage, gen):
            manifest = next_manifest(
                m, segments=m.segments, next_key=m.next_key, tombstones=(*m.tombstones, *wanted)
            )
            new = _commit(cur, manifest)
        return new, DeleteResult(
            generation=manifest.generation, deleted=len(wanted), tombstones=len(manifest.tombstones)
        )


def compact(
    snap: Snapshot, *, force: bool = False, progress: ProgressFn = no_progress
) -> tuple[Snapshot, CompactResult]:
    """Merge every segment into one new segment without the rows of deleted documents.

    No chunk is encoded again (the vectors are read back from the old indexes) and no
    live key changes. The merged-away segments stay on disk for one more generation, for
    readers that opened the previous one; the writer after that removes them. With
    nothing to merge or drop it does nothing, unless ``force`` (which rebuilds the
    index, e.g. to give an index written before side lists one)."""
    with _locked(snap) as cur:
        m = cur.manifest
        if not force and len(m.segments) <= 1 and not m.tombstones:
            return cur, CompactResult(
                generation=m.generation,
                changed=False,
                segments_before=len(m.segments),
                segments_after=len(m.segments),
                documents_dropped=0,
                chunks_dropped=0,
                segment=m.segments[0].name if m.segments else None,
            )
        cur.storage.remove_leftovers(m)
        gen = m.generation + 1
        with _writing(cur.storage, gen):
            writer = SegmentWriter(
                cur.storage,
                generation=gen,
                chunk_size=cur.chunk_size,
                token_dtype=cur.token_dtype,
                dim=cur.dim,
                index=cur.config.index,
                explicit_keys=True,
            )
            indexes = cur.indexes
            meta = merge_segments(
                writer,
                cur.keymap.segments,
                lambda si, keys: indexes[si].vectors(keys),
                dead=set(m.tombstones),
                progress=progress,
            )
            manifest = next_manifest(
                m, segments=(meta,) if meta is not None else (), next_key=m.next_key, tombstones=()
            )
            new = _commit(cur, manifest)
        return new, CompactResult(
            generation=manifest.generation,
            changed=True,
            segments_before=len(m.segments),
            segments_after=len(manifest.segments),
            documents_dropped=len(m.tombstones),
            chunks_dropped=m.chunks - manifest.chunks,
            segment=meta.name if meta is not None else None,
        )


__all__ = [
    "AddResult",
    "BuildResult",
    "CompactResult",
    "DeleteResult",
    "SegmentEngine",
    "add",
    "build",
    "compact",
    "delete",
    "next_manifest",
]
