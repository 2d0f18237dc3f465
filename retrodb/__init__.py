"""retrodb: an on-disk, memory-mapped RETRO retrieval database.

>>> import retrodb                                              # doctest: +SKIP
>>> db = retrodb.RetroDB.open("my.retrodb")                     # doctest: +SKIP
>>> res = db.search("how do I open a file?", k=4)               # doctest: +SKIP
>>> db.retrieve(res.keys).tokens.shape                          # doctest: +SKIP
(1, 4, 128)

Importing retrodb never imports torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from .serve.client import RemoteDB

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
    "connect",
    "open",
]


def open(  # noqa: A001
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    device: str = "cpu",
    token: str | None = None,
) -> RetroDB | RemoteDB:
    """Open the database at ``path`` (the committed generation); mirrors ``zarr.open``. An
    ``http://`` or ``https://`` address gives the database `retrodb serve` serves there
    (:func:`connect`; ``token``: its bearer token, default ``$RETRODB_TOKEN``)."""
    from .serve.client import is_url

    if is_url(path):
        return connect(str(path), token=token)
    return RetroDB.open(os.fspath(path), threads=threads, device=device)


def connect(url: str, *, token: str | None = None, timeout: float = 30.0) -> RemoteDB:
    """The database `retrodb serve` serves at ``url``, with the read API of
    :class:`RetroDB` (:class:`retrodb.serve.client.RemoteDB`). ``token``: the server's
    bearer token (default ``$RETRODB_TOKEN``); ``timeout``: seconds to wait for an answer."""
    from .serve.client import RemoteDB

    return RemoteDB(url, token=token or os.environ.get("RETRODB_TOKEN"), timeout=timeout)
