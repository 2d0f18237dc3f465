from __future__ import annotations

import numpy as np
import pytest

from retrodb.chunking import chunk_documents, chunk_tokens, continuation_rows, num_chunks
from retrodb.config import TokenizerConfig
from retrodb.errors import BadInputError, CorruptError, NotFoundError
from retrodb.tokenizer import PAD_ID, Tokenizer

from .conftest import TOPICS

TEXTS = list(TOPICS.values()) * 3


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, config=TokenizerConfig(vocab_size=600))


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii text",
        "  leading and trailing spaces  \n\n",
        "tabs\tand\nnewlines\r\n",
        "unicode: héllo wörld 漢字 😀 — “quotes”",
        "code: def f(x):\n    return x ** 2  # comment",
    ],
)
def test_round_trip_through_tokenizer_and_chunks(tok: Tokenizer, text: str) -> None:
    ids = tok.encode([text])[0]
    chunks, lengths = chunk_tokens(ids, 8, pad_id=tok.pad_id)
    rebuilt = [int(t) for row, n in zip(chunks, lengths, strict=True) for t in row[:n]]
    assert rebuilt == ids
    assert tok.decode(rebuilt) == text


def test_small_corpus_gets_a_smaller_vocabulary_and_byte_fallback() -> None:
    small = Tokenizer.train(["hello world"], config=TokenizerConfig(vocab_size=32000))
    assert 256 < small.vocab_size < 32000
    assert small.pad_id == PAD_ID
    assert small.decode(small.encode(["never seen: ÿ😀"])[0]) == "never seen: ÿ😀"


def test_fingerprint_and_load(tok: Tokenizer, tmp_path) -> None:
    p = tmp_path / "t.model"
    tok.save(p)
    again = Tokenizer.load(p)
    assert again.fingerprint == tok.fingerprint
    other = Tokenizer.train(TEXTS[:1], config=TokenizerConfig(vocab_size=500))
    assert other.fingerprint != tok.fingerprint
    assert tok.token_dtype == np.uint16


def test_load_errors(tmp_path) -> None:
    with pytest.raises(NotFoundError, match="nope.model"):
        Tokenizer.load(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(CorruptError, match="bad.model"):
        Tokenizer.load(bad)
    with pytest.raises(BadInputError):
        Tokenizer.train(["   ", ""], config=TokenizerConfig())


def test_chunking_keeps_lengths_and_document_ranges() -> None:
    docs = [list(range(1, 11)), [5], list(range(100, 116))]
    chunks, lengths, doc = chunk_documents(docs, 4, pad_id=0, dtype=np.uint16)
    assert chunks.shape == (3 + 1 + 4, 4)
    assert lengths.tolist() == [4, 4, 2, 1, 4, 4, 4, 4]
    assert doc.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert chunks[2].tolist() == [9, 10, 0, 0]
    assert num_chunks(0, 4) == 1


def test_no_continuation_crosses_a_document() -> None:
    doc = np.array([0, 0, 0, 1, 2, 2])
    cont = continuation_rows(doc, np.arange(6))
    assert cont.tolist() == [1, 2, -1, -1, 5, -1]
