"""RetroDB: build, add, search and retrieve over the modules beside this one."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from . import corpus as corpus_mod
from .chunking import continuation_rows
from .config import FORMAT_VERSION, DBConfig
from .errors import (
    BadInputError,
    CorruptError,
    MismatchError,
    NotFoundError,
    RetroDBError,
    WriteError,
)
from .failpoints import failpoint
from .index import IndexBuilder, SegmentIndex, check_vectors, search_segments
from .progress import ProgressFn, no_progress
from .storage import (
    ENCODER_DIR,
    EXPLICIT_KEYS,
    INDEX_FILE,
    TOKENIZER_FILE,
    Manifest,
    RawArrayWriter,
    SegmentMeta,
    Storage,
    check_not_in_use,
    file_table,
    fsync_path,
    fsync_tree,
    open_raw_array,
    read_strings,
    sha256_file,
    write_array,
)
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .encoder import Encoder

#: Pieces of text tokenized per SentencePiece call while writing a segment (and at most
#: about this many characters).
_TOKENIZE_PIECES = 256
_TOKENIZE_CHARS = 1 << 20
#: Chunks decoded and encoded per encoder call (sorted by length inside the window).
_ENCODE_WINDOW = 4096
#: Chunk rows buffered before they are appended to a segment's files.
_ROW_BLOCK = 8192


@dataclass(frozen=True, slots=True)
class SearchResult:
    """``keys [q, k]`` int64 (-1 where fewer than k exist) and cosine ``distances [q, k]``."""

    keys: np.ndarray
    distances: np.ndarray


@dataclass(frozen=True, slots=True)
class Retrieved:
    """Neighbours with continuations: ``tokens [..., 2m]`` and ``mask [..., 2m]`` (True = real).

    The first m positions hold the neighbour chunk, the last m its continuation (the next
    chunk of the same document; all padding at a document's end)."""

    tokens: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True, slots=True)
class AddResult:
    generation: int
    documents: int
    chunks: int
    tokens: int
    skipped_empty: int
    segment: str


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


class Segment:
    """Read access to one committed segment through memory maps."""

    def __init__(
        self, directory: Path, meta: SegmentMeta, chunk_size: int, token_dtype: np.dtype
    ) -> None:
        self.dir = directory
        self.meta = meta
        if not directory.is_dir():
            raise CorruptError(f"{directory}: segment directory missing")
        n, d = meta.chunks, meta.documents
        for rel, info in meta.files.items():
            p = directory / rel
            try:
                size = p.stat().st_size
            except FileNotFoundError as exc:
                raise CorruptError(f"{p}: missing") from exc
            if size != info.size:
                raise CorruptError(f"{p}: {size} bytes, the manifest recorded {info.size}")
        self.tokens = open_raw_array(directory / "tokens", dtype=token_dtype, shape=(n, chunk_size))
        self.lengths = open_raw_array(directory / "lengths", dtype=np.dtype(np.int32), shape=(n,))
        self.doc = open_raw_array(directory / "doc", dtype=np.dtype(np.int32), shape=(n,))
        self.first_chunk = open_raw_array(
            directory / "docs" / "first_chunk", dtype=np.dtype(np.int64), shape=(d,)
        )
        self.num_chunks = open_raw_array(
            directory / "docs" / "num_chunks", dtype=np.dtype(np.int32), shape=(d,)
        )
        self.key_array: np.ndarray | None = None
        """The sorted keys of the rows of a compacted segment (None: row r is key first_key + r)."""
        if meta.explicit_keys:
            self.key_array = open_raw_array(
                directory / "keys", dtype=np.dtype(np.int64), shape=(n,)
            )

    def row_keys(self, rows: np.ndarray) -> np.ndarray:
        """The key of each row."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.key_array is None:
            return self.meta.first_key + rows
        return np.asarray(self.key_array[rows], dtype=np.int64)

    def key_rows(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key, -1 where the segment does not hold it."""
        keys = np.asarray(keys, dtype=np.int64)
        n = self.meta.chunks
        if self.key_array is None:
            row = keys - self.meta.first_key
            return np.where((row >= 0) & (row < n), row, -1)
        if n == 0:
            return np.full(keys.shape, -1, np.int64)
        row = np.minimum(np.searchsorted(self.key_array, keys), n - 1)
        return np.where(self.key_array[row] == keys, row, -1)

    @cached_property
    def ids(self) -> list[str]:
        ids = read_strings(self.dir / "docs" / "ids")
        if len(ids) != self.meta.documents:
            raise CorruptError(
                f"{self.dir / 'docs' / 'ids'}: {len(ids)} ids, expected {self.meta.documents}"
            )
        return ids

    def index_file_size(self) -> int | None:
        info = self.meta.files.get(INDEX_FILE)
        return info.size if info else None


class RetroDB:
    """A retrieval database on disk.

    Open one with :meth:`open` (a read-only snapshot of the committed generation) or
    create one with :meth:`build`. :meth:`add` commits a new generation and moves this
    object to it. Objects are not thread-safe for writing; any number of processes may
    read while one writes.

    >>> db = RetroDB.open("my.retrodb")                         # doctest: +SKIP
    >>> res = db.search(["how to open a file"], k=4)            # doctest: +SKIP
    >>> got = db.retrieve(res.keys)                             # doctest: +SKIP
    >>> got.tokens.shape                                        # doctest: +SKIP
    (1, 4, 128)
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        self.storage = Storage(path)
        self.path = self.storage.root
        self.threads = threads
        self.tokenizer: Tokenizer | None = None
        self._encoder: Encoder | None = None
        self._load_current()

    def _load_current(self, name: str | None = None) -> None:
        """Load the generation CURRENT names. If one of its files vanished because a writer
        committed (and cleaned up) in between, load the newer generation instead; raise
        only if that fails too."""
        name = name or self.storage.current_name()
        try:
            self._load(self.storage.read_manifest(name))
        except CorruptError:
            newer = self.storage.current_name()
            if newer == name:
                raise
            self._load(self.storage.read_manifest(newer))

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path, *, threads: int | None = None) -> RetroDB:
        """Open the committed generation of the database at ``path``."""
        return cls(path, threads=threads)

    def _load(self, manifest: Manifest) -> None:
        config = DBConfig.from_dict(manifest.config)
        tok_path = self.path / TOKENIZER_FILE
        expected = manifest.tokenizer["fingerprint"]
        if self.tokenizer is None or self.tokenizer.fingerprint != expected:
            # Hash before parsing: a damaged model is reported, never handed to SentencePiece.
            try:
                data = tok_path.read_bytes()
            except FileNotFoundError as exc:
                raise CorruptError(f"{tok_path}: tokenizer model missing") from exc
            found = "sha256:" + hashlib.sha256(data).hexdigest()
            if found != expected:
                raise MismatchError(
                    f"{tok_path}: tokenizer fingerprint {found[:19]}… does not match the "
                    f"manifest's {expected[:19]}… (the file was replaced or is damaged)"
                )
            self.tokenizer = Tokenizer(data, path=tok_path)
        segments = [
            Segment(
                self.storage.segment_dir(s.name),
                s,
                config.chunk.chunk_size,
                np.dtype(manifest.tokenizer["token_dtype"]),
            )
            for s in manifest.segments
        ]
        self.manifest = manifest
        self.config = config
        self.chunk_size = config.chunk.chunk_size
        self.token_dtype = np.dtype(manifest.tokenizer["token_dtype"])
        self.pad_id = int(manifest.tokenizer["pad_id"])
        self.dim = int(manifest.encoder["dim"])
        self.segments = segments
        self._first_keys = np.array([s.first_key for s in manifest.segments], dtype=np.int64)
        self._stop_keys = np.array([s.stop_key for s in manifest.segments], dtype=np.int64)
        self._explicit = [i for i, s in enumerate(manifest.segments) if s.explicit_keys]
        self._indexes: list[SegmentIndex] | None = None
        self._deleted: np.ndarray | None = None
        self._doc_ids: dict[str, tuple[int, int]] | None = None

    @property
    def generation(self) -> int:
        return self.manifest.generation

    @property
    def encoder(self) -> Encoder:
        """The database's ONNX encoder (opened on first use)."""
        if self._encoder is None:
            from .encoder import Encoder

            enc_dir = self.path / ENCODER_DIR
            for rel, fi in self.manifest.encoder.get("files", {}).items():
                p = enc_dir / rel
                try:
                    size = p.stat().st_size
                except FileNotFoundError as exc:
                    raise CorruptError(f"{p}: missing") from exc
                if size != int(fi["size"]):
                    raise CorruptError(f"{p}: {size} bytes, the manifest recorded {fi['size']}")
            enc = Encoder.open(enc_dir, threads=self.threads)
            if enc.fingerprint != self.manifest.encoder["fingerprint"]:
                raise MismatchError(
                    f"{self.path / ENCODER_DIR}: encoder fingerprint does not match the manifest "
                    f"(the encoder files were changed after the database was built)"
                )
            if enc.dim != self.dim:
                raise MismatchError(
                    f"{self.path / ENCODER_DIR}: encoder dimension {enc.dim}, manifest {self.dim}"
                )
            self._encoder = enc
        return self._encoder

    @property
    def indexes(self) -> list[SegmentIndex]:
        """The segments' indexes, mapped on first use."""
        if self._indexes is None:
            try:
                self._indexes = self._open_indexes()
            except CorruptError as exc:
                newer = self.storage.current_name()
                if newer != f"{self.generation:06d}.json":
                    raise CorruptError(
                        f"{exc} (this object holds generation {self.generation}; the database "
                        f"is at {newer.split('.')[0].lstrip('0')}: call refresh())"
                    ) from exc
                raise
        return self._indexes

    def _open_indexes(self) -> list[SegmentIndex]:
        return [
            SegmentIndex.open(
                seg.dir / INDEX_FILE,
                first_key=seg.meta.first_key,
                count=seg.meta.chunks,
                ndim=self.dim,
                expected_size=seg.index_file_size(),
                config=self.config.index,
                guard=seg.meta.index_guard,
            )
            for seg in self.segments
        ]

    # ------------------------------------------------------------ building and adding

    @classmethod
    def build(
        cls,
        path: str | Path,
        inputs: Sequence[str | Path],
        *,
        config: DBConfig | None = None,
        tokenizer: str | Path | None = None,
        encoder: str | Path | None = None,
        errors: corpus_mod.Errors = "strict",
        stdin: BinaryIO | None = None,
        progress: ProgressFn = no_progress,
        threads: int | None = None,
    ) -> RetroDB:
        """Build a new database at ``path`` from ``inputs``.

        ``tokenizer``: an existing SentencePiece model file (else one is trained on the
        inputs). ``encoder``: a local Hugging Face BERT checkpoint, an encoder directory or
        an exported ``.onnx`` (else the bundled all-MiniLM-L6-v2). Everything is written to
        a temporary directory beside ``path`` and renamed into place at the end, so a failed
        build leaves nothing behind."""
        from .encoder import Encoder, prepare_encoder

        config = config or DBConfig()
        path = Path(path)
        check_not_in_use(path)
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
            enc = Encoder.open(tmp / ENCODER_DIR, threads=threads)
            manifest0 = Manifest(
                generation=0,
                config=config.to_dict(),
                tokenizer={
                    "file": TOKENIZER_FILE,
                    "fingerprint": tok.fingerprint,
                    "vocab_size": tok.vocab_size,
                    "pad_id": tok.pad_id,
                    "token_dtype": tok.token_dtype.name,
                    "size": (tmp / TOKENIZER_FILE).stat().st_size,
                },
                encoder={
                    "dir": ENCODER_DIR,
                    "fingerprint": enc.fingerprint,
                    "dim": enc.dim,
                    "files": {
                        k: {"size": v.size, "sha256": v.sha256}
                        for k, v in file_table(tmp / ENCODER_DIR).items()
                    },
                },
                next_key=0,
                format_version=FORMAT_VERSION,
            )
            meta = _write_segment(
                store, corpus, tok, enc, config, first_key=0, generation=1, progress=progress
            )
            manifest = _next_manifest(manifest0, segments=(meta,), next_key=meta.chunks)
            fsync_tree(tmp)
            store.commit(manifest)
            if path.exists():  # an empty directory the user made
                path.rmdir()
            os.rename(tmp, path)
            fsync_path(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            corpus.cleanup()
        db = cls(path, threads=threads)
        db._encoder = None
        return db

    def add(
        self,
        inputs: Sequence[str | Path],
        *,
        errors: corpus_mod.Errors = "strict",
        stdin: BinaryIO | None = None,
        progress: ProgressFn = no_progress,
        tokenizer: str | Path | None = None,
        encoder: str | Path | None = None,
    ) -> AddResult:
        """Add documents as a new segment and commit a new generation.

        Nothing stored is re-encoded and no model is retrained. ``tokenizer``/``encoder``,
        when given, must be the ones the database was built with (a guard for scripts).
        Every input is validated before anything is written."""
        with self.storage.writer_lock():
            self._load(self.storage.read_manifest())  # the latest generation, under the lock
            if tokenizer is not None:
                other = Tokenizer.load(tokenizer)
                if other.fingerprint != self.tokenizer.fingerprint:
                    raise MismatchError(
                        f"{tokenizer}: tokenizer does not match the database's "
                        f"({self.path / TOKENIZER_FILE})"
                    )
            if encoder is not None:
                self._check_encoder_matches(Path(encoder))
            corpus = corpus_mod.scan(inputs, errors=errors, stdin=stdin)
            try:
                existing = self.doc_index()
                dead = set(self.manifest.tombstones)
                dups = [i for i in corpus.ids if i in existing]
                if dups:
                    more = f" (and {len(dups) - 1} more)" if len(dups) > 1 else ""
                    if dups[0] in dead:
                        raise BadInputError(
                            f"document id {dups[0]!r} was deleted but is still stored{more}; run "
                            f"`retrodb compact {self.path}` before adding it again"
                        )
                    raise BadInputError(f"document id {dups[0]!r} is already in the database{more}")
                enc = self.encoder
                self.storage.remove_leftovers(self.manifest)
                gen = self.manifest.generation + 1
                with self._writing(gen):
                    meta = _write_segment(
                        self.storage,
                        corpus,
                        self.tokenizer,
                        enc,
                        self.config,
                        first_key=self.manifest.next_key,
                        generation=gen,
                        progress=progress,
                    )
                    manifest = _next_manifest(
                        self.manifest,
                        segments=(*self.manifest.segments, meta),
                        next_key=self.manifest.next_key + meta.chunks,
                    )
                    self.storage.commit(manifest)
            finally:
                corpus.cleanup()
            self._load(manifest)
            return AddResult(
                generation=manifest.generation,
                documents=meta.documents,
                chunks=meta.chunks,
                tokens=meta.tokens,
                skipped_empty=len(corpus.skipped_empty),
                segment=meta.name,
            )

    @contextlib.contextmanager
    def _writing(self, generation: int) -> Iterator[None]:
        """Turn an I/O error while writing ``generation`` into a :class:`WriteError` that
        says which file failed and which generation the database is left at, and remove
        what the failed write left behind (best effort; the next writer also does)."""
        try:
            yield
        except RetroDBError:
            self._cleanup_after_failure()
            raise
        except OSError as exc:
            committed = False
            with contextlib.suppress(Exception):
                committed = self.storage.current_name() == f"{generation:06d}.json"
            where = getattr(exc, "filename", None) or self.path
            what = getattr(exc, "strerror", None) or str(exc)
            if committed:
                msg = (
                    f"{where}: {what}; generation {generation} was committed but may not be "
                    f"on disk yet (run `retrodb verify {self.path}`)"
                )
            else:
                self._cleanup_after_failure()
                msg = (
                    f"{where}: {what}; nothing was committed, {self.path} is still at "
                    f"generation {generation - 1}"
                )
            raise WriteError(
                msg, errno=getattr(exc, "errno", None), filename=getattr(exc, "filename", None)
            ) from exc

    def _cleanup_after_failure(self) -> None:
        with contextlib.suppress(Exception):
            self.storage.remove_leftovers(self.storage.read_manifest())

    def _check_encoder_matches(self, source: Path) -> None:
        import tempfile

        from .encoder import Encoder, prepare_encoder

        if not source.exists():
            raise NotFoundError(f"{source}: encoder not found")
        if (source / "encoder.json").exists():
            other = Encoder.open(source)
        else:
            with tempfile.TemporaryDirectory() as td:
                prepare_encoder(source, Path(td) / "enc", config=self.config.encoder)
                other = Encoder.open(Path(td) / "enc")
        if other.fingerprint != self.manifest.encoder["fingerprint"]:
            raise MismatchError(
                f"{source}: encoder does not match the database's ({self.path / ENCODER_DIR})"
            )

    def refresh(self) -> bool:
        """Move to the latest committed generation; True if it changed."""
        name = self.storage.current_name()
        if name == f"{self.manifest.generation:06d}.json":
            return False
        self._load_current(name)
        return True

    # ------------------------------------------------------------ deleting and compacting

    def delete(self, doc_ids: Sequence[str]) -> DeleteResult:
        """Delete documents: a new generation whose manifest lists them as tombstones.

        Their chunks disappear from every search, neighbour set and continuation lookup at
        once; :meth:`compact` drops their rows from disk later. Unknown or already deleted
        ids are refused (nothing is written)."""
        if isinstance(doc_ids, str):
            raise BadInputError("doc_ids must be a sequence of document ids, not one string")
        wanted = list(dict.fromkeys(str(i) for i in doc_ids))
        if not wanted:
            raise BadInputError("no document ids given")
        with self.storage.writer_lock():
            self._load(self.storage.read_manifest())
            index = self.doc_index()
            dead = set(self.manifest.tombstones)
            unknown = [i for i in wanted if i not in index]
            if unknown:
                shown = ", ".join(repr(i) for i in unknown[:5])
                more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
                raise BadInputError(f"unknown document id(s): {shown}{more}")
            gone = [i for i in wanted if i in dead]
            if gone:
                raise BadInputError(f"document id {gone[0]!r} is already deleted")
            self.storage.remove_leftovers(self.manifest)
            gen = self.manifest.generation + 1
            with self._writing(gen):
                manifest = _next_manifest(
                    self.manifest,
                    segments=self.manifest.segments,
                    next_key=self.manifest.next_key,
                    tombstones=(*self.manifest.tombstones, *wanted),
                )
                self.storage.commit(manifest)
            self._load(manifest)
            return DeleteResult(
                generation=manifest.generation,
                deleted=len(wanted),
                tombstones=len(manifest.tombstones),
            )

    def compact(self, *, progress: ProgressFn = no_progress) -> CompactResult:
        """Merge every segment into one new segment without the rows of deleted documents.

        No chunk is encoded again (the vectors are read back from the old indexes) and no
        live key changes. The merged-away segments stay on disk for one more generation, for
        readers that opened the previous one; the writer after that removes them."""
        with self.storage.writer_lock():
            self._load(self.storage.read_manifest())
            m = self.manifest
            if len(m.segments) <= 1 and not m.tombstones:
                return CompactResult(
                    generation=m.generation,
                    changed=False,
                    segments_before=len(m.segments),
                    segments_after=len(m.segments),
                    documents_dropped=0,
                    chunks_dropped=0,
                    segment=m.segments[0].name if m.segments else None,
                )
            self.storage.remove_leftovers(m)
            gen = m.generation + 1
            with self._writing(gen):
                meta = _compact_segments(self, generation=gen, progress=progress)
                manifest = _next_manifest(
                    m,
                    segments=(meta,) if meta is not None else (),
                    next_key=m.next_key,
                    tombstones=(),
                )
                self.storage.commit(manifest)
            self._load(manifest)
            return CompactResult(
                generation=manifest.generation,
                changed=True,
                segments_before=len(m.segments),
                segments_after=len(manifest.segments),
                documents_dropped=len(m.tombstones),
                chunks_dropped=m.chunks - manifest.chunks,
                segment=meta.name if meta is not None else None,
            )

    # ------------------------------------------------------------ documents and keys

    def doc_index(self) -> dict[str, tuple[int, int]]:
        """Document id -> (segment number, local document number), live and deleted."""
        if self._doc_ids is None:
            out: dict[str, tuple[int, int]] = {}
            for si, seg in enumerate(self.segments):
                for di, doc_id in enumerate(seg.ids):
                    out[doc_id] = (si, di)
            self._doc_ids = out
        return self._doc_ids

    def locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment number and row of each key; -1 for -1 or unknown keys."""
        keys = np.asarray(keys, dtype=np.int64)
        if not self.segments:
            return np.full(keys.shape, -1, np.int64), np.full(keys.shape, -1, np.int64)
        seg = np.searchsorted(self._first_keys, keys, side="right") - 1
        seg = np.clip(seg, 0, len(self.segments) - 1)
        row = keys - self._first_keys[seg]
        ok = (keys >= 0) & (row >= 0) & (keys < self._stop_keys[seg])
        for si in self._explicit:  # compacted segments: look the rows up
            sel = np.nonzero(ok & (seg == si))
            r = self.segments[si].key_rows(keys[sel])
            row[sel] = r
            ok[sel] = r >= 0
        return np.where(ok, seg, -1), np.where(ok, row, -1)

    def _locate_known(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`locate`, refusing keys (other than -1) that the database does not hold."""
        seg, row = self.locate(keys)
        unknown = (keys >= 0) & (seg < 0)
        if unknown.any():
            raise BadInputError(
                f"key {int(keys[unknown][0])} is not in the database "
                f"(keys are 0..{self.manifest.next_key - 1})"
            )
        return seg, row

    def key_documents(self, keys: np.ndarray) -> list[str | None]:
        """The document id of each key (None for -1)."""
        seg, row = self.locate(np.asarray(keys).ravel())
        out: list[str | None] = []
        for s, r in zip(seg.tolist(), row.tolist(), strict=True):
            if s < 0:
                out.append(None)
                continue
            ids, d = self.segments[s].ids, int(self.segments[s].doc[r])
            if not 0 <= d < len(ids):
                where = self.segments[s].dir / "doc"
                raise CorruptError(f"{where}: document number {d} out of range")
            out.append(ids[d])
        return out

    def key_doc_numbers(self, keys: np.ndarray) -> np.ndarray:
        """A global document number per key (stable within this generation), -1 for -1."""
        keys = np.asarray(keys, dtype=np.int64)
        seg, row = self.locate(keys)
        offsets = np.cumsum([0] + [s.meta.documents for s in self.segments])
        out = np.full(keys.shape, -1, dtype=np.int64)
        for si, s in enumerate(self.segments):
            sel = seg == si
            if sel.any():
                out[sel] = offsets[si] + s.doc[row[sel]].astype(np.int64)
        return out

    def deleted_mask(self, keys: np.ndarray) -> np.ndarray:
        """True for keys of deleted documents."""
        if not self.manifest.tombstones:
            return np.zeros(np.shape(keys), dtype=bool)
        if self._deleted is None:
            dead = np.zeros(self.manifest.next_key, dtype=bool)
            index = self.doc_index()
            for doc_id in self.manifest.tombstones:
                if doc_id in index:
                    si, di = index[doc_id]
                    seg = self.segments[si]
                    start = int(seg.row_keys(np.array([seg.first_chunk[di]]))[0])
                    dead[max(start, 0) : start + int(seg.num_chunks[di])] = True
            self._deleted = dead
        keys = np.asarray(keys, dtype=np.int64)
        ok = (keys >= 0) & (keys < self._deleted.shape[0])
        out = np.zeros(keys.shape, dtype=bool)
        out[ok] = self._deleted[keys[ok]]
        return out

    # ------------------------------------------------------------ encoding and search

    def encode_texts(
        self, texts: Sequence[str], *, progress: ProgressFn = no_progress
    ) -> np.ndarray:
        """Keys of query texts: the text goes through the database's SentencePiece round trip
        (so it is normalised exactly as stored chunks are) and the one encoder function."""
        if isinstance(texts, str):
            raise BadInputError("texts must be a sequence of strings, not one string")
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise BadInputError("empty query: a query must contain some text")
        ids = self.tokenizer.encode(list(texts))
        return self.encoder.encode(
            self.tokenizer.decode_many(ids),
            batch_size=self.config.encoder.batch_size,
            progress=progress,
        )

    def encode_chunks(
        self,
        chunks: np.ndarray,
        lengths: np.ndarray | None = None,
        *,
        progress: ProgressFn = no_progress,
    ) -> np.ndarray:
        """Keys of token chunks ``[n, m]`` (``lengths`` real tokens each; default all)."""
        chunks = np.asarray(chunks)
        if chunks.ndim != 2:
            raise BadInputError(f"chunks must be 2-D [n, m], got shape {chunks.shape}")
        if lengths is None:
            lengths = np.full(chunks.shape[0], chunks.shape[1])
        texts = self.tokenizer.decode_many(
            [c[: int(n)] for c, n in zip(chunks, lengths, strict=True)]
        )
        return self.encoder.encode(
            texts, batch_size=self.config.encoder.batch_size, progress=progress
        )

    def search(
        self,
        queries: Sequence[str] | np.ndarray,
        k: int = 4,
        *,
        exact: bool = False,
    ) -> SearchResult:
        """The ``k`` nearest chunks of each query, best first.

        ``queries`` is a list of texts or an integer array of token chunks ``[q, m]``."""
        _check_k(k)
        if isinstance(queries, np.ndarray) and np.issubdtype(queries.dtype, np.integer):
            vectors = self.encode_chunks(queries)
        else:
            vectors = self.encode_texts(list(queries))
        return self.search_vectors(vectors, k, exact=exact)

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 4,
        *,
        exact: bool = False,
        keep: Any = None,
        segments: Sequence[int] | None = None,
    ) -> SearchResult:
        """Search by key vectors ``[q, d]``. ``keep(query_rows, keys) -> bool`` filters
        candidates (deleted documents are always dropped); ``segments`` restricts the search
        to some segments (by position)."""
        _check_k(k)
        vectors = check_vectors(vectors, self.dim)
        idx = self.indexes if segments is None else [self.indexes[i] for i in segments]

        if self.manifest.tombstones or keep is not None:

            def _keep(rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
                ok = ~self.deleted_mask(keys)
                if keep is not None:
                    ok &= keep(rows, keys)
                return ok

            keys, dist = search_segments(idx, vectors, int(k), keep=_keep, exact=exact)
        else:
            keys, dist = search_segments(idx, vectors, int(k), exact=exact)
        return SearchResult(keys=keys, distances=dist)

    # ------------------------------------------------------------ reading chunks

    def chunks(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token rows ``[..., m]`` (int64, padded) and lengths of ``keys``; -1 gives padding,
        length 0."""
        keys = np.asarray(keys, dtype=np.int64)
        flat = keys.ravel()
        seg, row = self._locate_known(flat)
        out = np.full((flat.size, self.chunk_size), self.pad_id, dtype=np.int64)
        lengths = np.zeros(flat.size, dtype=np.int32)
        for si, s in enumerate(self.segments):
            sel = np.nonzero(seg == si)[0]
            if sel.size:
                r = row[sel]
                out[sel] = s.tokens[r]
                lengths[sel] = s.lengths[r]
        return out.reshape(*keys.shape, self.chunk_size), lengths.reshape(keys.shape)

    def continuation_keys(self, keys: np.ndarray) -> np.ndarray:
        """The key of each key's continuation (next chunk of the same document) or -1."""
        keys = np.asarray(keys, dtype=np.int64)
        flat = keys.ravel()
        seg, row = self.locate(flat)
        out = np.full(flat.shape, -1, dtype=np.int64)
        for si, s in enumerate(self.segments):
            sel = np.nonzero(seg == si)[0]
            if sel.size:
                nxt = continuation_rows(s.doc, row[sel])
                same = nxt >= 0
                out[sel[same]] = s.row_keys(nxt[same])
        return out.reshape(keys.shape)

    def retrieve(self, keys: np.ndarray) -> Retrieved:
        """Neighbour + continuation tokens for ``keys [...]``: ``tokens [..., 2m]`` int64 and
        ``mask [..., 2m]`` bool. Key -1 gives an all-padding, all-False row.

        One pass of memory-mapped gathers per segment: the continuation of row r is row
        r + 1 when it belongs to the same document (documents never span segments)."""
        keys = np.asarray(keys, dtype=np.int64)
        m = self.chunk_size
        flat = keys.ravel()
        seg, row = self._locate_known(flat)
        out = np.empty((flat.size, 2, m), dtype=np.int64)
        lengths = np.zeros((flat.size, 2), dtype=np.int32)
        for si, s in enumerate(self.segments):
            here = seg == si
            # All keys in one segment (the common case): plain slices instead of a selection.
            sel: slice | np.ndarray = slice(None) if here.all() else np.nonzero(here)[0]
            r = row[sel]
            if not r.size:
                continue
            nxt = continuation_rows(s.doc, r)
            same = nxt >= 0
            nxt[~same] = r[~same]  # gather something cheap, then mark it padding
            out[sel, 0] = s.tokens[r]
            out[sel, 1] = s.tokens[nxt]
            lengths[sel, 0] = s.lengths[r]
            lengths[sel, 1] = np.where(same, s.lengths[nxt], 0)
        out[lengths == 0] = self.pad_id  # key -1 and missing continuations
        mask = _prefix_masks(m)[lengths]  # a row gather, not a compare
        return Retrieved(
            tokens=out.reshape(*keys.shape, 2 * m), mask=mask.reshape(*keys.shape, 2 * m)
        )

    def decode(self, keys: Sequence[int] | np.ndarray) -> list[str]:
        """The text of each key's chunk ('' for -1)."""
        flat = np.asarray(keys, dtype=np.int64).ravel()
        toks, lens = self.chunks(flat)
        try:
            return [
                self.tokenizer.decode(t[: int(n)]) if n else ""
                for t, n in zip(toks, lens, strict=True)
            ]
        except IndexError as exc:  # a token id past the vocabulary: damaged tokens
            seg, _ = self.locate(flat)
            used = {s for s in seg.tolist() if s >= 0}
            files = sorted(str(self.segments[s].dir / "tokens") for s in used)
            raise CorruptError(f"{', '.join(files)}: token id out of range ({exc})") from exc

    def continuation_text(self, keys: Sequence[int] | np.ndarray) -> list[str]:
        return self.decode(self.continuation_keys(np.asarray(keys, dtype=np.int64)))

    # ------------------------------------------------------------ reporting

    def info(self) -> dict[str, Any]:
        """A summary of the committed generation (what `retrodb info --json` prints)."""
        m = self.manifest
        return {
            "path": str(self.path),
            "format_version": m.format_version,
            "generation": m.generation,
            "documents": m.documents,
            "deleted_documents": len(m.tombstones),
            "chunks": m.chunks,
            "tokens": sum(s.tokens for s in m.segments),
            "segments": len(m.segments),
            "segment_list": [
                {
                    "name": s.name,
                    "first_key": s.first_key,
                    "chunks": s.chunks,
                    "documents": s.documents,
                    "tokens": s.tokens,
                }
                for s in m.segments
            ],
            "next_key": m.next_key,
            "config": m.config,
            "tokenizer": {
                k: m.tokenizer[k] for k in ("fingerprint", "vocab_size", "pad_id", "token_dtype")
            },
            "encoder": {k: m.encoder[k] for k in ("fingerprint", "dim")},
            "bytes": self.storage.disk_usage(),
        }

    def verify(self, *, repair: bool = False, progress: ProgressFn = no_progress) -> dict[str, Any]:
        """Check every committed file against the sizes and checksums in the manifest, open
        every array and index, and list what an interrupted writer left behind.

        ``repair`` removes those leftovers (under the writer lock). Committed data is never
        changed. Returns ``{"ok": bool, "problems": [...], "leftovers": [...], ...}``."""
        problems: list[str] = []
        m = self.manifest
        files: list[tuple[Path, int, str]] = []
        for s in m.segments:
            d = self.storage.segment_dir(s.name)
            files += [(d / rel, fi.size, fi.sha256) for rel, fi in s.files.items()]
        enc_dir = self.path / ENCODER_DIR
        files += [
            (enc_dir / rel, int(fi["size"]), str(fi["sha256"]))
            for rel, fi in m.encoder.get("files", {}).items()
        ]
        total = len(files) + 2
        progress("verify", 0, total)
        for i, (p, size, digest) in enumerate(files):
            if not p.is_file():
                problems.append(f"{p}: missing")
            elif p.stat().st_size != size:
                problems.append(f"{p}: {p.stat().st_size} bytes, the manifest recorded {size}")
            elif sha256_file(p) != digest:
                problems.append(f"{p}: checksum does not match the manifest (the file is damaged)")
            progress("verify", i + 1, total)
        tok = self.path / TOKENIZER_FILE
        if not tok.is_file():
            problems.append(f"{tok}: missing")
        elif "sha256:" + sha256_file(tok) != m.tokenizer["fingerprint"]:
            problems.append(f"{tok}: checksum does not match the manifest")
        if not problems:
            try:
                for s in self.segments:
                    _ = s.ids
                    if s.meta.chunks and (
                        int(s.num_chunks.sum()) != s.meta.chunks or int(s.lengths.min()) < 1
                    ):
                        problems.append(
                            f"{s.dir}: document table does not add up to the chunk count"
                        )
                    if s.key_array is not None and s.meta.chunks:
                        k = np.asarray(s.key_array)
                        if (
                            (np.diff(k) <= 0).any()
                            or k[0] < s.meta.first_key
                            or k[-1] >= s.meta.stop_key
                        ):
                            problems.append(f"{s.dir / 'keys'}: keys not sorted or out of range")
                for ix in self.indexes:
                    ix.index.size  # noqa: B018 - touching the mapping
            except CorruptError as exc:
                problems.append(str(exc))
        progress("verify", total, total)
        leftovers = self.storage.leftovers(m)
        removed: list[str] = []
        if repair and leftovers:
            with self.storage.writer_lock():
                self._load(self.storage.read_manifest())
                removed = [str(p) for p in self.storage.remove_leftovers(self.manifest)]
                leftovers = []
        return {
            "ok": not problems,
            "generation": m.generation,
            "files_checked": len(files) + 1,
            "problems": problems,
            "leftovers": [str(p) for p in leftovers],
            "removed": removed,
            "retained": sorted(
                str(self.storage.segment_dir(n)) for n in self.storage.retained(self.manifest)
            ),
        }


# ---------------------------------------------------------------- segment writing


@functools.lru_cache(maxsize=8)
def _prefix_masks(m: int) -> np.ndarray:
    """``[m + 1, m]`` bool: row n is True on its first n positions (a chunk of length n)."""
    return np.arange(m)[None, :] < np.arange(m + 1)[:, None]


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
        raise BadInputError(f"k must be a positive integer, got {k!r}")


def _next_manifest(
    prev: Manifest,
    *,
    segments: tuple[SegmentMeta, ...],
    next_key: int,
    tombstones: tuple[str, ...] | None = None,
) -> Manifest:
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


class _PieceTokenizer:
    """Tokenize a document piece by piece with exactly the ids of the whole text.

    Every piece after a document's first starts just after a newline or just before a
    space (see :meth:`Corpus.iter_pieces`). Encoded alone it would get SentencePiece's
    dummy prefix; encoded as ``"\n" + piece`` it is segmented exactly as inside the whole
    text (the newline is a piece of its own that no other piece crosses), so the ids up to
    and including that newline are dropped. A probe checks this once per tokenizer; one
    that fails it (no newline piece, other normalization) is given whole documents."""

    _PROBE = "Ab cd\n\nef  gh ij\n kl\tmn op\n\n\nqr st, uv wx yz.\nend"

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        ids = tok.encode(["\n"])[0]
        self.newline = ids[-1] if ids and tok.id_to_piece(ids[-1]) == "\n" else None
        self.exact = self.newline is not None and self._probe()

    def _probe(self) -> bool:
        text = self._PROBE
        whole = self.tok.encode([text])[0]
        cuts = [i + 1 for i, c in enumerate(text) if c == "\n"]
        cuts += [m.start() for m in corpus_mod._SPACE_CUT.finditer(text)]
        for cut in cuts:
            a, b = self.encode([(text[:cut], False), (text[cut:], True)])
            if a + b != whole:
                return False
        return True

    def encode(self, pieces: Sequence[tuple[str, bool]]) -> list[list[int]]:
        """Ids of each ``(piece, continues_a_document)``."""
        out = self.tok.encode(["\n" + p if cont else p for p, cont in pieces])
        for i, (_, cont) in enumerate(pieces):
            if cont:
                ids = out[i]
                out[i] = ids[ids.index(self.newline) + 1 :]
        return out


def _token_pieces(
    corpus: corpus_mod.Corpus, pt: _PieceTokenizer
) -> Iterator[tuple[int, list[int]]]:
    """``(document number, ids)`` for every piece of every document, in order, tokenized
    in batches of pieces (many small documents share one SentencePiece call)."""
    if pt.exact:
        pieces: Iterator[tuple[int, str]] = corpus.iter_pieces()
    else:
        pieces = ((i, text) for i, (_, text) in enumerate(corpus.iter_documents()))
    batch: list[tuple[int, str, bool]] = []
    chars = 0
    last = -1

    def flush() -> list[tuple[int, list[int]]]:
        ids = pt.encode([(p, cont) for _, p, cont in batch])
        out = [(d, i) for (d, _, _), i in zip(batch, ids, strict=True)]
        batch.clear()
        return out

    for doc, piece in pieces:
        batch.append((doc, piece, doc == last))
        last = doc
        chars += len(piece)
        if len(batch) >= _TOKENIZE_PIECES or chars >= _TOKENIZE_CHARS:
            yield from flush()
            chars = 0
    yield from flush()


class _Chunker:
    """Cuts a stream of document pieces' ids into rows of m tokens and appends them to a
    segment's ``tokens``, ``lengths`` and ``doc`` files; keeps the per-document table.
    Memory: one block of rows plus the ids of the current piece."""

    def __init__(self, directory: Path, m: int, pad_id: int, dtype: np.dtype) -> None:
        self.m = m
        self.tokens = RawArrayWriter(directory, "tokens", dtype, (m,))
        self.lengths = RawArrayWriter(directory, "lengths", np.int32)
        self.doc = RawArrayWriter(directory, "doc", np.int32)
        self.buf_tokens = np.full((_ROW_BLOCK, m), pad_id, dtype=dtype)
        self.buf_lengths = np.zeros(_ROW_BLOCK, np.int32)
        self.buf_doc = np.zeros(_ROW_BLOCK, np.int32)
        self.pad_id = pad_id
        self.filled = 0
        self.rows = 0
        self.pending = np.zeros(0, np.int64)
        self.first_chunk: list[int] = []
        self.num_tokens: list[int] = []

    def start(self) -> None:
        self.end()
        self.first_chunk.append(self.rows)
        self.num_tokens.append(0)

    def feed(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        self.num_tokens[-1] += arr.size
        if self.pending.size:
            arr = np.concatenate([self.pending, arr])
        full = arr.size // self.m
        if full:
            self._emit(arr[: full * self.m].reshape(full, self.m), self.m)
        self.pending = arr[full * self.m :]

    def end(self) -> None:
        """Finish the current document: its last, padded chunk (an empty document still
        gets one chunk, of length 0)."""
        if not self.first_chunk:
            return
        if self.pending.size or self.rows == self.first_chunk[-1]:
            row = np.full((1, self.m), self.pad_id, dtype=np.int64)
            row[0, : self.pending.size] = self.pending
            self._emit(row, self.pending.size)
            self.pending = np.zeros(0, np.int64)

    def _emit(self, rows: np.ndarray, length: int) -> None:
        doc = len(self.first_chunk) - 1
        done = 0
        while done < rows.shape[0]:
            take = min(rows.shape[0] - done, _ROW_BLOCK - self.filled)
            sl = slice(self.filled, self.filled + take)
            self.buf_tokens[sl] = rows[done : done + take]
            self.buf_lengths[sl] = length
            self.buf_doc[sl] = doc
            self.filled += take
            self.rows += take
            done += take
            if self.filled == _ROW_BLOCK:
                self._flush()

    def _flush(self) -> None:
        n = self.filled
        self.tokens.append(self.buf_tokens[:n])
        self.lengths.append(self.buf_lengths[:n])
        self.doc.append(self.buf_doc[:n])
        self.buf_tokens[:n] = self.pad_id
        self.filled = 0

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Close the arrays; returns ``first_chunk``, ``num_chunks`` and ``num_tokens``."""
        self.end()
        self._flush()
        for w in (self.tokens, self.lengths, self.doc):
            w.finish()
        first = np.array(self.first_chunk, dtype=np.int64)
        num = np.diff(np.append(first, self.rows)).astype(np.int32)
        return first, num, np.array(self.num_tokens, dtype=np.int64)


def _write_segment(
    store: Storage,
    corpus: corpus_mod.Corpus,
    tok: Tokenizer,
    enc: Encoder,
    config: DBConfig,
    *,
    first_key: int,
    generation: int,
    progress: ProgressFn,
) -> SegmentMeta:
    """Tokenize, chunk, encode and index ``corpus`` into a new sealed segment directory.

    Two streaming passes, so memory stays bounded whatever the size of the input or of
    one document: (1) documents are read and tokenized piece by piece and their chunk
    rows appended to the segment's files; (2) the rows are read back through a memory
    map in windows of ``_ENCODE_WINDOW``, decoded, encoded (sorted by length inside the
    window) and added to the index. Only the index being built lives in RAM."""
    m = config.chunk.chunk_size
    name = f"{generation:06d}-{secrets.token_hex(4)}"
    tmp = store.new_segment_dir(name)
    n_docs = len(corpus)
    progress("tokenize", 0, n_docs)
    chunker = _Chunker(tmp, m, tok.pad_id, tok.token_dtype)
    doc = -1
    for d, ids in _token_pieces(corpus, _PieceTokenizer(tok)):
        if d != doc:
            if doc >= 0 and d % 64 == 0:
                progress("tokenize", d, n_docs)
            chunker.start()
            doc = d
        chunker.feed(ids)
    failpoint("after_tokenize", tmp)
    first_chunk, num_chunks, n_tokens = chunker.finish()
    progress("tokenize", n_docs, n_docs)
    n = chunker.rows
    write_array(tmp, "docs/ids", np.array(corpus.ids, dtype=object))
    write_array(tmp, "docs/first_chunk", first_chunk)
    write_array(tmp, "docs/num_chunks", num_chunks)
    write_array(tmp, "docs/num_tokens", n_tokens)
    failpoint("after_segment_arrays", tmp)

    tokens = open_raw_array(tmp / "tokens", dtype=tok.token_dtype, shape=(n, m))
    lengths = open_raw_array(tmp / "lengths", dtype=np.dtype(np.int32), shape=(n,))
    builder = IndexBuilder(enc.dim, config.index)
    progress("encode", 0, n)
    for start in range(0, n, _ENCODE_WINDOW):
        stop = min(n, start + _ENCODE_WINDOW)
        texts = tok.decode_many(
            [r[:length] for r, length in zip(tokens[start:stop], lengths[start:stop], strict=True)]
        )
        vectors = enc.encode(
            texts,
            batch_size=config.encoder.batch_size,
            progress=lambda _s, done, _t, start=start: progress("encode", start + done, n),
        )
        builder.add(np.arange(first_key + start, first_key + stop, dtype=np.int64), vectors)
        progress("index", stop, n)
        failpoint("during_encode", tmp)
    del tokens, lengths
    guard = builder.save(tmp / INDEX_FILE)
    del builder
    files = store.seal_segment(tmp, name)
    return SegmentMeta(
        name=name,
        first_key=first_key,
        chunks=n,
        documents=n_docs,
        tokens=int(n_tokens.sum()),
        files=files,
        index_guard=guard,
    )


def _compact_segments(db: RetroDB, *, generation: int, progress: ProgressFn) -> SegmentMeta | None:
    """Copy the live rows of every segment of ``db`` into one new sealed segment.

    Rows keep their keys (stored in a ``keys`` array when they are no longer contiguous)
    and their vectors, read back from the old indexes: nothing is encoded. None when no
    live document is left."""
    dead = set(db.manifest.tombstones)
    m = db.chunk_size
    name = f"{generation:06d}-{secrets.token_hex(4)}"
    tmp = db.storage.new_segment_dir(name)
    tokens = RawArrayWriter(tmp, "tokens", db.token_dtype, (m,))
    lengths = RawArrayWriter(tmp, "lengths", np.int32)
    docs = RawArrayWriter(tmp, "doc", np.int32)
    keys_w = RawArrayWriter(tmp, "keys", np.int64)
    builder = IndexBuilder(db.dim, db.config.index)
    ids: list[str] = []
    num_chunks: list[np.ndarray] = []
    num_tokens: list[np.ndarray] = []
    first = last = -1
    total = db.manifest.chunks
    done = 0
    progress("compact", 0, total)
    for si, seg in enumerate(db.segments):
        live = np.array([i not in dead for i in seg.ids], dtype=bool)
        if live.any():
            number = (np.cumsum(live) - 1 + len(ids)).astype(np.int32)  # new document numbers
            seg_doc = np.asarray(seg.doc)
            rows = np.nonzero(live[seg_doc])[0]
            for start in range(0, rows.size, _ENCODE_WINDOW):
                r = rows[start : start + _ENCODE_WINDOW]
                keys = seg.row_keys(r)
                tokens.append(seg.tokens[r])
                lengths.append(seg.lengths[r])
                docs.append(number[seg_doc[r]])
                keys_w.append(keys)
                builder.add(keys, db.indexes[si].vectors(keys))
                first = int(keys[0]) if first < 0 else first
                last = int(keys[-1])
            ids += [i for i, ok in zip(seg.ids, live, strict=True) if ok]
            num_chunks.append(np.asarray(seg.num_chunks)[live])
            num_tokens.append(
                open_raw_array(
                    seg.dir / "docs" / "num_tokens",
                    dtype=np.dtype(np.int64),
                    shape=(seg.meta.documents,),
                )[live]
            )
        done += seg.meta.chunks
        progress("compact", done, total)
    n = tokens.rows
    if n == 0:
        for w in (tokens, lengths, docs, keys_w):
            w.discard()
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    for w in (tokens, lengths, docs):
        w.finish()
    contiguous = last - first + 1 == n
    if contiguous:
        keys_w.discard()
    else:
        keys_w.finish()
    counts = np.concatenate(num_chunks).astype(np.int32)
    n_tokens = np.concatenate(num_tokens).astype(np.int64)
    write_array(tmp, "docs/ids", np.array(ids, dtype=object))
    write_array(tmp, "docs/first_chunk", (np.cumsum(counts) - counts).astype(np.int64))
    write_array(tmp, "docs/num_chunks", counts)
    write_array(tmp, "docs/num_tokens", n_tokens)
    failpoint("after_segment_arrays", tmp)
    guard = builder.save(tmp / INDEX_FILE)
    del builder
    files = db.storage.seal_segment(tmp, name)
    return SegmentMeta(
        name=name,
        first_key=first,
        chunks=n,
        documents=len(ids),
        tokens=int(n_tokens.sum()),
        files=files,
        key_stop=None if contiguous else last + 1,
        index_guard=guard,
    )


__all__ = ["AddResult", "CompactResult", "DeleteResult", "Retrieved", "RetroDB", "SearchResult"]
