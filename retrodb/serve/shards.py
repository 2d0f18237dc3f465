"""Shards on Ray Serve: `retrodb serve DB1 DB2 ... --engine ray`.

One Ray Serve deployment per shard database (``shard-0``, ``shard-1``, ...; ``--replicas``
replicas each, each replica a :class:`~.service.Service` on that database), and an ingress
deployment with the same HTTP API as one server (:func:`~.app.make_app` over
:class:`ShardedBackend`). The ingress asks one shard to encode a query (every shard has
the same encoder: checked at start), sends the vectors to every shard, and keeps the k
best by distance; ``retrieve`` and ``lookup`` go to the shard that holds each key.

**Keys.** Shard ``i`` of ``n`` holds its own keys ``0, 1, 2, ...``; the served (global)
key of local key ``j`` is ``j * n + i``. The mapping needs no coordination between the
shards' writers, and every key stays the same when any shard grows by an add (a shard's
local keys never change until it is compacted). ``generation`` in an answer is the list of
the shards' generations.

Ray Serve restarts a replica that dies; with ``--replicas 2`` or more, requests in the
meantime go to the others.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError, MismatchError
from ..query import Hit, QueryResult
from ..search import check_k
from . import wire
from .app import DEFAULT_MAX_BODY, LocalBackend, make_app, texts_field
from .service import Service

APP_NAME = "retrodb"


def global_keys(local: np.ndarray, shard: int, shards: int) -> np.ndarray:
    """Served keys of shard ``shard``'s local keys (-1 stays -1)."""
    local = np.asarray(local, dtype=np.int64)
    return np.where(local >= 0, local * shards + shard, -1)


def split_keys(keys: np.ndarray, shards: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard, local key) of served keys; -1 gives shard -1."""
    keys = np.asarray(keys, dtype=np.int64)
    if (keys < -1).any():
        raise BadInputError(f"key {int(keys[keys < -1][0])} is not in the database")
    return np.where(keys >= 0, keys % shards, -1), np.where(keys >= 0, keys // shards, -1)


class ShardReplica:
    """One replica of one shard: the HTTP API's reads on its own database."""

    def __init__(self, path: str, threads: int | None, device: str) -> None:
        self.service = Service(path, threads=threads, device=device)
        self.backend = LocalBackend(self.service)

    def generation(self) -> int:
        return self.backend.generation()

    def layout(self) -> tuple[int, int]:
        """The padding token id and the chunk size (the same on every shard)."""
        snap = self.service.snapshot()
        return snap.pad_id, snap.chunk_size

    def info(self) -> tuple[dict[str, Any], int]:
        return self.backend.info()

    def tokenizer(self) -> tuple[bytes, str, int]:
        return self.backend.tokenizer()

    def read(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        return self.backend.read(path, body)


class ShardedBackend:
    """The HTTP API's reads over shard handles (Ray Serve deployment handles, or anything
    whose ``.<method>.remote(...)`` has a ``.result()``)."""

    def __init__(self, handles: Sequence[Any]) -> None:
        self.handles = list(handles)
        self.n = len(self.handles)
        self._next = itertools.count()
        self._layout: tuple[int, int] | None = None  # (pad id, m), asked of a shard once

    def _all(self, method: str, *args: Any) -> list[Any]:
        calls = [getattr(h, method).remote(*args) for h in self.handles]
        return [c.result() for c in calls]

    def _any(self, method: str, *args: Any) -> Any:
        h = self.handles[next(self._next) % self.n]
        return getattr(h, method).remote(*args).result()

    def generation(self) -> list[int]:
        return list(self._all("generation"))

    def info(self) -> tuple[dict[str, Any], list[int]]:
        infos = [info for info, _ in self._all("info")]
        first = infos[0]
        out = {
            "shards": infos,
            "generation": [i["generation"] for i in infos],
            "documents": sum(i["documents"] for i in infos),
            "chunks": sum(i["chunks"] for i in infos),
            "live_chunks": sum(i["live_chunks"] for i in infos),
            "tokens": sum(i["tokens"] for i in infos),
            "next_key": max(i["next_key"] for i in infos) * self.n,
            "config": first["config"],
            "tokenizer": first["tokenizer"],
            "encoder": first["encoder"],
        }
        return out, out["generation"]

    def tokenizer(self) -> tuple[bytes, str, list[int]]:
        data, fingerprint, _ = self._any("tokenizer")
        return data, fingerprint, self.generation()

    def read(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        if path == "/encode":
            out, _ = self._any("read", "/encode", body)
            return out, self.generation()
        if path == "/search":
            return self._search(body)
        if path in ("/retrieve", "/lookup"):
            return self._by_key(path, body)
        if path == "/query":
            return self._query(body)
        raise BadInputError(f"{path}: not a read")

    def _search(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        k = check_k(body.get("k", 4))
        if body.get("vectors") is None:  # encode once, on one shard
            enc = {n: body[n] for n in ("texts", "chunks", "lengths") if body.get(n) is not None}
            vectors = self._any("read", "/encode", enc)[0]["vectors"]
        else:
            vectors = body["vectors"]
        ask = {
            "vectors": np.asarray(vectors, np.float32),
            "k": k,
            "exact": body.get("exact", False),
        }
        if body.get("exclude_docs") is not None:
            ask["exclude_docs"] = body["exclude_docs"]
        answers = self._all("read", "/search", ask)
        keys = np.concatenate(
            [global_keys(np.asarray(a["keys"]), i, self.n) for i, (a, _) in enumerate(answers)],
            axis=1,
        )
        dist = np.concatenate([np.asarray(a["distances"], np.float32) for a, _ in answers], axis=1)
        dist = np.where(keys >= 0, dist, np.inf)
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        keys = np.take_along_axis(keys, order, axis=1)
        dist = np.take_along_axis(dist, order, axis=1)
        out = {"keys": np.where(np.isinf(dist), -1, keys), "distances": dist}
        return out, [g for _, g in answers]

    def _by_key(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        keys = wire.array(body.get("keys"), "keys", dtype=np.int64)
        flat = keys.ravel()
        shard, local = split_keys(flat, self.n)
        calls = {}
        for i in range(self.n):
            sel = np.nonzero(shard == i)[0]
            if sel.size:
                calls[i] = (sel, self.handles[i].read.remote(path, {"keys": local[sel]}))
        gens = []
        if path == "/retrieve":
            if self._layout is None:
                self._layout = self._any("layout")
            pad, m = self._layout
            tokens = np.full((flat.size, 2 * m), pad, np.int64)  # key -1: all padding
            mask = np.zeros((flat.size, 2 * m), bool)
            for sel, call in calls.values():
                out, g = call.result()
                tokens[sel] = np.asarray(out["tokens"]).reshape(-1, 2 * m)
                mask[sel] = np.asarray(out["mask"]).reshape(-1, 2 * m)
                gens.append(g)
            shape = (*keys.shape, 2 * m)
            return {"tokens": tokens.reshape(shape), "mask": mask.reshape(shape)}, gens
        texts = [""] * flat.size
        conts = [""] * flat.size
        docs: list[str | None] = [None] * flat.size
        for sel, call in calls.values():
            out, g = call.result()
            gens.append(g)
            for j, t, c, d in zip(
                sel, out["texts"], out["continuations"], out["documents"], strict=True
            ):
                texts[j], conts[j], docs[j] = t, c, d
        return {"texts": texts, "continuations": conts, "documents": docs}, gens

    def _query(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        if body.get("rerank", "none") != "none":
            raise BadInputError("re-ranking is not available on a sharded server")
        texts = texts_field(body)
        if texts is None:
            raise BadInputError("missing field 'texts'")
        found, gens = self._search(
            {"texts": texts, "k": body.get("k", 4), "exact": body.get("exact", False)}
        )
        keys, dist = found["keys"], found["distances"]
        real = keys >= 0
        looked, _ = self._by_key("/lookup", {"keys": keys[real]})
        hits = iter(
            Hit(key=int(k), doc=str(d), distance=float(x), text=t, continuation=c)
            for k, x, d, t, c in zip(
                keys[real], dist[real], looked["documents"], looked["texts"],
                looked["continuations"], strict=True,
            )
        )  # fmt: skip
        results = [
            QueryResult(query=q, neighbours=[next(hits) for _ in range(int(n))]).to_dict()
            for q, n in zip(texts, real.sum(axis=1), strict=True)
        ]
        return {"results": results}, gens


def check_same(fingerprints: Sequence[dict[str, Any]], paths: Sequence[Path]) -> None:
    """Refuse shards whose tokenizer, encoder or chunking differ from the first's."""
    first = fingerprints[0]
    for p, f in zip(paths[1:], fingerprints[1:], strict=True):
        for what, got, want in (
            ("tokenizer", f["tokenizer"]["fingerprint"], first["tokenizer"]["fingerprint"]),
            ("encoder", f["encoder"]["fingerprint"], first["encoder"]["fingerprint"]),
            (
                "chunk size",
                f["config"]["chunk"]["chunk_size"],
                first["config"]["chunk"]["chunk_size"],
            ),
        ):
            if got != want:
                raise MismatchError(
                    f"{p}: its {what} differs from {paths[0]}'s; every shard needs the same"
                )


def deploy(
    paths: Sequence[Path],
    *,
    host: str = "127.0.0.1",
    port: int = 8321,
    replicas: int = 1,
    threads: int | None = None,
    device: str = "cpu",
    token: str | None = None,
    max_body: int | None = None,
    address: str | None = None,
) -> str:
    """Start (or join, with ``address``) Ray, deploy the shards and the ingress, and return
    the ingress's URL. The deployments run until :func:`shutdown`."""
    import ray
    from ray import serve

    from ..snapshot import Snapshot

    paths = [Path(p).resolve() for p in paths]
    check_same([Snapshot.open(p).info() for p in paths], paths)  # before anything starts
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    shard_cls: Any = serve.deployment(ShardReplica, ray_actor_options={"num_cpus": 0})
    shards = [
        shard_cls.options(name=f"shard-{i}", num_replicas=replicas).bind(str(p), threads, device)
        for i, p in enumerate(paths)
    ]
    n = len(paths)
    limit = max_body or DEFAULT_MAX_BODY

    def build() -> Any:
        handles = [serve.get_deployment_handle(f"shard-{i}", app_name=APP_NAME) for i in range(n)]
        return make_app(ShardedBackend(handles), token=token, max_body=limit)

    @serve.deployment(name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0})
    @serve.ingress(build)
    class Ingress:
        def __init__(self, *shard_apps: Any) -> None:
            self.shards = shard_apps  # bound so that Serve deploys them with the ingress

    ingress: Any = Ingress
    serve.run(ingress.bind(*shards), name=APP_NAME, route_prefix="/", blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}"


def shutdown() -> None:
    """Remove the deployments and stop Ray Serve (and Ray, if this process started it)."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


__all__ = [
    "ShardReplica",
    "ShardedBackend",
    "check_same",
    "deploy",
    "global_keys",
    "shutdown",
    "split_keys",
]
