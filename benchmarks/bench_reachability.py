"""Keys that no search reaches, before and after the side-list repair, and what it costs.

    .venv/bin/python benchmarks/bench_reachability.py DB [--builds 3]

For each segment of the database: (1) the committed index as it is: keys a search for their
own stored vector does not return (``SegmentIndex.unreachable``, what ``retrodb verify``
runs), and its side list if it has one; (2) ``--builds`` fresh indexes of the same stored
vectors (read back from the segment index, added in batches of 4096 with USearch's default
threads, as ``build`` and ``compact`` do), each saved without and with the repair: keys the
graph alone loses, the side list the repair writes, keys still unreachable through
``SegmentIndex.search`` after it, and the seconds the check costs (also per 10k chunks);
(3) single-query search latency (k = 10) of the repaired index against the unrepaired one,
interleaved query by query.
USearch's concurrent adds are not deterministic, so the counts vary from build to build.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import arg_parser, machine, percentiles

from retrodb import RetroDB
from retrodb.index import IndexBuilder, SegmentIndex


def _open(path: Path, keys: np.ndarray, ndim: int, db: RetroDB) -> SegmentIndex:
    return SegmentIndex.open(
        path,
        first_key=int(keys[0]),
        count=keys.size,
        ndim=ndim,
        expected_size=path.stat().st_size,
        config=db.config.index,
    )


def _latency(a: SegmentIndex, b: SegmentIndex, queries: np.ndarray, k: int) -> list[float]:
    """p50/p99 (ms) of one-query searches of ``a`` and of ``b``, interleaved query by query
    so that the machine's load drifts the same way for both."""
    a.search(queries[:20], k)  # warm up
    b.search(queries[:20], k)
    lat: tuple[list[float], list[float]] = ([], [])
    for q in queries:
        for i, seg in enumerate((a, b)):
            t0 = time.perf_counter()
            seg.search(q[None, :], k)
            lat[i].append(time.perf_counter() - t0)
    return [*percentiles(lat[0]), *percentiles(lat[1])]


def main() -> None:
    ap = arg_parser(__doc__, db=True)
    ap.add_argument("--builds", type=int, default=3, help="fresh builds per segment")
    ap.add_argument("--queries", type=int, default=500, help="for the latency comparison")
    args = ap.parse_args()

    db = RetroDB.open(args.db)
    cfg = db.config.index
    print(f"# {machine()}; load average at start {os.getloadavg()[0]:.2f}")
    print(
        f"# {args.db}: {db.manifest.chunks} chunks in {len(db.indexes)} segment(s); "
        f"connectivity {cfg.connectivity}, expansion_add {cfg.expansion_add}, "
        f"expansion_search {cfg.expansion_search}, {cfg.dtype}, {cfg.metric}"
    )
    rng = np.random.default_rng(0)
    for si, ix in enumerate(db.indexes):
        keys = np.sort(np.asarray(ix.index.keys, dtype=np.uint64)).astype(np.int64)
        n = keys.size
        t0 = time.perf_counter()
        lost = ix.unreachable()
        t_check = time.perf_counter() - t0
        print(
            f"segment {si} ({n} chunks), committed index: {lost.size} unreachable "
            f"{lost[:10].tolist()}; side list {ix.side_keys.size}; "
            f"check {t_check:.2f} s ({t_check / n * 1e4:.2f} s per 10k)"
        )
        vectors = ix.vectors(keys)
        queries = vectors[rng.choice(n, size=min(args.queries, n), replace=False)]
        queries += rng.normal(scale=0.02, size=queries.shape).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            for b in range(args.builds):
                segs = {}
                for repair in (False, True):
                    builder = IndexBuilder(vectors.shape[1], cfg, repair=repair)
                    t0 = time.perf_counter()
                    for start in range(0, n, 4096):
                        builder.add(keys[start : start + 4096], vectors[start : start + 4096])
                    t_add = time.perf_counter() - t0
                    path = Path(tmp) / f"{b}-{repair}.usearch"
                    builder.save(path)
                    seg = _open(path, keys, vectors.shape[1], db)
                    t0 = time.perf_counter()
                    left = seg.unreachable()
                    t_verify = time.perf_counter() - t0
                    segs[repair] = seg
                    if not repair:
                        print(
                            f"  build {b}: add {t_add:.2f} s; without repair "
                            f"{left.size} unreachable {left[:10].tolist()} "
                            f"(verify check {t_verify:.2f} s)"
                        )
                    else:
                        print(
                            f"  build {b}: with repair: side list {builder.side_keys.size} "
                            f"{builder.side_keys[:10].tolist()}, {left.size} unreachable after; "
                            f"check at save {builder.check_seconds:.2f} s "
                            f"({builder.check_seconds / n * 1e4:.2f} s per 10k chunks, "
                            f"{builder.check_seconds / t_add * 100:.0f}% of the add time)"
                        )
                if b == 0:
                    p50_plain, p99_plain, p50_fixed, p99_fixed = _latency(
                        segs[False], segs[True], queries, 10
                    )
                    print(
                        f"  search k=10, one query: unrepaired p50 {p50_plain:.3f} ms "
                        f"p99 {p99_plain:.3f} ms; repaired (side list "
                        f"{segs[True].side_keys.size}) p50 {p50_fixed:.3f} ms "
                        f"p99 {p99_fixed:.3f} ms"
                    )
                del segs
    print(f"# load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
