"""How the database's costs grow with its size, beside bare USearch and a plain memmap.

    .venv/bin/python benchmarks/bench_scale.py --chunks 1000000 [--json] [--keys clustered]
        [--workdir DIR] [--centres-db DB] [--skip ray]

One database of N chunks is made through the library's real write path
(``RetroDB.build`` with a :class:`~retrodb.ingest.SegmentEngine` that hands
``SegmentWriter`` synthetic token rows and given keys instead of encoding: segments, Zarr
arrays, HNSW index, reachability check, manifest, commit). The encoder never runs; it has
its own benchmarks. The build writes 10 segments (as a 10-worker Ray build would), so that
compaction has 10 segments to merge; everything after compaction reads one segment.

Keys. ``clustered`` (default): each key is a real all-MiniLM-L6-v2 key of the Python docs
(the stored keys of ``--centres-db``, a database built from ``library/``) moved by Gaussian
noise scaled so that its cosine distance to that centre is, in the median, the median
distance between a real key and its nearest other real key. So the synthetic keys fill the
real keys' neighbourhoods about as densely as a larger corpus of the same kind would.
``uniform``: random unit vectors, the worst case for HNSW. Documents have the Python docs'
chunk counts (the centre database's, resampled); token rows are random ids.

Measured at N, in this one run (every timing on the same machine, the same vectors):
  build       whole build; index chunks/s of the write path vs bare USearch ``add``
  compact     10 segments into 1, in a child process (time, peak RSS)
  open        ``RetroDB.open`` and the first query, in a fresh child; RssAnon after open
              and after 1,000 queries; bytes on disk per chunk
  search      one query at a time (k = 10), p50 / p99 over a second pass of the same 1,000
              queries (the first, right after open, is reported as ``search_p50_ms_cold``),
              vs bare USearch in memory; batched queries/s; recall@10 against exact search
              over the same vectors; the same with the indexes loaded into memory
              (``RetroDB.open(load_indexes=True)``) instead of mapped
  gather      ``retrieve`` of 2,048 random keys (chunk + continuation) vs a numpy.memmap
              gather of the same rows, as int64 (``retrieve``'s tokens) and raw
  add         a new segment of 1 % of N and of 10k chunks, in a child (time, peak RSS);
              the 10k add is also made to a fresh 10k-chunk database, for the ratio
  neighbours  a k = 2 set over every chunk, locally and with ``--engine ray --workers 2``
  verify      ``retrodb verify`` (checksums, arrays, reachability), in a child (time, peak RSS)

``--json`` prints one JSON object (the fields of docs/scale.md); else a table.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, arg_parser, machine

from retrodb import DBConfig, RetroDB
from retrodb.chunking import DocumentTable
from retrodb.config import IndexConfig
from retrodb.index import new_index
from retrodb.ingest import SegmentJob
from retrodb.segment import SegmentWriter
from retrodb.storage import ENCODER_DIR, TOKENIZER_FILE, SegmentMeta

QUERIES = 1000
GATHER = 2048
BUILD_SEGMENTS = 10
BLOCK = 65_536  # rows written and keys added per step


# ------------------------------------------------------------------ memory


def status_mb(field: str) -> float:
    """A field of /proc/self/status (``RssAnon``, ``VmHWM``) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_child(fn: Any, *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a fresh (spawned) process; its dict, plus the child's peak RSS."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return dict(pool.apply(_measured, (fn, *args)))


def _measured(fn: Any, *args: Any) -> dict[str, Any]:
    out = fn(*args)
    out["peak_rss_mb"] = status_mb("VmHWM")
    return out


# ------------------------------------------------------------------ keys and documents


@dataclass(frozen=True)
class KeySource:
    """Deterministic synthetic keys: row ``i`` of a stream is the same vector every run."""

    kind: str
    dim: int
    centres: np.ndarray | None  # float32 [c, d], unit length (clustered only)
    sigma: float

    def block(self, stream: int, start: int, n: int) -> np.ndarray:
        """Vectors ``start .. start+n-1`` of ``stream`` (0: the database, 1: additions,
        2: queries) as float32 unit vectors."""
        rng = np.random.default_rng([stream, start])
        if self.kind == "uniform" or self.centres is None:
            x = rng.standard_normal((n, self.dim), dtype=np.float32)
        else:
            c = self.centres[rng.integers(0, self.centres.shape[0], n)]
            noise = rng.standard_normal((n, self.dim), dtype=np.float32)
            x = c + noise * (self.sigma / np.sqrt(self.dim))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def many(self, stream: int, start: int, n: int) -> np.ndarray:
        """Vectors ``start .. start+n-1``: made in blocks aligned to ``BLOCK``, so that a
        vector does not depend on which range asked for it."""
        if n <= 0:
            return np.zeros((0, self.dim), np.float32)
        first, last = start // BLOCK, (start + n - 1) // BLOCK
        x = np.concatenate([self.block(stream, b * BLOCK, BLOCK) for b in range(first, last + 1)])
        return x[start - first * BLOCK : start - first * BLOCK + n]


def centre_keys(db: RetroDB) -> tuple[np.ndarray, np.ndarray]:
    """The distinct stored keys of ``db`` (float32, unit length) and its documents' chunk
    counts."""
    vecs, counts = [], []
    for seg, idx in zip(db.segments, db.indexes, strict=True):
        vecs.append(idx.vectors(seg.row_keys(np.arange(seg.meta.chunks))))
        counts.append(np.asarray(seg.num_chunks))
    v = np.concatenate(vecs)
    v = np.unique(v, axis=0)  # a repeated passage is one centre, not a zero spread
    return v / np.linalg.norm(v, axis=1, keepdims=True), np.concatenate(counts)


def spread(centres: np.ndarray, *, sample: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The median cosine distance from a real key to its nearest other key, and the noise
    scale ``sigma`` that puts a synthetic key that far from its centre in the median."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(centres.shape[0], min(sample, centres.shape[0]), replace=False)
    sims = centres[pick] @ centres.T
    sims[np.arange(pick.size), pick] = -np.inf
    nn = 1 - sims.max(axis=1)
    target = float(np.median(nn))
    # |c + n|: with n ~ N(0, sigma^2 / d) per coordinate, cos(c, c + n) ~ 1 / sqrt(1 + sigma^2)
    sigma = float(np.sqrt(max(1 / (1 - target) ** 2 - 1, 0.0)))
    return target, sigma


def doc_plan(counts: np.ndarray, chunks: int, seed: int) -> np.ndarray:
    """Document chunk counts resampled from ``counts`` until they hold ``chunks`` chunks."""
    rng = np.random.default_rng(seed)
    counts = counts[counts > 0]
    out: list[int] = []
    total = 0
    while total < chunks:
        c = int(min(counts[rng.integers(0, counts.size)], chunks - total))
        out.append(c)
        total += c
    return np.asarray(out, dtype=np.int64)


def write_jsonl(path: Path, n_docs: int, prefix: str) -> None:
    """The corpus the build scans: one short document per line (the engine writes its rows)."""
    with path.open("w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": f"{prefix}{i:08d}", "text": f"document {prefix}{i}"}) + "\n")


@dataclass
class GivenKeys:
    """A :class:`~retrodb.ingest.SegmentEngine` that writes the job's documents, with the
    chunk counts of ``plan``, as ``segments`` sealed segments of random token rows whose
    keys are ``keys.many(stream, first, n)``; ``add_s`` is what adding the keys took."""

    keys: KeySource
    plan: np.ndarray
    stream: int
    segments: int = 1
    offset: int = 0  # where in the stream the job's first chunk takes its key
    add_s: float = 0.0

    def write_segments(self, job: SegmentJob) -> tuple[SegmentMeta, ...]:
        ids = job.corpus.ids
        assert len(ids) == self.plan.size, (len(ids), self.plan.size)
        bounds = np.linspace(0, len(ids), self.segments + 1).astype(int)
        metas, key = [], job.first_key
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            metas.append(self._segment(job, ids[a:b], self.plan[a:b], key, key - job.first_key))
            key += int(self.plan[a:b].sum())
        return tuple(metas)

    def _segment(
        self, job: SegmentJob, ids: list[str], counts: np.ndarray, first_key: int, offset: int
    ) -> SegmentMeta:
        m = job.config.chunk.chunk_size
        w = SegmentWriter(
            job.storage,
            generation=job.generation,
            chunk_size=m,
            token_dtype=job.tokenizer.token_dtype,
            dim=self.keys.dim,
            index=job.config.index,
        )
        n = int(counts.sum())
        rng = np.random.default_rng([self.stream, first_key])
        doc = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
        last = np.cumsum(counts) - 1
        lengths = np.full(n, m, np.int32)
        lengths[last] = rng.integers(1, m + 1, last.size)
        for a in range(0, n, BLOCK):
            b = min(n, a + BLOCK)
            tokens = rng.integers(3, job.tokenizer.vocab_size, (b - a, m)).astype(
                job.tokenizer.token_dtype
            )
            tokens[np.arange(m)[None, :] >= lengths[a:b, None]] = job.tokenizer.pad_id
            w.append_rows(tokens, lengths[a:b], doc[a:b])
        w.close_rows()
        for a in range(0, n, BLOCK):
            b = min(n, a + BLOCK)
            vecs = self.keys.many(self.stream, self.offset + offset + a, b - a)
            t0 = time.perf_counter()
            w.add_vectors(np.arange(first_key + a, first_key + b), vecs)
            self.add_s += time.perf_counter() - t0
            job.progress("index", b, n)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        tokens_per_doc = (counts - 1) * m + lengths[last]
        table = DocumentTable(first, counts.astype(np.int32), tokens_per_doc.astype(np.int64))
        return w.seal(ids, table, first_key=first_key)


# ------------------------------------------------------------------ the steps


@dataclass(frozen=True)
class Setup:
    workdir: Path
    centres_db: Path
    keys: KeySource
    counts: np.ndarray  # the centre database's chunks per document
    config: DBConfig  # the defaults, with the centre database's encoder settings

    def build(self, path: Path, chunks: int, *, segments: int, seed: int) -> tuple[RetroDB, float]:
        """A database of ``chunks`` chunks at ``path``; returns it and its index add time."""
        plan = doc_plan(self.counts, chunks, seed)
        corpus = path.with_suffix(".jsonl")
        write_jsonl(corpus, plan.size, f"d{seed}-")
        shutil.rmtree(path, ignore_errors=True)
        engine = GivenKeys(self.keys, plan, stream=0, segments=segments)
        db = RetroDB.build(
            path,
            [corpus],
            config=self.config,
            tokenizer=self.centres_db / TOKENIZER_FILE,
            encoder=self.centres_db / ENCODER_DIR,
            engine=engine,
            threads=1,
        )
        return db, engine.add_s


def add_step(setup: Setup, path: str, chunks: int, seed: int) -> dict[str, Any]:
    """Add ``chunks`` chunks (new documents, stream 1) as one segment; in a child."""
    plan = doc_plan(setup.counts, chunks, seed)
    corpus = setup.workdir / f"add-{seed}-{chunks}.jsonl"
    write_jsonl(corpus, plan.size, f"a{seed}-")
    db = RetroDB.open(path, threads=1)
    t0 = time.perf_counter()
    db.add([corpus], engine=GivenKeys(setup.keys, plan, stream=1, offset=seed * 10_000_000))
    return {"s": time.perf_counter() - t0}


def compact_step(path: str) -> dict[str, Any]:
    db = RetroDB.open(path, threads=1)
    t0 = time.perf_counter()
    db.compact()
    return {"s": time.perf_counter() - t0, "segments": len(db.segments)}


def verify_step(path: str) -> dict[str, Any]:
    db = RetroDB.open(path, threads=1)
    t0 = time.perf_counter()
    report = db.verify()
    return {"s": time.perf_counter() - t0, "ok": report.ok}


def read_step(path: str, queries_file: str, threads: int) -> dict[str, Any]:
    """Open, first query, RssAnon, single-query latency, batched throughput, gather; in a
    fresh child so that nothing the parent mapped counts."""
    queries = np.load(queries_file)
    t0 = time.perf_counter()
    db = RetroDB.open(path, threads=threads)
    open_s = time.perf_counter() - t0
    rss_open = status_mb("RssAnon")
    t0 = time.perf_counter()
    db.search_vectors(queries[:1], 10)
    first_s = time.perf_counter() - t0
    cold = one_at_a_time(db, queries)[0]  # right after open: pages fault in
    rss_queries = status_mb("RssAnon")
    lat, found = one_at_a_time(db, queries)  # the same queries again, warm
    t0 = time.perf_counter()
    db.search_vectors(queries, 10)
    batch_qps = len(queries) / (time.perf_counter() - t0)
    gather, memmap, raw = gather_times(db)
    ms = np.asarray(lat) * 1000
    # The same searches with the indexes read into memory (RetroDB.open(load_indexes=True)).
    del db
    loaded = RetroDB.open(path, threads=threads, load_indexes=True)
    t0 = time.perf_counter()
    loaded.search_vectors(queries[:1], 10)
    load_s = time.perf_counter() - t0
    one_at_a_time(loaded, queries)
    lat_loaded = np.asarray(one_at_a_time(loaded, queries)[0]) * 1000
    ours, bare = same_index(loaded, queries)
    t0 = time.perf_counter()
    loaded.search_vectors(queries, 10)
    batch_qps_loaded = len(queries) / (time.perf_counter() - t0)
    return {
        "load_indexes_s": load_s,
        "search_p50_ms_loaded": float(np.percentile(lat_loaded, 50)),
        "search_p99_ms_loaded": float(np.percentile(lat_loaded, 99)),
        # retrodb's search and a bare Index.search of the same in-memory USearch object,
        # in alternate passes: the overhead of retrodb alone, on the same graph
        "search_p50_ms_same_index": float(np.percentile(ours, 50)),
        "search_p50_ms_usearch_same_index": float(np.percentile(bare, 50)),
        "batch_qps_loaded": batch_qps_loaded,
        "rss_anon_loaded_mb": status_mb("RssAnon"),
        "search_p50_ms_cold": float(np.percentile(np.asarray(cold) * 1000, 50)),
        "open_s": open_s,
        "first_query_s": first_s,
        "rss_anon_open_mb": rss_open,
        "rss_anon_queries_mb": rss_queries,
        "search_p50_ms": float(np.percentile(ms, 50)),
        "search_p99_ms": float(np.percentile(ms, 99)),
        "batch_qps": batch_qps,
        "gather_ms": gather * 1000,
        "gather_memmap_ms": memmap * 1000,
        "gather_memmap_raw_ms": raw * 1000,
        "found": np.asarray(found).tolist(),
    }


def one_at_a_time(db: RetroDB, queries: np.ndarray) -> tuple[list[float], list[np.ndarray]]:
    """Seconds of each single-query search (k = 10) and its keys."""
    lat, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        res = db.search_vectors(q[None], 10)
        lat.append(time.perf_counter() - t0)
        found.append(res.keys[0])
    return lat, found


def same_index(db: RetroDB, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds of ``db.search_vectors`` (k = 10) and of a bare ``Index.search`` on the
    database's own (single) USearch index: alternate whole passes over the queries (ours,
    bare, ours, bare), the second pass of each kept, so neither finds the other's path in
    the caches more than the other does."""
    index = db.indexes[0].index
    passes: list[list[float]] = [[], [], [], []]
    for p in range(4):
        for q in queries:
            t0 = time.perf_counter()
            if p % 2 == 0:
                db.search_vectors(q[None], 10)
            else:
                index.search(q, 10)
            passes[p].append(time.perf_counter() - t0)
    return np.asarray(passes[2]) * 1000, np.asarray(passes[3]) * 1000


def gather_times(db: RetroDB, repeats: int = 15) -> tuple[float, float, float]:
    """Median seconds to ``retrieve`` 2,048 random keys (chunk + continuation: int64 tokens
    and masks), and to gather the same rows and their next rows from a plain numpy.memmap of
    the tokens file in one fancy index: as int64 (the same tokens ``retrieve`` returns) and
    in the stored dtype (the raw gather, no conversion).

    Whichever gather runs first on fresh keys pays their page faults and leaves the pages
    mapped for the others, so every repeat first touches its keys with both (untimed) and
    then times the three in an order that rotates from repeat to repeat: the figures compare
    the work each does on resident pages, not who came first."""
    seg = db.segments[0]
    n = seg.meta.chunks
    chunk_file = next(
        p for p in (seg.dir / "tokens").rglob("*") if p.is_file() and p.name != "zarr.json"
    )
    mm = np.memmap(chunk_file, dtype=seg.token_dtype, mode="r", shape=(n, db.chunk_size))
    rng = np.random.default_rng(5)
    times: list[list[float]] = [[], [], []]
    for rep in range(repeats):
        keys = np.sort(rng.integers(0, n - 1, GATHER))
        rows = keys - seg.meta.first_key if seg.key_array is None else seg.key_rows(keys)
        both = np.stack([rows, np.minimum(rows + 1, n - 1)], axis=1).reshape(-1)
        runs = [
            lambda keys=keys: db.retrieve(keys),
            lambda both=both: mm[both].astype(np.int64).reshape(-1, 2 * db.chunk_size),
            lambda both=both: mm[both].reshape(-1, 2 * db.chunk_size),
        ]
        runs[0]()
        runs[1]()
        for i in np.roll(np.arange(3), rep):
            t0 = time.perf_counter()
            runs[i]()
            times[i].append(time.perf_counter() - t0)
    ours, plain, raw = (float(np.median(t)) for t in times)
    return ours, plain, raw


def neighbours_step(path: str, engine: str) -> dict[str, Any]:
    from retrodb.neighbours import compute

    db = RetroDB.open(path, threads=1)
    eng = None
    if engine == "ray":
        from retrodb.ray_engine import RayEngine

        eng = RayEngine(workers=2)
    t0 = time.perf_counter()
    compute(db, f"bench-{engine}", k=2, engine=eng)
    s = time.perf_counter() - t0
    if engine == "ray":
        import ray

        ray.shutdown()
    return {"s": s}


def exact_top10(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact cosine top 10 of each query over ``vectors`` (unit length), in blocks."""
    best_d = np.full((queries.shape[0], 10), -np.inf, np.float32)
    best_k = np.zeros((queries.shape[0], 10), np.int64)
    for a in range(0, vectors.shape[0], 200_000):
        sims = queries @ vectors[a : a + 200_000].T
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        d = np.take_along_axis(sims, top, axis=1)
        alld = np.concatenate([best_d, d], axis=1)
        allk = np.concatenate([best_k, top + a], axis=1)
        order = np.argsort(-alld, axis=1)[:, :10]
        best_d = np.take_along_axis(alld, order, axis=1)
        best_k = np.take_along_axis(allk, order, axis=1)
    return best_k


def bare_usearch(vectors: np.ndarray, queries: np.ndarray, config: IndexConfig) -> dict[str, Any]:
    """Bare USearch with the database's settings on the same vectors: ``add`` into
    ``BUILD_SEGMENTS`` indexes (what the build makes) and into one (what compaction makes),
    chunks/s; one query at a time on the single index, p50 / p99 (k = 10); batched
    queries/s."""
    n = vectors.shape[0]
    bounds = np.linspace(0, n, BUILD_SEGMENTS + 1).astype(int)
    t0 = time.perf_counter()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        part = new_index(vectors.shape[1], config)
        part.add(np.arange(a, b, dtype=np.uint64), vectors[a:b])
        del part
    parts_s = time.perf_counter() - t0
    index = new_index(vectors.shape[1], config)
    t0 = time.perf_counter()
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        index.add(np.arange(a, b, dtype=np.uint64), vectors[a:b])
    single_s = time.perf_counter() - t0
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q, 10)
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    index.search(queries, 10)
    qps = len(queries) / (time.perf_counter() - t0)
    ms = np.asarray(lat) * 1000
    return {
        "index_rate_usearch": n / parts_s,
        "index_rate_usearch_single": n / single_s,
        "search_p50_ms_usearch": float(np.percentile(ms, 50)),
        "search_p99_ms_usearch": float(np.percentile(ms, 99)),
        "batch_qps_usearch": qps,
    }


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(
    setup: Setup, chunks: int, *, add_fixed: int, skip: set[str], threads: int, log: Any
) -> dict[str, Any]:
    wd = setup.workdir
    out: dict[str, Any] = {"chunks": chunks, "keys": setup.keys.kind, "machine": machine()}

    def neighbours(engine: str) -> None:
        if engine in skip or "neighbours" in skip:
            out[f"neighbours_rate_{engine}"] = None
            return
        log(f"neighbours ({engine})", out)
        res = in_child(neighbours_step, str(path), engine)
        out[f"neighbours_rate_{engine}"] = chunks / res["s"]

    path = wd / f"db-{chunks}"
    vectors = setup.keys.many(0, 0, chunks)
    queries = setup.keys.many(2, 0, QUERIES)
    qfile = wd / "queries.npy"
    np.save(qfile, queries)

    log(f"bare USearch on {chunks:,} vectors", out)
    out.update(bare_usearch(vectors, queries, IndexConfig()))

    log(f"build {chunks:,} chunks in {BUILD_SEGMENTS} segments", out)
    t0 = time.perf_counter()
    db, add_s = setup.build(path, chunks, segments=BUILD_SEGMENTS, seed=0)
    out["build_s"] = time.perf_counter() - t0
    out["index_rate"] = chunks / add_s
    del db
    # What grows with the database: the segments' files (the encoder and tokenizer are a
    # fixed cost, reported apart).
    seg_bytes = disk_bytes(path / "segments")
    out["disk_bytes_per_chunk"] = seg_bytes / chunks
    out["disk_fixed_mb"] = (disk_bytes(path) - seg_bytes) / 1e6

    log("compact", out)
    res = in_child(compact_step, str(path))
    out["compact_s"], out["compact_peak_rss_mb"] = res["s"], res["peak_rss_mb"]
    out["compact_rate"] = chunks / res["s"]

    log("open, search, gather (fresh process)", out)
    res = in_child(read_step, str(path), str(qfile), threads)
    found = np.asarray(res.pop("found"))
    res.pop("peak_rss_mb")
    out.update(res)
    truth = exact_top10(vectors, queries)
    out["recall_at_10"] = float(
        np.mean([np.isin(truth[i], found[i]).mean() for i in range(len(queries))])
    )
    out["gather_ratio_memmap"] = res["gather_ms"] / res["gather_memmap_ms"]
    out["gather_ratio_memmap_raw"] = res["gather_ms"] / res["gather_memmap_raw_ms"]
    del vectors

    log("verify", out)
    res = in_child(verify_step, str(path))
    out["verify_s"], out["verify_peak_rss_mb"], out["verify_ok"] = (
        res["s"],
        res["peak_rss_mb"],
        res["ok"],
    )

    neighbours("local")
    log(f"add 1 % and {add_fixed:,}", out)
    one_pct = max(1, chunks // 100)
    res = in_child(add_step, setup, str(path), one_pct, 1)
    out["add_1pct_s"] = res["s"]
    peak = res["peak_rss_mb"]
    res = in_child(add_step, setup, str(path), add_fixed, 2)
    out["add_10k_s"] = res["s"]
    out["add_peak_rss_mb"] = max(peak, res["peak_rss_mb"])

    log(f"the same add to a {add_fixed:,}-chunk database", out)
    small = wd / f"db-small-{add_fixed}"
    db, _ = setup.build(small, add_fixed, segments=1, seed=7)
    del db
    res = in_child(add_step, setup, str(small), add_fixed, 2)
    out["add_10k_s_small_db"] = res["s"]
    out["add_10k_ratio"] = out["add_10k_s"] / res["s"]
    out["search_ratio_usearch"] = out["search_p50_ms"] / out["search_p50_ms_usearch"]
    out["search_ratio_same_index"] = (
        out["search_p50_ms_same_index"] / out["search_p50_ms_usearch_same_index"]
    )
    neighbours("ray")  # last: the slowest step to start
    return out


def make_setup(workdir: Path, centres_db: Path, kind: str) -> Setup:
    db = RetroDB.open(centres_db, threads=1)
    centres, counts = centre_keys(db)
    target, sigma = spread(centres)
    keys = KeySource(kind, db.dim, centres if kind == "clustered" else None, sigma)
    print(
        f"centres: {centres.shape[0]:,} keys of {centres_db}; median nearest-key distance "
        f"{target:.4f} -> sigma {sigma:.3f}",
        file=sys.stderr,
    )
    return Setup(workdir, centres_db, keys, counts, DBConfig(encoder=db.config.encoder))


def default_centres() -> Path:
    """The Python docs' library/ database as scripts/never_hurt.sh builds it (vocabulary
    8,192, int8 all-MiniLM-L6-v2): that one when it exists, else built here once."""
    shared = ROOT / "data" / "never-hurt" / "db"
    if (shared / "CURRENT").exists():
        return shared
    path = ROOT / "data" / "pydocs-library.retrodb"
    if not (path / "CURRENT").exists():
        from common import pydocs

        from retrodb.config import EncoderConfig, TokenizerConfig

        print(f"building {path} for the centre keys (once; ~8 min on 2 cores)", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
        config = DBConfig(
            tokenizer=TokenizerConfig(vocab_size=8192), encoder=EncoderConfig(quantize="int8")
        )
        RetroDB.build(path, [pydocs("library")], config=config)
    return path


ROWS = [
    ("chunks", "chunks", "{:,}"),
    ("build_s", "build s", "{:.1f}"),
    ("index_rate", "index chunks/s", "{:,.0f}"),
    ("index_rate_usearch", "  bare USearch, 10 indexes", "{:,.0f}"),
    ("open_s", "open s", "{:.3f}"),
    ("first_query_s", "first query s", "{:.3f}"),
    ("rss_anon_open_mb", "RssAnon open MB", "{:.0f}"),
    ("rss_anon_queries_mb", "RssAnon 1k queries MB", "{:.0f}"),
    ("disk_bytes_per_chunk", "disk bytes/chunk", "{:,.0f}"),
    ("search_p50_ms", "search p50 ms", "{:.3f}"),
    ("search_p99_ms", "search p99 ms", "{:.3f}"),
    ("search_p50_ms_usearch", "  bare USearch p50 ms", "{:.3f}"),
    ("search_p50_ms_loaded", "  indexes loaded p50 ms", "{:.3f}"),
    ("recall_at_10", "recall@10", "{:.4f}"),
    ("batch_qps", "batched queries/s", "{:,.0f}"),
    ("batch_qps_usearch", "  bare USearch", "{:,.0f}"),
    ("batch_qps_loaded", "  indexes loaded", "{:,.0f}"),
    ("gather_ratio_memmap", "gather / memmap (int64)", "{:.2f}"),
    ("gather_ratio_memmap_raw", "gather / memmap (raw)", "{:.2f}"),
    ("add_1pct_s", "add 1 % s", "{:.2f}"),
    ("add_10k_s", "add 10k s", "{:.2f}"),
    ("add_10k_ratio", "  / same add to 10k db", "{:.2f}"),
    ("add_peak_rss_mb", "add peak RSS MB", "{:.0f}"),
    ("neighbours_rate_local", "neighbours chunks/s", "{:,.0f}"),
    ("neighbours_rate_ray", "  Ray, 2 workers", "{:,.0f}"),
    ("compact_s", "compact 10 -> 1 s", "{:.1f}"),
    ("compact_rate", "  chunks/s", "{:,.0f}"),
    ("index_rate_usearch_single", "  bare USearch, 1 index", "{:,.0f}"),
    ("verify_s", "verify s", "{:.1f}"),
]


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--chunks", type=int, required=True)
    ap.add_argument("--keys", choices=["clustered", "uniform"], default="clustered")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--centres-db", type=Path, default=None)
    ap.add_argument(
        "--add-chunks", type=int, default=10_000, help="the fixed-size add (JSON: add_10k_s)"
    )
    ap.add_argument("--threads", type=int, default=2, help="search threads of the reader")
    ap.add_argument("--skip", default="", help="comma list: ray, local, neighbours")
    ap.add_argument("--keep", action="store_true", help="keep the databases")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.chunks < 1000 or args.add_chunks < 100:
        ap.error("--chunks must be at least 1,000 and --add-chunks at least 100")
    workdir = args.workdir or ROOT / "data" / "bench-scale" / f"{args.keys}-{args.chunks}"
    workdir.mkdir(parents=True, exist_ok=True)
    setup = make_setup(workdir, args.centres_db or default_centres(), args.keys)
    t_start = time.perf_counter()

    def log(msg: str, partial: dict[str, Any]) -> None:
        """Say which step starts, and keep what is measured so far (partial.json)."""
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", file=sys.stderr, flush=True)
        (workdir / "partial.json").write_text(json.dumps(partial) + "\n")

    try:
        skip = set(filter(None, args.skip.split(",")))
        out = run(
            setup, args.chunks, add_fixed=args.add_chunks, skip=skip, threads=args.threads, log=log
        )
    finally:
        if not args.keep:
            for p in workdir.glob("db-*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    (workdir / "result.json").write_text(json.dumps(out) + "\n")
    if args.json:
        print(json.dumps(out))
        return
    print(f"bench_scale: {out['machine']}, keys {out['keys']}")
    for key, label, fmt in ROWS:
        v = out.get(key)
        print(f"  {label:<24} {'-' if v is None else fmt.format(v)}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
