"""RetroDB: build, add, search and retrieve over the modules beside this one."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from . import corpus as corpus_mod
from .chunking import chunk_documents
from .config import FORMAT_VERSION, DBConfig
from .errors import BadInputError, CorruptError, MismatchError, NotFoundError
from .index import SegmentIndex, build_index, check_vectors, search_segments
from .progress import ProgressFn, no_progress
from .storage import (
    ENCODER_DIR,
    INDEX_FILE,
    TOKENIZER_FILE,
    Manifest,
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

#: Documents tokenized per SentencePiece call while writing a segment.
_TOKENIZE_BATCH = 256


@dataclass(frozen=True, slots=True)
class SearchResult:
    """``keys [q, k]`` int64 (-1 where fewer than k exist) and cosine ``distances [q, k]``."""

    keys: np.ndarray
    distances: np.ndarray


@dataclass(frozen=True, slots=True)
class Retrieved:
    """Neighbours with continuations: ``tokens [..., 2m]`` and ``mask [..., 2m]`` (True = real token).

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
        self._load(self.storage.read_manifest())
        self._encoder: Encoder | None = None

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path, *, threads: int | None = None) -> RetroDB:
        """Open the committed generation of the database at ``path``."""
        return cls(path, threads=threads)

    def _load(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.config = DBConfig.from_dict(manifest.config)
        self.chunk_size = self.config.chunk.chunk_size
        tok_path = self.path / TOKENIZER_FILE
        self.tokenizer = Tokenizer.load(tok_path) if tok_path.exists() else None
        if self.tokenizer is None:
            raise CorruptError(f"{tok_path}: tokenizer model missing")
        if self.tokenizer.fingerprint != manifest.tokenizer["fingerprint"]:
            raise MismatchError(
                f"{tok_path}: tokenizer fingerprint {self.tokenizer.fingerprint[:19]}… does not "
                f"match the manifest's {manifest.tokenizer['fingerprint'][:19]}…"
            )
        self.token_dtype = np.dtype(manifest.tokenizer["token_dtype"])
        self.pad_id = int(manifest.tokenizer["pad_id"])
        self.dim = int(manifest.encoder["dim"])
        self.segments = [
            Segment(self.storage.segment_dir(s.name), s, self.chunk_size, self.token_dtype)
            for s in manifest.segments
        ]
        self._first_keys = np.array([s.first_key for s in manifest.segments], dtype=np.int64)
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

            enc = Encoder.open(self.path / ENCODER_DIR, threads=self.threads)
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
        if self._indexes is None:
            self._indexes = [
                SegmentIndex.open(
                    seg.dir / INDEX_FILE,
                    first_key=seg.meta.first_key,
                    count=seg.meta.chunks,
                    ndim=self.dim,
                    expected_size=seg.index_file_size(),
                    config=self.config.index,
                )
                for seg in self.segments
            ]
        return self._indexes

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
                tok = Tokenizer.train(
                    (t for _, t in corpus.iter_documents()), config=config.tokenizer
                )
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
                        f"{tokenizer}: tokenizer does not match the database's ({self.path / TOKENIZER_FILE})"
                    )
            if encoder is not None:
                self._check_encoder_matches(Path(encoder))
            corpus = corpus_mod.scan(inputs, errors=errors, stdin=stdin)
            try:
                existing = self.doc_index()
                dups = [i for i in corpus.ids if i in existing]
                if dups:
                    more = f" (and {len(dups) - 1} more)" if len(dups) > 1 else ""
                    raise BadInputError(f"document id {dups[0]!r} is already in the database{more}")
                enc = self.encoder
                self.storage.remove_leftovers(self.manifest)
                gen = self.manifest.generation + 1
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
        self._load(self.storage.read_manifest(name))
        return True

    # ------------------------------------------------------------ documents and keys

    def doc_index(self) -> dict[str, tuple[int, int]]:
        """Document id -> (segment number, local document number), for live and deleted documents."""
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
        seg = np.searchsorted(self._first_keys, keys, side="right") - 1
        seg = np.clip(seg, 0, max(0, len(self.segments) - 1))
        if not self.segments:
            return np.full(keys.shape, -1, np.int64), np.full(keys.shape, -1, np.int64)
        first = self._first_keys[seg]
        count = np.array([s.meta.chunks for s in self.segments], dtype=np.int64)[seg]
        row = keys - first
        ok = (keys >= 0) & (row >= 0) & (row < count)
        return np.where(ok, seg, -1), np.where(ok, row, -1)

    def key_documents(self, keys: np.ndarray) -> list[str | None]:
        """The document id of each key (None for -1)."""
        seg, row = self.locate(np.asarray(keys).ravel())
        out: list[str | None] = []
        for s, r in zip(seg.tolist(), row.tolist(), strict=True):
            out.append(None if s < 0 else self.segments[s].ids[int(self.segments[s].doc[r])])
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
                    start = seg.meta.first_key + int(seg.first_chunk[di])
                    dead[start : start + int(seg.num_chunks[di])] = True
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
        exclude_keys_of: Any = None,
    ) -> SearchResult:
        """The ``k`` nearest chunks of each query, best first.

        ``queries`` is a list of texts or an integer array of token chunks ``[q, m]``."""
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
        if not isinstance(k, int | np.integer) or k <= 0:
            raise BadInputError(f"k must be a positive integer, got {k!r}")
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
        """Token rows ``[..., m]`` (int64, padded) and lengths of ``keys``; -1 gives padding, length 0."""
        keys = np.asarray(keys, dtype=np.int64)
        flat = keys.ravel()
        seg, row = self.locate(flat)
        if ((flat >= 0) & (seg < 0)).any():
            bad = flat[(flat >= 0) & (seg < 0)][0]
            raise BadInputError(
                f"key {int(bad)} is not in the database (keys are 0..{self.manifest.next_key - 1})"
            )
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
                r = row[sel]
                nxt = r + 1
                inside = nxt < s.meta.chunks
                same = np.zeros(r.shape, dtype=bool)
                same[inside] = s.doc[nxt[inside]] == s.doc[r[inside]]
                out[sel[same]] = flat[sel[same]] + 1
        return out.reshape(keys.shape)

    def retrieve(self, keys: np.ndarray) -> Retrieved:
        """Neighbour + continuation tokens for ``keys [...]``: ``tokens [..., 2m]`` int64 and
        ``mask [..., 2m]`` bool. Key -1 gives an all-padding, all-False row."""
        keys = np.asarray(keys, dtype=np.int64)
        m = self.chunk_size
        both = np.stack([keys, self.continuation_keys(keys)], axis=-1)  # (..., 2)
        toks, lens = self.chunks(both)  # (..., 2, m), (..., 2)
        mask = np.arange(m)[None, :] < lens.reshape(-1, 1)
        mask = mask.reshape(*keys.shape, 2 * m)
        return Retrieved(tokens=toks.reshape(*keys.shape, 2 * m), mask=mask)

    def decode(self, keys: Sequence[int] | np.ndarray) -> list[str]:
        """The text of each key's chunk ('' for -1)."""
        toks, lens = self.chunks(np.asarray(keys, dtype=np.int64).ravel())
        return [
            self.tokenizer.decode(t[: int(n)]) if n else "" for t, n in zip(toks, lens, strict=True)
        ]

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
                    if int(s.num_chunks.sum()) != s.meta.chunks or int(s.lengths.min()) < 1:
                        problems.append(
                            f"{s.dir}: document table does not add up to the chunk count"
                        )
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
        }


# ---------------------------------------------------------------- segment writing


def _next_manifest(
    prev: Manifest,
    *,
    segments: tuple[SegmentMeta, ...],
    next_key: int,
    tombstones: tuple[str, ...] | None = None,
) -> Manifest:
    return Manifest(
        generation=prev.generation + 1,
        config=prev.config,
        tokenizer=prev.tokenizer,
        encoder=prev.encoder,
        next_key=next_key,
        segments=segments,
        tombstones=prev.tombstones if tombstones is None else tombstones,
        features=prev.features,
        format_version=FORMAT_VERSION,
    )


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
    """Tokenize, chunk, encode and index ``corpus`` into a new sealed segment directory."""
    m = config.chunk.chunk_size
    ids: list[str] = []
    token_lists: list[list[int]] = []
    n_docs = len(corpus)
    progress("tokenize", 0, n_docs)
    batch_ids: list[str] = []
    batch_texts: list[str] = []

    def flush() -> None:
        token_lists.extend(tok.encode(batch_texts))
        ids.extend(batch_ids)
        batch_ids.clear()
        batch_texts.clear()
        progress("tokenize", len(ids), n_docs)

    for doc_id, text in corpus.iter_documents():
        batch_ids.append(doc_id)
        batch_texts.append(text)
        if len(batch_texts) >= _TOKENIZE_BATCH:
            flush()
    flush()
    chunks, lengths, doc = chunk_documents(token_lists, m, pad_id=tok.pad_id, dtype=tok.token_dtype)
    n_tokens = np.array([len(t) for t in token_lists], dtype=np.int64)
    del token_lists
    num_chunks = np.bincount(doc, minlength=len(ids)).astype(np.int32)
    first_chunk = np.concatenate([[0], np.cumsum(num_chunks)[:-1]]).astype(np.int64)

    texts = tok.decode_many([c[: int(n)] for c, n in zip(chunks, lengths, strict=True)])
    vectors = enc.encode(
        texts, batch_size=config.encoder.batch_size, progress=progress, stage="encode"
    )
    del texts
    keys = np.arange(first_key, first_key + chunks.shape[0], dtype=np.int64)

    name = f"{generation:06d}-{secrets.token_hex(4)}"
    tmp = store.new_segment_dir(name)
    write_array(tmp, "tokens", chunks)
    write_array(tmp, "lengths", lengths.astype(np.int32))
    write_array(tmp, "doc", doc.astype(np.int32))
    write_array(tmp, "docs/ids", np.array(ids, dtype=object))
    write_array(tmp, "docs/first_chunk", first_chunk)
    write_array(tmp, "docs/num_chunks", num_chunks)
    write_array(tmp, "docs/num_tokens", n_tokens)
    build_index(tmp / INDEX_FILE, keys, vectors, config=config.index, progress=progress)
    files = store.seal_segment(tmp, name)
    return SegmentMeta(
        name=name,
        first_key=first_key,
        chunks=int(chunks.shape[0]),
        documents=len(ids),
        tokens=int(n_tokens.sum()),
        files=files,
    )


__all__ = ["AddResult", "Retrieved", "RetroDB", "SearchResult"]
