"""retrodb: an on-disk, memory-mapped RETRO retrieval database.

>>> import retrodb                                              # doctest: +SKIP
>>> db = retrodb.RetroDB.open("my.retrodb")                     # doctest: +SKIP
>>> res = db.search("how do I open a file?", k=4)               # doctest: +SKIP
>>> db.retrieve(res.keys).tokens.shape                          # doctest: +SKIP
(1, 4, 128)

Importing retrodb never imports torch.
"""

from __future__ import annotations

# ONNX Runtime must be loaded before USearch's compiled module: the other order crashes the
# process on import (seen with onnxruntime 1.31-1.32 and usearch 2.26 on x86_64 Linux).
import onnxruntime as _onnxruntime  # noqa: F401, I001

from .config import ChunkConfig, DBConfig, EncoderConfig, IndexConfig, TokenizerConfig
from .db import AddResult, Hit, QueryResult, Retrieved, RetroDB, SearchResult
from .errors import (
    BadInputError,
    CorruptError,
    FormatVersionError,
    LockedError,
    MismatchError,
    NotADatabaseError,
    NotFoundError,
    RetroDBError,
    StaleError,
    WriteError,
)

__version__ = "0.1.0"

__all__ = [
    "AddResult",
    "BadInputError",
    "ChunkConfig",
    "CorruptError",
    "DBConfig",
    "EncoderConfig",
    "FormatVersionError",
    "Hit",
    "IndexConfig",
    "LockedError",
    "MismatchError",
    "NotADatabaseError",
    "NotFoundError",
    "QueryResult",
    "Retrieved",
    "RetroDB",
    "SearchResult",
    "RetroDBError",
    "StaleError",
    "TokenizerConfig",
    "WriteError",
    "open",
]


def open(path: str, *, threads: int | None = None) -> RetroDB:  # noqa: A001 - mirrors zarr.open
    """Open the database at ``path`` (the committed generation)."""
    return RetroDB.open(path, threads=threads)
