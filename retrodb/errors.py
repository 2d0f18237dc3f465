"""The errors retrodb raises. Each also subclasses the builtin a caller would catch."""

from __future__ import annotations


class RetroDBError(Exception):
    """Base class of every error retrodb raises on purpose."""


class NotFoundError(RetroDBError, FileNotFoundError):
    """A database, a file inside it, or an input path does not exist."""


class NotADatabaseError(RetroDBError, ValueError):
    """A path exists but is not a retrodb database."""


class CorruptError(RetroDBError, OSError):
    """A committed file is missing, truncated or does not match its recorded checksum."""


class FormatVersionError(RetroDBError, ValueError):
    """The database was written by an unknown (newer) on-disk format version."""


class WriteError(RetroDBError, OSError):
    """Writing failed (disk full, a failed write, fsync or rename); the message says which
    file and which generation the database is left at. ``errno`` and ``filename`` are
    those of the underlying OSError."""

    def __init__(self, message: str, *, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno = errno
        self.filename = filename

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LockedError(RetroDBError, BlockingIOError):
    """Another writer holds the database lock."""


class MismatchError(RetroDBError, ValueError):
    """A tokenizer, encoder, vector dimension or neighbour set does not match the database."""


class BadInputError(RetroDBError, ValueError):
    """Input text or arguments are invalid; nothing has been written."""


class StaleError(RetroDBError, ValueError):
    """A neighbour set was computed for an older generation of the database."""


class DeviceUnavailableError(RetroDBError, RuntimeError):
    """The device asked for (a GPU) cannot be used here; the message says what is missing
    and how to install it."""


class EngineError(RetroDBError, RuntimeError):
    """A distributed engine (Ray) is missing, cannot start or connect, or lost work it could
    not retry; nothing was committed."""
