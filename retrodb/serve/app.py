"""The HTTP API of `retrodb serve`, as a Starlette application (served by uvicorn, or by
Ray Serve for shards).

Every endpoint answers JSON, or MessagePack when the request's ``Accept`` asks for
``application/msgpack`` (:mod:`.wire`); every answer carries the ``generation`` that
produced it (also as the ``X-Retrodb-Generation`` header). Requests never name a path:
the database is the one the server was started on.

=================  ==========================================================================
``GET /healthz``   ``{"ok": true, "generation": g}``; never needs the token
``GET /info``      what `retrodb info --json` prints, plus ``server`` (batching figures)
``GET /tokenizer`` the database's tokenizer file (bytes; ``/info`` says its kind), for clients
``POST /encode``   ``texts`` or ``chunks`` (+ ``lengths``) -> ``vectors [q, d]``
``POST /search``   ``texts``, ``chunks`` (+ ``lengths``) or ``vectors``; ``k``, ``exact``,
                   ``exclude_docs`` (per query, a document id or null) -> ``keys``,
                   ``distances``
``POST /retrieve`` ``keys`` (any shape) -> ``tokens [..., 2m]``, ``mask [..., 2m]``
``POST /lookup``   ``keys [n]`` -> ``texts``, ``continuations``, ``documents``
``POST /query``    ``texts``, ``k``, ``exact``, ``rerank``, ``fetch`` -> ``results``: what
                   `retrodb query --json` prints, one object per text
=================  ==========================================================================

Errors: 400 for a malformed body or bad arguments (k <= 0, unknown keys, empty texts),
401 without the bearer token when one is set, 404 for an unknown path, 413 for a body over
the limit, 500 otherwise; the body is ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import query as query_mod
from ..errors import BadInputError, MismatchError, RetroDBError
from ..rerank import RERANKS
from ..search import Exclusion, check_k
from ..snapshot import Snapshot
from . import wire
from .service import Service

log = logging.getLogger("retrodb.serve")
DEFAULT_MAX_BODY = 64 * 2**20
GENERATION_HEADER = "X-Retrodb-Generation"


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _status(exc: BaseException) -> int:
    if isinstance(exc, HTTPError):
        return exc.status
    if isinstance(exc, BadInputError | MismatchError):
        return 400
    return 500


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _answer(body: Any, request: Request, generation: Any, status: int = 200) -> Response:
    kind = wire.MSGPACK if wire.MSGPACK in request.headers.get("accept", "") else wire.JSON
    headers = {} if generation is None else {GENERATION_HEADER: _gen_header(generation)}
    return Response(wire.dumps(body, kind), status_code=status, media_type=kind, headers=headers)


async def _body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"body of {int(declared)} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise HTTPError(413, f"body is over the limit of {limit} bytes")
        chunks.append(part)
    body = wire.loads(b"".join(chunks), request.headers.get("content-type"))
    if not isinstance(body, dict):
        raise BadInputError("the body must be an object")
    return body


def _k(body: dict[str, Any], default: int = 4) -> int:
    return check_k(body.get("k", default))


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadInputError(f"field {name!r} must be true or false")
    return value


def texts_field(body: dict[str, Any]) -> list[str] | None:
    texts = body.get("texts")
    if texts is None:
        return None
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadInputError("field 'texts' must be a non-empty list of strings")
    return texts


def encode_request(snap: Snapshot, body: dict[str, Any]) -> np.ndarray:
    """The key vectors a request's ``texts``, ``chunks`` (+ ``lengths``) or ``vectors`` give."""
    texts = texts_field(body)
    given = [n for n in ("texts", "chunks", "vectors") if body.get(n) is not None]
    if len(given) != 1:
        raise BadInputError("give exactly one of 'texts', 'chunks' or 'vectors'")
    if texts is not None:
        return snap.encode_texts(texts)
    if body.get("chunks") is not None:
        chunks = wire.array(body["chunks"], "chunks", dtype=np.int64, ndim=2)
        lengths = body.get("lengths")
        lens = None if lengths is None else wire.array(lengths, "lengths", dtype=np.int64, ndim=1)
        if lens is not None and (lens.shape[0] != chunks.shape[0] or (lens < 0).any()):
            raise BadInputError("field 'lengths' must give one length >= 0 per chunk")
        if ((chunks < 0) | (chunks >= snap.tokenizer.vocab_size)).any():
            raise BadInputError(f"token ids must be in 0..{snap.tokenizer.vocab_size - 1}")
        return snap.encode_chunks(chunks, lens)
    return wire.array(body["vectors"], "vectors", dtype=np.float32, ndim=2)


def _exclusion(snap: Snapshot, body: dict[str, Any], queries: int) -> Exclusion | None:
    docs = body.get("exclude_docs")
    if docs is None:
        return None
    if not isinstance(docs, list) or len(docs) != queries:
        raise BadInputError("field 'exclude_docs' must give one document id (or null) per query")
    own = [-2 if d is None else snap.keymap.doc_number(str(d)) for d in docs]
    return Exclusion(own_doc=np.asarray([n if n >= 0 else -2 for n in own], np.int64))


def _keys(body: dict[str, Any], *, flat: bool = False) -> np.ndarray:
    return wire.array(body.get("keys"), "keys", dtype=np.int64, ndim=1 if flat else None)


# ------------------------------------------------------------------ the reads


def do_search(snap: Snapshot, body: dict[str, Any]) -> dict[str, Any]:
    k = _k(body)
    vectors = encode_request(snap, body)
    res = snap.search_vectors(
        vectors, k, exact=_flag(body, "exact"), exclusion=_exclusion(snap, body, len(vectors))
    )
    return {"keys": res.keys, "distances": res.distances}


def do_encode(snap: Snapshot, body: dict[str, Any]) -> dict[str, Any]:
    return {"vectors": encode_request(snap, body)}


def do_retrieve(snap: Snapshot, body: dict[str, Any]) -> dict[str, Any]:
    got = snap.retrieve(_keys(body))  # unknown keys: a one-line BadInputError (400)
    return {"tokens": got.tokens, "mask": got.mask}


def do_lookup(snap: Snapshot, body: dict[str, Any]) -> dict[str, Any]:
    keys = _keys(body, flat=True)
    snap.keymap.locate_known(keys)  # unknown keys: a one-line 400
    return {
        "texts": snap.decode(keys),
        "continuations": snap.continuation_text(keys),
        "documents": snap.key_documents(keys),
    }


def do_query(snap: Snapshot, body: dict[str, Any]) -> dict[str, Any]:
    texts = texts_field(body)
    if texts is None:
        raise BadInputError("missing field 'texts'")
    rerank = body.get("rerank", "none")
    if rerank not in RERANKS:
        raise BadInputError(f"field 'rerank' must be one of {', '.join(RERANKS)}")
    fetch = body.get("fetch")
    if fetch is not None and (not isinstance(fetch, int) or isinstance(fetch, bool) or fetch < 1):
        raise BadInputError("field 'fetch' must be a positive integer")
    results = query_mod.query(
        snap, texts, _k(body), exact=_flag(body, "exact"), rerank=rerank, fetch=fetch
    )
    return {"results": [r.to_dict() for r in results]}


READS: dict[str, Callable[[Snapshot, dict[str, Any]], dict[str, Any]]] = {
    "/encode": do_encode,
    "/search": do_search,
    "/retrieve": do_retrieve,
    "/lookup": do_lookup,
    "/query": do_query,
}


class Backend(Protocol):
    """What the HTTP layer asks of whatever answers: one database (:class:`LocalBackend`)
    or shards (:class:`retrodb.serve.shards.ShardedBackend`). Each method returns its
    answer and the generation that gave it (a list of generations for shards)."""

    def generation(self) -> Any: ...

    def info(self) -> tuple[dict[str, Any], Any]: ...

    def tokenizer(self) -> tuple[bytes, str, Any]: ...

    def read(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], Any]: ...


class LocalBackend:
    """One database, through a :class:`~.service.Service`."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def generation(self) -> int:
        return self.service.snapshot().generation

    def info(self) -> tuple[dict[str, Any], int]:
        body, gen = self.service.run(lambda s: s.info())
        if self.service.batcher is not None:
            body["server"] = self.service.batcher.stats.to_dict()
        return body, gen

    def tokenizer(self) -> tuple[bytes, str, int]:
        snap = self.service.snapshot()
        return snap.tokenizer.model_bytes, snap.tokenizer.fingerprint, snap.generation

    def read(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        fn = READS[path]
        return self.service.run(lambda s: fn(s, body))


def _gen_header(gen: Any) -> str:
    return ",".join(str(g) for g in gen) if isinstance(gen, list | tuple) else str(gen)


def make_app(
    backend: Service | Backend,
    *,
    token: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> Starlette:
    """The HTTP API over ``backend`` (a :class:`Service` is served by a
    :class:`LocalBackend`). ``token``: every endpoint but ``/healthz`` needs
    ``Authorization: Bearer <token>``. ``max_body``: the largest request body, bytes."""
    served: Backend = LocalBackend(backend) if isinstance(backend, Service) else backend

    def authorised(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            raise HTTPError(401, "a bearer token is required (Authorization: Bearer ...)")

    def endpoint(
        handler: Callable[[Request], Awaitable[Response]], *, open_: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def call(request: Request) -> Response:
            try:
                if not open_:
                    authorised(request)
                return await handler(request)
            except (HTTPError, RetroDBError, ValueError) as exc:
                status = _status(exc)
                if status >= 500:
                    log.exception("%s failed", request.url.path)
                return _answer({"error": _one_line(exc)}, request, None, status)
            except Exception as exc:  # a bug: say so in one line, log the traceback
                log.exception("%s failed", request.url.path)
                return _answer({"error": f"internal error: {_one_line(exc)}"}, request, None, 500)

        return call

    async def healthz(request: Request) -> Response:
        gen = await run_in_threadpool(served.generation)
        return _answer({"ok": True, "generation": gen}, request, gen)

    async def info(request: Request) -> Response:
        body, gen = await run_in_threadpool(served.info)
        return _answer(body, request, gen)

    async def tokenizer(request: Request) -> Response:
        data, fingerprint, gen = await run_in_threadpool(served.tokenizer)
        headers = {GENERATION_HEADER: _gen_header(gen), "X-Retrodb-Fingerprint": fingerprint}
        return Response(data, media_type="application/octet-stream", headers=headers)

    def read(path: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            body = await _body(request, max_body)
            out, gen = await run_in_threadpool(served.read, path, body)
            out["generation"] = gen
            return _answer(out, request, gen)

        return handler

    routes = [
        Route("/healthz", endpoint(healthz, open_=True), methods=["GET"]),
        Route("/info", endpoint(info), methods=["GET"]),
        Route("/tokenizer", endpoint(tokenizer), methods=["GET"]),
    ]
    routes += [Route(p, endpoint(read(p)), methods=["POST"]) for p in READS]

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        what = "method not allowed" if code == 405 else "not found"
        return _answer(
            {"error": f"{request.method} {request.url.path}: {what}"}, request, None, code
        )

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


__all__ = [
    "DEFAULT_MAX_BODY",
    "GENERATION_HEADER",
    "READS",
    "Backend",
    "LocalBackend",
    "make_app",
    "texts_field",
]
