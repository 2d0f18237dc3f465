"""Evaluate a RETRO model on held-out documents: bits per byte with retrieval on and off,
and bits per byte as a function of how much of each chunk its neighbours contain.

Documents are tokenized with the database's tokenizer and cut into windows of L tokens
(each window starts at a chunk boundary and predicts the L tokens after its first, as in
training). For every full chunk of a window the k neighbours are retrieved *live* from the
database (the chunk is encoded with the database's encoder and searched), so documents
added with ``retrodb add`` after training are retrievable at once.

**Bits per byte.** The sum of the targets' negative log-likelihood in nats, divided by
ln 2 and by the UTF-8 bytes of the text the targets decode to (:func:`token_byte_lengths`).

**bpb(alpha)** (our reading of Section 2.6 of the paper). Window chunk j >= 1 is scored by
the tokens that attend to the neighbours of chunk j-1 (under the CCA shift: the last token
of chunk j-1 through the last but one of chunk j), which are exactly the tokens of chunk j
as targets. Its overlap ratio is the longest common contiguous token substring between
chunk j and any neighbour of chunk j-1 (neighbour chunk + continuation, 2m tokens),
divided by chunk j's length. bpb(alpha) is the bits per byte over the chunks whose overlap
ratio is at most alpha, for alpha in 0, 12.5, 25, 50, 75, 100 %: a model that only gains
at high alpha gains by copying. The first chunk of every window attends to no neighbours
and is left out of bpb(alpha) (so bpb(100 %) covers fewer tokens than the overall bpb).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from retrodb import corpus as corpus_mod
from retrodb.db import RetroDB
from retrodb.errors import BadInputError
from retrodb.progress import ProgressFn, no_progress
from retrodb.tokenizer import Tokenizer
from retrodb_model.model import IGNORE_INDEX, RetroModel
from retrodb_model.retrieve import LiveRetriever

#: Overlap thresholds of bpb(alpha), in percent of the chunk length.
ALPHAS = (0.0, 12.5, 25.0, 50.0, 75.0, 100.0)
LN2 = math.log(2.0)
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for, ``[V]`` int64: its piece with '▁' as the space
    it encodes, 1 for a byte-fallback piece, 0 for control pieces (pad, bos, eos).

    Summed over a span of a document's tokens this is the byte length of the span's
    decoded text; SentencePiece's ``decode`` of a whole text drops its leading space,
    which here is counted (inside a document it is real text)."""
    out = np.zeros(tok.vocab_size, dtype=np.int64)
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        if _BYTE_PIECE.fullmatch(piece):
            out[i] = 1
        elif tok.decode([i]) == "":
            out[i] = 0
        else:
            out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def longest_common_run(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the longest common contiguous run between ``a [..., n]`` and each row of
    ``b [..., K, r]``, maximised over the K rows: ``[...]`` int64. Entries < 0 never match
    (use distinct negative values for padding on the two sides)."""
    a = np.asarray(a)
    b = np.asarray(b)
    eq = (a[..., None, :, None] == b[..., :, None, :]) & (a[..., None, :, None] >= 0)
    run = np.zeros(eq.shape[:-2] + (eq.shape[-1] + 1,), dtype=np.int64)  # (..., K, r+1)
    best = np.zeros(eq.shape[:-2], dtype=np.int64)  # (..., K)
    for i in range(eq.shape[-2]):
        nxt = np.zeros_like(run)
        nxt[..., 1:] = (run[..., :-1] + 1) * eq[..., i, :]
        run = nxt
        best = np.maximum(best, run.max(axis=-1))
    return best.max(axis=-1) if best.shape[-1] else np.zeros(best.shape[:-1], np.int64)


@dataclass
class _Window:
    doc: int  # document number in this evaluation
    start: int  # first input token (a multiple of m)
    length: int  # input tokens T (targets are tokens start+1 .. start+T)


def read_documents(inputs: Sequence[str | Path]) -> list[tuple[str, str]]:
    """``(id, text)`` of every document of ``inputs`` (files, folders, JSONL)."""
    corpus = corpus_mod.scan(list(inputs))
    try:
        return list(corpus.iter_documents())
    finally:
        corpus.cleanup()


@torch.no_grad()
def evaluate(
    model: RetroModel,
    db: RetroDB,
    documents: Sequence[tuple[str, str]],
    *,
    seq_len: int | None = None,
    k: int | None = None,
    batch_size: int = 4,
    retrieval: bool = True,
    exclude_self: bool = False,
    max_tokens: int | None = None,
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Bits per byte of ``documents`` (``(id, text)`` pairs) with retrieval on and off, and
    bpb(alpha). ``retrieval=False`` evaluates without retrieval only (no search at all).
    ``exclude_self``: never retrieve from a database document with the evaluated
    document's id. ``max_tokens``: score only the first max_tokens targets of each document
    (a cheaper estimate). Returns a JSON-able dict (see docs/results-model.md)."""
    cfg = model.cfg
    m = cfg.chunk_size
    L = seq_len or cfg.max_seq_len
    if L % m or L <= 0:
        raise BadInputError(f"seq_len must be a positive multiple of the chunk size {m}, got {L}")
    if L > cfg.max_seq_len:
        raise BadInputError(f"seq_len {L} exceeds the model's max_seq_len {cfg.max_seq_len}")
    k = k or cfg.num_neighbours
    tok = db.tokenizer
    assert tok is not None
    if not documents:
        raise BadInputError("no documents to evaluate")
    t_start = time.perf_counter()
    nbytes_of = token_byte_lengths(tok)
    ids = [d for d, _ in documents]
    toks = [np.asarray(t, dtype=np.int64) for t in tok.encode([text for _, text in documents])]
    if max_tokens is not None:
        toks = [t[: max_tokens + 1] for t in toks]
    pad = db.pad_id

    windows = [
        _Window(di, s, min(L, len(t) - 1 - s))
        for di, t in enumerate(toks)
        for s in range(0, max(len(t) - 1, 0), L)
    ]
    if not windows:
        raise BadInputError("the documents are too short to evaluate (need 2 tokens)")

    # Live retrieval for every full chunk of every window, all at once.
    retriever = LiveRetriever(db, k)
    chunk_of: dict[tuple[int, int], int] = {}  # (doc, first token) -> row
    rows_tok: list[np.ndarray] = []
    rows_own: list[int] = []
    if retrieval:
        for w in windows:
            for j in range(w.length // m):
                a = w.start + j * m
                chunk_of[(w.doc, a)] = len(rows_tok)
                rows_tok.append(toks[w.doc][a : a + m])
                rows_own.append(retriever.doc_number(ids[w.doc]) if exclude_self else -2)
        progress("retrieve", 0, len(rows_tok))
        got = retriever(
            np.stack(rows_tok) if rows_tok else np.zeros((0, m), np.int64),
            exclude=np.array(rows_own, dtype=np.int64) if exclude_self else None,
        )
        progress("retrieve", len(rows_tok), len(rows_tok))
        n_tok, n_mask = got.tensors()  # (R, k, 2m)

    modes = ["retrieval", "no_retrieval"] if retrieval else ["no_retrieval"]
    nll = {mode: [np.zeros(0)] * len(windows) for mode in modes}
    t_model = time.perf_counter()
    n_chunks = L // m
    progress("evaluate", 0, len(windows))
    for b0 in range(0, len(windows), batch_size):
        batch = windows[b0 : b0 + batch_size]
        B = len(batch)
        inp = torch.full((B, L), pad, dtype=torch.long)
        tgt = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        for i, w in enumerate(batch):
            t = torch.from_numpy(toks[w.doc][w.start : w.start + w.length + 1])
            inp[i, : w.length] = t[:-1]
            tgt[i, : w.length] = t[1:]
        for mode in modes:
            retrieved = mask = None
            if mode == "retrieval":
                retrieved = torch.full((B, n_chunks, k, 2 * m), -1, dtype=torch.long)
                mask = torch.zeros((B, n_chunks, k, 2 * m), dtype=torch.bool)
                for i, w in enumerate(batch):
                    for j in range(w.length // m):
                        r = chunk_of[(w.doc, w.start + j * m)]
                        retrieved[i, j], mask[i, j] = n_tok[r], n_mask[r]
            logits, _ = model(inp, retrieved, mask)
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                tgt.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view(B, L)
            for i, w in enumerate(batch):
                nll[mode][b0 + i] = loss[i, : w.length].double().numpy()
        progress("evaluate", b0 + B, len(windows))
    model_seconds = time.perf_counter() - t_model

    # Totals and per document.
    n_docs = len(documents)
    doc_nll = {mode: np.zeros(n_docs) for mode in modes}
    doc_bytes = np.zeros(n_docs, dtype=np.int64)
    doc_tokens = np.zeros(n_docs, dtype=np.int64)
    for wi, w in enumerate(windows):
        targets = toks[w.doc][w.start + 1 : w.start + 1 + w.length]
        doc_bytes[w.doc] += int(nbytes_of[targets].sum())
        doc_tokens[w.doc] += w.length
        for mode in modes:
            doc_nll[mode][w.doc] += nll[mode][wi].sum()

    def bpb(n: float, nbytes: float) -> float | None:
        return float(n / LN2 / nbytes) if nbytes > 0 else None

    total_bytes = int(doc_bytes.sum())
    result: dict[str, Any] = {
        "documents": n_docs,
        "windows": len(windows),
        "tokens": int(doc_tokens.sum()),
        "bytes": total_bytes,
        "seq_len": L,
        "chunk_size": m,
        "k": k,
        "exclude_self": exclude_self,
        "max_tokens_per_document": max_tokens,
        "db": str(db.path),
        "generation": db.generation,
        "bpb": {mode: bpb(doc_nll[mode].sum(), total_bytes) for mode in modes},
    }

    # bpb(alpha): window chunks j >= 1, overlap with the neighbours of chunk j-1.
    if retrieval:
        c_nll: dict[str, list[float]] = {mode: [] for mode in modes}
        c_bytes, c_rows, c_tokens = [], [], []
        for wi, w in enumerate(windows):
            for j in range(1, w.length // m + 1):
                lo, hi = j * m - 1, min((j + 1) * m - 1, w.length)  # input positions
                if lo >= hi:
                    continue
                targets = toks[w.doc][w.start + 1 + lo : w.start + 1 + hi]
                c_tokens.append(np.pad(targets, (0, m - targets.size), constant_values=-2))
                c_rows.append(chunk_of[(w.doc, w.start + (j - 1) * m)])
                c_bytes.append(int(nbytes_of[targets].sum()))
                for mode in modes:
                    c_nll[mode].append(float(nll[mode][wi][lo:hi].sum()))
        ctoks = np.stack(c_tokens) if c_tokens else np.zeros((0, m), np.int64)
        lens = (ctoks >= 0).sum(axis=1)
        neigh = np.where(got.mask, got.tokens, -1)[np.asarray(c_rows, dtype=np.int64)]
        overlap = longest_common_run(ctoks, neigh) / np.maximum(lens, 1)  # (C,)
        cb = np.asarray(c_bytes, dtype=np.float64)
        table: dict[str, Any] = {"alpha": list(ALPHAS), "chunks": [], "fraction": []}
        for mode in modes:
            table[mode] = []
        for alpha in ALPHAS:
            sel = overlap <= alpha / 100.0 + 1e-9
            table["chunks"].append(int(sel.sum()))
            table["fraction"].append(float(sel.mean()) if sel.size else 0.0)
            for mode in modes:
                table[mode].append(bpb(np.asarray(c_nll[mode])[sel].sum(), cb[sel].sum()))
        table["mean_overlap"] = float(overlap.mean()) if overlap.size else 0.0
        table["overlap_histogram"] = {
            f"<={a:g}%": int((overlap <= a / 100.0 + 1e-9).sum()) for a in ALPHAS
        }
        result["bpb_alpha"] = table

    result["per_document"] = [
        {
            "id": ids[d],
            "tokens": int(doc_tokens[d]),
            "bytes": int(doc_bytes[d]),
            **{f"bpb_{mode}": bpb(doc_nll[mode][d], doc_bytes[d]) for mode in modes},
        }
        for d in range(n_docs)
    ]
    result["seconds"] = {
        "total": time.perf_counter() - t_start,
        "retrieval": retriever.seconds,
        "model": model_seconds,
    }
    return result


def plot_alpha(result: dict[str, Any], path: str | Path, *, title: str = "") -> Path | None:
    """A PNG of bpb(alpha) with retrieval on and off (matplotlib, Agg); None without alpha."""
    table = result.get("bpb_alpha")
    if not table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("retrieval", "o-"), ("no_retrieval", "s--")):
        ys = table.get(mode)
        if ys:
            ax.plot(table["alpha"], ys, style, label=mode.replace("_", " "))
    for a, y, f in zip(table["alpha"], table.get("retrieval", []), table["fraction"], strict=False):
        if y is not None:
            ax.annotate(
                f"{100 * f:.0f}%",
                (a, y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
            )
    ax.set_xlabel("max overlap with neighbours, alpha (% of chunk)")
    ax.set_ylabel("bits per byte")
    ax.set_xticks(table["alpha"])
    ax.set_title(title or "bpb of chunks with overlap <= alpha (labels: share of chunks)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


ProgressCallback = Callable[[str, int, int], None]

__all__ = [
    "ALPHAS",
    "evaluate",
    "longest_common_run",
    "plot_alpha",
    "read_documents",
    "token_byte_lengths",
]
