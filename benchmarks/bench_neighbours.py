"""Neighbour sets and training batches.

1. Neighbour computation over the database's own chunks (k = 2, same-document
   exclusion, HNSW): chunks/s.
2. Batch assembly for B = 16, L = 512, k = 2 (``SequenceReader.read``: tokens, masks,
   neighbours and continuations) against a plain numpy.memmap gather of the same rows
   from one raw token file. Target: within 2x. Also the full DataLoader path.
3. Against one training step (forward + backward + AdamW) of the `small` model on the
   same batch. Target: loading at least 20x faster than a step.

    .venv/bin/python benchmarks/bench_neighbours.py DB [--batches 200] [--no-model]

DB: any database, for example `retrodb build data/bench.retrodb $(scripts/get-pydocs.sh)/library`.
The set is written as DB/neighbours/bench (removed at the end unless --keep).
Prints figures and ratios; asserts nothing about time.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from common import arg_parser, machine

from retrodb import RetroDB, neighbours
from retrodb.neighbours import NeighbourSet, SequenceReader, delete_set


def plain_copy(db: RetroDB, ns: NeighbourSet, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """The database's tokens as one raw [n + 1, m] file (last row padding) and the set's
    keys as one raw [rows, k] file, each mapped with numpy.memmap."""
    n, m = db.manifest.next_key, db.chunk_size
    tok = np.memmap(where / "tokens.raw", dtype=db.token_dtype, mode="w+", shape=(n + 1, m))
    tok[:] = db.pad_id
    for s in db.segments:
        tok[s.meta.first_key : s.meta.first_key + s.meta.chunks] = s.tokens
    tok.flush()
    keys = np.memmap(where / "keys.raw", dtype=np.int64, mode="w+", shape=ns.keys.shape)
    keys[:] = ns.keys
    keys.flush()
    del tok, keys
    return (
        np.memmap(where / "tokens.raw", dtype=db.token_dtype, mode="r", shape=(n + 1, m)),
        np.memmap(where / "keys.raw", dtype=np.int64, mode="r", shape=ns.keys.shape),
    )


def main() -> None:
    ap = arg_parser(__doc__, db=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("-k", type=int, default=2)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--steps", type=int, default=2, help="timed training steps")
    ap.add_argument("--no-model", action="store_true", help="skip the training-step comparison")
    ap.add_argument("--keep", action="store_true", help="keep the neighbour set 'bench'")
    args = ap.parse_args()
    db = RetroDB.open(args.db)
    m = db.chunk_size
    print(f"machine: {machine()}")
    print(f"database: {db.manifest.chunks:,} chunks of {m} tokens in {len(db.segments)} segment(s)")

    # 1. neighbour computation
    _ = db.indexes  # map the indexes outside the timing
    t0 = time.perf_counter()
    ns = neighbours.compute(db, "bench", k=args.k)
    sec = time.perf_counter() - t0
    print(
        f"neighbours (k={args.k}, own document excluded, HNSW): {ns.info.rows:,} chunks in "
        f"{sec:.2f} s = {ns.info.rows / sec:,.0f} chunks/s"
    )

    # 2. batch assembly against a plain memmap gather of the same rows
    seq_len = args.seq_len
    if seq_len % m:
        seq_len = max(m, seq_len // m * m)
        print(f"seq_len rounded to {seq_len} (a multiple of the chunk size {m})")
    reader = SequenceReader(db, ns, seq_len=seq_len, k=args.k)
    start, end = reader.windows()
    c = seq_len // m
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as td:
        tok, keys = plain_copy(db, ns, Path(td))
        chunk_keys = np.asarray(ns.chunk_keys)
        pad_row = tok.shape[0] - 1
        t_ours, t_plain, t_take = [], [], []
        for i in range(args.batches + 5):
            w = rng.integers(0, start.size, size=args.batch)
            s, e = start[w], end[w]
            t0 = time.perf_counter()
            got = reader.read(s, e)
            t1 = time.perf_counter()
            # the same rows, plainly: window rows (+1), their neighbour keys, neighbours and
            # continuations, with no validity checks, masks or padding logic
            rows = np.minimum(s[:, None] + np.arange(c + 1), chunk_keys.size - 1)
            own = tok[chunk_keys[rows]].astype(np.int64)
            nk = keys[rows[:, :c], : args.k]
            nk = np.where(nk < 0, pad_row, nk)
            nb = tok[nk].astype(np.int64)
            cont = tok[np.minimum(nk + 1, pad_row)].astype(np.int64)
            t2 = time.perf_counter()
            # the same again with np.take, numpy's fastest gather for small batches
            own = np.take(tok, np.take(chunk_keys, rows), axis=0).astype(np.int64)
            nk = np.take(keys, rows[:, :c], axis=0)[..., : args.k]
            nk = np.where(nk < 0, pad_row, nk)
            nb = np.take(tok, nk, axis=0).astype(np.int64)
            cont = np.take(tok, np.minimum(nk + 1, pad_row), axis=0).astype(np.int64)
            t3 = time.perf_counter()
            if i >= 5:
                t_ours.append(t1 - t0)
                t_plain.append(t2 - t1)
                t_take.append(t3 - t2)
            assert got["retrieved"].shape == (args.batch, c, args.k, 2 * m)
            assert own.shape[0] == nb.shape[0] == cont.shape[0] == args.batch
        a, b, t = (float(np.median(x)) * 1e3 for x in (t_ours, t_plain, t_take))
        print(f"batch B={args.batch} L={seq_len} k={args.k} ({args.batches} random batches)")
        print(f"  SequenceReader.read (tokens, masks, targets, neighbours):  median {a:.3f} ms")
        print(
            f"  plain numpy.memmap gather of the same rows (indexing):     median {b:.3f} ms"
            f"  -> ratio {a / b:.2f}x (target <= 2x)"
        )
        print(
            f"  the same rows with np.take:                                median {t:.3f} ms"
            f"  -> ratio {a / t:.2f}x"
        )

    from retrodb_model.data import RetroDataset, make_dataloader

    ds = RetroDataset(db, "bench", seq_len=seq_len, split="all", k=args.k)
    loader = make_dataloader(ds, batch_size=args.batch, seed=0, drop_last=True)
    it = iter(loader)
    n_batches = min(args.batches, len(loader))
    batch = next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches - 1):
        batch = next(it)
    t_loader = (time.perf_counter() - t0) / max(1, n_batches - 1)
    print(f"DataLoader (num_workers=0, tensors): {t_loader * 1e3:.3f} ms per batch")

    # 3. one training step of the small model
    if not args.no_model:
        try:
            import torch

            from retrodb_model.config import RetroConfig
            from retrodb_model.model import RetroModel
        except ImportError as exc:
            print(f"training step: skipped ({exc})")
        else:
            torch.manual_seed(0)
            cfg = RetroConfig.preset(
                "small",
                vocab_size=db.tokenizer.vocab_size,
                chunk_size=m,
                num_neighbours=args.k,
                max_seq_len=max(2048, seq_len),
            )
            model = RetroModel(cfg)
            opt = model.configure_optimizer(weight_decay=0.1, lr=3e-4, betas=(0.9, 0.95))
            model.train()

            def step() -> None:
                _, loss = model(
                    batch["tokens"][:, :-1],
                    batch["retrieved"],
                    batch["retrieved_mask"],
                    batch["targets"],
                )
                assert loss is not None
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step()  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            t_step = (time.perf_counter() - t0) / args.steps
            print(
                f"training step of the small model ({torch.get_num_threads()} threads, "
                f"B={args.batch}, L={seq_len}): {t_step:.2f} s; "
                f"loading is {t_step / t_loader:,.0f}x faster (target >= 20x)"
            )
    if not args.keep:
        delete_set(db, "bench")


if __name__ == "__main__":
    main()
