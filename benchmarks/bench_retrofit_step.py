"""Training speed of a RETRO-fit beside its base's own forward + backward, one process.

Times, on the same random batch (B sequences of L tokens, k = 2 neighbours of 2m tokens
per chunk): the base's forward alone; the base's forward + backward with every parameter
trainable (what fine-tuning the base would cost); and a RETRO-fit step (forward with
retrieval, backward into CCA and the neighbour encoder only, AdamW), each in fp32 and
under bf16 autocast. Prints tokens/s per line and the retrofit's ratio to the base's
forward + backward.

    .venv/bin/python benchmarks/bench_retrofit_step.py BASE [--checkpoint DIR] [--json]

BASE: a Hugging Face folder or a .gguf file. ``--checkpoint``: take the retrofit's
configuration (RETRO layers, encoder width) from a retrofit checkpoint; else the default
(CCA every third layer from 6, encoder width = the base's). Steps are timed one by one
after one untimed step; the median is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _time(fn: Callable[[], None], steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("base")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from retrodb_model.checkpoint import read_checkpoint
    from retrodb_model.hf import RetrofitModel, config_for_base, load_base

    base = load_base(a.base)
    if a.checkpoint:
        cfg = read_checkpoint(a.checkpoint).config
    else:
        cfg = config_for_base(base, chunk_size=a.chunk_size, k=2)
    model = RetrofitModel(cfg, base).train()
    opt = model.configure_optimizer(0.1, 1e-4)
    g = torch.Generator().manual_seed(0)
    B, L, m = a.batch_size, a.seq_len, cfg.chunk_size
    V = cfg.vocab_size
    tokens = torch.randint(0, V, (B, L + 1), generator=g)
    retrieved = torch.randint(0, V, (B, L // m, 2, cfg.neighbour_len), generator=g)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    rows: list[dict[str, Any]] = []

    def autocast(dtype: str) -> contextlib.AbstractContextManager[Any]:
        if dtype == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def base_forward(dtype: str) -> None:
        with torch.no_grad(), autocast(dtype):
            base(input_ids=inp)

    def base_train(dtype: str) -> None:
        with autocast(dtype):
            loss = base(input_ids=inp, labels=tokens[:, :-1]).loss
        loss.backward()
        base.zero_grad(set_to_none=True)

    def retrofit_step(dtype: str) -> None:
        with autocast(dtype):
            _, loss = model(inp, retrieved, None, tgt)
        assert loss is not None
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for dtype in ("fp32", "bf16"):
        base.requires_grad_(True)  # fine-tuning the whole base, for comparison
        seconds_fb = _time(functools.partial(base_train, dtype), a.steps)
        base.requires_grad_(False)
        for name, fn in (("base forward", base_forward), ("retrofit step", retrofit_step)):
            rows.append(
                {
                    "what": name,
                    "dtype": dtype,
                    "seconds": _time(functools.partial(fn, dtype), a.steps),
                }
            )
        rows.append({"what": "base forward + backward", "dtype": dtype, "seconds": seconds_fb})
    for r in rows:
        r["tokens_per_s"] = B * L / r["seconds"]
    trainable, total = model.freeze_for_retrofit()
    out = {
        "base": a.base,
        "retro_layers": list(cfg.retro_layers),
        "enc_dim": cfg.enc_dim,
        "batch": B,
        "seq_len": L,
        "threads": a.threads,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "rows": rows,
    }
    if a.json:
        print(json.dumps(out, indent=1))
        return
    for r in rows:
        print(
            f"{r['what']:<26} {r['dtype']:<5} {r['seconds']:7.2f} s  {r['tokens_per_s']:8.0f} tok/s"
        )


if __name__ == "__main__":
    main()
