"""Where shuffled neighbours help: off - shuffled per target token, grouped by the longest
common run that the token's text (ending at the token) shares with the shuffled neighbours
it attends to, as the copy bias counts it (`copy_runs`, capped at 16). A gain at run 0 or
1 comes from neighbours the text is not following: the domain's style, not copying.

    .venv/bin/python scripts/research/shuffled_gain_by_run.py CKPT DB DOCS \
        [--max-tokens 1024] [--min-overlap 0.25] [--min-run 0] [--exclude-self]

(docs/results-retrofit.md: the 0.8 RETRO-fit on the new documents after the add.)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from retrodb.db import RetroDB
from retrodb_model import evaluate as ev
from retrodb_model.checkpoint import load_model
from retrodb_model.config import COPY_RUN_MAX
from retrodb_model.gate import copy_runs
from retrodb_model.retrieve import LiveRetriever

BUCKETS = ((0, 0), (1, 1), (2, 3), (4, 7), (8, COPY_RUN_MAX))


def runs_at(text: np.ndarray, positions: np.ndarray, neighbours: np.ndarray, r: int) -> np.ndarray:
    """For each position p, the longest run of the text ending at p that a key of its
    neighbours (P, k*r) continues, as the copy bias counts it (`copy_runs`)."""
    back = positions[:, None] - np.arange(COPY_RUN_MAX)[None, :]  # (P, R): p, p-1, ...
    hist = np.where(back >= 0, text[np.maximum(back, 0)], -1)
    run = copy_runs(
        torch.from_numpy(hist)[:, None, None, :], torch.from_numpy(neighbours)[:, None, :], r
    )  # (P, 1, 1, k*r)
    return run.amax(dim=-1).flatten().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("db")
    ap.add_argument("docs")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--min-overlap", type=float, default=0.25)
    ap.add_argument("--min-run", type=int, default=0)
    ap.add_argument("--exclude-self", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    db = RetroDB(a.db)
    model, ckpt = load_model(a.checkpoint, db=db)
    model.set_null_boost(0.0)
    model.set_min_run(a.min_run)
    m, L = model.cfg.chunk_size, int(ckpt.train_args.get("seq_len", model.cfg.max_seq_len))
    docs = ev.read_documents([a.docs])
    assert db.tokenizer is not None
    toks = [
        np.asarray(t, np.int64)[: a.max_tokens + 1]
        for t in db.tokenizer.encode([t for _, t in docs])
    ]
    windows = ev._windows(toks, L)
    retriever = LiveRetriever(db, model.cfg.num_neighbours, min_overlap=a.min_overlap)
    own = [retriever.doc_number(d) for d, _ in docs] if a.exclude_self else None
    got = ev._retrieve(retriever, windows, toks, own, m, ev.no_progress)
    with torch.no_grad():
        nll = ev._score(model, windows, toks, got, L=L, pad=db.pad_id, batch_size=4,
                        progress=ev.no_progress)  # fmt: skip
    neighbours = got.tokens.numpy()
    gain = np.zeros(len(BUCKETS))
    count = np.zeros(len(BUCKETS), dtype=np.int64)
    for wi, w in enumerate(windows):
        text = toks[w.doc][w.start : w.start + w.length + 1]
        positions = np.arange(m - 1, w.length)  # token p attends to chunk (p + 1) // m - 1
        if not len(positions):
            continue
        rows = [got.rows[(w.doc, w.start + (int(p) + 1) // m * m - m)] for p in positions]
        shuffled = neighbours[got.shuffle[rows]].reshape(len(rows), -1)
        runs = runs_at(text, positions, shuffled, neighbours.shape[-1])
        for b, (lo, hi) in enumerate(BUCKETS):
            at = positions[(runs >= lo) & (runs <= hi)]
            count[b] += len(at)
            gain[b] += (nll["no_retrieval"][wi][at] - nll["shuffled"][wi][at]).sum()
    total_bytes = sum(int(ev.token_byte_lengths(db.tokenizer)[t[1:]].sum()) for t in toks)
    print(f"{'run':>6} {'tokens':>7} {'off - shuffled (nats)':>22} {'share':>6}")
    for (lo, hi), c, g in zip(BUCKETS, count, gain, strict=True):
        print(f"{f'{lo}-{hi}' if hi > lo else lo:>6} {c:>7} {g:>22.1f} {g / gain.sum():>6.1%}")
    print(f"off - shuffled over these tokens: {gain.sum() / np.log(2) / total_bytes:.4f} bpb")


if __name__ == "__main__":
    main()
