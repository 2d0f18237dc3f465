"""Generate text with a RETRO model, retrieving from the database chunk by chunk.

After every completed chunk of m tokens (the prompt's included) the chunk is encoded with
the database's encoder and its k nearest neighbours are retrieved; the model attends to
them from the chunk's last token on. With the key/value cache (``use_cache=True``, the
default) each new token costs one decoder step and each completed chunk one encoder pass
over its neighbours; ``use_cache=False`` recomputes the whole sequence for every token
(the reference the cache must equal).
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from retrodb.db import RetroDB
from retrodb.errors import BadInputError
from retrodb_model.model import RetrievalParts
from retrodb_model.retrieve import LiveRetriever, Neighbours


@dataclass
class Retrieval:
    """One retrieval: chunk ``chunk`` (0-based, tokens [chunk*m, (chunk+1)*m)) and its
    neighbours' keys and document ids (None for -1)."""

    chunk: int
    chunk_text: str
    keys: list[int]
    docs: list[str | None]
    texts: list[str]


@dataclass
class Generation:
    """What :func:`generate` made, and how long it took; :meth:`to_dict` is the JSON
    object of `retrodb generate --json`."""

    prompt: str
    text: str
    """The generated continuation (without the prompt)."""
    prompt_tokens: list[int]
    tokens: list[int]
    """The generated token ids."""
    prompt_text: str = ""
    """The prompt as the model reads it: its tokens, decoded."""
    retrievals: list[Retrieval] = field(default_factory=list)
    seconds: float = 0.0
    retrieval_seconds: float = 0.0
    prompt_seconds: float = 0.0
    """Time to read the prompt (its retrievals included) before the first new token."""

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second after the first (which comes with reading the prompt),
        retrieval included."""
        gen = self.seconds - self.prompt_seconds
        return (len(self.tokens) - 1) / gen if gen > 0 and len(self.tokens) > 1 else float("nan")

    @property
    def retrieval_share(self) -> float:
        return self.retrieval_seconds / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: prompt, text, the number of new tokens, the timings
        (``tokens_per_s`` None where there is no rate) and every retrieval."""
        per_s = self.tokens_per_s
        return {
            "prompt": self.prompt,
            "text": self.text,
            "tokens": len(self.tokens),
            "seconds": self.seconds,
            "retrieval_seconds": self.retrieval_seconds,
            "tokens_per_s": None if math.isnan(per_s) else per_s,
            "retrievals": [dataclasses.asdict(r) for r in self.retrievals],
        }


def sample(
    logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """Next token from ``logits [V]``: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # the first always stays
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Cc, except \t and \n


def printable(text: str) -> str:
    """``text`` with control characters other than newline and tab escaped (``\\x1b``),
    so that printing it cannot move the cursor, ring the bell or restyle the terminal."""
    return _CONTROL.sub(lambda c: f"\\x{ord(c.group()):02x}", text)


class TextStream:
    """The text of generated tokens, one token at a time, ready to print.

    Each token adds its piece ('▁' is a space; nothing is decoded twice). Byte-fallback
    pieces are gathered until they form UTF-8; bytes that cannot (an invalid byte, or a
    sequence cut short by a normal piece or the end) become ``\\xNN`` instead of U+FFFD.
    Control characters other than newline and tab are escaped (:func:`printable`)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._pieces: dict[int, str | int] = {}  # token id -> its text, or its byte value
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        # a Hugging Face tokenizer (byte-level BPE: no '▁' or <0xNN> pieces) decodes the
        # tokens so far and gives what is new, holding back an unfinished character
        self._whole = getattr(tokenizer, "kind", "sentencepiece") != "sentencepiece"
        self._ids: list[int] = []
        self._given = 0  # characters of the decoded tokens already given

    def _piece(self, token: int) -> str | int:
        if token not in self._pieces:
            piece = self._tok.id_to_piece(token)
            byte = _BYTE_PIECE.fullmatch(piece)
            if byte:
                self._pieces[token] = int(byte.group(1), 16)
            else:  # decode drops the leading space of a text's first piece: put it back
                lead = " " if piece.startswith("\u2581") else ""
                text = self._tok.decode([token])
                self._pieces[token] = lead + text if text else ""
        return self._pieces[token]

    def push(self, token: int) -> str:
        """The printable text that ``token`` completes ("" while bytes are pending)."""
        if self._whole:
            self._ids.append(token)
            text = self._tok.decode(self._ids)
            if text.endswith("\ufffd"):  # the character's bytes have not all come
                return ""
            new, self._given = text[self._given :], len(text)
            return printable(new)
        piece = self._piece(token)
        if isinstance(piece, int):
            return printable(self._bytes.decode(bytes([piece])))
        return self.flush() + printable(piece)

    def flush(self) -> str:
        """Pending bytes that never formed a character, escaped (call it at the end)."""
        if self._whole:
            text = self._tok.decode(self._ids)
            new, self._given = text[self._given :], len(text)
            return printable(new)
        text = self._bytes.decode(b"", final=True)
        self._bytes.reset()
        return printable(text)


class _LiveNeighbours:
    """The neighbours of every completed chunk of a growing sequence, each retrieved
    once, as (k, r) token and mask tensors per chunk; each retrieval is recorded."""

    def __init__(
        self,
        retriever: Callable[[np.ndarray], Neighbours],
        m: int,
        describe: Callable[[int, np.ndarray, Neighbours, int], Retrieval] | None,
    ) -> None:
        self.retriever, self.m, self.describe = retriever, m, describe
        self.tokens: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.retrievals: list[Retrieval] = []
        self.seconds = 0.0

    def update(self, ids: list[int]) -> None:
        """Retrieve for every chunk completed by ``ids`` that has no neighbours yet."""
        start, stop = len(self.tokens), len(ids) // self.m
        if stop <= start:
            return
        t = time.perf_counter()
        chunks = np.asarray(ids[start * self.m : stop * self.m], dtype=np.int64)
        chunks = chunks.reshape(-1, self.m)  # (c, m)
        got = self.retriever(chunks)
        toks, mask = got.tensors()  # (c, k, r) each
        self.seconds += time.perf_counter() - t
        self.tokens.extend(toks.unbind(0))
        self.masks.extend(mask.unbind(0))
        if self.describe is not None:
            for j in range(stop - start):
                self.retrievals.append(self.describe(start + j, chunks[j], got, j))

    def window(self, lo: int, hi: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Neighbours of chunks lo .. hi-1 as (1, c, k, r) tensors; None when c = 0."""
        if hi <= lo:
            return None, None
        return torch.stack(self.tokens[lo:hi])[None], torch.stack(self.masks[lo:hi])[None]


class _Stepper:
    """Logits of the next token of a growing sequence: one cached decoder step per call
    (the cache holds everything already read), or a full forward (``use_cache=False``)."""

    def __init__(self, model: RetrievalParts, *, retrieval: bool, max_len: int, use_cache: bool):
        self.model, self.m = model, model.cfg.chunk_size
        self.cache = model.new_cache(1, retrieval=retrieval, max_len=max_len) if use_cache else None

    def __call__(self, ids: list[int], neighbours: _LiveNeighbours | None) -> torch.Tensor:
        """Logits (V,) after ``ids``; ``neighbours`` holds those of its completed chunks."""
        if self.cache is None:
            r, rm = neighbours.window(0, len(ids) // self.m) if neighbours else (None, None)
            return self.model(torch.tensor([ids], dtype=torch.long), r, rm)[0][0, -1]
        new = torch.tensor([ids[self.cache.pos :]], dtype=torch.long)  # (1, t) not yet read
        done = self.cache.completed_chunks
        r = rm = None
        if neighbours is not None:
            r, rm = neighbours.window(done, done + self.cache.chunks_completed_by(new.shape[1]))
        return self.model.forward_step(new, self.cache, r, rm)[0, -1]


def _prompt_ids(tok: Any, prompt: str, max_tokens: int, max_seq_len: int) -> list[int]:
    if max_tokens < 0:
        raise BadInputError(f"max_tokens must be >= 0, got {max_tokens}")
    ids = [int(t) for t in tok.encode([prompt])[0]]
    if not ids:
        raise BadInputError("the prompt is empty")
    if len(ids) + max_tokens > max_seq_len:
        raise BadInputError(
            f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed the model's "
            f"max_seq_len {max_seq_len}"
        )
    return ids


def _live_neighbours(
    db: RetroDB | None,
    tok: Any,
    k: int,
    m: int,
    retriever: Callable[[np.ndarray], Neighbours] | None,
    rerank: str = "none",
    fetch: int | None = None,
    min_overlap: float = 0.0,
) -> _LiveNeighbours:
    if retriever is None:
        if db is None:
            raise BadInputError("retrieval needs a database")
        retriever = LiveRetriever(db, k, rerank=rerank, fetch=fetch, min_overlap=min_overlap)
    if db is None:
        return _LiveNeighbours(retriever, m, None)

    def describe(chunk: int, tokens: np.ndarray, got: Neighbours, row: int) -> Retrieval:
        keys = [int(x) for x in got.keys[row]]
        return Retrieval(
            chunk=chunk,
            chunk_text=tok.decode(tokens),
            keys=keys,
            docs=db.key_documents(np.asarray(keys)),
            texts=db.decode(np.asarray(keys)),
        )

    return _LiveNeighbours(retriever, m, describe)


@torch.no_grad()
def generate(
    model: RetrievalParts,
    db: RetroDB | None,
    prompt: str,
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    retrieval: bool = True,
    k: int | None = None,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    retriever: Callable[[np.ndarray], Neighbours] | None = None,
    rerank: str = "none",
    fetch: int | None = None,
    min_overlap: float = 0.0,
    tokenizer: object | None = None,
    on_token: Callable[[int], None] | None = None,
    on_text: Callable[[str], None] | None = None,
    on_prompt: Callable[[str], None] | None = None,
) -> Generation:
    """Continue ``prompt`` by up to ``max_tokens`` tokens.

    ``retrieval=False`` generates with the plain decoder (no database search).
    ``retriever`` replaces the live database search (chunks [n, m] -> Neighbours), e.g.
    to give both code paths the same neighbours in a test. ``on_token`` is called with
    every new token id as soon as it is chosen; ``on_text`` with the printable text it
    completes (:class:`TextStream`: the pieces joined are the continuation, with control
    characters escaped and bytes that form no character as ``\\xNN``); ``on_prompt``, before
    the first new token, with the prompt as the model reads it (:attr:`Generation.prompt_text`,
    escaped as by :func:`printable`). ``rerank``, ``fetch`` and ``min_overlap`` (the overlap
    floor): how neighbours are chosen (:class:`~retrodb_model.retrieve.LiveRetriever`)."""
    cfg = model.cfg
    tok: Any = tokenizer if tokenizer is not None else (db.tokenizer if db is not None else None)
    if tok is None:
        raise BadInputError("a database or a tokenizer is needed to generate")
    k = k or cfg.num_neighbours
    live = None
    if retrieval:
        live = _live_neighbours(db, tok, k, cfg.chunk_size, retriever, rerank, fetch, min_overlap)
    ids = _prompt_ids(tok, prompt, max_tokens, cfg.max_seq_len)
    # decoded once; the continuation is what follows it in the decoded whole, so that the
    # first new token keeps its leading space
    head = tok.decode(ids)
    if on_prompt is not None:
        on_prompt(printable(head))
    eos = getattr(tok, "eos_id", -1) if stop_at_eos else -1
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    t0 = time.perf_counter()
    result = Generation(
        prompt=prompt, text="", prompt_tokens=list(ids), tokens=[], prompt_text=head
    )
    step = _Stepper(model, retrieval=retrieval, max_len=len(ids) + max_tokens, use_cache=use_cache)
    stream = TextStream(tok) if on_text is not None else None
    for i in range(max_tokens):
        if live is not None:
            live.update(ids)
        logits = step(ids, live)
        if i == 0:
            result.prompt_seconds = time.perf_counter() - t0
        nxt = sample(logits, temperature=temperature, top_p=top_p, generator=gen)
        if nxt == eos:
            break
        ids.append(nxt)
        result.tokens.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if stream is not None and on_text is not None:
            on_text(stream.push(nxt))
    if stream is not None and on_text is not None:
        on_text(stream.flush())
    result.text = tok.decode(result.prompt_tokens + result.tokens)[len(head) :]
    result.seconds = time.perf_counter() - t0
    if live is not None:
        result.retrievals = live.retrievals
        result.retrieval_seconds = live.seconds
    return result


__all__ = ["Generation", "Retrieval", "TextStream", "generate", "printable", "sample"]
