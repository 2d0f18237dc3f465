"""Documents -> a new segment: tokenize, chunk, encode, index. And the one encode function.

Two streaming passes keep memory bounded whatever the size of the input or of one
document: (1) documents are read and tokenized piece by piece and their chunk rows
appended to the segment's files; (2) the rows are read back through a memory map in
windows of ``ENCODE_WINDOW``, detokenized, encoded and added to the index. Only the index
being built lives in RAM.

:func:`encode_ids` is the only way token ids become keys: stored chunks, query texts
(after a tokenizer round trip) and query chunks all go through it, so the index and
its queries see the same detokenization, BERT special tokens, truncation and pooling.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from . import corpus as corpus_mod
from .chunking import Chunker
from .config import DBConfig, EncoderConfig
from .failpoints import failpoint
from .progress import ProgressFn, no_progress
from .segment import SegmentWriter
from .storage import SegmentMeta, Storage
from .tokenizer import PieceTokenizer, Tokenizer

if TYPE_CHECKING:
    from .encoder import Encoder

#: Chunks detokenized and encoded per encoder call (sorted by length inside the window).
ENCODE_WINDOW = 4096


def open_encoder(
    directory: Path, config: EncoderConfig, *, threads: int | None = None, device: str = "cpu"
) -> Encoder:
    """The encoder of a database on ``device`` (``cpu``, ``cuda[:N]`` or ``auto``): on the
    CPU it encodes ``config.batch_size`` texts per run, on a GPU the device's default."""
    from .encoder import Encoder

    enc = Encoder.open(directory, threads=threads, device=device)
    if enc.device == "cpu":
        enc.batch_size = config.batch_size
    return enc


def encode_ids(
    tokenizer: Tokenizer,
    encoder: Encoder,
    rows: Sequence[Sequence[int] | np.ndarray],
    *,
    progress: ProgressFn = no_progress,
) -> np.ndarray:
    """Keys ``[n, d]`` of token-id rows (each row only its real tokens): the tokenizer
    decodes each row to text, which the encoder turns into a pooled key."""
    return encoder.encode(tokenizer.decode_many(rows), progress=progress)


def _document_ids(corpus: corpus_mod.Corpus, pt: PieceTokenizer) -> Iterator[tuple[int, list[int]]]:
    """``(document number, ids)`` of every piece of every document, in order (whole
    documents for a tokenizer that cannot be given pieces exactly)."""
    if pt.exact:
        yield from pt.tokenize(corpus.iter_pieces())
        return
    for i, (_, text) in enumerate(corpus.iter_documents()):
        yield i, pt.tok.encode([text])[0]


@dataclass(frozen=True)
class SegmentJob:
    """What a build or an add asks of a :class:`SegmentEngine`: the documents of
    ``corpus`` as sealed, uncommitted segments of ``storage``, in input order, with
    contiguous keys from ``first_key``. The tokenizer and the encoder are the files of
    ``storage``; the caller commits the segments as ``generation``."""

    storage: Storage
    corpus: corpus_mod.Corpus
    tokenizer: Tokenizer
    config: DBConfig
    first_key: int
    generation: int
    progress: ProgressFn = no_progress


class SegmentEngine(Protocol):
    """Writes the segments of a :class:`SegmentJob`: :class:`LocalEngine` in this process,
    or :class:`retrodb.ray_engine.RayEngine` on a Ray cluster."""

    def write_segments(self, job: SegmentJob) -> tuple[SegmentMeta, ...]:
        """The job's segments' manifest entries, in key order."""
        ...


@dataclass(frozen=True)
class LocalEngine:
    """One segment, written in this process with ``encoder`` (:func:`write_corpus_segment`)."""

    encoder: Encoder

    def write_segments(self, job: SegmentJob) -> tuple[SegmentMeta, ...]:
        return (write_corpus_segment(job, self.encoder),)


def write_corpus_segment(job: SegmentJob, encoder: Encoder) -> SegmentMeta:
    """Tokenize, chunk, encode and index the job's corpus into a new sealed segment whose
    first key is ``job.first_key``; returns its manifest entry (the caller commits it)."""
    storage, corpus, tokenizer, config = job.storage, job.corpus, job.tokenizer, job.config
    first_key, progress = job.first_key, job.progress
    m = config.chunk.chunk_size
    writer = SegmentWriter(
        storage,
        generation=job.generation,
        chunk_size=m,
        token_dtype=tokenizer.token_dtype,
        dim=encoder.dim,
        index=config.index,
    )
    n_docs = len(corpus)
    progress("tokenize", 0, n_docs)
    chunker = Chunker(
        m, pad_id=tokenizer.pad_id, sink=writer.append_rows, dtype=tokenizer.token_dtype
    )
    pieces = PieceTokenizer(tokenizer, cuts=corpus_mod.cut_points)
    doc = -1
    for d, ids in _document_ids(corpus, pieces):
        if d != doc:
            if doc >= 0 and d % 64 == 0:
                progress("tokenize", d, n_docs)
            chunker.start()
            doc = d
        chunker.feed(ids)
    failpoint("after_tokenize", writer.dir)
    table = chunker.finish()
    progress("tokenize", n_docs, n_docs)
    tokens, lengths = writer.close_rows()
    n = writer.rows
    progress("encode", 0, n)
    for start in range(0, n, ENCODE_WINDOW):
        stop = min(n, start + ENCODE_WINDOW)
        rows = [r[:k] for r, k in zip(tokens[start:stop], lengths[start:stop], strict=True)]
        vectors = encode_ids(
            tokenizer, encoder, rows, progress=_offset(progress, "encode", start, n)
        )
        writer.add_vectors(np.arange(first_key + start, first_key + stop), vectors)
        progress("index", stop, n)
        failpoint("during_encode", writer.dir)
    del tokens, lengths
    return writer.seal(corpus.ids, table, first_key=first_key)


def _offset(progress: ProgressFn, stage: str, start: int, total: int) -> ProgressFn:
    """``progress`` for one window of ``stage``: the window's counts from ``start`` on."""

    def report(_stage: str, done: int, _total: int) -> None:
        progress(stage, start + done, total)

    return report


__all__ = [
    "ENCODE_WINDOW",
    "LocalEngine",
    "SegmentEngine",
    "SegmentJob",
    "encode_ids",
    "open_encoder",
    "write_corpus_segment",
]
