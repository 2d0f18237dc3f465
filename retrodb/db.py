"""RetroDB: the facade that holds a database's current :class:`~.snapshot.Snapshot`.

A snapshot is one committed generation, read-only; every read goes to the snapshot this
object holds. The write transactions (:mod:`.writer`) and verification (:mod:`.verify`)
take that snapshot, and a commit hands back the next one, which the facade swaps in. This
class holds no logic beyond that wiring.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Concatenate, ParamSpec, TypeVar

import numpy as np

from . import corpus as corpus_mod
from . import query as query_mod
from . import verify as verify_mod
from . import writer
from .config import DBConfig
from .index import SegmentIndex
from .keys import KeyMap, Retrieved
from .progress import ProgressFn, no_progress
from .query import Hit, QueryResult
from .search import SearchResult
from .segment import Segment
from .snapshot import Snapshot
from .storage import Manifest, Storage
from .tokenizer import Tokenizer
from .writer import AddResult, BuildResult, CompactResult, DeleteResult, SegmentEngine

if TYPE_CHECKING:
    from .encoder import Encoder

P = ParamSpec("P")
R = TypeVar("R")


def _read(method: Callable[Concatenate[Snapshot, P], R]) -> Callable[Concatenate[RetroDB, P], R]:
    """A read of the current snapshot: ``db.f(...)`` is ``db.snapshot.f(...)``, with the
    snapshot's signature and docstring."""

    @functools.wraps(method)
    def call(self: RetroDB, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return method(self.snapshot, *args, **kwargs)

    return call


def _commit(
    transaction: Callable[Concatenate[Snapshot, P], tuple[Snapshot, R]],
) -> Callable[Concatenate[RetroDB, P], R]:
    """A write transaction on the current snapshot: ``db.add(...)`` runs
    ``writer.add(db.snapshot, ...)`` and moves ``db`` to the generation it committed."""

    @functools.wraps(transaction)
    def call(self: RetroDB, /, *args: P.args, **kwargs: P.kwargs) -> R:
        self.snapshot, result = transaction(self.snapshot, *args, **kwargs)
        return result

    return call


def _field(name: str, doc: str) -> Any:
    """A read-only attribute of the current snapshot."""
    return property(lambda self: getattr(self.snapshot, name), doc=doc)


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
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        device: str = "cpu",
        snapshot: Snapshot | None = None,
        load_indexes: bool = False,
    ) -> None:
        self.snapshot = snapshot or Snapshot.open(
            path, threads=threads, device=device, load_indexes=load_indexes
        )
        """The committed generation this object reads (swapped by refresh and commits)."""
        self.threads = threads
        self.device = device
        """Where the encoder runs: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
        self.last_build: BuildResult | None = None
        """What :meth:`build` did (documents, chunks, skipped inputs); None when opened."""

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        threads: int | None = None,
        device: str = "cpu",
        load_indexes: bool = False,
    ) -> RetroDB:
        """Open the committed generation of the database at ``path``. ``threads``: the
        encoder's CPU threads; ``device``: where the encoder runs (``cpu``, ``cuda``,
        ``cuda:N`` or ``auto``; checked when the encoder is first used). ``load_indexes``:
        read each segment's HNSW index into memory when first searched, instead of
        memory-mapping it: the first queries after open pay no page faults, for the index
        files' size in RAM (warm single queries measured the same; docs/scale.md).
        Default: mapped."""
        return cls(path, threads=threads, device=device, load_indexes=load_indexes)

    def refresh(self) -> bool:
        """Move to the latest committed generation; True if it changed."""
        old, self.snapshot = self.snapshot, self.snapshot.latest()
        return self.snapshot is not old

    storage: Storage = _field("storage", "The database's files.")
    path: Path = _field("path", "The database directory.")
    manifest: Manifest = _field("manifest", "The manifest of the current generation.")
    config: DBConfig = _field("config", "The configuration the database was built with.")
    tokenizer: Tokenizer = _field(
        "tokenizer", "The database's tokenizer (SentencePiece or Hugging Face)."
    )
    keymap: KeyMap = _field("keymap", "Keys to segments, rows and documents.")
    chunk_size: int = _field("chunk_size", "Tokens per chunk (m).")
    token_dtype: np.dtype = _field("token_dtype", "The stored tokens' dtype.")
    pad_id: int = _field("pad_id", "The padding token id.")
    dim: int = _field("dim", "The keys' dimension.")
    generation: int = _field("generation", "The current generation's number.")
    segments: list[Segment] = _field("segments", "The current generation's segments.")
    encoder: Encoder = _field("encoder", Snapshot.encoder.__doc__ or "")
    open_encoder: Encoder | None = _field("open_encoder", Snapshot.open_encoder.__doc__ or "")
    indexes: list[SegmentIndex] = _field("indexes", Snapshot.indexes.__doc__ or "")

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

        ``tokenizer``: an existing tokenizer (else a SentencePiece model is trained on the
        inputs): a SentencePiece model, a Hugging Face ``tokenizer.json`` or model folder,
        or a ``.gguf`` file (its tokenizer; needs ``retrodb[hf]``), see
        :meth:`~retrodb.tokenizer.Tokenizer.load`. ``encoder``: a local Hugging Face BERT
        checkpoint, an encoder directory or an exported ``.onnx`` (else the bundled
        all-MiniLM-L6-v2). ``engine``: where the segments are written (e.g.
        ``retrodb.ray_engine.RayEngine(workers=4)``; default: one segment, in this
        process). A failed build leaves nothing behind. What was built, and which inputs
        were skipped and why, is in :attr:`last_build` of the returned database."""
        enc, result = writer.build(
            Path(path),
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
        # without an engine, the encoder that encoded the build: the same files, no 2nd load
        snap = Snapshot.open(
            path, threads=threads, device=device, encoder=enc if engine is None else None
        )
        db = cls(path, threads=threads, device=device, snapshot=snap)
        db.last_build = result
        return db

    add = _commit(writer.add)
    delete = _commit(writer.delete)
    compact = _commit(writer.compact)

    # ------------------------------------------------------------ reads (the snapshot's)

    doc_index = _read(Snapshot.doc_index)
    locate = _read(Snapshot.locate)
    doc_number = _read(Snapshot.doc_number)
    key_documents = _read(Snapshot.key_documents)
    key_doc_numbers = _read(Snapshot.key_doc_numbers)
    deleted_mask = _read(Snapshot.deleted_mask)
    check_encoder_matches = _read(Snapshot.check_encoder_matches)
    encode_texts = _read(Snapshot.encode_texts)
    encode_chunks = _read(Snapshot.encode_chunks)
    search = _read(Snapshot.search)
    search_vectors = _read(Snapshot.search_vectors)
    chunks = _read(Snapshot.chunks)
    continuation_keys = _read(Snapshot.continuation_keys)
    retrieve = _read(Snapshot.retrieve)
    decode = _read(Snapshot.decode)
    continuation_text = _read(Snapshot.continuation_text)
    lookup = _read(query_mod.lookup)
    query = _read(query_mod.query)
    info = _read(Snapshot.info)

    verify = _read(verify_mod.verify)


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
