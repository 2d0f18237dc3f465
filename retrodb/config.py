"""Frozen configuration objects. They are saved in every manifest, so a database
always knows how it was built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

#: Version of the on-disk format written by this code. Readers refuse newer versions.
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class ChunkConfig:
    chunk_size: int = 64
    """Tokens per chunk (the paper's m)."""

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_size <= 4096:
            raise ValueError(f"chunk_size must be in 1..4096, got {self.chunk_size}")


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    vocab_size: int = 32000
    """Target vocabulary when training SentencePiece; a soft limit on small corpora."""
    model_type: Literal["unigram", "bpe"] = "unigram"
    character_coverage: float = 0.9995
    input_sentence_size: int = 2_000_000
    """At most this many lines are sampled to train the tokenizer."""

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError(
                "vocab_size must be at least 300 (256 byte pieces + specials), "
                f"got {self.vocab_size}"
            )
        if self.model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {self.model_type!r}")


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    max_length: int = 256
    """WordPiece tokens per text fed to BERT ([CLS] and [SEP] included); longer text is
    truncated."""
    batch_size: int = 32
    quantize: Literal["none", "int8"] = "none"
    normalize: bool = True
    """L2-normalise the pooled vectors (keys are compared by cosine)."""

    def __post_init__(self) -> None:
        if self.quantize not in ("none", "int8"):
            raise ValueError(f"quantize must be 'none' or 'int8', got {self.quantize!r}")
        if not 8 <= self.max_length <= 4096:
            raise ValueError(f"max_length must be in 8..4096, got {self.max_length}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True, slots=True)
class IndexConfig:
    metric: Literal["cos", "ip", "l2sq"] = "cos"
    dtype: Literal["f32", "f16", "bf16", "i8"] = "f16"
    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 64

    def __post_init__(self) -> None:
        if self.metric not in ("cos", "ip", "l2sq"):
            raise ValueError(f"metric must be cos, ip or l2sq, got {self.metric!r}")
        if self.dtype not in ("f32", "f16", "bf16", "i8"):
            raise ValueError(f"dtype must be f32, f16, bf16 or i8, got {self.dtype!r}")
        if self.connectivity < 2:
            raise ValueError(f"connectivity must be >= 2, got {self.connectivity}")


@dataclass(frozen=True, slots=True)
class DBConfig:
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DBConfig:
        return cls(
            chunk=ChunkConfig(**d.get("chunk", {})),
            tokenizer=TokenizerConfig(**d.get("tokenizer", {})),
            encoder=EncoderConfig(**d.get("encoder", {})),
            index=IndexConfig(**d.get("index", {})),
        )
