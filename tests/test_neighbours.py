"""Neighbour sets: the exclusion rule, -1 padding, staleness, refresh == full recompute,
deleted documents, other inputs, the on-disk format and the CLI."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from retrodb import RetroDB, StaleError, neighbours
from retrodb.errors import BadInputError, NotFoundError
from retrodb.neighbours import NeighbourSet, SequenceReader, delete_set, list_sets
from retrodb.rerank import rerank_keys
from retrodb.storage import Manifest

from .conftest import SMALL, copy_db

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "gu", "zo", "fi", "be"]


def random_docs(n: int, *, seed: int, prefix: str, words: tuple[int, int] = (8, 160)) -> dict:
    """``n`` documents of distinct random words (so no two chunks are the same text)."""
    rng = np.random.default_rng(seed)
    docs = {}
    for i in range(n):
        count = int(rng.integers(*words))
        ws = ["".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(count)]
        docs[f"{prefix}{i:02d}.txt"] = " ".join(ws) + f" {prefix}{i}."
    return docs


def write_docs(root: Path, docs: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def build_db(tmp_path: Path, encoder: Path, *, n: int = 8, seed: int = 0) -> RetroDB:
    corpus = write_docs(tmp_path / "corpus", random_docs(n, seed=seed, prefix="doc"))
    return RetroDB.build(tmp_path / "db", [corpus], config=SMALL, encoder=encoder)


def build_trained_db(tmp_path: Path, encoder: Path, *, n: int, seed: int) -> RetroDB:
    """:func:`build_db` with the neighbour set "train" (k = 2, exact) that the data,
    training and evaluation tests read."""
    db = build_db(tmp_path, encoder, n=n, seed=seed)
    neighbours.compute(db, "train", k=2, exact=True)
    return db


def delete_docs(db: RetroDB, ids: list[str]) -> None:
    """Delete documents: through the database's API when it has one, else by committing
    tombstones the way the commit protocol does."""
    if hasattr(db, "delete"):
        db.delete(ids)
        return
    m = db.manifest
    db.storage.commit(
        Manifest(
            generation=m.generation + 1,
            config=m.config,
            tokenizer=m.tokenizer,
            encoder=m.encoder,
            next_key=m.next_key,
            segments=m.segments,
            tombstones=(*m.tombstones, *ids),
            features=m.features,
            format_version=m.format_version,
        )
    )
    db.refresh()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path) -> Path:
    return build_db(tmp_path_factory.mktemp("nb"), tiny_encoder_dir).path


@pytest.fixture
def db(pristine: Path, tmp_path: Path) -> RetroDB:
    """Eight random documents, built once per module, copied per test."""
    return RetroDB.open(copy_db(pristine, tmp_path / "db"))


def own_docs(db: RetroDB, ns: NeighbourSet) -> np.ndarray:
    return db.key_doc_numbers(ns.chunk_keys)


def test_never_a_neighbour_from_the_own_document_even_when_closest(db: RetroDB) -> None:
    ns = neighbours.compute(db, "train", k=3, exact=True)
    n = db.manifest.chunks
    assert ns.keys.shape == (n, 3) and ns.keys.dtype == np.int64
    assert ns.distances.shape == (n, 3) and ns.distances.dtype == np.float32
    assert (np.asarray(ns.chunk_keys) == np.arange(n)).all()
    # Unfiltered, every chunk's nearest key is itself (same document, distance ~0) ...
    vectors = np.concatenate(
        [ix.vectors(np.arange(ix.first_key, ix.first_key + ix.size)) for ix in db.indexes]
    )
    plain = db.search_vectors(vectors, 1, exact=True)
    assert (plain.distances[:, 0] < 1e-3).all()  # the chunk itself (or an equal twin)
    assert (plain.keys[:, 0] == np.arange(n)).mean() > 0.9
    # ... and still no neighbour comes from the chunk's own document.
    got = np.asarray(ns.keys)
    assert (got >= 0).all()
    nb_doc = db.key_doc_numbers(got)
    assert (nb_doc != own_docs(db, ns)[:, None]).all()
    d = np.asarray(ns.distances)
    assert (np.diff(d, axis=1) >= 0).all()
    # The rows' documents and the doc table agree with the database.
    assert ns.doc_ids == db.segments[0].ids
    assert (np.asarray(ns.num_rows) == np.asarray(db.segments[0].num_chunks)).all()


def test_minus_one_where_fewer_exist(db: RetroDB) -> None:
    n = db.manifest.chunks
    ns = neighbours.compute(db, "all", k=n + 5, exact=True)
    keys, dist = np.asarray(ns.keys), np.asarray(ns.distances)
    own = own_docs(db, ns)
    per_doc = np.bincount(own)
    found = (keys >= 0).sum(axis=1)
    assert (found == n - per_doc[own]).all()  # every other chunk, and nothing more
    assert (keys[:, -5:] == -1).all() and np.isinf(dist[keys < 0]).all()
    assert np.isfinite(dist[keys >= 0]).all()
    # -1 only ever trails the real neighbours.
    assert ((keys >= 0)[:, :-1] >= (keys >= 0)[:, 1:]).all()


def test_excluded_documents_never_appear(db: RetroDB) -> None:
    ids = db.segments[0].ids
    banned = [ids[0], ids[3], "not-in-the-db.txt"]
    ns = neighbours.compute(db, "x", k=4, exclude_docs=banned, exact=True, batch_size=7)
    docs = db.key_documents(np.asarray(ns.keys).ravel())
    assert not set(banned) & set(docs)
    assert ns.info.exclude == tuple(banned)
    # Excluded documents are still training rows; only their use as neighbours is barred.
    assert ids[0] in ns.doc_ids
    # Batches of one query give the same answer.
    one = neighbours.compute(db, "y", k=4, exclude_docs=banned, exact=True, batch_size=1)
    np.testing.assert_array_equal(np.asarray(one.keys), np.asarray(ns.keys))


def test_stale_set_is_refused_with_the_refresh_command(db: RetroDB, tmp_path: Path) -> None:
    neighbours.compute(db, "train", k=2)
    assert NeighbourSet.open(db, "train").info.generation == db.generation
    old = RetroDB.open(db.path)
    db.add([write_docs(tmp_path / "more", random_docs(2, seed=5, prefix="more"))])
    with pytest.raises(StaleError, match=r"retrodb neighbours .* train --refresh") as err:
        NeighbourSet.open(db, "train")
    assert "generation 1" in str(err.value) and "1 segment(s) added" in str(err.value)
    assert NeighbourSet.open(db, "train", allow_stale=True).is_stale(db)
    # A database object older than the set is told to reopen.
    neighbours.refresh(db, "train")
    with pytest.raises(StaleError, match="reopen"):
        NeighbourSet.open(old, "train")
    with pytest.raises(NotFoundError, match="no neighbour set"):
        NeighbourSet.open(db, "missing")
    with pytest.raises(BadInputError, match="bad neighbour set name"):
        neighbours.compute(db, "../evil")


def assert_same_sets(a: NeighbourSet, b: NeighbourSet) -> None:
    assert a.info.rows == b.info.rows and a.doc_ids == b.doc_ids
    np.testing.assert_array_equal(np.asarray(a.keys), np.asarray(b.keys))
    np.testing.assert_allclose(np.asarray(a.distances), np.asarray(b.distances), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(a.doc), np.asarray(b.doc))
    if a.info.source == "db":
        np.testing.assert_array_equal(np.asarray(a.chunk_keys), np.asarray(b.chunk_keys))


def test_refresh_equals_a_full_recompute(db: RetroDB, tmp_path: Path) -> None:
    k = 3
    neighbours.compute(db, "train", k=k, exact=True)
    first = set(NeighbourSet.open(db, "train").info.searched)
    db.add([write_docs(tmp_path / "more", random_docs(3, seed=7, prefix="more"))])
    db.add([write_docs(tmp_path / "more2", random_docs(2, seed=8, prefix="late"))])
    calls: list[tuple[str, int, int]] = []
    ns = neighbours.refresh(db, "train", progress=lambda *a: calls.append(a))
    assert ns.info.generation == db.generation and ns.info.refreshed_from == 1
    # Only the two new segments were searched; the rows of old chunks were not re-searched
    # against the first segment.
    assert set(ns.info.searched) == {s.meta.name for s in db.segments[1:]}
    assert not first & set(ns.info.searched)
    assert calls[-1][1] == calls[-1][2] == db.manifest.chunks
    full = neighbours.compute(db, "check", k=k, exact=True)
    assert_same_sets(ns, full)
    # New chunks do show up as neighbours of old ones.
    old_rows = np.asarray(ns.keys)[: db.segments[0].meta.chunks]
    assert (old_rows >= db.segments[1].meta.first_key).any()
    # Refreshing a current set does nothing.
    assert neighbours.refresh(db, "train").info.version == ns.info.version


def test_deleted_documents_never_appear_and_refresh_drops_them(db: RetroDB, tmp_path: Path) -> None:
    k = 3
    neighbours.compute(db, "train", k=k, exact=True)
    before = NeighbourSet.open(db, "train")
    victim = db.key_documents(np.asarray(before.keys)[:1, :1].ravel())[0]
    db.add([write_docs(tmp_path / "more", random_docs(2, seed=9, prefix="more"))])
    delete_docs(db, [victim, "more00.txt"])
    with pytest.raises(StaleError):
        NeighbourSet.open(db, "train")
    ns = neighbours.refresh(db, "train")
    full = neighbours.compute(db, "check", k=k, exact=True)
    assert_same_sets(ns, full)
    docs = set(db.key_documents(np.asarray(ns.keys).ravel()))
    assert victim not in docs and "more00.txt" not in docs
    assert victim not in ns.doc_ids and "more00.txt" not in ns.doc_ids  # no rows either
    assert (np.asarray(ns.keys) >= 0).all()


def test_sets_read_the_right_rows_after_delete_and_compact(db: RetroDB, tmp_path: Path) -> None:
    """Compaction drops the rows of deleted documents and keeps every live key, so the
    merged segment's keys have gaps (row != key - first_key): every read must go by key."""
    k, seq = 3, 4 * db.chunk_size
    neighbours.compute(db, "train", k=k, exact=True)
    db.add([write_docs(tmp_path / "more", random_docs(4, seed=11, prefix="more"))])
    before = {int(key): tok for key, tok in zip(*_all_chunks(db), strict=True)}
    gone = ["doc03.txt", "more01.txt"]  # from the middle of each segment
    db.delete(gone)
    db.compact()
    assert len(db.segments) == 1 and db.segments[0].key_array is not None
    keys = db.segments[0].row_keys(np.arange(db.segments[0].meta.chunks))
    assert (np.diff(keys) > 1).any()  # a gap before the last rows: arithmetic would misread
    db.add([write_docs(tmp_path / "late", random_docs(2, seed=12, prefix="late"))])
    for key, tok in zip(*_all_chunks(db), strict=True):  # plain segment after a compacted one
        before.setdefault(int(key), tok)

    ns = neighbours.refresh(db, "train")  # after compaction, then one more add
    assert_same_sets(ns, neighbours.compute(db, "check", k=k, exact=True))
    nkeys = np.asarray(ns.keys)
    assert (nkeys >= 0).all() and set(gone).isdisjoint(ns.doc_ids)
    assert set(gone).isdisjoint(db.key_documents(nkeys.ravel()))
    assert (nkeys < db.segments[0].meta.stop_key).any()  # neighbours in the compacted segment
    assert (nkeys >= db.segments[1].meta.first_key).any()  # and in the plain one

    # The training reader's memory-map gathers equal the database's reads, which equal
    # the tokens the keys had before compaction.
    reader = SequenceReader(db, ns, seq_len=seq)
    flat = np.concatenate([np.asarray(ns.chunk_keys), nkeys.ravel(), [-1]])
    toks, lens = reader.keymap.rows(flat)
    ref_toks, ref_lens = db.chunks(flat)
    np.testing.assert_array_equal(toks, ref_toks)
    np.testing.assert_array_equal(lens, ref_lens)
    assert lens[-1] == 0 and (toks[-1] == db.pad_id).all()
    for key, tok in zip(flat[:-1].tolist(), toks[:-1], strict=True):
        np.testing.assert_array_equal(tok, before[key])
    start, end = reader.windows()
    batch = pickle.loads(pickle.dumps(reader)).read(start, end)  # as in a DataLoader worker
    ref = db.retrieve(batch["neighbours"])
    np.testing.assert_array_equal(batch["retrieved"], ref.tokens)
    np.testing.assert_array_equal(batch["retrieved_mask"], ref.mask)
    rows = start[:, None] + np.arange(seq // db.chunk_size)
    valid = rows < end[:, None]
    own = np.asarray(ns.chunk_keys)[np.where(valid, rows, 0)]
    own_toks, _ = db.chunks(np.where(valid, own, -1))
    got = batch["tokens"][:, :seq].reshape(own_toks.shape)
    np.testing.assert_array_equal(got[valid], own_toks[valid])

    # Again from a set that recorded a compacted segment (its key span exceeds its rows):
    # the keys already searched are not searched twice (no duplicate neighbours).
    db.delete(["late00.txt"])
    db.compact()
    ns = neighbours.refresh(db, "train")
    assert_same_sets(ns, neighbours.compute(db, "check", k=k, exact=True))
    nkeys = np.asarray(ns.keys)
    assert all(len(set(r)) == k for r in nkeys.tolist())
    toks, _ = SequenceReader(db, ns, seq_len=seq).keymap.rows(nkeys.ravel())
    np.testing.assert_array_equal(toks, np.stack([before[key] for key in nkeys.ravel().tolist()]))


def _all_chunks(db: RetroDB) -> tuple[np.ndarray, np.ndarray]:
    """Every key the database holds (deleted documents' included) and its tokens."""
    keys = np.concatenate([s.row_keys(np.arange(s.meta.chunks)) for s in db.segments])
    return keys, db.chunks(keys)[0]


def test_neighbours_for_other_inputs(db: RetroDB, tmp_path: Path) -> None:
    shared = {"doc01.txt": random_docs(8, seed=0, prefix="doc")["doc01.txt"]}
    other = write_docs(tmp_path / "other", {**random_docs(3, seed=11, prefix="q"), **shared})
    ns = neighbours.compute(db, "eval", inputs=[other], k=2, exact=True)
    assert ns.info.source == "inputs" and ns.info.inputs == (str(other),)
    assert sorted(ns.doc_ids) == ["doc01.txt", "q00.txt", "q01.txt", "q02.txt"]
    n = ns.info.rows
    assert ns.tokens.shape == (n, 16) and ns.tokens.dtype == db.token_dtype
    assert ns.vectors.shape == (n, db.dim) and ns.lengths.dtype == np.int32
    # The rows hold the inputs' tokens, exactly as the database would chunk them.
    toks, lens = ns.row_tokens(db, np.arange(n))
    for di, doc_id in enumerate(ns.doc_ids):
        a, c = int(ns.first_row[di]), int(ns.num_rows[di])
        ids = [int(t) for r in range(a, a + c) for t in toks[r, : lens[r]]]
        assert db.tokenizer.decode(ids) == (other / doc_id).read_text()
    # The input document that is also in the database never retrieves its own copy there.
    rows = np.nonzero(np.asarray(ns.doc) == ns.doc_ids.index("doc01.txt"))[0]
    assert "doc01.txt" not in db.key_documents(np.asarray(ns.keys)[rows].ravel())
    assert (np.asarray(ns.keys) >= 0).all()
    # Refresh after growth equals a recompute, without re-encoding the inputs.
    db.add([write_docs(tmp_path / "more", random_docs(2, seed=12, prefix="more"))])
    refreshed = neighbours.refresh(db, "eval")
    assert_same_sets(refreshed, neighbours.compute(db, "eval2", inputs=[other], k=2, exact=True))


def test_format_is_plain_zarr_and_versions_are_atomic(db: RetroDB, tmp_path: Path) -> None:
    ns = neighbours.compute(db, "train", k=2)
    root = db.path / "neighbours" / "train"
    assert (root / "CURRENT").read_text().strip() == ns.dir.name
    meta = json.loads((ns.dir / "neighbours.json").read_text())
    for key in (
        "generation",
        "segments",
        "k",
        "tokenizer_fingerprint",
        "encoder_fingerprint",
        "source",
        "exclude",
    ):
        assert key in meta
    assert meta["generation"] == db.generation and meta["format"] == "retrodb-neighbours"
    group = zarr.open_group(str(ns.dir), mode="r")
    np.testing.assert_array_equal(group["keys"][...], np.asarray(ns.keys))
    np.testing.assert_array_equal(group["distances"][...], np.asarray(ns.distances))
    assert isinstance(ns.keys, np.memmap)
    # Pickles without its maps.
    assert len(pickle.dumps(ns)) < 4000
    # A recompute writes a new version; one older version is kept for readers, the rest go.
    v1 = ns.dir.name
    v2 = neighbours.compute(db, "train", k=2).dir.name
    v3 = neighbours.compute(db, "train", k=2).dir.name
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == sorted([v2, v3]) and v1 not in names
    assert [i.name for i in list_sets(db)] == ["train"]
    # A half-written version left by a crash is ignored, then removed by the next writer.
    (root / ".tmp-000009-g1-abc").mkdir()
    assert NeighbourSet.open(db, "train").dir.name == v3
    neighbours.compute(db, "train", k=2)
    assert not (root / ".tmp-000009-g1-abc").exists()
    delete_set(db, "train")
    assert not root.exists() and list_sets(db) == []


def cli(*args: object, code: int = 0):
    """Run the `retrodb` command with ``args``; assert that it exits with ``code``."""
    from retrodb_cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res


def test_cli_neighbours(db: RetroDB, tmp_path: Path) -> None:
    assert "--refresh" in cli("neighbours", "--help").output
    excl = tmp_path / "excl.txt"
    excl.write_text("# documents for validation\ndoc02.txt\n\n")
    res = cli("neighbours", db.path, "train", "-k", "2", "--exclude-docs", excl)
    assert "chunks/s" in res.stderr or "neighbours" in res.stderr  # the progress bar
    assert "neighbours train:" in res.stdout and "k=2" in res.stdout
    ns = NeighbourSet.open(RetroDB.open(db.path), "train")
    assert ns.info.exclude == ("doc02.txt",)
    RetroDB.open(db.path).add([write_docs(tmp_path / "more", random_docs(1, seed=3, prefix="m"))])
    listed = json.loads(cli("neighbours", db.path, "--list", "--json").output)
    assert listed[0]["name"] == "train" and listed[0]["stale"] is True
    assert "STALE" in cli("neighbours", db.path, "--list").output
    out = json.loads(cli("neighbours", db.path, "train", "--refresh", "--json").output)
    assert out["stale"] is False and out["refreshed_from"] == 1 and out["generation"] == 2
    assert cli("neighbours", db.path, "train", "--refresh", "-k", "3", code=1).stderr
    other = write_docs(tmp_path / "q", random_docs(2, seed=4, prefix="q"))
    out = json.loads(cli("neighbours", db.path, "ev", "--input", other, "--json", "-q").output)
    assert out["source"] == "inputs" and out["documents"] == 2
    assert "no neighbour set" in cli("neighbours", db.path, "nope", "--refresh", code=1).stderr
    cli("neighbours", db.path, code=1)


def add_mixed_docs(db: RetroDB, tmp_path: Path) -> None:
    """One new document per stored one: a run of 7 of its words between words of its own,
    so that some chunks share long token runs with chunks that are not their nearest."""
    docs = random_docs(8, seed=0, prefix="doc")  # the documents of ``pristine``
    noise = random_docs(8, seed=21, prefix="mix")
    mixed = {}
    for i, text in enumerate(docs[k] for k in sorted(docs)):
        own = noise[f"mix{i:02d}.txt"].split()
        mixed[f"mix{i:02d}.txt"] = " ".join(own[:6] + text.split()[2:9] + own[6:14])
    db.add([write_docs(tmp_path / "mixed", mixed)])


def overlap_top(db: RetroDB, ns: NeighbourSet, keys: np.ndarray, k: int) -> np.ndarray:
    """The k of dense candidates ``keys`` that share the longest run with each row."""
    toks, lens = ns.row_tokens(db, np.arange(ns.info.rows))
    query = np.where(np.arange(toks.shape[1]) < lens[:, None], toks, -1)
    ctoks, clens = db.chunks(keys)
    cands = np.where(np.arange(ctoks.shape[2]) < clens[..., None], ctoks, -1)
    return rerank_keys(query, keys, np.zeros(keys.shape, np.float32), cands, k)[0]


def test_rerank_overlap_keeps_k_never_the_own_document(db: RetroDB, tmp_path: Path) -> None:
    add_mixed_docs(db, tmp_path)
    dense = neighbours.compute(db, "dense", k=8, exact=True)
    ns = neighbours.compute(db, "rr", k=2, exact=True, rerank="overlap", fetch=4)
    keys, dkeys = np.asarray(ns.keys), np.asarray(dense.keys)
    assert keys.shape == (ns.info.rows, 2) and (keys >= 0).all()
    # The k of the 8 dense candidates (same rules) that overlap most, with their distances.
    np.testing.assert_array_equal(keys, overlap_top(db, dense, dkeys, 2))
    assert (keys != dkeys[:, :2]).any(axis=1).sum() >= 3  # the order did change somewhere
    pos = (dkeys[:, :, None] == keys[:, None, :]).argmax(axis=1)
    np.testing.assert_array_equal(
        np.asarray(ns.distances), np.take_along_axis(np.asarray(dense.distances), pos, axis=1)
    )
    assert (db.key_doc_numbers(keys) != own_docs(db, ns)[:, None]).all()  # the paper's rule
    info = NeighbourSet.open(db, "rr").info
    assert (info.rerank, info.fetch) == ("overlap", 4)
    assert info.to_dict()["rerank"] == "overlap" and info.to_dict()["fetch"] == 4
    # rerank "none" is the dense top k, as before; recorded as fetch 1.
    plain = neighbours.compute(db, "plain", k=2, exact=True, rerank="none")
    np.testing.assert_array_equal(np.asarray(plain.keys), dkeys[:, :2])
    assert (plain.info.rerank, plain.info.fetch) == ("none", 1)
    with pytest.raises(BadInputError, match="fetch"):
        neighbours.compute(db, "bad", k=2, fetch=4)
    with pytest.raises(BadInputError, match="rerank"):
        neighbours.compute(db, "bad", k=2, rerank="bm25")


def test_sets_without_rerank_fields_read_as_dense(db: RetroDB) -> None:
    ns = neighbours.compute(db, "old", k=2)
    meta = ns.dir / "neighbours.json"
    d = json.loads(meta.read_text())
    del d["rerank"], d["fetch"]  # as written before they were recorded
    meta.write_text(json.dumps(d))
    info = NeighbourSet.open(db, "old").info
    assert (info.rerank, info.fetch) == ("none", 1)


def test_refresh_of_a_reranked_set_equals_a_recompute(db: RetroDB, tmp_path: Path) -> None:
    neighbours.compute(db, "rr", k=2, exact=True, rerank="overlap", fetch=3)
    add_mixed_docs(db, tmp_path)
    delete_docs(db, ["doc05.txt"])
    ns = neighbours.refresh(db, "rr")
    assert (ns.info.rerank, ns.info.fetch, ns.info.refreshed_from) == ("overlap", 3, 1)
    assert set(ns.info.searched) == {s.meta.name for s in db.segments}  # every row, in full
    full = neighbours.compute(db, "check", k=2, exact=True, rerank="overlap", fetch=3)
    assert_same_sets(ns, full)


def test_cli_neighbours_rerank(db: RetroDB, tmp_path: Path) -> None:
    args = ("neighbours", db.path, "rr", "-k", "2", "--exact", "--rerank", "overlap")
    out = json.loads(cli(*args, "--fetch", "3", "--json").output)
    assert (out["rerank"], out["fetch"], out["k"]) == ("overlap", 3, 2)
    assert "k=2 of 6 by overlap" in cli(*args, "--fetch", "3").stdout
    out = json.loads(cli("neighbours", db.path, "plain", "--json", "-q").output)
    assert (out["rerank"], out["fetch"]) == ("none", 1)
    listed = {
        s["name"]: s for s in json.loads(cli("neighbours", db.path, "--list", "--json").output)
    }
    assert listed["rr"]["rerank"] == "overlap" and listed["plain"]["rerank"] == "none"
    assert "fetch" in cli("neighbours", db.path, "x", "--fetch", "2", code=1).stderr
    RetroDB.open(db.path).add([write_docs(tmp_path / "more", random_docs(1, seed=3, prefix="m"))])
    err = cli("neighbours", db.path, "rr", "--refresh", "--fetch", "2", code=1).stderr
    assert "recompute without --refresh" in err
    res = cli("neighbours", db.path, "rr", "--refresh", "--rerank", "overlap")
    assert "every row re-ranked again" in res.stdout
    out = json.loads(cli("neighbours", db.path, "rr", "--json").output)  # recomputed: dense
    assert (out["rerank"], out["fetch"]) == ("none", 1)
