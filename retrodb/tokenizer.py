"""SentencePiece: train on a corpus, load, encode, decode. The only sentencepiece user."""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .config import TokenizerConfig
from .errors import BadInputError, CorruptError, NotFoundError

#: Special ids of tokenizers that retrodb trains.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """A loaded SentencePiece model with the few operations retrodb needs."""

    __slots__ = ("_sp", "_bytes", "path", "fingerprint")

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
        self.fingerprint = "sha256:" + hashlib.sha256(model_bytes).hexdigest()

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

        At most ``config.input_sentence_size`` non-empty lines are sampled (reservoir
        sampling, seeded) and the vocabulary size is a soft limit, so a small corpus still
        trains."""
        rng = random.Random(seed)
        sample: list[str] = []
        seen = 0
        for text in texts:
            for line in text.splitlines():
                line = line.strip()
                if not line:
                    continue
                seen += 1
                if len(sample) < config.input_sentence_size:
                    sample.append(line)
                else:
                    j = rng.randrange(seen)
                    if j < config.input_sentence_size:
                        sample[j] = line
        if not sample:
            raise BadInputError("cannot train a tokenizer: the input holds no text")
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=out,
            vocab_size=config.vocab_size,
            model_type=config.model_type,
            character_coverage=config.character_coverage,
            byte_fallback=True,
            hard_vocab_limit=False,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            max_sentence_length=1 << 16,
            split_digits=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n", "\t"],
            num_threads=2,
            minloglevel=2,
        )
        return cls(out.getvalue())

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

    def decode_many(self, rows: Sequence[Sequence[int]]) -> list[str]:
        return [str(s) for s in self._sp.Decode([[int(i) for i in r] for r in rows])]

    def id_to_piece(self, i: int) -> str:
        return str(self._sp.IdToPiece(int(i)))
