"""SentencePiece: train on a corpus, load, encode, decode, fingerprint; tokenizing a
stream of document pieces exactly as whole documents. The only sentencepiece user."""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from .config import TokenizerConfig
from .errors import BadInputError, CorruptError, NotFoundError

#: Special ids of tokenizers that retrodb trains.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
#: Pieces of text tokenized per SentencePiece call while writing a segment (and at most
#: about this many characters).
TOKENIZE_PIECES = 256
TOKENIZE_CHARS = 1 << 20
#: The longest sentence (UTF-8 bytes) the SentencePiece trainer accepts; it drops longer ones.
MAX_SENTENCE_BYTES = 1 << 16
#: Lines longer than this (characters) are cut into sentences for the trainer: at most 4
#: bytes a character keeps every sentence within MAX_SENTENCE_BYTES.
SENTENCE_CHARS = MAX_SENTENCE_BYTES // 4
#: Threads of the SentencePiece trainer. Fixed, not the machine's core count: the unigram
#: trainer sums its statistics per thread, so another count gives another model.
TRAIN_THREADS = 2


def fingerprint(model_bytes: bytes) -> str:
    """The fingerprint of a SentencePiece model: ``sha256:`` and the hex digest of its bytes."""
    return "sha256:" + hashlib.sha256(model_bytes).hexdigest()


def training_sentences(text: str) -> Iterator[str]:
    """The sentences of ``text`` for the trainer: its non-blank lines, stripped, each line
    longer than :data:`SENTENCE_CHARS` cut just before a space (at :data:`SENTENCE_CHARS`
    when a stretch has no space) into sentences of at most that many characters."""
    for line in text.splitlines():
        line = line.strip()
        while len(line) > SENTENCE_CHARS:
            cut = line.rfind(" ", 1, SENTENCE_CHARS + 1)
            if cut <= 0:
                cut = SENTENCE_CHARS
            head, line = line[:cut].rstrip(), line[cut:].lstrip()
            if head:
                yield head
        if line:
            yield line


def trainer_options(config: TokenizerConfig) -> dict[str, Any]:
    """Every option retrodb gives the SentencePiece trainer (besides its input and output)."""
    return {
        "vocab_size": config.vocab_size,
        "model_type": config.model_type,
        "character_coverage": config.character_coverage,
        "byte_fallback": True,
        "hard_vocab_limit": False,
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "max_sentence_length": MAX_SENTENCE_BYTES,
        "split_digits": True,
        "remove_extra_whitespaces": False,
        "normalization_rule_name": "identity",
        "allow_whitespace_only_pieces": True,
        "user_defined_symbols": ["\n", "\t"],
        "num_threads": TRAIN_THREADS,
    }


class Tokenizer:
    """A loaded SentencePiece model with the few operations retrodb needs."""

    __slots__ = ("_sp", "_bytes", "path", "fingerprint", "trainer")

    def __init__(self, model_bytes: bytes, *, path: Path | None = None) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_bytes)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with a C++ message
            where = str(path) if path else "tokenizer"
            raise CorruptError(f"{where}: not a SentencePiece model ({exc})") from exc
        self._sp = sp
        self._bytes = model_bytes
        self.path = path
        self.fingerprint = fingerprint(model_bytes)
        self.trainer: dict[str, Any] | None = None
        """How :meth:`train` made this model (None for a model loaded from a file): the
        sentencepiece version, the seed, the sampling and every trainer option. Recorded in
        the manifest's tokenizer section, since the same corpus gives another model with
        another sentencepiece version or thread count."""

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise NotFoundError(f"{path}: tokenizer model not found")
        return cls(path.read_bytes(), path=path)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        config: TokenizerConfig,
        seed: int = 0,
    ) -> Tokenizer:
        """Train a SentencePiece model with byte fallback, so any text round-trips.

        Every line is a sentence; a line longer than :data:`SENTENCE_CHARS` (minified
        JSON, a log, a one-paragraph document) is cut at spaces into sentences the trainer
        accepts (see :func:`training_sentences`). At most ``config.input_sentence_size``
        sentences are sampled (reservoir sampling, seeded) and the vocabulary size is a
        soft limit, so a small corpus still trains. The same texts and settings give the
        same model, byte for byte; :attr:`trainer` records the settings."""
        rng = random.Random(seed)
        sample: list[str] = []
        seen = 0
        for text in texts:
            for sentence in training_sentences(text):
                seen += 1
                if len(sample) < config.input_sentence_size:
                    sample.append(sentence)
                else:
                    j = rng.randrange(seen)
                    if j < config.input_sentence_size:
                        sample[j] = sentence
        if not sample:
            raise BadInputError("cannot train a tokenizer: the input holds no text")
        options = trainer_options(config)
        out = io.BytesIO()
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=out, minloglevel=2, **options
        )
        tok = cls(out.getvalue())
        tok.trainer = {
            "sentencepiece": spm.__version__,
            "seed": seed,
            "input_sentence_size": config.input_sentence_size,
            "sentence_chars": SENTENCE_CHARS,
            "sentences": seen,
            "sampled": len(sample),
            "options": options,
        }
        return tok

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self._bytes)

    @property
    def model_bytes(self) -> bytes:
        return self._bytes

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def pad_id(self) -> int:
        """The padding id: the model's own pad piece if it has one, else 0."""
        pid = int(self._sp.pad_id())
        return pid if pid >= 0 else 0

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def token_dtype(self) -> np.dtype:
        """The smallest dtype that holds every id: uint16 when the vocabulary fits."""
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.int32)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.Encode(list(texts))]

    def encode_one(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.Encode(text), dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return str(self._sp.Decode([int(i) for i in ids]))

    def decode_many(self, rows: Sequence[Sequence[int] | np.ndarray]) -> list[str]:
        return [str(s) for s in self._sp.Decode([[int(i) for i in r] for r in rows])]

    def id_to_piece(self, i: int) -> str:
        return str(self._sp.IdToPiece(int(i)))


class PieceTokenizer:
    """Tokenize a document piece by piece with exactly the ids of the whole text.

    Every piece after a document's first starts just after a newline or just before a
    space (see ``Corpus.iter_pieces``). Encoded alone it would get SentencePiece's dummy
    prefix; encoded as ``"\n" + piece`` it is segmented exactly as inside the whole text
    (the newline is a piece of its own that no other piece crosses), so the ids up to and
    including that newline are dropped. A probe checks this once per tokenizer; one that
    fails it (no newline piece, other normalization) must be given whole documents
    (:attr:`exact` is False)."""

    _PROBE = "Ab cd\n\nef  gh ij\n kl\tmn op\n\n\nqr st, uv wx yz.\nend"

    def __init__(self, tok: Tokenizer, *, cuts: Callable[[str], list[int]]) -> None:
        """``cuts(text)``: the offsets where the corpus reader may cut ``text`` into pieces."""
        self.tok = tok
        ids = tok.encode(["\n"])[0]
        self.newline = ids[-1] if ids and tok.id_to_piece(ids[-1]) == "\n" else None
        self.exact = self.newline is not None and self._probe(cuts)

    def _probe(self, cuts: Callable[[str], list[int]]) -> bool:
        text = self._PROBE
        whole = self.tok.encode([text])[0]
        for cut in cuts(text):
            a, b = self.encode([(text[:cut], False), (text[cut:], True)])
            if a + b != whole:
                return False
        return True

    def encode(self, pieces: Sequence[tuple[str, bool]]) -> list[list[int]]:
        """Ids of each ``(piece, continues_a_document)``."""
        out = self.tok.encode(["\n" + p if cont else p for p, cont in pieces])
        for i, (_, cont) in enumerate(pieces):
            if cont:
                assert self.newline is not None, "pieces of a document need a newline piece"
                ids = out[i]
                out[i] = ids[ids.index(self.newline) + 1 :]
        return out

    def tokenize(self, pieces: Iterable[tuple[int, str]]) -> Iterator[tuple[int, list[int]]]:
        """``(document number, ids)`` for every ``(document number, piece)``, in order,
        tokenized in batches (many small documents share one SentencePiece call)."""
        batch: list[tuple[int, str, bool]] = []
        chars = 0
        last = -1

        def flush() -> list[tuple[int, list[int]]]:
            ids = self.encode([(p, cont) for _, p, cont in batch])
            out = [(d, i) for (d, _, _), i in zip(batch, ids, strict=True)]
            batch.clear()
            return out

        for doc, piece in pieces:
            batch.append((doc, piece, doc == last))
            last = doc
            chars += len(piece)
            if len(batch) >= TOKENIZE_PIECES or chars >= TOKENIZE_CHARS:
                yield from flush()
                chars = 0
        yield from flush()
