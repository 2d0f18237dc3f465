"""The Ray engine's overhead: chunks/s of `build --engine ray` with 1 and 2 workers against
the local build of the same input, in one run.

    .venv/bin/python benchmarks/bench_ray.py [--kb 250] [--workers 1 2] [--rounds 2]

The tokenizer is trained and the encoder exported once beforehand (not timed), then each
build is timed with them given. Each Ray build starts a local Ray of N CPUs as the
engine starts one (``local_ray_options``; with ``--default-worker-limit`` also without its
worker limit; timed apart: "start"), builds with N encoder actors whose ONNX Runtime
threads add up to the machine's cores (so every run encodes on all cores), and stops Ray
("stop"). On a 2-core machine no speed-up is expected: the figures show what Ray costs
next to encoding. The engines run interleaved for ``--rounds`` rounds (the machine is
shared: its load drifts); each figure is the median over the rounds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from common import Timer, arg_parser, machine, pydocs

from retrodb import DBConfig, EncoderConfig, RetroDB, TokenizerConfig
from retrodb.corpus import scan
from retrodb.encoder_prepare import prepare_encoder
from retrodb.ray_engine import RayEngine, local_ray_options
from retrodb.tokenizer import Tokenizer


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--kb", type=int, default=250, help="KB of library/ docs to build from")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quantize", default="int8", choices=["none", "int8"])
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--default-worker-limit",
        action="store_true",
        help="also build on a local Ray with Ray's default num_workers_soft_limit (the "
        "engine's local_ray_options raise it), interleaved with the others",
    )
    args = ap.parse_args()

    src = pydocs("library")
    work = Path(tempfile.mkdtemp(prefix="retrodb-bench-ray-"))
    corpus_dir = work / "corpus"
    corpus_dir.mkdir()
    size = 0
    for f in sorted(src.glob("*.txt")):
        if size >= args.kb * 1024:
            break
        shutil.copy(f, corpus_dir / f.name)
        size += f.stat().st_size
    cores = os.cpu_count() or 1
    config = DBConfig(
        tokenizer=TokenizerConfig(vocab_size=args.vocab_size),
        encoder=EncoderConfig(quantize=args.quantize),
    )
    tok = Tokenizer.train(
        (t for _, t in scan([corpus_dir]).iter_documents()), config=config.tokenizer
    )
    tok.save(work / "tok.model")
    prepare_encoder(None, work / "enc", config=config.encoder)
    files = len(list(corpus_dir.iterdir()))
    print(f"machine: {machine()}")
    print(f"input: {files} files of library/, {size / 1024:.0f} KB; encoder {args.quantize}")
    print(f"load before: {load()}")

    def build(name: str, engine: RayEngine | None) -> tuple[int, float]:
        shutil.rmtree(work / name, ignore_errors=True)
        with Timer() as t:
            db = RetroDB.build(
                work / name,
                [corpus_dir],
                config=config,
                tokenizer=work / "tok.model",
                encoder=work / "enc",
                threads=cores,
                engine=engine,
            )
        return db.manifest.chunks, t.s

    import ray

    times: dict[str, list[tuple[float, float, float]]] = {}
    chunks = 0
    for r in range(args.rounds):
        chunks, s = build("local", None)
        times.setdefault("local", []).append((s, 0.0, 0.0))
        variants = [("", True)] + (
            [(", Ray's default worker limit", False)] if args.default_worker_limit else []
        )
        for w in args.workers:
            for label, ours in variants:
                options = local_ray_options(w)
                if not ours:
                    del options["_system_config"]
                with Timer() as t_start:
                    ray.init(**options)
                engine = RayEngine(workers=w, threads=max(1, cores // w))
                n, s = build(f"ray{w}", engine)
                assert n == chunks
                with Timer() as t_stop:
                    ray.shutdown()
                name = f"ray, {w} worker{'s' if w > 1 else ''}{label}"
                times.setdefault(name, []).append((s, t_start.s, t_stop.s))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in times.items()))
    print(f"load after: {load()}")
    rows = [
        (name, *(float(np.median([t[i] for t in v])) for i in range(3)))
        for name, v in times.items()
    ]
    local_s = rows[0][1]
    print()
    print(f"{chunks} chunks; each build's encoder uses {cores} ONNX Runtime threads in all")
    print()
    print("| engine | build s | chunks/s | vs local | overhead s | Ray start s | Ray stop s |")
    print("|---|---|---|---|---|---|---|")
    for name, s, start, stop in rows:
        print(
            f"| {name} | {s:.1f} | {chunks / s:.1f} | {local_s / s:.2f}x | "
            f"{s - local_s:+.1f} | {start:.1f} | {stop:.1f} |"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
