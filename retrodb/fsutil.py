"""Durable file operations: fsync, atomic replace, directory publish, checksums, locks.

Every writer in retrodb (segments, manifests, CURRENT files, neighbour-set versions,
index files, model checkpoints) goes through these helpers, so each durability rule is
written once: data is fsynced before the rename that publishes it, and the directory is
fsynced after the rename. No third-party library.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import LockedError
from .failpoints import failpoint

#: Names that start with this are temporary: never committed, removed by the next writer.
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True, slots=True)
class FileInfo:
    size: int
    sha256: str


def fsync_path(path: Path) -> None:
    """fsync a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        failpoint("fsync", path)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (children first)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for f in filenames:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def replace_durably(tmp: Path, path: Path) -> None:
    """fsync the finished file ``tmp``, rename it over ``path``, fsync the directory."""
    fsync_path(tmp)
    failpoint("atomic_rename", path)
    os.replace(tmp, path)
    fsync_path(path.parent)


def tmp_name(path: Path) -> Path:
    """A temporary name beside ``path`` that only this process uses."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


def write_file_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` a temporary file beside ``path``, then fsync it, rename it over
    ``path`` and fsync the directory. A reader sees the old file or the new one, never a
    mix; a crash leaves only a temporary file behind (removed here on an error)."""
    tmp = tmp_name(path)
    try:
        write(tmp)
        replace_durably(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """:func:`write_file_atomic` of ``data``."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
        failpoint("atomic_write", tmp)

    write_file_atomic(path, write)


def publish_dir(tmp: Path, final: Path, *, failpoint_name: str | None = None) -> None:
    """fsync everything under the finished directory ``tmp`` and rename it to ``final``
    (``failpoint_name``: a failpoint fired just before the rename)."""
    fsync_tree(tmp)
    if failpoint_name:
        failpoint(failpoint_name, final)
    os.rename(tmp, final)
    fsync_path(final.parent)


def remove_path(p: Path) -> None:
    """Remove a file or a directory tree (what is already gone is no error)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def remove_temporaries(directory: Path) -> list[Path]:
    """Remove what interrupted writers left in ``directory`` (names starting TMP_PREFIX)."""
    gone = [p for p in sorted(directory.iterdir()) if p.name.startswith(TMP_PREFIX)]
    for p in gone:
        remove_path(p)
    return gone


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_table(root: Path) -> dict[str, FileInfo]:
    """Size and sha256 of every file under ``root``, by posix path relative to it."""
    out: dict[str, FileInfo] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = FileInfo(p.stat().st_size, sha256_file(p))
    return out


def share_file(path: Path, sha256: str, store: Path) -> bool:
    """Make ``path`` (whose sha256 is ``sha256``) a hard link of the file with the same
    bytes in ``store``, a folder of files named by their sha256; put ``path`` there first
    when the store lacks it (or holds a damaged copy). True when ``path`` is now shared.

    False, and ``path`` left as it is, where hard links cannot be made (the store on
    another filesystem, not writable, no hard links). Safe because retrodb never rewrites
    a committed file in place, and deleting one link leaves the others whole. A store
    file is hashed before use, so damage to it is never passed on."""
    entry = store / sha256
    link = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.link")
    try:
        store.mkdir(parents=True, exist_ok=True)
        if entry.is_file():
            os.link(entry, link)
            if sha256_file(link) == sha256:
                os.replace(link, path)
                return True
            link.unlink()  # damaged: our copy takes its place
        pending = store / f"{TMP_PREFIX}{sha256}.{os.getpid()}"
        os.link(path, pending)
        os.replace(pending, entry)
        return True
    except OSError:
        for p in (link, store / f"{TMP_PREFIX}{sha256}.{os.getpid()}"):
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)
        return False


@contextlib.contextmanager
def exclusive_lock(path: Path, busy_message: str) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``path`` (created if needed) without waiting: a lock held
    by another process raises :class:`LockedError` with ``busy_message`` at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise LockedError(busy_message) from exc
            raise
        yield
    finally:
        os.close(fd)


__all__ = [
    "TMP_PREFIX",
    "FileInfo",
    "exclusive_lock",
    "file_table",
    "fsync_path",
    "fsync_tree",
    "publish_dir",
    "remove_path",
    "remove_temporaries",
    "replace_durably",
    "sha256_file",
    "share_file",
    "tmp_name",
    "write_atomic",
    "write_file_atomic",
]
