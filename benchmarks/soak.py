"""Reliability soak: kill -9 many writers, and query through many adds.

Phase 1: ``--trials`` child processes each run ``add`` (every tenth a ``compact`` after a
delete) and are killed with SIGKILL, at a random moment or at a named failpoint (cycling
through all of them); after each, the database must be at the old or the new generation,
``verify`` must pass, and no committed document may be missing.
Phase 2: a reader process queries in a loop (fresh opens and refreshes, checking that every
generation it sees is whole) while this process runs ``--adds`` adds, a delete and a
compaction.

The encoder is a tiny random BERT so that a trial takes about a second.

    python benchmarks/soak.py [--trials 200] [--adds 50] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--adds", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-delay",
        type=float,
        default=None,
        help="latest kill, seconds after the child is ready (default: 1.2 x a measured add)",
    )
    args = ap.parse_args()

    from benchmarks.common import machine
    from retrodb import ChunkConfig, DBConfig, RetroDB, TokenizerConfig, failpoints
    from retrodb.config import EncoderConfig
    from retrodb.encoder_prepare import prepare_encoder
    from tests.crash_harness import (
        READER_CHILD,
        check_after_trial,
        live_ids,
        run_add,
        start_child,
        write_batch,
    )
    from tests.encoder_fixtures import make_tiny_bert

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="retrodb-soak-"))
    t_start = time.perf_counter()
    try:
        prepare_encoder(make_tiny_bert(work / "ckpt"), work / "enc", config=EncoderConfig())
        seed, _ = write_batch(work / "in", 0, docs=6)
        config = DBConfig(
            chunk=ChunkConfig(chunk_size=16), tokenizer=TokenizerConfig(vocab_size=400)
        )
        db_path = work / "db"
        RetroDB.build(db_path, [seed], config=config, encoder=work / "enc")

        # ---------------------------------------------------------- phase 1: kill -9
        if args.max_delay is None:  # calibrate: how long an add takes once the child is ready
            times = []
            for i in range(3):
                batch, _ = write_batch(work / "calibrate", 90_000 + i)
                times.append(run_add(db_path, [batch]).seconds)
            args.max_delay = 1.2 * sorted(times)[1]
        _, expected = live_ids(db_path)
        batches: dict[str, set[str]] = {}
        c = {
            "trials": 0,
            "killed_random": 0,
            "killed_failpoint": 0,
            "completed": 0,
            "committed": 0,
            "compactions": 0,
            "lost": 0,
            "partial": 0,
            "verify_failures": 0,
        }
        generations: set[int] = set()
        problems: list[str] = []
        names = list(failpoints.NAMES)
        for trial in range(1, args.trials + 1):
            compact = trial % 10 == 0
            fp = f"{names[(trial // 3) % len(names)]}:kill" if trial % 3 == 0 else None
            delay = None if fp else rng.uniform(0.0, args.max_delay)
            if compact:
                victim = rng.choice(sorted(batches)) if batches else None
                if victim:  # delete a committed batch, then kill a compaction
                    RetroDB.open(db_path).delete(sorted(batches.pop(victim)))
                    expected = live_ids(db_path)[1]
                out = run_add(db_path, ["--compact"], failpoint=fp, kill_after=delay)
                new: set[str] = set()
            else:
                batch, new = write_batch(work / "batches", trial)
                out = run_add(db_path, [batch], failpoint=fp, kill_after=delay)
            if not (out.killed or out.returncode == 0):
                problems.append(f"trial {trial}: child failed: {out.output[-500:]}")
            gen, committed, probs = check_after_trial(db_path, expected, new)
            c["trials"] += 1
            c["completed"] += out.returncode == 0
            c["killed_failpoint" if fp else "killed_random"] += out.killed
            generations.add(gen)
            c["lost"] += sum("lost" in p for p in probs)
            c["partial"] += sum("partial" in p for p in probs)
            c["verify_failures"] += any(p.startswith("verify") for p in probs)
            problems += [f"trial {trial} ({fp or f'{delay:.3f}s'}): {p}" for p in probs]
            if compact:
                c["compactions"] += len(RetroDB.open(db_path).segments) == 1
            elif committed and new:
                c["committed"] += 1
                expected |= new
                batches[f"t{trial:04d}"] = new
            if out.returncode == 0 and new and not committed:
                problems.append(f"trial {trial}: add returned but its documents are missing")
        lost_docs = len(expected - live_ids(db_path)[1])
        rep = RetroDB.open(db_path).verify(repair=True)
        phase1_s = time.perf_counter() - t_start

        # ---------------------------------------------------------- phase 2: reader
        stop, out_file = work / "stop", work / "reader.json"
        reader = start_child(
            READER_CHILD, db_path, stop, out_file, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        time.sleep(1.5)
        db = RetroDB.open(db_path)
        gens_written = set()
        for i in range(args.adds):
            batch, new = write_batch(work / "batches", 10_000 + i)
            gens_written.add(db.add([batch]).generation)
            batches[f"t{10_000 + i:04d}"] = new
            if i == args.adds // 3:
                victim = sorted(batches)[0]
                gens_written.add(db.delete(sorted(batches.pop(victim))).generation)
            if i == 2 * args.adds // 3:
                gens_written.add(db.compact().generation)
            time.sleep(0.05)
        stop.touch()
        _, err = reader.communicate(timeout=120)
        reader_rep = json.loads(out_file.read_text()) if reader.returncode == 0 else {}
        final_ok = RetroDB.open(db_path).verify()["ok"]

        print(f"# retrodb reliability soak ({machine()}), seed {args.seed}")
        print(
            f"kill trials            {c['trials']}  (adds {c['trials'] - c['trials'] // 10}, "
            f"compactions {c['trials'] // 10})"
        )
        print(f"  killed at random     {c['killed_random']}")
        print(f"  killed at failpoint  {c['killed_failpoint']}  ({len(names)} named points)")
        print(f"  finished before kill {c['completed']}")
        print(f"  adds committed       {c['committed']}")
        print(f"generations seen       {len(generations)}  (last {max(generations)})")
        print(f"documents lost         {c['lost'] + lost_docs}")
        print(f"partial adds seen      {c['partial']}")
        print(f"verify failures        {c['verify_failures']}")
        print(f"leftovers removed by verify --repair at the end: {len(rep['removed'])}")
        print(
            f"phase 1 time           {phase1_s:.0f} s (random kills within {args.max_delay:.2f} s)"
        )
        print(
            f"reader: {args.adds} adds + 1 delete + 1 compaction while it queried: "
            f"exit {reader.returncode}, {reader_rep.get('queries', 0)} queries, "
            f"{len(reader_rep.get('generations', []))} generations seen of "
            f"{len(gens_written)} written"
        )
        print(f"final verify           {'ok' if final_ok else 'FAILED'}")
        for p in problems[:20]:
            print("problem:", p)
        if reader.returncode != 0:
            print("reader error:", err[-2000:])
        bad = c["lost"] + lost_docs + c["partial"] + c["verify_failures"] + len(problems)
        return 1 if bad or reader.returncode != 0 or not final_ok else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
