from __future__ import annotations

import numpy as np
import pytest

from retrodb.chunking import chunk_documents, chunk_tokens, continuation_rows, num_chunks
from retrodb.config import TokenizerConfig
from retrodb.errors import BadInputError, CorruptError, NotFoundError
from retrodb.tokenizer import PAD_ID, SentencePieceTokenizer, Tokenizer

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


def test_long_lines_are_cut_into_sentences_the_trainer_accepts() -> None:
    """A line over the trainer's max_sentence_length used to be dropped from training
    without a word (or, alone, to stop it)."""
    from retrodb.tokenizer import MAX_SENTENCE_BYTES, SENTENCE_CHARS, training_sentences

    word = "ünïcode "
    line = word * (3 * SENTENCE_CHARS // len(word))  # longer than the trainer accepts
    gap = "x" * (SENTENCE_CHARS + 10)  # a stretch with no space at all
    sentences = list(training_sentences(f"short line\n\n  {line}\n{gap} tail\n"))
    assert sentences[0] == "short line" and sentences[-1].endswith("tail")
    assert all(0 < len(s) <= SENTENCE_CHARS for s in sentences)
    assert all(len(s.encode()) <= MAX_SENTENCE_BYTES for s in sentences)
    assert " ".join(sentences[1:-2]).split() == line.split()
    assert sentences[-2:] == ["x" * SENTENCE_CHARS, "x" * 10 + " tail"]  # cut where no space is
    tok = Tokenizer.train(["a few short words\n", line], config=TokenizerConfig(vocab_size=400))
    assert (
        tok.trainer is not None
        and tok.trainer["sentences"] == len(list(training_sentences(line))) + 1
    )
    assert any("ünïcode" in tok.id_to_piece(i) for i in range(tok.vocab_size))  # learnt from it


def test_training_is_deterministic_and_records_its_settings() -> None:
    """The same corpus gives the same model, byte for byte; the settings that decide it
    (sentencepiece version, threads, seed, sampling, options) are recorded."""
    import sentencepiece

    texts = [t * 3 for t in TEXTS]
    one = Tokenizer.train(texts, config=TokenizerConfig(vocab_size=500))
    two = Tokenizer.train(iter(texts), config=TokenizerConfig(vocab_size=500))
    assert one.model_bytes == two.model_bytes
    rec = one.trainer
    assert rec is not None and rec == two.trainer
    assert rec["sentencepiece"] == sentencepiece.__version__ and rec["seed"] == 0
    assert rec["options"]["num_threads"] >= 1 and rec["options"]["vocab_size"] == 500
    assert rec["input_sentence_size"] == TokenizerConfig().input_sentence_size
    assert rec["sampled"] == rec["sentences"] > 0
    assert SentencePieceTokenizer(one.model_bytes).trainer is None  # a loaded one knows nothing
