"""`retrodb serve` and its client, on loopback: the remote answers are the local ones,
concurrent clients across a commit, bad requests, the token, a server that is down, and
the encoder's micro-batching."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

import retrodb
from retrodb import BadInputError, RetroDB
from retrodb.serve import wire
from retrodb.serve.client import RemoteDB, UnreachableError
from retrodb.serve.service import BatchedEncoder, Service
from retrodb_cli.main import app as cli
from retrodb_model.retrieve import LiveRetriever

from .conftest import ASYNCIO, TOPICS, copy_db, pristine_db, write_corpus
from .serve_helpers import Running

pristine = pristine_db("serve", lambda root: write_corpus(root / "corpus", TOPICS))
TOKEN = "s3cret"


@pytest.fixture
def db_path(pristine: Path, tmp_path: Path) -> Path:
    return copy_db(pristine, tmp_path / "db")


@pytest.fixture
def served(db_path: Path) -> Iterator[Running]:
    run = Running(Service(db_path, threads=1, follow_s=0.0, batching=True))
    yield run
    run.stop()


def test_remote_reads_equal_local(served: Running, db_path: Path) -> None:
    local = RetroDB.open(db_path, threads=1)
    with retrodb.open(served.url) as remote:
        assert isinstance(remote, RemoteDB)
        assert remote.generation == local.generation == 1
        assert remote.chunk_size == local.chunk_size and remote.pad_id == local.pad_id
        assert remote.tokenizer.fingerprint == local.tokenizer.fingerprint
        texts = ["how to open a file", "sorting a list in place"]
        want, got = local.search(texts, k=3), remote.search(texts, k=3)
        assert np.array_equal(want.keys, got.keys)
        assert np.allclose(want.distances, got.distances, atol=1e-6)
        chunks, lengths = local.chunks(want.keys[:, 0])
        assert np.array_equal(local.search(chunks, k=2).keys, remote.search(chunks, k=2).keys)
        vecs = local.encode_chunks(chunks, lengths)
        assert np.allclose(vecs, remote.encode_chunks(chunks, lengths), atol=1e-6)
        r_loc, r_rem = local.retrieve(want.keys), remote.retrieve(want.keys)
        assert np.array_equal(r_loc.tokens, r_rem.tokens)
        assert np.array_equal(r_loc.mask, r_rem.mask)
        flat = want.keys.ravel()
        assert remote.decode(flat) == local.decode(flat)
        assert remote.continuation_text(flat) == local.continuation_text(flat)
        assert remote.key_documents(flat) == local.key_documents(flat)
        q_loc = [r.to_dict() for r in local.query(texts, k=2, rerank="overlap")]
        q_rem = [r.to_dict() for r in remote.query(texts, k=2, rerank="overlap")]
        assert q_rem == q_loc
        info = remote.info()
        assert info["generation"] == 1 and info["chunks"] == local.info()["chunks"]
        # the model's retriever: the same neighbours through the server, own document excluded
        ret_l, ret_r = LiveRetriever(local, k=2), LiveRetriever(remote, k=2)  # type: ignore[arg-type]
        doc = local.key_documents(want.keys[:1, 0])[0]
        assert doc is not None
        ex_l = np.array([ret_l.doc_number(doc)] * len(chunks))
        ex_r = np.array([ret_r.doc_number(doc)] * len(chunks))
        a, b = ret_l(chunks, lengths, exclude=ex_l), ret_r(chunks, lengths, exclude=ex_r)
        assert np.array_equal(a.keys, b.keys) and np.array_equal(a.tokens, b.tokens)
        assert doc not in local.key_documents(a.keys.ravel())


def test_json_and_msgpack_bodies(served: Running) -> None:
    body = {"texts": ["regular expressions"], "k": 2}
    as_json = httpx.post(served.url + "/search", json=body).json()
    packed = httpx.post(
        served.url + "/search",
        content=wire.dumps(body, wire.MSGPACK),
        headers={"Content-Type": wire.MSGPACK, "Accept": wire.MSGPACK},
    )
    assert packed.headers["content-type"] == wire.MSGPACK
    as_pack = wire.loads(packed.content, wire.MSGPACK)
    assert isinstance(as_pack["keys"], np.ndarray) and as_pack["keys"].dtype == np.int64
    assert as_json["keys"] == as_pack["keys"].tolist() and as_json["generation"] == 1
    assert packed.headers["x-retrodb-generation"] == "1"
    got = httpx.post(served.url + "/retrieve", json={"keys": as_json["keys"]}).json()
    assert np.asarray(got["tokens"]).shape == (1, 2, 32)


def test_concurrent_clients_across_a_commit(served: Running, db_path: Path, tmp_path: Path) -> None:
    """8 clients x 50 requests while another writer commits an add: none fails, and every
    answer comes from generation 1 or 2; after the commit the server answers from 2."""
    more = write_corpus(tmp_path / "more", ASYNCIO)
    writer = RetroDB.open(db_path, threads=1)
    halfway = threading.Barrier(9)  # the 8 clients and the writer
    answered: list[tuple[int, int]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with retrodb.connect(served.url) as remote:
            for n in range(50):
                if n == 25:
                    halfway.wait(60)  # the commit happens while every client is mid-way
                res = remote.search(f"threads and locks {i} {n}", k=2)
                assert res.keys.shape == (1, 2)
                remote.retrieve(res.keys)
                with lock:
                    answered.append((i, remote.generation))

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, i) for i in range(8)]
        halfway.wait(60)
        writer.add([more])
        for f in futures:
            f.result()  # any failed request raises here
    assert len(answered) == 400
    assert {g for _, g in answered} <= {1, 2}
    with retrodb.connect(served.url) as remote:
        assert remote.search("event loop coroutines", k=1).keys.shape == (1, 1)
        assert remote.generation == 2
        assert remote.info()["documents"] == 5


def test_bad_requests_get_4xx(db_path: Path) -> None:
    run = Running(Service(db_path, threads=1), max_body=4096)
    try:
        url = run.url

        def post(path: str, **kw: Any) -> httpx.Response:
            return httpx.post(url + path, **kw)

        bad = post("/search", content=b"{not json", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and "malformed" in bad.json()["error"]
        assert post("/search", json={"texts": ["x"], "k": 0}).status_code == 400
        assert "k must be" in post("/search", json={"texts": ["x"], "k": 0}).json()["error"]
        unknown = post("/retrieve", json={"keys": [[10**9]]})
        assert unknown.status_code == 400 and "not in the database" in unknown.json()["error"]
        assert post("/search", json={"k": 2}).status_code == 400  # no query at all
        assert post("/query", json={"texts": ["   "]}).status_code == 400  # empty text
        assert post("/search", json={"chunks": [[1, 2], [3]], "k": 1}).status_code == 400
        big = post("/search", json={"texts": ["x" * 10_000], "k": 1})
        assert big.status_code == 413
        assert post("/nowhere", json={}).status_code == 404
        assert httpx.get(url + "/search").status_code == 405  # POST only
        with retrodb.connect(url) as remote, pytest.raises(BadInputError, match="not in the"):
            remote.retrieve(np.array([10**9]))
    finally:
        run.stop()


def test_token_is_required_when_set(db_path: Path) -> None:
    run = Running(Service(db_path, threads=1), token=TOKEN)
    assert run.service.batcher is None  # on a CPU encoder batching is off by default
    try:
        assert httpx.get(run.url + "/healthz").status_code == 200  # health needs no token
        assert httpx.get(run.url + "/info").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (
            httpx.post(run.url + "/search", json={"texts": ["a"]}, headers=wrong).status_code == 401
        )
        with pytest.raises(retrodb.RetroDBError, match="bearer token"):
            retrodb.connect(run.url)
        with retrodb.connect(run.url, token=TOKEN) as remote:
            assert remote.search("open a file", k=1).keys.shape == (1, 1)
    finally:
        run.stop()


def test_server_down_is_a_clear_error() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(UnreachableError, match=f"127.0.0.1:{port}"):
        retrodb.connect(url, timeout=5)


def test_cli_query_and_info_through_the_server(served: Running, db_path: Path) -> None:
    runner = CliRunner()
    local = runner.invoke(cli, ["query", str(db_path), "open a file", "-k", "2", "--json"])
    remote = runner.invoke(cli, ["query", served.url, "open a file", "-k", "2", "--json"])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    info = runner.invoke(cli, ["info", served.url, "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["generation"] == 1


class _GatedEncoder:
    """A stand-in encoder whose first call waits until the test lets it go."""

    fingerprint = "sha256:test"
    dim = 2

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls: list[int] = []

    def encode(self, texts: list[str], **_: Any) -> np.ndarray:
        if not self.calls:
            self.entered.set()
            assert self.release.wait(60)
        self.calls.append(len(texts))
        return np.array([[len(t), i] for i, t in enumerate(texts)], np.float32)


class _CountingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that says when it has held ``n`` items."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.reached = n, threading.Event()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if self.qsize() >= self.n:
            self.reached.set()


def test_batching_gathers_waiting_requests() -> None:
    inner = _GatedEncoder()
    batched = BatchedEncoder(inner, max_batch=64, wait_s=0.0)  # type: ignore[arg-type]
    try:
        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(batched.encode, ["a"])
            assert inner.entered.wait(60)  # the encoder is busy with the first request
            queued = _CountingQueue(5)  # the batcher is busy: it reads the queue only later
            batched._queue = queued
            rest = [pool.submit(batched.encode, ["b" * (i + 1), "c"]) for i in range(5)]
            assert queued.reached.wait(60)  # handshake: all five are queued
            inner.release.set()
            assert first.result()[0, 0] == 1
            for i, f in enumerate(rest):
                got = f.result()
                assert got.shape == (2, 2) and got[0, 0] == i + 1 and got[1, 0] == 1
        assert inner.calls == [1, 10]  # the five waiting requests: one encoder run
        assert batched.stats.to_dict()["requests"] == 6
    finally:
        batched.close()


def _split_topics() -> tuple[dict[str, str], dict[str, str]]:
    names = sorted(TOPICS)
    return {n: TOPICS[n] for n in names[:2]}, {n: TOPICS[n] for n in names[2:]}


@pytest.mark.slow
def test_shards_on_ray_serve_match_one_database(tmp_path: Path, tiny_encoder_dir: Path) -> None:
    """Two shard databases behind one Ray Serve ingress answer as one database built from
    all the inputs: the same neighbour texts, distances and documents."""
    pytest.importorskip("ray.serve")
    from retrodb.serve import shards

    from .conftest import SMALL

    a, b = _split_topics()
    whole = RetroDB.build(
        tmp_path / "whole", [write_corpus(tmp_path / "all", TOPICS)], config=SMALL,
        encoder=tiny_encoder_dir,
    )  # fmt: skip
    tok = whole.path / "tokenizer.model"
    paths = []
    for i, docs in enumerate((a, b)):
        db = RetroDB.build(
            tmp_path / f"shard{i}", [write_corpus(tmp_path / f"in{i}", docs)], config=SMALL,
            tokenizer=tok, encoder=tiny_encoder_dir,
        )  # fmt: skip
        paths.append(db.path)
    other = RetroDB.build(  # another tokenizer: refused before anything starts
        tmp_path / "other", [write_corpus(tmp_path / "o", ASYNCIO)], config=SMALL,
        encoder=tiny_encoder_dir,
    )  # fmt: skip
    with pytest.raises(retrodb.MismatchError, match="tokenizer differs"):
        shards.deploy([paths[0], other.path], port=0)

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = shards.deploy(paths, port=port, threads=1, replicas=2)
    try:
        with retrodb.connect(url) as remote:
            texts = ["how to open a file", "sorting a list", "threads share memory", "regex groups"]
            want, got = whole.search(texts, k=3), remote.search(texts, k=3)
            assert np.allclose(np.sort(want.distances, 1), np.sort(got.distances, 1), atol=1e-5)
            for w, g in zip(want.keys, got.keys, strict=True):
                assert sorted(whole.decode(w)) == sorted(remote.decode(g))
                assert sorted(map(str, whole.key_documents(w))) == sorted(
                    map(str, remote.key_documents(g))
                )
            r = remote.retrieve(got.keys)
            assert r.tokens.shape == (4, 3, 2 * whole.chunk_size)
            assert [whole.decode([k])[0] for k in want.keys[:, 0]] == remote.decode(got.keys[:, 0])
            q = remote.query(texts[:1], k=2)[0]
            assert [h.text for h in q.neighbours] == [
                h.text for h in whole.query(texts[:1], k=2)[0].neighbours
            ]
            assert remote.info()["chunks"] == whole.info()["chunks"]
            # a replica that dies: the other one answers (Ray Serve replaces it meanwhile)
            import ray

            names = [
                a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if "shard-0" in a["name"] and "REPLICA" in a["name"].upper()
            ]
            assert len(names) == 2, names
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
            for t in texts * 5:
                assert remote.search(t, k=3).keys.shape == (1, 3)
            assert np.array_equal(remote.search(texts, k=3).keys, got.keys)
    finally:
        shards.shutdown()
