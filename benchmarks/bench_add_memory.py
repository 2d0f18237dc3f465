"""Peak memory of `add` for one very large document: a 5 MB and a 50 MB single text file.

Each add runs in a child process (which imports retrodb only, no torch) that reports its
peak RSS (VmHWM). The encoder is a tiny random BERT (2 layers, width 32), so the
figures measure the write pipeline rather than the encoder. ``--compare REV`` also runs
the add with the retrodb package of a git revision (e.g. the one before streaming).

    python benchmarks/bench_add_memory.py [--sizes 5 50] [--compare 07e3f2d]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import sys, time
import retrodb
db = retrodb.RetroDB.open(sys.argv[1], threads=2)
t0 = time.perf_counter()
if len(sys.argv) > 2:
    res = db.add([sys.argv[2]])
    print(res.chunks, res.tokens, time.perf_counter() - t0)
else:
    db.search(["warm up the encoder"], k=1)
    print(0, 0, 0.0)
# VmHWM: the peak RSS of this program (ru_maxrss would include the parent's pages at fork).
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024)
"""

WORDS = (
    "the of and to in is that for it as with was on be by this are from at an or which "
    "file open read write lock thread queue sort key list regex match group socket server "
    "client request header body json parse encode decode memory index search vector chunk"
).split()


def make_document(path: Path, megabytes: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < target:
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) + ".\n"
            if rng.random() < 0.1:
                line += "\n"
            f.write(line)
            written += len(line)


def run_child(db: Path, doc: Path | None, pythonpath: Path) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="2")
    args = [sys.executable, "-c", CHILD, str(db)] + ([str(doc)] if doc else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/")
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.wait() != 0:
        raise SystemExit(f"child failed: {err}")
    result, peak = out.strip().splitlines()
    return float(peak), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[5, 50])
    ap.add_argument("--compare", help="also measure the retrodb package of this git revision")
    args = ap.parse_args()

    from benchmarks.common import machine
    from retrodb import ChunkConfig, DBConfig, RetroDB, TokenizerConfig
    from retrodb.config import EncoderConfig
    from retrodb.encoder_prepare import prepare_encoder
    from tests.encoder_fixtures import make_tiny_bert

    work = Path(tempfile.mkdtemp(prefix="retrodb-mem-"))
    try:
        prepare_encoder(make_tiny_bert(work / "ckpt"), work / "enc", config=EncoderConfig())
        seed_dir = work / "seed"
        seed_dir.mkdir()
        make_document(seed_dir / "seed.txt", 0.5, seed=1)
        config = DBConfig(
            chunk=ChunkConfig(chunk_size=64), tokenizer=TokenizerConfig(vocab_size=2000)
        )
        RetroDB.build(work / "db", [seed_dir], config=config, encoder=work / "enc")
        revs: list[tuple[str, Path]] = [("this tree", ROOT)]
        if args.compare:
            old = work / "old"
            old.mkdir()
            tar = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.compare, "retrodb"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=tar, check=True)
            revs.append((args.compare, old))
        print(f"# add of one large document, peak RSS of the process ({machine()})")
        base, _ = run_child(work / "db", None, ROOT)
        print(f"baseline (open + one query, encoder loaded): {base:,.0f} MB")
        print(f"{'code':<12} {'document':>9} {'chunks':>9} {'add s':>7} {'peak RSS MB':>12}")
        for mb in args.sizes:
            doc_dir = work / f"doc{mb:g}"
            doc_dir.mkdir()
            make_document(doc_dir / f"big-{mb:g}.txt", mb, seed=int(mb))
            for label, path in revs:
                db = work / f"db-{mb:g}-{label.replace(' ', '_')}"
                shutil.copytree(work / "db", db)
                t0 = time.perf_counter()
                rss, out = run_child(db, doc_dir, path)
                chunks, _tokens, _add_s = out.split()
                print(
                    f"{label:<12} {mb:>6g} MB {int(chunks):>9,} {time.perf_counter() - t0:>7.1f} "
                    f"{rss:>12,.0f}"
                )
                shutil.rmtree(db)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
