"""Delete (tombstones) and compaction (merge segments, drop deleted rows, keep every live key)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrodb import BadInputError, RetroDB
from retrodb.encoder import Encoder
from retrodb.search import Exclusion
from retrodb_cli.main import app

from .conftest import ASYNCIO, SMALL, TOPICS, copy_db, write_corpus

MORE = {
    "json.txt": "JSON encodes objects as text; json.dumps writes a string, json.loads reads one. ",
    "http.txt": "An HTTP server answers requests with a status line, headers and a body. ",
}


@pytest.fixture(scope="module")
def db3_pristine(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("db3")
    corpus_dir = write_corpus(root / "corpus", TOPICS)
    more_dir = write_corpus(root / "more", ASYNCIO)
    db = RetroDB.build(root / "db", [corpus_dir], config=SMALL, encoder=tiny_encoder_dir)
    db.add([more_dir])
    db.add([write_corpus(root / "extra", MORE, repeat=5)])
    return root / "db"


@pytest.fixture
def db3(db3_pristine: Path, tmp_path: Path) -> RetroDB:
    """Three segments: the four topics, asyncio, then json + http (a copy per test)."""
    return RetroDB.open(copy_db(db3_pristine, tmp_path / "db"))


def live_docs(db: RetroDB) -> dict[str, tuple[list[int], list[str], list[int]]]:
    """Document id -> (keys, chunk texts, continuation keys) of every live document."""
    dead = set(db.manifest.tombstones)
    out = {}
    for seg in db.segments:
        for di, doc_id in enumerate(seg.ids):
            if doc_id in dead:
                continue
            rows = np.arange(
                int(seg.first_chunk[di]), int(seg.first_chunk[di] + seg.num_chunks[di])
            )
            keys = seg.row_keys(rows)
            out[doc_id] = (keys.tolist(), db.decode(keys), db.continuation_keys(keys).tolist())
    return out


def doc_keys(db: RetroDB, doc_id: str) -> np.ndarray:
    si, di = db.doc_index()[doc_id]
    seg = db.segments[si]
    return seg.row_keys(
        np.arange(int(seg.first_chunk[di]), int(seg.first_chunk[di] + seg.num_chunks[di]))
    )


def test_delete_hides_documents_from_every_search(db3: RetroDB) -> None:
    gen = db3.generation
    victim = "regex.md"
    keys = doc_keys(db3, victim)
    texts = db3.decode(keys)
    res = db3.delete([victim])
    assert res.generation == gen + 1 and res.deleted == 1 and res.tombstones == 1
    for db in (db3, RetroDB.open(db3.path)):
        assert db.info()["documents"] == 6 and db.info()["deleted_documents"] == 1
        assert db.deleted_mask(keys).all() and not db.deleted_mask(keys + 10_000).any()
        n = db.manifest.chunks
        found = db.search(texts, k=n).keys
        assert not np.isin(found, keys).any() and (found >= 0).sum() > 0
        vecs = db.indexes[0].vectors(keys)
        exact = db.search_vectors(vecs, k=n, exact=True).keys
        assert not np.isin(exact, keys).any()
        # Restricted to one segment and with an exclusion, deleted rows still never come back.
        none = Exclusion(own_doc=np.full(len(vecs), -2))
        only0 = db.search_vectors(vecs, k=5, segments=[0], exclusion=none).keys
        assert not np.isin(only0, keys).any()
    assert db3.verify()["ok"]


def test_delete_refuses_bad_ids_and_writes_nothing(db3: RetroDB, tmp_path: Path) -> None:
    gen = db3.generation
    with pytest.raises(BadInputError, match="'nope.txt'"):
        db3.delete(["files.txt", "nope.txt"])
    with pytest.raises(BadInputError, match="no document ids"):
        db3.delete([])
    with pytest.raises(BadInputError, match="not one string"):
        db3.delete("files.txt")  # type: ignore[arg-type]
    assert RetroDB.open(db3.path).generation == gen
    db3.delete(["files.txt"])
    with pytest.raises(BadInputError, match="already deleted"):
        db3.delete(["files.txt"])
    again = write_corpus(tmp_path / "again", {"files.txt": "new text about files. "})
    with pytest.raises(BadInputError, match="compact"):
        db3.add([again])


def test_compact_keeps_live_keys_and_never_encodes(
    db3: RetroDB, monkeypatch, tmp_path: Path
) -> None:
    db3.delete(["asyncio.txt", "sorting.rst"])  # a whole middle segment and part of the first
    before = live_docs(db3)
    dropped = np.concatenate([doc_keys(db3, "asyncio.txt"), doc_keys(db3, "sorting.rst")])
    vectors = {
        d: db3.indexes[db3.locate(np.array(k[:1]))[0][0]].vectors(np.array(k))
        for d, (k, _, _) in before.items()
    }
    old_names = [s.meta.name for s in db3.segments]
    next_key = db3.manifest.next_key

    def boom(*a, **k):
        raise AssertionError("compaction must not run the encoder")

    monkeypatch.setattr(Encoder, "encode", boom)
    res = db3.compact()
    assert res.changed and res.segments_before == 3 and res.segments_after == 1
    assert res.documents_dropped == 2 and res.chunks_dropped == dropped.size
    for db in (db3, RetroDB.open(db3.path)):
        assert db.manifest.tombstones == () and len(db.segments) == 1
        assert db.manifest.next_key == next_key
        assert "explicit-keys" in db.manifest.features  # the keys have gaps now
        assert live_docs(db) == before
        assert (db.locate(dropped)[0] == -1).all()
        with pytest.raises(BadInputError, match="not in the database"):
            db.chunks(dropped[:1])
        for doc_id, (keys, _, _) in before.items():
            got = db.indexes[0].vectors(np.array(keys))
            assert np.allclose(got, vectors[doc_id], atol=1e-3)
            hit = db.search_vectors(got[:1], k=1, exact=True).keys[0, 0]
            assert hit == keys[0]
        # No continuation crosses a document.
        allk = np.array(sorted(k for v in before.values() for k in v[0]))
        cont = db.continuation_keys(allk)
        docs = db.key_doc_numbers(allk)
        ok = cont >= 0
        assert (cont[ok] == allk[ok] + 1).all()
        assert (docs[np.searchsorted(allk, cont[ok])] == docs[ok]).all()
    assert db3.verify()["ok"]
    # The merged-away segments stay while the previous generation names them (readers may
    # hold it); the writer whose commit leaves them unnamed removes them, and verify then
    # reports no leftovers.
    seg_dir = db3.path / "segments"
    assert set(old_names) <= {p.name for p in seg_dir.iterdir()}
    monkeypatch.undo()
    db3.add([write_corpus(tmp_path / "n1", {"n1.txt": "brand new text one. " * 3})])
    assert not set(old_names) & {p.name for p in seg_dir.iterdir()}
    rep = db3.verify()
    assert rep["ok"] and rep["leftovers"] == [] and rep["retained"] == []
    res2 = db3.add([write_corpus(tmp_path / "n2", {"n2.txt": "brand new text two. " * 3})])
    assert db3.segments[-1].meta.first_key >= next_key  # keys are never reused
    assert res2.generation == db3.generation and db3.verify()["ok"]
    assert live_docs(db3).items() >= before.items()


def test_compact_without_deletions_is_contiguous_and_idempotent(db3: RetroDB) -> None:
    before = live_docs(db3)
    res = db3.compact()
    assert res.changed and len(db3.segments) == 1
    assert not db3.segments[0].meta.explicit_keys and db3.manifest.features == ()
    assert live_docs(db3) == before
    again = db3.compact()
    assert not again.changed and again.generation == res.generation


def test_compact_everything_deleted(db3: RetroDB, tmp_path: Path) -> None:
    db3.delete(list(db3.doc_index()))
    db3.compact()
    db = RetroDB.open(db3.path)
    assert db.segments == [] and db.info()["documents"] == 0
    assert (db.search(["anything"], k=2).keys == -1).all()
    db.add([write_corpus(tmp_path / "n", {"n.txt": "text after the purge. " * 3})])
    assert db.info()["documents"] == 1 and db.verify()["ok"]


def test_delete_and_compact_commands(db3: RetroDB, tmp_path: Path) -> None:
    runner = CliRunner()
    ids = tmp_path / "ids.txt"
    ids.write_text("http.txt\n\n")
    res = runner.invoke(app, ["delete", str(db3.path), "--doc", "json.txt", "--doc-file", str(ids)])
    assert res.exit_code == 0, res.output
    assert "deleted 2" in res.output
    res = runner.invoke(app, ["delete", str(db3.path), "--doc", "missing.txt"])
    assert res.exit_code == 1 and "missing.txt" in res.stderr
    res = runner.invoke(app, ["compact", str(db3.path), "--quiet"])
    assert res.exit_code == 0, res.output
    info = json.loads(runner.invoke(app, ["info", str(db3.path), "--json"]).output)
    assert info["segments"] == 1 and info["deleted_documents"] == 0 and info["documents"] == 5
    for cmd in ("delete", "compact"):
        assert "Usage" in runner.invoke(app, [cmd, "--help"]).output
