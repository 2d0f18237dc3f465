"""Generate text with a RETRO model, retrieving from the database chunk by chunk.

After every completed chunk of m tokens (the prompt's included) the chunk is encoded with
the database's encoder and its k nearest neighbours are retrieved; the model attends to
them from the chunk's last token on. With the key/value cache (``use_cache=True``, the
default) each new token costs one decoder step and each completed chunk one encoder pass
over its neighbours; ``use_cache=False`` recomputes the whole sequence for every token
(the reference the cache must equal).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from retrodb.db import RetroDB
from retrodb.errors import BadInputError
from retrodb_model.model import RetroModel
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
    prompt: str
    text: str
    """The generated continuation (without the prompt)."""
    prompt_tokens: list[int]
    tokens: list[int]
    """The generated token ids."""
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


@torch.no_grad()
def generate(
    model: RetroModel,
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
    tokenizer: object | None = None,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Continue ``prompt`` by up to ``max_tokens`` tokens.

    ``retrieval=False`` generates with the plain decoder (no database search).
    ``retriever`` replaces the live database search (chunks [n, m] -> Neighbours), e.g.
    to give both code paths the same neighbours in a test. ``on_token`` is called with
    every new token id as soon as it is chosen."""
    cfg = model.cfg
    m = cfg.chunk_size
    k = k or cfg.num_neighbours
    tok = tokenizer if tokenizer is not None else (db.tokenizer if db is not None else None)
    if tok is None:
        raise BadInputError("a database or a tokenizer is needed to generate")
    if retrieval and retriever is None:
        if db is None:
            raise BadInputError("retrieval needs a database")
        retriever = LiveRetriever(db, k)
    if max_tokens < 0:
        raise BadInputError(f"max_tokens must be >= 0, got {max_tokens}")
    ids = [int(t) for t in tok.encode([prompt])[0]]  # type: ignore[attr-defined]
    if not ids:
        raise BadInputError("the prompt is empty")
    total = len(ids) + max_tokens
    if total > cfg.max_seq_len:
        raise BadInputError(
            f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed the model's "
            f"max_seq_len {cfg.max_seq_len}"
        )
    eos = getattr(tok, "eos_id", -1) if stop_at_eos else -1
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    t0 = time.perf_counter()
    result = Generation(prompt=prompt, text="", prompt_tokens=list(ids), tokens=[])
    # per completed chunk: its neighbours as (k, r) token and mask tensors
    neigh_tok: list[torch.Tensor] = []
    neigh_mask: list[torch.Tensor] = []
    retrieval_s = 0.0

    def retrieve_upto(n_tokens: int) -> None:
        """Retrieve for every chunk completed by the first n_tokens tokens."""
        nonlocal retrieval_s
        start, stop = len(neigh_tok), n_tokens // m
        if not retrieval or stop <= start:
            return
        t = time.perf_counter()
        seq = np.asarray(ids[: stop * m], dtype=np.int64).reshape(-1, m)[start:stop]
        got = retriever(seq)  # type: ignore[misc]
        toks, mask = got.tensors()
        retrieval_s += time.perf_counter() - t
        for j in range(stop - start):
            neigh_tok.append(toks[j])
            neigh_mask.append(mask[j])
            if db is not None:
                keys = [int(x) for x in got.keys[j]]
                result.retrievals.append(
                    Retrieval(
                        chunk=start + j,
                        chunk_text=tok.decode(seq[j]),  # type: ignore[attr-defined]
                        keys=keys,
                        docs=db.key_documents(np.asarray(keys)),
                        texts=db.decode(np.asarray(keys)),
                    )
                )

    def neighbours(lo: int, hi: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not retrieval or hi <= lo:
            return None, None
        return (
            torch.stack(neigh_tok[lo:hi])[None],  # (1, c, k, r)
            torch.stack(neigh_mask[lo:hi])[None],
        )

    cache = model.new_cache(1, retrieval=retrieval, max_len=total) if use_cache else None
    fed = 0  # tokens the cache has consumed
    for i in range(max_tokens):
        retrieve_upto(len(ids))
        if cache is not None:
            new = torch.tensor([ids[fed:]], dtype=torch.long)
            c = cache.chunks_completed_by(new.shape[1])
            r, rm = neighbours(cache.completed_chunks, cache.completed_chunks + c)
            logits = model.forward_step(new, cache, r, rm)[0, -1]
            fed = len(ids)
        else:
            r, rm = neighbours(0, len(ids) // m)
            logits = model(torch.tensor([ids], dtype=torch.long), r, rm)[0][0, -1]
        if i == 0:
            result.prompt_seconds = time.perf_counter() - t0
        nxt = sample(logits, temperature=temperature, top_p=top_p, generator=gen)
        if nxt == eos:
            break
        ids.append(nxt)
        result.tokens.append(nxt)
        if on_token is not None:
            on_token(nxt)
    # decode with the prompt, so the first new token keeps its leading space
    head = tok.decode(result.prompt_tokens)  # type: ignore[attr-defined]
    result.text = tok.decode(result.prompt_tokens + result.tokens)[len(head) :]  # type: ignore[attr-defined]
    result.seconds = time.perf_counter() - t0
    result.retrieval_seconds = retrieval_s
    return result


__all__ = ["Generation", "Retrieval", "generate", "sample"]
