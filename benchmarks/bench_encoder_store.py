"""Disk use of small databases that share one encoder, and what sharing costs a build.

    .venv/bin/python benchmarks/bench_encoder_store.py [--kb 90] [--dbs 2] [--threads 1]

Builds ``--dbs`` databases of the same ~``--kb`` KB of the Python docs (library/, first
files) with the default encoder, each with `RetroDB.build` timed, then prints `du -s` of
each database alone and of all of them together with the encoder store (du counts a hard
link once per invocation, so the total is what the disk really holds). The store lives
in the work folder (RETRODB_CACHE_DIR), on the databases' filesystem.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import Timer, arg_parser, machine, pydocs


def du(*paths: Path) -> int:
    """Bytes on disk of ``paths`` together (``du -s -B1``: hard links counted once)."""
    out = subprocess.run(
        ["du", "-s", "-c", "-B1", *map(str, paths)], check=True, capture_output=True, text=True
    )
    return int(out.stdout.splitlines()[-1].split()[0])


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--kb", type=int, default=90, help="corpus size in KB (default 90)")
    ap.add_argument("--dbs", type=int, default=2, help="databases to build (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="encoder threads (default 1)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="retrodb-bench-store-"))
    os.environ["RETRODB_CACHE_DIR"] = str(work / "cache")
    from retrodb import RetroDB

    src = pydocs("library")
    corpus = work / "corpus"
    corpus.mkdir()
    total = 0
    for f in sorted(src.glob("*.txt")):
        if total + f.stat().st_size <= args.kb * 1000:
            shutil.copy(f, corpus / f.name)
            total += f.stat().st_size
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    print(f"corpus: {len(list(corpus.iterdir()))} files, {total / 1000:.0f} KB")
    dbs = []
    for i in range(args.dbs):
        path = work / f"db{i}"
        with Timer() as t:
            db = RetroDB.build(path, [corpus], threads=args.threads)
        shared = db.last_build.encoder_shared if getattr(db, "last_build", None) else 0
        dbs.append(path)
        print(
            f"build {i}: {t.s:6.1f} s, {db.info()['chunks']} chunks, du -s {du(path) / 1e6:6.1f} MB"
            f" alone, encoder bytes shared {shared / 1e6:.1f} MB"
        )
    store = work / "cache" / "store"
    together = du(*dbs, *([store] if store.exists() else []))
    print(
        f"{args.dbs} databases together (store included, hard links counted once): "
        f"{together / 1e6:.1f} MB, {together / args.dbs / 1e6:.1f} MB per database"
    )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
