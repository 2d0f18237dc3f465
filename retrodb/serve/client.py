"""A database served by `retrodb serve`, with the read API of :class:`~retrodb.RetroDB`.

>>> db = retrodb.connect("http://127.0.0.1:8321")              # doctest: +SKIP
>>> res = db.search("how do I open a file?", k=4)               # doctest: +SKIP
>>> db.retrieve(res.keys).tokens.shape                          # doctest: +SKIP
(1, 4, 128)

``retrodb.open(url)`` gives the same object, so `retrodb query URL`, `retrodb evaluate
CKPT URL` and `retrodb generate CKPT URL` work as they do on a path. Arrays travel as
MessagePack (:mod:`.wire`). The tokenizer is fetched once and kept here (decoding and the
model's tokenizing are local); encoding, search and gathering happen on the server.
:attr:`generation` is the generation that answered the last request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from ..config import DBConfig
from ..errors import BadInputError, MismatchError, RetroDBError
from ..keys import Retrieved
from ..query import Hit, QueryResult
from ..search import Exclusion, SearchResult, check_k
from ..storage import tokenizer_kind
from ..tokenizer import Tokenizer
from . import wire

DEFAULT_TIMEOUT_S = 30.0


class UnreachableError(RetroDBError, ConnectionError):
    """The server does not answer (down, wrong address, or past the timeout)."""


class RemoteError(RetroDBError, RuntimeError):
    """The server refused a request (other than bad input, which is a BadInputError) or
    failed; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def is_url(target: object) -> bool:
    """True for ``http://`` and ``https://`` addresses."""
    return isinstance(target, str) and target.startswith(("http://", "https://"))


@dataclass(frozen=True)
class RemoteManifest:
    """What a client knows of the served generation's manifest (from ``/info``)."""

    generation: int | list[int]  # a list, one per shard, from a sharded server
    config: dict[str, Any]
    tokenizer: dict[str, Any]
    encoder: dict[str, Any]
    next_key: int


class RemoteDB:
    """The database served at ``url`` (see the module docstring). ``token``: the server's
    ``--token``; ``timeout``: seconds to wait for any answer."""

    def __init__(
        self, url: str, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        if not is_url(url):
            raise BadInputError(f"{url!r} is not an http:// or https:// address")
        self.url = url.rstrip("/")
        headers = {"Accept": wire.MSGPACK}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._docs: list[str] = []  # doc_number() registry: client-side numbers
        self._doc_numbers: dict[str, int] = {}
        self.generation: int | list[int] = -1
        """The generation that answered the last request (a list, one per shard, from a
        sharded server)."""
        self._set_info(self.info())
        raw = self._call("GET", "/tokenizer", raw=True)
        section = self.manifest.tokenizer
        self.tokenizer = Tokenizer.from_bytes(raw, kind=tokenizer_kind(section), special=section)
        if self.tokenizer.fingerprint != self.manifest.tokenizer["fingerprint"]:
            raise MismatchError(f"{self.url}: the served tokenizer does not match /info")

    # ------------------------------------------------------------ plumbing

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, raw: bool = False
    ) -> Any:
        try:
            if body is None:
                resp = self._http.request(method, path)
            else:
                resp = self._http.request(
                    method,
                    path,
                    content=wire.dumps(body, wire.MSGPACK),
                    headers={"Content-Type": wire.MSGPACK},
                )
        except httpx.TimeoutException as exc:
            raise UnreachableError(
                f"{self.url}: no answer within {self._http.timeout.read} s ({exc})"
            ) from exc
        except httpx.TransportError as exc:
            raise UnreachableError(f"{self.url}: cannot reach the retrodb server ({exc})") from exc
        gen = resp.headers.get("x-retrodb-generation")
        if gen:  # "3", or one generation per shard: "3,5"
            parts = [int(g) for g in gen.split(",") if g.strip().isdigit()]
            self.generation = parts[0] if len(parts) == 1 else parts
        if resp.status_code >= 400:
            try:
                reason = wire.loads(resp.content, resp.headers.get("content-type"))["error"]
            except (RetroDBError, KeyError, TypeError):
                reason = resp.text[:200] or resp.reason_phrase
            message = f"{self.url}{path}: {reason}"
            if resp.status_code == 400:
                raise BadInputError(message)
            raise RemoteError(f"{message} (HTTP {resp.status_code})", resp.status_code)
        if raw:
            return resp.content
        return wire.loads(resp.content, resp.headers.get("content-type"))

    def _set_info(self, info: dict[str, Any]) -> None:
        self.manifest = RemoteManifest(
            generation=info["generation"],
            config=info["config"],
            tokenizer=info["tokenizer"],
            encoder=info["encoder"],
            next_key=int(info["next_key"]),
        )
        self.config = DBConfig.from_dict(info["config"])
        self.chunk_size = self.config.chunk.chunk_size
        self.pad_id = int(info["tokenizer"]["pad_id"])
        self.token_dtype = np.dtype(info["tokenizer"]["token_dtype"])
        self.dim = int(info["encoder"]["dim"])

    @property
    def path(self) -> str:
        """The server's address (where a local database has its directory)."""
        return self.url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteDB({self.url!r}, generation={self.generation})"

    # ------------------------------------------------------------ the read API

    def info(self) -> dict[str, Any]:
        """What `retrodb info --json` prints for the served generation (plus ``server``)."""
        out: dict[str, Any] = self._call("GET", "/info")
        return out

    def refresh(self) -> bool:
        """Read the served generation's manifest again; True if it changed."""
        before = self.manifest.generation
        self._set_info(self.info())
        return self.manifest.generation != before

    def encode_texts(self, texts: Sequence[str] | str, **_: Any) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return np.asarray(self._call("POST", "/encode", {"texts": texts})["vectors"], np.float32)

    def encode_chunks(
        self, chunks: np.ndarray, lengths: np.ndarray | None = None, **_: Any
    ) -> np.ndarray:
        body: dict[str, Any] = {"chunks": np.asarray(chunks, dtype=np.int64)}
        if lengths is not None:
            body["lengths"] = np.asarray(lengths, dtype=np.int64)
        return np.asarray(self._call("POST", "/encode", body)["vectors"], np.float32)

    def _search(self, body: dict[str, Any]) -> SearchResult:
        out = self._call("POST", "/search", body)
        keys = np.asarray(out["keys"], dtype=np.int64)
        dist = np.asarray(out["distances"], dtype=np.float32)
        return SearchResult(keys=keys.reshape(-1, body["k"]), distances=dist.reshape(-1, body["k"]))

    def search(
        self, queries: str | Sequence[str] | np.ndarray, k: int = 4, *, exact: bool = False
    ) -> SearchResult:
        """As :meth:`RetroDB.search`: texts, or integer token chunks ``[q, m]``."""
        k = check_k(k)
        body: dict[str, Any] = {"k": k, "exact": exact}
        if isinstance(queries, np.ndarray) and np.issubdtype(queries.dtype, np.integer):
            body["chunks"] = queries.astype(np.int64)
        else:
            body["texts"] = [queries] if isinstance(queries, str) else list(queries)
        return self._search(body)

    def doc_number(self, doc_id: str) -> int:
        """A number for document ``doc_id`` that :meth:`search_vectors`'s exclusion takes
        (numbered by this client; the server maps ids to its own)."""
        n = self._doc_numbers.get(doc_id)
        if n is None:
            n = self._doc_numbers[doc_id] = len(self._docs)
            self._docs.append(doc_id)
        return n

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 4,
        *,
        exact: bool = False,
        exclusion: Exclusion | None = None,
    ) -> SearchResult:
        """As :meth:`RetroDB.search_vectors`; an exclusion may only name each query's own
        document (numbers from :meth:`doc_number`)."""
        k = check_k(k)
        body: dict[str, Any] = {"k": k, "exact": exact, "vectors": np.asarray(vectors, np.float32)}
        if exclusion is not None:
            if exclusion.docs is not None or exclusion.skip_starts is not None:
                raise BadInputError("a served database excludes only each query's own document")
            if exclusion.own_doc is not None:
                own = np.asarray(exclusion.own_doc).tolist()
                body["exclude_docs"] = [
                    self._docs[n] if 0 <= n < len(self._docs) else None for n in own
                ]
        return self._search(body)

    def retrieve(self, keys: np.ndarray) -> Retrieved:
        """Neighbour + continuation tokens of ``keys [...]`` (see :meth:`RetroDB.retrieve`)."""
        keys = np.asarray(keys, dtype=np.int64)
        out = self._call("POST", "/retrieve", {"keys": keys})
        m2 = 2 * self.chunk_size
        tokens = np.asarray(out["tokens"], dtype=np.int64).reshape(*keys.shape, m2)
        mask = np.asarray(out["mask"], dtype=bool).reshape(*keys.shape, m2)
        return Retrieved(tokens=tokens, mask=mask)

    def _lookup(self, keys: Sequence[int] | np.ndarray) -> dict[str, Any]:
        flat = np.asarray(keys, dtype=np.int64).ravel()
        if not flat.size:
            return {"texts": [], "continuations": [], "documents": []}
        out: dict[str, Any] = self._call("POST", "/lookup", {"keys": flat})
        return out

    def decode(self, keys: Sequence[int] | np.ndarray) -> list[str]:
        return list(self._lookup(keys)["texts"])

    def continuation_text(self, keys: Sequence[int] | np.ndarray) -> list[str]:
        return list(self._lookup(keys)["continuations"])

    def key_documents(self, keys: np.ndarray) -> list[str | None]:
        return list(self._lookup(keys)["documents"])

    def query(
        self,
        texts: str | Sequence[str],
        k: int = 4,
        *,
        exact: bool = False,
        rerank: str = "none",
        fetch: int | None = None,
    ) -> list[QueryResult]:
        """What `retrodb query` prints, computed by the server (see :func:`retrodb.query.query`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        body = {"texts": texts, "k": check_k(k), "exact": exact, "rerank": rerank, "fetch": fetch}
        out = self._call("POST", "/query", body)["results"]
        return [
            QueryResult(query=r["query"], neighbours=[Hit(**h) for h in r["neighbours"]])
            for r in out
        ]


def connect(url: str, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> RemoteDB:
    """The database served at ``url`` by `retrodb serve` (see :class:`RemoteDB`)."""
    return RemoteDB(url, token=token, timeout=timeout)


__all__ = ["RemoteDB", "RemoteError", "RemoteManifest", "UnreachableError", "connect", "is_url"]
