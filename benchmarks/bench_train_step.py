"""Training throughput of the RETRO model: forward + backward + AdamW step.

Defaults: the `small` preset (6 decoder layers of width 384, 2 encoder layers of width
384, CCA at layers 3 and 6) with a 32k vocabulary, sequences of 512 tokens (8 chunks of
64), k = 2 neighbours of 128 tokens per chunk, batch 4, 2 torch threads, random tokens
and neighbours. Prints tokens/s with and without retrieval and the time per step.

    .venv/bin/python benchmarks/bench_train_step.py [--steps 6] [--dtype fp32|bf16]

Steps are timed one by one; the best step and the median are both printed, because on a
shared machine other processes inflate some steps (the best step is the one to compare
between code versions, the median what a training run would see under the same load),
and so is the median step's CPU time (all threads), which load inflates least; at one
thread it is what an idle core would take. To compare code versions or RETRO-pytorch,
use bench_vs_public.py, which times them in turns in one process.

`--dtype bf16` runs forward and loss under CPU autocast (weights and optimizer stay fp32);
it pays off only on CPUs with bf16 matrix units (AMX / AVX512-BF16).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time

import torch
from common import add_model_args

from retrodb_model.config import RetroConfig
from retrodb_model.model import RetroModel


def bench(
    model: RetroModel,
    *,
    batch: int,
    seq_len: int,
    k: int,
    retrieval: bool,
    steps: int,
    warmup: int,
    dtype: str,
    seed: int = 0,
) -> list[tuple[float, float]]:
    """(wall-clock, CPU) seconds of each of `steps` timed steps (after `warmup` untimed
    ones); CPU is the process's CPU time, all threads."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    retrieved = None
    if retrieval:
        n = seq_len // cfg.chunk_size
        retrieved = torch.randint(
            0, cfg.vocab_size, (batch, n, k, cfg.neighbour_len), generator=g
        )  # (B, n, k, r)
    opt = model.configure_optimizer(weight_decay=0.1, lr=3e-4, betas=(0.9, 0.95))
    model.train()

    def autocast() -> contextlib.AbstractContextManager[object]:
        if dtype == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step() -> None:
        with autocast():
            _, loss = model(tokens, retrieved, targets=targets)
        assert loss is not None
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = RetroConfig.preset(args.preset, args.vocab)
    model = RetroModel(cfg)
    print(
        f"preset {args.preset}: {cfg.n_layers} layers x {cfg.dim}, encoder {cfg.enc_layers} x "
        f"{cfg.enc_dim}, CCA at {cfg.retro_layers}, vocab {cfg.vocab_size}, "
        f"{model.num_parameters() / 1e6:.1f}M params "
        f"({model.num_parameters(exclude_embeddings=True) / 1e6:.1f}M without embeddings)"
    )
    print(
        f"batch {args.batch} x {args.seq_len} tokens, k = {args.k}, threads {args.threads}, "
        f"dtype {args.dtype}"
    )
    run = functools.partial(
        bench,
        model,
        batch=args.batch,
        seq_len=args.seq_len,
        k=args.k,
        steps=args.steps,
        warmup=args.warmup,
        dtype=args.dtype,
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(retrieval=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        return
    n_tokens = args.batch * args.seq_len
    for retrieval in (False, True):
        times = run(retrieval=retrieval)
        wall = [w for w, _ in times]
        best, median = min(wall), statistics.median(wall)
        cpu = statistics.median(c for _, c in times)
        label = "with retrieval   " if retrieval else "without retrieval"
        print(
            f"{label}: best {n_tokens / best:7.1f} tokens/s ({best:6.3f} s/step), "
            f"median {n_tokens / median:7.1f} tokens/s ({median:6.3f} s/step), "
            f"{n_tokens / cpu:7.1f} tokens per CPU second"
        )
    print(f"load average after the run: {os.getloadavg()[0]:.2f} (2 = both cores busy)")


if __name__ == "__main__":
    main()
