"""The files of a database: Zarr v3 segment arrays, manifests, CURRENT and LOCK.
The only zarr user.

Commit protocol (see docs/format.md): a writer takes LOCK, writes a new segment in a
temporary directory, fsyncs and renames it into ``segments/``, writes manifest N+1, then
replaces CURRENT atomically. That rename is the commit point. Readers read CURRENT once.

Arrays are uncompressed Zarr v3 arrays with a single chunk whose only codec is ``bytes``:
plain ``zarr.open`` reads them, and the chunk file is a raw C-order array that
``numpy.memmap`` maps directly once ``zarr.json`` has been checked (the hot read path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .config import FORMAT_VERSION
from .errors import (
    CorruptError,
    FormatVersionError,
    NotADatabaseError,
    NotFoundError,
    RetroDBError,
)
from .failpoints import failpoint
from .fsutil import (
    TMP_PREFIX,
    FileInfo,
    exclusive_lock,
    file_table,
    publish_dir,
    remove_path,
    write_atomic,
)

CURRENT = "CURRENT"
LOCK = "LOCK"
MANIFESTS = "manifests"
SEGMENTS = "segments"
NEIGHBOURS = "neighbours"
#: The tokenizer's file: a SentencePiece model (the only kind before the manifest's
#: ``tokenizer.kind``), or a Hugging Face tokenizer.json.
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_FILES = {"sentencepiece": TOKENIZER_FILE, "huggingface": "tokenizer.json"}
ENCODER_DIR = "encoder"
INDEX_FILE = "index.usearch"
#: Old manifests kept after a commit (for debugging and for readers that are slow to start).
KEEP_MANIFESTS = 5
#: The manifest feature of segments that store their keys explicitly (written by compaction).
EXPLICIT_KEYS = "explicit-keys"

_MANIFEST_RE = re.compile(r"^\d{6,}\.json$")


def tokenizer_kind(tokenizer: Mapping[str, Any]) -> str:
    """The kind of tokenizer a manifest's tokenizer section records (``sentencepiece``
    in manifests written before ``kind`` existed)."""
    return str(tokenizer.get("kind", "sentencepiece"))


def tokenizer_file(tokenizer: Mapping[str, Any]) -> str:
    """The tokenizer's file name in the database, from a manifest's tokenizer section
    (``tokenizer.model`` in manifests without ``file``). Only the known names are
    accepted: a manifest never points outside the database."""
    name = str(tokenizer.get("file", TOKENIZER_FILES.get(tokenizer_kind(tokenizer), "")))
    if name not in TOKENIZER_FILES.values():
        raise CorruptError(f"manifest: unknown tokenizer file {name!r}")
    return name


# ---------------------------------------------------------------- manifest objects


@dataclass(frozen=True, slots=True)
class SegmentMeta:
    """One immutable segment as recorded in a manifest."""

    name: str
    first_key: int
    chunks: int
    documents: int
    tokens: int
    files: Mapping[str, FileInfo]
    """Every file of the segment (relative path -> size and sha256), the index included."""
    key_stop: int | None = None
    """None: the segment holds keys ``first_key .. first_key + chunks - 1`` (row r is key
    ``first_key + r``). Else its keys are the sorted ``keys`` array, all in
    ``first_key .. key_stop - 1`` (a compacted segment, with the rows of deleted documents
    dropped)."""
    index_guard: tuple[int, int] | None = None
    """``(offset, crc32)`` of the index file's graph (everything after the vectors),
    checked before the index is mapped: a damaged graph would crash USearch."""

    @property
    def explicit_keys(self) -> bool:
        return self.key_stop is not None

    @property
    def stop_key(self) -> int:
        """One past the largest key the segment may hold."""
        return self.first_key + self.chunks if self.key_stop is None else self.key_stop

    @property
    def last_key(self) -> int:
        return self.stop_key - 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["files"] = {k: dataclasses.asdict(v) for k, v in self.files.items()}
        for opt in ("key_stop", "index_guard"):
            if d[opt] is None:
                del d[opt]
        if self.index_guard is not None:
            d["index_guard"] = {"offset": self.index_guard[0], "crc32": self.index_guard[1]}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentMeta:
        return cls(
            name=str(d["name"]),
            first_key=int(d["first_key"]),
            chunks=int(d["chunks"]),
            documents=int(d["documents"]),
            tokens=int(d["tokens"]),
            files={k: FileInfo(int(v["size"]), str(v["sha256"])) for k, v in d["files"].items()},
            key_stop=None if d.get("key_stop") is None else int(d["key_stop"]),
            index_guard=(
                (int(d["index_guard"]["offset"]), int(d["index_guard"]["crc32"]))
                if d.get("index_guard")
                else None
            ),
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    """One committed generation of the database."""

    generation: int
    config: dict[str, Any]
    tokenizer: dict[str, Any]
    """kind, file, fingerprint, vocab_size, pad_id, eos_id, bos_id, token_dtype, size,
    trainer (how it was trained; absent for a given tokenizer and in databases built before
    it was recorded) and source (the path it was loaded from, for a given tokenizer).
    Databases built before ``kind`` hold a SentencePiece model in ``tokenizer.model``
    (:func:`tokenizer_kind`, :func:`tokenizer_file`)."""
    encoder: dict[str, Any]
    """dir, fingerprint (``sha256:<hex>``; bare hex in databases built before), dim, files."""
    next_key: int
    segments: tuple[SegmentMeta, ...] = ()
    tombstones: tuple[str, ...] = ()
    """Ids of deleted documents still present in some segment."""
    features: tuple[str, ...] = ()
    created: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.segments) - len(self.tombstones)

    @property
    def chunks(self) -> int:
        return sum(s.chunks for s in self.segments)

    def to_json(self) -> str:
        d = {
            "format": "retrodb",
            "format_version": self.format_version,
            "features": list(self.features),
            "generation": self.generation,
            "created": self.created,
            "config": self.config,
            "tokenizer": self.tokenizer,
            "encoder": self.encoder,
            "next_key": self.next_key,
            "segments": [s.to_dict() for s in self.segments],
            "tombstones": list(self.tombstones),
        }
        d["checksum"] = _manifest_checksum(d)
        return json.dumps(d, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str) -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorruptError(f"{where}: manifest is not valid JSON ({exc.msg})") from exc
        if not isinstance(d, dict) or d.get("format") != "retrodb":
            raise CorruptError(f"{where}: not a retrodb manifest")
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise FormatVersionError(
                f"{where}: on-disk format version {version!r}; this retrodb reads versions "
                f"1..{FORMAT_VERSION} (upgrade retrodb)"
            )
        unknown = set(d.get("features", [])) - KNOWN_FEATURES
        if unknown:
            raise FormatVersionError(f"{where}: unknown format features {sorted(unknown)}")
        recorded = d.pop("checksum", None)
        if recorded is not None and recorded != _manifest_checksum(d):
            raise CorruptError(f"{where}: manifest checksum does not match (the file is damaged)")
        try:
            return cls(
                generation=int(d["generation"]),
                config=dict(d["config"]),
                tokenizer=dict(d["tokenizer"]),
                encoder=dict(d["encoder"]),
                next_key=int(d["next_key"]),
                segments=tuple(SegmentMeta.from_dict(s) for s in d["segments"]),
                tombstones=tuple(str(t) for t in d.get("tombstones", [])),
                features=tuple(d.get("features", [])),
                created=float(d.get("created", 0.0)),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptError(f"{where}: manifest is missing or has a bad field ({exc})") from exc


KNOWN_FEATURES: frozenset[str] = frozenset({EXPLICIT_KEYS})


def _manifest_checksum(d: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON (without its own ``checksum`` field)."""
    canon = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


# ---------------------------------------------------------------- arrays


def write_array(group_dir: Path, name: str, data: np.ndarray) -> None:
    """Write ``data`` as an uncompressed single-chunk Zarr v3 array ``name`` of ``group_dir``."""
    if data.dtype.kind not in ("U", "O") and data.size:
        w = RawArrayWriter(group_dir, name, data.dtype, data.shape[1:])
        w.append(data)
        w.finish()
        return
    group = zarr.open_group(str(group_dir), mode="a", zarr_format=3)
    if data.dtype.kind in ("U", "O"):
        arr = group.create_array(
            name,
            shape=data.shape,
            chunks=data.shape,
            dtype=str,
            compressors=None,
            config={"write_empty_chunks": True},
        )
    else:
        arr = group.create_array(
            name,
            shape=data.shape,
            chunks=data.shape,
            dtype=data.dtype,
            compressors=None,
            filters=None,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
    arr[...] = data


def _chunk_path(array_dir: Path, ndim: int) -> Path:
    return array_dir.joinpath("c", *(["0"] * ndim))


class RawArrayWriter:
    """Build a large array by appending rows, without holding it in memory.

    Rows go to a raw little-endian file beside the group; :meth:`finish` writes the
    array's ``zarr.json`` for the final shape and moves the file into place as its single
    chunk, which is exactly what :func:`write_array` would have written."""

    def __init__(
        self, group_dir: Path, name: str, dtype: np.dtype | type, row_shape: tuple[int, ...] = ()
    ) -> None:
        self.group_dir = Path(group_dir)
        self.name = name
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_shape = tuple(int(s) for s in row_shape)
        self.rows = 0
        self.group_dir.mkdir(parents=True, exist_ok=True)
        self.raw = self.group_dir / f"{TMP_PREFIX}raw-{name.replace('/', '-')}"
        self._f = open(self.raw, "wb")  # noqa: SIM115 - closed in finish()/discard()

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.name}: rows {rows.shape[1:]}, expected {self.row_shape}")
        try:
            failpoint("array_write", self.raw)
            self._f.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.raw)) from exc
        self.rows += rows.shape[0]

    def finish(self) -> Path:
        """Close the file and make it a Zarr array; returns the array's directory."""
        self._f.close()
        shape = (self.rows, *self.row_shape)
        group = zarr.open_group(str(self.group_dir), mode="a", zarr_format=3)
        group.create_array(
            self.name,
            shape=shape,
            chunks=shape,
            dtype=self.dtype.newbyteorder("="),
            compressors=None,
            filters=None,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        array_dir = self.group_dir / self.name
        chunk = _chunk_path(array_dir, len(shape))
        chunk.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.raw, chunk)
        return array_dir

    def discard(self) -> None:
        self._f.close()
        self.raw.unlink(missing_ok=True)


def open_raw_array(
    array_dir: Path, *, dtype: np.dtype | None = None, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Memory-map the single raw chunk of a Zarr v3 array written by :func:`write_array`.

    ``zarr.json`` is checked first (shape, data type, one chunk, only the little-endian
    ``bytes`` codec) and the chunk file's size must match, so a damaged file gives a
    :class:`CorruptError` naming it instead of wrong data or a crash."""
    meta_path = array_dir / "zarr.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise CorruptError(f"{meta_path}: missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptError(f"{meta_path}: not valid JSON") from exc
    try:
        arr_shape = tuple(int(s) for s in meta["shape"])
        arr_dtype = np.dtype(meta["data_type"])
        chunk_shape = tuple(int(s) for s in meta["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = meta["codecs"]
        sep = meta["chunk_key_encoding"]["configuration"].get("separator", "/")
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptError(f"{meta_path}: not a Zarr v3 array description ({exc})") from exc
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise CorruptError(f"{meta_path}: not a Zarr v3 array")
    if chunk_shape != arr_shape or sep != "/":
        raise CorruptError(f"{meta_path}: expected a single chunk, got chunk shape {chunk_shape}")
    if (
        len(codecs) != 1
        or codecs[0].get("name") != "bytes"
        or codecs[0].get("configuration", {}).get("endian", "little") != "little"
    ):
        raise CorruptError(f"{meta_path}: expected only the little-endian 'bytes' codec")
    if shape is not None and arr_shape != tuple(shape):
        raise CorruptError(f"{meta_path}: shape {arr_shape}, the manifest implies {tuple(shape)}")
    if dtype is not None and arr_dtype != np.dtype(dtype):
        raise CorruptError(f"{meta_path}: data type {arr_dtype}, expected {np.dtype(dtype)}")
    chunk = _chunk_path(array_dir, len(arr_shape))
    expected = int(np.prod(arr_shape)) * arr_dtype.itemsize
    try:
        size = chunk.stat().st_size
    except FileNotFoundError as exc:
        raise CorruptError(f"{chunk}: array data missing") from exc
    if size != expected:
        raise CorruptError(
            f"{chunk}: {size} bytes, expected {expected} for shape {arr_shape} {arr_dtype}"
        )
    if expected == 0:
        return np.zeros(arr_shape, dtype=arr_dtype)
    return np.memmap(chunk, dtype=arr_dtype.newbyteorder("<"), mode="r", shape=arr_shape)


def read_strings(array_dir: Path) -> list[str]:
    """Read a small string array (document ids) through zarr."""
    try:
        arr = zarr.open_array(str(array_dir), mode="r", zarr_format=3)
        return [str(s) for s in np.asarray(arr[...]).tolist()]
    except Exception as exc:  # zarr raises many types on damaged metadata or chunks
        raise CorruptError(f"{array_dir}: cannot read string array ({exc})") from exc


# ---------------------------------------------------------------- the database directory


class Storage:
    """The directory of one database."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- checks and reading

    def check_exists(self) -> None:
        if not self.root.exists():
            raise NotFoundError(f"{self.root}: no such database")
        if not self.root.is_dir():
            raise NotADatabaseError(f"{self.root}: not a database (it is a file, not a directory)")
        if not (self.root / CURRENT).is_file():
            raise NotADatabaseError(
                f"{self.root}: not a retrodb database (no {CURRENT} file; an interrupted build?)"
            )

    def current_name(self) -> str:
        self.check_exists()
        path = self.root / CURRENT
        name = path.read_text(errors="replace").strip()
        if not _MANIFEST_RE.match(name):
            raise CorruptError(f"{path}: does not name a manifest ({name[:40]!r})")
        return name

    def read_manifest(self, name: str | None = None) -> Manifest:
        name = name or self.current_name()
        path = self.root / MANIFESTS / name
        try:
            text = path.read_text()
        except FileNotFoundError as exc:
            raise CorruptError(f"{path}: manifest named by {CURRENT} is missing") from exc
        except UnicodeDecodeError as exc:
            raise CorruptError(f"{path}: manifest is not UTF-8 text") from exc
        return Manifest.from_json(text, where=str(path))

    def segment_dir(self, name: str) -> Path:
        return self.root / SEGMENTS / name

    # -- writing

    def writer_lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold the single-writer lock; fail at once with :class:`LockedError` if it is held."""
        path = self.root / LOCK
        return exclusive_lock(
            path, f"{self.root}: another writer holds the lock ({path}); try again when it is done"
        )

    def init_layout(self) -> None:
        for d in (MANIFESTS, SEGMENTS, NEIGHBOURS):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    def new_segment_dir(self, name: str) -> Path:
        """A fresh temporary directory for a segment being written."""
        tmp = self.root / SEGMENTS / f"{TMP_PREFIX}{name}"
        tmp.mkdir(parents=True)
        return tmp

    def seal_segment(self, tmp: Path, name: str) -> dict[str, FileInfo]:
        """Checksum, fsync and rename a finished segment directory into place."""
        files = file_table(tmp)
        final = self.segment_dir(name)
        publish_dir(tmp, final, failpoint_name="before_segment_rename")
        failpoint("after_segment_rename", final)
        return files

    def commit(self, manifest: Manifest) -> None:
        """Write ``manifest`` and make it current: the commit point."""
        name = f"{manifest.generation:06d}.json"
        mdir = self.root / MANIFESTS
        mdir.mkdir(exist_ok=True)
        failpoint("before_manifest", mdir / name)
        write_atomic(mdir / name, manifest.to_json().encode())
        failpoint("after_manifest", mdir / name)
        failpoint("before_current", self.root / CURRENT)
        write_atomic(self.root / CURRENT, (name + "\n").encode())
        failpoint("after_current", self.root / CURRENT)
        # Old manifests beyond the last KEEP_MANIFESTS (best effort: the commit is done).
        with contextlib.suppress(OSError):
            names = sorted(p.name for p in mdir.iterdir() if _MANIFEST_RE.match(p.name))
            for old in names[: max(0, len(names) - KEEP_MANIFESTS)]:
                if int(old.split(".")[0]) < manifest.generation:
                    (mdir / old).unlink(missing_ok=True)

    def retained(self, manifest: Manifest) -> set[str]:
        """Segments the previous generation names and ``manifest`` does not (merged away by
        compaction): kept for one more generation, for readers that opened the previous one."""
        try:
            prev = self.read_manifest(f"{manifest.generation - 1:06d}.json")
        except (RetroDBError, OSError):
            return set()
        return {s.name for s in prev.segments} - {s.name for s in manifest.segments}

    def leftovers(self, manifest: Manifest) -> list[Path]:
        """Files and directories that no committed generation uses: what an interrupted
        writer left behind (temporary files, uncommitted segments, old manifests), and
        segments dropped by a compaction more than one generation ago."""
        out: list[Path] = []
        live = {s.name for s in manifest.segments} | self.retained(manifest)
        seg_root = self.root / SEGMENTS
        if seg_root.is_dir():
            out += [p for p in sorted(seg_root.iterdir()) if p.name not in live]
        mdir = self.root / MANIFESTS
        if mdir.is_dir():
            names = sorted(p.name for p in mdir.iterdir() if _MANIFEST_RE.match(p.name))
            keep = set(names[-KEEP_MANIFESTS:]) | {f"{manifest.generation:06d}.json"}
            out += [
                p
                for p in sorted(mdir.iterdir())
                if p.name.startswith(TMP_PREFIX)
                or (
                    _MANIFEST_RE.match(p.name)
                    and p.name not in keep
                    and int(p.name.split(".")[0]) < manifest.generation
                )
                or (_MANIFEST_RE.match(p.name) and int(p.name.split(".")[0]) > manifest.generation)
            ]
        out += [p for p in sorted(self.root.iterdir()) if p.name.startswith(TMP_PREFIX)]
        return out

    def remove_leftovers(self, manifest: Manifest) -> list[Path]:
        removed = self.leftovers(manifest)
        for p in removed:
            remove_path(p)
        return removed

    def disk_usage(self, tokenizer: str = TOKENIZER_FILE) -> dict[str, int]:
        """Bytes on disk per part of the database, and ``shared``: how many of them are
        hard links that other databases (or the encoder store) share, so deleting this
        database does not free them. Safe while a writer works: files that vanish during
        the walk (a writer's temporary files) are skipped. ``tokenizer``: the tokenizer's
        file name (:func:`tokenizer_file`)."""
        shared = 0

        def files(p: Path) -> Iterator[tuple[str, int]]:
            nonlocal shared
            paths: Iterator[str]
            if p.is_file():
                paths = iter([str(p)])
            else:  # os.walk ignores vanished directories
                paths = (os.path.join(d, n) for d, _dirs, names in os.walk(p) for n in names)
            for path in paths:
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    shared += st.st_size if st.st_nlink > 1 else 0
                    yield os.path.basename(path), st.st_size

        def size(p: Path) -> int:
            return sum(n for _, n in files(p))

        usage = {
            "tokenizer": size(self.root / tokenizer),
            "encoder": size(self.root / ENCODER_DIR),
            "manifests": size(self.root / MANIFESTS),
            "neighbours": size(self.root / NEIGHBOURS),
            "segment_arrays": 0,
            "segment_indexes": 0,
        }
        for name, n in files(self.root / SEGMENTS):
            usage["segment_indexes" if name.endswith(".usearch") else "segment_arrays"] += n
        usage["total"] = sum(usage.values())
        usage["shared"] = shared
        return usage


def check_not_in_use(path: Path) -> None:
    """Refuse to build over an existing file or a non-empty directory."""
    if path.exists():
        if path.is_file():
            raise NotADatabaseError(f"{path}: exists and is a file; choose a new database path")
        if any(path.iterdir()):
            raise RetroDBError(f"{path}: already exists and is not empty; choose a new path")
