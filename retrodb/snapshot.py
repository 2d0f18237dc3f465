"""Snapshot: one committed generation of a database, read-only.

A snapshot holds what a reader needs of one generation: the storage, the manifest, the
configuration, the tokenizer, the key map, and the segments' indexes and the encoder (both
opened on first use, the encoder checked against the manifest). It never changes: a
writer commits a new generation and :class:`~retrodb.db.RetroDB` swaps its snapshot for a
new one (:meth:`Snapshot.at`, :meth:`Snapshot.latest`), which shares the tokenizer and the
open encoder when their fingerprints are the same. Code that must see one generation
throughout (a request of a server, a writer's transaction, verify) takes the snapshot once
and uses it for every step.

Everything below the facade takes a snapshot: the writer, verify, re-ranking and the Ray
engine's workers. Only the facade (:mod:`.db`) swaps them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import DBConfig
from .encoder_files import same_fingerprint
from .errors import BadInputError, CorruptError, MismatchError, NotFoundError
from .index import SegmentIndex, check_vectors
from .ingest import encode_ids, open_encoder
from .keys import KeyMap, Retrieved
from .progress import ProgressFn, no_progress
from .search import Exclusion, SearchResult, check_k, search_filtered
from .segment import Segment
from .storage import ENCODER_DIR, Manifest, Storage, tokenizer_file, tokenizer_kind
from .tokenizer import Tokenizer, fingerprint

if TYPE_CHECKING:
    from .encoder import Encoder


def _manifest_name(generation: int) -> str:
    return f"{generation:06d}.json"


def load_tokenizer(root: Path, tokenizer: Mapping[str, Any]) -> Tokenizer:
    """The database's tokenizer as the manifest's tokenizer section ``tokenizer`` records it
    (its kind, file and special ids), hashed before it is parsed: a damaged or replaced
    file is reported, never handed to the tokenizer library."""
    path = root / tokenizer_file(tokenizer)
    expected = str(tokenizer["fingerprint"])
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CorruptError(f"{path}: tokenizer file missing") from exc
    found = fingerprint(data)
    if found != expected:
        raise MismatchError(
            f"{path}: tokenizer fingerprint {found[:19]}… does not match the "
            f"manifest's {expected[:19]}… (the file was replaced or is damaged)"
        )
    return Tokenizer.from_bytes(data, kind=tokenizer_kind(tokenizer), path=path, special=tokenizer)


class Snapshot:
    """One committed generation of the database at ``storage``, read-only.

    Open the committed generation with :meth:`open`; move to another with :meth:`at` or
    :meth:`latest`, which return new snapshots and leave this one as it is. ``threads`` and
    ``device`` are the encoder's (checked when it is first used); ``load_indexes``: read
    the segments' indexes into memory on first use instead of mapping them."""

    def __init__(
        self,
        storage: Storage,
        manifest: Manifest,
        *,
        threads: int | None = None,
        device: str = "cpu",
        tokenizer: Tokenizer | None = None,
        encoder: Encoder | None = None,
        load_indexes: bool = False,
    ) -> None:
        config = DBConfig.from_dict(manifest.config)
        expected = manifest.tokenizer["fingerprint"]
        if tokenizer is None or tokenizer.fingerprint != expected:
            tokenizer = load_tokenizer(storage.root, manifest.tokenizer)
        token_dtype = np.dtype(manifest.tokenizer["token_dtype"])
        m = config.chunk.chunk_size
        segments = [
            Segment(storage.segment_dir(s.name), s, m, token_dtype) for s in manifest.segments
        ]
        self.storage = storage
        self.path = storage.root
        self.manifest = manifest
        self.config = config
        self.tokenizer = tokenizer
        self.threads = threads
        self.device = device
        """Where the encoder runs: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
        self.load_indexes = load_indexes
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
        self._encoder: Encoder | None = None
        if encoder is not None and same_fingerprint(
            encoder.fingerprint, manifest.encoder["fingerprint"]
        ):
            self._encoder = encoder

    @classmethod
    def open(
        cls,
        path: str | Path | Storage,
        *,
        threads: int | None = None,
        device: str = "cpu",
        encoder: Encoder | None = None,
        load_indexes: bool = False,
    ) -> Snapshot:
        """The generation CURRENT names. If one of its files vanished because a writer
        committed (and cleaned up) in between, the newer generation instead; raise only if
        that fails too. ``encoder``: an encoder already open on this database's files (it
        is used when its fingerprint is the manifest's); ``load_indexes``: see the class."""
        storage = path if isinstance(path, Storage) else Storage(path)
        name = storage.current_name()

        def snapshot(manifest: Manifest) -> Snapshot:
            return cls(
                storage,
                manifest,
                threads=threads,
                device=device,
                encoder=encoder,
                load_indexes=load_indexes,
            )

        try:
            return snapshot(storage.read_manifest(name))
        except CorruptError:
            newer = storage.current_name()
            if newer == name:
                raise
            return snapshot(storage.read_manifest(newer))

    def at(self, manifest: Manifest) -> Snapshot:
        """The snapshot of ``manifest`` (a generation of the same database), sharing this
        one's tokenizer and open encoder where their fingerprints match."""
        return Snapshot(
            self.storage,
            manifest,
            threads=self.threads,
            device=self.device,
            tokenizer=self.tokenizer,
            encoder=self._encoder,
            load_indexes=self.load_indexes,
        )

    def at_generation(self, generation: int) -> Snapshot:
        """The snapshot of a kept generation (``self`` when it is this one)."""
        if generation == self.generation:
            return self
        return self.at(self.storage.read_manifest(_manifest_name(generation)))

    def latest(self) -> Snapshot:
        """The committed generation: ``self`` when no writer has committed since."""
        name = self.storage.current_name()
        if name == _manifest_name(self.generation):
            return self
        try:
            return self.at(self.storage.read_manifest(name))
        except CorruptError:  # committed and cleaned up again in between: the next one
            newer = self.storage.current_name()
            if newer == name:
                raise
            return self.at(self.storage.read_manifest(newer))

    @property
    def generation(self) -> int:
        return self.manifest.generation

    @property
    def segments(self) -> list[Segment]:
        return self.keymap.segments

    # ------------------------------------------------------------ encoder and indexes

    @property
    def encoder(self) -> Encoder:
        """The database's ONNX encoder (opened on first use, checked against the manifest)."""
        if self._encoder is None:
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
    def open_encoder(self) -> Encoder | None:
        """The encoder if it has been opened, else None (opens nothing)."""
        return self._encoder

    @property
    def indexes(self) -> list[SegmentIndex]:
        """The segments' indexes, mapped on first use."""
        if self._indexes is None:
            try:
                self._indexes = [
                    s.open_index(dim=self.dim, config=self.config.index, load=self.load_indexes)
                    for s in self.segments
                ]
            except CorruptError as exc:
                newer = self.storage.current_name()
                if newer != _manifest_name(self.generation):
                    raise CorruptError(
                        f"{exc} (this object holds generation {self.generation}; the database "
                        f"is at {newer.split('.')[0].lstrip('0')}: call refresh())"
                    ) from exc
                raise
        return self._indexes

    def check_encoder_matches(self, source: Path) -> None:
        """Refuse an encoder (a checkpoint, .onnx or encoder directory) that differs from
        the database's."""
        from .encoder import Encoder
        from .encoder_prepare import prepare_encoder

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

    # ------------------------------------------------------------ documents and keys

    def doc_index(self) -> dict[str, tuple[int, int]]:
        """Document id -> (segment number, local document number), live and deleted."""
        return self.keymap.doc_index()

    def locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment number and row of each key; -1 for -1 or unknown keys."""
        return self.keymap.locate(keys)

    def doc_number(self, doc_id: str) -> int:
        """The global number of document ``doc_id`` (what an :class:`Exclusion` names);
        -1 when this generation does not hold it."""
        return self.keymap.doc_number(doc_id)

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
        database's tokenizer round trip, so it is normalised exactly as stored chunks
        are, then the one encode function."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise BadInputError("empty query: a query must contain some text")
        return encode_ids(
            self.tokenizer, self.encoder, self.tokenizer.encode(texts), progress=progress
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
        """The text of each key's continuation ('' where there is none)."""
        return self.decode(self.continuation_keys(np.asarray(keys, dtype=np.int64)))

    # ------------------------------------------------------------ reporting

    def info(self) -> dict[str, Any]:
        """A summary of this generation (what `retrodb info --json` prints).

        ``documents`` and ``live_chunks`` count what searches can return; ``chunks`` and
        ``tokens`` count what is stored, the rows of deleted documents included until
        compaction. ``tokenizer.kind`` is ``sentencepiece`` or ``huggingface``;
        ``tokenizer.trainer`` is how the tokenizer was trained (None when it was given, or
        for databases built before it was recorded), ``tokenizer.source`` the path a given
        one was loaded from (None for a trained one, or before it was recorded);
        ``eos_id`` and ``bos_id`` are None in databases built before they were recorded;
        ``bytes.shared``: bytes that are hard links shared with other databases (the
        encoder)."""
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
                "kind": tokenizer_kind(m.tokenizer),
                "file": tokenizer_file(m.tokenizer),
                **{
                    k: m.tokenizer.get(k)
                    for k in ("fingerprint", "vocab_size", "pad_id", "eos_id", "bos_id")
                    + ("token_dtype", "trainer", "source")
                },
            },
            "encoder": {
                # ``sha256:<hex>``, also for databases whose manifest records the bare hex
                "fingerprint": "sha256:" + str(m.encoder["fingerprint"]).removeprefix("sha256:"),
                "dim": m.encoder["dim"],
            },
            "bytes": self.storage.disk_usage(tokenizer_file(m.tokenizer)),
        }


__all__ = ["Snapshot", "load_tokenizer"]
