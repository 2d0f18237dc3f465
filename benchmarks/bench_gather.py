"""Random `retrieve` (neighbour + continuation) of 2,048 keys against a plain
numpy.memmap gather of the same rows. Target: within 2x.

    .venv/bin/python benchmarks/bench_gather.py DB [--keys 2048] [--repeats 50]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from common import arg_parser, machine

from retrodb import RetroDB


def main() -> None:
    ap = arg_parser(__doc__, db=True)
    ap.add_argument("--keys", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    db = RetroDB.open(args.db)
    n, m = db.manifest.chunks, db.chunk_size

    # The same rows as one plain raw file, mapped with numpy.memmap.
    raw = Path(tempfile.mkdtemp()) / "tokens.raw"
    mm = np.memmap(raw, dtype=db.token_dtype, mode="w+", shape=(n + 1, m))
    for s in db.segments:
        mm[s.meta.first_key : s.meta.first_key + s.meta.chunks] = s.tokens
    mm.flush()
    del mm
    plain = np.memmap(raw, dtype=db.token_dtype, mode="r", shape=(n + 1, m))

    rng = np.random.default_rng(0)
    t_db, t_np = [], []
    for _ in range(args.repeats):
        keys = rng.integers(0, n, size=args.keys)
        t0 = time.perf_counter()
        got = db.retrieve(keys)
        t_db.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = np.concatenate([plain[keys], plain[keys + 1]], axis=1).astype(np.int64)
        t_np.append(time.perf_counter() - t0)
        assert got.tokens[:, :m].tolist() == ref[:, :m].tolist()
    a, b = float(np.median(t_db)) * 1000, float(np.median(t_np)) * 1000
    print(f"machine: {machine()}")
    print(f"database: {n:,} chunks in {len(db.segments)} segment(s)")
    print(f"retrieve {args.keys} random keys (chunk + continuation + mask): median {a:.3f} ms")
    print(f"numpy.memmap gather of the same rows (2 rows per key):        median {b:.3f} ms")
    print(f"ratio: {a / b:.2f}x  (target <= 2x)")


if __name__ == "__main__":
    main()
