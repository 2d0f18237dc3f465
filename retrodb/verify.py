"""`retrodb verify`: check every committed file of a generation, and list (or remove) what
interrupted writers left behind.

Opening a database checks sizes and headers only (cheap); this module reads everything:
the sha256 of every segment and encoder file against the manifest, the tokenizer's
fingerprint, each segment's document table against its chunk count, the sort order of
explicit keys, and every index mapped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import CorruptError
from .fsutil import sha256_file
from .progress import ProgressFn, no_progress
from .segment import Segment
from .storage import ENCODER_DIR, tokenizer_file
from .tokenizer import fingerprint

if TYPE_CHECKING:
    from .snapshot import Snapshot


@dataclass(slots=True)
class VerifyReport:
    """What ``retrodb verify --json`` prints."""

    ok: bool
    generation: int
    files_checked: int
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    retained: list[str] = field(default_factory=list)
    """Segments merged away by a compaction, kept one more generation for readers."""
    unreachable: int = 0
    """Live chunks that a search for their own key vector does not return (0 for indexes
    written by this version: their side lists cover what the graph cannot reach)."""
    side_list: int = 0
    """Chunks found through the segments' exactly searched side lists."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:  # reports were dicts; keep `rep["ok"]` working
        return getattr(self, key)


def _committed_files(snap: Snapshot) -> list[tuple[Path, int, str]]:
    m = snap.manifest
    files: list[tuple[Path, int, str]] = []
    for s in m.segments:
        d = snap.storage.segment_dir(s.name)
        files += [(d / rel, fi.size, fi.sha256) for rel, fi in s.files.items()]
    enc_dir = snap.path / ENCODER_DIR
    files += [
        (enc_dir / rel, int(fi["size"]), str(fi["sha256"]))
        for rel, fi in m.encoder.get("files", {}).items()
    ]
    return files


def _check_file(p: Path, size: int, digest: str) -> str | None:
    if not p.is_file():
        return f"{p}: missing"
    if p.stat().st_size != size:
        return f"{p}: {p.stat().st_size} bytes, the manifest recorded {size}"
    if sha256_file(p) != digest:
        links = p.stat().st_nlink - 1
        shared = (
            f"; it is a hard link shared with {links} other file(s), e.g. the encoder store "
            "and other databases built with the same encoder, which share the damage"
            if links
            else ""
        )
        return f"{p}: checksum does not match the manifest (the file is damaged{shared})"
    return None


def _check_segment(s: Segment) -> list[str]:
    _ = s.ids  # reads and counts the ids
    problems = []
    if s.meta.chunks and (int(s.num_chunks.sum()) != s.meta.chunks or int(s.lengths.min()) < 1):
        problems.append(f"{s.dir}: document table does not add up to the chunk count")
    if s.key_array is not None and s.meta.chunks:
        k = np.asarray(s.key_array)
        if (np.diff(k) <= 0).any() or k[0] < s.meta.first_key or k[-1] >= s.meta.stop_key:
            problems.append(f"{s.dir / 'keys'}: keys not sorted or out of range")
    return problems


def verify(
    snap: Snapshot, *, repair: bool = False, progress: ProgressFn = no_progress
) -> VerifyReport:
    """Check every committed file against the sizes and checksums in the manifest, open
    every array and index, and list what an interrupted writer left behind. ``repair``
    removes those leftovers (under the writer lock); committed data is never changed."""
    m = snap.manifest
    latest = snap  # the generation whose kept segments are reported (newer after repair)
    files = _committed_files(snap)
    total = len(files) + 2
    problems: list[str] = []
    progress("verify", 0, total)
    for i, (p, size, digest) in enumerate(files):
        problem = _check_file(p, size, digest)
        if problem:
            problems.append(problem)
        progress("verify", i + 1, total)
    tok = snap.path / tokenizer_file(m.tokenizer)
    if not tok.is_file():
        problems.append(f"{tok}: missing")
    elif fingerprint(tok.read_bytes()) != m.tokenizer["fingerprint"]:
        problems.append(f"{tok}: checksum does not match the manifest")
    unreachable = side = 0
    if not problems:
        try:
            for s in snap.keymap.segments:
                problems += _check_segment(s)
            for ix in snap.indexes:
                lost = ix.unreachable(progress=progress)
                unreachable += int((~snap.keymap.deleted(lost)).sum())
                side += int(ix.side_keys.size)
        except CorruptError as exc:
            problems.append(str(exc))
    progress("verify", total, total)
    leftovers = snap.storage.leftovers(m)
    removed: list[str] = []
    if repair and leftovers:
        with snap.storage.writer_lock():
            latest = snap.latest()
            removed = [str(p) for p in snap.storage.remove_leftovers(latest.manifest)]
            leftovers = []
    return VerifyReport(
        ok=not problems,
        generation=m.generation,
        files_checked=len(files) + 1,
        problems=problems,
        leftovers=[str(p) for p in leftovers],
        removed=removed,
        retained=sorted(
            str(snap.storage.segment_dir(n)) for n in snap.storage.retained(latest.manifest)
        ),
        unreachable=unreachable,
        side_list=side,
    )


__all__ = ["VerifyReport", "verify"]
