"""Snapshots: one committed generation, read-only, and the facade that swaps them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrodb import RetroDB
from retrodb.snapshot import Snapshot

from .conftest import ASYNCIO, TOPICS, copy_db, pristine_db, write_corpus

pristine = pristine_db("snap", lambda root: write_corpus(root / "corpus", TOPICS))


@pytest.fixture
def db(pristine: Path, tmp_path: Path) -> RetroDB:
    return RetroDB.open(copy_db(pristine, tmp_path / "db"))


def test_a_held_snapshot_keeps_its_generation(db: RetroDB, tmp_path: Path) -> None:
    before = db.snapshot
    hits_before = before.search(["regular expressions"], k=3).keys
    res = db.add([write_corpus(tmp_path / "more", ASYNCIO)])
    after = db.snapshot
    assert res.generation == 2 and after.generation == 2 and before.generation == 1
    assert after is not before and db.generation == 2
    # the old snapshot answers from generation 1, whatever the facade moved to
    assert before.info()["documents"] == 4 and after.info()["documents"] == 5
    assert np.array_equal(before.search(["regular expressions"], k=3).keys, hits_before)
    new_keys = np.arange(after.manifest.next_key - 1, after.manifest.next_key)
    assert before.key_documents(new_keys) == [None]  # a key generation 1 does not have
    assert after.key_documents(new_keys) == ["asyncio.txt"]
    # the next generation shares the tokenizer and the encoder that was already open
    assert after.tokenizer is before.tokenizer
    assert after.open_encoder is before.open_encoder is not None


def test_facade_reads_are_the_snapshots(db: RetroDB) -> None:
    keys = db.search(["sorting a list"], k=2).keys
    assert np.array_equal(keys, db.snapshot.search(["sorting a list"], k=2).keys)
    assert db.decode(keys[0]) == db.snapshot.decode(keys[0])
    assert db.info() == db.snapshot.info()
    assert RetroDB.search.__doc__ == Snapshot.search.__doc__


def test_refresh_and_latest(db: RetroDB, tmp_path: Path) -> None:
    other = RetroDB.open(db.path)
    first = other.snapshot
    assert first.latest() is first and not other.refresh()  # nothing committed since
    db.delete(["files.txt"])
    assert other.snapshot is first  # a reader moves only when it asks
    assert other.refresh() and other.generation == 2
    assert other.snapshot.deleted_mask(np.arange(first.manifest.next_key)).any()
    assert not first.deleted_mask(np.arange(first.manifest.next_key)).any()
    assert first.at_generation(2).generation == 2 and first.at_generation(1) is first


def test_failed_write_keeps_the_snapshot(db: RetroDB, tmp_path: Path) -> None:
    snap = db.snapshot
    with pytest.raises(Exception, match="files.txt"):
        db.add([write_corpus(tmp_path / "dup", {"files.txt": "again"})])  # a duplicate id
    assert db.snapshot is snap and db.generation == 1


def test_loaded_indexes_answer_as_mapped_ones_and_follow_commits(
    db: RetroDB, tmp_path: Path
) -> None:
    loaded = RetroDB.open(db.path, load_indexes=True)
    queries = ["regular expressions", "sorting a list", "threads and locks"]
    mapped = db.search(queries, k=3)
    got = loaded.search(queries, k=3)
    assert np.array_equal(got.keys, mapped.keys)
    assert np.allclose(got.distances, mapped.distances)
    db.add([write_corpus(tmp_path / "more", ASYNCIO)])
    assert loaded.refresh() and loaded.snapshot.load_indexes  # the next generation loads too
    assert np.array_equal(loaded.search(queries, k=3).keys, db.search(queries, k=3).keys)
