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
from typing import TYPE_CHECKING, BinaryIO, Protocol

from . import corpus as corpus_mod
from .config import FORMAT_VERSION, DBConfig
from .corpus import Skipped
from .errors import BadInputError, MismatchError, NotFoundError, RetroDBError, WriteError
from .fsutil import file_table, fsync_path, fsync_tree
from .ingest import open_encoder, write_corpus_segment
from .progress import ProgressFn, no_progress
from .segment import SegmentWriter, merge_segments
from .storage import (
    ENCODER_DIR,
    EXPLICIT_KEYS,
    TOKENIZER_FILE,
    Manifest,
    SegmentMeta,
    Storage,
    check_not_in_use,
)
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .db import RetroDB
    from .encoder import Encoder


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


class SegmentEngine(Protocol):
    """Writes the new segments of a build or an add somewhere other than this process (see
    :class:`retrodb.ray_engine.RayEngine`). Without one, build and add write one segment
    here (:func:`~retrodb.ingest.write_corpus_segment`)."""

    def write_segments(
        self,
        storage: Storage,
        corpus: corpus_mod.Corpus,
        tokenizer: Tokenizer,
        config: DBConfig,
        *,
        first_key: int,
        generation: int,
        progress: ProgressFn,
    ) -> tuple[SegmentMeta, ...]:
        """Sealed, uncommitted segments of ``storage`` holding ``corpus``'s documents in
        input order, with contiguous keys from ``first_key`` in that order. The tokenizer
        and the encoder are the files of ``storage``."""
        ...


def _engine_segments(
    engine: SegmentEngine,
    storage: Storage,
    corpus: corpus_mod.Corpus,
    tokenizer: Tokenizer,
    config: DBConfig,
    *,
    first_key: int,
    generation: int,
    progress: ProgressFn,
) -> tuple[SegmentMeta, ...]:
    """``engine.write_segments``, refusing segments that do not hold the corpus's documents
    with contiguous keys from ``first_key`` (nothing is committed then)."""
    metas = engine.write_segments(
        storage,
        corpus,
        tokenizer,
        config,
        first_key=first_key,
        generation=generation,
        progress=progress,
    )
    at = first_key
    for meta in metas:
        if meta.first_key != at or meta.explicit_keys:
            raise RetroDBError(
                f"{storage.segment_dir(meta.name)}: first key {meta.first_key}, expected {at}"
            )
        at += meta.chunks
    if sum(m.documents for m in metas) != len(corpus):
        raise RetroDBError(
            f"{storage.root}: the new segments hold {sum(m.documents for m in metas)} "
            f"documents, expected {len(corpus)}"
        )
    return tuple(metas)


# ---------------------------------------------------------------- transactions


@contextlib.contextmanager
def _locked(db: RetroDB) -> Iterator[Manifest]:
    """The writer lock, with ``db`` moved to the latest committed generation."""
    with db.storage.writer_lock():
        db._load(db.storage.read_manifest())
        yield db.manifest


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


def _commit(db: RetroDB, manifest: Manifest) -> None:
    """Commit ``manifest``, move ``db`` to it, and free what is no longer referenced."""
    db.storage.commit(manifest)
    db._load(manifest)
    _cleanup(db.storage)


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
    (:func:`~retrodb.encoder.share_encoder`). Returns the encoder it used (already loaded;
    with an ``engine``, a CPU session opened only to read the encoder's fingerprint and
    dimension) and what was built."""
    from .encoder import parse_device, prepare_encoder, share_encoder

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
        tok.save(tmp / TOKENIZER_FILE)
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
            tokenizer={
                "file": TOKENIZER_FILE,
                "fingerprint": tok.fingerprint,
                "vocab_size": tok.vocab_size,
                "pad_id": tok.pad_id,
                "token_dtype": tok.token_dtype.name,
                "size": (tmp / TOKENIZER_FILE).stat().st_size,
                **({"trainer": tok.trainer} if tok.trainer is not None else {}),
            },
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
        if engine is None:
            metas: tuple[SegmentMeta, ...] = (
                write_corpus_segment(
                    store, corpus, tok, enc, config, first_key=0, generation=1, progress=progress
                ),
            )
        else:
            metas = _engine_segments(
                engine, store, corpus, tok, config, first_key=0, generation=1, progress=progress
            )
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


def _refuse_duplicates(db: RetroDB, ids: Sequence[str]) -> None:
    existing = db.keymap.doc_index()
    dups = [i for i in ids if i in existing]
    if not dups:
        return
    more = f" (and {len(dups) - 1} more)" if len(dups) > 1 else ""
    if dups[0] in db.keymap.tombstones:
        raise BadInputError(
            f"document id {dups[0]!r} was deleted but is still stored{more}; run "
            f"`retrodb compact {db.path}` before adding it again"
        )
    raise BadInputError(f"document id {dups[0]!r} is already in the database{more}")


def add(
    db: RetroDB,
    inputs: Sequence[str | Path],
    *,
    errors: corpus_mod.Errors = "strict",
    stdin: BinaryIO | None = None,
    progress: ProgressFn = no_progress,
    tokenizer: str | Path | None = None,
    encoder: str | Path | None = None,
    engine: SegmentEngine | None = None,
) -> AddResult:
    """Add documents as one new segment (or, with an ``engine``, as the segments it writes)
    and commit a new generation (see RetroDB.add)."""
    with _locked(db) as m:
        assert db.tokenizer is not None
        if (
            tokenizer is not None
            and Tokenizer.load(tokenizer).fingerprint != db.tokenizer.fingerprint
        ):
            raise MismatchError(
                f"{tokenizer}: tokenizer does not match the database's ({db.path / TOKENIZER_FILE})"
            )
        if encoder is not None:
            db.check_encoder_matches(Path(encoder))
        corpus = corpus_mod.scan(inputs, errors=errors, stdin=stdin)
        try:
            _refuse_duplicates(db, corpus.ids)
            enc = db.encoder if engine is None else None
            db.storage.remove_leftovers(m)
            gen = m.generation + 1
            with _writing(db.storage, gen):
                if enc is not None:
                    metas: tuple[SegmentMeta, ...] = (
                        write_corpus_segment(
                            db.storage,
                            corpus,
                            db.tokenizer,
                            enc,
                            db.config,
                            first_key=m.next_key,
                            generation=gen,
                            progress=progress,
                        ),
                    )
                else:
                    assert engine is not None
                    metas = _engine_segments(
                        engine,
                        db.storage,
                        corpus,
                        db.tokenizer,
                        db.config,
                        first_key=m.next_key,
                        generation=gen,
                        progress=progress,
                    )
                chunks = sum(s.chunks for s in metas)
                manifest = next_manifest(
                    m, segments=(*m.segments, *metas), next_key=m.next_key + chunks
                )
                _commit(db, manifest)
        finally:
            corpus.cleanup()
        return AddResult(
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


def delete(db: RetroDB, doc_ids: Sequence[str]) -> DeleteResult:
    """Tombstone documents in a new generation (see RetroDB.delete)."""
    if isinstance(doc_ids, str):
        raise BadInputError("doc_ids must be a sequence of document ids, not one string")
    wanted = list(dict.fromkeys(str(i) for i in doc_ids))
    if not wanted:
        raise BadInputError("no document ids given")
    with _locked(db) as m:
        index = db.keymap.doc_index()
        unknown = [i for i in wanted if i not in index]
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:5])
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise BadInputError(f"unknown document id(s): {shown}{more}")
        gone = [i for i in wanted if i in db.keymap.tombstones]
        if gone:
            raise BadInputError(f"document id {gone[0]!r} is already deleted")
        db.storage.remove_leftovers(m)
        gen = m.generation + 1
        with _writing(db.storage, gen):
            manifest = next_manifest(
                m, segments=m.segments, next_key=m.next_key, tombstones=(*m.tombstones, *wanted)
            )
            _commit(db, manifest)
        return DeleteResult(
            generation=manifest.generation, deleted=len(wanted), tombstones=len(manifest.tombstones)
        )


def compact(
    db: RetroDB, *, force: bool = False, progress: ProgressFn = no_progress
) -> CompactResult:
    """Merge every segment into one, without deleted rows (see RetroDB.compact)."""
    with _locked(db) as m:
        if not force and len(m.segments) <= 1 and not m.tombstones:
            return CompactResult(
                generation=m.generation,
                changed=False,
                segments_before=len(m.segments),
                segments_after=len(m.segments),
                documents_dropped=0,
                chunks_dropped=0,
                segment=m.segments[0].name if m.segments else None,
            )
        db.storage.remove_leftovers(m)
        gen = m.generation + 1
        with _writing(db.storage, gen):
            writer = SegmentWriter(
                db.storage,
                generation=gen,
                chunk_size=db.chunk_size,
                token_dtype=db.token_dtype,
                dim=db.dim,
                index=db.config.index,
                explicit_keys=True,
            )
            indexes = db.indexes
            meta = merge_segments(
                writer,
                db.keymap.segments,
                lambda si, keys: indexes[si].vectors(keys),
                dead=set(m.tombstones),
                progress=progress,
            )
            manifest = next_manifest(
                m, segments=(meta,) if meta is not None else (), next_key=m.next_key, tombstones=()
            )
            _commit(db, manifest)
        return CompactResult(
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
