"""Generation speed of the RETRO model with live retrieval, and the share of time retrieval takes.

For each setting, generates N tokens (greedy, batch 1) after a prompt and reports new
tokens/s (after the first token, which comes with reading the prompt) and the time spent
retrieving: encoding each completed chunk with the database's encoder, searching, and
gathering neighbours + continuations. Settings: retrieval on with the key/value cache
(what `retrodb generate` does), retrieval off with the cache, and retrieval on without
the cache (a full recompute per token, fewer tokens) to show what the cache saves.

    .venv/bin/python -m benchmarks.bench_generate --db DB [--checkpoint DIR]

Without --checkpoint a randomly initialised model of --preset (default small) with the
database's vocabulary is timed: speed does not depend on the weights. On a shared machine
the numbers are noisy; the best of --repeats runs is printed.
"""

from __future__ import annotations

import argparse
import time

import torch

import retrodb  # noqa: F401  (onnxruntime before usearch)
from benchmarks.common import machine
from retrodb.db import RetroDB
from retrodb_model.checkpoint import load_model
from retrodb_model.config import RetroConfig
from retrodb_model.generate import generate
from retrodb_model.model import RetroModel

PROMPT = (
    "The os module provides a portable way of using operating system dependent "
    "functionality. If you just want to read or write a file see open(), if you want to "
    "manipulate paths, see the os.path module, and if you want to read all the lines in "
    "all the files on the command line see the fileinput module."
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--preset", default="small")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--recompute-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    db = RetroDB.open(a.db, threads=a.threads)
    if a.checkpoint:
        model, _ = load_model(a.checkpoint, db=db)
        what = a.checkpoint
    else:
        torch.manual_seed(0)
        cfg = RetroConfig.preset(a.preset, db.tokenizer.vocab_size, chunk_size=db.chunk_size)
        model = RetroModel(cfg).eval()
        what = f"random {a.preset} preset"
    print(f"{machine()}; torch threads {a.threads}; model {what}; database {a.db}")
    enc = db.config.encoder.quantize
    print(f"m = {db.chunk_size}, k = {model.cfg.num_neighbours}, encoder quantize {enc}")
    generate(model, db, PROMPT, max_tokens=8)  # warm up: encoder session, index maps
    settings = [
        ("retrieval, cache", dict(retrieval=True, use_cache=True, max_tokens=a.tokens)),
        ("no retrieval, cache", dict(retrieval=False, use_cache=True, max_tokens=a.tokens)),
        (
            "retrieval, no cache",
            dict(retrieval=True, use_cache=False, max_tokens=a.recompute_tokens),
        ),
    ]
    for name, kw in settings:
        best = None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            g = generate(model, db, PROMPT, temperature=0.0, stop_at_eos=False, **kw)
            wall = time.perf_counter() - t0
            if best is None or g.tokens_per_s > best[0].tokens_per_s:
                best = (g, wall)
        g, wall = best
        print(
            f"{name:<20} {len(g.tokens):>4} tokens  {g.tokens_per_s:7.1f} tokens/s after the "
            f"prompt  ({wall:.2f} s total, prompt {g.prompt_seconds:.2f} s)  retrieval "
            f"{g.retrieval_seconds:.2f} s = {100 * g.retrieval_share:.0f}% of the time, "
            f"{len(g.retrievals)} retrievals"
        )


if __name__ == "__main__":
    main()
