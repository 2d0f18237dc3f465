"""What a query costs as segments multiply: the fan-out over S segments, and when to compact.

    .venv/bin/python benchmarks/bench_segments.py [--n 32768] [--segments 1,2,4,8,16,32,64]

The same N vectors (d = 384, clustered like sentence embeddings, unit length) are cut into
S equal segments, each with its own HNSW index (f16, connectivity 16, the database's
defaults) built, saved, memory-mapped and searched as the database does
(``retrodb.index.build_index``, ``SegmentIndex.open``, ``search_segments``). For each S it
prints the single-query latency p50 / p99 (k = 10) and recall@10 against exact search; then,
with segments of a fixed size, how latency grows with S alone (the cost of leaving many
small segments uncompacted). No encoder runs: the figures are the search layer's.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import arg_parser, machine, percentiles

from retrodb.config import IndexConfig
from retrodb.index import SegmentIndex, build_index
from retrodb.search import search_segments


def clustered(n: int, dim: int, *, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random centres (float32 [n, dim])."""
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + rng.normal(scale=0.6, size=(n, dim)).astype(
        np.float32
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(
    root: Path, vectors: np.ndarray, segments: int, config: IndexConfig
) -> tuple[list[SegmentIndex], float, int]:
    """``segments`` equal indexes over ``vectors``, keys 0..n-1 in order; build seconds and
    the bytes of the index files."""
    n, dim = vectors.shape
    bounds = np.linspace(0, n, segments + 1).astype(int)
    out = []
    t = time.perf_counter()
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        path = root / f"s{segments}-{i}.usearch"
        guard = build_index(path, np.arange(a, b, dtype=np.int64), vectors[a:b], config=config)
        out.append(
            SegmentIndex.open(
                path,
                first_key=int(a),
                count=int(b - a),
                ndim=dim,
                expected_size=None,
                config=config,
                guard=guard,
            )
        )
    seconds = time.perf_counter() - t
    return out, seconds, sum(ix.path.stat().st_size for ix in out)


def measure(
    indexes: list[SegmentIndex], queries: np.ndarray, exact: np.ndarray, k: int
) -> tuple[list[float], list[float], float]:
    """Wall and CPU seconds of each one-query search over ``indexes``, and recall@k."""
    search_segments(indexes, queries[:10], k)  # warm up the maps
    wall, cpu = [], []
    for row in queries:
        t, c = time.perf_counter(), time.process_time()
        search_segments(indexes, row[None, :], k)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
    got, _ = search_segments(indexes, queries, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact, strict=True)])
    return wall, cpu, float(recall)


def rounds(
    configs: dict[str, list[SegmentIndex]],
    queries: np.ndarray,
    exact: dict[str, np.ndarray],
    k: int,
    repeat: int,
) -> dict[str, tuple[float, float, float, float]]:
    """Per configuration: (wall p50 ms, wall p99 ms, CPU p50 ms, recall), the configurations
    measured in turn ``repeat`` times (so that load from other processes hits all alike) and
    each figure the median over the rounds."""
    per: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in configs}
    for _ in range(repeat):
        for name, indexes in configs.items():
            wall, cpu, recall = measure(indexes, queries, exact[name], k)
            w50, w99 = percentiles(wall)
            c50, _ = percentiles(cpu)
            per[name].append((w50, w99, c50, recall))
    return {
        name: tuple(float(np.median([r[i] for r in runs])) for i in range(4))  # type: ignore[misc]
        for name, runs in per.items()
    }


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--segments", default="1,2,4,8,16,32,64")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sweep = [int(s) for s in args.segments.split(",")]
    config = IndexConfig()
    rng = np.random.default_rng(0)
    vectors = clustered(args.n, args.dim, clusters=max(16, args.n // 128), rng=rng)
    picks = rng.choice(args.n, size=args.queries, replace=False)
    queries = vectors[picks] + rng.normal(scale=0.03, size=(args.queries, args.dim)).astype(
        np.float32
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, : args.k]
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.2f} at the start")
    print(
        f"{args.n:,} vectors of d = {args.dim} ({config.dtype}, connectivity "
        f"{config.connectivity}, expansion_search {config.expansion_search}); "
        f"{args.queries} single queries, k = {args.k}"
    )
    built: dict[int, list[SegmentIndex]] = {}
    with tempfile.TemporaryDirectory() as td:
        build_s, nbytes = {}, {}
        for s in sweep:
            built[s], build_s[s], nbytes[s] = build(Path(td), vectors, s, config)
        configs = {f"split {s}": built[s] for s in sweep}
        exact_of = {name: exact for name in configs}
        fixed = max((s for s in sweep if args.n // s >= 2048), default=sweep[0])
        size = args.n // fixed
        for s in (1, 2, 4, 8, 16, 32, 64):
            if s <= fixed:
                configs[f"grow {s}"] = built[fixed][:s]
                inside = np.argsort(-(queries @ vectors[: s * size].T), axis=1)[:, : args.k]
                exact_of[f"grow {s}"] = inside
        res = rounds(configs, queries, exact_of, args.k, args.rounds)
    print(f"\nthe same vectors in S segments (median of {args.rounds} interleaved rounds):")
    print(
        "   S  segment size  build s  file B/vector  wall p50 ms  wall p99 ms  CPU p50 ms  "
        "recall@10"
    )
    for s in sweep:
        w50, w99, c50, recall = res[f"split {s}"]
        print(
            f"{s:4d}  {args.n // s:12,d}  {build_s[s]:7.1f}  {nbytes[s] / args.n:13.0f}  "
            f"{w50:11.3f}  {w99:11.3f}  {c50:10.3f}  {recall:9.3f}"
        )
    print(f"\nsegments of {size:,} vectors each, S of them searched (a growing database):")
    print("   S  vectors  wall p50 ms  wall p99 ms  CPU p50 ms")
    for s in (1, 2, 4, 8, 16, 32, 64):
        if f"grow {s}" in res:
            w50, w99, c50, _ = res[f"grow {s}"]
            print(f"{s:4d}  {s * size:7,d}  {w50:11.3f}  {w99:11.3f}  {c50:10.3f}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
