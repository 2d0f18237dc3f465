"""RetroDB: the facade over the modules beside this one.

Opening (a read-only snapshot of one committed generation, checked cheaply), the write
transactions (:mod:`.writer`), search (:mod:`.search`), key access (:mod:`.keys`) and
verification (:mod:`.verify`) are each one call away; this class holds no logic of its
own beyond wiring them to one generation.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from . import corpus as corpus_mod
from . import writer
from .config import DBConfig
from .errors import BadInputError, CorruptError, MismatchError, NotFoundError
from .index import SegmentIndex, check_vectors
from .ingest import encode_ids, open_encoder
from .keys import KeyMap, Retrieved
from .progress import ProgressFn, no_progress
from .rerank import rerank_search, resolve_fetch
from .search import Exclusion, SearchResult, check_k, search_filtered
from .segment import Segment
from .storage import ENCODER_DIR, TOKENIZER_FILE, Manifest, Storage
from .tokenizer import Tokenizer, fingerprint
from .verify import VerifyReport, verify
from .writer import AddResult, BuildResult, CompactResult, DeleteResult, SegmentEngine

if TYPE_CHECKING:
    from .encoder import Encoder


@dataclass(frozen=True, slots=True)
class Hit:
    """One neighbour of a query: its key, document, distance, text and continuation."""

    key: int
    doc: str
    distance: float
    text: str
    continuation: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "doc": self.doc,
            "distance": self.distance,
            "text": self.text,
            "continuation": self.continuation,
        }


@dataclass(frozen=True, slots=True)
class QueryResult:
    """A query text and its neighbours, best first (fewer than k when fewer exist)."""

    query: str
    neighbours: list[Hit]

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "neighbours": [h.to_dict() for h in self.neighbours]}


class RetroDB:
    """A retrieval database on disk.

    Open one with :meth:`open` (a read-only snapshot of the committed generation) or
    create one with :meth:`build`. :meth:`add`, :meth:`delete` and :meth:`compact` commit
    a new generation and move this object to it. Objects are not thread-safe for writing;
    any number of processes may read while one writes.

    >>> db = RetroDB.open("my.retrodb")                         # doctest: +SKIP
    >>> res = db.search("how to open a file", k=4)              # doctest: +SKIP
    >>> db.retrieve(res.keys).tokens.shape                      # doctest: +SKIP
    (1, 4, 128)
    """

    def __init__(
        self, path: str | Path, *, threads: int | None = None, device: str = "cpu"
    ) -> None:
        self.storage = Storage(path)
        self.path = self.storage.root
        self.threads = threads
        self.device = device
        """Where the encoder runs: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
        self.tokenizer: Tokenizer | None = None
        self._encoder: Encoder | None = None
        self.last_build: BuildResult | None = None
        """What :meth:`build` did (documents, chunks, skipped inputs); None when opened."""
        self._load_current()

    @classmethod
    def open(cls, path: str | Path, *, threads: int | None = None, device: str = "cpu") -> RetroDB:
        """Open the committed generation of the database at ``path``. ``threads``: the
        encoder's CPU threads; ``device``: where the encoder runs (``cpu``, ``cuda``,
        ``cuda:N`` or ``auto``; checked when the encoder is first used)."""
        return cls(path, threads=threads, device=device)

    # ------------------------------------------------------------ loading a generation

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

    def _load_tokenizer(self, expected: str) -> None:
        if self.tokenizer is not None and self.tokenizer.fingerprint == expected:
            return
        tok_path = self.path / TOKENIZER_FILE
        # Hash before parsing: a damaged model is reported, never handed to SentencePiece.
        try:
            data = tok_path.read_bytes()
        except FileNotFoundError as exc:
            raise CorruptError(f"{tok_path}: tokenizer model missing") from exc
        found = fingerprint(data)
        if found != expected:
            raise MismatchError(
                f"{tok_path}: tokenizer fingerprint {found[:19]}… does not match the "
                f"manifest's {expected[:19]}… (the file was replaced or is damaged)"
            )
        self.tokenizer = Tokenizer(data, path=tok_path)

    def _load(self, manifest: Manifest) -> None:
        config = DBConfig.from_dict(manifest.config)
        self._load_tokenizer(manifest.tokenizer["fingerprint"])
        token_dtype = np.dtype(manifest.tokenizer["token_dtype"])
        m = config.chunk.chunk_size
        segments = [
            Segment(self.storage.segment_dir(s.name), s, m, token_dtype) for s in manifest.segments
        ]
        self.manifest = manifest
        self.config = config
        self.chunk_size = m
        self.token_dtype = token_dtype
        self.pad_id = int(manifest.tokenizer["pad_id"])
        self.dim = int(manifest.encoder["dim"])
        self.keymap = KeyMap(
            segments,
            tombstones=manifest.tombstones,
            next_key=manifest.next_key,
            chunk_size=m,
            pad_id=self.pad_id,
        )
        self._indexes: list[SegmentIndex] | None = None

    def refresh(self) -> bool:
        """Move to the latest committed generation; True if it changed."""
        name = self.storage.current_name()
        if name == f"{self.manifest.generation:06d}.json":
            return False
        self._load_current(name)
        return True

    @property
    def generation(self) -> int:
        return self.manifest.generation

    @property
    def segments(self) -> list[Segment]:
        return self.keymap.segments

    @property
    def encoder(self) -> Encoder:
        """The database's ONNX encoder (opened on first use, checked against the manifest)."""
        if self._encoder is None:
            from .encoder import same_fingerprint

            enc_dir = self.path / ENCODER_DIR
            for rel, fi in self.manifest.encoder.get("files", {}).items():
                p = enc_dir / rel
                try:
                    size = p.stat().st_size
                except FileNotFoundError as exc:
                    raise CorruptError(f"{p}: missing") from exc
                if size != int(fi["size"]):
                    raise CorruptError(f"{p}: {size} bytes, the manifest recorded {fi['size']}")
            enc = open_encoder(
                enc_dir, self.config.encoder, threads=self.threads, device=self.device
            )
            if not same_fingerprint(enc.fingerprint, self.manifest.encoder["fingerprint"]):
                raise MismatchError(
                    f"{enc_dir}: encoder fingerprint does not match the manifest "
                    f"(the encoder files were changed after the database was built)"
                )
            if enc.dim != self.dim:
                raise MismatchError(f"{enc_dir}: encoder dimension {enc.dim}, manifest {self.dim}")
            self._encoder = enc
        return self._encoder

    @property
    def indexes(self) -> list[SegmentIndex]:
        """The segments' indexes, mapped on first use."""
        if self._indexes is None:
            try:
                self._indexes = [
                    s.open_index(dim=self.dim, config=self.config.index) for s in self.segments
                ]
            except CorruptError as exc:
                newer = self.storage.current_name()
                if newer != f"{self.generation:06d}.json":
                    raise CorruptError(
                        f"{exc} (this object holds generation {self.generation}; the database "
                        f"is at {newer.split('.')[0].lstrip('0')}: call refresh())"
                    ) from exc
                raise
        return self._indexes

    def check_encoder_matches(self, source: Path) -> None:
        """Refuse an encoder (a checkpoint, .onnx or encoder directory) that differs from
        the database's."""
        from .encoder import Encoder, prepare_encoder, same_fingerprint

        if not source.exists():
            raise NotFoundError(f"{source}: encoder not found")
        if (source / "encoder.json").exists():
            other = Encoder.open(source)
        else:
            with tempfile.TemporaryDirectory() as td:
                prepare_encoder(source, Path(td) / "enc", config=self.config.encoder)
                other = Encoder.open(Path(td) / "enc")
        if not same_fingerprint(other.fingerprint, self.manifest.encoder["fingerprint"]):
            raise MismatchError(
                f"{source}: encoder does not match the database's ({self.path / ENCODER_DIR})"
            )

    # ------------------------------------------------------------ writing

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
        device: str = "cpu",
        engine: SegmentEngine | None = None,
    ) -> RetroDB:
        """Build a new database at ``path`` from ``inputs``.

        ``tokenizer``: an existing SentencePiece model file (else one is trained on the
        inputs). ``encoder``: a local Hugging Face BERT checkpoint, an encoder directory or
        an exported ``.onnx`` (else the bundled all-MiniLM-L6-v2). ``engine``: where the
        segments are written (e.g. ``retrodb.ray_engine.RayEngine(workers=4)``; default:
        one segment, in this process). A failed build leaves nothing behind. What was
        built, and which inputs were skipped and why, is in :attr:`last_build` of the
        returned database."""
        path = Path(path)
        enc, result = writer.build(
            path,
            inputs,
            config=config or DBConfig(),
            tokenizer=tokenizer,
            encoder=encoder,
            errors=errors,
            stdin=stdin,
            progress=progress,
            threads=threads,
            device=device,
            engine=engine,
        )
        db = cls(path, threads=threads, device=device)
        if engine is None:
            db._encoder = enc  # the same files, checked at build: no second load
        db.last_build = result
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
        engine: SegmentEngine | None = None,
    ) -> AddResult:
        """Add documents as a new segment and commit a new generation.

        Nothing stored is re-encoded and no model is retrained. ``tokenizer``/``encoder``,
        when given, must be the ones the database was built with (a guard for scripts).
        Every input is validated before anything is written. ``engine``: as for
        :meth:`build` (it may write several segments, committed together)."""
        return writer.add(
            self,
            inputs,
            errors=errors,
            stdin=stdin,
            progress=progress,
            tokenizer=tokenizer,
            encoder=encoder,
            engine=engine,
        )

    def delete(self, doc_ids: Sequence[str]) -> DeleteResult:
        """Delete documents: a new generation whose manifest lists them as tombstones.

        Their chunks disappear from every search, neighbour set and continuation lookup at
        once; :meth:`compact` drops their rows from disk later. Unknown or already deleted
        ids are refused (nothing is written)."""
        return writer.delete(self, doc_ids)

    def compact(self, *, force: bool = False, progress: ProgressFn = no_progress) -> CompactResult:
        """Merge every segment into one new segment without the rows of deleted documents.

        No chunk is encoded again (the vectors are read back from the old indexes) and no
        live key changes. The merged-away segments stay on disk for one more generation, for
        readers that opened the previous one; the writer after that removes them. With
        nothing to merge or drop it does nothing, unless ``force`` (which rebuilds the
        index, e.g. to give an index written before side lists one)."""
        return writer.compact(self, force=force, progress=progress)

    # ------------------------------------------------------------ documents and keys

    def doc_index(self) -> dict[str, tuple[int, int]]:
        """Document id -> (segment number, local document number), live and deleted."""
        return self.keymap.doc_index()

    def locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment number and row of each key; -1 for -1 or unknown keys."""
        return self.keymap.locate(keys)

    def key_documents(self, keys: np.ndarray) -> list[str | None]:
        """The document id of each key (None for -1)."""
        return self.keymap.documents_of(keys)

    def key_doc_numbers(self, keys: np.ndarray) -> np.ndarray:
        """A global document number per key (stable within this generation), -1 for -1."""
        return self.keymap.doc_numbers(keys)

    def deleted_mask(self, keys: np.ndarray) -> np.ndarray:
        """True for keys of deleted documents."""
        return self.keymap.deleted(keys)

    # ------------------------------------------------------------ encoding and search

    def encode_texts(
        self, texts: Sequence[str] | str, *, progress: ProgressFn = no_progress
    ) -> np.ndarray:
        """Keys of query texts (one string is one query): the text goes through the
        database's SentencePiece round trip, so it is normalised exactly as stored chunks
        are, then the one encode function."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise BadInputError("empty query: a query must contain some text")
        assert self.tokenizer is not None
        return encode_ids(
            self.tokenizer,
            self.encoder,
            self.tokenizer.encode(texts),
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
        assert self.tokenizer is not None
        return encode_ids(
            self.tokenizer,
            self.encoder,
            [c[: int(n)] for c, n in zip(chunks, lengths, strict=True)],
            progress=progress,
        )

    def search(
        self,
        queries: str | Sequence[str] | np.ndarray,
        k: int = 4,
        *,
        exact: bool = False,
    ) -> SearchResult:
        """The ``k`` nearest chunks of each query, best first: ``keys [q, k]``.

        ``queries``: one text (q = 1), a list of texts, or an integer array of token
        chunks ``[q, m]``."""
        check_k(k)
        if isinstance(queries, np.ndarray) and np.issubdtype(queries.dtype, np.integer):
            vectors = self.encode_chunks(queries)
        else:
            vectors = self.encode_texts(queries)  # type: ignore[arg-type]
        return self.search_vectors(vectors, k, exact=exact)

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 4,
        *,
        exact: bool = False,
        exclusion: Exclusion | None = None,
        segments: Sequence[int] | None = None,
    ) -> SearchResult:
        """Search by key vectors ``[q, d]``. Deleted documents are never returned;
        ``exclusion`` drops more (a query's own document, listed documents, key ranges);
        ``segments`` restricts the search to some segments (by position)."""
        k = check_k(k)
        vectors = check_vectors(vectors, self.dim)
        idx = self.indexes if segments is None else [self.indexes[i] for i in segments]
        return search_filtered(self.keymap, idx, vectors, k, exact=exact, exclusion=exclusion)

    # ------------------------------------------------------------ reading chunks

    def chunks(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token rows ``[..., m]`` (int64, padded) and lengths of ``keys``; -1 gives padding,
        length 0."""
        return self.keymap.chunks(keys)

    def continuation_keys(self, keys: np.ndarray) -> np.ndarray:
        """The key of each key's continuation (next chunk of the same document) or -1."""
        return self.keymap.continuation_keys(keys)

    def retrieve(self, keys: np.ndarray) -> Retrieved:
        """Neighbour + continuation tokens for ``keys [...]``: ``tokens [..., 2m]`` int64 and
        ``mask [..., 2m]`` bool. Key -1 gives an all-padding, all-False row."""
        return self.keymap.gather(keys)

    def decode(self, keys: Sequence[int] | np.ndarray) -> list[str]:
        """The text of each key's chunk ('' for -1)."""
        flat = np.asarray(keys, dtype=np.int64).ravel()
        toks, lens = self.chunks(flat)
        assert self.tokenizer is not None
        try:
            return [
                self.tokenizer.decode(t[: int(n)]) if n else ""
                for t, n in zip(toks, lens, strict=True)
            ]
        except IndexError as exc:  # a token id past the vocabulary: damaged tokens
            seg, _ = self.locate(flat)
            files = sorted({str(self.segments[s].dir / "tokens") for s in seg.tolist() if s >= 0})
            raise CorruptError(f"{', '.join(files)}: token id out of range ({exc})") from exc

    def continuation_text(self, keys: Sequence[int] | np.ndarray) -> list[str]:
        return self.decode(self.continuation_keys(np.asarray(keys, dtype=np.int64)))

    def lookup(self, keys: np.ndarray, distances: np.ndarray | None = None) -> list[Hit]:
        """One :class:`Hit` (key, document, text, continuation) per key other than -1."""
        flat = np.asarray(keys, dtype=np.int64).ravel()
        dist = np.full(flat.shape, np.nan) if distances is None else np.asarray(distances).ravel()
        real = flat >= 0
        flat, dist = flat[real], dist[real]
        texts = self.decode(flat)
        conts = self.continuation_text(flat)
        docs = self.key_documents(flat)
        return [
            Hit(key=int(k), doc=str(d), distance=float(x), text=t, continuation=c)
            for k, d, x, t, c in zip(flat, docs, dist, texts, conts, strict=True)
        ]

    def query(
        self,
        texts: str | Sequence[str],
        k: int = 4,
        *,
        exact: bool = False,
        rerank: str = "none",
        fetch: int | None = None,
    ) -> list[QueryResult]:
        """Search each text and look its neighbours up: what `retrodb query` prints.

        ``rerank="overlap"``: fetch ``fetch * k`` dense candidates (default 4 per kept
        neighbour) and keep the k sharing the longest token run with the text (see
        :mod:`.rerank`); their distances stay the dense ones."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        fetch = resolve_fetch(rerank, fetch)
        if rerank == "overlap":
            res = rerank_search(self, texts, k, fetch=fetch, exact=exact)
        else:
            res = self.search(texts, k, exact=exact)
        return [
            QueryResult(query=q, neighbours=self.lookup(res.keys[i], res.distances[i]))
            for i, q in enumerate(texts)
        ]

    # ------------------------------------------------------------ reporting

    def info(self) -> dict[str, Any]:
        """A summary of the committed generation (what `retrodb info --json` prints).

        ``documents`` and ``live_chunks`` count what searches can return; ``chunks`` and
        ``tokens`` count what is stored, the rows of deleted documents included until
        :meth:`compact`. ``tokenizer.trainer`` is how the tokenizer was trained (None when
        it was given, or for databases built before it was recorded); ``bytes.shared``:
        bytes that are hard links shared with other databases (the encoder)."""
        m = self.manifest
        return {
            "path": str(self.path),
            "format_version": m.format_version,
            "generation": m.generation,
            "documents": m.documents,
            "deleted_documents": len(m.tombstones),
            "chunks": m.chunks,
            "live_chunks": m.chunks - self.keymap.deleted_chunks(),
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
                k: m.tokenizer.get(k)
                for k in ("fingerprint", "vocab_size", "pad_id", "token_dtype", "trainer")
            },
            "encoder": {
                # ``sha256:<hex>``, also for databases whose manifest records the bare hex
                "fingerprint": "sha256:" + str(m.encoder["fingerprint"]).removeprefix("sha256:"),
                "dim": m.encoder["dim"],
            },
            "bytes": self.storage.disk_usage(),
        }

    def verify(self, *, repair: bool = False, progress: ProgressFn = no_progress) -> VerifyReport:
        """Check every committed file against the sizes and checksums in the manifest, open
        every array and index, and list what an interrupted writer left behind.
        ``repair`` removes those leftovers (under the writer lock); committed data is never
        changed."""
        return verify(self, repair=repair, progress=progress)


__all__ = [
    "AddResult",
    "BuildResult",
    "CompactResult",
    "DeleteResult",
    "Hit",
    "QueryResult",
    "Retrieved",
    "RetroDB",
    "SearchResult",
]
