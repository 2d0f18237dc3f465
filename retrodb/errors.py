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


class LockedError(RetroDBError, BlockingIOError):
    """Another writer holds the database lock."""


class MismatchError(RetroDBError, ValueError):
    """A tokenizer, encoder, vector dimension or neighbour set does not match the database."""


class BadInputError(RetroDBError, ValueError):
    """Input text or arguments are invalid; nothing has been written."""


class StaleError(RetroDBError, ValueError):
    """A neighbour set was computed for an older generation of the database."""
