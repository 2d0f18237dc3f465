"""Query latency and index recall on a real database.

    .venv/bin/python benchmarks/bench_query.py DB [--queries 1000]

Prints search-only latency (a single query vector, k = 10) and end-to-end latency (text ->
tokenize -> encode -> search) as p50/p99, and recall@10 of the HNSW indexes against exact
search over the same stored vectors. Queries are chunks of the database's own documents
perturbed slightly (so they are not exact copies) plus chunk texts used verbatim for the
end-to-end path. Targets: recall@10 >= 0.98; search-only p50 under 1 ms at ~50k chunks.
Build a database first, e.g. `retrodb build pydocs.retrodb data/pydocs/.../_sources`.
"""

from __future__ import annotations

import time

import numpy as np
from common import arg_parser, machine, percentiles

from retrodb import RetroDB
from retrodb.search import search_segments


def main() -> None:
    ap = arg_parser(__doc__, db=True)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--text-queries", type=int, default=200)
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()

    db = RetroDB.open(args.db)
    n = db.manifest.chunks
    rng = np.random.default_rng(0)
    keys = rng.choice(n, size=min(args.queries, n), replace=False)

    # All stored vectors (as the index holds them) for exact search.
    stored = np.concatenate(
        [ix.vectors(np.arange(ix.first_key, ix.first_key + ix.size)) for ix in db.indexes]
    )
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    q = stored[keys] + rng.normal(scale=0.02, size=(len(keys), stored.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)

    # Search-only latency, one query at a time.
    db.search_vectors(q[:10], args.k)  # warm up
    lat = []
    for row in q:
        t0 = time.perf_counter()
        search_segments(db.indexes, row[None, :], args.k)
        lat.append(time.perf_counter() - t0)
    s50, s99 = percentiles(lat)
    got, _ = search_segments(db.indexes, q, args.k)

    exact = np.argsort(-(q @ stored.T), axis=1)[:, : args.k]  # keys are 0..n-1 in order
    recall = np.mean(
        [len(set(a) & set(b)) / args.k for a, b in zip(got.tolist(), exact.tolist(), strict=True)]
    )

    # End to end: text in, neighbours out.
    tkeys = rng.choice(n, size=min(args.text_queries, n), replace=False)
    texts = db.decode(tkeys)
    db.search(texts[:2], k=args.k)  # warm up the encoder
    lat_e2e = []
    self_hits = 0
    for key, t in zip(tkeys, texts, strict=True):
        t0 = time.perf_counter()
        res = db.search([t], k=args.k)
        lat_e2e.append(time.perf_counter() - t0)
        self_hits += int(res.keys[0, 0] == key)
    e50, e99 = percentiles(lat_e2e)
    print(f"machine: {machine()}")
    print(
        f"database: {args.db}: {n:,} chunks in {len(db.segments)} segment(s), dim {db.dim}, index {db.config.index.dtype}"
    )
    print(
        f"search only (k={args.k}, {len(keys)} queries): p50 {s50:.3f} ms, p99 {s99:.3f} ms  (target p50 < 1 ms)"
    )
    print(f"recall@{args.k} vs exact search over the same vectors: {recall:.4f}  (target >= 0.98)")
    print(
        f"end to end (tokenize + encode + search, {len(tkeys)} texts): p50 {e50:.2f} ms, p99 {e99:.2f} ms"
    )
    print(f"a chunk's own text finds itself first: {self_hits}/{len(tkeys)}")


if __name__ == "__main__":
    main()
