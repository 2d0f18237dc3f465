"""Neighbour sets on disk: their description, their versions, reading them.

A set lives in ``DB/neighbours/<name>/`` (see docs/neighbours.md)::

    CURRENT                 the committed version's directory name (replaced atomically)
    LOCK                    flock held while a version is being written
    <version>/              a Zarr v3 group of raw single-chunk arrays + neighbours.json
      neighbours.json       generation, segments searched, k, fingerprints, source, excludes
      keys [n, k] int64     nearest keys, best first, -1 = none
      distances [n, k] f32  cosine distances, inf where the key is -1 (sorted unless re-ranked)
      continuations [n, k]  int64 key of each neighbour's continuation, -1 at a document end
      doc [n] int32         row -> document of this set (docs/ids)
      docs/ids, docs/first_row, docs/num_rows
      chunk_keys [n] int64  (source "db") the database key of each row: no tokens copied
      tokens [n, m], lengths [n], vectors [n, d] f16   (source "inputs")

Rows are in document order and a document's rows are contiguous. A version is written
with the storage helpers every retrodb writer uses (temporary directory, fsync, rename,
then CURRENT replaced atomically).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..encoder_files import same_fingerprint
from ..errors import (
    BadInputError,
    CorruptError,
    FormatVersionError,
    MismatchError,
    NotFoundError,
    StaleError,
)
from ..fsutil import (
    TMP_PREFIX,
    exclusive_lock,
    fsync_path,
    publish_dir,
    remove_temporaries,
    write_atomic,
)
from ..storage import NEIGHBOURS, open_raw_array, read_strings, write_array

if TYPE_CHECKING:
    from ..db import RetroDB

#: Version of the neighbour-set layout written by this code.
SET_FORMAT_VERSION = 1
META_FILE = "neighbours.json"
CURRENT_FILE = "CURRENT"
LOCK_FILE = "LOCK"
#: Older versions kept beside the current one, so that a reader that read CURRENT just
#: before a refresh can still map its arrays.
KEEP_OLD_VERSIONS = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^\d{6,}-g\d+-[0-9a-f]+$")
Source = Literal["db", "inputs"]


# ---------------------------------------------------------------- metadata


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """A database segment a neighbour set has searched: its name and key range
    ``first_key .. first_key + chunks - 1`` (``chunks`` is the key span, which exceeds the
    row count of a compacted segment whose keys have gaps)."""

    name: str
    first_key: int
    chunks: int

    @property
    def stop_key(self) -> int:
        """One past the largest key of the range (``SegmentMeta.stop_key`` when written)."""
        return self.first_key + self.chunks


@dataclass(frozen=True, slots=True)
class NeighbourSetInfo:
    """What ``neighbours.json`` records about one version of a neighbour set."""

    name: str
    version: str
    """The version directory's name."""
    k: int
    generation: int
    """The database generation the set matches."""
    source: Source
    """``db``: the rows are the database's own live chunks; ``inputs``: other documents."""
    inputs: tuple[str, ...]
    segments: tuple[SegmentRef, ...]
    """Every segment whose keys the set has searched (all live segments of ``generation``)."""
    exclude: tuple[str, ...]
    """Document ids never returned as neighbours (besides each chunk's own document)."""
    tokenizer_fingerprint: str
    encoder_fingerprint: str
    chunk_size: int
    dim: int
    rows: int
    documents: int
    exact: bool
    created: float = field(default_factory=time.time)
    refreshed_from: int | None = None
    """The generation of the version this one was refreshed from (None: a full compute)."""
    searched: tuple[str, ...] = ()
    """The segments searched to make this version (all of them for a full compute)."""
    self_share: float = 0.0
    """The share of documents whose neighbours may come from the document itself."""
    rerank: str = "none"
    """How the k neighbours were chosen: ``none`` (the dense top k) or ``overlap`` (the k
    of ``fetch * k`` dense candidates sharing the longest token run with the row's chunk;
    the distances are then not sorted). Sets written before it was recorded: ``none``."""
    fetch: int = 1
    """Dense candidates searched per kept neighbour (1 without re-ranking)."""
    format_version: int = SET_FORMAT_VERSION

    def to_dict(self, *, current_generation: int | None = None) -> dict[str, Any]:
        """A summary (what `retrodb neighbours --json` and `--list --json` print);
        ``stale`` when ``current_generation`` is given and differs from the set's."""
        return {
            "name": self.name,
            "version": self.version,
            "rows": self.rows,
            "documents": self.documents,
            "k": self.k,
            "generation": self.generation,
            "stale": current_generation is not None and self.generation != current_generation,
            "source": self.source,
            "inputs": list(self.inputs),
            "exclude": len(self.exclude),
            "exact": self.exact,
            "refreshed_from": self.refreshed_from,
            "segments": [s.name for s in self.segments],
            "self_share": self.self_share,
            "rerank": self.rerank,
            "fetch": self.fetch,
        }

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format": "retrodb-neighbours", **d}
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str) -> NeighbourSetInfo:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorruptError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(d, dict) or d.pop("format", None) != "retrodb-neighbours":
            raise CorruptError(f"{where}: not a retrodb neighbour set description")
        version = d.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= SET_FORMAT_VERSION:
            raise FormatVersionError(
                f"{where}: neighbour-set format version {version!r}; this retrodb reads "
                f"1..{SET_FORMAT_VERSION} (upgrade retrodb)"
            )
        try:
            d["segments"] = tuple(SegmentRef(**s) for s in d["segments"])
            for key in ("inputs", "exclude", "searched"):
                d[key] = tuple(d.get(key, ()))
            return cls(**d)
        except (KeyError, TypeError) as exc:
            raise CorruptError(f"{where}: missing or unknown field ({exc})") from exc


# ---------------------------------------------------------------- the set


class NeighbourSet:
    """One committed version of a neighbour set, read through memory maps.

    Versions are written by :func:`retrodb.neighbours.compute` and
    :func:`retrodb.neighbours.refresh`, which return the new one.

    >>> from retrodb import neighbours                         # doctest: +SKIP
    >>> ns = neighbours.compute(db, "train", k=2)              # doctest: +SKIP
    >>> ns.keys.shape                                          # doctest: +SKIP
    (41230, 2)
    >>> NeighbourSet.open(db, "train")                         # doctest: +SKIP
    StaleError: ... run `retrodb neighbours DB train --refresh`
    """

    def __init__(self, directory: Path, info: NeighbourSetInfo) -> None:
        self.dir = directory
        self.info = info

    def __repr__(self) -> str:
        i = self.info
        return (
            f"NeighbourSet({i.name!r}, rows={i.rows}, k={i.k}, generation={i.generation}, "
            f"source={i.source!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"dir": self.dir, "info": self.info}  # never pickle the maps

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.dir, self.info = state["dir"], state["info"]

    # -------------------------------------------------------- opening

    @classmethod
    def open(cls, db: RetroDB, name: str, *, allow_stale: bool = False) -> NeighbourSet:
        """Open the committed version of set ``name`` of ``db``.

        Raises :class:`StaleError` when it was computed for another generation than
        ``db``'s (unless ``allow_stale``) and :class:`MismatchError` when the tokenizer
        or encoder differ."""
        root = set_root(db, name)
        cur = root / CURRENT_FILE
        try:
            version = cur.read_text().strip()
        except FileNotFoundError as exc:
            raise NotFoundError(
                f"{root}: no neighbour set named {name!r} (make one with "
                f"`retrodb neighbours {db.path} {name}`)"
            ) from exc
        directory = root / version
        meta = directory / META_FILE
        try:
            text = meta.read_text()
        except FileNotFoundError as exc:
            raise CorruptError(f"{meta}: missing (named by {cur})") from exc
        ns = cls(directory, NeighbourSetInfo.from_json(text, where=str(meta)))
        ns.check(db, allow_stale=allow_stale)
        return ns

    def check(self, db: RetroDB, *, allow_stale: bool = False) -> None:
        """Refuse a set made with another tokenizer or encoder, or (unless ``allow_stale``)
        for another generation."""
        i = self.info
        if i.tokenizer_fingerprint != db.manifest.tokenizer["fingerprint"]:
            raise MismatchError(f"{self.dir}: made with another tokenizer than {db.path}'s")
        if not same_fingerprint(i.encoder_fingerprint, db.manifest.encoder["fingerprint"]):
            raise MismatchError(f"{self.dir}: made with another encoder than {db.path}'s")
        if i.chunk_size != db.chunk_size:
            raise MismatchError(f"{self.dir}: chunk size {i.chunk_size}, database {db.chunk_size}")
        if allow_stale or i.generation == db.generation:
            return
        if i.generation > db.generation:
            raise StaleError(
                f"neighbour set {i.name!r} matches generation {i.generation}, newer than the "
                f"opened database (generation {db.generation}); reopen the database"
            )
        raise StaleError(
            f"neighbour set {i.name!r} was computed for generation {i.generation} but "
            f"{db.path} is at generation {db.generation} ({_what_changed(self, db)}); run "
            f"`retrodb neighbours {db.path} {i.name} --refresh` to update it"
        )

    def is_stale(self, db: RetroDB) -> bool:
        return self.info.generation != db.generation

    # -------------------------------------------------------- arrays (memory maps)

    def _array(self, name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        return open_raw_array(
            self.dir / name, dtype=None if dtype is None else np.dtype(dtype), shape=shape
        )

    @cached_property
    def keys(self) -> np.ndarray:
        """``[n, k]`` int64: nearest database keys of each row, best first, -1 = none."""
        return self._array("keys", np.int64, (self.info.rows, self.info.k))

    @cached_property
    def distances(self) -> np.ndarray:
        """``[n, k]`` float32 cosine distances (inf where the key is -1)."""
        return self._array("distances", np.float32, (self.info.rows, self.info.k))

    @cached_property
    def continuations(self) -> np.ndarray:
        """``[n, k]`` int64: the key of each neighbour's continuation (the next chunk of its
        document), -1 at a document's end or where the key is -1."""
        return self._array("continuations", np.int64, (self.info.rows, self.info.k))

    @cached_property
    def doc(self) -> np.ndarray:
        """``[n]`` int32: the document (index into :attr:`doc_ids`) of each row."""
        return self._array("doc", np.int32, (self.info.rows,))

    @cached_property
    def first_row(self) -> np.ndarray:
        return self._array("docs/first_row", np.int64, (self.info.documents,))

    @cached_property
    def num_rows(self) -> np.ndarray:
        return self._array("docs/num_rows", np.int32, (self.info.documents,))

    @cached_property
    def doc_ids(self) -> list[str]:
        ids = read_strings(self.dir / "docs" / "ids")
        if len(ids) != self.info.documents:
            raise CorruptError(
                f"{self.dir / 'docs' / 'ids'}: {len(ids)} ids, expected {self.info.documents}"
            )
        return ids

    @cached_property
    def chunk_keys(self) -> np.ndarray:
        """``[n]`` int64 (source ``db``): the database key of each row."""
        self._need("db", "chunk_keys")
        return self._array("chunk_keys", np.int64, (self.info.rows,))

    @cached_property
    def tokens(self) -> np.ndarray:
        """``[n, m]`` (source ``inputs``): the rows' tokens, padded."""
        self._need("inputs", "tokens")
        return self._array("tokens", None, (self.info.rows, self.info.chunk_size))

    @cached_property
    def lengths(self) -> np.ndarray:
        """``[n]`` int32 (source ``inputs``): real tokens of each row."""
        self._need("inputs", "lengths")
        return self._array("lengths", np.int32, (self.info.rows,))

    @cached_property
    def vectors(self) -> np.ndarray:
        """``[n, d]`` float16 (source ``inputs``): the rows' encoder keys, kept for refresh."""
        self._need("inputs", "vectors")
        return self._array("vectors", np.float16, (self.info.rows, self.info.dim))

    def _need(self, source: str, what: str) -> None:
        if self.info.source != source:
            raise BadInputError(f"{what} exists only in sets of source {source!r}")

    def row_tokens(self, db: RetroDB, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[..., m]`` (int64) and lengths of ``rows``, whatever the source."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.info.source == "db":
            return db.chunks(self.chunk_keys[rows])
        return self.tokens[rows].astype(np.int64), self.lengths[rows]


def list_sets(db: RetroDB) -> list[NeighbourSetInfo]:
    """Every neighbour set of ``db`` (stale or not), by name."""
    out: list[NeighbourSetInfo] = []
    root = db.path / NEIGHBOURS
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if (d / CURRENT_FILE).is_file():
            out.append(NeighbourSet.open(db, d.name, allow_stale=True).info)
    return out


def delete_set(db: RetroDB, name: str) -> None:
    """Remove neighbour set ``name`` and all its versions."""
    root = set_root(db, name)
    if not (root / CURRENT_FILE).exists():
        raise NotFoundError(f"{root}: no neighbour set named {name!r}")
    with set_lock(db, name):
        (root / CURRENT_FILE).unlink()
        fsync_path(root)
        for p in root.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name != LOCK_FILE:
                p.unlink()
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- versions


@dataclass(slots=True)
class Rows:
    """The rows of a set being written, with their documents: the database's own chunks
    (``chunk_keys``, source ``db``) or other documents' chunks (``tokens``, ``lengths`` and
    ``vectors``, source ``inputs``)."""

    doc_ids: list[str]
    doc: np.ndarray  # [n] int32, index into doc_ids
    chunk_keys: np.ndarray | None = None  # source "db"
    tokens: np.ndarray | None = None  # source "inputs"
    lengths: np.ndarray | None = None
    vectors: np.ndarray | None = None  # [n, d] float16

    @property
    def n(self) -> int:
        return int(self.doc.shape[0])

    @property
    def source(self) -> Source:
        return "db" if self.chunk_keys is not None else "inputs"

    @classmethod
    def of_database(cls, db: RetroDB) -> Rows:
        """Every live chunk of the database, in key order."""
        live = db.keymap.live_rows()
        return cls(doc_ids=live.doc_ids, doc=live.doc, chunk_keys=live.keys)

    @classmethod
    def of_set(cls, ns: NeighbourSet) -> Rows:
        """The rows of a set of source ``inputs``, read back (for a refresh)."""
        return cls(
            doc_ids=ns.doc_ids,
            doc=np.asarray(ns.doc),
            tokens=np.asarray(ns.tokens),
            lengths=np.asarray(ns.lengths),
            vectors=np.asarray(ns.vectors),
        )


def write_version(
    db: RetroDB, info: NeighbourSetInfo, rows: Rows, keys: np.ndarray, dist: np.ndarray
) -> NeighbourSet:
    """Write a new version of a set in a temporary directory, publish it (fsync, rename),
    then point CURRENT at it and drop versions older than ``KEEP_OLD_VERSIONS``."""
    root = set_root(db, info.name)
    info = replace(info, version=_next_version(root, info.generation))
    tmp = root / f"{TMP_PREFIX}{info.version}"
    try:
        tmp.mkdir()
        write_array(tmp, "keys", np.ascontiguousarray(keys, dtype=np.int64))
        write_array(tmp, "distances", np.ascontiguousarray(dist, dtype=np.float32))
        write_array(tmp, "continuations", db.continuation_keys(keys))
        write_array(tmp, "doc", rows.doc.astype(np.int32))
        num = np.bincount(rows.doc, minlength=len(rows.doc_ids)).astype(np.int32)
        first = (np.cumsum(num, dtype=np.int64) - num).astype(np.int64)
        write_array(tmp, "docs/ids", np.array(rows.doc_ids, dtype=object))
        write_array(tmp, "docs/first_row", first)
        write_array(tmp, "docs/num_rows", num)
        if rows.chunk_keys is not None:
            write_array(tmp, "chunk_keys", rows.chunk_keys.astype(np.int64))
        else:
            assert rows.tokens is not None and rows.lengths is not None
            assert rows.vectors is not None
            write_array(tmp, "tokens", np.ascontiguousarray(rows.tokens))
            write_array(tmp, "lengths", rows.lengths.astype(np.int32))
            write_array(tmp, "vectors", np.ascontiguousarray(rows.vectors, dtype=np.float16))
        (tmp / META_FILE).write_text(info.to_json())
        final = root / info.version
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(root / CURRENT_FILE, (info.version + "\n").encode())
    _remove_old_versions(root, info.version)
    return NeighbourSet(final, info)


def _versions(root: Path) -> list[Path]:
    """Committed version directories, oldest first (names start with a sequence number)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))


def _next_version(root: Path, generation: int) -> str:
    last = _versions(root)
    seq = int(last[-1].name.split("-")[0]) + 1 if last else 1
    return f"{seq:06d}-g{generation}-{secrets.token_hex(3)}"


def _remove_old_versions(root: Path, current: str) -> None:
    old = [p for p in _versions(root) if p.name != current]
    for p in old[: max(0, len(old) - KEEP_OLD_VERSIONS)]:
        shutil.rmtree(p, ignore_errors=True)


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise BadInputError(
            f"bad neighbour set name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def set_root(db: RetroDB, name: str) -> Path:
    check_name(name)
    return db.path / NEIGHBOURS / name


@contextlib.contextmanager
def set_lock(db: RetroDB, name: str) -> Iterator[None]:
    """The single-writer lock of one set; removes what an interrupted writer left."""
    root = set_root(db, name)
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(
        root / LOCK_FILE, f"{root}: another process is writing neighbour set {name!r}"
    ):
        remove_temporaries(root)
        yield


def _what_changed(ns: NeighbourSet, db: RetroDB) -> str:
    had = {s.name for s in ns.info.segments}
    new = [s for s in db.segments if s.meta.name not in had]
    parts = []
    if new:
        parts.append(f"{len(new)} segment(s) added")
    if len(db.manifest.tombstones):
        parts.append(f"{len(db.manifest.tombstones)} deleted document(s)")
    return ", ".join(parts) or "the database changed"


__all__ = [
    "NeighbourSet",
    "NeighbourSetInfo",
    "Rows",
    "SegmentRef",
    "delete_set",
    "list_sets",
    "set_lock",
    "write_version",
]
