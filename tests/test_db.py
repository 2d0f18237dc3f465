"""The database end to end: build, add, search, retrieve, reopen, mismatches, verify."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from retrodb import (
    BadInputError,
    MismatchError,
    NotADatabaseError,
    NotFoundError,
    RetroDB,
    RetroDBError,
    TokenizerConfig,
)
from retrodb.tokenizer import Tokenizer

from .conftest import SMALL, TOPICS, copy_db, pristine_db, write_corpus

tiny_pristine = pristine_db("tiny", lambda root: write_corpus(root / "corpus", TOPICS))


@pytest.fixture
def tiny_db(tiny_pristine: Path, tmp_path: Path) -> RetroDB:
    """The four topics (corpus_dir's documents), built once per module, copied per test."""
    return RetroDB.open(copy_db(tiny_pristine, tmp_path / "db"))


@pytest.fixture(scope="module")
def minilm_db(tmp_path_factory, minilm_encoder_dir: Path) -> RetroDB:
    root = tmp_path_factory.mktemp("minilm")
    corpus = write_corpus(root / "corpus", TOPICS, repeat=3)
    return RetroDB.build(root / "db", [corpus], config=SMALL, encoder=minilm_encoder_dir)


def test_build_layout_and_info(tiny_db: RetroDB) -> None:
    root = tiny_db.path
    assert (root / "CURRENT").read_text().strip() == "000001.json"
    assert (root / "tokenizer.model").is_file() and (root / "encoder" / "model.onnx").is_file()
    info = tiny_db.info()
    assert info["documents"] == 4 and info["segments"] == 1 and info["generation"] == 1
    assert info["chunks"] == sum(s.meta.chunks for s in tiny_db.segments)
    assert info["bytes"]["segment_indexes"] > 0 and info["bytes"]["encoder"] > 0
    seg = tiny_db.segments[0]
    assert seg.tokens.dtype == np.uint16 and isinstance(seg.tokens.base, np.memmap)  # mapped
    assert sorted(seg.ids) == sorted(TOPICS)
    assert not list(root.parent.glob(".db.building-*"))


def test_chunks_round_trip_to_the_documents(tiny_db: RetroDB, corpus_dir: Path) -> None:
    seg = tiny_db.segments[0]
    for di, doc_id in enumerate(seg.ids):
        start, count = int(seg.first_chunk[di]), int(seg.num_chunks[di])
        keys = np.arange(start, start + count)
        toks, lens = tiny_db.chunks(keys)
        ids = [int(t) for row, n in zip(toks, lens, strict=True) for t in row[:n]]
        assert tiny_db.tokenizer.decode(ids) == (corpus_dir / doc_id).read_text()
        assert (lens[:-1] == 16).all() and 1 <= lens[-1] <= 16


def test_no_continuation_crosses_a_document(tiny_db: RetroDB) -> None:
    n = tiny_db.manifest.chunks
    keys = np.arange(n)
    cont = tiny_db.continuation_keys(keys)
    docs = tiny_db.key_doc_numbers(keys)
    for key, c in zip(keys, cont, strict=True):
        if c >= 0:
            assert c == key + 1 and docs[c] == docs[key]
        else:
            assert key == n - 1 or docs[key + 1] != docs[key]
    got = tiny_db.retrieve(keys[None, :])
    assert got.tokens.shape == (1, n, 32) and got.mask.shape == (1, n, 32)
    last = np.nonzero(cont < 0)[0]
    assert not got.mask[0, last, 16:].any()  # continuation of a document's last chunk: all padding
    assert got.mask[0, :, 0].all()
    pad = tiny_db.retrieve(np.array([[-1]]))
    assert not pad.mask.any() and (pad.tokens == tiny_db.pad_id).all()


def test_retrieve_in_one_segment_matches_row_by_row(tiny_db: RetroDB) -> None:
    # One segment of contiguous keys takes the arithmetic path of locate_known; mixed with
    # -1 it takes the general one. Both must give what each key gives alone.
    n = tiny_db.manifest.chunks
    assert len(tiny_db.segments) == 1
    keys = np.array([n - 1, 0, 3, n - 1, 1])
    whole = tiny_db.retrieve(keys)
    mixed = tiny_db.retrieve(np.array([-1, *keys]))
    for i, key in enumerate(keys):
        alone = tiny_db.retrieve(np.array([key]))
        assert (whole.tokens[i] == alone.tokens[0]).all() and (whole.mask[i] == alone.mask[0]).all()
        assert (mixed.tokens[i + 1] == alone.tokens[0]).all()
    assert not mixed.mask[0].any()
    for bad in (n, -2):
        with pytest.raises(BadInputError, match=f"key {bad} is not in the database"):
            tiny_db.retrieve(np.array([0, bad]))


def test_a_chunks_own_text_finds_itself_first(minilm_db: RetroDB) -> None:
    n = minilm_db.manifest.chunks
    keys = np.arange(0, n, max(1, n // 12))
    texts = minilm_db.decode(keys)
    res = minilm_db.search(texts, k=3)
    assert (res.keys[:, 0] == keys).all()
    assert np.all(res.distances[:, 0] < 0.01)
    by_tokens = minilm_db.search(minilm_db.chunks(keys)[0], k=1)  # token chunks in, same answer
    assert (by_tokens.keys[:, 0] == keys).mean() >= 0.9


def test_one_string_is_one_query(minilm_db: RetroDB) -> None:
    # Issue 10 item 3: a str used to be iterated character by character.
    one = minilm_db.search("sorting a list in place", k=2)
    assert one.keys.shape == (1, 2) and (one.keys >= 0).all()
    listed = minilm_db.search(["sorting a list in place"], k=2)
    np.testing.assert_array_equal(one.keys, listed.keys)
    assert minilm_db.search("uninstall", k=3).keys.shape == (1, 3)
    [result] = minilm_db.query("sorting a list in place", k=2)
    assert [h.key for h in result.neighbours] == one.keys[0].tolist()
    assert result.neighbours[0].doc == minilm_db.key_documents(one.keys[0, :1])[0]


def test_add_then_query_finds_new_text_and_reopen(minilm_db: RetroDB, tmp_path: Path) -> None:
    db_path = minilm_db.path
    before = RetroDB.open(db_path)
    gen = before.generation
    new = write_corpus(
        tmp_path / "new",
        {
            "volcano.txt": (
                "Basaltic lava erupts from shield volcanoes in Hawaii; magma chambers feed "
                "fissures "
                "and lava tubes carry molten rock towards the ocean. "
            )
        },
        repeat=2,
    )
    res = minilm_db.add([new])
    assert res.generation == gen + 1 and res.documents == 1
    hit = minilm_db.search(["lava erupting from a volcano"], k=2)
    assert minilm_db.key_documents(hit.keys[0, :1]) == ["volcano.txt"]
    # A reader opened before the add still sees its own generation, until it refreshes.
    assert before.generation == gen and before.manifest.chunks < minilm_db.manifest.chunks
    assert before.refresh() and before.generation == gen + 1
    again = RetroDB.open(db_path)
    assert again.info()["documents"] == len(TOPICS) + 1 and again.info()["segments"] == 2
    # Keys of the first segment did not change and were not re-encoded.
    assert again.segments[0].meta == minilm_db.segments[0].meta
    with pytest.raises(BadInputError, match="already in the database"):
        again.add([new])
    assert RetroDB.open(db_path).generation == gen + 1


def test_jsonl_on_stdin(tiny_db: RetroDB) -> None:
    lines = [
        json.dumps({"id": f"j{i}", "text": "lambda functions are small anonymous functions " * 3})
        for i in range(3)
    ]
    res = tiny_db.add(["-"], stdin=io.BytesIO("\n".join(lines).encode()))
    assert res.documents == 3
    assert "j1" in tiny_db.doc_index()


def test_fingerprint_mismatch_is_refused(
    tiny_db: RetroDB, tmp_path: Path, corpus_dir: Path, minilm_encoder_dir: Path
) -> None:
    other = Tokenizer.train(["something else entirely"], config=TokenizerConfig(vocab_size=300))
    other.save(tmp_path / "other.model")
    with pytest.raises(MismatchError, match="tokenizer"):
        tiny_db.add([corpus_dir], tokenizer=tmp_path / "other.model")
    with pytest.raises(MismatchError, match="encoder"):
        tiny_db.add([corpus_dir], encoder=minilm_encoder_dir)
    # A tokenizer file swapped under the database is caught at open.
    other.save(tiny_db.path / "tokenizer.model")
    with pytest.raises(MismatchError, match="tokenizer.model"):
        RetroDB.open(tiny_db.path)


def test_errors_write_nothing(tmp_path: Path, corpus_dir: Path, tiny_encoder_dir: Path) -> None:
    with pytest.raises(NotFoundError):
        RetroDB.open(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADatabaseError):
        RetroDB.open(tmp_path / "file")
    bad = write_corpus(tmp_path / "bad", {"ok.txt": "fine text"})
    (bad / "broken.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(BadInputError, match="broken.txt"):
        RetroDB.build(tmp_path / "db", [bad], config=SMALL, encoder=tiny_encoder_dir)
    assert not (tmp_path / "db").exists() and not list(tmp_path.glob(".db.*"))
    db = RetroDB.build(tmp_path / "db", [corpus_dir], config=SMALL, encoder=tiny_encoder_dir)
    with pytest.raises(RetroDBError, match="not empty"):
        RetroDB.build(tmp_path / "db", [corpus_dir], config=SMALL, encoder=tiny_encoder_dir)
    with pytest.raises(BadInputError, match="broken.txt"):
        db.add([bad])
    assert RetroDB.open(tmp_path / "db").generation == 1
    assert sorted(p.name for p in (tmp_path / "db" / "segments").iterdir()) == [
        db.segments[0].meta.name
    ]
    with pytest.raises(BadInputError, match="empty query"):
        db.search(["  "])
    with pytest.raises(BadInputError, match="k must be"):
        db.search(["x"], k=0)


def test_verify_finds_damage(tiny_db: RetroDB) -> None:
    assert tiny_db.verify()["ok"]
    seg_dir = tiny_db.segments[0].dir
    chunk = seg_dir / "tokens" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    rep = RetroDB.open(tiny_db.path).verify()
    assert not rep["ok"] and any("tokens/c/0/0" in p for p in rep["problems"])


# ---------------------------------------------------------------- encoder fingerprints


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` as a new file (never in place: encoder files are shared hard links)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


def test_encoder_fingerprint_has_the_sha256_prefix_and_bare_ones_still_open(
    tiny_db: RetroDB, tiny_encoder_dir: Path, more_dir: Path
) -> None:
    """New databases record ``sha256:<hex>`` for the encoder, as for the tokenizer; a
    database written before (bare hex in its manifest and encoder.json, no record of how
    its tokenizer was trained) keeps opening, searching, verifying and accepting the same
    encoder as a guard."""
    import dataclasses

    from retrodb.fsutil import sha256_file

    fp = tiny_db.manifest.encoder["fingerprint"]
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert tiny_db.info()["encoder"]["fingerprint"] == fp == tiny_db.encoder.fingerprint
    assert tiny_db.info()["tokenizer"]["fingerprint"].startswith("sha256:")

    # Make it an old database: bare hex in encoder.json and in a new manifest.
    bare = fp.removeprefix("sha256:")
    meta_path = tiny_db.path / "encoder" / "encoder.json"
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"] = bare
    _replace_file(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    m = tiny_db.manifest
    files = dict(m.encoder["files"])
    files["encoder.json"] = {"size": meta_path.stat().st_size, "sha256": sha256_file(meta_path)}
    assert m.tokenizer["trainer"]["options"]["num_threads"] >= 1
    old = dataclasses.replace(
        m,
        generation=m.generation + 1,
        encoder={**m.encoder, "fingerprint": bare, "files": files},
        tokenizer={k: v for k, v in m.tokenizer.items() if k != "trainer"},  # not recorded
    )
    tiny_db.storage.commit(old)

    db = RetroDB.open(tiny_db.path)
    assert db.manifest.encoder["fingerprint"] == bare and db.info()["tokenizer"]["trainer"] is None
    assert db.info()["encoder"]["fingerprint"] == fp  # shown in the one form
    assert db.search("open a file", k=2).keys.shape == (1, 2)
    assert db.verify().ok
    res = db.add([more_dir], encoder=tiny_encoder_dir)  # a new-style encoder: the same one
    assert res.documents == 1 and db.manifest.encoder["fingerprint"] == bare


# ---------------------------------------------------------------- the shared encoder


def test_databases_share_one_stored_encoder(
    tmp_path: Path, corpus_dir: Path, tiny_encoder_dir: Path, monkeypatch, private_cache: Path
) -> None:
    """Databases built with one encoder hold its files once (hard links into the store);
    deleting one database never breaks another, and damage to the store is caught by
    `verify` and never passed on to a new database."""
    import os
    import shutil

    def model(db: RetroDB) -> Path:
        return db.path / "encoder" / "model.onnx"

    a = RetroDB.build(tmp_path / "a", [corpus_dir], config=SMALL, encoder=tiny_encoder_dir)
    b = RetroDB.build(tmp_path / "b", [corpus_dir], config=SMALL, encoder=tiny_encoder_dir)
    size = model(a).stat().st_size
    assert model(a).stat().st_ino == model(b).stat().st_ino and model(b).stat().st_nlink >= 3
    store = private_cache / "store" / a.manifest.encoder["files"]["model.onnx"]["sha256"]
    assert store.stat().st_ino == model(a).stat().st_ino
    assert a.last_build is not None and a.last_build.encoder_shared >= size
    assert b.info()["bytes"]["shared"] >= size

    shutil.rmtree(a.path)
    again = RetroDB.open(b.path)
    assert again.verify().ok and again.search("open a file", k=1).keys.shape == (1, 1)

    with open(store, "r+b") as f:  # damage in place: every link sees it
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    rep = RetroDB.open(b.path).verify()
    assert not rep.ok and "hard link" in rep.problems[0] and "model.onnx" in rep.problems[0]
    c = RetroDB.build(tmp_path / "c", [corpus_dir], config=SMALL, encoder=tiny_encoder_dir)
    assert c.verify().ok  # the damaged store file was not linked; a good one replaced it
    assert model(c).stat().st_ino != model(b).stat().st_ino == os.stat(model(b)).st_ino
    assert store.stat().st_ino == model(c).stat().st_ino

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("RETRODB_CACHE_DIR", str(tmp_path / "not-a-folder"))  # no store: a copy
    d = RetroDB.build(tmp_path / "d", [corpus_dir], config=SMALL, encoder=tiny_encoder_dir)
    assert model(d).stat().st_nlink == 1 and d.info()["bytes"]["shared"] == 0
    assert d.last_build is not None and d.last_build.encoder_shared == 0 and d.verify().ok
