"""retrodb: an on-disk, memory-mapped RETRO retrieval database.

>>> import retrodb                                              # doctest: +SKIP
>>> db = retrodb.RetroDB.open("my.retrodb")                     # doctest: +SKIP
>>> res = db.search("how do I open a file?", k=4)               # doctest: +SKIP
>>> db.retrieve(res.keys).tokens.shape                          # doctest: +SKIP
(1, 4, 128)

Importing retrodb never imports torch.
"""

from __future__ import annotations

# First: retrodb.index makes the system libstdc++ global before it imports USearch, whose
# wheel bundles a private libstdc++ that otherwise breaks onnxruntime (docs/reliability.md).
from . import index as _index  # noqa: F401
from .config import ChunkConfig, DBConfig, EncoderConfig, IndexConfig, TokenizerConfig
from .db import AddResult, Hit, QueryResult, Retrieved, RetroDB, SearchResult
from .errors import (
    BadInputError,
    CorruptError,
    DeviceUnavailableError,
    FormatVersionError,
    LockedError,
    MismatchError,
    NotADatabaseError,
    NotFoundError,
    RetroDBError,
    StaleError,
    WriteError,
)
from .snapshot import Snapshot

__version__ = "0.2.0"

__all__ = [
    "AddResult",
    "BadInputError",
    "ChunkConfig",
    "CorruptError",
    "DBConfig",
    "DeviceUnavailableError",
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
    "Snapshot",
    "RetroDBError",
    "StaleError",
    "TokenizerConfig",
    "WriteError",
    "open",
]


def open(path: str, *, threads: int | None = None, device: str = "cpu") -> RetroDB:  # noqa: A001
    """Open the database at ``path`` (the committed generation); mirrors ``zarr.open``."""
    return RetroDB.open(path, threads=threads, device=device)
